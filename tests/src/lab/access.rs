//! What tests do with a running [`Lab`]: look up its nodes, pods and Services, probe between
//! pods (by address or by name), open connections, and write the cluster's manifests. Nothing
//! here changes what the lab built.

use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use ipnet::{Ipv4Net, Ipv6Net};

use super::dnsmasq::Dnsmasq;
use super::manifests;
use super::name_probe::{self, run_name_probe, NameProbe};
use super::netns::{in_netns, nsenter_command};
use super::node::{Lab, LabPod, Node};
use super::probe::{classify, connect_tcp, http_get, run_probe, Probe, ProbeOutcome};
use super::services::LabService;

/// One node of a running lab: what an agent run "on" it needs (its Kubernetes name, its
/// namespace, commands and code inside it) and the pods scheduled there.
#[derive(Clone, Copy)]
pub struct LabNode<'a> {
    lab: &'a Lab,
    node: &'a Node,
}

impl<'a> LabNode<'a> {
    /// The Kubernetes node name (the agent's `--node-name`, pods' `spec.nodeName`).
    pub fn name(&self) -> &'a str {
        &self.node.plan.node_name
    }

    /// The name the lab options gave the node (`node-a`), which a spec may use too.
    pub fn spec_name(&self) -> &'a str {
        &self.node.plan.spec_name
    }

    /// The node's network namespace, as named in /run/netns.
    pub fn netns(&self) -> &'a str {
        &self.node.netns
    }

    /// The node's InternalIP on the link between nodes (172.18.0.x); a single node has none.
    pub fn address(&self) -> Option<IpAddr> {
        self.node.plan.address.map(|a| a.addr().into())
    }

    /// The node's IPv6 InternalIP, on a dual-stack cluster of several nodes.
    pub fn address_v6(&self) -> Option<IpAddr> {
        self.node.plan.address_v6.map(|a| a.addr().into())
    }

    pub fn pod_cidr(&self) -> Ipv4Net {
        self.node.plan.pod_cidr
    }

    pub fn pod_cidr_v6(&self) -> Option<Ipv6Net> {
        self.node.plan.pod_cidr_v6
    }

    /// The pods scheduled on this node.
    pub fn pods(&self) -> impl Iterator<Item = &'a LabPod> + 'a {
        let name = self.name();
        self.lab.pods.iter().filter(move |p| p.node == name)
    }

    /// Runs `f` on a thread inside the node's network namespace.
    pub fn in_node<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        in_netns(self.netns(), f)
    }

    /// A command that runs `program` inside the node's network namespace (with `nsenter`, so
    /// the host's /sys and bpffs stay visible).
    pub fn node_command(&self, program: &str) -> Command {
        nsenter_command(self.netns(), program)
    }

    /// A telnet-style connect from the node's own namespace (where kubelet probes come from).
    pub fn tcp_connect_from_node(&self, ip: IpAddr, port: u16, timeout: Duration) -> ProbeOutcome {
        match connect_tcp(self.netns(), SocketAddr::new(ip, port), timeout) {
            Ok(_) => ProbeOutcome::Connected,
            Err(e) => match e.downcast::<std::io::Error>() {
                Ok(io) => classify(Err(io)),
                Err(e) => ProbeOutcome::Error(format!("{e:#}")),
            },
        }
    }
}

impl Lab {
    /// The lab id, also the name of its state directory under /run/netpol-lab.
    pub fn id(&self) -> &str {
        &self.names.id
    }

    /// Every node, in the order of the options.
    pub fn nodes(&self) -> impl Iterator<Item = LabNode<'_>> {
        self.nodes.iter().map(|node| LabNode { lab: self, node })
    }

    /// A node by its Kubernetes name or its options name.
    pub fn node(&self, name: &str) -> Option<LabNode<'_>> {
        self.nodes()
            .find(|n| n.name() == name || n.spec_name() == name)
    }

    fn first_node(&self) -> LabNode<'_> {
        self.nodes()
            .next()
            .expect("a started lab has at least one node")
    }

    /// The first node's Kubernetes name (the only node of a `Lab::start` lab).
    pub fn node_name(&self) -> &str {
        self.first_node().name()
    }

    /// The first node's network namespace, as named in /run/netns.
    pub fn node_netns(&self) -> String {
        self.first_node().netns().to_string()
    }

    /// Every network namespace this lab owns, nodes first.
    pub fn netns_names(&self) -> &[String] {
        &self.netns
    }

    pub fn state_dir(&self) -> PathBuf {
        self.names.dir()
    }

    pub fn probe_timeout(&self) -> Duration {
        self.probe_timeout
    }

    pub fn pods(&self) -> impl Iterator<Item = &LabPod> {
        self.pods.iter()
    }

    pub fn pod(&self, namespace: &str, name: &str) -> Option<&LabPod> {
        self.pods
            .iter()
            .find(|p| p.namespace == namespace && p.name == name)
    }

    fn source(&self, namespace: &str, name: &str) -> Result<&LabPod> {
        match self.pod(namespace, name) {
            Some(pod) => Ok(pod),
            None => bail!("lab {} has no source pod {namespace}/{name}", self.names.id),
        }
    }

    /// The pod's IPv4 address; panics if the lab has no such pod, since that is a broken test.
    pub fn pod_ip(&self, namespace: &str, name: &str) -> IpAddr {
        self.pod(namespace, name)
            .unwrap_or_else(|| panic!("lab {} has no pod {namespace}/{name}", self.names.id))
            .ip
    }

    /// The pod's IPv6 address; panics if the lab has no such pod or is not dual-stack.
    pub fn pod_ipv6(&self, namespace: &str, name: &str) -> IpAddr {
        self.pod(namespace, name)
            .unwrap_or_else(|| panic!("lab {} has no pod {namespace}/{name}", self.names.id))
            .ipv6
            .unwrap_or_else(|| panic!("lab {} is not dual-stack", self.names.id))
    }

    /// Every Service of the spec, with its ClusterIP and endpoints, in spec order.
    pub fn services(&self) -> impl Iterator<Item = &LabService> {
        self.services.iter()
    }

    pub fn service(&self, namespace: &str, name: &str) -> Option<&LabService> {
        self.services
            .iter()
            .find(|s| s.namespace == namespace && s.name == name)
    }

    /// The Service's ClusterIP; panics if the lab has no such Service or it is headless,
    /// since that is a broken test.
    pub fn service_ip(&self, namespace: &str, name: &str) -> IpAddr {
        self.service(namespace, name)
            .unwrap_or_else(|| panic!("lab {} has no service {namespace}/{name}", self.names.id))
            .cluster_ip
            .unwrap_or_else(|| panic!("service {namespace}/{name} is headless"))
    }

    /// The pid of the lab's dnsmasq, when it runs DNS.
    pub fn dns_pid(&self) -> Option<u32> {
        self.dnsmasq.as_ref().map(Dnsmasq::pid)
    }

    /// Writes `<dir>/<lab id>-cluster.yaml` with the Namespaces, Nodes, Pods, Services and
    /// EndpointSlices as an API server would hold them.
    pub fn write_cluster_manifests(&self, dir: &Path) -> Result<PathBuf> {
        let nodes: Vec<_> = self.nodes.iter().map(|n| n.plan.clone()).collect();
        let yaml = manifests::render(&self.spec, &nodes, &self.pods, &self.services)?;
        manifests::write(dir, &format!("{}-cluster.yaml", self.names.id), &yaml)
    }

    /// Runs `f` on a thread inside the first node's network namespace (for netlink-, procfs-
    /// or bpf-based checks that must see the node's interfaces).
    pub fn in_node<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        self.first_node().in_node(f)
    }

    /// Runs `f` on a thread inside a pod's network namespace (to bind an extra socket there,
    /// or read the pod's own view of the network).
    pub fn in_pod<T: Send>(
        &self,
        namespace: &str,
        name: &str,
        f: impl FnOnce() -> T + Send,
    ) -> Result<T> {
        in_netns(&self.source(namespace, name)?.netns, f)
    }

    /// A command that runs `program` inside the first node's network namespace.
    pub fn node_command(&self, program: &str) -> Command {
        self.first_node().node_command(program)
    }

    /// A telnet-style connect from the first node's own namespace.
    pub fn tcp_connect_from_node(&self, ip: IpAddr, port: u16, timeout: Duration) -> ProbeOutcome {
        self.first_node().tcp_connect_from_node(ip, port, timeout)
    }

    pub fn probe(&self, probe: &Probe) -> ProbeOutcome {
        let (namespace, name) = &probe.from;
        match self.source(namespace, name) {
            Ok(source) => run_probe(&source.netns, probe, self.probe_timeout),
            Err(e) => ProbeOutcome::Error(e.to_string()),
        }
    }

    /// Runs all probes at once, one thread each, so a matrix of dropped flows costs about one
    /// timeout rather than one per probe. Outcomes are in the order of `probes`.
    pub fn probe_all(&self, probes: &[Probe]) -> Vec<ProbeOutcome> {
        in_parallel(probes, |p| self.probe(p))
    }

    /// A probe by name: resolved inside the source pod (its resolv.conf points at the lab's
    /// DNS, so the lab needs `LabOptions::dns`), then made to the address found.
    pub fn probe_name(&self, probe: &NameProbe) -> ProbeOutcome {
        let (namespace, name) = &probe.from;
        let source = match self.source(namespace, name) {
            Ok(source) => source,
            Err(e) => return ProbeOutcome::Error(e.to_string()),
        };
        if !self.dns {
            return ProbeOutcome::Error(format!(
                "lab {} has no DNS (LabOptions::dns), so {probe} cannot resolve",
                self.names.id
            ));
        }
        run_name_probe(
            &source.netns,
            probe,
            self.resolve_timeout,
            self.probe_timeout,
        )
    }

    /// [`Lab::probe_name`] for every probe, in parallel; outcomes in the order of `probes`.
    pub fn probe_names(&self, probes: &[NameProbe]) -> Vec<ProbeOutcome> {
        in_parallel(probes, |p| self.probe_name(p))
    }

    /// Resolves `name` the way the pod `from` would; `None` when it does not resolve.
    pub fn resolve(&self, from: (&str, &str), name: &str) -> Result<Option<IpAddr>> {
        let source = self.source(from.0, from.1)?;
        name_probe::resolve(&source.netns, name, self.resolve_timeout)
    }

    /// An HTTP GET of `/` from the pod `from`, returning the body: the lab's servers answer
    /// with the `<namespace>/<pod>` that served it, which tells which backend a Service chose.
    pub fn http_get(&self, from: (&str, &str), ip: IpAddr, port: u16) -> Result<String> {
        let (namespace, name) = from;
        let source = self.source(namespace, name)?;
        let target = SocketAddr::new(ip, port);
        let (status, body) = http_get(&source.netns, target, &ip.to_string(), self.probe_timeout)?
            .with_context(|| format!("GET http://{target}/ from {namespace}/{name}"))?;
        ensure!(status == 200, "GET http://{target}/ answered {status}");
        Ok(body)
    }

    /// A TCP connection made from inside the source pod, for tests of long-lived flows; the
    /// pod's server echoes every line sent on it.
    pub fn open_tcp(&self, from: (&str, &str), to_ip: IpAddr, port: u16) -> Result<TcpStream> {
        let (namespace, name) = from;
        let source = self.source(namespace, name)?;
        connect_tcp(
            &source.netns,
            SocketAddr::new(to_ip, port),
            self.probe_timeout,
        )
        .with_context(|| format!("connecting {namespace}/{name} -> {to_ip}:{port}"))
    }
}

/// `run` over every item on its own thread; results in the order of `items`.
fn in_parallel<T: Sync, R: Send>(items: &[T], run: impl Fn(&T) -> R + Sync) -> Vec<R> {
    thread::scope(|scope| {
        let run = &run;
        let running: Vec<_> = items
            .iter()
            .map(|item| scope.spawn(move || run(item)))
            .collect();
        running
            .into_iter()
            .map(|t| {
                t.join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    })
}
