//! The local demo: the seed tutorial's 3-tier app in a lab node with its Services and cluster
//! DNS, the seed's curl and telnet probes by service name before and after `deploy/examples`,
//! and what netpol programmed for one pod.

use std::{fs, time::Duration};

use anyhow::{bail, Context as _, Result};
use netpol_tests::{
    agent::Agent,
    lab::{Lab, LabOptions, LabSpec, NameProbe, ProbeOutcome},
};

use crate::{
    setup,
    util::{build_agent, step, workspace_root},
};

pub fn run() -> Result<()> {
    setup::run()?;
    let bin = build_agent(false)?;
    // The test helpers look the binary up here.
    // SAFETY: single-threaded at this point.
    unsafe { std::env::set_var("NETPOL_AGENT_BIN", &bin) };

    let root = workspace_root();
    let spec = LabSpec::load(root.join("deploy/lab/three-tier-services.yaml"))?;
    step("starting the lab: a node network namespace, one per pod (CNI ptp), kube-proxy's DNAT rules, dnsmasq as kube-dns");
    let lab = Lab::start(
        &spec,
        LabOptions {
            probe_timeout: Duration::from_secs(1),
            dns: true,
            ..Default::default()
        },
    )?;
    println!("node {} (netns {})", lab.node_name(), lab.node_netns());
    for pod in lab.pods() {
        let ports: Vec<String> = pod.ports.iter().map(|p| p.port.to_string()).collect();
        println!(
            "  pod {}/{}  {}  ports {}",
            pod.namespace,
            pod.name,
            pod.ip,
            ports.join(",")
        );
    }
    for svc in lab.services() {
        let ip = svc
            .cluster_ip
            .map_or("None (headless)".to_string(), |ip| ip.to_string());
        println!("  service {}/{}  {ip}", svc.namespace, svc.name);
    }
    let agent = Agent::new(&lab)?;
    let probes = seed_probes();

    step("1. no policy: netpol-agent apply, then the seed's probes from inside the pods");
    agent.set_policies(&[])?;
    print!("{}", agent.apply()?);
    let before = run_probes(&lab, &probes);
    let closed = before.iter().filter(|o| !o.is_open()).count();
    if closed > 0 {
        bail!("with no policy every probe should connect; {closed} did not");
    }

    let examples: Vec<_> = {
        let mut v: Vec<_> = fs::read_dir(root.join("deploy/examples"))?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()?;
        v.retain(|p| p.extension().is_some_and(|e| e == "yaml"));
        v.sort();
        v
    };
    step("2. applying the seed's policies from deploy/examples/");
    for e in &examples {
        println!("  {}", e.strip_prefix(&root).unwrap_or(e).display());
    }
    agent.set_policy_files(&examples)?;
    print!("{}", agent.apply()?);
    let after = run_probes(&lab, &probes);

    step("3. netpol-agent dump --pod app1-ns/frontend");
    print!("{}", agent.dump_table(Some("app1-ns/frontend"))?);

    step("expectation");
    let mismatches: Vec<String> = probes
        .iter()
        .zip(&after)
        .filter(|((_, _, open), outcome)| outcome.is_open() != *open)
        .map(|((pod, command, open), outcome)| {
            let want = if *open { "open" } else { "closed" };
            format!("{pod}: {command}: expected {want}, got {outcome}")
        })
        .collect();
    if !mismatches.is_empty() {
        bail!("the probes do not match:\n  {}", mismatches.join("\n  "));
    }
    println!("every probe matches the seed's expectation");

    step("cleaning up (netpol-agent reset, lab teardown)");
    print!("{}", agent.reset().context("reset")?);
    drop(agent);
    drop(lab);
    println!("done");
    Ok(())
}

/// The seed's probes: (pod, command as typed in `kubectl exec`, open once the seed's policies
/// are applied).
fn seed_probes() -> Vec<(&'static str, &'static str, bool)> {
    vec![
        ("frontend", "telnet backend-svc 5678", true),
        ("frontend", "curl backend-svc:5678", true),
        (
            "frontend",
            "telnet db-sts-0.db-svc.app1-ns.svc.cluster.local 3306",
            false,
        ),
        (
            "backend",
            "telnet db-sts-0.db-svc.app1-ns.svc.cluster.local 3306",
            true,
        ),
        ("backend", "curl frontend-svc", false),
        ("db-sts-0", "curl frontend-svc", false),
        ("db-sts-0", "telnet backend-svc 5678", false),
    ]
}

/// Runs the probes in parallel and prints one line each.
fn run_probes(lab: &Lab, probes: &[(&str, &str, bool)]) -> Vec<ProbeOutcome> {
    let parsed: Vec<Result<NameProbe>> = probes
        .iter()
        .map(|(pod, command, _)| NameProbe::parse(("app1-ns", pod), command))
        .collect();
    let runnable: Vec<NameProbe> = parsed
        .iter()
        .filter_map(|p| p.as_ref().ok())
        .cloned()
        .collect();
    let mut outcomes = lab.probe_names(&runnable).into_iter();
    let results: Vec<ProbeOutcome> = parsed
        .iter()
        .map(|p| match p {
            Ok(_) => outcomes
                .next()
                .unwrap_or(ProbeOutcome::Error("not run".into())),
            Err(e) => ProbeOutcome::Error(format!("{e:#}")),
        })
        .collect();
    for ((pod, command, _), outcome) in probes.iter().zip(&results) {
        let mark = if outcome.is_open() { "." } else { "X" };
        println!(
            "  {mark} {:<10} $ {command:<58} {outcome}",
            format!("{pod}")
        );
    }
    results
}
