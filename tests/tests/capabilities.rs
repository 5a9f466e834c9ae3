//! Kernel test: the capability set `deploy/netpol.yaml` gives the agent is enough, and minimal.
//!
//! The DaemonSet runs the agent as uid 0, not privileged, with `capabilities: {drop: [ALL],
//! add: [...]}` and `allowPrivilegeEscalation: false`. Here the real binary runs on a lab node
//! the same way: in the node's network namespace (`nsenter --net`, the host's bpffs), as uid 0,
//! under `setpriv` with a bounding set of exactly the manifest's capabilities, nothing
//! inheritable or ambient, and no_new_privs, so its permitted and effective sets are exactly
//! them (checked from /proc/self/status). With them, `apply` enforces a default-deny policy, a
//! second `apply` (a restarted agent adopting its pins) succeeds, and `dump` reads it back by
//! name; with any one of them missing, `apply` fails.
//!
//! Needs root, the kernel's BPF/TCX support and the CNI plugins; fails with a message when it
//! cannot run, never passes silently.

#[path = "support/deploy.rs"]
mod deploy;

use std::{
    path::Path,
    process::{Command, Output, Stdio},
    time::Duration,
};

use netpol_tests::{
    agent::{agent_bin, Agent},
    lab::{Lab, LabOptions, LabSpec, Probe, ProbeKind, ProbeOutcome},
};

const PODS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: caps}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: caps, labels: {role: client}}
spec: {containers: [{name: c, ports: [{containerPort: 8080}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: caps, labels: {role: server}}
spec: {containers: [{name: c, ports: [{containerPort: 8080}]}]}
"#;

const DENY_SERVER: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-server, namespace: caps}
spec:
  podSelector: {matchLabels: {role: server}}
"#;

/// `program` on the lab's node as uid 0 with only `caps` (bounding set, hence permitted and
/// effective; nothing inheritable or ambient; no_new_privs), as the DaemonSet's container.
/// nsenter and setpriv both exec, so the spawned child is `program` itself.
fn with_caps(lab: &Lab, caps: &[&str], program: &Path, args: &[&str]) -> Command {
    let bounding: String = std::iter::once("-all".to_string())
        .chain(caps.iter().map(|c| format!("+{c}")))
        .collect::<Vec<_>>()
        .join(",");
    let mut cmd = lab.node_command("setpriv");
    cmd.arg(format!("--bounding-set={bounding}"))
        .args([
            "--inh-caps=-all",
            "--ambient-caps=-all",
            "--no-new-privs",
            "--",
        ])
        .arg(program)
        .args(args)
        .env("NETPOL_LOG", "warn");
    cmd
}

fn run_with_caps(lab: &Lab, caps: &[&str], program: &Path, args: &[&str]) -> Output {
    let mut cmd = with_caps(lab, caps, program, args);
    cmd.output()
        .unwrap_or_else(|e| panic!("running {cmd:?} (needs util-linux setpriv and nsenter): {e}"))
}

fn agent_args<'a>(lab: &'a Lab, agent: &'a Agent, sub: &'a str, state: &'a str) -> Vec<&'a str> {
    let mut args = vec![sub, "--node-name", lab.node_name(), "--state-dir", state];
    if sub == "apply" || sub == "run" {
        args.push("--manifests");
        args.push(agent.manifests_dir().to_str().expect("UTF-8 lab path"));
    }
    args
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn probe_server(lab: &Lab) -> ProbeOutcome {
    lab.probe(&Probe::new(
        ("caps", "client"),
        lab.pod_ip("caps", "server"),
        8080,
        ProbeKind::TcpConnect,
    ))
}

#[test]
fn root_agent_runs_with_only_its_capabilities() {
    let spec = LabSpec::from_yaml_str(PODS).expect("lab spec parses");
    let lab = Lab::start(
        &spec,
        LabOptions {
            probe_timeout: Duration::from_millis(700),
            ..Default::default()
        },
    )
    .expect("lab starts (needs root, network namespaces and /usr/lib/cni)");
    // Writes the manifests; its Drop resets the node with full root, whatever happens here.
    let agent = Agent::new(&lab).unwrap();
    agent.set_policies(&[("deny-server", DENY_SERVER)]).unwrap();
    let state_dir = lab.state_dir().join("agent-caps");
    let state = state_dir.to_str().expect("UTF-8 lab path");
    let bin = agent_bin();
    // What the DaemonSet adds (it drops ALL first: tests/tests/manifests.rs checks that).
    let caps: Vec<(String, u32)> = deploy::added_capabilities()
        .iter()
        .map(|c| deploy::capability(c))
        .collect();
    assert!(!caps.is_empty(), "deploy/netpol.yaml adds capabilities");
    let names: Vec<&str> = caps.iter().map(|(n, _)| n.as_str()).collect();

    // The emulation is faithful: the process has exactly these capabilities, nothing else.
    let status = run_with_caps(&lab, &names, Path::new("/bin/cat"), &["/proc/self/status"]);
    let status = String::from_utf8_lossy(&status.stdout).into_owned();
    let expected: u64 = caps.iter().map(|(_, bit)| 1u64 << bit).sum();
    for field in ["CapPrm", "CapEff", "CapBnd"] {
        let value = status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{field}:")))
            .unwrap_or_else(|| panic!("{field} in /proc/self/status:\n{status}"));
        assert_eq!(
            u64::from_str_radix(value.trim(), 16).unwrap(),
            expected,
            "{field} under setpriv"
        );
    }
    for field in ["CapInh", "CapAmb"] {
        assert!(
            status.contains(&format!("{field}:\t0000000000000000")),
            "{field} is empty:\n{status}"
        );
    }
    assert!(status.contains("NoNewPrivs:\t1"), "no_new_privs:\n{status}");

    // Minimal: with any one capability fewer, apply fails (and leaves nothing enforcing).
    for missing in &names {
        let fewer: Vec<&str> = names.iter().copied().filter(|c| c != missing).collect();
        let out = run_with_caps(
            &lab,
            &fewer,
            &bin,
            &agent_args(&lab, &agent, "apply", state),
        );
        assert!(
            !out.status.success(),
            "apply without {missing} ({fewer:?}) must fail, but:\n{}",
            text(&out)
        );
        eprintln!(
            "without {missing}: apply fails as expected: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        agent.reset().unwrap();
    }

    // Sufficient: apply enforces, dump reads it back.
    assert!(
        probe_server(&lab).is_open(),
        "before apply the server is open"
    );
    let out = run_with_caps(
        &lab,
        &names,
        &bin,
        &agent_args(&lab, &agent, "apply", state),
    );
    assert!(
        out.status.success(),
        "apply with {names:?} must succeed:\n{}",
        text(&out)
    );
    assert_eq!(
        probe_server(&lab),
        ProbeOutcome::TimedOut,
        "default deny drops client -> server:8080"
    );

    // A restarted agent adopts its pinned maps and links with the same capabilities: the same
    // programs stay attached, and enforcement never lapses.
    let out = run_with_caps(
        &lab,
        &names,
        &bin,
        &agent_args(&lab, &agent, "apply", state),
    );
    assert!(
        out.status.success(),
        "apply again (adopting the pins) with {names:?} must succeed:\n{}",
        text(&out)
    );
    // Adopted, not re-attached: re-attaching would unpin the link first, leaving the pod
    // without its program for a moment.
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(" 0 hook(s) attached"),
        "the second apply adopts the pinned links:\n{stdout}"
    );
    assert_eq!(
        probe_server(&lab),
        ProbeOutcome::TimedOut,
        "still dropped after the second apply"
    );
    let out = run_with_caps(&lab, &names, &bin, &agent_args(&lab, &agent, "dump", state));
    assert!(
        out.status.success(),
        "dump with {names:?} must succeed:\n{}",
        text(&out)
    );
    let dump = String::from_utf8_lossy(&out.stdout);
    assert!(
        dump.contains("POD caps/server") && dump.contains("isolated by caps/deny-server"),
        "dump names the pod and its policy:\n{dump}"
    );
    assert!(
        dump.contains("tcx: pod_"),
        "dump shows the TCX attachment by program name:\n{dump}"
    );

    // The DaemonSet runs `run`: its loop, /readyz and /metrics work with the same set.
    let mut args = agent_args(&lab, &agent, "run", state);
    args.extend(["--listen", "127.0.0.1:19464", "--poll-ms", "100"]);
    let log = lab.state_dir().join("agent-caps-run.log");
    let mut cmd = with_caps(&lab, &names, &bin, &args);
    cmd.stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    // The child is the agent itself (see `with_caps`), stopped below by its PID.
    let mut run = cmd.spawn().expect("spawning netpol-agent run");
    let get = |path: &str| {
        let out = lab
            .node_command("curl")
            .args(["-s", "-m", "2", "-w", "\n%{http_code}"])
            .arg(format!("http://127.0.0.1:19464{path}"))
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut ready = String::new();
    while std::time::Instant::now() < deadline {
        ready = get("/readyz");
        if ready.ends_with("200") || run.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let metrics = get("/metrics");
    let exited = run.try_wait().unwrap();
    if exited.is_none() {
        run.kill().unwrap();
        run.wait().unwrap();
    }
    let log = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        exited.is_none() && ready.ends_with("200"),
        "run with {names:?} becomes ready (exited: {exited:?}; /readyz: {ready:?}):\n{log}"
    );
    assert!(
        metrics.ends_with("200") && metrics.contains("netpol_"),
        "/metrics under {names:?}:\n{metrics}\n{log}"
    );
    assert_eq!(
        probe_server(&lab),
        ProbeOutcome::TimedOut,
        "still dropped after run"
    );
}
