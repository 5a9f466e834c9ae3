//! What the container runtime hands a chained CNI plugin (CNI spec 1.0): the call in
//! environment variables, the network configuration with the previous plugin's result on
//! stdin. Pure parsing; nothing here touches the host.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
};

use ipnet::IpNet;
use serde::Deserialize;

use super::PluginError;
use crate::{dataplane::BPFFS, policy::model::ObjectRef};

/// The versions whose results carry `interfaces` and `ips` as read here.
pub const SUPPORTED_VERSIONS: [&str; 4] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0"];

/// The operations of the spec this plugin implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
}

/// The call, from `CNI_*` variables.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Env {
    pub command: Command,
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    /// `K8S_POD_NAMESPACE`/`K8S_POD_NAME` from `CNI_ARGS`, when the runtime is a kubelet's.
    pub pod: Option<ObjectRef>,
}

impl Env {
    /// Reads the variables through `var` (the process environment, or a table in tests).
    /// ADD needs the container, its namespace and interface (the spec requires them) and the
    /// pod's name; the other commands need nothing.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Env, PluginError> {
        let command = match var("CNI_COMMAND").as_deref() {
            Some("ADD") => Command::Add,
            Some("DEL") => Command::Del,
            Some("CHECK") => Command::Check,
            Some("VERSION") => Command::Version,
            other => {
                return Err(PluginError::Env {
                    var: "CNI_COMMAND",
                    reason: format!("unsupported command {:?}", other.unwrap_or("")),
                })
            }
        };
        let args = parse_cni_args(&var("CNI_ARGS").unwrap_or_default());
        let pod = match (args.get("K8S_POD_NAMESPACE"), args.get("K8S_POD_NAME")) {
            (Some(ns), Some(name)) if !ns.is_empty() && !name.is_empty() => {
                Some(ObjectRef::new(ns.as_str(), name.as_str()))
            }
            _ => None,
        };
        let required = |name: &'static str| -> Result<String, PluginError> {
            match var(name) {
                Some(v) if !v.is_empty() => Ok(v),
                _ if command != Command::Add => Ok(String::new()),
                _ => Err(PluginError::Env {
                    var: name,
                    reason: "missing".into(),
                }),
            }
        };
        let env = Env {
            command,
            container_id: required("CNI_CONTAINERID")?,
            netns: required("CNI_NETNS")?,
            ifname: required("CNI_IFNAME")?,
            pod,
        };
        if command == Command::Add && env.pod.is_none() {
            return Err(PluginError::Env {
                var: "CNI_ARGS",
                reason: "no K8S_POD_NAMESPACE and K8S_POD_NAME: netpol enforces Kubernetes pods"
                    .into(),
            });
        }
        Ok(env)
    }
}

/// `CNI_ARGS`: `KEY=VALUE` pairs separated by `;` (the kubelet's `IgnoreUnknown=1;K8S_...`).
pub fn parse_cni_args(text: &str) -> BTreeMap<String, String> {
    text.split(';')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// The network configuration on stdin: the spec's fields, `prevResult`, and this plugin's own.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    #[serde(default)]
    pub name: String,
    /// Kept as it came: ADD prints it back unchanged.
    #[serde(default)]
    pub prev_result: Option<serde_json::Value>,
    /// This node's name as the agent uses it: the pin directory is `<bpffs>/netpol/<node>`.
    /// Default: the hostname.
    #[serde(default)]
    pub node_name: Option<String>,
    #[serde(default)]
    pub bpffs: Option<PathBuf>,
    /// The agent's `--state-dir`. Default: `/run/netpol/<node>`.
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
    /// The agent's `--cni-socket`. Default: `<state-dir>/cni.sock`.
    #[serde(default)]
    pub socket: Option<PathBuf>,
    /// How long to wait for the agent, in milliseconds. Default 5000.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

impl NetConf {
    pub fn parse(stdin: &[u8]) -> Result<NetConf, PluginError> {
        let conf: NetConf =
            serde_json::from_slice(stdin).map_err(|source| PluginError::Decode { source })?;
        if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
            return Err(PluginError::Version {
                version: conf.cni_version,
            });
        }
        Ok(conf)
    }

    pub fn node(&self, hostname: impl FnOnce() -> String) -> String {
        self.node_name.clone().unwrap_or_else(hostname)
    }

    pub fn bpffs(&self) -> &Path {
        self.bpffs.as_deref().unwrap_or(Path::new(BPFFS))
    }

    pub fn state_dir(&self, node: &str) -> PathBuf {
        self.state_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("/run/netpol").join(node))
    }

    pub fn socket(&self, node: &str) -> PathBuf {
        self.socket
            .clone()
            .unwrap_or_else(|| self.state_dir(node).join("cni.sock"))
    }

    pub fn timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.timeout_ms.unwrap_or(5000))
    }
}

/// The part of a previous result this plugin reads.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct PrevResult {
    #[serde(default)]
    pub interfaces: Vec<Interface>,
    #[serde(default)]
    pub ips: Vec<IpConfig>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Interface {
    pub name: String,
    /// Set for an interface inside the container; absent (or empty) for the host's.
    #[serde(default)]
    pub sandbox: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct IpConfig {
    /// CIDR notation: the address and its prefix.
    pub address: String,
}

impl PrevResult {
    pub fn parse(value: &serde_json::Value) -> Result<PrevResult, PluginError> {
        serde_json::from_value(value.clone()).map_err(|e| PluginError::Config {
            field: "prevResult",
            reason: e.to_string(),
        })
    }

    /// The host-side interfaces (no `sandbox`), in result order.
    pub fn host_interfaces(&self) -> Vec<&str> {
        self.interfaces
            .iter()
            .filter(|i| i.sandbox.as_deref().is_none_or(str::is_empty))
            .map(|i| i.name.as_str())
            .collect()
    }

    /// The pod's addresses, without their prefix lengths.
    pub fn pod_ips(&self) -> Result<Vec<IpAddr>, PluginError> {
        let mut out = Vec::new();
        for (i, ip) in self.ips.iter().enumerate() {
            let addr = ip
                .address
                .parse::<IpNet>()
                .map(|n| n.addr())
                .or_else(|_| ip.address.parse::<IpAddr>())
                .map_err(|_| PluginError::Config {
                    field: "prevResult.ips",
                    reason: format!("ips[{i}].address {:?} is not an address", ip.address),
                })?;
            if !out.contains(&addr) {
                out.push(addr);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars<'a>(table: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            table
                .iter()
                .find(|(name, _)| *name == k)
                .map(|(_, v)| v.to_string())
        }
    }

    const KUBELET_ARGS: &str =
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=app1-ns;K8S_POD_NAME=frontend;K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=u1";

    #[test]
    fn reads_an_add_call_and_the_pod_from_cni_args() {
        let env = Env::from_vars(vars(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_NETNS", "/var/run/netns/cni-1"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", KUBELET_ARGS),
        ]))
        .unwrap();
        assert_eq!(env.command, Command::Add);
        assert_eq!(env.pod, Some(ObjectRef::new("app1-ns", "frontend")));
        assert_eq!(env.ifname, "eth0");
        assert_eq!(parse_cni_args(KUBELET_ARGS)["K8S_POD_UID"], "u1");
    }

    #[test]
    fn add_without_its_variables_or_the_pod_is_an_env_error() {
        let err = Env::from_vars(vars(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_NETNS", "/var/run/netns/cni-1"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", KUBELET_ARGS),
        ]))
        .unwrap_err();
        assert!(
            matches!(
                err,
                PluginError::Env {
                    var: "CNI_CONTAINERID",
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(err.code(), 4);
        let err = Env::from_vars(vars(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_NETNS", "/var/run/netns/cni-1"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", "IgnoreUnknown=1"),
        ]))
        .unwrap_err();
        assert!(
            matches!(
                err,
                PluginError::Env {
                    var: "CNI_ARGS",
                    ..
                }
            ),
            "{err}"
        );
        let err = Env::from_vars(vars(&[("CNI_COMMAND", "BOGUS")])).unwrap_err();
        assert!(matches!(
            err,
            PluginError::Env {
                var: "CNI_COMMAND",
                ..
            }
        ));
    }

    #[test]
    fn del_and_version_need_no_container() {
        for command in ["DEL", "CHECK", "VERSION"] {
            let env = Env::from_vars(vars(&[("CNI_COMMAND", command)])).unwrap();
            assert!(env.container_id.is_empty() && env.pod.is_none());
        }
    }

    /// What ptp then portmap hand the last plugin of netpol's chain.
    const CONF: &str = r#"{
        "cniVersion": "1.0.0", "name": "netpol", "type": "netpol-cni",
        "nodeName": "kind-worker", "stateDir": "/run/netpol/kind-worker",
        "socket": "/run/netpol/kind-worker/cni.sock",
        "prevResult": {
            "cniVersion": "1.0.0",
            "interfaces": [
                {"name": "veth1a2b3c4d", "mac": "aa:bb:cc:dd:ee:ff"},
                {"name": "eth0", "mac": "11:22:33:44:55:66", "sandbox": "/var/run/netns/cni-1"}
            ],
            "ips": [
                {"interface": 1, "address": "10.244.1.5/24", "gateway": "10.244.1.1"},
                {"interface": 1, "address": "fd00:10:244:1::5/64", "gateway": "fd00:10:244:1::1"}
            ],
            "routes": [{"dst": "0.0.0.0/0"}],
            "dns": {}
        }
    }"#;

    #[test]
    fn reads_the_host_interface_and_pod_addresses_from_prev_result() {
        let conf = NetConf::parse(CONF.as_bytes()).unwrap();
        assert_eq!(conf.node(|| "h".into()), "kind-worker");
        assert_eq!(conf.bpffs(), Path::new("/sys/fs/bpf"));
        assert_eq!(
            conf.socket("kind-worker"),
            Path::new("/run/netpol/kind-worker/cni.sock")
        );
        let prev = PrevResult::parse(conf.prev_result.as_ref().unwrap()).unwrap();
        assert_eq!(prev.host_interfaces(), vec!["veth1a2b3c4d"]);
        assert_eq!(
            prev.pod_ips().unwrap(),
            vec![
                "10.244.1.5".parse::<IpAddr>().unwrap(),
                "fd00:10:244:1::5".parse().unwrap()
            ]
        );
    }

    #[test]
    fn defaults_follow_the_node_name() {
        let conf =
            NetConf::parse(br#"{"cniVersion":"0.4.0","name":"n","type":"netpol-cni"}"#).unwrap();
        assert_eq!(conf.node(|| "host1".into()), "host1");
        assert_eq!(conf.state_dir("host1"), Path::new("/run/netpol/host1"));
        assert_eq!(
            conf.socket("host1"),
            Path::new("/run/netpol/host1/cni.sock")
        );
        assert!(conf.prev_result.is_none());
        assert_eq!(conf.timeout(), std::time::Duration::from_secs(5));
    }

    #[test]
    fn refuses_unknown_versions_and_bad_addresses() {
        let err = NetConf::parse(br#"{"cniVersion":"0.2.0","name":"n"}"#).unwrap_err();
        assert_eq!(err.code(), 1);
        let err = NetConf::parse(b"not json").unwrap_err();
        assert_eq!(err.code(), 6);
        let prev =
            PrevResult::parse(&serde_json::json!({"ips": [{"address": "10.0.0.300/24"}]})).unwrap();
        assert!(prev.pod_ips().is_err());
    }
}
