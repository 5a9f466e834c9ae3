//! The lab's input: ordinary Kubernetes `Namespace` and `Pod` manifests in one multi-document
//! YAML file. Owns parsing and validation only; nothing here touches the machine.

use std::collections::BTreeSet;
use std::fmt;
use std::path::Path;

use anyhow::{bail, Context, Result};
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use serde::Deserialize;

use super::services::{allocate_cluster_ips, service_namespace, service_ports};

/// The namespace a pod without `metadata.namespace` lands in; it exists in every cluster, so a
/// spec may use it without declaring it.
pub const DEFAULT_NAMESPACE: &str = "default";

/// What a lab is made of: the namespaces, pods and services of the manifests, in file order.
#[derive(Debug, Clone, Default)]
pub struct LabSpec {
    pub namespaces: Vec<Namespace>,
    pub pods: Vec<Pod>,
    /// ClusterIP Services (headless too); the lab plays kube-proxy and the endpoints
    /// controller for them.
    pub services: Vec<Service>,
}

/// One container port of a pod, where the lab runs a server.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PodPort {
    pub port: u16,
    pub protocol: Protocol,
    pub name: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        })
    }
}

/// Only `kind` is read first, so documents of other kinds are skipped without being understood.
#[derive(Deserialize)]
struct KindOnly {
    kind: Option<String>,
}

impl LabSpec {
    pub fn load(path: impl AsRef<Path>) -> Result<LabSpec> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading lab spec {}", path.display()))?;
        LabSpec::from_yaml_str(&text)
            .with_context(|| format!("parsing lab spec {}", path.display()))
    }

    pub fn from_yaml_str(text: &str) -> Result<LabSpec> {
        let mut spec = LabSpec::default();
        for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let value = serde_yaml::Value::deserialize(document)
                .with_context(|| format!("yaml document {index}"))?;
            if value.is_null() {
                continue; // an empty document, e.g. a trailing `---`
            }
            let kind = serde_yaml::from_value::<KindOnly>(value.clone())
                .with_context(|| format!("yaml document {index}"))?
                .kind;
            match kind.as_deref() {
                Some("Namespace") => spec.namespaces.push(
                    serde_yaml::from_value(value)
                        .with_context(|| format!("yaml document {index}: Namespace"))?,
                ),
                Some("Pod") => spec.pods.push(
                    serde_yaml::from_value(value)
                        .with_context(|| format!("yaml document {index}: Pod"))?,
                ),
                Some("Service") => spec.services.push(
                    serde_yaml::from_value(value)
                        .with_context(|| format!("yaml document {index}: Service"))?,
                ),
                _ => {}
            }
        }
        spec.validate()?;
        Ok(spec)
    }

    /// Rejects what a real API server would reject and the lab could not build, so mistakes in
    /// a spec fail at parse time rather than as a confusing network error later.
    fn validate(&self) -> Result<()> {
        let mut namespaces = BTreeSet::new();
        for namespace in &self.namespaces {
            let Some(name) = namespace.metadata.name.as_deref() else {
                bail!("a Namespace has no metadata.name");
            };
            if !namespaces.insert(name) {
                bail!("namespace {name} is declared twice");
            }
        }
        let mut pods = BTreeSet::new();
        for pod in &self.pods {
            let Some(name) = pod.metadata.name.as_deref() else {
                bail!("a Pod has no metadata.name");
            };
            let namespace = pod_namespace(pod);
            if namespace != DEFAULT_NAMESPACE && !namespaces.contains(namespace) {
                bail!("pod {namespace}/{name} is in namespace {namespace}, which the spec does not declare");
            }
            if !pods.insert((namespace, name)) {
                bail!("pod {namespace}/{name} is declared twice");
            }
            pod_ports(pod).with_context(|| format!("pod {namespace}/{name}"))?;
        }
        let mut services = BTreeSet::new();
        for service in &self.services {
            let Some(name) = service.metadata.name.as_deref() else {
                bail!("a Service has no metadata.name");
            };
            let namespace = service_namespace(service);
            if namespace != DEFAULT_NAMESPACE && !namespaces.contains(namespace) {
                bail!("service {namespace}/{name} is in namespace {namespace}, which the spec does not declare");
            }
            if !services.insert((namespace, name)) {
                bail!("service {namespace}/{name} is declared twice");
            }
            service_ports(service).with_context(|| format!("service {namespace}/{name}"))?;
        }
        allocate_cluster_ips(&self.services)?;
        Ok(())
    }

    /// The declared namespaces plus `default` when a pod uses it without declaring it.
    pub fn namespaces_with_implicit(&self) -> Vec<Namespace> {
        let mut namespaces = self.namespaces.clone();
        let declared = |name: &str| {
            namespaces
                .iter()
                .any(|n| n.metadata.name.as_deref() == Some(name))
        };
        let uses_default = self
            .pods
            .iter()
            .any(|p| pod_namespace(p) == DEFAULT_NAMESPACE)
            || self
                .services
                .iter()
                .any(|s| service_namespace(s) == DEFAULT_NAMESPACE);
        if !declared(DEFAULT_NAMESPACE) && uses_default {
            let mut default = Namespace::default();
            default.metadata.name = Some(DEFAULT_NAMESPACE.to_string());
            namespaces.push(default);
        }
        namespaces
    }
}

pub fn pod_namespace(pod: &Pod) -> &str {
    pod.metadata
        .namespace
        .as_deref()
        .unwrap_or(DEFAULT_NAMESPACE)
}

/// A port's protocol as the API spells it, TCP when absent.
pub fn parse_protocol(protocol: Option<&str>) -> Result<Protocol, String> {
    match protocol.unwrap_or("TCP") {
        "TCP" => Ok(Protocol::Tcp),
        "UDP" => Ok(Protocol::Udp),
        "SCTP" => Ok(Protocol::Sctp),
        other => Err(format!("unknown protocol {other}")),
    }
}

/// Every distinct (port, protocol) over all containers; the same port declared twice would
/// otherwise make the lab bind it twice.
pub fn pod_ports(pod: &Pod) -> Result<Vec<PodPort>> {
    let mut ports = BTreeSet::new();
    let containers = pod.spec.iter().flat_map(|spec| &spec.containers);
    for port in containers.flat_map(|c| c.ports.iter().flatten()) {
        let number = u16::try_from(port.container_port)
            .ok()
            .filter(|&p| p != 0)
            .with_context(|| {
                format!("containerPort {} is not a port number", port.container_port)
            })?;
        let protocol = parse_protocol(port.protocol.as_deref())
            .map_err(|e| anyhow::anyhow!("containerPort {number}: {e}"))?;
        ports.insert(PodPort {
            port: number,
            protocol,
            name: port.name.clone(),
        });
    }
    // A port named in one container and unnamed in another is still one socket.
    let mut seen = BTreeSet::new();
    Ok(ports
        .into_iter()
        .filter(|p| seen.insert((p.port, p.protocol)))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels: {team: a}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}}
spec:
  containers:
  - name: c
    image: x
    ports:
    - {containerPort: 80, name: http}
    - {containerPort: 53, protocol: UDP}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: ignored}
---
apiVersion: v1
kind: Pod
metadata: {name: loose}
spec: {containers: [{name: c, image: x}]}
---
"#;

    #[test]
    fn parses_namespaces_and_pods_and_skips_other_kinds() {
        let spec = LabSpec::from_yaml_str(SPEC).expect("the sample spec should parse");
        assert_eq!(spec.namespaces.len(), 1, "one Namespace document");
        assert_eq!(
            spec.pods.len(),
            2,
            "two Pod documents, the NetworkPolicy skipped"
        );
        let ports = pod_ports(&spec.pods[0]).expect("valid ports");
        assert_eq!(
            ports,
            vec![
                PodPort {
                    port: 53,
                    protocol: Protocol::Udp,
                    name: None
                },
                PodPort {
                    port: 80,
                    protocol: Protocol::Tcp,
                    name: Some("http".into())
                },
            ],
            "protocol defaults to TCP and ports keep their names"
        );
        let names: Vec<_> = spec
            .namespaces_with_implicit()
            .iter()
            .map(|n| n.metadata.name.clone().unwrap())
            .collect();
        assert_eq!(
            names,
            ["shop", "default"],
            "the unnamed pod's namespace is implied"
        );
    }

    #[test]
    fn rejects_pods_in_undeclared_namespaces() {
        let text = "kind: Pod\napiVersion: v1\nmetadata: {name: a, namespace: nowhere}\n";
        let err =
            LabSpec::from_yaml_str(text).expect_err("an undeclared namespace must be an error");
        assert!(
            err.to_string().contains("nowhere"),
            "the error should name the namespace: {err:#}"
        );
    }

    #[test]
    fn rejects_duplicate_pods_and_bad_ports() {
        let pod = "kind: Pod\napiVersion: v1\nmetadata: {name: a}\nspec: {containers: [{name: c, ports: [{containerPort: 70000}]}]}\n";
        let err = LabSpec::from_yaml_str(pod).expect_err("port 70000 must be rejected");
        assert!(
            format!("{err:#}").contains("70000"),
            "the error should name the port: {err:#}"
        );
        let twice = "kind: Pod\napiVersion: v1\nmetadata: {name: a}\n---\nkind: Pod\napiVersion: v1\nmetadata: {name: a}\n";
        let err = LabSpec::from_yaml_str(twice).expect_err("a duplicate pod must be rejected");
        assert!(
            err.to_string().contains("twice"),
            "unexpected error: {err:#}"
        );
    }
}
