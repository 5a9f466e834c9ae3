//! Wiring a pod namespace to the node namespace with the CNI reference plugins, invoked the way
//! a container runtime invokes them: environment variables for the call, the network config on
//! stdin, the result as JSON on stdout. The plugins run inside the node namespace, so the host
//! end of each veth and the /32 route to the pod land there and never in the root namespace.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::Deserialize;

use super::netns::{netns_path, nsenter_command};

const PLUGIN_DIR: &str = "/usr/lib/cni";
const CNI_VERSION: &str = "1.0.0";

/// The network configurations of one lab; both plugins are configured per lab because IPAM
/// state must live in the lab's own directory, never in host-local's default.
#[derive(Debug, Clone)]
pub struct CniNetwork {
    ptp: String,
    loopback: String,
}

/// One pod's attachment: enough to undo it with DEL.
#[derive(Debug, Clone)]
pub struct Attachment {
    pub container_id: String,
    pub pod_netns: String,
}

/// A plugin chained after ptp, run the way a runtime runs a conflist's later entries: its own
/// configuration entry plus the conflist's `cniVersion` and `name`, and the previous plugin's
/// result as `prevResult`.
#[derive(Debug, Clone)]
pub struct ChainedPlugin {
    /// The executable (a runtime runs `<CNI_PATH>/<type>`).
    pub path: PathBuf,
    /// The plugin's entry in the conflist (`type` and its own fields).
    pub conf: serde_json::Value,
}

/// What a chained ADD printed: the last plugin's result and what it logged.
#[derive(Debug, Clone)]
pub struct ChainedAdd {
    pub addresses: PodAddresses,
    pub result: serde_json::Value,
    /// ptp's result, which a pass-through plugin must print back.
    pub prev_result: serde_json::Value,
    pub stderr: String,
}

/// The addresses CNI ADD gave a pod: always IPv4, IPv6 too on a dual-stack network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodAddresses {
    pub v4: Ipv4Addr,
    pub v6: Option<Ipv6Addr>,
}

#[derive(Deserialize)]
struct CniResult {
    #[serde(default)]
    ips: Vec<CniIp>,
}

#[derive(Deserialize)]
struct CniIp {
    address: String,
}

impl CniNetwork {
    pub fn new(pod_cidr: Ipv4Net, pod_cidr_v6: Option<Ipv6Net>, ipam_dir: &Path) -> CniNetwork {
        let ipam = match pod_cidr_v6 {
            None => serde_json::json!({
                "type": "host-local",
                "subnet": pod_cidr.to_string(),
                "dataDir": ipam_dir,
                "routes": [{ "dst": "0.0.0.0/0" }],
            }),
            // One range set per family: host-local then hands out one address from each,
            // the way a dual-stack cluster's CNI config does.
            Some(v6) => serde_json::json!({
                "type": "host-local",
                "ranges": [[{ "subnet": pod_cidr.to_string() }], [{ "subnet": v6.to_string() }]],
                "dataDir": ipam_dir,
                "routes": [{ "dst": "0.0.0.0/0" }, { "dst": "::/0" }],
            }),
        };
        let ptp = serde_json::json!({
            "cniVersion": CNI_VERSION,
            "name": "netpol-lab",
            "type": "ptp",
            // No masquerade: NetworkPolicy must see the real pod source addresses.
            "ipMasq": false,
            "ipam": ipam,
        });
        let loopback = serde_json::json!({
            "cniVersion": CNI_VERSION,
            "name": "netpol-lab-lo",
            "type": "loopback",
        });
        CniNetwork {
            ptp: ptp.to_string(),
            loopback: loopback.to_string(),
        }
    }

    /// ADD: brings up lo, then eth0 with addresses from the pod CIDRs, which it returns.
    pub fn add(&self, node_netns: &str, pod: &Attachment) -> Result<PodAddresses> {
        invoke(
            &Call::reference("loopback", "ADD", &self.loopback, "lo"),
            node_netns,
            pod,
        )?;
        let stdout = invoke(
            &Call::reference("ptp", "ADD", &self.ptp, "eth0"),
            node_netns,
            pod,
        )?;
        parse_pod_ips(&stdout.stdout).with_context(|| format!("ptp result for {}", pod.pod_netns))
    }

    /// DEL in the reverse order of ADD; both are attempted even if the first fails.
    pub fn del(&self, node_netns: &str, pod: &Attachment) -> Result<()> {
        let ptp = invoke(
            &Call::reference("ptp", "DEL", &self.ptp, "eth0"),
            node_netns,
            pod,
        );
        let loopback = invoke(
            &Call::reference("loopback", "DEL", &self.loopback, "lo"),
            node_netns,
            pod,
        );
        ptp.and(loopback).map(drop)
    }

    /// ADD through the chain `ptp, plugin` for a Kubernetes pod (`K8S_POD_*` in `CNI_ARGS`, as
    /// the kubelet passes them): ptp's result is the plugin's `prevResult`.
    pub fn add_chained(
        &self,
        node_netns: &str,
        pod: &Attachment,
        k8s_pod: (&str, &str),
        plugin: &ChainedPlugin,
    ) -> Result<ChainedAdd> {
        let args = cni_args(k8s_pod);
        invoke(
            &Call::reference("loopback", "ADD", &self.loopback, "lo"),
            node_netns,
            pod,
        )?;
        let ptp = Call {
            args: Some(&args),
            ..Call::reference("ptp", "ADD", &self.ptp, "eth0")
        };
        let ptp = invoke(&ptp, node_netns, pod)?;
        let prev_result: serde_json::Value =
            serde_json::from_slice(&ptp.stdout).context("decoding ptp's result")?;
        let conf = self.chained_conf(plugin, Some(&prev_result))?;
        let out = invoke(
            &Call {
                path: plugin.path.clone(),
                command: "ADD",
                config: &conf,
                ifname: "eth0",
                args: Some(&args),
            },
            node_netns,
            pod,
        )?;
        let result = serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "decoding the result of {}: {}",
                plugin.path.display(),
                String::from_utf8_lossy(&out.stdout)
            )
        })?;
        Ok(ChainedAdd {
            addresses: parse_pod_ips(&out.stdout)
                .with_context(|| format!("chained result for {}", pod.pod_netns))?,
            result,
            prev_result,
            stderr: out.stderr,
        })
    }

    /// DEL through the chain in reverse: the plugin, then ptp and loopback; all are attempted.
    pub fn del_chained(
        &self,
        node_netns: &str,
        pod: &Attachment,
        k8s_pod: (&str, &str),
        plugin: &ChainedPlugin,
    ) -> Result<()> {
        let args = cni_args(k8s_pod);
        let first = self.chained_conf(plugin, None).and_then(|conf| {
            invoke(
                &Call {
                    path: plugin.path.clone(),
                    command: "DEL",
                    config: &conf,
                    ifname: "eth0",
                    args: Some(&args),
                },
                node_netns,
                pod,
            )
        });
        let rest = self.del(node_netns, pod);
        first.and(rest)
    }

    /// The plugin's configuration as a runtime hands it over.
    fn chained_conf(
        &self,
        plugin: &ChainedPlugin,
        prev_result: Option<&serde_json::Value>,
    ) -> Result<String> {
        let mut conf = plugin.conf.clone();
        let object = conf
            .as_object_mut()
            .context("a chained plugin's entry is a JSON object")?;
        object.insert("cniVersion".into(), CNI_VERSION.into());
        object.insert("name".into(), "netpol-lab".into());
        if let Some(prev) = prev_result {
            object.insert("prevResult".into(), prev.clone());
        }
        Ok(conf.to_string())
    }
}

/// `CNI_ARGS` as the kubelet sets them.
fn cni_args((namespace, name): (&str, &str)) -> String {
    format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name}")
}

/// One plugin call.
struct Call<'a> {
    path: PathBuf,
    command: &'a str,
    config: &'a str,
    ifname: &'a str,
    /// `CNI_ARGS`, or none at all.
    args: Option<&'a str>,
}

impl<'a> Call<'a> {
    /// A reference plugin from the Debian package.
    fn reference(plugin: &str, command: &'a str, config: &'a str, ifname: &'a str) -> Call<'a> {
        Call {
            path: Path::new(PLUGIN_DIR).join(plugin),
            command,
            config,
            ifname,
            args: None,
        }
    }
}

struct Output {
    stdout: Vec<u8>,
    stderr: String,
}

fn invoke(call: &Call<'_>, node_netns: &str, pod: &Attachment) -> Result<Output> {
    let Call {
        path,
        command,
        config,
        ifname,
        args,
    } = call;
    let plugin = path.file_name().unwrap_or_default().to_string_lossy();
    let mut child: Command = nsenter_command(node_netns, &path.to_string_lossy());
    child
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", &pod.container_id)
        .env("CNI_NETNS", netns_path(&pod.pod_netns))
        .env("CNI_IFNAME", ifname)
        .env("CNI_PATH", PLUGIN_DIR);
    match args {
        Some(args) => child.env("CNI_ARGS", args),
        None => child.env_remove("CNI_ARGS"),
    };
    let mut child = child
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting CNI {plugin} {command}"))?;
    let written = child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(config.as_bytes());
    let output = child
        .wait_with_output()
        .with_context(|| format!("waiting for CNI {plugin}"))?;
    written.with_context(|| format!("writing the network config to CNI {plugin}"))?;
    if !output.status.success() {
        // CNI errors arrive as JSON on stdout; stderr carries anything else.
        bail!(
            "CNI {plugin} {command} for {} ({ifname}) failed ({}): {} {}",
            pod.pod_netns,
            output.status,
            String::from_utf8_lossy(&output.stdout).trim(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(Output {
        stdout: output.stdout,
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    })
}

fn parse_pod_ips(stdout: &[u8]) -> Result<PodAddresses> {
    let result: CniResult = serde_json::from_slice(stdout).context("decoding the CNI result")?;
    let addresses: Vec<IpAddr> = result
        .ips
        .iter()
        .map(|ip| {
            ip.address
                .parse::<IpNet>()
                .map(|net| net.addr())
                .with_context(|| format!("CNI returned the address {:?}", ip.address))
        })
        .collect::<Result<_>>()?;
    let v4 = addresses
        .iter()
        .find_map(|ip| match ip {
            IpAddr::V4(v4) => Some(*v4),
            IpAddr::V6(_) => None,
        })
        .context("the CNI result holds no IPv4 address")?;
    let v6 = addresses.iter().find_map(|ip| match ip {
        IpAddr::V6(v6) => Some(*v6),
        IpAddr::V4(_) => None,
    });
    Ok(PodAddresses { v4, v6 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_pod_address_from_a_ptp_result() {
        let result = br#"{"cniVersion":"1.0.0","interfaces":[{"name":"veth1"},{"name":"eth0","sandbox":"/run/netns/x"}],
            "ips":[{"interface":1,"address":"10.244.1.2/24","gateway":"10.244.1.1"}],"routes":[{"dst":"0.0.0.0/0"}],"dns":{}}"#;
        assert_eq!(
            parse_pod_ips(result).expect("a valid result"),
            PodAddresses {
                v4: Ipv4Addr::new(10, 244, 1, 2),
                v6: None
            }
        );
        assert!(
            parse_pod_ips(br#"{"ips":[]}"#).is_err(),
            "no address must be an error"
        );
    }

    #[test]
    fn reads_both_addresses_from_a_dual_stack_result() {
        // The order host-local returns them in follows the ranges, but the lab must not care.
        let result = br#"{"ips":[{"address":"fd00:10:244:1::2/64","gateway":"fd00:10:244:1::1"},
            {"address":"10.244.1.2/24","gateway":"10.244.1.1"}]}"#;
        assert_eq!(
            parse_pod_ips(result).expect("a valid result"),
            PodAddresses {
                v4: Ipv4Addr::new(10, 244, 1, 2),
                v6: Some("fd00:10:244:1::2".parse().unwrap())
            }
        );
        assert!(
            parse_pod_ips(br#"{"ips":[{"address":"fd00::2/64"}]}"#).is_err(),
            "a pod without an IPv4 address breaks LabPod.ip"
        );
    }

    #[test]
    fn a_dual_stack_network_has_one_range_per_family_and_both_default_routes() {
        let network = CniNetwork::new(
            "10.9.0.0/24".parse().unwrap(),
            Some("fd00:9::/64".parse().unwrap()),
            Path::new("/run/netpol-lab/x/ipam"),
        );
        let config: serde_json::Value = serde_json::from_str(&network.ptp).unwrap();
        assert_eq!(
            config["ipam"]["ranges"],
            serde_json::json!([[{"subnet": "10.9.0.0/24"}], [{"subnet": "fd00:9::/64"}]])
        );
        assert_eq!(
            config["ipam"]["routes"],
            serde_json::json!([{"dst": "0.0.0.0/0"}, {"dst": "::/0"}])
        );
        assert!(
            config["ipam"].get("subnet").is_none(),
            "ranges replace subnet"
        );
    }

    #[test]
    fn ipam_state_goes_to_the_given_directory() {
        let network = CniNetwork::new(
            "10.9.0.0/24".parse().unwrap(),
            None,
            Path::new("/run/netpol-lab/x/ipam"),
        );
        let config: serde_json::Value = serde_json::from_str(&network.ptp).unwrap();
        assert_eq!(config["ipam"]["dataDir"], "/run/netpol-lab/x/ipam");
        assert_eq!(config["ipam"]["subnet"], "10.9.0.0/24");
        assert_eq!(config["ipMasq"], false);
    }
}
