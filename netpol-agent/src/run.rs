//! `netpol-agent run`: reconcile, then again whenever the source changes and at least every
//! resync period. The source is manifest files (polled, debounced) or the Kubernetes API
//! (reflectors; any event wakes the loop). Both feed the same path: snapshot -> reconcile.
//! A request from the CNI plugin on the unix socket (a pod just wired) wakes it too, and is
//! answered once that pass is done. Serves `/metrics`, `/healthz`, `/readyz`. Exits on
//! SIGINT/SIGTERM, leaving enforcement pinned in place for the next agent to adopt.

use std::{
    fs,
    path::PathBuf,
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context as _;
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::{mpsc, Notify},
};
use tracing::{error, info, warn};

use netpol_agent::{
    cli::RunArgs,
    cni_pods,
    cni_socket::{self, Outcome, Pending, Reply},
    conntrack,
    dataplane::{Dataplane, PinDir},
    node::{cni, routes, NodeNet},
    policy::{model::ObjectRef, Allocation, Snapshot},
    reconcile,
    serve::{self, Health},
    source::{self, kube::KubeSource},
};

use crate::{load_dataplane, load_snapshot};

/// What a manifest set looks like from outside: changes when any file is added, removed,
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

/// Where snapshots come from.
enum Source {
    Files {
        paths: Vec<PathBuf>,
        seen: Option<Vec<(PathBuf, Option<SystemTime>, u64)>>,
    },
    Kube {
        source: KubeSource,
        changed: Arc<Notify>,
        synced: bool,
    },
}

impl Source {
    /// Whether the input changed since the last snapshot (files: by fingerprint; the API:
    /// the loop was woken by an event, which `wait` consumed).
    fn files_changed(&mut self) -> bool {
        match self {
            Source::Files { paths, seen } => seen.as_ref() != Some(&fingerprint(paths)),
            Source::Kube { .. } => false,
        }
    }

    /// The snapshot to program, or `None` when there is nothing safe to program yet.
    async fn snapshot(&mut self) -> Option<Snapshot> {
        match self {
            Source::Files { paths, seen } => {
                // Debounce: editors write files in several steps.
                let before = fingerprint(paths);
                tokio::time::sleep(Duration::from_millis(100)).await;
                let settled = fingerprint(paths);
                if settled != before {
                    return None;
                }
                *seen = Some(settled);
                match load_snapshot(paths, false) {
                    Ok(snapshot) => Some(snapshot),
                    // Keep the kernel as it was: programming half the input could open paths.
                    Err(e) => {
                        error!("{e:#}; enforcement left as it was");
                        None
                    }
                }
            }
            Source::Kube { source, synced, .. } => {
                if !*synced {
                    return None;
                }
                // Coalesce a burst of events into one pass.
                tokio::time::sleep(Duration::from_millis(200)).await;
                let (snapshot, errors) = source.snapshot();
                for e in &errors {
                    warn!("{e} (fails closed: the object isolates what it selects and allows nothing)");
                }
                Some(snapshot)
            }
        }
    }
}

async fn run_loop(args: &RunArgs) -> anyhow::Result<()> {
    let node = args.node.node();
    let state_dir = args.node.state_dir();
    let mut dp = load_dataplane(&args.node, &args.datapath)?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let poll = Duration::from_millis(args.poll_ms.max(50));
    let resync = Duration::from_secs(args.resync_s.max(1));
    let opts = reconcile::Options {
        flush_denied: args.datapath.flush_denied,
    };

    let health = Arc::new(Health::default());
    health.tick();
    let _server = start_server(args, &health, dp.pins().clone()).await;
    // Kept here so the channel never closes, whether or not the socket could be bound.
    let (cni_tx, mut cni_rx) = mpsc::channel::<Pending>(64);
    let cni_socket = args.cni_socket();
    let _cni_server = start_cni_server(&cni_socket, cni_tx.clone());
    let plugin = netpol_agent::node::cni::PluginConf {
        node_name: node.clone(),
        bpffs: args.node.bpffs.clone(),
        state_dir: state_dir.clone(),
        socket: cni_socket.clone(),
    };
    // The configuration names the plugin, so it is written only once the plugin is in place.
    let mut plugin_installed = args.cni_bin_dir.is_none();

    let mut source = if args.manifests.is_empty() {
        let client = kube::Client::try_default()
            .await
            .context("connecting to the Kubernetes API (in-cluster config or kubeconfig)")?;
        let changed = Arc::new(Notify::new());
        info!(node, "watching the Kubernetes API");
        Source::Kube {
            source: KubeSource::start(&client, changed.clone()),
            changed,
            synced: false,
        }
    } else {
        Source::Files {
            paths: args.manifests.clone(),
            seen: None,
        }
    };

    // Ids stay stable across passes: a change rewrites only the entries it must.
    let mut allocation = Allocation::default();
    let mut last_pass = Instant::now() - resync;
    let mut woken = false;
    // Pods the CNI plugin is waiting on, answered after the next pass.
    let mut waiting: Vec<(ObjectRef, tokio::sync::oneshot::Sender<Reply>)> = Vec::new();
    loop {
        health.tick();
        if let Source::Kube { source, synced, .. } = &mut source {
            if !*synced {
                // Nothing is programmed from a half-listed cluster; the kernel keeps what the
                // previous agent left until every store has its first list.
                let ready = tokio::time::timeout(poll, source.wait_synced()).await;
                if ready.is_ok() {
                    info!(node, "initial lists complete");
                    *synced = true;
                    woken = true;
                }
            }
        }
        let resync_due = last_pass.elapsed() >= resync;
        if resync_due {
            gc(dp.pins());
        }
        if woken || resync_due || !waiting.is_empty() || source.files_changed() {
            let mut report = None;
            if let Some(snapshot) = source.snapshot().await {
                if let (Some(dir), Source::Kube { source, .. }) = (&args.cni_conf_dir, &source) {
                    if !plugin_installed {
                        plugin_installed = install_plugin(args.cni_bin_dir.as_deref());
                    }
                    if plugin_installed {
                        pod_networking(&node, dir, &source.nodes(), &plugin);
                    }
                }
                report = pass(
                    &mut dp,
                    &snapshot,
                    &node,
                    &state_dir,
                    &mut allocation,
                    opts,
                    &health,
                );
            }
            for (pod, reply) in waiting.drain(..) {
                // The plugin may have given up waiting: nothing to do then.
                let _ = reply.send(cni_reply(&pod, report.as_ref()));
            }
            woken = false;
            last_pass = Instant::now();
        }
        let wake = async {
            match &source {
                Source::Kube { changed, .. } => changed.notified().await,
                Source::Files { .. } => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(poll) => {}
            _ = wake => woken = true,
            Some(first) = cni_rx.recv() => {
                // Several pods started together: one pass for all of them.
                let mut batch = vec![first];
                while let Ok(more) = cni_rx.try_recv() {
                    batch.push(more);
                }
                for (pod, reply) in batch {
                    match cni_pods::write(&state_dir, &pod) {
                        Ok(()) => {
                            info!(pod = %pod.pod(), interface = %pod.interface, "CNI ADD: programming now");
                            waiting.push((pod.pod(), reply));
                        }
                        Err(e) => {
                            let _ = reply.send(Reply {
                                outcome: Outcome::Held,
                                message: format!("{:#}", anyhow::Error::from(e)),
                            });
                        }
                    }
                }
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
        }
    }
    let _ = fs::remove_file(&cni_socket);
    info!(node, "stopping; enforcement stays pinned");
    Ok(())
}

/// What the plugin is told after a pass: the pod is enforced, or its interface stays closed.
fn cni_reply(pod: &ObjectRef, report: Option<&reconcile::Report>) -> Reply {
    let Some(report) = report else {
        return Reply {
            outcome: Outcome::Held,
            message: "no pass ran (the source is not ready, or the pass failed)".into(),
        };
    };
    if let Some((_, interface)) = report.enforced.iter().find(|(p, _)| p == pod) {
        return Reply {
            outcome: Outcome::Programmed,
            message: format!("enforced on {interface}"),
        };
    }
    Reply {
        outcome: Outcome::Held,
        message: "the agent does not know the pod on this node yet".into(),
    }
}

/// Binds the CNI socket; a failure is reported and the plugin's pods wait for the next pass.
fn start_cni_server(
    path: &std::path::Path,
    requests: mpsc::Sender<Pending>,
) -> Option<tokio::task::JoinHandle<()>> {
    match cni_socket::bind(path) {
        Ok(listener) => {
            info!(socket = %path.display(), "serving the CNI plugin");
            Some(tokio::spawn(cni_socket::serve(listener, requests)))
        }
        Err(e) => {
            error!(socket = %path.display(), error = %e, "cannot serve the CNI plugin");
            None
        }
    }
}

/// Copies this binary into the CNI bin directory as the plugin. Returns whether it is there.
fn install_plugin(bin_dir: Option<&std::path::Path>) -> bool {
    let Some(bin_dir) = bin_dir else {
        return true;
    };
    let installed = std::env::current_exe()
        .and_then(|exe| netpol_agent::node::cni::install_plugin(&exe, bin_dir));
    match installed {
        Ok(wrote) => {
            if wrote {
                info!(dir = %bin_dir.display(), "CNI plugin installed");
            }
            true
        }
        Err(e) => {
            error!(dir = %bin_dir.display(), error = %e, "installing the CNI plugin failed; no CNI configuration until it works");
            false
        }
    }
}

/// One reconcile, recorded for `/metrics` and `/readyz`.
fn pass(
    dp: &mut Dataplane,
    snapshot: &Snapshot,
    node: &str,
    state_dir: &std::path::Path,
    allocation: &mut Allocation,
    opts: reconcile::Options,
    health: &Health,
) -> Option<reconcile::Report> {
    match reconcile::reconcile(dp, snapshot, node, state_dir, allocation, opts) {
        Ok(report) => {
            for w in &report.warnings {
                warn!("{w}");
            }
            health
                .stats
                .record_success(report.duration, report.map_changes);
            health.ready.store(true, Ordering::Relaxed);
            *allocation = report.allocation.clone();
            Some(report)
        }
        Err(e) => {
            health.stats.record_failure();
            error!("reconcile failed, will retry: {:#}", anyhow::Error::from(e));
            None
        }
    }
}

fn gc(pins: &PinDir) {
    match conntrack::gc(pins) {
        Ok(report) => info!(
            flows = report.flows,
            fragments = report.fragments,
            "expired entries collected"
        ),
        Err(e) => error!("conntrack gc failed: {:#}", anyhow::Error::from(e)),
    }
}

/// Kubernetes mode with `--cni-conf-dir`: this node's CNI configuration from its podCIDRs,
/// and routes to every other node's pod CIDRs. Failures are logged and retried next pass;
/// they never stop enforcement.
fn pod_networking(
    node: &str,
    dir: &std::path::Path,
    nodes: &[Arc<k8s_openapi::api::core::v1::Node>],
    plugin: &cni::PluginConf,
) {
    let nets: Vec<NodeNet> = nodes
        .iter()
        .map(|n| {
            let (net, problems) = NodeNet::from_node(n);
            for p in problems {
                warn!("{p}");
            }
            net
        })
        .collect();
    match nets.iter().find(|n| n.name == node) {
        Some(me) if !me.pod_cidrs.is_empty() => match cni::install(dir, &me.pod_cidrs, plugin) {
            Ok(true) => {
                info!(node, dir = %dir.display(), cidrs = ?me.pod_cidrs, "CNI configuration written")
            }
            Ok(false) => {}
            Err(e) => {
                error!(dir = %dir.display(), error = %e, "writing the CNI configuration failed")
            }
        },
        _ => warn!(
            node,
            "this node has no podCIDR yet: no CNI configuration written"
        ),
    }
    match routes::sync(&routes::plan(node, &nets)) {
        Ok(r) if r.replaced + r.removed > 0 => {
            info!(
                replaced = r.replaced,
                removed = r.removed,
                "routes to other nodes' pods synced"
            )
        }
        Ok(_) => {}
        Err(e) => error!(
            "syncing routes to other nodes failed: {:#}",
            anyhow::Error::from(e)
        ),
    }
}

/// Binds the HTTP endpoints; a bind failure is reported and the agent runs without them.
async fn start_server(
    args: &RunArgs,
    health: &Arc<Health>,
    pins: PinDir,
) -> Option<tokio::task::JoinHandle<()>> {
    match serve::bind(args.listen).await {
        Ok(listener) => {
            info!(listen = %args.listen, "serving /metrics, /healthz, /readyz");
            let stall = Duration::from_millis(args.poll_ms.max(50)) * 20 + Duration::from_secs(10);
            let health = health.clone();
            Some(tokio::spawn(async move {
                if let Err(e) = serve::serve(listener, health, pins, stall).await {
                    error!(error = %e, "the HTTP endpoints stopped");
                }
            }))
        }
        Err(e) => {
            error!(listen = %args.listen, error = %e, "cannot serve the HTTP endpoints");
            None
        }
    }
}
