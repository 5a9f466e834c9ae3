//! Wiring a pod namespace to the node namespace with the CNI reference plugins, invoked the way
//! a container runtime invokes them: environment variables for the call, the network config on
//! stdin, the result as JSON on stdout. The plugins run inside the node namespace, so the host
//! end of each veth and the /32 route to the pod land there and never in the root namespace.

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use ipnet::Ipv4Net;
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
    pub fn new(pod_cidr: Ipv4Net, ipam_dir: &Path) -> CniNetwork {
        let ptp = serde_json::json!({
            "cniVersion": CNI_VERSION,
            "name": "netpol-lab",
            "type": "ptp",
            // No masquerade: NetworkPolicy must see the real pod source addresses.
            "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "subnet": pod_cidr.to_string(),
                "dataDir": ipam_dir,
                "routes": [{ "dst": "0.0.0.0/0" }],
            },
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

    /// ADD: brings up lo, then eth0 with an address from the pod CIDR, which it returns.
    pub fn add(&self, node_netns: &str, pod: &Attachment) -> Result<Ipv4Addr> {
        invoke("loopback", "ADD", &self.loopback, node_netns, pod, "lo")?;
        let stdout = invoke("ptp", "ADD", &self.ptp, node_netns, pod, "eth0")?;
        parse_pod_ip(&stdout).with_context(|| format!("ptp result for {}", pod.pod_netns))
    }

    /// DEL in the reverse order of ADD; both are attempted even if the first fails.
    pub fn del(&self, node_netns: &str, pod: &Attachment) -> Result<()> {
        let ptp = invoke("ptp", "DEL", &self.ptp, node_netns, pod, "eth0");
        let loopback = invoke("loopback", "DEL", &self.loopback, node_netns, pod, "lo");
        ptp.and(loopback).map(drop)
    }
}

fn invoke(
    plugin: &str,
    command: &str,
    config: &str,
    node_netns: &str,
    pod: &Attachment,
    ifname: &str,
) -> Result<Vec<u8>> {
    let plugin_path = Path::new(PLUGIN_DIR).join(plugin);
    let mut child: Command = nsenter_command(node_netns, &plugin_path.to_string_lossy());
    let mut child = child
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", &pod.container_id)
        .env("CNI_NETNS", netns_path(&pod.pod_netns))
        .env("CNI_IFNAME", ifname)
        .env("CNI_PATH", PLUGIN_DIR)
        .env_remove("CNI_ARGS")
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
    Ok(output.stdout)
}

fn parse_pod_ip(stdout: &[u8]) -> Result<Ipv4Addr> {
    let result: CniResult = serde_json::from_slice(stdout).context("decoding the CNI result")?;
    result
        .ips
        .iter()
        .find_map(|ip| ip.address.parse::<Ipv4Net>().ok())
        .map(|net| net.addr())
        .context("the CNI result holds no IPv4 address")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_pod_address_from_a_ptp_result() {
        let result = br#"{"cniVersion":"1.0.0","interfaces":[{"name":"veth1"},{"name":"eth0","sandbox":"/run/netns/x"}],
            "ips":[{"interface":1,"address":"10.244.1.2/24","gateway":"10.244.1.1"}],"routes":[{"dst":"0.0.0.0/0"}],"dns":{}}"#;
        assert_eq!(
            parse_pod_ip(result).expect("a valid result"),
            Ipv4Addr::new(10, 244, 1, 2)
        );
        assert!(
            parse_pod_ip(br#"{"ips":[]}"#).is_err(),
            "no address must be an error"
        );
    }

    #[test]
    fn ipam_state_goes_to_the_given_directory() {
        let network = CniNetwork::new(
            "10.9.0.0/24".parse().unwrap(),
            Path::new("/run/netpol-lab/x/ipam"),
        );
        let config: serde_json::Value = serde_json::from_str(&network.ptp).unwrap();
        assert_eq!(config["ipam"]["dataDir"], "/run/netpol-lab/x/ipam");
        assert_eq!(config["ipam"]["subnet"], "10.9.0.0/24");
        assert_eq!(config["ipMasq"], false);
    }
}
