//! The host's side of the protocol: open a session, create and start a container, stream its
//! output and collect its exit code.
//!
//! Bounded, whatever the agent sends (in a VM it runs on a guest kernel mvm does not trust):
//! output is read one frame at a time and handed to the sink before the next is read, so a slow
//! sink holds the agent back (vsock credit, then the agent stops reading the process's pipe).
//! Output that arrives while no sink is there (a request is being answered) is kept up to
//! [`MAX_PENDING_OUTPUT`] bytes and the rest dropped and counted; exit events are kept up to
//! [`MAX_PENDING_EXITS`].

use std::io::{Read, Write};

use crate::protocol::{
    Event, Frame, FrameKind, ProtocolError, Request, Response, PROTOCOL_VERSION,
};
use crate::runtime::spec::{ContainerSpec, Process};
use crate::runtime::stats::{ContainerStats, ProcessInfo};
use crate::runtime::TermSize;

/// Output kept while a request without a sink is answered; more is dropped (and said so).
pub const MAX_PENDING_OUTPUT: usize = 4 << 20;
/// Exit events kept for processes nobody waits for yet; more are dropped.
pub const MAX_PENDING_EXITS: usize = 1024;

/// Errors of an agent session.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The connection or framing failed.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The agent refused a request.
    #[error("{0}")]
    Refused(String),
    /// The agent answered something this client did not ask for.
    #[error("unexpected answer from the agent: {0}")]
    Unexpected(String),
}

/// Where a process's output goes on the host.
pub trait OutputSink {
    /// Bytes process `stream` wrote to stdout.
    fn stdout(&mut self, stream: u32, data: &[u8]);
    /// Bytes process `stream` wrote to stderr.
    fn stderr(&mut self, stream: u32, data: &[u8]);
}

/// Writes stdout and stderr to this process's own streams.
#[derive(Debug, Default)]
pub struct InheritOutput;

impl OutputSink for InheritOutput {
    fn stdout(&mut self, _stream: u32, data: &[u8]) {
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(data);
        let _ = out.flush();
    }
    fn stderr(&mut self, _stream: u32, data: &[u8]) {
        let _ = std::io::stderr().lock().write_all(data);
    }
}

/// An open session with an agent.
#[derive(Debug)]
pub struct AgentClient<C: Read + Write> {
    conn: C,
    /// Exit codes that arrived (as events) while waiting for something else.
    exited: Vec<(u32, i32)>,
    /// Output that arrived while a request without a sink was answered; handed to the next sink.
    pending: Vec<Frame>,
    /// Payload bytes in `pending`.
    pending_bytes: usize,
    /// Output bytes dropped because `pending` was full.
    dropped: u64,
    /// Of those, the ones no warning has mentioned yet.
    dropped_unreported: u64,
}

impl<C: Read + Write> AgentClient<C> {
    /// Sends Hello and checks the agent's version.
    pub fn open(conn: C) -> Result<Self, ClientError> {
        let mut client = AgentClient {
            conn,
            exited: Vec::new(),
            pending: Vec::new(),
            pending_bytes: 0,
            dropped: 0,
            dropped_unreported: 0,
        };
        match client.call_silent(&Request::Hello {
            version: PROTOCOL_VERSION,
        })? {
            Response::Hello { .. } => Ok(client),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Sends a request and returns its response; output frames that arrive meanwhile go to
    /// `sink`.
    pub fn call(
        &mut self,
        req: &Request,
        sink: &mut dyn OutputSink,
    ) -> Result<Response, ClientError> {
        Frame::json(FrameKind::Request, req)?.write_to(&mut self.conn)?;
        self.flush_pending(sink);
        loop {
            let frame = Frame::read_from(&mut self.conn)?;
            match frame.kind {
                FrameKind::Response => {
                    return match frame.parse::<Response>()? {
                        Response::Error { message } => Err(ClientError::Refused(message)),
                        r => Ok(r),
                    }
                }
                _ => self.dispatch(frame, sink)?,
            }
        }
    }

    /// Sends a request; output that arrives meanwhile is kept for the next sink.
    fn call_silent(&mut self, req: &Request) -> Result<Response, ClientError> {
        Frame::json(FrameKind::Request, req)?.write_to(&mut self.conn)?;
        loop {
            let frame = Frame::read_from(&mut self.conn)?;
            match frame.kind {
                FrameKind::Response => {
                    return match frame.parse::<Response>()? {
                        Response::Error { message } => Err(ClientError::Refused(message)),
                        r => Ok(r),
                    }
                }
                FrameKind::Stdout | FrameKind::Stderr => self.hold(frame),
                _ => {
                    struct Unused;
                    impl OutputSink for Unused {
                        fn stdout(&mut self, _: u32, _: &[u8]) {}
                        fn stderr(&mut self, _: u32, _: &[u8]) {}
                    }
                    self.dispatch(frame, &mut Unused)?
                }
            }
        }
    }

    /// Keeps output for the next sink, within [`MAX_PENDING_OUTPUT`].
    fn hold(&mut self, frame: Frame) {
        let len = frame.payload.len();
        if self.pending_bytes + len > MAX_PENDING_OUTPUT {
            self.dropped += len as u64;
            self.dropped_unreported += len as u64;
            return;
        }
        self.pending_bytes += len;
        self.pending.push(frame);
    }

    /// Output bytes dropped so far because they arrived while no sink was there.
    pub fn dropped_output(&self) -> u64 {
        self.dropped
    }

    fn flush_pending(&mut self, sink: &mut dyn OutputSink) {
        let unreported = std::mem::take(&mut self.dropped_unreported);
        if unreported > 0 {
            log::warn!(
                "{unreported} bytes of output arrived while mvm waited for an answer from the \
                 agent, past the {MAX_PENDING_OUTPUT} it keeps: they were dropped"
            );
        }
        self.pending_bytes = 0;
        for frame in std::mem::take(&mut self.pending) {
            match frame.kind {
                FrameKind::Stdout => sink.stdout(frame.stream, &frame.payload),
                _ => sink.stderr(frame.stream, &frame.payload),
            }
        }
    }

    fn dispatch(&mut self, frame: Frame, sink: &mut dyn OutputSink) -> Result<(), ClientError> {
        match frame.kind {
            FrameKind::Stdout => sink.stdout(frame.stream, &frame.payload),
            FrameKind::Stderr => sink.stderr(frame.stream, &frame.payload),
            FrameKind::Event => match frame.parse::<Event>()? {
                Event::Exited { stream, code, .. } if self.exited.len() < MAX_PENDING_EXITS => {
                    self.exited.push((stream, code));
                }
                Event::Exited { stream, .. } => {
                    log::debug!("dropping the exit of stream {stream}: too many pending");
                }
            },
            other => return Err(ProtocolError::Unexpected(other).into()),
        }
        Ok(())
    }

    /// Creates container `id` from a runtime spec.
    pub fn create(&mut self, id: &str, spec: &ContainerSpec) -> Result<(), ClientError> {
        self.call_silent(&Request::Create {
            id: id.to_string(),
            spec: Box::new(spec.clone()),
        })
        .map(drop)
    }

    /// Starts container `id` (on a terminal of size `terminal` when its spec asks for one);
    /// returns the stream id of its first process.
    pub fn start(&mut self, id: &str, terminal: Option<TermSize>) -> Result<u32, ClientError> {
        let req = Request::Start {
            id: id.to_string(),
            terminal,
        };
        self.started(&req)
    }

    /// Starts another process in container `id`, with stdin frames when `stdin` and on a new
    /// terminal of size `terminal` if given; returns its stream id.
    pub fn exec(
        &mut self,
        id: &str,
        process: Process,
        stdin: bool,
        terminal: Option<TermSize>,
    ) -> Result<u32, ClientError> {
        let req = Request::Exec {
            id: id.to_string(),
            process,
            stdin,
            terminal,
        };
        self.started(&req)
    }

    /// Streams `path` of container `id` as a tar archive (stdout frames of the stream returned).
    pub fn copy_out(&mut self, id: &str, path: &str, follow: bool) -> Result<u32, ClientError> {
        let req = Request::CopyOut {
            id: id.to_string(),
            path: path.to_string(),
            follow,
        };
        self.started(&req)
    }

    /// Writes the tar archive sent next as stdin frames of the stream returned to `path` of
    /// container `id`.
    pub fn copy_in(&mut self, id: &str, path: &str, keep_owner: bool) -> Result<u32, ClientError> {
        let req = Request::CopyIn {
            id: id.to_string(),
            path: path.to_string(),
            keep_owner,
        };
        self.started(&req)
    }

    fn started(&mut self, req: &Request) -> Result<u32, ClientError> {
        match self.call_silent(req)? {
            Response::Started { stream, .. } => Ok(stream),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Gives the terminal of process `stream` of container `id` a new size.
    pub fn resize(&mut self, id: &str, stream: u32, size: TermSize) -> Result<(), ClientError> {
        let req = Request::Resize {
            id: id.to_string(),
            stream,
            size,
        };
        self.call_silent(&req).map(drop)
    }

    /// Gets the output and the exit of process `stream` of container `id` on this session too.
    pub fn attach(&mut self, id: &str, stream: u32) -> Result<(), ClientError> {
        let req = Request::Attach {
            id: id.to_string(),
            stream,
        };
        self.call_silent(&req).map(drop)
    }

    /// What container `id` uses now.
    pub fn stats(&mut self, id: &str) -> Result<ContainerStats, ClientError> {
        match self.call_silent(&Request::Stats { id: id.to_string() })? {
            Response::Stats { stats } => Ok(stats),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// The processes of container `id`.
    pub fn top(&mut self, id: &str) -> Result<Vec<ProcessInfo>, ClientError> {
        match self.call_silent(&Request::Top { id: id.to_string() })? {
            Response::Processes { processes } => Ok(processes),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Sends `signal` to a process of container `id`.
    pub fn signal(&mut self, id: &str, stream: u32, signal: i32) -> Result<(), ClientError> {
        let req = Request::Signal {
            id: id.to_string(),
            stream,
            signal,
        };
        self.call_silent(&req).map(drop)
    }

    /// Writes to a process's stdin; an empty `data` closes it.
    pub fn stdin(&mut self, stream: u32, data: &[u8]) -> Result<(), ClientError> {
        let frame = Frame {
            kind: FrameKind::Stdin,
            stream,
            payload: data.to_vec(),
        };
        frame.write_to(&mut self.conn).map_err(Into::into)
    }

    /// Streams output of this session's processes into `sink` until process `stream` exits;
    /// returns its exit code.
    pub fn stream_until_exit(
        &mut self,
        stream: u32,
        sink: &mut dyn OutputSink,
    ) -> Result<i32, ClientError> {
        self.flush_pending(sink);
        loop {
            if let Some(i) = self.exited.iter().position(|(s, _)| *s == stream) {
                return Ok(self.exited.remove(i).1);
            }
            let frame = Frame::read_from(&mut self.conn)?;
            if frame.kind == FrameKind::Response {
                return Err(ClientError::Unexpected(
                    "a response nobody asked for".into(),
                ));
            }
            self.dispatch(frame, sink)?;
        }
    }

    /// Reads one frame (output, or an exit kept for [`AgentClient::stream_until_exit`]) and
    /// hands its output to `sink`: for callers that watch output as it comes.
    pub fn read_frame(&mut self, sink: &mut dyn OutputSink) -> Result<(), ClientError> {
        self.flush_pending(sink);
        let frame = Frame::read_from(&mut self.conn)?;
        if frame.kind == FrameKind::Response {
            return Err(ClientError::Unexpected(
                "a response nobody asked for".into(),
            ));
        }
        self.dispatch(frame, sink)
    }

    /// Hands a guest restored from a template its run (see [`crate::protocol::Setup`]).
    pub fn setup(&mut self, setup: crate::protocol::Setup) -> Result<(), ClientError> {
        self.call_silent(&Request::Setup(Box::new(setup))).map(drop)
    }

    /// Hands a guest restored from a snapshot of a running container its new identity (see
    /// [`Request::Resume`]).
    pub fn resume(&mut self, resume: crate::protocol::Setup) -> Result<(), ClientError> {
        self.call_silent(&Request::Resume(Box::new(resume)))
            .map(drop)
    }

    /// Asks the agent to stop every container and end (in a guest: power the VM off).
    pub fn shutdown(&mut self) -> Result<(), ClientError> {
        self.call_silent(&Request::Shutdown).map(drop)
    }

    /// The connection, e.g. to set timeouts.
    pub fn conn(&self) -> &C {
        &self.conn
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    /// Plays an agent on the other end of `conn`: answers Hello, then runs `rest`.
    fn fake_agent(
        conn: UnixStream,
        rest: impl FnOnce(&mut UnixStream) + Send + 'static,
    ) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            let mut conn = conn;
            let hello = Frame::read_from(&mut conn).expect("hello");
            assert_eq!(hello.kind, FrameKind::Request);
            let answer = Response::Hello {
                version: PROTOCOL_VERSION,
                agent: "fake".into(),
            };
            Frame::json(FrameKind::Response, &answer)
                .and_then(|f| f.write_to(&mut conn))
                .expect("answer hello");
            rest(&mut conn);
        })
    }

    fn stdout_frame(len: usize) -> Frame {
        Frame {
            kind: FrameKind::Stdout,
            stream: 1,
            payload: vec![b'x'; len],
        }
    }

    #[test]
    fn output_sent_before_an_answer_is_kept_up_to_the_cap() {
        let (ours, theirs) = UnixStream::pair().expect("pair");
        let flood: usize = 64 << 20;
        let agent = fake_agent(theirs, move |conn| {
            Frame::read_from(conn).expect("signal request");
            for _ in 0..flood / (256 << 10) {
                stdout_frame(256 << 10).write_to(conn).expect("flood");
            }
            Frame::json(FrameKind::Response, &Response::Ok)
                .and_then(|f| f.write_to(conn))
                .expect("answer");
        });
        let mut client = AgentClient::open(ours).expect("open");
        client.signal("c", 1, 15).expect("signal answered");
        agent.join().expect("agent");
        assert!(client.pending_bytes <= MAX_PENDING_OUTPUT);
        assert_eq!(
            client.dropped_output() + client.pending_bytes as u64,
            flood as u64,
            "every byte is kept or counted"
        );
    }

    /// Counts what it is given and stalls once, early, for a while.
    struct SlowSink {
        got: usize,
        stalled: bool,
        written: Arc<AtomicUsize>,
        lead: usize,
    }

    impl OutputSink for SlowSink {
        fn stdout(&mut self, _: u32, data: &[u8]) {
            self.got += data.len();
            if !self.stalled && self.got >= 1 << 20 {
                self.stalled = true;
                std::thread::sleep(Duration::from_millis(300));
                self.lead = self.written.load(Ordering::SeqCst) - self.got;
            }
        }
        fn stderr(&mut self, _: u32, _: &[u8]) {}
    }

    #[test]
    fn a_slow_sink_holds_the_agent_back() {
        let (ours, theirs) = UnixStream::pair().expect("pair");
        let written = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&written);
        let total = 32 << 20;
        let agent = fake_agent(theirs, move |conn| {
            for _ in 0..total / (64 << 10) {
                stdout_frame(64 << 10).write_to(conn).expect("output");
                counter.fetch_add(64 << 10, Ordering::SeqCst);
            }
            let exited = Event::Exited {
                id: "c".into(),
                stream: 1,
                code: 0,
            };
            Frame::json(FrameKind::Event, &exited)
                .and_then(|f| f.write_to(conn))
                .expect("exit");
        });
        let mut client = AgentClient::open(ours).expect("open");
        let mut sink = SlowSink {
            got: 0,
            stalled: false,
            written,
            lead: 0,
        };
        assert_eq!(client.stream_until_exit(1, &mut sink).expect("exit"), 0);
        agent.join().expect("agent");
        assert_eq!(sink.got, total);
        // While the sink stalled, the agent got no further than the socket buffers and a frame.
        assert!(
            sink.lead <= 4 << 20,
            "the agent ran {} bytes ahead",
            sink.lead
        );
    }
}
