//! netpol-agent as a library: the binary, the privileged tests and the benchmarks share it.
//!
//! Data flows one way: `source` (files, later the API) -> `policy` (pure compile and diff) ->
//! `reconcile` -> `dataplane` (the only module that touches the kernel through aya).

pub mod cli;
pub mod cni_pods;
pub mod cni_socket;
pub mod conntrack;
pub mod dataplane;
pub mod dump;
pub mod metrics;
pub mod names;
pub mod node;
pub mod plugin;
pub mod policy;
pub mod reconcile;
pub mod serve;
pub mod simulate;
pub mod source;

/// An error and its sources, on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}
