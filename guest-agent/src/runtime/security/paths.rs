//! Paths under /proc and /sys that a container must not read or change (docker's lists).
//!
//! Paths are relative to the new root, as the runtime sees them before `pivot_root`. Paths the
//! kernel does not have are skipped.

use std::ffi::CStr;

/// Hidden: a file is covered by /dev/null, a directory by an empty read-only tmpfs. They show
/// host hardware, kernel memory, the kernel's keys and scheduler internals, and some let root
/// change host hardware settings.
pub const MASKED: [&CStr; 11] = [
    c"proc/asound",
    c"proc/acpi",
    c"proc/kcore",
    c"proc/keys",
    c"proc/latency_stats",
    c"proc/timer_list",
    c"proc/timer_stats",
    c"proc/sched_debug",
    c"proc/scsi",
    c"sys/firmware",
    c"sys/devices/virtual/powercap",
];

/// Read-only: host-wide kernel settings (`/proc/sys`), the magic SysRq trigger, interrupt
/// affinity, bus and filesystem settings.
pub const READ_ONLY: [&CStr; 5] = [
    c"proc/bus",
    c"proc/fs",
    c"proc/irq",
    c"proc/sys",
    c"proc/sysrq-trigger",
];

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> impl Iterator<Item = &'static str> {
        MASKED
            .iter()
            .chain(READ_ONLY.iter())
            .map(|p| p.to_str().expect("utf8"))
    }

    #[test]
    fn every_path_is_relative_and_under_proc_or_sys() {
        for p in all() {
            assert!(p.starts_with("proc/") || p.starts_with("sys/"), "{p}");
            assert!(!p.contains(".."), "{p}");
        }
    }

    #[test]
    fn dockers_masked_paths_are_all_there() {
        for p in [
            "proc/kcore",
            "proc/keys",
            "proc/timer_list",
            "proc/sched_debug",
            "proc/latency_stats",
            "proc/timer_stats",
            "proc/acpi",
            "proc/asound",
            "proc/scsi",
            "sys/firmware",
            "sys/devices/virtual/powercap",
        ] {
            assert!(MASKED.iter().any(|m| m.to_str() == Ok(p)), "{p}");
        }
    }

    #[test]
    fn dockers_read_only_paths_are_all_there() {
        for p in [
            "proc/sys",
            "proc/sysrq-trigger",
            "proc/irq",
            "proc/bus",
            "proc/fs",
        ] {
            assert!(READ_ONLY.iter().any(|m| m.to_str() == Ok(p)), "{p}");
        }
        assert!(!all().any(|p| p == "proc/self" || p == "proc"));
    }
}
