//! The datapath's clock: `bpf_ktime_get_coarse_ns`, CLOCK_MONOTONIC as of the last timer tick.
//!
//! Conntrack and fragment lifetimes are seconds to hours, so a tick's resolution (1-4 ms) loses
//! nothing, and reading the coarse clock costs a load where `bpf_ktime_get_ns` reads the
//! clocksource: measured here, about 45 ns of a 250 ns established packet under
//! `BPF_PROG_TEST_RUN`. The agent compares expiries with CLOCK_MONOTONIC, the same clock.

use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;

#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: helper without arguments (kernels 5.11+).
    unsafe { bpf_ktime_get_coarse_ns() }
}
