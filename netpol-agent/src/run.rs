//! `netpol-agent run` with a file source: reconcile, then again whenever the manifests change
//! (polled, debounced) and at least every resync period. Exits on SIGINT/SIGTERM, leaving
//! enforcement pinned in place.

use std::{
    fs,
    path::PathBuf,
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context as _;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info};

use netpol_agent::{cli::RunArgs, conntrack, reconcile, source};

use crate::{load_dataplane, load_snapshot};

/// What the manifest files look like from outside: changes when any is added, removed,
/// touched or resized.
fn fingerprint(paths: &[PathBuf]) -> Vec<(PathBuf, Option<SystemTime>, u64)> {
    paths
        .iter()
        .flat_map(|p| source::file::files(p).unwrap_or_else(|_| vec![p.clone()]))
        .map(|f| {
            let meta = fs::metadata(&f).ok();
            let modified = meta.as_ref().and_then(|m| m.modified().ok());
            let len = meta.map_or(0, |m| m.len());
            (f, modified, len)
        })
        .collect()
}

pub fn run(args: &RunArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(run_loop(args))
}

async fn run_loop(args: &RunArgs) -> anyhow::Result<()> {
    let node = args.node.node();
    let state_dir = args.node.state_dir();
    let mut dp = load_dataplane(&args.node, &args.datapath)?;
    let opts = reconcile::Options {
        flush_denied: args.datapath.flush_denied,
    };
    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let poll = Duration::from_millis(args.poll_ms.max(50));
    let resync = Duration::from_secs(args.resync_s.max(1));

    let mut seen = None;
    // Ids stay stable across passes: a change rewrites only the entries it must.
    let mut allocation = netpol_agent::policy::Allocation::default();
    let mut last_pass = Instant::now() - resync;
    loop {
        let now = fingerprint(&args.manifests);
        let resync_due = last_pass.elapsed() >= resync;
        if resync_due {
            match conntrack::gc(dp.pins()) {
                Ok(report) => info!(
                    flows = report.flows,
                    fragments = report.fragments,
                    "expired entries collected"
                ),
                Err(e) => error!("conntrack gc failed: {:#}", anyhow::Error::from(e)),
            }
        }
        if seen.as_ref() != Some(&now) || resync_due {
            // Debounce: editors write files in several steps.
            tokio::time::sleep(Duration::from_millis(100)).await;
            let settled = fingerprint(&args.manifests);
            if settled != now {
                continue;
            }
            match load_snapshot(&args.manifests, false) {
                Ok(snapshot) => {
                    match reconcile::reconcile(
                        &mut dp,
                        &snapshot,
                        &node,
                        &state_dir,
                        &allocation,
                        opts,
                    ) {
                        Ok(report) => allocation = report.allocation,
                        Err(e) => {
                            error!("reconcile failed, will retry: {:#}", anyhow::Error::from(e))
                        }
                    }
                }
                // Keep the kernel as it was: programming half the input could open paths.
                Err(e) => error!("{e:#}; enforcement left as it was"),
            }
            seen = Some(settled);
            last_pass = Instant::now();
        }
        tokio::select! {
            _ = tokio::time::sleep(poll) => {}
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
        }
    }
    info!(node, "stopping; enforcement stays pinned");
    Ok(())
}
