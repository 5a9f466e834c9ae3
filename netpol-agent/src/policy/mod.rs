//! The policy compiler. PURE: no tokio, no aya, no Kubernetes client, no I/O.
//!
//! model (what the cluster says) -> compile (identities, classes, LPM entries) -> `Compiled`,
//! the exact contents the kernel maps receive (keyed by pod, not yet by interface). `evaluate`
//! answers reachability questions by looking those contents up the way the kernel does.

pub mod compile;
pub mod desired;
mod entries;
pub mod evaluate;
mod incremental;
pub mod model;
pub mod ports;
pub mod render;
pub mod selector;
mod services;

#[cfg(test)]
mod tests;

#[cfg(test)]
mod property;

pub use compile::{compile, compile_with, Allocation, Compiled, Scope};
pub use model::Snapshot;
