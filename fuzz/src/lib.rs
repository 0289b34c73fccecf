//! Shared input decoding for the fuzz targets: turns fuzzer bytes into guest memory with a
//! split virtqueue whose descriptor table, rings and buffers are all fuzzer-controlled.

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Guest memory layout: two 64 KiB regions with a hole between them, so buffers can straddle
/// the end of a region or point into the hole.
pub const REGIONS: [(u64, usize); 2] = [(0, 0x1_0000), (0x2_0000, 0x1_0000)];
/// Descriptor table address; the available ring follows it directly, so short inputs already
/// hold a descriptor table and an available ring.
pub const DESC_TABLE: u64 = 0x0;
/// Used ring address (written by the device only).
pub const USED_RING: u64 = 0x8000;

/// Guest memory laid out as [`REGIONS`], filled region by region from `bytes` (zero past
/// their end).
pub fn guest_memory(bytes: &[u8]) -> Option<GuestMemoryMmap> {
    let ranges: Vec<_> = REGIONS.iter().map(|&(a, l)| (GuestAddress(a), l)).collect();
    let mem = GuestMemoryMmap::from_ranges(&ranges).ok()?;
    let mut rest = bytes;
    for &(addr, len) in &REGIONS {
        let n = rest.len().min(len);
        mem.write_slice(&rest[..n], GuestAddress(addr)).ok()?;
        rest = &rest[n..];
    }
    Some(mem)
}

/// An interrupt line that goes nowhere (the fuzz targets only check the device side).
#[derive(Debug)]
pub struct NoInterrupt;

impl devices::virtio::VirtioInterrupt for NoInterrupt {
    fn trigger(&self, _kind: devices::virtio::InterruptKind) -> std::io::Result<()> {
        Ok(())
    }
}

/// A queue over fuzzer-filled guest memory, plus the control bytes left for the target.
pub struct QueueInput {
    /// Guest memory filled from the input.
    pub mem: GuestMemoryMmap,
    /// The queue as a driver would have configured it.
    pub queue: Queue,
    /// Bytes the target may use for its own settings.
    pub flags: u8,
}

impl QueueInput {
    /// Decodes `data`: byte 0 picks the queue size (1..=256), bytes 1-2 the next avail index,
    /// byte 3 is left to the target, the rest fills guest memory region by region.
    pub fn new(data: &[u8]) -> Option<Self> {
        let (head, body) = data.split_at_checked(4)?;
        let mem = guest_memory(body)?;
        let size = 1u16 << (head[0] % 9);
        let mut queue = Queue::new(256).ok()?;
        queue.set_size(size);
        queue.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
        let avail_ring = DESC_TABLE + 16 * u64::from(size);
        queue.set_avail_ring_address(Some(avail_ring as u32), Some(0));
        queue.set_used_ring_address(Some(USED_RING as u32), Some(0));
        queue.set_event_idx(head[0] & 0x80 != 0);
        queue.set_next_avail(u16::from_le_bytes([head[1], head[2]]));
        queue.set_ready(true);
        queue.is_valid(&mem).then_some(Self {
            mem,
            queue,
            flags: head[3],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::virtio::block::device::process_queue;
    use devices::virtio::block::{BlockMetrics, Disk, MemDisk};

    /// The committed seeds are well-formed requests: every one completes with status OK, so the
    /// fuzzer starts from inputs that reach request execution.
    #[test]
    fn block_seeds_complete_with_status_ok() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/seeds/block_request");
        let mut seen = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            let mut input = QueueInput::new(&data).expect("seed decodes");
            let mut disk = Disk::new(Box::new(MemDisk::new(64 * 1024, false)), None).unwrap();
            disk.set_negotiated(true, true);
            let m = BlockMetrics::default();
            process_queue(&mut input.queue, &input.mem, &mut disk, &m).unwrap();
            let status: u8 = input.mem.read_obj(GuestAddress(0x800)).unwrap();
            assert_eq!(status, 0, "{}", path.display());
            seen += 1;
        }
        assert_eq!(seen, 6);
    }

    /// The committed agent_protocol seeds are well-formed sessions: the agent's decode to
    /// requests and stdin without an error, the host's open a session with a hello.
    #[test]
    fn agent_seeds_are_well_formed_sessions() {
        use guest_agent::agent::client::AgentClient;
        use guest_agent::protocol::{ClientFrame, Frame};

        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/seeds/agent_protocol");
        let mut seen = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let mut stream = data[1..].to_vec();
            if name.starts_with("agent_") {
                let mut frames = 0;
                while let Some(frame) = Frame::take_from(&mut stream).unwrap() {
                    match ClientFrame::decode(frame).unwrap() {
                        ClientFrame::Request(req) => drop(req.expect(&name)),
                        ClientFrame::Stdin { .. } => {}
                    }
                    frames += 1;
                }
                assert!(stream.is_empty() && frames > 1, "{name}");
            } else {
                let conn = std::io::Cursor::new(stream);
                let conn = ReadOnly(conn);
                AgentClient::open(conn).expect(&name);
            }
            seen += 1;
        }
        assert_eq!(seen, 6);
    }

    /// A connection that reads from a buffer and drops what is written.
    struct ReadOnly(std::io::Cursor<Vec<u8>>);

    impl std::io::Read for ReadOnly {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.0.read(buf)
        }
    }

    impl std::io::Write for ReadOnly {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
}
