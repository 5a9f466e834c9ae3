//! `netpol-agent cni` (installed as `/opt/cni/bin/netpol-cni`): the last plugin of the node's
//! CNI chain, which makes a new pod fail closed before its containers start, then asks the
//! agent to program it — as cilium-cni asks cilium-agent for an endpoint, except that the
//! pod is already closed by itself, so an agent that is down or slow leaves it denied, never
//! open.
//!
//! ADD: from `prevResult`, the pod's host-side interface and addresses; under the lock of
//! `cni_pods`, record the pod, write a closed endpoint (deny all, anti-spoofing) and attach
//! both programs with the agent's own attach code, so the links are pinned where the agent
//! adopts them; then ask the agent over its socket and wait a few seconds for its pass. Prints
//! `prevResult` unchanged. DEL and CHECK pass through (deleting the veth ends the record);
//! VERSION lists the supported versions. Errors are CNI error objects on stdout, exit 1.
//! Owns only the CNI contract; the kernel is written through `dataplane`.

mod conf;

use std::{io::Read as _, path::Path, process::ExitCode};

use serde_json::json;

pub use conf::{parse_cni_args, Command, Env, NetConf, PrevResult, SUPPORTED_VERSIONS};

use crate::{
    cni_pods::{self, CniPod, CniPodsError},
    cni_socket::{self, Outcome},
    dataplane::{host, maps, Dataplane, DataplaneError, PinDir},
    names::Names,
    policy::desired,
};

/// Why a call failed, with the spec's error code.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("unsupported CNI version {version:?} (supported: {})", SUPPORTED_VERSIONS.join(", "))]
    Version { version: String },
    #[error("environment variable {var}: {reason}")]
    Env { var: &'static str, reason: String },
    #[error("decoding the network configuration")]
    Decode {
        #[source]
        source: serde_json::Error,
    },
    #[error("network configuration, {field}: {reason}")]
    Config { field: &'static str, reason: String },
    #[error("closing interface {interface} of pod {pod}")]
    Dataplane {
        pod: String,
        interface: String,
        #[source]
        source: DataplaneError,
    },
    #[error("recording pod {pod}")]
    Record {
        pod: String,
        #[source]
        source: CniPodsError,
    },
    #[error("reading stdin")]
    Stdin {
        #[source]
        source: std::io::Error,
    },
}

impl PluginError {
    /// The spec's well-known codes (1 version, 4 environment, 5 I/O, 6 decoding, 7 network
    /// configuration); 100 and up are this plugin's own.
    pub fn code(&self) -> u32 {
        match self {
            PluginError::Version { .. } => 1,
            PluginError::Env { .. } => 4,
            PluginError::Stdin { .. } | PluginError::Record { .. } => 5,
            PluginError::Decode { .. } => 6,
            PluginError::Config { .. } => 7,
            PluginError::Dataplane { .. } => 100,
        }
    }
}

/// Runs one call with the process's environment and stdin; prints the result or the error.
pub fn main() -> ExitCode {
    let mut stdin = Vec::new();
    let result = std::io::stdin()
        .read_to_end(&mut stdin)
        .map_err(|source| PluginError::Stdin { source })
        .and_then(|_| call(|k| std::env::var(k).ok(), &stdin));
    match result {
        Ok(Some(out)) => {
            println!("{out}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            let version = serde_json::from_slice::<serde_json::Value>(&stdin)
                .ok()
                .and_then(|v| v["cniVersion"].as_str().map(str::to_string))
                .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
                .unwrap_or_else(|| "1.0.0".into());
            let error = json!({
                "cniVersion": version,
                "code": e.code(),
                "msg": e.to_string(),
                "details": crate::error_chain(&e),
            });
            println!("{error}");
            eprintln!("netpol-cni: {}", crate::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// One call: what to print on stdout (`None`: nothing).
pub fn call(
    var: impl Fn(&str) -> Option<String>,
    stdin: &[u8],
) -> Result<Option<String>, PluginError> {
    let env = Env::from_vars(var)?;
    match env.command {
        Command::Version => Ok(Some(
            json!({ "cniVersion": "1.0.0", "supportedVersions": SUPPORTED_VERSIONS }).to_string(),
        )),
        // Nothing of ours outlives the veth the next plugin deletes; never fail a DEL.
        Command::Del => Ok(None),
        Command::Check => {
            NetConf::parse(stdin)?;
            Ok(None)
        }
        Command::Add => {
            let conf = NetConf::parse(stdin)?;
            add(&env, &conf).map(Some)
        }
    }
}

fn add(env: &Env, conf: &NetConf) -> Result<String, PluginError> {
    let prev_value = conf.prev_result.as_ref().ok_or(PluginError::Config {
        field: "prevResult",
        reason: "missing: netpol-cni is a chained plugin and runs after ptp".into(),
    })?;
    let prev = PrevResult::parse(prev_value)?;
    let pod = env
        .pod
        .clone()
        .expect("ADD has a pod (checked with the env)");
    let ips = prev.pod_ips()?;
    let interface = host_interface(&prev, &ips)?;
    let ifindex = host::ifindex(&interface).ok_or_else(|| PluginError::Config {
        field: "prevResult.interfaces",
        reason: format!("host interface {interface} does not exist in this network namespace"),
    })?;
    let record = CniPod {
        namespace: pod.namespace.clone(),
        name: pod.name.clone(),
        ifindex,
        interface,
        ips,
        container_id: env.container_id.clone(),
    };
    let node = conf.node(crate::cli::hostname);
    let state_dir = conf.state_dir(&node);
    let pins = PinDir::for_node(conf.bpffs(), &node);
    close(&pins, &state_dir, &node, &record)?;

    let socket = conf.socket(&node);
    match cni_socket::ask(&socket, &record, conf.timeout()) {
        Ok(reply) if reply.outcome == Outcome::Programmed => {}
        Ok(reply) => eprintln!(
            "netpol-cni: pod {pod} ({}) stays closed: the agent answered {:?}: {}",
            record.interface, reply.outcome, reply.message
        ),
        Err(e) => eprintln!(
            "netpol-cni: pod {pod} ({}) stays closed (deny all) until the agent's next pass: {}",
            record.interface,
            crate::error_chain(&e)
        ),
    }
    // A chained plugin's result is its prevResult, in the configuration's version.
    let mut result = prev_value.clone();
    result["cniVersion"] = json!(conf.cni_version);
    Ok(result.to_string())
}

/// The pod's host-side interface: the only one without a sandbox, or, when a plugin returned
/// several (a bridge and a veth), the one the pod's address is routed to.
fn host_interface(prev: &PrevResult, ips: &[std::net::IpAddr]) -> Result<String, PluginError> {
    let candidates = prev.host_interfaces();
    if let [only] = candidates[..] {
        return Ok(only.to_string());
    }
    let routes = host::routes().unwrap_or_default();
    ips.iter()
        .filter_map(|ip| host::longest_route(&routes, *ip))
        .map(|r| r.interface.clone())
        .find(|name| candidates.contains(&name.as_str()))
        .ok_or_else(|| PluginError::Config {
            field: "prevResult.interfaces",
            reason: format!(
                "cannot tell the pod's host-side interface among {candidates:?} (expected a ptp-style veth)"
            ),
        })
}

/// Fails the pod closed, under the lock a reconcile pass takes: record, closed endpoint,
/// programs attached (links pinned as the agent pins them).
fn close(pins: &PinDir, state_dir: &Path, node: &str, record: &CniPod) -> Result<(), PluginError> {
    let pod = record.pod().to_string();
    let record_err = |source| PluginError::Record {
        pod: pod.clone(),
        source,
    };
    let dp_err = |source| PluginError::Dataplane {
        pod: pod.clone(),
        interface: record.interface.clone(),
        source,
    };
    let _lock = cni_pods::lock(state_dir).map_err(record_err)?;
    cni_pods::write(state_dir, record).map_err(record_err)?;
    let mut dp = Dataplane::load(pins).map_err(dp_err)?;
    maps::write_endpoint(pins, record.ifindex, &desired::closed_endpoint(&record.ips))
        .map_err(dp_err)?;
    dp.attach(record.ifindex, &record.interface)
        .map_err(dp_err)?;
    // For `dump`, until the agent's next pass rewrites the names.
    let mut names = Names::read(state_dir);
    names.node = node.to_string();
    names.endpoints.insert(record.ifindex, pod.clone());
    if let Err(e) = names.write(state_dir) {
        eprintln!("netpol-cni: writing names for dump: {e}");
    }
    Ok(())
}
