//! The Kubernetes source: one reflector per kind the compiler reads (plus Nodes, for pod
//! networking), each object trimmed to the fields netpol uses before it is stored.
//!
//! Any event wakes the reconcile loop through `changed`; the loop then reads the whole stores
//! (level-triggered). A missed or repeated event, an API disconnect or a relist therefore
//! changes nothing in the kernel unless the objects themselves changed, and while the API is
//! unreachable the stores (and the kernel) stay as they were. Snapshots are only taken once
//! every store has completed its first list: a half-listed cluster would look like deleted
//! pods and policies.

use std::sync::Arc;

use futures::StreamExt as _;
use k8s_openapi::{
    api::{
        core::v1::{Namespace, Node, Pod, Service},
        discovery::v1::EndpointSlice,
        networking::v1::NetworkPolicy,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    runtime::{
        reflector::{self, Store},
        watcher, WatchStreamExt as _,
    },
    Api, Client, Resource,
};
use serde::de::DeserializeOwned;
use tokio::{sync::Notify, task::JoinHandle};
use tracing::{debug, warn};

use super::{convert, SourceError};
use crate::policy::model::Snapshot;

/// The stores of every watched kind, and the tasks that keep them in sync.
pub struct KubeSource {
    pods: Store<Pod>,
    namespaces: Store<Namespace>,
    policies: Store<NetworkPolicy>,
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    nodes: Store<Node>,
    tasks: Vec<JoinHandle<()>>,
}

impl KubeSource {
    /// Starts a reflector per kind. `changed` is notified on every watch event (and on every
    /// error, so the loop can report staleness); it coalesces bursts by itself.
    pub fn start(client: &Client, changed: Arc<Notify>) -> KubeSource {
        let mut tasks = Vec::new();
        let pods = reflect(client, changed.clone(), trim_pod, &mut tasks);
        let namespaces = reflect(client, changed.clone(), trim_meta_of, &mut tasks);
        let policies = reflect(client, changed.clone(), trim_meta_of, &mut tasks);
        let services = reflect(client, changed.clone(), trim_service, &mut tasks);
        let slices = reflect(client, changed.clone(), trim_meta_of, &mut tasks);
        let nodes = reflect(client, changed, trim_node, &mut tasks);
        KubeSource {
            pods,
            namespaces,
            policies,
            services,
            slices,
            nodes,
            tasks,
        }
    }

    /// Waits until every store has completed its first list.
    pub async fn wait_synced(&self) {
        // `Err` only when a writer is gone, i.e. we are shutting down.
        let _ = self.pods.wait_until_ready().await;
        let _ = self.namespaces.wait_until_ready().await;
        let _ = self.policies.wait_until_ready().await;
        let _ = self.services.wait_until_ready().await;
        let _ = self.slices.wait_until_ready().await;
        let _ = self.nodes.wait_until_ready().await;
    }

    /// The cluster as the compiler reads it, converted exactly as the file source converts
    /// manifests, with every object-level problem.
    pub fn snapshot(&self) -> (Snapshot, Vec<SourceError>) {
        let mut snapshot = Snapshot::default();
        let mut errors = Vec::new();
        for ns in self.namespaces.state() {
            match convert::namespace(&ns) {
                Ok(ns) => {
                    snapshot.namespaces.insert(ns.name.clone(), ns);
                }
                Err(e) => errors.push(e),
            }
        }
        for pod in self.pods.state() {
            match convert::pod(&pod) {
                Ok((model, problems)) => {
                    errors.extend(problems);
                    if let Some(pod) = model {
                        snapshot.add_pod(pod);
                    }
                }
                Err(e) => errors.push(e),
            }
        }
        for np in self.policies.state() {
            match convert::network_policy(&np) {
                Ok((policy, problems)) => {
                    errors.extend(problems);
                    snapshot.policies.push(policy);
                }
                Err(e) => errors.push(e),
            }
        }
        for svc in self.services.state() {
            match convert::service(&svc) {
                Ok((model, problems)) => {
                    errors.extend(problems);
                    snapshot.services.extend(model);
                }
                Err(e) => errors.push(e),
            }
        }
        for slice in self.slices.state() {
            match convert::endpoint_slice(&slice) {
                Ok((backends, problems)) => {
                    errors.extend(problems);
                    for (port, backend) in backends {
                        snapshot.backends.entry(port).or_default().insert(backend);
                    }
                }
                Err(e) => errors.push(e),
            }
        }
        // Store order is a hash order: sort so equal clusters give equal snapshots.
        snapshot.pods.sort_by(|a, b| a.id.cmp(&b.id));
        snapshot.unaddressed.sort_by(|a, b| a.id.cmp(&b.id));
        snapshot.policies.sort_by(|a, b| a.id.cmp(&b.id));
        snapshot.services.sort_by(|a, b| a.id.cmp(&b.id));
        (snapshot, errors)
    }

    /// Every Node (trimmed to name, pod CIDRs and addresses).
    pub fn nodes(&self) -> Vec<Arc<Node>> {
        let mut nodes = self.nodes.state();
        nodes.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        nodes
    }
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// A reflector for `K` over the whole cluster, trimmed by `trim`, feeding a new store.
fn reflect<K>(
    client: &Client,
    changed: Arc<Notify>,
    trim: fn(&mut K),
    tasks: &mut Vec<JoinHandle<()>>,
) -> Store<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync,
    K: 'static,
{
    let (reader, writer) = reflector::store();
    let kind = K::kind(&()).to_string();
    let stream = watcher(Api::<K>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .modify(trim)
        .reflect(writer);
    tasks.push(tokio::spawn(async move {
        stream
            .for_each(|event| {
                match event {
                    Ok(_) => debug!(%kind, "watch event"),
                    // The watcher retries with backoff; the store keeps its last state.
                    Err(e) => warn!(%kind, error = %e, "watch failed; keeping the last state"),
                }
                changed.notify_one();
                futures::future::ready(())
            })
            .await;
    }));
    reader
}

/// What no consumer reads: managed fields and annotations are often most of an object.
fn trim_meta(meta: &mut ObjectMeta) {
    meta.managed_fields = None;
    meta.annotations = None;
    meta.owner_references = None;
    meta.finalizers = None;
}

fn trim_meta_of<K: Resource>(object: &mut K) {
    trim_meta(object.meta_mut());
}

/// A pod keeps its labels, node, network mode, container ports, phase and addresses.
fn trim_pod(pod: &mut Pod) {
    trim_meta(&mut pod.metadata);
    if let Some(spec) = pod.spec.as_mut() {
        for c in spec.containers.iter_mut() {
            let ports = c.ports.take();
            *c = Default::default();
            c.ports = ports;
        }
        spec.init_containers = None;
        spec.ephemeral_containers = None;
        spec.volumes = None;
        spec.affinity = None;
        spec.tolerations = None;
    }
    if let Some(status) = pod.status.as_mut() {
        status.conditions = None;
        status.container_statuses = None;
        status.init_container_statuses = None;
        status.ephemeral_container_statuses = None;
    }
}

fn trim_service(svc: &mut Service) {
    trim_meta(&mut svc.metadata);
    svc.status = None;
}

fn trim_node(node: &mut Node) {
    trim_meta(&mut node.metadata);
    if let Some(status) = node.status.as_mut() {
        let addresses = status.addresses.take();
        *status = Default::default();
        status.addresses = addresses;
    }
}
