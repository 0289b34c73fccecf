//! Seccomp: profiles in docker's JSON format, docker's default profile ([`default`]), and their
//! translation into BPF programs with rust-vmm's `seccompiler`.
//!
//! A profile is a default action and a list of rules (system call names, an action, argument
//! conditions, and `includes` / `excludes` that select a rule by the container's capabilities,
//! the architecture or the kernel version). `seccompiler` gives each filter one action on a match,
//! so a profile becomes a short stack of filters, installed in this order:
//!
//! 1. the default action for every call that no rule names (rules of any action count as
//!    naming it), `ALLOW` for the others;
//! 2. one filter per other action (`ERRNO(38)`, `KILL`, `LOG`, ...): that action for the calls
//!    its rules match, `ALLOW` for the rest.
//!
//! The kernel runs every filter and keeps the most severe answer (KILL > TRAP > ERRNO > TRACE >
//! LOG > ALLOW; between two ERRNOs, the filter installed last). So a call that a rule allows and
//! another rule refuses is refused. System call numbers above the newest in the table get ENOSYS,
//! so that libc falls back to the older calls it knows (as runc does).

pub mod default;

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use serde::{Deserialize, Deserializer, Serialize};

use super::caps::{self, CapSet};

/// Errors reading or compiling a seccomp profile.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The text is not a profile in docker's format.
    #[error("not a docker seccomp profile: {0}")]
    Json(String),
    /// An argument condition names an argument past the sixth.
    #[error("seccomp profile: argument index {0} is out of range (0-5)")]
    ArgIndex(u32),
    /// A capability in `includes` / `excludes` is unknown.
    #[error("seccomp profile: {0}")]
    Capability(#[from] caps::CapError),
    /// `seccompiler` refused the filter.
    #[error("seccomp profile cannot be compiled")]
    Compile(#[source] seccompiler::BackendError),
}

/// What the kernel does with a matching call (docker's `SCMP_ACT_*` names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Action {
    /// Let the call through.
    #[serde(rename = "SCMP_ACT_ALLOW")]
    Allow,
    /// Fail the call with `errnoRet` (EPERM when not given).
    #[serde(rename = "SCMP_ACT_ERRNO")]
    Errno,
    /// Kill the calling thread.
    #[serde(rename = "SCMP_ACT_KILL", alias = "SCMP_ACT_KILL_THREAD")]
    KillThread,
    /// Kill the whole process.
    #[serde(rename = "SCMP_ACT_KILL_PROCESS")]
    KillProcess,
    /// Send SIGSYS.
    #[serde(rename = "SCMP_ACT_TRAP")]
    Trap,
    /// Let the call through and log it.
    #[serde(rename = "SCMP_ACT_LOG")]
    Log,
    /// Notify a tracer (with `errnoRet` as the message).
    #[serde(rename = "SCMP_ACT_TRACE")]
    Trace,
}

/// How an argument is compared (docker's `SCMP_CMP_*` names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// `arg != value`.
    #[serde(rename = "SCMP_CMP_NE")]
    NotEqual,
    /// `arg < value`.
    #[serde(rename = "SCMP_CMP_LT")]
    Less,
    /// `arg <= value`.
    #[serde(rename = "SCMP_CMP_LE")]
    LessOrEqual,
    /// `arg == value`.
    #[serde(rename = "SCMP_CMP_EQ")]
    Equal,
    /// `arg >= value`.
    #[serde(rename = "SCMP_CMP_GE")]
    GreaterOrEqual,
    /// `arg > value`.
    #[serde(rename = "SCMP_CMP_GT")]
    Greater,
    /// `arg & value == valueTwo`.
    #[serde(rename = "SCMP_CMP_MASKED_EQ")]
    MaskedEqual,
}

/// A condition on one argument of a call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Arg {
    /// Which argument, 0-5.
    pub index: u32,
    /// The value compared with (the mask for `SCMP_CMP_MASKED_EQ`).
    pub value: u64,
    /// The value the masked argument must equal (`SCMP_CMP_MASKED_EQ` only).
    #[serde(default)]
    pub value_two: u64,
    /// The comparison.
    pub op: Op,
}

impl Arg {
    /// A condition `arg[index] OP value`.
    pub fn new(index: u32, value: u64, op: Op) -> Arg {
        Arg {
            index,
            value,
            value_two: 0,
            op,
        }
    }
}

/// Selects a rule by the container: all of `caps` held (for `includes`) or any held (for
/// `excludes`), the architecture among `arches`, the kernel at least `minKernel`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Filter {
    /// Capabilities (`CAP_SYS_ADMIN`, ...).
    #[serde(default, deserialize_with = "null_is_empty")]
    pub caps: Vec<String>,
    /// Architectures in docker's (Go's) names: `amd64`, `x32`, `386`, `arm64`, ...
    #[serde(default, deserialize_with = "null_is_empty")]
    pub arches: Vec<String>,
    /// Kernel version such as `4.8`.
    #[serde(default)]
    pub min_kernel: Option<String>,
}

impl Filter {
    fn is_empty(&self) -> bool {
        self.caps.is_empty() && self.arches.is_empty() && self.min_kernel.is_none()
    }
}

/// One rule of a profile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SyscallRule {
    /// System call names. Names this architecture does not have are skipped.
    #[serde(default, deserialize_with = "null_is_empty")]
    pub names: Vec<String>,
    /// One name (docker's older format).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// What to do when the call (and every condition in `args`) matches.
    pub action: Action,
    /// The errno for `SCMP_ACT_ERRNO` (default EPERM), the message for `SCMP_ACT_TRACE`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errno_ret: Option<u32>,
    /// Conditions on the arguments, all of which must hold.
    #[serde(default, deserialize_with = "null_is_empty")]
    pub args: Vec<Arg>,
    /// Free text.
    #[serde(default, skip_serializing)]
    pub comment: Option<String>,
    /// The rule applies only to containers that match this.
    #[serde(default, skip_serializing_if = "Filter::is_empty")]
    pub includes: Filter,
    /// The rule does not apply to containers that match this.
    #[serde(default, skip_serializing_if = "Filter::is_empty")]
    pub excludes: Filter,
}

impl SyscallRule {
    /// A rule for `names` without conditions.
    pub fn new(names: Vec<String>, action: Action) -> SyscallRule {
        SyscallRule {
            names,
            name: None,
            action,
            errno_ret: None,
            args: Vec::new(),
            comment: None,
            includes: Filter::default(),
            excludes: Filter::default(),
        }
    }
}

/// A seccomp profile in docker's JSON format (the fields docker's own profiles use).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Profile {
    /// What happens to calls no rule matches.
    pub default_action: Action,
    /// The errno of a default `SCMP_ACT_ERRNO` (EPERM when not given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_errno_ret: Option<u32>,
    /// Accepted for compatibility; the filter is always for x86_64.
    #[serde(default, skip_serializing)]
    pub architectures: Option<serde_json::Value>,
    /// Accepted for compatibility; the filter is always for x86_64.
    #[serde(default, skip_serializing)]
    pub arch_map: Option<serde_json::Value>,
    /// Accepted for compatibility (seccomp filter flags are not set).
    #[serde(default, skip_serializing)]
    pub flags: Option<serde_json::Value>,
    /// The rules.
    #[serde(default, deserialize_with = "null_is_empty")]
    pub syscalls: Vec<SyscallRule>,
}

impl Default for Profile {
    /// A profile that allows everything.
    fn default() -> Self {
        Profile {
            default_action: Action::Allow,
            default_errno_ret: None,
            architectures: None,
            arch_map: None,
            flags: None,
            syscalls: Vec::new(),
        }
    }
}

fn null_is_empty<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Ok(Option::<Vec<T>>::deserialize(d)?.unwrap_or_default())
}

/// The architecture names (docker's, libseccomp's) that mean this filter's x86_64.
const OUR_ARCHES: [&str; 3] = ["amd64", "x86_64", "SCMP_ARCH_X86_64"];

/// Highest system call number the filters let newer calls fail with ENOSYS up to.
const NEWER_SYSCALLS_END: i64 = 511;

/// What the container looks like to `includes` / `excludes`.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    /// The capabilities every process of the container has in its bounding set.
    pub caps: CapSet,
    /// The running kernel's (major, minor) version.
    pub kernel: (u32, u32),
}

impl Profile {
    /// Parses a profile from docker's JSON format. The error is one line.
    pub fn from_json(text: &str) -> Result<Profile, SeccompError> {
        let p: Profile =
            serde_json::from_str(text).map_err(|e| SeccompError::Json(e.to_string()))?;
        p.check()?;
        Ok(p)
    }

    /// Checks what the JSON types cannot: argument indexes and capability names.
    pub fn check(&self) -> Result<(), SeccompError> {
        for r in &self.syscalls {
            if let Some(a) = r.args.iter().find(|a| a.index > 5) {
                return Err(SeccompError::ArgIndex(a.index));
            }
            for c in r.includes.caps.iter().chain(&r.excludes.caps) {
                caps::parse_name(c)?;
            }
        }
        Ok(())
    }

    /// Compiles the profile for a container into the BPF programs to install, in order.
    pub fn compile(&self, target: Target) -> Result<Vec<BpfProgram>, SeccompError> {
        self.check()?;
        let default = action(self.default_action, self.default_errno_ret);
        // Rules by action, in the order their action first appears.
        let mut by_action: Vec<(SeccompAction, Calls)> = Vec::new();
        let mut named = Calls::default();
        for rule in &self.syscalls {
            if !applies(rule, target) {
                continue;
            }
            let act = action(rule.action, rule.errno_ret);
            if act == default {
                continue;
            }
            let conditions = rule
                .args
                .iter()
                .map(condition)
                .collect::<Result<Vec<_>, _>>()?;
            let slot = match by_action.iter().position(|(a, _)| *a == act) {
                Some(i) => i,
                None => {
                    by_action.push((act.clone(), Calls::default()));
                    by_action.len() - 1
                }
            };
            for name in rule.names.iter().chain(&rule.name) {
                let Some(nr) = syscall_number(name) else {
                    log::debug!("seccomp: no system call {name} on x86_64; rule skipped");
                    continue;
                };
                by_action[slot].1.add(nr, &conditions)?;
                if act != SeccompAction::Allow {
                    named.add(nr, &conditions)?;
                }
            }
        }
        if default != SeccompAction::Allow {
            // Calls newer than the table: ENOSYS, so that libc falls back to older ones.
            let newest = syscall_table::newest();
            let enosys = SeccompAction::Errno(38);
            let slot = match by_action.iter().position(|(a, _)| *a == enosys) {
                Some(i) => i,
                None => {
                    by_action.push((enosys, Calls::default()));
                    by_action.len() - 1
                }
            };
            for nr in newest + 1..=NEWER_SYSCALLS_END {
                by_action[slot].1.add(nr, &[])?;
                named.add(nr, &[])?;
            }
        }
        let mut programs = Vec::new();
        if default != SeccompAction::Allow {
            let mut first = by_action
                .iter()
                .find(|(a, _)| *a == SeccompAction::Allow)
                .map(|(_, c)| c.clone())
                .unwrap_or_default();
            first.merge(named)?;
            programs.push(program(first, default.clone(), SeccompAction::Allow)?);
        }
        for (act, calls) in by_action {
            if act != SeccompAction::Allow {
                programs.push(program(calls, SeccompAction::Allow, act)?);
            }
        }
        Ok(programs)
    }
}

impl Profile {
    /// The x86_64 system calls a container with `target` can make through the filters of
    /// [`Profile::compile`] with at least some arguments, sorted by name: those the kernel then
    /// serves directly. A call is out when no rule names it and the default action refuses it,
    /// or when a rule refuses it whatever its arguments (`SCMP_ACT_LOG` lets a call through).
    pub fn reachable(&self, target: Target) -> Vec<&'static str> {
        let default = action(self.default_action, self.default_errno_ret);
        let lets_through =
            |a: &SeccompAction| matches!(a, SeccompAction::Allow | SeccompAction::Log);
        // Per call: whether a rule names it, and whether one refuses it unconditionally.
        let mut named: BTreeMap<&str, bool> = BTreeMap::new();
        for rule in self.syscalls.iter().filter(|r| applies(r, target)) {
            let act = action(rule.action, rule.errno_ret);
            if act == default {
                continue;
            }
            let refuses = !lets_through(&act) && rule.args.is_empty();
            for name in rule.names.iter().chain(&rule.name) {
                *named.entry(name.as_str()).or_default() |= refuses;
            }
        }
        syscall_table::SYSCALLS
            .iter()
            .map(|(name, _)| *name)
            .filter(|name| match named.get(name) {
                None => lets_through(&default),
                Some(refused) => !refused,
            })
            .collect()
    }
}

/// How many x86_64 system calls there are (in the table the filters are built from): what a
/// process without a filter can make.
pub fn syscall_count() -> usize {
    syscall_table::SYSCALLS.len()
}

/// The system calls one filter matches: each number with its rules (none: any arguments).
#[derive(Debug, Clone, Default)]
struct Calls(BTreeMap<i64, Option<Vec<SeccompRule>>>);

impl Calls {
    /// Adds a rule for `nr`; no conditions match the call whatever its arguments.
    fn add(&mut self, nr: i64, conditions: &[SeccompCondition]) -> Result<(), SeccompError> {
        let entry = self.0.entry(nr).or_insert_with(|| Some(Vec::new()));
        match entry {
            None => {}
            Some(_) if conditions.is_empty() => *entry = None,
            Some(rules) => {
                rules.push(SeccompRule::new(conditions.to_vec()).map_err(SeccompError::Compile)?)
            }
        }
        Ok(())
    }

    fn merge(&mut self, other: Calls) -> Result<(), SeccompError> {
        for (nr, rules) in other.0 {
            match rules {
                None => self.add(nr, &[])?,
                Some(rules) => {
                    let entry = self.0.entry(nr).or_insert_with(|| Some(Vec::new()));
                    if let Some(mine) = entry {
                        mine.extend(rules);
                    }
                }
            }
        }
        Ok(())
    }
}

fn program(
    calls: Calls,
    mismatch: SeccompAction,
    matched: SeccompAction,
) -> Result<BpfProgram, SeccompError> {
    let rules = calls
        .0
        .into_iter()
        .map(|(nr, r)| (nr, r.unwrap_or_default()))
        .collect();
    let filter = SeccompFilter::new(rules, mismatch, matched, TargetArch::x86_64)
        .map_err(SeccompError::Compile)?;
    BpfProgram::try_from(filter).map_err(SeccompError::Compile)
}

fn action(a: Action, errno: Option<u32>) -> SeccompAction {
    match a {
        Action::Allow => SeccompAction::Allow,
        Action::Errno => SeccompAction::Errno(errno.unwrap_or(1)),
        Action::KillThread => SeccompAction::KillThread,
        Action::KillProcess => SeccompAction::KillProcess,
        Action::Trap => SeccompAction::Trap,
        Action::Log => SeccompAction::Log,
        Action::Trace => SeccompAction::Trace(errno.unwrap_or(1)),
    }
}

fn condition(a: &Arg) -> Result<SeccompCondition, SeccompError> {
    let index = u8::try_from(a.index)
        .ok()
        .filter(|i| *i <= 5)
        .ok_or(SeccompError::ArgIndex(a.index))?;
    let (op, value) = match a.op {
        Op::NotEqual => (SeccompCmpOp::Ne, a.value),
        Op::Less => (SeccompCmpOp::Lt, a.value),
        Op::LessOrEqual => (SeccompCmpOp::Le, a.value),
        Op::Equal => (SeccompCmpOp::Eq, a.value),
        Op::GreaterOrEqual => (SeccompCmpOp::Ge, a.value),
        Op::Greater => (SeccompCmpOp::Gt, a.value),
        Op::MaskedEqual => (SeccompCmpOp::MaskedEq(a.value), a.value_two),
    };
    // Whole 64-bit arguments, as libseccomp compares them on 64-bit architectures.
    SeccompCondition::new(index, SeccompCmpArgLen::Qword, op, value).map_err(SeccompError::Compile)
}

/// Whether `rule` applies to the container (docker's `includes` / `excludes`).
fn applies(rule: &SyscallRule, target: Target) -> bool {
    let has = |c: &String| caps::parse_name(c).is_ok_and(|n| target.caps.has_number(n));
    let ours = |arches: &[String]| arches.iter().any(|a| OUR_ARCHES.contains(&a.as_str()));
    let inc = &rule.includes;
    if !inc.caps.iter().all(has) || (!inc.arches.is_empty() && !ours(&inc.arches)) {
        return false;
    }
    if let Some(v) = &inc.min_kernel {
        if parse_kernel(v).is_some_and(|min| target.kernel < min) {
            return false;
        }
    }
    let exc = &rule.excludes;
    if exc.caps.iter().any(has) || ours(&exc.arches) {
        return false;
    }
    if let Some(v) = &exc.min_kernel {
        if parse_kernel(v).is_some_and(|min| target.kernel >= min) {
            return false;
        }
    }
    true
}

/// `major.minor` from a kernel release such as `6.1.0-18-amd64`.
pub fn parse_kernel(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next().and_then(|m| m.parse().ok()).unwrap_or(0);
    Some((major, minor))
}

/// The running kernel's version ((0, 0) when it cannot be read).
pub fn running_kernel() -> (u32, u32) {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .ok()
        .and_then(|r| parse_kernel(r.trim()))
        .unwrap_or((0, 0))
}

/// The x86_64 number of system call `name`.
pub fn syscall_number(name: &str) -> Option<i64> {
    syscall_table::number(name)
}

/// Installs `program` on the calling thread with the `seccomp(2)` system call. Makes no
/// allocation (runs between clone and execve). The caller must have set no_new_privs or hold
/// CAP_SYS_ADMIN; `seccompiler::apply_filter` would always set no_new_privs, which
/// `--security-opt no-new-privileges=false` must be able to leave unset.
pub(crate) fn install(program: &[seccompiler::sock_filter]) -> Result<(), i32> {
    #[repr(C)]
    struct SockFprog {
        len: libc::c_ushort,
        filter: *const seccompiler::sock_filter,
    }
    let prog = SockFprog {
        len: libc::c_ushort::try_from(program.len()).map_err(|_| libc::EINVAL)?,
        filter: program.as_ptr(),
    };
    // SAFETY: `prog` points at `program.len()` valid BPF instructions that outlive the call;
    // the kernel copies them.
    let r = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            0,
            &raw const prog,
        )
    };
    if r < 0 {
        return Err(super::super::namespaces::errno());
    }
    Ok(())
}

#[cfg(test)]
mod tests;
