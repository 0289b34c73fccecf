//! The user's terminal while a container's terminal is shown on it (`run -it`, `exec -it`,
//! `attach`): raw mode, restored on every way out; the size, set at the start and followed on
//! SIGWINCH; and what the user types, relayed to the container with the detach keys watched.
//!
//! The container never holds the user's terminal: it has a terminal of its own (see
//! `guest_agent::runtime::pty`) and mvm copies bytes between the two. In raw mode Ctrl-C, Ctrl-Z
//! and Ctrl-\ are plain bytes here; the container's terminal turns them into signals for its
//! foreground process group.

use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::sync::Mutex;
use std::thread::JoinHandle;

use guest_agent::runtime::TermSize;
use rustix::termios::{OptionalActions, Termios};

use crate::error::{bad_input, Error};

/// docker's detach keys: Ctrl-P, then Ctrl-Q.
pub const DEFAULT_DETACH_KEYS: &str = "ctrl-p,ctrl-q";

/// The settings the user's terminal had before raw mode, for the panic hook.
static SAVED: Mutex<Option<Termios>> = Mutex::new(None);

/// The user's terminal in raw mode while this lives.
#[derive(Debug)]
pub struct RawMode {
    saved: Termios,
}

impl RawMode {
    /// Puts the terminal on stdin in raw mode; `None` when stdin is not a terminal.
    pub fn enter() -> Result<Option<RawMode>, Error> {
        let stdin = io::stdin();
        let Ok(saved) = rustix::termios::tcgetattr(stdin.as_fd()) else {
            return Ok(None);
        };
        let mut raw = saved.clone();
        raw.make_raw();
        if let Ok(mut s) = SAVED.lock() {
            *s = Some(saved.clone());
        }
        install_panic_hook();
        rustix::termios::tcsetattr(stdin.as_fd(), OptionalActions::Now, &raw)
            .map_err(|e| Error::System("cannot set the terminal to raw mode".into(), e.into()))?;
        Ok(Some(RawMode { saved }))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = rustix::termios::tcsetattr(io::stdin().as_fd(), OptionalActions::Now, &self.saved);
        if let Ok(mut s) = SAVED.lock() {
            *s = None;
        }
    }
}

/// A panic (which aborts mvm) restores the terminal first.
fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if let Some(t) = SAVED.try_lock().ok().and_then(|s| s.clone()) {
                let _ = rustix::termios::tcsetattr(io::stdin().as_fd(), OptionalActions::Now, &t);
            }
            previous(info);
        }));
    });
}

/// The size of the user's terminal (stdin's, else stdout's).
pub fn size() -> Option<TermSize> {
    TermSize::of(io::stdin()).or_else(|| TermSize::of(io::stdout()))
}

/// Whether stdin is a terminal.
pub fn stdin_is_terminal() -> bool {
    use std::io::IsTerminal;
    io::stdin().is_terminal()
}

/// Blocks SIGWINCH in the calling thread, so it queues for the relay's signalfd. Call it before
/// any other thread starts: threads inherit the mask, and one that does not block it would take
/// the signal and drop it.
pub fn block_winch() -> Result<(), Error> {
    set_winch_blocked(libc::SIG_BLOCK)
}

fn set_winch_blocked(how: libc::c_int) -> Result<(), Error> {
    // SAFETY: zeroed memory is valid storage for a sigset_t, initialised right below.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is valid storage.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGWINCH);
    }
    // SAFETY: a valid set; the old mask is not wanted.
    let r = unsafe { libc::pthread_sigmask(how, &set, std::ptr::null_mut()) };
    if r != 0 {
        return Err(Error::System(
            "cannot block SIGWINCH".into(),
            io::Error::from_raw_os_error(r),
        ));
    }
    Ok(())
}

/// A signalfd that reads SIGWINCH (blocked by [`block_winch`]).
fn winch_fd() -> io::Result<OwnedFd> {
    // SAFETY: as in `set_winch_blocked`.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is valid storage.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGWINCH);
    }
    // SAFETY: a valid set; -1 asks for a new descriptor.
    let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The key sequence that detaches from a container (`--detach-keys`), as docker writes it:
/// comma-separated keys, each a single character or `ctrl-X` (X a letter or one of `@[\]^_`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DetachKeys(Vec<u8>);

impl DetachKeys {
    /// Parses `ctrl-p,ctrl-q` and the like; an empty string turns detaching off (`None`).
    pub fn parse(text: &str) -> Result<Option<DetachKeys>, Error> {
        if text.is_empty() {
            return Ok(None);
        }
        let bad = || {
            bad_input(format!(
                "invalid --detach-keys {text:?}: use keys such as ctrl-p,ctrl-q (a character or ctrl-<letter>, comma-separated)"
            ))
        };
        let mut keys = Vec::new();
        for key in text.split(',') {
            let key = key.trim();
            if let Some(c) = key.strip_prefix("ctrl-") {
                let &[c] = c.as_bytes() else {
                    return Err(bad());
                };
                let c = c.to_ascii_uppercase();
                if !(b'@'..=b'_').contains(&c) {
                    return Err(bad());
                }
                keys.push(c - b'@');
            } else if let &[c] = key.as_bytes() {
                keys.push(c);
            } else {
                return Err(bad());
            }
        }
        Ok(Some(DetachKeys(keys)))
    }
}

/// Watches typed bytes for the detach keys; passes the rest on, holding back a prefix of the
/// sequence until it is complete or broken.
#[derive(Debug)]
struct DetachWatch {
    keys: Vec<u8>,
    matched: usize,
}

impl DetachWatch {
    /// The bytes to pass on for `data`, and whether the sequence was completed.
    fn feed(&mut self, data: &[u8]) -> (Vec<u8>, bool) {
        let mut out = Vec::with_capacity(data.len());
        for &b in data {
            if self.keys.is_empty() {
                out.push(b);
                continue;
            }
            if b == self.keys[self.matched] {
                self.matched += 1;
                if self.matched == self.keys.len() {
                    return (out, true);
                }
                continue;
            }
            // A broken prefix goes through as typed.
            out.extend_from_slice(&self.keys[..self.matched]);
            self.matched = 0;
            if b == self.keys[0] {
                self.matched = 1;
            } else {
                out.push(b);
            }
        }
        (out, false)
    }
}

/// Where the user's input goes: a container's terminal or its stdin.
pub trait TerminalInput: Send {
    /// Bytes the user typed.
    fn input(&mut self, data: &[u8]) -> io::Result<()>;
    /// The user's terminal has a new size.
    fn resize(&mut self, size: TermSize) -> io::Result<()>;
    /// The user's input ended (stdin reached end-of-file).
    fn end(&mut self) {}
}

/// How the input relay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputEnd {
    /// stdin reached end-of-file (or the relay was stopped).
    Closed,
    /// The user typed the detach keys.
    Detached,
    /// The container's side went away.
    Failed,
}

/// A thread relaying stdin (if asked) and size changes to a [`TerminalInput`].
#[derive(Debug)]
pub struct InputRelay {
    stop: Option<OwnedFd>,
    thread: Option<JoinHandle<InputEnd>>,
}

impl InputRelay {
    /// Starts relaying: stdin's bytes when `stdin` (watching for `detach`, which then calls
    /// `on_detach` so the caller stops waiting), and the terminal's size whenever SIGWINCH
    /// arrives (blocked beforehand with [`block_winch`]).
    pub fn start(
        mut input: Box<dyn TerminalInput>,
        stdin: bool,
        detach: Option<DetachKeys>,
        on_detach: Box<dyn FnOnce() + Send>,
    ) -> Result<InputRelay, Error> {
        let winch = winch_fd().map_err(|e| Error::System("signalfd".into(), e))?;
        let (stop_r, stop_w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
            .map_err(|e| Error::System("pipe".into(), e.into()))?;
        let thread = std::thread::Builder::new()
            .name("terminal".into())
            .spawn(move || {
                let mut watch = DetachWatch {
                    keys: detach.map(|k| k.0).unwrap_or_default(),
                    matched: 0,
                };
                let end = relay(&mut *input, stdin, &winch, &stop_r, &mut watch);
                if end == InputEnd::Detached {
                    on_detach();
                }
                end
            })
            .map_err(|e| Error::System("cannot start the terminal thread".into(), e))?;
        Ok(InputRelay {
            stop: Some(stop_w),
            thread: Some(thread),
        })
    }

    /// Stops relaying; returns how the relay ended (`Closed` when stopped here).
    pub fn stop(mut self) -> InputEnd {
        drop(self.stop.take());
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or(InputEnd::Closed)
    }
}

impl Drop for InputRelay {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn relay(
    input: &mut dyn TerminalInput,
    mut stdin: bool,
    winch: &OwnedFd,
    stop: &OwnedFd,
    watch: &mut DetachWatch,
) -> InputEnd {
    let mut buf = [0u8; 4096];
    loop {
        let mut fds = vec![
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: winch.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        if stdin {
            fds.push(libc::pollfd {
                fd: 0,
                events: libc::POLLIN,
                revents: 0,
            });
        }
        let n = libc::nfds_t::try_from(fds.len()).unwrap_or(2);
        // SAFETY: `fds` holds `n` initialised pollfd entries that live across the call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), n, -1) };
        if r < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return InputEnd::Failed;
        }
        if fds[0].revents != 0 {
            return InputEnd::Closed;
        }
        if fds[1].revents != 0 {
            let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
            // SAFETY: reads at most `info.len()` bytes into a buffer we own.
            while unsafe { libc::read(winch.as_raw_fd(), info.as_mut_ptr().cast(), info.len()) } > 0
            {
            }
            if let Some(size) = size() {
                if input.resize(size).is_err() {
                    return InputEnd::Failed;
                }
            }
        }
        if stdin && fds.get(2).is_some_and(|f| f.revents != 0) {
            match io::stdin().lock().read(&mut buf) {
                Ok(0) => {
                    // End of input: say so, then keep following the size.
                    input.end();
                    stdin = false;
                }
                Ok(n) => {
                    let (pass, detached) = watch.feed(&buf[..n]);
                    if !pass.is_empty() && input.input(&pass).is_err() {
                        return InputEnd::Failed;
                    }
                    if detached {
                        return InputEnd::Detached;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    input.end();
                    stdin = false;
                }
            }
        }
    }
}

/// A container's terminal master on this host: typed bytes are written to it, sizes set on it.
#[derive(Debug)]
pub struct PtyInput(pub std::fs::File);

impl TerminalInput for PtyInput {
    fn input(&mut self, data: &[u8]) -> io::Result<()> {
        io::Write::write_all(&mut self.0, data)
    }
    fn resize(&mut self, size: TermSize) -> io::Result<()> {
        size.apply(&self.0)
    }
}

/// A pipe to a process's stdin on this host (no terminal): bytes only, closed at the end.
#[derive(Debug)]
pub struct PipeInput(pub Option<std::fs::File>);

impl TerminalInput for PipeInput {
    fn input(&mut self, data: &[u8]) -> io::Result<()> {
        match self.0.as_mut() {
            Some(f) => io::Write::write_all(f, data),
            None => Ok(()),
        }
    }
    fn resize(&mut self, _size: TermSize) -> io::Result<()> {
        Ok(())
    }
    fn end(&mut self) {
        self.0 = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detach_keys_parse_as_docker_writes_them() {
        assert_eq!(
            DetachKeys::parse(DEFAULT_DETACH_KEYS).unwrap(),
            Some(DetachKeys(vec![0x10, 0x11]))
        );
        assert_eq!(
            DetachKeys::parse("ctrl-a,x").unwrap(),
            Some(DetachKeys(vec![1, b'x']))
        );
        assert_eq!(DetachKeys::parse("").unwrap(), None);
        for bad in ["ctrl-", "ctrl-pp", "ctrl-1", "ab", "ctrl-p,"] {
            assert!(DetachKeys::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_detach_sequence_is_held_back_and_a_broken_one_passes_through() {
        let mut w = DetachWatch {
            keys: vec![0x10, 0x11],
            matched: 0,
        };
        assert_eq!(w.feed(b"ls\r"), (b"ls\r".to_vec(), false));
        // Ctrl-P alone is held until the next byte says what it was.
        assert_eq!(w.feed(&[0x10]), (vec![], false));
        assert_eq!(w.feed(b"x"), (vec![0x10, b'x'], false));
        assert_eq!(w.feed(&[0x10, 0x10]), (vec![0x10], false));
        assert_eq!(w.feed(&[0x11, b'z']), (vec![], true));
        let mut off = DetachWatch {
            keys: vec![],
            matched: 0,
        };
        assert_eq!(off.feed(&[0x10, 0x11]), (vec![0x10, 0x11], false));
    }
}
