//! Support code for netpol's privileged tests and the local demo.
//!
//! `lab` simulates a small Kubernetes cluster on this machine: one or two node network
//! namespaces and one per pod, wired by the real CNI reference plugins (IPv4 or dual-stack),
//! with servers on every declared container port, ClusterIP Services, cluster DNS, and probes
//! (curl, telnet-style connects, UDP; by address or by name) between pods. `agent` runs the
//! real netpol-agent binary on a lab node; `scenario` probes and prints connectivity matrices;
//! `perf` moves benchmark traffic between lab pods (iperf3, request/response, connections).

pub mod agent;
pub mod lab;
pub mod packet;
pub mod perf;
pub mod scenario;
