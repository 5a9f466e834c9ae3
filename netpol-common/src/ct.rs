//! Conntrack map types (`NP_CT`, an LRU hash).
//!
//! A flow is tracked per endpoint: the key holds the ifindex of the pod's host-side interface
//! and the 5-tuple oriented as the packet that opened the flow was seen there. The same flow
//! between two local pods therefore has two entries, one per endpoint, so each pod's own
//! policy decides for it.

use crate::Addr;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey {
    pub ifindex: u32,
    pub proto: u8,
    pub _pad: [u8; 3],
    pub saddr: Addr,
    pub daddr: Addr,
    /// Ports in network byte order; for ICMP echo both hold the echo identifier.
    pub sport: [u8; 2],
    pub dport: [u8; 2],
}

impl CtKey {
    /// The key of the opposite direction of the same flow.
    pub const fn reversed(&self) -> CtKey {
        CtKey {
            ifindex: self.ifindex,
            proto: self.proto,
            _pad: [0; 3],
            saddr: self.daddr,
            daddr: self.saddr,
            sport: self.dport,
            dport: self.sport,
        }
    }
}

/// TCP states kept by the tracker.
pub mod tcp_state {
    /// Opened by a SYN, no reply yet.
    pub const SYN_SENT: u8 = 1;
    /// A reply was seen.
    pub const ESTABLISHED: u8 = 2;
    /// A FIN or RST was seen.
    pub const CLOSING: u8 = 3;
    /// Not TCP: a pseudo-connection kept alive by traffic.
    pub const OTHER: u8 = 0;
}

/// Lifetimes in nanoseconds, in the range Cilium and Calico use.
pub mod lifetime {
    const SEC: u64 = 1_000_000_000;
    pub const TCP_SYN: u64 = 60 * SEC;
    pub const TCP_ESTABLISHED: u64 = 6 * 60 * 60 * SEC;
    pub const TCP_CLOSING: u64 = 10 * SEC;
    pub const NON_TCP: u64 = 60 * SEC;
    /// A fragmented datagram's later fragments, after its first (the kernel's ipfrag_time).
    pub const FRAGMENT: u64 = 30 * SEC;
    /// Refresh an entry's expiry only when it would move by more than this (saves writes).
    pub const REFRESH_SLACK: u64 = SEC;
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtValue {
    /// `bpf_ktime_get_ns()` after which the entry is dead.
    pub expires: u64,
    /// `Direction` (as u8) of the packet that opened the flow.
    pub dir: u8,
    /// `tcp_state`.
    pub state: u8,
    pub _pad: [u8; 2],
    /// Rule set that allowed the opening packet (0: not isolated or from host).
    pub rule_set: u32,
    /// Packets seen in the opening and the reply direction.
    pub packets_fwd: u64,
    pub packets_rev: u64,
}

const _: () = {
    assert!(core::mem::size_of::<CtKey>() == 44);
    assert!(core::mem::size_of::<CtValue>() == 32);
};
