//! virtio-rng: fill every chain of a fuzzer-built queue.
#![no_main]

use devices::virtio::rng::device::process_queue;
use devices::virtio::rng::RngMetrics;
use libfuzzer_sys::fuzz_target;
use mvm_fuzz::QueueInput;

fuzz_target!(|data: &[u8]| {
    let Some(mut input) = QueueInput::new(data) else {
        return;
    };
    let mut buf = vec![0u8; 4096];
    let metrics = RngMetrics::default();
    let _ = process_queue(&mut input.queue, &input.mem, &mut buf, &metrics);
});
