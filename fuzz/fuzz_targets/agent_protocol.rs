//! The agent protocol: one byte stream read by both sides.
//!
//! - The agent (guest) reads it as a client's requests: [`Frame::take_from`] on bytes arriving in
//!   chunks, then [`ClientFrame::decode`], as its server does.
//! - The host reads it as what a (hostile) guest agent answers: an [`AgentClient`] over a
//!   connection that yields the bytes in chunks, through hello, one request and its output.
//!
//! Both must never panic and never allocate past the frame limit. The incremental reader
//! ([`Frame::take_from`]) and the blocking one ([`Frame::read_from`]) must also agree on every
//! frame and on whether the stream broke the framing.
//!
//! Input: byte 0 picks the chunk size (bits 0-5: 1..=63 bytes, 0 for all at once) and the host's
//! request (bits 6-7); the rest is the stream.
#![no_main]

use std::io::{self, Read, Write};

use guest_agent::agent::client::{AgentClient, OutputSink};
use guest_agent::protocol::{ClientFrame, Frame, ProtocolError};
use guest_agent::runtime::Process;
use libfuzzer_sys::fuzz_target;

/// A connection whose peer sent `data`, delivered at most `chunk` bytes per read; what the
/// client writes is dropped.
struct Peer<'a> {
    data: &'a [u8],
    chunk: usize,
}

impl Read for Peer<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min(self.chunk).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

impl Write for Peer<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Counts the output the client hands on.
#[derive(Default)]
struct Counting(usize);

impl OutputSink for Counting {
    fn stdout(&mut self, _stream: u32, data: &[u8]) {
        self.0 += data.len();
    }
    fn stderr(&mut self, _stream: u32, data: &[u8]) {
        self.0 += data.len();
    }
}

/// Whether a read ended on a bad header (as opposed to the stream running out).
fn bad_header(e: &ProtocolError) -> bool {
    matches!(
        e,
        ProtocolError::TooLarge(_) | ProtocolError::UnknownKind(_)
    )
}

/// The agent's side: frames as its server takes them off its input buffer.
fn agent_reads(stream: &[u8], chunk: usize) -> (Vec<Frame>, bool) {
    let mut inbuf = Vec::new();
    let mut frames = Vec::new();
    for piece in stream.chunks(chunk) {
        inbuf.extend_from_slice(piece);
        loop {
            match Frame::take_from(&mut inbuf) {
                Ok(Some(frame)) => {
                    frames.push(frame.clone());
                    let _ = ClientFrame::decode(frame);
                }
                Ok(None) => break,
                Err(e) => {
                    assert!(bad_header(&e), "take_from: {e:?}");
                    return (frames, true);
                }
            }
        }
    }
    (frames, false)
}

/// The blocking reader over the same bytes.
fn blocking_reads(stream: &[u8], chunk: usize) -> (Vec<Frame>, bool) {
    let mut peer = Peer {
        data: stream,
        chunk,
    };
    let mut frames = Vec::new();
    loop {
        match Frame::read_from(&mut peer) {
            Ok(frame) => frames.push(frame),
            Err(e) => return (frames, bad_header(&e)),
        }
    }
}

/// The host's side: a session with an agent that sends `stream`.
fn host_reads(stream: &[u8], chunk: usize, request: u8) {
    let peer = Peer {
        data: stream,
        chunk,
    };
    let Ok(mut client) = AgentClient::open(peer) else {
        return;
    };
    let mut sink = Counting::default();
    let _ = match request {
        0 => client.stats("main").map(drop),
        1 => client.top("main").map(drop),
        2 => client
            .exec("main", Process::default(), false, None)
            .and_then(|s| client.stream_until_exit(s, &mut sink))
            .map(drop),
        _ => client.start("main", None).map(drop),
    };
    // Whatever is left arrives as output and exits; the stream ends in an error.
    while client.read_frame(&mut sink).is_ok() {}
    assert!(sink.0 <= stream.len(), "more output than input");
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, stream)) = data.split_first() else {
        return;
    };
    let chunk = match usize::from(control & 0x3f) {
        0 => stream.len().max(1),
        n => n,
    };
    let agent = agent_reads(stream, chunk);
    let blocking = blocking_reads(stream, chunk);
    assert_eq!(agent, blocking, "the two frame readers disagree");
    host_reads(stream, chunk, control >> 6);
});
