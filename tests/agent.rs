//! The guest agent, run on the host behind its Unix socket: the same protocol the host speaks to
//! it over vsock inside a VM.
#![allow(clippy::unwrap_used)] // test helpers fail the test on any setup error

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use guest_agent::agent::client::{AgentClient, ClientError, OutputSink};
use guest_agent::protocol::{Frame, FrameKind, Request, Response};
use guest_agent::runtime::{ContainerSpec, Process, TermSize};

/// A root filesystem from Debian's busybox-static package: /bin/busybox plus applet links.
fn busybox_rootfs(dir: &Path) -> Option<PathBuf> {
    let busybox = Path::new("/bin/busybox");
    if !busybox.exists() {
        eprintln!("skipping: /bin/busybox (Debian busybox-static) is not installed");
        return None;
    }
    let root = dir.join("rootfs");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    // A hard link, not a copy: a copy's write descriptor can leak into a child another test
    // thread forks, and exec then fails with ETXTBSY.
    let dst = root.join("bin/busybox");
    std::fs::hard_link(busybox, &dst)
        .or_else(|_| std::fs::copy(busybox, &dst).map(drop))
        .unwrap();
    for applet in ["sh", "echo", "cat", "sleep", "hostname", "true", "stty"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    Some(root)
}

struct AgentProcess {
    child: Child,
    socket: PathBuf,
}

impl AgentProcess {
    fn start(dir: &Path) -> Self {
        let socket = dir.join("agent.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_mvm-agent"))
            .arg("--socket")
            .arg(&socket)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "agent did not create its socket");
            std::thread::sleep(Duration::from_millis(20));
        }
        AgentProcess { child, socket }
    }

    fn connect(&self) -> AgentClient<UnixStream> {
        AgentClient::open(UnixStream::connect(&self.socket).unwrap()).unwrap()
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Output of every process of a session, by stream id.
#[derive(Default)]
struct Captured {
    out: std::collections::HashMap<u32, Vec<u8>>,
    err: std::collections::HashMap<u32, Vec<u8>>,
}

impl Captured {
    fn out(&self, stream: u32) -> String {
        String::from_utf8_lossy(self.out.get(&stream).map_or(&[][..], |v| v)).into_owned()
    }
    fn err(&self, stream: u32) -> String {
        String::from_utf8_lossy(self.err.get(&stream).map_or(&[][..], |v| v)).into_owned()
    }
}

impl OutputSink for Captured {
    fn stdout(&mut self, stream: u32, data: &[u8]) {
        self.out.entry(stream).or_default().extend_from_slice(data);
    }
    fn stderr(&mut self, stream: u32, data: &[u8]) {
        self.err.entry(stream).or_default().extend_from_slice(data);
    }
}

/// Starts `cat` with stdin in container `web`; returns its stream.
fn exec_cat(client: &mut AgentClient<UnixStream>) -> u32 {
    let process = Process {
        args: vec!["cat".into()],
        env: vec!["PATH=/bin".into()],
        ..Default::default()
    };
    client.exec("web", process, true, None).unwrap()
}

/// An agent running container `id` (busybox, `sleep 1000`); returns it, the session that
/// started the container and its main process's stream. `None` (with the reason said) where
/// busybox-static is missing.
fn agent_with_sleeper(
    dir: &Path,
    id: &str,
) -> Option<(AgentProcess, AgentClient<UnixStream>, u32)> {
    let rootfs = busybox_rootfs(dir)?;
    let agent = AgentProcess::start(dir);
    let mut client = agent.connect();
    client
        .create(id, &spec(dir, &rootfs, &["sleep", "1000"]))
        .unwrap();
    let stream = client.start(id, None).unwrap();
    Some((agent, client, stream))
}

fn spec(dir: &Path, rootfs: &Path, args: &[&str]) -> ContainerSpec {
    let (upper, work) = (dir.join("upper"), dir.join("work"));
    std::fs::create_dir_all(&upper).unwrap();
    std::fs::create_dir_all(&work).unwrap();
    serde_json::from_value(serde_json::json!({
        "id": "ignored",
        "rootfs": {"overlay": {"lower": [rootfs], "upper": upper, "work": work}},
        "process": {"args": args, "env": ["PATH=/bin"]},
        "hostname": "agent-test",
    }))
    .unwrap()
}

#[test]
fn agent_runs_a_container_streams_its_output_and_returns_its_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let Some(rootfs) = busybox_rootfs(dir.path()) else {
        return;
    };
    let mut agent = AgentProcess::start(dir.path());
    let mut client = agent.connect();
    let script = "echo hi from $(hostname); echo oops >&2; echo x > /written; exit 3";
    client
        .create("c1", &spec(dir.path(), &rootfs, &["sh", "-c", script]))
        .unwrap();
    let stream = client.start("c1", None).unwrap();
    let mut out = Captured::default();
    let code = client.stream_until_exit(stream, &mut out).unwrap();
    assert_eq!(code, 3);
    assert_eq!(out.out(stream), "hi from agent-test\n");
    assert_eq!(out.err(stream), "oops\n");
    // Writes went to the overlay's upper directory, never to the image.
    assert!(!rootfs.join("written").exists());
    assert!(dir.path().join("upper/written").exists());

    // A container id that exists already, and a container that does not, are refused.
    let err = client
        .create("c1", &spec(dir.path(), &rootfs, &["true"]))
        .unwrap_err();
    assert_eq!(err.to_string(), "container c1 already exists");
    assert!(matches!(
        client.start("nope", None),
        Err(ClientError::Refused(_))
    ));

    client.shutdown().unwrap();
    let status = agent.child.wait().unwrap();
    assert!(status.success(), "agent exited with {status}");
    assert!(!agent.socket.exists(), "agent left its socket behind");
}

#[test]
fn agent_forwards_stdin_and_signals() {
    let dir = tempfile::tempdir().unwrap();
    let Some(rootfs) = busybox_rootfs(dir.path()) else {
        return;
    };
    let agent = AgentProcess::start(dir.path());
    let mut client = agent.connect();
    client
        .create("cat", &spec(dir.path(), &rootfs, &["cat"]))
        .unwrap();
    let stream = client.start("cat", None).unwrap();
    client.stdin(stream, b"echo me\n").unwrap();
    client.stdin(stream, b"").unwrap();
    let mut out = Captured::default();
    assert_eq!(client.stream_until_exit(stream, &mut out).unwrap(), 0);
    assert_eq!(out.out(stream), "echo me\n");

    let sleeper = dir.path().join("s");
    std::fs::create_dir_all(&sleeper).unwrap();
    client
        .create("sleep", &spec(&sleeper, &rootfs, &["sleep", "1000"]))
        .unwrap();
    let stream = client.start("sleep", None).unwrap();
    client.signal("sleep", stream, libc::SIGKILL).unwrap();
    let code = client
        .stream_until_exit(stream, &mut Captured::default())
        .unwrap();
    assert_eq!(code, 128 + libc::SIGKILL);
}

#[test]
fn agent_refuses_a_session_without_hello_or_with_another_version() {
    let dir = tempfile::tempdir().unwrap();
    let agent = AgentProcess::start(dir.path());
    for first in [Request::Shutdown, Request::Hello { version: 99 }] {
        let mut conn = UnixStream::connect(&agent.socket).unwrap();
        Frame::json(FrameKind::Request, &first)
            .unwrap()
            .write_to(&mut conn)
            .unwrap();
        let reply = Frame::read_from(&mut conn).unwrap();
        assert!(matches!(
            reply.parse::<Response>().unwrap(),
            Response::Error { .. }
        ));
        // ... and closes the session.
        let mut rest = Vec::new();
        conn.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
    }
}

#[test]
fn agent_execs_a_second_process_inside_the_running_container() {
    let dir = tempfile::tempdir().unwrap();
    let Some(rootfs) = busybox_rootfs(dir.path()) else {
        return;
    };
    let agent = AgentProcess::start(dir.path());
    let mut client = agent.connect();
    let main = "echo ready; read line; echo main got $line";
    client
        .create("web", &spec(dir.path(), &rootfs, &["sh", "-c", main]))
        .unwrap();
    let first = client.start("web", None).unwrap();

    // The exec'd process shares the container's hostname, root filesystem and PID namespace.
    let check =
        "echo $(hostname) $FOO; cat /proc/1/cmdline | tr '\\0' ' '; echo; cd /bin && pwd; exit 7";
    let stream = client
        .exec(
            "web",
            Process {
                args: vec!["sh".into(), "-c".into(), check.into()],
                env: vec!["FOO=bar".into()],
                cwd: "/".into(),
                ..Default::default()
            },
            false,
            None,
        )
        .unwrap();
    assert_ne!(stream, first);
    let mut out = Captured::default();
    assert_eq!(client.stream_until_exit(stream, &mut out).unwrap(), 7);
    let text = out.out(stream);
    assert!(text.contains("agent-test bar\n"), "{text}");
    assert!(
        text.contains("sh -c echo ready"),
        "exec did not see the container's PID 1: {text}"
    );
    assert!(text.ends_with("/bin\n"), "{text}");

    // A command that does not exist: 127, like a shell.
    let missing = client
        .exec(
            "web",
            Process {
                args: vec!["no-such-command".into()],
                env: vec!["PATH=/bin".into()],
                ..Default::default()
            },
            false,
            None,
        )
        .unwrap();
    let mut missing_out = Captured::default();
    assert_eq!(
        client.stream_until_exit(missing, &mut missing_out).unwrap(),
        127
    );
    assert_eq!(
        missing_out.err(missing),
        "mvm: no-such-command: executable file not found in the container\n"
    );

    // An exec'd process with stdin gets its input and then end-of-file (`mvm exec -i`).
    let cat = exec_cat(&mut client);
    client.stdin(cat, b"piped\n").unwrap();
    client.stdin(cat, b"").unwrap();
    // Without end-of-file cat would wait forever: fail instead.
    let conn = client.conn();
    conn.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    assert_eq!(client.stream_until_exit(cat, &mut out).unwrap(), 0);
    client.conn().set_read_timeout(None).unwrap();
    assert_eq!(out.out(cat), "piped\n");

    client.stdin(first, b"hello\n").unwrap();
    assert_eq!(client.stream_until_exit(first, &mut out).unwrap(), 0);
    assert_eq!(out.out(first), "ready\nmain got hello\n");

    // Exec into a container that has exited is refused.
    let err = client.exec(
        "web",
        Process {
            args: vec!["true".into()],
            ..Default::default()
        },
        false,
        None,
    );
    assert_eq!(err.unwrap_err().to_string(), "container web is not running");
}

#[test]
fn agent_serves_many_sessions_at_once_and_streams_large_output() {
    let dir = tempfile::tempdir().unwrap();
    let Some((agent, mut client, main)) = agent_with_sleeper(dir.path(), "web") else {
        return;
    };

    // Four clients exec at the same time, each in its own session, as `mvm exec` does.
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let socket = agent.socket.clone();
            std::thread::spawn(move || {
                for i in 0..20 {
                    let mut c = AgentClient::open(UnixStream::connect(&socket).unwrap()).unwrap();
                    let (args, want): (Vec<String>, i32) = if i % 2 == 0 {
                        (vec!["/no/such/command".into()], 127)
                    } else {
                        let script = format!("echo {w}-{i}; echo err >&2; exit {i}");
                        (vec!["sh".into(), "-c".into(), script], i)
                    };
                    let process = Process {
                        args,
                        env: vec!["PATH=/bin".into()],
                        ..Default::default()
                    };
                    let stream = c.exec("web", process, false, None).unwrap();
                    let mut out = Captured::default();
                    let code = c.stream_until_exit(stream, &mut out).unwrap();
                    assert_eq!(code, want, "worker {w} exec {i}");
                    if want != 127 {
                        assert_eq!(out.out(stream), format!("{w}-{i}\n"));
                        assert_eq!(out.err(stream), "err\n");
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }

    // 8 MiB of output, read slowly: the agent holds the process back instead of losing bytes.
    let big = client
        .exec(
            "web",
            Process {
                args: vec![
                    "sh".into(),
                    "-c".into(),
                    "i=0; while [ $i -lt 8192 ]; do printf '%01023d\\n' $i; i=$((i+1)); done"
                        .into(),
                ],
                env: vec!["PATH=/bin".into()],
                ..Default::default()
            },
            false,
            None,
        )
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let mut out = Captured::default();
    assert_eq!(client.stream_until_exit(big, &mut out).unwrap(), 0);
    let text = out.out(big);
    assert_eq!(text.len(), 8192 * 1024);
    assert!(text.ends_with(&format!("{:01023}\n", 8191)));

    // Stdin fed over a second connection that closes right after end-of-file, as `mvm exec -i`
    // does: every byte and the end-of-file reach the process.
    let cat = exec_cat(&mut client);
    let mut feeder = agent.connect();
    feeder.stdin(cat, b"from another session\n").unwrap();
    feeder.stdin(cat, b"").unwrap();
    drop(feeder);
    client
        .conn()
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    assert_eq!(client.stream_until_exit(cat, &mut out).unwrap(), 0);
    assert_eq!(out.out(cat), "from another session\n");

    client.signal("web", main, 9).unwrap();
    assert_eq!(client.stream_until_exit(main, &mut out).unwrap(), 137);
}

/// Reads the session's frames until process `stream` has shown `text`.
fn read_until(client: &mut AgentClient<UnixStream>, out: &mut Captured, stream: u32, text: &str) {
    client
        .conn()
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    while !out.out(stream).contains(text) {
        client
            .read_frame(out)
            .unwrap_or_else(|e| panic!("waiting for {text:?}: {e}; got {:?}", out.out(stream)));
    }
    client.conn().set_read_timeout(None).unwrap();
}

#[test]
fn agent_gives_processes_terminals_and_reports_copies_stats_and_processes() {
    let dir = tempfile::tempdir().unwrap();
    let Some(rootfs) = busybox_rootfs(dir.path()) else {
        return;
    };
    let agent = AgentProcess::start(dir.path());
    let mut client = agent.connect();
    // The first process on a terminal of its own: its output is the terminal's (CR LF).
    let mut first = spec(
        dir.path(),
        &rootfs,
        &["sh", "-c", "stty size; exec sleep 999"],
    );
    first.terminal = true;
    client.create("tty", &first).unwrap();
    let size = TermSize { rows: 33, cols: 91 };
    // Another session attaches to it, as `mvm attach` does, and sees what follows.
    let main = client.start("tty", Some(size)).unwrap();
    let mut watcher = agent.connect();
    watcher.attach("tty", main).unwrap();
    let mut out = Captured::default();
    read_until(&mut client, &mut out, main, "33 91\r\n");

    // exec -it: a terminal, resized, whose line discipline turns ^C into SIGINT for the
    // foreground process group (sleep and the shell that traps it).
    let script = "stty size; read line; echo got=$line; stty size; \
                  trap 'echo got-int; exit 3' INT; echo ready; sleep 1000";
    let sh = Process {
        args: vec!["sh".into(), "-c".into(), script.into()],
        env: vec!["PATH=/bin".into()],
        ..Default::default()
    };
    let tty = client.exec("tty", sh, true, Some(size)).unwrap();
    let mut input = agent.connect();
    read_until(&mut client, &mut out, tty, "33 91\r\n");
    input
        .resize("tty", tty, TermSize { rows: 10, cols: 20 })
        .unwrap();
    input.stdin(tty, b"hello\n").unwrap();
    read_until(&mut client, &mut out, tty, "got=hello\r\n10 20\r\n");
    read_until(&mut client, &mut out, tty, "ready\r\n");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !client
        .top("tty")
        .unwrap()
        .iter()
        .any(|p| p.command == "sleep 1000")
    {
        assert!(Instant::now() < deadline, "sleep never ran");
        std::thread::sleep(Duration::from_millis(50));
    }
    input.stdin(tty, b"\x03").unwrap();
    assert_eq!(client.stream_until_exit(tty, &mut out).unwrap(), 3);
    assert!(out.out(tty).ends_with("got-int\r\n"), "{:?}", out.out(tty));
    assert!(input.resize("tty", main + 100, size).is_err());

    // What the container uses, and its processes.
    let stats = client.stats("tty").unwrap();
    assert!(stats.pids >= 1 && stats.memory_total > 0, "{stats:?}");
    let top = client.top("tty").unwrap();
    assert!(top.iter().any(|p| p.command == "sleep 999"), "{top:?}");

    // A copy in, then out again: the archive crosses the protocol as stdin and stdout frames.
    let mut tar = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_mode(0o755);
    h.set_size(0);
    tar.append_data(&mut h, "box", std::io::empty()).unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o700);
    h.set_size(6);
    tar.append_data(&mut h, "box/run.sh", &b"exit 9"[..])
        .unwrap();
    let tar = tar.into_inner().unwrap();
    let s = client.copy_in("tty", "/srv", false).unwrap();
    client.stdin(s, &tar).unwrap();
    client.stdin(s, b"").unwrap();
    let mut copy = Captured::default();
    assert_eq!(
        client.stream_until_exit(s, &mut copy).unwrap(),
        0,
        "{}",
        copy.err(s)
    );
    let p = Process {
        args: vec!["sh".into(), "/srv/run.sh".into()],
        env: vec!["PATH=/bin".into()],
        ..Default::default()
    };
    let s = client.exec("tty", p, false, None).unwrap();
    assert_eq!(client.stream_until_exit(s, &mut out).unwrap(), 9);
    let s = client.copy_out("tty", "/srv", false).unwrap();
    assert_eq!(client.stream_until_exit(s, &mut copy).unwrap(), 0);
    let names: Vec<String> = tar::Archive::new(copy.out.get(&s).unwrap().as_slice())
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().display().to_string())
        .collect();
    assert_eq!(names, ["srv", "srv/run.sh"]);
    let s = client.copy_out("tty", "/nope", false).unwrap();
    assert_eq!(client.stream_until_exit(s, &mut copy).unwrap(), 1);
    assert_eq!(copy.err(s), "/nope: no such file or directory\n");

    client.signal("tty", main, 9).unwrap();
    assert_eq!(client.stream_until_exit(main, &mut out).unwrap(), 137);
    // The attached session hears the exit too, after the output it was there for.
    let mut seen = Captured::default();
    assert_eq!(watcher.stream_until_exit(main, &mut seen).unwrap(), 137);
}

/// Peak resident memory of process `pid`, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn agent_stops_reading_a_client_that_floods_a_process_that_never_reads() {
    let dir = tempfile::tempdir().unwrap();
    let Some((agent, mut client, stream)) = agent_with_sleeper(dir.path(), "sleep") else {
        return;
    };
    // Stdin frames of one byte each (the most frames, and work, per byte), written as fast as
    // the agent takes them until it stops taking any for 3 s.
    let mut frames = Vec::new();
    for _ in 0..4096 {
        let frame = Frame {
            kind: FrameKind::Stdin,
            stream,
            payload: vec![b'x'],
        };
        frame.encode_into(&mut frames).unwrap();
    }
    let mut raw = client.conn().try_clone().unwrap();
    raw.set_nonblocking(true).unwrap();
    let (mut sent, mut at, mut progress) = (0usize, 0usize, Instant::now());
    while progress.elapsed() < Duration::from_secs(3) && sent < 256 << 20 {
        match std::io::Write::write(&mut raw, &frames[at..]) {
            Ok(n) => {
                sent += n;
                at = (at + n) % frames.len();
                progress = Instant::now();
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("writing to the agent: {e}"),
        }
    }
    // What it takes: 1 MiB waiting for the process's stdin and the pipe's 64 KiB (ten bytes of
    // frames each, at one byte per frame), a frame's worth of received bytes and the socket's
    // buffers; never what the client goes on sending.
    assert!(
        sent < 16 << 20,
        "the agent took {sent} bytes for a process that reads none"
    );
    let peak = peak_rss_kib(agent.child.id());
    assert!(peak < 64 << 10, "the agent's peak memory: {peak} KiB");
    // It still serves: another session is answered, and the flooded process can be ended.
    let mut other = agent.connect();
    other.signal("sleep", stream, libc::SIGKILL).unwrap();
    raw.set_nonblocking(false).unwrap();
    drop(raw);
    // The flooding session still hears of the exit (and the agent removes the container's
    // cgroup, which a killed agent would leave).
    let code = client
        .stream_until_exit(stream, &mut Captured::default())
        .unwrap();
    assert_eq!(code, 128 + libc::SIGKILL);
    eprintln!("the agent took {sent} bytes of one-byte stdin frames; peak memory {peak} KiB");
}

#[test]
fn output_of_a_container_nobody_hears_waits_for_the_next_session() {
    // A VM restored from a snapshot of a running container: the session that started it is
    // gone and the new host attaches a moment later. What the container printed meanwhile is
    // not lost: it waits in its pipes until a session hears it.
    let dir = tempfile::tempdir().unwrap();
    let Some(rootfs) = busybox_rootfs(dir.path()) else {
        return;
    };
    let agent = AgentProcess::start(dir.path());
    let mut first = agent.connect();
    let script = "sleep 0.3; echo before; sleep 0.5; echo after; exit 4";
    first
        .create("c1", &spec(dir.path(), &rootfs, &["sh", "-c", script]))
        .unwrap();
    let stream = first.start("c1", None).unwrap();
    drop(first);
    // "before" is printed while no session is there.
    std::thread::sleep(Duration::from_millis(600));
    let mut second = agent.connect();
    second.attach("c1", stream).unwrap();
    let mut out = Captured::default();
    let code = second.stream_until_exit(stream, &mut out).unwrap();
    assert_eq!(code, 4);
    assert_eq!(out.out(stream), "before\nafter\n");
}
