//! Link flags for the eBPF object (bpf-linker, LLVM 22).
//!
//! - `--disable-expand-memcpy-in-order`: with bpf-linker's default, LLVM's BPF backend gets
//!   `-bpf-expand-memcpy-in-order`, which also sets its inline limit for `memset` to zero, so every
//!   zeroed array or struct (a 3-byte key padding, the parsed packet) became a call to a byte-loop
//!   `memset`: about a third of the per-packet cost. Without it, small copies and fills are plain
//!   stores.
//! - `+alu32`: 32-bit ALU (kernels 5.1+): fewer instructions for the u8/u16/u32
//!   arithmetic of header parsing.
fn main() {
    println!("cargo::rustc-link-arg=--disable-expand-memcpy-in-order");
    println!("cargo::rustc-link-arg=--cpu-features=+alu32");
    println!("cargo::rerun-if-changed=build.rs");
}
