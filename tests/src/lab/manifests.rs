//! The lab as an API server would hold it: the spec's Namespaces and Pods, with the fields the
//! control plane fills in (node name, pod IPs, phase, the namespace name label). The agent's
//! file source reads this instead of a real cluster.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::{Namespace, Pod, PodIP, PodStatus};

use super::node::LabPod;
use super::spec::{pod_namespace, LabSpec};

/// The label the API server puts on every namespace; policies select namespaces by name with it.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

pub fn render(spec: &LabSpec, pods: &[LabPod], node_name: &str) -> Result<String> {
    let mut yaml = String::new();
    for namespace in spec.namespaces_with_implicit() {
        append(&mut yaml, &as_stored_namespace(namespace))?;
    }
    for pod in &spec.pods {
        let name = pod.metadata.name.as_deref().unwrap_or_default();
        let namespace = pod_namespace(pod);
        let lab_pod = pods
            .iter()
            .find(|p| p.namespace == namespace && p.name == name)
            .with_context(|| format!("pod {namespace}/{name} has no lab address"))?;
        append(&mut yaml, &as_stored_pod(pod.clone(), lab_pod, node_name))?;
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

fn as_stored_pod(mut pod: Pod, lab_pod: &LabPod, node_name: &str) -> Pod {
    pod.metadata.namespace = Some(lab_pod.namespace.clone());
    pod.spec.get_or_insert_with(Default::default).node_name = Some(node_name.to_string());
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
