//! Program tests: the real classifiers, the real maps (filled by the real compiler), crafted
//! packets run through `BPF_PROG_TEST_RUN`; every case asserts the verdict and the counter.
//! Needs root and the BPF syscall; fails loudly when it cannot load the programs. Nothing is
//! sent on any network: test runs execute on a synthetic skb.

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
        Scope,
    },
    source::file::add_documents,
};
use netpol_common::{prog_name, Direction, Reason};
use netpol_tests::packet::{self as p, V4};

const PASS: i32 = -1;
const DROP: i32 = 2;
/// `BPF_PROG_TEST_RUN` runs TC programs on loopback: ifindex 1.
const IFINDEX: u32 = 1;

const POD: [u8; 4] = [10, 0, 0, 2];
const PEER: [u8; 4] = [10, 0, 0, 3];
const OTHER: [u8; 4] = [10, 0, 0, 4];
const POD6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
const PEER6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3];

/// The pod under test (dual-stack, on ifindex 1), a peer labelled `role=peer`, another pod.
/// Ingress: from peers on TCP 80, UDP 53, SCTP 3868, and from 192.168.0.0/16 except
/// 192.168.1.0/24 on TCP 443. Egress: to peers on TCP 8080.
const CLUSTER: &str = r#"
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
struct Harness {
    pins: PinDir,
    dp: Dataplane,
}

impl Harness {
    fn new(with_endpoint: bool) -> Harness {
        static N: AtomicU32 = AtomicU32::new(0);
        let node = format!(
            "progtest-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let pins = PinDir::for_node(std::path::Path::new(dataplane::BPFFS), &node);
        let dp = Dataplane::load(&pins).expect("loading the programs (needs root, BPF and bpffs)");
        let mut snap = Snapshot::default();
        let mut errors = Vec::new();
        add_documents("cluster.yaml".as_ref(), CLUSTER, &mut snap, &mut errors);
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
        Harness { pins, dp }
    }

    fn run(&mut self, program: &'static str, packet: &[u8]) -> i32 {
        self.dp
            .test_run(program, packet, 1)
            .expect("BPF_PROG_TEST_RUN")
            .0
    }

    fn counter(&self, dir: Direction, reason: Reason) -> u64 {
        maps::counters(&self.pins)
            .expect("reading counters")
            .get(&(dir, reason))
            .map_or(0, |c| c.packets)
    }

    /// Runs the packet and checks the verdict and that exactly the expected counter moved.
    #[track_caller]
    fn expect(
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

const IN: &str = prog_name::POD_INGRESS;
const OUT: &str = prog_name::POD_EGRESS;

#[test]
fn root_prog_policy_verdicts_per_protocol() {
    let mut h = Harness::new(true);
    let v4 = V4::default();
    let cases: Vec<(&str, &'static str, Vec<u8>, i32, Reason)> = vec![
        (
            "tcp from peer to 80",
            IN,
            p::ipv4(PEER, POD, p::TCP, &p::tcp(40000, 80, p::SYN), &v4),
            PASS,
            Reason::AllowedByPolicy,
        ),
        (
            "tcp from peer to 81",
            IN,
            p::ipv4(PEER, POD, p::TCP, &p::tcp(40001, 81, p::SYN), &v4),
            DROP,
            Reason::DeniedByPolicy,
        ),
        (
            "tcp from other to 80",
            IN,
            p::ipv4(OTHER, POD, p::TCP, &p::tcp(40002, 80, p::SYN), &v4),
            DROP,
            Reason::DeniedByPolicy,
        ),
        (
            "udp from peer to 53",
            IN,
            p::ipv4(PEER, POD, p::UDP, &p::udp(40003, 53), &v4),
            PASS,
            Reason::AllowedByPolicy,
        ),
        (
            "tcp from peer to 53",
            IN,
            p::ipv4(PEER, POD, p::TCP, &p::tcp(40004, 53, p::SYN), &v4),
            DROP,
            Reason::DeniedByPolicy,
        ),
        (
            "sctp from peer to 3868",
            IN,
            p::ipv4(PEER, POD, p::SCTP, &p::sctp(40005, 3868), &v4),
            PASS,
            Reason::AllowedByPolicy,
        ),
        (
            "sctp from peer to 3869",
            IN,
            p::ipv4(PEER, POD, p::SCTP, &p::sctp(40006, 3869), &v4),
            DROP,
            Reason::DeniedByPolicy,
        ),
        (
            "icmp echo from peer (port rules only)",
            IN,
            p::ipv4(PEER, POD, p::ICMP, &p::icmp_echo(8, 7), &v4),
            DROP,
            Reason::DeniedByPolicy,
        ),
        (
            "ipBlock 192.168.7.1 to 443",
            IN,
            p::ipv4(
                [192, 168, 7, 1],
                POD,
                p::TCP,
                &p::tcp(40007, 443, p::SYN),
                &v4,
            ),
            PASS,
            Reason::AllowedByPolicy,
        ),
        (
            "ipBlock except 192.168.1.1 to 443",
            IN,
            p::ipv4(
                [192, 168, 1, 1],
                POD,
                p::TCP,
                &p::tcp(40008, 443, p::SYN),
                &v4,
            ),
            DROP,
            Reason::DeniedByPolicy,
        ),
        (
            "ipv6 tcp from peer to 80",
            IN,
            p::ipv6(PEER6, POD6, p::TCP, &[], &p::tcp(40009, 80, p::SYN)),
            PASS,
            Reason::AllowedByPolicy,
        ),
        (
            "ipv6 sctp from peer to 3868",
            IN,
            p::ipv6(PEER6, POD6, p::SCTP, &[], &p::sctp(40010, 3868)),
            PASS,
            Reason::AllowedByPolicy,
        ),
        (
            "egress tcp to peer 8080",
            OUT,
            p::ipv4(POD, PEER, p::TCP, &p::tcp(40011, 8080, p::SYN), &v4),
            PASS,
            Reason::AllowedByPolicy,
        ),
        (
            "egress tcp to other 8080",
            OUT,
            p::ipv4(POD, OTHER, p::TCP, &p::tcp(40012, 8080, p::SYN), &v4),
            DROP,
            Reason::DeniedByPolicy,
        ),
        (
            "egress udp to peer 8080",
            OUT,
            p::ipv4(POD, PEER, p::UDP, &p::udp(40013, 8080), &v4),
            DROP,
            Reason::DeniedByPolicy,
        ),
    ];
    for (what, program, packet, verdict, reason) in cases {
        h.expect(what, program, &packet, verdict, reason);
    }
}

#[test]
fn root_prog_conntrack_replies_and_established() {
    let mut h = Harness::new(true);
    let v4 = V4::default();
    let syn = p::ipv4(POD, PEER, p::TCP, &p::tcp(41000, 8080, p::SYN), &v4);
    let synack = p::ipv4(
        PEER,
        POD,
        p::TCP,
        &p::tcp(8080, 41000, p::SYN | p::ACK),
        &v4,
    );
    let ack = p::ipv4(POD, PEER, p::TCP, &p::tcp(41000, 8080, p::ACK), &v4);
    let fin = p::ipv4(
        PEER,
        POD,
        p::TCP,
        &p::tcp(8080, 41000, p::FIN | p::ACK),
        &v4,
    );
    h.expect(
        "egress SYN allowed",
        OUT,
        &syn,
        PASS,
        Reason::AllowedByPolicy,
    );
    h.expect("SYN-ACK is a reply", IN, &synack, PASS, Reason::Reply);
    h.expect("ACK is established", OUT, &ack, PASS, Reason::Established);
    h.expect(
        "FIN from the peer is a reply",
        IN,
        &fin,
        PASS,
        Reason::Reply,
    );
    // The same ports the other way round are a new flow, and ingress does not allow it.
    let inbound = p::ipv4(PEER, POD, p::TCP, &p::tcp(41001, 8080, p::SYN), &v4);
    h.expect(
        "new inbound on the same port",
        IN,
        &inbound,
        DROP,
        Reason::DeniedByPolicy,
    );
    // ICMP echo: the request allowed? Egress allows only TCP 8080, so no.
    let ping = p::ipv4(POD, PEER, p::ICMP, &p::icmp_echo(8, 9), &v4);
    h.expect(
        "echo request to peer",
        OUT,
        &ping,
        DROP,
        Reason::DeniedByPolicy,
    );
    let flows = maps::conntrack(&h.pins).unwrap();
    assert_eq!(flows.len(), 1, "one tracked flow: {flows:?}");
}

#[test]
fn root_prog_malformed_and_edge_cases() {
    let mut h = Harness::new(true);
    let v4 = V4::default();
    let tcp80 = p::tcp(42000, 80, p::SYN);
    // IPv4 options: IHL 6 puts the ports 4 bytes later; reading at 20 would see the options.
    let opts = V4 {
        options: vec![1, 1, 1, 1],
        ..V4::default()
    };
    h.expect(
        "ipv4 options honoured",
        IN,
        &p::ipv4(PEER, POD, p::TCP, &tcp80, &opts),
        PASS,
        Reason::AllowedByPolicy,
    );
    let bad_ihl = V4 {
        ihl: Some(4),
        ..V4::default()
    };
    h.expect(
        "IHL below 5",
        IN,
        &p::ipv4(PEER, POD, p::TCP, &tcp80, &bad_ihl),
        DROP,
        Reason::Malformed,
    );
    // (BPF_PROG_TEST_RUN itself refuses frames shorter than Ethernet + 20 bytes, so a short
    // header is one whose own length fields are inconsistent.)
    let short = V4 {
        total_len: Some(12),
        ..V4::default()
    };
    h.expect(
        "total length below the header",
        IN,
        &p::ipv4(PEER, POD, p::TCP, &tcp80, &short),
        DROP,
        Reason::Malformed,
    );
    let mut short_l4 = p::ipv4(PEER, POD, p::TCP, &tcp80, &v4);
    short_l4.truncate(14 + 20 + 3);
    h.expect(
        "truncated tcp header",
        IN,
        &short_l4,
        DROP,
        Reason::Malformed,
    );
    let later = V4 {
        frag: 100,
        ..V4::default()
    };
    h.expect(
        "non-first fragment",
        IN,
        &p::ipv4(PEER, POD, p::TCP, &[0u8; 16], &later),
        DROP,
        Reason::Fragment,
    );
    // IPv6 extension headers are walked to the transport header.
    let ext = vec![(0u8, vec![0u8; 6]), (60u8, vec![0u8; 14])];
    h.expect(
        "ipv6 hop-by-hop + dest options",
        IN,
        &p::ipv6(PEER6, POD6, p::TCP, &ext, &tcp80),
        PASS,
        Reason::AllowedByPolicy,
    );
    let overlong: Vec<(u8, Vec<u8>)> = (0..9).map(|_| (60u8, vec![0u8; 6])).collect();
    h.expect(
        "overlong extension chain",
        IN,
        &p::ipv6(PEER6, POD6, p::TCP, &overlong, &tcp80),
        DROP,
        Reason::Malformed,
    );
    let mut cut = p::ipv6(PEER6, POD6, p::TCP, &ext, &tcp80);
    cut.truncate(14 + 40 + 4);
    h.expect("ipv6 chain cut short", IN, &cut, DROP, Reason::Malformed);
    h.expect("arp", IN, &p::arp(), PASS, Reason::Control);
    let ns = {
        let mut icmp = vec![135u8, 0, 0, 0];
        icmp.extend([0u8; 20]);
        p::ipv6(
            [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            POD6,
            p::ICMPV6,
            &[],
            &icmp,
        )
    };
    h.expect("neighbour solicitation", IN, &ns, PASS, Reason::Control);
    h.expect(
        "unknown ethertype",
        IN,
        &p::ethertype(0x88b5),
        DROP,
        Reason::UnsupportedL3,
    );
    h.expect(
        "spoofed source leaving the pod",
        OUT,
        &p::ipv4(OTHER, PEER, p::TCP, &p::tcp(1, 8080, p::SYN), &v4),
        DROP,
        Reason::Spoofed,
    );
    h.expect(
        "spoofed ipv6 source",
        OUT,
        &p::ipv6(PEER6, POD6, p::TCP, &[], &p::tcp(1, 8080, p::SYN)),
        DROP,
        Reason::Spoofed,
    );

    let mut bare = Harness::new(false);
    let pkt = p::ipv4(PEER, POD, p::TCP, &tcp80, &v4);
    bare.expect(
        "interface without endpoint",
        IN,
        &pkt,
        DROP,
        Reason::NoEndpoint,
    );
}

/// A small deterministic generator (xorshift), so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// What a reference parser says a packet is, when it is IP with a readable transport header.
fn allowed_by_reference(pkt: &[u8]) -> bool {
    // Passing without policy: ARP and IPv6 neighbour discovery / MLD.
    let ethertype = u16::from_be_bytes([pkt[12], pkt[13]]);
    if ethertype == 0x0806 {
        return true;
    }
    // The only IPv4 flows the policy allows in: from PEER to TCP 80, UDP 53, SCTP 3868, and
    // 192.168.0.0/16 minus 192.168.1.0/24 to TCP 443; never a later fragment.
    if ethertype == 0x0800 && pkt.len() >= 14 + 20 {
        let ihl = usize::from(pkt[14] & 0x0f) * 4;
        let frag_later = u16::from_be_bytes([pkt[20], pkt[21]]) & 0x1fff != 0;
        if pkt[14] >> 4 != 4 || ihl < 20 || frag_later || pkt.len() < 14 + ihl + 4 {
            return false;
        }
        let proto = pkt[23];
        let src = [pkt[26], pkt[27], pkt[28], pkt[29]];
        let dport = u16::from_be_bytes([pkt[14 + ihl + 2], pkt[14 + ihl + 3]]);
        let from_block = src[0] == 192 && src[1] == 168 && src[2] != 1;
        return (src == PEER
            && matches!(
                (proto, dport),
                (p::TCP, 80) | (p::UDP, 53) | (p::SCTP, 3868)
            ))
            || (from_block && proto == p::TCP && dport == 443);
    }
    if ethertype == 0x86dd && pkt.len() >= 14 + 40 {
        // Walk the extension headers (at most 8, as RFC 8200 chains go) to the transport.
        let (mut next, mut at) = (pkt[20], 14 + 40);
        for _ in 0..8 {
            match next {
                0 | 43 | 60 | 51 | 44 if pkt.len() >= at + 2 => {
                    let len = match next {
                        44 => 8,
                        51 => (usize::from(pkt[at + 1]) + 2) * 4,
                        _ => (usize::from(pkt[at + 1]) + 1) * 8,
                    };
                    next = pkt[at];
                    at += len;
                }
                _ => break,
            }
        }
        // Neighbour discovery and MLD pass whatever their source; anything else only from
        // PEER6 (the only IPv6 peer the policy names).
        let control =
            next == p::ICMPV6 && pkt.get(at).is_some_and(|t| matches!(t, 130..=137 | 143));
        return control || pkt[22..38] == PEER6;
    }
    false
}

#[test]
fn root_prog_fuzz_nothing_outside_allowed_flows_passes() {
    let mut h = Harness::new(true);
    let mut rng = Rng(0x5eed_1234_abcd_9876);
    let seeds: Vec<Vec<u8>> = vec![
        p::ipv4(PEER, POD, p::TCP, &p::tcp(1000, 80, p::SYN), &V4::default()),
        p::ipv4(PEER, POD, p::UDP, &p::udp(1000, 53), &V4::default()),
        p::ipv4(PEER, POD, p::SCTP, &p::sctp(1000, 3868), &V4::default()),
        p::ipv4(
            [192, 168, 2, 2],
            POD,
            p::TCP,
            &p::tcp(1000, 443, p::SYN),
            &V4::default(),
        ),
        p::ipv4(
            OTHER,
            POD,
            p::TCP,
            &p::tcp(1000, 80, p::SYN),
            &V4::default(),
        ),
        p::ipv4(
            PEER,
            POD,
            p::TCP,
            &p::tcp(1000, 80, p::SYN),
            &V4 {
                options: vec![1; 8],
                ..V4::default()
            },
        ),
    ];
    let (mut passed, mut runs, mut refused) = (0u32, 0u32, 0u32);
    let mut violations = Vec::new();
    for i in 0..100_000u32 {
        let pkt: Vec<u8> = if i % 4 == 0 {
            // Random bytes behind an IPv4 or IPv6 ethertype (at least the fixed IP header:
            // test runs refuse shorter frames).
            let v6 = rng.below(2) == 0;
            let len = if v6 { 54 } else { 34 } + rng.below(100) as usize;
            let mut b: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            let et: u16 = if v6 { 0x86dd } else { 0x0800 };
            b[12..14].copy_from_slice(&et.to_be_bytes());
            b
        } else {
            // A valid packet with a few bytes of its IP or transport headers mutated.
            let mut b = seeds[rng.below(seeds.len() as u64) as usize].clone();
            for _ in 0..1 + rng.below(3) {
                let at = 14 + rng.below((b.len() - 14) as u64) as usize;
                b[at] = rng.next() as u8;
            }
            if rng.below(8) == 0 {
                let keep = 34 + rng.below((b.len() - 34) as u64) as usize;
                b.truncate(keep);
            }
            b
        };
        let Ok((verdict, _)) = h.dp.test_run(IN, &pkt, 1) else {
            // The kernel refused the frame before any program ran (e.g. a mutated IHL past
            // the frame's end): nothing to judge.
            refused += 1;
            continue;
        };
        runs += 1;
        if verdict == PASS {
            passed += 1;
            if !allowed_by_reference(&pkt) && violations.len() < 10 {
                violations.push(format!("{pkt:02x?}"));
            }
        }
    }
    assert!(
        violations.is_empty(),
        "packets outside any allowed flow passed:\n{}",
        violations.join("\n")
    );
    // The fuzz must exercise both verdicts to mean anything.
    assert!(
        passed > 1000 && passed < runs - 1000,
        "{passed} of {runs} passed"
    );
    assert!(
        runs >= 90_000,
        "only {runs} of 100000 frames ran ({refused} refused by the kernel)"
    );
    println!(
        "fuzz: {runs} packets run ({refused} refused by test_run), {passed} passed, all inside allowed flows"
    );
}
