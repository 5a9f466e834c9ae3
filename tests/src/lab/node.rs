//! [`Lab`]: one or two simulated nodes, built from a [`LabSpec`] and torn down on drop (also
//! while a test panics). This file owns the lifecycle — build and teardown; `access` holds what
//! tests do with a running lab. Teardown undoes exactly what this lab recorded, never anything
//! found by name.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{ensure, Context, Result};

use super::cni::{Attachment, CniNetwork};
use super::dnsmasq::Dnsmasq;
use super::names::LabNames;
use super::netns::{add_netns, delete_netns};
use super::options::{node_of, resolve_nodes, ClusterOptions, LabOptions, NodePlan};
use super::server::Servers;
use super::services::{self, LabService};
use super::spec::{pod_namespace, pod_ports, LabSpec, PodPort};
use super::{dns, etc_netns, kube_proxy, state, topology};

/// A running pod: its network namespace, its addresses and the ports with servers behind them.
#[derive(Debug, Clone)]
pub struct LabPod {
    pub namespace: String,
    pub name: String,
    /// The pod's IPv4 address (every lab pod has one).
    pub ip: IpAddr,
    /// The pod's IPv6 address, on a dual-stack lab (`LabOptions::pod_cidr_v6`).
    pub ipv6: Option<IpAddr>,
    pub netns: String,
    pub ports: Vec<PodPort>,
    /// The Kubernetes name of the node the pod runs on.
    pub node: String,
}

/// A node as built: its plan, its namespace and its CNI network.
pub(super) struct Node {
    pub plan: NodePlan,
    pub netns: String,
    pub(super) network: CniNetwork,
}

pub struct Lab {
    pub(super) names: LabNames,
    pub(super) spec: LabSpec,
    pub(super) probe_timeout: Duration,
    pub(super) resolve_timeout: Duration,
    pub(super) dns: bool,
    pub(super) dual_stack: bool,
    pub(super) nodes: Vec<Node>,
    pub(super) pods: Vec<LabPod>,
    pub(super) services: Vec<LabService>,
    /// Pods handed to CNI ADD (with their node), recorded before the call so a half-done ADD
    /// is still undone.
    attachments: Vec<(usize, Attachment)>,
    /// Namespaces this lab created (or tried to), nodes first.
    pub(super) netns: Vec<String>,
    servers: Option<Servers>,
    pub(super) dnsmasq: Option<Dnsmasq>,
    /// Pod namespaces whose /etc/netns directory this lab wrote (or tried to).
    etc_netns: Vec<String>,
}

impl Lab {
    /// Builds one node and its pods and starts their servers. On error, whatever was already
    /// built is torn down before returning.
    pub fn start(spec: &LabSpec, opts: LabOptions) -> Result<Lab> {
        Lab::start_cluster(spec, opts.into())
    }

    /// Builds the nodes of `opts` (joined by a link, each with its own pod CIDR), schedules
    /// each pod on the node its `spec.nodeName` names (the first node by default) and starts
    /// the servers. Services work from every node. On error, whatever was already built is torn
    /// down before returning.
    pub fn start_cluster(spec: &LabSpec, opts: ClusterOptions) -> Result<Lab> {
        ensure!(
            nix::unistd::geteuid().is_root(),
            "the netpol lab needs root (network namespaces, CNI plugins)"
        );
        if let Err(e) = Lab::cleanup_stale() {
            eprintln!("netpol lab: cleaning up stale labs failed, going on: {e:#}");
        }
        let mut spec = spec.clone();
        if opts.dns {
            dns::add_kube_dns(&mut spec)?;
        }
        let names = LabNames::allocate();
        let plans = resolve_nodes(&opts, &names.id)?;
        // Every pod's node is checked before anything is created.
        let placement = spec
            .pods
            .iter()
            .map(|pod| {
                let node_name = pod.spec.as_ref().and_then(|s| s.node_name.as_deref());
                node_of(&plans, node_name).with_context(|| {
                    format!(
                        "pod {}/{}",
                        pod_namespace(pod),
                        pod.metadata.name.as_deref().unwrap_or_default()
                    )
                })
            })
            .collect::<Result<Vec<usize>>>()?;
        state::create_lab_dir(&names.dir())?;
        let mut lab = Lab {
            dual_stack: plans[0].pod_cidr_v6.is_some(),
            names,
            spec,
            probe_timeout: opts.probe_timeout,
            resolve_timeout: opts.resolve_timeout,
            dns: opts.dns,
            nodes: Vec::new(),
            pods: Vec::new(),
            services: Vec::new(),
            attachments: Vec::new(),
            netns: Vec::new(),
            servers: None,
            dnsmasq: None,
            etc_netns: Vec::new(),
        };
        lab.build(plans, &placement)
            .with_context(|| format!("starting lab {}", lab.names.id))?;
        Ok(lab)
    }

    /// Removes labs left behind by processes that are gone (crashed or killed before their
    /// `Drop` ran) and returns their state directories.
    pub fn cleanup_stale() -> Result<Vec<PathBuf>> {
        state::sweep_stale()
    }

    fn build(&mut self, plans: Vec<NodePlan>, placement: &[usize]) -> Result<()> {
        for (index, plan) in plans.into_iter().enumerate() {
            state::record_node(&self.names.dir(), &plan.node_name)?;
            let netns = self.names.node_netns(index);
            self.create_netns(&netns)?;
            topology::prepare_node(&netns, self.dual_stack)?;
            let network =
                CniNetwork::new(plan.pod_cidr, plan.pod_cidr_v6, &self.names.ipam_dir(index));
            self.nodes.push(Node {
                plan,
                netns,
                network,
            });
        }
        if let [a, b] = &self.nodes[..] {
            topology::link_nodes((&a.netns, &a.plan), (&b.netns, &b.plan))?;
        }

        for (index, pod) in self.spec.pods.clone().iter().enumerate() {
            self.add_pod(index, pod, placement[index])?;
        }

        self.services = services::plan(&self.spec.services, &self.spec.pods, &self.pods)?;
        if let Some(rules) = kube_proxy::render(&self.services) {
            for node in &self.nodes {
                kube_proxy::install(&node.netns, &rules).with_context(|| {
                    format!("installing the Service rules on {}", node.plan.spec_name)
                })?;
            }
        }

        if self.dns {
            self.start_dns()?;
        }

        let servers = self.servers.insert(Servers::default());
        for pod in &self.pods {
            if dns::is_dns_pod(&pod.namespace, &pod.name) {
                continue; // dnsmasq serves its port 53
            }
            let identity = format!("{}/{}", pod.namespace, pod.name);
            servers
                .serve_pod(&pod.netns, &identity, &pod.ports, pod.ipv6.is_some())
                .with_context(|| format!("serving {identity}"))?;
        }
        Ok(())
    }

    /// A pod namespace, wired to its node by CNI ADD.
    fn add_pod(
        &mut self,
        index: usize,
        pod: &k8s_openapi::api::core::v1::Pod,
        node: usize,
    ) -> Result<()> {
        let namespace = pod_namespace(pod).to_string();
        let name = pod
            .metadata
            .name
            .clone()
            .context("a pod without a name passed validation")?;
        let netns = self.names.pod_netns(index);
        self.create_netns(&netns)?;
        topology::prepare_pod(&netns, self.dual_stack)?;
        let attachment = Attachment {
            container_id: self.names.container_id(index),
            pod_netns: netns.clone(),
        };
        self.attachments.push((node, attachment.clone()));
        let node = &self.nodes[node];
        let ips = node
            .network
            .add(&node.netns, &attachment)
            .with_context(|| format!("wiring pod {namespace}/{name}"))?;
        ensure!(
            ips.v6.is_some() == self.dual_stack,
            "pod {namespace}/{name} got {ips:?} from a network that is {}dual-stack",
            if self.dual_stack { "" } else { "not " }
        );
        let ports = pod_ports(pod)?;
        let node_name = node.plan.node_name.clone();
        self.pods.push(LabPod {
            namespace,
            name,
            ip: ips.v4.into(),
            ipv6: ips.v6.map(IpAddr::from),
            netns,
            ports,
            node: node_name,
        });
        Ok(())
    }

    /// dnsmasq in the CoreDNS pod, then kubelet's resolv.conf and hosts for every pod.
    fn start_dns(&mut self) -> Result<()> {
        let dir = self.names.dir().join("dns");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let hosts = dir.join("hosts");
        std::fs::write(&hosts, dns::cluster_hosts(&self.services))
            .with_context(|| format!("writing {}", hosts.display()))?;
        let server = self
            .pods
            .iter()
            .find(|p| dns::is_dns_pod(&p.namespace, &p.name))
            .context("the DNS pod was not started")?;
        let addresses: Vec<IpAddr> = std::iter::once(server.ip).chain(server.ipv6).collect();
        self.dnsmasq = Some(Dnsmasq::start(
            &self.names.dir(),
            &server.netns,
            &addresses,
            &hosts,
            &dir.join("dnsmasq.log"),
        )?);
        for (pod, spec) in self.pods.iter().zip(&self.spec.pods) {
            state::record_etc_netns(&self.names.dir(), &pod.netns)?;
            self.etc_netns.push(pod.netns.clone());
            etc_netns::write(
                &pod.netns,
                &[
                    ("resolv.conf", dns::resolv_conf(&pod.namespace)),
                    ("hosts", dns::pod_hosts(pod, spec)),
                ],
            )?;
        }
        Ok(())
    }

    fn create_netns(&mut self, name: &str) -> Result<()> {
        state::record_netns(&self.names.dir(), name)?;
        self.netns.push(name.to_string());
        add_netns(name)
    }

    fn teardown(&mut self) -> Result<()> {
        // dnsmasq first: a process in a pod namespace would keep it alive.
        drop(self.dnsmasq.take());
        // Servers next: their sockets hold no namespace open, but their threads must end.
        drop(self.servers.take());
        let mut etc_failures = Vec::new();
        for name in self.etc_netns.drain(..) {
            if let Err(e) = etc_netns::remove(&name) {
                etc_failures.push(format!("{e:#}"));
            }
        }
        // A failed DEL is reported but blocks nothing: deleting the namespaces removes the
        // veths anyway, and the IPAM state goes with the lab directory.
        let mut del_failures = Vec::new();
        for (node, attachment) in self.attachments.drain(..).rev() {
            let node = &self.nodes[node];
            if let Err(e) = node.network.del(&node.netns, &attachment) {
                del_failures.push(format!("{e:#}"));
            }
        }
        // The nodes' link, routes and Service rules live inside the node namespaces.
        let mut netns_failures = Vec::new();
        for name in self.netns.drain(..).rev() {
            if let Err(e) = delete_netns(&name) {
                netns_failures.push(format!("{e:#}"));
            }
        }
        // The directory is the record a later sweep needs, so it stays while a namespace does.
        if netns_failures.is_empty() {
            state::remove_lab(&self.names.dir())?;
        }
        let failures = [etc_failures, del_failures, netns_failures].concat();
        ensure!(failures.is_empty(), "{}", failures.join("; "));
        Ok(())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            eprintln!("netpol lab {}: teardown incomplete: {e:#}", self.names.id);
        }
    }
}
