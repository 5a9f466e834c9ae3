//! Reachability from compiled map contents, looked up the way the datapath looks up the
//! kernel maps (the same keys, the most specific entry first). This is not a second reading of
//! the policies: what it answers is what the kernel would do with these contents for a new
//! flow. The kernel skips lookups its class has no entries for (`NP_CLASSES`); a skipped lookup
//! is one that would miss, so the answer is the same.

use std::{collections::BTreeSet, net::IpAddr};

use ipnet::IpNet;
use netpol_common::{identity, Direction};

use super::{
    compile::{CidrEntry, Compiled, PolicyEntry, RuleRef, ServiceAddr},
    model::{ObjectRef, Protocol},
    ports::PortPrefix,
};

/// The verdict of one direction at one endpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DirectionVerdict {
    pub isolated: bool,
    pub allowed: bool,
    /// Every rule that allows the flow (the kernel stops at the first matching lookup; the
    /// verdict is the same).
    pub allowed_by: BTreeSet<RuleRef>,
}

/// A new flow as the datapath sees it: the peer's address, the protocol, the destination port.
#[derive(Clone, Copy, Debug)]
pub struct Flow {
    pub peer: IpAddr,
    pub proto: u8,
    pub port: u16,
}

impl Compiled {
    /// The identity of an address, as `NP_IPCACHE` (single addresses) answers it.
    pub fn identity_of(&self, addr: IpAddr) -> u32 {
        self.ipcache
            .get(&IpNet::from(addr))
            .copied()
            .unwrap_or(identity::WORLD)
    }

    /// What the datapath decides for a new flow at `pod` in `dir`. `None`: the pod is not an
    /// endpoint of this compilation (another node's, or host-network).
    pub fn evaluate(
        &self,
        pod: &ObjectRef,
        dir: Direction,
        flow: Flow,
    ) -> Option<DirectionVerdict> {
        let endpoint = self.endpoints.get(pod)?;
        let isolation = endpoint.isolation(dir);
        let mut verdict = DirectionVerdict {
            isolated: isolation.isolated,
            ..Default::default()
        };
        if !isolation.isolated {
            verdict.allowed = true;
            return Some(verdict);
        }
        if dir == Direction::Ingress && self.identity_of(flow.peer) == identity::HOST {
            verdict.allowed = true;
            return Some(verdict);
        }
        let class = isolation.class;
        let service = (dir == Direction::Egress)
            .then(|| self.service_at(flow))
            .flatten();
        let sets = match service {
            // A ClusterIP: only the Service port's own entries (see `services`).
            Some(id) => self.policy_lookup(class, id, flow).into_iter().collect(),
            None => self.class_lookups(class, flow),
        };
        verdict.allowed = !sets.is_empty();
        for set in sets {
            verdict
                .allowed_by
                .extend(self.rule_sets[&set].iter().cloned());
        }
        Some(verdict)
    }

    /// The Service port identity of a ClusterIP destination, as `NP_SERVICES` answers it.
    pub fn service_at(&self, flow: Flow) -> Option<u32> {
        let protocol = Protocol::from_number(flow.proto)?;
        let addr = ServiceAddr {
            ip: flow.peer,
            protocol,
            port: flow.port,
        };
        self.services.get(&addr).copied()
    }

    /// The rule sets of a class that allow a flow with an address peer: by the peer's
    /// identity, any peer, and the class's CIDR sets. Empty: denied.
    pub(super) fn class_lookups(&self, class: u32, flow: Flow) -> Vec<u32> {
        let peer = self.identity_of(flow.peer);
        let mut sets = Vec::new();
        sets.extend(self.policy_lookup(class, peer, flow));
        sets.extend(self.policy_lookup(class, identity::ANY, flow));
        let cidr_set = longest_match(flow.peer, |net| {
            self.cidr.get(&CidrEntry { class, net }).copied()
        });
        if let Some(set) = cidr_set {
            sets.extend(self.policy_lookup(class, set, flow));
        }
        sets
    }

    /// The most specific entry: whole port (`NP_POLICY`), port ranges from /16 down
    /// (`NP_PORT_RANGES`), then every port of the protocol, then every protocol (`NP_POLICY`).
    fn policy_lookup(&self, class: u32, peer: u32, flow: Flow) -> Option<u32> {
        let entry = |proto, port| PolicyEntry {
            class,
            peer,
            proto,
            port,
        };
        for bits in (1..=16u8).rev() {
            let mask = u16::MAX << (16 - u32::from(bits));
            let prefix = PortPrefix {
                value: flow.port & mask,
                bits,
            };
            if let Some(set) = self.policy.get(&entry(Some(flow.proto), Some(prefix))) {
                return Some(*set);
            }
        }
        self.policy
            .get(&entry(Some(flow.proto), None))
            .or_else(|| self.policy.get(&entry(None, None)))
            .copied()
    }
}

fn longest_match(addr: IpAddr, lookup: impl Fn(IpNet) -> Option<u32>) -> Option<u32> {
    let max = match addr {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    };
    (0..=max).rev().find_map(|len| {
        let net = IpNet::new(addr, len)
            .expect("prefix length within the family")
            .trunc();
        lookup(net)
    })
}
