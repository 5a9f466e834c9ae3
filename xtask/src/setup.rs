//! Idempotent machine preparation, shared by the demo, the tests and CI. Each step checks
//! first and does nothing when already done, so a second run takes seconds.

use std::process::Command;

use anyhow::{bail, Context as _, Result};

use crate::util::{exec, step, tools_dir};

/// Debian packages: the eBPF toolchain (see shared/TOOLCHAIN.md), the kernel tools, the CNI
/// reference plugins the lab calls, and the probes' clients.
const PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev-bpf",
    "llvm-22-dev",
    "bpftool",
    "iproute2",
    "iputils-ping",
    "util-linux",
    "curl",
    "containernetworking-plugins",
    // The lab's kube-proxy (its Service rules live in the node namespaces).
    "iptables",
    // The lab's cluster DNS server; -base is the binary without the system service.
    "dnsmasq-base",
    // The end-to-end benchmark: kube-router-style rules to compare against (ipset; nftables
    // and conntrack to remove them and check what the node tracks) and iperf3 to measure.
    "ipset",
    "nftables",
    "conntrack",
    "iperf3",
    // `cargo xtask validate`: a venv for kubernetes-validate, and shellcheck.
    "python3-venv",
    "shellcheck",
];

/// kubernetes-validate (its Kubernetes schemas are bundled; 1.33.1 ships 1.33.0's) and every
/// package it pulls in, pinned, so validation gives the same answer on every machine.
pub const VALIDATOR_REQUIREMENTS: &[&str] = &[
    "kubernetes-validate==1.33.1",
    "attrs==26.1.0",
    "importlib_resources==7.1.0",
    "jsonschema==4.26.0",
    "jsonschema-specifications==2025.9.1",
    "packaging==26.3",
    "PyYAML==6.0.3",
    "referencing==0.37.0",
    "rpds-py==2026.9.1",
    "typing_extensions==4.16.0",
];

const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn run() -> Result<()> {
    step("setup");
    if !nix_is_root() {
        bail!("setup needs root (apt-get, bpffs, network namespaces)");
    }
    packages()?;
    bpf_linker()?;
    toolchain_link()?;
    bpffs()?;
    validators()
}

/// What `cargo xtask validate` needs: the Debian packages (shellcheck, python3-venv among
/// them) and the validators' venv, without bpf-linker, the toolchain link or bpffs.
pub fn validation_tools() -> Result<()> {
    step("setup (validators)");
    if !nix_is_root() {
        bail!("setup needs root (apt-get)");
    }
    packages()?;
    validators()
}

fn nix_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

fn packages() -> Result<()> {
    let missing: Vec<&str> = PACKAGES.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        println!("packages: all {} present", PACKAGES.len());
        return Ok(());
    }
    println!("packages: installing {}", missing.join(" "));
    exec(Command::new("apt-get").arg("update").arg("-qq"))?;
    exec(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn bpf_linker() -> Result<()> {
    let bin = tools_dir().join("bin/bpf-linker");
    let current = Command::new(&bin).arg("--version").output();
    if current.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION)) {
        println!(
            "bpf-linker {BPF_LINKER_VERSION}: present in {}",
            bin.display()
        );
        return Ok(());
    }
    println!("bpf-linker {BPF_LINKER_VERSION}: building against Debian's LLVM 22 (about a minute)");
    exec(
        Command::new("cargo")
            .args([
                "+stable",
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
            ])
            .args([
                "--locked",
                "--no-default-features",
                "--features",
                "llvm-22",
                "--root",
            ])
            .arg(tools_dir())
            .env("LLVM_PREFIX", "/usr/lib/llvm-22"),
    )
}

fn toolchain_link() -> Result<()> {
    let list = Command::new("rustup")
        .args(["toolchain", "list"])
        .output()
        .context("running rustup")?;
    if String::from_utf8_lossy(&list.stdout)
        .lines()
        .any(|l| l.starts_with("debian"))
    {
        println!("rustup toolchain 'debian': linked");
        return Ok(());
    }
    println!("rustup toolchain 'debian': linking /usr");
    exec(Command::new("rustup").args(["toolchain", "link", "debian", "/usr"]))
}

fn bpffs() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    if mounts.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.get(1) == Some(&"/sys/fs/bpf") && f.get(2) == Some(&"bpf")
    }) {
        println!("bpffs: mounted at /sys/fs/bpf");
        return Ok(());
    }
    println!("bpffs: mounting at /sys/fs/bpf");
    exec(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
}

/// The venv kubernetes-validate runs from.
pub fn venv_dir() -> std::path::PathBuf {
    tools_dir().join("venv")
}

/// A venv under the tools directory with `VALIDATOR_REQUIREMENTS`; a stamp file holding the
/// list makes a second run a file comparison.
fn validators() -> Result<()> {
    let venv = venv_dir();
    let stamp = venv.join("netpol-requirements.txt");
    let want = VALIDATOR_REQUIREMENTS.join("\n") + "\n";
    if venv.join("bin/kubernetes-validate").exists()
        && std::fs::read_to_string(&stamp).is_ok_and(|have| have == want)
    {
        println!("kubernetes-validate: present in {}", venv.display());
        return Ok(());
    }
    println!("kubernetes-validate: installing into {}", venv.display());
    exec(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    exec(
        Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .args(VALIDATOR_REQUIREMENTS),
    )?;
    std::fs::write(&stamp, want).with_context(|| format!("writing {}", stamp.display()))
}
