//! The policy decision for a new flow: the peer's identity, then the class's entries for that
//! peer, for any peer, and for the peer's CIDR set. Hash lookups, each made only when the
//! class has entries of its kind (`NP_CLASSES`), so the cost does not grow with the number of
//! rules; tries only for port ranges and ipBlocks.

use aya_ebpf::maps::lpm_trie::Key;
use netpol_common::{
    class_shape, endpoint_flag, identity, policy_prefix, CidrKey, Direction, EndpointInfo,
    IpcacheKey, PolicyKey, Reason, ServiceKey,
};

use crate::{
    maps::{CIDR, CLASSES, IPCACHE, POLICY, PORT_RANGES, SERVICES},
    parse::{Fragment, Packet},
};

/// A pass reason and the rule set that allowed the flow (0 when no rule was needed).
pub struct Allowed {
    pub reason: Reason,
    pub rule_set: u32,
}

pub fn decide(ep: &EndpointInfo, dir: Direction, pkt: &Packet) -> Result<Allowed, Reason> {
    let (isolated, class, peer_addr) = match dir {
        Direction::Ingress => (
            ep.flags & endpoint_flag::ISOLATED_INGRESS != 0,
            ep.ingress_class,
            pkt.src,
        ),
        Direction::Egress => (
            ep.flags & endpoint_flag::ISOLATED_EGRESS != 0,
            ep.egress_class,
            pkt.dst,
        ),
    };
    if !isolated {
        return Ok(Allowed {
            reason: Reason::NotIsolated,
            rule_set: 0,
        });
    }
    // SAFETY: plain-data value, read once. No entry: the class allows nothing.
    let shapes = unsafe { CLASSES.get(&class) }.map_or(0, |c| c.shapes);
    let class = Class {
        id: class.to_be_bytes(),
        shapes,
    };
    if dir == Direction::Egress && pkt.fragment != Fragment::Later {
        // To a ClusterIP, before kube-proxy's DNAT: judged by the Service port's own entries,
        // which the agent derives from the egress rules and every ready backend on its target
        // port. No other lookup: the port in this packet is the Service's, not the backend's.
        let svc = ServiceKey {
            addr: pkt.dst,
            port: pkt.dport,
            proto: pkt.proto,
            _pad: 0,
        };
        // SAFETY: plain-data value, read once.
        if let Some(svc) = unsafe { SERVICES.get(&svc) } {
            return match lookup(&class, svc.identity, pkt) {
                Some(rule_set) => Ok(Allowed {
                    reason: Reason::AllowedByPolicy,
                    rule_set,
                }),
                None => Err(Reason::DeniedByPolicy),
            };
        }
    }
    // SAFETY: plain-data value, read once.
    let peer = unsafe { IPCACHE.get(&IpcacheKey { addr: peer_addr }) }
        .map_or(identity::WORLD, |v| v.identity);
    if dir == Direction::Ingress && peer == identity::HOST {
        return Ok(Allowed {
            reason: Reason::FromHost,
            rule_set: 0,
        });
    }
    // A later fragment has no ports to match and belongs to no tracked flow here.
    if pkt.fragment == Fragment::Later {
        return Err(Reason::Fragment);
    }
    let mut rule_set = lookup(&class, peer, pkt);
    if rule_set.is_none() && class.has(class_shape::ANY_PEER) {
        rule_set = lookup(&class, identity::ANY, pkt);
    }
    if rule_set.is_none() && class.has(class_shape::CIDR) {
        let cidr_key = Key::new(
            32 + 128,
            CidrKey {
                class: class.id,
                addr: peer_addr,
            },
        );
        if let Some(set) = CIDR.get(cidr_key) {
            rule_set = lookup(&class, set.set, pkt);
        }
    }
    match rule_set {
        Some(rule_set) => Ok(Allowed {
            reason: Reason::AllowedByPolicy,
            rule_set,
        }),
        None => Err(Reason::DeniedByPolicy),
    }
}

/// A policy class as this packet's decision uses it.
struct Class {
    /// Class id, network byte order (as in the keys).
    id: [u8; 4],
    /// `class_shape` bits.
    shapes: u32,
}

impl Class {
    #[inline(always)]
    fn has(&self, shape: u32) -> bool {
        self.shapes & shape != 0
    }
}

/// The rule set of the most specific entry of `class` for `peer` that allows the packet: whole
/// port, port range, every port of the protocol, every protocol (what one longest-prefix match
/// over all of them would find).
#[inline(always)]
fn lookup(class: &Class, peer: u32, pkt: &Packet) -> Option<u32> {
    let mut key = PolicyKey {
        class: class.id,
        peer: peer.to_be_bytes(),
        proto: pkt.proto,
        port: pkt.dport,
        _pad: 0,
    };
    // Port 0 in the hash means "every port": a packet to port 0 is looked up in the trie only.
    if class.has(class_shape::PORT) && pkt.dport != [0, 0] {
        if let Some(rule_set) = hashed(&key) {
            return Some(rule_set);
        }
    }
    if class.has(class_shape::PORT_RANGE) {
        if let Some(v) = PORT_RANGES.get(Key::new(policy_prefix::EXACT, key)) {
            return Some(v.rule_set);
        }
    }
    if class.has(class_shape::ANY_PORT) {
        key.port = [0, 0];
        if let Some(rule_set) = hashed(&key) {
            return Some(rule_set);
        }
    }
    if class.has(class_shape::ANY_PROTO) {
        key.proto = 0;
        key.port = [0, 0];
        if let Some(rule_set) = hashed(&key) {
            return Some(rule_set);
        }
    }
    None
}

/// The rule set of an `NP_POLICY` entry.
#[inline(always)]
fn hashed(key: &PolicyKey) -> Option<u32> {
    // SAFETY: plain-data value, read once.
    unsafe { POLICY.get(key) }.map(|v| v.rule_set)
}
