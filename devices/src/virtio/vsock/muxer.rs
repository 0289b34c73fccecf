//! The vsock muxer: the connection table and the packet state machine between guest packets and
//! host Unix sockets. Pure (no queues, no event loop): the device hands it guest packets
//! ([`Muxer::send_pkt`]), asks it for packets for the guest ([`Muxer::recv_pkt`]) and runs
//! [`Muxer::process_host_events`] when its epoll fd ([`Muxer::epoll_fd`]) is readable.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::connection::{ConnState, Connection};
use super::packet::{op, shutdown, VsockHeader, TYPE_STREAM};
use super::{
    VsockError, VsockMetrics, HOST_CID, MAX_CONNECTIONS, MAX_RX_BACKLOG, MAX_TX_BUFFERED,
    MIN_GUEST_CID, RX_BACKLOG_PAUSE,
};

mod host;

use host::{bind, connect_nonblocking, PendingHost};
pub use host::{host_connect, listener_path};

/// First host-side port handed out to host-initiated connections.
const FIRST_LOCAL_PORT: u32 = 1 << 30;

/// (host-side port, guest-side port)
type Key = (u32, u32);

#[derive(Debug)]
enum RxItem {
    /// A control packet, ready to go.
    Ctrl(VsockHeader),
    /// The connection's host stream may have data (or EOF) for the guest.
    Data(Key),
}

/// Connection table and packet state machine of one vsock device.
#[derive(Debug)]
pub struct Muxer {
    guest_cid: u64,
    path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    conns: HashMap<Key, Connection>,
    by_fd: HashMap<RawFd, Key>,
    pending: HashMap<RawFd, PendingHost>,
    rxq: VecDeque<RxItem>,
    /// Control packets in `rxq` (data items are at most one per connection).
    ctrl_queued: usize,
    /// Guest data waiting in the connections' `tx_buf`s, all together.
    tx_buffered: usize,
    next_port: u32,
    max_connections: usize,
    max_tx_buffered: usize,
    metrics: Arc<VsockMetrics>,
}

fn epoll_ctl(epoll: &Epoll, fd: RawFd, old: u32, new: u32) -> io::Result<()> {
    let ev = EpollEvent::new(
        EventSet::from_bits_truncate(new),
        u64::from(fd.unsigned_abs()),
    );
    match (old, new) {
        (0, 0) => Ok(()),
        (0, _) => epoll.ctl(ControlOperation::Add, fd, ev),
        (_, 0) => epoll.ctl(ControlOperation::Delete, fd, ev),
        _ if old == new => Ok(()),
        _ => epoll.ctl(ControlOperation::Modify, fd, ev),
    }
}

impl Muxer {
    /// Binds the host socket at `path` for a guest with context id `guest_cid`.
    pub fn new(
        path: &Path,
        guest_cid: u64,
        metrics: Arc<VsockMetrics>,
    ) -> Result<Self, VsockError> {
        if guest_cid < MIN_GUEST_CID || guest_cid >= u64::from(u32::MAX) {
            return Err(VsockError::Cid(guest_cid));
        }
        let listener = bind(path)?;
        let setup = |l: &UnixListener| -> io::Result<Epoll> {
            l.set_nonblocking(true)?;
            let epoll = Epoll::new()?;
            epoll_ctl(&epoll, l.as_raw_fd(), 0, EventSet::IN.bits())?;
            Ok(epoll)
        };
        let epoll = match setup(&listener) {
            Ok(e) => e,
            Err(e) => {
                let _ = std::fs::remove_file(path);
                return Err(VsockError::Setup(e));
            }
        };
        Ok(Self {
            guest_cid,
            path: path.to_path_buf(),
            listener,
            epoll,
            conns: HashMap::new(),
            by_fd: HashMap::new(),
            pending: HashMap::new(),
            rxq: VecDeque::new(),
            ctrl_queued: 0,
            tx_buffered: 0,
            next_port: FIRST_LOCAL_PORT,
            max_connections: MAX_CONNECTIONS,
            max_tx_buffered: MAX_TX_BUFFERED,
            metrics,
        })
    }

    /// The fd to watch for readability; then call [`Muxer::process_host_events`].
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// The host socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether packets wait for the guest.
    pub fn has_pending_rx(&self) -> bool {
        !self.rxq.is_empty()
    }

    /// Number of open connections.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Whether the device should take more packets from the guest now: not while
    /// [`RX_BACKLOG_PAUSE`] control packets wait for it to receive them (backpressure).
    pub fn accepts_guest_packets(&self) -> bool {
        self.ctrl_queued < RX_BACKLOG_PAUSE
    }

    /// Control packets waiting for the guest.
    pub fn rx_backlog(&self) -> usize {
        self.ctrl_queued
    }

    /// Memory the muxer holds for the guest's traffic: waiting control packets and guest data
    /// buffered for host sockets (bounded by [`MAX_RX_BACKLOG`] and [`MAX_TX_BUFFERED`]).
    pub fn queued_bytes(&self) -> usize {
        self.ctrl_queued * std::mem::size_of::<RxItem>() + self.tx_buffered
    }

    /// Changes the connection limit (default [`MAX_CONNECTIONS`]).
    pub fn set_max_connections(&mut self, max: usize) {
        self.max_connections = max;
    }

    /// Changes the limit on guest data buffered for host sockets (default [`MAX_TX_BUFFERED`]).
    pub fn set_max_tx_buffered(&mut self, max: usize) {
        self.max_tx_buffered = max;
    }

    /// Forgets every connection (the driver reset the device); host streams are closed.
    pub fn reset(&mut self) {
        let keys: Vec<Key> = self.conns.keys().copied().collect();
        for key in keys {
            self.remove(key);
        }
        self.rxq.clear();
        self.ctrl_queued = 0;
    }

    /// Handles whatever host sockets are ready: new host connections, `CONNECT` lines, host
    /// data, room to write, hangups.
    pub fn process_host_events(&mut self) {
        let mut events = [EpollEvent::default(); 64];
        let n = match self.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(e) => {
                if e.kind() != io::ErrorKind::Interrupted {
                    crate::warn_limited!("vsock: epoll_wait failed: {e}");
                }
                return;
            }
        };
        for ev in &events[..n] {
            let fd = ev.fd();
            if fd == self.listener.as_raw_fd() {
                self.accept_all();
            } else if self.pending.contains_key(&fd) {
                self.read_connect_line(fd);
            } else if let Some(&key) = self.by_fd.get(&fd) {
                self.host_event(key, ev.event_set());
            }
        }
    }

    fn insert(&mut self, key: Key, conn: Connection) {
        self.by_fd.insert(conn.stream.as_raw_fd(), key);
        self.conns.insert(key, conn);
        self.metrics.connections.set(self.conns.len() as u64);
        self.update_interest(key);
    }

    fn remove(&mut self, key: Key) {
        if let Some(conn) = self.conns.remove(&key) {
            let fd = conn.stream.as_raw_fd();
            let _ = epoll_ctl(&self.epoll, fd, conn.registered, 0);
            self.by_fd.remove(&fd);
            self.set_tx_buffered(self.tx_buffered.saturating_sub(conn.tx_buf.len()));
        }
        self.metrics.connections.set(self.conns.len() as u64);
    }

    fn set_tx_buffered(&mut self, n: usize) {
        self.tx_buffered = n;
        self.metrics.tx_buffered.set(n as u64);
    }

    /// Queues a control packet for the guest, unless [`MAX_RX_BACKLOG`] already wait.
    fn push_ctrl(&mut self, h: VsockHeader) {
        if self.ctrl_queued >= MAX_RX_BACKLOG {
            self.metrics.rx_dropped.inc();
            crate::warn_limited!(
                "vsock: the guest takes no packets; {MAX_RX_BACKLOG} wait, dropping a {:?}",
                h.op
            );
            return;
        }
        self.ctrl_queued += 1;
        self.rxq.push_back(RxItem::Ctrl(h));
    }

    /// Removes the connection and tells the guest with RST.
    fn reset_conn(&mut self, key: Key) {
        if let Some(conn) = self.conns.get_mut(&key) {
            let rst = conn.header(op::RST, 0, 0);
            self.remove(key);
            self.push_rst(rst);
        }
    }

    fn push_rst(&mut self, rst: VsockHeader) {
        self.metrics.resets_sent.inc();
        self.push_ctrl(rst);
    }

    /// Registers the epoll events the connection needs now (none: not registered).
    fn update_interest(&mut self, key: Key) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        let mut want = EventSet::empty();
        match conn.state {
            ConnState::HostConnecting => want |= EventSet::READ_HANG_UP,
            ConnState::Established => {
                if conn.wants_read() {
                    want |= EventSet::IN | EventSet::READ_HANG_UP;
                }
                if !conn.tx_buf.is_empty() {
                    want |= EventSet::OUT;
                }
                if want.is_empty() && conn.host_eof {
                    // Registered with no events, to hear the hangup when the host closes.
                    want = EventSet::HANG_UP;
                }
            }
            ConnState::Closing => {}
        }
        let fd = conn.stream.as_raw_fd();
        match epoll_ctl(&self.epoll, fd, conn.registered, want.bits()) {
            Ok(()) => conn.registered = want.bits(),
            Err(e) => crate::warn_limited!("vsock: epoll_ctl on a connection failed: {e}"),
        }
    }

    fn host_event(&mut self, key: Key, evset: EventSet) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        match conn.state {
            ConnState::HostConnecting => {
                // The host program hung up before the guest answered.
                return self.reset_conn(key);
            }
            ConnState::Closing => return self.update_interest(key),
            ConnState::Established => {}
        }
        if evset.contains(EventSet::OUT) {
            let before = conn.tx_buf.len();
            let flushed = conn.flush();
            let after = conn.tx_buf.len();
            self.set_tx_buffered((self.tx_buffered + after).saturating_sub(before));
            if flushed.is_err() {
                return self.reset_conn(key);
            }
            let Some(conn) = self.conns.get_mut(&key) else {
                return;
            };
            if conn.needs_credit_update() {
                let h = conn.credit_update();
                self.push_ctrl(h);
            }
            if self.finish_if_done(key) {
                return;
            }
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if conn.wants_read() {
            conn.in_rxq = true;
            self.rxq.push_back(RxItem::Data(key));
        } else if conn.host_eof && evset.contains(EventSet::HANG_UP) {
            // The host closed its side entirely.
            conn.state = ConnState::Closing;
            let h = conn.header(op::SHUTDOWN, 0, shutdown::BOTH);
            self.push_ctrl(h);
        }
        self.update_interest(key);
    }

    /// After the guest shut down both directions and all its data reached the host: RST and
    /// forget the connection. Returns whether it did.
    fn finish_if_done(&mut self, key: Key) -> bool {
        let Some(conn) = self.conns.get_mut(&key) else {
            return true;
        };
        if conn.peer_shut_send && conn.tx_buf.is_empty() {
            let _ = conn.stream.shutdown(std::net::Shutdown::Write);
        }
        if conn.peer_shut_send && conn.peer_shut_rcv && conn.tx_buf.is_empty() {
            self.reset_conn(key);
            return true;
        }
        false
    }

    /// The next packet for the guest: header and the payload length written into `buf`
    /// (at most `buf.len()` bytes). `None` when nothing is pending.
    pub fn recv_pkt(&mut self, buf: &mut [u8]) -> Option<(VsockHeader, usize)> {
        while let Some(item) = self.rxq.pop_front() {
            let key = match item {
                RxItem::Ctrl(h) => {
                    self.ctrl_queued -= 1;
                    return Some((h, 0));
                }
                RxItem::Data(key) => key,
            };
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            conn.in_rxq = false;
            if !conn.wants_read() {
                self.update_interest(key);
                continue;
            }
            let max = buf.len().min(conn.peer_free() as usize);
            if max == 0 {
                // No room in this buffer: keep the data for the next one.
                conn.in_rxq = true;
                self.rxq.push_front(RxItem::Data(key));
                return None;
            }
            let got = match conn.stream.read(&mut buf[..max]) {
                Ok(0) => {
                    conn.host_eof = true;
                    Some((conn.header(op::SHUTDOWN, 0, shutdown::SEND), 0))
                }
                Ok(n) => {
                    let n32 = u32::try_from(n).unwrap_or(0);
                    conn.sent_to_guest(n32);
                    Some((conn.header(op::RW, n32, 0), n))
                }
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::Interrupted =>
                {
                    None
                }
                Err(_) => {
                    self.reset_conn(key);
                    continue;
                }
            };
            self.update_interest(key);
            if got.is_some() {
                return got;
            }
        }
        None
    }

    /// Handles one packet from the guest.
    pub fn send_pkt(&mut self, hdr: &VsockHeader, data: &[u8]) {
        if hdr.dst_cid != HOST_CID || hdr.src_cid != self.guest_cid {
            self.metrics.bad_packets.inc();
            return;
        }
        let key = (hdr.dst_port, hdr.src_port);
        let reply_rst = |m: &Self| VsockHeader {
            src_cid: HOST_CID,
            dst_cid: m.guest_cid,
            src_port: hdr.dst_port,
            dst_port: hdr.src_port,
            type_: TYPE_STREAM,
            op: op::RST,
            ..VsockHeader::default()
        };
        if hdr.type_ != TYPE_STREAM {
            if hdr.op != op::RST {
                self.push_rst(reply_rst(self));
            }
            return;
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            match hdr.op {
                op::REQUEST => self.guest_connect(hdr),
                op::RST => {}
                _ => self.push_rst(reply_rst(self)),
            }
            return;
        };
        conn.update_peer_credit(hdr);
        match hdr.op {
            op::RESPONSE if conn.state == ConnState::HostConnecting => {
                let ok = format!("OK {}\n", conn.local_port);
                if conn.stream.write(ok.as_bytes()).ok() != Some(ok.len()) {
                    return self.reset_conn(key);
                }
                conn.state = ConnState::Established;
            }
            op::RW if conn.state == ConnState::Established && !conn.peer_shut_send => {
                let before = conn.tx_buf.len();
                let pushed = conn.push_guest_data(data);
                let after = conn.tx_buf.len();
                self.set_tx_buffered((self.tx_buffered + after).saturating_sub(before));
                if pushed.is_err() {
                    return self.reset_conn(key);
                }
                if self.tx_buffered > self.max_tx_buffered {
                    self.metrics.tx_overflow_resets.inc();
                    crate::warn_limited!(
                        "vsock: {} bytes of guest data wait for host sockets; resetting a \
                         connection",
                        self.tx_buffered
                    );
                    return self.reset_conn(key);
                }
                let Some(conn) = self.conns.get_mut(&key) else {
                    return;
                };
                self.metrics.tx_bytes.add(data.len() as u64);
                if conn.needs_credit_update() {
                    let h = conn.credit_update();
                    self.push_ctrl(h);
                }
            }
            op::CREDIT_UPDATE => {}
            op::CREDIT_REQUEST => {
                let h = conn.credit_update();
                self.push_ctrl(h);
            }
            op::SHUTDOWN => {
                conn.peer_shut_rcv |= hdr.flags & shutdown::RCV != 0;
                conn.peer_shut_send |= hdr.flags & shutdown::SEND != 0;
                if self.finish_if_done(key) {
                    return;
                }
            }
            op::RST => return self.remove(key),
            _ => return self.reset_conn(key),
        }
        self.update_interest(key);
    }

    /// The guest connects to host port `hdr.dst_port`: reach the listener at `<path>_<port>`.
    fn guest_connect(&mut self, hdr: &VsockHeader) {
        let key = (hdr.dst_port, hdr.src_port);
        let rst = VsockHeader {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: hdr.dst_port,
            dst_port: hdr.src_port,
            type_: TYPE_STREAM,
            op: op::RST,
            ..VsockHeader::default()
        };
        if self.conns.len() + self.pending.len() >= self.max_connections {
            self.metrics.limit_refused.inc();
            return self.push_rst(rst);
        }
        let target = listener_path(&self.path, hdr.dst_port);
        let stream = match connect_nonblocking(&target) {
            Ok(s) => s,
            _ => {
                log::debug!("vsock: guest connect to {} refused", target.display());
                self.metrics.refused.inc();
                return self.push_rst(rst);
            }
        };
        let mut conn =
            Connection::new(stream, ConnState::Established, key.0, key.1, self.guest_cid);
        conn.update_peer_credit(hdr);
        let resp = conn.header(op::RESPONSE, 0, 0);
        self.metrics.guest_connects.inc();
        self.insert(key, conn);
        self.push_ctrl(resp);
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use std::io::BufRead;
    use std::os::unix::net::UnixStream;
    use std::time::{Duration, Instant};

    use super::*;

    pub(super) const CID: u64 = 3;

    pub(super) struct Rig {
        pub(super) _dir: tempfile::TempDir,
        pub(super) path: PathBuf,
        pub(super) m: Muxer,
        pub(super) metrics: Arc<VsockMetrics>,
    }

    pub(super) fn rig() -> Rig {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("vsock.sock");
        let metrics = Arc::new(VsockMetrics::default());
        let m = Muxer::new(&path, CID, metrics.clone()).expect("muxer");
        Rig {
            _dir: dir,
            path,
            m,
            metrics,
        }
    }

    pub(super) fn guest_hdr(op: u16, src_port: u32, dst_port: u32, len: u32) -> VsockHeader {
        VsockHeader {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            len,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 64 * 1024,
            fwd_cnt: 0,
        }
    }

    /// Runs host events until the muxer has a packet for the guest, and returns it.
    pub(super) fn next_pkt(m: &mut Muxer) -> (VsockHeader, Vec<u8>) {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            m.process_host_events();
            if let Some((h, n)) = m.recv_pkt(&mut buf) {
                return (h, buf[..n].to_vec());
            }
            assert!(
                Instant::now() < deadline,
                "no packet for the guest within 5 s"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    pub(super) fn no_pkt(m: &mut Muxer) {
        std::thread::sleep(Duration::from_millis(20));
        m.process_host_events();
        let mut buf = vec![0u8; 1024];
        assert_eq!(m.recv_pkt(&mut buf), None);
    }

    pub(super) fn read_line(s: &UnixStream) -> String {
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut line = String::new();
        io::BufReader::new(s).read_line(&mut line).expect("line");
        line
    }

    /// A host program connects to guest port 1234; the guest accepts. Returns the host stream
    /// and the host-side port.
    pub(super) fn host_connect(r: &mut Rig) -> (UnixStream, u32) {
        let mut host = UnixStream::connect(&r.path).expect("connect");
        host.write_all(b"CONNECT 1234\n").expect("write");
        let (req, _) = next_pkt(&mut r.m);
        assert_eq!(
            (req.op, req.src_cid, req.dst_cid, req.dst_port),
            (op::REQUEST, 2, CID, 1234)
        );
        assert_eq!(req.buf_alloc, super::super::CONN_BUF_ALLOC);
        r.m.send_pkt(&guest_hdr(op::RESPONSE, 1234, req.src_port, 0), &[]);
        assert_eq!(read_line(&host), format!("OK {}\n", req.src_port));
        (host, req.src_port)
    }

    #[test]
    fn host_connect_reaches_guest_listener_with_data_both_ways() {
        let mut r = rig();
        let (mut host, local) = host_connect(&mut r);
        host.write_all(b"hello").expect("write");
        let (h, data) = next_pkt(&mut r.m);
        assert_eq!(
            (h.op, h.len, h.src_port, h.dst_port),
            (op::RW, 5, local, 1234)
        );
        assert_eq!(data, b"hello");
        r.m.send_pkt(&guest_hdr(op::RW, 1234, local, 5), b"world");
        let mut buf = [0u8; 5];
        host.read_exact(&mut buf).expect("read");
        assert_eq!(&buf, b"world");
        // The guest resets: the host sees end of file.
        r.m.send_pkt(&guest_hdr(op::RST, 1234, local, 0), &[]);
        assert_eq!(host.read(&mut buf).expect("eof"), 0);
        assert_eq!(r.m.connection_count(), 0);
        assert_eq!(r.metrics.host_connects.get(), 1);
    }

    #[test]
    fn guest_connect_reaches_host_listener() {
        let mut r = rig();
        let listener = UnixListener::bind(listener_path(&r.path, 5000)).expect("listen");
        r.m.send_pkt(&guest_hdr(op::REQUEST, 40000, 5000, 0), &[]);
        let (resp, _) = next_pkt(&mut r.m);
        assert_eq!(
            (resp.op, resp.src_port, resp.dst_port),
            (op::RESPONSE, 5000, 40000)
        );
        let (mut host, _) = listener.accept().expect("accept");
        r.m.send_pkt(&guest_hdr(op::RW, 40000, 5000, 3), b"abc");
        let mut buf = [0u8; 3];
        host.read_exact(&mut buf).expect("read");
        assert_eq!(&buf, b"abc");
        host.write_all(b"xyz").expect("write");
        let (h, data) = next_pkt(&mut r.m);
        assert_eq!((h.op, data.as_slice()), (op::RW, &b"xyz"[..]));
        // Host closes: the guest hears "no more data", then "closed entirely".
        drop(host);
        let (h, _) = next_pkt(&mut r.m);
        assert_eq!((h.op, h.flags), (op::SHUTDOWN, shutdown::SEND));
        let (h, _) = next_pkt(&mut r.m);
        assert_eq!((h.op, h.flags), (op::SHUTDOWN, shutdown::BOTH));
        r.m.send_pkt(&guest_hdr(op::RST, 40000, 5000, 0), &[]);
        assert_eq!(r.m.connection_count(), 0);
        no_pkt(&mut r.m);
    }

    #[test]
    fn guest_connect_without_listener_gets_rst() {
        let mut r = rig();
        r.m.send_pkt(&guest_hdr(op::REQUEST, 40001, 6000, 0), &[]);
        let (h, _) = next_pkt(&mut r.m);
        assert_eq!(
            (h.op, h.src_port, h.dst_port, h.dst_cid),
            (op::RST, 6000, 40001, CID)
        );
        assert_eq!(r.metrics.refused.get(), 1);
        assert_eq!(r.m.connection_count(), 0);
    }

    #[test]
    fn unknown_connection_and_foreign_packets() {
        let mut r = rig();
        r.m.send_pkt(&guest_hdr(op::RW, 1, 2, 3), b"abc");
        let (h, _) = next_pkt(&mut r.m);
        assert_eq!(h.op, op::RST, "data for an unknown connection is reset");
        r.m.send_pkt(&guest_hdr(op::RST, 1, 2, 0), &[]);
        no_pkt(&mut r.m);
        let mut spoofed = guest_hdr(op::REQUEST, 1, 2, 0);
        spoofed.src_cid = 9;
        r.m.send_pkt(&spoofed, &[]);
        let mut elsewhere = guest_hdr(op::REQUEST, 1, 2, 0);
        elsewhere.dst_cid = 7;
        r.m.send_pkt(&elsewhere, &[]);
        no_pkt(&mut r.m);
        assert_eq!(r.metrics.bad_packets.get(), 2);
        let mut dgram = guest_hdr(op::REQUEST, 1, 2, 0);
        dgram.type_ = 2;
        r.m.send_pkt(&dgram, &[]);
        assert_eq!(next_pkt(&mut r.m).0.op, op::RST);
    }

    #[test]
    fn host_data_respects_guest_credit() {
        let mut r = rig();
        let (mut host, local) = host_connect(&mut r);
        let mut upd = guest_hdr(op::CREDIT_UPDATE, 1234, local, 0);
        upd.buf_alloc = 10;
        r.m.send_pkt(&upd, &[]);
        host.write_all(&[1u8; 25]).expect("write");
        let (h, data) = next_pkt(&mut r.m);
        assert_eq!((h.op, data.len()), (op::RW, 10));
        no_pkt(&mut r.m);
        upd.fwd_cnt = 10;
        r.m.send_pkt(&upd, &[]);
        assert_eq!(next_pkt(&mut r.m).1.len(), 10);
        upd.fwd_cnt = 20;
        r.m.send_pkt(&upd, &[]);
        assert_eq!(next_pkt(&mut r.m).1.len(), 5);
    }

    #[test]
    fn credit_request_is_answered() {
        let mut r = rig();
        let (_host, local) = host_connect(&mut r);
        r.m.send_pkt(&guest_hdr(op::RW, 1234, local, 4), b"data");
        r.m.send_pkt(&guest_hdr(op::CREDIT_REQUEST, 1234, local, 0), &[]);
        let (h, _) = next_pkt(&mut r.m);
        assert_eq!((h.op, h.fwd_cnt), (op::CREDIT_UPDATE, 4));
    }

    #[test]
    fn guest_shutdown_both_resets_and_closes_host() {
        let mut r = rig();
        let (mut host, local) = host_connect(&mut r);
        r.m.send_pkt(&guest_hdr(op::RW, 1234, local, 2), b"hi");
        let mut sd = guest_hdr(op::SHUTDOWN, 1234, local, 0);
        sd.flags = shutdown::SEND;
        r.m.send_pkt(&sd, &[]);
        let mut all = Vec::new();
        host.read_to_end(&mut all).expect("host reads to eof");
        assert_eq!(all, b"hi", "data then end of file after SHUTDOWN(SEND)");
        sd.flags = shutdown::BOTH;
        r.m.send_pkt(&sd, &[]);
        assert_eq!(next_pkt(&mut r.m).0.op, op::RST);
        assert_eq!(r.m.connection_count(), 0);
    }

    #[test]
    fn a_guest_flood_it_never_receives_stays_capped() {
        let mut r = rig();
        // Data for connections that do not exist: each is answered with RST, which waits for
        // the guest's receive buffers. The guest never gives any.
        let flood = 200_000u32;
        for port in 0..flood {
            r.m.send_pkt(&guest_hdr(op::RW, port, 9, 0), &[]);
        }
        assert_eq!(r.m.rx_backlog(), MAX_RX_BACKLOG);
        assert!(!r.m.accepts_guest_packets());
        assert_eq!(
            r.metrics.rx_dropped.get(),
            u64::from(flood) - MAX_RX_BACKLOG as u64
        );
        let cap = MAX_RX_BACKLOG * 64;
        assert!(
            r.m.queued_bytes() <= cap,
            "{} bytes queued",
            r.m.queued_bytes()
        );
        // What was kept still reaches the guest, in order, then nothing.
        let mut buf = vec![0u8; 1024];
        let mut got = Vec::new();
        while let Some((h, _)) = r.m.recv_pkt(&mut buf) {
            got.push(h.dst_port);
        }
        let kept = u32::try_from(MAX_RX_BACKLOG).expect("fits");
        assert_eq!(got, (0..kept).collect::<Vec<_>>());
        assert_eq!(r.m.queued_bytes(), 0);
        assert!(r.m.accepts_guest_packets());
    }

    #[test]
    fn guest_data_piling_up_for_slow_host_sockets_resets_the_connection_past_the_cap() {
        let mut r = rig();
        r.m.set_max_tx_buffered(100 << 10);
        let listener = UnixListener::bind(listener_path(&r.path, 5000)).expect("listen");
        r.m.send_pkt(&guest_hdr(op::REQUEST, 40000, 5000, 0), &[]);
        assert_eq!(next_pkt(&mut r.m).0.op, op::RESPONSE);
        // The host program accepts and never reads.
        let (_host, _) = listener.accept().expect("accept");
        let chunk = vec![1u8; 32 << 10];
        let mut sent = 0;
        while r.m.connection_count() == 1 && sent < 64 << 20 {
            r.m.send_pkt(&guest_hdr(op::RW, 40000, 5000, 32 << 10), &chunk);
            sent += chunk.len();
            assert!(r.m.queued_bytes() <= (100 << 10) + chunk.len() + MAX_RX_BACKLOG * 64);
        }
        assert_eq!(r.metrics.tx_overflow_resets.get(), 1);
        assert_eq!(r.m.connection_count(), 0);
        assert_eq!(r.metrics.tx_buffered.get(), 0, "freed with the connection");
    }

    #[test]
    fn connection_limit_refuses_extra_connections() {
        let mut r = rig();
        r.m.set_max_connections(2);
        let _l = UnixListener::bind(listener_path(&r.path, 80)).expect("listen");
        for port in [1, 2, 3] {
            r.m.send_pkt(&guest_hdr(op::REQUEST, port, 80, 0), &[]);
        }
        let ops: Vec<u16> = (0..3).map(|_| next_pkt(&mut r.m).0.op).collect();
        assert_eq!(ops, [op::RESPONSE, op::RESPONSE, op::RST]);
        assert_eq!(r.metrics.limit_refused.get(), 1);
        let mut host = UnixStream::connect(&r.path).expect("connect");
        r.m.process_host_events();
        let mut buf = [0u8; 1];
        host.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        assert_eq!(
            host.read(&mut buf).expect("closed"),
            0,
            "host connection over the limit"
        );
    }
}
