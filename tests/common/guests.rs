//! The freestanding test guests in `tests/guests/`: building them, running `mvm boot` on them with
//! a deadline, and reading their serial report (`mvm-test-guest: ...` lines).

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

/// Prefix of every line a test guest prints.
pub const PREFIX: &str = "mvm-test-guest: ";

/// Builds guest `name` (`tests/guests/NAME.rs`) once per test process into
/// `<target>/test-guests/NAME.elf` and returns its path. Panics with rustc's output if the build
/// fails: a guest that does not build is a failed test, never a skipped one.
pub fn test_guest(name: &str) -> PathBuf {
    static BUILT: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    let built = BUILT.get_or_init(|| Mutex::new(HashMap::new()));
    let mut built = built.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = built.get(name) {
        return p.clone();
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf();
    // CARGO_TARGET_TMPDIR is <target>/tmp; the guests go next to it.
    let outdir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target dir")
        .join("test-guests");
    let out = Command::new(root.join("tests/guests/build.sh"))
        .arg(name)
        .arg(&outdir)
        .output()
        .expect("run tests/guests/build.sh");
    assert!(
        out.status.success(),
        "building test guest {name} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert!(path.is_file(), "build.sh printed {path:?}, not a file");
    built.insert(name.to_string(), path.clone());
    path
}

/// What one `mvm` process did.
#[derive(Debug)]
pub struct Finished {
    /// Exit code (None: killed by a signal).
    pub code: Option<i32>,
    /// Everything on stdout (the guest's serial console unless --serial-out).
    pub stdout: String,
    /// Everything on stderr.
    pub stderr: String,
}

impl Finished {
    /// The guest's report read from stdout.
    pub fn report(&self) -> GuestReport {
        GuestReport::parse(&self.stdout)
    }

    /// Both outputs, for assertion messages.
    pub fn dump(&self) -> String {
        format!(
            "exit code {:?}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Runs `mvm ARGS` (stdin closed) and waits at most `deadline`; on overrun the process is
/// killed and the test fails with what it printed.
pub fn run_mvm(args: &[&str], deadline: Duration) -> Finished {
    let child = Command::new(super::MVM)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start mvm");
    wait_with_deadline(child, deadline, &format!("mvm {}", args.join(" ")))
}

/// Waits for `child` (stdout and stderr piped) at most `deadline`; kills it and panics on overrun.
pub fn wait_with_deadline(mut child: Child, deadline: Duration, what: &str) -> Finished {
    let mut out_pipe = child.stdout.take().expect("stdout piped");
    let mut err_pipe = child.stderr.take().expect("stderr piped");
    let out_reader = thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out_pipe.read_to_end(&mut s);
        s
    });
    let err_reader = thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err_pipe.read_to_end(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for mvm") {
            break Some(status);
        }
        if start.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(5));
    };
    let finished = Finished {
        code: status.and_then(|s| s.code()),
        stdout: String::from_utf8_lossy(&out_reader.join().unwrap_or_default()).into_owned(),
        stderr: String::from_utf8_lossy(&err_reader.join().unwrap_or_default()).into_owned(),
    };
    assert!(
        status.is_some(),
        "{what} still ran after {deadline:?}; killed it.\n{}",
        finished.dump()
    );
    finished
}

/// One e820 entry as the guest saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820 {
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// e820 type (1 = RAM).
    pub kind: u32,
}

/// The boot guest's report, parsed from its serial lines.
#[derive(Debug, Default)]
pub struct GuestReport {
    /// Entry path (`linux` or `pvh`), from the `hello` line.
    pub entry: Option<String>,
    /// CPU mode from the `hello` line (`64-bit`).
    pub mode: Option<String>,
    /// The command line, with non-printable bytes as `\xNN`.
    pub cmdline: Option<String>,
    /// Memory map entries in order.
    pub e820: Vec<E820>,
    /// Total RAM the guest counted.
    pub ram_bytes: Option<u64>,
    /// Initrd as (address, size, FNV-1a 32 of its bytes); `Some(None)` for "initrd none".
    pub initrd: Option<Option<(u64, u64, u32)>>,
    /// Processor count in the MP table; `Some(None)` for "mp-table none".
    pub mp_cpus: Option<Option<u64>>,
    /// CPUs running (BSP + APs that checked in) and CPUs expected.
    pub cpus_started: Option<(u64, u64)>,
    /// The guest finished its report.
    pub done: bool,
    /// The guest asked for a reset.
    pub reset: bool,
    /// `error ...` lines the guest printed.
    pub errors: Vec<String>,
}

/// Value of `key=` in a line of space-separated fields.
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split(' ')
        .find_map(|f| f.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
}

/// Parses a number written as decimal or `0x` hexadecimal.
pub fn number(text: &str) -> Option<u64> {
    match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

impl GuestReport {
    /// Reads every `mvm-test-guest: ` line in `serial`, ignoring anything else.
    pub fn parse(serial: &str) -> GuestReport {
        let mut r = GuestReport::default();
        for raw in serial.lines() {
            let Some(line) = raw.trim_end_matches('\r').strip_prefix(PREFIX) else {
                continue;
            };
            let (topic, _) = line.split_once(' ').unwrap_or((line, ""));
            let num = |key| field(line, key).and_then(number);
            match topic {
                "hello" => {
                    r.entry = field(line, "entry").map(str::to_string);
                    r.mode = field(line, "mode").map(str::to_string);
                }
                _ if line.starts_with("cmdline=\"") && line.ends_with('"') => {
                    r.cmdline = Some(line["cmdline=\"".len()..line.len() - 1].to_string());
                }
                "e820" => {
                    if let (Some(addr), Some(size), Some(kind)) =
                        (num("addr"), num("size"), num("type"))
                    {
                        let kind = u32::try_from(kind).unwrap_or(u32::MAX);
                        r.e820.push(E820 { addr, size, kind });
                    }
                }
                "ram" => r.ram_bytes = num("bytes"),
                "initrd" if line == "initrd none" => r.initrd = Some(None),
                "initrd" => {
                    if let (Some(a), Some(s), Some(h)) = (num("addr"), num("size"), num("fnv1a")) {
                        r.initrd = Some(Some((a, s, u32::try_from(h).unwrap_or(0))));
                    }
                }
                "mp-table" if line == "mp-table none" => r.mp_cpus = Some(None),
                "mp-table" => r.mp_cpus = Some(num("cpus")),
                "cpus" => {
                    if let (Some(s), Some(e)) = (num("started"), num("expected")) {
                        r.cpus_started = Some((s, e));
                    }
                }
                "done" => r.done = true,
                "reset" => r.reset = true,
                "error" => r.errors.push(line.to_string()),
                _ => {}
            }
        }
        r
    }

    /// RAM (type 1) entries of the memory map.
    pub fn ram_regions(&self) -> impl Iterator<Item = &E820> {
        self.e820.iter().filter(|e| e.kind == 1)
    }
}

/// FNV-1a (32-bit), as the boot guest computes it over the initrd.
pub fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5u32, |h, &b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}
