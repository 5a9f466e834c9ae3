//! Service ports for egress policy. kube-proxy rewrites a packet to a ClusterIP only after it
//! has left the pod's veth, so the egress hook sees the Service's address and port, not the
//! backend's. Each Service port gets an identity (`NP_SERVICES` maps its ClusterIPs to it) and
//! an egress class gets an entry for it when the class's rules allow every ready backend of
//! the port on its target port, judged by the same lookups the datapath makes for the backend
//! itself. So "egress to backend pods on 5678" allows `backend-svc:5678` and nothing that
//! would reach a pod the rules do not allow.
//!
//! Choices: a port with no ready backend gets no entry (kube-proxy rejects it anyway); a port
//! whose backends are only partly allowed gets none either (fail closed, reported), where
//! iptables-based plugins would allow some connections and not others.

use std::collections::{BTreeMap, BTreeSet};

use netpol_common::Direction;

use super::{
    compile::{Compiled, PolicyEntry, RuleRef, ServiceAddr, Touched},
    evaluate::Flow,
    model::{ServicePort, Snapshot},
    ports::PortPrefix,
};

impl Compiled {
    /// Recomputes Service identities, addresses and the policy entries of every egress class
    /// for them, recording the policy keys that changed in `touched`.
    pub(super) fn derive_services(
        &mut self,
        snapshot: &Snapshot,
        prev_services: &BTreeMap<ServicePort, u32>,
        prev_rule_sets: &BTreeMap<BTreeSet<RuleRef>, u32>,
        touched: &mut Touched,
    ) {
        let old_entries = std::mem::take(&mut self.service_entries);
        let old: BTreeMap<PolicyEntry, u32> = old_entries
            .iter()
            .filter_map(|e| self.policy.remove(e).map(|set| (*e, set)))
            .collect();
        self.services.clear();
        self.service_ports.clear();
        let kept = std::mem::take(&mut self.allocation.services);
        let mut ports = Vec::new();
        for svc in &snapshot.services {
            for port in &svc.ports {
                let prev = if kept.contains_key(port) {
                    &kept
                } else {
                    prev_services
                };
                let id = self.allocation.service(port, prev);
                self.service_ports.insert(id, port.clone());
                for &ip in &svc.cluster_ips {
                    let addr = ServiceAddr {
                        ip,
                        protocol: port.protocol,
                        port: port.port,
                    };
                    self.services.insert(addr, id);
                }
                ports.push((id, port));
            }
        }
        if ports.is_empty() && old.is_empty() {
            return;
        }
        let egress: Vec<u32> = self
            .classes
            .iter()
            .filter(|(_, c)| c.direction == Direction::Egress)
            .map(|(id, _)| *id)
            .collect();
        let rules_of: BTreeMap<u32, BTreeSet<RuleRef>> = self
            .allocation
            .rule_sets
            .iter()
            .map(|(rules, id)| (*id, rules.clone()))
            .collect();
        let mut derived = BTreeMap::new();
        for class in egress {
            for &(id, port) in &ports {
                let Some(rules) = self.allowing_every_backend(class, snapshot, port, &rules_of)
                else {
                    continue;
                };
                let entry = PolicyEntry {
                    class,
                    peer: id,
                    proto: Some(port.protocol.number()),
                    port: Some(PortPrefix {
                        value: port.port,
                        bits: 16,
                    }),
                };
                derived.insert(entry, rules);
            }
        }
        for (entry, rules) in derived {
            let set = self.allocation.rule_set(rules, prev_rule_sets);
            self.policy.insert(entry, set);
            self.service_entries.insert(entry);
        }
        for (entry, set) in &old {
            if self.policy.get(entry) != Some(set) {
                touched.policy.insert(*entry);
            }
        }
        for entry in &self.service_entries {
            if old.get(entry) != self.policy.get(entry) {
                touched.policy.insert(*entry);
            }
        }
    }

    /// The rules that allow every ready backend of `port` from `class`, or `None` when a
    /// backend is not allowed or there is none.
    fn allowing_every_backend(
        &mut self,
        class: u32,
        snapshot: &Snapshot,
        port: &ServicePort,
        rules_of: &BTreeMap<u32, BTreeSet<RuleRef>>,
    ) -> Option<BTreeSet<RuleRef>> {
        let mut rules = BTreeSet::new();
        let (mut allowed, mut denied) = (0, 0);
        for backend in snapshot.backends_of(port) {
            let flow = Flow {
                peer: backend.ip,
                proto: port.protocol.number(),
                port: backend.port,
            };
            let sets = self.class_lookups(class, flow);
            if sets.is_empty() {
                denied += 1;
            } else {
                allowed += 1;
            }
            for set in sets {
                rules.extend(rules_of.get(&set).into_iter().flatten().cloned());
            }
        }
        if allowed > 0 && denied > 0 {
            self.warnings.push(format!(
                "service {} port {}/{}: egress class {class} allows {allowed} of {} backends; \
                 the port is denied to it (fail closed)",
                port.service,
                port.port,
                port.protocol,
                allowed + denied
            ));
        }
        (allowed > 0 && denied == 0).then_some(rules)
    }
}
