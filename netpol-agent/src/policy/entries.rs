//! Rules -> LPM entries for one class. One predicate decides whether a peer selects an
//! identity and one function resolves a rule's ports for it; the full compile (rule by rule,
//! through a namespace index) and the incremental one (a single new identity) both use them,
//! so they cannot disagree.

use std::collections::{BTreeMap, BTreeSet};

use ipnet::IpNet;
use netpol_common::{identity, Direction};

use super::{
    compile::{CidrEntry, IdentityKey, PolicyEntry, RuleRef},
    model::{Labels, Peer, Pod, PortSpec, Protocol, Rule},
    ports::{prefixes, PortPrefix},
    selector::LabelSelector,
};

/// Resolves a named port for a protocol on some pod.
type NamedPorts<'a> = &'a dyn Fn(&str, Protocol) -> Option<u16>;

/// How a resolved port appears in a policy entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum PortMatch {
    Any,
    Proto(u8),
    Prefix(u8, PortPrefix),
}

/// One rule of a class, with where it came from.
pub(super) struct ClassRule<'a> {
    pub rule_ref: RuleRef,
    pub policy_ns: &'a str,
    pub rule: &'a Rule,
}

/// What a class's entries depend on.
pub(super) struct ClassSpec<'a> {
    pub direction: Direction,
    pub rules: Vec<ClassRule<'a>>,
    /// The destination pod's named ports (ingress classes whose rules use names).
    pub dest_named: Option<&'a BTreeSet<(String, Protocol, u16)>>,
}

/// The cluster as entries see it.
pub(super) struct Cluster<'a> {
    pub identities: &'a BTreeMap<u32, IdentityKey>,
    /// Identities of each namespace: a peer without namespaceSelector looks only there.
    pub by_namespace: BTreeMap<&'a str, Vec<u32>>,
    pub ns_labels: &'a BTreeMap<String, Labels>,
    pub pods: &'a [&'a Pod],
}

/// A CIDR peer of one rule, with its ports already resolved.
pub(super) struct CidrRule {
    pub net: IpNet,
    pub except: Vec<IpNet>,
    pub ports: Vec<PortMatch>,
    pub rule: RuleRef,
}

/// Entries of one class (class field 0 until emitted), rules not yet numbered into sets.
#[derive(Default)]
pub(super) struct ClassEntries {
    pub policy: BTreeMap<PolicyEntry, BTreeSet<RuleRef>>,
    pub cidr: Vec<CidrRule>,
}

impl Cluster<'_> {
    /// Half of the one predicate: does the peer's `namespaceSelector` (absent: the policy's
    /// own namespace) select namespace `ns`?
    fn namespace_selected(
        &self,
        namespaces: Option<&LabelSelector>,
        policy_ns: &str,
        ns: &str,
    ) -> bool {
        match namespaces {
            None => ns == policy_ns,
            Some(sel) => self.ns_labels.get(ns).is_some_and(|l| sel.matches(l)),
        }
    }

    /// The one predicate: does this `podSelector`/`namespaceSelector` peer select the identity?
    fn selects(
        &self,
        namespaces: Option<&LabelSelector>,
        pods: Option<&LabelSelector>,
        policy_ns: &str,
        key: &IdentityKey,
    ) -> bool {
        self.namespace_selected(namespaces, policy_ns, &key.namespace) && pod_selected(pods, key)
    }
}

/// The other half: does the peer's `podSelector` (absent: every pod) select the identity?
fn pod_selected(pods: Option<&LabelSelector>, key: &IdentityKey) -> bool {
    pods.is_none_or(|sel| sel.matches(&key.labels))
}

fn dest_port(spec: &ClassSpec<'_>, name: &str, proto: Protocol) -> Option<u16> {
    spec.dest_named?
        .iter()
        .find(|(n, p, _)| n == name && *p == proto)
        .map(|(_, _, port)| *port)
}

/// The ports a rule allows towards/from one identity peer.
fn identity_ports(spec: &ClassSpec<'_>, rule: &Rule, key: &IdentityKey) -> Vec<PortMatch> {
    if spec.direction == Direction::Egress {
        // Named ports resolve on the peer (the destination of egress).
        resolve_ports(&rule.ports, Some(&|n, p| key.named_port(n, p)))
    } else {
        resolve_ports(&rule.ports, Some(&|n, p| dest_port(spec, n, p)))
    }
}

fn egress_named(spec: &ClassSpec<'_>, rule: &Rule) -> bool {
    spec.direction == Direction::Egress
        && rule
            .ports
            .iter()
            .any(|p| matches!(p, PortSpec::Named { .. }))
}

fn add(
    entries: &mut BTreeMap<PolicyEntry, BTreeSet<RuleRef>>,
    peer: u32,
    ports: &[PortMatch],
    rule: &RuleRef,
) {
    for port in ports {
        entries
            .entry(policy_entry(0, peer, *port))
            .or_default()
            .insert(rule.clone());
    }
}

/// The entries one identity gets in a class: what adding that identity adds.
pub(super) fn identity_entries(
    cluster: &Cluster<'_>,
    spec: &ClassSpec<'_>,
    id: u32,
) -> BTreeMap<PolicyEntry, BTreeSet<RuleRef>> {
    let key = &cluster.identities[&id];
    let mut out = BTreeMap::new();
    for cr in &spec.rules {
        if cr.rule.peers.is_empty() {
            if egress_named(spec, cr.rule) {
                add(
                    &mut out,
                    id,
                    &resolve_named(&cr.rule.ports, &|n, p| key.named_port(n, p)),
                    &cr.rule_ref,
                );
            }
            continue;
        }
        for peer in &cr.rule.peers {
            if let Peer::Pods { namespaces, pods } = peer {
                if cluster.selects(namespaces.as_ref(), pods.as_ref(), cr.policy_ns, key) {
                    add(
                        &mut out,
                        id,
                        &identity_ports(spec, cr.rule, key),
                        &cr.rule_ref,
                    );
                }
            }
        }
    }
    out
}

/// Every entry of a class: any-peer, CIDR and identity entries.
pub(super) fn class_entries(cluster: &Cluster<'_>, spec: &ClassSpec<'_>) -> ClassEntries {
    let mut out = ClassEntries::default();
    for cr in &spec.rules {
        let rule = cr.rule;
        let named = egress_named(spec, rule);
        // Ports that do not depend on a peer identity.
        let fixed = if named {
            resolve_ports(&rule.ports, None)
        } else {
            resolve_ports(&rule.ports, Some(&|n, p| dest_port(spec, n, p)))
        };
        if rule.peers.is_empty() {
            add(&mut out.policy, identity::ANY, &fixed, &cr.rule_ref);
            if named {
                // Any peer, but a name only resolves on pods: names go per identity.
                for (&id, key) in cluster.identities {
                    add(
                        &mut out.policy,
                        id,
                        &resolve_named(&rule.ports, &|n, p| key.named_port(n, p)),
                        &cr.rule_ref,
                    );
                }
            }
            continue;
        }
        for peer in &rule.peers {
            match peer {
                Peer::Pods { namespaces, pods } => {
                    // `selects`, evaluated namespace by namespace: each namespace selector once.
                    for (ns, ids) in &cluster.by_namespace {
                        if !cluster.namespace_selected(namespaces.as_ref(), cr.policy_ns, ns) {
                            continue;
                        }
                        for id in ids {
                            let key = &cluster.identities[id];
                            if pod_selected(pods.as_ref(), key) {
                                add(
                                    &mut out.policy,
                                    *id,
                                    &identity_ports(spec, rule, key),
                                    &cr.rule_ref,
                                );
                            }
                        }
                    }
                }
                Peer::IpBlock { cidr, except } => {
                    out.cidr.push(CidrRule {
                        net: cidr.trunc(),
                        except: except.iter().map(IpNet::trunc).collect(),
                        ports: fixed.clone(),
                        rule: cr.rule_ref.clone(),
                    });
                    if named {
                        // Named ports resolve on the pods inside the block, address by address.
                        for pod in cluster.pods {
                            let ports = resolve_named(&rule.ports, &|n, p| pod.named_port(n, p));
                            if ports.is_empty() {
                                continue;
                            }
                            for ip in &pod.ips {
                                if cidr.contains(ip) && !except.iter().any(|e| e.contains(ip)) {
                                    out.cidr.push(CidrRule {
                                        net: IpNet::from(*ip),
                                        except: Vec::new(),
                                        ports: ports.clone(),
                                        rule: cr.rule_ref.clone(),
                                    });
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    out
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
fn resolve_named(ports: &[PortSpec], named: NamedPorts<'_>) -> Vec<PortMatch> {
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

pub(super) fn policy_entry(class: u32, peer: u32, port: PortMatch) -> PolicyEntry {
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

/// CIDR sets of a class: one entry per distinct prefix among all blocks and holes; its set is
/// every rule whose block contains the prefix and none of whose holes does. The longest match
/// for any address then yields exactly the rules that allow it. Returns the CIDR entries and
/// the policy entries of each set.
pub(super) fn cidr_sets(
    class: u32,
    cidr: &[CidrRule],
) -> (
    BTreeMap<CidrEntry, u32>,
    BTreeMap<PolicyEntry, BTreeSet<RuleRef>>,
) {
    let mut prefixes: BTreeSet<IpNet> = BTreeSet::new();
    for r in cidr {
        prefixes.insert(r.net);
        prefixes.extend(r.except.iter().copied());
    }
    let mut set_ids: BTreeMap<Vec<usize>, u32> = BTreeMap::new();
    let mut entries = BTreeMap::new();
    for net in prefixes {
        let members: Vec<usize> = cidr
            .iter()
            .enumerate()
            .filter(|(_, r)| r.net.contains(&net) && !r.except.iter().any(|e| e.contains(&net)))
            .map(|(i, _)| i)
            .collect();
        let next = identity::FIRST_CIDR_SET + set_ids.len() as u32;
        let set = *set_ids.entry(members).or_insert(next);
        entries.insert(CidrEntry { class, net }, set);
    }
    let mut policy: BTreeMap<PolicyEntry, BTreeSet<RuleRef>> = BTreeMap::new();
    for (members, set) in &set_ids {
        for &i in members {
            add(&mut policy, *set, &cidr[i].ports, &cidr[i].rule);
        }
    }
    (entries, policy)
}

/// Attribution closure over the entries of one peer: an LPM returns only the longest match,
/// so each entry carries the rules of every broader entry of the same peer.
pub(super) fn close(
    entries: &BTreeMap<PolicyEntry, BTreeSet<RuleRef>>,
) -> Vec<(PolicyEntry, BTreeSet<RuleRef>)> {
    let mut by_peer: BTreeMap<u32, Vec<&PolicyEntry>> = BTreeMap::new();
    for e in entries.keys() {
        by_peer.entry(e.peer).or_default().push(e);
    }
    let mut out = Vec::with_capacity(entries.len());
    for group in by_peer.values() {
        for entry in group {
            let mut rules = BTreeSet::new();
            for other in group.iter().filter(|o| o.covers(entry)) {
                rules.extend(entries[*other].iter().cloned());
            }
            out.push((**entry, rules));
        }
    }
    out
}
