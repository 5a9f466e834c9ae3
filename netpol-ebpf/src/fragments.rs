//! Fragment tracking: a non-first fragment carries no ports, so it passes only when the first
//! fragment of the same datagram (same endpoint, addresses, protocol and IP id) was passed.
//! Fragments that arrive before their first are dropped where policy isolates: never a bypass.

use netpol_common::{ct::lifetime, FragKey, FragValue};

use crate::{clock::now, maps::FRAGMENTS, parse::Packet};

fn key(ifindex: u32, pkt: &Packet) -> FragKey {
    FragKey {
        ifindex,
        id: pkt.frag_id,
        proto: pkt.proto,
        _pad: [0; 3],
        saddr: pkt.src,
        daddr: pkt.dst,
    }
}

/// Remembers that the first fragment of this datagram was passed.
pub fn record(ifindex: u32, pkt: &Packet) {
    // SAFETY: helper without arguments.
    let expires = now() + lifetime::FRAGMENT;
    // A full LRU evicts the oldest datagram; failing to record only drops the later fragments.
    let _ = FRAGMENTS.insert(&key(ifindex, pkt), &FragValue { expires }, 0);
}

/// Whether this later fragment belongs to a datagram whose first fragment was passed.
pub fn known(ifindex: u32, pkt: &Packet) -> bool {
    // SAFETY: plain-data value, read once; helper without arguments.
    match unsafe { FRAGMENTS.get(&key(ifindex, pkt)) } {
        Some(v) => v.expires > now(),
        None => false,
    }
}
