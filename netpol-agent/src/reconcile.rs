//! One reconcile pass: snapshot -> compile -> desired maps -> diff against the kernel -> write,
//! attach, detach. Level-triggered: it reads what the kernel holds each time, so running it
//! twice on the same input changes nothing the second time.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    time::{Duration, Instant},
};

use tracing::{debug, info, warn};

use crate::{
    conntrack,
    dataplane::{
        attach::{self, AttachOutcome},
        host, maps, Dataplane, DataplaneError,
    },
    names::Names,
    policy::{
        compile_with, desired,
        model::{ObjectRef, Snapshot},
        Allocation, Scope,
    },
};

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    #[error("writing names to {path}")]
    Names {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// What a pass did.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Local pods enforced, with their interface.
    pub enforced: Vec<(ObjectRef, String)>,
    /// Local pods whose interface was not found: not enforced yet.
    pub missing: Vec<ObjectRef>,
    pub map_changes: usize,
    pub attached: usize,
    pub adopted: usize,
    pub upgraded: usize,
    pub detached: usize,
    pub warnings: Vec<String>,
    /// Conntrack entries removed because the new policy denies them (`flush_denied`).
    pub flushed: usize,
    pub duration: Duration,
    /// The ids this pass used: pass them to the next pass to keep them stable.
    pub allocation: Allocation,
}

/// How a pass treats what is already tracked.
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    /// After programming, remove conntrack entries the new policy denies (see `conntrack`).
    pub flush_denied: bool,
}

/// `prev`: the ids of the previous pass (default: none), so that unchanged content keeps its
/// ids and a change rewrites only the entries it must.
pub fn reconcile(
    dp: &mut Dataplane,
    snapshot: &Snapshot,
    node: &str,
    state_dir: &Path,
    prev: &Allocation,
    opts: Options,
) -> Result<Report, ReconcileError> {
    let started = Instant::now();
    let mut report = Report::default();
    let host_addrs = host::addresses()?;
    let compiled = compile_with(snapshot, &Scope::Node(node.to_string()), &host_addrs, prev);
    report.warnings = compiled.warnings.clone();

    let routes = host::routes()?;
    let mut ifindex_of: BTreeMap<ObjectRef, u32> = BTreeMap::new();
    let mut interfaces: BTreeMap<u32, String> = BTreeMap::new();
    for (pod, ep) in &compiled.endpoints {
        let found = ep.ips.iter().find_map(|ip| {
            let route = host::longest_route(&routes, *ip)?;
            Some((host::ifindex(&route.interface)?, route.interface.clone()))
        });
        match found {
            Some((ifindex, name)) => {
                ifindex_of.insert(pod.clone(), ifindex);
                interfaces.insert(ifindex, name.clone());
                report.enforced.push((pod.clone(), name));
            }
            None => {
                warn!(pod = %pod, "no route to the pod's address: not enforced yet");
                report.missing.push(pod.clone());
            }
        }
    }

    let want = desired::map_contents(&compiled, &ifindex_of);
    let have = maps::read(dp.pins())?;
    let diff = desired::diff(&want, &have);
    report.map_changes = diff.changes();
    if !diff.is_empty() {
        maps::write(dp.pins(), &diff)?;
    }

    for (ifindex, name) in &interfaces {
        for outcome in dp.attach(*ifindex, name)? {
            match outcome {
                AttachOutcome::Attached => report.attached += 1,
                AttachOutcome::Adopted => report.adopted += 1,
                AttachOutcome::Upgraded => report.upgraded += 1,
            }
        }
    }
    let keep: BTreeSet<u32> = interfaces.keys().copied().collect();
    report.detached = attach::detach_except(dp.pins(), &keep)?.len();
    if opts.flush_denied {
        report.flushed = conntrack::flush_denied(dp.pins(), &compiled, &ifindex_of)?;
    }

    Names::new(node, &compiled, &ifindex_of)
        .write(state_dir)
        .map_err(|source| ReconcileError::Names {
            path: state_dir.display().to_string(),
            source,
        })?;
    report.allocation = compiled.allocation;
    report.duration = started.elapsed();
    debug!(?report, "reconciled");
    info!(
        node,
        enforced = report.enforced.len(),
        missing = report.missing.len(),
        map_changes = report.map_changes,
        attached = report.attached,
        adopted = report.adopted,
        upgraded = report.upgraded,
        detached = report.detached,
        flushed = report.flushed,
        ms = report.duration.as_millis() as u64,
        "reconciled"
    );
    Ok(report)
}
