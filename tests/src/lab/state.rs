//! The on-disk record of a lab in `/run/netpol-lab/<id>/`: who owns it and what it created —
//! network namespaces, processes (dnsmasq), `/etc/netns/<name>` directories. The record is what
//! makes cleanup after a crash safe: a sweep undoes exactly what a dead owner wrote down, never
//! anything found by a name pattern.

use std::fs::{self, OpenOptions};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};

use super::names::STATE_ROOT;
use super::{etc_netns, netns};

const OWNER_FILE: &str = "owner";
const NETNS_FILE: &str = "netns";
/// `<pid> <start time>` per line: processes the lab started inside its namespaces.
const PROCESSES_FILE: &str = "processes";
/// Network namespace names whose `/etc/netns/<name>/` the lab wrote.
const ETC_NETNS_FILE: &str = "etc-netns";
/// How long a swept process gets to exit after SIGTERM before SIGKILL.
const PROCESS_EXIT_WAIT: Duration = Duration::from_secs(2);
/// The lab's node names, one per line: an agent run on a node pins under
/// `/sys/fs/bpf/netpol/<node>`.
const NODE_FILE: &str = "node";
/// Where netpol-agent pins per node (its layout; the lab removes a dead lab's pins).
const AGENT_PIN_ROOT: &str = "/sys/fs/bpf/netpol";

/// Records a node name, so a sweep can remove what an agent pinned for this lab's node.
pub fn record_node(dir: &Path, node: &str) -> Result<()> {
    append_line(dir, NODE_FILE, node)
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
        Owner::of(std::process::id())
    }

    fn of(pid: u32) -> Result<Owner> {
        let start_time = process_start_time(pid)
            .with_context(|| format!("reading process {pid}'s start time"))?;
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

fn is_zombie(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let after_comm = &stat[stat.rfind(')')? + 1..];
            after_comm
                .split_whitespace()
                .next()
                .map(|state| state == "Z")
        })
        .unwrap_or(false)
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
    append_line(dir, NETNS_FILE, name)
}

/// Writes down a process the lab just started (its pid and start time, so a sweep never
/// signals an unrelated process that reused the pid). There is no pid before the spawn, so
/// this comes right after it; the window is a few microseconds.
pub fn record_process(dir: &Path, pid: u32) -> Result<()> {
    let process = Owner::of(pid)?;
    append_line(
        dir,
        PROCESSES_FILE,
        &format!("{} {}", process.pid, process.start_time),
    )
}

/// Writes down, before creating it, that `/etc/netns/<name>/` belongs to this lab.
pub fn record_etc_netns(dir: &Path, name: &str) -> Result<()> {
    append_line(dir, ETC_NETNS_FILE, name)
}

fn append_line(dir: &Path, file: &str, line: &str) -> Result<()> {
    let path = dir.join(file);
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    writeln!(file, "{line}").with_context(|| format!("appending to {}", path.display()))
}

/// The non-empty lines of a record file; a missing file is an empty record.
fn read_lines(dir: &Path, file: &str) -> Result<Vec<String>> {
    match fs::read_to_string(dir.join(file)) {
        Ok(text) => Ok(text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("reading {file} of {}", dir.display())),
    }
}

/// Stops a recorded process if it still is the one recorded: SIGTERM, then SIGKILL if it has
/// not exited in time. A process that is gone (or a pid now used by another) is left alone.
pub fn stop_process(pid: u32, start_time: u64) -> Result<()> {
    use nix::sys::signal::{kill, Signal};
    let process = Owner { pid, start_time };
    let target = nix::unistd::Pid::from_raw(
        i32::try_from(pid).with_context(|| format!("pid {pid} is out of range"))?,
    );
    if !process.is_alive() {
        return Ok(());
    }
    kill(target, Signal::SIGTERM).with_context(|| format!("signalling process {pid}"))?;
    let deadline = std::time::Instant::now() + PROCESS_EXIT_WAIT;
    // A zombie has exited; whoever is its parent now reaps it.
    while process.is_alive() && !is_zombie(pid) {
        if std::time::Instant::now() > deadline {
            kill(target, Signal::SIGKILL).with_context(|| format!("killing process {pid}"))?;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}
/// Deletes the recorded namespaces and the directory; missing pieces are not errors, so two
/// processes sweeping the same dead lab do not trip over each other.
pub fn remove_lab(dir: &Path) -> Result<()> {
    let recorded = read_lines(dir, NETNS_FILE)?;
    let mut failures = Vec::new();
    // Processes first: a process inside a namespace keeps it alive after `ip netns del`.
    for line in read_lines(dir, PROCESSES_FILE)? {
        let Some(process) = Owner::parse(&line) else {
            failures.push(format!("unreadable process record {line:?}"));
            continue;
        };
        if let Err(e) = stop_process(process.pid, process.start_time) {
            failures.push(format!("{e:#}"));
        }
    }
    for name in read_lines(dir, ETC_NETNS_FILE)? {
        if let Err(e) = etc_netns::remove(&name) {
            failures.push(format!("{e:#}"));
        }
    }
    // Pins of an agent that ran on a node (a demo stopped by Ctrl-C, a killed test): its
    // links died with the node's interfaces; unpinning frees the maps.
    for node in read_lines(dir, NODE_FILE)? {
        if node.contains('/') || node == "." || node == ".." {
            continue;
        }
        let pins = Path::new(AGENT_PIN_ROOT).join(&node);
        match fs::remove_dir_all(&pins) {
            Err(e) if e.kind() != ErrorKind::NotFound => {
                failures.push(format!("removing {}: {e}", pins.display()))
            }
            _ => {}
        }
    }
    for name in &recorded {
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
