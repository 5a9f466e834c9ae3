//! Kernel test of the route keeper (`netpol_agent::node::routes`), run inside a lab node's
//! network namespace the way the agent runs it on a host: routes to other nodes' pod CIDRs via
//! their InternalIP under netpol's protocol (78), updated and removed as Nodes change, other
//! routes untouched, and a sync with nothing changed changes nothing. Needs root (the lab
//! refuses to start without it) and fails with a message, never passes silently.

use std::net::IpAddr;

use netpol_agent::node::{
    routes::{self, Route, SyncReport},
    NodeNet,
};
use netpol_tests::lab::{ClusterOptions, Lab, LabNode, LabSpec};

const SPEC: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: default}
spec: {nodeName: node-a, containers: [{name: c, ports: [{containerPort: 8080}]}]}
"#;

fn node(name: &str, cidr: &str, address: &str) -> NodeNet {
    NodeNet {
        name: name.into(),
        pod_cidrs: vec![cidr.parse().unwrap()],
        addresses: vec![address.parse().unwrap()],
    }
}

/// `ip route show` of the node (main table, IPv4), line by line.
fn table(node: &LabNode<'_>) -> Vec<String> {
    let out = node
        .node_command("ip")
        .args(["-4", "route", "show"])
        .output()
        .expect("ip route show");
    assert!(out.status.success(), "ip route show in {}", node.netns());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().to_string())
        .collect()
}

fn sync(node: &LabNode<'_>, me: &str, nodes: &[NodeNet]) -> SyncReport {
    let want = routes::plan(me, nodes);
    node.in_node(|| routes::sync(&want))
        .expect("entering the node")
        .unwrap_or_else(|e| panic!("sync {want:?}: {:#}", anyhow::Error::from(e)))
}

fn ours(node: &LabNode<'_>) -> Vec<Route> {
    let mut routes = node
        .in_node(routes::installed)
        .expect("entering the node")
        .expect("ip route show proto 78");
    routes.sort();
    routes
}

fn route(dst: &str, via: &str) -> Route {
    Route {
        dst: dst.parse().unwrap(),
        via: via.parse::<IpAddr>().unwrap(),
    }
}

#[test]
fn root_route_keeper_syncs_other_nodes_pod_cidrs_in_a_lab_node() {
    let spec = LabSpec::from_yaml_str(SPEC).expect("spec parses");
    let lab = Lab::start_cluster(&spec, ClusterOptions::two_nodes())
        .expect("lab starts (needs root, network namespaces and /usr/lib/cni)");
    let a = lab.node("node-a").expect("node-a");
    let me = a.name().to_string();
    // Not ours: the lab's own route to node-b's pods (proto boot), and a static one.
    let added = a
        .node_command("ip")
        .args([
            "route",
            "add",
            "10.251.0.0/24",
            "via",
            "172.18.0.30",
            "proto",
            "static",
        ])
        .status()
        .expect("ip route add");
    assert!(added.success(), "adding a foreign route");
    let foreign: Vec<String> = table(&a)
        .into_iter()
        .filter(|l| l.starts_with("10.244.2.0/24") || l.starts_with("10.251.0.0/24"))
        .collect();
    assert_eq!(
        foreign.len(),
        2,
        "both foreign routes are there: {foreign:?}"
    );
    let foreign_kept = |when: &str| {
        let now = table(&a);
        for line in &foreign {
            assert!(
                now.contains(line),
                "{when}: {line:?} untouched; table:\n{now:#?}"
            );
        }
    };

    // Our own CIDR never gets a route; each other node's does, via its InternalIP.
    let mut nodes = vec![
        node(&me, "10.244.1.0/24", "172.18.0.2"),
        node("w1", "10.250.1.0/24", "172.18.0.11"),
        node("w2", "10.250.2.0/24", "172.18.0.12"),
    ];
    let report = sync(&a, &me, &nodes);
    assert_eq!(
        report,
        SyncReport {
            replaced: 2,
            removed: 0
        }
    );
    assert_eq!(
        ours(&a),
        [
            route("10.250.1.0/24", "172.18.0.11"),
            route("10.250.2.0/24", "172.18.0.12")
        ]
    );
    let table_after_first = table(&a);
    assert!(
        table_after_first
            .iter()
            .any(|l| l.starts_with("10.250.1.0/24 via 172.18.0.11 dev eth0 proto 78")),
        "installed under proto 78 on the node link:\n{table_after_first:#?}"
    );
    foreign_kept("first sync");

    // Nothing changed: nothing done, the table is the same.
    assert_eq!(sync(&a, &me, &nodes), SyncReport::default());
    assert_eq!(
        table(&a),
        table_after_first,
        "a second sync changes nothing"
    );

    // w1 moved to another address, w2 left, w3 joined.
    nodes[1] = node("w1", "10.250.1.0/24", "172.18.0.21");
    nodes[2] = node("w3", "10.250.3.0/24", "172.18.0.13");
    let report = sync(&a, &me, &nodes);
    assert_eq!(
        report,
        SyncReport {
            replaced: 2,
            removed: 1
        },
        "w1 replaced, w3 added, w2 removed"
    );
    assert_eq!(
        ours(&a),
        [
            route("10.250.1.0/24", "172.18.0.21"),
            route("10.250.3.0/24", "172.18.0.13")
        ]
    );
    foreign_kept("after changes");
    assert_eq!(sync(&a, &me, &nodes), SyncReport::default(), "stable again");

    // Every other node gone: every route of ours goes, nothing else.
    let report = sync(&a, &me, &nodes[..1]);
    assert_eq!(
        report,
        SyncReport {
            replaced: 0,
            removed: 2
        }
    );
    assert!(ours(&a).is_empty());
    foreign_kept("after removing all");
}
