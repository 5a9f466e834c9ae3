//! The lab as an API server would hold it: the spec's Namespaces, Pods and Services with the
//! fields the control plane fills in (node name, pod IPs, phase, the namespace name label,
//! ClusterIPs), plus what kubelets and controllers create (a Node per node with its pod CIDRs
//! and InternalIPs, an EndpointSlice per Service). The agent's file source reads this instead
//! of a real cluster.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::{
    Namespace, Node, NodeAddress, NodeSpec, NodeStatus, ObjectReference, Pod, PodIP, PodStatus,
    Service,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::node::LabPod;
use super::options::NodePlan;
use super::services::{service_namespace, LabService};
use super::spec::{pod_namespace, LabSpec};

/// The label the API server puts on every namespace; policies select namespaces by name with it.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// The label tying an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
const MANAGED_BY: &str = "endpointslice-controller.k8s.io";
const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";

pub fn render(
    spec: &LabSpec,
    nodes: &[NodePlan],
    pods: &[LabPod],
    services: &[LabService],
) -> Result<String> {
    let mut yaml = String::new();
    for namespace in spec.namespaces_with_implicit() {
        append(&mut yaml, &as_stored_namespace(namespace))?;
    }
    for node in nodes {
        append(&mut yaml, &as_stored_node(node))?;
    }
    for pod in &spec.pods {
        let name = pod.metadata.name.as_deref().unwrap_or_default();
        let namespace = pod_namespace(pod);
        let lab_pod = pods
            .iter()
            .find(|p| p.namespace == namespace && p.name == name)
            .with_context(|| format!("pod {namespace}/{name} has no lab address"))?;
        append(&mut yaml, &as_stored_pod(pod.clone(), lab_pod))?;
    }
    for service in &spec.services {
        let namespace = service_namespace(service);
        let name = service.metadata.name.as_deref().unwrap_or_default();
        let lab_service = services
            .iter()
            .find(|s| s.namespace == namespace && s.name == name)
            .with_context(|| format!("service {namespace}/{name} was not planned"))?;
        append(&mut yaml, &as_stored_service(service.clone(), lab_service))?;
        if service
            .spec
            .as_ref()
            .and_then(|s| s.selector.as_ref())
            .is_some()
        {
            for slice in endpoint_slices(service, lab_service) {
                append(&mut yaml, &slice)?;
            }
        }
    }
    Ok(yaml)
}

pub fn write(dir: &Path, file_name: &str, yaml: &str) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(file_name);
    std::fs::write(&path, yaml).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

fn append(yaml: &mut String, object: &impl serde::Serialize) -> Result<()> {
    let document = serde_yaml::to_string(object).context("serializing a manifest")?;
    let _ = write!(yaml, "---\n{document}");
    Ok(())
}

fn as_stored_namespace(mut namespace: Namespace) -> Namespace {
    let name = namespace.metadata.name.clone().unwrap_or_default();
    namespace
        .metadata
        .labels
        .get_or_insert_with(Default::default)
        .insert(NAMESPACE_NAME_LABEL.to_string(), name);
    namespace
}

fn as_stored_pod(mut pod: Pod, lab_pod: &LabPod) -> Pod {
    pod.metadata.namespace = Some(lab_pod.namespace.clone());
    pod.spec.get_or_insert_with(Default::default).node_name = Some(lab_pod.node.clone());
    let status = pod.status.get_or_insert_with(PodStatus::default);
    status.phase = Some("Running".to_string());
    status.pod_ip = Some(lab_pod.ip.to_string());
    // The primary (IPv4) family first, as a dual-stack API server lists them.
    status.pod_ips = Some(
        std::iter::once(lab_pod.ip)
            .chain(lab_pod.ipv6)
            .map(|ip| PodIP { ip: ip.to_string() })
            .collect(),
    );
    pod
}

/// A Node as kubelet registers it and the node IPAM controller completes it: pod CIDRs
/// (IPv4 first) and the InternalIP(s) other nodes reach it at.
fn as_stored_node(plan: &NodePlan) -> Node {
    let mut node = Node::default();
    node.metadata.name = Some(plan.node_name.clone());
    node.metadata.labels = Some(
        [
            ("kubernetes.io/hostname", plan.node_name.as_str()),
            ("kubernetes.io/os", "linux"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect(),
    );
    let cidrs: Vec<String> = std::iter::once(plan.pod_cidr.to_string())
        .chain(plan.pod_cidr_v6.map(|c| c.to_string()))
        .collect();
    node.spec = Some(NodeSpec {
        pod_cidr: Some(cidrs[0].clone()),
        pod_cidrs: Some(cidrs),
        ..NodeSpec::default()
    });
    let internal = plan
        .address
        .map(|a| a.addr().to_string())
        .into_iter()
        .chain(plan.address_v6.map(|a| a.addr().to_string()))
        .map(|address| NodeAddress {
            address,
            type_: "InternalIP".to_string(),
        });
    let hostname = NodeAddress {
        address: plan.node_name.clone(),
        type_: "Hostname".to_string(),
    };
    node.status = Some(NodeStatus {
        addresses: Some(internal.chain([hostname]).collect()),
        ..NodeStatus::default()
    });
    node
}

/// The defaults the API server fills in and the ClusterIP the allocator chose.
fn as_stored_service(mut service: Service, lab: &LabService) -> Service {
    service.metadata.namespace = Some(lab.namespace.clone());
    let spec = service.spec.get_or_insert_with(Default::default);
    let cluster_ip = lab
        .cluster_ip
        .map_or_else(|| "None".to_string(), |ip| ip.to_string());
    spec.type_ = Some("ClusterIP".to_string());
    spec.cluster_ip = Some(cluster_ip.clone());
    spec.cluster_ips = Some(vec![cluster_ip]);
    spec.ip_families = Some(vec!["IPv4".to_string()]);
    spec.ip_family_policy = Some("SingleStack".to_string());
    spec.session_affinity
        .get_or_insert_with(|| "None".to_string());
    spec.internal_traffic_policy
        .get_or_insert_with(|| "Cluster".to_string());
    for port in spec.ports.iter_mut().flatten() {
        port.protocol.get_or_insert_with(|| "TCP".to_string());
        port.target_port.get_or_insert(IntOrString::Int(port.port));
    }
    service
}

/// What the EndpointSlice controller writes: the endpoints grouped by the ports they resolve
/// (a named targetPort may map to different numbers on different pods), one slice per group,
/// and one empty slice for a Service without endpoints.
fn endpoint_slices(service: &Service, lab: &LabService) -> Vec<EndpointSlice> {
    let mut groups: BTreeMap<Vec<Option<u16>>, Vec<Endpoint>> = BTreeMap::new();
    for endpoint in &lab.endpoints {
        groups
            .entry(endpoint.target_ports.clone())
            .or_default()
            .push(Endpoint {
                addresses: vec![endpoint.ip.to_string()],
                conditions: Some(EndpointConditions {
                    ready: Some(true),
                    serving: Some(true),
                    terminating: Some(false),
                }),
                hostname: endpoint.hostname.clone(),
                node_name: Some(endpoint.node.clone()),
                target_ref: Some(ObjectReference {
                    kind: Some("Pod".to_string()),
                    namespace: Some(lab.namespace.clone()),
                    name: Some(endpoint.pod.clone()),
                    ..ObjectReference::default()
                }),
                ..Endpoint::default()
            });
    }
    if groups.is_empty() {
        groups.insert(Vec::new(), Vec::new());
    }
    let mut labels = service.metadata.labels.clone().unwrap_or_default();
    labels.insert(SERVICE_NAME_LABEL.to_string(), lab.name.clone());
    labels.insert(MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string());
    if lab.is_headless() {
        labels.insert(HEADLESS_LABEL.to_string(), String::new());
    }
    groups
        .into_iter()
        .enumerate()
        .map(|(index, (target_ports, endpoints))| {
            let ports = lab
                .ports
                .iter()
                .zip(&target_ports)
                .filter_map(|(port, target)| {
                    Some(EndpointPort {
                        name: Some(port.name.clone()),
                        port: Some(i32::from((*target)?)),
                        protocol: Some(port.protocol.to_string()),
                        app_protocol: None,
                    })
                })
                .collect();
            let mut slice = EndpointSlice {
                address_type: "IPv4".to_string(),
                endpoints,
                ports: Some(ports),
                ..EndpointSlice::default()
            };
            // The controller's names are `<service>-<5 random characters>`; the lab's are
            // stable so that rewriting the manifests changes nothing.
            slice.metadata.name = Some(format!("{}-{}", lab.name, slice_suffix(&lab.name, index)));
            slice.metadata.namespace = Some(lab.namespace.clone());
            slice.metadata.labels = Some(labels.clone());
            slice
        })
        .collect()
}

fn slice_suffix(service: &str, index: usize) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut hash = service
        .bytes()
        .chain(index.to_le_bytes())
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
    (0..5)
        .map(|_| {
            let c = ALPHABET[(hash % ALPHABET.len() as u64) as usize];
            hash /= ALPHABET.len() as u64;
            char::from(c)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::lab::options::{resolve_nodes, ClusterOptions};
    use crate::lab::services;

    const SPEC: &str = r#"
kind: Pod
apiVersion: v1
metadata: {name: web-1, labels: {app: web}}
spec: {nodeName: node-b, containers: [{name: c, ports: [{containerPort: 8080, name: http}]}]}
---
kind: Pod
apiVersion: v1
metadata: {name: web-2, labels: {app: web}}
spec: {containers: [{name: c, ports: [{containerPort: 8081, name: http}]}]}
---
kind: Service
apiVersion: v1
metadata: {name: web, labels: {tier: front}}
spec: {selector: {app: web}, ports: [{port: 80, targetPort: http}]}
---
kind: Service
apiVersion: v1
metadata: {name: manual}
spec: {ports: [{port: 81}]}
"#;

    fn documents(yaml: &str) -> Vec<serde_yaml::Value> {
        serde_yaml::Deserializer::from_str(yaml)
            .map(|d| <serde_yaml::Value as serde::Deserialize>::deserialize(d).unwrap())
            .collect()
    }

    #[test]
    fn holds_what_an_api_server_would_for_two_nodes_and_a_service() {
        let spec = LabSpec::from_yaml_str(SPEC).expect("the sample spec parses");
        let nodes = resolve_nodes(&ClusterOptions::two_nodes(), "lab-1-0").unwrap();
        let pods: Vec<LabPod> = [("web-1", 1), ("web-2", 0)]
            .iter()
            .map(|(name, node)| LabPod {
                namespace: "default".into(),
                name: name.to_string(),
                ip: IpAddr::from([10, 244, *node as u8 + 1, 2]),
                ipv6: None,
                netns: String::new(),
                ports: Vec::new(),
                node: nodes[*node].node_name.clone(),
            })
            .collect();
        let services = services::plan(&spec.services, &spec.pods, &pods).unwrap();
        let yaml = render(&spec, &nodes, &pods, &services).expect("renders");
        let docs = documents(&yaml);
        let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
        assert_eq!(
            kinds,
            [
                "Namespace",
                "Node",
                "Node",
                "Pod",
                "Pod",
                "Service",
                "EndpointSlice",
                "EndpointSlice",
                "Service"
            ],
            "a Service without a selector gets no managed EndpointSlice"
        );
        let node_b = &docs[2];
        assert_eq!(node_b["metadata"]["name"], "lab-1-0-node-b");
        assert_eq!(node_b["spec"]["podCIDR"], "10.244.2.0/24");
        assert_eq!(node_b["status"]["addresses"][0]["type"], "InternalIP");
        assert_eq!(node_b["status"]["addresses"][0]["address"], "172.18.0.3");
        assert_eq!(docs[3]["spec"]["nodeName"], "lab-1-0-node-b");

        let web = &docs[5];
        assert_eq!(web["spec"]["clusterIP"], "10.96.0.11");
        assert_eq!(web["spec"]["ports"][0]["protocol"], "TCP");
        assert_eq!(web["spec"]["ports"][0]["targetPort"], "http");
        assert_eq!(
            docs[8]["spec"]["ports"][0]["targetPort"], 81,
            "defaulted to port"
        );

        let slice = &docs[6];
        assert_eq!(slice["metadata"]["labels"][SERVICE_NAME_LABEL], "web");
        assert_eq!(
            slice["metadata"]["labels"]["tier"], "front",
            "the Service's labels are copied"
        );
        assert_eq!(slice["endpoints"][0]["nodeName"], "lab-1-0-node-b");
        assert_eq!(slice["endpoints"][0]["targetRef"]["name"], "web-1");
        assert_eq!(slice["ports"][0]["name"], "");
        assert_eq!(slice["ports"][0]["port"], 8080);
        assert_eq!(docs[7]["ports"][0]["port"], 8081, "web-2's own port");
        assert_ne!(
            slice["metadata"]["name"], docs[7]["metadata"]["name"],
            "slice names are distinct"
        );
        assert_eq!(
            yaml,
            render(&spec, &nodes, &pods, &services).unwrap(),
            "rendering is stable"
        );
    }
}
