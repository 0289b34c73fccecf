//! virtio-vsock: hand every packet of a fuzzer-built TX queue to a connection muxer (which keeps
//! its state across inputs, as it would across a guest's requests), then fill the RX queue.
#![no_main]

use std::sync::{Arc, Mutex, OnceLock};

use devices::virtio::vsock::queues::VsockQueues;
use devices::virtio::vsock::{Muxer, VsockMetrics};
use libfuzzer_sys::fuzz_target;
use mvm_fuzz::{NoInterrupt, QueueInput};
use virtio_queue::{Queue, QueueT};

fn muxer() -> &'static Mutex<Muxer> {
    static MUXER: OnceLock<Mutex<Muxer>> = OnceLock::new();
    MUXER.get_or_init(|| {
        let path = std::env::temp_dir().join(format!("mvm-fuzz-vsock-{}.sock", std::process::id()));
        let muxer = Muxer::new(&path, 3, Arc::new(VsockMetrics::default()))
            .expect("bind the fuzz muxer's socket");
        // Bound and listening: the name is not needed any more (a fuzz run leaves no file).
        let _ = std::fs::remove_file(&path);
        Mutex::new(muxer)
    })
}

fuzz_target!(|data: &[u8]| {
    let (Some(tx_in), Some(rx_in)) = (QueueInput::new(data), QueueInput::new(data)) else {
        return;
    };
    let idle = || Queue::new(256).ok();
    let (Some(a), Some(b), Some(c), Some(d)) = (idle(), idle(), idle(), idle()) else {
        return;
    };
    let mut muxer = muxer().lock().unwrap_or_else(|p| p.into_inner());
    let metrics = Arc::new(VsockMetrics::default());
    let irq = Arc::new(NoInterrupt);
    let mut q = VsockQueues::new(tx_in.mem, a, tx_in.queue, b, irq.clone(), metrics.clone());
    q.process_tx(&mut muxer);
    let mut q = VsockQueues::new(rx_in.mem, rx_in.queue, c, d, irq, metrics);
    let _ = q.process_rx(&mut muxer);
});
