//! How a lab is asked for: [`LabOptions`] for the single node every existing test uses, and
//! [`ClusterOptions`] for several nodes. Both resolve to one [`ClusterOptions`]; `resolve_nodes`
//! turns it into the node plans the lab builds, after the checks a bad request must fail.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use anyhow::{bail, ensure, Result};
use ipnet::{Ipv4Net, Ipv6Net};

use super::services::SERVICE_CIDR;

/// The network joining the nodes, as kind's docker network: the nodes' InternalIPs.
pub const NODE_NETWORK: Ipv4Net = Ipv4Net::new_assert(Ipv4Addr::new(172, 18, 0, 0), 16);
pub const NODE_NETWORK_V6: Ipv6Net =
    Ipv6Net::new_assert(Ipv6Addr::new(0xfc00, 0xf853, 0xccd, 0xe793, 0, 0, 0, 0), 64);
/// The lab joins nodes by one veth pair; more would need a bridge.
pub const MAX_NODES: usize = 2;

#[derive(Debug, Clone)]
pub struct LabOptions {
    /// The Kubernetes node name pods are scheduled on; defaults to the lab id.
    pub node_name: Option<String>,
    /// The node's pod CIDR, handed to host-local IPAM.
    pub pod_cidr: Ipv4Net,
    /// The node's IPv6 pod CIDR (e.g. fd00:10:244:1::/64); set, every pod is dual-stack.
    pub pod_cidr_v6: Option<Ipv6Net>,
    /// How long every probe waits before calling a flow dropped.
    pub probe_timeout: Duration,
    /// Cluster DNS: adds kube-system/coredns (`k8s-app: kube-dns`, serving with dnsmasq) and
    /// the kube-dns Service at 10.96.0.10, and gives every pod kubelet's resolv.conf, so
    /// probes by name (`NameProbe`) work.
    pub dns: bool,
    /// How long a probe by name waits for the name to resolve before calling it unresolved.
    pub resolve_timeout: Duration,
}

impl Default for LabOptions {
    fn default() -> LabOptions {
        LabOptions {
            node_name: None,
            pod_cidr: "10.244.1.0/24".parse().expect("a valid literal CIDR"),
            pod_cidr_v6: None,
            probe_timeout: Duration::from_secs(1),
            dns: false,
            resolve_timeout: Duration::from_secs(2),
        }
    }
}

/// One node of a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeOptions {
    /// How a spec's `spec.nodeName` refers to this node, e.g. `node-a`.
    pub name: String,
    /// The node's Kubernetes name: in the manifests, the Node object, the agent's
    /// `--node-name` and so its pin directory. Defaults to `<lab id>-<name>`, unique, so
    /// parallel labs never share an agent's pins; a spec may use either name.
    pub node_name: Option<String>,
    pub pod_cidr: Ipv4Net,
    /// Set on every node or on none: the whole cluster is dual-stack or not.
    pub pod_cidr_v6: Option<Ipv6Net>,
}

#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// The nodes, in order; a pod without `spec.nodeName` runs on the first.
    pub nodes: Vec<NodeOptions>,
    pub probe_timeout: Duration,
    pub dns: bool,
    pub resolve_timeout: Duration,
}

impl ClusterOptions {
    /// Two nodes, `node-a` (pods 10.244.1.0/24, InternalIP 172.18.0.2) and `node-b`
    /// (10.244.2.0/24, 172.18.0.3), the way kindnet lays out a kind cluster.
    pub fn two_nodes() -> ClusterOptions {
        let single = LabOptions::default();
        ClusterOptions {
            nodes: ["node-a", "node-b"]
                .iter()
                .enumerate()
                .map(|(i, name)| NodeOptions {
                    name: name.to_string(),
                    node_name: None,
                    pod_cidr: Ipv4Net::new_assert(Ipv4Addr::new(10, 244, i as u8 + 1, 0), 24),
                    pod_cidr_v6: None,
                })
                .collect(),
            probe_timeout: single.probe_timeout,
            dns: false,
            resolve_timeout: single.resolve_timeout,
        }
    }

    /// Gives node `i` the IPv6 pod CIDR fd00:10:244:<i+1>::/64 (and the node link IPv6
    /// addresses), making every pod dual-stack.
    pub fn dual_stack(mut self) -> ClusterOptions {
        for (i, node) in self.nodes.iter_mut().enumerate() {
            let segment = u16::try_from(i + 1).expect("a handful of nodes");
            node.pod_cidr_v6 = Some(Ipv6Net::new_assert(
                Ipv6Addr::new(0xfd00, 0x10, 0x244, segment, 0, 0, 0, 0),
                64,
            ));
        }
        self
    }

    pub fn with_dns(mut self) -> ClusterOptions {
        self.dns = true;
        self
    }
}

/// One node, as `LabOptions::default()`.
impl Default for ClusterOptions {
    fn default() -> ClusterOptions {
        LabOptions::default().into()
    }
}

impl From<LabOptions> for ClusterOptions {
    fn from(opts: LabOptions) -> ClusterOptions {
        ClusterOptions {
            nodes: vec![NodeOptions {
                name: "node".to_string(),
                node_name: opts.node_name,
                pod_cidr: opts.pod_cidr,
                pod_cidr_v6: opts.pod_cidr_v6,
            }],
            probe_timeout: opts.probe_timeout,
            dns: opts.dns,
            resolve_timeout: opts.resolve_timeout,
        }
    }
}

/// A node as the lab builds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodePlan {
    pub spec_name: String,
    pub node_name: String,
    pub pod_cidr: Ipv4Net,
    pub pod_cidr_v6: Option<Ipv6Net>,
    /// The node's address on the node network; only a cluster of several nodes has one.
    pub address: Option<Ipv4Net>,
    pub address_v6: Option<Ipv6Net>,
}

/// Checks the request and names and addresses the nodes. `default_name` is the Kubernetes
/// name of a node that has none (`<lab id>` for a single node, `<lab id>-<name>` otherwise).
pub fn resolve_nodes(opts: &ClusterOptions, lab_id: &str) -> Result<Vec<NodePlan>> {
    let count = opts.nodes.len();
    ensure!(
        (1..=MAX_NODES).contains(&count),
        "a lab has 1 to {MAX_NODES} nodes, not {count}"
    );
    let dual_stack = opts.nodes[0].pod_cidr_v6.is_some();
    ensure!(
        opts.nodes
            .iter()
            .all(|n| n.pod_cidr_v6.is_some() == dual_stack),
        "either every node has an IPv6 pod CIDR or none does"
    );
    let mut plans: Vec<NodePlan> = Vec::new();
    for (index, node) in opts.nodes.iter().enumerate() {
        ensure!(
            !node.name.is_empty() && !node.name.contains('/'),
            "node name {:?} is not a name",
            node.name
        );
        let node_name = node.node_name.clone().unwrap_or_else(|| match count {
            1 => lab_id.to_string(),
            _ => format!("{lab_id}-{}", node.name),
        });
        ensure!(
            !node_name.is_empty() && !node_name.contains('/'),
            "node name {node_name:?} cannot name a pin directory"
        );
        for cidr in [SERVICE_CIDR, NODE_NETWORK] {
            if overlaps(node.pod_cidr, cidr) {
                bail!(
                    "node {}: pod CIDR {} overlaps {cidr}",
                    node.name,
                    node.pod_cidr
                );
            }
        }
        for other in &plans {
            if other.spec_name == node.name || other.node_name == node_name {
                bail!("two nodes are named {}", node.name);
            }
            if overlaps(other.pod_cidr, node.pod_cidr)
                || matches!((other.pod_cidr_v6, node.pod_cidr_v6), (Some(a), Some(b)) if a.contains(&b.network()) || b.contains(&a.network()))
            {
                bail!(
                    "nodes {} and {} have overlapping pod CIDRs",
                    other.spec_name,
                    node.name
                );
            }
        }
        // kind numbers its nodes from .2 (.1 is the docker bridge's gateway).
        let host = u32::try_from(index + 2).expect("a handful of nodes");
        let address = (count > 1).then(|| {
            Ipv4Net::new_assert(
                Ipv4Addr::from(u32::from(NODE_NETWORK.network()) + host),
                NODE_NETWORK.prefix_len(),
            )
        });
        let address_v6 = (count > 1 && dual_stack).then(|| {
            Ipv6Net::new_assert(
                Ipv6Addr::from(u128::from(NODE_NETWORK_V6.network()) + u128::from(host)),
                NODE_NETWORK_V6.prefix_len(),
            )
        });
        plans.push(NodePlan {
            spec_name: node.name.clone(),
            node_name,
            pod_cidr: node.pod_cidr,
            pod_cidr_v6: node.pod_cidr_v6,
            address,
            address_v6,
        });
    }
    Ok(plans)
}

fn overlaps(a: Ipv4Net, b: Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// The node a pod runs on: the one its `spec.nodeName` names (by either name), else the first.
pub fn node_of(plans: &[NodePlan], node_name: Option<&str>) -> Result<usize> {
    match node_name {
        None => Ok(0),
        Some(wanted) => plans
            .iter()
            .position(|p| p.spec_name == wanted || p.node_name == wanted)
            .ok_or_else(|| {
                let known: Vec<&str> = plans.iter().map(|p| p.spec_name.as_str()).collect();
                anyhow::anyhow!(
                    "spec.nodeName {wanted} names no node of the lab (nodes: {})",
                    known.join(", ")
                )
            }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_single_node_keeps_the_lab_id_and_has_no_node_link() {
        let plans = resolve_nodes(&LabOptions::default().into(), "lab-1-0").unwrap();
        assert_eq!(plans.len(), 1);
        assert_eq!(
            plans[0].node_name, "lab-1-0",
            "the default node name is the lab id"
        );
        assert_eq!(plans[0].address, None, "a single node has no node network");
        let named = LabOptions {
            node_name: Some("worker-7".into()),
            ..LabOptions::default()
        };
        assert_eq!(
            resolve_nodes(&named.into(), "lab-1-0").unwrap()[0].node_name,
            "worker-7"
        );
    }

    #[test]
    fn two_nodes_are_addressed_like_kind() {
        let plans = resolve_nodes(&ClusterOptions::two_nodes().dual_stack(), "lab-1-0").unwrap();
        let summary: Vec<_> = plans
            .iter()
            .map(|p| {
                (
                    p.node_name.as_str(),
                    p.pod_cidr.to_string(),
                    p.pod_cidr_v6.unwrap().to_string(),
                    p.address.unwrap().to_string(),
                    p.address_v6.unwrap().to_string(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                (
                    "lab-1-0-node-a",
                    "10.244.1.0/24".to_string(),
                    "fd00:10:244:1::/64".to_string(),
                    "172.18.0.2/16".to_string(),
                    "fc00:f853:ccd:e793::2/64".to_string()
                ),
                (
                    "lab-1-0-node-b",
                    "10.244.2.0/24".to_string(),
                    "fd00:10:244:2::/64".to_string(),
                    "172.18.0.3/16".to_string(),
                    "fc00:f853:ccd:e793::3/64".to_string()
                ),
            ]
        );
        assert_eq!(
            node_of(&plans, None).unwrap(),
            0,
            "the first node by default"
        );
        assert_eq!(node_of(&plans, Some("node-b")).unwrap(), 1);
        assert_eq!(node_of(&plans, Some("lab-1-0-node-b")).unwrap(), 1);
        let err = node_of(&plans, Some("node-c")).unwrap_err();
        assert!(err.to_string().contains("node-a, node-b"), "{err}");
    }

    #[test]
    fn rejects_clusters_the_lab_cannot_build() {
        let mut three = ClusterOptions::two_nodes();
        three.nodes.push(three.nodes[1].clone());
        assert!(resolve_nodes(&three, "x").is_err(), "three nodes");
        let mut same_cidr = ClusterOptions::two_nodes();
        same_cidr.nodes[1].pod_cidr = same_cidr.nodes[0].pod_cidr;
        assert!(
            resolve_nodes(&same_cidr, "x").is_err(),
            "overlapping pod CIDRs"
        );
        let mut half_v6 = ClusterOptions::two_nodes().dual_stack();
        half_v6.nodes[1].pod_cidr_v6 = None;
        assert!(resolve_nodes(&half_v6, "x").is_err(), "half dual-stack");
        let mut in_services = ClusterOptions::two_nodes();
        in_services.nodes[0].pod_cidr = "10.96.1.0/24".parse().unwrap();
        assert!(
            resolve_nodes(&in_services, "x").is_err(),
            "inside the service CIDR"
        );
        assert!(resolve_nodes(
            &ClusterOptions {
                nodes: vec![],
                ..ClusterOptions::two_nodes()
            },
            "x"
        )
        .is_err());
    }
}
