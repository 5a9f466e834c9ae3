//! The CNI configuration the container runtime uses for this node's pods: the reference `ptp`
//! plugin (a veth per pod, host routes, no bridge) with `host-local` IPAM over the node's pod
//! CIDRs, and `portmap` for hostPorts — plugins KIND's node image ships in /opt/cni/bin —
//! then netpol's own chained plugin (`netpol-cni`, a copy of the agent binary installed by
//! [`install_plugin`]), which closes each new pod's interface before its containers start.
//! No masquerading: NetworkPolicy must see pod addresses across nodes.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use ipnet::IpNet;
use serde_json::json;

/// The file the runtime picks (lowest name wins; kind's own would be 10-kindnet.conflist).
pub const CONFLIST: &str = "10-netpol.conflist";

/// The name the plugin is installed under, and its `type` in the configuration.
pub const PLUGIN: &str = "netpol-cni";

/// Where the chained plugin finds this node's agent: host paths, as the runtime sees them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PluginConf {
    pub node_name: String,
    pub bpffs: PathBuf,
    pub state_dir: PathBuf,
    pub socket: PathBuf,
}

/// The configuration for a node with these pod CIDRs (one per family).
pub fn conflist(pod_cidrs: &[IpNet], plugin: &PluginConf) -> String {
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
            // Last, so prevResult holds the pod's veth and addresses.
            {
                "type": PLUGIN,
                "nodeName": plugin.node_name,
                "bpffs": plugin.bpffs,
                "stateDir": plugin.state_dir,
                "socket": plugin.socket,
            },
        ],
    });
    serde_json::to_string_pretty(&config).expect("a JSON value serialises")
}

/// Writes the configuration into `dir` when it differs from what is there (atomically, so the
/// runtime never reads half a file). Returns whether it wrote.
pub fn install(dir: &Path, pod_cidrs: &[IpNet], plugin: &PluginConf) -> io::Result<bool> {
    let want = conflist(pod_cidrs, plugin);
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

/// Copies `binary` (the running agent) into `bin_dir` as the plugin when what is there
/// differs, atomically (a runtime never runs half a file). Returns whether it wrote.
pub fn install_plugin(binary: &Path, bin_dir: &Path) -> io::Result<bool> {
    use std::os::unix::fs::PermissionsExt as _;
    let want = fs::read(binary)?;
    let path = bin_dir.join(PLUGIN);
    if fs::read(&path).is_ok_and(|have| have == want) {
        return Ok(false);
    }
    fs::create_dir_all(bin_dir)?;
    let tmp = bin_dir.join(format!(".{PLUGIN}.tmp"));
    fs::write(&tmp, &want)?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755))?;
    fs::rename(tmp, path)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plugin() -> PluginConf {
        PluginConf {
            node_name: "kind-worker".into(),
            bpffs: "/sys/fs/bpf".into(),
            state_dir: "/run/netpol/kind-worker".into(),
            socket: "/run/netpol/kind-worker/cni.sock".into(),
        }
    }

    #[test]
    fn dual_stack_config_has_a_range_and_a_default_route_per_family() {
        let cidrs: Vec<IpNet> = vec![
            "10.244.1.0/24".parse().unwrap(),
            "fd00:10:244:1::/64".parse().unwrap(),
        ];
        let config: serde_json::Value = serde_json::from_str(&conflist(&cidrs, &plugin())).unwrap();
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
    fn netpol_plugin_comes_last_and_names_the_agent() {
        let cidrs: Vec<IpNet> = vec!["10.244.1.0/24".parse().unwrap()];
        let config: serde_json::Value = serde_json::from_str(&conflist(&cidrs, &plugin())).unwrap();
        let plugins = config["plugins"].as_array().unwrap();
        let last = plugins.last().unwrap();
        assert_eq!(plugins.len(), 3);
        assert_eq!(last["type"], PLUGIN);
        assert_eq!(last["nodeName"], "kind-worker");
        assert_eq!(last["bpffs"], "/sys/fs/bpf");
        assert_eq!(last["stateDir"], "/run/netpol/kind-worker");
        assert_eq!(last["socket"], "/run/netpol/kind-worker/cni.sock");
        // The plugin reads its own entry back the way the runtime hands it over.
        let mut entry = last.clone();
        entry["cniVersion"] = config["cniVersion"].clone();
        let conf = crate::plugin::NetConf::parse(entry.to_string().as_bytes()).unwrap();
        assert_eq!(conf.socket("other"), plugin().socket);
        assert_eq!(conf.state_dir("other"), plugin().state_dir);
    }

    #[test]
    fn install_plugin_copies_once() {
        let dir = std::env::temp_dir().join(format!("netpol-cni-bin-{}", std::process::id()));
        let src = dir.join("agent");
        fs::create_dir_all(&dir).unwrap();
        fs::write(&src, b"binary v1").unwrap();
        let bin = dir.join("bin");
        assert!(install_plugin(&src, &bin).unwrap());
        assert!(
            !install_plugin(&src, &bin).unwrap(),
            "same binary: untouched"
        );
        fs::write(&src, b"binary v2").unwrap();
        assert!(
            install_plugin(&src, &bin).unwrap(),
            "an upgrade replaces it"
        );
        use std::os::unix::fs::PermissionsExt as _;
        let mode = fs::metadata(bin.join(PLUGIN)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o755);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn install_writes_once_and_rewrites_on_change() {
        let dir = std::env::temp_dir().join(format!("netpol-cni-{}", std::process::id()));
        let a: Vec<IpNet> = vec!["10.244.1.0/24".parse().unwrap()];
        let b: Vec<IpNet> = vec!["10.244.2.0/24".parse().unwrap()];
        let p = plugin();
        assert!(install(&dir, &a, &p).unwrap(), "first install writes");
        assert!(
            !install(&dir, &a, &p).unwrap(),
            "same config: nothing to write"
        );
        assert!(install(&dir, &b, &p).unwrap(), "a new CIDR rewrites");
        let text = fs::read_to_string(dir.join(CONFLIST)).unwrap();
        assert!(text.contains("10.244.2.0/24"));
        fs::remove_dir_all(&dir).unwrap();
    }
}
