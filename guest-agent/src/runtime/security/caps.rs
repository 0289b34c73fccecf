//! Linux capabilities: their names, docker's default set for a container, and `--cap-add` /
//! `--cap-drop` applied to it.
//!
//! Every process of a container, the first one and every `exec`, gets the same set in its
//! bounding set; a root process also has it as its effective and permitted sets, a non-root
//! process has none of them unless it executes a setuid or file-capability binary (which the
//! bounding set still limits). The inheritable and ambient sets are always empty.

use std::fmt;

/// Every capability the kernel knows (up to `CAP_CHECKPOINT_RESTORE`, 40): (name, number).
pub const NAMES: [(&str, u32); 41] = [
    ("CHOWN", 0),
    ("DAC_OVERRIDE", 1),
    ("DAC_READ_SEARCH", 2),
    ("FOWNER", 3),
    ("FSETID", 4),
    ("KILL", 5),
    ("SETGID", 6),
    ("SETUID", 7),
    ("SETPCAP", 8),
    ("LINUX_IMMUTABLE", 9),
    ("NET_BIND_SERVICE", 10),
    ("NET_BROADCAST", 11),
    ("NET_ADMIN", 12),
    ("NET_RAW", 13),
    ("IPC_LOCK", 14),
    ("IPC_OWNER", 15),
    ("SYS_MODULE", 16),
    ("SYS_RAWIO", 17),
    ("SYS_CHROOT", 18),
    ("SYS_PTRACE", 19),
    ("SYS_PACCT", 20),
    ("SYS_ADMIN", 21),
    ("SYS_BOOT", 22),
    ("SYS_NICE", 23),
    ("SYS_RESOURCE", 24),
    ("SYS_TIME", 25),
    ("SYS_TTY_CONFIG", 26),
    ("MKNOD", 27),
    ("LEASE", 28),
    ("AUDIT_WRITE", 29),
    ("AUDIT_CONTROL", 30),
    ("SETFCAP", 31),
    ("MAC_OVERRIDE", 32),
    ("MAC_ADMIN", 33),
    ("SYSLOG", 34),
    ("WAKE_ALARM", 35),
    ("BLOCK_SUSPEND", 36),
    ("AUDIT_READ", 37),
    ("PERFMON", 38),
    ("BPF", 39),
    ("CHECKPOINT_RESTORE", 40),
];

/// Docker's default capabilities for a container (`CapEff: 00000000a80425fb` for root).
pub const DEFAULT: [&str; 14] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "FSETID",
    "FOWNER",
    "MKNOD",
    "NET_RAW",
    "SETGID",
    "SETUID",
    "SETFCAP",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "KILL",
    "AUDIT_WRITE",
];

/// Errors in a capability name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CapError {
    /// The name is no capability.
    #[error("unknown capability {0:?}: use a name such as NET_ADMIN or CAP_NET_ADMIN, or ALL")]
    Unknown(String),
}

/// A set of capabilities as the kernel's 64-bit mask.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct CapSet(pub u64);

impl CapSet {
    /// Every capability in [`NAMES`].
    pub fn all() -> CapSet {
        CapSet(NAMES.iter().fold(0, |m, (_, n)| m | (1 << n)))
    }

    /// Docker's default set ([`DEFAULT`]).
    pub fn docker_default() -> CapSet {
        let mut s = CapSet(0);
        for name in DEFAULT {
            if let Some(n) = number(name) {
                s.0 |= 1 << n;
            }
        }
        s
    }

    /// Whether capability `name` (as in [`NAMES`]) is in the set.
    pub fn has(self, name: &str) -> bool {
        number(name).is_some_and(|n| self.0 & (1 << n) != 0)
    }

    /// Whether capability number `n` is in the set.
    pub fn has_number(self, n: u32) -> bool {
        n < 64 && self.0 & (1 << n) != 0
    }

    /// The names in the set, in number order.
    pub fn names(self) -> Vec<&'static str> {
        NAMES
            .iter()
            .filter(|(_, n)| self.has_number(*n))
            .map(|(name, _)| *name)
            .collect()
    }

    /// Docker's rules for `--cap-add` and `--cap-drop` on its default set: `ALL` among the
    /// added starts from every capability (then drops); `ALL` among the dropped starts from
    /// none (then adds); otherwise the default set less the dropped plus the added. Names are
    /// case-insensitive and may start with `CAP_`.
    pub fn resolve(add: &[String], drop: &[String]) -> Result<CapSet, CapError> {
        let is_all = |s: &String| s.eq_ignore_ascii_case("ALL");
        let parse = |list: &[String]| -> Result<u64, CapError> {
            list.iter()
                .filter(|s| !is_all(s))
                .try_fold(0u64, |m, s| Ok(m | (1 << parse_name(s)?)))
        };
        let (added, dropped) = (parse(add)?, parse(drop)?);
        let set = if add.iter().any(is_all) {
            CapSet::all().0 & !dropped
        } else if drop.iter().any(is_all) {
            added
        } else {
            (CapSet::docker_default().0 & !dropped) | added
        };
        Ok(CapSet(set))
    }
}

impl fmt::Debug for CapSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CapSet({:016x} {:?})", self.0, self.names())
    }
}

/// The number of capability `name` (exactly as in [`NAMES`]).
pub fn number(name: &str) -> Option<u32> {
    NAMES.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
}

/// Parses `NET_ADMIN`, `net_admin` or `CAP_NET_ADMIN` into its number.
pub fn parse_name(text: &str) -> Result<u32, CapError> {
    let upper = text.trim().to_ascii_uppercase();
    let bare = upper.strip_prefix("CAP_").unwrap_or(&upper);
    number(bare).ok_or_else(|| CapError::Unknown(text.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn default_set_is_dockers_capeff() {
        assert_eq!(CapSet::docker_default().0, 0xa804_25fb);
        assert_eq!(CapSet::resolve(&[], &[]), Ok(CapSet(0xa804_25fb)));
        assert!(!CapSet::docker_default().has("SYS_ADMIN"));
        assert!(CapSet::docker_default().has("MKNOD"));
    }

    #[test]
    fn names_are_numbered_in_order_and_unique() {
        for (i, (_, n)) in NAMES.iter().enumerate() {
            assert_eq!(*n as usize, i);
        }
        assert_eq!(CapSet::all().0, (1u64 << 41) - 1);
    }

    #[test]
    fn add_and_drop_change_the_default() {
        let s = CapSet::resolve(&list(&["cap_sys_admin"]), &list(&["NET_RAW", "mknod"]))
            .expect("valid");
        assert!(s.has("SYS_ADMIN"));
        assert!(!s.has("NET_RAW"));
        assert!(!s.has("MKNOD"));
        assert!(s.has("CHOWN"));
    }

    #[test]
    fn all_adds_everything_or_drops_everything() {
        let s = CapSet::resolve(&list(&["ALL"]), &list(&["SYS_ADMIN"])).expect("valid");
        assert_eq!(s.0, CapSet::all().0 & !(1 << 21));
        let s = CapSet::resolve(&list(&["KILL"]), &list(&["all"])).expect("valid");
        assert_eq!(s.names(), ["KILL"]);
        assert_eq!(CapSet::resolve(&[], &list(&["ALL"])), Ok(CapSet(0)));
    }

    #[test]
    fn unknown_names_are_one_line_errors() {
        let e = CapSet::resolve(&list(&["NET_WIZARD"]), &[]).expect_err("unknown");
        assert_eq!(e, CapError::Unknown("NET_WIZARD".into()));
        assert_eq!(e.to_string().lines().count(), 1);
        assert!(CapSet::resolve(&[], &list(&[""])).is_err());
    }
}
