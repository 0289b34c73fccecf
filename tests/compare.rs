//! `mvm compare` end to end: the busybox example as a plain process, a container and a microVM
//! (the Linux test kernel on a PVM host, mvm's own kernel on the emulated AMD-V host), one run
//! each, and the facts known without the probe: only the process sees host processes; the VM
//! runs the kernel it was given and not the host's; the memory limit holds in the container and
//! the VM; every mode runs the same probes and the process is allowed more than the container;
//! no host system call is direct from the VM. The HTML report of that run is rendered by a real
//! browser (headless chromium) and its bar charts found in the screenshot. One VM boot in all.
//!
//! Skips (saying why) without root, Debian's package lists (for the example image) or the
//! static guest agent; without /dev/kvm or a guest kernel only the VM column is left out.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

#[path = "common/browser.rs"]
mod browser;
mod common;
#[path = "common/registry.rs"]
mod registry_server;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use common::kernel::static_agent;
use common::vm::{boot_lock, text, traced_processes, vm_parts, TRACE_ENV};
use serde_json::Value;

const MVM: &str = env!("CARGO_BIN_EXE_mvm");

/// What one `mvm compare` printed and wrote, and what it left behind.
struct Compared {
    dir: PathBuf,
    json_file: PathBuf,
    json: Value,
    table: String,
    /// The guest kernel the VM ran, when it ran one.
    kernel: Option<PathBuf>,
    /// This run's marker processes still alive after it.
    markers: Vec<u32>,
    /// Entries the comparison may have made in the mvm root and not removed.
    leftovers: Vec<String>,
    /// Container records left in the mvm root.
    records: usize,
}

/// `mvm` under the test's root, traced, with the static agent.
fn mvm(root: &Path, agent: &Path) -> Command {
    let mut c = Command::new(MVM);
    c.arg("--root")
        .arg(root)
        .env(TRACE_ENV, root)
        .env("MVM_AGENT", agent);
    c
}

/// A fresh directory under the target's temporary directory.
fn scratch(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("compare-test")
        .join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A scratch directory, an mvm root with the busybox example loaded as `example/busybox`, and
/// the static agent. The root is a temporary directory under /tmp, which (unlike the target
/// directory) is a tmpfs in the emulated VT host, where a container's overlay can live.
fn busybox_root(name: &str) -> Option<(PathBuf, tempfile::TempDir, PathBuf)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipping: containers need root");
        return None;
    }
    let agent = match static_agent() {
        Ok(a) => a,
        Err(why) => {
            eprintln!("skipping: {why}");
            return None;
        }
    };
    let layout = registry_server::busybox_layout()?;
    let dir = scratch(name);
    let root = tempfile::tempdir().unwrap();
    let o = mvm(root.path(), &agent)
        .args(["load", "-i"])
        .arg(&layout)
        .args(["-t", "example/busybox"])
        .output()
        .unwrap();
    assert!(o.status.success(), "load: {}", text(&o.stderr));
    Some((dir, root, agent))
}

/// The one comparison of every mode this test binary runs.
fn compared() -> Option<&'static Compared> {
    static RUN: OnceLock<Option<Compared>> = OnceLock::new();
    RUN.get_or_init(|| {
        let (dir, root, agent) = busybox_root("modes")?;
        let root = root.path();
        let mut args: Vec<String> =
            vec!["compare".into(), "--image".into(), "example/busybox".into()];
        args.extend(["--runs".into(), "1".into(), "--mem".into(), "128M".into()]);
        let mut kernel = None;
        let _one = boot_lock();
        match vm_parts() {
            Ok(vm) => {
                args.extend(["--kernel".into(), vm.kernel.display().to_string()]);
                args.push(format!("--kernel-args={}", vm.kernel_args));
                kernel = Some(vm.kernel.clone());
            }
            Err(why) => {
                eprintln!("comparing without the VM: {why}");
                args.extend(["--isolation".into(), "process,container".into()]);
            }
        }
        let json_file = dir.join("comparison.json");
        args.extend(["--format".into(), "json".into(), "-o".into()]);
        args.push(json_file.display().to_string());
        let out = mvm(root, &agent).args(&args).output().unwrap();
        eprintln!("{}", text(&out.stderr));
        assert!(
            out.status.success(),
            "mvm compare failed: {}",
            text(&out.stderr)
        );
        let json: Value = serde_json::from_slice(&std::fs::read(&json_file).unwrap()).unwrap();
        Some(Compared {
            dir,
            json_file,
            json,
            table: text(&out.stdout),
            kernel,
            markers: traced_processes(root, "sleep"),
            leftovers: std::fs::read_dir(root)
                .unwrap()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("mvm-") || n == "compare")
                .collect(),
            records: std::fs::read_dir(root.join("containers")).unwrap().count(),
        })
    })
    .as_ref()
}

fn mode<'a>(c: &'a Compared, isolation: &str) -> Option<&'a Value> {
    c.json["modes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["isolation"] == isolation)
}

/// The release in a kernel image's banner (`Linux version 6.12.0 (...)`), read from the file.
fn banner_release(kernel: &Path) -> Option<String> {
    let data = std::fs::read(kernel).ok()?;
    let needle = b"Linux version ";
    let at = data.windows(needle.len()).position(|w| w == needle)? + needle.len();
    let end = data[at..].iter().position(|b| *b == b' ')?;
    Some(String::from_utf8_lossy(&data[at..at + end]).into_owned())
}

fn allowed(m: &Value) -> usize {
    m["probes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["result"] == "allowed")
        .count()
}

fn probe_names(m: &Value) -> Vec<String> {
    m["probes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn compare_measures_each_mode_side_by_side() {
    let Some(c) = compared() else { return };
    eprintln!("{}", c.table);
    let host_release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let host_release = host_release.trim();
    let p = mode(c, "process").unwrap();
    let k = mode(c, "container").unwrap();
    for m in [p, k] {
        assert_eq!(m["status"], "ok", "{}: {}", m["isolation"], m["reason"]);
        assert_eq!(m["kernel"], host_release);
        assert_eq!(m["shares_host_kernel"], true);
    }
    // Host processes: a plain process sees them, a container (own PID namespace) does not.
    assert_eq!(p["visible"]["host_processes"], true);
    assert_eq!(k["visible"]["host_processes"], false);
    // The memory limit: nothing stops a plain process; the container's cgroup does.
    assert_eq!(p["limits"]["memory"], "not-enforced");
    assert_eq!(
        k["limits"]["memory"], "enforced",
        "{}",
        k["limits"]["details"]
    );
    // The same probes everywhere, and more of them allowed for the process.
    let names = probe_names(p);
    assert!(names.len() >= 18, "{names:?}");
    let expected: Vec<String> = guest_agent::probe::escapes::NAMES
        .iter()
        .map(|n| n.to_string())
        .collect();
    assert_eq!(names, expected);
    assert_eq!(probe_names(k), names);
    assert!(
        allowed(p) > allowed(k),
        "process {} vs container {}",
        allowed(p),
        allowed(k)
    );
    // Attack surface: the container's filter lets through fewer calls than the host has.
    let (pd, kd) = (
        p["surface"]["host_syscalls_direct"].as_u64(),
        k["surface"]["host_syscalls_direct"].as_u64().unwrap(),
    );
    if p["surface"]["seccomp"] == "disabled" {
        assert!(pd.unwrap() > kd, "{pd:?} vs {kd}");
    }
    // Costs were measured: the hello line came out before the run ended.
    for m in [p, k] {
        let cost = &m["cost"];
        let (start, exit) = (
            cost["start_ms"].as_f64().unwrap(),
            cost["exit_ms"].as_f64().unwrap(),
        );
        assert!(start > 0.0 && start <= exit, "{cost}");
        assert!(cost["memory_overhead_kib"].as_u64().unwrap() > 0, "{cost}");
        assert!(
            m["output"].as_str().unwrap().starts_with("hello from "),
            "{m}"
        );
    }
    assert!(c.table.contains("ESCAPE PROBES"), "{}", c.table);

    if let Some(kernel) = &c.kernel {
        let v = mode(c, "vm").unwrap();
        assert_eq!(v["status"], "ok", "vm: {}", v["reason"]);
        // Its own kernel: the release of the image it booted, not the host's.
        let release = banner_release(kernel).expect("the guest kernel has a version banner");
        assert_eq!(v["kernel"], release.as_str());
        assert_eq!(v["shares_host_kernel"], false);
        assert_ne!(release, host_release);
        assert_eq!(v["visible"]["host_processes"], false);
        assert_eq!(
            v["limits"]["memory"], "enforced",
            "{}",
            v["limits"]["details"]
        );
        assert_eq!(probe_names(v), names);
        // Its workload's calls go to the guest kernel.
        assert_eq!(v["surface"]["host_syscalls_direct"], 0);
        assert!(c.table.contains("vm"), "{}", c.table);
    }

    // Nothing left behind: no marker process, no state entry, no work files, no records.
    assert_eq!(c.markers, Vec::<u32>::new());
    assert_eq!(c.leftovers, Vec::<String>::new());
    assert_eq!(c.records, 0, "every run was --rm");
}

#[test]
fn compare_html_report_renders_in_a_browser() {
    let Some(c) = compared() else { return };
    let Some(_) = browser::chromium() else { return };
    let page = c.dir.join("report.html");
    let out = Command::new(MVM)
        .args(["compare", "--format", "html", "--from"])
        .arg(&c.json_file)
        .arg("-o")
        .arg(&page)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let html = std::fs::read_to_string(&page).unwrap();
    // Self-contained: nothing is fetched from anywhere.
    for outside in [
        "http:", "https:", "src=", "href=", "url(", "@import", "<link",
    ] {
        assert!(!html.contains(outside), "the report refers to {outside}");
    }
    // The modes that ran (the others have no bars).
    let modes: Vec<&str> = c.json["modes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["status"] == "ok")
        .map(|m| m["isolation"].as_str().unwrap())
        .collect();

    // The browser parsed the table and one chart per cost.
    let scratch = scratch("browser");
    let dom = browser::dump_dom(&page, &scratch);
    assert_eq!(dom.matches("<svg").count(), 8, "one chart per cost");
    assert!(dom.contains("read-host-secret") && dom.contains("id=\"measurements\""));

    // And drew the bars: each mode's colour fills at least a bar's worth of pixels in the
    // screenshot (the charts are at the top of the page).
    let shot = browser::screenshot(&page, &scratch, 1280, 1000);
    assert_eq!((shot.width, shot.height), (1280, 1000));
    for m in modes {
        let color = match m {
            "process" => "#4e79a7",
            "container" => "#f28e2b",
            _ => "#59a14f",
        };
        let n = shot.count(browser::hex_color(color));
        assert!(n > 2000, "{m}'s bars ({color}) cover {n} pixels");
    }
    assert!(shot.count([255, 255, 255]) > 100_000, "a white page");
}

#[test]
fn compare_reports_a_mode_that_cannot_run_and_runs_the_others() {
    let Some((dir, root, agent)) = busybox_root("unavailable") else {
        return;
    };
    let out = mvm(root.path(), &agent)
        .args(["compare", "--image", "example/busybox", "--runs", "1"])
        .args(["--isolation", "process,vm", "--kernel"])
        .arg(dir.join("no-such-kernel"))
        .args(["--format", "json", "--", "echo", "from the workload"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        json["command"],
        serde_json::json!(["echo", "from the workload"])
    );
    let modes = json["modes"].as_array().unwrap();
    assert_eq!(modes[0]["isolation"], "process");
    assert_eq!(modes[0]["status"], "ok");
    assert_eq!(modes[0]["output"], "from the workload\n");
    assert_eq!(modes[0]["exit_code"], 0);
    assert_eq!(modes[1]["isolation"], "vm");
    assert_eq!(modes[1]["status"], "unavailable");
    let reason = modes[1]["reason"].as_str().unwrap();
    assert!(
        reason.contains("no-such-kernel") || reason.contains("/dev/kvm"),
        "{reason}"
    );
    assert!(modes[1]["probes"].as_array().unwrap().is_empty());
    assert!(modes[1]["cost"].is_null());
}

#[test]
fn compare_refuses_bad_flags_with_one_line() {
    for args in [
        &["compare", "--image", "x", "--runs", "0"][..],
        &["compare", "--image", "x", "--isolation", "vm,vm"],
        &["compare", "--image", "x", "--mem", "lots"],
        &["compare", "--isolation", "process"],
    ] {
        let dir = tempfile::tempdir().unwrap();
        let o: Output = Command::new(MVM)
            .arg("--root")
            .arg(dir.path())
            .args(args)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", text(&o.stderr));
        assert_eq!(
            text(&o.stderr).lines().count(),
            1,
            "{args:?}: {}",
            text(&o.stderr)
        );
    }
}
