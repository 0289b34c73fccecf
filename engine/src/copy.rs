//! `mvm cp`: files between the host and a running container, both ways, as a tar stream (see
//! `guest_agent::runtime::archive` for the path rules and how neither side follows a link out of
//! its root).
//!
//! - A VM: the agent packs or unpacks inside the guest (`CopyOut` / `CopyIn`); the archive
//!   crosses vsock as the process's stdout or stdin frames.
//! - A container on the host: mvm itself works on the container's root (`/proc/<pid>/root`)
//!   through the same code.
//!
//! On the host side what comes out of a container is written with no setuid or setgid bits and
//! owned by the user running mvm (`-a` keeps the archive's owners); what goes in belongs to
//! container root (its host ids with `--userns`) unless `-a`.

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::thread;

use guest_agent::agent::client::OutputSink;
use guest_agent::guest::MAIN_CONTAINER;
use guest_agent::runtime::archive::{self, ArchiveError, Confine, Owner, Summary, UnpackOptions};

use crate::error::{bad_input, CommandExit, Error};
use crate::lifecycle::{agent, find, host_process, require_running};
use crate::spec::Isolation;
use crate::state::ContainerRecord;

/// Most bytes of a copy's error output kept for the message.
const MAX_ERROR: usize = 4096;

/// One side of `mvm cp`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopyEnd {
    /// A path on the host.
    Host(PathBuf),
    /// This process's stdin or stdout, as a tar stream (`-`).
    Stream,
    /// A path in a container.
    Container {
        /// Its name or id.
        name: String,
        /// The path inside it.
        path: String,
    },
}

impl CopyEnd {
    /// `-`, `NAME:PATH`, or a host path (one that starts with `/` or `.`, or has no `:`).
    pub fn parse(text: &str) -> CopyEnd {
        if text == "-" {
            return CopyEnd::Stream;
        }
        if !text.starts_with(['/', '.']) {
            if let Some((name, path)) = text.split_once(':') {
                if !name.is_empty() && !name.contains('/') {
                    return CopyEnd::Container {
                        name: name.to_string(),
                        path: path.to_string(),
                    };
                }
            }
        }
        CopyEnd::Host(PathBuf::from(text))
    }
}

/// `-a` and `-L`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CopyOptions {
    /// Keep the owners the archive names.
    pub archive: bool,
    /// Follow a symbolic link the source names.
    pub follow: bool,
}

/// Copies `src` to `dst` (exactly one of them in a container); returns what was copied.
pub fn copy(
    root: &Path,
    src: &CopyEnd,
    dst: &CopyEnd,
    options: CopyOptions,
) -> Result<Summary, Error> {
    match (src, dst) {
        (CopyEnd::Container { name, path }, to @ (CopyEnd::Host(_) | CopyEnd::Stream)) => {
            copy_out(root, name, path, to, options)
        }
        (from @ (CopyEnd::Host(_) | CopyEnd::Stream), CopyEnd::Container { name, path }) => {
            copy_in(root, from, name, path, options)
        }
        (CopyEnd::Container { .. }, CopyEnd::Container { .. }) => Err(bad_input(
            "copying between two containers is not supported: copy through the host",
        )),
        _ => Err(bad_input(
            "one side must be a container path (NAME:PATH); the other a host path or -",
        )),
    }
}

fn archive_error(e: ArchiveError) -> Error {
    match e {
        ArchiveError::Io { .. } | ArchiveError::Malformed(_) => {
            Error::Failed(guest_agent::runtime::error_line(&e))
        }
        e => bad_input(guest_agent::runtime::error_line(&e)),
    }
}

/// A host path as given, made absolute against the working directory (its `/.` kept).
fn absolute(path: &Path) -> Result<String, Error> {
    let text = path.to_string_lossy().into_owned();
    if text.starts_with('/') {
        return Ok(text);
    }
    let cwd = std::env::current_dir()
        .map_err(|e| Error::System("cannot read the working directory".into(), e))?;
    Ok(format!("{}/{text}", cwd.display()))
}

fn host_root() -> Result<OwnedFd, Error> {
    archive::open_root(Path::new("/")).map_err(archive_error)
}

/// The running container of `name` and, on the host, the root of its first process.
fn running(root: &Path, name: &str) -> Result<(crate::state::StateStore, ContainerRecord), Error> {
    let (store, r) = find(root, name)?;
    require_running(&r)?;
    if r.isolation == Isolation::Process {
        return Err(bad_input(format!(
            "container {} is a plain process (--isolation process): copy with cp on the host",
            r.name
        )));
    }
    Ok((store, r))
}

fn container_root(r: &ContainerRecord) -> Result<OwnedFd, Error> {
    let pid =
        host_process(r).ok_or_else(|| bad_input(format!("container {} is not running", r.name)))?;
    archive::open_root(Path::new(&format!("/proc/{pid}/root"))).map_err(archive_error)
}

/// Who owns what comes out of a container onto the host.
fn host_owner(options: CopyOptions) -> Owner {
    // SAFETY: getuid and getgid have no preconditions.
    let me = unsafe { (libc::getuid(), libc::getgid()) };
    Owner {
        base: if options.archive { (0, 0) } else { me },
        keep: options.archive,
    }
}

fn copy_out(
    root: &Path,
    name: &str,
    path: &str,
    to: &CopyEnd,
    options: CopyOptions,
) -> Result<Summary, Error> {
    let (store, r) = running(root, name)?;
    let (reader, writer) = UnixStream::pair().map_err(|e| Error::System("socketpair".into(), e))?;
    // Whatever produces the archive writes `writer`; this side unpacks `reader`.
    let consumer = {
        let to = to.clone();
        thread::Builder::new()
            .name("unpack".into())
            .spawn(move || -> Result<Summary, Error> {
                match to {
                    CopyEnd::Host(dest) => {
                        let host = host_root()?;
                        let options = UnpackOptions {
                            confine: Confine::Beneath,
                            owner: host_owner(options),
                        };
                        archive::unpack(host.as_fd(), &absolute(&dest)?, reader, options)
                            .map_err(archive_error)
                    }
                    _ => {
                        let mut reader = reader;
                        let n = std::io::copy(&mut reader, &mut std::io::stdout().lock())
                            .map_err(|e| Error::System("write the archive to stdout".into(), e))?;
                        Ok(Summary {
                            bytes: n,
                            ..Summary::default()
                        })
                    }
                }
            })
            .map_err(|e| Error::System("cannot start a thread".into(), e))?
    };
    let produced = match r.isolation {
        Isolation::Vm => {
            let mut client = agent(&store, &r)?;
            let stream = client
                .copy_out(MAIN_CONTAINER, path, options.follow)
                .map_err(|source| Error::Agent {
                    what: format!("cp from {}", r.name),
                    source,
                })?;
            let mut sink = ArchiveSink {
                out: Some(writer),
                errors: Vec::new(),
            };
            let code = client.stream_until_exit(stream, &mut sink);
            drop(sink.out.take());
            finished(&r, code, &sink.errors)
        }
        _ => {
            let croot = container_root(&r)?;
            archive::pack(croot.as_fd(), path, options.follow, writer)
                .map(drop)
                .map_err(archive_error)
        }
    };
    let consumed = consumer
        .join()
        .unwrap_or_else(|_| Err(Error::Failed("the unpacking thread failed".into())));
    first_cause(produced, consumed)
}

/// The error that says why a copy failed: a refusal on the unpacking side (the packing side
/// then only saw its pipe close), else the packing side's (the unpacking side then only saw a
/// cut archive), else the unpacking side's.
fn first_cause(
    produced: Result<(), Error>,
    consumed: Result<Summary, Error>,
) -> Result<Summary, Error> {
    match (produced, consumed) {
        (_, Err(e)) if e.is_bad_input() => Err(e),
        (Err(e), _) => Err(e),
        (Ok(()), consumed) => consumed,
    }
}

fn copy_in(
    root: &Path,
    from: &CopyEnd,
    name: &str,
    path: &str,
    options: CopyOptions,
) -> Result<Summary, Error> {
    let (store, r) = running(root, name)?;
    let (mut reader, writer) =
        UnixStream::pair().map_err(|e| Error::System("socketpair".into(), e))?;
    let producer = {
        let from = from.clone();
        thread::Builder::new()
            .name("pack".into())
            .spawn(move || -> Result<Summary, Error> {
                match from {
                    CopyEnd::Host(src) => {
                        let host = host_root()?;
                        archive::pack(host.as_fd(), &absolute(&src)?, options.follow, writer)
                            .map_err(archive_error)
                    }
                    _ => {
                        let mut writer = writer;
                        let n = std::io::copy(&mut std::io::stdin().lock(), &mut writer)
                            .map_err(|e| Error::System("read the archive from stdin".into(), e))?;
                        Ok(Summary {
                            bytes: n,
                            ..Summary::default()
                        })
                    }
                }
            })
            .map_err(|e| Error::System("cannot start a thread".into(), e))?
    };
    let consumed = match r.isolation {
        Isolation::Vm => {
            let mut client = agent(&store, &r)?;
            let stream = client
                .copy_in(MAIN_CONTAINER, path, options.archive)
                .map_err(|source| Error::Agent {
                    what: format!("cp to {}", r.name),
                    source,
                })?;
            let mut buf = vec![0u8; 64 << 10];
            let sent = loop {
                match reader.read(&mut buf) {
                    Ok(0) => break Ok(()),
                    Ok(n) => {
                        if let Err(source) = client.stdin(stream, &buf[..n]) {
                            break Err(source);
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break Ok(()),
                }
            };
            let end = sent.and_then(|()| client.stdin(stream, b""));
            let mut sink = ArchiveSink {
                out: None,
                errors: Vec::new(),
            };
            let code = end.and_then(|()| client.stream_until_exit(stream, &mut sink));
            finished(&r, code, &sink.errors).map(|()| Summary::default())
        }
        _ => {
            let croot = container_root(&r)?;
            let spec = crate::runner::read_spec(&store.container_dir(&r.id))?;
            let base = spec
                .security
                .userns
                .as_ref()
                .map_or((0, 0), |m| (m.host_uid, m.host_gid));
            let options = UnpackOptions {
                confine: Confine::InRoot,
                owner: Owner {
                    base,
                    keep: options.archive,
                },
            };
            archive::unpack(croot.as_fd(), path, reader, options).map_err(archive_error)
        }
    };
    let produced = producer
        .join()
        .unwrap_or_else(|_| Err(Error::Failed("the packing thread failed".into())));
    let summary = produced
        .as_ref()
        .map_or_else(|_| Summary::default(), |s| *s);
    first_cause(produced.map(drop), consumed)
        .map(|s| if s == Summary::default() { summary } else { s })
}

/// The archive a VM's agent streams (stdout frames) and its error line (stderr frames).
struct ArchiveSink {
    out: Option<UnixStream>,
    errors: Vec<u8>,
}

impl OutputSink for ArchiveSink {
    fn stdout(&mut self, _stream: u32, data: &[u8]) {
        if let Some(w) = self.out.as_mut() {
            if w.write_all(data).is_err() {
                // The unpacking side stopped (and says why): drop the rest.
                self.out = None;
            }
        }
    }
    fn stderr(&mut self, _stream: u32, data: &[u8]) {
        let room = MAX_ERROR.saturating_sub(self.errors.len());
        self.errors.extend_from_slice(&data[..data.len().min(room)]);
    }
}

/// The end of a copy in a VM: its exit code and what it said.
fn finished(
    r: &ContainerRecord,
    code: Result<i32, guest_agent::agent::client::ClientError>,
    errors: &[u8],
) -> Result<(), Error> {
    match code {
        Ok(0) => Ok(()),
        Ok(code) => {
            let msg = String::from_utf8_lossy(errors).trim().to_string();
            let msg = if msg.is_empty() {
                format!("the copy in {} failed ({code})", r.name)
            } else {
                msg
            };
            Err(CommandExit(1, msg).into())
        }
        Err(source) => Err(Error::Agent {
            what: format!("cp with {}: the session broke", r.name),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sides_parse_as_docker_reads_them() {
        assert_eq!(
            CopyEnd::parse("web:/etc/hosts"),
            CopyEnd::Container {
                name: "web".into(),
                path: "/etc/hosts".into()
            }
        );
        assert_eq!(CopyEnd::parse("-"), CopyEnd::Stream);
        for host in ["/tmp/a:b", "./a:b", "plain", "dir/x:y"] {
            assert_eq!(CopyEnd::parse(host), CopyEnd::Host(host.into()), "{host}");
        }
    }
}
