//! Cluster DNS as the lab serves it: the kube-dns objects it adds to a spec, the records
//! CoreDNS's kubernetes plugin would answer (rendered as a hosts file for dnsmasq), and the
//! resolv.conf and /etc/hosts kubelet gives every pod. Pure; `dnsmasq` runs the server and
//! `etc_netns` puts the pod files in place.

use std::fmt::Write as _;

use anyhow::{bail, Context, Result};
use k8s_openapi::api::core::v1::Pod;

use super::node::LabPod;
use super::services::{service_namespace, LabService, DNS_CLUSTER_IP};
use super::spec::{pod_namespace, LabSpec};

pub const CLUSTER_DOMAIN: &str = "cluster.local";
pub const DNS_NAMESPACE: &str = "kube-system";
pub const DNS_POD: &str = "coredns";
pub const DNS_SERVICE: &str = "kube-dns";

/// What `kubeadm` deploys, reduced to what the lab needs: the pod (labelled like CoreDNS, so
/// policies that allow DNS by `k8s-app: kube-dns` select it) and the Service at 10.96.0.10.
const KUBE_DNS: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: coredns
  namespace: kube-system
  labels: {k8s-app: kube-dns}
spec:
  containers:
  - name: coredns
    image: registry.k8s.io/coredns/coredns
    ports:
    - {name: dns, containerPort: 53, protocol: UDP}
    - {name: dns-tcp, containerPort: 53, protocol: TCP}
---
apiVersion: v1
kind: Service
metadata:
  name: kube-dns
  namespace: kube-system
  labels: {k8s-app: kube-dns, kubernetes.io/name: CoreDNS}
spec:
  clusterIP: 10.96.0.10
  selector: {k8s-app: kube-dns}
  ports:
  - {name: dns, port: 53, protocol: UDP, targetPort: 53}
  - {name: dns-tcp, port: 53, protocol: TCP, targetPort: 53}
"#;

/// Adds kube-system (unless declared), the CoreDNS pod and the kube-dns Service to `spec`.
pub fn add_kube_dns(spec: &mut LabSpec) -> Result<()> {
    let declared_pod = spec
        .pods
        .iter()
        .any(|p| pod_namespace(p) == DNS_NAMESPACE && p.metadata.name.as_deref() == Some(DNS_POD));
    let declared_service = spec.services.iter().any(|s| {
        service_namespace(s) == DNS_NAMESPACE && s.metadata.name.as_deref() == Some(DNS_SERVICE)
    });
    if declared_pod || declared_service {
        bail!(
            "the lab's DNS adds {DNS_NAMESPACE}/{DNS_POD} and Service {DNS_NAMESPACE}/{DNS_SERVICE}; \
             the spec declares one already"
        );
    }
    let added = LabSpec::from_yaml_str(&format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {DNS_NAMESPACE}}}\n---\n{KUBE_DNS}"
    ))
    .context("the built-in kube-dns manifests")?;
    if !spec
        .namespaces
        .iter()
        .any(|n| n.metadata.name.as_deref() == Some(DNS_NAMESPACE))
    {
        spec.namespaces.extend(added.namespaces);
    }
    spec.pods.extend(added.pods);
    spec.services.extend(added.services);
    Ok(())
}

pub fn is_dns_pod(namespace: &str, name: &str) -> bool {
    namespace == DNS_NAMESPACE && name == DNS_POD
}

/// The A records CoreDNS would serve, as `address name` lines: a Service's name resolves to
/// its ClusterIP, a headless Service's to each endpoint, and an endpoint with a hostname (a
/// pod whose `subdomain` names the headless Service) has a name of its own.
pub fn cluster_hosts(services: &[LabService]) -> String {
    let mut hosts = String::new();
    for service in services {
        let name = format!(
            "{}.{}.svc.{CLUSTER_DOMAIN}",
            service.name, service.namespace
        );
        match service.cluster_ip {
            Some(ip) => {
                let _ = writeln!(hosts, "{ip} {name}");
            }
            None => {
                for endpoint in &service.endpoints {
                    let _ = writeln!(hosts, "{} {name}", endpoint.ip);
                    if let Some(hostname) = &endpoint.hostname {
                        let _ = writeln!(hosts, "{} {hostname}.{name}", endpoint.ip);
                    }
                }
            }
        }
    }
    hosts
}

/// kubelet's resolv.conf for a pod with `dnsPolicy: ClusterFirst`.
pub fn resolv_conf(namespace: &str) -> String {
    format!(
        "nameserver {DNS_CLUSTER_IP}\n\
         search {namespace}.svc.{CLUSTER_DOMAIN} svc.{CLUSTER_DOMAIN} {CLUSTER_DOMAIN}\n\
         options ndots:5\n"
    )
}

/// kubelet's /etc/hosts for a pod: localhost, then the pod's own name on each of its
/// addresses (its FQDN first when it has a hostname and subdomain).
pub fn pod_hosts(pod: &LabPod, spec: &Pod) -> String {
    let hostname = spec
        .spec
        .as_ref()
        .and_then(|s| s.hostname.clone())
        .unwrap_or_else(|| pod.name.clone());
    let subdomain = spec.spec.as_ref().and_then(|s| s.subdomain.as_deref());
    let names = match subdomain {
        Some(subdomain) => format!(
            "{hostname}.{subdomain}.{}.svc.{CLUSTER_DOMAIN}\t{hostname}",
            pod.namespace
        ),
        None => hostname,
    };
    let mut hosts = String::from(
        "# Kubernetes-managed hosts file.\n\
         127.0.0.1\tlocalhost\n\
         ::1\tlocalhost ip6-localhost ip6-loopback\n\
         fe00::0\tip6-localnet\n\
         fe00::0\tip6-mcastprefix\n\
         fe00::1\tip6-allnodes\n\
         fe00::2\tip6-allrouters\n",
    );
    for ip in std::iter::once(pod.ip).chain(pod.ipv6) {
        let _ = writeln!(hosts, "{ip}\t{names}");
    }
    hosts
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::lab::services::{LabServicePort, ServiceEndpoint, TargetPort};
    use crate::lab::spec::Protocol;

    fn endpoint(pod: &str, ip: &str, hostname: Option<&str>) -> ServiceEndpoint {
        ServiceEndpoint {
            pod: pod.into(),
            ip: ip.parse().unwrap(),
            node: "n".into(),
            hostname: hostname.map(str::to_string),
            target_ports: vec![Some(3306)],
        }
    }

    #[test]
    fn services_resolve_to_cluster_ips_and_headless_ones_to_pods() {
        let port = LabServicePort {
            name: String::new(),
            port: 3306,
            protocol: Protocol::Tcp,
            target_port: TargetPort::Number(3306),
        };
        let services = [
            LabService {
                namespace: "app1-ns".into(),
                name: "backend-svc".into(),
                cluster_ip: Some("10.96.0.12".parse().unwrap()),
                ports: vec![port.clone()],
                endpoints: vec![endpoint("backend", "10.244.1.3", None)],
            },
            LabService {
                namespace: "app1-ns".into(),
                name: "db-svc".into(),
                cluster_ip: None,
                ports: vec![port],
                endpoints: vec![
                    endpoint("db-sts-0", "10.244.1.4", Some("db-sts-0")),
                    endpoint("db-other", "10.244.1.5", None),
                ],
            },
        ];
        assert_eq!(
            cluster_hosts(&services),
            "10.96.0.12 backend-svc.app1-ns.svc.cluster.local\n\
             10.244.1.4 db-svc.app1-ns.svc.cluster.local\n\
             10.244.1.4 db-sts-0.db-svc.app1-ns.svc.cluster.local\n\
             10.244.1.5 db-svc.app1-ns.svc.cluster.local\n"
        );
    }

    #[test]
    fn pods_get_kubelets_resolv_conf_and_hosts() {
        assert_eq!(
            resolv_conf("app1-ns"),
            "nameserver 10.96.0.10\nsearch app1-ns.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n"
        );
        let spec: Pod = serde_yaml::from_str(
            "metadata: {name: db-sts-0, namespace: app1-ns}\nspec: {hostname: db-sts-0, subdomain: db-svc, containers: []}\n",
        )
        .unwrap();
        let pod = LabPod {
            namespace: "app1-ns".into(),
            name: "db-sts-0".into(),
            ip: "10.244.1.4".parse().unwrap(),
            ipv6: Some("fd00:10:244:1::4".parse::<IpAddr>().unwrap()),
            netns: "x".into(),
            ports: Vec::new(),
            node: "n".into(),
        };
        let hosts = pod_hosts(&pod, &spec);
        assert!(
            hosts.ends_with(
                "10.244.1.4\tdb-sts-0.db-svc.app1-ns.svc.cluster.local\tdb-sts-0\n\
                 fd00:10:244:1::4\tdb-sts-0.db-svc.app1-ns.svc.cluster.local\tdb-sts-0\n"
            ),
            "{hosts}"
        );
        assert!(hosts.contains("127.0.0.1\tlocalhost\n"));
    }

    #[test]
    fn adds_kube_dns_once() {
        let mut spec = LabSpec::from_yaml_str(
            "kind: Namespace\napiVersion: v1\nmetadata: {name: kube-system, labels: {x: y}}\n",
        )
        .unwrap();
        add_kube_dns(&mut spec).expect("kube-dns is added");
        assert_eq!(spec.namespaces.len(), 1, "a declared kube-system is kept");
        assert_eq!(
            spec.pods[0].metadata.labels.as_ref().unwrap()["k8s-app"],
            "kube-dns"
        );
        let service = spec.services[0].spec.as_ref().unwrap();
        assert_eq!(service.cluster_ip.as_deref(), Some("10.96.0.10"));
        assert_eq!(
            service.ports.as_ref().unwrap().len(),
            2,
            "53/UDP and 53/TCP"
        );
        assert!(
            add_kube_dns(&mut spec).is_err(),
            "a second kube-dns is refused"
        );

        let mut bare = LabSpec::default();
        add_kube_dns(&mut bare).unwrap();
        assert_eq!(
            bare.namespaces[0].metadata.name.as_deref(),
            Some(DNS_NAMESPACE)
        );
    }
}
