//! The kernel against `simulate`: the datapath makes only the lookups a class has entries for
//! (`NP_CLASSES`) and splits entries between a hash map and a port-range trie; `simulate`
//! answers from the compiled entries the way one longest-prefix match over all of them would.
//! Every flow below gets the same verdict from both, for classes with few kinds of entry (the
//! base cluster) and with every kind (the extra policies).

use std::net::{IpAddr, Ipv4Addr};

use netpol_agent::policy::{evaluate::Flow, model::ObjectRef};
use netpol_common::Direction;
use netpol_tests::packet::{self as p, V4};

use crate::harness::*;

/// Every kind of entry for the pod's ingress and egress classes: a port range, every port of a
/// protocol, every protocol, any peer, an ipBlock, and a whole port.
pub const EVERY_SHAPE: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: shapes, namespace: t}
spec:
  podSelector: {matchLabels: {role: pod}}
  policyTypes: [Ingress, Egress]
  ingress:
    - from: [{podSelector: {matchLabels: {role: peer}}}]
      ports: [{port: 1000, endPort: 1999}, {protocol: UDP}]
    - from: [{podSelector: {matchLabels: {role: other}}}]
    - ports: [{port: 7000}]
    - from: [{ipBlock: {cidr: 172.16.0.0/12}}]
      ports: [{port: 5000, endPort: 5003, protocol: SCTP}]
  egress:
    - to: [{podSelector: {matchLabels: {role: other}}}]
      ports: [{protocol: TCP}]
    - to: [{ipBlock: {cidr: 192.168.0.0/16}}]
    - ports: [{port: 30000, endPort: 30100, protocol: UDP}]
"#;

const PEERS: [[u8; 4]; 6] = [
    PEER,
    OTHER,
    [192, 168, 2, 5],
    [192, 168, 1, 5],
    [172, 16, 3, 4],
    [203, 0, 113, 9],
];

const PORTS: [u16; 16] = [
    0, 53, 80, 443, 999, 1000, 1500, 1999, 2000, 5000, 5003, 5004, 7000, 8080, 30050, 30101,
];

const PROTOS: [u8; 4] = [p::TCP, p::UDP, p::SCTP, p::ICMP];

fn l4(proto: u8, sport: u16, dport: u16) -> Vec<u8> {
    match proto {
        p::TCP => p::tcp(sport, dport, p::SYN),
        p::UDP => p::udp(sport, dport),
        p::SCTP => p::sctp(sport, dport),
        // An echo request, identified by the source port: policy sees destination port 0.
        _ => p::icmp_echo(8, sport),
    }
}

/// Runs every (peer, protocol, port) both ways and compares with `simulate`; returns how many
/// flows each verdict had, so the caller can check both occurred.
fn check(h: &mut Harness) -> (usize, usize) {
    let pod = ObjectRef::new("t", "pod");
    let (mut allowed, mut denied) = (0, 0);
    // A fresh source port per packet: no packet meets another's conntrack entry.
    let mut sport = 20000u16;
    for peer in PEERS {
        for proto in PROTOS {
            for port in PORTS {
                for dir in [Direction::Ingress, Direction::Egress] {
                    sport += 1;
                    let (program, packet) = match dir {
                        Direction::Ingress => (
                            IN,
                            p::ipv4(peer, POD, proto, &l4(proto, sport, port), &V4::default()),
                        ),
                        Direction::Egress => (
                            OUT,
                            p::ipv4(POD, peer, proto, &l4(proto, sport, port), &V4::default()),
                        ),
                    };
                    let flow = Flow {
                        peer: IpAddr::V4(Ipv4Addr::from(peer)),
                        proto,
                        port: if proto == p::ICMP { 0 } else { port },
                    };
                    let expected = h
                        .compiled
                        .evaluate(&pod, dir, flow)
                        .expect("the pod is an endpoint")
                        .allowed;
                    let got = h.run(program, &packet);
                    assert_eq!(
                        got,
                        if expected { PASS } else { DROP },
                        "{dir:?} peer {peer:?} proto {proto} port {port}: kernel {got}, simulate \
                         allowed={expected}"
                    );
                    if expected {
                        allowed += 1;
                    } else {
                        denied += 1;
                    }
                }
            }
        }
    }
    (allowed, denied)
}

#[test]
fn root_prog_kernel_agrees_with_simulate_on_every_kind_of_entry() {
    let mut base = Harness::new(true);
    let (allowed, denied) = check(&mut base);
    assert!(
        allowed > 0 && denied > 0,
        "{allowed} allowed, {denied} denied"
    );
    drop(base);

    let mut every = Harness::with(true, EVERY_SHAPE);
    let (allowed, denied) = check(&mut every);
    assert!(
        allowed > 0 && denied > 0,
        "{allowed} allowed, {denied} denied"
    );
}
