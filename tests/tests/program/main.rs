//! Program tests: the real classifiers, the real maps (filled by the real compiler), crafted
//! packets run through `BPF_PROG_TEST_RUN`; every case asserts the verdict and the counter.
//! Needs root and the BPF syscall; fails loudly when it cannot load the programs. Nothing is
//! sent on any network: test runs execute on a synthetic skb.
//!
//! `harness` loads the programs and fills the maps; `verdicts` covers every protocol path and
//! malformed headers; `stateful` covers conntrack, related ICMP errors, fragments, Service
//! ports and GC; `fuzz` throws 100,000 random and mutated frames at the ingress program;
//! `agreement` checks the kernel against `simulate` on every kind of policy entry.

mod agreement;
mod fuzz;
mod harness;
mod stateful;
mod verdicts;
