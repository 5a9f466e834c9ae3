//! Conntrack map types (`NP_CT`, an LRU hash).
//!
//! A flow is tracked per endpoint: the key holds the ifindex of the pod's host-side interface
//! and the flow's addresses and ports **pod side first**, whichever side opened it. Both
//! directions of a flow therefore find its one entry with one lookup (no second lookup of the
//! reversed tuple for replies), and the value says which direction opened it. The same flow
//! between two local pods has two entries, one per endpoint, so each pod's own policy decides.

use crate::{Addr, Direction};

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey {
    pub ifindex: u32,
    pub proto: u8,
    pub _pad: [u8; 3],
    /// The pod's address (source of what it sends).
    pub pod_addr: Addr,
    /// The other end: another pod, a ClusterIP before DNAT, the node, the world.
    pub peer_addr: Addr,
    /// Ports in network byte order. An ICMP echo request carries its identifier as the source
    /// port (destination 0), a reply as the destination port (source 0).
    pub pod_port: [u8; 2],
    pub peer_port: [u8; 2],
}

/// A tracked flow as the packet that opened it was seen: source and destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Opened {
    pub dir: Direction,
    pub saddr: Addr,
    pub daddr: Addr,
    pub sport: [u8; 2],
    pub dport: [u8; 2],
}

impl CtKey {
    /// The flow oriented as its opening packet, which went in direction `dir` (the value's).
    pub const fn opened(&self, dir: Direction) -> Opened {
        match dir {
            Direction::Egress => Opened {
                dir,
                saddr: self.pod_addr,
                daddr: self.peer_addr,
                sport: self.pod_port,
                dport: self.peer_port,
            },
            Direction::Ingress => Opened {
                dir,
                saddr: self.peer_addr,
                daddr: self.pod_addr,
                sport: self.peer_port,
                dport: self.pod_port,
            },
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
    pub _pad: u16,
    /// Rule set that allowed the opening packet (0: not isolated or from host).
    pub rule_set: u32,
    /// BPF host routing: the host-side ifindex of the local pod at the other end, when the
    /// opening packet went straight from pod to pod (so no NAT of the node applies to the
    /// flow). 0: the node's IP stack carries the flow's packets.
    pub route: u32,
    pub _pad2: u32,
}

impl CtValue {
    /// The direction of the packet that opened the flow.
    pub const fn opened_dir(&self) -> Direction {
        if self.dir == Direction::Ingress as u8 {
            Direction::Ingress
        } else {
            Direction::Egress
        }
    }
}

// No per-flow packet counters: a counter written by every packet makes the entry's cache line
// bounce between the CPUs carrying the two directions (Cilium turns its accounting off by default
// for the same reason). Per-verdict counts live in `NP_COUNTERS`. An established flow writes its
// entry about once a second (`REFRESH_SLACK`), or when its TCP state changes.
const _: () = {
    assert!(core::mem::size_of::<CtKey>() == 44);
    assert!(core::mem::size_of::<CtValue>() == 24);
};
