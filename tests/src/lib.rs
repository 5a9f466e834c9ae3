//! Support code for netpol's privileged tests and the local demo.
//!
//! `lab` simulates one Kubernetes node on this machine: a node network namespace and one network
//! namespace per pod, wired by the real CNI reference plugins, with servers on every declared
//! container port and probes (curl, telnet-style connects, UDP) between pods. `agent` runs the
//! real netpol-agent binary on a lab node; `scenario` probes and prints connectivity matrices.

pub mod agent;
pub mod lab;
pub mod packet;
pub mod scenario;
