//! `cargo xtask <command>`: everything a newcomer or CI runs.
//!
//! - `setup`: idempotent machine preparation (Debian packages, bpf-linker, toolchain link, bpffs)
//! - `build`: setup, then the agent with its embedded eBPF object
//! - `demo`: the local demo (README command 1)
//! - `test`: every test (README command 2; `.ci/run` calls exactly this)
//! - `validate`: the deploy/ manifests, kind config and KIND script, offline (part of `test`)

mod demo;
mod setup;
mod test;
mod util;
mod validate;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what building and testing need (a second run takes seconds).
    Setup,
    /// Setup, then build netpol-agent (debug, or --release).
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Start a lab with the seed's 3-tier app, show connectivity before and after the example
    /// policies, and dump what netpol programmed.
    Demo,
    /// Formatting, lints, unit tests and the privileged kernel tests.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Check deploy/ offline: manifests against the Kubernetes 1.33 schemas (strict), the kind
    /// cluster config, and the KIND demo script (bash -n, shellcheck).
    Validate,
}

fn main() -> std::process::ExitCode {
    let result = match Cli::parse().command {
        Command::Setup => setup::run(),
        Command::Build { release } => {
            setup::run().and_then(|()| util::build_agent(release).map(|_| ()))
        }
        Command::Demo => demo::run(),
        Command::Test { args } => test::run(&args),
        Command::Validate => validate::run(),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
