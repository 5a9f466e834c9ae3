//! Per-endpoint connection tracking: the first allowed packet of a flow creates an entry;
//! later packets in its direction and replies pass without a policy lookup.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use netpol_common::{
    ct::{lifetime, tcp_state, CtKey, CtValue},
    Direction, Reason,
};

use crate::{
    maps::CONNTRACK,
    parse::{Inner, Packet, IPPROTO_TCP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

pub enum Hit {
    /// Same direction as the packet that opened the flow.
    Established,
    Reply,
    Miss,
}

pub fn key(ifindex: u32, pkt: &Packet) -> CtKey {
    CtKey {
        ifindex,
        proto: pkt.proto,
        _pad: [0; 3],
        saddr: pkt.src,
        daddr: pkt.dst,
        sport: pkt.sport,
        dport: pkt.dport,
    }
}

#[inline(always)]
fn now() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_ns() }
}

/// Looks the packet up in both orientations and refreshes the entry it belongs to.
pub fn lookup(key: &CtKey, dir: Direction, pkt: &Packet) -> Hit {
    let now = now();
    if let Some(entry) = CONNTRACK.get_ptr_mut(key) {
        // SAFETY: LRU hash values stay valid for the program's run; racing writers only
        // move `expires` and counters, which are advisory.
        let entry = unsafe { &mut *entry };
        if entry.dir == dir as u8 && entry.expires > now {
            refresh(entry, pkt, false, now);
            return Hit::Established;
        }
    }
    let reversed = key.reversed();
    if let Some(entry) = CONNTRACK.get_ptr_mut(reversed) {
        // SAFETY: as above.
        let entry = unsafe { &mut *entry };
        if entry.dir == dir.opposite() as u8 && entry.expires > now {
            refresh(entry, pkt, true, now);
            return Hit::Reply;
        }
    }
    Hit::Miss
}

/// Whether an ICMP error quoting `inner` is about a live flow of this endpoint. The quote is
/// the packet as its sender sent it: the opening direction when the error travels against it,
/// or a reply when the error travels with it.
pub fn related(ifindex: u32, dir: Direction, inner: &Inner) -> bool {
    let key = CtKey {
        ifindex,
        proto: inner.proto,
        _pad: [0; 3],
        saddr: inner.src,
        daddr: inner.dst,
        sport: inner.sport,
        dport: inner.dport,
    };
    let now = now();
    // SAFETY: plain-data values, read once.
    let live = |key: &CtKey, opened: Direction| match unsafe { CONNTRACK.get(key) } {
        Some(entry) => entry.dir == opened as u8 && entry.expires > now,
        None => false,
    };
    live(&key, dir.opposite()) || live(&key.reversed(), dir)
}

/// Tracks a new flow that policy allowed.
pub fn create(key: &CtKey, dir: Direction, pkt: &Packet, rule_set: u32) -> Result<(), Reason> {
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
        _pad: [0; 2],
        rule_set,
        packets_fwd: 1,
        packets_rev: 0,
    };
    CONNTRACK
        .insert(key, value, 0)
        .map_err(|_| Reason::ConntrackFull)
}

fn refresh(entry: &mut CtValue, pkt: &Packet, reply: bool, now: u64) {
    if reply {
        entry.packets_rev += 1;
    } else {
        entry.packets_fwd += 1;
    }
    let life = if pkt.proto != IPPROTO_TCP {
        lifetime::NON_TCP
    } else if pkt.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        entry.state = tcp_state::CLOSING;
        lifetime::TCP_CLOSING
    } else if entry.state == tcp_state::CLOSING {
        // A closing flow never goes back to a long lifetime.
        return;
    } else if reply || entry.state == tcp_state::ESTABLISHED {
        entry.state = tcp_state::ESTABLISHED;
        lifetime::TCP_ESTABLISHED
    } else {
        lifetime::TCP_SYN
    };
    let expires = now + life;
    // Only write when the expiry moves noticeably, or shrinks (closing): fewer dirty lines.
    if expires < entry.expires || expires - entry.expires > lifetime::REFRESH_SLACK {
        entry.expires = expires;
    }
}
