//! netpol-agent: wires the command line to sources, the compiler and the dataplane.

mod run;

use std::process::ExitCode;

use anyhow::{bail, Context as _};
use clap::Parser as _;
use tracing::{error, warn};

use netpol_agent::{
    cli::{self, ApplyArgs, Cli, Command, DumpArgs, NodeArgs, Output, SimulateArgs},
    conntrack, dataplane, dump, plugin, policy, reconcile, simulate, source,
};

/// The name the CNI configuration gives the plugin: run as that, this binary is the plugin.
const PLUGIN_NAME: &str = "netpol-cni";

fn main() -> ExitCode {
    let invoked_as = std::env::args_os().next().unwrap_or_default();
    if std::path::Path::new(&invoked_as).file_name() == Some(PLUGIN_NAME.as_ref()) {
        // The runtime passes no arguments; stdout is the CNI result, logs go to stderr.
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(
                std::env::var("NETPOL_LOG").unwrap_or_else(|_| "warn".into()),
            ))
            .with_writer(std::io::stderr)
            .init();
        return plugin::main();
    }
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&cli.log))
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Apply(args) => apply(&args),
        Command::Run(args) => run::run(&args),
        Command::Reset(args) => reset(&args),
        Command::Dump(args) => dump(&args),
        Command::Gc(args) => gc(&args),
        Command::Simulate(args) => simulate_cmd(&args),
        Command::Cni => return plugin::main(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Loads the manifests, reporting every problem. Fails when a file could not be read (the
/// input is incomplete: programming it could open what a missing policy closes) or, with
/// `strict`, when any object is invalid.
pub(crate) fn load_snapshot(
    manifests: &[std::path::PathBuf],
    strict: bool,
) -> anyhow::Result<policy::Snapshot> {
    let (snapshot, errors) = source::file::load(manifests);
    let fatal = errors.iter().filter(|e| e.is_fatal()).count();
    for e in &errors {
        if e.is_fatal() {
            error!("{}", netpol_agent::error_chain(e));
        } else {
            warn!("{e} (fails closed: the policy isolates what it selects and allows nothing)");
        }
    }
    if fatal > 0 {
        bail!("{fatal} manifest file(s) unreadable; nothing programmed");
    }
    if strict && !errors.is_empty() {
        bail!(
            "{} invalid object(s) and --strict; nothing programmed",
            errors.len()
        );
    }
    Ok(snapshot)
}

fn apply(args: &ApplyArgs) -> anyhow::Result<()> {
    let snapshot = load_snapshot(&args.manifests, args.strict)?;
    let node = args.node.node();
    let mut dp = load_dataplane(&args.node, &args.datapath)?;
    let report = reconcile::reconcile(
        &mut dp,
        &snapshot,
        &node,
        &args.node.state_dir(),
        &policy::Allocation::default(),
        reconcile::Options {
            flush_denied: args.datapath.flush_denied,
        },
    )?;
    for w in &report.warnings {
        warn!("{w}");
    }
    println!(
        "applied on node {node}: {} pod(s) enforced, {} map change(s), {} hook(s) attached, {} adopted, {} upgraded, {} interface(s) detached",
        report.enforced.len(),
        report.map_changes,
        report.attached,
        report.adopted,
        report.upgraded,
        report.detached
    );
    if args.datapath.flush_denied {
        println!(
            "flushed {} tracked flow(s) the policy denies",
            report.flushed
        );
    }
    if !report.missing.is_empty() {
        let pods: Vec<String> = report.missing.iter().map(ToString::to_string).collect();
        bail!(
            "no interface found for pod(s) {} on node {node}",
            pods.join(", ")
        );
    }
    Ok(())
}

/// Loads the programs, sized as asked; warns when an adopted conntrack table has another size.
pub(crate) fn load_dataplane(
    node: &NodeArgs,
    datapath: &cli::DatapathArgs,
) -> anyhow::Result<dataplane::Dataplane> {
    let pins = node.pins();
    let opts = dataplane::LoadOptions {
        conntrack_entries: Some(datapath.conntrack_entries),
        host_routing: datapath.host_routing,
    };
    let dp = dataplane::Dataplane::load_with(&pins, &opts).context("loading the dataplane")?;
    let size = dataplane::maps::capacity(&pins, netpol_common::map_name::CONNTRACK)?;
    if size != datapath.conntrack_entries {
        warn!(
            pinned = size,
            asked = datapath.conntrack_entries,
            "the pinned conntrack table keeps its size; `reset` to resize it"
        );
    }
    Ok(dp)
}

fn gc(args: &NodeArgs) -> anyhow::Result<()> {
    let pins = args.pins();
    if !pins.exists() {
        bail!("nothing programmed for node {}", args.node());
    }
    let report = conntrack::gc(&pins)?;
    println!(
        "gc on node {}: {} expired flow(s), {} expired fragment entr(ies) removed",
        args.node(),
        report.flows,
        report.fragments
    );
    Ok(())
}

fn reset(args: &NodeArgs) -> anyhow::Result<()> {
    let pins = args.pins();
    let report = dataplane::reset(&pins)?;
    let state = args.state_dir();
    if state.exists() {
        std::fs::remove_dir_all(&state).with_context(|| format!("removing {}", state.display()))?;
    }
    println!(
        "reset node {}: {} link(s) removed from {} interface(s); {} removed",
        args.node(),
        report.links,
        report.interfaces.len(),
        pins.path().display()
    );
    Ok(())
}

fn dump(args: &DumpArgs) -> anyhow::Result<()> {
    let pins = args.node.pins();
    if !pins.exists() {
        bail!(
            "nothing programmed for node {} ({} does not exist)",
            args.node.node(),
            pins.path().display()
        );
    }
    if args.what == Some(cli::DumpWhat::Conntrack) {
        let flows = dump::collect_conntrack(&pins, &args.node.state_dir(), args.pod.as_deref())?;
        match args.output {
            Output::Table => print!("{}", dump::render_conntrack(&flows)),
            Output::Json => println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({ "flows": flows }))?
            ),
        }
        return Ok(());
    }
    let dump = dump::collect(&pins, &args.node.state_dir(), args.pod.as_deref())?;
    match args.output {
        Output::Table => print!("{}", dump::render_table(&dump)),
        Output::Json => println!("{}", serde_json::to_string_pretty(&dump)?),
    }
    Ok(())
}

fn pod_ref(arg: Option<&str>, flag: &str) -> anyhow::Result<Option<policy::model::ObjectRef>> {
    arg.map(|s| {
        s.split_once('/')
            .filter(|(ns, name)| !ns.is_empty() && !name.is_empty())
            .map(|(ns, name)| policy::model::ObjectRef::new(ns, name))
            .ok_or_else(|| anyhow::anyhow!("{flag} {s:?}: expected namespace/name"))
    })
    .transpose()
}

fn simulate_cmd(args: &SimulateArgs) -> anyhow::Result<()> {
    let snapshot = load_snapshot(&args.manifests, false)?;
    let query = simulate::Query {
        from: pod_ref(args.from.as_deref(), "--from")?,
        to: pod_ref(args.to.as_deref(), "--to")?,
        port: args.port,
        protocol: args
            .protocol
            .as_deref()
            .and_then(policy::model::Protocol::parse),
    };
    for side in [&query.from, &query.to].into_iter().flatten() {
        if !snapshot.pods.iter().any(|p| &p.id == side) {
            bail!("pod {side} is not in the manifests (or has no address)");
        }
    }
    let sim = simulate::simulate(&snapshot, &query);
    match args.output {
        Output::Table => print!("{}", simulate::render_table(&sim)),
        Output::Json => println!("{}", serde_json::to_string(&sim)?),
    }
    Ok(())
}
