//! Services as the control plane sees them: the ClusterIP allocator and the endpoints
//! controller. Pure: from the spec's Services and the running pods to [`LabService`]s, which
//! `kube_proxy` turns into rules, `manifests` into Service and EndpointSlice objects and `dns`
//! into names. Nothing here touches the machine.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};

use anyhow::{bail, ensure, Context, Result};
use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::node::LabPod;
use super::spec::{parse_protocol, pod_namespace, Protocol, DEFAULT_NAMESPACE};

/// kind's default Service CIDR.
pub const SERVICE_CIDR: Ipv4Net = Ipv4Net::new_assert(Ipv4Addr::new(10, 96, 0, 0), 16);
/// The ClusterIP kubelet writes into every pod's resolv.conf; only a Service that asks for it
/// by `spec.clusterIP` (kube-dns) gets it.
pub const DNS_CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// Where automatic allocation starts: below are the `kubernetes` Service and kube-dns.
const FIRST_ALLOCATED: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);

/// A Service of the lab, with its ClusterIP and its endpoints resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabService {
    pub namespace: String,
    pub name: String,
    /// `None` for a headless Service (`clusterIP: None`).
    pub cluster_ip: Option<IpAddr>,
    pub ports: Vec<LabServicePort>,
    /// Ready pods selected by the Service, in spec order.
    pub endpoints: Vec<ServiceEndpoint>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabServicePort {
    /// Empty when the Service has a single unnamed port, as in the API.
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
    pub target_port: TargetPort,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetPort {
    Number(u16),
    /// A container port name, resolved per pod.
    Name(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceEndpoint {
    pub pod: String,
    /// The pod's IPv4 address (Services are single-stack IPv4).
    pub ip: IpAddr,
    pub node: String,
    /// The pod's `spec.hostname` when its `spec.subdomain` names this Service: the endpoint
    /// then has a DNS name `<hostname>.<service>.<namespace>.svc.<domain>`.
    pub hostname: Option<String>,
    /// Per Service port (same order as `LabService::ports`): the port on this pod, or `None`
    /// when the pod does not declare the named target port (not an endpoint for that port).
    pub target_ports: Vec<Option<u16>>,
}

impl LabService {
    pub fn is_headless(&self) -> bool {
        self.cluster_ip.is_none()
    }

    /// The endpoints serving port `index`, with their port on the pod.
    pub fn backends(&self, index: usize) -> impl Iterator<Item = (&ServiceEndpoint, u16)> {
        self.endpoints
            .iter()
            .filter_map(move |e| e.target_ports.get(index).copied().flatten().map(|p| (e, p)))
    }

    /// `<namespace>/<name>[:<port name>]`, the way kube-proxy names a service port.
    pub fn port_id(&self, index: usize) -> String {
        match self.ports[index].name.as_str() {
            "" => format!("{}/{}", self.namespace, self.name),
            name => format!("{}/{}:{name}", self.namespace, self.name),
        }
    }
}

pub fn service_namespace(service: &Service) -> &str {
    service
        .metadata
        .namespace
        .as_deref()
        .unwrap_or(DEFAULT_NAMESPACE)
}

/// `spec.clusterIP` as written: `Some(None)` for headless, `None` when the allocator picks.
fn requested_cluster_ip(service: &Service) -> Result<Option<Option<Ipv4Addr>>> {
    let spec = service.spec.as_ref();
    let requested = spec
        .and_then(|s| s.cluster_ip.as_deref())
        .filter(|ip| !ip.is_empty())
        .or_else(|| spec.and_then(|s| s.cluster_ips.as_ref()?.first().map(String::as_str)));
    match requested {
        None => Ok(None),
        Some("None") => Ok(Some(None)),
        Some(text) => {
            let ip: Ipv4Addr = text
                .parse()
                .with_context(|| format!("spec.clusterIP {text:?} is not an IPv4 address"))?;
            ensure!(
                SERVICE_CIDR.contains(&ip)
                    && ip != SERVICE_CIDR.network()
                    && ip != SERVICE_CIDR.broadcast(),
                "spec.clusterIP {ip} is outside the lab's service CIDR {SERVICE_CIDR}"
            );
            Ok(Some(Some(ip)))
        }
    }
}

/// The Service's ports, checked the way the API server checks them.
pub fn service_ports(service: &Service) -> Result<Vec<LabServicePort>> {
    let spec = service.spec.as_ref();
    match spec.and_then(|s| s.type_.as_deref()) {
        None | Some("ClusterIP") => {}
        Some(other) => bail!("spec.type {other}: the lab runs ClusterIP Services only"),
    }
    let declared = spec.and_then(|s| s.ports.as_deref()).unwrap_or_default();
    let mut ports = Vec::new();
    let mut seen = BTreeSet::new();
    for (index, port) in declared.iter().enumerate() {
        let at = || format!("spec.ports[{index}]");
        let number = valid_port(port.port).with_context(at)?;
        let protocol = parse_protocol(port.protocol.as_deref())
            .map_err(anyhow::Error::msg)
            .with_context(at)?;
        ensure!(
            protocol != Protocol::Sctp,
            "{}: SCTP, which the lab cannot serve",
            at()
        );
        let target_port = match &port.target_port {
            None => TargetPort::Number(number),
            Some(IntOrString::Int(n)) => TargetPort::Number(valid_port(*n).with_context(at)?),
            Some(IntOrString::String(name)) if name.is_empty() => {
                bail!("{}: empty targetPort", at())
            }
            Some(IntOrString::String(name)) => match name.parse::<i32>() {
                Ok(n) => TargetPort::Number(valid_port(n).with_context(at)?),
                Err(_) => TargetPort::Name(name.clone()),
            },
        };
        let name = port.name.clone().unwrap_or_default();
        ensure!(
            !name.is_empty() || declared.len() == 1,
            "{}: a Service with several ports must name each",
            at()
        );
        ensure!(
            seen.insert((number, protocol)),
            "{}: port {number}/{protocol} is declared twice",
            at()
        );
        ports.push(LabServicePort {
            name,
            port: number,
            protocol,
            target_port,
        });
    }
    let headless = matches!(requested_cluster_ip(service)?, Some(None));
    ensure!(
        headless || !ports.is_empty(),
        "a ClusterIP Service needs spec.ports"
    );
    let mut names = BTreeSet::new();
    ensure!(
        ports.iter().all(|p| names.insert(p.name.as_str())),
        "two ports share one name"
    );
    Ok(ports)
}

fn valid_port(number: i32) -> Result<u16> {
    u16::try_from(number)
        .ok()
        .filter(|&p| p != 0)
        .with_context(|| format!("{number} is not a port number"))
}

/// The ClusterIP of every Service, in spec order: a requested one is kept (and must be unique),
/// the others are handed out from 10.96.0.11 upwards, skipping any address taken.
pub fn allocate_cluster_ips(services: &[Service]) -> Result<Vec<Option<Ipv4Addr>>> {
    let requested: Vec<Option<Option<Ipv4Addr>>> = services
        .iter()
        .map(|s| {
            requested_cluster_ip(s).with_context(|| {
                format!(
                    "Service {}/{}",
                    service_namespace(s),
                    s.metadata.name.as_deref().unwrap_or_default()
                )
            })
        })
        .collect::<Result<_>>()?;
    let mut taken = BTreeSet::from([DNS_CLUSTER_IP]);
    for (service, ip) in services.iter().zip(&requested) {
        if let Some(Some(ip)) = ip {
            if !taken.insert(*ip) && *ip != DNS_CLUSTER_IP {
                bail!(
                    "Service {}/{}: clusterIP {ip} is already taken",
                    service_namespace(service),
                    service.metadata.name.as_deref().unwrap_or_default()
                );
            }
        }
    }
    ensure!(
        requested
            .iter()
            .filter(|ip| **ip == Some(Some(DNS_CLUSTER_IP)))
            .count()
            <= 1,
        "two Services ask for clusterIP {DNS_CLUSTER_IP}"
    );
    let mut next = u32::from(FIRST_ALLOCATED);
    let last = u32::from(SERVICE_CIDR.broadcast());
    requested
        .into_iter()
        .map(|ip| match ip {
            Some(requested) => Ok(requested),
            None => {
                while taken.contains(&Ipv4Addr::from(next)) {
                    next += 1;
                }
                ensure!(next < last, "the service CIDR {SERVICE_CIDR} is full");
                let ip = Ipv4Addr::from(next);
                taken.insert(ip);
                Ok(Some(ip))
            }
        })
        .collect()
}

/// Resolves every Service of `services` against the running `pods`, like the ClusterIP
/// allocator and the endpoints controller do; `spec_pods` are the pods' manifests, in the
/// same order as `pods`.
pub fn plan(services: &[Service], spec_pods: &[Pod], pods: &[LabPod]) -> Result<Vec<LabService>> {
    let ips = allocate_cluster_ips(services)?;
    services
        .iter()
        .zip(ips)
        .map(|(service, cluster_ip)| {
            let namespace = service_namespace(service).to_string();
            let name = service.metadata.name.clone().unwrap_or_default();
            let ports =
                service_ports(service).with_context(|| format!("Service {namespace}/{name}"))?;
            let endpoints = endpoints(service, &ports, spec_pods, pods);
            Ok(LabService {
                namespace,
                name,
                cluster_ip: cluster_ip.map(IpAddr::from),
                ports,
                endpoints,
            })
        })
        .collect()
}

/// The endpoints controller: pods of the Service's namespace whose labels carry every
/// selector pair. A Service without a selector has no managed endpoints.
fn endpoints(
    service: &Service,
    ports: &[LabServicePort],
    spec_pods: &[Pod],
    pods: &[LabPod],
) -> Vec<ServiceEndpoint> {
    let Some(selector) = service.spec.as_ref().and_then(|s| s.selector.as_ref()) else {
        return Vec::new();
    };
    let namespace = service_namespace(service);
    let name = service.metadata.name.as_deref().unwrap_or_default();
    spec_pods
        .iter()
        .zip(pods)
        .filter(|(pod, _)| pod_namespace(pod) == namespace)
        .filter(|(pod, _)| {
            let labels = pod.metadata.labels.as_ref();
            selector
                .iter()
                .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
        })
        .map(|(pod, running)| {
            let spec = pod.spec.as_ref();
            let hostname = spec
                .filter(|s| s.subdomain.as_deref() == Some(name))
                .and_then(|s| s.hostname.clone());
            ServiceEndpoint {
                pod: running.name.clone(),
                ip: running.ip,
                node: running.node.clone(),
                hostname,
                target_ports: ports.iter().map(|p| resolve_target(pod, p)).collect(),
            }
        })
        .collect()
}

/// Like the API's FindPort: a number is used as is, a name must be a container port of the
/// pod with the same protocol.
fn resolve_target(pod: &Pod, port: &LabServicePort) -> Option<u16> {
    match &port.target_port {
        TargetPort::Number(n) => Some(*n),
        TargetPort::Name(name) => pod
            .spec
            .iter()
            .flat_map(|s| &s.containers)
            .flat_map(|c| c.ports.iter().flatten())
            .find(|p| {
                p.name.as_deref() == Some(name.as_str())
                    && parse_protocol(p.protocol.as_deref()) == Ok(port.protocol)
            })
            .and_then(|p| u16::try_from(p.container_port).ok()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::spec::LabSpec;

    const SPEC: &str = r#"
kind: Namespace
apiVersion: v1
metadata: {name: shop}
---
kind: Pod
apiVersion: v1
metadata: {name: web-1, namespace: shop, labels: {app: web}}
spec: {containers: [{name: c, ports: [{containerPort: 8080, name: http}, {containerPort: 9090, name: metrics}]}]}
---
kind: Pod
apiVersion: v1
metadata: {name: web-2, namespace: shop, labels: {app: web, extra: x}}
spec: {containers: [{name: c, ports: [{containerPort: 8081, name: http}]}]}
---
kind: Pod
apiVersion: v1
metadata: {name: db-0, namespace: shop, labels: {app: db}}
spec: {hostname: db-0, subdomain: db, containers: [{name: c, ports: [{containerPort: 5432}]}]}
---
kind: Pod
apiVersion: v1
metadata: {name: web-elsewhere, labels: {app: web}}
spec: {containers: [{name: c, ports: [{containerPort: 8080, name: http}]}]}
---
kind: Service
apiVersion: v1
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: http}
  - {name: metrics, port: 9090, targetPort: metrics}
  - {name: admin, port: 81, targetPort: 7000, protocol: UDP}
---
kind: Service
apiVersion: v1
metadata: {name: db, namespace: shop}
spec: {clusterIP: None, selector: {app: db}, ports: [{port: 5432}]}
---
kind: Service
apiVersion: v1
metadata: {name: fixed, namespace: shop}
spec: {clusterIP: 10.96.0.12, ports: [{port: 1}]}
"#;

    fn lab_pods(spec: &LabSpec) -> Vec<LabPod> {
        spec.pods
            .iter()
            .enumerate()
            .map(|(i, pod)| LabPod {
                namespace: pod_namespace(pod).to_string(),
                name: pod.metadata.name.clone().unwrap(),
                ip: IpAddr::V4(Ipv4Addr::new(10, 244, 1, 2 + i as u8)),
                ipv6: None,
                netns: format!("p{i}"),
                ports: Vec::new(),
                node: "node-a".into(),
            })
            .collect()
    }

    #[test]
    fn allocates_from_11_and_keeps_requested_addresses() {
        let spec = LabSpec::from_yaml_str(SPEC).expect("the sample spec parses");
        let ips = allocate_cluster_ips(&spec.services).expect("allocation succeeds");
        assert_eq!(
            ips,
            [
                Some(Ipv4Addr::new(10, 96, 0, 11)),
                None,
                Some(Ipv4Addr::new(10, 96, 0, 12))
            ],
            "web gets the first free address, db is headless, fixed keeps its own"
        );
    }

    #[test]
    fn skips_requested_addresses_and_rejects_duplicates() {
        let svc = |name: &str, ip: Option<&str>| {
            let ip = ip
                .map(|ip| format!(", clusterIP: {ip}"))
                .unwrap_or_default();
            format!("kind: Service\napiVersion: v1\nmetadata: {{name: {name}}}\nspec: {{ports: [{{port: 80}}]{ip}}}\n---\n")
        };
        let text = [
            svc("a", None),
            svc("b", Some("10.96.0.11")),
            svc("kube-dns", Some("10.96.0.10")),
        ]
        .concat();
        let spec = LabSpec::from_yaml_str(&text).expect("parses");
        assert_eq!(
            allocate_cluster_ips(&spec.services).unwrap(),
            [
                Some(Ipv4Addr::new(10, 96, 0, 12)),
                Some(Ipv4Addr::new(10, 96, 0, 11)),
                Some(DNS_CLUSTER_IP)
            ],
            "a later Service's request is honoured, 10.96.0.10 only on request"
        );
        let twice = [svc("a", Some("10.96.0.20")), svc("b", Some("10.96.0.20"))].concat();
        let err = LabSpec::from_yaml_str(&twice).expect_err("a duplicate must fail");
        assert!(format!("{err:#}").contains("taken"), "{err:#}");
        let outside = svc("a", Some("10.97.0.1"));
        let err = LabSpec::from_yaml_str(&outside).expect_err("outside the CIDR must fail");
        assert!(format!("{err:#}").contains("10.96.0.0/16"), "{err:#}");
    }

    #[test]
    fn endpoints_follow_the_selector_and_named_ports_per_pod() {
        let spec = LabSpec::from_yaml_str(SPEC).expect("the sample spec parses");
        let pods = lab_pods(&spec);
        let services = plan(&spec.services, &spec.pods, &pods).expect("plan succeeds");
        let web = &services[0];
        let names: Vec<_> = web.endpoints.iter().map(|e| e.pod.as_str()).collect();
        assert_eq!(
            names,
            ["web-1", "web-2"],
            "same namespace only, extra labels do not matter"
        );
        assert_eq!(
            web.endpoints[0].target_ports,
            [Some(8080), Some(9090), Some(7000)]
        );
        assert_eq!(
            web.endpoints[1].target_ports,
            [Some(8081), None, Some(7000)],
            "web-2 has no port named metrics, so it is no endpoint of that port"
        );
        assert_eq!(web.backends(1).count(), 1);
        assert_eq!(web.port_id(0), "shop/web:http");
        assert_eq!(web.ports[2].protocol, Protocol::Udp);

        let db = &services[1];
        assert!(db.is_headless());
        assert_eq!(db.endpoints.len(), 1);
        assert_eq!(
            db.endpoints[0].hostname.as_deref(),
            Some("db-0"),
            "the pod's subdomain names this Service, so its hostname is published"
        );
        assert_eq!(db.port_id(0), "shop/db", "an unnamed port adds no suffix");
        assert!(
            services[2].endpoints.is_empty(),
            "no selector, no managed endpoints"
        );
    }

    #[test]
    fn rejects_what_the_api_server_rejects() {
        let bad = |spec: &str| {
            let text =
                format!("kind: Service\napiVersion: v1\nmetadata: {{name: s}}\nspec: {spec}\n");
            format!("{:#}", LabSpec::from_yaml_str(&text).expect_err(spec))
        };
        for (spec, why) in [
            ("{ports: [{port: 80}, {port: 81}]}", "several ports"),
            ("{ports: [{port: 0}]}", "port number"),
            ("{type: NodePort, ports: [{port: 80}]}", "ClusterIP"),
            ("{}", "spec.ports"),
            ("{ports: [{port: 80, protocol: SCTP}]}", "SCTP"),
        ] {
            let err = bad(spec);
            assert!(
                err.contains(why),
                "{spec}: expected an error about {why}, got {err}"
            );
        }
        let headless =
            "kind: Service\napiVersion: v1\nmetadata: {name: s}\nspec: {clusterIP: None}\n";
        LabSpec::from_yaml_str(headless).expect("a headless Service may have no ports");
    }
}
