//! Pods the chained CNI plugin (`netpol-agent cni`) has wired on this node: one record per
//! host-side interface under `<state-dir>/cni-pods/<ifindex>.json`, and the lock the plugin and
//! a reconcile pass share.
//!
//! The plugin writes a record, under the lock, before it closes the pod's interface; every
//! pass reads the records under the same lock. So a pod whose address the API (or the
//! manifests) does not report yet is enforced with the addresses its CNI ADD returned, and an
//! interface whose pod the agent does not know yet stays closed instead of being detached. A
//! record goes when its interface does (CNI DEL deletes the veth), so nothing else removes it.
//! Owns the files only; the maps and links are written by the plugin and by `reconcile`.

use std::{
    fs::{self, File, OpenOptions},
    io,
    net::IpAddr,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::{dataplane::host, policy::model::ObjectRef};

#[derive(Debug, thiserror::Error)]
#[error("{action} {path}")]
pub struct CniPodsError {
    pub action: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

/// One pod as its CNI ADD left it: also the request the plugin sends to the agent's socket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CniPod {
    pub namespace: String,
    pub name: String,
    /// The pod's host-side interface, in the node's network namespace.
    pub ifindex: u32,
    pub interface: String,
    /// The addresses the IPAM plugin gave the pod.
    pub ips: Vec<IpAddr>,
    #[serde(default)]
    pub container_id: String,
}

impl CniPod {
    pub fn pod(&self) -> ObjectRef {
        ObjectRef::new(&self.namespace, &self.name)
    }

    /// Whether the record is one a peer could have sent: names a pod and an interface.
    pub fn validate(&self) -> Result<(), String> {
        let name_ok = |s: &str| !s.is_empty() && s.len() <= 253 && !s.contains('/');
        if !name_ok(&self.namespace) || !name_ok(&self.name) {
            return Err(format!("invalid pod {:?}/{:?}", self.namespace, self.name));
        }
        if self.ifindex == 0 || self.interface.is_empty() || self.interface.len() > 15 {
            return Err(format!(
                "invalid interface {:?} (ifindex {})",
                self.interface, self.ifindex
            ));
        }
        Ok(())
    }

    /// Whether the interface is still there under the same index (an index is reused once
    /// its interface is gone).
    pub fn is_live(&self) -> bool {
        host::ifname(self.ifindex).as_deref() == Some(self.interface.as_str())
    }
}

pub fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join("cni-pods")
}

fn record_path(state_dir: &Path, ifindex: u32) -> PathBuf {
    dir(state_dir).join(format!("{ifindex}.json"))
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> CniPodsError {
    let path = path.to_path_buf();
    move |source| CniPodsError {
        action,
        path,
        source,
    }
}

/// Writes (or replaces) the record of the pod's interface, atomically.
pub fn write(state_dir: &Path, pod: &CniPod) -> Result<(), CniPodsError> {
    let dir = dir(state_dir);
    fs::create_dir_all(&dir).map_err(io_err("creating", &dir))?;
    let path = record_path(state_dir, pod.ifindex);
    let tmp = dir.join(format!(".{}.json.tmp", pod.ifindex));
    let text = serde_json::to_vec_pretty(pod).expect("a record serialises");
    fs::write(&tmp, text).map_err(io_err("writing", &tmp))?;
    fs::rename(&tmp, &path).map_err(io_err("renaming", &path))
}

/// The records whose interface is still there, in ifindex order. Records of interfaces that
/// are gone are removed; unreadable ones are reported and skipped.
pub fn live(state_dir: &Path) -> Result<Vec<CniPod>, CniPodsError> {
    let dir = dir(state_dir);
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err("listing", &dir)(e)),
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let record = fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<CniPod>(&b).ok());
        match record {
            Some(pod) if pod.is_live() => out.push(pod),
            Some(_) => {
                fs::remove_file(&path).map_err(io_err("removing", &path))?;
            }
            None => warn!(path = %path.display(), "unreadable CNI pod record, ignored"),
        }
    }
    out.sort_by_key(|p| p.ifindex);
    Ok(out)
}

/// An exclusive `flock` on `<state-dir>/cni.lock`, released on drop.
pub struct Lock(File);

/// Waits for the lock. The plugin holds it while it closes a new interface, a pass while it
/// reads the records and programs: a pass never detaches an interface whose record it missed.
pub fn lock(state_dir: &Path) -> Result<Lock, CniPodsError> {
    fs::create_dir_all(state_dir).map_err(io_err("creating", state_dir))?;
    let path = state_dir.join("cni.lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_err("opening", &path))?;
    loop {
        // SAFETY: flock on a descriptor this function owns.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
            return Ok(Lock(file));
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(io_err("locking", &path)(e));
        }
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        // SAFETY: as above; closing the file would release it too.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ifindex: u32, interface: &str) -> CniPod {
        CniPod {
            namespace: "ns".into(),
            name: "p".into(),
            ifindex,
            interface: interface.into(),
            ips: vec!["10.244.1.2".parse().unwrap()],
            container_id: "c1".into(),
        }
    }

    #[test]
    fn records_of_gone_interfaces_are_removed() {
        let state = std::env::temp_dir().join(format!("netpol-cni-pods-{}", std::process::id()));
        let lo = pod(1, "lo");
        let gone = pod(1_000_000, "veth-gone");
        write(&state, &lo).unwrap();
        write(&state, &gone).unwrap();
        let _lock = lock(&state).unwrap();
        assert_eq!(live(&state).unwrap(), vec![lo]);
        assert!(!record_path(&state, gone.ifindex).exists(), "pruned");
        fs::remove_dir_all(&state).unwrap();
    }

    #[test]
    fn validation_refuses_what_names_no_pod_or_interface() {
        assert!(pod(7, "veth1").validate().is_ok());
        assert!(pod(0, "veth1").validate().is_err());
        assert!(pod(7, "").validate().is_err());
        assert!(pod(7, "a-name-longer-than-15").validate().is_err());
        let mut p = pod(7, "veth1");
        p.namespace = "a/b".into();
        assert!(p.validate().is_err());
    }
}
