//! The CNI configuration the container runtime uses for this node's pods: the reference `ptp`
//! plugin (a veth per pod, host routes, no bridge) with `host-local` IPAM over the node's pod
//! CIDRs, and `portmap` for hostPorts — plugins KIND's node image ships in /opt/cni/bin.
//! No masquerading: NetworkPolicy must see pod addresses across nodes.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use ipnet::IpNet;
use serde_json::json;

/// The file the runtime picks (lowest name wins; kind's own would be 10-kindnet.conflist).
pub const CONFLIST: &str = "10-netpol.conflist";

/// The configuration for a node with these pod CIDRs (one per family).
pub fn conflist(pod_cidrs: &[IpNet]) -> String {
    let ranges: Vec<_> = pod_cidrs
        .iter()
        .map(|net| json!([{ "subnet": net.to_string() }]))
        .collect();
    let routes: Vec<_> = pod_cidrs
        .iter()
        .map(|net| match net {
            IpNet::V4(_) => json!({ "dst": "0.0.0.0/0" }),
            IpNet::V6(_) => json!({ "dst": "::/0" }),
        })
        .collect();
    let config = json!({
        "cniVersion": "1.0.0",
        "name": "netpol",
        "plugins": [
            {
                "type": "ptp",
                "ipMasq": false,
                "mtu": 1500,
                "ipam": {
                    "type": "host-local",
                    "ranges": ranges,
                    "routes": routes,
                    "dataDir": "/run/cni-ipam-state",
                },
            },
            { "type": "portmap", "capabilities": { "portMappings": true } },
        ],
    });
    serde_json::to_string_pretty(&config).expect("a JSON value serialises")
}

/// Writes the configuration into `dir` when it differs from what is there (atomically, so the
/// runtime never reads half a file). Returns whether it wrote.
pub fn install(dir: &Path, pod_cidrs: &[IpNet]) -> io::Result<bool> {
    let want = conflist(pod_cidrs);
    let path: PathBuf = dir.join(CONFLIST);
    if fs::read_to_string(&path).is_ok_and(|have| have == want) {
        return Ok(false);
    }
    fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{CONFLIST}.tmp"));
    fs::write(&tmp, &want)?;
    fs::rename(tmp, path)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dual_stack_config_has_a_range_and_a_default_route_per_family() {
        let cidrs: Vec<IpNet> = vec![
            "10.244.1.0/24".parse().unwrap(),
            "fd00:10:244:1::/64".parse().unwrap(),
        ];
        let config: serde_json::Value = serde_json::from_str(&conflist(&cidrs)).unwrap();
        let ptp = &config["plugins"][0];
        assert_eq!(ptp["type"], "ptp");
        assert_eq!(
            ptp["ipMasq"], false,
            "pod addresses must survive across nodes"
        );
        assert_eq!(ptp["ipam"]["ranges"][0][0]["subnet"], "10.244.1.0/24");
        assert_eq!(ptp["ipam"]["ranges"][1][0]["subnet"], "fd00:10:244:1::/64");
        assert_eq!(ptp["ipam"]["routes"][1]["dst"], "::/0");
        assert_eq!(config["plugins"][1]["type"], "portmap");
    }

    #[test]
    fn install_writes_once_and_rewrites_on_change() {
        let dir = std::env::temp_dir().join(format!("netpol-cni-{}", std::process::id()));
        let a: Vec<IpNet> = vec!["10.244.1.0/24".parse().unwrap()];
        let b: Vec<IpNet> = vec!["10.244.2.0/24".parse().unwrap()];
        assert!(install(&dir, &a).unwrap(), "first install writes");
        assert!(!install(&dir, &a).unwrap(), "same config: nothing to write");
        assert!(install(&dir, &b).unwrap(), "a new CIDR rewrites");
        let text = fs::read_to_string(dir.join(CONFLIST)).unwrap();
        assert!(text.contains("10.244.2.0/24"));
        fs::remove_dir_all(&dir).unwrap();
    }
}
