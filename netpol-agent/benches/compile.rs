//! Compile benchmark: 10,000 pods in 100 namespaces with 1,000 policies; time and peak heap of
//! a full compile, and the time from one pod's relabel to new map contents.
//! Run: `cargo bench -p netpol-agent --bench compile` (prints figures; no pass/fail).

use std::{
    alloc::{GlobalAlloc, Layout, System},
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    sync::atomic::{AtomicUsize, Ordering},
    time::Instant,
};

use netpol_agent::policy::{
    compile,
    desired::{diff, diff_touched, map_contents},
    model::{
        ContainerPort, Labels, Namespace, ObjectRef, Peer, Pod, Policy, PortSpec, Protocol, Rule,
        Snapshot, NAMESPACE_NAME_LABEL,
    },
    selector::LabelSelector,
    Scope,
};

/// Counts heap bytes in use and their peak.
struct Counting;
static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator; only adds bookkeeping.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let now = CURRENT.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(now, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn labels(pairs: &[(&str, String)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

/// 100 namespaces x 100 pods: 10 apps of 10 replicas each, 2 tiers; 10 policies a namespace:
/// per app, ingress from two other apps of the namespace and from a labelled namespace, on a
/// named port and a range; egress to the next app, to DNS and to an ipBlock with an except.
fn cluster() -> Snapshot {
    let mut snap = Snapshot::default();
    for n in 0..100u32 {
        let name = format!("ns{n}");
        snap.namespaces.insert(
            name.clone(),
            Namespace {
                labels: labels(&[
                    (NAMESPACE_NAME_LABEL, name.clone()),
                    ("env", format!("e{}", n % 4)),
                ]),
                name: name.clone(),
            },
        );
        for p in 0..100u32 {
            let i = n * 100 + p;
            snap.pods.push(Pod {
                id: ObjectRef::new(name.clone(), format!("pod{p}")),
                labels: labels(&[
                    ("app", format!("app{}", p % 10)),
                    ("tier", format!("t{}", p % 2)),
                ]),
                node_name: Some(format!("node{}", i % 50)),
                ips: vec![IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i + 1))],
                host_network: false,
                ports: vec![ContainerPort {
                    name: Some("http".into()),
                    port: 8080,
                    protocol: Protocol::Tcp,
                }],
            });
        }
        for a in 0..10u32 {
            let app = |k: u32| LabelSelector {
                match_labels: labels(&[("app", format!("app{}", k % 10))]),
                ..Default::default()
            };
            snap.policies.push(Policy {
                id: ObjectRef::new(name.clone(), format!("pol{a}")),
                pod_selector: app(a),
                ingress_isolates: true,
                egress_isolates: true,
                ingress: vec![
                    Rule {
                        peers: vec![
                            Peer::Pods {
                                namespaces: None,
                                pods: Some(app(a + 1)),
                            },
                            Peer::Pods {
                                namespaces: None,
                                pods: Some(app(a + 2)),
                            },
                        ],
                        ports: vec![PortSpec::Named {
                            protocol: Protocol::Tcp,
                            name: "http".into(),
                        }],
                    },
                    Rule {
                        peers: vec![Peer::Pods {
                            namespaces: Some(LabelSelector {
                                match_labels: labels(&[("env", format!("e{}", a % 4))]),
                                ..Default::default()
                            }),
                            pods: Some(app(a)),
                        }],
                        ports: vec![PortSpec::Range {
                            protocol: Protocol::Tcp,
                            first: 9000,
                            last: 9100,
                        }],
                    },
                ],
                egress: vec![
                    Rule {
                        peers: vec![Peer::Pods {
                            namespaces: None,
                            pods: Some(app(a + 1)),
                        }],
                        ports: vec![PortSpec::Range {
                            protocol: Protocol::Tcp,
                            first: 8080,
                            last: 8080,
                        }],
                    },
                    Rule {
                        peers: vec![Peer::IpBlock {
                            cidr: "172.16.0.0/12".parse().unwrap(),
                            except: vec!["172.16.5.0/24".parse().unwrap()],
                        }],
                        ports: vec![PortSpec::AllOf {
                            protocol: Protocol::Udp,
                        }],
                    },
                ],
            });
        }
    }
    snap
}

fn main() {
    let snap = cluster();
    let scope = Scope::Node("node0".into());
    println!(
        "input: {} pods, {} namespaces, {} policies; node node0 enforces {} pods",
        snap.pods.len(),
        snap.namespaces.len(),
        snap.policies.len(),
        snap.pods
            .iter()
            .filter(|p| p.node_name.as_deref() == Some("node0"))
            .count()
    );

    for (label, scope) in [
        ("node scope", scope.clone()),
        ("cluster scope (simulate)", Scope::Cluster),
    ] {
        let base = CURRENT.load(Ordering::Relaxed);
        PEAK.store(base, Ordering::Relaxed);
        let t = Instant::now();
        let compiled = compile(&snap, &scope, &[]);
        let elapsed = t.elapsed();
        let peak = PEAK.load(Ordering::Relaxed) - base;
        println!(
            "full compile, {label}: {:.1} ms, peak heap {:.1} MB; {} identities, {} classes, {} policy entries, {} cidr entries",
            elapsed.as_secs_f64() * 1e3,
            peak as f64 / 1e6,
            compiled.identities.len(),
            compiled.classes.len(),
            compiled.policy.len(),
            compiled.cidr.len()
        );
    }

    // One pod relabel to a label set no pod had: a new identity, new entries in every class
    // that selects it, a new class for the pod itself.
    let before = compile(&snap, &scope, &[]);
    let ifindex: BTreeMap<ObjectRef, u32> = before.endpoints.keys().cloned().zip(10..).collect();
    let before_maps = map_contents(&before, &ifindex);
    let mut after_snap = snap.clone();
    let target = ObjectRef::new("ns0", "pod50");
    assert!(
        before.endpoints.contains_key(&target),
        "the relabelled pod is local to node0"
    );
    let pod = after_snap.pods.iter_mut().find(|p| p.id == target).unwrap();
    pod.labels.insert("app".into(), "app1".into());
    pod.labels.insert("canary".into(), "true".into());

    let mut incremental = before.clone();
    let t = Instant::now();
    let touched = incremental
        .relabel_pod(&after_snap, &target)
        .expect("handled incrementally");
    let d = diff_touched(&incremental, &ifindex, &touched, &before_maps);
    let elapsed = t.elapsed();
    assert_eq!(
        d,
        diff(&map_contents(&incremental, &ifindex), &before_maps),
        "targeted diff is the whole diff"
    );
    println!(
        "relabel ns0/pod50 (new label set) -> new map contents, incremental: {:.2} ms, {} map changes",
        elapsed.as_secs_f64() * 1e3,
        d.changes()
    );

    let t = Instant::now();
    let full = netpol_agent::policy::compile_with(&after_snap, &scope, &[], &before.allocation);
    let full_maps = map_contents(&full, &ifindex);
    let d_full = diff(&full_maps, &before_maps);
    let elapsed = t.elapsed();
    println!(
        "same relabel, full compile keeping ids + diff (baseline): {:.1} ms, {} map changes",
        elapsed.as_secs_f64() * 1e3,
        d_full.changes()
    );
    let fresh = map_contents(&compile(&after_snap, &scope, &[]), &ifindex);
    println!(
        "same relabel, full compile with fresh ids (what stable ids avoid): {} map changes",
        diff(&fresh, &before_maps).changes()
    );
}
