//! One reconcile pass: snapshot -> compile -> desired maps -> diff against the kernel -> write,
//! attach, detach. Level-triggered: it reads what the kernel holds each time, so running it
//! twice on the same input changes nothing the second time.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::Path,
    time::{Duration, Instant},
};

use tracing::{debug, info, warn};

use crate::{
    cni_pods::{self, CniPodsError},
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
    #[error("the CNI plugin's pod records")]
    CniPods(#[from] CniPodsError),
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
    /// Interfaces the CNI plugin wired for a pod this pass could not enforce (not in the
    /// snapshot, or not on this node yet): kept closed, with the pod's name and interface.
    pub held: Vec<(ObjectRef, String)>,
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
    // Held for the whole pass: the CNI plugin closes a new pod's interface under it, so the
    // pass either sees its record or runs before the interface carries anything.
    let _cni_lock = cni_pods::lock(state_dir)?;
    let cni = cni_pods::live(state_dir)?;
    let reported: BTreeMap<ObjectRef, Vec<IpAddr>> =
        cni.iter().map(|p| (p.pod(), p.ips.clone())).collect();
    let addressed;
    let snapshot = if snapshot
        .unaddressed
        .iter()
        .any(|p| reported.contains_key(&p.id))
    {
        let mut s = snapshot.clone();
        s.adopt_addresses(&reported);
        addressed = s;
        &addressed
    } else {
        snapshot
    };
    let host_addrs = host::addresses()?;
    let have = maps::read(dp.pins())?;
    // A process without the previous one's ids (a restart, a one-shot `apply`) takes them from
    // the state directory; failing that, it numbers above every id the maps hold. An id in
    // use never gets another meaning.
    let restored;
    let prev = if prev.identities.is_empty() && prev.classes.is_empty() {
        restored = restore_allocation(state_dir, &have);
        &restored
    } else {
        prev
    };
    let compiled = compile_with(snapshot, &Scope::Node(node.to_string()), &host_addrs, prev);
    report.warnings = compiled.warnings.clone();

    let routes = host::routes()?;
    let mut ifindex_of: BTreeMap<ObjectRef, u32> = BTreeMap::new();
    let mut interfaces: BTreeMap<u32, String> = BTreeMap::new();
    for (pod, ep) in &compiled.endpoints {
        let found = ep
            .ips
            .iter()
            .find_map(|ip| {
                let route = host::longest_route(&routes, *ip)?;
                Some((host::ifindex(&route.interface)?, route.interface.clone()))
            })
            // No route yet (another CNI plugin's way): the interface its ADD reported.
            .or_else(|| {
                cni.iter()
                    .find(|c| c.pod() == *pod)
                    .map(|c| (c.ifindex, c.interface.clone()))
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

    let mut want = desired::map_contents(&compiled, &ifindex_of);
    // A wired interface with no pod enforced on it stays as the plugin left it: closed.
    for c in &cni {
        if let std::collections::btree_map::Entry::Vacant(slot) = want.endpoints.entry(c.ifindex) {
            slot.insert(desired::closed_endpoint(&c.ips));
            interfaces.insert(c.ifindex, c.interface.clone());
            report.held.push((c.pod(), c.interface.clone()));
        }
    }
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

    let mut names = Names::new(node, &compiled, &ifindex_of);
    for c in &cni {
        names
            .endpoints
            .entry(c.ifindex)
            .or_insert_with(|| c.pod().to_string());
    }
    names
        .write(state_dir)
        .map_err(|source| ReconcileError::Names {
            path: state_dir.display().to_string(),
            source,
        })?;
    save_allocation(state_dir, &compiled.allocation).map_err(|source| ReconcileError::Names {
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
        held = report.held.len(),
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

/// Where the ids of the last pass are kept, beside the names file.
pub fn allocation_path(state_dir: &Path) -> std::path::PathBuf {
    state_dir.join("allocation.json")
}

fn save_allocation(state_dir: &Path, allocation: &Allocation) -> std::io::Result<()> {
    std::fs::create_dir_all(state_dir)?;
    let tmp = state_dir.join(".allocation.json.tmp");
    std::fs::write(&tmp, allocation.to_json())?;
    std::fs::rename(tmp, allocation_path(state_dir))
}

/// The ids the previous process saved, with counters at least above every pinned id; or, when
/// there is no readable file, fresh counters above every pinned id.
fn restore_allocation(state_dir: &Path, have: &desired::MapContents) -> Allocation {
    let floor = desired::allocation_above(have);
    let saved = std::fs::read_to_string(allocation_path(state_dir))
        .ok()
        .and_then(|text| match Allocation::from_json(&text) {
            Ok(a) => Some(a),
            Err(e) => {
                warn!(error = %e, "unreadable allocation.json: numbering above the pinned ids");
                None
            }
        });
    match saved {
        Some(mut a) => {
            a.next_identity = a.next_identity.max(floor.next_identity);
            a.next_class = a.next_class.max(floor.next_class);
            a.next_rule_set = a.next_rule_set.max(floor.next_rule_set);
            a.next_service = a.next_service.max(floor.next_service);
            a
        }
        None => floor,
    }
}
