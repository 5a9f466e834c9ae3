//! `netpol-agent simulate`: reachability between pods, read from the same compiled map contents
//! the kernel receives (cluster-wide: every pod is an endpoint), looked up the way the datapath
//! looks them up. Pure: no kernel, no I/O.

use std::{collections::BTreeSet, fmt::Write as _, net::IpAddr};

use netpol_common::Direction;
use serde::Serialize;

use crate::policy::{
    compile,
    evaluate::Flow,
    model::{ObjectRef, Pod, Protocol, Snapshot},
    Compiled, Scope,
};

/// Which probes to evaluate.
#[derive(Clone, Debug, Default)]
pub struct Query {
    pub from: Option<ObjectRef>,
    pub to: Option<ObjectRef>,
    /// None: every container port of the destination.
    pub port: Option<u16>,
    pub protocol: Option<Protocol>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DirectionResult {
    pub isolated: bool,
    pub allowed_by: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SimResult {
    pub from: String,
    pub to: String,
    pub port: u16,
    pub protocol: String,
    pub allowed: bool,
    pub egress: DirectionResult,
    pub ingress: DirectionResult,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Simulation {
    pub results: Vec<SimResult>,
}

pub fn simulate(snapshot: &Snapshot, query: &Query) -> Simulation {
    let compiled = compile(snapshot, &Scope::Cluster, &[]);
    let pods: Vec<&Pod> = snapshot.pods.iter().filter(|p| !p.ips.is_empty()).collect();
    let mut results = Vec::new();
    for from in &pods {
        if query.from.as_ref().is_some_and(|f| *f != from.id) {
            continue;
        }
        for to in &pods {
            if from.id == to.id || query.to.as_ref().is_some_and(|t| *t != to.id) {
                continue;
            }
            for (port, protocol) in probes(to, query) {
                results.push(evaluate_pair(&compiled, from, to, port, protocol));
            }
        }
    }
    Simulation { results }
}

/// The (port, protocol) pairs probed on a destination.
fn probes(to: &Pod, query: &Query) -> Vec<(u16, Protocol)> {
    match query.port {
        Some(port) => vec![(port, query.protocol.unwrap_or(Protocol::Tcp))],
        None => {
            let set: BTreeSet<(u16, Protocol)> = to
                .ports
                .iter()
                .filter(|p| query.protocol.is_none_or(|q| q == p.protocol))
                .map(|p| (p.port, p.protocol))
                .collect();
            set.into_iter().collect()
        }
    }
}

/// Addresses the two pods would talk over: the destination's first address and a source
/// address of the same family.
fn addresses(from: &Pod, to: &Pod) -> (IpAddr, IpAddr) {
    let dst = to.ips[0];
    let src = from
        .ips
        .iter()
        .copied()
        .find(|ip| ip.is_ipv4() == dst.is_ipv4())
        .unwrap_or(from.ips[0]);
    (src, dst)
}

fn evaluate_pair(
    compiled: &Compiled,
    from: &Pod,
    to: &Pod,
    port: u16,
    protocol: Protocol,
) -> SimResult {
    let (src, dst) = addresses(from, to);
    let side = |pod: &ObjectRef, dir: Direction, peer: IpAddr| {
        let flow = Flow {
            peer,
            proto: protocol.number(),
            port,
        };
        // Pods that are not endpoints (host network) are not enforced: open both ways.
        match compiled.evaluate(pod, dir, flow) {
            Some(v) => (
                v.allowed,
                DirectionResult {
                    isolated: v.isolated,
                    allowed_by: v.allowed_by.iter().map(ToString::to_string).collect(),
                },
            ),
            None => (
                true,
                DirectionResult {
                    isolated: false,
                    allowed_by: Vec::new(),
                },
            ),
        }
    };
    let (egress_ok, egress) = side(&from.id, Direction::Egress, dst);
    let (ingress_ok, ingress) = side(&to.id, Direction::Ingress, src);
    SimResult {
        from: from.id.to_string(),
        to: to.id.to_string(),
        port,
        protocol: protocol.name().to_string(),
        allowed: egress_ok && ingress_ok,
        egress,
        ingress,
    }
}

/// A matrix like the upstream e2e tests print: sources down, destinations (with port and
/// protocol) across, '.' allowed, 'X' denied.
pub fn render_table(sim: &Simulation) -> String {
    let mut rows: Vec<&str> = Vec::new();
    let mut cols: Vec<String> = Vec::new();
    for r in &sim.results {
        if !rows.contains(&r.from.as_str()) {
            rows.push(&r.from);
        }
        let col = format!("{}:{}/{}", r.to, r.port, r.protocol);
        if !cols.contains(&col) {
            cols.push(col);
        }
    }
    let row_w = rows.iter().map(|r| r.len()).max().unwrap_or(1).max(1) + 2;
    let mut s = String::new();
    let _ = writeln!(s, "'.' allowed, 'X' denied; columns are destinations");
    for (i, c) in cols.iter().enumerate() {
        let _ = writeln!(s, "  [{i}] {c}");
    }
    let _ = write!(s, "{:<row_w$}", "-");
    for i in 0..cols.len() {
        let _ = write!(s, "{:>4}", format!("[{i}]"));
    }
    s.push('\n');
    for row in rows {
        let _ = write!(s, "{row:<row_w$}");
        for col in &cols {
            let cell = sim
                .results
                .iter()
                .find(|r| r.from == row && format!("{}:{}/{}", r.to, r.port, r.protocol) == *col);
            let mark = match cell {
                None => "-",
                Some(r) if r.allowed => ".",
                Some(_) => "X",
            };
            let _ = write!(s, "{mark:>4}");
        }
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::file::add_documents;

    fn snapshot(text: &str) -> Snapshot {
        let mut snap = Snapshot::default();
        let mut errors = Vec::new();
        add_documents("t.yaml".as_ref(), text, &mut snap, &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        snap
    }

    const INPUT: &str = r#"
{apiVersion: v1, kind: Pod, metadata: {name: a, namespace: n, labels: {r: a}}, spec: {containers: [{name: c, ports: [{containerPort: 80}]}]}, status: {podIP: 10.0.0.1}}
---
{apiVersion: v1, kind: Pod, metadata: {name: b, namespace: n, labels: {r: b}}, spec: {containers: [{name: c, ports: [{containerPort: 80}, {containerPort: 53, protocol: UDP}]}]}, status: {podIP: 10.0.0.2}}
---
{apiVersion: networking.k8s.io/v1, kind: NetworkPolicy, metadata: {name: p, namespace: n},
 spec: {podSelector: {matchLabels: {r: b}}, ingress: [{from: [{podSelector: {matchLabels: {r: a}}}], ports: [{port: 80}]}]}}
"#;

    #[test]
    fn json_shape_and_verdicts() {
        let sim = simulate(&snapshot(INPUT), &Query::default());
        let json = serde_json::to_value(&sim).unwrap();
        let expected = serde_json::json!({"results": [
            {"from": "n/a", "to": "n/b", "port": 53, "protocol": "UDP", "allowed": false,
             "egress": {"isolated": false, "allowed_by": []},
             "ingress": {"isolated": true, "allowed_by": []}},
            {"from": "n/a", "to": "n/b", "port": 80, "protocol": "TCP", "allowed": true,
             "egress": {"isolated": false, "allowed_by": []},
             "ingress": {"isolated": true, "allowed_by": ["n/p#ingress[0]"]}},
            {"from": "n/b", "to": "n/a", "port": 80, "protocol": "TCP", "allowed": true,
             "egress": {"isolated": false, "allowed_by": []},
             "ingress": {"isolated": false, "allowed_by": []}},
        ]});
        assert_eq!(json, expected);
    }

    #[test]
    fn filters_and_table() {
        let q = Query {
            from: Some(ObjectRef::new("n", "a")),
            port: Some(8080),
            ..Default::default()
        };
        let sim = simulate(&snapshot(INPUT), &q);
        assert_eq!(sim.results.len(), 1);
        assert_eq!(
            (sim.results[0].to.as_str(), sim.results[0].allowed),
            ("n/b", false)
        );
        let table = render_table(&simulate(&snapshot(INPUT), &Query::default()));
        assert!(table.contains("[1] n/b:80/TCP"), "{table}");
        assert!(
            table
                .lines()
                .any(|l| l.starts_with("n/a") && l.contains('X') && l.contains('.')),
            "{table}"
        );
    }
}
