//! The agent's one event loop is built on poll(2): each turn it lists the descriptors it waits
//! on, each with a token saying what it is, and gets back the tokens that are ready.
//!
//! The agent is single-threaded on purpose. A guest kernel whose kernel mode is emulated (PVM,
//! shared/DESIGN.md) loses writes of a multi-threaded process when that process forks or shares
//! the CPU with other processes; one thread that forks containers is safe there, and costs the
//! guest fewer system calls everywhere.

use std::io;
use std::os::fd::RawFd;

/// Readable (or a peer that hung up: reads then return end-of-file).
pub const READ: i16 = libc::POLLIN;
/// Writable.
pub const WRITE: i16 = libc::POLLOUT;

/// Descriptors to wait on, with their tokens.
#[derive(Debug)]
pub struct Poller<T> {
    fds: Vec<libc::pollfd>,
    tokens: Vec<T>,
}

impl<T: Clone> Default for Poller<T> {
    fn default() -> Self {
        Poller {
            fds: Vec::new(),
            tokens: Vec::new(),
        }
    }
}

impl<T: Clone> Poller<T> {
    /// Forgets every descriptor (call at the start of each turn).
    pub fn clear(&mut self) {
        self.fds.clear();
        self.tokens.clear();
    }

    /// Whether nothing was added.
    pub fn is_empty(&self) -> bool {
        self.fds.is_empty()
    }

    /// Waits for `events` ([`READ`], [`WRITE`] or both) on `fd`; nothing to wait for is skipped.
    pub fn add(&mut self, fd: RawFd, events: i16, token: T) {
        if events != 0 {
            self.fds.push(libc::pollfd {
                fd,
                events,
                revents: 0,
            });
            self.tokens.push(token);
        }
    }

    /// Waits until a descriptor is ready or `timeout_ms` passes (-1: no limit). Returns each
    /// ready token with what happened; errors and hangups count as readable and writable, so
    /// the next read or write reports them.
    pub fn wait(&mut self, timeout_ms: i32) -> io::Result<Vec<(T, i16)>> {
        let n = libc::nfds_t::try_from(self.fds.len()).unwrap_or(libc::nfds_t::MAX);
        // SAFETY: `fds` holds `n` initialised pollfd entries that poll may update.
        let r = unsafe { libc::poll(self.fds.as_mut_ptr(), n, timeout_ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(Vec::new())
            } else {
                Err(e)
            };
        }
        let trouble = libc::POLLERR | libc::POLLHUP | libc::POLLNVAL;
        Ok(self
            .fds
            .iter()
            .zip(&self.tokens)
            .filter(|(p, _)| p.revents != 0)
            .map(|(p, t)| {
                let mut ev = p.revents & (READ | WRITE);
                if p.revents & trouble != 0 {
                    ev |= p.events;
                }
                (t.clone(), ev)
            })
            .collect())
    }
}

/// Puts `fd` in non-blocking mode, or back in blocking mode.
pub fn set_nonblocking(fd: RawFd, nonblocking: bool) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor the caller owns; no pointers.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    let flags = if nonblocking {
        flags | libc::O_NONBLOCK
    } else {
        flags & !libc::O_NONBLOCK
    };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Writes as much of `buf` as `w` takes now; returns how much it took. A full pipe or socket
/// takes nothing (not an error).
pub fn write_some(w: &mut impl io::Write, buf: &[u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match w.write(&buf[done..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// One read from `r`: `Some(0)` is end-of-file, `None` means nothing is there now.
pub fn read_some(r: &mut impl io::Read, buf: &mut [u8]) -> io::Result<Option<usize>> {
    loop {
        match r.read(buf) {
            Ok(n) => return Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn ready_tokens_and_partial_writes() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        set_nonblocking(a.as_raw_fd(), true).unwrap();
        set_nonblocking(b.as_raw_fd(), true).unwrap();
        let mut p = Poller::default();
        p.add(a.as_raw_fd(), READ, "a");
        p.add(b.as_raw_fd(), 0, "skipped");
        assert!(p.wait(0).unwrap().is_empty(), "nothing to read yet");

        // A socket buffer fills: write_some takes what fits and no more.
        let big = vec![7u8; 4 << 20];
        let took = write_some(&mut b, &big).unwrap();
        assert!(took > 0 && took < big.len(), "took {took}");
        assert_eq!(p.wait(1000).unwrap(), [("a", READ)]);
        let mut buf = vec![0u8; 64 << 10];
        assert!(matches!(read_some(&mut a, &mut buf).unwrap(), Some(n) if n > 0));

        // shutdown, not drop: a child another test thread forks may hold a copy of `b`.
        b.shutdown(std::net::Shutdown::Both).unwrap();
        let mut got = 0;
        loop {
            match read_some(&mut a, &mut buf).unwrap() {
                Some(0) => break,
                Some(n) => got += n,
                None => panic!("a hung-up peer reads as end-of-file"),
            }
        }
        assert!(got > 0);
        assert_eq!(a.write(b"x").unwrap_err().kind(), io::ErrorKind::BrokenPipe);
    }
}
