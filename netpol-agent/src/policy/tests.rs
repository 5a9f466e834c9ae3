//! Table tests of the compiler, evaluated through the compiled contents (`evaluate`), so each
//! case checks what the kernel would be given, not a second reading of the policies.

use std::net::IpAddr;

use netpol_common::Direction;

use super::{
    compile::{compile, Compiled, Scope},
    evaluate::Flow,
    model::{ObjectRef, Snapshot},
};
use crate::source::file::add_documents;

const TCP: u8 = 6;
const UDP: u8 = 17;
const SCTP: u8 = 132;

/// Namespaces `a` (team=x) and `b` (team=y); pods with IPs 10.0.<ns>.<n>.
const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: a, labels: {team: x}}
---
apiVersion: v1
kind: Namespace
metadata: {name: b, labels: {team: y}}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: a, labels: {app: web}}
spec: {nodeName: n1, containers: [{name: c, ports: [{name: http, containerPort: 80}, {name: dns, containerPort: 53, protocol: UDP}]}]}
status: {podIP: 10.0.1.1}
---
apiVersion: v1
kind: Pod
metadata: {name: api, namespace: a, labels: {app: api}}
spec: {nodeName: n1, containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}
status: {podIP: 10.0.1.2}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: b, labels: {app: client}}
spec: {nodeName: n2, containers: [{name: c}]}
status: {podIP: 10.0.2.1}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: b, labels: {app: web}}
spec: {nodeName: n2, containers: [{name: c, ports: [{name: http, containerPort: 81}]}]}
status: {podIP: 10.0.2.2}
"#;

fn snapshot(policies: &str) -> Snapshot {
    let mut snap = Snapshot::default();
    let mut errors = Vec::new();
    add_documents("cluster.yaml".as_ref(), CLUSTER, &mut snap, &mut errors);
    add_documents("policies.yaml".as_ref(), policies, &mut snap, &mut errors);
    assert!(errors.is_empty(), "unexpected input errors: {errors:?}");
    snap
}

fn compiled(policies: &str) -> Compiled {
    compile(
        &snapshot(policies),
        &Scope::Cluster,
        &["192.168.0.1".parse().unwrap()],
    )
}

fn pod(id: &str) -> ObjectRef {
    let (ns, name) = id.split_once('/').unwrap();
    ObjectRef::new(ns, name)
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Whether `dir` at `at` allows a new flow with `peer`.
fn allows(c: &Compiled, at: &str, dir: Direction, peer: &str, proto: u8, port: u16) -> bool {
    let flow = Flow {
        peer: ip(peer),
        proto,
        port,
    };
    c.evaluate(&pod(at), dir, flow)
        .expect("pod is an endpoint")
        .allowed
}

use Direction::{Egress, Ingress};

#[test]
fn no_policy_allows_everything() {
    let c = compiled("");
    assert!(allows(&c, "a/web", Ingress, "10.0.2.1", TCP, 80));
    assert!(allows(&c, "a/web", Egress, "8.8.8.8", UDP, 53));
    assert!(c.policy.is_empty() && c.cidr.is_empty());
}

#[test]
fn table() {
    struct Case {
        name: &'static str,
        policy: &'static str,
        checks: &'static [(&'static str, Direction, &'static str, u8, u16, bool)],
    }
    let cases = [
        Case {
            name: "default deny ingress isolates only ingress",
            policy: "{apiVersion: networking.k8s.io/v1, kind: NetworkPolicy, metadata: {name: p, namespace: a}, spec: {podSelector: {}}}",
            checks: &[
                ("a/web", Ingress, "10.0.1.2", TCP, 80, false),
                ("a/web", Ingress, "10.0.2.1", TCP, 80, false),
                ("a/web", Egress, "10.0.2.1", TCP, 80, true),
                // The node's own addresses always reach the pod.
                ("a/web", Ingress, "192.168.0.1", TCP, 80, true),
                // Another namespace's pods are not selected.
                ("b/web", Ingress, "10.0.1.1", TCP, 81, true),
            ],
        },
        Case {
            name: "podSelector peer means the policy's namespace",
            policy: r#"{apiVersion: networking.k8s.io/v1, kind: NetworkPolicy, metadata: {name: p, namespace: a},
                spec: {podSelector: {matchLabels: {app: api}}, ingress: [{from: [{podSelector: {matchLabels: {app: web}}}], ports: [{port: 8080}]}]}}"#,
            checks: &[
                ("a/api", Ingress, "10.0.1.1", TCP, 8080, true),
                ("a/api", Ingress, "10.0.1.1", TCP, 8081, false),
                ("a/api", Ingress, "10.0.1.1", UDP, 8080, false),
                ("a/api", Ingress, "10.0.2.2", TCP, 8080, false),
            ],
        },
        Case {
            name: "namespaceSelector alone: every pod of those namespaces; AND with podSelector",
            policy: r#"{apiVersion: networking.k8s.io/v1, kind: NetworkPolicy, metadata: {name: p, namespace: a},
                spec: {podSelector: {matchLabels: {app: api}}, ingress: [
                  {from: [{namespaceSelector: {matchLabels: {team: y}}, podSelector: {matchLabels: {app: web}}}], ports: [{port: 1}]},
                  {from: [{namespaceSelector: {matchExpressions: [{key: kubernetes.io/metadata.name, operator: In, values: [b]}]}}], ports: [{port: 2}]}]}}"#,
            checks: &[
                ("a/api", Ingress, "10.0.2.2", TCP, 1, true),
                ("a/api", Ingress, "10.0.2.1", TCP, 1, false),
                ("a/api", Ingress, "10.0.2.1", TCP, 2, true),
                ("a/api", Ingress, "10.0.1.1", TCP, 2, false),
            ],
        },
        Case {
            name: "ipBlock except does not erase what another rule allows; matches pod IPs",
            policy: r#"{apiVersion: networking.k8s.io/v1, kind: NetworkPolicy, metadata: {name: p, namespace: a},
                spec: {podSelector: {matchLabels: {app: web}}, policyTypes: [Egress], egress: [
                  {to: [{ipBlock: {cidr: 10.0.0.0/16, except: [10.0.2.0/24]}}]},
                  {to: [{ipBlock: {cidr: 10.0.2.0/23}}], ports: [{port: 443}]}]}}"#,
            checks: &[
                ("a/web", Egress, "10.0.1.2", TCP, 9, true),
                ("a/web", Egress, "10.0.2.1", TCP, 9, false),
                ("a/web", Egress, "10.0.2.1", TCP, 443, true),
                ("a/web", Egress, "10.0.3.1", UDP, 53, true),
                ("a/web", Egress, "10.1.0.1", TCP, 443, false),
                ("a/web", Ingress, "10.0.2.1", TCP, 80, true),
            ],
        },
        Case {
            name: "endPort range and protocol-only ports",
            policy: r#"{apiVersion: networking.k8s.io/v1, kind: NetworkPolicy, metadata: {name: p, namespace: a},
                spec: {podSelector: {matchLabels: {app: web}}, ingress: [{ports: [{port: 32000, endPort: 32768}, {protocol: UDP}]}]}}"#,
            checks: &[
                ("a/web", Ingress, "10.0.2.1", TCP, 31999, false),
                ("a/web", Ingress, "10.0.2.1", TCP, 32000, true),
                ("a/web", Ingress, "10.0.2.1", TCP, 32500, true),
                ("a/web", Ingress, "10.0.2.1", TCP, 32768, true),
                ("a/web", Ingress, "10.0.2.1", TCP, 32769, false),
                ("a/web", Ingress, "10.0.2.1", UDP, 7, true),
                ("a/web", Ingress, "8.8.8.8", UDP, 7, true),
            ],
        },
        Case {
            name: "named ports resolve per destination on ingress and per peer on egress",
            policy: r#"{apiVersion: networking.k8s.io/v1, kind: NetworkPolicy, metadata: {name: p, namespace: a},
                spec: {podSelector: {}, policyTypes: [Ingress, Egress],
                  ingress: [{ports: [{port: http}]}],
                  egress: [{to: [{namespaceSelector: {}}], ports: [{port: http}]}]}}"#,
            checks: &[
                ("a/web", Ingress, "10.0.2.1", TCP, 80, true),
                ("a/web", Ingress, "10.0.2.1", TCP, 8080, false),
                ("a/api", Ingress, "10.0.2.1", TCP, 8080, true),
                ("a/api", Ingress, "10.0.2.1", TCP, 80, false),
                ("a/web", Egress, "10.0.2.2", TCP, 81, true),
                ("a/web", Egress, "10.0.2.2", TCP, 80, false),
                ("a/web", Egress, "10.0.1.2", TCP, 8080, true),
                // Only TCP "http" exists; UDP "dns" is not named in the rule.
                ("a/api", Egress, "10.0.1.1", UDP, 53, false),
            ],
        },
        Case {
            name: "SCTP ports match SCTP only",
            policy: r#"{apiVersion: networking.k8s.io/v1, kind: NetworkPolicy, metadata: {name: p, namespace: a},
                spec: {podSelector: {matchLabels: {app: web}}, ingress: [{ports: [{protocol: SCTP, port: 3868}, {protocol: SCTP, port: 9000, endPort: 9010}]}]}}"#,
            checks: &[
                ("a/web", Ingress, "10.0.2.1", SCTP, 3868, true),
                ("a/web", Ingress, "10.0.2.1", SCTP, 9005, true),
                ("a/web", Ingress, "10.0.2.1", SCTP, 9011, false),
                ("a/web", Ingress, "10.0.2.1", TCP, 3868, false),
                ("a/web", Ingress, "10.0.2.1", UDP, 3868, false),
            ],
        },
        Case {
            name: "egress: [] isolates and allows nothing, egress: [{}] allows everything",
            policy: r#"{apiVersion: networking.k8s.io/v1, kind: NetworkPolicy, metadata: {name: p1, namespace: a},
                spec: {podSelector: {matchLabels: {app: web}}, policyTypes: [Egress], egress: []}}
---
{apiVersion: networking.k8s.io/v1, kind: NetworkPolicy, metadata: {name: p2, namespace: a},
                spec: {podSelector: {matchLabels: {app: api}}, policyTypes: [Egress], egress: [{}]}}"#,
            checks: &[
                ("a/web", Egress, "10.0.2.1", TCP, 80, false),
                ("a/web", Egress, "8.8.8.8", UDP, 53, false),
                ("a/api", Egress, "10.0.2.1", TCP, 80, true),
                ("a/api", Egress, "8.8.8.8", SCTP, 1, true),
                ("a/web", Ingress, "10.0.2.1", TCP, 80, true),
            ],
        },
        Case {
            name: "policies are additive",
            policy: r#"{apiVersion: networking.k8s.io/v1, kind: NetworkPolicy, metadata: {name: p1, namespace: a},
                spec: {podSelector: {matchLabels: {app: web}}, ingress: [{from: [{podSelector: {matchLabels: {app: api}}}]}]}}
---
{apiVersion: networking.k8s.io/v1, kind: NetworkPolicy, metadata: {name: p2, namespace: a},
                spec: {podSelector: {}, ingress: [{ports: [{port: 443}]}]}}"#,
            checks: &[
                ("a/web", Ingress, "10.0.1.2", TCP, 1, true),
                ("a/web", Ingress, "10.0.2.1", TCP, 443, true),
                ("a/web", Ingress, "10.0.2.1", TCP, 1, false),
                ("a/api", Ingress, "10.0.1.1", TCP, 1, false),
            ],
        },
    ];
    for case in cases {
        let c = compiled(case.policy);
        for &(at, dir, peer, proto, port, want) in case.checks {
            assert_eq!(
                allows(&c, at, dir, peer, proto, port),
                want,
                "{}: {at} {dir:?} peer {peer} proto {proto} port {port}",
                case.name
            );
        }
    }
}

#[test]
fn attribution_carries_every_allowing_rule() {
    let c = compiled(
        r#"{apiVersion: networking.k8s.io/v1, kind: NetworkPolicy, metadata: {name: p, namespace: a},
            spec: {podSelector: {matchLabels: {app: web}}, ingress: [
              {from: [{podSelector: {matchLabels: {app: api}}}]},
              {from: [{podSelector: {matchLabels: {app: api}}}], ports: [{port: 80}]},
              {ports: [{port: 80}]}]}}"#,
    );
    let flow = Flow {
        peer: ip("10.0.1.2"),
        proto: TCP,
        port: 80,
    };
    let v = c.evaluate(&pod("a/web"), Ingress, flow).unwrap();
    let rules: Vec<String> = v.allowed_by.iter().map(ToString::to_string).collect();
    assert_eq!(
        rules,
        vec!["a/p#ingress[0]", "a/p#ingress[1]", "a/p#ingress[2]"]
    );
}

#[test]
fn equal_pods_share_identity_and_class_and_compile_is_deterministic() {
    let policy = r#"{apiVersion: networking.k8s.io/v1, kind: NetworkPolicy, metadata: {name: p, namespace: a},
        spec: {podSelector: {}, ingress: [{from: [{podSelector: {}}]}]}}"#;
    let c = compiled(policy);
    let web = &c.endpoints[&pod("a/web")];
    let api = &c.endpoints[&pod("a/api")];
    assert_ne!(web.identity, api.identity);
    assert_eq!(
        web.ingress.class, api.ingress.class,
        "same policies, no named ports: one class"
    );
    assert_eq!(compiled(policy), c, "same input, same output");
}

#[test]
fn node_scope_enforces_only_local_pods() {
    let snap = snapshot("");
    let c = compile(&snap, &Scope::Node("n1".into()), &[]);
    let local: Vec<String> = c.endpoints.keys().map(ToString::to_string).collect();
    assert_eq!(local, vec!["a/api", "a/web"]);
    // Every pod of the cluster is still known as a peer.
    assert_eq!(c.ipcache.len(), 4);
}
