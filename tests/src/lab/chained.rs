//! Pods added to a running lab through a chained CNI configuration — ptp, then another
//! plugin such as netpol's `netpol-cni` with ptp's result as `prevResult` — the way a runtime
//! starts a pod on a node that is already up. Each pod is its own guard: dropping it runs DEL
//! through the chain and deletes its namespace; the namespace is recorded in the lab's state
//! first, so a sweep removes it after a crash. Probes by address, from and to it.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result};

use super::cni::Attachment;
pub use super::cni::{ChainedAdd, ChainedPlugin};
use super::netns::{add_netns, delete_netns};
use super::node::Lab;
use super::probe::{run_probe, Probe, ProbeKind, ProbeOutcome};
use super::server::Servers;
use super::spec::PodPort;
use super::{state, topology};

static NEXT: AtomicU32 = AtomicU32::new(0);

pub struct ChainedPod<'a> {
    lab: &'a Lab,
    node: usize,
    pub namespace: String,
    pub name: String,
    /// Unspecified until ADD returned.
    pub ip: IpAddr,
    pub netns: String,
    /// What the chain's ADD returned and logged.
    pub add: Option<ChainedAdd>,
    attachment: Attachment,
    plugin: ChainedPlugin,
    servers: Option<Servers>,
    added: bool,
}

impl Lab {
    /// Creates the pod `namespace/name` on `node` (its Kubernetes or options name) through
    /// `ptp` then `plugin`, and serves `ports` in it. Returns once ADD returned: what the pod
    /// meets from then on is what its containers would meet.
    pub fn add_chained_pod(
        &self,
        node: &str,
        (namespace, name): (&str, &str),
        ports: &[PodPort],
        plugin: &ChainedPlugin,
    ) -> Result<ChainedPod<'_>> {
        let index = self
            .nodes
            .iter()
            .position(|n| n.plan.node_name == node || n.plan.spec_name == node)
            .with_context(|| format!("lab {} has no node {node}", self.names.id))?;
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let netns = self.names.chained_pod_netns(n);
        let mut pod = ChainedPod {
            lab: self,
            node: index,
            namespace: namespace.to_string(),
            name: name.to_string(),
            ip: Ipv4Addr::UNSPECIFIED.into(),
            netns: netns.clone(),
            add: None,
            attachment: Attachment {
                container_id: self.names.chained_container_id(n),
                pod_netns: netns.clone(),
            },
            plugin: plugin.clone(),
            servers: None,
            added: false,
        };
        state::record_netns(&self.names.dir(), &netns)?;
        add_netns(&netns)?;
        topology::prepare_pod(&netns, self.dual_stack)?;
        let node = &self.nodes[index];
        pod.added = true;
        let add = node
            .network
            .add_chained(&node.netns, &pod.attachment, (namespace, name), plugin)
            .with_context(|| format!("CNI ADD of pod {namespace}/{name}"))?;
        pod.ip = add.addresses.v4.into();
        pod.add = Some(add);
        let mut servers = Servers::default();
        servers.serve_pod(
            &netns,
            &format!("{namespace}/{name}"),
            ports,
            self.dual_stack,
        )?;
        pod.servers = Some(servers);
        Ok(pod)
    }
}

impl ChainedPod<'_> {
    /// A probe from this pod to `to:port`.
    pub fn probe(&self, kind: ProbeKind, to: IpAddr, port: u16) -> ProbeOutcome {
        let probe = Probe::new((&self.namespace, &self.name), to, port, kind);
        run_probe(&self.netns, &probe, self.lab.probe_timeout)
    }

    /// What the plugin wrote on stderr during ADD.
    pub fn add_stderr(&self) -> &str {
        self.add.as_ref().map_or("", |a| a.stderr.as_str())
    }
}

impl Drop for ChainedPod<'_> {
    fn drop(&mut self) {
        drop(self.servers.take());
        if self.added {
            let node = &self.lab.nodes[self.node];
            if let Err(e) = node.network.del_chained(
                &node.netns,
                &self.attachment,
                (&self.namespace, &self.name),
                &self.plugin,
            ) {
                eprintln!(
                    "chained pod {}/{}: DEL failed: {e:#}",
                    self.namespace, self.name
                );
            }
        }
        if let Err(e) = delete_netns(&self.netns) {
            eprintln!("chained pod {}/{}: {e:#}", self.namespace, self.name);
        }
    }
}
