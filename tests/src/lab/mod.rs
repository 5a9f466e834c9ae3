//! The local lab: a simulated Kubernetes cluster of one or two nodes made of network namespaces.
//!
//! Each node is a network namespace with no link to the machine's root namespace (two nodes are
//! joined to each other by a veth pair, as kind's nodes share a docker network); every pod is a
//! network namespace attached to its node by the CNI `ptp` plugin (host-local IPAM, IPv4 or
//! dual-stack), the way a container runtime does it. The lab also plays the control plane's
//! part: ClusterIPs and endpoints for Services, kube-proxy's iptables rules in every node, and
//! cluster DNS (dnsmasq in a CoreDNS pod). Only namespaces (and /etc/netns files for them) are
//! created outside the lab's own namespaces, and probes only target addresses the lab assigned.
//!
//! Layout: `spec` parses the manifests and `options` the request; `names` and `state` own
//! naming and the on-disk record; `netns`, `cni` and `topology` create and wire namespaces;
//! `services`, `kube_proxy`, `dns`, `dnsmasq` and `etc_netns` are the control plane's part;
//! `server`, `probe` and `name_probe` move the traffic; `manifests` writes what an API server
//! would hold; `node` builds and tears down a [`Lab`], `access` is what tests do with one;
//! `chained` adds pods to a running lab through a chained CNI configuration.

mod access;
mod chained;
mod cni;
mod dns;
mod dnsmasq;
mod etc_netns;
mod kube_proxy;
mod manifests;
mod name_probe;
mod names;
mod netns;
mod node;
mod options;
mod probe;
mod server;
mod services;
mod spec;
mod state;
mod topology;

pub use access::LabNode;
pub use chained::{ChainedAdd, ChainedPlugin, ChainedPod};
pub use dns::{CLUSTER_DOMAIN, DNS_NAMESPACE, DNS_POD, DNS_SERVICE};
pub use name_probe::NameProbe;
pub use netns::{in_netns, nsenter_command};
pub use node::{Lab, LabPod};
pub use options::{ClusterOptions, LabOptions, NodeOptions, NODE_NETWORK, NODE_NETWORK_V6};
pub use probe::{Probe, ProbeKind, ProbeOutcome};
pub use services::{
    LabService, LabServicePort, ServiceEndpoint, TargetPort, DNS_CLUSTER_IP, SERVICE_CIDR,
};
pub use spec::{LabSpec, PodPort, Protocol};
