//! Builds the eBPF object with Debian's toolchain (see shared/TOOLCHAIN.md): rustc-web ships a
//! prebuilt `core` for bpfel-unknown-none, so no `-Z build-std` is needed. `RUSTC_BOOTSTRAP`
//! names the one crate allowed unstable features (aya-ebpf's `asm_experimental_arch`).

use anyhow::{anyhow, Context as _};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    // SAFETY: build scripts are single-threaded.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "aya_ebpf") };
    let ebpf_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or_else(|| anyhow!("agent crate has no parent directory"))?
        .join("netpol-ebpf");
    let root_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", ebpf_dir.display()))?;
    aya_build::build_ebpf(
        [Package {
            name: "netpol-ebpf",
            root_dir,
            ..Default::default()
        }],
        Toolchain::Custom("debian"),
    )
    .context("building the eBPF programs (did `cargo xtask setup` run?)")
}
