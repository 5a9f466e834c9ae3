//! Reading deploy/ from the tests: the objects of deploy/netpol.yaml as k8s-openapi types, the
//! kind demo's files, and Linux capability names. Included with `#[path]` by the test files
//! that need it (each test file is its own crate, so some use only part of it).
#![allow(dead_code)]

use std::{
    fs,
    path::{Path, PathBuf},
};

use k8s_openapi::api::{apps::v1::DaemonSet, core::v1::Container};
use serde::Deserialize as _;
use serde_yaml::Value;

pub fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Every document of a (multi-document) YAML file under deploy/, empty ones skipped.
pub fn documents(relative: &str) -> Vec<Value> {
    let path = deploy_dir().join(relative);
    let text =
        fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| {
            Value::deserialize(doc).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
        })
        .filter(|v| !v.is_null())
        .collect()
}

/// The one object of `kind` in deploy/netpol.yaml, as its k8s-openapi type.
pub fn netpol_object<T: serde::de::DeserializeOwned>(kind: &str) -> T {
    let mut found: Vec<Value> = documents("netpol.yaml")
        .into_iter()
        .filter(|d| d["kind"] == kind)
        .collect();
    assert_eq!(found.len(), 1, "exactly one {kind} in deploy/netpol.yaml");
    serde_yaml::from_value(found.remove(0)).unwrap_or_else(|e| {
        panic!("deploy/netpol.yaml {kind} does not parse as k8s-openapi's: {e}")
    })
}

pub fn daemonset() -> DaemonSet {
    netpol_object("DaemonSet")
}

/// The agent's container (the DaemonSet's only one).
pub fn agent_container() -> Container {
    let ds = daemonset();
    let pod = ds
        .spec
        .expect("DaemonSet spec")
        .template
        .spec
        .expect("pod template spec");
    assert_eq!(pod.containers.len(), 1, "one container: the agent");
    pod.containers.into_iter().next().unwrap()
}

/// `securityContext.capabilities.add` of the agent's container, as written (e.g. `NET_ADMIN`).
pub fn added_capabilities() -> Vec<String> {
    agent_container()
        .security_context
        .and_then(|s| s.capabilities)
        .and_then(|c| c.add)
        .unwrap_or_default()
}

/// linux/capability.h, by bit number.
const CAPABILITIES: &[&str] = &[
    "chown",
    "dac_override",
    "dac_read_search",
    "fowner",
    "fsetid",
    "kill",
    "setgid",
    "setuid",
    "setpcap",
    "linux_immutable",
    "net_bind_service",
    "net_broadcast",
    "net_admin",
    "net_raw",
    "ipc_lock",
    "ipc_owner",
    "sys_module",
    "sys_rawio",
    "sys_chroot",
    "sys_ptrace",
    "sys_pacct",
    "sys_admin",
    "sys_boot",
    "sys_nice",
    "sys_resource",
    "sys_time",
    "sys_tty_config",
    "mknod",
    "lease",
    "audit_write",
    "audit_control",
    "setfcap",
    "mac_override",
    "mac_admin",
    "syslog",
    "wake_alarm",
    "block_suspend",
    "audit_read",
    "perfmon",
    "bpf",
    "checkpoint_restore",
];

/// A Kubernetes capability name (`NET_ADMIN`, or `CAP_NET_ADMIN`) as setpriv's name
/// (`net_admin`) and its bit number.
pub fn capability(name: &str) -> (String, u32) {
    let lower = name.trim_start_matches("CAP_").to_ascii_lowercase();
    let bit = CAPABILITIES
        .iter()
        .position(|c| *c == lower)
        .unwrap_or_else(|| panic!("{name} is not a Linux capability"));
    (lower, u32::try_from(bit).expect("small"))
}
