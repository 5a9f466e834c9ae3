//! [`Lab`]: one simulated node, built from a [`LabSpec`] and torn down on drop (also while a
//! test panics). Teardown undoes exactly what this lab recorded, never anything found by name.

use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use ipnet::{Ipv4Net, Ipv6Net};

use super::cni::{Attachment, CniNetwork};
use super::dns;
use super::dnsmasq::Dnsmasq;
use super::etc_netns;
use super::name_probe::{self, run_name_probe, NameProbe};
use super::names::LabNames;
use super::netns::{add_netns, delete_netns, nsenter_command, set_sysctl};
use super::probe::{classify, connect_tcp, http_get, run_probe, Probe, ProbeOutcome};
use super::server::Servers;
use super::services::{self, LabService};
use super::spec::{pod_namespace, pod_ports, LabSpec, PodPort};
use super::{kube_proxy, manifests, state};

#[derive(Debug, Clone)]
pub struct LabOptions {
    /// The Kubernetes node name pods are scheduled on; defaults to the lab id.
    pub node_name: Option<String>,
    /// The node's pod CIDR, handed to host-local IPAM.
    pub pod_cidr: Ipv4Net,
    /// The node's IPv6 pod CIDR (e.g. fd00:10:244:1::/64); set, every pod is dual-stack.
    pub pod_cidr_v6: Option<Ipv6Net>,
    /// How long every probe waits before calling a flow dropped.
    pub probe_timeout: Duration,
    /// Cluster DNS: adds kube-system/coredns (`k8s-app: kube-dns`, serving with dnsmasq) and
    /// the kube-dns Service at 10.96.0.10, and gives every pod kubelet's resolv.conf, so
    /// probes by name ([`NameProbe`]) work.
    pub dns: bool,
    /// How long a probe by name waits for the name to resolve before calling it unresolved.
    pub resolve_timeout: Duration,
}

impl Default for LabOptions {
    fn default() -> LabOptions {
        LabOptions {
            node_name: None,
            pod_cidr: "10.244.1.0/24".parse().expect("a valid literal CIDR"),
            pod_cidr_v6: None,
            probe_timeout: Duration::from_secs(1),
            dns: false,
            resolve_timeout: Duration::from_secs(2),
        }
    }
}

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

pub struct Lab {
    names: LabNames,
    node_name: String,
    spec: LabSpec,
    probe_timeout: Duration,
    resolve_timeout: Duration,
    network: CniNetwork,
    dual_stack: bool,
    pods: Vec<LabPod>,
    services: Vec<LabService>,
    /// Pods handed to CNI ADD, recorded before the call so a half-done ADD is still undone.
    attachments: Vec<Attachment>,
    /// Namespaces this lab created (or tried to), node first.
    netns: Vec<String>,
    servers: Option<Servers>,
    dns: bool,
    dnsmasq: Option<Dnsmasq>,
    /// Pod namespaces whose /etc/netns directory this lab wrote (or tried to).
    etc_netns: Vec<String>,
}

impl Lab {
    /// Builds the node and its pods and starts their servers. On error, whatever was already
    /// built is torn down before returning.
    pub fn start(spec: &LabSpec, opts: LabOptions) -> Result<Lab> {
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
        state::create_lab_dir(&names.dir())?;
        let mut lab = Lab {
            node_name: opts.node_name.unwrap_or_else(|| names.id.clone()),
            network: CniNetwork::new(opts.pod_cidr, opts.pod_cidr_v6, &names.ipam_dir()),
            dual_stack: opts.pod_cidr_v6.is_some(),
            names,
            spec,
            probe_timeout: opts.probe_timeout,
            resolve_timeout: opts.resolve_timeout,
            pods: Vec::new(),
            services: Vec::new(),
            attachments: Vec::new(),
            netns: Vec::new(),
            servers: None,
            dns: opts.dns,
            dnsmasq: None,
            etc_netns: Vec::new(),
        };
        state::record_node(&lab.names.dir(), &lab.node_name)?;
        lab.build()
            .with_context(|| format!("starting lab {}", lab.names.id))?;
        Ok(lab)
    }

    /// Removes labs left behind by processes that are gone (crashed or killed before their
    /// `Drop` ran) and returns their state directories.
    pub fn cleanup_stale() -> Result<Vec<PathBuf>> {
        state::sweep_stale()
    }

    fn build(&mut self) -> Result<()> {
        let node = self.names.node_netns();
        self.create_netns(&node)?;
        // The node's own loopback is where a locally started agent's health endpoints live.
        let status = self
            .node_command("ip")
            .args(["link", "set", "lo", "up"])
            .status()
            .context("running ip")?;
        ensure!(
            status.success(),
            "bringing up lo in {node} failed ({status})"
        );
        if self.dual_stack {
            prepare_ipv6(&node)?;
            // The ptp plugin turns IPv6 forwarding on as well, but the node routes between
            // pods from the start, whatever the plugin version does.
            set_sysctl(&node, "net.ipv6.conf.all.forwarding", "1")?;
        }

        for (index, pod) in self.spec.pods.clone().iter().enumerate() {
            let namespace = pod_namespace(pod).to_string();
            let name = pod
                .metadata
                .name
                .clone()
                .context("a pod without a name passed validation")?;
            let netns = self.names.pod_netns(index);
            self.create_netns(&netns)?;
            if self.dual_stack {
                prepare_ipv6(&netns)?;
            }
            let attachment = Attachment {
                container_id: self.names.container_id(index),
                pod_netns: netns.clone(),
            };
            self.attachments.push(attachment.clone());
            let ips = self
                .network
                .add(&node, &attachment)
                .with_context(|| format!("wiring pod {namespace}/{name}"))?;
            ensure!(
                ips.v6.is_some() == self.dual_stack,
                "pod {namespace}/{name} got {ips:?} from a network that is {}dual-stack",
                if self.dual_stack { "" } else { "not " }
            );
            let ports = pod_ports(pod)?;
            self.pods.push(LabPod {
                namespace,
                name,
                ip: ips.v4.into(),
                ipv6: ips.v6.map(IpAddr::from),
                netns,
                ports,
                node: self.node_name.clone(),
            });
        }

        self.services = services::plan(&self.spec.services, &self.spec.pods, &self.pods)?;
        if let Some(rules) = kube_proxy::render(&self.services) {
            kube_proxy::install(&node, &rules).context("installing the Service rules")?;
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

    /// The lab id, also the name of its state directory under /run/netpol-lab.
    pub fn id(&self) -> &str {
        &self.names.id
    }

    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    /// The node's network namespace, as named in /run/netns.
    pub fn node_netns(&self) -> String {
        self.names.node_netns()
    }

    /// Every network namespace this lab owns, node first.
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

    /// The pod's address; panics if the lab has no such pod, since that is a broken test.
    pub fn pod_ip(&self, namespace: &str, name: &str) -> IpAddr {
        self.pod(namespace, name)
            .unwrap_or_else(|| panic!("lab {} has no pod {namespace}/{name}", self.names.id))
            .ip
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

    /// Writes `<dir>/<lab id>-cluster.yaml` with the Namespaces, Pods, Services and
    /// EndpointSlices as an API server would hold them.
    pub fn write_cluster_manifests(&self, dir: &Path) -> Result<PathBuf> {
        let yaml = manifests::render(&self.spec, &self.pods, &self.services)?;
        manifests::write(dir, &format!("{}-cluster.yaml", self.names.id), &yaml)
    }

    /// A command that runs `program` inside the node's network namespace (with `nsenter`, so
    /// the host's /sys and bpffs stay visible).
    /// Runs `f` on a thread inside the node's network namespace (for netlink-, procfs- or
    /// bpf-based checks that must see the node's interfaces).
    pub fn in_node<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        super::netns::in_netns(&self.node_netns(), f)
    }

    /// Runs `f` on a thread inside a pod's network namespace (to bind an extra socket there,
    /// or read the pod's own view of the network).
    pub fn in_pod<T: Send>(
        &self,
        namespace: &str,
        name: &str,
        f: impl FnOnce() -> T + Send,
    ) -> Result<T> {
        let Some(pod) = self.pod(namespace, name) else {
            bail!("lab {} has no pod {namespace}/{name}", self.names.id);
        };
        super::netns::in_netns(&pod.netns, f)
    }

    pub fn node_command(&self, program: &str) -> Command {
        nsenter_command(&self.names.node_netns(), program)
    }

    pub fn probe(&self, probe: &Probe) -> ProbeOutcome {
        let (namespace, name) = &probe.from;
        match self.pod(namespace, name) {
            Some(source) => run_probe(&source.netns, probe, self.probe_timeout),
            None => ProbeOutcome::Error(format!(
                "lab {} has no source pod {namespace}/{name}",
                self.names.id
            )),
        }
    }

    /// A probe by name: resolved inside the source pod (its resolv.conf points at the lab's
    /// DNS, so the lab needs `LabOptions::dns`), then made to the address found.
    pub fn probe_name(&self, probe: &NameProbe) -> ProbeOutcome {
        let (namespace, name) = &probe.from;
        let Some(source) = self.pod(namespace, name) else {
            return ProbeOutcome::Error(format!(
                "lab {} has no source pod {namespace}/{name}",
                self.names.id
            ));
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
        thread::scope(|scope| {
            let running: Vec<_> = probes
                .iter()
                .map(|p| scope.spawn(move || self.probe_name(p)))
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

    /// Resolves `name` the way the pod `from` would; `None` when it does not resolve.
    pub fn resolve(&self, from: (&str, &str), name: &str) -> Result<Option<IpAddr>> {
        let (namespace, pod) = from;
        let Some(source) = self.pod(namespace, pod) else {
            bail!("lab {} has no source pod {namespace}/{pod}", self.names.id);
        };
        name_probe::resolve(&source.netns, name, self.resolve_timeout)
    }

    /// An HTTP GET of `/` from the pod `from`, returning the body: the lab's servers answer
    /// with the `<namespace>/<pod>` that served it, which tells which backend a Service chose.
    pub fn http_get(&self, from: (&str, &str), ip: IpAddr, port: u16) -> Result<String> {
        let (namespace, name) = from;
        let Some(source) = self.pod(namespace, name) else {
            bail!("lab {} has no source pod {namespace}/{name}", self.names.id);
        };
        let target = SocketAddr::new(ip, port);
        let (status, body) = http_get(&source.netns, target, &ip.to_string(), self.probe_timeout)?
            .with_context(|| format!("GET http://{target}/ from {namespace}/{name}"))?;
        ensure!(status == 200, "GET http://{target}/ answered {status}");
        Ok(body)
    }

    /// The pid of the lab's dnsmasq, when it runs DNS.
    pub fn dns_pid(&self) -> Option<u32> {
        self.dnsmasq.as_ref().map(Dnsmasq::pid)
    }

    /// Runs all probes at once, one thread each, so a matrix of dropped flows costs about one
    /// timeout rather than one per probe. Outcomes are in the order of `probes`.
    pub fn probe_all(&self, probes: &[Probe]) -> Vec<ProbeOutcome> {
        thread::scope(|scope| {
            let running: Vec<_> = probes
                .iter()
                .map(|p| scope.spawn(move || self.probe(p)))
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

    /// A TCP connection made from inside the source pod, for tests of long-lived flows; the
    /// pod's server echoes every line sent on it.
    pub fn open_tcp(&self, from: (&str, &str), to_ip: IpAddr, port: u16) -> Result<TcpStream> {
        let (namespace, name) = from;
        let Some(source) = self.pod(namespace, name) else {
            bail!("lab {} has no source pod {namespace}/{name}", self.names.id);
        };
        connect_tcp(
            &source.netns,
            SocketAddr::new(to_ip, port),
            self.probe_timeout,
        )
        .with_context(|| format!("connecting {namespace}/{name} -> {to_ip}:{port}"))
    }

    /// A telnet-style connect from the node's own namespace (where kubelet probes come from).
    pub fn tcp_connect_from_node(&self, ip: IpAddr, port: u16, timeout: Duration) -> ProbeOutcome {
        match connect_tcp(&self.names.node_netns(), SocketAddr::new(ip, port), timeout) {
            Ok(_) => ProbeOutcome::Connected,
            Err(e) => match e.downcast::<std::io::Error>() {
                Ok(io) => classify(Err(io)),
                Err(e) => ProbeOutcome::Error(format!("{e:#}")),
            },
        }
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
        let node = self.names.node_netns();
        for attachment in self.attachments.drain(..).rev() {
            if let Err(e) = self.network.del(&node, &attachment) {
                del_failures.push(format!("{e:#}"));
            }
        }
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

/// Makes IPv6 addresses usable at once: duplicate address detection would hold every new
/// address tentative for a second or more (ptp waits for it), and nothing else on these
/// point-to-point links can hold the same address. `default` covers the interfaces CNI is about
/// to create or move in; `bindv6only=0` lets a server's `[::]` socket take IPv4 as well.
fn prepare_ipv6(netns: &str) -> Result<()> {
    for (key, value) in [
        ("net.ipv6.conf.all.accept_dad", "0"),
        ("net.ipv6.conf.default.accept_dad", "0"),
        ("net.ipv6.bindv6only", "0"),
    ] {
        set_sysctl(netns, key, value)?;
    }
    Ok(())
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            eprintln!("netpol lab {}: teardown incomplete: {e:#}", self.names.id);
        }
    }
}
