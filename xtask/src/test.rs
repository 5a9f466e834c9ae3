//! Every test: formatting, the offline checks of deploy/ (`validate`), lints, unit tests, then
//! the privileged kernel tests in the lab.
//! The kernel tests need root and the kernel; they fail loudly, never skip, when they cannot run.

use anyhow::Result;

use crate::{
    setup,
    util::{build_agent, command, exec, step},
    validate,
};

pub fn run(extra: &[String]) -> Result<()> {
    setup::run()?;
    step("cargo fmt --check");
    exec(command("cargo").args(["fmt", "--all", "--", "--check"]))?;
    validate::check()?;
    let bin = build_agent(false)?;
    // The eBPF crate builds only for the BPF target (through the agent's build.rs), not for
    // the host, so host-side clippy and test leave it out.
    step("cargo clippy");
    exec(command("cargo").args([
        "clippy",
        "--workspace",
        "--exclude",
        "netpol-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    step("cargo test (unit tests, then the privileged lab and kernel tests)");
    exec(
        command("cargo")
            .args([
                "test",
                "--workspace",
                "--exclude",
                "netpol-ebpf",
                "--no-fail-fast",
            ])
            .args(extra)
            .env("NETPOL_AGENT_BIN", &bin),
    )
}
