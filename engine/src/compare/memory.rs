//! Host memory of a process tree: the proportional set size (PSS: private pages, plus shared
//! pages divided among the processes that map them) of a process and all its descendants,
//! from `/proc/<pid>/smaps_rollup`.

use std::collections::HashMap;

/// PSS in KiB of `pid` and every process below it; `None` when `pid` is gone. Processes that
/// end while they are read are left out.
pub(super) fn tree_pss_kib(pid: u32) -> Option<u64> {
    let own = pss_kib(pid)?;
    let children = children_by_parent();
    let mut total = own;
    let mut stack: Vec<u32> = children.get(&pid).cloned().unwrap_or_default();
    let mut seen = vec![pid];
    while let Some(p) = stack.pop() {
        if seen.contains(&p) {
            continue;
        }
        seen.push(p);
        total += pss_kib(p).unwrap_or(0);
        if let Some(c) = children.get(&p) {
            stack.extend(c);
        }
    }
    Some(total)
}

/// Every process's children, from the parent pid in `/proc/<pid>/stat`.
fn children_by_parent() -> HashMap<u32, Vec<u32>> {
    let mut map: HashMap<u32, Vec<u32>> = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return map;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Some(ppid) = std::fs::read_to_string(e.path().join("stat"))
            .ok()
            .and_then(|s| parent_of(&s))
        else {
            continue;
        };
        map.entry(ppid).or_default().push(pid);
    }
    map
}

/// The parent pid in a `/proc/<pid>/stat` line: the second field after the command name,
/// which is in parentheses and may itself hold spaces and parentheses.
fn parent_of(stat: &str) -> Option<u32> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// `Pss:` of `/proc/<pid>/smaps_rollup`, KiB.
fn pss_kib(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    parse_pss(&text)
}

fn parse_pss(rollup: &str) -> Option<u64> {
    let line = rollup.lines().find(|l| l.starts_with("Pss:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_with_odd_names_give_their_parent() {
        assert_eq!(parent_of("42 (a) b (c)) S 7 42 42 0"), Some(7));
        assert_eq!(parent_of("1 (init) S 0 1 1"), Some(0));
        assert_eq!(parent_of("garbage"), None);
    }

    #[test]
    fn pss_comes_from_its_line() {
        let text = "55d0-7ffd ---p 00000000 00:00 0   [rollup]\nRss:   1200 kB\nPss:   800 kB\n";
        assert_eq!(parse_pss(text), Some(800));
        assert_eq!(parse_pss("Rss: 1 kB\n"), None);
    }

    #[test]
    fn a_tree_counts_its_children() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap_or_else(|e| panic!("{e}"));
        let me = std::process::id();
        let listed = children_by_parent()
            .get(&me)
            .is_some_and(|c| c.contains(&child.id()));
        let (alone, tree) = (pss_kib(me), tree_pss_kib(me));
        let _ = child.kill();
        let _ = child.wait();
        assert!(listed, "the sleep is a child of this process");
        assert!(alone.is_some_and(|a| a > 0) && tree.is_some());
        assert_eq!(tree_pss_kib(u32::MAX), None);
    }
}
