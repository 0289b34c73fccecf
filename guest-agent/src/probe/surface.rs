//! The attack surface as the process sees it: seccomp mode, capabilities, no_new_privs and the
//! user namespace, from `/proc/self/status` and `/proc/self/uid_map`.
//!
//! How many distinct host system calls the workload can make is decided by the host side (from
//! the seccomp profile mvm installed, or 0 in a VM): a process cannot list what it may call
//! without calling it.

use super::{sys, CapabilitySet, IdMapping, SeccompMode, Surface};

/// Capability names by bit number (`include/uapi/linux/capability.h`).
pub const CAPABILITY_NAMES: [&str; 41] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// Collects [`Surface`].
pub fn collect() -> Surface {
    let status = std::fs::read_to_string("/proc/self/status").ok();
    let field = |name: &str| status.as_deref().and_then(|s| status_field(s, name));
    let uid_map = std::fs::read_to_string("/proc/self/uid_map")
        .ok()
        .and_then(|t| parse_id_map(&t));
    Surface {
        seccomp: field("Seccomp").and_then(|v| parse_seccomp(&v)),
        seccomp_filters: field("Seccomp_filters").and_then(|v| v.parse().ok()),
        capabilities: field("CapEff").and_then(|v| capability_set(&v)),
        capabilities_bounding: field("CapBnd").and_then(|v| capability_set(&v)),
        no_new_privs: field("NoNewPrivs").map_or_else(sys::no_new_privs, |v| v == "1"),
        user_namespace: uid_map.as_deref().map(|m| !is_initial_map(m)),
        uid_map,
    }
}

/// The value of `Name:` in `/proc/<pid>/status`, trimmed.
pub fn status_field(status: &str, name: &str) -> Option<String> {
    status.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k == name).then(|| v.trim().to_string())
    })
}

/// `Seccomp:` 0, 1 or 2.
pub fn parse_seccomp(value: &str) -> Option<SeccompMode> {
    match value {
        "0" => Some(SeccompMode::Disabled),
        "1" => Some(SeccompMode::Strict),
        "2" => Some(SeccompMode::Filter),
        _ => None,
    }
}

/// A capability mask in hex (`CapEff:` value) with the names of its bits.
pub fn capability_set(hex: &str) -> Option<CapabilitySet> {
    let mask = u64::from_str_radix(hex, 16).ok()?;
    Some(CapabilitySet {
        hex: format!("{mask:016x}"),
        names: capability_names(mask),
    })
}

/// Names of the capabilities in `mask`, in bit order.
pub fn capability_names(mask: u64) -> Vec<String> {
    (0..64usize)
        .filter(|bit| mask & (1u64 << bit) != 0)
        .map(|bit| {
            CAPABILITY_NAMES
                .get(bit)
                .map_or_else(|| format!("CAP_{bit}"), |n| (*n).to_string())
        })
        .collect()
}

/// Parses `/proc/<pid>/uid_map` (`inside outside count` per line).
pub fn parse_id_map(text: &str) -> Option<Vec<IdMapping>> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let mut w = l.split_whitespace().map(str::parse::<u32>);
            let m = IdMapping {
                inside: w.next()?.ok()?,
                outside: w.next()?.ok()?,
                count: w.next()?.ok()?,
            };
            w.next().is_none().then_some(m)
        })
        .collect()
}

/// The initial user namespace maps every id to itself: `0 0 4294967295`.
pub fn is_initial_map(map: &[IdMapping]) -> bool {
    map == [IdMapping {
        inside: 0,
        outside: 0,
        count: u32::MAX,
    }]
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Name:\tprobe\nUmask:\t0022\nCapInh:\t0000000000000000\n\
        CapPrm:\t000001ffffffffff\nCapEff:\t00000000a80425fb\nCapBnd:\t000001ffffffffff\n\
        NoNewPrivs:\t1\nSeccomp:\t2\nSeccomp_filters:\t1\n";

    #[test]
    fn status_fields() {
        assert_eq!(status_field(STATUS, "Seccomp").as_deref(), Some("2"));
        assert_eq!(
            status_field(STATUS, "Seccomp_filters").as_deref(),
            Some("1")
        );
        assert_eq!(status_field(STATUS, "NoNewPrivs").as_deref(), Some("1"));
        assert_eq!(status_field(STATUS, "Missing"), None);
        // A prefix of another field's name is not that field.
        assert_eq!(status_field(STATUS, "Cap"), None);
    }

    #[test]
    fn seccomp_modes() {
        assert_eq!(parse_seccomp("0"), Some(SeccompMode::Disabled));
        assert_eq!(parse_seccomp("1"), Some(SeccompMode::Strict));
        assert_eq!(parse_seccomp("2"), Some(SeccompMode::Filter));
        assert_eq!(parse_seccomp("x"), None);
    }

    #[test]
    fn docker_default_capabilities_by_name() {
        // Docker's default set: 0x00000000a80425fb.
        let set = capability_set("00000000a80425fb").expect("hex");
        assert_eq!(set.hex, "00000000a80425fb");
        assert_eq!(
            set.names,
            [
                "CAP_CHOWN",
                "CAP_DAC_OVERRIDE",
                "CAP_FOWNER",
                "CAP_FSETID",
                "CAP_KILL",
                "CAP_SETGID",
                "CAP_SETUID",
                "CAP_SETPCAP",
                "CAP_NET_BIND_SERVICE",
                "CAP_NET_RAW",
                "CAP_SYS_CHROOT",
                "CAP_MKNOD",
                "CAP_AUDIT_WRITE",
                "CAP_SETFCAP",
            ]
        );
    }

    #[test]
    fn full_and_unknown_capabilities() {
        let all = capability_names(0x1ff_ffff_ffff);
        assert_eq!(all.len(), 41);
        assert_eq!(
            all.last().map(String::as_str),
            Some("CAP_CHECKPOINT_RESTORE")
        );
        assert_eq!(capability_names(1 << 45), ["CAP_45"]);
        assert!(capability_names(0).is_empty());
        assert!(capability_set("zz").is_none());
    }

    #[test]
    fn uid_maps() {
        let initial = parse_id_map("         0          0 4294967295\n").expect("map");
        assert!(is_initial_map(&initial));
        let userns = parse_id_map("0 100000 65536\n").expect("map");
        assert_eq!(
            userns,
            [IdMapping {
                inside: 0,
                outside: 100_000,
                count: 65536
            }]
        );
        assert!(!is_initial_map(&userns));
        // A user namespace with nothing mapped yet has an empty map.
        assert_eq!(parse_id_map(""), Some(vec![]));
        assert!(!is_initial_map(&[]));
        assert_eq!(parse_id_map("0 0\n"), None);
        assert_eq!(parse_id_map("0 0 1 2\n"), None);
    }

    #[test]
    fn this_process_matches_its_status() {
        let s = collect();
        let status = std::fs::read_to_string("/proc/self/status").expect("status");
        let eff = status_field(&status, "CapEff").expect("CapEff");
        assert_eq!(s.capabilities.map(|c| c.hex), Some(eff));
        assert_eq!(s.no_new_privs, sys::no_new_privs());
    }
}
