//! The deploy/ manifests, checked offline (no cluster here; `cargo xtask validate` checks them
//! against the Kubernetes schemas, this checks what they mean):
//!
//! - deploy/netpol.yaml, read with k8s-openapi's types: read-only RBAC, and the DaemonSet's
//!   security-relevant facts (not privileged, drop ALL plus exactly the capabilities
//!   tests/tests/capabilities.rs proves, host network, tolerations of a CNI, the node name from
//!   the downward API, the host paths);
//! - the KIND demo: every probe of deploy/kind/probes.txt, in every phase, gets the verdict the
//!   script expects from `netpol-agent simulate` over the demo's own manifests and policies
//!   (deploy/kind/*.yaml, deploy/examples/, deploy/kind/policies-db-ns/), and every probe by
//!   name can reach cluster DNS first.
//!
//! Not privileged: runs in `cargo test` without root (simulate needs no kernel).

#[path = "support/deploy.rs"]
mod deploy;

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::Path,
    process::Command,
};

use k8s_openapi::api::{
    core::v1::{ServiceAccount, Toleration},
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use netpol_tests::agent::agent_bin;
use serde_json::{json, Value as Json};
use serde_yaml::Value;

/// The capabilities the agent needs, and nothing else (tests/tests/capabilities.rs proves
/// both halves in the kernel).
const AGENT_CAPABILITIES: &[&str] = &["BPF", "NET_ADMIN", "PERFMON"];

#[test]
fn netpol_rbac_is_read_only_on_what_the_agent_watches() {
    let role: ClusterRole = deploy::netpol_object("ClusterRole");
    let mut granted: BTreeSet<(String, String)> = BTreeSet::new();
    for rule in role.rules.unwrap_or_default() {
        let verbs: BTreeSet<&str> = rule.verbs.iter().map(String::as_str).collect();
        assert!(
            verbs.is_subset(&BTreeSet::from(["get", "list", "watch"])),
            "verbs {verbs:?} go beyond get/list/watch"
        );
        assert!(
            rule.non_resource_urls.is_none() && rule.resource_names.is_none(),
            "no non-resource URLs or per-name grants: {rule:?}"
        );
        for group in rule.api_groups.unwrap_or_default() {
            for resource in rule.resources.clone().unwrap_or_default() {
                assert!(
                    group != "*" && resource != "*" && !resource.contains('/'),
                    "no wildcards or subresources: {group}/{resource}"
                );
                granted.insert((group.clone(), resource));
            }
        }
    }
    let want: BTreeSet<(String, String)> = [
        ("", "pods"),
        ("", "namespaces"),
        ("", "nodes"),
        ("", "services"),
        ("discovery.k8s.io", "endpointslices"),
        ("networking.k8s.io", "networkpolicies"),
    ]
    .iter()
    .map(|(g, r)| (g.to_string(), r.to_string()))
    .collect();
    assert_eq!(granted, want, "the resources the agent reads");

    let binding: ClusterRoleBinding = deploy::netpol_object("ClusterRoleBinding");
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(binding.role_ref.name, role.metadata.name.unwrap());
    let sa: ServiceAccount = deploy::netpol_object("ServiceAccount");
    let subjects = binding.subjects.unwrap_or_default();
    assert_eq!(
        subjects.len(),
        1,
        "bound to the agent's ServiceAccount only"
    );
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(Some(&subjects[0].name), sa.metadata.name.as_ref());
    assert_eq!(subjects[0].namespace, sa.metadata.namespace);
}

/// Whether `t` tolerates the taint `key=...:effect` (core/v1 Toleration semantics).
fn tolerates(t: &Toleration, key: &str, effect: &str) -> bool {
    let key_ok = match t.key.as_deref() {
        None | Some("") => t.operator.as_deref() == Some("Exists"),
        Some(k) => k == key,
    };
    let effect_ok = t
        .effect
        .as_deref()
        .is_none_or(|e| e.is_empty() || e == effect);
    // A value-less taint: Exists, or Equal with an empty value.
    let value_ok =
        t.operator.as_deref() == Some("Exists") || t.value.as_deref().unwrap_or("").is_empty();
    key_ok && effect_ok && value_ok
}

#[test]
fn netpol_daemonset_runs_as_a_cni_with_least_privilege() {
    let ds = deploy::daemonset();
    let spec = ds.spec.clone().unwrap().template.spec.unwrap();
    assert_eq!(spec.host_network, Some(true), "hostNetwork");
    assert_eq!(spec.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"));
    assert_eq!(
        spec.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    assert!(
        spec.host_pid != Some(true) && spec.host_ipc != Some(true),
        "no host PID or IPC namespace"
    );
    assert!(
        spec.init_containers.unwrap_or_default().is_empty(),
        "no init containers (none privileged)"
    );
    let tolerations = spec.tolerations.clone().unwrap_or_default();
    for (key, effect) in [
        ("node.kubernetes.io/not-ready", "NoSchedule"),
        ("node.kubernetes.io/not-ready", "NoExecute"),
        ("node.kubernetes.io/network-unavailable", "NoSchedule"),
        ("node.kubernetes.io/unreachable", "NoExecute"),
        ("node-role.kubernetes.io/control-plane", "NoSchedule"),
    ] {
        assert!(
            tolerations.iter().any(|t| tolerates(t, key, effect)),
            "tolerates {key}:{effect}: {tolerations:?}"
        );
    }

    let c = deploy::agent_container();
    assert_eq!(c.image.as_deref(), Some("netpol-agent:dev"));
    assert_eq!(c.image_pull_policy.as_deref(), Some("IfNotPresent"));
    let sc = c.security_context.clone().expect("securityContext");
    assert_ne!(sc.privileged, Some(true), "not privileged");
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.run_as_user, Some(0), "uid 0 (owner of bpffs pins)");
    let caps = sc.capabilities.clone().expect("capabilities");
    assert_eq!(caps.drop, Some(vec!["ALL".to_string()]), "drop ALL");
    let mut added = caps.add.unwrap_or_default();
    added.sort();
    assert_eq!(added, AGENT_CAPABILITIES, "exactly the proven set");

    // Kubernetes mode (no --manifests), the flags of the agent's `run`.
    let args = c.args.clone().unwrap_or_default();
    assert_eq!(c.command, Some(vec!["netpol-agent".to_string()]));
    assert_eq!(args.first().map(String::as_str), Some("run"));
    assert!(!args.iter().any(|a| a == "--manifests"), "Kubernetes mode");
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .map(String::as_str)
    };
    assert_eq!(flag("--listen"), Some("0.0.0.0:9464"));
    assert_eq!(flag("--cni-conf-dir"), Some("/host/etc/cni/net.d"));
    // The agent installs its chained CNI plugin (itself) where the runtime finds plugins.
    assert_eq!(flag("--cni-bin-dir"), Some("/host/opt/cni/bin"));
    // The default of every other subcommand, so `kubectl exec ... netpol-agent dump` finds it.
    assert_eq!(flag("--state-dir"), Some("/run/netpol/$(NODE_NAME)"));

    let env = c.env.clone().unwrap_or_default();
    let node_name = env
        .iter()
        .find(|e| e.name == "NODE_NAME")
        .expect("NODE_NAME env");
    let field = node_name
        .value_from
        .as_ref()
        .and_then(|v| v.field_ref.as_ref())
        .expect("NODE_NAME from the downward API");
    assert_eq!(field.field_path, "spec.nodeName");

    for (probe, path) in [
        (&c.liveness_probe, "/healthz"),
        (&c.readiness_probe, "/readyz"),
    ] {
        let get = probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .unwrap_or_else(|| panic!("{path} probe"));
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(
            get.port,
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(9464)
        );
    }

    // Host paths: exactly bpffs, the CNI configuration and plugin directories and the state
    // directory (which holds the CNI socket), mounted where the agent looks; no Bidirectional
    // propagation (privileged only).
    let volumes: BTreeMap<String, String> = spec
        .volumes
        .unwrap_or_default()
        .into_iter()
        .map(|v| {
            let host = v.host_path.expect("only hostPath volumes").path;
            (v.name, host)
        })
        .collect();
    let mounts: BTreeMap<String, String> = c
        .volume_mounts
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|m| {
            assert_ne!(
                m.mount_propagation.as_deref(),
                Some("Bidirectional"),
                "{}",
                m.name
            );
            (volumes[&m.name].clone(), m.mount_path)
        })
        .collect();
    let want: BTreeMap<String, String> = [
        ("/sys/fs/bpf", "/sys/fs/bpf"),
        ("/etc/cni/net.d", "/host/etc/cni/net.d"),
        ("/opt/cni/bin", "/host/opt/cni/bin"),
        ("/run/netpol", "/run/netpol"),
    ]
    .iter()
    .map(|(h, m)| (h.to_string(), m.to_string()))
    .collect();
    assert_eq!(mounts, want, "host path -> mount path");
    assert_eq!(volumes.len(), want.len(), "no unmounted host paths");
}

/// One probe of deploy/kind/probes.txt.
#[derive(Debug)]
struct KindProbe {
    phase: String,
    allowed: bool,
    /// namespace, pod name (the last segment of `deploy/NAME` or `pod/NAME`)
    from: (String, String),
    container: String,
    to: String,
    port: u16,
    command: String,
}

fn kind_probes() -> Vec<KindProbe> {
    let path = deploy::deploy_dir().join("kind/probes.txt");
    let text = fs::read_to_string(&path).expect("deploy/kind/probes.txt");
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            assert!(f.len() >= 7, "probe line {line:?}");
            let (ns, resource) = f[2].split_once('/').expect("FROM is ns/kind/name");
            let (kind, name) = resource.split_once('/').expect("FROM is ns/kind/name");
            assert!(
                ["deploy", "pod"].contains(&kind),
                "FROM kind {kind} in {line:?}"
            );
            assert!(
                ["before", "after", "db-ns"].contains(&f[0]),
                "phase in {line:?}"
            );
            assert!(
                ["allowed", "denied"].contains(&f[1]),
                "expectation in {line:?}"
            );
            KindProbe {
                phase: f[0].into(),
                allowed: f[1] == "allowed",
                from: (ns.into(), name.into()),
                container: f[3].into(),
                to: f[4].into(),
                port: f[5].parse().expect("PORT"),
                command: f[6..].join(" "),
            }
        })
        .collect()
}

/// The pods the demo's objects make, as the agent would see them once running: a Deployment's
/// pod named after it, a StatefulSet's first replica `<name>-0`, Pods as they are. Returns
/// (Namespaces, Pods) as JSON objects the agent's file source reads.
fn pods_of(file: &str, skip: &[(&str, &str)]) -> (Vec<Json>, Vec<Json>) {
    let mut namespaces = Vec::new();
    let mut pods = Vec::new();
    for doc in deploy::documents(file) {
        let doc: Json = serde_json::to_value(&doc).expect("YAML as JSON");
        let kind = doc["kind"].as_str().unwrap_or_default();
        let ns = doc["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_string();
        let name = doc["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if skip.contains(&(ns.as_str(), name.as_str())) {
            continue;
        }
        let (pod_name, labels, spec) = match kind {
            "Namespace" => {
                namespaces.push(doc.clone());
                continue;
            }
            "Deployment" => (
                name.clone(),
                doc["spec"]["template"]["metadata"]["labels"].clone(),
                doc["spec"]["template"]["spec"].clone(),
            ),
            "StatefulSet" => (
                format!("{name}-0"),
                doc["spec"]["template"]["metadata"]["labels"].clone(),
                doc["spec"]["template"]["spec"].clone(),
            ),
            "Pod" => (
                name.clone(),
                doc["metadata"]["labels"].clone(),
                doc["spec"].clone(),
            ),
            _ => continue,
        };
        pods.push(json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": pod_name, "namespace": ns, "labels": labels},
            "spec": {"nodeName": "netpol-worker", "containers": spec["containers"]},
            "status": {"phase": "Running"},
        }));
    }
    (namespaces, pods)
}

/// cluster DNS as kind runs it: CoreDNS pods labelled k8s-app=kube-dns in kube-system.
fn kube_dns() -> (Json, Json) {
    (
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "kube-system"}}),
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "coredns", "namespace": "kube-system", "labels": {"k8s-app": "kube-dns"}},
            "spec": {"nodeName": "netpol-control-plane", "containers": [{"name": "coredns", "ports": [
                {"containerPort": 53, "protocol": "UDP"}, {"containerPort": 53, "protocol": "TCP"}]}]},
            "status": {"phase": "Running"},
        }),
    )
}

/// Writes one phase's cluster (objects plus policy files) and returns `simulate -o json`'s
/// verdicts by (from, to, port, protocol).
fn simulate_phase(
    dir: &Path,
    objects: Vec<Json>,
    policy_dirs: &[&str],
) -> BTreeMap<(String, String, u16, String), bool> {
    fs::create_dir_all(dir).unwrap();
    let mut pod_ip = 10u8;
    let mut yaml = String::new();
    for mut object in objects {
        if object["kind"] == "Pod" {
            pod_ip += 1;
            object["status"]["podIP"] = json!(format!("10.244.1.{pod_ip}"));
            object["status"]["podIPs"] = json!([{"ip": format!("10.244.1.{pod_ip}")}]);
        }
        yaml.push_str("---\n");
        yaml.push_str(&serde_yaml::to_string(&object).unwrap());
    }
    fs::write(dir.join("cluster.yaml"), yaml).unwrap();
    let mut cmd = Command::new(agent_bin());
    cmd.args(["simulate", "-o", "json", "--manifests"])
        .arg(dir.join("cluster.yaml"));
    for policies in policy_dirs {
        cmd.arg(deploy::deploy_dir().join(policies));
    }
    let out = cmd.output().expect("running netpol-agent simulate");
    assert!(
        out.status.success(),
        "simulate over {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let sim: Json = serde_json::from_slice(&out.stdout).expect("simulate -o json");
    sim["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|r| {
            (
                (
                    r["from"].as_str().unwrap().to_string(),
                    r["to"].as_str().unwrap().to_string(),
                    u16::try_from(r["port"].as_u64().unwrap()).unwrap(),
                    r["protocol"].as_str().unwrap().to_string(),
                ),
                r["allowed"].as_bool().unwrap(),
            )
        })
        .collect()
}

#[test]
fn kind_demo_probes_get_the_verdicts_the_script_expects() {
    let probes = kind_probes();
    let work = std::env::temp_dir().join(format!("netpol-kind-sim-{}", std::process::id()));
    let (dns_ns, dns_pod) = kube_dns();

    let (app_ns, app_pods) = pods_of("kind/app.yaml", &[]);
    // The seed's task: app1-ns's database deleted, db-ns's deployed.
    let (moved_ns, moved_pods) = pods_of("kind/app.yaml", &[("app1-ns", "db-sts")]);
    let (db_ns, db_pods) = pods_of("kind/app-db-ns.yaml", &[]);
    let phases: Vec<(&str, Vec<Json>, Vec<&str>)> = vec![
        (
            "before",
            [app_ns.clone(), app_pods.clone()].concat(),
            vec![],
        ),
        ("after", [app_ns, app_pods].concat(), vec!["examples"]),
        (
            "db-ns",
            [moved_ns, moved_pods, db_ns, db_pods].concat(),
            vec!["kind/policies-db-ns"],
        ),
    ];

    let mut checked = 0;
    let mut failures = Vec::new();
    for (phase, mut objects, policies) in phases {
        objects.push(dns_ns.clone());
        objects.push(dns_pod.clone());
        // Each probe must run in a container its pod really has.
        let containers: BTreeSet<(String, String, String)> = objects
            .iter()
            .filter(|o| o["kind"] == "Pod")
            .flat_map(|o| {
                let ns = o["metadata"]["namespace"].as_str().unwrap().to_string();
                let pod = o["metadata"]["name"].as_str().unwrap().to_string();
                o["spec"]["containers"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(move |c| {
                        (
                            ns.clone(),
                            pod.clone(),
                            c["name"].as_str().unwrap().to_string(),
                        )
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        let verdicts = simulate_phase(&work.join(phase), objects, &policies);
        let verdict = |from: &str, to: &str, port: u16, proto: &str| {
            *verdicts
                .get(&(from.to_string(), to.to_string(), port, proto.to_string()))
                .unwrap_or_else(|| panic!("{phase}: no verdict for {from} -> {to}:{port}/{proto}"))
        };
        for p in probes.iter().filter(|p| p.phase == phase) {
            let from = format!("{}/{}", p.from.0, p.from.1);
            assert!(
                containers.contains(&(p.from.0.clone(), p.from.1.clone(), p.container.clone())),
                "{phase}: {from} has no container {}",
                p.container
            );
            let allowed = verdict(&from, &p.to, p.port, "TCP");
            // Every probe names its destination: it resolves through kube-dns first.
            let dns = verdict(&from, "kube-system/coredns", 53, "UDP");
            let got = allowed && dns;
            if got != p.allowed {
                failures.push(format!(
                    "{phase}: {from} $ {}: expected {}, simulate says {} (tcp {allowed}, dns {dns})",
                    p.command,
                    if p.allowed { "allowed" } else { "denied" },
                    if got { "allowed" } else { "denied" },
                ));
            }
            checked += 1;
        }
    }
    let _ = fs::remove_dir_all(&work);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(checked, probes.len(), "every probe has a known phase");
    assert!(checked >= 20, "the demo probes a real matrix ({checked})");
}

#[test]
fn kind_demo_probes_cover_the_seed_matrix() {
    // The seed's own probes are in the table with the seed's verdicts (after its policies).
    let probes = kind_probes();
    let has = |phase: &str, from: &str, to: &str, port: u16, allowed: bool| {
        probes.iter().any(|p| {
            p.phase == phase
                && p.from.1 == from
                && p.to == to
                && p.port == port
                && p.allowed == allowed
        })
    };
    assert!(has("after", "frontend", "app1-ns/backend", 5678, true));
    assert!(has("after", "frontend", "app1-ns/db-sts-0", 3306, false));
    assert!(has("after", "backend", "app1-ns/db-sts-0", 3306, true));
    assert!(has("after", "client", "app1-ns/frontend", 80, true));
    assert!(has("db-ns", "backend", "db-ns/db-sts-0", 3306, true));
    assert!(has("db-ns", "frontend", "db-ns/db-sts-0", 3306, false));
    assert!(has("db-ns", "impostor", "db-ns/db-sts-0", 3306, false));
    // And the YAML the table relies on is the demo's.
    let labels: Vec<Value> = deploy::documents("kind/app-db-ns.yaml")
        .into_iter()
        .filter(|d| d["kind"] == "Pod")
        .map(|d| d["metadata"]["labels"].clone())
        .collect();
    assert!(
        labels.iter().any(|l| l["role"] == "backend"),
        "the impostor carries role=backend"
    );
}
