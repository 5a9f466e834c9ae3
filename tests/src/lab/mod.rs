//! The local lab: one simulated Kubernetes node made of network namespaces.
//!
//! The node is a network namespace with no link to the machine's root namespace; every pod is a
//! network namespace attached to the node by the CNI `ptp` plugin (host-local IPAM), the way a
//! container runtime does it. Only namespaces are created in the root namespace, and probes only
//! target addresses the lab itself assigned.
//!
//! Layout: `spec` parses the manifests, `names` and `state` own naming and the on-disk record,
//! `netns` and `cni` create and wire namespaces, `server` and `probe` move the traffic,
//! `manifests` writes what an API server would hold, `node` ties them into [`Lab`].

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
mod probe;
mod server;
mod services;
mod spec;
mod state;

pub use dns::{CLUSTER_DOMAIN, DNS_NAMESPACE, DNS_POD, DNS_SERVICE};
pub use name_probe::NameProbe;
pub use node::{Lab, LabOptions, LabPod};
pub use probe::{Probe, ProbeKind, ProbeOutcome};
pub use services::{
    LabService, LabServicePort, ServiceEndpoint, TargetPort, DNS_CLUSTER_IP, SERVICE_CIDR,
};
pub use spec::{LabSpec, PodPort, Protocol};
