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

/// Services of the cluster above: `api-svc` (80 -> named port `http`, i.e. 8080 on a/api),
/// `webs` selecting a/web on 80 plus an extra backend in namespace b's range, and `empty`
/// with no ready backend.
const SERVICES: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: api-svc, namespace: a}
spec: {clusterIP: 10.96.0.20, ports: [{name: web, port: 80, targetPort: http}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: api-svc-1, namespace: a, labels: {kubernetes.io/service-name: api-svc}}
addressType: IPv4
ports: [{name: web, port: 8080, protocol: TCP}]
endpoints:
- {addresses: [10.0.1.2], conditions: {ready: true}}
- {addresses: [10.0.1.9], conditions: {ready: false}}
---
apiVersion: v1
kind: Service
metadata: {name: webs, namespace: a}
spec: {clusterIP: 10.96.0.21, ports: [{port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: webs-1, namespace: a, labels: {kubernetes.io/service-name: webs}}
addressType: IPv4
ports: [{port: 80}]
endpoints:
- {addresses: [10.0.1.1]}
- {addresses: [10.0.2.2]}
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: a}
spec: {clusterIP: 10.96.0.22, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: headless, namespace: a}
spec: {clusterIP: None, ports: [{port: 80}]}
"#;

#[test]
fn egress_to_a_cluster_ip_is_judged_by_every_ready_backend() {
    // b/client may reach a's api pods on 8080 and a/web on 80, nothing else.
    let policy = r#"{apiVersion: networking.k8s.io/v1, kind: NetworkPolicy, metadata: {name: p, namespace: b},
        spec: {podSelector: {matchLabels: {app: client}}, policyTypes: [Egress], egress: [
          {to: [{namespaceSelector: {matchLabels: {team: x}}, podSelector: {matchLabels: {app: api}}}], ports: [{port: 8080}]},
          {to: [{namespaceSelector: {matchLabels: {team: x}}, podSelector: {matchLabels: {app: web}}}], ports: [{port: 80}]}]}}"#;
    let c = compiled(&format!("{policy}\n---\n{SERVICES}"));
    assert_eq!(
        c.services.len(),
        3,
        "headless services get no ClusterIP entry"
    );
    let checks = [
        // Service port 80 -> 8080 on the one ready api backend: allowed, though no rule
        // names port 80.
        ("10.96.0.20", 80, true),
        ("10.96.0.20", 8080, false),
        // Backends a/web (allowed) and b/web (not): fail closed for the whole port.
        ("10.96.0.21", 80, false),
        // No ready backend: nothing to allow.
        ("10.96.0.22", 80, false),
        // Direct pod addresses are judged as before.
        ("10.0.1.2", 8080, true),
        ("10.0.1.1", 80, true),
    ];
    for (peer, port, want) in checks {
        assert_eq!(
            allows(&c, "b/client", Egress, peer, TCP, port),
            want,
            "b/client -> {peer}:{port}"
        );
    }
    assert!(
        c.warnings
            .iter()
            .any(|w| w.contains("a/webs") && w.contains("1 of 2")),
        "a partly allowed service port is reported: {:?}",
        c.warnings
    );
    // Not isolated for egress: every ClusterIP is reachable.
    assert!(allows(&c, "a/web", Egress, "10.96.0.21", TCP, 80));
}

#[test]
fn service_entries_follow_a_backend_relabel() {
    let policy = r#"{apiVersion: networking.k8s.io/v1, kind: NetworkPolicy, metadata: {name: p, namespace: b},
        spec: {podSelector: {matchLabels: {app: client}}, policyTypes: [Egress], egress: [
          {to: [{namespaceSelector: {}, podSelector: {matchLabels: {app: api}}}], ports: [{port: 8080}]}]}}"#;
    let text = format!("{policy}\n---\n{SERVICES}");
    let mut snap = snapshot(&text);
    let mut c = compile(&snap, &Scope::Cluster, &[]);
    assert!(allows(&c, "b/client", Egress, "10.96.0.20", TCP, 80));
    let api = snap.pods.iter_mut().find(|p| p.id == pod("a/api")).unwrap();
    api.labels.insert("app".into(), "retired".into());
    let touched = c.relabel_pod(&snap, &pod("a/api")).expect("a relabel");
    assert!(
        !allows(&c, "b/client", Egress, "10.96.0.20", TCP, 80),
        "the backend no longer matches: the service port closes"
    );
    assert!(
        touched
            .policy
            .iter()
            .any(|e| e.peer >= netpol_common::identity::FIRST_SERVICE),
        "the removed service entry is among the touched keys"
    );
    let full = compile(&snap, &Scope::Cluster, &[]);
    assert_eq!(c.services, full.services);
    assert_eq!(
        c.service_entries.len(),
        full.service_entries.len(),
        "incremental and full agree"
    );
}

#[test]
fn allocation_round_trips_through_json_and_keeps_ids() {
    let policy = r#"{apiVersion: networking.k8s.io/v1, kind: NetworkPolicy, metadata: {name: p, namespace: a},
        spec: {podSelector: {matchLabels: {app: api}}, policyTypes: [Ingress, Egress],
          ingress: [{from: [{podSelector: {matchLabels: {app: web}}}], ports: [{port: http}]}],
          egress: [{to: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.0.2.0/24]}}]}]}}"#;
    let snap = snapshot(&format!("{policy}\n---\n{SERVICES}"));
    let first = compile(&snap, &Scope::Cluster, &[]);
    let text = first.allocation.to_json();
    let restored = super::compile::Allocation::from_json(&text).expect("valid JSON");
    assert_eq!(restored, first.allocation, "every id and counter survives");
    let again = super::compile_with(&snap, &Scope::Cluster, &[], &restored);
    assert_eq!(
        again.policy, first.policy,
        "a process restarted from the file keeps every id"
    );
    assert_eq!(again.ipcache, first.ipcache);
    assert_eq!(again.services, first.services);
}
