use super::default::{self, ALLOWED, BY_CAPABILITY};
use super::*;

fn target(caps: CapSet) -> Target {
    Target {
        caps,
        kernel: (6, 1),
    }
}

#[test]
fn every_name_in_the_default_profile_is_an_x86_64_call() {
    let names = ALLOWED
        .iter()
        .chain(default::ARCH_X86_64)
        .chain(default::PTRACE_FROM_4_8)
        .chain(BY_CAPABILITY.iter().flat_map(|(_, n)| n.iter()));
    for n in names {
        assert!(syscall_number(n).is_some(), "{n}");
    }
    for (cap, _) in BY_CAPABILITY {
        assert!(caps::number(cap).is_some(), "{cap}");
    }
}

#[test]
fn default_profile_refuses_by_default_with_eperm() {
    let p = default::profile();
    assert_eq!(p.default_action, Action::Errno);
    assert_eq!(p.default_errno_ret, Some(1));
    // The calls docker needs capabilities for are not in the unconditional list.
    for n in [
        "mount", "unshare", "setns", "clone", "clone3", "bpf", "ptrace", "reboot",
    ] {
        assert!(!ALLOWED.contains(&n), "{n}");
    }
    // Those with argument rules or a capability are not in it either.
    for n in ["socket", "personality", "chroot", "kexec_load"] {
        assert!(!ALLOWED.contains(&n), "{n}");
    }
}

#[test]
fn default_profile_round_trips_through_dockers_json() {
    let p = default::profile();
    let json = serde_json::to_string(&p).expect("serialize");
    assert!(json.contains("\"defaultAction\":\"SCMP_ACT_ERRNO\""));
    assert_eq!(Profile::from_json(&json).expect("parse"), p);
}

#[test]
fn dockers_json_format_parses() {
    let text = r#"{
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": 1,
        "archMap": [{"architecture": "SCMP_ARCH_X86_64", "subArchitectures": ["SCMP_ARCH_X86"]}],
        "syscalls": [
            {"names": ["read", "write", "exit_group", "chown32"], "action": "SCMP_ACT_ALLOW",
             "args": [], "comment": "", "includes": {}, "excludes": {}},
            {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
             "args": [{"index": 0, "value": 8, "op": "SCMP_CMP_EQ"}]},
            {"names": ["clone"], "action": "SCMP_ACT_ALLOW",
             "args": [{"index": 0, "value": 2114060288, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}],
             "excludes": {"caps": ["CAP_SYS_ADMIN"]}},
            {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38},
            {"name": "ptrace", "action": "SCMP_ACT_ALLOW", "includes": {"minKernel": "4.8"}},
            {"names": ["kexec_load"], "action": "SCMP_ACT_KILL"}
        ]
    }"#;
    let p = Profile::from_json(text).expect("parses");
    assert_eq!(p.syscalls.len(), 6);
    assert_eq!(p.syscalls[2].args[0].op, Op::MaskedEqual);
    assert_eq!(p.syscalls[3].errno_ret, Some(38));
    assert_eq!(p.syscalls[4].name.as_deref(), Some("ptrace"));
    assert_eq!(p.syscalls[5].action, Action::KillThread);
    // Main filter, ERRNO(38) (clone3 and newer calls), KILL.
    let programs = p
        .compile(target(CapSet::docker_default()))
        .expect("compiles");
    assert_eq!(programs.len(), 3);
}

#[test]
fn bad_profiles_are_one_line_errors() {
    for bad in [
        "",
        "{",
        r#"{"syscalls": []}"#,
        r#"{"defaultAction": "SCMP_ACT_NOTIFY"}"#,
        r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscals": []}"#,
        r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["read"]}]}"#,
        r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ERRNO", "args": [{"index": 6, "value": 1, "op": "SCMP_CMP_EQ"}]}]}"#,
        r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ERRNO", "args": [{"index": 0, "value": 1, "op": "SCMP_CMP_LIKE"}]}]}"#,
        r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ERRNO", "includes": {"caps": ["CAP_WIZARD"]}}]}"#,
    ] {
        let e = Profile::from_json(bad).expect_err(bad);
        assert_eq!(e.to_string().lines().count(), 1, "{bad}: {e}");
    }
}

#[test]
fn includes_and_excludes_follow_caps_arch_and_kernel() {
    let rule = |includes: Filter, excludes: Filter| SyscallRule {
        includes,
        excludes,
        ..SyscallRule::new(vec!["mount".into()], Action::Allow)
    };
    let caps = |c: &[&str]| Filter {
        caps: c.iter().map(|s| s.to_string()).collect(),
        ..Filter::default()
    };
    let plain = target(CapSet::docker_default());
    let admin = target(CapSet::resolve(&["SYS_ADMIN".into()], &[]).expect("caps"));
    assert!(!applies(
        &rule(caps(&["CAP_SYS_ADMIN"]), Filter::default()),
        plain
    ));
    assert!(applies(
        &rule(caps(&["CAP_SYS_ADMIN"]), Filter::default()),
        admin
    ));
    assert!(applies(
        &rule(Filter::default(), caps(&["CAP_SYS_ADMIN"])),
        plain
    ));
    assert!(!applies(
        &rule(Filter::default(), caps(&["CAP_SYS_ADMIN"])),
        admin
    ));
    let arches = |a: &[&str]| Filter {
        arches: a.iter().map(|s| s.to_string()).collect(),
        ..Filter::default()
    };
    assert!(applies(
        &rule(arches(&["amd64", "x32"]), Filter::default()),
        plain
    ));
    assert!(!applies(
        &rule(arches(&["s390x"]), Filter::default()),
        plain
    ));
    assert!(!applies(
        &rule(Filter::default(), arches(&["amd64"])),
        plain
    ));
    let min = |v: &str| Filter {
        min_kernel: Some(v.into()),
        ..Filter::default()
    };
    assert!(applies(&rule(min("4.8"), Filter::default()), plain));
    assert!(!applies(&rule(min("6.10"), Filter::default()), plain));
    assert_eq!(parse_kernel("6.1.0-18-amd64"), Some((6, 1)));
    assert_eq!(parse_kernel("6.18.44-fc-v1272"), Some((6, 18)));
}

/// Forks, installs `programs` (with no_new_privs) in the child, runs `probe` there and returns
/// its exit code. The child only makes system calls.
fn in_child(programs: &[BpfProgram], probe: fn() -> i32) -> i32 {
    // SAFETY: the child only makes system calls on memory prepared before the fork.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork");
    if pid == 0 {
        // SAFETY: prctl with integer arguments.
        unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
        for p in programs {
            if install(p).is_err() {
                // SAFETY: ends the forked child.
                unsafe { libc::_exit(100) };
            }
        }
        let code = probe();
        // SAFETY: ends the forked child.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waits for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    assert!(libc::WIFEXITED(status), "child status {status:#x}");
    libc::WEXITSTATUS(status)
}

/// errno of a failed call, 0 when it worked.
fn errno_of(r: libc::c_long) -> i32 {
    if r < 0 {
        crate::runtime::namespaces::errno()
    } else {
        0
    }
}

fn probe_default() -> i32 {
    // SAFETY: plain system calls with integer or null arguments; anything they create belongs
    // to this short-lived child.
    unsafe {
        if errno_of(libc::syscall(libc::SYS_getpid)) != 0 {
            return 1;
        }
        if errno_of(libc::syscall(libc::SYS_unshare, libc::CLONE_NEWUSER)) != libc::EPERM {
            return 2;
        }
        if errno_of(libc::syscall(
            libc::SYS_socket,
            libc::AF_VSOCK,
            libc::SOCK_STREAM,
            0,
        )) != libc::EPERM
        {
            return 3;
        }
        let unix = libc::syscall(libc::SYS_socket, libc::AF_UNIX, libc::SOCK_STREAM, 0);
        if errno_of(unix) != 0 {
            return 4;
        }
        if errno_of(libc::syscall(libc::SYS_personality, 0xffff_ffff_u64)) != 0 {
            return 5;
        }
        if errno_of(libc::syscall(libc::SYS_personality, 0x4_0000_u64)) != libc::EPERM {
            return 6;
        }
        if errno_of(libc::syscall(libc::SYS_clone3, 0, 0)) != libc::ENOSYS {
            return 7;
        }
        let ns_clone = libc::CLONE_NEWUSER | libc::SIGCHLD;
        if errno_of(libc::syscall(libc::SYS_clone, ns_clone, 0, 0, 0, 0)) != libc::EPERM {
            return 8;
        }
        let mount = libc::syscall(libc::SYS_mount, 0, c"/".as_ptr(), 0, libc::MS_REMOUNT, 0);
        if errno_of(mount) != libc::EPERM {
            return 9;
        }
        // A number above every call the table knows: ENOSYS, for libc to fall back.
        if errno_of(libc::syscall(500)) != libc::ENOSYS {
            return 10;
        }
    }
    0
}

fn probe_admin() -> i32 {
    // SAFETY: unshare of a UTS namespace only affects this forked child.
    let r = unsafe { libc::syscall(libc::SYS_unshare, libc::CLONE_NEWUTS) };
    errno_of(r)
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn the_default_filter_refuses_what_docker_refuses() {
    let programs = default::profile()
        .compile(target(CapSet::docker_default()))
        .expect("compiles");
    assert_eq!(in_child(&programs, probe_default), 0);
}

#[test]
fn cap_sys_admin_lets_namespaces_through() {
    if !is_root() {
        eprintln!("skipping: unshare needs root");
        return;
    }
    let admin = CapSet::resolve(&["SYS_ADMIN".into()], &[]).expect("caps");
    let programs = default::profile().compile(target(admin)).expect("compiles");
    assert_eq!(in_child(&programs, probe_admin), 0);
    let plain = default::profile()
        .compile(target(CapSet::docker_default()))
        .expect("compiles");
    assert_eq!(in_child(&plain, probe_admin), libc::EPERM);
}

fn probe_deny_list() -> i32 {
    // SAFETY: getppid and uname-free calls only; mkdir of an impossible path fails either way.
    unsafe {
        if errno_of(libc::syscall(libc::SYS_getppid)) != 0 {
            return 1;
        }
        errno_of(libc::syscall(libc::SYS_getpid))
    }
}

#[test]
fn a_deny_list_profile_refuses_only_what_it_names() {
    let p = Profile::from_json(
        r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[
            {"names":["getpid"],"action":"SCMP_ACT_ERRNO","errnoRet":13}]}"#,
    )
    .expect("parses");
    let programs = p
        .compile(target(CapSet::docker_default()))
        .expect("compiles");
    assert_eq!(programs.len(), 1);
    assert_eq!(in_child(&programs, probe_deny_list), libc::EACCES);
}

#[test]
fn reachable_calls_follow_the_rules_of_the_compiled_filters() {
    let all = syscall_count();
    assert!(all > 300, "{all}");
    assert_eq!(Profile::default().reachable(target(CapSet(0))).len(), all);
    let docker = default::profile().reachable(target(CapSet::docker_default()));
    // Docker's allow-list, less what it gives only to CAP_SYS_ADMIN and friends.
    assert!(
        docker.contains(&"read") && docker.contains(&"clone"),
        "{docker:?}"
    );
    for refused in ["kexec_load", "bpf", "mount", "init_module", "reboot"] {
        assert!(!docker.contains(&refused), "{refused}");
    }
    let admin = default::profile().reachable(target(CapSet::all()));
    assert!(admin.contains(&"mount") && admin.contains(&"bpf"));
    assert!(docker.len() < admin.len() && admin.len() < all);
    // A refusal whatever the arguments wins over an allow; one with conditions does not.
    let p = Profile::from_json(
        r#"{"defaultAction":"SCMP_ACT_ERRNO","syscalls":[
            {"names":["read","write","getpid"],"action":"SCMP_ACT_ALLOW"},
            {"names":["write"],"action":"SCMP_ACT_KILL_PROCESS"},
            {"names":["getpid"],"action":"SCMP_ACT_ERRNO","args":[{"index":0,"value":1,"op":"SCMP_CMP_EQ"}]},
            {"names":["getppid"],"action":"SCMP_ACT_LOG"}]}"#,
    )
    .expect("parses");
    assert_eq!(
        p.reachable(target(CapSet(0))),
        ["getpid", "getppid", "read"]
    );
}
