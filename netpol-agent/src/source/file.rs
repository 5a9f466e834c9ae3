//! Manifest files and directories -> `Snapshot`. Multi-document YAML (or JSON), `kind: List`
//! wrappers, and directories (their `.yaml`, `.yml` and `.json` files, recursively, in name
//! order). Kinds other than Namespace, Pod, NetworkPolicy, Service and EndpointSlice are
//! ignored.

use std::{
    fs,
    path::{Path, PathBuf},
};

use k8s_openapi::api::{
    core::v1 as core, discovery::v1::EndpointSlice, networking::v1::NetworkPolicy,
};
use serde::Deserialize;

use super::{convert, SourceError};
use crate::policy::{
    model::{ObjectRef, Policy, Snapshot},
    selector::LabelSelector,
};

/// The snapshot, and every problem found. Fatal problems (see `SourceError::is_fatal`) mean the
/// snapshot is incomplete and must not be programmed.
pub fn load(paths: &[PathBuf]) -> (Snapshot, Vec<SourceError>) {
    let mut snapshot = Snapshot::default();
    let mut errors = Vec::new();
    for path in paths {
        match files(path) {
            Ok(files) => {
                for file in files {
                    match fs::read_to_string(&file) {
                        Ok(text) => add_documents(&file, &text, &mut snapshot, &mut errors),
                        Err(source) => errors.push(SourceError::Read { path: file, source }),
                    }
                }
            }
            Err(source) => errors.push(SourceError::Read {
                path: path.clone(),
                source,
            }),
        }
    }
    (snapshot, errors)
}

/// The manifest files a path names.
pub fn files(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    if !fs::metadata(path)?.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut entries: Vec<PathBuf> = fs::read_dir(path)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    entries.sort();
    let mut out = Vec::new();
    for entry in entries {
        if entry.is_dir() {
            out.extend(files(&entry)?);
        } else if matches!(
            entry.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml" | "json")
        ) {
            out.push(entry);
        }
    }
    Ok(out)
}

/// Parses one file's documents into the snapshot.
pub fn add_documents(
    path: &Path,
    text: &str,
    snapshot: &mut Snapshot,
    errors: &mut Vec<SourceError>,
) {
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let document = i + 1;
        let value = match serde_yaml::Value::deserialize(doc) {
            Ok(v) => v,
            Err(source) => {
                errors.push(SourceError::Yaml {
                    path: path.to_path_buf(),
                    document,
                    source,
                });
                // The parser cannot resynchronise after a syntax error.
                return;
            }
        };
        add_object(path, document, value, snapshot, errors);
    }
}

fn add_object(
    path: &Path,
    document: usize,
    value: serde_yaml::Value,
    snapshot: &mut Snapshot,
    errors: &mut Vec<SourceError>,
) {
    let kind = value
        .get("kind")
        .and_then(|k| k.as_str())
        .unwrap_or_default()
        .to_string();
    let schema_error = |source: serde_yaml::Error, value: &serde_yaml::Value| SourceError::Schema {
        path: path.to_path_buf(),
        document,
        kind: kind.clone(),
        object: describe(value),
        source,
    };
    match kind.as_str() {
        "List" | "NamespaceList" | "PodList" | "NetworkPolicyList" | "ServiceList"
        | "EndpointSliceList" => {
            let items = value
                .get("items")
                .and_then(|i| i.as_sequence())
                .cloned()
                .unwrap_or_default();
            for item in items {
                add_object(path, document, item, snapshot, errors);
            }
        }
        "Namespace" => match serde_yaml::from_value::<core::Namespace>(value.clone()) {
            Ok(ns) => match convert::namespace(&ns) {
                Ok(ns) => {
                    snapshot.namespaces.insert(ns.name.clone(), ns);
                }
                Err(e) => errors.push(e),
            },
            Err(e) => errors.push(schema_error(e, &value)),
        },
        "Pod" => match serde_yaml::from_value::<core::Pod>(value.clone()) {
            Ok(pod) => match convert::pod(&pod) {
                Ok((model, problems)) => {
                    errors.extend(problems);
                    if let Some(pod) = model {
                        snapshot.add_pod(pod);
                    }
                }
                Err(e) => errors.push(e),
            },
            Err(e) => errors.push(schema_error(e, &value)),
        },
        "NetworkPolicy" => match serde_yaml::from_value::<NetworkPolicy>(value.clone()) {
            Ok(np) => match convert::network_policy(&np) {
                Ok((policy, problems)) => {
                    errors.extend(problems);
                    snapshot.policies.push(policy);
                }
                Err(e) => errors.push(e),
            },
            Err(e) => {
                errors.push(schema_error(e, &value));
                // Unreadable, but it names a policy: fail closed for its whole namespace.
                if let Some(id) = object_id(&value) {
                    snapshot.policies.push(unreadable_policy(id));
                }
            }
        },
        "Service" => match serde_yaml::from_value::<core::Service>(value.clone()) {
            Ok(svc) => match convert::service(&svc) {
                Ok((model, problems)) => {
                    errors.extend(problems);
                    snapshot.services.extend(model);
                }
                Err(e) => errors.push(e),
            },
            Err(e) => errors.push(schema_error(e, &value)),
        },
        "EndpointSlice" => match serde_yaml::from_value::<EndpointSlice>(value.clone()) {
            Ok(slice) => match convert::endpoint_slice(&slice) {
                Ok((backends, problems)) => {
                    errors.extend(problems);
                    for (port, backend) in backends {
                        snapshot.backends.entry(port).or_default().insert(backend);
                    }
                }
                Err(e) => errors.push(e),
            },
            Err(e) => errors.push(schema_error(e, &value)),
        },
        _ => {}
    }
}

fn object_id(value: &serde_yaml::Value) -> Option<ObjectRef> {
    let meta = value.get("metadata")?;
    let name = meta.get("name")?.as_str()?;
    let ns = meta
        .get("namespace")
        .and_then(|n| n.as_str())
        .unwrap_or("default");
    Some(ObjectRef::new(ns, name))
}

fn describe(value: &serde_yaml::Value) -> String {
    object_id(value).map_or_else(|| "<unnamed>".to_string(), |id| id.to_string())
}

/// A policy whose spec could not be read: it isolates every pod of its namespace both ways.
fn unreadable_policy(id: ObjectRef) -> Policy {
    Policy {
        id,
        pod_selector: LabelSelector::everything(),
        ingress_isolates: true,
        egress_isolates: true,
        ingress: Vec::new(),
        egress: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_str(text: &str) -> (Snapshot, Vec<String>) {
        let mut snap = Snapshot::default();
        let mut errors = Vec::new();
        add_documents(Path::new("t.yaml"), text, &mut snap, &mut errors);
        (snap, errors.iter().map(ToString::to_string).collect())
    }

    fn policy(spec: &str) -> String {
        format!("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p, namespace: n}}\nspec: {spec}\n")
    }

    #[test]
    fn policy_types_default_from_rules() {
        let cases = [
            ("{podSelector: {}}", (true, false)),
            ("{podSelector: {}, egress: [{}]}", (true, true)),
            // An empty list is no egress section for the defaulting (as the API server does).
            ("{podSelector: {}, egress: []}", (true, false)),
            ("{podSelector: {}, policyTypes: [Egress]}", (false, true)),
            (
                "{podSelector: {}, policyTypes: [Egress], ingress: [{}]}",
                (false, true),
            ),
        ];
        for (spec, (ingress, egress)) in cases {
            let (snap, errors) = load_str(&policy(spec));
            assert!(errors.is_empty(), "{spec}: {errors:?}");
            let p = &snap.policies[0];
            assert_eq!(
                (p.ingress_isolates, p.egress_isolates),
                (ingress, egress),
                "{spec}"
            );
        }
    }

    #[test]
    fn invalid_fields_are_named_and_fail_closed() {
        let cases = [
            ("{podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/33}}]}]}", "spec.ingress[0].from[0].ipBlock.cidr"),
            ("{podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8, except: [11.0.0.0/16]}}]}]}", "spec.ingress[0].from[0].ipBlock.except[0]"),
            ("{podSelector: {}, egress: [{ports: [{port: 90, endPort: 80}]}]}", "spec.egress[0].ports[0].endPort"),
            ("{podSelector: {}, egress: [{ports: [{port: http, endPort: 80}]}]}", "spec.egress[0].ports[0].endPort"),
            ("{podSelector: {}, ingress: [{ports: [{protocol: ICMP, port: 1}]}]}", "spec.ingress[0].ports[0].protocol"),
            ("{podSelector: {matchExpressions: [{key: a, operator: Near}]}}", "spec.podSelector.matchExpressions[0].operator"),
        ];
        for (spec, field) in cases {
            let (snap, errors) = load_str(&policy(spec));
            assert_eq!(errors.len(), 1, "{spec}: {errors:?}");
            assert!(
                errors[0].starts_with("NetworkPolicy n/p: ") && errors[0].contains(field),
                "{spec}: {}",
                errors[0]
            );
            let p = &snap.policies[0];
            assert!(
                p.ingress.is_empty() && p.egress.is_empty(),
                "{spec}: an invalid policy grants nothing"
            );
            assert!(
                p.ingress_isolates || p.egress_isolates,
                "{spec}: but still isolates"
            );
        }
    }

    #[test]
    fn unreadable_policy_isolates_its_namespace() {
        let (snap, errors) = load_str(&policy("{podSelector: 7}"));
        assert_eq!(errors.len(), 1);
        assert!(errors[0].contains("NetworkPolicy n/p"), "{}", errors[0]);
        let p = &snap.policies[0];
        assert!(p.ingress_isolates && p.egress_isolates && p.pod_selector.match_labels.is_empty());
    }

    #[test]
    fn pods_lists_and_bad_yaml() {
        let text = "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Pod, metadata: {name: a}, status: {podIP: 10.1.1.1}}\n- {apiVersion: v1, kind: Pod, metadata: {name: b}}\n- {apiVersion: v1, kind: Pod, metadata: {name: c}, status: {podIP: bogus}}\n";
        let (snap, errors) = load_str(text);
        let names: Vec<String> = snap.pods.iter().map(|p| p.id.to_string()).collect();
        assert_eq!(
            names,
            vec!["default/a"],
            "pods without a usable address are left out"
        );
        assert!(
            errors
                .iter()
                .any(|e| e.contains("Pod default/c: status.podIPs[0]")),
            "{errors:?}"
        );
        let (_, errors) = load_str("kind: [unclosed\n");
        assert!(errors[0].contains("invalid YAML"), "{errors:?}");
    }
}
