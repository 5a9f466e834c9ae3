//! Kernel tests of the production datapath with real sockets: Services behind kube-proxy's
//! DNAT with cluster DNS, dual-stack pods, ICMP errors about tracked flows, fragmented
//! datagrams, and the flush of flows a new policy denies.
//! Every test needs root, BPF/TCX, the CNI plugins, iptables and dnsmasq; each fails with a
//! message when it cannot run, never passes silently.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{IpAddr, SocketAddr, UdpSocket},
    path::PathBuf,
    time::Duration,
};

use netpol_tests::{
    agent::{counter, Agent},
    lab::{Lab, LabOptions, LabSpec, NameProbe, Probe, ProbeKind, ProbeOutcome},
};

fn start(spec: &str, opts: LabOptions) -> Lab {
    let spec = LabSpec::from_yaml_str(spec).expect("lab spec parses");
    Lab::start(&spec, opts).expect("lab starts (needs root, network namespaces, /usr/lib/cni)")
}

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
}

fn seed_policies() -> Vec<PathBuf> {
    ["frontend", "backend", "db"]
        .iter()
        .map(|p| repo(&format!("deploy/examples/{p}-policy.yaml")))
        .collect()
}

/// The seed's app with Services, plus `db-vip`, a ClusterIP Service in front of the database
/// (the seed's `db-svc` is headless: its name resolves to the pod), and a pod outside the app
/// that no policy selects.
fn services_spec() -> String {
    let seed = std::fs::read_to_string(repo("deploy/lab/three-tier-services.yaml"))
        .expect("reading deploy/lab/three-tier-services.yaml");
    format!(
        "{seed}\n---\n{}",
        r#"
apiVersion: v1
kind: Service
metadata: {name: db-vip, namespace: app1-ns}
spec:
  selector: {app: app1, role: db}
  ports: [{name: mysql, port: 3306, targetPort: mysql}]
---
apiVersion: v1
kind: Namespace
metadata: {name: tools}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: tools, labels: {app: client}}
spec: {containers: [{name: c}]}
"#
    )
}

const APP: &str = "app1-ns";

/// A probe by name, what it stands for, and what its outcome must satisfy.
type Check = (NameProbe, &'static str, fn(&ProbeOutcome) -> bool);
const DB_FQDN: &str = "db-sts-0.db-svc.app1-ns.svc.cluster.local";

#[test]
fn root_services_and_dns_under_the_seed_policies() {
    let lab = start(
        &services_spec(),
        LabOptions {
            dns: true,
            probe_timeout: Duration::from_millis(800),
            ..Default::default()
        },
    );
    let agent = Agent::new(&lab).unwrap();
    agent.set_policy_files(&seed_policies()).unwrap();
    agent.apply().unwrap();

    let from = |pod| (APP, pod);
    let checks: Vec<Check> = vec![
        (
            NameProbe::tcp(from("frontend"), "backend-svc", 5678),
            "telnet backend-svc 5678 from frontend: allowed by egress to backend pods",
            ProbeOutcome::is_open,
        ),
        (
            NameProbe::http(from("frontend"), "backend-svc", 5678),
            "curl backend-svc:5678 from frontend",
            ProbeOutcome::is_open,
        ),
        (
            NameProbe::tcp(from("frontend"), "db-vip", 3306),
            "telnet db-vip 3306 from frontend: a ClusterIP whose backend egress denies",
            |o| *o == ProbeOutcome::TimedOut,
        ),
        (
            NameProbe::tcp(from("frontend"), DB_FQDN, 3306),
            "telnet db-sts-0.db-svc... 3306 from frontend: resolves, then denied",
            |o| *o == ProbeOutcome::TimedOut,
        ),
        (
            NameProbe::tcp(from("backend"), DB_FQDN, 3306),
            "telnet db-sts-0.db-svc... 3306 from backend",
            ProbeOutcome::is_open,
        ),
        (
            NameProbe::tcp(from("backend"), "db-vip", 3306),
            "telnet db-vip 3306 from backend",
            ProbeOutcome::is_open,
        ),
        (
            NameProbe::http(from("backend"), "frontend-svc", 80),
            "curl frontend-svc from backend: egress allows only db and DNS",
            |o| *o == ProbeOutcome::TimedOut,
        ),
        (
            NameProbe::http(("tools", "client"), "frontend-svc.app1-ns", 80),
            "curl frontend-svc.app1-ns from an unselected pod: frontend allows anyone on 80",
            ProbeOutcome::is_open,
        ),
        (
            NameProbe::tcp(("tools", "client"), "backend-svc.app1-ns", 5678),
            "telnet backend-svc.app1-ns 5678 from an unselected pod: backend ingress denies",
            |o| *o == ProbeOutcome::TimedOut,
        ),
        (
            NameProbe::http(from("db-sts-0"), "frontend-svc", 80),
            "curl frontend-svc from db: db may not even resolve (no DNS egress)",
            |o| *o == ProbeOutcome::Unresolved,
        ),
    ];
    let probes: Vec<NameProbe> = checks.iter().map(|(p, _, _)| p.clone()).collect();
    let outcomes = lab.probe_names(&probes);
    let failures: Vec<String> = checks
        .iter()
        .zip(&outcomes)
        .filter(|((_, _, ok), outcome)| !ok(outcome))
        .map(|((_, what, _), outcome)| format!("{what}: got {outcome}"))
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // The ClusterIP path is the one that decided: frontend's egress to db-vip was denied at
    // the Service port (kube-proxy never saw it), and dump names the Service.
    let dump = agent.dump_json().unwrap();
    let services = dump["services"].as_array().expect("services in dump");
    assert!(
        services.iter().any(|s| s["name"]
            .as_str()
            .unwrap_or("")
            .contains("app1-ns/backend-svc:5678")),
        "dump lists backend-svc: {services:?}"
    );
    assert!(counter(&dump, "egress", "denied-by-policy") > 0);

    // Without the DNS egress rule, names no longer resolve; addresses still work.
    let no_dns = std::fs::read_to_string(repo("deploy/examples/frontend-policy.yaml"))
        .unwrap()
        .split("    - to:\n        - namespaceSelector: {}")
        .next()
        .unwrap()
        .to_string();
    assert!(!no_dns.contains("kube-dns"), "the DNS rule was cut out");
    let backend = std::fs::read_to_string(repo("deploy/examples/backend-policy.yaml")).unwrap();
    let db = std::fs::read_to_string(repo("deploy/examples/db-policy.yaml")).unwrap();
    agent
        .set_policies(&[("frontend", &no_dns), ("backend", &backend), ("db", &db)])
        .unwrap();
    agent.apply().unwrap();
    let outcome = lab.probe_name(&NameProbe::tcp(from("frontend"), "backend-svc", 5678));
    assert_eq!(
        outcome,
        ProbeOutcome::Unresolved,
        "frontend without DNS egress resolves nothing"
    );
    let by_ip = lab.probe(&Probe::tcp(
        from("frontend"),
        lab.service_ip(APP, "backend-svc"),
        5678,
    ));
    assert!(by_ip.is_open(), "backend-svc by ClusterIP: {by_ip}");
}

/// Three pods serving TCP 8080 and UDP 5353.
const PODS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: t}
---
{apiVersion: v1, kind: Pod, metadata: {name: a, namespace: t, labels: {role: a}}, spec: {containers: [{name: c, ports: [{containerPort: 8080}, {containerPort: 5353, protocol: UDP}]}]}}
---
{apiVersion: v1, kind: Pod, metadata: {name: b, namespace: t, labels: {role: b}}, spec: {containers: [{name: c, ports: [{containerPort: 8080}, {containerPort: 5353, protocol: UDP}]}]}}
---
{apiVersion: v1, kind: Pod, metadata: {name: c, namespace: t, labels: {role: c}}, spec: {containers: [{name: c, ports: [{containerPort: 8080}, {containerPort: 5353, protocol: UDP}]}]}}
"#;

/// b admits a on TCP 8080, UDP 5353 and UDP 9999 (where nothing listens), and may answer
/// nothing on its own; a may reach only those, and nobody may reach a.
const LOCKED: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: b, namespace: t}
spec:
  podSelector: {matchLabels: {role: b}}
  policyTypes: [Ingress, Egress]
  ingress:
    - from: [{podSelector: {matchLabels: {role: a}}}]
      ports: [{port: 8080}, {port: 5353, protocol: UDP}, {port: 9999, protocol: UDP}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: a, namespace: t}
spec:
  podSelector: {matchLabels: {role: a}}
  policyTypes: [Ingress, Egress]
  egress:
    - to: [{podSelector: {matchLabels: {role: b}}}]
      ports: [{port: 8080}, {port: 5353, protocol: UDP}, {port: 9999, protocol: UDP}]
"#;

#[test]
fn root_dual_stack_pods_are_enforced_in_both_families() {
    let lab = start(
        PODS,
        LabOptions {
            pod_cidr_v6: Some("fd00:10:244:1::/64".parse().unwrap()),
            probe_timeout: Duration::from_millis(700),
            ..Default::default()
        },
    );
    let agent = Agent::new(&lab).unwrap();
    agent.set_policies(&[("locked", LOCKED)]).unwrap();
    agent.apply().unwrap();
    let v6 = |pod: &str| lab.pod("t", pod).unwrap().ipv6.expect("a dual-stack pod");
    let cases = [
        (Probe::tcp(("t", "a"), v6("b"), 8080), true, "a -> b v6 tcp"),
        (Probe::udp(("t", "a"), v6("b"), 5353), true, "a -> b v6 udp"),
        (Probe::tcp(("t", "c"), v6("b"), 8080), false, "c -> b v6"),
        (
            Probe::tcp(("t", "a"), v6("c"), 8080),
            false,
            "a -> c v6 (egress)",
        ),
        (
            Probe::tcp(("t", "c"), v6("a"), 8080),
            false,
            "c -> a v6 (ingress)",
        ),
        (
            Probe::tcp(("t", "c"), v6("c"), 8080),
            true,
            "c -> c v6 (local)",
        ),
        (
            Probe::tcp(("t", "a"), lab.pod_ip("t", "b"), 8080),
            true,
            "a -> b v4",
        ),
        (
            Probe::tcp(("t", "c"), lab.pod_ip("t", "b"), 8080),
            false,
            "c -> b v4",
        ),
    ];
    let probes: Vec<Probe> = cases.iter().map(|(p, _, _)| p.clone()).collect();
    let outcomes = lab.probe_all(&probes);
    for ((_, open, what), outcome) in cases.iter().zip(&outcomes) {
        if *open {
            assert!(outcome.is_open(), "{what}: expected open, got {outcome}");
        } else {
            assert_eq!(*outcome, ProbeOutcome::TimedOut, "{what}: expected dropped");
        }
    }
    // Anti-spoofing holds for the v6 address too: dump shows both addresses per endpoint.
    let dump = agent.dump_json().unwrap();
    let b = dump["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["pod"] == "t/b")
        .expect("b is an endpoint");
    assert_eq!(b["addresses"].as_array().unwrap().len(), 2, "{b}");
}

#[test]
fn root_icmp_errors_and_fragments_cross_isolated_pods() {
    let lab = start(
        PODS,
        LabOptions {
            probe_timeout: Duration::from_millis(800),
            ..Default::default()
        },
    );
    let agent = Agent::new(&lab).unwrap();
    agent.set_policies(&[("locked", LOCKED)]).unwrap();
    agent.apply().unwrap();

    // Nothing listens on b:9999: b's kernel answers port unreachable, which must leave b
    // (egress isolated) and reach a (ingress isolated) as related to a's datagram.
    let outcome = lab.probe(&Probe::udp(("t", "a"), lab.pod_ip("t", "b"), 9999));
    assert_eq!(
        outcome,
        ProbeOutcome::Refused,
        "a's connected UDP socket sees the port unreachable"
    );

    // A 4000-byte datagram leaves a in three fragments; only the first carries the ports.
    let target = SocketAddr::new(lab.pod_ip("t", "b"), 5353);
    let reply = lab
        .in_pod("t", "a", || -> std::io::Result<usize> {
            let socket = UdpSocket::bind("0.0.0.0:0")?;
            socket.connect(target)?;
            socket.set_read_timeout(Some(Duration::from_secs(2)))?;
            socket.send(&[7u8; 4000])?;
            let mut buf = [0u8; 512];
            socket.recv(&mut buf)
        })
        .unwrap();
    assert!(
        reply.is_ok(),
        "b answered the fragmented datagram: {reply:?}"
    );
    let dump = agent.dump_json().unwrap();
    assert!(
        counter(&dump, "egress", "related") >= 1,
        "b's error left as related"
    );
    assert!(
        counter(&dump, "ingress", "related") >= 1,
        "a got the error as related"
    );
    assert!(
        counter(&dump, "ingress", "fragment-of-flow") >= 1,
        "later fragments passed with their first"
    );
    // The same datagram from c (not allowed) gets nowhere, fragments included.
    let denied = lab
        .in_pod("t", "c", || -> std::io::Result<usize> {
            let socket = UdpSocket::bind("0.0.0.0:0")?;
            socket.connect(target)?;
            socket.set_read_timeout(Some(Duration::from_millis(800)))?;
            socket.send(&[7u8; 4000])?;
            let mut buf = [0u8; 512];
            socket.recv(&mut buf)
        })
        .unwrap();
    assert!(denied.is_err(), "c's fragmented datagram was answered");
    let dump = agent.dump_json().unwrap();
    assert!(
        counter(&dump, "ingress", "fragment") >= 1,
        "c's later fragments were dropped as fragments of no allowed flow"
    );
}

/// Sends a line on an echo connection and waits for it to come back.
fn echo(stream: &mut std::net::TcpStream, reader: &mut BufReader<std::net::TcpStream>) -> bool {
    if stream.write_all(b"ping\n").is_err() {
        return false;
    }
    let mut line = String::new();
    matches!(reader.read_line(&mut line), Ok(n) if n > 0)
}

const ALLOW_A_TO_B: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: b, namespace: t}
spec:
  podSelector: {matchLabels: {role: b}}
  ingress:
    - from: [{podSelector: {matchLabels: {role: a}}}]
"#;

const DENY_B: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: b, namespace: t}
spec:
  podSelector: {matchLabels: {role: b}}
"#;

/// Lab options with a probe timeout short enough for many probes.
fn quick_probes() -> LabOptions {
    LabOptions {
        probe_timeout: Duration::from_millis(700),
        ..Default::default()
    }
}

/// Programs `ALLOW_A_TO_B` (b admits a only).
fn admit_a_at_b(agent: &Agent) {
    agent.set_policies(&[("b", ALLOW_A_TO_B)]).unwrap();
    agent.apply().unwrap();
}

#[test]
fn root_policy_change_keeps_established_flows_unless_flushed() {
    let lab = start(PODS, quick_probes());
    let agent = Agent::new(&lab).unwrap();
    admit_a_at_b(&agent);
    let b: IpAddr = lab.pod_ip("t", "b");
    let mut stream = lab.open_tcp(("t", "a"), b, 8080).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_millis(800)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    assert!(
        echo(&mut stream, &mut reader),
        "the allowed connection echoes"
    );

    // A policy that denies a: new connections fail, the established one carries on.
    agent.set_policies(&[("b", DENY_B)]).unwrap();
    agent.apply().unwrap();
    let new = lab.probe(&Probe::tcp(("t", "a"), b, 8080));
    assert_eq!(new, ProbeOutcome::TimedOut, "a new connection is denied");
    assert!(
        echo(&mut stream, &mut reader),
        "an established connection survives a policy change"
    );

    // --flush-denied removes the flows the policy denies: the connection is cut.
    let dir = agent.manifests_dir().to_string_lossy().into_owned();
    let out = agent
        .command("apply", &["--manifests", &dir, "--flush-denied"])
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !stdout.contains("flushed 0 "),
        "the flush found the connection's entries: {stdout}"
    );
    assert!(
        !echo(&mut stream, &mut reader),
        "a flushed, denied connection no longer passes"
    );
    let flows = agent.conntrack_json(None).unwrap();
    let to_b = flows["flows"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["pod"] == "t/b" && f["direction"] == "ingress" && f["protocol"] == "TCP")
        .count();
    assert_eq!(to_b, 0, "no tracked inbound TCP flow left at b: {flows}");
}

#[test]
fn root_gc_command_runs_on_a_live_node() {
    let lab = start(PODS, LabOptions::default());
    let agent = Agent::new(&lab).unwrap();
    agent.set_policies(&[("b", ALLOW_A_TO_B)]).unwrap();
    agent.apply().unwrap();
    let outcome = lab.probe(&Probe::new(
        ("t", "a"),
        lab.pod_ip("t", "b"),
        5353,
        ProbeKind::Udp,
    ));
    assert!(outcome.is_open(), "{outcome}");
    let out = agent.command("gc", &[]).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    // Fresh flows are not expired: GC must leave them (the expiry logic itself is covered by
    // the program test `root_prog_gc_removes_only_expired_entries`).
    assert!(stdout.contains("0 expired flow(s)"), "{stdout}");
}

/// Two nodes: the app's frontend and a client on node-a, backend and db on node-b.
const TWO_NODES: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: app}
---
{apiVersion: v1, kind: Pod, metadata: {name: frontend, namespace: app, labels: {role: frontend}}, spec: {nodeName: node-a, containers: [{name: c, ports: [{containerPort: 80}]}]}}
---
{apiVersion: v1, kind: Pod, metadata: {name: client, namespace: app, labels: {role: client}}, spec: {nodeName: node-a, containers: [{name: c, ports: [{containerPort: 80}]}]}}
---
{apiVersion: v1, kind: Pod, metadata: {name: backend, namespace: app, labels: {role: backend}}, spec: {nodeName: node-b, containers: [{name: c, ports: [{containerPort: 5678}]}]}}
---
{apiVersion: v1, kind: Pod, metadata: {name: db, namespace: app, labels: {role: db}}, spec: {nodeName: node-b, containers: [{name: c, ports: [{containerPort: 3306}]}]}}
---
{apiVersion: v1, kind: Service, metadata: {name: backend-svc, namespace: app}, spec: {selector: {role: backend}, ports: [{port: 80, targetPort: 5678}]}}
---
{apiVersion: v1, kind: Service, metadata: {name: db-svc, namespace: app}, spec: {selector: {role: db}, ports: [{port: 3306}]}}
"#;

/// frontend may reach backend on 5678 (egress); backend admits only frontend (ingress);
/// db admits only backend. The client is not selected by any policy.
const CROSS_NODE: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: frontend, namespace: app}
spec:
  podSelector: {matchLabels: {role: frontend}}
  policyTypes: [Egress]
  egress:
    - to: [{podSelector: {matchLabels: {role: backend}}}]
      ports: [{port: 5678}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: backend, namespace: app}
spec:
  podSelector: {matchLabels: {role: backend}}
  ingress:
    - from: [{podSelector: {matchLabels: {role: frontend}}}]
      ports: [{port: 5678}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db, namespace: app}
spec:
  podSelector: {matchLabels: {role: db}}
  ingress:
    - from: [{podSelector: {matchLabels: {role: backend}}}]
"#;

#[test]
fn root_two_nodes_enforce_ingress_and_egress_across_nodes() {
    let spec = LabSpec::from_yaml_str(TWO_NODES).expect("lab spec parses");
    let lab = Lab::start_cluster(
        &spec,
        netpol_tests::lab::ClusterOptions {
            probe_timeout: Duration::from_millis(700),
            ..netpol_tests::lab::ClusterOptions::two_nodes()
        },
    )
    .expect("two-node lab starts (needs root, network namespaces, /usr/lib/cni)");
    // One agent per node, each enforcing its own pods from the same cluster objects.
    let agents = [
        Agent::on_node(&lab, "node-a").unwrap(),
        Agent::on_node(&lab, "node-b").unwrap(),
    ];
    for agent in &agents {
        agent.set_policies(&[("cross-node", CROSS_NODE)]).unwrap();
        agent.apply().unwrap();
    }
    let ip = |pod| lab.pod_ip("app", pod);
    let svc = |name| lab.service_ip("app", name);
    let cases = [
        // Egress on node-a, ingress on node-b.
        (
            Probe::tcp(("app", "frontend"), ip("backend"), 5678),
            true,
            "frontend -> backend",
        ),
        (
            Probe::tcp(("app", "frontend"), svc("backend-svc"), 80),
            true,
            "frontend -> backend-svc",
        ),
        (
            Probe::tcp(("app", "frontend"), ip("db"), 3306),
            false,
            "frontend -> db (egress, node-a)",
        ),
        (
            Probe::tcp(("app", "frontend"), svc("db-svc"), 3306),
            false,
            "frontend -> db-svc (egress before DNAT)",
        ),
        (
            Probe::tcp(("app", "client"), ip("backend"), 5678),
            false,
            "client -> backend (ingress, node-b)",
        ),
        (
            Probe::tcp(("app", "client"), svc("backend-svc"), 80),
            false,
            "client -> backend-svc (ingress after DNAT, node-b)",
        ),
        (
            Probe::tcp(("app", "client"), ip("db"), 3306),
            false,
            "client -> db",
        ),
        (
            Probe::tcp(("app", "backend"), ip("db"), 3306),
            true,
            "backend -> db (same node)",
        ),
        (
            Probe::tcp(("app", "backend"), ip("frontend"), 80),
            true,
            "backend -> frontend (unisolated ingress across)",
        ),
    ];
    let probes: Vec<Probe> = cases.iter().map(|(p, _, _)| p.clone()).collect();
    let outcomes = lab.probe_all(&probes);
    let failures: Vec<String> = cases
        .iter()
        .zip(&outcomes)
        .filter(|((_, open, _), o)| {
            if *open {
                !o.is_open()
            } else {
                **o != ProbeOutcome::TimedOut
            }
        })
        .map(|((_, open, what), o)| {
            format!(
                "{what}: expected {}, got {o}",
                if *open { "open" } else { "dropped" }
            )
        })
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // Each node's own address reaches its pods (kubelet probes), whatever their policy; the
    // other node's address is just another peer, which db's policy does not admit.
    let node_b = lab.node("node-b").unwrap();
    let node_a = lab.node("node-a").unwrap();
    let timeout = Duration::from_millis(700);
    assert!(
        node_b
            .tcp_connect_from_node(ip("db"), 3306, timeout)
            .is_open(),
        "node-b -> db"
    );
    assert_eq!(
        node_a.tcp_connect_from_node(ip("db"), 3306, timeout),
        ProbeOutcome::TimedOut,
        "node-a -> db (a remote node is no host of db)"
    );
    // Each agent programmed only its own node's pods.
    let a = agents[0].dump_json().unwrap();
    let mut pods: Vec<&str> = a["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["pod"].as_str())
        .collect();
    pods.sort();
    assert_eq!(pods, ["app/client", "app/frontend"], "node-a's endpoints");
}

/// `PODS` with a Service in front of b's port 8080.
fn pods_with_service() -> String {
    format!(
        "{PODS}---\n{}",
        r#"
apiVersion: v1
kind: Service
metadata: {name: b-svc, namespace: t}
spec:
  selector: {role: b}
  ports: [{port: 80, targetPort: 8080}]
"#
    )
}

/// Packets the node transmitted on `pod`'s host-side interface (towards the pod).
fn host_tx_packets(lab: &Lab, agent: &Agent, pod: &str) -> u64 {
    let dump = agent.dump_json().unwrap();
    let interface = dump["endpoints"]
        .as_array()
        .expect("endpoints")
        .iter()
        .find(|e| e["pod"] == pod)
        .and_then(|e| e["interface"].as_str().map(str::to_string))
        .unwrap_or_else(|| panic!("{pod} has an interface in the dump: {dump}"));
    let out = lab
        .node_command("ip")
        .args(["-s", "-j", "link", "show", "dev", &interface])
        .output()
        .expect("ip -s link runs in the node");
    let links: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("ip -s -j link printed no JSON ({e}): {out:?}"));
    links[0]["stats64"]["tx"]["packets"]
        .as_u64()
        .unwrap_or_else(|| panic!("no tx packets for {interface}: {links}"))
}

/// The `route` of `pod`'s tracked TCP flows that match `matches`.
fn routes(agent: &Agent, pod: &str, matches: impl Fn(&serde_json::Value) -> bool) -> Vec<String> {
    let json = agent.conntrack_json(Some(pod)).unwrap();
    json["flows"]
        .as_array()
        .expect("flows")
        .iter()
        .filter(|f| f["protocol"] == "TCP" && matches(f))
        .map(|f| f["route"].as_str().expect("route").to_string())
        .collect()
}

/// `ping -c 1` from `from` to `to`; the TTL of the reply.
fn ping_ttl(lab: &Lab, from: (&str, &str), to: IpAddr) -> String {
    let pod = lab.pod(from.0, from.1).expect("pod");
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &pod.netns, "ping", "-c", "1", "-W", "1"])
        .arg(to.to_string())
        .output()
        .expect("ping runs in the pod");
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .find_map(|w| w.strip_prefix("ttl="))
        .unwrap_or_else(|| panic!("ping {to} from {from:?} got a reply: {text}"))
        .to_string()
}

/// Echoes `n` lines on a new connection from a to `to`; panics unless every one comes back.
fn echo_n(lab: &Lab, to: IpAddr, port: u16, n: usize) -> std::net::TcpStream {
    let mut stream = lab.open_tcp(("t", "a"), to, port).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_millis(800)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    for i in 0..n {
        assert!(echo(&mut stream, &mut reader), "echo {i} to {to}:{port}");
    }
    stream
}

#[test]
fn root_bpf_host_routing_carries_pod_to_pod_flows_past_the_node_stack() {
    const LINES: usize = 50;
    let lab = start(&pods_with_service(), quick_probes());
    let agent = Agent::new(&lab).unwrap();
    admit_a_at_b(&agent);
    let b: IpAddr = lab.pod_ip("t", "b");

    // Pod to pod: judged by both pods' policies in a's run, then straight into b's namespace.
    // The node never transmits the flow's packets on b's host-side interface.
    let before = host_tx_packets(&lab, &agent, "t/b");
    let _direct = echo_n(&lab, b, 8080, LINES);
    let sent = host_tx_packets(&lab, &agent, "t/b") - before;
    assert!(
        sent < 5,
        "{LINES} echoes to b passed b's host interface {sent} times: not routed by BPF"
    );
    let to_b = |f: &serde_json::Value| f["destination"] == format!("{b}:8080").as_str();
    assert_eq!(
        routes(&agent, "t/a", to_b),
        ["bpf:t/b"],
        "a's entry routes to b"
    );
    assert_eq!(
        routes(&agent, "t/b", to_b),
        ["bpf:t/a"],
        "b's entry routes replies to a"
    );
    assert_eq!(
        ping_ttl(&lab, ("t", "a"), b),
        "63",
        "the BPF route is one hop, as the node's: TTL 64 less one"
    );
    // b's ingress policy still decides, in c's run.
    let denied = counter(&agent.dump_json().unwrap(), "ingress", "denied-by-policy");
    assert_eq!(
        lab.probe(&Probe::tcp(("t", "c"), b, 8080)),
        ProbeOutcome::TimedOut,
        "b's ingress policy denies c"
    );
    assert!(
        counter(&agent.dump_json().unwrap(), "ingress", "denied-by-policy") > denied,
        "and counts the drop"
    );

    // To a ClusterIP: the node's stack (kube-proxy's DNAT, then the reverse on the replies).
    let svc = lab.service_ip("t", "b-svc");
    let _via_service = echo_n(&lab, svc, 80, 3);
    let to_svc = |f: &serde_json::Value| f["destination"] == format!("{svc}:80").as_str();
    assert_eq!(
        routes(&agent, "t/a", to_svc),
        ["kernel"],
        "a's entry to the Service"
    );
    let from_a_via_svc = |f: &serde_json::Value| {
        f["destination"] == format!("{b}:8080").as_str() && f["direction"] == "ingress"
    };
    assert!(
        routes(&agent, "t/b", from_a_via_svc).contains(&"kernel".to_string()),
        "b's entry for the translated flow leaves its replies to the stack"
    );

    // --host-routing kernel: every packet through the node's stack again.
    agent.apply_with(&["--host-routing", "kernel"]).unwrap();
    let before = host_tx_packets(&lab, &agent, "t/b");
    let _kernel = echo_n(&lab, b, 8080, LINES);
    let sent = host_tx_packets(&lab, &agent, "t/b") - before;
    assert!(
        sent >= LINES as u64,
        "with kernel routing the node sends the {LINES} echoes out b's host interface ({sent})"
    );
    assert_eq!(ping_ttl(&lab, ("t", "a"), b), "63");
}
