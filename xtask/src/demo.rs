//! The local demo: the seed tutorial's 3-tier app in a lab node, connectivity before and after
//! `deploy/examples`, and what netpol programmed for one pod.

use std::{fs, time::Duration};

use anyhow::{bail, Context as _, Result};
use netpol_tests::{
    agent::Agent,
    lab::{Lab, LabOptions, LabSpec},
    scenario::{probe_matrix, three_tier_expected},
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
    let spec = LabSpec::load(root.join("deploy/lab/three-tier.yaml"))?;
    step("starting the lab: a node network namespace, one per pod, wired by the CNI ptp plugin");
    let lab = Lab::start(
        &spec,
        LabOptions {
            probe_timeout: Duration::from_secs(1),
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
    let agent = Agent::new(&lab)?;

    step("1. no policy: netpol-agent apply, then probe every pod from every pod ('.' open, 'X' closed)");
    agent.set_policies(&[])?;
    print!("{}", agent.apply()?);
    let before = probe_matrix(&lab);
    print!("{}", before.render());
    let closed: Vec<_> = before
        .cells
        .iter()
        .filter(|c| !c.outcome.is_open())
        .collect();
    if !closed.is_empty() {
        bail!(
            "with no policy every probe should connect; {} did not",
            closed.len()
        );
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
    let after = probe_matrix(&lab);
    print!("{}", after.render());

    step("3. netpol-agent dump --pod app1-ns/backend");
    print!("{}", agent.dump_table(Some("app1-ns/backend"))?);

    step("expectation");
    println!("frontend->backend:5678 and backend->db:3306 open; frontend->db, backend->frontend, db->anything closed");
    let mismatches = after.mismatches(three_tier_expected);
    if !mismatches.is_empty() {
        bail!("the matrix does not match:\n  {}", mismatches.join("\n  "));
    }
    println!("matrix matches the expectation");

    step("cleaning up (netpol-agent reset, lab teardown)");
    print!("{}", agent.reset().context("reset")?);
    drop(agent);
    drop(lab);
    println!("done");
    Ok(())
}
