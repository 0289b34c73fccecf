//! virtio-net: transmit every chain of a fuzzer-built TX queue, then receive a frame into the
//! same queue used as the RX queue.
#![no_main]

use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;

use devices::virtio::net::queues::NetQueues;
use devices::virtio::net::{NetBackend, NetMetrics};
use devices::virtio::rate_limiter::{Limit, Throttle};
use libfuzzer_sys::fuzz_target;
use mvm_fuzz::{NoInterrupt, QueueInput};
use virtio_queue::{Queue, QueueT};

#[derive(Debug)]
/// Swallows transmitted frames; offers one received frame of a fuzzer-chosen length.
struct Backend {
    rx_len: usize,
}

impl NetBackend for Backend {
    fn send(&mut self, _vnet_hdr: &[u8], _frame: &[u8]) -> io::Result<()> {
        Ok(())
    }
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.rx_len == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = self.rx_len.min(buf.len());
        buf[..n].fill(0xab);
        self.rx_len = 0;
        Ok(n)
    }
    fn raw_fd(&self) -> RawFd {
        -1
    }
    fn offload_features(&self) -> u64 {
        0
    }
    fn set_offloads(&mut self, _acked: u64) -> io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let (Some(tx_in), Some(rx_in)) = (QueueInput::new(data), QueueInput::new(data)) else {
        return;
    };
    let (Ok(idle_rx), Ok(idle_tx)) = (Queue::new(256), Queue::new(256)) else {
        return;
    };
    let mrg = tx_in.flags & 1 != 0;
    let mut backend = Backend {
        rx_len: usize::from(tx_in.flags) * 300,
    };
    // No limits: the throttle never holds a queue back.
    let Ok(mut throttle) = Throttle::new(Limit::default(), Limit::default()) else {
        return;
    };
    let metrics = Arc::new(NetMetrics::default());
    let irq = Arc::new(NoInterrupt);
    let mut tx = NetQueues::new(
        tx_in.mem,
        idle_rx,
        tx_in.queue,
        irq.clone(),
        mrg,
        metrics.clone(),
    );
    tx.process_tx(&mut backend, &mut throttle);
    let mut rx = NetQueues::new(rx_in.mem, rx_in.queue, idle_tx, irq, mrg, metrics);
    let _ = rx.process_rx(&mut backend, &mut throttle);
});
