//! Multi-policy scenarios replayed in the lab: at each step the agent programs the kernel,
//! every pod probes every other pod's every port with real sockets, and each probe must agree
//! with `netpol-agent simulate` on the same manifests. Needs root and the kernel (the lab
//! refuses to start without them); fails loudly, never skips.
//!
//! A scenario is a directory under `tests/scenarios/`: `pods.yaml` (the lab) and `stepN/`
//! directories whose policy files replace the previous step's (an empty step deletes all).

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use netpol_tests::{
    agent::{agent_bin, Agent},
    lab::{Lab, LabOptions, LabSpec, ProbeKind},
    scenario::probe_matrix,
};

fn scenario_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scenarios")
        .join(name)
}

fn steps(dir: &Path) -> Vec<PathBuf> {
    let mut steps: Vec<PathBuf> = fs::read_dir(dir)
        .expect("scenario dir")
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    steps.sort();
    assert!(!steps.is_empty(), "{} has no steps", dir.display());
    steps
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

/// `simulate -o json` over the manifests the agent applied: (from, to, port, protocol) -> allowed.
fn simulate(manifests: &Path) -> BTreeMap<(String, String, u16, String), bool> {
    let out = Command::new(agent_bin())
        .args(["simulate", "-o", "json", "--manifests"])
        .arg(manifests)
        .env("NETPOL_LOG", "warn")
        .output()
        .expect("running simulate");
    assert!(
        out.status.success(),
        "simulate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("simulate prints one JSON object");
    json["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|r| {
            (
                (
                    r["from"].as_str().unwrap().to_string(),
                    r["to"].as_str().unwrap().to_string(),
                    u16::try_from(r["port"].as_u64().unwrap()).unwrap(),
                    r["protocol"].as_str().unwrap().to_string(),
                ),
                r["allowed"].as_bool().unwrap(),
            )
        })
        .collect()
}

fn replay(name: &str) {
    let dir = scenario_dir(name);
    let spec = LabSpec::load(dir.join("pods.yaml")).expect("pods.yaml parses");
    let lab = Lab::start(&spec, LabOptions::default()).expect("lab starts (needs root)");
    let agent = Agent::new(&lab).unwrap();
    let (mut open, mut closed) = (0, 0);
    let mut failures = Vec::new();
    for step in steps(&dir) {
        let step_name = step.file_name().unwrap().to_string_lossy().into_owned();
        agent.set_policy_files(&yaml_files(&step)).unwrap();
        agent
            .apply()
            .unwrap_or_else(|e| panic!("{name}/{step_name}: {e:#}"));
        let expected = simulate(agent.manifests_dir());
        let matrix = probe_matrix(&lab);
        for cell in &matrix.cells {
            let protocol = if cell.kind == ProbeKind::Udp {
                "UDP"
            } else {
                "TCP"
            };
            let key = (
                cell.from.clone(),
                cell.to.clone(),
                cell.port,
                protocol.to_string(),
            );
            let Some(&allowed) = expected.get(&key) else {
                failures.push(format!("{step_name}: simulate has no result for {key:?}"));
                continue;
            };
            if cell.outcome.is_open() {
                open += 1;
            } else {
                closed += 1;
            }
            if cell.outcome.is_open() != allowed {
                failures.push(format!(
                    "{step_name}: {} -> {}:{}/{protocol}: kernel {}, simulate {}",
                    cell.from,
                    cell.to,
                    cell.port,
                    cell.outcome,
                    if allowed { "allowed" } else { "denied" }
                ));
            }
        }
        if !failures.is_empty() {
            eprintln!("{name}/{step_name} kernel matrix:\n{}", matrix.render());
        }
    }
    assert!(
        failures.is_empty(),
        "{name}: kernel and simulate disagree:\n  {}",
        failures.join("\n  ")
    );
    // A scenario that never opens or never closes anything would prove little.
    assert!(
        open > 0 && closed > 0,
        "{name}: {open} open and {closed} closed probes"
    );
}

macro_rules! scenarios {
    ($($test:ident => $dir:literal),* $(,)?) => {
        $(
            #[test]
            fn $test() {
                replay($dir);
            }
        )*

        #[test]
        fn every_scenario_directory_has_a_test() {
            let known = [$($dir),*];
            for entry in fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios")).unwrap() {
                let name = entry.unwrap().file_name().to_string_lossy().into_owned();
                assert!(known.contains(&name.as_str()), "scenario {name} has no test");
            }
        }
    };
}

scenarios! {
    root_scenario_01_default_deny_then_allow => "01-default-deny-then-allow",
    root_scenario_02_egress_udp_only => "02-egress-udp-only",
    root_scenario_03_namespace_selectors => "03-namespace-selectors",
    root_scenario_04_ipblock_except_pod_ips => "04-ipblock-except-pod-ips",
    root_scenario_05_named_ports => "05-named-ports",
    root_scenario_06_endport => "06-endport",
    root_scenario_07_udp_not_tcp => "07-udp-not-tcp",
    root_scenario_08_update_then_delete => "08-update-then-delete",
    root_scenario_09_additive_both_ends => "09-additive-both-ends",
    root_scenario_10_match_expressions => "10-match-expressions",
    root_scenario_11_policy_types => "11-policy-types",
    root_scenario_12_egress_ipblock_range => "12-egress-ipblock-range",
}
