//! The x86_64 system call table, generated from the kernel's UAPI header by `generate.sh`
//! (never edited by hand), and lookups in it. One table for every seccomp filter mvm builds:
//! the VMM's per-thread allow-lists (crate `vmm`) and the container's profile (crate
//! `guest-agent`).

mod x86_64;

pub use x86_64::SYSCALLS;

/// The number of system call `name`.
pub fn number(name: &str) -> Option<i64> {
    SYSCALLS
        .binary_search_by(|(n, _)| n.cmp(&name))
        .ok()
        .map(|i| SYSCALLS[i].1)
}

/// The name of system call `nr`.
pub fn name(nr: i64) -> Option<&'static str> {
    SYSCALLS
        .iter()
        .find(|(_, n)| *n == nr)
        .map(|(name, _)| *name)
}

/// The highest system call number in the table: calls above it are newer than the table.
pub fn newest() -> i64 {
    SYSCALLS.iter().map(|(_, n)| *n).max().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_is_sorted_by_name_so_lookups_by_name_find_every_call() {
        assert!(SYSCALLS.windows(2).all(|w| w[0].0 < w[1].0));
        for (n, nr) in SYSCALLS {
            assert_eq!(number(n), Some(*nr), "{n}");
        }
    }

    #[test]
    fn well_known_calls_have_their_x86_64_numbers() {
        assert_eq!(number("read"), Some(0));
        assert_eq!(number("openat"), Some(257));
        assert_eq!(name(59), Some("execve"));
        assert_eq!(number("no_such_call"), None);
        assert_eq!(name(100_000), None);
        assert!(newest() >= 435, "clone3 is 435");
    }
}
