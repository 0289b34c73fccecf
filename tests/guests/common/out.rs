//! Serial output: whole lines on the 8250 UART at I/O port 0x3f8, each starting with
//! `mvm-test-guest: ` so the host can pick them out of anything else on the console.
//!
//! Bytes go straight to the transmit register: the VMM's and QEMU's UARTs accept a byte at any
//! time, and polling the line status register would double the number of VM exits.

use super::outb;

/// The first COM port's transmit holding register.
const COM1: u16 = 0x3f8;

/// Prefix of every line the guests print.
pub const PREFIX: &str = "mvm-test-guest: ";

fn put(byte: u8) {
    // SAFETY: COM1's transmit register takes one byte for output; nothing else is affected.
    unsafe { outb(COM1, byte) };
}

/// One output line under construction; every method writes through at once.
#[derive(Debug)]
pub struct Line(());

/// Starts a line (writes the prefix).
pub fn line() -> Line {
    for b in PREFIX.bytes() {
        put(b);
    }
    Line(())
}

impl Line {
    /// Appends text.
    pub fn s(self, text: &str) -> Self {
        self.bytes(text.as_bytes())
    }

    /// Appends raw bytes, with control characters and non-ASCII shown as `\xNN`.
    pub fn bytes(self, bytes: &[u8]) -> Self {
        for &b in bytes {
            if (0x20..0x7f).contains(&b) && b != b'\\' {
                put(b);
            } else {
                put(b'\\');
                put(b'x');
                put(hex_digit(b >> 4));
                put(hex_digit(b & 0xf));
            }
        }
        self
    }

    /// Appends `0x` and the value in hexadecimal, without leading zeros.
    pub fn hex(self, value: u64) -> Self {
        let digits = (64 - value.leading_zeros()).div_ceil(4).max(1);
        self.hex_digits(value, digits)
    }

    /// Appends `0x` and exactly `digits` hexadecimal digits of the value.
    pub fn hex_digits(self, value: u64, digits: u32) -> Self {
        put(b'0');
        put(b'x');
        let mut i = digits;
        while i > 0 {
            i -= 1;
            put(hex_digit(((value >> (i * 4)) & 0xf) as u8));
        }
        self
    }

    /// Appends every byte as two hexadecimal digits, without a prefix or separators.
    #[allow(dead_code)]
    pub fn hex_bytes(self, bytes: &[u8]) -> Self {
        for &b in bytes {
            put(hex_digit(b >> 4));
            put(hex_digit(b & 0xf));
        }
        self
    }

    /// Appends the value in decimal.
    pub fn dec(self, value: u64) -> Self {
        let mut buf = [0u8; 20];
        let mut n = 0;
        let mut v = value;
        loop {
            buf[n] = b'0' + (v % 10) as u8;
            n += 1;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        while n > 0 {
            n -= 1;
            put(buf[n]);
        }
        self
    }

    /// Ends the line.
    pub fn end(self) {
        put(b'\n');
    }
}

fn hex_digit(nibble: u8) -> u8 {
    if nibble < 10 {
        b'0' + nibble
    } else {
        b'a' + nibble - 10
    }
}
