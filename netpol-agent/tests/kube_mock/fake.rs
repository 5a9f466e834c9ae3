//! A fake Kubernetes API server on kube's mock pattern (`tower_test::mock::pair`), serving the
//! six kinds `KubeSource` watches from objects the test controls.
//!
//! LIST answers with the current objects. WATCH is held until the test changes objects of that
//! kind (or scripts an error), then answered with those events and ended, as an API server
//! ends a watch at its timeout; the watcher then re-watches from the last resourceVersion and
//! that watch is held again. The fake keeps no history: a LIST drops the events queued for its
//! kind, since the list already shows them.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use http::{Request, Response, StatusCode};
use kube::client::Body;
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tower_test::mock::{self, SendResponse};

/// The kinds `KubeSource` watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Namespace,
    Pod,
    NetworkPolicy,
    Service,
    EndpointSlice,
    Node,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::Namespace,
        Kind::Pod,
        Kind::NetworkPolicy,
        Kind::Service,
        Kind::EndpointSlice,
        Kind::Node,
    ];

    fn name(self) -> &'static str {
        match self {
            Kind::Namespace => "Namespace",
            Kind::Pod => "Pod",
            Kind::NetworkPolicy => "NetworkPolicy",
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Kind::NetworkPolicy => "networking.k8s.io/v1",
            Kind::EndpointSlice => "discovery.k8s.io/v1",
            _ => "v1",
        }
    }

    /// The cluster-wide collection path `Api::all` requests.
    fn path(self) -> &'static str {
        match self {
            Kind::Namespace => "/api/v1/namespaces",
            Kind::Pod => "/api/v1/pods",
            Kind::NetworkPolicy => "/apis/networking.k8s.io/v1/networkpolicies",
            Kind::Service => "/api/v1/services",
            Kind::EndpointSlice => "/apis/discovery.k8s.io/v1/endpointslices",
            Kind::Node => "/api/v1/nodes",
        }
    }

    fn parse(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == name)
    }

    fn namespaced(self) -> bool {
        !matches!(self, Kind::Namespace | Kind::Node)
    }
}

/// What the fake has answered for one kind, for tests to wait on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// LISTs answered with objects.
    pub lists: usize,
    /// WATCHes answered with events (an ended watch stream).
    pub watches: usize,
    /// Requests answered with an error (status or transport).
    pub failures: usize,
    /// Whether a WATCH is open and waiting for events now.
    pub watching: bool,
}

/// How the fake answers a request it does not serve normally.
#[derive(Clone, Copy, Debug)]
pub enum Failure {
    /// An HTTP error status with a `Status` body.
    Status(u16),
    /// No HTTP response at all: the connection failed.
    Transport,
}

type Key = (String, String);

#[derive(Default)]
struct Inner {
    resource_version: u64,
    objects: HashMap<Kind, BTreeMap<Key, Value>>,
    /// Watch event lines waiting for the kind's next watch.
    events: HashMap<Kind, Vec<Value>>,
    held_watches: HashMap<Kind, Vec<SendResponse<Response<Body>>>>,
    held_lists: HashMap<Kind, Vec<SendResponse<Response<Body>>>>,
    /// Kinds whose LISTs are held until `release_lists`.
    hold_lists: Vec<Kind>,
    /// Every request fails this way while set.
    unreachable: Option<Failure>,
    counts: HashMap<Kind, Counts>,
    /// Requests for paths the fake does not know (a test bug or a new watch in KubeSource).
    unknown: Vec<String>,
}

/// The fake API server. Dropping it stops the serving task.
pub struct FakeApi {
    inner: Arc<Mutex<Inner>>,
    task: JoinHandle<()>,
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeApi {
    /// A fake holding the objects of `yaml` (multi-document), and a client talking to it.
    pub fn start(yaml: &str) -> (FakeApi, kube::Client) {
        let (svc, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let inner = Arc::new(Mutex::new(Inner::default()));
        let fake = FakeApi {
            inner: inner.clone(),
            task: tokio::spawn(async move {
                while let Some((request, respond)) = handle.next_request().await {
                    serve(&mut inner.lock().unwrap(), &request, respond);
                }
            }),
        };
        for object in objects(yaml) {
            fake.upsert(object);
        }
        (fake, kube::Client::new(svc, "default"))
    }

    /// Creates or replaces the objects of `yaml`: an ADDED or MODIFIED event each.
    pub fn apply(&self, yaml: &str) {
        let mut inner = self.inner.lock().unwrap();
        let mut kinds = Vec::new();
        for object in objects(yaml) {
            let (kind, key, object) = inner.store(object);
            let event = if inner.objects[&kind].contains_key(&key) {
                "MODIFIED"
            } else {
                "ADDED"
            };
            inner
                .objects
                .get_mut(&kind)
                .unwrap()
                .insert(key, object.clone());
            inner.queue(kind, json!({"type": event, "object": object}));
            kinds.push(kind);
        }
        // One watch answer per kind with all of the text's events, as one burst.
        for kind in kinds {
            inner.flush(kind);
        }
    }

    /// Deletes an object: a DELETED event.
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) {
        let mut inner = self.inner.lock().unwrap();
        let key = (namespace.to_string(), name.to_string());
        let mut object = inner
            .objects
            .get_mut(&kind)
            .and_then(|objects| objects.remove(&key))
            .unwrap_or_else(|| panic!("no {kind:?} {namespace}/{name} to delete"));
        // The deletion has its own resourceVersion, as the API server gives it.
        inner.resource_version += 1;
        object["metadata"]["resourceVersion"] = json!(inner.resource_version.to_string());
        inner.push(kind, json!({"type": "DELETED", "object": object}));
    }

    /// Ends the kind's watch with `410 Gone` inside the stream (what an API server sends when
    /// the watched resourceVersion was compacted): the watcher must relist.
    pub fn expire_watch(&self, kind: Kind) {
        let status = json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": "too old resource version", "reason": "Expired", "code": 410,
        });
        self.inner
            .lock()
            .unwrap()
            .push(kind, json!({"type": "ERROR", "object": status}));
    }

    /// While `Some`, every request (and every held watch, now) fails that way.
    pub fn set_unreachable(&self, failure: Option<Failure>) {
        let mut inner = self.inner.lock().unwrap();
        inner.unreachable = failure;
        if let Some(failure) = failure {
            let held: Vec<_> = inner.held_watches.drain().collect();
            for (kind, responders) in held {
                for respond in responders {
                    inner.fail(kind, respond, failure);
                }
            }
        }
    }

    /// Holds (does not answer) the kind's LISTs until `release_lists`.
    pub fn hold_lists(&self, kind: Kind) {
        self.inner.lock().unwrap().hold_lists.push(kind);
    }

    /// Answers the held LISTs of a kind (with `failure`, or with the objects) and stops holding.
    pub fn release_lists(&self, kind: Kind, failure: Option<Failure>) {
        let mut inner = self.inner.lock().unwrap();
        inner.hold_lists.retain(|&k| k != kind);
        for respond in inner.held_lists.remove(&kind).unwrap_or_default() {
            match failure {
                Some(failure) => inner.fail(kind, respond, failure),
                None => inner.list(kind, respond),
            }
        }
    }

    pub fn counts(&self, kind: Kind) -> Counts {
        let inner = self.inner.lock().unwrap();
        let mut counts = inner.counts.get(&kind).copied().unwrap_or_default();
        counts.watching = inner.held_watches.get(&kind).is_some_and(|w| !w.is_empty());
        counts
    }

    /// Paths requested that the fake does not serve.
    pub fn unknown_requests(&self) -> Vec<String> {
        self.inner.lock().unwrap().unknown.clone()
    }

    /// Waits (polling) until `done` holds for the counts of `kind`; panics after `within`.
    pub async fn wait_for(&self, kind: Kind, within: Duration, done: impl Fn(&Counts) -> bool) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let counts = self.counts(kind);
            if done(&counts) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{kind:?}: condition not reached within {within:?}; counts now {counts:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn upsert(&self, object: Value) {
        let mut inner = self.inner.lock().unwrap();
        let (kind, key, object) = inner.store(object);
        inner.objects.get_mut(&kind).unwrap().insert(key, object);
    }
}

impl Inner {
    /// Gives an object its next resourceVersion; its kind and key.
    fn store(&mut self, mut object: Value) -> (Kind, Key, Value) {
        let kind = object["kind"]
            .as_str()
            .and_then(Kind::parse)
            .unwrap_or_else(|| panic!("the fake does not serve {}", object["kind"]));
        let meta = &object["metadata"];
        let name = meta["name"].as_str().expect("metadata.name").to_string();
        let namespace = match (kind.namespaced(), meta["namespace"].as_str()) {
            (false, _) => String::new(),
            (true, Some(ns)) => ns.to_string(),
            (true, None) => "default".to_string(),
        };
        if kind.namespaced() {
            object["metadata"]["namespace"] = json!(namespace);
        }
        self.resource_version += 1;
        object["metadata"]["resourceVersion"] = json!(self.resource_version.to_string());
        object["metadata"]["uid"] = json!(format!("uid-{kind:?}-{namespace}-{name}"));
        self.objects.entry(kind).or_default();
        (kind, (namespace, name), object)
    }

    /// Queues an event line and, when the kind's watch is open, answers it now.
    fn push(&mut self, kind: Kind, event: Value) {
        self.queue(kind, event);
        self.flush(kind);
    }

    fn queue(&mut self, kind: Kind, event: Value) {
        self.events.entry(kind).or_default().push(event);
    }

    /// Answers the kind's open watch with the queued events, if there are both.
    fn flush(&mut self, kind: Kind) {
        if self.events.get(&kind).is_none_or(Vec::is_empty) {
            return;
        }
        if let Some(respond) = self.held_watches.get_mut(&kind).and_then(Vec::pop) {
            self.deliver(kind, respond);
        }
    }

    fn deliver(&mut self, kind: Kind, respond: SendResponse<Response<Body>>) {
        let mut body = Vec::new();
        for event in self.events.remove(&kind).unwrap_or_default() {
            serde_json::to_writer(&mut body, &event).unwrap();
            body.push(b'\n');
        }
        self.counts.entry(kind).or_default().watches += 1;
        respond.send_response(response(StatusCode::OK, body));
    }

    fn list(&mut self, kind: Kind, respond: SendResponse<Response<Body>>) {
        let counts = self.counts.entry(kind).or_default();
        counts.lists += 1;
        let mut items: Vec<&Value> = self
            .objects
            .get(&kind)
            .into_iter()
            .flatten()
            .map(|(_, o)| o)
            .collect();
        // Every other list in reverse: what a store builds must not depend on list order.
        if counts.lists.is_multiple_of(2) {
            items.reverse();
        }
        let list = json!({
            "apiVersion": kind.api_version(),
            "kind": format!("{}List", kind.name()),
            "metadata": {"resourceVersion": self.resource_version.to_string()},
            "items": items,
        });
        // The list shows every change so far: the kind's queued events are history now.
        self.events.remove(&kind);
        respond.send_response(response(StatusCode::OK, serde_json::to_vec(&list).unwrap()));
    }

    fn fail(&mut self, kind: Kind, respond: SendResponse<Response<Body>>, failure: Failure) {
        self.counts.entry(kind).or_default().failures += 1;
        match failure {
            Failure::Status(code) => {
                let status = json!({
                    "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                    "message": "scripted failure", "code": code,
                });
                let code = StatusCode::from_u16(code).expect("an HTTP status code");
                respond.send_response(response(code, serde_json::to_vec(&status).unwrap()));
            }
            Failure::Transport => respond.send_error(std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                "fake API server unreachable",
            )),
        }
    }
}

fn serve(inner: &mut Inner, request: &Request<Body>, respond: SendResponse<Response<Body>>) {
    let path = request.uri().path();
    let Some(kind) = Kind::ALL.into_iter().find(|k| k.path() == path) else {
        inner.unknown.push(request.uri().to_string());
        respond.send_response(response(
            StatusCode::NOT_FOUND,
            b"404 page not found".to_vec(),
        ));
        return;
    };
    let watch = request
        .uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .any(|param| param == "watch=true");
    if let Some(failure) = inner.unreachable {
        inner.fail(kind, respond, failure);
    } else if !watch && inner.hold_lists.contains(&kind) {
        inner.held_lists.entry(kind).or_default().push(respond);
    } else if !watch {
        inner.list(kind, respond);
    } else if inner.events.get(&kind).is_some_and(|e| !e.is_empty()) {
        inner.deliver(kind, respond);
    } else {
        inner.held_watches.entry(kind).or_default().push(respond);
    }
}

fn response(status: StatusCode, body: Vec<u8>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Body::from(body))
        .unwrap()
}

/// The documents of a YAML text as JSON objects (empty documents skipped).
pub fn objects(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|doc| {
            let value: serde_yaml::Value = serde::Deserialize::deserialize(doc).expect("test YAML");
            serde_json::to_value(value).expect("test YAML as JSON")
        })
        .filter(|v| !v.is_null())
        .collect()
}
