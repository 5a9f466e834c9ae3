//! One packet, start to verdict: endpoint, parse, conntrack, policy, count.
//!
//! Fail-closed: any error on an interface that carries our program drops the packet, with its
//! reason counted. Allowed packets return `TC_ACT_UNSPEC` (TCX_NEXT) so programs attached
//! after ours still run; with none, the kernel passes the packet.

use aya_ebpf::programs::TcContext;
use netpol_common::{endpoint_flag, Direction, EndpointInfo, Reason};

use crate::{
    conntrack::{self, Hit},
    counters::count,
    fragments,
    maps::ENDPOINTS,
    parse::{parse, Fragment, Packet, Parsed},
    policy::decide,
};

/// `TC_ACT_UNSPEC`: TCX_NEXT, let the next program (or the kernel) decide.
const PASS: i32 = -1;
/// `TC_ACT_SHOT`: drop.
const DROP: i32 = 2;

pub fn handle(ctx: &TcContext, dir: Direction) -> i32 {
    let verdict = try_handle(ctx, dir);
    let (reason, action) = match verdict {
        Ok(reason) => (reason, PASS),
        Err(reason) => (reason, DROP),
    };
    count(dir, reason, ctx.len());
    action
}

/// `Ok(reason)` passes the packet, `Err(reason)` drops it.
fn try_handle(ctx: &TcContext, dir: Direction) -> Result<Reason, Reason> {
    // SAFETY: the context pointer is valid for the program's run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: values are plain data; the agent replaces entries whole.
    let ep = unsafe { ENDPOINTS.get(ifindex) }.ok_or(Reason::NoEndpoint)?;
    let mut pkt = Packet::default();
    if let Parsed::Control = parse(ctx, &mut pkt)? {
        return Ok(Reason::Control);
    }
    if dir == Direction::Egress && !source_is_pod(ep, &pkt) {
        return Err(Reason::Spoofed);
    }
    if pkt.fragment == Fragment::Later {
        // No ports: no conntrack entry to find or create. Passed with its first fragment, or
        // where nothing isolates this direction.
        if fragments::known(ifindex, &pkt) {
            return Ok(Reason::FragmentOfFlow);
        }
        return decide(ep, dir, &pkt).map(|allowed| allowed.reason);
    }
    let reason = track(ifindex, ep, dir, &pkt)?;
    if pkt.fragment == Fragment::First {
        fragments::record(ifindex, &pkt);
    }
    Ok(reason)
}

/// Conntrack first (related ICMP errors, established flows, replies), then policy for a new
/// flow, which is tracked once allowed.
fn track(ifindex: u32, ep: &EndpointInfo, dir: Direction, pkt: &Packet) -> Result<Reason, Reason> {
    if pkt.has_related && conntrack::related(ifindex, dir, &pkt.related) {
        return Ok(Reason::Related);
    }
    let key = conntrack::key(ifindex, dir, pkt);
    match conntrack::lookup(&key, dir, pkt) {
        Hit::Established => return Ok(Reason::Established),
        Hit::Reply => return Ok(Reason::Reply),
        Hit::Miss => {}
    }
    let allowed = decide(ep, dir, pkt)?;
    conntrack::create(&key, dir, pkt, allowed.rule_set)?;
    Ok(allowed.reason)
}

/// Anti-spoofing: a packet leaving the pod must carry one of the pod's own addresses. (ARP and
/// neighbour discovery were passed before this point, as `Control`.)
fn source_is_pod(ep: &EndpointInfo, pkt: &Packet) -> bool {
    let is_v4 = pkt.src[..12] == netpol_common::ipv4_mapped([0; 4])[..12];
    if is_v4 {
        ep.flags & endpoint_flag::HAS_IPV4 != 0 && pkt.src == ep.ipv4
    } else {
        ep.flags & endpoint_flag::HAS_IPV6 != 0 && pkt.src == ep.ipv6
    }
}
