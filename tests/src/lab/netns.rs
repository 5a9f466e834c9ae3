//! Network namespaces: creating and deleting named ones (`ip netns`), and running code or
//! programs inside one. Nothing here creates links or addresses.

use std::fs::{File, OpenOptions};
use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};
use nix::fcntl::{Flock, FlockArg};
use nix::sched::CloneFlags;

use super::names::STATE_ROOT;

pub fn netns_path(name: &str) -> PathBuf {
    PathBuf::from("/run/netns").join(name)
}

pub fn add_netns(name: &str) -> Result<()> {
    // The first `ip netns add` on a machine turns /run/netns into a shared bind mount; two of
    // them racing can stack two mounts and hide namespaces from each other, so they take turns.
    let _turn = lock_netns_setup()?;
    run_ip(&["netns", "add", name])
}

/// Deletes a namespace; one that is already gone, or goes while we try, is not an error.
pub fn delete_netns(name: &str) -> Result<()> {
    if !netns_path(name).exists() {
        return Ok(());
    }
    run_ip(&["netns", "del", name]).or_else(|e| {
        if netns_path(name).exists() {
            Err(e)
        } else {
            Ok(())
        }
    })
}

fn lock_netns_setup() -> Result<Flock<File>> {
    lock_file(".netns.lock")
}

/// An exclusive lock on a file in the state root, shared by threads and processes alike;
/// released when the returned guard drops.
pub fn lock_file(name: &str) -> Result<Flock<File>> {
    std::fs::create_dir_all(STATE_ROOT).with_context(|| format!("creating {STATE_ROOT}"))?;
    let path = PathBuf::from(STATE_ROOT).join(name);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    Flock::lock(file, FlockArg::LockExclusive)
        .map_err(|(_, errno)| errno)
        .with_context(|| format!("locking {}", path.display()))
}

fn run_ip(args: &[&str]) -> Result<()> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .context("running ip")?;
    if !output.status.success() {
        bail!(
            "ip {} failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// Runs `f` on a fresh thread that has joined the named network namespace. Sockets `f` creates
/// stay in that namespace for their whole life, whichever thread uses them afterwards, so only
/// socket creation needs this; the calling thread's namespace never changes.
pub fn in_netns<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
    let path = netns_path(name);
    let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    std::thread::scope(|scope| {
        let thread = scope.spawn(move || -> Result<T> {
            nix::sched::setns(&file, CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("entering network namespace {name}"))?;
            Ok(f())
        });
        thread
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Sets a `net.*` sysctl of the named namespace, e.g. `("net.ipv6.conf.all.accept_dad", "0")`.
/// Written from a thread inside the namespace: /proc/sys/net shows the namespace of the thread
/// that opens it, so the machine's own settings are never touched.
pub fn set_sysctl(netns: &str, key: &str, value: &str) -> Result<()> {
    if !key.starts_with("net.") || key.contains("..") || key.contains('/') {
        bail!("{key} is not a per-namespace net.* sysctl");
    }
    let path = PathBuf::from("/proc/sys").join(key.replace('.', "/"));
    in_netns(netns, || std::fs::write(&path, value))?
        .with_context(|| format!("setting {key}={value} in {netns}"))
}

/// A command that runs `program` inside the named network namespace. `nsenter --net` is used
/// rather than `ip netns exec`, which remounts /sys and would hide the host's bpffs.
pub fn nsenter_command(name: &str, program: &str) -> Command {
    let mut command = Command::new("nsenter");
    command
        .arg(format!("--net={}", netns_path(name).display()))
        .arg("--")
        .arg(program);
    command
}
