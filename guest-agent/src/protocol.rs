//! The agent protocol, version 3: how the host (mvm) talks to the guest agent over vsock, or to
//! an agent on the host over a Unix socket.
//!
//! The stream carries frames. Each frame is a 9-byte header followed by its payload:
//!
//! | bytes | field | meaning |
//! | --- | --- | --- |
//! | 0..4 | `len` | payload length, big-endian, at most [`MAX_PAYLOAD`] |
//! | 4 | `kind` | [`FrameKind`] |
//! | 5..9 | `stream` | big-endian id of the process the frame belongs to (0 for control) |
//!
//! Control frames ([`FrameKind::Request`], [`FrameKind::Response`], [`FrameKind::Event`]) carry
//! one JSON document: [`Request`], [`Response`] or [`Event`]. Stdio frames carry raw bytes of a
//! process's stdin, stdout or stderr; an empty stdin frame closes that process's stdin.
//!
//! A session starts with the client sending [`Request::Hello`]; the agent answers
//! [`Response::Hello`] with its version, or an error if the major version differs. After that the
//! client sends requests one at a time; each gets exactly one response. Events (a process exited)
//! and stdout/stderr frames may arrive at any time, interleaved with responses.
//!
//! A process with a terminal (`-t`: [`ContainerSpec::terminal`], or `terminal` in
//! [`Request::Exec`]) has one output stream: stdout frames carry what its terminal shows, stdin
//! frames what it reads, and [`Request::Resize`] changes its terminal's size (its foreground
//! process group gets SIGWINCH). Ctrl-C and the like travel as bytes in stdin frames; the
//! terminal turns them into signals.
//!
//! `mvm cp` runs as processes too: [`Request::CopyOut`] streams a tar archive as stdout frames,
//! [`Request::CopyIn`] reads one from stdin frames; errors come as stderr frames and a nonzero
//! exit code.

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

use crate::runtime::pty::TermSize;
use crate::runtime::spec::{ContainerSpec, Process};
use crate::runtime::stats::{ContainerStats, ProcessInfo};

/// Protocol version spoken by this build. Bumped on incompatible changes (2: typed container
/// spec, one [`Process`] type, no `wait` and `stats` requests; 3: terminals, attach, stats, top
/// and copies).
pub const PROTOCOL_VERSION: u32 = 3;

/// Largest payload a frame may carry; larger frames are a protocol error.
pub const MAX_PAYLOAD: u32 = 1 << 20;

/// Length of a frame header.
pub const HEADER_LEN: usize = 9;

/// Vsock port the agent listens on inside the guest.
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// JSON [`Request`], client to agent.
    Request = 1,
    /// JSON [`Response`], agent to client.
    Response = 2,
    /// JSON [`Event`], agent to client.
    Event = 3,
    /// Bytes for a process's stdin; empty closes it.
    Stdin = 4,
    /// Bytes a process wrote to stdout.
    Stdout = 5,
    /// Bytes a process wrote to stderr.
    Stderr = 6,
}

impl TryFrom<u8> for FrameKind {
    type Error = ProtocolError;
    fn try_from(v: u8) -> Result<Self, ProtocolError> {
        Ok(match v {
            1 => Self::Request,
            2 => Self::Response,
            3 => Self::Event,
            4 => Self::Stdin,
            5 => Self::Stdout,
            6 => Self::Stderr,
            other => return Err(ProtocolError::UnknownKind(other)),
        })
    }
}

/// Errors of the framing layer.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The peer closed the stream between frames.
    #[error("connection closed")]
    Closed,
    /// Reading or writing the stream failed.
    #[error("agent connection I/O failed")]
    Io(#[source] io::Error),
    /// A frame announced a payload over [`MAX_PAYLOAD`].
    #[error("frame of {0} bytes exceeds the {MAX_PAYLOAD}-byte limit")]
    TooLarge(u32),
    /// A frame kind this version does not know.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// A control frame whose JSON does not parse as the expected message.
    #[error("malformed message")]
    Json(#[source] serde_json::Error),
    /// A frame of a kind that was not expected here.
    #[error("unexpected {0:?} frame")]
    Unexpected(FrameKind),
}

/// One frame read from or written to the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// What the payload is.
    pub kind: FrameKind,
    /// Process the frame belongs to (0 for control frames).
    pub stream: u32,
    /// The payload.
    pub payload: Vec<u8>,
}

impl Frame {
    /// A control frame carrying `msg` as JSON.
    pub fn json<T: Serialize>(kind: FrameKind, msg: &T) -> Result<Self, ProtocolError> {
        let payload = serde_json::to_vec(msg).map_err(ProtocolError::Json)?;
        Ok(Frame {
            kind,
            stream: 0,
            payload,
        })
    }

    /// Decodes the JSON payload of a control frame.
    pub fn parse<T: for<'de> Deserialize<'de>>(&self) -> Result<T, ProtocolError> {
        serde_json::from_slice(&self.payload).map_err(ProtocolError::Json)
    }

    /// The frame as bytes on the wire: header, then payload.
    pub fn encode(&self) -> Result<Vec<u8>, ProtocolError> {
        let mut buf = Vec::with_capacity(HEADER_LEN + self.payload.len());
        self.encode_into(&mut buf)?;
        Ok(buf)
    }

    /// Appends the frame's bytes (header, then payload) to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), ProtocolError> {
        let len = u32::try_from(self.payload.len())
            .ok()
            .filter(|l| *l <= MAX_PAYLOAD)
            .ok_or(ProtocolError::TooLarge(u32::MAX))?;
        out.extend_from_slice(&len.to_be_bytes());
        out.push(self.kind as u8);
        out.extend_from_slice(&self.stream.to_be_bytes());
        out.extend_from_slice(&self.payload);
        Ok(())
    }

    /// Writes the frame (header and payload) to `w` and flushes it.
    pub fn write_to(&self, w: &mut impl Write) -> Result<(), ProtocolError> {
        w.write_all(&self.encode()?).map_err(ProtocolError::Io)?;
        w.flush().map_err(ProtocolError::Io)
    }

    /// Takes the first complete frame off the front of `buf` (bytes received so far), or
    /// `None` while it is incomplete. A bad header is an error at once, before its payload.
    pub fn take_from(buf: &mut Vec<u8>) -> Result<Option<Self>, ProtocolError> {
        let Some((frame, used)) = Self::first_in(buf)? else {
            return Ok(None);
        };
        buf.drain(..used);
        Ok(Some(frame))
    }

    /// The first complete frame at the front of `buf` and how many bytes it took, or `None`
    /// while it is incomplete; a bad header is an error at once, before its payload. A reader
    /// that takes many frames off one buffer advances by the bytes taken and removes them once,
    /// not frame by frame (which moves the rest of the buffer each time).
    pub fn first_in(buf: &[u8]) -> Result<Option<(Self, usize)>, ProtocolError> {
        let Some(header) = buf.first_chunk::<HEADER_LEN>() else {
            return Ok(None);
        };
        let (len, kind, stream) = decode_header(header)?;
        let end = HEADER_LEN + len as usize;
        let Some(payload) = buf.get(HEADER_LEN..end) else {
            return Ok(None);
        };
        let frame = Frame {
            kind,
            stream,
            payload: payload.to_vec(),
        };
        Ok(Some((frame, end)))
    }

    /// Reads one frame. A stream that ends before the first header byte is [`ProtocolError::Closed`].
    pub fn read_from(r: &mut impl Read) -> Result<Self, ProtocolError> {
        let mut header = [0u8; HEADER_LEN];
        let mut got = 0;
        while got < HEADER_LEN {
            match r.read(&mut header[got..]) {
                Ok(0) if got == 0 => return Err(ProtocolError::Closed),
                Ok(0) => {
                    return Err(ProtocolError::Io(io::ErrorKind::UnexpectedEof.into()));
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ProtocolError::Io(e)),
            }
        }
        let (len, kind, stream) = decode_header(&header)?;
        let mut payload = vec![0u8; len as usize];
        r.read_exact(&mut payload).map_err(ProtocolError::Io)?;
        Ok(Frame {
            kind,
            stream,
            payload,
        })
    }
}

/// A frame from a client as the agent acts on it: a request, or stdin for one of its processes.
#[derive(Debug)]
pub enum ClientFrame {
    /// A [`FrameKind::Request`] frame: the request, or why its JSON does not parse (the agent
    /// answers that with an error and keeps the session).
    Request(Result<Request, ProtocolError>),
    /// Bytes for the stdin of process `stream`; empty closes it.
    Stdin {
        /// Stream id of the process.
        stream: u32,
        /// The bytes.
        data: Vec<u8>,
    },
}

impl ClientFrame {
    /// Decodes a frame a client sent (see [`Frame::take_from`] for the framing). A frame of a
    /// kind only the agent sends is [`ProtocolError::Unexpected`]: the client broke the protocol.
    ///
    /// This and [`Frame::take_from`] are everything the agent does with a client's bytes before
    /// it acts on a request; the fuzz target `agent_protocol` drives them.
    pub fn decode(frame: Frame) -> Result<Self, ProtocolError> {
        match frame.kind {
            FrameKind::Request => Ok(Self::Request(frame.parse())),
            FrameKind::Stdin => Ok(Self::Stdin {
                stream: frame.stream,
                data: frame.payload,
            }),
            other => Err(ProtocolError::Unexpected(other)),
        }
    }
}

/// Payload length, kind and stream of a frame header; a length over [`MAX_PAYLOAD`] or an
/// unknown kind is an error.
fn decode_header(header: &[u8; HEADER_LEN]) -> Result<(u32, FrameKind, u32), ProtocolError> {
    let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
    if len > MAX_PAYLOAD {
        return Err(ProtocolError::TooLarge(len));
    }
    let kind = FrameKind::try_from(header[4])?;
    let stream = u32::from_be_bytes([header[5], header[6], header[7], header[8]]);
    Ok((len, kind, stream))
}

/// Client to agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Opens the session; `version` is the client's [`PROTOCOL_VERSION`].
    Hello {
        /// Protocol version of the client.
        version: u32,
    },
    /// Prepares a container (root filesystem, namespaces, limits) without starting it.
    Create {
        /// Container id, unique in this agent (it replaces the spec's own id).
        id: String,
        /// The container.
        spec: Box<ContainerSpec>,
    },
    /// Starts the container's first process; its stdio streams use stream id 1.
    Start {
        /// Container id.
        id: String,
        /// The size of its terminal, when its spec asks for one (24 x 80 when absent).
        #[serde(default)]
        terminal: Option<TermSize>,
    },
    /// Runs another process in a running container; the response names its stream id.
    Exec {
        /// Container id.
        id: String,
        /// What to run; its environment is added to the container's.
        process: Process,
        /// Whether stdin frames are expected (otherwise stdin is /dev/null); stdout and stderr
        /// always stream back.
        #[serde(default)]
        stdin: bool,
        /// A new terminal of this size for the process (`exec -t`); its output then comes as
        /// stdout frames only.
        #[serde(default)]
        terminal: Option<TermSize>,
    },
    /// Changes the size of a process's terminal.
    Resize {
        /// Container id.
        id: String,
        /// Stream id of the process.
        stream: u32,
        /// The new size.
        size: TermSize,
    },
    /// This session also gets the output and the exit of a process another session started
    /// (`mvm attach`); it may send its stdin and resize its terminal like any session.
    Attach {
        /// Container id.
        id: String,
        /// Stream id of the process.
        stream: u32,
    },
    /// The container's resource use now ([`Response::Stats`]).
    Stats {
        /// Container id.
        id: String,
    },
    /// The container's processes ([`Response::Processes`]).
    Top {
        /// Container id.
        id: String,
    },
    /// Streams `path` of the container as a tar archive (`mvm cp CONTAINER:PATH ...`); answered
    /// like an exec.
    CopyOut {
        /// Container id.
        id: String,
        /// The path inside the container (`DIR/.` for a directory's contents).
        path: String,
        /// Follow a symbolic link `path` names (`-L`).
        #[serde(default)]
        follow: bool,
    },
    /// Writes the tar archive that follows as stdin frames to `path` of the container (`mvm cp
    /// ... CONTAINER:PATH`); answered like an exec.
    CopyIn {
        /// Container id.
        id: String,
        /// The destination inside the container.
        path: String,
        /// Keep the archive's owners (`-a`); else everything belongs to the container's root.
        #[serde(default)]
        keep_owner: bool,
    },
    /// Sends a signal to a process (the container's first process when `stream` is 1).
    Signal {
        /// Container id.
        id: String,
        /// Stream id of the process.
        stream: u32,
        /// Signal number.
        signal: i32,
    },
    /// Stops every container and powers the VM off (on the host: stops the agent).
    Shutdown,
    /// The run's own parameters, for a guest booted as a template (`mvm.template=1`) and
    /// restored: sent once, first thing after the hello, before any container exists.
    Setup(Box<Setup>),
    /// The VM was restored from a snapshot of a running container (a fork, `mvm run
    /// --from-snapshot`): its containers run on, and the guest takes its new identity — a
    /// template's setup, but its disks stay mounted and only the network and published ports
    /// of `boot` are applied.
    Resume(Box<Setup>),
}

/// What a VM restored from a template is told about its run (see [`Request::Setup`]). It is
/// also how the agent learns it was restored: it mounted nothing before.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Setup {
    /// The run's boot parameters, as `mvm.` words ([`crate::guest::BootParams::to_cmdline`]):
    /// the root disk, volumes, network, published ports.
    pub boot: String,
    /// 64 fresh random bytes from the host, hex: the guest's RNG is reseeded with them so
    /// two VMs restored from one template never share randomness.
    pub seed: String,
    /// The host's wall clock, nanoseconds since the epoch: the guest clock stood still in the
    /// template.
    pub time_ns: u64,
    /// The guest interface's new MAC address (the template's was another run's), if it has a
    /// network.
    #[serde(default)]
    pub mac: Option<[u8; 6]>,
}

/// Agent to client, one per request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case", deny_unknown_fields)]
pub enum Response {
    /// Answer to [`Request::Hello`].
    Hello {
        /// Protocol version of the agent.
        version: u32,
        /// The agent's build version.
        agent: String,
    },
    /// The request succeeded and has nothing to return.
    Ok,
    /// A process was started; its stdio frames carry this stream id.
    Started {
        /// Stream id of the process.
        stream: u32,
        /// Its process id (in the agent's pid namespace).
        pid: i32,
    },
    /// Answer to [`Request::Stats`].
    Stats {
        /// What the container uses.
        stats: ContainerStats,
    },
    /// Answer to [`Request::Top`].
    Processes {
        /// Its processes, by pid.
        processes: Vec<ProcessInfo>,
    },
    /// The request failed; `message` is one line for the user.
    Error {
        /// What went wrong.
        message: String,
    },
}

/// Agent to client, unsolicited.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case", deny_unknown_fields)]
pub enum Event {
    /// A process ended; all of its output frames were sent before this event.
    Exited {
        /// Container id.
        id: String,
        /// Stream id of the process.
        stream: u32,
        /// Exit code; 128 + signal when killed by a signal.
        code: i32,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_found_one_after_the_other_in_one_buffer() {
        let mut wire = Vec::new();
        for (stream, data) in [(1u32, &b"a"[..]), (2, b""), (3, b"xyz")] {
            let frame = Frame {
                kind: FrameKind::Stdin,
                stream,
                payload: data.to_vec(),
            };
            frame.encode_into(&mut wire).unwrap();
        }
        let mut at = 0;
        let mut seen = Vec::new();
        while let Some((frame, used)) = Frame::first_in(&wire[at..]).unwrap() {
            at += used;
            seen.push((frame.stream, frame.payload));
        }
        assert_eq!(at, wire.len());
        assert_eq!(
            seen,
            [(1, b"a".to_vec()), (2, vec![]), (3, b"xyz".to_vec())]
        );
        // A frame cut short is incomplete, whichever byte it ends at; a bad header is refused
        // before its payload arrives.
        for cut in 0..HEADER_LEN + 1 {
            assert!(Frame::first_in(&wire[..cut]).unwrap().is_none(), "{cut}");
        }
        let mut huge = wire[..HEADER_LEN].to_vec();
        huge[..4].copy_from_slice(&(MAX_PAYLOAD + 1).to_be_bytes());
        assert!(Frame::first_in(&huge).is_err());
    }

    #[test]
    fn frames_round_trip_through_a_stream() {
        let mut wire = Vec::new();
        let req = Request::Exec {
            id: "web".into(),
            process: Process {
                args: vec!["sh".into(), "-c".into(), "echo hi".into()],
                ..Default::default()
            },
            stdin: false,
            terminal: Some(TermSize {
                rows: 40,
                cols: 120,
            }),
        };
        Frame::json(FrameKind::Request, &req)
            .unwrap()
            .write_to(&mut wire)
            .unwrap();
        Frame {
            kind: FrameKind::Stdout,
            stream: 7,
            payload: b"hi\n".to_vec(),
        }
        .write_to(&mut wire)
        .unwrap();

        let mut r = wire.as_slice();
        let f = Frame::read_from(&mut r).unwrap();
        assert_eq!(f.kind, FrameKind::Request);
        assert_eq!(f.parse::<Request>().unwrap(), req);
        let f = Frame::read_from(&mut r).unwrap();
        assert_eq!(
            (f.kind, f.stream, f.payload.as_slice()),
            (FrameKind::Stdout, 7, &b"hi\n"[..])
        );
        assert!(matches!(
            Frame::read_from(&mut r),
            Err(ProtocolError::Closed)
        ));
    }

    #[test]
    fn hostile_frames_are_rejected_without_allocating() {
        let mut huge = vec![0xff, 0xff, 0xff, 0xff, 1, 0, 0, 0, 0];
        assert!(matches!(
            Frame::read_from(&mut huge.as_slice()),
            Err(ProtocolError::TooLarge(u32::MAX))
        ));
        huge[0..4].copy_from_slice(&0u32.to_be_bytes());
        huge[4] = 99;
        assert!(matches!(
            Frame::read_from(&mut huge.as_slice()),
            Err(ProtocolError::UnknownKind(99))
        ));
        // A header cut short is an I/O error, not a clean close.
        assert!(matches!(
            Frame::read_from(&mut &[0u8, 0, 0][..]),
            Err(ProtocolError::Io(_))
        ));
        // A payload shorter than announced.
        assert!(matches!(
            Frame::read_from(&mut &[0u8, 0, 0, 5, 1, 0, 0, 0, 0, b'{'][..]),
            Err(ProtocolError::Io(_))
        ));
    }

    #[test]
    fn client_frames_decode_to_requests_and_stdin() {
        let hello = Frame::json(FrameKind::Request, &Request::Hello { version: 3 }).unwrap();
        assert!(matches!(
            ClientFrame::decode(hello),
            Ok(ClientFrame::Request(Ok(Request::Hello { version: 3 })))
        ));
        // Malformed JSON is the request's own error: the agent answers it, the session stays.
        let bad = Frame {
            kind: FrameKind::Request,
            stream: 0,
            payload: b"{\"op\":".to_vec(),
        };
        assert!(matches!(
            ClientFrame::decode(bad),
            Ok(ClientFrame::Request(Err(ProtocolError::Json(_))))
        ));
        let stdin = Frame {
            kind: FrameKind::Stdin,
            stream: 2,
            payload: b"x".to_vec(),
        };
        assert!(matches!(
            ClientFrame::decode(stdin),
            Ok(ClientFrame::Stdin { stream: 2, data }) if data == b"x"
        ));
        // Frames only the agent sends break the protocol.
        for kind in [FrameKind::Response, FrameKind::Event, FrameKind::Stdout] {
            let f = Frame {
                kind,
                stream: 0,
                payload: Vec::new(),
            };
            assert!(matches!(
                ClientFrame::decode(f),
                Err(ProtocolError::Unexpected(k)) if k == kind
            ));
        }
    }

    #[test]
    fn create_carries_a_typed_container_spec() {
        let json = r#"{"op":"create","id":"main","spec":{"id":"main",
            "rootfs":{"overlay":{"lower":["/mnt/rootfs"],"upper":"/run/mvm/upper","work":"/run/mvm/work"}},
            "process":{"args":["sh"],"env":["A=1"]}}}"#;
        let Request::Create { id, spec } = serde_json::from_str::<Request>(json).unwrap() else {
            panic!("not a create request");
        };
        assert_eq!(
            (id.as_str(), spec.process.args.as_slice()),
            ("main", &["sh".to_string()][..])
        );
        let back = serde_json::to_string(&Request::Create { id, spec }).unwrap();
        assert_eq!(
            serde_json::from_str::<Request>(&back).unwrap(),
            serde_json::from_str::<Request>(json).unwrap()
        );
        // A spec the runtime does not know is refused before it reaches it.
        let bad = json.replace(r#""env":["A=1"]"#, r#""privileged":true"#);
        assert!(serde_json::from_str::<Request>(&bad).is_err());
    }

    #[test]
    fn new_requests_and_answers_round_trip() {
        for req in [
            Request::Start {
                id: "main".into(),
                terminal: None,
            },
            Request::Resize {
                id: "main".into(),
                stream: 1,
                size: TermSize {
                    rows: 50,
                    cols: 200,
                },
            },
            Request::Attach {
                id: "main".into(),
                stream: 1,
            },
            Request::Stats { id: "main".into() },
            Request::Top { id: "main".into() },
            Request::CopyOut {
                id: "main".into(),
                path: "/etc/.".into(),
                follow: false,
            },
            Request::CopyIn {
                id: "main".into(),
                path: "/srv".into(),
                keep_owner: true,
            },
        ] {
            let json = serde_json::to_string(&req).unwrap();
            assert_eq!(
                serde_json::from_str::<Request>(&json).unwrap(),
                req,
                "{json}"
            );
        }
        // An old client's start, without a terminal, still parses.
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"op":"start","id":"main"}"#).unwrap(),
            Request::Start {
                id: "main".into(),
                terminal: None
            }
        );
        let stats = Response::Stats {
            stats: ContainerStats {
                cpu_usec: 1,
                memory_bytes: 2,
                memory_limit: Some(3),
                memory_total: 4,
                pids: 5,
                net_rx_bytes: 6,
                net_tx_bytes: 7,
                block_read_bytes: None,
                block_write_bytes: Some(8),
                online_cpus: 2,
            },
        };
        let json = serde_json::to_string(&stats).unwrap();
        assert_eq!(serde_json::from_str::<Response>(&json).unwrap(), stats);
        let top = Response::Processes {
            processes: vec![ProcessInfo {
                pid: 7,
                ppid: 1,
                uid: 0,
                started: 1_700_000_000,
                cpu_ms: 20,
                command: "sh -c sleep 9".into(),
            }],
        };
        let json = serde_json::to_string(&top).unwrap();
        assert_eq!(serde_json::from_str::<Response>(&json).unwrap(), top);
    }

    #[test]
    fn setup_round_trips_as_json() {
        let req = Request::Setup(Box::new(Setup {
            boot: "mvm.rootfs=/dev/vda mvm.ports=80".into(),
            seed: "00ff".repeat(32),
            time_ns: 1_700_000_000_000_000_000,
            mac: Some([2, 1, 2, 3, 4, 5]),
        }));
        let json = serde_json::to_string(&req).unwrap();
        assert_eq!(serde_json::from_str::<Request>(&json).unwrap(), req);
    }

    #[test]
    fn unknown_fields_and_ops_do_not_parse() {
        assert!(serde_json::from_str::<Request>(r#"{"op":"format_disk"}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"op":"hello","version":1,"x":2}"#).is_err());
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"op":"hello","version":1}"#).unwrap(),
            Request::Hello { version: 1 }
        );
    }
}
