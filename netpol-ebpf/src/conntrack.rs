//! Per-endpoint connection tracking: the first allowed packet of a flow creates an entry;
//! later packets in its direction and replies pass without a policy lookup.

use netpol_common::{
    ct::{lifetime, tcp_state, CtKey, CtValue},
    Addr, Direction, Reason,
};

use crate::{
    clock::now,
    maps::CONNTRACK,
    parse::{Inner, Packet, IPPROTO_TCP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

/// A lookup's answer; `route` is the entry's (see `CtValue::route`).
pub enum Hit {
    /// Same direction as the packet that opened the flow.
    Established {
        route: u32,
    },
    Reply {
        route: u32,
    },
    Miss,
}

/// The flow's key at this endpoint: pod side first, whichever way the packet goes.
#[inline(always)]
pub fn key(ifindex: u32, dir: Direction, pkt: &Packet) -> CtKey {
    pod_first(
        ifindex,
        dir,
        pkt.proto,
        (pkt.src, pkt.sport),
        (pkt.dst, pkt.dport),
    )
}

/// The key of a packet from `src` to `dst` going in direction `dir` at this endpoint.
#[inline(always)]
fn pod_first(
    ifindex: u32,
    dir: Direction,
    proto: u8,
    src: (Addr, [u8; 2]),
    dst: (Addr, [u8; 2]),
) -> CtKey {
    let ((pod_addr, pod_port), (peer_addr, peer_port)) = match dir {
        Direction::Egress => (src, dst),
        Direction::Ingress => (dst, src),
    };
    CtKey {
        ifindex,
        proto,
        _pad: [0; 3],
        pod_addr,
        peer_addr,
        pod_port,
        peer_port,
    }
}

/// One lookup finds the flow whichever side opened it; the entry's direction says whether this
/// packet goes the opening way or is a reply. A live entry is refreshed.
pub fn lookup(key: &CtKey, dir: Direction, pkt: &Packet) -> Hit {
    let Some(entry) = CONNTRACK.get_ptr_mut(key) else {
        return Hit::Miss;
    };
    // SAFETY: LRU hash values stay valid for the program's run; racing writers only move
    // `expires` and `state`, which are advisory (a lost update costs one more refresh).
    let entry = unsafe { &mut *entry };
    let now = now();
    if entry.expires <= now {
        return Hit::Miss;
    }
    let reply = entry.dir != dir as u8;
    refresh(entry, pkt, reply, now);
    let route = entry.route;
    if reply {
        Hit::Reply { route }
    } else {
        Hit::Established { route }
    }
}

/// The route of the live flow of this endpoint an ICMP error quoting `inner` is about, if there
/// is one. The quote is the packet that caused the error, as its sender sent it: an error
/// delivered to the pod quotes what the pod sent; an error the pod sends quotes what it
/// received. Either way one lookup, pod side first.
pub fn related(ifindex: u32, dir: Direction, inner: &Inner) -> Option<u32> {
    // The quote travelled the other way: the pod sent it when the error comes in, and the error
    // goes out about what the pod received.
    let key = pod_first(
        ifindex,
        dir.opposite(),
        inner.proto,
        (inner.src, inner.sport),
        (inner.dst, inner.dport),
    );
    // SAFETY: plain-data value, read once.
    let entry = unsafe { CONNTRACK.get(&key) }?;
    (entry.expires > now()).then_some(entry.route)
}

/// Tracks a new flow that policy allowed; `route` as in `CtValue`.
pub fn create(
    key: &CtKey,
    dir: Direction,
    pkt: &Packet,
    rule_set: u32,
    route: u32,
) -> Result<(), Reason> {
    let now = now();
    let (state, life) = if pkt.proto != IPPROTO_TCP {
        (tcp_state::OTHER, lifetime::NON_TCP)
    } else if pkt.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        (tcp_state::CLOSING, lifetime::TCP_CLOSING)
    } else if pkt.tcp_flags & TCP_SYN != 0 && pkt.tcp_flags & TCP_ACK == 0 {
        (tcp_state::SYN_SENT, lifetime::TCP_SYN)
    } else {
        // Picked up mid-stream (e.g. the entry was flushed): treat as established.
        (tcp_state::ESTABLISHED, lifetime::TCP_ESTABLISHED)
    };
    let value = CtValue {
        expires: now + life,
        dir: dir as u8,
        state,
        _pad: 0,
        rule_set,
        route,
        _pad2: 0,
    };
    CONNTRACK
        .insert(key, value, 0)
        .map_err(|_| Reason::ConntrackFull)
}

fn refresh(entry: &mut CtValue, pkt: &Packet, reply: bool, now: u64) {
    let (state, life) = if pkt.proto != IPPROTO_TCP {
        (entry.state, lifetime::NON_TCP)
    } else if pkt.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        (tcp_state::CLOSING, lifetime::TCP_CLOSING)
    } else if entry.state == tcp_state::CLOSING {
        // A closing flow never goes back to a long lifetime.
        return;
    } else if reply || entry.state == tcp_state::ESTABLISHED {
        (tcp_state::ESTABLISHED, lifetime::TCP_ESTABLISHED)
    } else {
        (entry.state, lifetime::TCP_SYN)
    };
    // Write only what changes, and the expiry only when it moves noticeably or shrinks
    // (closing): an established flow leaves its cache line clean on almost every packet.
    if state != entry.state {
        entry.state = state;
    }
    let expires = now + life;
    if expires < entry.expires || expires - entry.expires > lifetime::REFRESH_SLACK {
        entry.expires = expires;
    }
}
