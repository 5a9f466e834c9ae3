//! Per-packet cost of the classifiers through `BPF_PROG_TEST_RUN` (repeat 100,000, the kernel's
//! mean per run), at 10, 1,000 and 10,000 policy entries, beside a program that does nothing.
//! Needs root. Run: `cargo bench -p netpol-tests --bench datapath` (prints figures).

use std::{collections::BTreeMap, net::Ipv4Addr, path::Path};

use netpol_agent::{
    dataplane::{self, maps, Dataplane, PinDir},
    policy::desired::{map_contents, MapDiff},
    policy::{
        compile,
        model::{
            ContainerPort, Labels, ObjectRef, Peer, Pod, Policy, PortSpec, Protocol, Rule, Snapshot,
        },
        selector::LabelSelector,
        Scope,
    },
};
use netpol_common::prog_name;
use netpol_tests::packet::{self as p, V4};

const REPEAT: u32 = 100_000;

/// A pod whose ingress allows `peers` distinct peer identities on TCP 80: one policy entry per
/// peer (plus their ipcache entries).
fn snapshot(peers: u32) -> Snapshot {
    let mut snap = Snapshot::default();
    let pod = |name: String, ip: u32, labels: Labels, node: &str| Pod {
        id: ObjectRef::new("bench", name),
        labels,
        node_name: Some(node.into()),
        ips: vec![Ipv4Addr::from(ip).into()],
        host_network: false,
        ports: vec![ContainerPort {
            name: None,
            port: 80,
            protocol: Protocol::Tcp,
        }],
    };
    snap.pods.push(pod(
        "target".into(),
        0x0a00_0002,
        Labels::from([("role".into(), "target".into())]),
        "n",
    ));
    for i in 0..peers {
        let labels = Labels::from([("role".into(), "peer".into()), ("n".into(), i.to_string())]);
        snap.pods
            .push(pod(format!("peer{i}"), 0x0a01_0000 + i, labels, "other"));
    }
    snap.policies.push(Policy {
        id: ObjectRef::new("bench", "p"),
        pod_selector: LabelSelector {
            match_labels: Labels::from([("role".into(), "target".into())]),
            ..Default::default()
        },
        ingress_isolates: true,
        egress_isolates: false,
        ingress: vec![Rule {
            peers: vec![Peer::Pods {
                namespaces: None,
                pods: Some(LabelSelector {
                    match_labels: Labels::from([("role".into(), "peer".into())]),
                    ..Default::default()
                }),
            }],
            ports: vec![PortSpec::Range {
                protocol: Protocol::Tcp,
                first: 80,
                last: 80,
            }],
        }],
        egress: vec![],
    });
    snap
}

/// Rounds of measurements, the sizes interleaved in each: this VM's speed drifts by more
/// between runs than the sizes differ, so every figure is a median over rounds taken side by
/// side.
const ROUNDS: usize = 9;

/// TC verdicts the packets must get, so the figures are of the path they claim to measure.
const PASS: i32 = -1;
const DROP: i32 = 2;

fn ns(dp: &mut Dataplane, program: &'static str, packet: &[u8], expect: Option<i32>) -> f64 {
    let (verdict, per_run) = dp
        .test_run(program, packet, REPEAT)
        .expect("test_run (needs root)");
    if let Some(expect) = expect {
        assert_eq!(verdict, expect, "{program}: verdict");
    }
    per_run.as_nanos() as f64
}

/// One policy size, loaded under its own pin directory.
struct Setup {
    peers: u32,
    entries: usize,
    pins: PinDir,
    dp: Dataplane,
    decision: Vec<u8>,
    established: Vec<u8>,
}

fn setup(peers: u32) -> Setup {
    let node = format!("bench-{}-{peers}", std::process::id());
    let pins = PinDir::for_node(Path::new(dataplane::BPFFS), &node);
    let dp = Dataplane::load(&pins).expect("loading the programs (needs root)");
    let compiled = compile(&snapshot(peers), &Scope::Node("n".into()), &[]);
    let ifindex: BTreeMap<ObjectRef, u32> = [(ObjectRef::new("bench", "target"), 1)].into();
    let contents = map_contents(&compiled, &ifindex);
    let entries = contents.policy.len();
    maps::write(
        &pins,
        &MapDiff {
            upsert: contents,
            ..Default::default()
        },
    )
    .expect("maps");
    let target = [10, 0, 0, 2];
    let last_peer = Ipv4Addr::from(0x0a01_0000 + peers - 1).octets();
    // A new connection the policy denies takes every lookup its class has and creates
    // nothing, so each of the runs makes the full decision.
    let decision = p::ipv4(
        last_peer,
        target,
        p::TCP,
        &p::tcp(40000, 81, p::SYN),
        &V4::default(),
    );
    // An allowed packet: the first run tracks the flow, the rest hit conntrack.
    let established = p::ipv4(
        last_peer,
        target,
        p::TCP,
        &p::tcp(40001, 80, p::ACK),
        &V4::default(),
    );
    Setup {
        peers,
        entries,
        pins,
        dp,
        decision,
        established,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    println!(
        "BPF_PROG_TEST_RUN, repeat {REPEAT}, mean ns per packet (kernel-measured); \
         median of {ROUNDS} interleaved rounds"
    );
    let mut setups: Vec<Setup> = [10u32, 1_000, 10_000].into_iter().map(setup).collect();
    // [setup][noop, decision, established][round]
    let mut figures = vec![[Vec::new(), Vec::new(), Vec::new()]; setups.len()];
    for _ in 0..ROUNDS {
        for (s, f) in setups.iter_mut().zip(&mut figures) {
            f[0].push(ns(&mut s.dp, prog_name::NOOP, &s.decision, None));
            f[1].push(ns(
                &mut s.dp,
                prog_name::POD_INGRESS,
                &s.decision,
                Some(DROP),
            ));
            f[2].push(ns(
                &mut s.dp,
                prog_name::POD_INGRESS,
                &s.established,
                Some(PASS),
            ));
        }
    }
    println!(
        "{:>9} {:>12} {:>18} {:>16} {:>14} {:>18}",
        "entries",
        "noop (ns)",
        "new-conn decision",
        "established",
        "decision/noop",
        "decision min-max"
    );
    let mut at_10 = None;
    for (s, f) in setups.iter().zip(figures) {
        let spread = format!(
            "{:.0}-{:.0}",
            f[1].iter().copied().fold(f64::MAX, f64::min),
            f[1].iter().copied().fold(0.0, f64::max)
        );
        let [noop, dec, est] = f.map(median);
        println!(
            "{:>9} {noop:>12.1} {dec:>18.1} {est:>16.1} {:>14.2} {spread:>18}",
            s.entries,
            dec / noop
        );
        let base = *at_10.get_or_insert(dec);
        if s.peers == 10_000 {
            println!(
                "new-connection decision at {} entries / at 10: {:.2}x (goal <= 1.2x)",
                s.entries,
                dec / base
            );
        }
    }
    for s in setups {
        drop(s.dp);
        dataplane::reset(&s.pins).expect("reset");
    }
}
