//! `/etc/netns/<netns>/`: the per-namespace files `ip netns exec` bind-mounts over `/etc`, which
//! is how a command run "in a pod" sees the pod's resolv.conf and hosts file, as a container
//! would. Owns creating and removing those directories and, when the lab had to create it,
//! `/etc/netns` itself; nothing else under /etc is touched.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::names::STATE_ROOT;
use super::netns::lock_file;

const ETC_NETNS: &str = "/etc/netns";
/// Present while `/etc/netns` exists because a lab created it; the last lab out removes both.
const CREATED_MARKER: &str = ".etc-netns-created";
const LOCK: &str = ".etc-netns.lock";

fn dir_of(netns: &str) -> Result<PathBuf> {
    if netns.is_empty() || netns.contains('/') || netns == "." || netns == ".." {
        bail!("{netns:?} is not a network namespace name");
    }
    Ok(Path::new(ETC_NETNS).join(netns))
}

/// Writes `/etc/netns/<netns>/<file>` for every (file, contents). The caller records the
/// name in the lab state first.
pub fn write(netns: &str, files: &[(&str, String)]) -> Result<()> {
    let dir = dir_of(netns)?;
    let _turn = lock_file(LOCK)?;
    match fs::create_dir(ETC_NETNS) {
        Ok(()) => {
            let marker = Path::new(STATE_ROOT).join(CREATED_MARKER);
            fs::write(&marker, "").with_context(|| format!("writing {}", marker.display()))?;
        }
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e).with_context(|| format!("creating {ETC_NETNS}")),
    }
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    for (name, contents) in files {
        let path = dir.join(name);
        fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Removes `/etc/netns/<netns>/`, and `/etc/netns` when a lab created it and it is now empty.
/// Missing pieces are not errors, so a teardown and a sweep may both run it.
pub fn remove(netns: &str) -> Result<()> {
    let dir = dir_of(netns)?;
    let _turn = lock_file(LOCK)?;
    match fs::remove_dir_all(&dir) {
        Err(e) if e.kind() != ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("removing {}", dir.display()))
        }
        _ => {}
    }
    let marker = Path::new(STATE_ROOT).join(CREATED_MARKER);
    if marker.exists() {
        // remove_dir fails on a directory that is not empty: another lab still uses it.
        match fs::remove_dir(ETC_NETNS) {
            Ok(()) => fs::remove_file(&marker)
                .with_context(|| format!("removing {}", marker.display()))?,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                let _ = fs::remove_file(&marker);
            }
            Err(_) => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_names_become_directories() {
        assert_eq!(
            dir_of("npl-1-0-p3").unwrap(),
            Path::new("/etc/netns/npl-1-0-p3")
        );
        for bad in ["", ".", "..", "a/b", "../etc"] {
            assert!(dir_of(bad).is_err(), "{bad:?} must be refused");
        }
    }
}
