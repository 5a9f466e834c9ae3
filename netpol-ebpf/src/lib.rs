//! Empty library target: `netpol-agent` names this crate as a build-dependency so cargo rebuilds
//! the agent when the eBPF sources change; the programs themselves are the `netpol` binary.
#![no_std]
