//! `KubeSource` against a fake API server (kube's `tower_test` mock pattern): reflectors list
//! and watch, the stores follow ADDED/MODIFIED/DELETED, relists and outages change nothing,
//! and the snapshot feeds the same pure reconcile path as the file source
//! (compile -> desired map contents -> diff). No kernel, no root.
//!
//! The watcher's default backoff (0.8 s to 1.6 s after the first error) is real time here:
//! the error scenarios take one to five seconds each (they run in parallel).

#[path = "kube_mock/fake.rs"]
mod fake;
#[path = "kube_mock/harness.rs"]
mod harness;

use std::{sync::Arc, time::Duration};

use fake::{Failure, FakeApi, Kind};
use futures::FutureExt as _;
use harness::{
    bounded, desired, drain, file_snapshot, follow, ingress_allowed, label, labels_of, pod,
    snapshot, synced, CHANGE, CLUSTER,
};
use netpol_agent::{
    policy::{desired::diff, model::ObjectRef},
    source::kube::KubeSource,
};
use tokio::{sync::Notify, time::timeout};

#[tokio::test]
async fn initial_list_compiles_like_the_file_source() {
    bounded(async {
        let (_api, source, _changed) = synced(CLUSTER).await;
        let from_api = snapshot(&source);
        let from_file = file_snapshot(CLUSTER);

        let pods: Vec<String> = from_api.pods.iter().map(|p| p.id.to_string()).collect();
        assert_eq!(
            pods,
            ["app/api", "app/web", "other/client"],
            "every pod with an address, and not the Succeeded one"
        );
        assert_eq!(from_api.namespaces.len(), 2);
        assert_eq!(from_api.policies.len(), 1);
        assert_eq!(from_api.services.len(), 1);
        assert_eq!(from_api.backends.len(), 1);
        assert_eq!(
            format!("{from_api:?}"),
            format!("{from_file:?}"),
            "the API and the file source read the same objects the same way (trimming kept \
             every field the conversion reads)"
        );

        let (compiled_api, contents_api) = desired(&from_api);
        let (compiled_file, contents_file) = desired(&from_file);
        assert_eq!(compiled_api, compiled_file);
        assert!(diff(&contents_api, &contents_file).is_empty());
        assert!(diff(&contents_file, &contents_api).is_empty());
        assert_eq!(contents_api.endpoints.len(), 2, "app/api and app/web on n1");
        assert!(!contents_api.policy.is_empty() && !contents_api.services.is_empty());

        // What the policy says, from the maps the API's objects compile to.
        let web = &compiled_api.endpoints[&pod("app/web")];
        assert!(web.ingress.isolated && web.egress.isolated);
        assert_eq!(
            ingress_allowed(&compiled_api, "app/web", "10.244.2.2", 80),
            Some(true)
        );
        assert_eq!(
            ingress_allowed(&compiled_api, "app/web", "10.244.1.3", 80),
            Some(false)
        );
        assert_eq!(
            ingress_allowed(&compiled_api, "app/web", "10.244.2.2", 81),
            Some(false)
        );

        // Nodes: kept for pod networking, trimmed to name, pod CIDRs and addresses.
        let nodes = source.nodes();
        assert_eq!(nodes.len(), 1);
        let node = &nodes[0];
        assert_eq!(node.metadata.name.as_deref(), Some("n1"));
        assert!(node.metadata.annotations.is_none(), "trimmed");
        let cidrs = node.spec.as_ref().and_then(|s| s.pod_cidrs.clone());
        assert_eq!(cidrs, Some(vec!["10.244.1.0/24".to_string()]));
        let status = node.status.as_ref().expect("status with addresses");
        assert_eq!(status.addresses.as_ref().map(Vec::len), Some(1));
        assert!(
            status.capacity.is_none() && status.conditions.is_none(),
            "trimmed"
        );
    })
    .await;
}

#[tokio::test]
async fn pod_added_relabelled_deleted_and_a_policy_added() {
    bounded(async {
        let cluster = r#"
apiVersion: v1
kind: Namespace
metadata: {name: app}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: app, labels: {app: client}}
spec: {nodeName: n2, containers: [{name: c}]}
status: {podIP: 10.244.2.5}
"#;
        let web = |app: &str| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: web, namespace: app, labels: {{app: {app}}}}}\n\
                 spec: {{nodeName: n1, containers: [{{name: c, ports: [{{containerPort: 80}}]}}]}}\n\
                 status: {{podIP: 10.244.1.2}}\n"
            )
        };
        let (api, source, changed) = synced(cluster).await;
        assert!(desired(&snapshot(&source)).0.endpoints.is_empty());

        // ADDED: the pod appears, enforced here and open (no policy selects it).
        drain(&changed);
        api.apply(&web("web"));
        let snap = follow(&changed, &source, "pod added", |s| {
            labels_of(s, "app/web").is_some()
        })
        .await;
        assert_eq!(labels_of(&snap, "app/web"), Some(&label("app", "web")));
        let (compiled, contents) = desired(&snap);
        assert_eq!(contents.endpoints.len(), 1);
        assert_eq!(
            ingress_allowed(&compiled, "app/web", "10.244.2.5", 80),
            Some(true)
        );

        // A policy ADDED: it isolates the pod it selects and allows only what it says.
        drain(&changed);
        api.apply(
            r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-from-trusted, namespace: app}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress: [{from: [{podSelector: {matchLabels: {app: trusted}}}]}]
"#,
        );
        let snap = follow(&changed, &source, "policy added", |s| {
            s.policies.len() == 1
        })
        .await;
        let (compiled, _) = desired(&snap);
        let endpoint = &compiled.endpoints[&pod("app/web")];
        assert!(endpoint.ingress.isolated, "selected: isolated");
        assert_eq!(
            endpoint.ingress.policies,
            [ObjectRef::new("app", "web-from-trusted")]
        );
        assert!(!endpoint.egress.isolated, "an ingress-only policy");
        assert_eq!(
            ingress_allowed(&compiled, "app/web", "10.244.2.5", 80),
            Some(false)
        );

        // MODIFIED: relabelled out of the policy's selector, the pod is open again.
        drain(&changed);
        api.apply(&web("web2"));
        let snap = follow(&changed, &source, "pod relabelled", |s| {
            labels_of(s, "app/web") == Some(&label("app", "web2"))
        })
        .await;
        let (compiled, _) = desired(&snap);
        assert!(!compiled.endpoints[&pod("app/web")].ingress.isolated);
        assert_eq!(
            ingress_allowed(&compiled, "app/web", "10.244.2.5", 80),
            Some(true)
        );

        // DELETED: gone from the snapshot, the endpoint and the maps.
        drain(&changed);
        api.delete(Kind::Pod, "app", "web");
        let snap = follow(&changed, &source, "pod deleted", |s| {
            labels_of(s, "app/web").is_none()
        })
        .await;
        let (compiled, contents) = desired(&snap);
        assert!(compiled.endpoints.is_empty() && contents.endpoints.is_empty());
        assert_eq!(ingress_allowed(&compiled, "app/web", "10.244.2.5", 80), None);

        // All of it came through watches: nothing was relisted.
        for kind in Kind::ALL {
            assert_eq!(api.counts(kind).lists, 1, "{kind:?} relisted");
        }
        assert_eq!(api.counts(Kind::Pod).watches, 3);
        assert_eq!(api.counts(Kind::NetworkPolicy).watches, 1);
    })
    .await;
}

#[tokio::test]
async fn namespace_relabel_retargets_policies() {
    bounded(async {
        let namespaces = |b: &str, c: &str| {
            format!(
                "apiVersion: v1\nkind: Namespace\nmetadata: {{name: b, labels: {{team: {b}}}}}\n---\n\
                 apiVersion: v1\nkind: Namespace\nmetadata: {{name: c, labels: {{team: {c}}}}}\n"
            )
        };
        let cluster = format!(
            "{}---\n{}",
            namespaces("trusted", "other"),
            r#"
apiVersion: v1
kind: Namespace
metadata: {name: a}
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: a, labels: {app: server}}
spec: {nodeName: n1, containers: [{name: c, ports: [{containerPort: 80}]}]}
status: {podIP: 10.244.1.10}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: b}
spec: {nodeName: n2, containers: [{name: c}]}
status: {podIP: 10.244.2.11}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: c}
spec: {nodeName: n2, containers: [{name: c}]}
status: {podIP: 10.244.2.12}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: from-trusted, namespace: a}
spec:
  podSelector: {}
  ingress: [{from: [{namespaceSelector: {matchLabels: {team: trusted}}}], ports: [{port: 80}]}]
"#
        );
        let (api, source, changed) = synced(&cluster).await;
        let (compiled, _) = desired(&snapshot(&source));
        assert_eq!(
            ingress_allowed(&compiled, "a/server", "10.244.2.11", 80),
            Some(true),
            "b is trusted"
        );
        assert_eq!(
            ingress_allowed(&compiled, "a/server", "10.244.2.12", 80),
            Some(false),
            "c is not"
        );

        // Two MODIFIED namespaces, one watch answer; policies and pods do not change.
        drain(&changed);
        api.apply(&namespaces("other", "trusted"));
        let snap = follow(&changed, &source, "namespaces relabelled", |s| {
            s.namespace_labels("b").get("team").map(String::as_str) == Some("other")
                && s.namespace_labels("c").get("team").map(String::as_str) == Some("trusted")
        })
        .await;
        let (compiled, _) = desired(&snap);
        assert_eq!(
            ingress_allowed(&compiled, "a/server", "10.244.2.11", 80),
            Some(false),
            "b is no longer trusted"
        );
        assert_eq!(
            ingress_allowed(&compiled, "a/server", "10.244.2.12", 80),
            Some(true),
            "c is now"
        );
        assert_eq!(api.counts(Kind::Namespace).watches, 1);
        for kind in [Kind::Pod, Kind::NetworkPolicy] {
            assert_eq!(api.counts(kind).watches, 0, "{kind:?} had no events");
        }
    })
    .await;
}

#[tokio::test]
async fn expired_watch_relists_and_changes_nothing() {
    bounded(async {
        let (api, source, changed) = synced(CLUSTER).await;
        let before = snapshot(&source);
        let nodes_before = format!("{:?}", source.nodes());
        let (compiled_before, contents_before) = desired(&before);

        // Every watch ends with 410 Gone: every kind relists (the fake lists in the reverse
        // order this time) after the watcher's backoff, and watches again.
        drain(&changed);
        for kind in Kind::ALL {
            api.expire_watch(kind);
        }
        for kind in Kind::ALL {
            api.wait_for(kind, CHANGE, |c| c.lists == 2 && c.watching)
                .await;
        }
        assert!(
            changed.notified().now_or_never().is_some(),
            "the relists woke the reconcile loop"
        );

        let after = snapshot(&source);
        assert_eq!(format!("{after:?}"), format!("{before:?}"));
        assert_eq!(format!("{:?}", source.nodes()), nodes_before);
        let (compiled_after, contents_after) = desired(&after);
        assert_eq!(compiled_after, compiled_before);
        let d = diff(&contents_after, &contents_before);
        assert!(
            d.is_empty(),
            "a relist of unchanged objects changed the maps: {d:?}"
        );
    })
    .await;
}

#[tokio::test]
async fn unreachable_api_keeps_the_last_state() {
    bounded(async {
        let (api, source, changed) = synced(CLUSTER).await;
        let before = format!("{:?}", snapshot(&source));
        let (_, contents_before) = desired(&snapshot(&source));

        // Pods must relist (410), then the API goes away: the relist fails, and so does every
        // other kind's re-watch. Both in one step, before the backoff lets the relist run.
        api.expire_watch(Kind::Pod);
        api.set_unreachable(Some(Failure::Transport));
        for kind in Kind::ALL {
            api.wait_for(kind, CHANGE, |c| c.failures >= 1).await;
        }
        assert_eq!(
            api.counts(Kind::Pod).lists,
            1,
            "the relist did not get through"
        );
        let during = snapshot(&source);
        assert_eq!(
            format!("{during:?}"),
            before,
            "the stores kept their last state"
        );
        assert!(diff(&desired(&during).1, &contents_before).is_empty());
        timeout(Duration::from_millis(100), source.wait_synced())
            .await
            .expect("still synced: the stores are not emptied by failures");

        // Back: pods relist, the others watch again, and nothing changed.
        api.set_unreachable(None);
        api.wait_for(Kind::Pod, CHANGE, |c| c.lists == 2 && c.watching)
            .await;
        for kind in Kind::ALL {
            api.wait_for(kind, CHANGE, |c| c.watching).await;
        }
        let after = snapshot(&source);
        assert_eq!(format!("{after:?}"), before);
        assert!(diff(&desired(&after).1, &contents_before).is_empty());

        // And the resumed watches deliver again.
        drain(&changed);
        api.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: other, labels: {team: z}}\n");
        follow(
            &changed,
            &source,
            "namespace relabelled after the outage",
            |s| s.namespace_labels("other").get("team").map(String::as_str) == Some("z"),
        )
        .await;
    })
    .await;
}

#[tokio::test]
async fn not_synced_until_every_kind_has_listed() {
    bounded(async {
        let (api, client) = FakeApi::start(CLUSTER);
        api.hold_lists(Kind::NetworkPolicy);
        let changed = Arc::new(Notify::new());
        let source = KubeSource::start(&client, changed.clone());

        // Every other kind lists and watches; policies have not listed.
        for kind in Kind::ALL.into_iter().filter(|&k| k != Kind::NetworkPolicy) {
            api.wait_for(kind, CHANGE, |c| c.lists == 1 && c.watching)
                .await;
        }
        assert!(
            timeout(Duration::from_millis(300), source.wait_synced())
                .await
                .is_err(),
            "synced without the NetworkPolicy list: pods would look unselected"
        );

        // The held list fails: still not synced (the retry waits for the backoff, >= 0.8 s).
        api.release_lists(Kind::NetworkPolicy, Some(Failure::Status(500)));
        assert!(
            timeout(Duration::from_millis(300), source.wait_synced())
                .await
                .is_err(),
            "synced after a failed list"
        );
        assert_eq!(api.counts(Kind::NetworkPolicy).failures, 1);

        // The retried list succeeds: synced, with the policy.
        timeout(CHANGE, source.wait_synced())
            .await
            .expect("synced once the retried list is answered");
        let snap = snapshot(&source);
        assert_eq!(snap.policies.len(), 1);
        let (compiled, _) = desired(&snap);
        assert!(compiled.endpoints[&pod("app/web")].ingress.isolated);
    })
    .await;
}
