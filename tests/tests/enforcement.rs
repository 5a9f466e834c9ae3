//! Kernel tests: the real agent binary programs a lab node and real sockets probe it.
//! Every test needs root, the kernel's BPF/TCX support and the CNI plugins; each fails with a
//! message when it cannot run (the lab refuses to start without root), never passes silently.

use std::{io::Write as _, time::Duration};

use netpol_tests::{
    agent::{counter, Agent},
    lab::{Lab, LabOptions, LabSpec, Probe, ProbeKind, ProbeOutcome},
    scenario::{probe_matrix, three_tier_expected},
};

/// Three pods in one namespace, each serving TCP 8080 and UDP 5353, plus a pod elsewhere.
const PODS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: t, labels: {team: t}}
---
apiVersion: v1
kind: Namespace
metadata: {name: other}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: t, labels: {role: a}}
spec: {containers: [{name: c, ports: [{containerPort: 8080}, {containerPort: 5353, protocol: UDP}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: t, labels: {role: b}}
spec: {containers: [{name: c, ports: [{containerPort: 8080}, {containerPort: 5353, protocol: UDP}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: c, namespace: t, labels: {role: c}}
spec: {containers: [{name: c, ports: [{containerPort: 8080}, {containerPort: 5353, protocol: UDP}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: x, namespace: other, labels: {role: a}}
spec: {containers: [{name: c, ports: [{containerPort: 8080}]}]}
"#;

fn lab() -> Lab {
    let spec = LabSpec::from_yaml_str(PODS).expect("lab spec parses");
    Lab::start(
        &spec,
        LabOptions {
            probe_timeout: Duration::from_millis(700),
            ..Default::default()
        },
    )
    .expect("lab starts (needs root, network namespaces and /usr/lib/cni)")
}

/// Probes `to`'s address from `from` (both `ns/pod`).
fn probe(lab: &Lab, kind: ProbeKind, from: &str, to: &str, port: u16) -> ProbeOutcome {
    let (fns, fname) = from.split_once('/').expect("ns/pod");
    let (tns, tname) = to.split_once('/').expect("ns/pod");
    lab.probe(&Probe::new(
        (fns, fname),
        lab.pod_ip(tns, tname),
        port,
        kind,
    ))
}

fn tcp(lab: &Lab, from: &str, to: &str, port: u16) -> ProbeOutcome {
    probe(lab, ProbeKind::TcpConnect, from, to, port)
}

fn udp(lab: &Lab, from: &str, to: &str, port: u16) -> ProbeOutcome {
    probe(lab, ProbeKind::Udp, from, to, port)
}

#[track_caller]
fn assert_open(outcome: ProbeOutcome, what: &str) {
    assert!(outcome.is_open(), "{what}: expected open, got {outcome}");
}

#[track_caller]
fn assert_dropped(outcome: ProbeOutcome, what: &str) {
    assert_eq!(outcome, ProbeOutcome::TimedOut, "{what}: expected dropped");
}

const DENY_B_INGRESS: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-b, namespace: t}
spec:
  podSelector: {matchLabels: {role: b}}
"#;

#[test]
fn root_default_deny_ingress_drops_and_counts() {
    let lab = lab();
    let agent = Agent::new(&lab).unwrap();
    agent.set_policies(&[("deny-b", DENY_B_INGRESS)]).unwrap();
    agent.apply().unwrap();

    assert_dropped(tcp(&lab, "t/a", "t/b", 8080), "a -> b tcp");
    assert_dropped(udp(&lab, "t/a", "t/b", 5353), "a -> b udp");
    assert_dropped(tcp(&lab, "other/x", "t/b", 8080), "x -> b tcp");
    // b is isolated for ingress only: its own connections still go out.
    assert_open(tcp(&lab, "t/b", "t/a", 8080), "b -> a tcp");
    // The node's own addresses always reach its pods (kubelet probes).
    let from_node = lab.tcp_connect_from_node(lab.pod_ip("t", "b"), 8080, Duration::from_secs(1));
    assert_open(from_node, "node -> b");

    let dump = agent.dump_json().unwrap();
    assert!(
        counter(&dump, "ingress", "denied-by-policy") >= 3,
        "drops are counted: {dump}"
    );
}

#[test]
fn root_allowed_peer_connects_others_do_not() {
    let lab = lab();
    let agent = Agent::new(&lab).unwrap();
    let policy = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: b-from-a, namespace: t}
spec:
  podSelector: {matchLabels: {role: b}}
  ingress:
    - from: [{podSelector: {matchLabels: {role: a}}}]
      ports: [{port: 8080}]
    - from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: other}}}]
      ports: [{port: 5353, protocol: UDP}]
"#;
    agent.set_policies(&[("b-from-a", policy)]).unwrap();
    agent.apply().unwrap();

    assert_open(
        tcp(&lab, "t/a", "t/b", 8080),
        "a -> b:8080 (podSelector peer)",
    );
    assert_dropped(
        udp(&lab, "t/a", "t/b", 5353),
        "a -> b:5353/udp (port not allowed for a)",
    );
    assert_dropped(tcp(&lab, "t/c", "t/b", 8080), "c -> b:8080 (not a peer)");
    // x has role=a but lives in another namespace: a bare podSelector means the policy's own.
    assert_dropped(
        tcp(&lab, "other/x", "t/b", 8080),
        "x -> b:8080 (other namespace)",
    );
}

#[test]
fn root_namespace_selector_peer_allows_udp() {
    let lab = lab();
    let agent = Agent::new(&lab).unwrap();
    let policy = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: a-udp-from-team, namespace: t}
spec:
  podSelector: {matchLabels: {role: a}}
  ingress:
    - from: [{namespaceSelector: {matchLabels: {team: t}}, podSelector: {matchLabels: {role: c}}}]
      ports: [{port: 5353, protocol: UDP}]
"#;
    agent.set_policies(&[("p", policy)]).unwrap();
    agent.apply().unwrap();
    assert_open(udp(&lab, "t/c", "t/a", 5353), "c -> a:5353/udp");
    assert_dropped(
        udp(&lab, "t/b", "t/a", 5353),
        "b -> a:5353/udp (pod selector ANDed)",
    );
    assert_dropped(tcp(&lab, "t/c", "t/a", 8080), "c -> a:8080/tcp (port)");
}

#[test]
fn root_pod_no_policy_selects_stays_open() {
    let lab = lab();
    let agent = Agent::new(&lab).unwrap();
    agent.set_policies(&[("deny-b", DENY_B_INGRESS)]).unwrap();
    agent.apply().unwrap();
    for from in ["t/a", "t/b", "other/x"] {
        assert_open(tcp(&lab, from, "t/c", 8080), &format!("{from} -> c tcp"));
    }
    assert_open(udp(&lab, "t/a", "t/c", 5353), "a -> c udp");
    let dump = agent.dump_json().unwrap();
    let c = dump["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["pod"] == "t/c")
        .expect("c is an endpoint: programs attached even when no policy selects it");
    assert_eq!(c["ingress"]["isolated"], false);
    assert_eq!(c["egress"]["isolated"], false);
}

#[test]
fn root_reply_to_allowed_egress_passes_new_inbound_is_refused() {
    let lab = lab();
    let agent = Agent::new(&lab).unwrap();
    // a: no ingress at all; egress only to b on 8080/TCP and 5353/UDP.
    let policy = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: a-out-only, namespace: t}
spec:
  podSelector: {matchLabels: {role: a}}
  policyTypes: [Ingress, Egress]
  egress:
    - to: [{podSelector: {matchLabels: {role: b}}}]
      ports: [{port: 8080}, {port: 5353, protocol: UDP}]
"#;
    agent.set_policies(&[("a-out-only", policy)]).unwrap();
    agent.apply().unwrap();

    // The replies come back through a's isolated ingress: conntrack lets them in.
    assert_open(tcp(&lab, "t/a", "t/b", 8080), "a -> b:8080 and its replies");
    assert_open(
        udp(&lab, "t/a", "t/b", 5353),
        "a -> b:5353/udp and its reply",
    );
    // A long-lived connection keeps working both ways.
    let mut stream = lab
        .open_tcp(("t", "a"), lab.pod_ip("t", "b"), 8080)
        .unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    for i in 0..3 {
        writeln!(stream, "line {i}").unwrap();
        let mut buf = [0u8; 64];
        let n = std::io::Read::read(&mut stream, &mut buf).unwrap();
        assert!(
            String::from_utf8_lossy(&buf[..n]).contains(&format!("line {i}")),
            "echo {i}"
        );
    }
    // New connections towards a on the very same ports are refused (dropped).
    assert_dropped(tcp(&lab, "t/b", "t/a", 8080), "b -> a:8080 (new inbound)");
    assert_dropped(
        udp(&lab, "t/b", "t/a", 5353),
        "b -> a:5353/udp (new inbound)",
    );
    // And a's egress to anyone else is closed.
    assert_dropped(tcp(&lab, "t/a", "t/c", 8080), "a -> c:8080");

    let dump = agent.dump_json().unwrap();
    assert!(
        counter(&dump, "ingress", "reply") > 0,
        "replies counted: {dump}"
    );
    assert!(
        counter(&dump, "egress", "denied-by-policy") > 0,
        "egress drops counted"
    );
}

/// Everything a second `apply` could change: endpoints with their attachments (program ids),
/// and every map entry. Counters move with traffic and are left out.
fn kernel_state(agent: &Agent) -> serde_json::Value {
    let mut dump = agent.dump_json().unwrap();
    dump.as_object_mut().unwrap().remove("counters");
    dump
}

#[test]
fn root_apply_is_idempotent_and_reset_leaves_nothing() {
    let lab = lab();
    let agent = Agent::new(&lab).unwrap();
    agent.set_policies(&[("deny-b", DENY_B_INGRESS)]).unwrap();
    agent.apply().unwrap();
    let first = kernel_state(&agent);
    let second_out = agent.apply().unwrap();
    assert!(
        second_out.contains("0 map change(s), 0 hook(s) attached"),
        "second apply changed something: {second_out}"
    );
    assert_eq!(
        kernel_state(&agent),
        first,
        "kernel state changed on the second apply"
    );

    let interfaces: Vec<String> = first["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["interface"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(interfaces.len(), 4, "every pod has an endpoint");
    let ours = |lab: &Lab| {
        let interfaces = interfaces.clone();
        lab.in_node(move || {
            let mut found = Vec::new();
            for i in &interfaces {
                for hook in netpol_agent::dataplane::attach::Hook::ALL {
                    let progs = netpol_agent::dataplane::attach::attached(i, hook).unwrap();
                    found.extend(
                        progs
                            .into_iter()
                            .map(|p| format!("{i} {}: {}", hook.name(), p.name)),
                    );
                }
            }
            found
        })
        .unwrap()
    };
    assert_eq!(
        ours(&lab).len(),
        8,
        "both hooks of all four interfaces carry a program"
    );

    agent.reset().unwrap();
    assert!(
        !agent.pin_dir().exists(),
        "reset left {}",
        agent.pin_dir().display()
    );
    assert_eq!(
        ours(&lab),
        Vec::<String>::new(),
        "reset left programs attached"
    );
    let qdiscs = lab
        .node_command("tc")
        .args(["qdisc", "show"])
        .output()
        .unwrap();
    let qdiscs = String::from_utf8_lossy(&qdiscs.stdout);
    assert!(
        !qdiscs.contains("clsact") && !qdiscs.contains("ingress"),
        "qdiscs left: {qdiscs}"
    );
    // Traffic flows again.
    assert_open(tcp(&lab, "t/a", "t/b", 8080), "a -> b after reset");
}

#[test]
fn root_invalid_policy_fails_closed_and_others_keep_working() {
    let lab = lab();
    let agent = Agent::new(&lab).unwrap();
    let bad = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: bad, namespace: t}
spec:
  podSelector: {matchLabels: {role: b}}
  ingress:
    - from: [{ipBlock: {cidr: "10.0.0.0/33"}}]
"#;
    let good = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: good, namespace: t}
spec:
  podSelector: {matchLabels: {role: c}}
  ingress: [{from: [{podSelector: {matchLabels: {role: a}}}]}]
"#;
    agent.set_policies(&[("bad", bad), ("good", good)]).unwrap();
    let out = agent
        .command(
            "apply",
            &["--manifests", &agent.manifests_dir().to_string_lossy()],
        )
        .unwrap();
    assert!(
        out.status.success(),
        "apply without --strict programs the rest"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("NetworkPolicy t/bad")
            && stderr.contains("spec.ingress[0].from[0].ipBlock.cidr"),
        "the error names the policy and the field: {stderr}"
    );
    assert_dropped(tcp(&lab, "t/a", "t/b", 8080), "bad policy still isolates b");
    assert_open(tcp(&lab, "t/a", "t/c", 8080), "good policy allows a -> c");
    assert_dropped(tcp(&lab, "t/b", "t/c", 8080), "good policy isolates c");

    let strict = agent
        .command(
            "apply",
            &[
                "--strict",
                "--manifests",
                &agent.manifests_dir().to_string_lossy(),
            ],
        )
        .unwrap();
    assert!(
        !strict.status.success(),
        "--strict makes an invalid policy an error exit"
    );
}

#[test]
fn root_three_tier_demo_matrix() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let spec = LabSpec::load(root.join("deploy/lab/three-tier.yaml")).unwrap();
    let lab = Lab::start(&spec, LabOptions::default()).expect("lab starts");
    let agent = Agent::new(&lab).unwrap();
    agent.set_policies(&[]).unwrap();
    agent.apply().unwrap();
    let before = probe_matrix(&lab);
    assert_eq!(
        before.mismatches(|_, _, _| true),
        Vec::<String>::new(),
        "\n{}",
        before.render()
    );

    let mut examples: Vec<_> = std::fs::read_dir(root.join("deploy/examples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    examples.sort();
    agent.set_policy_files(&examples).unwrap();
    agent.apply().unwrap();
    let after = probe_matrix(&lab);
    assert_eq!(
        after.mismatches(three_tier_expected),
        Vec::<String>::new(),
        "\n{}",
        after.render()
    );
}

/// Polls `check` until it holds or `timeout` passes.
fn eventually(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    check()
}

#[test]
fn root_run_reprograms_on_change_and_leaves_enforcement_on_exit() {
    let lab = lab();
    let agent = Agent::new(&lab).unwrap();
    agent.set_policies(&[]).unwrap();
    let mut child = agent.spawn_run().unwrap();
    let programmed = eventually(Duration::from_secs(15), || {
        agent
            .dump_json()
            .is_ok_and(|d| d["endpoints"].as_array().is_some_and(|e| e.len() == 4))
    });
    assert!(programmed, "run programmed every pod");
    assert_open(tcp(&lab, "t/a", "t/b", 8080), "a -> b with no policy");

    agent.set_policies(&[("deny-b", DENY_B_INGRESS)]).unwrap();
    let closed = eventually(Duration::from_secs(10), || {
        tcp(&lab, "t/a", "t/b", 8080) == ProbeOutcome::TimedOut
    });
    assert!(closed, "run applied the new policy");

    // Stop it the way Kubernetes does, by PID.
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid fits"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM to the agent");
    let status = child.wait().unwrap();
    assert!(status.success(), "run exits cleanly on SIGTERM: {status}");
    assert_dropped(
        tcp(&lab, "t/a", "t/b", 8080),
        "enforcement stays after the agent exits",
    );
}

#[test]
fn root_spoofed_source_is_dropped_and_counted() {
    let lab = lab();
    let agent = Agent::new(&lab).unwrap();
    agent.set_policies(&[]).unwrap();
    agent.apply().unwrap();
    let netns = lab.pod("t", "a").expect("pod a").netns.clone();
    let in_a = |args: &[&str]| {
        std::process::Command::new("nsenter")
            .arg(format!("--net=/run/netns/{netns}"))
            .arg("--")
            .args(args)
            .output()
            .expect("nsenter")
    };
    // An address inside a's namespace that is not a's: the kernel will send from it.
    let added = in_a(&["ip", "addr", "add", "10.244.1.200/32", "dev", "eth0"]);
    assert!(
        added.status.success(),
        "{}",
        String::from_utf8_lossy(&added.stderr)
    );
    let url = format!("http://{}:8080/", lab.pod_ip("t", "b"));
    let spoofed = in_a(&["curl", "-s", "-m", "1", "--interface", "10.244.1.200", &url]);
    assert!(
        !spoofed.status.success(),
        "a connection from a foreign source address got through"
    );
    let dump = agent.dump_json().unwrap();
    assert!(
        counter(&dump, "egress", "spoofed") > 0,
        "spoofed packets counted: {dump}"
    );
    // a's own address still works.
    assert_open(tcp(&lab, "t/a", "t/b", 8080), "a -> b from a's own address");
}

#[test]
fn root_dump_conntrack_shows_a_pods_flows() {
    let lab = lab();
    let agent = Agent::new(&lab).unwrap();
    agent.set_policies(&[]).unwrap();
    agent.apply().unwrap();
    let mut stream = lab
        .open_tcp(("t", "a"), lab.pod_ip("t", "b"), 8080)
        .unwrap();
    writeln!(stream, "hello").unwrap();
    let json = agent.conntrack_json(Some("t/a")).unwrap();
    let flows = json["flows"].as_array().expect("flows");
    let b = format!("{}:8080", lab.pod_ip("t", "b"));
    let flow = flows
        .iter()
        .find(|f| f["destination"] == b.as_str() && f["protocol"] == "TCP")
        .unwrap_or_else(|| panic!("a's flow to {b} is tracked: {json}"));
    assert_eq!(flow["pod"], "t/a");
    assert_eq!(flow["direction"], "egress");
    assert_eq!(flow["state"], "established");
    assert!(
        flow["expires_in_s"].as_i64().unwrap() > 3600,
        "established flows live for hours"
    );
    assert!(flows.iter().all(|f| f["pod"] == "t/a"), "filtered by pod");
    let table = agent.dump_table(None).unwrap();
    assert!(table.contains("POD t/a"), "{table}");
}
