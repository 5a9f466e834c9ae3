//! What the scenarios share: the cluster fixture, a synced source on the fake API, the pure
//! reconcile path (compile -> desired map contents), and waiting for changes the way the
//! reconcile loop does (woken by the source's `Notify`).

use std::{
    collections::BTreeMap, future::Future, net::IpAddr, path::Path, sync::Arc, time::Duration,
};

use futures::FutureExt as _;
use netpol_agent::{
    policy::{
        compile,
        desired::{map_contents, MapContents},
        evaluate::Flow,
        model::{ObjectRef, Snapshot},
        Compiled, Scope,
    },
    source::{file::add_documents, kube::KubeSource},
};
use netpol_common::Direction;
use tokio::{sync::Notify, time::timeout};

use crate::fake::{FakeApi, Kind};

/// The node the tests' agent runs on.
pub const NODE: &str = "n1";
pub const TCP: u8 = 6;
/// How long any single expected change may take (backoffs included).
pub const CHANGE: Duration = Duration::from_secs(5);
/// A whole test: a hang fails instead of blocking the run.
pub const TEST: Duration = Duration::from_secs(15);

/// A small cluster with every kind, and fields the reflectors trim away (managed fields,
/// annotations, owner references, images, conditions, node capacity): the same text loaded
/// through the file source must compile to the same maps.
pub const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: app
  labels: {team: x}
  annotations: {kubectl.kubernetes.io/last-applied-configuration: "{}"}
  managedFields: [{manager: kubectl, operation: Apply, apiVersion: v1}]
---
apiVersion: v1
kind: Namespace
metadata: {name: other, labels: {team: y}}
---
apiVersion: v1
kind: Pod
metadata:
  name: api
  namespace: app
  labels: {app: api}
  ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: api-5d4f, uid: u1}]
spec:
  nodeName: n1
  containers: [{name: c, image: "api:1", env: [{name: A, value: b}], ports: [{name: http, containerPort: 8080}]}]
status:
  phase: Running
  podIP: 10.244.1.3
  podIPs: [{ip: 10.244.1.3}]
  conditions: [{type: Ready, status: "True"}]
  containerStatuses: [{name: c, image: "api:1", imageID: x, ready: true, restartCount: 0}]
---
apiVersion: v1
kind: Pod
metadata: {name: done, namespace: app, labels: {app: web}}
spec: {nodeName: n1, containers: [{name: c}]}
status: {phase: Succeeded, podIP: 10.244.1.9}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: app, labels: {app: web}}
spec:
  nodeName: n1
  containers: [{name: c, image: "web:1", ports: [{name: http, containerPort: 80}]}]
status: {phase: Running, podIP: 10.244.1.2}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: other, labels: {app: client}}
spec: {nodeName: n2, containers: [{name: c}]}
status: {phase: Running, podIP: 10.244.2.2}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-policy, namespace: app, annotations: {note: trimmed}}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Ingress, Egress]
  ingress:
  - from: [{namespaceSelector: {matchLabels: {team: y}}}]
    ports: [{port: http}]
  egress:
  - to: [{podSelector: {matchLabels: {app: api}}}]
    ports: [{port: 8080}]
  - ports: [{port: 53, protocol: UDP}]
---
apiVersion: v1
kind: Service
metadata: {name: api-svc, namespace: app}
spec:
  clusterIP: 10.96.0.20
  clusterIPs: [10.96.0.20]
  ports: [{name: http, port: 80, targetPort: 8080, protocol: TCP}]
status: {loadBalancer: {}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: api-svc-x1
  namespace: app
  labels: {kubernetes.io/service-name: api-svc}
addressType: IPv4
endpoints: [{addresses: [10.244.1.3], conditions: {ready: true}}]
ports: [{name: http, port: 8080, protocol: TCP}]
---
apiVersion: v1
kind: Node
metadata: {name: n1, annotations: {node.alpha.kubernetes.io/ttl: "0"}}
spec: {podCIDR: 10.244.1.0/24, podCIDRs: [10.244.1.0/24]}
status:
  addresses: [{type: InternalIP, address: 172.18.0.2}]
  capacity: {cpu: "2"}
  conditions: [{type: Ready, status: "True"}]
"#;

/// Runs a test body with a deadline.
pub async fn bounded<F: Future>(body: F) -> F::Output {
    timeout(TEST, body)
        .await
        .expect("the test hung (a wait with no deadline?)")
}

/// A fake API holding `yaml`, and a synced source on it.
pub async fn synced(yaml: &str) -> (FakeApi, KubeSource, Arc<Notify>) {
    let (api, client) = FakeApi::start(yaml);
    let changed = Arc::new(Notify::new());
    let source = KubeSource::start(&client, changed.clone());
    timeout(CHANGE, source.wait_synced())
        .await
        .expect("wait_synced with every first list answered");
    for kind in Kind::ALL {
        api.wait_for(kind, CHANGE, |c| c.lists == 1 && c.watching)
            .await;
    }
    assert_eq!(api.unknown_requests(), Vec::<String>::new());
    (api, source, changed)
}

/// The source's snapshot; its conversion must not have found problems.
pub fn snapshot(source: &KubeSource) -> Snapshot {
    let (snapshot, errors) = source.snapshot();
    assert!(errors.is_empty(), "conversion errors: {errors:?}");
    snapshot
}

/// The same objects through the file source, in the order `KubeSource::snapshot` sorts.
pub fn file_snapshot(yaml: &str) -> Snapshot {
    let mut snapshot = Snapshot::default();
    let mut errors = Vec::new();
    add_documents(Path::new("cluster.yaml"), yaml, &mut snapshot, &mut errors);
    assert!(errors.is_empty(), "file source errors: {errors:?}");
    snapshot.pods.sort_by(|a, b| a.id.cmp(&b.id));
    snapshot.policies.sort_by(|a, b| a.id.cmp(&b.id));
    snapshot.services.sort_by(|a, b| a.id.cmp(&b.id));
    snapshot
}

/// A made-up interface per local pod, in name order.
pub fn ifindex_of(snapshot: &Snapshot) -> BTreeMap<ObjectRef, u32> {
    let mut local: Vec<&ObjectRef> = snapshot
        .pods
        .iter()
        .filter(|p| p.node_name.as_deref() == Some(NODE))
        .map(|p| &p.id)
        .collect();
    local.sort();
    (100..).zip(local).map(|(i, id)| (id.clone(), i)).collect()
}

/// What the agent on `NODE` would program for a snapshot.
pub fn desired(snapshot: &Snapshot) -> (Compiled, MapContents) {
    let compiled = compile(snapshot, &Scope::Node(NODE.into()), &[]);
    let contents = map_contents(&compiled, &ifindex_of(snapshot));
    (compiled, contents)
}

pub fn pod(id: &str) -> ObjectRef {
    let (ns, name) = id.split_once('/').unwrap();
    ObjectRef::new(ns, name)
}

/// Whether a new TCP flow from `peer` to `to`'s `port` passes `to`'s ingress, as the datapath
/// would decide it with these maps. `None`: `to` is not enforced here.
pub fn ingress_allowed(compiled: &Compiled, to: &str, peer: &str, port: u16) -> Option<bool> {
    let flow = Flow {
        peer: peer.parse::<IpAddr>().unwrap(),
        proto: TCP,
        port,
    };
    compiled
        .evaluate(&pod(to), Direction::Ingress, flow)
        .map(|v| v.allowed)
}

/// Forgets a wake-up already pending, so the next one is caused by what the test does next.
pub fn drain(changed: &Notify) {
    let _ = changed.notified().now_or_never();
}

/// Waits for wake-ups until the snapshot satisfies `done`, as the reconcile loop does. Panics
/// when no wake-up brings it within `CHANGE`: a change that does not notify hangs here.
pub async fn follow(
    changed: &Notify,
    source: &KubeSource,
    what: &str,
    done: impl Fn(&Snapshot) -> bool,
) -> Snapshot {
    let wait = async {
        loop {
            changed.notified().await;
            let snapshot = snapshot(source);
            if done(&snapshot) {
                return snapshot;
            }
        }
    };
    timeout(CHANGE, wait)
        .await
        .unwrap_or_else(|_| panic!("{what}: not seen after a wake-up within {CHANGE:?}"))
}

pub fn labels_of<'a>(snapshot: &'a Snapshot, id: &str) -> Option<&'a BTreeMap<String, String>> {
    let id = pod(id);
    snapshot.pods.iter().find(|p| p.id == id).map(|p| &p.labels)
}

pub fn label(key: &str, value: &str) -> BTreeMap<String, String> {
    BTreeMap::from([(key.to_string(), value.to_string())])
}
