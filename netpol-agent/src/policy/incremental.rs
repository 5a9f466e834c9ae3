//! The incremental path of the compiler: a pod relabel updates one identity's entries in every
//! class and the pod's own classes, and reports the keys it touched so the diff can look only
//! at them. It builds entries with the same functions as the full compile.

use std::collections::{BTreeMap, BTreeSet};

use netpol_common::Direction;

use super::{
    compile::{
        class_info, class_key, class_spec, cluster, isolation, namespace_labels, peer_pods,
        policy_index, set_pod_addresses, Allocation, ClassKey, Compiled, Emitted, IdentityKey,
        Touched,
    },
    entries::{class_entries, identity_entries, Cluster},
    model::{ObjectRef, Snapshot},
};

impl Compiled {
    /// The rule set table holds exactly the sets the policy entries use (and the empty set).
    pub(super) fn refresh_rule_sets(&mut self) {
        let used: BTreeSet<u32> = self.policy.values().copied().collect();
        self.allocation.rule_sets.retain(|_, id| used.contains(id));
        self.rule_sets = self
            .allocation
            .rule_sets
            .iter()
            .map(|(rules, id)| (*id, rules.clone()))
            .collect();
        self.rule_sets.insert(0, BTreeSet::new());
    }

    /// Updates the contents for one pod whose labels changed in `snapshot` (and nothing else):
    /// its identity's entries in every class, its ipcache entries, and its own classes. Returns
    /// the keys it changed, or `None` (contents untouched) when the change is not a relabel
    /// this path handles; the caller then compiles in full.
    pub fn relabel_pod(&mut self, snapshot: &Snapshot, pod_id: &ObjectRef) -> Option<Touched> {
        let pod = snapshot.pods.iter().find(|p| &p.id == pod_id)?;
        let old_id = *self.pod_identity.get(pod_id)?;
        if pod.host_network || pod.ips.is_empty() {
            return None;
        }
        if self
            .endpoints
            .get(pod_id)
            .is_some_and(|ep| ep.ips != pod.ips)
        {
            return None;
        }
        let mut touched = Touched::default();
        let prev = Allocation::default();
        let policies = policy_index(snapshot);
        let pods = peer_pods(snapshot);
        let ns_labels = namespace_labels(snapshot, &pods);

        // 1. The pod's identity, and the entries a new identity gets in every class.
        let key = IdentityKey::of(pod);
        let known = self.allocation.identities.contains_key(&key);
        let new_id = self.allocation.identity(&key, &prev.identities);
        if !known {
            self.identities.insert(new_id, key);
            let classes: Vec<(ClassKey, u32)> = self
                .allocation
                .classes
                .iter()
                .map(|(k, id)| (k.clone(), *id))
                .collect();
            let cluster = Cluster {
                identities: &self.identities,
                by_namespace: BTreeMap::new(),
                ns_labels: &ns_labels,
                pods: &pods,
            };
            let mut emitted = Emitted::default();
            for (class_key, class) in &classes {
                let spec = class_spec(&policies, class_key);
                let entries = identity_entries(&cluster, &spec, new_id);
                emitted.policy_entries(*class, &entries, &mut self.allocation, &prev.rule_sets);
            }
            touched.policy.extend(emitted.policy.keys().copied());
            self.policy.extend(emitted.policy);
        }
        self.pod_identity.insert(pod_id.clone(), new_id);
        // The pod's own entries move with it; another pod's or the node's stay.
        let claimed_elsewhere = |ip: &std::net::IpAddr, existing: u32| {
            existing == netpol_common::identity::HOST
                || snapshot
                    .pods
                    .iter()
                    .any(|p| &p.id != pod_id && !p.host_network && p.ips.contains(ip))
        };
        touched
            .ipcache
            .extend(set_pod_addresses(self, pod, new_id, &claimed_elsewhere));

        // 2. An identity no pod holds any more takes its entries with it.
        if old_id != new_id && !self.pod_identity.values().any(|&i| i == old_id) {
            if let Some(old_key) = self.identities.remove(&old_id) {
                self.allocation.identities.remove(&old_key);
            }
            self.policy.retain(|e, _| {
                let keep = e.peer != old_id;
                if !keep {
                    touched.policy.insert(*e);
                }
                keep
            });
        }

        // 3. The pod's own classes, when it is an endpoint here.
        if self.endpoints.contains_key(pod_id) {
            for dir in Direction::ALL {
                let key = class_key(snapshot, pod, dir);
                let old_class = self.endpoints[pod_id].isolation(dir).class;
                let class = if key.policies.is_empty() {
                    None
                } else {
                    let known = self.allocation.classes.contains_key(&key);
                    let id = self.allocation.class(&key, &prev.classes);
                    if !known {
                        let cluster = cluster(&self.identities, &ns_labels, &pods);
                        let spec = class_spec(&policies, &key);
                        let entries = class_entries(&cluster, &spec);
                        let mut emitted = Emitted::default();
                        emitted.class(id, entries, &mut self.allocation, &prev.rule_sets);
                        touched.policy.extend(emitted.policy.keys().copied());
                        touched.cidr.extend(emitted.cidr.keys().copied());
                        self.policy.extend(emitted.policy);
                        self.cidr.extend(emitted.cidr);
                        self.classes.insert(id, class_info(&key));
                    }
                    Some(id)
                };
                let ep = self.endpoints.get_mut(pod_id).expect("endpoint");
                *match dir {
                    Direction::Ingress => &mut ep.ingress,
                    Direction::Egress => &mut ep.egress,
                } = isolation(&key, class);
                if old_class != 0 && Some(old_class) != class && !self.class_in_use(old_class) {
                    self.remove_class(old_class, &mut touched);
                }
            }
            self.endpoints.get_mut(pod_id).expect("endpoint").identity = new_id;
            touched.endpoints.insert(pod_id.clone());
        }
        // A relabelled backend, or a pod in a new egress class, changes which Service ports
        // classes may reach.
        self.derive_services(snapshot, &BTreeMap::new(), &BTreeMap::new(), &mut touched);
        self.refresh_rule_sets();
        Some(touched)
    }

    fn class_in_use(&self, class: u32) -> bool {
        self.endpoints
            .values()
            .any(|e| e.ingress.class == class || e.egress.class == class)
    }

    fn remove_class(&mut self, class: u32, touched: &mut Touched) {
        self.policy.retain(|e, _| {
            let keep = e.class != class;
            if !keep {
                touched.policy.insert(*e);
            }
            keep
        });
        self.cidr.retain(|e, _| {
            let keep = e.class != class;
            if !keep {
                touched.cidr.insert(*e);
            }
            keep
        });
        self.classes.remove(&class);
        self.allocation.classes.retain(|_, id| *id != class);
    }
}
