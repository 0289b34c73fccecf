//! Seccomp filters for the threads of the VMM process, one allow-list per kind of thread
//! ([`ThreadKind`]). The lists are data, reviewed in one place ([`filters`]); they are compiled
//! with rust-vmm's `seccompiler` once per process and each thread installs its own on itself
//! ([`confine`]) before it does its work: a vCPU before its first `KVM_RUN`, the event loop
//! before it serves a device, the VMM's own threads before they touch the guest.
//!
//! A system call outside the calling thread's list is trapped: the SIGSYS handler writes one
//! line naming the call and the thread to stderr, and the process dies of SIGSYS
//! ([`report`]). Nothing is installed until the process turns filtering on ([`enable`]), so
//! the same code runs unfiltered in unit tests and with `--security-opt vmm-seccomp=off`.

pub mod filters;
mod report;

use std::collections::BTreeMap;
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

pub use filters::{Cond, Rule};

/// Errors building or installing filters.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// A filter does not compile (a bug in [`filters`]).
    #[error("the {0} thread's seccomp filter does not compile")]
    Compile(&'static str, #[source] seccompiler::BackendError),
    /// The kernel refused the filter.
    #[error("cannot install the {0} thread's seccomp filter")]
    Install(&'static str, #[source] seccompiler::Error),
    /// The SIGSYS handler could not be installed.
    #[error("cannot install the SIGSYS handler")]
    Handler(#[source] std::io::Error),
    /// Filtering was turned on twice.
    #[error("seccomp filtering is already on")]
    AlreadyEnabled,
}

/// The kinds of thread in a VMM process, each with its own allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ThreadKind {
    /// A vCPU: `KVM_RUN` and the port and MMIO exits it handles (serial, i8042, the virtio-mmio
    /// registers).
    Vcpu,
    /// The event loop: every virtio device's queues and backends (disk files, tap or passt,
    /// vsock sockets, the host's entropy).
    Device,
    /// The VMM's own thread: builds nothing any more; talks to the guest agent over vsock,
    /// streams the container's output, starts the port forwarders, waits for the VM to end.
    Runner,
    /// The control socket's server (`stop`, `kill`, `status`).
    Control,
    /// A published port's forwarder: accepts host TCP connections and relays them to vsock.
    Relay,
}

impl ThreadKind {
    /// Every kind, in the order `mvm info` prints them.
    pub const ALL: [ThreadKind; 5] = [
        ThreadKind::Vcpu,
        ThreadKind::Device,
        ThreadKind::Runner,
        ThreadKind::Control,
        ThreadKind::Relay,
    ];

    /// The kind's name, as `mvm info` and the SIGSYS report print it.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Device => "device",
            ThreadKind::Runner => "runner",
            ThreadKind::Control => "control",
            ThreadKind::Relay => "relay",
        }
    }

    /// The kind named `name`.
    pub fn from_name(name: &str) -> Option<ThreadKind> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// One compiled filter.
#[derive(Debug, Clone)]
pub struct Filter {
    kind: ThreadKind,
    syscalls: usize,
    program: BpfProgram,
    /// The calls answered ENOSYS ([`filters::enosys`]), a filter of their own.
    enosys: Option<BpfProgram>,
    /// Kills the process when the SIGSYS report raises SIGSYS again: the VMM is PID 1 of its
    /// pid namespace, where a signal it sends itself with the default action is ignored, so the
    /// kernel ends it instead.
    kill: BpfProgram,
}

impl Filter {
    /// The thread kind it is for.
    pub fn kind(&self) -> ThreadKind {
        self.kind
    }

    /// How many system calls it lets through (some only with certain arguments).
    pub fn syscalls(&self) -> usize {
        self.syscalls
    }

    /// Its size in BPF instructions.
    pub fn instructions(&self) -> usize {
        self.program.len() + self.enosys.as_ref().map_or(0, Vec::len) + self.kill.len()
    }
}

/// Every kind's filter, compiled.
#[derive(Debug, Clone)]
pub struct Filters {
    filters: Vec<Filter>,
}

impl Filters {
    /// Compiles every kind's allow-list from [`filters`].
    pub fn compile() -> Result<Filters, SeccompError> {
        let filters = ThreadKind::ALL
            .into_iter()
            .map(compile_kind)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Filters { filters })
    }

    /// The filter of `kind`.
    pub fn get(&self, kind: ThreadKind) -> &Filter {
        &self.filters[kind.index()]
    }

    /// Every filter, in [`ThreadKind::ALL`]'s order.
    pub fn iter(&self) -> impl Iterator<Item = &Filter> {
        self.filters.iter()
    }
}

fn compile_kind(kind: ThreadKind) -> Result<Filter, SeccompError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    // A call allowed with any arguments by one rule needs no conditions at all.
    let mut unconditional = std::collections::BTreeSet::new();
    let compile_err = |e| SeccompError::Compile(kind.name(), e);
    for rule in &filters::rules(kind) {
        if rule.when.is_empty() {
            unconditional.insert(rule.nr);
            continue;
        }
        let conditions = rule
            .when
            .iter()
            .map(|c| condition(c).map_err(compile_err))
            .collect::<Result<Vec<_>, _>>()?;
        rules
            .entry(rule.nr)
            .or_default()
            .push(SeccompRule::new(conditions).map_err(compile_err)?);
    }
    for nr in &unconditional {
        rules.insert(*nr, Vec::new());
    }
    let syscalls = rules.len();
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(compile_err)?;
    let program: BpfProgram = filter.try_into().map_err(compile_err)?;
    let enosys = match filters::enosys(kind).as_slice() {
        [] => None,
        calls => {
            let rules = calls.iter().map(|nr| (*nr, Vec::new())).collect();
            let filter = SeccompFilter::new(
                rules,
                SeccompAction::Allow,
                SeccompAction::Errno(libc::ENOSYS.unsigned_abs()),
                TargetArch::x86_64,
            )
            .map_err(compile_err)?;
            Some(filter.try_into().map_err(compile_err)?)
        }
    };
    let raise = SeccompCondition::new(
        2,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        u64::from(libc::SIGSYS.unsigned_abs()),
    )
    .map_err(compile_err)?;
    let kill = SeccompFilter::new(
        [(
            libc::SYS_tgkill,
            vec![SeccompRule::new(vec![raise]).map_err(compile_err)?],
        )]
        .into_iter()
        .collect(),
        SeccompAction::Allow,
        SeccompAction::KillProcess,
        TargetArch::x86_64,
    )
    .map_err(compile_err)?
    .try_into()
    .map_err(compile_err)?;
    Ok(Filter {
        kind,
        syscalls,
        program,
        enosys,
        kill,
    })
}

fn condition(c: &Cond) -> Result<SeccompCondition, seccompiler::BackendError> {
    let op = match c.mask {
        Some(mask) => SeccompCmpOp::MaskedEq(mask),
        None => SeccompCmpOp::Eq,
    };
    SeccompCondition::new(c.arg, SeccompCmpArgLen::Qword, op, c.value)
}

/// The filters of this process once filtering is on.
static ENABLED: OnceLock<Filters> = OnceLock::new();

/// Turns filtering on for this process: from now on [`confine`] installs each thread's filter.
/// Installs the SIGSYS handler that reports a forbidden call and turns core dumps off (a
/// process killed by SIGSYS would dump one).
pub fn enable(filters: Filters) -> Result<(), SeccompError> {
    report::install().map_err(SeccompError::Handler)?;
    ENABLED
        .set(filters)
        .map_err(|_| SeccompError::AlreadyEnabled)
}

/// Whether filtering is on in this process.
pub fn enabled() -> bool {
    ENABLED.get().is_some()
}

/// Installs the filter of `kind` on the calling thread, if filtering is on; a no-op otherwise.
/// The filter stays for the thread's life and is inherited by the threads it starts (which may
/// add their own: a call then has to pass both).
pub fn confine(kind: ThreadKind) -> Result<(), SeccompError> {
    let Some(filters) = ENABLED.get() else {
        return Ok(());
    };
    report::label_thread(kind);
    let filter = filters.get(kind);
    let install = |p: &BpfProgram| {
        seccompiler::apply_filter(p).map_err(|e| SeccompError::Install(kind.name(), e))
    };
    if let Some(p) = &filter.enosys {
        install(p)?;
    }
    install(&filter.kill)?;
    install(&filter.program)
}

/// The kind of filter the calling thread installed last, if any.
pub fn current() -> Option<ThreadKind> {
    report::thread_kind()
}

/// The name of x86_64 system call `nr`.
pub fn syscall_name(nr: i64) -> Option<&'static str> {
    syscall_table::name(nr)
}

/// The number of x86_64 system call `name`.
pub fn syscall_number(name: &str) -> Option<i64> {
    syscall_table::number(name)
}

#[cfg(test)]
mod tests;
