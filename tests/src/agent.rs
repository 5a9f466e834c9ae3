//! Drives the real `netpol-agent` binary against a lab node, the way a DaemonSet runs it on a
//! host: inside the node's network namespace only (`nsenter --net`), with the host's bpffs and
//! a pin directory of the node's own. Resets on drop, so a failing test leaves no pin or link.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Output,
};

use anyhow::{bail, Context as _, Result};

use crate::lab::Lab;

/// The agent binary: `$NETPOL_AGENT_BIN`, else the workspace's debug build.
pub fn agent_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("NETPOL_AGENT_BIN") {
        return PathBuf::from(path);
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/netpol-agent");
    assert!(
        path.exists(),
        "netpol-agent not built at {} (run `cargo xtask test`, or set NETPOL_AGENT_BIN)",
        path.display()
    );
    path
}

/// Packets of one (direction, reason) counter in a `dump -o json` (0 when absent).
pub fn counter(dump: &serde_json::Value, direction: &str, reason: &str) -> u64 {
    dump["counters"]
        .as_array()
        .expect("counters array")
        .iter()
        .find(|c| c["direction"] == direction && c["reason"] == reason)
        .map_or(0, |c| c["packets"].as_u64().unwrap_or(0))
}

pub struct Agent<'a> {
    lab: &'a Lab,
    /// The node this agent runs on: its name in the lab options (`node-a`) and its Kubernetes
    /// name (`--node-name`).
    node_spec: String,
    node_name: String,
    bin: PathBuf,
    /// Manifests the agent reads: the lab's cluster objects plus the current policies.
    manifests: PathBuf,
    state_dir: PathBuf,
}

impl<'a> Agent<'a> {
    /// The agent of the lab's first (or only) node.
    pub fn new(lab: &'a Lab) -> Result<Self> {
        let first = lab.nodes().next().context("the lab has no node")?;
        Self::on_node(lab, first.spec_name())
    }

    /// The agent of one node of a cluster lab (`node-a`, `node-b`), as its DaemonSet pod
    /// would run there: in that node's network namespace, with its own state and pins, reading
    /// the same cluster objects as every other node's agent.
    pub fn on_node(lab: &'a Lab, node: &str) -> Result<Self> {
        let node = lab
            .node(node)
            .with_context(|| format!("lab {} has no node {node}", lab.id()))?;
        let manifests = lab.state_dir().join("manifests");
        fs::create_dir_all(&manifests)?;
        lab.write_cluster_manifests(&manifests)?;
        Ok(Self {
            lab,
            node_spec: node.spec_name().to_string(),
            node_name: node.name().to_string(),
            bin: agent_bin(),
            state_dir: lab.state_dir().join(format!("agent-{}", node.spec_name())),
            manifests,
        })
    }

    pub fn manifests_dir(&self) -> &Path {
        &self.manifests
    }

    fn policies_dir(&self) -> PathBuf {
        self.manifests.join("policies")
    }

    /// Replaces the policy files the agent reads with `policies` (name, YAML).
    pub fn set_policies(&self, policies: &[(&str, &str)]) -> Result<()> {
        let dir = self.policies_dir();
        if dir.exists() {
            fs::remove_dir_all(&dir)?;
        }
        fs::create_dir_all(&dir)?;
        for (name, yaml) in policies {
            fs::write(dir.join(format!("{name}.yaml")), yaml)?;
        }
        Ok(())
    }

    /// Copies policy files (e.g. `deploy/examples/*.yaml`) in as the current policies.
    pub fn set_policy_files(&self, files: &[PathBuf]) -> Result<()> {
        let contents: Vec<(String, String)> = files
            .iter()
            .map(|f| {
                let name = f
                    .file_stem()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned();
                fs::read_to_string(f)
                    .map(|y| (name, y))
                    .with_context(|| format!("reading {}", f.display()))
            })
            .collect::<Result<_>>()?;
        let refs: Vec<(&str, &str)> = contents
            .iter()
            .map(|(n, y)| (n.as_str(), y.as_str()))
            .collect();
        self.set_policies(&refs)
    }

    /// Runs an agent subcommand in the node's network namespace with this node's flags.
    /// `netpol-agent <sub>` in the node's network namespace, with this node's flags.
    fn base(&self, sub: &str) -> std::process::Command {
        let node = self
            .lab
            .node(&self.node_spec)
            .expect("the node outlives its agent");
        let mut cmd = node.node_command(&self.bin.to_string_lossy());
        cmd.arg(sub)
            .args(["--node-name", &self.node_name])
            .arg("--state-dir")
            .arg(&self.state_dir)
            .env("NETPOL_LOG", "warn");
        cmd
    }

    pub fn command(&self, sub: &str, extra: &[&str]) -> Result<Output> {
        self.base(sub)
            .args(extra)
            .output()
            .with_context(|| format!("running {} {sub}", self.bin.display()))
    }

    /// Starts `run --manifests <dir>` in the background (the caller stops it by PID).
    pub fn spawn_run(&self) -> Result<std::process::Child> {
        self.base("run")
            .arg("--manifests")
            .arg(&self.manifests)
            .args(["--poll-ms", "100"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .context("spawning netpol-agent run")
    }

    /// `spawn_run` with extra flags (e.g. `--resync-s 1`), logging at `info` into `log`.
    pub fn spawn_run_with(&self, extra: &[&str], log: &Path) -> Result<std::process::Child> {
        let log = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        self.base("run")
            .arg("--manifests")
            .arg(&self.manifests)
            .args(["--poll-ms", "100"])
            .args(extra)
            .env("NETPOL_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .context("spawning netpol-agent run")
    }

    /// `spawn_run` logging at `info`, uncoloured, on a pipe (the child's stderr), so a test
    /// can read what each pass did (its `reconciled ... map_changes=0 attached=0` line). The
    /// caller reads the pipe and stops the process by PID.
    pub fn spawn_run_logged(&self) -> Result<std::process::Child> {
        self.base("run")
            .arg("--manifests")
            .arg(&self.manifests)
            .args(["--poll-ms", "100"])
            .env("NETPOL_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .context("spawning netpol-agent run")
    }

    /// `apply --manifests <dir>`; fails unless the agent exits 0.
    pub fn apply(&self) -> Result<String> {
        self.apply_with(&[])
    }

    /// `apply --manifests <dir>` with extra flags (e.g. `--host-routing kernel`).
    pub fn apply_with(&self, extra: &[&str]) -> Result<String> {
        let dir = self.manifests.to_string_lossy().into_owned();
        let mut args = vec!["--manifests", dir.as_str()];
        args.extend_from_slice(extra);
        let out = self.command("apply", &args)?;
        if !out.status.success() {
            bail!(
                "netpol-agent apply failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn dump_table(&self, pod: Option<&str>) -> Result<String> {
        let mut extra = vec![];
        if let Some(p) = pod {
            extra.extend(["--pod", p]);
        }
        let out = self.command("dump", &extra)?;
        if !out.status.success() {
            bail!(
                "netpol-agent dump failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn dump_json(&self) -> Result<serde_json::Value> {
        let out = self.command("dump", &["-o", "json"])?;
        if !out.status.success() {
            bail!(
                "netpol-agent dump failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        serde_json::from_slice(&out.stdout).context("parsing dump -o json")
    }

    /// `dump conntrack -o json`, for one pod (`ns/name`) or all.
    pub fn conntrack_json(&self, pod: Option<&str>) -> Result<serde_json::Value> {
        let mut args = vec!["conntrack", "-o", "json"];
        if let Some(pod) = pod {
            args.extend(["--pod", pod]);
        }
        let out = self.command("dump", &args)?;
        if !out.status.success() {
            bail!(
                "netpol-agent dump conntrack failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        serde_json::from_slice(&out.stdout).context("parsing dump conntrack -o json")
    }

    pub fn reset(&self) -> Result<String> {
        let out = self.command("reset", &[])?;
        if !out.status.success() {
            bail!(
                "netpol-agent reset failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The agent's `--state-dir` (names, allocations, the CNI plugin's records and socket).
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// The node's Kubernetes name (`--node-name`).
    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    /// The agent binary as the runtime runs netpol's plugin: `<dir>/netpol-cni` (a link to the
    /// binary: the name selects the plugin), with the conflist entry the agent writes for this
    /// node (its pin directory through the node name, its state directory and its socket).
    pub fn cni_plugin(&self) -> Result<crate::lab::ChainedPlugin> {
        let dir = self.lab.state_dir().join("cni-bin");
        fs::create_dir_all(&dir)?;
        let path = dir.join("netpol-cni");
        if !path.exists() {
            std::os::unix::fs::symlink(&self.bin, &path)
                .with_context(|| format!("linking {}", path.display()))?;
        }
        Ok(crate::lab::ChainedPlugin {
            path,
            conf: serde_json::json!({
                "type": "netpol-cni",
                "nodeName": self.node_name,
                "stateDir": self.state_dir,
                "socket": self.state_dir.join("cni.sock"),
            }),
        })
    }

    /// The node's pin directory (what `reset` must remove).
    pub fn pin_dir(&self) -> PathBuf {
        PathBuf::from("/sys/fs/bpf/netpol").join(&self.node_name)
    }
}

impl Drop for Agent<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.reset() {
            eprintln!("netpol test agent: reset on drop failed: {e:#}");
        }
    }
}
