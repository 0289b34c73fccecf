//! Parsing a virtio-blk request out of a descriptor chain.
//!
//! A request is a 16-byte header (type, reserved, sector) in device-readable buffers, then data
//! (device-readable for writes, device-writable for reads), then one status byte at the very end
//! of the last, device-writable descriptor. The driver may split any of these across descriptors
//! as it likes; [`Request::parse`] only insists on what the device needs to answer safely.

use virtio_queue::{DescriptorChain, Reader, Writer};
use vm_memory::bitmap::{BitmapSlice, WithBitmapSlice};
use vm_memory::GuestMemory;

use super::request_type;

/// Size of the request header.
pub const HEADER_LEN: usize = 16;

/// Why a descriptor chain cannot be answered with a status byte.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The chain has no descriptors (head index out of range, unreadable table).
    #[error("empty descriptor chain")]
    Empty,
    /// The chain is longer than the device allows.
    #[error("descriptor chain longer than {0} descriptors")]
    TooManyDescriptors(usize),
    /// A device-readable descriptor follows a device-writable one.
    #[error("readable descriptor after a writable one")]
    ReadableAfterWritable,
    /// The last descriptor is not a device-writable buffer of at least one byte.
    #[error("no writable status byte at the end of the chain")]
    NoStatus,
    /// A buffer lies (partly) outside guest memory.
    #[error("descriptor buffer outside guest memory")]
    Memory(#[source] virtio_queue::Error),
}

/// What the driver asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    /// Read sectors into the writable data buffers.
    In,
    /// Write the readable data buffers to sectors.
    Out,
    /// Make earlier writes durable.
    Flush,
    /// Return the device serial.
    GetId,
    /// Deallocate the ranges listed in the payload.
    Discard,
    /// Zero the ranges listed in the payload.
    WriteZeroes,
    /// A type this device does not know.
    Unsupported(u32),
    /// The readable part is shorter than a header: answered with IOERR.
    Malformed,
}

impl RequestKind {
    fn from_type(t: u32) -> Self {
        match t {
            request_type::IN => Self::In,
            request_type::OUT => Self::Out,
            request_type::FLUSH => Self::Flush,
            request_type::GET_ID => Self::GetId,
            request_type::DISCARD => Self::Discard,
            request_type::WRITE_ZEROES => Self::WriteZeroes,
            other => Self::Unsupported(other),
        }
    }
}

/// One segment of a DISCARD or WRITE_ZEROES payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiscardSegment {
    /// First sector.
    pub sector: u64,
    /// Number of sectors.
    pub num_sectors: u32,
    /// Flags (bit 0: unmap allowed, for WRITE_ZEROES).
    pub flags: u32,
}

/// Size of one [`DiscardSegment`] on the wire.
pub const DISCARD_SEGMENT_LEN: usize = 16;

impl DiscardSegment {
    /// Decodes a segment from its little-endian wire form.
    pub fn from_bytes(b: &[u8; DISCARD_SEGMENT_LEN]) -> Self {
        Self {
            sector: u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
            num_sectors: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
            flags: u32::from_le_bytes([b[12], b[13], b[14], b[15]]),
        }
    }
}

/// A request whose buffers are all inside guest memory and whose status byte is known.
pub struct Request<'a, B> {
    /// What the driver asked for.
    pub kind: RequestKind,
    /// First sector (IN/OUT).
    pub sector: u64,
    /// Device-readable bytes after the header (OUT data, DISCARD/WRITE_ZEROES segments).
    pub payload: Reader<'a, B>,
    /// Device-writable bytes before the status byte (IN data, GET_ID serial).
    pub data: Writer<'a, B>,
    status: Writer<'a, B>,
}

impl<B> std::fmt::Debug for Request<'_, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("kind", &self.kind)
            .field("sector", &self.sector)
            .finish_non_exhaustive()
    }
}

impl<'a, B: BitmapSlice> Request<'a, B> {
    /// Checks the chain's shape (at most `max_descriptors`, readable before writable, a writable
    /// status byte last, every buffer in `mem`) and decodes the header.
    pub fn parse<M, T>(
        chain: DescriptorChain<T>,
        mem: &'a M,
        max_descriptors: usize,
    ) -> Result<Self, RequestError>
    where
        M: GuestMemory,
        M::Bitmap: WithBitmapSlice<'a, S = B>,
        T: std::ops::Deref + Clone,
        T::Target: GuestMemory + Sized,
    {
        let mut count = 0usize;
        let mut seen_writable = false;
        let mut last = None;
        for desc in chain.clone().take(max_descriptors.saturating_add(1)) {
            count += 1;
            if desc.is_write_only() {
                seen_writable = true;
            } else if seen_writable {
                return Err(RequestError::ReadableAfterWritable);
            }
            last = Some(desc);
        }
        let last = last.ok_or(RequestError::Empty)?;
        if count > max_descriptors {
            return Err(RequestError::TooManyDescriptors(max_descriptors));
        }
        if !last.is_write_only() || last.len() == 0 {
            return Err(RequestError::NoStatus);
        }

        let mut payload = Reader::new(mem, chain.clone()).map_err(RequestError::Memory)?;
        let mut data = Writer::new(mem, chain).map_err(RequestError::Memory)?;
        let status_at = data
            .available_bytes()
            .checked_sub(1)
            .ok_or(RequestError::NoStatus)?;
        let status = data.split_at(status_at).map_err(RequestError::Memory)?;

        // type: le32, reserved: le32, sector: le64.
        let (kind, sector) = match payload.read_obj::<[u8; HEADER_LEN]>() {
            Ok(h) => (
                RequestKind::from_type(u32::from_le_bytes([h[0], h[1], h[2], h[3]])),
                u64::from_le_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]),
            ),
            Err(_) => (RequestKind::Malformed, 0),
        };
        Ok(Self {
            kind,
            sector,
            payload,
            data,
            status,
        })
    }

    /// Writes the status byte; returns the used length (bytes written to writable buffers).
    pub fn complete(mut self, status: u8) -> u32 {
        let status_written = self.status.write_obj(status).is_ok();
        let total = self.data.bytes_written() + usize::from(status_written);
        u32::try_from(total).unwrap_or(u32::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_utils::*;
    use std::io::Read;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueOwnedT};
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    fn header(t: u32, sector: u64) -> Vec<u8> {
        let mut h = t.to_le_bytes().to_vec();
        h.extend_from_slice(&[0; 4]);
        h.extend_from_slice(&sector.to_le_bytes());
        h
    }

    fn parse_first(
        mem: &GuestMemoryMmap,
        q: &MockSplitQueue<GuestMemoryMmap>,
        max: usize,
    ) -> Result<(RequestKind, u64, usize, usize), RequestError> {
        let mut queue: Queue = q.create_queue().unwrap();
        let chain = queue.iter(mem).unwrap().next().unwrap();
        let r = Request::parse(chain, mem, max)?;
        Ok((
            r.kind,
            r.sector,
            r.payload.available_bytes(),
            r.data.available_bytes(),
        ))
    }

    #[test]
    fn header_and_data_split_across_descriptors() {
        let mem = guest_mem();
        let q = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        let h = header(1, 0x1122_3344_5566);
        write_mem(&mem, BUF_BASE, &h[..3]);
        write_mem(&mem, BUF_BASE + 0x100, &h[3..11]);
        write_mem(&mem, BUF_BASE + 0x200, &h[11..]);
        write_mem(&mem, BUF_BASE + 0x200 + 5, &[0xab; 7]);
        add_chain(
            &q,
            0,
            &[
                (BUF_BASE, 3, false),
                (BUF_BASE + 0x100, 8, false),
                (BUF_BASE + 0x200, 12, false),
                (BUF_BASE + 0x300, 500, false),
                (BUF_BASE + 0x1000, 1, true),
            ],
        );
        let mut queue: Queue = q.create_queue().unwrap();
        let chain = queue.iter(&mem).unwrap().next().unwrap();
        let mut r = Request::parse(chain, &mem, 16).unwrap();
        assert_eq!(r.kind, RequestKind::Out);
        assert_eq!(r.sector, 0x1122_3344_5566);
        assert_eq!(r.payload.available_bytes(), 7 + 500);
        let mut first = [0u8; 7];
        r.payload.read_exact(&mut first).unwrap();
        assert_eq!(first, [0xab; 7]);
        assert_eq!(r.data.available_bytes(), 0);
        assert_eq!(r.complete(0), 1);
        assert_eq!(read_mem(&mem, BUF_BASE + 0x1000, 1), [0]);
    }

    #[test]
    fn status_is_the_last_byte_of_a_longer_writable_descriptor() {
        let mem = guest_mem();
        let q = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        write_mem(&mem, BUF_BASE, &header(0, 3));
        add_chain(
            &q,
            0,
            &[(BUF_BASE, 16, false), (BUF_BASE + 0x100, 513, true)],
        );
        let (kind, sector, payload, data) = parse_first(&mem, &q, 16).unwrap();
        assert_eq!((kind, sector, payload, data), (RequestKind::In, 3, 0, 512));
    }

    #[test]
    fn short_or_writable_header_is_malformed() {
        for descs in [
            // Header only 10 bytes long.
            vec![(BUF_BASE, 10, false), (BUF_BASE + 0x100, 1, true)],
            // Header in a device-writable buffer.
            vec![(BUF_BASE, 16, true), (BUF_BASE + 0x100, 1, true)],
        ] {
            let mem = guest_mem();
            let q = MockSplitQueue::create(&mem, GuestAddress(0), 16);
            write_mem(&mem, BUF_BASE, &header(0, 0));
            add_chain(&q, 0, &descs);
            assert_eq!(parse_first(&mem, &q, 16).unwrap().0, RequestKind::Malformed);
        }
    }

    #[test]
    fn hostile_chain_shapes_are_rejected() {
        let out_of_mem = MEM_SIZE as u64 + 0x1000;
        let cases: Vec<(&str, Vec<Desc>)> = vec![
            (
                "readable status",
                vec![(BUF_BASE, 16, false), (BUF_BASE + 0x100, 1, false)],
            ),
            (
                "zero-length status",
                vec![(BUF_BASE, 16, false), (BUF_BASE + 0x100, 0, true)],
            ),
            (
                "readable after writable",
                vec![
                    (BUF_BASE, 16, false),
                    (BUF_BASE + 0x100, 512, true),
                    (BUF_BASE + 0x400, 512, false),
                    (BUF_BASE + 0x800, 1, true),
                ],
            ),
            (
                "buffer outside memory",
                vec![(BUF_BASE, 16, false), (out_of_mem, 1, true)],
            ),
            (
                "buffer crossing the end of memory",
                vec![(BUF_BASE, 16, false), (MEM_SIZE as u64 - 4, 8, true)],
            ),
            (
                "huge length",
                vec![(BUF_BASE, 16, false), (BUF_BASE, 0x8000_0000, true)],
            ),
            // 4 GiB - 1 + 1 overflows the chain's byte count: the walk stops before the status.
            (
                "chain over 4 GiB",
                vec![(BUF_BASE, u32::MAX, false), (BUF_BASE, 1, true)],
            ),
            ("too many descriptors", vec![(BUF_BASE, 1, false); 9]),
        ];
        for (name, descs) in cases {
            let mem = guest_mem();
            let q = MockSplitQueue::create(&mem, GuestAddress(0), 16);
            add_chain(&q, 0, &descs);
            let err = parse_first(&mem, &q, 8).expect_err(name);
            let expected = match name {
                "readable status" | "zero-length status" | "chain over 4 GiB" => {
                    matches!(err, RequestError::NoStatus)
                }
                "readable after writable" => matches!(err, RequestError::ReadableAfterWritable),
                "too many descriptors" => matches!(err, RequestError::TooManyDescriptors(8)),
                _ => matches!(err, RequestError::Memory(_)),
            };
            assert!(expected, "{name}: got {err:?}");
        }
    }

    #[test]
    fn descriptor_loop_ends_at_queue_size() {
        let mem = guest_mem();
        let q = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        // 0 -> 1 -> 0 -> 1 ... every descriptor readable: never a status byte.
        store_desc(&q, 0, BUF_BASE, 16, F_NEXT, 1);
        store_desc(&q, 1, BUF_BASE, 16, F_NEXT, 0);
        publish(&q, 0);
        assert!(matches!(
            parse_first(&mem, &q, 256),
            Err(RequestError::NoStatus)
        ));
        // With a small cap the loop is caught as too long.
        let q = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        store_desc(&q, 0, BUF_BASE, 16, F_NEXT, 1);
        store_desc(&q, 1, BUF_BASE + 0x100, 1, F_NEXT | F_WRITE, 0);
        publish(&q, 0);
        assert!(matches!(
            parse_first(&mem, &q, 4),
            Err(RequestError::ReadableAfterWritable) | Err(RequestError::TooManyDescriptors(4))
        ));
    }

    #[test]
    fn head_index_outside_table_is_an_empty_chain() {
        let mem = guest_mem();
        let q = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        publish(&q, 200);
        assert!(matches!(
            parse_first(&mem, &q, 16),
            Err(RequestError::Empty)
        ));
    }

    #[test]
    fn discard_segment_decodes_little_endian() {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&7u64.to_le_bytes());
        b[8..12].copy_from_slice(&9u32.to_le_bytes());
        b[12..].copy_from_slice(&1u32.to_le_bytes());
        assert_eq!(
            DiscardSegment::from_bytes(&b),
            DiscardSegment {
                sector: 7,
                num_sectors: 9,
                flags: 1
            }
        );
    }
}
