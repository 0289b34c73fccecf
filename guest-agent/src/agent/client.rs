//! The host's side of the protocol: open a session, create and start a container, stream its
//! output and collect its exit code.

use std::io::{Read, Write};

use crate::protocol::{
    Event, Frame, FrameKind, ProtocolError, Request, Response, PROTOCOL_VERSION,
};
use crate::runtime::spec::{ContainerSpec, Process};

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
}

impl<C: Read + Write> AgentClient<C> {
    /// Sends Hello and checks the agent's version.
    pub fn open(conn: C) -> Result<Self, ClientError> {
        let mut client = AgentClient {
            conn,
            exited: Vec::new(),
            pending: Vec::new(),
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
                FrameKind::Stdout | FrameKind::Stderr => self.pending.push(frame),
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

    fn flush_pending(&mut self, sink: &mut dyn OutputSink) {
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
                Event::Exited { stream, code, .. } => self.exited.push((stream, code)),
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

    /// Starts container `id`; returns the stream id of its first process.
    pub fn start(&mut self, id: &str) -> Result<u32, ClientError> {
        match self.call_silent(&Request::Start { id: id.to_string() })? {
            Response::Started { stream, .. } => Ok(stream),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Starts another process in container `id`, with stdin frames when `stdin`; returns its
    /// stream id.
    pub fn exec(&mut self, id: &str, process: Process, stdin: bool) -> Result<u32, ClientError> {
        let req = Request::Exec {
            id: id.to_string(),
            process,
            stdin,
        };
        match self.call_silent(&req)? {
            Response::Started { stream, .. } => Ok(stream),
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

    /// Asks the agent to stop every container and end (in a guest: power the VM off).
    pub fn shutdown(&mut self) -> Result<(), ClientError> {
        self.call_silent(&Request::Shutdown).map(drop)
    }

    /// The connection, e.g. to set timeouts.
    pub fn conn(&self) -> &C {
        &self.conn
    }
}
