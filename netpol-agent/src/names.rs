//! Names for the numbers in the kernel maps, written beside them on every reconcile so that
//! `dump` can say "app1-ns/db" instead of "ifindex 7" and "app1-ns {role=backend}" instead of
//! "identity 258". The maps stay the truth: `dump` shows what they hold even without this file.

use std::{
    collections::BTreeMap,
    fs, io,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::policy::Compiled;

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Names {
    pub node: String,
    /// ifindex -> pod (`ns/name`).
    pub endpoints: BTreeMap<u32, String>,
    /// identity -> `ns {labels}`, or `service ns/name:port/PROTO` for a Service port.
    pub identities: BTreeMap<u32, String>,
    /// class -> the policies it compiles.
    pub classes: BTreeMap<u32, Vec<String>>,
    /// rule set -> rules (`ns/policy#ingress[0]`).
    pub rule_sets: BTreeMap<u32, Vec<String>>,
}

impl Names {
    pub fn new(
        node: &str,
        compiled: &Compiled,
        ifindex_of: &BTreeMap<crate::policy::model::ObjectRef, u32>,
    ) -> Self {
        Names {
            node: node.to_string(),
            endpoints: ifindex_of
                .iter()
                .map(|(pod, i)| (*i, pod.to_string()))
                .collect(),
            identities: compiled
                .identities
                .iter()
                .map(|(id, key)| {
                    let labels: Vec<String> =
                        key.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    (*id, format!("{} {{{}}}", key.namespace, labels.join(",")))
                })
                .chain(compiled.service_ports.iter().map(|(id, port)| {
                    let name = format!("service {}:{}/{}", port.service, port.port, port.protocol);
                    (*id, name)
                }))
                .collect(),
            classes: compiled
                .classes
                .iter()
                .map(|(id, c)| (*id, c.policies.iter().map(ToString::to_string).collect()))
                .collect(),
            rule_sets: compiled
                .rule_sets
                .iter()
                .map(|(id, rules)| (*id, rules.iter().map(ToString::to_string).collect()))
                .collect(),
        }
    }

    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("names.json")
    }

    /// Written to a temporary file and renamed, so a reader never sees half a file.
    pub fn write(&self, state_dir: &Path) -> io::Result<()> {
        fs::create_dir_all(state_dir)?;
        let tmp = state_dir.join(".names.json.tmp");
        fs::write(
            &tmp,
            serde_json::to_vec_pretty(self).map_err(io::Error::other)?,
        )?;
        fs::rename(tmp, Self::path(state_dir))
    }

    /// The names, or empty ones when the file is missing or unreadable.
    pub fn read(state_dir: &Path) -> Names {
        fs::read(Self::path(state_dir))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }
}
