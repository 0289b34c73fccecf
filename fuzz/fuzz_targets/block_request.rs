//! virtio-blk: parse and execute every chain of a fuzzer-built queue against an in-memory disk.
#![no_main]

use devices::virtio::block::device::process_queue;
use devices::virtio::block::{BlockMetrics, Disk, MemDisk};
use libfuzzer_sys::fuzz_target;
use mvm_fuzz::QueueInput;

fuzz_target!(|data: &[u8]| {
    let Some(mut input) = QueueInput::new(data) else {
        return;
    };
    let read_only = input.flags & 1 != 0;
    let backend = MemDisk::new(64 * 1024, read_only);
    let Ok(mut disk) = Disk::new(Box::new(backend), None) else {
        return;
    };
    disk.set_negotiated(input.flags & 2 != 0, input.flags & 4 != 0);
    let metrics = BlockMetrics::default();
    let _ = process_queue(&mut input.queue, &input.mem, &mut disk, &metrics);
});
