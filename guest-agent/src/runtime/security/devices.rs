//! The devices a container may use, enforced by its cgroup: the v1 `devices` controller, or on
//! cgroup v2 a `BPF_PROG_TYPE_CGROUP_DEVICE` program attached to the container's cgroup (the
//! way runc and crun do it; the program is written here as instructions, it is that small).
//!
//! Creating any device node is allowed (as with docker: images and package scripts do it);
//! opening one is allowed only for the devices in [`ALLOWED`]. So even a root process with
//! CAP_MKNOD that creates a node for the host's disk gets EPERM when it opens it. Where the
//! kernel has neither (no `CONFIG_CGROUP_DEVICE`, no `CONFIG_CGROUP_BPF` / `CONFIG_BPF_SYSCALL`,
//! as the tests' guest kernel), the runtime says so in a debug line; every mount but /dev is then
//! still `nodev`.

use std::fmt::Write as _;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

/// Errors applying device rules.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// A v1 `devices.deny` / `devices.allow` file could not be written.
    #[error("cannot write the device rules to {0}")]
    Write(PathBuf, #[source] std::io::Error),
    /// This kernel cannot run cgroup device programs.
    #[error("this kernel has no cgroup device programs (CONFIG_BPF_SYSCALL, CONFIG_CGROUP_BPF)")]
    Unsupported(#[source] std::io::Error),
    /// Loading or attaching the device program failed.
    #[error("cannot {0} the cgroup device program")]
    Bpf(&'static str, #[source] std::io::Error),
}

/// Character or block device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Character device (`c`).
    Char,
    /// Block device (`b`).
    Block,
}

/// Create the node (mknod).
pub const MKNOD: u32 = 1;
/// Open it for reading.
pub const READ: u32 = 2;
/// Open it for writing.
pub const WRITE: u32 = 4;

/// One allowed device, or a class of them (`None`: any number).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    /// Character or block.
    pub kind: Kind,
    /// Major number.
    pub major: Option<u32>,
    /// Minor number.
    pub minor: Option<u32>,
    /// [`MKNOD`], [`READ`], [`WRITE`] combined.
    pub access: u32,
}

const fn dev(major: u32, minor: Option<u32>) -> Rule {
    Rule {
        kind: Kind::Char,
        major: Some(major),
        minor,
        access: MKNOD | READ | WRITE,
    }
}

/// What a container may do with devices.
pub const ALLOWED: [Rule; 11] = [
    // Any node may be created; the rules below decide which may be opened.
    Rule {
        kind: Kind::Char,
        major: None,
        minor: None,
        access: MKNOD,
    },
    Rule {
        kind: Kind::Block,
        major: None,
        minor: None,
        access: MKNOD,
    },
    dev(1, Some(3)), // /dev/null
    dev(1, Some(5)), // /dev/zero
    dev(1, Some(7)), // /dev/full
    dev(1, Some(8)), // /dev/random
    dev(1, Some(9)), // /dev/urandom
    dev(5, Some(0)), // /dev/tty
    dev(5, Some(1)), // /dev/console
    dev(5, Some(2)), // /dev/ptmx
    dev(136, None),  // /dev/pts/*
];

impl Rule {
    /// The rule as a line of the v1 `devices.allow` file, e.g. `c 1:3 rwm`.
    pub fn v1_line(&self) -> String {
        let mut s = String::new();
        s.push(match self.kind {
            Kind::Char => 'c',
            Kind::Block => 'b',
        });
        let num = |n: Option<u32>| n.map_or("*".to_string(), |n| n.to_string());
        let _ = write!(s, " {}:{} ", num(self.major), num(self.minor));
        for (bit, c) in [(READ, 'r'), (WRITE, 'w'), (MKNOD, 'm')] {
            if self.access & bit != 0 {
                s.push(c);
            }
        }
        s
    }

    /// Whether the rule allows `access` to device `kind major:minor`.
    pub fn allows(&self, kind: Kind, major: u32, minor: u32, access: u32) -> bool {
        self.kind == kind
            && self.major.is_none_or(|m| m == major)
            && self.minor.is_none_or(|m| m == minor)
            && access & !self.access == 0
    }
}

/// Whether [`ALLOWED`] lets a container do `access` on the device.
pub fn allowed(kind: Kind, major: u32, minor: u32, access: u32) -> bool {
    ALLOWED.iter().any(|r| r.allows(kind, major, minor, access))
}

/// Writes the rules into a v1 `devices` cgroup directory: deny all, then allow each rule.
pub fn apply_v1(dir: &Path) -> Result<(), DeviceError> {
    let write = |file: &str, line: &str| {
        let p = dir.join(file);
        std::fs::write(&p, line).map_err(|e| DeviceError::Write(p, e))
    };
    write("devices.deny", "a")?;
    for r in ALLOWED {
        write("devices.allow", &r.v1_line())?;
    }
    Ok(())
}

/// One eBPF instruction (`struct bpf_insn`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insn {
    code: u8,
    /// dst in the low four bits, src in the high four.
    regs: u8,
    off: i16,
    imm: i32,
}

// Opcodes (linux/bpf.h, linux/bpf_common.h).
const LDX_MEM_W: u8 = 0x61;
const ALU64_AND_K: u8 = 0x57;
const ALU64_RSH_K: u8 = 0x77;
const ALU64_MOV_K: u8 = 0xb7;
const ALU64_MOV_X: u8 = 0xbf;
const JMP_JNE_K: u8 = 0x55;
const JMP_EXIT: u8 = 0x95;

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: (src << 4) | (dst & 0x0f),
        off,
        imm,
    }
}

/// `struct bpf_cgroup_dev_ctx` type values.
const DEVCG_DEV_BLOCK: i32 = 1;
const DEVCG_DEV_CHAR: i32 = 2;

/// The device program for `rules`: 1 (allow) when a rule allows the access, else 0.
///
/// Registers: r1 the context (`access_type`, `major`, `minor`, u32 each), r2 the access bits
/// (`access_type >> 16`), r3 the device type (`access_type & 0xffff`), r4 major, r5 minor.
pub fn program(rules: &[Rule]) -> Vec<Insn> {
    let mut p = vec![
        insn(LDX_MEM_W, 2, 1, 0, 0),
        insn(ALU64_MOV_X, 3, 2, 0, 0),
        insn(ALU64_AND_K, 3, 0, 0, 0xffff),
        insn(ALU64_RSH_K, 2, 0, 0, 16),
        insn(LDX_MEM_W, 4, 1, 4, 0),
        insn(LDX_MEM_W, 5, 1, 8, 0),
    ];
    for r in rules {
        // Each jump goes to the next rule's block: its offset is filled in once the block's
        // length is known.
        let mut block: Vec<(Insn, bool)> = Vec::new();
        let kind = match r.kind {
            Kind::Char => DEVCG_DEV_CHAR,
            Kind::Block => DEVCG_DEV_BLOCK,
        };
        block.push((insn(JMP_JNE_K, 3, 0, 0, kind), true));
        if let Some(m) = r.major {
            block.push((
                insn(JMP_JNE_K, 4, 0, 0, i32::try_from(m).unwrap_or(-1)),
                true,
            ));
        }
        if let Some(m) = r.minor {
            block.push((
                insn(JMP_JNE_K, 5, 0, 0, i32::try_from(m).unwrap_or(-1)),
                true,
            ));
        }
        // Any access bit the rule does not grant: next rule.
        let denied = i32::try_from(!r.access & (MKNOD | READ | WRITE)).unwrap_or(7);
        block.push((insn(ALU64_MOV_X, 6, 2, 0, 0), false));
        block.push((insn(ALU64_AND_K, 6, 0, 0, denied), false));
        block.push((insn(JMP_JNE_K, 6, 0, 0, 0), true));
        block.push((insn(ALU64_MOV_K, 0, 0, 0, 1), false));
        block.push((insn(JMP_EXIT, 0, 0, 0, 0), false));
        let len = block.len();
        for (i, (mut ins, jump)) in block.into_iter().enumerate() {
            if jump {
                ins.off = i16::try_from(len - 1 - i).unwrap_or(0);
            }
            p.push(ins);
        }
    }
    p.push(insn(ALU64_MOV_K, 0, 0, 0, 0));
    p.push(insn(JMP_EXIT, 0, 0, 0, 0));
    p
}

// bpf(2) commands, program and attach types, flags.
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
const BPF_CGROUP_DEVICE: u32 = 6;
const BPF_F_ALLOW_MULTI: u32 = 2;

/// `union bpf_attr` as `BPF_PROG_LOAD` reads it (up to `expected_attach_type`).
#[repr(C)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// `union bpf_attr` as `BPF_PROG_ATTACH` reads it.
#[repr(C)]
struct ProgAttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    replace_bpf_fd: u32,
}

/// Calls bpf(2) with `attr`; returns the result (a new fd for loads).
///
/// # Safety
/// `T` must be the `bpf_attr` layout that `cmd` reads, with every pointer in it valid for the
/// call.
unsafe fn bpf<T>(cmd: libc::c_long, attr: &T) -> std::io::Result<libc::c_long> {
    let size = libc::c_uint::try_from(std::mem::size_of::<T>()).unwrap_or(0);
    // SAFETY: the caller guarantees `attr` is what `cmd` expects; the kernel reads `size` bytes.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_ref(attr), size) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(r)
}

/// Loads the program for [`ALLOWED`] and attaches it to the v2 cgroup directory `dir`.
pub fn attach_v2(dir: &Path) -> Result<(), DeviceError> {
    let insns = program(&ALLOWED);
    let license = c"Apache-2.0";
    let mut name = [0u8; 16];
    name[..9].copy_from_slice(b"mvm_devcg");
    let load = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_CGROUP_DEVICE,
        insn_cnt: u32::try_from(insns.len()).unwrap_or(u32::MAX),
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 0,
        log_size: 0,
        log_buf: 0,
        kern_version: 0,
        prog_flags: 0,
        prog_name: name,
        prog_ifindex: 0,
        expected_attach_type: 0,
    };
    // SAFETY: `load` is BPF_PROG_LOAD's layout; `insns` and `license` outlive the call.
    let fd = match unsafe { bpf(BPF_PROG_LOAD, &load) } {
        Ok(fd) => fd,
        Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
            return Err(DeviceError::Unsupported(e))
        }
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            // A kernel without CONFIG_CGROUP_BPF does not know the program type.
            return Err(DeviceError::Unsupported(e));
        }
        Err(e) => return Err(DeviceError::Bpf("load", e)),
    };
    let fd = i32::try_from(fd)
        .map_err(|_| DeviceError::Bpf("load", std::io::Error::from_raw_os_error(libc::EBADF)))?;
    // SAFETY: the kernel just returned this new descriptor; nothing else owns it.
    let prog = unsafe { OwnedFd::from_raw_fd(fd) };
    let cgroup = std::fs::File::open(dir).map_err(|e| DeviceError::Bpf("attach", e))?;
    let attach = ProgAttachAttr {
        target_fd: u32::try_from(cgroup.as_raw_fd()).unwrap_or(u32::MAX),
        attach_bpf_fd: u32::try_from(prog.as_raw_fd()).unwrap_or(u32::MAX),
        attach_type: BPF_CGROUP_DEVICE,
        attach_flags: BPF_F_ALLOW_MULTI,
        replace_bpf_fd: 0,
    };
    // SAFETY: `attach` is BPF_PROG_ATTACH's layout and holds only descriptors.
    unsafe { bpf(BPF_PROG_ATTACH, &attach) }.map_err(|e| DeviceError::Bpf("attach", e))?;
    // The attachment keeps the program alive for as long as the cgroup exists.
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a device program the way the kernel would, for the instructions [`program`] uses.
    fn run(p: &[Insn], kind: Kind, major: u32, minor: u32, access: u32) -> u64 {
        let t = match kind {
            Kind::Char => DEVCG_DEV_CHAR,
            Kind::Block => DEVCG_DEV_BLOCK,
        };
        let ctx = [
            (access << 16) | u32::try_from(t).expect("type"),
            major,
            minor,
        ];
        let mut r = [0u64; 11];
        let mut pc = 0usize;
        loop {
            let i = p[pc];
            let (dst, src) = (usize::from(i.regs & 0x0f), usize::from(i.regs >> 4));
            let imm = u64::from(i.imm.cast_unsigned());
            pc += 1;
            match i.code {
                LDX_MEM_W => {
                    assert_eq!(src, 1, "loads only from the context");
                    let off = usize::try_from(i.off).expect("offset") / 4;
                    r[dst] = u64::from(ctx[off]);
                }
                ALU64_MOV_X => r[dst] = r[src],
                ALU64_MOV_K => r[dst] = imm,
                ALU64_AND_K => r[dst] &= imm,
                ALU64_RSH_K => r[dst] >>= imm,
                JMP_JNE_K => {
                    if r[dst] != imm {
                        pc += usize::try_from(i.off).expect("forward jump");
                    }
                }
                JMP_EXIT => return r[0],
                other => panic!("unexpected opcode {other:#x}"),
            }
        }
    }

    #[test]
    fn the_allow_list_opens_only_the_usual_devices() {
        for (major, minor) in [
            (1, 3),
            (1, 5),
            (1, 7),
            (1, 8),
            (1, 9),
            (5, 0),
            (5, 1),
            (5, 2),
        ] {
            assert!(
                allowed(Kind::Char, major, minor, READ | WRITE),
                "{major}:{minor}"
            );
        }
        assert!(allowed(Kind::Char, 136, 7, READ | WRITE));
        // The host's disk, memory, kvm, a tap device: never opened.
        assert!(!allowed(Kind::Block, 254, 0, READ));
        assert!(!allowed(Kind::Block, 8, 0, WRITE));
        assert!(!allowed(Kind::Char, 1, 1, READ));
        assert!(!allowed(Kind::Char, 10, 232, READ | WRITE));
        assert!(!allowed(Kind::Char, 10, 200, READ));
        // Creating nodes is allowed, as with docker.
        assert!(allowed(Kind::Block, 254, 0, MKNOD));
    }

    #[test]
    fn v1_lines_use_the_devices_controller_format() {
        let lines: Vec<String> = ALLOWED.iter().map(Rule::v1_line).collect();
        assert_eq!(lines[0], "c *:* m");
        assert_eq!(lines[1], "b *:* m");
        assert!(lines.contains(&"c 1:3 rwm".to_string()));
        assert!(lines.contains(&"c 136:* rwm".to_string()));
    }

    #[test]
    fn the_device_program_agrees_with_the_allow_list() {
        let p = program(&ALLOWED);
        for kind in [Kind::Char, Kind::Block] {
            for (major, minor) in [
                (1, 3),
                (1, 9),
                (1, 1),
                (5, 0),
                (5, 2),
                (136, 0),
                (136, 99),
                (254, 0),
                (8, 1),
                (10, 200),
            ] {
                for access in 1..8 {
                    let want = u64::from(allowed(kind, major, minor, access));
                    assert_eq!(
                        run(&p, kind, major, minor, access),
                        want,
                        "{kind:?} {major}:{minor} access {access}"
                    );
                }
            }
        }
    }

    /// The block device holding `/`, found in /dev.
    fn root_disk() -> Option<PathBuf> {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let want = std::fs::metadata("/").ok()?.dev();
        std::fs::read_dir("/dev").ok()?.flatten().find_map(|e| {
            let m = e.metadata().ok()?;
            (m.file_type().is_block_device() && m.rdev() == want).then(|| e.path())
        })
    }

    #[test]
    fn an_attached_program_refuses_the_hosts_disk() {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let v2 = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
            .iter()
            .map(Path::new)
            .find(|p| p.join("cgroup.procs").exists() && p.join("cgroup.subtree_control").exists());
        let (Some(v2), Some(disk), true) = (v2, root_disk(), root) else {
            eprintln!("skipping: needs root, a cgroup v2 hierarchy and the root disk in /dev");
            return;
        };
        let dir = v2.join(format!("mvm-devtest-{}", std::process::id()));
        std::fs::create_dir(&dir).expect("create cgroup");
        let attached = attach_v2(&dir);
        let script = format!(
            "echo $$ > {}/cgroup.procs && head -c 1 /dev/zero >/dev/null && echo zero-ok; \
             head -c 1 {} >/dev/null 2>&1 || echo disk-refused",
            dir.display(),
            disk.display()
        );
        let out = std::process::Command::new("sh")
            .args(["-c", &script])
            .output();
        let _ = std::fs::remove_dir(&dir);
        match attached {
            Err(DeviceError::Unsupported(e)) => {
                eprintln!("skipping: {e}");
                return;
            }
            r => r.expect("attach"),
        }
        let out = String::from_utf8_lossy(&out.expect("sh").stdout).into_owned();
        assert_eq!(out, "zero-ok\ndisk-refused\n");
    }
}
