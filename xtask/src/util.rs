//! Running commands with the project's tool directory on PATH.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

/// Where setup installs tools that are not Debian packages (bpf-linker).
pub fn tools_dir() -> PathBuf {
    std::env::var_os("NETPOL_TOOLS")
        .map_or_else(|| PathBuf::from("/opt/netpol/tools"), PathBuf::from)
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// PATH with the tools directory first, so aya-build finds bpf-linker.
pub fn path_env() -> std::ffi::OsString {
    let mut paths = vec![tools_dir().join("bin")];
    if let Some(p) = std::env::var_os("PATH") {
        paths.extend(std::env::split_paths(&p));
    }
    std::env::join_paths(paths).expect("PATH entries are valid")
}

/// A command run from the workspace root with the project PATH.
pub fn command(program: &str) -> Command {
    let mut cmd = Command::new(program);
    cmd.current_dir(workspace_root()).env("PATH", path_env());
    cmd
}

pub fn exec(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

pub fn step(title: &str) {
    println!("\n\x1b[1m== {title}\x1b[0m");
}

/// Builds netpol-agent; returns the binary's path.
pub fn build_agent(release: bool) -> Result<PathBuf> {
    step(&format!(
        "building netpol-agent ({})",
        if release { "release" } else { "debug" }
    ));
    let mut cmd = command("cargo");
    cmd.args([
        "build",
        "--package",
        "netpol-agent",
        "--bin",
        "netpol-agent",
    ]);
    if release {
        cmd.arg("--release");
    }
    exec(&mut cmd)?;
    let bin = workspace_root()
        .join("target")
        .join(if release { "release" } else { "debug" })
        .join("netpol-agent");
    Ok(bin)
}
