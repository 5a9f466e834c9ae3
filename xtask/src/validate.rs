//! `cargo xtask validate`: the deploy/ files checked offline (no cluster, no Docker here).
//!
//! - every Kubernetes manifest a user applies, against the Kubernetes 1.33 OpenAPI schemas
//!   (kubernetes-validate, strict: unknown fields are errors, and so is a kind it has no
//!   schema for, which the tool itself only warns about);
//! - the kind cluster config (not a Kubernetes object): parsed, its fields checked the way
//!   kind decodes it (unknown fields refused) and the values the demo relies on;
//! - the KIND demo script: `bash -n` and shellcheck.
//!
//! The security-relevant content of deploy/netpol.yaml and the probe expectations of the demo
//! are checked by tests/tests/manifests.rs (k8s-openapi types, `netpol-agent simulate`), and the
//! DaemonSet's capability set by tests/tests/capabilities.rs.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{bail, ensure, Context as _, Result};
use serde_yaml::Value;

use crate::{
    setup,
    util::{command, exec, step, workspace_root},
};

/// The schema version kubernetes-validate checks against (its 1.33.1 release bundles 1.33.0).
pub const KUBERNETES_VERSION: &str = "1.33.0";

/// Manifests, relative to the workspace root: files, or directories whose `*.yaml` are taken.
const MANIFESTS: &[&str] = &[
    "deploy/netpol.yaml",
    "deploy/kind",
    "deploy/kind/policies-db-ns",
    "deploy/examples",
];

const KIND_CLUSTER: &str = "deploy/kind-cluster.yaml";
const DEMO_SCRIPT: &str = "deploy/kind-demo.sh";

/// Installs the validators if needed, then checks.
pub fn run() -> Result<()> {
    setup::validation_tools()?;
    check()
}

/// The checks alone (`cargo xtask test` runs them after its full setup).
pub fn check() -> Result<()> {
    let root = workspace_root();

    step(&format!(
        "kubernetes-validate --strict against Kubernetes {KUBERNETES_VERSION}"
    ));
    let files = manifest_files(&root)?;
    kubernetes_validate(&root, &files)?;

    step(&format!("kind cluster config ({KIND_CLUSTER})"));
    let text = fs::read_to_string(root.join(KIND_CLUSTER))
        .with_context(|| format!("reading {KIND_CLUSTER}"))?;
    check_kind_cluster(&text).with_context(|| format!("{KIND_CLUSTER} is not what it must be"))?;
    println!("{KIND_CLUSTER}: kind.x-k8s.io/v1alpha4 Cluster, default CNI disabled, 1 control plane + 2 workers, kindest/node v1.33 pinned by digest");

    step(&format!("bash -n and shellcheck ({DEMO_SCRIPT})"));
    exec(command("bash").args(["-n", DEMO_SCRIPT]))?;
    exec(command("shellcheck").args(["--severity=style", DEMO_SCRIPT]))?;
    println!("{DEMO_SCRIPT}: clean");
    Ok(())
}

fn manifest_files(root: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in MANIFESTS {
        let path = root.join(entry);
        if path.is_dir() {
            let mut yamls: Vec<PathBuf> = fs::read_dir(&path)
                .with_context(|| format!("listing {entry}"))?
                .map(|e| e.map(|e| e.path()))
                .collect::<Result<_, _>>()?;
            yamls.retain(|p| p.extension().is_some_and(|e| e == "yaml"));
            yamls.sort();
            ensure!(!yamls.is_empty(), "{entry} holds no *.yaml");
            files.extend(yamls);
        } else {
            ensure!(path.is_file(), "{entry} is missing");
            files.push(path);
        }
    }
    Ok(files)
}

/// Runs kubernetes-validate over `files` and fails on anything but a pass for each of them.
fn kubernetes_validate(root: &Path, files: &[PathBuf]) -> Result<()> {
    let relative: Vec<String> = files
        .iter()
        .map(|f| {
            f.strip_prefix(root)
                .unwrap_or(f)
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    let tool = setup::venv_dir().join("bin/kubernetes-validate");
    let out = command(&tool.to_string_lossy())
        .args(["--kubernetes-version", KUBERNETES_VERSION, "--strict"])
        .args(&relative)
        .output()
        .with_context(|| format!("running {}", tool.display()))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    print!("{text}");
    // The tool exits 0 after "WARN ... Couldn't find schema" (e.g. a misspelt apiVersion):
    // only passes count.
    let is_pass = |l: &str| l.starts_with("INFO ") && l.contains(" passed ");
    let bad: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter(|l| !is_pass(l))
        .collect();
    let unchecked: Vec<&String> = relative
        .iter()
        .filter(|f| !text.contains(&format!("INFO {f} passed ")))
        .collect();
    if !out.status.success() || !bad.is_empty() || !unchecked.is_empty() {
        bail!(
            "kubernetes-validate: {} ({} line(s) not a pass; not validated: {unchecked:?})",
            out.status,
            bad.len()
        );
    }
    println!(
        "{} files, {} objects: all valid",
        relative.len(),
        text.lines().count()
    );
    Ok(())
}

fn keys(map: &Value) -> Vec<String> {
    map.as_mapping()
        .map(|m| {
            m.keys()
                .map(|k| k.as_str().unwrap_or("<non-string key>").to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn only_known(what: &str, map: &Value, known: &[&str]) -> Result<()> {
    ensure!(map.is_mapping(), "{what} must be a mapping");
    for key in keys(map) {
        ensure!(
            known.contains(&key.as_str()),
            "{what}: unknown field {key:?} (kind refuses unknown fields)"
        );
    }
    Ok(())
}

/// A kind node image pinned to Kubernetes 1.33 by tag and digest:
/// `kindest/node:v1.33.N@sha256:<64 hex>`.
fn is_pinned_v1_33_image(image: &str) -> bool {
    let Some(rest) = image.strip_prefix("kindest/node:v1.33.") else {
        return false;
    };
    let Some((patch, digest)) = rest.split_once("@sha256:") else {
        return false;
    };
    !patch.is_empty()
        && patch.bytes().all(|b| b.is_ascii_digit())
        && digest.len() == 64
        && digest
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The kind config: kind.x-k8s.io/v1alpha4 fields only, and what the demo needs.
pub fn check_kind_cluster(text: &str) -> Result<()> {
    let doc: Value = serde_yaml::from_str(text).context("parsing YAML")?;
    // The v1alpha4 Cluster's fields (sigs.k8s.io/kind/pkg/apis/config/v1alpha4/types.go).
    only_known(
        "Cluster",
        &doc,
        &[
            "kind",
            "apiVersion",
            "name",
            "nodes",
            "networking",
            "featureGates",
            "runtimeConfig",
            "kubeadmConfigPatches",
            "kubeadmConfigPatchesJSON6902",
            "containerdConfigPatches",
            "containerdConfigPatchesJSON6902",
        ],
    )?;
    ensure!(doc["kind"] == "Cluster", "kind must be Cluster");
    ensure!(
        doc["apiVersion"] == "kind.x-k8s.io/v1alpha4",
        "apiVersion must be kind.x-k8s.io/v1alpha4"
    );

    let net = &doc["networking"];
    only_known(
        "networking",
        net,
        &[
            "ipFamily",
            "apiServerPort",
            "apiServerAddress",
            "podSubnet",
            "serviceSubnet",
            "disableDefaultCNI",
            "kubeProxyMode",
            "dnsSearch",
        ],
    )?;
    ensure!(
        net["disableDefaultCNI"] == true,
        "networking.disableDefaultCNI must be true: netpol is the CNI"
    );
    ensure!(
        net["podSubnet"] == "10.244.0.0/16",
        "networking.podSubnet must be 10.244.0.0/16"
    );
    ensure!(
        net["serviceSubnet"] == "10.96.0.0/12",
        "networking.serviceSubnet must be 10.96.0.0/12"
    );

    let nodes = doc["nodes"].as_sequence().context("nodes must be a list")?;
    let mut roles = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        only_known(
            &format!("nodes[{i}]"),
            node,
            &[
                "role",
                "image",
                "labels",
                "extraMounts",
                "extraPortMappings",
                "kubeadmConfigPatches",
                "kubeadmConfigPatchesJSON6902",
            ],
        )?;
        roles.push(node["role"].as_str().unwrap_or("<none>").to_string());
        let image = node["image"].as_str().unwrap_or("<none>");
        ensure!(
            is_pinned_v1_33_image(image),
            "nodes[{i}].image {image:?} must be kindest/node:v1.33.N@sha256:<digest>"
        );
    }
    ensure!(
        roles == ["control-plane", "worker", "worker"],
        "nodes must be one control-plane and two workers, got {roles:?}"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn real() -> String {
        fs::read_to_string(workspace_root().join(KIND_CLUSTER)).unwrap()
    }

    #[test]
    fn kind_cluster_config_is_valid() {
        check_kind_cluster(&real()).unwrap();
    }

    #[test]
    fn kind_cluster_check_refuses_what_kind_or_the_demo_would_not_take() {
        let cases = [
            ("disableDefaultCNI: true", "disableDefaultCNI: false"),
            ("disableDefaultCNI: true", "disableDefaultCni: true"),
            ("podSubnet: 10.244.0.0/16", "podSubnet: 10.245.0.0/16"),
            ("  - role: worker\n", ""),
            ("kindest/node:v1.33.1@", "kindest/node:v1.32.1@"),
            ("kind: Cluster", "kind: Clusters"),
        ];
        for (from, to) in cases {
            let text = real();
            assert!(text.contains(from), "{from:?} in {KIND_CLUSTER}");
            let broken = text.replacen(from, to, 1);
            assert!(
                check_kind_cluster(&broken).is_err(),
                "{from:?} -> {to:?} must be refused"
            );
        }
    }

    #[test]
    fn pinned_image_shape() {
        let digest = "050072256b9a903bd914c0b2866828150cb229cea0efe5892e2b644d5dd3b34f";
        assert!(is_pinned_v1_33_image(&format!(
            "kindest/node:v1.33.1@sha256:{digest}"
        )));
        assert!(!is_pinned_v1_33_image("kindest/node:v1.33.1"));
        assert!(!is_pinned_v1_33_image(&format!(
            "kindest/node:v1.33.x@sha256:{digest}"
        )));
        assert!(!is_pinned_v1_33_image("kindest/node:v1.33.1@sha256:abc"));
    }
}
