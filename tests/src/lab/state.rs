//! The on-disk record of a lab in `/run/netpol-lab/<id>/`: who owns it and which network
//! namespaces it created. The record is what makes cleanup after a crash safe: a sweep deletes
//! exactly the namespaces a dead owner wrote down, never anything found by a name pattern.

use std::fs::{self, OpenOptions};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};

use super::names::STATE_ROOT;
use super::netns;

const OWNER_FILE: &str = "owner";
const NETNS_FILE: &str = "netns";
/// The lab's node name: an agent run on the node pins under `/sys/fs/bpf/netpol/<node>`.
const NODE_FILE: &str = "node";
/// Where netpol-agent pins per node (its layout; the lab removes a dead lab's pins).
const AGENT_PIN_ROOT: &str = "/sys/fs/bpf/netpol";

/// Records the node name, so a sweep can remove what an agent pinned for this lab's node.
pub fn record_node(dir: &Path, node: &str) -> Result<()> {
    fs::write(dir.join(NODE_FILE), node)
        .with_context(|| format!("recording node of {}", dir.display()))
}

/// A directory younger than this without a readable owner may be a lab that is starting right
/// now (the owner is written just after the directory is made), so a sweep leaves it alone.
const OWNERLESS_GRACE: Duration = Duration::from_secs(60);

/// A process, identified so that a recycled pid does not look like the original owner.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Owner {
    pid: u32,
    start_time: u64,
}

impl Owner {
    fn current() -> Result<Owner> {
        let pid = std::process::id();
        let start_time = process_start_time(pid).context("reading this process's start time")?;
        Ok(Owner { pid, start_time })
    }

    fn parse(text: &str) -> Option<Owner> {
        let mut fields = text.split_whitespace();
        let pid = fields.next()?.parse().ok()?;
        let start_time = fields.next()?.parse().ok()?;
        Some(Owner { pid, start_time })
    }

    fn is_alive(&self) -> bool {
        process_start_time(self.pid) == Some(self.start_time)
    }
}

/// Field 22 of /proc/<pid>/stat, in clock ticks since boot. The command name (field 2) may
/// contain spaces and parentheses, so fields are counted after its closing parenthesis.
fn process_start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_comm = &stat[stat.rfind(')')? + 1..];
    after_comm.split_whitespace().nth(19)?.parse().ok()
}

/// Creates the lab's directory and records this process as its owner.
pub fn create_lab_dir(dir: &Path) -> Result<()> {
    fs::create_dir_all(STATE_ROOT).with_context(|| format!("creating {STATE_ROOT}"))?;
    fs::create_dir(dir).with_context(|| format!("creating lab directory {}", dir.display()))?;
    let owner = Owner::current()?;
    // Written aside and renamed into place, so a sweep never reads a half-written owner.
    let partial = dir.join(format!("{OWNER_FILE}.partial"));
    fs::write(&partial, format!("{} {}\n", owner.pid, owner.start_time))
        .and_then(|()| fs::rename(&partial, dir.join(OWNER_FILE)))
        .with_context(|| format!("writing owner of {}", dir.display()))
}

/// Writes a namespace name down before it is created, so a crash in between still leaves a
/// record a sweep can act on.
pub fn record_netns(dir: &Path, name: &str) -> Result<()> {
    let path = dir.join(NETNS_FILE);
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    writeln!(file, "{name}").with_context(|| format!("appending to {}", path.display()))
}

/// Deletes the recorded namespaces and the directory; missing pieces are not errors, so two
/// processes sweeping the same dead lab do not trip over each other.
pub fn remove_lab(dir: &Path) -> Result<()> {
    let recorded = match fs::read_to_string(dir.join(NETNS_FILE)) {
        Ok(text) => text,
        Err(e) if e.kind() == ErrorKind::NotFound => String::new(),
        Err(e) => {
            return Err(e).with_context(|| format!("reading namespaces of {}", dir.display()))
        }
    };
    let mut failures = Vec::new();
    // Pins of an agent that ran on the node (a demo stopped by Ctrl-C, a killed test): its
    // links died with the node's interfaces; unpinning frees the maps.
    if let Ok(node) = fs::read_to_string(dir.join(NODE_FILE)) {
        let node = node.trim();
        if !node.is_empty() && !node.contains('/') {
            let pins = Path::new(AGENT_PIN_ROOT).join(node);
            match fs::remove_dir_all(&pins) {
                Err(e) if e.kind() != ErrorKind::NotFound => {
                    failures.push(format!("removing {}: {e}", pins.display()))
                }
                _ => {}
            }
        }
    }
    for name in recorded.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if let Err(e) = netns::delete_netns(name) {
            failures.push(format!("{e:#}"));
        }
    }
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != ErrorKind::NotFound => {
            failures.push(format!("removing {}: {e}", dir.display()))
        }
        _ => {}
    }
    anyhow::ensure!(
        failures.is_empty(),
        "cleaning lab {}: {}",
        dir.display(),
        failures.join("; ")
    );
    Ok(())
}

/// Removes the labs whose owning process is gone and returns their directories.
pub fn sweep_stale() -> Result<Vec<PathBuf>> {
    // One sweep at a time: two would race to delete the same namespaces and directories.
    let _turn = netns::lock_file(".sweep.lock")?;
    let entries = match fs::read_dir(STATE_ROOT) {
        Ok(entries) => entries,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("listing {STATE_ROOT}")),
    };
    let mut removed = Vec::new();
    for entry in entries {
        let dir = entry
            .with_context(|| format!("listing {STATE_ROOT}"))?
            .path();
        if dir.is_dir() && is_stale(&dir) {
            remove_lab(&dir)?;
            removed.push(dir);
        }
    }
    Ok(removed)
}

fn is_stale(dir: &Path) -> bool {
    let owner = fs::read_to_string(dir.join(OWNER_FILE))
        .ok()
        .and_then(|text| Owner::parse(&text));
    match owner {
        Some(owner) => !owner.is_alive(),
        None => is_older_than(dir, OWNERLESS_GRACE),
    }
}

fn is_older_than(dir: &Path, age: Duration) -> bool {
    let modified = fs::metadata(dir).and_then(|m| m.modified());
    modified.is_ok_and(|t| SystemTime::now().duration_since(t).is_ok_and(|d| d > age))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_a_recycled_pid_is_not() {
        let me = Owner::current().expect("this process's /proc/self/stat should be readable");
        assert!(me.is_alive(), "the current process must count as alive");
        let recycled = Owner {
            start_time: me.start_time + 1,
            ..me.clone()
        };
        assert!(
            !recycled.is_alive(),
            "a pid with another start time is a different process"
        );
        assert_eq!(
            Owner::parse(&format!("{} {}\n", me.pid, me.start_time)),
            Some(me)
        );
        assert_eq!(
            Owner::parse("garbage"),
            None,
            "an unreadable owner is no owner"
        );
    }
}
