//! The serial console's log file (`VmConfig::serial_out`), bounded: a guest that prints forever
//! must not fill the host's disk. The file keeps the first [`CONSOLE_LOG_HEAD`] bytes (the boot),
//! then the most recent output: between [`CONSOLE_LOG_TAIL`] and twice that. When the tail grows to
//! twice its size, the older half is dropped in one step and a line says how much is gone, so the
//! file never exceeds about `HEAD + 2 * TAIL` and its last line is always the guest's latest.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Bytes kept from the start of the console output (1 MiB).
pub const CONSOLE_LOG_HEAD: u64 = 1 << 20;
/// Bytes of the latest console output always kept (4 MiB; at most twice that is on disk).
pub const CONSOLE_LOG_TAIL: u64 = 4 << 20;

/// A console log file that stays within its bounds.
#[derive(Debug)]
pub struct ConsoleLog {
    file: File,
    head: u64,
    tail: u64,
    /// Bytes in the file.
    len: u64,
    /// Bytes of output dropped so far.
    dropped: u64,
}

impl ConsoleLog {
    /// Creates (or truncates) `path`, readable by its owner only, with the default bounds.
    pub fn create(path: &Path) -> io::Result<Self> {
        Self::with_bounds(path, CONSOLE_LOG_HEAD, CONSOLE_LOG_TAIL)
    }

    /// Like [`ConsoleLog::create`], keeping `head` bytes and `tail` to `2 * tail` bytes.
    pub fn with_bounds(path: &Path, head: u64, tail: u64) -> io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)?;
        Ok(ConsoleLog {
            file,
            head,
            tail: tail.max(1),
            len: 0,
            dropped: 0,
        })
    }

    /// Rewrites the part after the head as: a line saying what was dropped, then the latest
    /// `tail` bytes (from the start of a line where one begins close by).
    fn compact(&mut self) -> io::Result<()> {
        let mut keep = vec![0u8; usize::try_from(self.tail).unwrap_or(usize::MAX)];
        let from = self.len - self.tail;
        self.file.seek(SeekFrom::Start(from))?;
        self.file.read_exact(&mut keep)?;
        let start = keep
            .iter()
            .take(4096)
            .position(|&b| b == b'\n')
            .map_or(0, |i| i + 1);
        let kept = &keep[start..];
        // Everything between the head and what is kept now; the previous marker line (if any)
        // was counted in `dropped` already and is not output.
        let marker_before = self.marker().len() as u64;
        let was = if self.dropped > 0 {
            self.len - self.head - marker_before
        } else {
            self.len - self.head
        };
        self.dropped += was - kept.len() as u64;
        let marker = self.marker();
        self.file.seek(SeekFrom::Start(self.head))?;
        self.file.write_all(marker.as_bytes())?;
        self.file.write_all(kept)?;
        self.len = self.head + marker.len() as u64 + kept.len() as u64;
        self.file.set_len(self.len)?;
        Ok(())
    }

    fn marker(&self) -> String {
        format!(
            "\n[mvm: {} bytes of console output dropped here]\n",
            self.dropped
        )
    }
}

impl Write for ConsoleLog {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.write_all(buf)?;
        self.len += buf.len() as u64;
        if self.len > self.head + 2 * self.tail {
            self.compact()?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// `line`, from the guest's console, with its control characters escaped (`\u{1b}`): guest text
/// that mvm puts in a message goes to the user's terminal, where a hostile guest's escape
/// sequences would otherwise be obeyed.
pub fn printable(line: &str) -> String {
    line.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn a_guest_printing_forever_keeps_the_boot_and_the_latest_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let mut log = ConsoleLog::with_bounds(&path, 1000, 4000).unwrap();
        log.write_all(b"boot line\n").unwrap();
        let mut total = 10u64;
        for i in 0..20_000u32 {
            let line = format!("line {i:06}\n");
            // One byte at a time, as the UART writes.
            for b in line.bytes() {
                log.write_all(&[b]).unwrap();
            }
            total += line.len() as u64;
            let size = std::fs::metadata(&path).unwrap().len();
            assert!(size <= 1000 + 2 * 4000 + 100, "file grew to {size}");
        }
        log.flush().unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.starts_with("boot line\nline 000000\n"),
            "{}",
            &text[..40]
        );
        assert!(text.ends_with("line 019999\n"));
        let marker = text
            .lines()
            .find(|l| l.starts_with("[mvm: "))
            .expect("marker line");
        let dropped: u64 = marker.split_whitespace().nth(1).unwrap().parse().unwrap();
        // Everything written is either in the file or counted as dropped.
        let shown = text.len() as u64 - marker.len() as u64 - 2;
        assert_eq!(shown + dropped, total, "{marker}");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}
