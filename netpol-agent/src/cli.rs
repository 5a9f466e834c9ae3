//! The command line. Commands and flags here are a contract other tools rely on: `apply`,
//! `run`, `reset`, `dump` keep their names, flags and output formats.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::dataplane::{HostRouting, PinDir, BPFFS};

#[derive(Debug, Parser)]
#[command(
    name = "netpol-agent",
    version,
    about = "eBPF dataplane for Kubernetes NetworkPolicy"
)]
pub struct Cli {
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `netpol_agent=debug`.
    #[arg(long, global = true, env = "NETPOL_LOG", default_value = "info")]
    pub log: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Program the kernel from manifest files once; exit 0 when it reflects them.
    Apply(ApplyArgs),
    /// Program the kernel from manifest files, and again whenever they change.
    Run(RunArgs),
    /// Remove every program, link, pin and file this node's agent made.
    Reset(NodeArgs),
    /// Show what is programmed in the kernel, decoded.
    Dump(DumpArgs),
    /// Remove expired conntrack and fragment entries now (`run` does it every resync).
    Gc(NodeArgs),
    /// Evaluate pod-to-pod reachability from the compiled map contents, and say why.
    Simulate(SimulateArgs),
    /// Act as the chained CNI plugin (what the runtime runs as /opt/cni/bin/netpol-cni, a
    /// copy of this binary): the call in CNI_* variables, the network config on stdin.
    Cni,
}

#[derive(Debug, Clone, Args)]
pub struct NodeArgs {
    /// This node's name: pods whose spec.nodeName matches are enforced. Default: $NODE_NAME,
    /// else the hostname.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// Where bpffs is mounted.
    #[arg(long, default_value = BPFFS)]
    pub bpffs: PathBuf,
    /// Where the names file for `dump` is kept. Default: /run/netpol/<node>.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
}

impl NodeArgs {
    pub fn node(&self) -> String {
        self.node_name.clone().unwrap_or_else(hostname)
    }

    pub fn pins(&self) -> PinDir {
        PinDir::for_node(&self.bpffs, &self.node())
    }

    pub fn state_dir(&self) -> PathBuf {
        self.state_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("/run/netpol").join(self.node()))
    }
}

#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// Manifest files or directories (Namespaces, Pods, NetworkPolicies; multi-document YAML).
    #[arg(long, required = true, num_args = 1..)]
    pub manifests: Vec<PathBuf>,
    #[command(flatten)]
    pub node: NodeArgs,
    /// Treat any invalid object as an error: program nothing and exit non-zero.
    #[arg(long)]
    pub strict: bool,
    #[command(flatten)]
    pub datapath: DatapathArgs,
}

/// How the datapath is sized and how a policy change treats established flows.
#[derive(Debug, Clone, Args)]
pub struct DatapathArgs {
    /// Conntrack table size (LRU). Applies when the table is created; `reset` to resize.
    #[arg(long, default_value_t = netpol_common::capacity::CONNTRACK)]
    pub conntrack_entries: u32,
    /// After programming, remove tracked flows the new policy denies, so they are cut at
    /// their next packet. Without it a policy change applies to new connections only.
    #[arg(long)]
    pub flush_denied: bool,
    /// How traffic between two pods of this node is carried once policy passed it: `bpf`
    /// delivers it from veth to veth (both pods' policies judged in one program run, the
    /// node's IP stack skipped); `kernel` leaves every packet to the node's routing. Flows
    /// to ClusterIPs take the node's stack either way (kube-proxy's NAT).
    #[arg(long, value_enum, default_value_t = HostRouting::Bpf)]
    pub host_routing: HostRouting,
}

impl RunArgs {
    pub fn cni_socket(&self) -> PathBuf {
        self.cni_socket
            .clone()
            .unwrap_or_else(|| self.node.state_dir().join("cni.sock"))
    }
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Manifest files or directories to read instead of the Kubernetes API. Without them the
    /// agent watches the API (in-cluster config, or $KUBECONFIG / ~/.kube/config).
    #[arg(long, num_args = 1..)]
    pub manifests: Vec<PathBuf>,
    #[command(flatten)]
    pub node: NodeArgs,
    /// How often to look for changed manifest files, in milliseconds (file mode); the loop's
    /// heartbeat in both modes.
    #[arg(long, default_value_t = 500)]
    pub poll_ms: u64,
    /// Full reconcile at least this often, in seconds (repairs drift, finds new interfaces);
    /// expired conntrack entries are collected as often.
    #[arg(long, default_value_t = 30)]
    pub resync_s: u64,
    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    #[arg(long, default_value = "0.0.0.0:9464")]
    pub listen: std::net::SocketAddr,
    /// Kubernetes mode: write this node's CNI configuration (ptp + host-local over the Node's
    /// podCIDRs) into this directory and keep routes to the other nodes' pod CIDRs, so netpol
    /// is the cluster's only CNI (KIND with the default CNI disabled).
    #[arg(long)]
    pub cni_conf_dir: Option<PathBuf>,
    /// Kubernetes mode with --cni-conf-dir: copy this binary into this directory as
    /// `netpol-cni`, the chained plugin the CNI configuration names (the host's /opt/cni/bin).
    #[arg(long)]
    pub cni_bin_dir: Option<PathBuf>,
    /// Where the CNI plugin asks the agent to program a new pod now. Default:
    /// <state-dir>/cni.sock.
    #[arg(long)]
    pub cni_socket: Option<PathBuf>,
    #[command(flatten)]
    pub datapath: DatapathArgs,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DumpWhat {
    /// Tracked flows (`NP_CT`), per pod.
    Conntrack,
}

#[derive(Debug, Args)]
pub struct DumpArgs {
    /// What to show instead of the endpoints and their policy.
    #[arg(value_enum)]
    pub what: Option<DumpWhat>,
    #[command(flatten)]
    pub node: NodeArgs,
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    pub output: Output,
    /// Only this pod (`namespace/name`).
    #[arg(long)]
    pub pod: Option<String>,
}

/// The kernel's hostname (the default node name).
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "localhost".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

#[derive(Debug, Args)]
pub struct SimulateArgs {
    #[arg(long, required = true, num_args = 1..)]
    pub manifests: Vec<PathBuf>,
    /// Only from this pod (`namespace/name`).
    #[arg(long)]
    pub from: Option<String>,
    /// Only to this pod (`namespace/name`).
    #[arg(long)]
    pub to: Option<String>,
    /// Only this port (default: every container port of each destination).
    #[arg(long)]
    pub port: Option<u16>,
    /// Protocol of `--port` (default TCP), or a filter on container ports.
    #[arg(long, value_parser = ["TCP", "UDP", "SCTP"])]
    pub protocol: Option<String>,
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    pub output: Output,
}
