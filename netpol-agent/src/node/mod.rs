//! Pod networking for a cluster with no other CNI (KIND with the default CNI disabled): the
//! CNI configuration for this node's pod CIDRs, and routes to the other nodes' pod CIDRs, as
//! kindnet sets them up. Only `run` in Kubernetes mode uses it.

pub mod cni;
pub mod routes;

use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;

/// What pod networking needs of a Node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeNet {
    pub name: String,
    pub pod_cidrs: Vec<IpNet>,
    /// InternalIP addresses (one per family).
    pub addresses: Vec<IpAddr>,
}

impl NodeNet {
    /// Reads a Node; unparsable CIDRs or addresses are left out (and returned as problems).
    pub fn from_node(node: &Node) -> (NodeNet, Vec<String>) {
        let name = node.metadata.name.clone().unwrap_or_default();
        let mut problems = Vec::new();
        let spec = node.spec.clone().unwrap_or_default();
        let mut cidrs: Vec<String> = spec.pod_cidrs.unwrap_or_default();
        if let Some(cidr) = spec.pod_cidr {
            if !cidrs.contains(&cidr) {
                cidrs.insert(0, cidr);
            }
        }
        let mut pod_cidrs = Vec::new();
        for (i, c) in cidrs.iter().enumerate() {
            match c.parse::<IpNet>() {
                Ok(net) => pod_cidrs.push(net.trunc()),
                Err(_) => problems.push(format!(
                    "Node {name}: spec.podCIDRs[{i}]: invalid CIDR {c:?}"
                )),
            }
        }
        let addresses = node
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_ref())
            .into_iter()
            .flatten()
            .filter(|a| a.type_ == "InternalIP")
            .filter_map(|a| a.address.parse().ok())
            .collect();
        (
            NodeNet {
                name,
                pod_cidrs,
                addresses,
            },
            problems,
        )
    }
}
