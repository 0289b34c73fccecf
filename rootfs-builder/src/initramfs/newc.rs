//! The cpio "newc" encoding: 110-byte ASCII headers (magic `070701`, then 13 eight-digit hex
//! fields), NUL-terminated names, and every header+name and every body padded to four bytes.

use std::io::{self, Write};

/// newc header magic.
pub(super) const MAGIC: &[u8; 6] = b"070701";
/// Size of a newc header: the magic and 13 eight-digit hex fields.
pub(super) const HEADER_LEN: usize = 110;
/// Name of the entry that ends an archive.
pub(super) const TRAILER: &str = "TRAILER!!!";

/// The fields of a newc header that vary between entries (uid, gid, mtime and dev are 0).
pub(super) struct Header {
    pub(super) ino: u32,
    pub(super) mode: u32,
    pub(super) nlink: u32,
    pub(super) size: u32,
    pub(super) rdev: (u32, u32),
}

/// Writes a header and its padded, NUL-terminated name.
pub(super) fn write_header<W: Write>(out: &mut W, h: &Header, name: &str) -> io::Result<()> {
    let namesize = name.len() + 1;
    let fields = [
        h.ino,
        h.mode,
        0, // uid
        0, // gid
        h.nlink,
        0, // mtime
        h.size,
        0, // devmajor
        0, // devminor
        h.rdev.0,
        h.rdev.1,
        u32::try_from(namesize).map_err(|_| io::Error::other("name too long"))?,
        0, // check
    ];
    let mut buf = Vec::with_capacity(HEADER_LEN + namesize + 3);
    buf.extend_from_slice(MAGIC);
    for f in fields {
        buf.extend_from_slice(format!("{f:08X}").as_bytes());
    }
    buf.extend_from_slice(name.as_bytes());
    buf.push(0);
    out.write_all(&buf)?;
    pad4(out, HEADER_LEN + namesize)
}

/// Writes the zero bytes that bring a field of `len` bytes to a multiple of four.
pub(super) fn pad4<W: Write>(out: &mut W, len: usize) -> io::Result<()> {
    let pad = (4 - len % 4) % 4;
    out.write_all(&[0u8; 3][..pad])
}

/// Counts bytes written and remembers whether the inner writer failed.
pub(super) struct CountingWriter<W> {
    pub(super) inner: W,
    pub(super) count: u64,
    pub(super) failed: bool,
}

impl<W: Write> Write for CountingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self.inner.write(buf) {
            Ok(n) => {
                self.count += n as u64;
                Ok(n)
            }
            Err(e) => {
                self.failed = true;
                Err(e)
            }
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Writes the entry that ends an archive.
pub(super) fn write_trailer<W: Write>(out: &mut W) -> io::Result<()> {
    let trailer = Header {
        ino: 0,
        mode: 0,
        nlink: 1,
        size: 0,
        rdev: (0, 0),
    };
    write_header(out, &trailer, TRAILER)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn field(b: &[u8], i: usize) -> u32 {
        let s = std::str::from_utf8(&b[6 + 8 * i..14 + 8 * i]).unwrap();
        u32::from_str_radix(s, 16).unwrap()
    }

    #[test]
    fn header_is_110_bytes_of_hex_then_padded_name() {
        let mut b = Vec::new();
        let h = Header {
            ino: 7,
            mode: 0o020_600,
            nlink: 1,
            size: 0x1234_abcd,
            rdev: (5, 1),
        };
        write_header(&mut b, &h, "dev/console").unwrap();
        assert_eq!(&b[..6], MAGIC);
        assert!(b[6..HEADER_LEN].iter().all(u8::is_ascii_hexdigit));
        assert_eq!(field(&b, 0), 7);
        assert_eq!(field(&b, 1), 0o020_600);
        assert_eq!(field(&b, 6), 0x1234_abcd);
        assert_eq!((field(&b, 9), field(&b, 10)), (5, 1));
        assert_eq!(field(&b, 11), 12, "namesize counts the NUL");
        // 110 + 12 = 122, padded to 124.
        assert_eq!(b.len(), 124);
        assert_eq!(&b[HEADER_LEN..], b"dev/console\0\0\0");
    }

    #[test]
    fn padding_reaches_a_multiple_of_four() {
        for len in 0..9 {
            let mut b = Vec::new();
            pad4(&mut b, len).unwrap();
            assert_eq!((len + b.len()) % 4, 0);
            assert!(b.len() < 4 && b.iter().all(|&x| x == 0));
        }
    }

    #[test]
    fn trailer_names_itself() {
        let mut b = Vec::new();
        write_trailer(&mut b).unwrap();
        assert_eq!(b.len(), 124);
        assert_eq!(&b[HEADER_LEN..HEADER_LEN + 10], TRAILER.as_bytes());
        assert_eq!(field(&b, 4), 1);
    }
}
