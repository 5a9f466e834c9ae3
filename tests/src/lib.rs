//! Support code for netpol's privileged tests.
//!
//! `lab` simulates one Kubernetes node on this machine: a node network namespace and one network
//! namespace per pod, wired by the real CNI reference plugins, with servers on every declared
//! container port and probes (curl, telnet-style connects, UDP) between pods.

pub mod lab;
