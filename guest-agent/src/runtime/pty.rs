//! Terminals for `-t`: a new pseudo-terminal per process, owned by the runtime.
//!
//! The runtime (mvm on the host, the agent in a guest) opens the pair, keeps the master and hands
//! the slave to the process as its stdin, stdout, stderr and controlling terminal, in a session of
//! its own. The process never gets the user's terminal: what reaches the user goes through the
//! master, and the runtime relays it. The slave is opened from the master (`TIOCGPTPEER`), never
//! by path.

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};

use rustix::pty::OpenptFlags;
use serde::{Deserialize, Serialize};

use super::ContainerError;

/// A terminal's size in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TermSize {
    /// Rows.
    pub rows: u16,
    /// Columns.
    pub cols: u16,
}

impl Default for TermSize {
    /// 24 x 80, what a terminal is when nobody says otherwise.
    fn default() -> Self {
        TermSize { rows: 24, cols: 80 }
    }
}

impl TermSize {
    /// The size of the terminal `fd` is, if it is one with a size.
    pub fn of(fd: impl AsFd) -> Option<TermSize> {
        let w = rustix::termios::tcgetwinsize(fd).ok()?;
        (w.ws_row > 0 && w.ws_col > 0).then_some(TermSize {
            rows: w.ws_row,
            cols: w.ws_col,
        })
    }

    /// Gives the terminal `fd` (a master or a slave) this size; the kernel sends SIGWINCH to the
    /// terminal's foreground process group when it changes.
    pub fn apply(self, fd: impl AsFd) -> std::io::Result<()> {
        rustix::termios::tcsetwinsize(
            fd,
            rustix::termios::Winsize {
                ws_row: self.rows,
                ws_col: self.cols,
                ws_xpixel: 0,
                ws_ypixel: 0,
            },
        )
        .map_err(Into::into)
    }
}

/// A new pseudo-terminal pair.
#[derive(Debug)]
pub struct Pty {
    /// The runtime's end: what the process writes is read here, what is written here is the
    /// process's input.
    pub master: File,
    /// The process's end (its stdio and controlling terminal).
    pub slave: OwnedFd,
}

/// Opens a new pseudo-terminal of `size`. Both ends are close-on-exec.
pub fn open(size: TermSize) -> Result<Pty, ContainerError> {
    let os = |what| move |e: rustix::io::Errno| ContainerError::Os(what, e.into());
    let flags = OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC;
    let master = rustix::pty::openpt(flags).map_err(os("open a terminal (/dev/ptmx)"))?;
    rustix::pty::grantpt(&master).map_err(os("grantpt"))?;
    rustix::pty::unlockpt(&master).map_err(os("unlockpt"))?;
    let slave =
        rustix::pty::ioctl_tiocgptpeer(&master, flags).map_err(os("open the terminal's peer"))?;
    size.apply(&master)
        .map_err(|e| ContainerError::Os("set the terminal size", e))?;
    Ok(Pty {
        master: File::from(master),
        slave,
    })
}

/// Whether an error reading a terminal master means the other side is gone (all of the slave's
/// descriptors closed): Linux then answers `EIO`, where a pipe would give end-of-file.
pub fn is_hangup(e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(libc::EIO)
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    #[test]
    fn a_new_terminal_has_its_size_and_echoes_through_the_line_discipline() {
        let Pty { mut master, slave } = open(TermSize {
            rows: 33,
            cols: 101,
        })
        .expect("pty");
        assert_eq!(
            TermSize::of(&slave),
            Some(TermSize {
                rows: 33,
                cols: 101
            })
        );
        TermSize { rows: 10, cols: 20 }
            .apply(&master)
            .expect("resize");
        assert_eq!(TermSize::of(&slave), Some(TermSize { rows: 10, cols: 20 }));
        let mut slave = File::from(slave);
        slave.write_all(b"hi\n").expect("write");
        let mut buf = [0u8; 4];
        master.read_exact(&mut buf).expect("read");
        // ONLCR: a newline reaches the terminal as CR LF.
        assert_eq!(&buf, b"hi\r\n");
        drop(slave);
        let e = master.read(&mut buf).expect_err("hung up");
        assert!(is_hangup(&e), "{e}");
    }
}
