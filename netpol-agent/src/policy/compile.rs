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
//! Ids are assigned in sorted order of their content, so the same snapshot always compiles to
//! the same maps (`apply` twice changes nothing).

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
};

use ipnet::IpNet;
use netpol_common::{identity, Direction};

use super::{
    model::{Labels, ObjectRef, Peer, Pod, Policy, PortSpec, Protocol, Rule, Snapshot},
    ports::{prefixes, PortPrefix},
};

/// Which pods get an endpoint (and so are enforced).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Pods whose `spec.nodeName` is this node: what an agent enforces.
    Node(String),
    /// Every pod: what `simulate` evaluates.
    Cluster,
}

/// A rule of a policy, as `simulate` and `dump` name it: `ns/policy#ingress[0]`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RuleRef {
    pub policy: ObjectRef,
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
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct IdentityKey {
    pub namespace: String,
    pub labels: Labels,
    pub named_ports: BTreeSet<(String, Protocol, u16)>,
}

impl IdentityKey {
    fn of(pod: &Pod) -> Self {
        Self {
            namespace: pod.id.namespace.clone(),
            labels: pod.labels.clone(),
            named_ports: pod.named_ports(),
        }
    }

    fn named_port(&self, name: &str, protocol: Protocol) -> Option<u16> {
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
    fn covers(&self, other: &PolicyEntry) -> bool {
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
}

/// Resolves a named port for a protocol on some pod.
type NamedPorts<'a> = &'a dyn Fn(&str, Protocol) -> Option<u16>;

/// How a resolved port appears in a policy entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum PortMatch {
    Any,
    Proto(u8),
    Prefix(u8, PortPrefix),
}

/// A CIDR peer of one rule, with its ports already resolved.
struct CidrRule {
    net: IpNet,
    except: Vec<IpNet>,
    ports: Vec<PortMatch>,
    rule: RuleRef,
}

/// Entries of one class, before rule sets are numbered.
#[derive(Default)]
struct ClassEntries {
    policy: BTreeMap<PolicyEntry, BTreeSet<RuleRef>>,
    cidr: Vec<CidrRule>,
}

/// Everything a class's content depends on; classes with equal keys are shared.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct ClassKey {
    direction: Direction,
    policies: Vec<usize>,
    /// Only when a selecting policy uses named ports on ingress: the destination pod's ports.
    named_ports: Option<BTreeSet<(String, Protocol, u16)>>,
}

pub fn compile(snapshot: &Snapshot, scope: &Scope, host_addrs: &[IpAddr]) -> Compiled {
    let mut out = Compiled::default();
    out.rule_sets.insert(0, BTreeSet::new());

    let pods: Vec<&Pod> = snapshot
        .pods
        .iter()
        .filter(|p| !p.host_network && !p.ips.is_empty())
        .collect();

    // Identities, in sorted order of what they stand for.
    let keys: BTreeSet<IdentityKey> = pods.iter().map(|p| IdentityKey::of(p)).collect();
    let identity_of: BTreeMap<IdentityKey, u32> =
        keys.into_iter().zip(identity::FIRST_POD..).collect();
    out.identities = identity_of.iter().map(|(k, id)| (*id, k.clone())).collect();

    fill_ipcache(&mut out, &pods, &identity_of, host_addrs);

    let ctx = Context {
        identities: &out.identities,
        pods: &pods,
        ns_labels: namespace_labels(snapshot, &pods),
    };

    // Classes: group local pods by what their rules depend on.
    let local: Vec<&Pod> = pods
        .iter()
        .copied()
        .filter(|p| match scope {
            Scope::Cluster => true,
            Scope::Node(node) => p.node_name.as_deref() == Some(node.as_str()),
        })
        .collect();
    let mut class_keys: BTreeMap<(ObjectRef, Direction), ClassKey> = BTreeMap::new();
    // One pod per class: named ingress ports resolve on it (all its class shares them).
    let mut example: BTreeMap<ClassKey, &Pod> = BTreeMap::new();
    for pod in &local {
        for dir in Direction::ALL {
            let key = class_key(snapshot, pod, dir);
            example.entry(key.clone()).or_insert(pod);
            class_keys.insert((pod.id.clone(), dir), key);
        }
    }
    let distinct: BTreeSet<&ClassKey> = class_keys
        .values()
        .filter(|k| !k.policies.is_empty())
        .collect();
    let class_id: BTreeMap<&ClassKey, u32> = distinct.into_iter().zip(1..).collect();

    let mut rule_set_ids: BTreeMap<BTreeSet<RuleRef>, u32> = BTreeMap::new();
    let mut warnings = Vec::new();
    let mut emitted = Compiled::default();
    for (key, &id) in &class_id {
        let policies: Vec<&Policy> = key
            .policies
            .iter()
            .map(|&i| &snapshot.policies[i])
            .collect();
        let dest_pod = example.get(*key).copied();
        let entries = ctx.class_entries(key.direction, &policies, dest_pod, &mut warnings);
        emit_class(&mut emitted, &mut rule_set_ids, id, entries);
        emitted.classes.insert(
            id,
            ClassInfo {
                direction: key.direction,
                policies: policies.iter().map(|p| p.id.clone()).collect(),
            },
        );
    }
    out.policy = emitted.policy;
    out.cidr = emitted.cidr;
    out.classes = emitted.classes;
    out.warnings.extend(warnings);
    for (set, id) in rule_set_ids {
        out.rule_sets.insert(id, set);
    }

    for pod in &local {
        let isolation = |dir: Direction| {
            let key = &class_keys[&(pod.id.clone(), dir)];
            Isolation {
                isolated: !key.policies.is_empty(),
                class: class_id.get(key).copied().unwrap_or(0),
                policies: key
                    .policies
                    .iter()
                    .map(|&i| snapshot.policies[i].id.clone())
                    .collect(),
            }
        };
        out.endpoints.insert(
            pod.id.clone(),
            Endpoint {
                pod: pod.id.clone(),
                ips: pod.ips.clone(),
                identity: identity_of[&IdentityKey::of(pod)],
                ingress: isolation(Direction::Ingress),
                egress: isolation(Direction::Egress),
            },
        );
    }
    out
}

fn fill_ipcache(
    out: &mut Compiled,
    pods: &[&Pod],
    identity_of: &BTreeMap<IdentityKey, u32>,
    host_addrs: &[IpAddr],
) {
    for addr in host_addrs {
        out.ipcache.insert(IpNet::from(*addr), identity::HOST);
    }
    for pod in pods {
        let id = identity_of[&IdentityKey::of(pod)];
        for ip in &pod.ips {
            let net = IpNet::from(*ip);
            if let Some(existing) = out.ipcache.get(&net) {
                out.warnings.push(format!(
                    "pod {}: address {ip} already belongs to identity {existing}; keeping that one",
                    pod.id
                ));
                continue;
            }
            out.ipcache.insert(net, id);
        }
    }
}

fn namespace_labels(snapshot: &Snapshot, pods: &[&Pod]) -> BTreeMap<String, Labels> {
    let mut names: BTreeSet<&str> = snapshot.namespaces.keys().map(String::as_str).collect();
    names.extend(pods.iter().map(|p| p.id.namespace.as_str()));
    names
        .into_iter()
        .map(|n| (n.to_string(), snapshot.namespace_labels(n)))
        .collect()
}

fn rules(policy: &Policy, dir: Direction) -> &[Rule] {
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

fn class_key(snapshot: &Snapshot, pod: &Pod, dir: Direction) -> ClassKey {
    let policies: Vec<usize> = snapshot
        .policies
        .iter()
        .enumerate()
        .filter(|(_, p)| {
            p.id.namespace == pod.id.namespace
                && isolates(p, dir)
                && p.pod_selector.matches(&pod.labels)
        })
        .map(|(i, _)| i)
        .collect();
    let uses_named = dir == Direction::Ingress
        && policies.iter().any(|&i| {
            rules(&snapshot.policies[i], dir)
                .iter()
                .flat_map(|r| &r.ports)
                .any(|p| matches!(p, PortSpec::Named { .. }))
        });
    ClassKey {
        direction: dir,
        policies,
        named_ports: uses_named.then(|| pod.named_ports()),
    }
}

struct Context<'a> {
    identities: &'a BTreeMap<u32, IdentityKey>,
    pods: &'a [&'a Pod],
    ns_labels: BTreeMap<String, Labels>,
}

impl Context<'_> {
    fn class_entries(
        &self,
        dir: Direction,
        policies: &[&Policy],
        dest_pod: Option<&Pod>,
        warnings: &mut Vec<String>,
    ) -> ClassEntries {
        let mut entries = ClassEntries::default();
        for policy in policies {
            for (index, rule) in rules(policy, dir).iter().enumerate() {
                let rule_ref = RuleRef {
                    policy: policy.id.clone(),
                    direction: dir,
                    index,
                };
                self.rule_entries(
                    dir,
                    policy,
                    rule,
                    &rule_ref,
                    dest_pod,
                    &mut entries,
                    warnings,
                );
            }
        }
        entries
    }

    #[allow(clippy::too_many_arguments)]
    fn rule_entries(
        &self,
        dir: Direction,
        policy: &Policy,
        rule: &Rule,
        rule_ref: &RuleRef,
        dest_pod: Option<&Pod>,
        entries: &mut ClassEntries,
        warnings: &mut Vec<String>,
    ) {
        let mut add = |peer: u32, ports: &[PortMatch]| {
            for port in ports {
                let entry = policy_entry(0, peer, *port);
                entries
                    .policy
                    .entry(entry)
                    .or_default()
                    .insert(rule_ref.clone());
            }
        };
        // Ports that do not depend on the peer (numbers, or names resolved on the destination).
        let fixed = |named_on: Option<NamedPorts<'_>>| resolve_ports(&rule.ports, named_on);
        let dest_named =
            |name: &str, proto: Protocol| dest_pod.and_then(|p| p.named_port(name, proto));
        let has_named = rule
            .ports
            .iter()
            .any(|p| matches!(p, PortSpec::Named { .. }));
        let egress_named = dir == Direction::Egress && has_named;

        let peer_ports = |id: u32| -> Vec<PortMatch> {
            let key = &self.identities[&id];
            if egress_named {
                fixed(Some(&|n: &str, p: Protocol| key.named_port(n, p)))
            } else {
                fixed(Some(&dest_named))
            }
        };

        if rule.peers.is_empty() {
            if egress_named {
                // Any peer, but a name only resolves on pods: numbers go to ANY, names per pod.
                add(identity::ANY, &fixed(None));
                for (&id, key) in self.identities {
                    add(
                        id,
                        &resolve_named(&rule.ports, &|n, p| key.named_port(n, p)),
                    );
                }
            } else {
                add(identity::ANY, &fixed(Some(&dest_named)));
            }
            return;
        }
        for peer in &rule.peers {
            match peer {
                Peer::Pods { namespaces, pods } => {
                    for (&id, key) in self.identities {
                        let ns_ok = match namespaces {
                            None => key.namespace == policy.id.namespace,
                            Some(sel) => self
                                .ns_labels
                                .get(&key.namespace)
                                .is_some_and(|l| sel.matches(l)),
                        };
                        let pod_ok = pods.as_ref().is_none_or(|sel| sel.matches(&key.labels));
                        if ns_ok && pod_ok {
                            add(id, &peer_ports(id));
                        }
                    }
                }
                Peer::IpBlock { cidr, except } => {
                    let ports = if egress_named {
                        fixed(None)
                    } else {
                        fixed(Some(&dest_named))
                    };
                    entries.cidr.push(CidrRule {
                        net: cidr.trunc(),
                        except: except.iter().map(IpNet::trunc).collect(),
                        ports,
                        rule: rule_ref.clone(),
                    });
                    if egress_named {
                        // Named ports resolve on the pods inside the block, address by address.
                        for pod in self.pods {
                            let key = IdentityKey::of(pod);
                            let named = resolve_named(&rule.ports, &|n, p| key.named_port(n, p));
                            if named.is_empty() {
                                continue;
                            }
                            for ip in &pod.ips {
                                let inside =
                                    cidr.contains(ip) && !except.iter().any(|e| e.contains(ip));
                                if inside {
                                    entries.cidr.push(CidrRule {
                                        net: IpNet::from(*ip),
                                        except: Vec::new(),
                                        ports: named.clone(),
                                        rule: rule_ref.clone(),
                                    });
                                }
                            }
                        }
                    }
                }
            }
        }
        if has_named && dir == Direction::Ingress && dest_pod.is_none() {
            warnings.push(format!("{rule_ref}: named port with no destination pod"));
        }
    }
}

/// Resolves a rule's ports. Named ports resolve through `named` (None: they are left out).
fn resolve_ports(ports: &[PortSpec], named: Option<NamedPorts<'_>>) -> Vec<PortMatch> {
    if ports.is_empty() {
        return vec![PortMatch::Any];
    }
    let mut out = BTreeSet::new();
    for spec in ports {
        match spec {
            PortSpec::AllOf { protocol } => {
                out.insert(PortMatch::Proto(protocol.number()));
            }
            PortSpec::Range {
                protocol,
                first,
                last,
            } => {
                for p in prefixes(*first, *last) {
                    out.insert(PortMatch::Prefix(protocol.number(), p));
                }
            }
            PortSpec::Named { protocol, name } => {
                if let Some(port) = named.and_then(|f| f(name, *protocol)) {
                    out.insert(PortMatch::Prefix(
                        protocol.number(),
                        PortPrefix {
                            value: port,
                            bits: 16,
                        },
                    ));
                }
            }
        }
    }
    out.into_iter().collect()
}

/// Resolves only the named entries of a rule's ports (none: nothing, not "every port").
fn resolve_named(
    ports: &[PortSpec],
    named: &dyn Fn(&str, Protocol) -> Option<u16>,
) -> Vec<PortMatch> {
    let names: Vec<PortSpec> = ports
        .iter()
        .filter(|p| matches!(p, PortSpec::Named { .. }))
        .cloned()
        .collect();
    if names.is_empty() {
        return Vec::new();
    }
    resolve_ports(&names, Some(named))
}

fn policy_entry(class: u32, peer: u32, port: PortMatch) -> PolicyEntry {
    let (proto, port) = match port {
        PortMatch::Any => (None, None),
        PortMatch::Proto(p) => (Some(p), None),
        PortMatch::Prefix(p, prefix) if prefix.bits == 0 => (Some(p), None),
        PortMatch::Prefix(p, prefix) => (Some(p), Some(prefix)),
    };
    PolicyEntry {
        class,
        peer,
        proto,
        port,
    }
}

/// Numbers a class's entries: CIDR sets, then rule sets with the attribution closure.
fn emit_class(
    out: &mut Compiled,
    rule_set_ids: &mut BTreeMap<BTreeSet<RuleRef>, u32>,
    class: u32,
    entries: ClassEntries,
) {
    let mut policy = entries.policy;

    // CIDR sets: one entry per distinct prefix among all blocks and holes; its set is every
    // rule whose block contains the prefix and none of whose holes does. The longest match
    // for any address then yields exactly the rules that allow it.
    let mut prefixes: BTreeSet<IpNet> = BTreeSet::new();
    for r in &entries.cidr {
        prefixes.insert(r.net);
        prefixes.extend(r.except.iter().copied());
    }
    let mut set_ids: BTreeMap<Vec<usize>, u32> = BTreeMap::new();
    for net in prefixes {
        let members: Vec<usize> = entries
            .cidr
            .iter()
            .enumerate()
            .filter(|(_, r)| r.net.contains(&net) && !r.except.iter().any(|e| e.contains(&net)))
            .map(|(i, _)| i)
            .collect();
        let next = identity::FIRST_CIDR_SET + set_ids.len() as u32;
        let set = *set_ids.entry(members).or_insert(next);
        out.cidr.insert(CidrEntry { class, net }, set);
    }
    for (members, set) in &set_ids {
        for &i in members {
            let r = &entries.cidr[i];
            for port in &r.ports {
                let entry = policy_entry(0, *set, *port);
                policy.entry(entry).or_default().insert(r.rule.clone());
            }
        }
    }

    // Attribution closure: an LPM returns only the longest match, so each entry carries the
    // rules of every broader entry of the same peer.
    let keys: Vec<PolicyEntry> = policy.keys().copied().collect();
    let mut closed: BTreeMap<PolicyEntry, BTreeSet<RuleRef>> = BTreeMap::new();
    for entry in &keys {
        let mut rules = BTreeSet::new();
        for other in keys
            .iter()
            .filter(|o| o.peer == entry.peer && o.covers(entry))
        {
            rules.extend(policy[other].iter().cloned());
        }
        closed.insert(*entry, rules);
    }
    for (entry, rules) in closed {
        let next = rule_set_ids.len() as u32 + 1;
        let id = *rule_set_ids.entry(rules).or_insert(next);
        out.policy.insert(PolicyEntry { class, ..entry }, id);
    }
}
