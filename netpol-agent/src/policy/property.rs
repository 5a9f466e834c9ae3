//! Property test: for random pods and policies, what the compiled map contents allow (looked up
//! as the kernel does) equals a direct, obviously-correct reading of the NetworkPolicy spec,
//! written here separately from the compiler.

use std::{collections::BTreeMap, net::IpAddr};

use ipnet::IpNet;
use netpol_common::Direction;
use proptest::prelude::*;

use super::{
    compile::{compile, Scope},
    desired::{diff, diff_touched, map_contents},
    evaluate::Flow,
    model::{
        ContainerPort, Labels, Namespace, ObjectRef, Peer, Pod, Policy, PortSpec, Protocol, Rule,
        Snapshot, NAMESPACE_NAME_LABEL,
    },
    selector::{LabelSelector, Operator, Requirement},
};

// ---- The reference: the spec, read directly. ----

fn peer_matches(snap: &Snapshot, policy_ns: &str, peers: &[Peer], peer: &Pod) -> bool {
    peers.is_empty()
        || peers.iter().any(|p| match p {
            Peer::Pods { namespaces, pods } => {
                let ns_ok = match namespaces {
                    None => peer.id.namespace == policy_ns,
                    Some(sel) => sel.matches(&snap.namespace_labels(&peer.id.namespace)),
                };
                ns_ok && pods.as_ref().is_none_or(|s| s.matches(&peer.labels))
            }
            IpBlock { cidr, except } => {
                let ip = peer.ips[0];
                cidr.contains(&ip) && !except.iter().any(|e| e.contains(&ip))
            }
        })
}
use Peer::IpBlock;

/// Whether a rule's ports admit (proto, port) on `dst`, whose names resolve the named ports.
fn port_matches(ports: &[PortSpec], dst: &Pod, proto: Protocol, port: u16) -> bool {
    ports.is_empty()
        || ports.iter().any(|p| match p {
            PortSpec::Range {
                protocol,
                first,
                last,
            } => *protocol == proto && (*first..=*last).contains(&port),
            PortSpec::Named { protocol, name } => {
                *protocol == proto && dst.named_port(name, proto) == Some(port)
            }
            PortSpec::AllOf { protocol } => *protocol == proto,
        })
}

/// `at`'s side of a connection from `src` to `dst`.
fn reference_side(
    snap: &Snapshot,
    dir: Direction,
    src: &Pod,
    dst: &Pod,
    proto: Protocol,
    port: u16,
) -> bool {
    let (at, peer) = match dir {
        Direction::Ingress => (dst, src),
        Direction::Egress => (src, dst),
    };
    let selecting: Vec<&Policy> = snap
        .policies
        .iter()
        .filter(|p| p.id.namespace == at.id.namespace && p.pod_selector.matches(&at.labels))
        .filter(|p| match dir {
            Direction::Ingress => p.ingress_isolates,
            Direction::Egress => p.egress_isolates,
        })
        .collect();
    if selecting.is_empty() {
        return true;
    }
    selecting.iter().any(|p| {
        let rules = match dir {
            Direction::Ingress => &p.ingress,
            Direction::Egress => &p.egress,
        };
        rules.iter().any(|r| {
            peer_matches(snap, &p.id.namespace, &r.peers, peer)
                && port_matches(&r.ports, dst, proto, port)
        })
    })
}

// ---- Random clusters. ----

fn labels_strategy() -> impl Strategy<Value = Labels> {
    (prop::option::of(0..3u8), prop::option::of(0..2u8)).prop_map(|(app, tier)| {
        let mut l = Labels::new();
        if let Some(a) = app {
            l.insert("app".into(), format!("a{a}"));
        }
        if let Some(t) = tier {
            l.insert("tier".into(), format!("t{t}"));
        }
        l
    })
}

fn selector_strategy() -> impl Strategy<Value = LabelSelector> {
    prop_oneof![
        Just(LabelSelector::everything()),
        (0..3u8).prop_map(|a| LabelSelector {
            match_labels: Labels::from([("app".into(), format!("a{a}"))]),
            ..Default::default()
        }),
        (0..4u8, 0..2u8).prop_map(|(op, t)| {
            let operator = [
                Operator::In,
                Operator::NotIn,
                Operator::Exists,
                Operator::DoesNotExist,
            ][op as usize];
            let values = match operator {
                Operator::In | Operator::NotIn => [format!("t{t}")].into(),
                _ => Default::default(),
            };
            LabelSelector {
                match_labels: Labels::new(),
                match_expressions: vec![Requirement {
                    key: "tier".into(),
                    operator,
                    values,
                }],
            }
        }),
    ]
}

fn ns_selector_strategy() -> impl Strategy<Value = LabelSelector> {
    prop_oneof![
        Just(LabelSelector::everything()),
        (0..2u8).prop_map(|z| LabelSelector {
            match_labels: Labels::from([("zone".into(), format!("z{z}"))]),
            ..Default::default()
        }),
        (0..3u8).prop_map(|n| LabelSelector {
            match_labels: Labels::from([(NAMESPACE_NAME_LABEL.into(), format!("n{n}"))]),
            ..Default::default()
        }),
    ]
}

fn peer_strategy() -> impl Strategy<Value = Peer> {
    prop_oneof![
        (
            prop::option::of(ns_selector_strategy()),
            selector_strategy()
        )
            .prop_map(|(namespaces, pods)| Peer::Pods {
                namespaces,
                pods: Some(pods)
            }),
        ns_selector_strategy().prop_map(|n| Peer::Pods {
            namespaces: Some(n),
            pods: None
        }),
        // Blocks over the pods' 10.0.0.0/28, with holes that may cut out some pods.
        (0..3u8, prop::option::of((0..16u8, 30..33u8))).prop_map(|(b, hole)| {
            let cidr: IpNet = ["10.0.0.0/28", "10.0.0.0/29", "0.0.0.0/0"][b as usize]
                .parse()
                .unwrap();
            let except = hole
                .map(|(h, len)| {
                    IpNet::new(IpAddr::from([10, 0, 0, h]), len)
                        .unwrap()
                        .trunc()
                })
                .filter(|e| cidr.contains(e) && e.prefix_len() > cidr.prefix_len())
                .into_iter()
                .collect();
            Peer::IpBlock { cidr, except }
        }),
    ]
}

fn port_strategy() -> impl Strategy<Value = PortSpec> {
    let proto = prop_oneof![Just(Protocol::Tcp), Just(Protocol::Udp)];
    prop_oneof![
        (
            proto.clone(),
            prop_oneof![Just(80u16), Just(81), Just(53), Just(8080)]
        )
            .prop_map(|(protocol, p)| PortSpec::Range {
                protocol,
                first: p,
                last: p
            }),
        (proto.clone(), 70..90u16, 0..20u16).prop_map(|(protocol, first, w)| PortSpec::Range {
            protocol,
            first,
            last: first + w
        }),
        (
            proto.clone(),
            prop_oneof![Just("http"), Just("dns"), Just("alt")]
        )
            .prop_map(|(protocol, n)| PortSpec::Named {
                protocol,
                name: n.into()
            }),
        proto.prop_map(|protocol| PortSpec::AllOf { protocol }),
    ]
}

fn rule_strategy() -> impl Strategy<Value = Rule> {
    (
        prop::collection::vec(peer_strategy(), 0..3),
        prop::collection::vec(port_strategy(), 0..3),
    )
        .prop_map(|(peers, ports)| Rule { peers, ports })
}

fn policy_strategy() -> impl Strategy<Value = (u8, LabelSelector, u8, Vec<Rule>, Vec<Rule>)> {
    (
        0..3u8,
        selector_strategy(),
        0..4u8,
        prop::collection::vec(rule_strategy(), 0..3),
        prop::collection::vec(rule_strategy(), 0..3),
    )
}

fn pod_ports_strategy() -> impl Strategy<Value = Vec<ContainerPort>> {
    // "http" is 80 on some pods and 81 on others; "dns" is UDP 53; "alt" TCP 8080 or absent.
    (prop::bool::ANY, prop::bool::ANY).prop_map(|(http81, alt)| {
        let mut ports = vec![
            ContainerPort {
                name: Some("http".into()),
                port: if http81 { 81 } else { 80 },
                protocol: Protocol::Tcp,
            },
            ContainerPort {
                name: Some("dns".into()),
                port: 53,
                protocol: Protocol::Udp,
            },
        ];
        if alt {
            ports.push(ContainerPort {
                name: Some("alt".into()),
                port: 8080,
                protocol: Protocol::Tcp,
            });
        }
        ports
    })
}

fn snapshot_strategy() -> impl Strategy<Value = Snapshot> {
    (
        prop::collection::vec((0..3u8, labels_strategy(), pod_ports_strategy()), 2..7),
        prop::collection::vec(policy_strategy(), 0..5),
        prop::collection::vec(0..2u8, 3),
    )
        .prop_map(|(pods, policies, zones)| {
            let mut snap = Snapshot::default();
            for (n, zone) in zones.iter().enumerate() {
                let name = format!("n{n}");
                let labels = Labels::from([
                    ("zone".to_string(), format!("z{zone}")),
                    (NAMESPACE_NAME_LABEL.to_string(), name.clone()),
                ]);
                snap.namespaces
                    .insert(name.clone(), Namespace { name, labels });
            }
            for (i, (ns, labels, ports)) in pods.into_iter().enumerate() {
                snap.pods.push(Pod {
                    id: ObjectRef::new(format!("n{ns}"), format!("p{i}")),
                    labels,
                    node_name: Some("node".into()),
                    ips: vec![IpAddr::from([10, 0, 0, i as u8 + 1])],
                    host_network: false,
                    ports,
                });
            }
            for (i, (ns, pod_selector, types, ingress, egress)) in policies.into_iter().enumerate()
            {
                snap.policies.push(Policy {
                    id: ObjectRef::new(format!("n{ns}"), format!("pol{i}")),
                    pod_selector,
                    ingress_isolates: types != 1,
                    egress_isolates: types >= 1,
                    ingress,
                    egress,
                });
            }
            snap
        })
}

const PROBES: [(Protocol, u16); 6] = [
    (Protocol::Tcp, 80),
    (Protocol::Tcp, 81),
    (Protocol::Tcp, 8080),
    (Protocol::Udp, 53),
    (Protocol::Udp, 80),
    (Protocol::Tcp, 9999),
];

/// Every (pod, direction, peer, probe) of the compiled contents against the reference.
fn check_against_spec(snap: &Snapshot, compiled: &super::Compiled) -> Result<(), TestCaseError> {
    let pods: BTreeMap<&ObjectRef, &Pod> = snap.pods.iter().map(|p| (&p.id, p)).collect();
    for src in pods.values() {
        for dst in pods.values() {
            if src.id == dst.id {
                continue;
            }
            for (proto, port) in PROBES {
                for dir in Direction::ALL {
                    let (at, peer) = match dir {
                        Direction::Ingress => (dst, src),
                        Direction::Egress => (src, dst),
                    };
                    let flow = Flow {
                        peer: peer.ips[0],
                        proto: proto.number(),
                        port,
                    };
                    let got = compiled
                        .evaluate(&at.id, dir, flow)
                        .expect("endpoint")
                        .allowed;
                    let want = reference_side(snap, dir, src, dst, proto, port);
                    prop_assert_eq!(
                        got,
                        want,
                        "{:?} at {} peer {} {}:{}",
                        dir,
                        at.id,
                        peer.id,
                        proto,
                        port
                    );
                }
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]
    #[test]
    fn compiled_maps_agree_with_the_spec(snap in snapshot_strategy()) {
        check_against_spec(&snap, &compile(&snap, &Scope::Cluster, &[]))?;
    }

    /// The incremental relabel path ends where the spec says, and so does a full compile
    /// that keeps the previous ids; both keep every unchanged identity's id.
    #[test]
    fn relabel_paths_agree_with_the_spec(
        snap in snapshot_strategy(),
        which in 0..7usize,
        labels in labels_strategy(),
    ) {
        let mut compiled = compile(&snap, &Scope::Cluster, &[]);
        let ifindex: BTreeMap<ObjectRef, u32> = compiled.endpoints.keys().cloned().zip(1..).collect();
        let before = map_contents(&compiled, &ifindex);
        let mut after = snap.clone();
        let i = which % after.pods.len();
        after.pods[i].labels = labels;
        let pod = after.pods[i].id.clone();
        let touched = compiled.relabel_pod(&after, &pod).expect("a relabel is handled incrementally");
        check_against_spec(&after, &compiled)?;
        // The targeted diff is the whole diff.
        prop_assert_eq!(
            diff_touched(&compiled, &ifindex, &touched, &before),
            diff(&map_contents(&compiled, &ifindex), &before)
        );

        let full = super::compile_with(&after, &Scope::Cluster, &[], &compile(&snap, &Scope::Cluster, &[]).allocation);
        check_against_spec(&after, &full)?;
        for (p, id) in &compile(&snap, &Scope::Cluster, &[]).pod_identity {
            if p != &pod {
                prop_assert_eq!(full.pod_identity[p], *id, "identity of {} kept", p);
            }
        }
    }
}
