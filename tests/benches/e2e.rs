//! End to end between two lab pods, through their veths and the node's forwarding path:
//! throughput (iperf3, one stream), request/response rate (1-byte ping-pong on one connection)
//! and new connections per second (connect, 1-byte exchange, close with a RST), in three modes:
//! - no program: no agent, no iptables rule, no conntrack in the node;
//! - empty program: a classifier that only returns "next" (`np_noop`) on both hooks of both
//!   pods' veths, as netpol attaches its own: what attaching any TC program costs here, the
//!   floor under netpol's figures;
//! - netpol: the release agent applies a 1,000-rule ingress policy on `server` and a 1,000-rule
//!   egress policy on `client`, each allowing the other pod only in its last rule, with its
//!   default BPF host routing (client to server in one program run, past the node's stack);
//! - netpol, kernel routing (slices only): the same with `--host-routing kernel`, every packet
//!   through the node's stack and both pods' programs, as without netpol;
//! - iptables+ipset: the same rules written the way kube-router writes them, in the node's
//!   network namespace: one ipset per rule peer; in FORWARD, RELATED,ESTABLISHED accepted first,
//!   then a chain per pod and direction with the rules in order and a final DROP.
//!
//! The modes alternate round by round (the order rotates), and each mode is checked to enforce
//! before it is measured: a third pod and a closed port must be dropped. iptables mode uses
//! Debian 12's default backend (nf_tables, `iptables-nft-restore`). The request/response ends
//! busy-poll, pinned to CPUs 0 and 1; the connection threads run at nice -20 (see `perf`).
//! Needs root.
//! Run: `cargo build --release -p netpol-agent && cargo bench -p netpol-tests --bench e2e`.
//! `NETPOL_E2E_ROUNDS` (default 7) and `NETPOL_E2E_SECONDS` (per request/response and
//! connection figure, default 2; iperf3 always runs 5) change the length: about 3.5 minutes.
//! With `sysctl kernel.bpf_stats_enabled=1` the netpol rounds also print what the programs
//! cost per transaction and per connection (the counters slow every run a little).
//!
//! Then interleaved slices, for the ratio to "no program" (see `slices`): request/response and
//! connections for `NETPOL_E2E_SLICE_MS` (default 1000) in each of no program, empty program,
//! netpol and netpol with kernel routing, taking turns `NETPOL_E2E_SLICES` times (default 15;
//! 0 skips them, as `NETPOL_E2E_ROUNDS=0` skips the rounds): about 3.5 minutes.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use netpol_agent::dataplane::{self, Dataplane, PinDir};
use netpol_tests::{
    agent::Agent,
    lab::{Lab, LabOptions, LabSpec, Probe, ProbeOutcome},
    perf::{self, BenchServers, Spread},
};
use serde_json::Value;

use ruleset::{manifests, netfilter, rules, Netfilter, Peer};

#[path = "e2e/ruleset.rs"]
mod ruleset;

/// Rules per policy, the allowing one included.
const RULES: usize = 1_000;
const IPERF_PORT: u16 = 5201;
/// Accepts and closes: what the enforcement checks connect to.
const PROBE_PORT: u16 = 7000;
const ECHO_PORT: u16 = 7001;
const EXCHANGE_PORT: u16 = 7002;
/// Nothing listens here: a probe is refused when the path is open and times out when dropped.
const CLOSED_PORT: u16 = 7003;
/// The ports of the allowing rules, in iptables order: a new measured connection (EXCHANGE_PORT)
/// goes through every rule of both chains.
const BENCH_PORTS: [u16; 4] = [IPERF_PORT, PROBE_PORT, ECHO_PORT, EXCHANGE_PORT];
const IPERF_TIME: Duration = Duration::from_secs(5);
const NS: &str = "bench";

const PODS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: bench}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: bench, labels: {role: client}}
spec: {containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: bench, labels: {role: server}}
spec: {containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: other, namespace: bench, labels: {role: other}}
spec: {containers: [{name: c}]}
"#;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    NoProgram,
    EmptyProgram,
    Netpol,
    Iptables,
    NetpolKernelRouting,
}

impl Mode {
    /// The modes of the rounds.
    const ALL: [Mode; 4] = [
        Mode::NoProgram,
        Mode::EmptyProgram,
        Mode::Netpol,
        Mode::Iptables,
    ];

    fn label(self) -> &'static str {
        match self {
            Mode::NoProgram => "no program",
            Mode::EmptyProgram => "empty program",
            Mode::Netpol => "netpol",
            Mode::Iptables => "iptables+ipset",
            Mode::NetpolKernelRouting => "netpol, kernel routing",
        }
    }

    fn enforces(self) -> bool {
        matches!(
            self,
            Mode::Netpol | Mode::NetpolKernelRouting | Mode::Iptables
        )
    }

    fn is_netpol(self) -> bool {
        matches!(self, Mode::Netpol | Mode::NetpolKernelRouting)
    }
}

/// Runs `program args` in the node's network namespace with `stdin`; panics unless it succeeds.
fn node_run(lab: &Lab, program: &str, args: &[&str], stdin: &str) -> String {
    let what = format!("{program} {}", args.join(" "));
    let mut child = lab
        .node_command(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {what} in the node (`cargo xtask setup`?): {e}"));
    let mut input = child.stdin.take().expect("stdin is piped");
    input
        .write_all(stdin.as_bytes())
        .unwrap_or_else(|e| panic!("writing to {what}: {e}"));
    drop(input);
    let output = child
        .wait_with_output()
        .expect("waiting for a node command");
    assert!(
        output.status.success(),
        "{what} in the node failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Entries in the node's conntrack table (0 when nothing made the node track connections).
fn node_conntrack_entries(lab: &Lab) -> u64 {
    let out = node_run(lab, "conntrack", &["-C"], "");
    out.trim()
        .parse()
        .unwrap_or_else(|_| panic!("conntrack -C printed {out:?}"))
}

struct Modes<'a> {
    lab: &'a Lab,
    agent: Agent<'a>,
    netfilter: Netfilter,
    /// The empty program's links live as long as this (dropping it detaches them).
    empty: std::cell::RefCell<Option<Dataplane>>,
}

impl Modes<'_> {
    /// Puts `mode` in place; returns how long that took.
    fn enter(&self, mode: Mode) -> Duration {
        let start = Instant::now();
        match mode {
            Mode::NoProgram => {}
            Mode::EmptyProgram => {
                let dataplane = self.attach_empty().expect("attaching the empty program");
                *self.empty.borrow_mut() = Some(dataplane);
            }
            Mode::Netpol => {
                self.agent.apply().expect("netpol-agent apply");
            }
            Mode::NetpolKernelRouting => {
                self.agent
                    .apply_with(&["--host-routing", "kernel"])
                    .expect("netpol-agent apply --host-routing kernel");
            }
            Mode::Iptables => {
                node_run(self.lab, "ipset", &["restore"], &self.netfilter.ipsets);
                node_run(self.lab, "iptables-nft-restore", &[], &self.netfilter.rules);
            }
        }
        start.elapsed()
    }

    /// Removes what `enter(mode)` put in place, in the node's namespace only.
    fn leave(&self, mode: Mode) {
        match mode {
            Mode::NoProgram => {}
            Mode::EmptyProgram => {
                drop(self.empty.borrow_mut().take());
                dataplane::reset(&self.empty_pins()).expect("removing the empty program's pins");
            }
            Mode::Netpol | Mode::NetpolKernelRouting => {
                self.agent.reset().expect("netpol-agent reset");
            }
            Mode::Iptables => {
                // Deleting the table (not only flushing it) unhooks FORWARD and drops the
                // conntrack references, so the other modes run without netfilter.
                node_run(self.lab, "nft", &["delete", "table", "ip", "filter"], "");
                node_run(self.lab, "ipset", &["restore"], &self.netfilter.destroy);
                node_run(self.lab, "conntrack", &["-F"], "");
            }
        }
        let left = node_run(self.lab, "nft", &["list", "ruleset"], "");
        assert!(
            left.trim().is_empty(),
            "netfilter rules left in the node: {left}"
        );
        let sets = node_run(self.lab, "ipset", &["list", "-n"], "");
        assert!(sets.trim().is_empty(), "ipsets left in the node: {sets}");
    }

    fn empty_pins(&self) -> PinDir {
        PinDir::for_node(
            Path::new(dataplane::BPFFS),
            &format!("{}-empty", self.lab.node_name()),
        )
    }

    /// Loads the object (its own pin directory) and attaches `np_noop` to both hooks of the
    /// client's and the server's host-side veths: the interfaces the node routes their
    /// addresses to, as the agent finds them.
    fn attach_empty(&self) -> anyhow::Result<Dataplane> {
        let pins = self.empty_pins();
        let interfaces: Vec<String> = ["client", "server"]
            .iter()
            .map(|pod| {
                let ip = self.lab.pod_ip(NS, pod).to_string();
                let route = node_run(self.lab, "ip", &["-o", "route", "get", &ip], "");
                let mut words = route.split_whitespace();
                words
                    .find(|w| *w == "dev")
                    .and_then(|_| words.next())
                    .map(str::to_string)
                    .ok_or_else(|| anyhow::anyhow!("no interface in {route:?}"))
            })
            .collect::<anyhow::Result<_>>()?;
        self.lab.in_node(|| -> anyhow::Result<Dataplane> {
            let mut dp = Dataplane::load(&pins)?;
            for interface in &interfaces {
                dp.attach_empty(interface)?;
            }
            Ok(dp)
        })?
    }

    /// The run counters of the agent's programs (`bpftool prog show`), when the kernel keeps
    /// them (`sysctl kernel.bpf_stats_enabled=1`, off by default: it costs a little per run).
    fn bpf_stats(&self) -> Option<BpfStats> {
        let enabled = std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled");
        if enabled.ok()?.trim() != "1" {
            return None;
        }
        let dump = self.agent.dump_json().expect("netpol-agent dump -o json");
        let mut ids = BTreeMap::new();
        for endpoint in dump["endpoints"].as_array().into_iter().flatten() {
            for hook in endpoint["attachments"].as_array().into_iter().flatten() {
                for program in hook["programs"].as_array().into_iter().flatten() {
                    if program["ours"] == true {
                        ids.insert(
                            program["id"].as_u64()?,
                            program["name"].as_str()?.to_string(),
                        );
                    }
                }
            }
        }
        let mut stats = BpfStats::new();
        for (id, name) in ids {
            let out = std::process::Command::new("bpftool")
                .args(["prog", "show", "id", &id.to_string(), "-j"])
                .output()
                .expect("running bpftool");
            let info: Value = serde_json::from_slice(&out.stdout).ok()?;
            let entry = stats.entry(name).or_default();
            entry.0 += info["run_cnt"].as_u64().unwrap_or(0);
            entry.1 += info["run_time_ns"].as_u64().unwrap_or(0);
        }
        Some(stats)
    }

    /// Panics unless `mode` lets the benchmark's traffic through and, when it enforces, drops a
    /// third pod and a closed port.
    fn check_probes(&self, mode: Mode) {
        let (server, other) = (self.lab.pod_ip(NS, "server"), self.lab.pod_ip(NS, "other"));
        let dropped_or = |open| {
            if mode.enforces() {
                ProbeOutcome::TimedOut
            } else {
                open
            }
        };
        let expected = [
            (
                Probe::tcp((NS, "client"), server, PROBE_PORT),
                ProbeOutcome::Connected,
            ),
            (
                Probe::tcp((NS, "other"), server, PROBE_PORT),
                dropped_or(ProbeOutcome::Connected),
            ),
            (
                Probe::tcp((NS, "client"), server, CLOSED_PORT),
                dropped_or(ProbeOutcome::Refused),
            ),
            (
                Probe::tcp((NS, "client"), other, PROBE_PORT),
                dropped_or(ProbeOutcome::Refused),
            ),
        ];
        let probes: Vec<Probe> = expected.iter().map(|(p, _)| p.clone()).collect();
        for ((probe, want), got) in expected.iter().zip(self.lab.probe_all(&probes)) {
            assert_eq!(&got, want, "{}: {probe}", mode.label());
        }
    }

    /// Panics unless netpol's programs are on both hooks of the client's and the server's
    /// interfaces, as `dump` reads them from the kernel.
    fn check_netpol_attached(&self) {
        let dump = self.agent.dump_json().expect("netpol-agent dump -o json");
        let ours = |endpoint: &Value| {
            endpoint["attachments"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|hook| {
                    hook["programs"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|p| p["ours"] == true)
                })
                .count()
        };
        for pod in ["bench/client", "bench/server"] {
            let endpoint = dump["endpoints"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|e| e["pod"] == pod)
                .unwrap_or_else(|| panic!("{pod} is no endpoint in the dump"));
            assert_eq!(ours(endpoint), 2, "{pod}: netpol on both hooks: {endpoint}");
        }
    }

    /// Panics unless the node tracked the connections just measured in iptables mode, and
    /// only then: netfilter's conntrack is part of what iptables costs and of nothing else.
    fn check_conntrack(&self, mode: Mode) {
        let tracked = node_conntrack_entries(self.lab);
        assert_eq!(
            tracked > 0,
            mode == Mode::Iptables,
            "{}: the node's conntrack holds {tracked} entries",
            mode.label()
        );
    }
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    gbits: f64,
    retransmits: u64,
    transactions: f64,
    connections: f64,
}

/// Run count and run time (ns) of each of the agent's programs on the lab, by program name.
type BpfStats = BTreeMap<String, (u64, u64)>;

/// Measures the three figures; with `bpf` (netpol mode with kernel.bpf_stats_enabled=1) also
/// returns, for each, what the programs cost per transaction or connection.
fn measure(
    lab: &Lab,
    servers: &BenchServers,
    secs: Duration,
    bpf: &dyn Fn() -> Option<BpfStats>,
) -> (Sample, Vec<String>) {
    let (client, server) = (
        &lab.pod(NS, "client").expect("client").netns,
        &lab.pod(NS, "server").expect("server").netns,
    );
    let server_ip = lab.pod_ip(NS, "server");
    let mut notes = Vec::new();
    let mut before = bpf();
    let mut note = |what: &str, units: f64| {
        let after = bpf();
        if let (Some(a), Some(b)) = (&before, &after) {
            notes.push(bpf_note(what, a, b, units));
        }
        before = after;
    };
    let throughput =
        perf::iperf3(server, client, server_ip, IPERF_PORT, IPERF_TIME).expect("iperf3");
    note("iperf3", 0.0);
    let transactions = servers
        .request_response(client, SocketAddr::new(server_ip, ECHO_PORT), secs)
        .unwrap_or_else(|e| panic!("request/response: {e:#}"));
    note("per transaction", transactions * secs.as_secs_f64());
    let connections = servers
        .connection_rate(client, SocketAddr::new(server_ip, EXCHANGE_PORT), secs)
        .unwrap_or_else(|e| panic!("connections: {e:#}"));
    note("per connection", connections * secs.as_secs_f64());
    let sample = Sample {
        gbits: throughput.bits_per_second / 1e9,
        retransmits: throughput.retransmits,
        transactions,
        connections,
    };
    (sample, notes)
}

/// What the programs did between two readings: runs and mean ns per run of each, and per unit
/// (transaction, connection) when `units` is not zero.
fn bpf_note(what: &str, before: &BpfStats, after: &BpfStats, units: f64) -> String {
    let mut total_ns = 0;
    let mut parts = Vec::new();
    for (name, &(runs, ns)) in after {
        let (runs0, ns0) = before.get(name).copied().unwrap_or_default();
        let (runs, ns) = (runs - runs0, ns - ns0);
        total_ns += ns;
        let per_run = ns as f64 / runs.max(1) as f64;
        parts.push(if units > 0.0 {
            format!("{name} {:.1} runs x {per_run:.0} ns", runs as f64 / units)
        } else {
            format!("{name} {runs} runs x {per_run:.0} ns")
        });
    }
    let total = if units > 0.0 {
        format!(" = {:.2} us", total_ns as f64 / units / 1e3)
    } else {
        format!(" = {:.1} ms", total_ns as f64 / 1e6)
    };
    format!("{what}: {}{total}", parts.join(", "))
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name).map_or(default, |v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number"))
    })
}

/// The 1-minute load average: other work on the machine shows in the figures.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .next()
        .unwrap_or("?")
        .to_string()
}

fn ipv4(ip: IpAddr) -> Ipv4Addr {
    match ip {
        IpAddr::V4(ip) => ip,
        IpAddr::V6(ip) => panic!("the lab gave an IPv6 address {ip}"),
    }
}

fn main() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the e2e benchmark needs root (network namespaces, CNI, BPF, iptables in the lab node)"
    );
    if std::env::var_os("NETPOL_AGENT_BIN").is_none() {
        let release = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/netpol-agent");
        assert!(
            release.exists(),
            "no release agent at {}: run `cargo build --release -p netpol-agent` first, or set \
             NETPOL_AGENT_BIN",
            release.display()
        );
        std::env::set_var("NETPOL_AGENT_BIN", &release);
    }
    let rounds = env_number("NETPOL_E2E_ROUNDS", 7) as usize;
    let secs = Duration::from_secs(env_number("NETPOL_E2E_SECONDS", 2));

    let spec = LabSpec::from_yaml_str(PODS).expect("lab spec parses");
    let lab = Lab::start(
        &spec,
        LabOptions {
            probe_timeout: Duration::from_millis(500),
            ..Default::default()
        },
    )
    .expect("lab starts (needs root, network namespaces and /usr/lib/cni)");
    let (client_ip, server_ip) = (
        ipv4(lab.pod_ip(NS, "client")),
        ipv4(lab.pod_ip(NS, "server")),
    );
    let ingress = rules(
        "in",
        200,
        10_000,
        Peer::Pod {
            label: ("role".into(), "client".into()),
            ip: client_ip,
        },
    );
    let egress = rules(
        "eg",
        202,
        20_000,
        Peer::Pod {
            label: ("role".into(), "server".into()),
            ip: server_ip,
        },
    );
    let server_netns = &lab.pod(NS, "server").expect("server pod").netns;
    let servers = BenchServers::start(server_netns, PROBE_PORT, ECHO_PORT, EXCHANGE_PORT)
        .expect("starting the benchmark servers in the server pod");
    let agent = Agent::new(&lab).expect("agent manifests");
    agent
        .set_policies(&[("e2e", &manifests(&ingress, &egress))])
        .expect("writing the policies");
    let modes = Modes {
        lab: &lab,
        agent,
        netfilter: netfilter(client_ip, server_ip, &ingress, &egress),
        empty: Default::default(),
    };

    println!(
        "e2e: client {client_ip} -> server {server_ip}, one lab node, {RULES} rules per policy \
         (server ingress, client egress), allowing rule last"
    );
    println!(
        "kernel {}, {} cpus, agent {}, {rounds} rounds: iperf3 {}s, request/response {}s, \
         connections {}s",
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        netpol_tests::agent::agent_bin().display(),
        IPERF_TIME.as_secs(),
        secs.as_secs(),
        secs.as_secs()
    );
    let mut samples: Vec<(Mode, Sample)> = Vec::new();
    for round in 0..rounds {
        for k in 0..Mode::ALL.len() {
            let mode = Mode::ALL[(round + k) % Mode::ALL.len()];
            let setup = modes.enter(mode);
            modes.check_probes(mode);
            let bpf = || (mode == Mode::Netpol).then(|| modes.bpf_stats()).flatten();
            let (sample, notes) = measure(&lab, &servers, secs, &bpf);
            modes.check_conntrack(mode);
            modes.leave(mode);
            println!(
                "round {} {:<15} {:>6.2} Gbit/s ({:>5} retr)  {:>6.0} trans/s  {:>6.0} conn/s  \
                 (setup {:.2}s, load {})",
                round + 1,
                mode.label(),
                sample.gbits,
                sample.retransmits,
                sample.transactions,
                sample.connections,
                setup.as_secs_f64(),
                load_average()
            );
            for note in notes {
                println!("    bpf {note}");
            }
            samples.push((mode, sample));
        }
    }
    if !samples.is_empty() {
        report(&samples);
    }
    let slice_count = env_number("NETPOL_E2E_SLICES", 15) as usize;
    let slice = Duration::from_millis(env_number("NETPOL_E2E_SLICE_MS", 1000));
    if slice_count > 0 {
        slices(&modes, &servers, slice_count, slice);
    }
}

/// The modes without netfilter, in the order a group of slices takes them (rotated by group).
const SLICE_MODES: [Mode; 4] = [
    Mode::NoProgram,
    Mode::EmptyProgram,
    Mode::Netpol,
    Mode::NetpolKernelRouting,
];

/// Interleaved slices: the ratios to "no program" with the VM's drift taken out. This VM's
/// speed moves by ±30 % over seconds (a shared host), more than the effect measured, so a
/// round of several seconds per mode leaves each ratio at the mercy of when it ran. Here the
/// modes without netfilter take turns in short slices (request/response, then
/// connections, in each), and each ratio is taken within a group of adjacent slices;
/// the figure is the median over groups. Every switch is the real one: `netpol-agent apply`
/// and `reset`, attaching and detaching the empty program. After each switch the machine
/// settles before the clock starts, so the agent's own work is not measured.
fn slices(modes: &Modes, servers: &BenchServers, count: usize, slice: Duration) {
    let lab = modes.lab;
    let client = &lab.pod(NS, "client").expect("client").netns;
    let server_ip = lab.pod_ip(NS, "server");
    println!();
    println!(
        "interleaved slices: {count} groups of {}, {} ms of request/response and of connections \
         each",
        SLICE_MODES.map(Mode::label).join(" / "),
        slice.as_millis()
    );
    // [group][mode] -> (trans/s, conn/s)
    let mut groups = Vec::new();
    for group in 0..count {
        let mut figures = [(0.0, 0.0); SLICE_MODES.len()];
        for k in 0..SLICE_MODES.len() {
            let index = (group + k) % SLICE_MODES.len();
            let mode = SLICE_MODES[index];
            modes.enter(mode);
            std::thread::sleep(Duration::from_millis(200));
            let transactions = servers
                .request_response(client, SocketAddr::new(server_ip, ECHO_PORT), slice)
                .unwrap_or_else(|e| panic!("request/response: {e:#}"));
            let connections = servers
                .connection_rate(client, SocketAddr::new(server_ip, EXCHANGE_PORT), slice)
                .unwrap_or_else(|e| panic!("connections: {e:#}"));
            if mode.is_netpol() {
                modes.check_netpol_attached();
            }
            modes.check_conntrack(mode);
            modes.leave(mode);
            figures[index] = (transactions, connections);
        }
        println!(
            "group {:>2}  {}  (load {})",
            group + 1,
            SLICE_MODES
                .iter()
                .zip(&figures)
                .map(|(m, (t, c))| format!("{}: {t:>6.0} trans/s {c:>5.0} conn/s", m.label()))
                .collect::<Vec<_>>()
                .join("  "),
            load_average()
        );
        groups.push(figures);
    }
    let ratio = |a: usize, b: usize, which: fn(&(f64, f64)) -> f64| {
        let r = Spread::of(
            &groups
                .iter()
                .map(|g| which(&g[a]) / which(&g[b]))
                .collect::<Vec<_>>(),
        );
        format!("{:.2}x ({:.2}-{:.2})", r.median, r.min, r.max)
    };
    let (none, empty, netpol, kernel_routed) = (0, 1, 2, 3);
    println!(
        "{:<27} {:>20} {:>22} {:>20} {:>20}",
        "median over groups (range)",
        "netpol/no program",
        "netpol kernel-routed/",
        "empty/no program",
        "netpol/empty"
    );
    println!("{:<27} {:>20} {:>22}", "", "", "no program");
    for (name, which) in [
        (
            "request/response",
            (|f: &(f64, f64)| f.0) as fn(&(f64, f64)) -> f64,
        ),
        ("new connections", |f: &(f64, f64)| f.1),
    ] {
        println!(
            "{name:<27} {:>20} {:>22} {:>20} {:>20}",
            ratio(netpol, none, which),
            ratio(kernel_routed, none, which),
            ratio(empty, none, which),
            ratio(netpol, empty, which)
        );
    }
    println!("goal: netpol/no program >= 0.95x");
}

/// One printed figure: its name, how to read it from a sample, and its decimals.
struct Metric {
    name: &'static str,
    value: fn(&Sample) -> f64,
    decimals: usize,
}

const METRICS: [Metric; 3] = [
    Metric {
        name: "throughput (Gbit/s)",
        value: |s| s.gbits,
        decimals: 2,
    },
    Metric {
        name: "request/response (trans/s)",
        value: |s| s.transactions,
        decimals: 0,
    },
    Metric {
        name: "new connections (conn/s)",
        value: |s| s.connections,
        decimals: 0,
    },
];

/// `samples` holds one sample per mode and round, in round order. Each figure is the median
/// over rounds with the range; each ratio is taken within a round (the three modes ran back to
/// back, under the same background load) and shown as the median of the rounds' ratios with
/// their range.
fn report(samples: &[(Mode, Sample)]) {
    let of = |mode: Mode, metric: &Metric| -> Vec<f64> {
        samples
            .iter()
            .filter(|(m, _)| *m == mode)
            .map(|(_, s)| (metric.value)(s))
            .collect()
    };
    let ratios = |a: &[f64], b: &[f64]| -> Spread {
        Spread::of(&a.iter().zip(b).map(|(a, b)| a / b).collect::<Vec<_>>())
    };
    println!();
    println!(
        "{:<27} {:>20} {:>20} {:>20} {:>20} {:>17} {:>17} {:>17}",
        "median (min-max)",
        "no program",
        "empty program",
        "netpol",
        "iptables+ipset",
        "netpol/no program",
        "netpol/empty",
        "netpol/iptables"
    );
    for metric in &METRICS {
        let [none, empty, netpol, iptables] = Mode::ALL.map(|m| of(m, metric));
        let d = metric.decimals;
        let cell = |values: &[f64]| {
            let s = Spread::of(values);
            format!("{:.d$} ({:.d$}-{:.d$})", s.median, s.min, s.max)
        };
        let ratio = |r: Spread| format!("{:.2}x ({:.2}-{:.2})", r.median, r.min, r.max);
        println!(
            "{:<27} {:>20} {:>20} {:>20} {:>20} {:>17} {:>17} {:>17}",
            metric.name,
            cell(&none),
            cell(&empty),
            cell(&netpol),
            cell(&iptables),
            ratio(ratios(&netpol, &none)),
            ratio(ratios(&netpol, &empty)),
            ratio(ratios(&netpol, &iptables))
        );
    }
    println!(
        "goals: netpol/no program >= 0.95x, netpol/iptables > 1x (ratios within a round, median \
         over rounds)"
    );
}
