//! The host side of a network device.

use std::io;
use std::os::fd::RawFd;

/// Where the frames of a virtio-net device go, and where received frames come from.
///
/// Every frame crosses this trait with the 12-byte `virtio_net_hdr_v1` in front of it; a backend
/// that has no use for the header drops it on send and writes a zeroed one on receive.
pub trait NetBackend: Send + std::fmt::Debug {
    /// Sends one frame; `vnet_hdr` is the header the guest put in front of it.
    fn send(&mut self, vnet_hdr: &[u8], frame: &[u8]) -> io::Result<()>;
    /// Receives one frame into `buf` (header then frame) and returns the total length.
    /// Fails with `WouldBlock` when no complete frame is ready.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// The file descriptor the event loop watches for readability.
    fn raw_fd(&self) -> RawFd;
    /// Guest offload features (virtio-net feature bits) this backend can honour.
    fn offload_features(&self) -> u64;
    /// Tells the backend which features the driver accepted, so it can enable offloads.
    fn set_offloads(&mut self, acked_features: u64) -> io::Result<()>;
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
pub(crate) mod tests {
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixDatagram;

    use super::*;
    use crate::virtio::net::VNET_HDR_LEN;

    /// A datagram socket pair backend: the device end sends/receives one frame (with header)
    /// per datagram; the test holds the peer end.
    #[derive(Debug)]
    pub(crate) struct PairBackend {
        pub sock: UnixDatagram,
    }

    impl PairBackend {
        pub(crate) fn new() -> (Self, UnixDatagram) {
            let (a, b) = UnixDatagram::pair().expect("socketpair");
            a.set_nonblocking(true).expect("nonblocking");
            (Self { sock: a }, b)
        }
    }

    impl NetBackend for PairBackend {
        fn send(&mut self, vnet_hdr: &[u8], frame: &[u8]) -> io::Result<()> {
            let mut v = vnet_hdr.to_vec();
            v.extend_from_slice(frame);
            self.sock.send(&v).map(|_| ())
        }
        fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.sock.recv(buf)
        }
        fn raw_fd(&self) -> RawFd {
            self.sock.as_raw_fd()
        }
        fn offload_features(&self) -> u64 {
            0
        }
        fn set_offloads(&mut self, _acked: u64) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn pair_backend_round_trips_a_frame() {
        let (mut b, peer) = PairBackend::new();
        b.send(&[0; VNET_HDR_LEN], b"hello").expect("send");
        let mut buf = [0u8; 64];
        assert_eq!(peer.recv(&mut buf).expect("recv"), VNET_HDR_LEN + 5);
    }
}
