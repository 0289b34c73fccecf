//! One vsock stream connection: its host socket, its state and its credit accounting.

use std::io::{self, Write};
use std::os::unix::net::UnixStream;

use super::packet::{op, VsockHeader, TYPE_STREAM};
use super::{CONN_BUF_ALLOC, HOST_CID};

/// Send a CREDIT_UPDATE once the guest's view of our free space lags this far behind.
const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_ALLOC / 4;
/// Capacity an emptied `tx_buf` may keep; a larger one is given back.
const KEEP_TX_CAPACITY: usize = 16 * 1024;

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ConnState {
    /// The host asked for it; REQUEST sent to the guest, waiting for RESPONSE.
    HostConnecting,
    /// Data flows.
    Established,
    /// We told the guest the host side is gone (SHUTDOWN both); waiting for its RST.
    Closing,
}

/// A connection between a guest port and a host Unix stream.
#[derive(Debug)]
pub(crate) struct Connection {
    pub(crate) stream: UnixStream,
    pub(crate) state: ConnState,
    /// Port on the host side (CID 2).
    pub(crate) local_port: u32,
    /// Port on the guest side.
    pub(crate) peer_port: u32,
    pub(crate) guest_cid: u64,
    /// Guest's receive buffer and how much of what we sent it has consumed.
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes sent to the guest.
    rx_cnt: u32,
    /// Bytes taken from the guest and written to the host stream.
    fwd_cnt: u32,
    /// `fwd_cnt` as last told to the guest.
    last_fwd_cnt_sent: u32,
    /// Guest data not yet written to the host stream.
    pub(crate) tx_buf: Vec<u8>,
    /// The guest will send no more data.
    pub(crate) peer_shut_send: bool,
    /// The guest will receive no more data.
    pub(crate) peer_shut_rcv: bool,
    /// The host stream reached end of file (the host will send no more).
    pub(crate) host_eof: bool,
    /// A data item for this connection sits in the muxer's receive queue.
    pub(crate) in_rxq: bool,
    /// Epoll events currently registered for the stream (0: not registered).
    pub(crate) registered: u32,
}

impl Connection {
    pub(crate) fn new(
        stream: UnixStream,
        state: ConnState,
        local_port: u32,
        peer_port: u32,
        guest_cid: u64,
    ) -> Self {
        Self {
            stream,
            state,
            local_port,
            peer_port,
            guest_cid,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            rx_cnt: 0,
            fwd_cnt: 0,
            last_fwd_cnt_sent: 0,
            tx_buf: Vec::new(),
            peer_shut_send: false,
            peer_shut_rcv: false,
            host_eof: false,
            in_rxq: false,
            registered: 0,
        }
    }

    /// A header from the host side of this connection to the guest, carrying our credit.
    pub(crate) fn header(&mut self, op: u16, len: u32, flags: u32) -> VsockHeader {
        self.last_fwd_cnt_sent = self.fwd_cnt;
        VsockHeader {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: CONN_BUF_ALLOC,
            fwd_cnt: self.fwd_cnt,
        }
    }

    /// Takes the guest's credit information from any packet it sent.
    pub(crate) fn update_peer_credit(&mut self, hdr: &VsockHeader) {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = hdr.fwd_cnt;
    }

    /// How many bytes the guest can take now.
    pub(crate) fn peer_free(&self) -> u32 {
        let in_flight = self.rx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Records `n` bytes sent to the guest.
    pub(crate) fn sent_to_guest(&mut self, n: u32) {
        self.rx_cnt = self.rx_cnt.wrapping_add(n);
    }

    /// Whether the host stream should be read now.
    pub(crate) fn wants_read(&self) -> bool {
        self.state == ConnState::Established
            && !self.in_rxq
            && !self.host_eof
            && !self.peer_shut_rcv
            && self.peer_free() > 0
    }

    /// Whether the guest should be told about consumed data.
    pub(crate) fn needs_credit_update(&self) -> bool {
        self.fwd_cnt.wrapping_sub(self.last_fwd_cnt_sent) >= CREDIT_UPDATE_THRESHOLD
    }

    /// Accepts guest data for the host. Fails if the guest overran the credit we gave it or
    /// the host stream broke.
    pub(crate) fn push_guest_data(&mut self, data: &[u8]) -> io::Result<()> {
        let buffered = self.tx_buf.len().saturating_add(data.len());
        if buffered > CONN_BUF_ALLOC as usize {
            return Err(io::Error::other("guest overran its send credit"));
        }
        if self.tx_buf.is_empty() {
            let n = write_some(&mut self.stream, data)?;
            self.consumed(n);
            self.tx_buf.extend_from_slice(&data[n..]);
        } else {
            self.tx_buf.extend_from_slice(data);
            self.flush()?;
        }
        Ok(())
    }

    /// Writes buffered guest data to the host stream, as much as it takes.
    pub(crate) fn flush(&mut self) -> io::Result<()> {
        if self.tx_buf.is_empty() {
            return Ok(());
        }
        let n = write_some(&mut self.stream, &self.tx_buf)?;
        self.tx_buf.drain(..n);
        self.consumed(n);
        if self.tx_buf.is_empty() && self.tx_buf.capacity() > KEEP_TX_CAPACITY {
            // A burst is over: do not hold its memory for the life of the connection.
            self.tx_buf = Vec::new();
        }
        Ok(())
    }

    fn consumed(&mut self, n: usize) {
        self.fwd_cnt = self
            .fwd_cnt
            .wrapping_add(u32::try_from(n).unwrap_or(u32::MAX));
    }

    /// A CREDIT_UPDATE telling the guest how much we have consumed.
    pub(crate) fn credit_update(&mut self) -> VsockHeader {
        self.header(op::CREDIT_UPDATE, 0, 0)
    }
}

/// Writes what the stream takes without blocking; 0 if it would block.
fn write_some(stream: &mut UnixStream, data: &[u8]) -> io::Result<usize> {
    loop {
        match stream.write(data) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(0),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    fn conn() -> (Connection, UnixStream) {
        let (a, b) = UnixStream::pair().expect("pair");
        a.set_nonblocking(true).expect("nonblocking");
        (Connection::new(a, ConnState::Established, 1024, 5000, 3), b)
    }

    #[test]
    fn peer_credit_limits_what_we_send() {
        let (mut c, _peer) = conn();
        assert_eq!(c.peer_free(), 0, "no credit before the guest tells us");
        c.update_peer_credit(&VsockHeader {
            buf_alloc: 100,
            fwd_cnt: 0,
            ..VsockHeader::default()
        });
        c.sent_to_guest(60);
        assert_eq!(c.peer_free(), 40);
        c.update_peer_credit(&VsockHeader {
            buf_alloc: 100,
            fwd_cnt: 60,
            ..VsockHeader::default()
        });
        assert_eq!(c.peer_free(), 100);
    }

    #[test]
    fn guest_data_reaches_host_and_overrun_is_refused() {
        let (mut c, mut peer) = conn();
        c.push_guest_data(b"hello").expect("push");
        let mut buf = [0u8; 5];
        peer.read_exact(&mut buf).expect("read");
        assert_eq!(&buf, b"hello");
        assert_eq!(c.header(op::RW, 0, 0).fwd_cnt, 5);
        let too_much = vec![0u8; CONN_BUF_ALLOC as usize + 1];
        assert!(c.push_guest_data(&too_much).is_err());
    }

    #[test]
    fn slow_host_buffers_guest_data_and_credit_update_follows_consumption() {
        let (mut c, mut peer) = conn();
        let chunk = vec![7u8; 64 * 1024];
        let mut pushed = 0;
        // Fill the socket until data is buffered.
        while c.tx_buf.is_empty() {
            c.push_guest_data(&chunk).expect("push");
            pushed += chunk.len();
        }
        let mut sink = vec![0u8; pushed];
        let reader = std::thread::spawn(move || {
            peer.read_exact(&mut sink).expect("drain");
        });
        while !c.tx_buf.is_empty() {
            c.flush().expect("flush");
            std::thread::yield_now();
        }
        reader.join().expect("reader");
        assert!(
            c.tx_buf.capacity() <= KEEP_TX_CAPACITY,
            "burst memory given back"
        );
        assert!(c.needs_credit_update());
        assert_eq!(c.credit_update().fwd_cnt as usize, pushed);
        assert!(!c.needs_credit_update());
    }
}
