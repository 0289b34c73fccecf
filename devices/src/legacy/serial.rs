//! The 8250/16550A serial console (COM1), built on `vm-superio`'s register model. Output goes to
//! any writer (mvm's stdout, a log file); input bytes are queued by the VMM's event loop. The
//! interrupt is an eventfd the VMM registers as a KVM irqfd.

use std::io::{self, Write};

use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// An interrupt line backed by an eventfd (a KVM irqfd on the VMM side).
#[derive(Debug)]
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    /// Wraps `evt`; each trigger writes 1 to it.
    pub fn new(evt: EventFd) -> Self {
        Self(evt)
    }

    /// The eventfd behind the trigger.
    pub fn eventfd(&self) -> &EventFd {
        &self.0
    }
}

impl Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Where the guest's console output goes.
pub type SerialOutput = Box<dyn Write + Send>;

/// COM1 as a bus device.
pub struct SerialDevice {
    uart: Serial<EventFdTrigger, NoEvents, SerialOutput>,
}

impl std::fmt::Debug for SerialDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialDevice").finish_non_exhaustive()
    }
}

impl SerialDevice {
    /// A UART that raises `irq` and writes the guest's output to `out`.
    pub fn new(irq: EventFd, out: SerialOutput) -> Self {
        Self {
            uart: Serial::new(EventFdTrigger::new(irq), out),
        }
    }

    /// Queues bytes typed on the host for the guest to read; returns how many fit in the FIFO
    /// (the rest are dropped, as a real UART drops bytes nobody reads).
    pub fn enqueue_input(&mut self, input: &[u8]) -> usize {
        match self.uart.enqueue_raw_bytes(input) {
            Ok(n) => n,
            Err(e) => {
                log::debug!("serial: input dropped: {e:?}");
                0
            }
        }
    }

    /// Free space in the receive FIFO.
    pub fn input_capacity(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// Flushes the output writer.
    pub fn flush(&mut self) -> io::Result<()> {
        self.uart.writer_mut().flush()
    }
}

/// The UART's registers and receive FIFO, as saved in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialSnapshot {
    /// Divisor latch, low and high byte.
    pub baud_divisor: [u8; 2],
    /// IER, IIR, LCR, LSR, MCR, MSR, SCR.
    pub registers: [u8; 7],
    /// Bytes the guest has not read yet.
    pub in_buffer: Vec<u8>,
}

impl SerialDevice {
    /// The registers (for a snapshot).
    pub fn state(&self) -> SerialSnapshot {
        let s = self.uart.state();
        SerialSnapshot {
            baud_divisor: [s.baud_divisor_low, s.baud_divisor_high],
            registers: [
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ],
            in_buffer: s.in_buffer,
        }
    }

    /// Puts saved registers back, keeping this device's output and interrupt line; raises the
    /// interrupt if the saved state has one pending.
    pub fn restore(&mut self, saved: &SerialSnapshot) -> io::Result<()> {
        if saved.in_buffer.len() > self.uart.fifo_capacity() + self.uart.state().in_buffer.len() {
            return Err(io::Error::other(
                "saved serial input is larger than the FIFO",
            ));
        }
        let [ier, iir, lcr, lsr, mcr, msr, scr] = saved.registers;
        let state = SerialState {
            baud_divisor_low: saved.baud_divisor[0],
            baud_divisor_high: saved.baud_divisor[1],
            interrupt_enable: ier,
            interrupt_identification: iir,
            line_control: lcr,
            line_status: lsr,
            modem_control: mcr,
            modem_status: msr,
            scratch: scr,
            in_buffer: saved.in_buffer.clone(),
        };
        let evt = self.uart.interrupt_evt().eventfd();
        let (keep, spare) = (evt.try_clone()?, evt.try_clone()?);
        let placeholder: SerialOutput = Box::new(io::sink());
        let old = std::mem::replace(
            &mut self.uart,
            Serial::new(EventFdTrigger::new(spare), placeholder),
        );
        let out = old.into_writer();
        self.uart = Serial::from_state(&state, EventFdTrigger::new(keep), NoEvents, out)
            .map_err(|e| io::Error::other(format!("{e:?}")))?;
        Ok(())
    }
}

impl crate::bus::BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        // The UART's registers are one byte wide; wider reads see zeros.
        if let (Ok(off), [byte]) = (u8::try_from(offset), data) {
            *byte = self.uart.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Ok(off), &[value]) = (u8::try_from(offset), data) else {
            return;
        };
        if let Err(e) = self.uart.write(off, value) {
            // A broken output (closed pipe, full disk) must not stop the guest.
            log::debug!("serial: write to register {off} failed: {e:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::bus::BusDevice;

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    const DATA: u64 = 0;
    const IER: u64 = 1;
    const LSR: u64 = 5;

    #[test]
    fn guest_output_reaches_the_writer_and_raises_the_interrupt() {
        let out = Capture::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(irq.try_clone().unwrap(), Box::new(out.clone()));
        // Enable the THR-empty interrupt, then send "hi".
        dev.write(IER, &[0x02]);
        for b in b"hi" {
            dev.write(DATA, &[*b]);
        }
        assert_eq!(out.0.lock().unwrap().as_slice(), b"hi");
        assert!(irq.read().unwrap() >= 1);
    }

    #[test]
    fn host_input_is_readable_by_the_guest() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(irq, Box::new(io::sink()));
        assert_eq!(dev.enqueue_input(b"ok"), 2);
        let mut b = [0u8; 1];
        dev.read(LSR, &mut b);
        assert_eq!(b[0] & 0x01, 0x01, "data ready");
        dev.read(DATA, &mut b);
        assert_eq!(b, [b'o']);
        dev.read(DATA, &mut b);
        assert_eq!(b, [b'k']);
        // A full FIFO drops the rest instead of failing.
        let cap = dev.input_capacity();
        assert_eq!(dev.enqueue_input(&vec![b'x'; cap + 10]), cap);
        assert_eq!(dev.enqueue_input(b"y"), 0);
    }

    #[test]
    fn odd_accesses_are_ignored() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(irq, Box::new(io::sink()));
        dev.write(DATA, &[1, 2, 3, 4]);
        dev.write(u64::MAX, &[1]);
        dev.write(DATA, &[]);
        let mut wide = [0xaau8; 4];
        dev.read(DATA, &mut wide);
        assert_eq!(wide, [0; 4]);
        let mut empty = [];
        dev.read(LSR, &mut empty);
    }
}
