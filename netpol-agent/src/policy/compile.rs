//! Snapshot -> the contents of the kernel maps.
//!
//! Two indirections keep updates small and lookups constant-time:
//! - **Identities**: pods with the same namespace, labels and named ports share an identity
//!   (the ipcache maps each pod IP to it). Policy entries name identities, not pods, so a new
//!   replica of an existing workload changes one ipcache entry and nothing else.
//! - **Classes**: pods selected by the same policies (and, where rules use named ports on
//!   ingress, with the same named ports) share a class per direction. Policy and CIDR entries
//!   are keyed by class, so a thousand replicas cost one set of entries.
//!
//! Ids are stable: a compilation keeps every id the previous one gave to the same content
//! (`Allocation`), and numbers new content in sorted order. The same snapshot compiles to the
//! same maps, and a change touches only the entries it must. A relabel has an incremental path
//! (`Compiled::relabel_pod`) that recomputes one identity's and one class's entries.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
};

use ipnet::IpNet;
use netpol_common::{identity, Direction};
use serde::{Deserialize, Serialize};

use super::{
    entries::{cidr_sets, class_entries, close, ClassEntries, ClassRule, ClassSpec, Cluster},
    model::{Labels, ObjectRef, Pod, Policy, PortSpec, Protocol, Rule, ServicePort, Snapshot},
    ports::PortPrefix,
};

/// Which pods get an endpoint (and so are enforced).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Scope {
    /// Pods whose `spec.nodeName` is this node: what an agent enforces.
    Node(String),
    /// Every pod: what `simulate` evaluates.
    #[default]
    Cluster,
}

/// A rule of a policy, as `simulate` and `dump` name it: `ns/policy#ingress[0]`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RuleRef {
    pub policy: ObjectRef,
    #[serde(with = "direction_name")]
    pub direction: Direction,
    pub index: usize,
}

impl fmt::Display for RuleRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}#{}[{}]",
            self.policy,
            self.direction.name(),
            self.index
        )
    }
}

/// What an identity stands for.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct IdentityKey {
    pub namespace: String,
    pub labels: Labels,
    pub named_ports: BTreeSet<(String, Protocol, u16)>,
}

impl IdentityKey {
    pub fn of(pod: &Pod) -> Self {
        Self {
            namespace: pod.id.namespace.clone(),
            labels: pod.labels.clone(),
            named_ports: pod.named_ports(),
        }
    }

    pub fn named_port(&self, name: &str, protocol: Protocol) -> Option<u16> {
        self.named_ports
            .iter()
            .find(|(n, p, _)| n == name && *p == protocol)
            .map(|(_, _, port)| *port)
    }
}

/// One direction of an endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Isolation {
    pub isolated: bool,
    /// 0 when not isolated.
    pub class: u32,
    /// Policies that select the pod for this direction.
    pub policies: Vec<ObjectRef>,
}

/// A pod this scope enforces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub pod: ObjectRef,
    pub ips: Vec<IpAddr>,
    pub identity: u32,
    pub ingress: Isolation,
    pub egress: Isolation,
}

impl Endpoint {
    pub fn isolation(&self, dir: Direction) -> &Isolation {
        match dir {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }
}

/// An `NP_POLICY` entry. `proto: None` matches every protocol (and port); `port: None` every
/// port of `proto`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyEntry {
    pub class: u32,
    pub peer: u32,
    pub proto: Option<u8>,
    pub port: Option<PortPrefix>,
}

impl PolicyEntry {
    /// Whether every packet this entry matches is also matched by `self` (same class and peer).
    pub fn covers(&self, other: &PolicyEntry) -> bool {
        match (self.proto, other.proto) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(a), Some(b)) if a != b => false,
            (Some(_), Some(_)) => match (self.port, other.port) {
                (None, _) => true,
                (Some(_), None) => false,
                (Some(a), Some(b)) => a.bits <= b.bits && a.contains(b.value),
            },
        }
    }
}

/// An `NP_CIDR` entry: an address prefix of one class's ipBlock peers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CidrEntry {
    pub class: u32,
    pub net: IpNet,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClassInfo {
    pub direction: Direction,
    pub policies: Vec<ObjectRef>,
}

/// The compiled contents of every map, keyed by pod where the kernel keys by interface.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Compiled {
    pub identities: BTreeMap<u32, IdentityKey>,
    pub ipcache: BTreeMap<IpNet, u32>,
    pub endpoints: BTreeMap<ObjectRef, Endpoint>,
    pub classes: BTreeMap<u32, ClassInfo>,
    pub policy: BTreeMap<PolicyEntry, u32>,
    pub cidr: BTreeMap<CidrEntry, u32>,
    /// Rule set id -> the rules that allow an entry. Id 0 is the empty set.
    pub rule_sets: BTreeMap<u32, BTreeSet<RuleRef>>,
    /// Problems that did not stop compilation (duplicate addresses, unresolved names).
    pub warnings: Vec<String>,
    /// The ids handed out, to keep them stable in the next compilation.
    pub allocation: Allocation,
    /// Every peer pod's identity.
    pub pod_identity: BTreeMap<ObjectRef, u32>,
    /// ClusterIP, protocol and port -> the Service port's identity (`NP_SERVICES`).
    pub services: BTreeMap<ServiceAddr, u32>,
    /// What each Service port identity stands for.
    pub service_ports: BTreeMap<u32, ServicePort>,
    /// The policy entries derived for Service ports (a subset of `policy`).
    pub service_entries: BTreeSet<PolicyEntry>,
    pub scope: Scope,
}

/// A Service port as a pod addresses it: ClusterIP, protocol, Service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceAddr {
    pub ip: IpAddr,
    pub protocol: Protocol,
    pub port: u16,
}

/// Everything a class's content depends on; classes with equal keys are shared.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ClassKey {
    #[serde(with = "direction_name")]
    pub direction: Direction,
    /// Selecting policies, sorted.
    pub policies: Vec<ObjectRef>,
    /// Only when a selecting policy uses named ports on ingress: the destination pod's ports.
    pub named_ports: Option<BTreeSet<(String, Protocol, u16)>>,
}

/// Keys an incremental update changed (added, removed or re-valued), for a diff that looks
/// only at them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Touched {
    pub policy: BTreeSet<PolicyEntry>,
    pub cidr: BTreeSet<CidrEntry>,
    pub ipcache: BTreeSet<IpNet>,
    pub endpoints: BTreeSet<ObjectRef>,
}

/// Ids handed out so far. Ids are never reused for other content: a packet in flight never
/// meets an id that changed meaning. Persisted beside the maps (`Allocation::to_json`), so a
/// restarted agent keeps them too.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Allocation {
    #[serde(with = "as_pairs")]
    pub identities: BTreeMap<IdentityKey, u32>,
    #[serde(with = "as_pairs")]
    pub classes: BTreeMap<ClassKey, u32>,
    #[serde(with = "as_pairs")]
    pub rule_sets: BTreeMap<BTreeSet<RuleRef>, u32>,
    #[serde(with = "as_pairs")]
    pub services: BTreeMap<ServicePort, u32>,
    pub next_identity: u32,
    pub next_class: u32,
    pub next_rule_set: u32,
    pub next_service: u32,
}

/// Maps with structured keys, as JSON arrays of `[key, id]` pairs.
mod as_pairs {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<K: Serialize, S: Serializer>(
        map: &BTreeMap<K, u32>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_seq(map.iter())
    }

    pub fn deserialize<'de, K, D>(d: D) -> Result<BTreeMap<K, u32>, D::Error>
    where
        K: Deserialize<'de> + Ord,
        D: Deserializer<'de>,
    {
        Ok(Vec::<(K, u32)>::deserialize(d)?.into_iter().collect())
    }
}

/// `Direction` by name (`netpol-common` stays free of serde).
mod direction_name {
    use netpol_common::Direction;
    use serde::{de::Error as _, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(dir: &Direction, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(dir.name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Direction, D::Error> {
        let name = String::deserialize(d)?;
        Direction::ALL
            .into_iter()
            .find(|dir| dir.name() == name)
            .ok_or_else(|| D::Error::custom(format!("unknown direction {name:?}")))
    }
}

impl Allocation {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("an allocation serialises")
    }

    pub fn from_json(text: &str) -> Result<Allocation, serde_json::Error> {
        serde_json::from_str(text)
    }

    fn counters_from(prev: &Allocation) -> Allocation {
        Allocation {
            next_identity: prev.next_identity.max(identity::FIRST_POD),
            next_class: prev.next_class.max(1),
            next_rule_set: prev.next_rule_set.max(1),
            next_service: prev.next_service.max(identity::FIRST_SERVICE),
            ..Default::default()
        }
    }

    pub(super) fn service(&mut self, key: &ServicePort, prev: &BTreeMap<ServicePort, u32>) -> u32 {
        if let Some(&id) = self.services.get(key).or_else(|| prev.get(key)) {
            self.services.insert(key.clone(), id);
            return id;
        }
        let id = self.next_service;
        self.next_service += 1;
        self.services.insert(key.clone(), id);
        id
    }

    pub(super) fn identity(&mut self, key: &IdentityKey, prev: &BTreeMap<IdentityKey, u32>) -> u32 {
        if let Some(&id) = self.identities.get(key).or_else(|| prev.get(key)) {
            self.identities.insert(key.clone(), id);
            return id;
        }
        let id = self.next_identity;
        self.next_identity += 1;
        self.identities.insert(key.clone(), id);
        id
    }

    pub(super) fn class(&mut self, key: &ClassKey, prev: &BTreeMap<ClassKey, u32>) -> u32 {
        if let Some(&id) = self.classes.get(key).or_else(|| prev.get(key)) {
            self.classes.insert(key.clone(), id);
            return id;
        }
        let id = self.next_class;
        self.next_class += 1;
        self.classes.insert(key.clone(), id);
        id
    }

    pub(super) fn rule_set(
        &mut self,
        rules: BTreeSet<RuleRef>,
        prev: &BTreeMap<BTreeSet<RuleRef>, u32>,
    ) -> u32 {
        if let Some(&id) = self.rule_sets.get(&rules).or_else(|| prev.get(&rules)) {
            self.rule_sets.insert(rules, id);
            return id;
        }
        let id = self.next_rule_set;
        self.next_rule_set += 1;
        self.rule_sets.insert(rules, id);
        id
    }
}

/// Compiles with fresh ids (sorted order of content).
pub fn compile(snapshot: &Snapshot, scope: &Scope, host_addrs: &[IpAddr]) -> Compiled {
    compile_with(snapshot, scope, host_addrs, &Allocation::default())
}

/// Pods that are peers: they have an address and their own network namespace.
pub(super) fn peer_pods(snapshot: &Snapshot) -> Vec<&Pod> {
    snapshot
        .pods
        .iter()
        .filter(|p| !p.host_network && !p.ips.is_empty())
        .collect()
}

fn is_local(scope: &Scope, pod: &Pod) -> bool {
    match scope {
        Scope::Cluster => true,
        Scope::Node(node) => pod.node_name.as_deref() == Some(node.as_str()),
    }
}

/// Compiles, keeping the ids `prev` gave to content that is still there.
pub fn compile_with(
    snapshot: &Snapshot,
    scope: &Scope,
    host_addrs: &[IpAddr],
    prev: &Allocation,
) -> Compiled {
    let mut out = Compiled {
        scope: scope.clone(),
        allocation: Allocation::counters_from(prev),
        ..Default::default()
    };
    out.rule_sets.insert(0, BTreeSet::new());
    let pods = peer_pods(snapshot);

    let keys: BTreeSet<IdentityKey> = pods.iter().map(|p| IdentityKey::of(p)).collect();
    for key in &keys {
        let id = out.allocation.identity(key, &prev.identities);
        out.identities.insert(id, key.clone());
    }
    for pod in &pods {
        out.pod_identity.insert(
            pod.id.clone(),
            out.allocation.identities[&IdentityKey::of(pod)],
        );
    }
    fill_ipcache(&mut out, &pods, host_addrs);

    let policies = policy_index(snapshot);
    let ns_labels = namespace_labels(snapshot, &pods);
    let cluster = cluster(&out.identities, &ns_labels, &pods);

    // Classes: group local pods by what their rules depend on.
    let local: Vec<&Pod> = pods
        .iter()
        .copied()
        .filter(|p| is_local(scope, p))
        .collect();
    let mut pod_class: BTreeMap<(&ObjectRef, Direction), ClassKey> = BTreeMap::new();
    for pod in &local {
        for dir in Direction::ALL {
            pod_class.insert((&pod.id, dir), class_key(snapshot, pod, dir));
        }
    }
    let distinct: BTreeSet<&ClassKey> = pod_class
        .values()
        .filter(|k| !k.policies.is_empty())
        .collect();
    let mut emitted = Emitted::default();
    let mut class_ids = BTreeMap::new();
    for key in distinct {
        let id = out.allocation.class(key, &prev.classes);
        class_ids.insert(key, id);
    }
    let mut ordered: Vec<(&ClassKey, u32)> = class_ids.iter().map(|(k, id)| (*k, *id)).collect();
    ordered.sort_by_key(|(_, id)| *id);
    for (key, id) in ordered {
        let spec = class_spec(&policies, key);
        let entries = class_entries(&cluster, &spec);
        emitted.class(id, entries, &mut out.allocation, &prev.rule_sets);
        emitted.classes.insert(id, class_info(key));
    }
    out.policy = emitted.policy;
    out.cidr = emitted.cidr;
    out.classes = emitted.classes;

    for pod in &local {
        let isolation = |dir: Direction| {
            let key = &pod_class[&(&pod.id, dir)];
            isolation(key, class_ids.get(key).copied())
        };
        out.endpoints.insert(
            pod.id.clone(),
            Endpoint {
                pod: pod.id.clone(),
                ips: pod.ips.clone(),
                identity: out.pod_identity[&pod.id],
                ingress: isolation(Direction::Ingress),
                egress: isolation(Direction::Egress),
            },
        );
    }
    out.derive_services(
        snapshot,
        &prev.services,
        &prev.rule_sets,
        &mut Touched::default(),
    );
    out.refresh_rule_sets();
    out
}

/// The cluster as entries see it, with identities indexed by namespace.
pub(super) fn cluster<'a>(
    identities: &'a BTreeMap<u32, IdentityKey>,
    ns_labels: &'a BTreeMap<String, Labels>,
    pods: &'a [&'a Pod],
) -> Cluster<'a> {
    let mut by_namespace: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
    for (id, key) in identities {
        by_namespace
            .entry(key.namespace.as_str())
            .or_default()
            .push(*id);
    }
    Cluster {
        identities,
        by_namespace,
        ns_labels,
        pods,
    }
}

pub(super) fn isolation(key: &ClassKey, class: Option<u32>) -> Isolation {
    Isolation {
        isolated: !key.policies.is_empty(),
        class: class.unwrap_or(0),
        policies: key.policies.clone(),
    }
}

pub(super) fn class_info(key: &ClassKey) -> ClassInfo {
    ClassInfo {
        direction: key.direction,
        policies: key.policies.clone(),
    }
}

pub(super) fn policy_index(snapshot: &Snapshot) -> BTreeMap<&ObjectRef, &Policy> {
    snapshot.policies.iter().map(|p| (&p.id, p)).collect()
}

/// The rules of a class's policies, in policy order.
pub(super) fn class_spec<'a>(
    policies: &BTreeMap<&ObjectRef, &'a Policy>,
    key: &'a ClassKey,
) -> ClassSpec<'a> {
    let mut rules = Vec::new();
    for id in &key.policies {
        let Some(policy) = policies.get(id) else {
            continue;
        };
        for (index, rule) in rules_of(policy, key.direction).iter().enumerate() {
            rules.push(ClassRule {
                rule_ref: RuleRef {
                    policy: policy.id.clone(),
                    direction: key.direction,
                    index,
                },
                policy_ns: &policy.id.namespace,
                rule,
            });
        }
    }
    ClassSpec {
        direction: key.direction,
        rules,
        dest_named: key.named_ports.as_ref(),
    }
}

/// Output maps being filled, class by class.
#[derive(Default)]
pub(super) struct Emitted {
    pub(super) policy: BTreeMap<PolicyEntry, u32>,
    pub(super) cidr: BTreeMap<CidrEntry, u32>,
    pub(super) classes: BTreeMap<u32, ClassInfo>,
}

impl Emitted {
    pub(super) fn class(
        &mut self,
        class: u32,
        entries: ClassEntries,
        alloc: &mut Allocation,
        prev: &BTreeMap<BTreeSet<RuleRef>, u32>,
    ) {
        let (cidr, mut policy) = cidr_sets(class, &entries.cidr);
        self.cidr.extend(cidr);
        policy.extend(entries.policy);
        self.policy_entries(class, &policy, alloc, prev);
    }

    pub(super) fn policy_entries(
        &mut self,
        class: u32,
        entries: &BTreeMap<PolicyEntry, BTreeSet<RuleRef>>,
        alloc: &mut Allocation,
        prev: &BTreeMap<BTreeSet<RuleRef>, u32>,
    ) {
        for (entry, rules) in close(entries) {
            let set = alloc.rule_set(rules, prev);
            self.policy.insert(PolicyEntry { class, ..entry }, set);
        }
    }
}

fn fill_ipcache(out: &mut Compiled, pods: &[&Pod], host_addrs: &[IpAddr]) {
    for addr in host_addrs {
        out.ipcache.insert(IpNet::from(*addr), identity::HOST);
    }
    for pod in pods {
        let id = out.pod_identity[&pod.id];
        // Each pod comes once: an entry already there is the node's or an earlier pod's.
        let _ = set_pod_addresses(out, pod, id, &|_, _| true);
    }
}

/// Points the pod's addresses at `id`. An address another pod or the node already holds is
/// kept as it is (and reported): `claimed_elsewhere(address, current identity)` says whether
/// the current entry belongs to someone else.
pub(super) fn set_pod_addresses(
    out: &mut Compiled,
    pod: &Pod,
    id: u32,
    claimed_elsewhere: &dyn Fn(&IpAddr, u32) -> bool,
) -> Vec<IpNet> {
    let mut set = Vec::new();
    for ip in &pod.ips {
        let net = IpNet::from(*ip);
        match out.ipcache.get(&net) {
            Some(&existing) if existing != id && claimed_elsewhere(ip, existing) => {
                out.warnings.push(format!(
                    "pod {}: address {ip} already belongs to identity {existing}; keeping that one",
                    pod.id
                ));
            }
            _ => {
                out.ipcache.insert(net, id);
                set.push(net);
            }
        }
    }
    set
}

pub(super) fn namespace_labels(snapshot: &Snapshot, pods: &[&Pod]) -> BTreeMap<String, Labels> {
    let mut names: BTreeSet<&str> = snapshot.namespaces.keys().map(String::as_str).collect();
    names.extend(pods.iter().map(|p| p.id.namespace.as_str()));
    names
        .into_iter()
        .map(|n| (n.to_string(), snapshot.namespace_labels(n)))
        .collect()
}

fn rules_of(policy: &Policy, dir: Direction) -> &[Rule] {
    match dir {
        Direction::Ingress => &policy.ingress,
        Direction::Egress => &policy.egress,
    }
}

fn isolates(policy: &Policy, dir: Direction) -> bool {
    match dir {
        Direction::Ingress => policy.ingress_isolates,
        Direction::Egress => policy.egress_isolates,
    }
}

pub(super) fn class_key(snapshot: &Snapshot, pod: &Pod, dir: Direction) -> ClassKey {
    let selecting: Vec<&Policy> = snapshot
        .policies
        .iter()
        .filter(|p| {
            p.id.namespace == pod.id.namespace
                && isolates(p, dir)
                && p.pod_selector.matches(&pod.labels)
        })
        .collect();
    let uses_named = dir == Direction::Ingress
        && selecting
            .iter()
            .flat_map(|p| rules_of(p, dir))
            .flat_map(|r| &r.ports)
            .any(|p| matches!(p, PortSpec::Named { .. }));
    let mut policies: Vec<ObjectRef> = selecting.iter().map(|p| p.id.clone()).collect();
    policies.sort();
    policies.dedup();
    ClassKey {
        direction: dir,
        policies,
        named_ports: uses_named.then(|| pod.named_ports()),
    }
}
