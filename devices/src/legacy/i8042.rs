//! A minimal i8042 keyboard controller. The guest uses it to reset the machine (Linux's
//! `reboot=k` writes command 0xfe to port 0x64); mvm treats that reset as the end of the VM.
//! There is no keyboard behind it: the controller answers the few commands a driver probes with.

use std::collections::VecDeque;

/// Offset of the data port (0x60) in the device's range.
const DATA_OFFSET: u64 = 0;
/// Offset of the status (read) / command (write) port (0x64) in the device's range.
const COMMAND_OFFSET: u64 = 4;

/// Command: pulse the CPU reset line.
pub const CMD_RESET_CPU: u8 = 0xfe;
const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_INTERFACE_TEST: u8 = 0xab;
const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;

/// Status bit: output buffer full (a byte waits at port 0x60).
const STATUS_OUT_FULL: u8 = 0x01;
/// Status bit: system flag (set after a successful self test).
const STATUS_SYSTEM: u8 = 0x04;

/// Most bytes the output queue holds; the guest reads them one by one.
const MAX_QUEUED: usize = 16;

/// What to call when the guest asks for a reset.
pub type ResetCallback = Box<dyn Fn() + Send>;

/// The i8042 controller.
pub struct I8042Device {
    on_reset: ResetCallback,
    control: u8,
    output_port: u8,
    /// The last command that expects a data byte at port 0x60.
    pending: Option<u8>,
    out: VecDeque<u8>,
    resets: u64,
}

impl std::fmt::Debug for I8042Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("I8042Device")
            .field("control", &self.control)
            .field("resets", &self.resets)
            .finish_non_exhaustive()
    }
}

impl I8042Device {
    /// A controller that calls `on_reset` each time the guest writes the reset command.
    pub fn new(on_reset: ResetCallback) -> Self {
        Self {
            on_reset,
            control: 0,
            output_port: 0x01,
            pending: None,
            out: VecDeque::new(),
            resets: 0,
        }
    }

    /// How many reset commands the guest has written.
    pub fn resets(&self) -> u64 {
        self.resets
    }

    fn push(&mut self, byte: u8) {
        if self.out.len() < MAX_QUEUED {
            self.out.push_back(byte);
        }
    }

    fn command(&mut self, cmd: u8) {
        match cmd {
            CMD_RESET_CPU => {
                self.resets += 1;
                log::debug!("i8042: guest requested a reset");
                (self.on_reset)();
            }
            CMD_READ_CTR => self.push(self.control),
            CMD_WRITE_CTR | CMD_WRITE_OUTPUT_PORT => self.pending = Some(cmd),
            CMD_SELF_TEST => self.push(0x55),
            CMD_INTERFACE_TEST => self.push(0x00),
            CMD_READ_OUTPUT_PORT => self.push(self.output_port),
            other => log::debug!("i8042: ignoring command {other:#x}"),
        }
    }

    fn data(&mut self, value: u8) {
        match self.pending.take() {
            Some(CMD_WRITE_CTR) => self.control = value,
            Some(CMD_WRITE_OUTPUT_PORT) => {
                self.output_port = value;
                // Bit 0 of the output port is the CPU reset line (active low).
                if value & 0x01 == 0 {
                    self.command(CMD_RESET_CPU);
                }
            }
            _ => log::debug!("i8042: ignoring data byte {value:#x} (no keyboard)"),
        }
    }
}

/// The controller's registers, as saved in a snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct I8042State {
    /// Controller configuration byte.
    pub control: u8,
    /// Output port.
    pub output_port: u8,
    /// A command waiting for its data byte.
    pub pending: Option<u8>,
    /// Bytes waiting at port 0x60.
    pub out: Vec<u8>,
}

impl I8042Device {
    /// The registers (for a snapshot).
    pub fn state(&self) -> I8042State {
        I8042State {
            control: self.control,
            output_port: self.output_port,
            pending: self.pending,
            out: self.out.iter().copied().collect(),
        }
    }

    /// Puts saved registers back (bytes past the queue's bound are dropped).
    pub fn restore(&mut self, state: &I8042State) {
        self.control = state.control;
        self.output_port = state.output_port;
        self.pending = state.pending;
        self.out = state.out.iter().copied().take(MAX_QUEUED).collect();
    }
}

impl crate::bus::BusDevice for I8042Device {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            DATA_OFFSET => self.out.pop_front().unwrap_or(0),
            COMMAND_OFFSET => {
                let full = if self.out.is_empty() {
                    0
                } else {
                    STATUS_OUT_FULL
                };
                STATUS_SYSTEM | full
            }
            _ => 0xff,
        };
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else {
            return;
        };
        match offset {
            DATA_OFFSET => self.data(value),
            COMMAND_OFFSET => self.command(value),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    use super::*;
    use crate::bus::BusDevice;

    fn device() -> (I8042Device, Arc<AtomicU32>) {
        let count = Arc::new(AtomicU32::new(0));
        let c = count.clone();
        let dev = I8042Device::new(Box::new(move || {
            c.fetch_add(1, Ordering::SeqCst);
        }));
        (dev, count)
    }

    #[test]
    fn reset_command_calls_back() {
        let (mut dev, count) = device();
        dev.write(COMMAND_OFFSET, &[CMD_RESET_CPU]);
        assert_eq!(count.load(Ordering::SeqCst), 1);
        assert_eq!(dev.resets(), 1);
        // Pulling the reset line through the output port also resets.
        dev.write(COMMAND_OFFSET, &[CMD_WRITE_OUTPUT_PORT]);
        dev.write(DATA_OFFSET, &[0xfe]);
        assert_eq!(count.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn answers_probe_commands_and_ignores_the_rest() {
        let (mut dev, count) = device();
        let mut b = [0u8; 1];
        dev.read(COMMAND_OFFSET, &mut b);
        assert_eq!(b[0] & STATUS_OUT_FULL, 0);
        dev.write(COMMAND_OFFSET, &[CMD_SELF_TEST]);
        dev.read(COMMAND_OFFSET, &mut b);
        assert_eq!(b[0] & STATUS_OUT_FULL, STATUS_OUT_FULL);
        dev.read(DATA_OFFSET, &mut b);
        assert_eq!(b, [0x55]);
        dev.write(COMMAND_OFFSET, &[CMD_WRITE_CTR]);
        dev.write(DATA_OFFSET, &[0x47]);
        dev.write(COMMAND_OFFSET, &[CMD_READ_CTR]);
        dev.read(DATA_OFFSET, &mut b);
        assert_eq!(b, [0x47]);
        // Odd sizes and offsets from a hostile guest are harmless.
        dev.write(COMMAND_OFFSET, &[]);
        dev.write(2, &[CMD_RESET_CPU]);
        let mut wide = [0xaau8; 4];
        dev.read(1, &mut wide);
        assert_eq!(wide, [0xff, 0, 0, 0]);
        for _ in 0..100 {
            dev.write(COMMAND_OFFSET, &[CMD_SELF_TEST]);
        }
        assert_eq!(count.load(Ordering::SeqCst), 0);
    }
}
