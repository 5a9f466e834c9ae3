//! The cluster as the compiler sees it: only the fields NetworkPolicy semantics use, already
//! validated. Conversion from Kubernetes objects (and its errors) lives in `source`.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::selector::LabelSelector;

pub type Labels = BTreeMap<String, String>;

/// The label every namespace carries with its own name (set by the API server since 1.21).
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// A namespaced object's name: `namespace/name`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ObjectRef {
    pub namespace: String,
    pub name: String,
}

impl ObjectRef {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub const ALL: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];

    /// The IP protocol number, as in the packet and in `NP_POLICY` keys.
    pub const fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        }
    }

    pub fn from_number(n: u8) -> Option<Protocol> {
        Protocol::ALL.into_iter().find(|p| p.number() == n)
    }

    pub const fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }

    pub fn parse(s: &str) -> Option<Protocol> {
        Protocol::ALL.into_iter().find(|p| p.name() == s)
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ContainerPort {
    pub name: Option<String>,
    pub port: u16,
    pub protocol: Protocol,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Namespace {
    pub name: String,
    /// Includes `kubernetes.io/metadata.name`.
    pub labels: Labels,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    pub id: ObjectRef,
    pub labels: Labels,
    pub node_name: Option<String>,
    pub ips: Vec<IpAddr>,
    pub host_network: bool,
    pub ports: Vec<ContainerPort>,
}

impl Pod {
    /// The ports a named port resolves to on this pod, for one protocol.
    pub fn named_port(&self, name: &str, protocol: Protocol) -> Option<u16> {
        self.ports
            .iter()
            .find(|p| p.protocol == protocol && p.name.as_deref() == Some(name))
            .map(|p| p.port)
    }

    /// Named ports as a canonical set, part of a pod's identity.
    pub fn named_ports(&self) -> BTreeSet<(String, Protocol, u16)> {
        self.ports
            .iter()
            .filter_map(|p| Some((p.name.clone()?, p.protocol, p.port)))
            .collect()
    }
}

/// One peer of a rule. `from`/`to` entries are ORed; the selectors inside one entry are ANDed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peer {
    /// `podSelector` and/or `namespaceSelector`. `namespaces: None` means the policy's own
    /// namespace; `pods: None` means every pod of the selected namespaces.
    Pods {
        namespaces: Option<LabelSelector>,
        pods: Option<LabelSelector>,
    },
    IpBlock {
        cidr: IpNet,
        except: Vec<IpNet>,
    },
}

/// One entry of a rule's `ports`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PortSpec {
    /// `port` (and `endPort`) numbers: an inclusive range.
    Range {
        protocol: Protocol,
        first: u16,
        last: u16,
    },
    /// A named container port, resolved per pod.
    Named { protocol: Protocol, name: String },
    /// `protocol` with no `port`: every port of that protocol.
    AllOf { protocol: Protocol },
}

/// An ingress or egress rule. Empty `peers`: every peer. Empty `ports`: every port and protocol.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Rule {
    pub peers: Vec<Peer>,
    pub ports: Vec<PortSpec>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub id: ObjectRef,
    pub pod_selector: LabelSelector,
    /// Directions the policy isolates (its effective `policyTypes`).
    pub ingress_isolates: bool,
    pub egress_isolates: bool,
    pub ingress: Vec<Rule>,
    pub egress: Vec<Rule>,
}

impl Policy {
    /// A policy that isolates what it selects in the given directions and allows nothing:
    /// what an invalid policy becomes (fail closed).
    pub fn deny_only(mut self) -> Policy {
        self.ingress.clear();
        self.egress.clear();
        self
    }
}

/// A port of a Service that has a ClusterIP: where a pod's packet is addressed before
/// kube-proxy's DNAT sends it to one of the port's backends.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ServicePort {
    pub service: ObjectRef,
    /// The port's name ("" when the Service has a single unnamed port), as EndpointSlices
    /// name it.
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub id: ObjectRef,
    /// ClusterIPs (both families on a dual-stack Service). Headless Services have none and
    /// need nothing here: their names resolve to pod addresses.
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
}

/// A ready endpoint of a Service port: the backend address and its target port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Backend {
    pub ip: IpAddr,
    pub port: u16,
}

/// Everything the compiler reads, from whichever source.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub namespaces: BTreeMap<String, Namespace>,
    /// Pods with an address: the only ones the compiler sees.
    pub pods: Vec<Pod>,
    /// Pods the source lists without an address yet (the API reports it after the sandbox is
    /// wired). They take part in nothing until [`Snapshot::adopt_addresses`] gives them the
    /// addresses their CNI ADD reported.
    pub unaddressed: Vec<Pod>,
    pub policies: Vec<Policy>,
    pub services: Vec<Service>,
    /// Ready backends per (Service, port name, protocol), from EndpointSlices.
    pub backends: BTreeMap<(ObjectRef, String, Protocol), BTreeSet<Backend>>,
}

impl Snapshot {
    /// Files a converted pod with the pods or, without an address, with the unaddressed.
    pub fn add_pod(&mut self, pod: Pod) {
        if pod.ips.is_empty() {
            self.unaddressed.push(pod);
        } else {
            self.pods.push(pod);
        }
    }

    /// Gives each unaddressed pod the addresses its CNI ADD reported, so it is enforced (and a
    /// peer) from its first packet rather than once the API reports its address. A pod the
    /// source lists with addresses keeps its own. Returns how many pods it addressed.
    pub fn adopt_addresses(&mut self, reported: &BTreeMap<ObjectRef, Vec<IpAddr>>) -> usize {
        let (adopted, waiting): (Vec<Pod>, Vec<Pod>) = std::mem::take(&mut self.unaddressed)
            .into_iter()
            .partition(|p| reported.get(&p.id).is_some_and(|ips| !ips.is_empty()));
        self.unaddressed = waiting;
        let count = adopted.len();
        for mut pod in adopted {
            pod.ips = reported[&pod.id].clone();
            self.pods.push(pod);
        }
        count
    }

    /// The ready backends of a Service port (none when no EndpointSlice lists any).
    pub fn backends_of(&self, port: &ServicePort) -> impl Iterator<Item = &Backend> {
        self.backends
            .get(&(port.service.clone(), port.name.clone(), port.protocol))
            .into_iter()
            .flatten()
    }

    /// A namespace's labels; one absent from the snapshot still carries its name label.
    pub fn namespace_labels(&self, name: &str) -> Labels {
        match self.namespaces.get(name) {
            Some(ns) => ns.labels.clone(),
            None => Labels::from([(NAMESPACE_NAME_LABEL.to_string(), name.to_string())]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, ips: &[&str]) -> Pod {
        Pod {
            id: ObjectRef::new("ns", name),
            labels: Labels::new(),
            node_name: Some("n1".into()),
            ips: ips.iter().map(|ip| ip.parse().unwrap()).collect(),
            host_network: false,
            ports: Vec::new(),
        }
    }

    #[test]
    fn reported_addresses_go_only_to_pods_the_source_lists_without_one() {
        let mut snap = Snapshot::default();
        snap.add_pod(pod("listed", &["10.0.0.2"]));
        snap.add_pod(pod("new", &[]));
        snap.add_pod(pod("other", &[]));
        assert_eq!(snap.pods.len(), 1);
        assert_eq!(snap.unaddressed.len(), 2);
        let reported = BTreeMap::from([
            (
                ObjectRef::new("ns", "listed"),
                vec!["10.0.0.9".parse().unwrap()],
            ),
            (
                ObjectRef::new("ns", "new"),
                vec!["10.0.0.3".parse().unwrap()],
            ),
            (
                ObjectRef::new("ns", "gone"),
                vec!["10.0.0.4".parse().unwrap()],
            ),
        ]);
        assert_eq!(snap.adopt_addresses(&reported), 1);
        let ips = |name: &str| {
            snap.pods
                .iter()
                .find(|p| p.id.name == name)
                .map(|p| p.ips.clone())
        };
        assert_eq!(
            ips("listed"),
            Some(vec!["10.0.0.2".parse().unwrap()]),
            "the source wins"
        );
        assert_eq!(ips("new"), Some(vec!["10.0.0.3".parse().unwrap()]));
        assert_eq!(ips("other"), None, "no report: still waiting");
        assert_eq!(snap.unaddressed.len(), 1);
    }
}
