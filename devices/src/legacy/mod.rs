//! Legacy PC devices on the port I/O bus: the 8250 serial console and the i8042 controller,
//! whose only job here is to let the guest reset (end) the VM.

pub mod i8042;
pub mod serial;

pub use i8042::{I8042Device, I8042State};
pub use serial::{EventFdTrigger, SerialDevice, SerialSnapshot};

/// Port of the first serial port (COM1).
pub const SERIAL_PORT_BASE: u64 = 0x3f8;
/// Number of registers of an 8250 UART.
pub const SERIAL_PORT_LEN: u64 = 8;
/// Interrupt line of COM1.
pub const SERIAL_IRQ: u32 = 4;
/// First port of the i8042 range: 0x60 is data, 0x64 is status/command.
pub const I8042_PORT_BASE: u64 = 0x60;
/// Length of the i8042 range (0x60..=0x64).
pub const I8042_PORT_LEN: u64 = 5;
