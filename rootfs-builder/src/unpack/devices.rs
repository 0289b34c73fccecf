//! Device nodes of an image. A layer may carry any device node, including the host's own disks;
//! none is ever created on the host. They are recorded instead, as layers apply (a later layer's
//! whiteout, opaque directory or other entry at the same path removes the record), and the list
//! is kept next to the unpacked tree for the container runtime, which decides which ones a
//! container may have in its own `/dev`.

use std::collections::BTreeMap;
use std::ffi::OsString;

use serde::{Deserialize, Serialize};

/// Character or block device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    /// A character device (`c`).
    Char,
    /// A block device (`b`).
    Block,
}

/// A device node an image's layers carry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceNode {
    /// Absolute path inside the image, e.g. `/dev/null`.
    pub path: String,
    /// Character or block.
    pub kind: DeviceKind,
    /// Major device number.
    pub major: u32,
    /// Minor device number.
    pub minor: u32,
    /// Permission bits (`0o666`).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
}

/// The device nodes recorded so far, by path below the root.
#[derive(Debug, Default)]
pub(crate) struct Devices(BTreeMap<Vec<OsString>, DeviceNode>);

impl Devices {
    /// Records a node at `rel` (replacing what was recorded there).
    pub(crate) fn record(&mut self, rel: &[OsString], mut node: DeviceNode) {
        node.path = absolute(rel);
        self.0.insert(rel.to_vec(), node);
    }

    /// The node recorded at `rel`, if any.
    pub(crate) fn get(&self, rel: &[OsString]) -> Option<&DeviceNode> {
        self.0.get(rel)
    }

    /// Forgets `rel` and everything below it (a whiteout, or another entry written there).
    pub(crate) fn forget(&mut self, rel: &[OsString]) {
        if !self.0.is_empty() {
            self.0.retain(|k, _| !k.starts_with(rel));
        }
    }

    /// Forgets what is below `dir` unless `keep` says this layer wrote it (an opaque directory).
    pub(crate) fn forget_below_unless(
        &mut self,
        dir: &[OsString],
        keep: impl Fn(&[OsString]) -> bool,
    ) {
        self.0
            .retain(|k, _| !(k.len() > dir.len() && k.starts_with(dir)) || keep(k));
    }

    /// The list, sorted by path. Paths that are not UTF-8 cannot be named in the manifest and
    /// are left out (no runtime could create them anyway).
    pub(crate) fn into_nodes(self) -> Vec<DeviceNode> {
        self.0
            .into_iter()
            .filter_map(|(rel, node)| {
                let ok = rel.iter().all(|c| c.to_str().is_some());
                if !ok {
                    log::debug!("device node {:?} has a name that is not UTF-8", node.path);
                }
                ok.then_some(node)
            })
            .collect()
    }
}

fn absolute(rel: &[OsString]) -> String {
    let mut s = String::new();
    for c in rel {
        s.push('/');
        s.push_str(&c.to_string_lossy());
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel(p: &str) -> Vec<OsString> {
        p.split('/').map(OsString::from).collect()
    }

    fn node(kind: DeviceKind, major: u32, minor: u32) -> DeviceNode {
        DeviceNode {
            path: String::new(),
            kind,
            major,
            minor,
            mode: 0o600,
            uid: 0,
            gid: 0,
        }
    }

    #[test]
    fn records_are_named_absolutely_and_forgotten_by_later_layers() {
        let mut d = Devices::default();
        d.record(&rel("dev/sda"), node(DeviceKind::Block, 8, 0));
        d.record(&rel("dev/null"), node(DeviceKind::Char, 1, 3));
        d.record(&rel("opt/dev/x"), node(DeviceKind::Char, 10, 1));
        assert_eq!(d.get(&rel("dev/sda")).unwrap().path, "/dev/sda");
        d.forget(&rel("dev/sda"));
        d.forget_below_unless(&rel("opt"), |_| false);
        let nodes = d.into_nodes();
        assert_eq!(nodes.len(), 1);
        assert_eq!((nodes[0].path.as_str(), nodes[0].major), ("/dev/null", 1));
        let json = serde_json::to_string(&nodes[0]).unwrap();
        assert!(json.contains(r#""kind":"char""#), "{json}");
        let back: DeviceNode = serde_json::from_str(&json).unwrap();
        assert_eq!(back, nodes[0]);
    }
}
