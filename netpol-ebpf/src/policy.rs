//! The policy decision for a new flow: identity of the peer, then a constant number of LPM
//! lookups whatever the number of rules (peer identity, any peer, CIDR set).

use aya_ebpf::maps::lpm_trie::Key;
use netpol_common::{
    endpoint_flag, identity, policy_prefix, CidrKey, Direction, EndpointInfo, IpcacheKey,
    PolicyKey, Reason, ServiceKey,
};

use crate::{
    maps::{CIDR, IPCACHE, POLICY, SERVICES},
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
    let class_be = class.to_be_bytes();
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
            return match lookup(class_be, svc.identity, pkt) {
                Some(rule_set) => Ok(Allowed {
                    reason: Reason::AllowedByPolicy,
                    rule_set,
                }),
                None => Err(Reason::DeniedByPolicy),
            };
        }
    }
    let peer = IPCACHE
        .get(Key::new(128, IpcacheKey { addr: peer_addr }))
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
    let class = class_be;
    let mut rule_set = lookup(class, peer, pkt);
    if rule_set.is_none() {
        rule_set = lookup(class, identity::ANY, pkt);
    }
    if rule_set.is_none() {
        let cidr_key = Key::new(
            32 + 128,
            CidrKey {
                class,
                addr: peer_addr,
            },
        );
        if let Some(set) = CIDR.get(cidr_key) {
            rule_set = lookup(class, set.set, pkt);
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

#[inline(always)]
fn lookup(class: [u8; 4], peer: u32, pkt: &Packet) -> Option<u32> {
    let key = Key::new(
        policy_prefix::EXACT,
        PolicyKey {
            class,
            peer: peer.to_be_bytes(),
            proto: pkt.proto,
            port: pkt.dport,
            _pad: 0,
        },
    );
    POLICY.get(key).map(|v| v.rule_set)
}
