//! Names of one lab: its id, its network namespaces, its CNI container ids and its state
//! directory. Unique per process (a counter) and across processes (the pid), and short, because
//! they show up in `ip netns list` and CNI's IPAM files.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

/// Where every lab keeps its state; one directory per lab.
pub const STATE_ROOT: &str = "/run/netpol-lab";

static NEXT_LAB: AtomicU32 = AtomicU32::new(0);

#[derive(Debug, Clone)]
pub struct LabNames {
    /// `lab-<pid>-<n>`: the state directory's name and the default node name.
    pub id: String,
    /// `npl-<pid>-<n>`: the prefix of every network namespace of this lab.
    netns_prefix: String,
}

impl LabNames {
    pub fn allocate() -> LabNames {
        let pid = std::process::id();
        let n = NEXT_LAB.fetch_add(1, Ordering::Relaxed);
        LabNames {
            id: format!("lab-{pid}-{n}"),
            netns_prefix: format!("npl-{pid}-{n}"),
        }
    }

    /// `<prefix>-node` for the first node (as before there were several), then `-node2`...
    pub fn node_netns(&self, index: usize) -> String {
        match index {
            0 => format!("{}-node", self.netns_prefix),
            _ => format!("{}-node{}", self.netns_prefix, index + 1),
        }
    }

    pub fn pod_netns(&self, index: usize) -> String {
        format!("{}-p{index}", self.netns_prefix)
    }

    /// A pod added after the lab started (see `chained`), numbered on its own.
    pub fn chained_pod_netns(&self, n: u32) -> String {
        format!("{}-c{n}", self.netns_prefix)
    }

    pub fn chained_container_id(&self, n: u32) -> String {
        format!("{}-c{n}", self.id)
    }

    /// The CNI container id of a pod; unique so IPAM reservations never collide between labs.
    pub fn container_id(&self, index: usize) -> String {
        format!("{}-p{index}", self.id)
    }

    pub fn dir(&self) -> PathBuf {
        PathBuf::from(STATE_ROOT).join(&self.id)
    }

    /// host-local's state for one node's pod CIDR.
    pub fn ipam_dir(&self, node: usize) -> PathBuf {
        self.dir().join("ipam").join(node.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_share_the_lab_number() {
        let a = LabNames::allocate();
        let b = LabNames::allocate();
        assert_ne!(a.id, b.id, "two labs of one process must not share an id");
        assert_ne!(a.node_netns(0), b.node_netns(0), "nor a node namespace");
        let pid = std::process::id();
        assert!(
            a.id.starts_with(&format!("lab-{pid}-")),
            "the id carries the pid: {}",
            a.id
        );
        let n = a.id.rsplit('-').next().unwrap();
        assert_eq!(a.node_netns(0), format!("npl-{pid}-{n}-node"));
        assert_eq!(a.node_netns(1), format!("npl-{pid}-{n}-node2"));
        assert_eq!(a.pod_netns(3), format!("npl-{pid}-{n}-p3"));
        assert!(
            a.ipam_dir(1).starts_with(STATE_ROOT) && a.ipam_dir(0) != a.ipam_dir(1),
            "IPAM state stays in the lab's directory, one per node"
        );
    }
}
