//! Kernel tests: restarting the agent (issue 5, item 3). Enforcement lives in pinned maps and
//! links, so it must hold while no agent runs, and the next agent must adopt what is pinned and
//! reconcile it without dropping an established connection or opening a denied path, whether
//! the previous one stopped on SIGTERM or crashed. Background threads probe the paths the whole
//! time: an echo on a long-lived connection, new TCP connections every ~50 ms, and UDP canaries
//! every half millisecond that catch a path open for even a moment.
//! Every test needs root, BPF/TCX and the CNI plugins; each fails with a message when it cannot
//! run, never passes silently.

use std::{
    collections::BTreeMap,
    io::{self, BufRead as _, BufReader, ErrorKind, Write as _},
    net::{IpAddr, TcpStream, UdpSocket},
    os::unix::process::ExitStatusExt as _,
    process::{Child, ExitStatus},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use netpol_tests::{
    agent::Agent,
    lab::{Lab, LabOptions, LabSpec, Probe, ProbeOutcome},
};
use nix::{
    sys::signal::{kill, Signal},
    unistd::Pid,
};

/// Three pods, each serving TCP 8080 (echo) and UDP 5353.
const PODS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: t}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: t, labels: {role: a}}
spec: {containers: [{name: c, ports: [{containerPort: 8080}, {containerPort: 5353, protocol: UDP}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: t, labels: {role: b}}
spec: {containers: [{name: c, ports: [{containerPort: 8080}, {containerPort: 5353, protocol: UDP}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: c, namespace: t, labels: {role: c}}
spec: {containers: [{name: c, ports: [{containerPort: 8080}, {containerPort: 5353, protocol: UDP}]}]}
"#;

/// a admits nothing and may only reach b on 8080.
const A_LOCKDOWN: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: a-lockdown, namespace: t}
spec:
  podSelector: {matchLabels: {role: a}}
  policyTypes: [Ingress, Egress]
  egress:
    - to: [{podSelector: {matchLabels: {role: b}}}]
      ports: [{port: 8080}]
"#;

/// b admits only a.
const B_FROM_A: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: b-from-a, namespace: t}
spec:
  podSelector: {matchLabels: {role: b}}
  ingress:
    - from: [{podSelector: {matchLabels: {role: a}}}]
      ports: [{port: 8080}, {port: 5353, protocol: UDP}]
"#;

/// Every pod of the namespace admits nothing unless another policy says so.
const DEFAULT_DENY: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny, namespace: t}
spec:
  podSelector: {}
  policyTypes: [Ingress]
"#;

/// b admits only c.
const B_FROM_C: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: b-from-c, namespace: t}
spec:
  podSelector: {matchLabels: {role: b}}
  ingress:
    - from: [{podSelector: {matchLabels: {role: c}}}]
      ports: [{port: 8080}, {port: 5353, protocol: UDP}]
"#;

/// How long a probe waits before calling a flow dropped (the lab's probe timeout).
const PROBE_TIMEOUT: Duration = Duration::from_millis(300);
/// How often each watched path is probed with a new TCP connection, and the echo is sent.
const PROBE_EVERY: Duration = Duration::from_millis(50);
/// Threads per probed TCP path: each waits out its timeout, so together they start one
/// connection every `PROBE_EVERY`.
const PROBE_WORKERS: u32 = 6;
/// How long an echo on the long-lived connection may take (generous: a busy 2-core machine
/// must not pass for a dropped connection; a connection the datapath drops never answers).
const ECHO_TIMEOUT: Duration = Duration::from_secs(1);
/// How often a UDP canary sends a datagram.
const CANARY_EVERY: Duration = Duration::from_micros(500);
/// How long a `run` may take to load its programs and finish its first pass.
const FIRST_PASS_TIMEOUT: Duration = Duration::from_secs(15);

fn lab() -> Lab {
    let spec = LabSpec::from_yaml_str(PODS).expect("lab spec parses");
    Lab::start(
        &spec,
        LabOptions {
            probe_timeout: PROBE_TIMEOUT,
            ..Default::default()
        },
    )
    .expect("lab starts (needs root, network namespaces and /usr/lib/cni)")
}

/// `ns/pod` -> (ns, pod).
fn pod(name: &str) -> (&str, &str) {
    name.split_once('/').expect("ns/pod")
}

fn ip(lab: &Lab, name: &str) -> IpAddr {
    let (ns, pod) = pod(name);
    lab.pod_ip(ns, pod)
}

/// A new TCP connection from `from` to `to`'s address (both `ns/pod`).
fn tcp(lab: &Lab, from: &str, to: &str, port: u16) -> ProbeOutcome {
    lab.probe(&Probe::tcp(pod(from), ip(lab, to), port))
}

/// Polls `check` until it holds or `timeout` passes.
fn eventually(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        thread::sleep(Duration::from_millis(50));
    }
    check()
}

/// One reconcile pass, from `run`'s `reconciled` log line.
#[derive(Debug, Clone)]
struct Pass {
    line: String,
    fields: BTreeMap<String, String>,
}

impl Pass {
    fn parse(line: &str) -> Option<Pass> {
        if !line.contains(" reconciled") {
            return None;
        }
        let fields = line
            .split_whitespace()
            .filter_map(|w| w.split_once('='))
            .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
            .collect();
        Some(Pass {
            line: line.to_string(),
            fields,
        })
    }

    #[track_caller]
    fn count(&self, key: &str) -> u64 {
        self.fields
            .get(key)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {key}=N in {:?}", self.line))
    }
}

/// A `netpol-agent run` process. Its log is collected from its stderr; it is stopped by its
/// PID, and killed and reaped on drop, so a failing test leaves no agent behind.
struct RunningAgent {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
    reader: Option<JoinHandle<()>>,
}

impl RunningAgent {
    fn start(agent: &Agent) -> RunningAgent {
        let mut child = agent.spawn_run_logged().expect("netpol-agent run starts");
        let stderr = child.stderr.take().expect("stderr is piped");
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&log);
        let reader = thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                sink.lock().unwrap().push(strip_ansi(&line));
            }
        });
        RunningAgent {
            child,
            log,
            reader: Some(reader),
        }
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.child.id()).expect("pid fits"))
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Waits for the first reconcile pass and returns it.
    #[track_caller]
    fn first_pass(&mut self) -> Pass {
        let deadline = Instant::now() + FIRST_PASS_TIMEOUT;
        loop {
            let first = self.log.lock().unwrap().iter().find_map(|l| Pass::parse(l));
            if let Some(pass) = first {
                return pass;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("run exited ({status}) before a pass:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "run made no pass in {FIRST_PASS_TIMEOUT:?}:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal` to the agent's PID and reaps it.
    #[track_caller]
    fn stop(mut self, signal: Signal) -> ExitStatus {
        kill(self.pid(), signal).unwrap_or_else(|e| panic!("{signal} to the agent: {e}"));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().expect("waiting for the agent") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "run did not exit within 10 s of {signal}:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = kill(self.pid(), Signal::SIGKILL);
            let _ = self.child.wait();
        }
        // The reader ends when the agent's end of the pipe closes; should anything else hold
        // it, the thread is left to finish on its own rather than hang the test.
        if let Some(reader) = self.reader.take() {
            let deadline = Instant::now() + Duration::from_secs(2);
            while !reader.is_finished() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(10));
            }
            if reader.is_finished() {
                let _ = reader.join();
            } else {
                eprintln!("netpol test: the agent's log pipe is still open; not waiting for it");
            }
        }
    }
}

/// The log without terminal colours, should the subscriber add them anyway.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// What a background check saw on one path.
struct Tally {
    what: String,
    attempts: AtomicU64,
    failures: AtomicU64,
    /// The first few failures, with when and in which phase they happened.
    samples: Mutex<Vec<String>>,
}

impl Tally {
    fn new(what: impl Into<String>) -> Tally {
        Tally {
            what: what.into(),
            attempts: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            samples: Mutex::new(Vec::new()),
        }
    }

    fn attempt(&self) {
        self.attempts.fetch_add(1, Ordering::Relaxed);
    }

    fn fail(&self, message: String) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        let mut samples = self.samples.lock().unwrap();
        if samples.len() < 10 {
            samples.push(message);
        }
    }

    fn attempts(&self) -> u64 {
        self.attempts.load(Ordering::Relaxed)
    }

    fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    fn summary(&self) -> String {
        format!(
            "{}: {} attempt(s), {} failure(s) {:?}",
            self.what,
            self.attempts(),
            self.failures(),
            self.samples.lock().unwrap()
        )
    }

    /// Fails unless the check ran at least `min` times and never failed.
    #[track_caller]
    fn assert_clean(&self, min: u64) {
        assert!(
            self.attempts() >= min,
            "{}: only {} attempt(s), expected at least {min}",
            self.what,
            self.attempts()
        );
        assert_eq!(self.failures(), 0, "{}", self.summary());
    }
}

/// The background checks' shared clock, phase and stop flag.
struct Watch<'l> {
    lab: &'l Lab,
    started: Instant,
    phase: Mutex<String>,
    stop: AtomicBool,
}

impl<'l> Watch<'l> {
    fn new(lab: &'l Lab) -> Watch<'l> {
        Watch {
            lab,
            started: Instant::now(),
            phase: Mutex::new("starting".to_string()),
            stop: AtomicBool::new(false),
        }
    }

    fn phase(&self, phase: &str) {
        println!("[{:6.2}s] {phase}", self.started.elapsed().as_secs_f64());
        *self.phase.lock().unwrap() = phase.to_string();
    }

    /// When and in which phase, for failure messages.
    fn now(&self) -> String {
        format!(
            "{:.2}s, {}",
            self.started.elapsed().as_secs_f64(),
            self.phase.lock().unwrap()
        )
    }

    fn running(&self) -> bool {
        !self.stop.load(Ordering::Relaxed)
    }

    /// One of `PROBE_WORKERS` threads trying new TCP connections on a path that must stay
    /// closed; `worker` staggers it. Anything but a timeout means a packet got through.
    fn denied_tcp(&self, tally: &Tally, from: &str, to: &str, port: u16, worker: u32) {
        let probe = Probe::tcp(pod(from), ip(self.lab, to), port);
        thread::sleep(PROBE_EVERY * worker);
        while self.running() {
            let started = Instant::now();
            tally.attempt();
            let outcome = self.lab.probe(&probe);
            if outcome != ProbeOutcome::TimedOut {
                tally.fail(format!("{outcome} at {}", self.now()));
            }
            let cycle = PROBE_EVERY * PROBE_WORKERS;
            thread::sleep(cycle.saturating_sub(started.elapsed()));
        }
    }

    /// Sends a datagram from `from` to `to:port` every `CANARY_EVERY` on one socket; any
    /// answer (a reply or an ICMP error) means a datagram was delivered. One socket is one flow:
    /// a datagram let through even once leaves a conntrack entry that passes the rest.
    fn denied_udp(&self, tally: &Tally, from: &str, to: &str, port: u16) {
        let (ns, name) = pod(from);
        let socket = self
            .lab
            .in_pod(ns, name, || UdpSocket::bind("0.0.0.0:0"))
            .expect("entering the pod")
            .expect("binding the canary's socket");
        socket
            .connect((ip(self.lab, to), port))
            .expect("connecting the canary's socket");
        socket.set_nonblocking(true).expect("non-blocking socket");
        let mut buf = [0u8; 256];
        while self.running() {
            tally.attempt();
            if let Err(e) = socket.send(b"canary") {
                if e.kind() != ErrorKind::WouldBlock {
                    tally.fail(format!("send: {e} at {}", self.now()));
                }
            }
            match socket.recv(&mut buf) {
                Ok(n) => tally.fail(format!(
                    "reply {:?} at {}",
                    String::from_utf8_lossy(&buf[..n]).trim(),
                    self.now()
                )),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => tally.fail(format!("recv: {e} at {}", self.now())),
            }
            thread::sleep(CANARY_EVERY);
        }
    }

    /// Sends a numbered line on the long-lived connection every `PROBE_EVERY` and expects it
    /// back within `ECHO_TIMEOUT`. Stops at the first broken connection (it cannot recover).
    fn echo(&self, tally: &Tally, stream: TcpStream) {
        let mut echo = Echo::new(stream);
        let mut seq = 0u64;
        while self.running() {
            let started = Instant::now();
            seq += 1;
            tally.attempt();
            if let Err(e) = echo.round_trip(seq) {
                tally.fail(format!("echo {seq}: {e} at {}", self.now()));
                if e.kind() != ErrorKind::TimedOut {
                    return;
                }
            }
            thread::sleep(PROBE_EVERY.saturating_sub(started.elapsed()));
        }
    }
}

/// Stops the background checks when dropped, also when the test body panics: the scope that
/// joins them would wait forever otherwise.
struct StopOnDrop<'w, 'l>(&'w Watch<'l>);

impl Drop for StopOnDrop<'_, '_> {
    fn drop(&mut self) {
        self.0.stop.store(true, Ordering::Relaxed);
    }
}

/// Lines sent on a connection to a lab echo server and read back.
struct Echo {
    writer: TcpStream,
    reader: BufReader<TcpStream>,
    /// A line read in part when a read timed out.
    line: String,
}

impl Echo {
    fn new(stream: TcpStream) -> Echo {
        let reader = BufReader::new(stream.try_clone().expect("cloning the stream"));
        Echo {
            writer: stream,
            reader,
            line: String::new(),
        }
    }

    /// Sends `echo <seq>` and waits for it to come back; late answers to earlier lines are
    /// skipped.
    fn round_trip(&mut self, seq: u64) -> io::Result<()> {
        writeln!(self.writer, "echo {seq}")?;
        let deadline = Instant::now() + ECHO_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(ErrorKind::TimedOut, "no echo in time"));
            }
            self.reader.get_ref().set_read_timeout(Some(left))?;
            match self.reader.read_line(&mut self.line) {
                Ok(0) => return Err(io::Error::new(ErrorKind::UnexpectedEof, "closed")),
                Ok(_) if !self.line.ends_with('\n') => {}
                Ok(_) => {
                    let got = std::mem::take(&mut self.line);
                    let got = got.trim_end();
                    if got == format!("echo {seq}") {
                        return Ok(());
                    }
                    let earlier = got
                        .strip_prefix("echo ")
                        .and_then(|n| n.parse::<u64>().ok())
                        .is_some_and(|n| n < seq);
                    if !earlier {
                        return Err(io::Error::new(
                            ErrorKind::InvalidData,
                            format!("unexpected echo {got:?}"),
                        ));
                    }
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Err(io::Error::new(ErrorKind::TimedOut, "no echo in time"));
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// Pinned links in the node's pin directory.
fn pinned_links(agent: &Agent) -> usize {
    std::fs::read_dir(agent.pin_dir().join("links")).map_or(0, Iterator::count)
}

/// Each pod's attachments as `dump` shows them: hook, pinned, program ids in TCX order.
fn attachments(agent: &Agent) -> BTreeMap<String, String> {
    let dump = agent.dump_json().expect("dump -o json");
    dump["endpoints"]
        .as_array()
        .expect("endpoints")
        .iter()
        .map(|e| (e["pod"].to_string(), e["attachments"].to_string()))
        .collect()
}

/// Everything the kernel holds that `dump` shows, but the counters (traffic moves them).
fn kernel_state(agent: &Agent) -> serde_json::Value {
    let mut dump = agent.dump_json().expect("dump -o json");
    dump.as_object_mut()
        .expect("dump is an object")
        .remove("counters");
    dump
}

/// Each class id the endpoints carry, with what it stands for: its direction and the policies
/// selecting its pods (`dump`'s names for it).
fn class_meanings(agent: &Agent) -> BTreeMap<u64, String> {
    let dump = agent.dump_json().expect("dump -o json");
    let mut out = BTreeMap::new();
    for endpoint in dump["endpoints"].as_array().expect("endpoints") {
        for direction in ["ingress", "egress"] {
            let d = &endpoint[direction];
            if d["isolated"] == true {
                let class = d["class"].as_u64().expect("class id");
                out.insert(class, format!("{direction} {}", d["policies"]));
            }
        }
    }
    out
}

/// A pass of a `run` started over pins that already hold its input: nothing to write, attach
/// or detach; every hook adopted.
#[track_caller]
fn assert_adopted(pass: &Pass, which: &str) {
    for key in ["map_changes", "attached", "upgraded", "detached"] {
        assert_eq!(pass.count(key), 0, "{which}: {key} in {:?}", pass.line);
    }
    assert_eq!(pass.count("adopted"), 6, "{which}: {:?}", pass.line);
    assert_eq!(pass.count("enforced"), 3, "{which}: {:?}", pass.line);
}

#[test]
fn root_restart_keeps_established_connections_and_denied_paths() {
    let lab = lab();
    let agent = Agent::new(&lab).unwrap();
    agent
        .set_policies(&[("a-lockdown", A_LOCKDOWN), ("b-from-a", B_FROM_A)])
        .unwrap();

    let mut first = RunningAgent::start(&agent);
    let pass = first.first_pass();
    assert_eq!(pass.count("enforced"), 3, "{:?}", pass.line);
    assert!(
        eventually(Duration::from_secs(5), || tcp(&lab, "t/c", "t/b", 8080)
            == ProbeOutcome::TimedOut),
        "run enforces b's ingress (c -> b dropped)"
    );
    let a_to_b = tcp(&lab, "t/a", "t/b", 8080);
    assert!(a_to_b.is_open(), "a -> b:8080 is allowed: {a_to_b}");
    let stream = lab
        .open_tcp(("t", "a"), ip(&lab, "t/b"), 8080)
        .expect("a long-lived a -> b:8080 connection");
    let attached = attachments(&agent);
    assert_eq!(attached.len(), 3, "every pod has an endpoint: {attached:?}");

    let watch = Watch::new(&lab);
    let echo = Tally::new("a -> b:8080 established, echo");
    let c_to_b = Tally::new("c -> b:8080 new TCP (b admits only a)");
    let a_to_c = Tally::new("a -> c:8080 new TCP (a's egress is only b:8080)");
    let c_to_b_udp = Tally::new("c -> b:5353/UDP canary (b admits only a)");
    let a_to_c_udp = Tally::new("a -> c:5353/UDP canary (a's egress is only b:8080)");
    let started = Instant::now();
    thread::scope(|s| {
        let _stop = StopOnDrop(&watch);
        let watch = &watch;
        s.spawn(|| watch.echo(&echo, stream));
        s.spawn(|| watch.denied_udp(&c_to_b_udp, "t/c", "t/b", 5353));
        s.spawn(|| watch.denied_udp(&a_to_c_udp, "t/a", "t/c", 5353));
        for worker in 0..PROBE_WORKERS {
            let (c_to_b, a_to_c) = (&c_to_b, &a_to_c);
            s.spawn(move || watch.denied_tcp(c_to_b, "t/c", "t/b", 8080, worker));
            s.spawn(move || watch.denied_tcp(a_to_c, "t/a", "t/c", 8080, worker));
        }

        watch.phase("first agent running");
        thread::sleep(Duration::from_millis(500));
        let status = first.stop(Signal::SIGTERM);
        assert!(status.success(), "run exits cleanly on SIGTERM: {status}");
        watch.phase("no agent (after SIGTERM)");
        assert_eq!(
            pinned_links(&agent),
            6,
            "links stay pinned without an agent"
        );
        thread::sleep(Duration::from_secs(1));

        let mut second = RunningAgent::start(&agent);
        watch.phase("second agent starting");
        let pass = second.first_pass();
        watch.phase("second agent reconciled");
        assert_adopted(&pass, "restart after SIGTERM");
        thread::sleep(Duration::from_secs(2));
        let status = second.stop(Signal::SIGKILL);
        assert_eq!(
            status.signal(),
            Some(Signal::SIGKILL as i32),
            "killed: {status}"
        );
        watch.phase("no agent (after SIGKILL)");
        assert_eq!(pinned_links(&agent), 6, "links stay pinned after a crash");
        thread::sleep(Duration::from_secs(1));

        // What an upgrade's one-shot programming (or an operator) does while no agent runs.
        watch.phase("apply, no agent running");
        let out = agent.apply().expect("apply over the pins");
        assert!(
            out.contains("0 map change(s), 0 hook(s) attached")
                && out.contains("0 upgraded, 0 interface(s) detached"),
            "apply over the pins of the same input changes nothing: {out}"
        );

        let mut third = RunningAgent::start(&agent);
        watch.phase("third agent starting");
        let pass = third.first_pass();
        watch.phase("third agent reconciled");
        assert_adopted(&pass, "restart after SIGKILL and apply");
        thread::sleep(Duration::from_secs(1));
        let status = third.stop(Signal::SIGTERM);
        assert!(status.success(), "run exits cleanly on SIGTERM: {status}");
        watch.phase("no agent (end)");
        thread::sleep(Duration::from_millis(300));
    });
    let elapsed = started.elapsed().as_secs_f64();

    let report = [&echo, &c_to_b, &a_to_c, &c_to_b_udp, &a_to_c_udp]
        .map(Tally::summary)
        .join("\n  ");
    println!("over {elapsed:.1}s, three agents (SIGTERM, SIGKILL, apply):\n  {report}");
    // Three agent lifetimes plus the gaps take ~6 s: an echo every 50 ms and a new denied
    // connection every ~50 ms per path, so these minimums only catch a stalled check.
    echo.assert_clean(60);
    c_to_b.assert_clean(40);
    a_to_c.assert_clean(40);
    c_to_b_udp.assert_clean(2000);
    a_to_c_udp.assert_clean(2000);

    assert_eq!(
        attachments(&agent),
        attached,
        "the same links and programs after three restarts (adopted, never re-attached)"
    );
    assert_eq!(pinned_links(&agent), 6, "pins stay until reset");
    assert!(agent.pin_dir().join("maps").exists(), "maps stay pinned");
    let after = tcp(&lab, "t/c", "t/b", 8080);
    assert_eq!(
        after,
        ProbeOutcome::TimedOut,
        "c -> b dropped with no agent"
    );
}

#[test]
fn root_restart_with_a_changed_policy_reconciles_without_opening() {
    let lab = lab();
    let agent = Agent::new(&lab).unwrap();
    agent
        .set_policies(&[("a-lockdown", A_LOCKDOWN), ("b-from-a", B_FROM_A)])
        .unwrap();

    let mut first = RunningAgent::start(&agent);
    first.first_pass();
    assert!(
        eventually(Duration::from_secs(5), || tcp(&lab, "t/c", "t/b", 8080)
            == ProbeOutcome::TimedOut),
        "run enforces b's ingress (c -> b dropped)"
    );
    let a_to_b = tcp(&lab, "t/a", "t/b", 8080);
    assert!(a_to_b.is_open(), "a -> b:8080 is allowed: {a_to_b}");
    let stream = lab
        .open_tcp(("t", "a"), ip(&lab, "t/b"), 8080)
        .expect("a long-lived a -> b:8080 connection");
    let old_state = kernel_state(&agent);
    let old_classes = class_meanings(&agent);

    // Paths neither policy allows: a's ingress is isolated by both (a-lockdown, then
    // default-deny), and a -> c by a's egress, then by c's ingress. The new set also orders
    // differently: numbered afresh, its classes would take the old ones' ids for other
    // content (see the end).
    let watch = Watch::new(&lab);
    let echo = Tally::new("a -> b:8080 established before the change, echo");
    let c_to_a = Tally::new("c -> a:8080 new TCP (denied by both policies)");
    let a_to_c = Tally::new("a -> c:8080 new TCP (denied by both policies)");
    let c_to_a_udp = Tally::new("c -> a:5353/UDP canary (denied by both policies)");
    let a_to_c_udp = Tally::new("a -> c:5353/UDP canary (denied by both policies)");
    let started = Instant::now();
    let mut enforced_after = None;
    thread::scope(|s| {
        let _stop = StopOnDrop(&watch);
        let watch = &watch;
        s.spawn(|| watch.echo(&echo, stream));
        s.spawn(|| watch.denied_udp(&c_to_a_udp, "t/c", "t/a", 5353));
        s.spawn(|| watch.denied_udp(&a_to_c_udp, "t/a", "t/c", 5353));
        for worker in 0..PROBE_WORKERS {
            let (c_to_a, a_to_c) = (&c_to_a, &a_to_c);
            s.spawn(move || watch.denied_tcp(c_to_a, "t/c", "t/a", 8080, worker));
            s.spawn(move || watch.denied_tcp(a_to_c, "t/a", "t/c", 8080, worker));
        }

        watch.phase("old policy, agent running");
        thread::sleep(Duration::from_millis(300));
        let status = first.stop(Signal::SIGTERM);
        assert!(status.success(), "run exits cleanly on SIGTERM: {status}");

        watch.phase("policy changed, no agent");
        agent
            .set_policies(&[("default-deny", DEFAULT_DENY), ("b-from-c", B_FROM_C)])
            .unwrap();
        // Without an agent nothing reads the files: the kernel keeps the old policy.
        thread::sleep(Duration::from_millis(500));
        assert_eq!(
            tcp(&lab, "t/c", "t/b", 8080),
            ProbeOutcome::TimedOut,
            "c -> b stays dropped until an agent reads the new policy"
        );
        let a_to_b = tcp(&lab, "t/a", "t/b", 8080);
        assert!(
            a_to_b.is_open(),
            "a -> b stays open until an agent reads the new policy: {a_to_b}"
        );
        assert!(
            kernel_state(&agent) == old_state,
            "the kernel is untouched while no agent runs"
        );

        let mut second = RunningAgent::start(&agent);
        let spawned = Instant::now();
        watch.phase("new agent starting over the old pins");
        let pass = second.first_pass();
        watch.phase("new agent reconciled the new policy");
        assert!(pass.count("map_changes") > 0, "{:?}", pass.line);
        assert_eq!(pass.count("attached"), 0, "hooks adopted: {:?}", pass.line);
        let enforced = eventually(Duration::from_secs(5), || {
            tcp(&lab, "t/c", "t/b", 8080).is_open()
                && tcp(&lab, "t/a", "t/b", 8080) == ProbeOutcome::TimedOut
        });
        assert!(
            enforced,
            "the new policy is enforced within 5 s of its first pass (c -> b open, new a -> b \
             dropped):\n{}",
            second.log()
        );
        enforced_after = Some(spawned.elapsed());
        thread::sleep(Duration::from_secs(1));
        let status = second.stop(Signal::SIGTERM);
        assert!(status.success(), "run exits cleanly on SIGTERM: {status}");
        watch.phase("done");
    });
    let elapsed = started.elapsed().as_secs_f64();
    let new_classes = class_meanings(&agent);

    let report = [&echo, &c_to_a, &a_to_c, &c_to_a_udp, &a_to_c_udp]
        .map(Tally::summary)
        .join("\n  ");
    println!(
        "over {elapsed:.1}s; the new policy was enforced {:?} after the new agent started; \
         classes before {old_classes:?}, after {new_classes:?}:\n  {report}",
        enforced_after.expect("the scenario ran")
    );
    c_to_a.assert_clean(20);
    a_to_c.assert_clean(20);
    c_to_a_udp.assert_clean(1000);
    a_to_c_udp.assert_clean(1000);
    // Policy changes apply to new connections (no --flush-denied): the one a opened under
    // the old policy keeps passing on its conntrack entry, across the restart too.
    echo.assert_clean(30);

    // The probes see a path open only if a packet lands in the moment it is open. What opens
    // it is visible in the ids: the maps are written one entry at a time (rules first, then
    // endpoints, then removals), so an id the pinned state used that now stands for other
    // content gives the other class's rules to the endpoints still carrying it, between
    // writes. With these policies a's old ingress class id would be b's new one (c admitted
    // to a), and b's old one a's and c's new one (a admitted to c).
    let reused: Vec<String> = old_classes
        .iter()
        .filter_map(|(id, old)| {
            let new = new_classes.get(id)?;
            (new != old).then(|| format!("class {id}: {old} -> {new}"))
        })
        .collect();
    assert!(
        reused.is_empty(),
        "the new agent gave pinned class ids to other content, which opens paths neither \
         policy allows while it rewrites the maps: {reused:?}"
    );
}
