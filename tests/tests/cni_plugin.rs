//! Kernel tests of the chained CNI plugin (`netpol-agent cni`, run as `netpol-cni`): a pod
//! created through `ptp` then netpol's plugin is isolated as its policies say from its first
//! packet. With no agent it is closed both ways by the plugin alone; with an agent running,
//! ADD returns once the agent has programmed it, so its policy holds the moment its containers
//! could talk; a pod the agent does not know yet stays closed through the agent's passes.
//! Every test needs root, the kernel's BPF/TCX support and the CNI plugins; each fails with a
//! message when it cannot run (the lab refuses to start without root), never passes silently.

use std::{
    net::IpAddr,
    process::Child,
    thread,
    time::{Duration, Instant},
};

use netpol_tests::{
    agent::{counter, Agent},
    lab::{
        ChainedPod, Lab, LabOptions, LabSpec, PodPort, Probe, ProbeKind, ProbeOutcome, Protocol,
    },
};

/// Two pods the lab starts the usual way, as peers of the pods the tests add later.
const PODS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: shop, labels: {role: client}}
spec: {containers: [{name: c, ports: [{containerPort: 8080}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: stranger, namespace: shop, labels: {role: stranger}}
spec: {containers: [{name: c, ports: [{containerPort: 8080}]}]}
"#;

/// `web` takes HTTP from clients only and talks to clients only.
const POLICY: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web, namespace: shop}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Ingress, Egress]
  ingress:
    - from: [{podSelector: {matchLabels: {role: client}}}]
      ports: [{port: 80}]
  egress:
    - to: [{podSelector: {matchLabels: {role: client}}}]
      ports: [{port: 8080}]
"#;

const PORT_80: [PodPort; 1] = [PodPort {
    port: 80,
    protocol: Protocol::Tcp,
    name: None,
}];

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

/// A pod as the API server holds it before its sandbox exists: scheduled, no address yet.
fn unaddressed_pod(name: &str, app: &str, node: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop, labels: {{app: {app}}}}}\n\
         spec: {{nodeName: {node}, containers: [{{name: c, ports: [{{containerPort: 80}}]}}]}}\n"
    )
}

fn tcp_to(lab: &Lab, from: &str, to: IpAddr, port: u16) -> ProbeOutcome {
    lab.probe(&Probe::tcp(("shop", from), to, port))
}

fn eventually(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        thread::sleep(Duration::from_millis(50));
    }
    check()
}

/// The `dump -o json` endpoint of a pod.
fn endpoint(agent: &Agent<'_>, pod: &str) -> Option<serde_json::Value> {
    let dump = agent.dump_json().expect("dump");
    dump["endpoints"]
        .as_array()?
        .iter()
        .find(|e| e["pod"] == pod)
        .cloned()
}

/// `netpol-agent run` in the background, killed by its pid on drop.
struct Running {
    child: Child,
    log: std::path::PathBuf,
}

impl Running {
    fn start(agent: &Agent<'_>, extra: &[&str]) -> Running {
        let log = agent.state_dir().with_extension("run.log");
        let child = agent.spawn_run_with(extra, &log).expect("agent starts");
        let running = Running { child, log };
        let socket = agent.state_dir().join("cni.sock");
        // Ready: the socket is served and the first pass enforced the lab's two pods.
        let ready = eventually(Duration::from_secs(20), || {
            socket.exists()
                && endpoint(agent, "shop/client").is_some()
                && endpoint(agent, "shop/stranger").is_some()
        });
        assert!(
            ready,
            "the agent served its socket and programmed the lab:\n{}",
            running.log()
        );
        running
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn isolated_both_ways(ep: &serde_json::Value) -> bool {
    ep["ingress"]["isolated"] == true && ep["egress"]["isolated"] == true
}

#[test]
fn root_cni_plugin_without_agent_closes_a_new_pod_both_ways() {
    let lab = lab();
    let agent = Agent::new(&lab).expect("agent");
    let plugin = agent.cni_plugin().expect("plugin");
    let node = lab.node_name().to_string();
    let web: ChainedPod<'_> = lab
        .add_chained_pod(&node, ("shop", "web"), &PORT_80, &plugin)
        .expect("CNI ADD through ptp and netpol-cni succeeds with no agent");
    let add = web.add.as_ref().expect("added");
    assert_eq!(
        add.result, add.prev_result,
        "a chained plugin prints its prevResult unchanged"
    );
    assert!(
        web.add_stderr().contains("stays closed"),
        "the plugin says why the pod stays closed: {}",
        web.add_stderr()
    );

    let client = lab.pod_ip("shop", "client");
    assert!(
        tcp_to(&lab, "client", lab.pod_ip("shop", "stranger"), 8080).is_open(),
        "control: the lab's own pods reach each other"
    );
    let inbound = tcp_to(&lab, "client", web.ip, 80);
    let outbound = web.probe(ProbeKind::TcpConnect, client, 8080);
    assert!(
        !inbound.is_open(),
        "client -> web:80 is denied: {inbound:?}"
    );
    assert!(
        !outbound.is_open(),
        "web -> client:8080 is denied: {outbound:?}"
    );

    let ep = endpoint(&agent, "shop/web").expect("dump shows the new pod's endpoint");
    assert!(isolated_both_ways(&ep), "closed both ways: {ep:#}");
    assert_eq!(
        ep["ingress"]["class"], 0,
        "the class no entry names: {ep:#}"
    );
    assert_eq!(ep["egress"]["class"], 0, "{ep:#}");
    assert!(
        ep["addresses"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a == &web.ip.to_string()),
        "its own address, for anti-spoofing: {ep:#}"
    );
    for hook in ep["attachments"].as_array().unwrap() {
        assert_eq!(
            hook["pinned"], true,
            "links pinned where the agent adopts them: {ep:#}"
        );
        assert!(
            hook["programs"][0]["ours"] == true,
            "our program first on {}: {ep:#}",
            hook["hook"]
        );
    }
    let dump = agent.dump_json().unwrap();
    assert!(counter(&dump, "ingress", "denied-by-policy") > 0, "counted");
    assert!(counter(&dump, "egress", "denied-by-policy") > 0, "counted");
}

#[test]
fn root_cni_plugin_with_agent_enforces_the_policy_when_add_returns() {
    let lab = lab();
    let agent = Agent::new(&lab).expect("agent");
    let node = lab.node_name().to_string();
    let late = format!(
        "{}---\n{}",
        unaddressed_pod("web", "web", &node),
        unaddressed_pod("plain", "plain", &node)
    );
    std::fs::write(agent.manifests_dir().join("late-pods.yaml"), late).unwrap();
    agent.set_policies(&[("web", POLICY)]).unwrap();
    // No resync during the test: only the plugin's request can program the new pods.
    let run = Running::start(&agent, &["--resync-s", "3600"]);
    let plugin = agent.cni_plugin().expect("plugin");

    let web = lab
        .add_chained_pod(&node, ("shop", "web"), &PORT_80, &plugin)
        .expect("CNI ADD of web");
    // Right after ADD returns: the policy, not deny-all, not open.
    let (client, stranger) = (lab.pod_ip("shop", "client"), lab.pod_ip("shop", "stranger"));
    let outcomes = [
        tcp_to(&lab, "client", web.ip, 80),
        tcp_to(&lab, "stranger", web.ip, 80),
        web.probe(ProbeKind::TcpConnect, client, 8080),
        web.probe(ProbeKind::TcpConnect, stranger, 8080),
    ];
    assert_eq!(
        outcomes
            .iter()
            .map(ProbeOutcome::is_open)
            .collect::<Vec<_>>(),
        [true, false, true, false],
        "client->web allowed, stranger->web denied, web->client allowed, web->stranger denied: \
         {outcomes:?}\nplugin: {}\nagent:\n{}",
        web.add_stderr(),
        run.log()
    );
    assert!(
        !web.add_stderr().contains("stays closed"),
        "the agent answered before ADD returned: {}",
        web.add_stderr()
    );
    let ep = endpoint(&agent, "shop/web").expect("web in dump");
    assert!(isolated_both_ways(&ep), "{ep:#}");
    assert_ne!(ep["ingress"]["class"], 0, "its policy's class: {ep:#}");

    let plain = lab
        .add_chained_pod(&node, ("shop", "plain"), &PORT_80, &plugin)
        .expect("CNI ADD of plain");
    let inbound = tcp_to(&lab, "stranger", plain.ip, 80);
    let outbound = plain.probe(ProbeKind::TcpConnect, stranger, 8080);
    assert!(
        inbound.is_open() && outbound.is_open(),
        "an unselected pod is open right after ADD: in {inbound:?}, out {outbound:?}\n{}",
        run.log()
    );
    assert!(
        run.log().contains("CNI ADD: programming now"),
        "programmed on the plugin's request:\n{}",
        run.log()
    );
    drop(plain);
    drop(web);
    drop(run);
}

#[test]
fn root_cni_plugin_keeps_a_pod_the_agent_does_not_know_closed_until_it_does() {
    let lab = lab();
    let agent = Agent::new(&lab).expect("agent");
    let node = lab.node_name().to_string();
    // Passes every second: none of them may open or detach the unknown pod.
    let run = Running::start(&agent, &["--resync-s", "1"]);
    let plugin = agent.cni_plugin().expect("plugin");
    let ghost = lab
        .add_chained_pod(&node, ("shop", "ghost"), &PORT_80, &plugin)
        .expect("CNI ADD of a pod the agent does not know");
    assert!(
        ghost.add_stderr().contains("stays closed"),
        "the agent answered that it does not know the pod: {}",
        ghost.add_stderr()
    );
    thread::sleep(Duration::from_millis(2500));
    let inbound = tcp_to(&lab, "client", ghost.ip, 80);
    assert!(
        !inbound.is_open(),
        "still closed after passes: {inbound:?}\n{}",
        run.log()
    );
    let ep = endpoint(&agent, "shop/ghost").expect("held endpoint in dump");
    assert!(
        isolated_both_ways(&ep) && ep["ingress"]["class"] == 0,
        "{ep:#}"
    );
    assert!(
        ep["attachments"]
            .as_array()
            .unwrap()
            .iter()
            .all(|h| h["pinned"] == true),
        "not detached: {ep:#}"
    );

    // The manifests (the API) now list it, unselected and still without an address: the
    // address its ADD reported is used, and it opens.
    std::fs::write(
        agent.manifests_dir().join("ghost.yaml"),
        unaddressed_pod("ghost", "ghost", &node),
    )
    .unwrap();
    let opened = eventually(Duration::from_secs(10), || {
        tcp_to(&lab, "client", ghost.ip, 80).is_open()
    });
    assert!(opened, "opens once the agent knows it:\n{}", run.log());
    let ep = endpoint(&agent, "shop/ghost").expect("ghost in dump");
    assert_eq!(ep["ingress"]["isolated"], false, "{ep:#}");
    drop(ghost);
    drop(run);
}
