//! Compiled contents -> the exact keys and values of the kernel maps, and the diff between two
//! such states. Pure: the dataplane reads the actual state and writes the diff.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv6Addr},
};

use ipnet::IpNet;
use netpol_common::{
    class_shape, endpoint_flag, identity, ipv4_mapped, policy_prefix, Addr, CidrKey, CidrValue,
    ClassValue, EndpointInfo, IpcacheKey, IpcacheValue, PolicyKey, PolicyValue, ServiceKey,
    ServiceValue, IPV4_MAPPED_PREFIX,
};

use super::{
    compile::{Allocation, CidrEntry, Compiled, Endpoint, PolicyEntry, ServiceAddr, Touched},
    model::ObjectRef,
    ports::PortPrefix,
};

/// Contents of the maps the agent writes (conntrack, fragments and counters belong to the
/// datapath). LPM keys are `(prefix_len, data)`. `policy` holds the entries of both `NP_POLICY`
/// and `NP_PORT_RANGES` in LPM form; `policy_prefix::hashed` says which map each goes to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapContents {
    pub endpoints: BTreeMap<u32, EndpointInfo>,
    pub ipcache: BTreeMap<IpcacheKey, IpcacheValue>,
    pub cidr: BTreeMap<(u32, CidrKey), CidrValue>,
    pub policy: BTreeMap<(u32, PolicyKey), PolicyValue>,
    pub classes: BTreeMap<u32, ClassValue>,
    pub services: BTreeMap<ServiceKey, ServiceValue>,
}

/// Changes that turn one `MapContents` into another.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapDiff {
    pub upsert: MapContents,
    pub remove: MapContents,
}

impl MapDiff {
    pub fn is_empty(&self) -> bool {
        self.upsert == MapContents::default() && self.remove == MapContents::default()
    }

    pub fn changes(&self) -> usize {
        let count = |m: &MapContents| {
            m.endpoints.len()
                + m.ipcache.len()
                + m.cidr.len()
                + m.policy.len()
                + m.classes.len()
                + m.services.len()
        };
        count(&self.upsert) + count(&self.remove)
    }
}

pub fn addr_bytes(ip: IpAddr) -> Addr {
    match ip {
        IpAddr::V4(v4) => ipv4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The address a mapped key holds, IPv4 when it is IPv4-mapped.
pub fn addr_from_bytes(bytes: Addr) -> IpAddr {
    let v6 = Ipv6Addr::from(bytes);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// Prefix length of a network inside the 16-byte layout.
pub fn mapped_prefix_len(net: &IpNet) -> u32 {
    match net {
        IpNet::V4(n) => IPV4_MAPPED_PREFIX + u32::from(n.prefix_len()),
        IpNet::V6(n) => u32::from(n.prefix_len()),
    }
}

/// The network an LPM key over the 16-byte layout stands for.
pub fn net_from_key(prefix_len: u32, addr: Addr) -> Option<IpNet> {
    let ip = addr_from_bytes(addr);
    match ip {
        IpAddr::V4(v4) if prefix_len >= IPV4_MAPPED_PREFIX => {
            IpNet::new(IpAddr::V4(v4), (prefix_len - IPV4_MAPPED_PREFIX) as u8).ok()
        }
        IpAddr::V4(v4) => {
            // A v6 prefix shorter than the mapped range: show it as IPv6.
            let v6 = v4.to_ipv6_mapped();
            IpNet::new(IpAddr::V6(v6), prefix_len as u8).ok()
        }
        IpAddr::V6(_) => IpNet::new(ip, prefix_len as u8).ok(),
    }
}

pub fn policy_key(entry: &PolicyEntry) -> (u32, PolicyKey) {
    let (prefix, proto, port) = match (entry.proto, entry.port) {
        (None, _) => (policy_prefix::ANY_PROTO, 0, 0),
        (Some(p), None) => (policy_prefix::ANY_PORT, p, 0),
        (Some(p), Some(pp)) => (policy_prefix::ANY_PORT + u32::from(pp.bits), p, pp.value),
    };
    let key = PolicyKey {
        class: entry.class.to_be_bytes(),
        peer: entry.peer.to_be_bytes(),
        proto,
        port: port.to_be_bytes(),
        _pad: 0,
    };
    (prefix, key)
}

pub fn policy_entry_from_key(prefix: u32, key: &PolicyKey) -> PolicyEntry {
    let (proto, port) = if prefix <= policy_prefix::ANY_PROTO {
        (None, None)
    } else if prefix <= policy_prefix::ANY_PORT {
        (Some(key.proto), None)
    } else {
        let bits = (prefix - policy_prefix::ANY_PORT).min(16) as u8;
        (
            Some(key.proto),
            Some(PortPrefix {
                value: u16::from_be_bytes(key.port),
                bits,
            }),
        )
    };
    PolicyEntry {
        class: u32::from_be_bytes(key.class),
        peer: u32::from_be_bytes(key.peer),
        proto,
        port,
    }
}

pub fn service_key(addr: &ServiceAddr) -> ServiceKey {
    ServiceKey {
        addr: addr_bytes(addr.ip),
        port: addr.port.to_be_bytes(),
        proto: addr.protocol.number(),
        _pad: 0,
    }
}

pub fn cidr_key(entry: &CidrEntry) -> (u32, CidrKey) {
    let key = CidrKey {
        class: entry.class.to_be_bytes(),
        addr: addr_bytes(entry.net.network()),
    };
    (32 + mapped_prefix_len(&entry.net), key)
}

pub fn cidr_entry_from_key(prefix: u32, key: &CidrKey) -> Option<CidrEntry> {
    Some(CidrEntry {
        class: u32::from_be_bytes(key.class),
        net: net_from_key(prefix.checked_sub(32)?, key.addr)?,
    })
}

/// An endpoint's `NP_ENDPOINTS` value.
pub fn endpoint_info(ep: &Endpoint) -> EndpointInfo {
    let mut info = EndpointInfo {
        ingress_class: ep.ingress.class,
        egress_class: ep.egress.class,
        identity: ep.identity,
        ..Default::default()
    };
    if ep.ingress.isolated {
        info.flags |= endpoint_flag::ISOLATED_INGRESS;
    }
    if ep.egress.isolated {
        info.flags |= endpoint_flag::ISOLATED_EGRESS;
    }
    set_addresses(&mut info, &ep.ips);
    info
}

/// The `NP_ENDPOINTS` value of a pod whose policy is not known yet: isolated both ways with
/// class 0, which no policy entry names (the compiler numbers classes from 1), so every new
/// flow is denied; its own addresses only, so nothing it spoofs gets out either.
pub fn closed_endpoint(ips: &[IpAddr]) -> EndpointInfo {
    let mut info = EndpointInfo {
        flags: endpoint_flag::ISOLATED_INGRESS | endpoint_flag::ISOLATED_EGRESS,
        ..Default::default()
    };
    set_addresses(&mut info, ips);
    info
}

/// The first address of each family, for anti-spoofing.
fn set_addresses(info: &mut EndpointInfo, ips: &[IpAddr]) {
    for ip in ips {
        match ip {
            IpAddr::V4(v4) if info.flags & endpoint_flag::HAS_IPV4 == 0 => {
                info.flags |= endpoint_flag::HAS_IPV4;
                info.ipv4 = ipv4_mapped(v4.octets());
            }
            IpAddr::V6(v6) if info.flags & endpoint_flag::HAS_IPV6 == 0 => {
                info.flags |= endpoint_flag::HAS_IPV6;
                info.ipv6 = v6.octets();
            }
            _ => {}
        }
    }
}

/// The ipcache holds single addresses (`IpNet::from(addr)`), so the network address is the key.
fn ipcache_key(net: &IpNet) -> IpcacheKey {
    IpcacheKey {
        addr: addr_bytes(net.network()),
    }
}

/// The `class_shape` bit of one policy entry, peer aside.
fn entry_shape(prefix: u32, key: &PolicyKey) -> u32 {
    match prefix {
        policy_prefix::ANY_PROTO => class_shape::ANY_PROTO,
        policy_prefix::ANY_PORT => class_shape::ANY_PORT,
        _ if policy_prefix::hashed(prefix, key.port) => class_shape::PORT,
        _ => class_shape::PORT_RANGE,
    }
}

/// The `NP_CLASSES` value of a class with these policy entries; `None` when it has none.
fn class_value<'a>(
    entries: impl IntoIterator<Item = &'a (u32, PolicyKey)>,
    has_cidr: bool,
) -> Option<ClassValue> {
    let mut shapes = 0;
    for (prefix, key) in entries {
        shapes |= entry_shape(*prefix, key);
        if u32::from_be_bytes(key.peer) == identity::ANY {
            shapes |= class_shape::ANY_PEER;
        }
    }
    if has_cidr {
        shapes |= class_shape::CIDR;
    }
    (shapes != 0).then_some(ClassValue { shapes, _pad: 0 })
}

/// `NP_CLASSES` for the whole of `policy` and `cidr`.
fn classes(
    policy: &BTreeMap<(u32, PolicyKey), PolicyValue>,
    cidr: &BTreeMap<(u32, CidrKey), CidrValue>,
) -> BTreeMap<u32, ClassValue> {
    let mut by_class: BTreeMap<u32, Vec<&(u32, PolicyKey)>> = BTreeMap::new();
    for k in policy.keys() {
        by_class
            .entry(u32::from_be_bytes(k.1.class))
            .or_default()
            .push(k);
    }
    let with_cidr: BTreeSet<u32> = cidr
        .keys()
        .map(|(_, k)| u32::from_be_bytes(k.class))
        .collect();
    let all: BTreeSet<u32> = by_class.keys().chain(with_cidr.iter()).copied().collect();
    all.into_iter()
        .filter_map(|class| {
            let entries = by_class.get(&class).into_iter().flatten().copied();
            Some((class, class_value(entries, with_cidr.contains(&class))?))
        })
        .collect()
}

/// `NP_CLASSES` value of one class of a compilation, from its entries alone.
fn compiled_class_value(compiled: &Compiled, class: u32) -> Option<ClassValue> {
    let first = PolicyEntry {
        class,
        peer: 0,
        proto: None,
        port: None,
    };
    let keys: Vec<(u32, PolicyKey)> = compiled
        .policy
        .range(first..)
        .take_while(|(e, _)| e.class == class)
        .map(|(e, _)| policy_key(e))
        .collect();
    let first_net = CidrEntry {
        class,
        net: IpNet::V4(Default::default()),
    };
    let has_cidr = compiled
        .cidr
        .range(first_net..)
        .next()
        .is_some_and(|(e, _)| e.class == class);
    class_value(&keys, has_cidr)
}

/// The maps for a compilation, with each local endpoint placed on its interface. Endpoints
/// missing from `ifindex_of` (no interface found) are left out.
pub fn map_contents(compiled: &Compiled, ifindex_of: &BTreeMap<ObjectRef, u32>) -> MapContents {
    let mut out = MapContents::default();
    for (pod, ep) in &compiled.endpoints {
        if let Some(&ifindex) = ifindex_of.get(pod) {
            out.endpoints.insert(ifindex, endpoint_info(ep));
        }
    }
    for (net, &identity) in &compiled.ipcache {
        out.ipcache
            .insert(ipcache_key(net), IpcacheValue { identity, _pad: 0 });
    }
    for (entry, &set) in &compiled.cidr {
        out.cidr.insert(cidr_key(entry), CidrValue { set, _pad: 0 });
    }
    for (entry, &rule_set) in &compiled.policy {
        out.policy
            .insert(policy_key(entry), PolicyValue { rule_set, _pad: 0 });
    }
    for (addr, &identity) in &compiled.services {
        out.services
            .insert(service_key(addr), ServiceValue { identity, _pad: 0 });
    }
    out.classes = classes(&out.policy, &out.cidr);
    out
}

fn diff_map<K: Ord + Clone, V: PartialEq + Clone>(
    desired: &BTreeMap<K, V>,
    actual: &BTreeMap<K, V>,
    upsert: &mut BTreeMap<K, V>,
    remove: &mut BTreeMap<K, V>,
) {
    for (k, v) in desired {
        if actual.get(k) != Some(v) {
            upsert.insert(k.clone(), v.clone());
        }
    }
    for (k, v) in actual {
        if !desired.contains_key(k) {
            remove.insert(k.clone(), v.clone());
        }
    }
}

fn diff_key<K: Ord + Clone, V: PartialEq + Clone>(
    key: K,
    desired: Option<V>,
    actual: &BTreeMap<K, V>,
    upsert: &mut BTreeMap<K, V>,
    remove: &mut BTreeMap<K, V>,
) {
    match (desired, actual.get(&key)) {
        (Some(d), a) if a != Some(&d) => {
            upsert.insert(key, d);
        }
        (None, Some(a)) => {
            remove.insert(key, a.clone());
        }
        _ => {}
    }
}

/// The diff `diff(map_contents(compiled), actual)` would give, looking only at the keys an
/// incremental update touched: O(changes), not O(maps).
pub fn diff_touched(
    compiled: &Compiled,
    ifindex_of: &BTreeMap<ObjectRef, u32>,
    touched: &Touched,
    actual: &MapContents,
) -> MapDiff {
    let mut d = MapDiff::default();
    let (up, rm) = (&mut d.upsert, &mut d.remove);
    for e in &touched.policy {
        let value = compiled
            .policy
            .get(e)
            .map(|&rule_set| PolicyValue { rule_set, _pad: 0 });
        diff_key(
            policy_key(e),
            value,
            &actual.policy,
            &mut up.policy,
            &mut rm.policy,
        );
    }
    for e in &touched.cidr {
        let value = compiled.cidr.get(e).map(|&set| CidrValue { set, _pad: 0 });
        diff_key(cidr_key(e), value, &actual.cidr, &mut up.cidr, &mut rm.cidr);
    }
    let classes: BTreeSet<u32> = touched
        .policy
        .iter()
        .map(|e| e.class)
        .chain(touched.cidr.iter().map(|e| e.class))
        .collect();
    for class in classes {
        let value = compiled_class_value(compiled, class);
        diff_key(
            class,
            value,
            &actual.classes,
            &mut up.classes,
            &mut rm.classes,
        );
    }
    for net in &touched.ipcache {
        let value = compiled
            .ipcache
            .get(net)
            .map(|&identity| IpcacheValue { identity, _pad: 0 });
        diff_key(
            ipcache_key(net),
            value,
            &actual.ipcache,
            &mut up.ipcache,
            &mut rm.ipcache,
        );
    }
    for pod in &touched.endpoints {
        if let Some(&ifindex) = ifindex_of.get(pod) {
            let value = compiled.endpoints.get(pod).map(endpoint_info);
            diff_key(
                ifindex,
                value,
                &actual.endpoints,
                &mut up.endpoints,
                &mut rm.endpoints,
            );
        }
    }
    d
}

/// Id counters above every id the maps hold, for a process that starts without the ids of
/// the one that programmed them: it must never give an id in use a different meaning (a
/// class id reused for other rules would, while the maps are rewritten, briefly apply the
/// old rules to the new pods). Content is renumbered instead, make-before-break.
pub fn allocation_above(have: &MapContents) -> Allocation {
    use netpol_common::identity::{FIRST_CIDR_SET, FIRST_SERVICE};
    let (mut identity, mut class, mut rule_set, mut service) = (0u32, 0u32, 0u32, 0u32);
    let mut peer = |id: u32| match id {
        id if id >= FIRST_CIDR_SET => {}
        id if id >= FIRST_SERVICE => service = service.max(id),
        id => identity = identity.max(id),
    };
    for info in have.endpoints.values() {
        peer(info.identity);
        class = class.max(info.ingress_class).max(info.egress_class);
    }
    for value in have.ipcache.values() {
        peer(value.identity);
    }
    for value in have.services.values() {
        peer(value.identity);
    }
    for ((prefix, key), value) in &have.policy {
        let entry = policy_entry_from_key(*prefix, key);
        peer(entry.peer);
        class = class.max(entry.class);
        rule_set = rule_set.max(value.rule_set);
    }
    for (_, key) in have.cidr.keys() {
        class = class.max(u32::from_be_bytes(key.class));
    }
    for &id in have.classes.keys() {
        class = class.max(id);
    }
    Allocation {
        next_identity: identity + 1,
        next_class: class + 1,
        next_rule_set: rule_set + 1,
        next_service: service + 1,
        ..Default::default()
    }
}

pub fn diff(desired: &MapContents, actual: &MapContents) -> MapDiff {
    let mut d = MapDiff::default();
    diff_map(
        &desired.endpoints,
        &actual.endpoints,
        &mut d.upsert.endpoints,
        &mut d.remove.endpoints,
    );
    diff_map(
        &desired.ipcache,
        &actual.ipcache,
        &mut d.upsert.ipcache,
        &mut d.remove.ipcache,
    );
    diff_map(
        &desired.cidr,
        &actual.cidr,
        &mut d.upsert.cidr,
        &mut d.remove.cidr,
    );
    diff_map(
        &desired.policy,
        &actual.policy,
        &mut d.upsert.policy,
        &mut d.remove.policy,
    );
    diff_map(
        &desired.classes,
        &actual.classes,
        &mut d.upsert.classes,
        &mut d.remove.classes,
    );
    diff_map(
        &desired.services,
        &actual.services,
        &mut d.upsert.services,
        &mut d.remove.services,
    );
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_keys_round_trip() {
        let entries = [
            PolicyEntry {
                class: 7,
                peer: 300,
                proto: None,
                port: None,
            },
            PolicyEntry {
                class: 7,
                peer: 0,
                proto: Some(6),
                port: None,
            },
            PolicyEntry {
                class: 7,
                peer: 0x8000_0001,
                proto: Some(17),
                port: Some(PortPrefix {
                    value: 53,
                    bits: 16,
                }),
            },
            PolicyEntry {
                class: 1,
                peer: 2,
                proto: Some(132),
                port: Some(PortPrefix {
                    value: 32768,
                    bits: 1,
                }),
            },
        ];
        for e in entries {
            let (prefix, key) = policy_key(&e);
            assert_eq!(policy_entry_from_key(prefix, &key), e, "prefix {prefix}");
        }
    }

    #[test]
    fn cidr_keys_round_trip() {
        for net in ["10.0.0.0/8", "10.1.2.3/32", "0.0.0.0/0", "fd00::/8", "::/0"] {
            let e = CidrEntry {
                class: 3,
                net: net.parse().unwrap(),
            };
            let (prefix, key) = cidr_key(&e);
            assert_eq!(cidr_entry_from_key(prefix, &key), Some(e), "{net}");
        }
    }

    #[test]
    fn diff_finds_changes_and_nothing_else() {
        let mut a = MapContents::default();
        a.endpoints.insert(
            5,
            EndpointInfo {
                flags: 1,
                ..Default::default()
            },
        );
        a.endpoints.insert(6, EndpointInfo::default());
        let mut b = a.clone();
        assert!(diff(&a, &b).is_empty());
        b.endpoints.get_mut(&5).unwrap().flags = 3;
        b.endpoints.remove(&6);
        let d = diff(&b, &a);
        assert_eq!(d.upsert.endpoints.keys().collect::<Vec<_>>(), vec![&5]);
        assert_eq!(d.remove.endpoints.keys().collect::<Vec<_>>(), vec![&6]);
        assert_eq!(d.changes(), 2);
    }
}
