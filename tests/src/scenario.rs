//! Connectivity matrices: probe every pod's every port from every other pod, print the result
//! the way the upstream NetworkPolicy e2e tests do ('.' open, 'X' closed), and compare it with
//! an expectation. The demo and the end-to-end tests share this.

use std::fmt::Write as _;

use crate::lab::{Lab, Probe, ProbeKind, ProbeOutcome, Protocol};

/// One probe of the matrix and its outcome.
#[derive(Clone, Debug)]
pub struct Cell {
    pub from: String,
    /// `ns/pod`.
    pub to: String,
    pub port: u16,
    pub kind: ProbeKind,
    pub outcome: ProbeOutcome,
}

impl Cell {
    pub fn column(&self) -> String {
        let pod = self.to.rsplit('/').next().unwrap_or(&self.to);
        let kind = match self.kind {
            ProbeKind::Http => "curl",
            ProbeKind::TcpConnect => "telnet",
            ProbeKind::Udp => "udp",
        };
        format!("{pod}:{}/{kind}", self.port)
    }
}

pub struct Matrix {
    pub rows: Vec<String>,
    pub columns: Vec<String>,
    pub cells: Vec<Cell>,
}

/// The probe a user would make: curl for ports named `http`, a telnet-style connect for other
/// TCP ports, a UDP request/response for UDP.
fn kind_for(protocol: Protocol, name: Option<&str>) -> Option<ProbeKind> {
    match protocol {
        Protocol::Tcp if name == Some("http") => Some(ProbeKind::Http),
        Protocol::Tcp => Some(ProbeKind::TcpConnect),
        Protocol::Udp => Some(ProbeKind::Udp),
        Protocol::Sctp => None,
    }
}

/// Probes every (pod, other pod, port) in parallel.
pub fn probe_matrix(lab: &Lab) -> Matrix {
    let pods: Vec<_> = lab.pods().collect();
    let mut probes = Vec::new();
    let mut meta = Vec::new();
    let mut columns = Vec::new();
    for to in &pods {
        for port in &to.ports {
            let Some(kind) = kind_for(port.protocol, port.name.as_deref()) else {
                continue;
            };
            let to_id = format!("{}/{}", to.namespace, to.name);
            for from in &pods {
                if from.namespace == to.namespace && from.name == to.name {
                    continue;
                }
                probes.push(Probe::new(
                    (&from.namespace, &from.name),
                    to.ip,
                    port.port,
                    kind,
                ));
                meta.push((
                    format!("{}/{}", from.namespace, from.name),
                    to_id.clone(),
                    port.port,
                    kind,
                ));
            }
            let col = Cell {
                from: String::new(),
                to: to_id,
                port: port.port,
                kind,
                outcome: ProbeOutcome::Connected,
            }
            .column();
            columns.push(col);
        }
    }
    let outcomes = lab.probe_all(&probes);
    let cells = meta
        .into_iter()
        .zip(outcomes)
        .map(|((from, to, port, kind), outcome)| Cell {
            from,
            to,
            port,
            kind,
            outcome,
        })
        .collect();
    Matrix {
        rows: pods
            .iter()
            .map(|p| format!("{}/{}", p.namespace, p.name))
            .collect(),
        columns,
        cells,
    }
}

impl Matrix {
    pub fn cell(&self, from: &str, to: &str, port: u16) -> Option<&Cell> {
        self.cells
            .iter()
            .find(|c| c.from == from && c.to == to && c.port == port)
    }

    pub fn render(&self) -> String {
        let width = self
            .columns
            .iter()
            .map(String::len)
            .max()
            .unwrap_or(4)
            .max(6)
            + 2;
        let row_width = self.rows.iter().map(String::len).max().unwrap_or(4).max(10) + 2;
        let mut s = String::new();
        let _ = write!(s, "{:<row_width$}", "from \\ to");
        for c in &self.columns {
            let _ = write!(s, "{c:^width$}");
        }
        s.push('\n');
        for row in &self.rows {
            let _ = write!(s, "{row:<row_width$}");
            for col in &self.columns {
                let cell = self
                    .cells
                    .iter()
                    .find(|c| &c.from == row && &c.column() == col);
                let mark = match cell {
                    None => "-",
                    Some(c) if c.outcome.is_open() => ".",
                    Some(_) => "X",
                };
                let _ = write!(s, "{mark:^width$}");
            }
            s.push('\n');
        }
        s
    }

    /// Cells whose openness differs from `expect(from, to, port)`, described.
    pub fn mismatches(&self, expect: impl Fn(&str, &str, u16) -> bool) -> Vec<String> {
        self.cells
            .iter()
            .filter(|c| c.outcome.is_open() != expect(&c.from, &c.to, c.port))
            .map(|c| {
                format!(
                    "{} -> {}:{} expected {}, got {}",
                    c.from,
                    c.to,
                    c.port,
                    if expect(&c.from, &c.to, c.port) {
                        "open"
                    } else {
                        "closed"
                    },
                    c.outcome
                )
            })
            .collect()
    }
}

/// The seed tutorial's expectation once `deploy/examples` is applied: frontend -> backend:5678
/// and backend -> db:3306 open; frontend -> db, backend -> frontend and db -> anything closed.
/// Nobody else reaches backend or db; anyone may reach frontend:80 (it allows ingress from
/// anywhere, but the sources' egress policies decide).
pub fn three_tier_expected(from: &str, to: &str, port: u16) -> bool {
    let pod = |id: &str| id.rsplit('/').next().unwrap_or(id).to_string();
    matches!(
        (pod(from).as_str(), pod(to).as_str(), port),
        ("frontend", "backend", 5678) | ("backend", "db", 3306)
    )
}
