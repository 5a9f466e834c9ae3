//! The loaded programs with maps filled by the real compiler, and the verdict/counter check.

use std::{
    collections::BTreeMap,
    sync::atomic::{AtomicU32, Ordering},
};

use netpol_agent::{
    dataplane::{self, maps, Dataplane, PinDir},
    policy::{
        compile,
        desired::{map_contents, MapDiff},
        model::{ObjectRef, Snapshot},
        Compiled, Scope,
    },
    source::file::add_documents,
};
use netpol_common::{prog_name, Direction, Reason};

pub const PASS: i32 = -1;
pub const DROP: i32 = 2;
/// `BPF_PROG_TEST_RUN` runs TC programs on loopback: ifindex 1.
pub const IFINDEX: u32 = 1;

pub const POD: [u8; 4] = [10, 0, 0, 2];
pub const PEER: [u8; 4] = [10, 0, 0, 3];
pub const OTHER: [u8; 4] = [10, 0, 0, 4];
pub const POD6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
pub const PEER6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3];

/// The pod under test (dual-stack, on ifindex 1), a peer labelled `role=peer`, another pod.
/// Ingress: from peers on TCP 80, UDP 53, SCTP 3868, and from 192.168.0.0/16 except
/// 192.168.1.0/24 on TCP 443. Egress: to peers on TCP 8080.
pub const CLUSTER: &str = r#"
{apiVersion: v1, kind: Pod, metadata: {name: pod, namespace: t, labels: {role: pod}}, spec: {nodeName: n}, status: {podIPs: [{ip: 10.0.0.2}, {ip: "fd00::2"}]}}
---
{apiVersion: v1, kind: Pod, metadata: {name: peer, namespace: t, labels: {role: peer}}, spec: {nodeName: n2}, status: {podIPs: [{ip: 10.0.0.3}, {ip: "fd00::3"}]}}
---
{apiVersion: v1, kind: Pod, metadata: {name: other, namespace: t, labels: {role: other}}, spec: {nodeName: n2}, status: {podIP: 10.0.0.4}}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: p, namespace: t}
spec:
  podSelector: {matchLabels: {role: pod}}
  policyTypes: [Ingress, Egress]
  ingress:
    - from: [{podSelector: {matchLabels: {role: peer}}}]
      ports: [{port: 80}, {port: 53, protocol: UDP}, {port: 3868, protocol: SCTP}]
    - from: [{ipBlock: {cidr: 192.168.0.0/16, except: [192.168.1.0/24]}}]
      ports: [{port: 443}]
  egress:
    - to: [{podSelector: {matchLabels: {role: peer}}}]
      ports: [{port: 8080}]
"#;

/// A loaded dataplane with its own pin directory, reset on drop.
pub struct Harness {
    pub pins: PinDir,
    pub dp: Dataplane,
    /// What the maps were filled from.
    pub compiled: Compiled,
}

impl Harness {
    pub fn new(with_endpoint: bool) -> Harness {
        Harness::with(with_endpoint, "")
    }

    /// With `extra` manifests (e.g. Services) beside the cluster's.
    pub fn with(with_endpoint: bool, extra: &str) -> Harness {
        static N: AtomicU32 = AtomicU32::new(0);
        let node = format!(
            "progtest-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let pins = PinDir::for_node(std::path::Path::new(dataplane::BPFFS), &node);
        let dp = match Dataplane::load(&pins) {
            Ok(dp) => dp,
            Err(e) => {
                // Maps may already be pinned: leave nothing behind before failing.
                let _ = dataplane::reset(&pins);
                panic!("loading the programs (needs root, BPF and bpffs): {e:?}");
            }
        };
        let mut snap = Snapshot::default();
        let mut errors = Vec::new();
        add_documents("cluster.yaml".as_ref(), CLUSTER, &mut snap, &mut errors);
        add_documents("extra.yaml".as_ref(), extra, &mut snap, &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        let compiled = compile(&snap, &Scope::Node("n".into()), &[]);
        let ifindex: BTreeMap<ObjectRef, u32> = if with_endpoint {
            [(ObjectRef::new("t", "pod"), IFINDEX)].into()
        } else {
            BTreeMap::new()
        };
        let diff = MapDiff {
            upsert: map_contents(&compiled, &ifindex),
            ..Default::default()
        };
        maps::write(&pins, &diff).expect("writing the maps");
        Harness { pins, dp, compiled }
    }

    pub fn run(&mut self, program: &'static str, packet: &[u8]) -> i32 {
        self.dp
            .test_run(program, packet, 1)
            .expect("BPF_PROG_TEST_RUN")
            .0
    }

    pub fn counter(&self, dir: Direction, reason: Reason) -> u64 {
        maps::counters(&self.pins)
            .expect("reading counters")
            .get(&(dir, reason))
            .map_or(0, |c| c.packets)
    }

    /// Runs the packet and checks the verdict and that exactly the expected counter moved.
    #[track_caller]
    pub fn expect(
        &mut self,
        what: &str,
        program: &'static str,
        packet: &[u8],
        verdict: i32,
        reason: Reason,
    ) {
        let dir = if program == prog_name::POD_INGRESS {
            Direction::Ingress
        } else {
            Direction::Egress
        };
        let before = self.counter(dir, reason);
        let got = self.run(program, packet);
        assert_eq!(got, verdict, "{what}: verdict (-1 pass, 2 drop)");
        assert_eq!(
            self.counter(dir, reason),
            before + 1,
            "{what}: counter {}/{}",
            dir.name(),
            reason.name()
        );
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Err(e) = dataplane::reset(&self.pins) {
            eprintln!("resetting {}: {e}", self.pins.path().display());
        }
    }
}

pub const IN: &str = prog_name::POD_INGRESS;
pub const OUT: &str = prog_name::POD_EGRESS;
