//! Conntrack housekeeping, joining the kernel's table with the compiler's verdicts: garbage
//! collection of expired entries, and the flush of entries a new policy denies.
//!
//! A policy change applies to new connections: a tracked flow keeps passing on its entry (as
//! in Cilium and Calico) until it closes or expires. `--flush-denied` removes, after each
//! programming, the entries whose opening packet the new policy would not allow; the next
//! packet of such a flow then meets the policy like a new one and is dropped.

use std::collections::BTreeMap;

use netpol_common::{
    ct::{CtKey, CtValue},
    Direction,
};

use crate::{
    dataplane::{maps, DataplaneError, PinDir},
    policy::{desired::addr_from_bytes, evaluate::Flow, model::ObjectRef, Compiled},
};

/// What a garbage collection removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    pub flows: usize,
    pub fragments: usize,
}

/// Removes expired conntrack and fragment entries. The datapath already ignores them; this
/// frees their slots before the LRU would have to evict live ones.
pub fn gc(pins: &PinDir) -> Result<GcReport, DataplaneError> {
    gc_at(pins, maps::monotonic_ns())
}

/// `gc` as if the monotonic clock read `now` (nanoseconds).
pub fn gc_at(pins: &PinDir, now: u64) -> Result<GcReport, DataplaneError> {
    Ok(GcReport {
        flows: maps::remove_conntrack(pins, |_, v| v.expires <= now)?,
        fragments: maps::remove_expired_fragments(pins, now)?,
    })
}

/// Whether the policy `compiled` holds would still allow the packet that opened this entry,
/// at the endpoint it was tracked on. Entries of interfaces that are no longer endpoints are
/// not allowed (the ifindex may come back as another pod's).
pub fn still_allowed(
    compiled: &Compiled,
    pod_of: &BTreeMap<u32, ObjectRef>,
    key: &CtKey,
    value: &CtValue,
) -> bool {
    let Some(pod) = pod_of.get(&key.ifindex) else {
        return false;
    };
    let opened = key.opened(value.opened_dir());
    let peer = match opened.dir {
        Direction::Ingress => opened.saddr,
        Direction::Egress => opened.daddr,
    };
    let flow = Flow {
        peer: addr_from_bytes(peer),
        proto: key.proto,
        port: u16::from_be_bytes(opened.dport),
    };
    compiled
        .evaluate(pod, opened.dir, flow)
        .is_some_and(|verdict| verdict.allowed)
}

/// Removes every entry the policy in `compiled` would not allow; returns how many.
pub fn flush_denied(
    pins: &PinDir,
    compiled: &Compiled,
    ifindex_of: &BTreeMap<ObjectRef, u32>,
) -> Result<usize, DataplaneError> {
    let pod_of: BTreeMap<u32, ObjectRef> = ifindex_of
        .iter()
        .map(|(pod, ifindex)| (*ifindex, pod.clone()))
        .collect();
    maps::remove_conntrack(pins, |k, v| !still_allowed(compiled, &pod_of, k, v))
}
