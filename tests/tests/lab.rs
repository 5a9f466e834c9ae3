//! Privileged tests of the local lab itself: every test is named `lab_root_*` because it needs
//! root (network namespaces, CNI plugins) and fails, loudly, without it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use netpol_tests::lab::{
    ClusterOptions, Lab, LabOptions, LabSpec, NameProbe, Probe, ProbeKind, ProbeOutcome, Protocol,
};

const TWO_NAMESPACES_THREE_PODS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: alpha, labels: {team: a}}
---
apiVersion: v1
kind: Namespace
metadata: {name: beta}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: alpha, labels: {app: web}}
spec:
  containers:
  - name: web
    image: nginx
    ports:
    - {containerPort: 80, name: http}
    - {containerPort: 8080}
    - {containerPort: 5353, protocol: UDP, name: dns}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: alpha, labels: {app: client}}
spec:
  containers:
  - {name: client, image: busybox, ports: [{containerPort: 9000}]}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: beta, labels: {app: db}}
spec:
  containers:
  - name: db
    image: postgres
    ports:
    - {containerPort: 5432, protocol: TCP}
    - {containerPort: 53, protocol: UDP}
"#;

/// A port nothing in the lab listens on.
const CLOSED_PORT: u16 = 9;

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "lab_root tests need root (they create network namespaces and run CNI plugins); \
         run them as root, e.g. `sudo -E cargo test -p netpol-tests`"
    );
}

fn start(yaml: &str) -> Lab {
    let spec = LabSpec::from_yaml_str(yaml).expect("the test spec should parse");
    Lab::start(&spec, LabOptions::default())
        .unwrap_or_else(|e| panic!("the lab should start: {e:#}"))
}

fn netns_list() -> String {
    let output = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list should run");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `ip netns list` prints one namespace per line, sometimes followed by "(id: N)".
fn is_listed(listed: &str, name: &str) -> bool {
    listed
        .lines()
        .any(|line| line.split_whitespace().next() == Some(name))
}

/// Every probe a pod-to-pod "allow all" matrix needs: curl and a connect to every TCP port, a
/// datagram to every UDP port, from every pod to every other pod.
fn all_pairs(lab: &Lab) -> Vec<Probe> {
    let mut probes = Vec::new();
    for from in lab.pods() {
        for to in lab.pods().filter(|to| to.netns != from.netns) {
            let source = (from.namespace.as_str(), from.name.as_str());
            for port in &to.ports {
                let kinds: &[ProbeKind] = match port.protocol {
                    Protocol::Tcp => &[ProbeKind::Http, ProbeKind::TcpConnect],
                    Protocol::Udp => &[ProbeKind::Udp],
                    Protocol::Sctp => &[],
                };
                for &kind in kinds {
                    probes.push(Probe::new(source, to.ip, port.port, kind));
                }
            }
        }
    }
    probes
}

fn assert_outcomes(lab: &Lab, probes: &[Probe], expected: ProbeOutcome) {
    let outcomes = lab.probe_all(probes);
    let wrong: Vec<String> = probes
        .iter()
        .zip(&outcomes)
        .filter(|(_, outcome)| **outcome != expected)
        .map(|(probe, outcome)| format!("  {probe}: {outcome}"))
        .collect();
    assert!(
        wrong.is_empty(),
        "lab {}: expected every probe {expected}, but:\n{}",
        lab.id(),
        wrong.join("\n")
    );
}

/// Asks a pod's server who it is over a raw connection from `from`.
fn identity_via_http(lab: &Lab, from: (&str, &str), to_ip: IpAddr, port: u16) -> String {
    let mut stream = lab
        .open_tcp(from, to_ip, port)
        .unwrap_or_else(|e| panic!("connect for http: {e:#}"));
    stream
        .write_all(b"GET / HTTP/1.0\r\n\r\n")
        .expect("send the request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .expect("read the response");
    assert!(
        response.starts_with("HTTP/1.1 200 OK"),
        "unexpected response: {response:?}"
    );
    response
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_string()
}

fn scratch_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("netpol-lab-test-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create a scratch directory");
    dir
}

#[test]
fn lab_root_pods_reach_each_other_and_manifests_describe_them() {
    require_root();
    let lab = start(TWO_NAMESPACES_THREE_PODS);
    assert_eq!(lab.pods().count(), 3, "one lab pod per Pod manifest");

    let probes = all_pairs(&lab);
    assert_eq!(
        probes.len(),
        // Two sources per target; Http + TcpConnect per TCP port, one Udp per UDP port.
        2 * ((2 * 2 + 1) + 2 + (2 + 1)),
        "the matrix covers every port"
    );
    assert_outcomes(&lab, &probes, ProbeOutcome::Connected);

    let web = lab.pod_ip("alpha", "web");
    let db = lab.pod_ip("beta", "db");
    let closed = [
        Probe::tcp(("beta", "db"), web, CLOSED_PORT),
        Probe::http(("alpha", "client"), web, CLOSED_PORT),
        Probe::udp(("alpha", "web"), db, CLOSED_PORT),
    ];
    assert_outcomes(&lab, &closed, ProbeOutcome::Refused);

    assert_eq!(
        identity_via_http(&lab, ("alpha", "client"), db, 5432),
        "beta/db\n",
        "the right pod answers"
    );
    let mut stream = lab
        .open_tcp(("beta", "db"), web, 8080)
        .expect("a long-lived connection opens");
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    for line in ["first\n", "second\n"] {
        stream.write_all(line.as_bytes()).expect("send a line");
        let mut echoed = String::new();
        reader
            .read_line(&mut echoed)
            .expect("the echo server answers");
        assert_eq!(echoed, line, "a non-HTTP connection is a line echo");
    }
    assert_eq!(
        lab.tcp_connect_from_node(db, 5432, Duration::from_secs(1)),
        ProbeOutcome::Connected
    );

    let dir = scratch_dir("manifests");
    let path = lab
        .write_cluster_manifests(&dir)
        .unwrap_or_else(|e| panic!("write manifests: {e:#}"));
    let stored = LabSpec::load(&path)
        .unwrap_or_else(|e| panic!("{} should parse back: {e:#}", path.display()));
    assert_eq!(stored.namespaces.len(), 2);
    for namespace in &stored.namespaces {
        let labels = namespace.metadata.labels.clone().unwrap_or_default();
        let name = namespace.metadata.name.clone().unwrap();
        assert_eq!(
            labels.get("kubernetes.io/metadata.name"),
            Some(&name),
            "namespace {name} lacks its name label"
        );
    }
    assert_eq!(
        stored.namespaces[0].metadata.labels.as_ref().unwrap()["team"],
        "a",
        "spec labels are kept"
    );
    assert_eq!(stored.pods.len(), 3);
    for pod in &stored.pods {
        let (namespace, name) = (
            pod.metadata.namespace.clone().unwrap(),
            pod.metadata.name.clone().unwrap(),
        );
        let ip = lab.pod_ip(&namespace, &name).to_string();
        let status = pod
            .status
            .as_ref()
            .unwrap_or_else(|| panic!("{namespace}/{name} has no status"));
        assert_eq!(
            status.pod_ip.as_deref(),
            Some(ip.as_str()),
            "{namespace}/{name} podIP"
        );
        assert_eq!(
            status.pod_ips.as_ref().map(|ips| ips[0].ip.clone()),
            Some(ip),
            "{namespace}/{name} podIPs"
        );
        assert_eq!(status.phase.as_deref(), Some("Running"));
        assert_eq!(
            pod.spec.as_ref().unwrap().node_name.as_deref(),
            Some(lab.node_name()),
            "{namespace}/{name} nodeName"
        );
    }
    std::fs::remove_dir_all(&dir).expect("remove the scratch directory");
}

#[test]
fn lab_root_drop_removes_every_namespace_and_the_state_dir() {
    require_root();
    let lab = start(TWO_NAMESPACES_THREE_PODS);
    let netns = lab.netns_names().to_vec();
    let state_dir = lab.state_dir();
    assert_eq!(netns.len(), 4, "a node namespace and three pod namespaces");
    let listed = netns_list();
    for name in &netns {
        assert!(
            is_listed(&listed, name),
            "{name} should exist while the lab runs"
        );
    }
    assert!(
        state_dir.join("owner").is_file(),
        "the lab records its owner"
    );
    // A long-lived connection must not keep the teardown waiting.
    let _open = lab
        .open_tcp(("alpha", "web"), lab.pod_ip("beta", "db"), 5432)
        .expect("connect");

    drop(lab);

    let listed = netns_list();
    for name in &netns {
        assert!(
            !is_listed(&listed, name),
            "{name} survived the lab's drop:\n{listed}"
        );
    }
    assert!(
        !state_dir.exists(),
        "{} survived the lab's drop",
        state_dir.display()
    );
}

#[test]
fn lab_root_parallel_labs_do_not_interfere() {
    require_root();
    // Same pod CIDR, so both labs hand out the same addresses: only isolation keeps them apart.
    let spec = |prefix: &str| {
        format!(
            "kind: Pod\napiVersion: v1\nmetadata: {{name: {prefix}1}}\nspec: {{containers: [{{name: c, ports: [{{containerPort: 80}}]}}]}}\n\
             ---\nkind: Pod\napiVersion: v1\nmetadata: {{name: {prefix}2}}\nspec: {{containers: [{{name: c, ports: [{{containerPort: 80}}]}}]}}\n"
        )
    };
    let (a, b) = std::thread::scope(|scope| {
        let a = scope.spawn(|| start(&spec("a")));
        let b = scope.spawn(|| start(&spec("b")));
        (
            a.join().expect("lab a should start"),
            b.join().expect("lab b should start"),
        )
    });
    assert_ne!(a.node_netns(), b.node_netns());
    assert_ne!(a.node_name(), b.node_name(), "each lab is its own node");
    assert_eq!(
        a.pod_ip("default", "a2"),
        b.pod_ip("default", "b2"),
        "the same CIDR yields the same addresses"
    );

    std::thread::scope(|scope| {
        for (lab, src, dst) in [(&a, "a1", "a2"), (&b, "b1", "b2")] {
            scope.spawn(move || {
                let ip = lab.pod_ip("default", dst);
                assert_outcomes(
                    lab,
                    &[
                        Probe::http(("default", src), ip, 80),
                        Probe::tcp(("default", src), ip, 80),
                    ],
                    ProbeOutcome::Connected,
                );
                assert_eq!(
                    identity_via_http(lab, ("default", src), ip, 80),
                    format!("default/{dst}\n"),
                    "lab {} reached another lab's pod",
                    lab.id()
                );
            });
        }
    });

    let b_netns = b.netns_names().to_vec();
    drop(b);
    let ip = a.pod_ip("default", "a2");
    assert_outcomes(
        &a,
        &[Probe::tcp(("default", "a1"), ip, 80)],
        ProbeOutcome::Connected,
    );
    let listed = netns_list();
    assert!(
        b_netns.iter().all(|n| !is_listed(&listed, n)),
        "lab b's namespaces outlived it:\n{listed}"
    );
    assert!(
        a.netns_names().iter().all(|n| is_listed(&listed, n)),
        "dropping lab b touched lab a:\n{listed}"
    );
}

#[test]
fn lab_root_cleanup_stale_removes_labs_of_dead_processes_only() {
    require_root();
    let live = start(TWO_NAMESPACES_THREE_PODS);

    // A lab "left behind" by a process that has exited: its owner pid is dead. The owner is
    // written last because any sweep (parallel tests start labs) may act from then on.
    let mut child = Command::new("true")
        .spawn()
        .expect("spawn a short-lived process");
    let dead_pid = child.id();
    child.wait().expect("the process exits");
    let stale_netns = format!("npl-stale-{}", std::process::id());
    let stale_dir = Path::new("/run/netpol-lab").join(format!("lab-stale-{}", std::process::id()));
    let status = Command::new("ip")
        .args(["netns", "add", &stale_netns])
        .status()
        .unwrap();
    assert!(status.success(), "creating {stale_netns} failed");
    std::fs::create_dir_all(&stale_dir).unwrap();
    std::fs::write(stale_dir.join("netns"), format!("{stale_netns}\n")).unwrap();
    std::fs::write(stale_dir.join("owner"), format!("{dead_pid} 1\n")).unwrap();

    let removed = Lab::cleanup_stale().unwrap_or_else(|e| panic!("cleanup_stale: {e:#}"));

    // A lab starting in a parallel test may have swept it first; either way it must be gone.
    assert!(
        !stale_dir.exists(),
        "the stale lab's directory survived (removed: {removed:?})"
    );
    assert!(
        !is_listed(&netns_list(), &stale_netns),
        "{stale_netns} survived the sweep"
    );
    assert!(live.state_dir().exists(), "a live lab must never be swept");
    assert!(
        live.netns_names()
            .iter()
            .all(|n| is_listed(&netns_list(), n)),
        "a live lab's namespaces were swept"
    );
    assert_outcomes(
        &live,
        &[Probe::tcp(
            ("alpha", "web"),
            live.pod_ip("beta", "db"),
            5432,
        )],
        ProbeOutcome::Connected,
    );
}

#[test]
fn lab_root_dropped_flows_time_out_and_options_apply() {
    require_root();
    let spec =
        LabSpec::from_yaml_str(TWO_NAMESPACES_THREE_PODS).expect("the test spec should parse");
    let opts = LabOptions {
        node_name: Some("worker-7".into()),
        pod_cidr: "10.77.3.0/24".parse().unwrap(),
        probe_timeout: Duration::from_millis(500),
        ..LabOptions::default()
    };
    let lab = Lab::start(&spec, opts).unwrap_or_else(|e| panic!("the lab should start: {e:#}"));
    assert_eq!(lab.node_name(), "worker-7");
    let web = lab.pod("alpha", "web").expect("alpha/web exists");
    let client = lab.pod_ip("alpha", "client");
    assert!(
        lab.pods().all(|p| p.ip.to_string().starts_with("10.77.3.")),
        "addresses come from the configured pod CIDR"
    );

    // Stand-in for a policy drop: web's replies to client vanish without an ICMP error.
    let status = Command::new("ip")
        .args([
            "-n",
            &web.netns,
            "route",
            "add",
            "blackhole",
            &format!("{client}/32"),
        ])
        .status()
        .expect("ip route should run");
    assert!(
        status.success(),
        "adding the blackhole route in {} failed",
        web.netns
    );

    let from = ("alpha", "client");
    let dropped = [
        Probe::http(from, web.ip, 80),
        Probe::tcp(from, web.ip, 8080),
        Probe::udp(from, web.ip, 5353),
    ];
    let started = std::time::Instant::now();
    assert_outcomes(&lab, &dropped, ProbeOutcome::TimedOut);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "parallel probes should cost about one timeout, took {:?}",
        started.elapsed()
    );
    let unaffected = [
        Probe::tcp(("beta", "db"), web.ip, 8080),
        Probe::udp(("beta", "db"), web.ip, 5353),
    ];
    assert_outcomes(&lab, &unaffected, ProbeOutcome::Connected);
}

/// Set by `lab_root_cleanup_stale_removes_a_crashed_processs_lab` for its child process.
const ABANDON_ENV: &str = "NETPOL_LAB_ABANDON_TO";

/// Not a test of its own: the child half of the crash test below. It starts a lab, writes the
/// lab's namespaces and directory to a file, and aborts, so no `Drop` runs.
#[test]
#[ignore = "helper process for lab_root_cleanup_stale_removes_a_crashed_processs_lab"]
fn lab_root_helper_abandon_lab() {
    let out = std::env::var(ABANDON_ENV).unwrap_or_else(|_| {
        panic!("this helper only runs as the child of the crash test ({ABANDON_ENV} unset)")
    });
    let lab = start(TWO_NAMESPACES_THREE_PODS);
    let mut record = lab.netns_names().join("\n");
    record.push_str(&format!("\n{}\n", lab.state_dir().display()));
    std::fs::write(&out, record).expect("write the abandoned lab's names");
    std::process::abort();
}

#[test]
fn lab_root_cleanup_stale_removes_a_crashed_processs_lab() {
    require_root();
    let out = scratch_dir("crash").join("abandoned");
    let status = Command::new(std::env::current_exe().expect("the test binary's path"))
        .args([
            "--exact",
            "lab_root_helper_abandon_lab",
            "--ignored",
            "--test-threads=1",
        ])
        .env(ABANDON_ENV, &out)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("run the helper process");
    assert!(
        !status.success(),
        "the helper must die without cleaning up, it exited with {status}"
    );
    let record = std::fs::read_to_string(&out).expect("the helper records what it left behind");
    let mut left = record.lines().map(str::to_string).collect::<Vec<_>>();
    let state_dir = PathBuf::from(left.pop().expect("the state directory is recorded"));
    assert_eq!(
        left.len(),
        4,
        "the helper's lab has a node and three pods: {left:?}"
    );
    // A parallel test's Lab::start may sweep first, so existence is not asserted here.

    Lab::cleanup_stale().unwrap_or_else(|e| panic!("cleanup_stale: {e:#}"));

    let listed = netns_list();
    let survivors: Vec<_> = left.iter().filter(|n| is_listed(&listed, n)).collect();
    assert!(
        survivors.is_empty(),
        "a dead process's namespaces survived the sweep: {survivors:?}"
    );
    assert!(
        !state_dir.exists(),
        "{} survived the sweep",
        state_dir.display()
    );
    std::fs::remove_dir_all(out.parent().unwrap()).expect("remove the scratch directory");
}

// ---- dual-stack, Services, DNS and two nodes: lab plumbing only, no agent -------------------

fn start_with(yaml: &str, opts: LabOptions) -> Lab {
    let spec = LabSpec::from_yaml_str(yaml).expect("the test spec should parse");
    Lab::start(&spec, opts).unwrap_or_else(|e| panic!("the lab should start: {e:#}"))
}

fn dual_stack() -> LabOptions {
    LabOptions {
        pod_cidr_v6: Some("fd00:10:244:1::/64".parse().unwrap()),
        ..LabOptions::default()
    }
}

#[test]
fn root_lab_dual_stack_pods_reach_each_other_over_ipv6() {
    require_root();
    let lab = start_with(TWO_NAMESPACES_THREE_PODS, dual_stack());
    let v6_cidr: ipnet::Ipv6Net = "fd00:10:244:1::/64".parse().unwrap();
    for pod in lab.pods() {
        assert!(
            pod.ip.is_ipv4(),
            "{}/{}: ip stays IPv4",
            pod.namespace,
            pod.name
        );
        match pod.ipv6 {
            Some(IpAddr::V6(v6)) => assert!(
                v6_cidr.contains(&v6),
                "{}/{}: {v6} is outside {v6_cidr}",
                pod.namespace,
                pod.name
            ),
            other => panic!(
                "{}/{} has no IPv6 address: {other:?}",
                pod.namespace, pod.name
            ),
        }
    }
    let web = lab.pod("alpha", "web").expect("alpha/web").clone();
    let db = lab.pod("beta", "db").expect("beta/db").clone();
    let (web6, db6) = (web.ipv6.unwrap(), db.ipv6.unwrap());
    let from = ("alpha", "client");
    assert_outcomes(
        &lab,
        &[
            Probe::tcp(from, web6, 8080),
            Probe::http(from, web6, 80),
            Probe::udp(from, web6, 5353),
            Probe::udp(from, db6, 53),
            Probe::tcp(("beta", "db"), web6, 80),
            // The [::] servers still take IPv4.
            Probe::tcp(from, web.ip, 8080),
            Probe::udp(from, db.ip, 53),
        ],
        ProbeOutcome::Connected,
    );
    assert_outcomes(
        &lab,
        &[Probe::tcp(from, db6, CLOSED_PORT)],
        ProbeOutcome::Refused,
    );
    assert_eq!(
        identity_via_http(&lab, from, db6, 5432),
        "beta/db\n",
        "the right pod answers over IPv6"
    );

    let dir = scratch_dir("dual-stack");
    let path = lab
        .write_cluster_manifests(&dir)
        .unwrap_or_else(|e| panic!("write manifests: {e:#}"));
    let stored = LabSpec::load(&path).expect("the manifests parse back");
    for pod in &stored.pods {
        let name = pod.metadata.name.clone().unwrap();
        let namespace = pod.metadata.namespace.clone().unwrap();
        let lab_pod = lab.pod(&namespace, &name).unwrap();
        let status = pod.status.as_ref().unwrap();
        let ips: Vec<String> = status
            .pod_ips
            .iter()
            .flatten()
            .map(|i| i.ip.clone())
            .collect();
        assert_eq!(
            ips,
            [lab_pod.ip.to_string(), lab_pod.ipv6.unwrap().to_string()],
            "{namespace}/{name}: podIPs lists IPv4 first, then IPv6"
        );
        assert_eq!(
            status.pod_ip,
            Some(lab_pod.ip.to_string()),
            "podIP is the IPv4 one"
        );
    }
    std::fs::remove_dir_all(&dir).expect("remove the scratch directory");
}

const SERVICES: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {app: web}}
spec:
  containers:
  - name: web
    ports:
    - {containerPort: 8080, name: http}
    - {containerPort: 5353, protocol: UDP, name: dns}
---
apiVersion: v1
kind: Pod
metadata: {name: web-2, namespace: shop, labels: {app: web}}
spec:
  containers:
  - name: web
    ports:
    - {containerPort: 8081, name: http}
    - {containerPort: 5353, protocol: UDP, name: dns}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: shop, labels: {app: client}}
spec: {containers: [{name: c}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: http}
  - {name: dns, port: 53, protocol: UDP, targetPort: dns}
  - {name: raw, port: 7000}
---
apiVersion: v1
kind: Service
metadata: {name: nobody, namespace: shop}
spec:
  selector: {app: none}
  ports: [{port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: web-headless, namespace: shop}
spec:
  clusterIP: None
  selector: {app: web}
  ports: [{port: 8080}]
"#;

#[test]
fn root_lab_service_vip_dnats_to_every_backend_and_keeps_the_client_address() {
    require_root();
    let lab = start(SERVICES);
    let vip = lab.service_ip("shop", "web");
    assert_eq!(
        vip.to_string(),
        "10.96.0.11",
        "the first allocated ClusterIP"
    );
    assert!(
        lab.service("shop", "web-headless").unwrap().is_headless(),
        "clusterIP: None is headless"
    );
    let from = ("shop", "client");
    assert_outcomes(
        &lab,
        &[
            Probe::http(from, vip, 80),
            Probe::tcp(from, vip, 80),
            Probe::udp(from, vip, 53),
            // Hairpin: a backend reaching its own Service, maybe itself.
            Probe::tcp(("shop", "web-1"), vip, 80),
            Probe::tcp(("shop", "web-2"), vip, 80),
        ],
        ProbeOutcome::Connected,
    );
    assert_outcomes(
        &lab,
        &[Probe::tcp(from, lab.service_ip("shop", "nobody"), 80)],
        ProbeOutcome::Refused,
    );
    assert_eq!(
        lab.tcp_connect_from_node(vip, 80, Duration::from_secs(1)),
        ProbeOutcome::Connected,
        "the node's own connections pass OUTPUT's DNAT"
    );

    // The named targetPort resolves per pod (8080 on web-1, 8081 on web-2) and the random
    // split reaches both: 40 tries all landing on one backend has odds of 2^-39.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..40 {
        seen.insert(identity_via_http(&lab, from, vip, 80));
        if seen.len() == 2 {
            break;
        }
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        ["shop/web-1\n", "shop/web-2\n"],
        "both backends answer through the ClusterIP"
    );

    // No masquerade: the backend sees the client pod's own address. Port 7000 has a numeric
    // targetPort, so both pods are endpoints; the test listens there itself.
    let listeners: Vec<_> = ["web-1", "web-2"]
        .iter()
        .map(|pod| {
            lab.in_pod("shop", pod, || std::net::TcpListener::bind("0.0.0.0:7000"))
                .expect("enter the pod")
                .expect("bind 7000 in the pod")
        })
        .collect();
    for listener in &listeners {
        listener.set_nonblocking(true).unwrap();
    }
    let _client = lab
        .open_tcp(from, vip, 7000)
        .unwrap_or_else(|e| panic!("connect through the ClusterIP: {e:#}"));
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    let peer = loop {
        if let Some((_, peer)) = listeners.iter().find_map(|l| l.accept().ok()) {
            break peer;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no backend accepted the connection"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(
        peer.ip(),
        lab.pod_ip("shop", "client"),
        "the backend must see the client pod, not a masqueraded address"
    );

    let rules = lab
        .node_command("iptables-save")
        .output()
        .expect("iptables-save runs in the node");
    let rules = String::from_utf8_lossy(&rules.stdout);
    for needle in [
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
        "-m statistic --mode random --probability 0.5",
        "-j DNAT --to-destination 10.244.1.",
    ] {
        assert!(
            rules.contains(needle),
            "the node's rules lack {needle:?}:\n{rules}"
        );
    }
}

#[test]
fn root_lab_manifests_hold_services_with_cluster_ips_and_endpoint_slices() {
    require_root();
    let lab = start(SERVICES);
    let dir = scratch_dir("services");
    let path = lab
        .write_cluster_manifests(&dir)
        .unwrap_or_else(|e| panic!("write manifests: {e:#}"));
    let text = std::fs::read_to_string(&path).expect("read the manifests");
    let stored = LabSpec::load(&path).expect("the manifests parse back");
    assert_eq!(stored.services.len(), 3);
    let web = &stored.services[0];
    let spec = web.spec.as_ref().unwrap();
    assert_eq!(spec.cluster_ip.as_deref(), Some("10.96.0.11"));
    assert_eq!(spec.cluster_ips, Some(vec!["10.96.0.11".to_string()]));
    let headless = stored.services[2].spec.as_ref().unwrap();
    assert_eq!(headless.cluster_ip.as_deref(), Some("None"));

    let slices: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&text)
        .map(|d| <serde_yaml::Value as serde::Deserialize>::deserialize(d).unwrap())
        .filter(|v| v["kind"] == "EndpointSlice")
        .collect();
    let of = |service: &str| -> Vec<&serde_yaml::Value> {
        slices
            .iter()
            .filter(|s| s["metadata"]["labels"]["kubernetes.io/service-name"] == service)
            .collect()
    };
    let web_slices = of("web");
    assert_eq!(
        web_slices.len(),
        2,
        "web-1 and web-2 resolve http to different ports, so two slices: {web_slices:?}"
    );
    for slice in &web_slices {
        assert_eq!(slice["apiVersion"], "discovery.k8s.io/v1");
        assert_eq!(slice["addressType"], "IPv4");
        let endpoint = &slice["endpoints"][0];
        let pod = endpoint["targetRef"]["name"].as_str().unwrap();
        assert_eq!(endpoint["targetRef"]["kind"], "Pod");
        assert_eq!(endpoint["conditions"]["ready"], true);
        assert_eq!(
            endpoint["addresses"][0].as_str(),
            Some(lab.pod_ip("shop", pod).to_string().as_str())
        );
        let http = slice["ports"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "http")
            .expect("an http port");
        let expected = if pod == "web-1" { 8080 } else { 8081 };
        assert_eq!(http["port"].as_u64(), Some(expected), "{pod}'s http port");
        assert_eq!(http["protocol"], "TCP");
    }
    let empty = of("nobody");
    assert_eq!(
        empty.len(),
        1,
        "a Service without endpoints still has one slice"
    );
    assert!(empty[0]["endpoints"].as_sequence().unwrap().is_empty());
    std::fs::remove_dir_all(&dir).expect("remove the scratch directory");
}

fn three_tier_services() -> LabSpec {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/lab/three-tier-services.yaml");
    LabSpec::load(&path).unwrap_or_else(|e| panic!("{} should parse: {e:#}", path.display()))
}

fn with_dns() -> LabOptions {
    LabOptions {
        dns: true,
        ..LabOptions::default()
    }
}

fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|stat| !stat.contains(") Z "))
            .unwrap_or(false)
}

#[test]
fn root_lab_dns_resolves_services_and_statefulset_names_and_vips_reach_backends() {
    require_root();
    let lab = Lab::start(&three_tier_services(), with_dns())
        .unwrap_or_else(|e| panic!("the lab should start: {e:#}"));
    let dns_pod = lab
        .pod("kube-system", "coredns")
        .expect("DNS adds kube-system/coredns");
    assert_eq!(
        lab.service_ip("kube-system", "kube-dns").to_string(),
        "10.96.0.10"
    );
    let from = ("app1-ns", "backend");
    let resolve = |name: &str| {
        lab.resolve(from, name)
            .unwrap_or_else(|e| panic!("resolving {name}: {e:#}"))
    };
    let frontend_vip = lab.service_ip("app1-ns", "frontend-svc");
    let db = lab.pod_ip("app1-ns", "db-sts-0");
    for (name, expected) in [
        ("frontend-svc", Some(frontend_vip)),
        ("frontend-svc.app1-ns", Some(frontend_vip)),
        (
            "backend-svc.app1-ns.svc.cluster.local",
            Some(lab.service_ip("app1-ns", "backend-svc")),
        ),
        ("db-svc", Some(db)),
        ("db-sts-0.db-svc.app1-ns.svc.cluster.local", Some(db)),
        (
            "kube-dns.kube-system",
            Some(lab.service_ip("kube-system", "kube-dns")),
        ),
        ("no-such-svc", None),
        ("example.com", None),
    ] {
        assert_eq!(resolve(name), expected, "{name} from app1-ns/backend");
    }

    // The demo's forms, by name, through the DNAT.
    let probes: Vec<NameProbe> = [
        ("frontend", "telnet backend-svc 5678"),
        ("frontend", "curl backend-svc:5678"),
        ("backend", "curl frontend-svc"),
        (
            "backend",
            "telnet db-sts-0.db-svc.app1-ns.svc.cluster.local 3306",
        ),
        ("frontend", "nc -u kube-dns.kube-system 53"),
    ]
    .iter()
    .map(|(pod, command)| {
        NameProbe::parse(("app1-ns", pod), command).unwrap_or_else(|e| panic!("{command}: {e:#}"))
    })
    .collect();
    let outcomes = lab.probe_names(&probes);
    for (probe, outcome) in probes.iter().zip(&outcomes) {
        assert_eq!(*outcome, ProbeOutcome::Connected, "{probe}");
    }
    assert_eq!(
        lab.probe_name(&NameProbe::parse(from, "curl no-such-svc").unwrap()),
        ProbeOutcome::Unresolved
    );
    assert_eq!(
        lab.http_get(from, frontend_vip, 80)
            .unwrap_or_else(|e| panic!("GET through frontend-svc: {e:#}")),
        "app1-ns/frontend\n",
        "the Service's only backend answers"
    );

    let backend = lab.pod("app1-ns", "backend").unwrap();
    let resolv = std::fs::read_to_string(format!("/etc/netns/{}/resolv.conf", backend.netns))
        .expect("the pod has a resolv.conf");
    assert_eq!(
        resolv,
        "nameserver 10.96.0.10\nsearch app1-ns.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n"
    );

    let dir = scratch_dir("dns");
    let path = lab.write_cluster_manifests(&dir).expect("write manifests");
    let stored = LabSpec::load(&path).expect("the manifests parse back");
    let coredns = stored
        .pods
        .iter()
        .find(|p| p.metadata.name.as_deref() == Some("coredns"))
        .expect("the manifests hold the DNS pod");
    assert_eq!(
        coredns.metadata.labels.as_ref().unwrap()["k8s-app"],
        "kube-dns",
        "policies select DNS by this label"
    );
    std::fs::remove_dir_all(&dir).expect("remove the scratch directory");

    let pid = lab.dns_pid().expect("dnsmasq runs");
    let etc: Vec<_> = lab
        .pods()
        .map(|p| PathBuf::from(format!("/etc/netns/{}", p.netns)))
        .collect();
    let dns_netns = dns_pod.netns.clone();
    drop(lab);
    assert!(!process_exists(pid), "dnsmasq {pid} survived the lab");
    for dir in etc {
        assert!(!dir.exists(), "{} survived the lab", dir.display());
    }
    assert!(!is_listed(&netns_list(), &dns_netns));
}

/// Not a test of its own: the child half of the DNS crash test below.
#[test]
#[ignore = "helper process for root_lab_cleanup_stale_stops_a_crashed_labs_dnsmasq"]
fn root_lab_helper_abandon_dns_lab() {
    let out = std::env::var(ABANDON_ENV).unwrap_or_else(|_| {
        panic!("this helper only runs as the child of the crash test ({ABANDON_ENV} unset)")
    });
    let lab = Lab::start(&three_tier_services(), with_dns())
        .unwrap_or_else(|e| panic!("the lab should start: {e:#}"));
    let pid = lab.dns_pid().expect("dnsmasq runs");
    let mut record = vec![pid.to_string(), lab.state_dir().display().to_string()];
    record.extend(lab.pods().map(|p| format!("/etc/netns/{}", p.netns)));
    std::fs::write(&out, record.join("\n")).expect("write the abandoned lab's record");
    std::process::abort();
}

#[test]
fn root_lab_cleanup_stale_stops_a_crashed_labs_dnsmasq() {
    require_root();
    let out = scratch_dir("dns-crash").join("abandoned");
    let status = Command::new(std::env::current_exe().expect("the test binary's path"))
        .args([
            "--exact",
            "root_lab_helper_abandon_dns_lab",
            "--ignored",
            "--test-threads=1",
        ])
        .env(ABANDON_ENV, &out)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("run the helper process");
    assert!(!status.success(), "the helper must die without cleaning up");
    let record = std::fs::read_to_string(&out).expect("the helper records what it left behind");
    let mut lines = record.lines();
    let pid: u32 = lines.next().unwrap().parse().unwrap();
    let state_dir = PathBuf::from(lines.next().unwrap());
    let etc: Vec<PathBuf> = lines.map(PathBuf::from).collect();
    assert_eq!(etc.len(), 4, "three app pods and coredns: {etc:?}");

    Lab::cleanup_stale().unwrap_or_else(|e| panic!("cleanup_stale: {e:#}"));

    assert!(
        !process_exists(pid),
        "the dead lab's dnsmasq {pid} survived the sweep"
    );
    for dir in &etc {
        assert!(!dir.exists(), "{} survived the sweep", dir.display());
    }
    assert!(
        !state_dir.exists(),
        "{} survived the sweep",
        state_dir.display()
    );
    std::fs::remove_dir_all(out.parent().unwrap()).expect("remove the scratch directory");
}

const TWO_NODES: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: x}
---
apiVersion: v1
kind: Pod
metadata: {name: a1, namespace: x, labels: {app: front}}
spec:
  nodeName: node-a
  containers:
  - {name: c, ports: [{containerPort: 8080, name: http}, {containerPort: 5353, protocol: UDP}]}
---
apiVersion: v1
kind: Pod
metadata: {name: b1, namespace: x, labels: {app: back}}
spec:
  nodeName: node-b
  containers:
  - {name: c, ports: [{containerPort: 8080, name: http}, {containerPort: 5353, protocol: UDP}]}
---
apiVersion: v1
kind: Pod
metadata: {name: b2, namespace: x, labels: {app: back}}
spec:
  nodeName: node-b
  containers:
  - {name: c, ports: [{containerPort: 8080, name: http}]}
---
apiVersion: v1
kind: Service
metadata: {name: back, namespace: x}
spec:
  selector: {app: back}
  ports: [{port: 80, targetPort: http}]
---
apiVersion: v1
kind: Service
metadata: {name: front, namespace: x}
spec:
  selector: {app: front}
  ports: [{port: 80, targetPort: http}]
"#;

#[test]
fn root_lab_two_nodes_route_pods_services_and_node_addresses_across() {
    require_root();
    let spec = LabSpec::from_yaml_str(TWO_NODES).expect("the test spec should parse");
    let lab = Lab::start_cluster(&spec, ClusterOptions::two_nodes().dual_stack().with_dns())
        .unwrap_or_else(|e| panic!("the cluster should start: {e:#}"));
    let nodes: Vec<_> = lab.nodes().collect();
    assert_eq!(nodes.len(), 2);
    let (a, b) = (nodes[0], nodes[1]);
    assert_eq!(
        a.name(),
        format!("{}-node-a", lab.id()),
        "unique Kubernetes node names"
    );
    assert_eq!(
        lab.node("node-b").map(|n| n.netns().to_string()),
        Some(b.netns().to_string())
    );
    assert_eq!(
        a.address().map(|ip| ip.to_string()).as_deref(),
        Some("172.18.0.2")
    );
    assert_eq!(
        b.address().map(|ip| ip.to_string()).as_deref(),
        Some("172.18.0.3")
    );
    let on = |node: &netpol_tests::lab::LabNode| -> Vec<String> {
        node.pods()
            .map(|p| format!("{}/{}", p.namespace, p.name))
            .collect()
    };
    assert_eq!(
        on(&a),
        ["x/a1", "kube-system/coredns"],
        "no nodeName: the first node"
    );
    assert_eq!(on(&b), ["x/b1", "x/b2"]);
    let b1 = lab.pod("x", "b1").unwrap().clone();
    assert!(b.pod_cidr().contains(&match b1.ip {
        IpAddr::V4(v4) => v4,
        IpAddr::V6(_) => unreachable!(),
    }));

    // Pod to pod across the nodes, both families.
    let from_a = ("x", "a1");
    assert_outcomes(
        &lab,
        &[
            Probe::tcp(from_a, b1.ip, 8080),
            Probe::http(from_a, b1.ip, 8080),
            Probe::udp(from_a, b1.ip, 5353),
            Probe::tcp(from_a, b1.ipv6.unwrap(), 8080),
            Probe::udp(from_a, b1.ipv6.unwrap(), 5353),
            Probe::tcp(("x", "b2"), lab.pod_ip("x", "a1"), 8080),
            // Services: backends on the other node, DNATed on the client's node.
            Probe::http(from_a, lab.service_ip("x", "back"), 80),
            Probe::http(("x", "b2"), lab.service_ip("x", "front"), 80),
        ],
        ProbeOutcome::Connected,
    );
    let answer = identity_via_http(&lab, from_a, lab.service_ip("x", "back"), 80);
    assert!(
        answer == "x/b1\n" || answer == "x/b2\n",
        "a backend on node b answers: {answer:?}"
    );
    // DNS lives on node a; node b's pods resolve through the kube-dns ClusterIP.
    assert_eq!(
        lab.resolve(("x", "b1"), "front")
            .unwrap_or_else(|e| panic!("resolve: {e:#}")),
        Some(lab.service_ip("x", "front"))
    );
    assert_eq!(
        lab.probe_name(&NameProbe::parse(("x", "b2"), "curl front").unwrap()),
        ProbeOutcome::Connected
    );

    // Node a's own address reaches a pod on node b, and keeps its address on the way.
    assert_eq!(
        a.tcp_connect_from_node(b1.ip, 8080, Duration::from_secs(1)),
        ProbeOutcome::Connected
    );
    let listener = lab
        .in_pod("x", "b1", || std::net::TcpListener::bind("0.0.0.0:7001"))
        .expect("enter b1")
        .expect("bind 7001 in b1");
    let _stream = a
        .in_node(|| {
            std::net::TcpStream::connect_timeout(&(b1.ip, 7001).into(), Duration::from_secs(1))
        })
        .expect("enter node a")
        .expect("node a connects to b1");
    let (_, peer) = listener.accept().expect("b1 accepts");
    assert_eq!(
        peer.ip(),
        a.address().unwrap(),
        "b1 sees node a's InternalIP"
    );

    // Each node routes the other's pod CIDR via its InternalIP, as kindnet does.
    let routes = a
        .node_command("ip")
        .args(["route", "show", "10.244.2.0/24"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&routes.stdout).trim(),
        "10.244.2.0/24 via 172.18.0.3 dev eth0"
    );

    let dir = scratch_dir("two-nodes");
    let path = lab.write_cluster_manifests(&dir).expect("write manifests");
    let text = std::fs::read_to_string(&path).unwrap();
    let stored = LabSpec::load(&path).expect("the manifests parse back");
    for pod in &stored.pods {
        let name = pod.metadata.name.clone().unwrap();
        let namespace = pod.metadata.namespace.clone().unwrap();
        assert_eq!(
            pod.spec.as_ref().unwrap().node_name.as_deref(),
            Some(lab.pod(&namespace, &name).unwrap().node.as_str()),
            "{namespace}/{name} nodeName"
        );
    }
    let stored_nodes: Vec<k8s_openapi::api::core::v1::Node> =
        serde_yaml::Deserializer::from_str(&text)
            .map(|d| <serde_yaml::Value as serde::Deserialize>::deserialize(d).unwrap())
            .filter(|v| v["kind"] == "Node")
            .map(|v| serde_yaml::from_value(v).expect("a Node object"))
            .collect();
    assert_eq!(stored_nodes.len(), 2);
    for (node, stored) in nodes.iter().zip(&stored_nodes) {
        assert_eq!(stored.metadata.name.as_deref(), Some(node.name()));
        let spec = stored.spec.as_ref().unwrap();
        assert_eq!(spec.pod_cidr, Some(node.pod_cidr().to_string()));
        assert_eq!(
            spec.pod_cidrs,
            Some(vec![
                node.pod_cidr().to_string(),
                node.pod_cidr_v6().unwrap().to_string()
            ])
        );
        let addresses: Vec<(String, String)> = stored
            .status
            .as_ref()
            .unwrap()
            .addresses
            .iter()
            .flatten()
            .map(|a| (a.type_.clone(), a.address.clone()))
            .collect();
        assert_eq!(
            addresses[..2],
            [
                (
                    "InternalIP".to_string(),
                    node.address().unwrap().to_string()
                ),
                (
                    "InternalIP".to_string(),
                    node.address_v6().unwrap().to_string()
                )
            ]
        );
    }
    std::fs::remove_dir_all(&dir).expect("remove the scratch directory");

    let netns = lab.netns_names().to_vec();
    assert_eq!(netns.len(), 2 + 4, "two nodes, three pods and coredns");
    drop(lab);
    let listed = netns_list();
    assert!(
        netns.iter().all(|n| !is_listed(&listed, n)),
        "a namespace survived the cluster:\n{listed}"
    );
}
