//! Per-CPU verdict counters: no atomics needed, the agent sums the CPUs.

use netpol_common::{counter_index, Direction, Reason};

use crate::maps::COUNTERS;

#[inline(always)]
pub fn count(dir: Direction, reason: Reason, bytes: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter_index(dir, reason)) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe {
            (*slot).packets += 1;
            (*slot).bytes += u64::from(bytes);
        }
    }
}
