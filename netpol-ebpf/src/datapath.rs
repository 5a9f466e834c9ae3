//! One packet, start to verdict: endpoint, parse, conntrack, policy, count, and for a packet
//! from one local pod to another, the receiver's verdict too (see `route`).
//!
//! Fail-closed: any error on an interface that carries our program drops the packet, with its
//! reason counted. Allowed packets return `TC_ACT_UNSPEC` (TCX_NEXT) so programs attached
//! after ours still run; with none, the kernel passes the packet. Packets delivered by BPF host
//! routing return `TC_ACT_REDIRECT` instead: later programs on the hook do not see them.

use aya_ebpf::programs::TcContext;
use netpol_common::{endpoint_flag, Direction, EndpointInfo, Reason};

use crate::{
    conntrack::{self, Hit},
    counters::count,
    fragments,
    maps::ENDPOINTS,
    parse::{parse, Fragment, Packet, Parsed},
    policy::decide,
    route,
};

/// `TC_ACT_UNSPEC`: TCX_NEXT, let the next program (or the kernel) decide.
const PASS: i32 = -1;
/// `TC_ACT_SHOT`: drop.
const DROP: i32 = 2;

/// A passed packet: why, and the local pod BPF host routing may deliver it to (see `route`;
/// 0: the node's stack carries it).
struct Pass {
    reason: Reason,
    route: u32,
}

impl Pass {
    fn stack(reason: Reason) -> Self {
        Self { reason, route: 0 }
    }
}

pub fn handle(ctx: &TcContext, dir: Direction) -> i32 {
    let mut pkt = Packet::default();
    let verdict = try_handle(ctx, dir, &mut pkt);
    count(dir, verdict_reason(&verdict), ctx.len());
    match verdict {
        // Only from the TC ingress hook: `bpf_redirect_peer` works there alone. (On the
        // receiver's hook a routed flow's packet is one the stack carried after all.)
        Ok(pass) if pass.route != 0 && dir == Direction::Egress => deliver(ctx, pass.route, &pkt),
        Ok(_) => PASS,
        Err(_) => DROP,
    }
}

fn verdict_reason(verdict: &Result<Pass, Reason>) -> Reason {
    match verdict {
        Ok(pass) => pass.reason,
        Err(reason) => *reason,
    }
}

/// `Ok` passes the packet, `Err(reason)` drops it.
fn try_handle(ctx: &TcContext, dir: Direction, pkt: &mut Packet) -> Result<Pass, Reason> {
    // SAFETY: the context pointer is valid for the program's run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: values are plain data; the agent replaces entries whole.
    let ep = unsafe { ENDPOINTS.get(ifindex) }.ok_or(Reason::NoEndpoint)?;
    if let Parsed::Control = parse(ctx, pkt)? {
        return Ok(Pass::stack(Reason::Control));
    }
    if dir == Direction::Egress && !source_is_pod(ep, pkt) {
        return Err(Reason::Spoofed);
    }
    if pkt.fragment == Fragment::Later {
        // No ports: no conntrack entry to find or create. Passed with its first fragment, or
        // where nothing isolates this direction.
        if fragments::known(ifindex, pkt) {
            return Ok(Pass::stack(Reason::FragmentOfFlow));
        }
        return decide(ep, dir, pkt).map(|allowed| Pass::stack(allowed.reason));
    }
    // Where this endpoint's new flow goes: straight to a local pod, or through the stack.
    // Only the sender's hook can tell (the receiver's sees packets the node may have
    // translated), so a flow opened on the receiver's hook is routed by the kernel.
    let route = || match dir {
        Direction::Egress => route::local_pod(ctx, ifindex, pkt),
        Direction::Ingress => 0,
    };
    let pass = track(ifindex, ep, dir, pkt, route)?;
    if pkt.fragment == Fragment::First {
        fragments::record(ifindex, pkt);
    }
    Ok(pass)
}

/// Conntrack first (related ICMP errors, established flows, replies), then policy for a new
/// flow, which is tracked once allowed, with the route `new_route` gives.
#[inline(always)]
fn track(
    ifindex: u32,
    ep: &EndpointInfo,
    dir: Direction,
    pkt: &Packet,
    new_route: impl FnOnce() -> u32,
) -> Result<Pass, Reason> {
    if pkt.has_related {
        if let Some(route) = conntrack::related(ifindex, dir, &pkt.related) {
            return Ok(Pass {
                reason: Reason::Related,
                route,
            });
        }
    }
    let key = conntrack::key(ifindex, dir, pkt);
    match conntrack::lookup(&key, dir, pkt) {
        Hit::Established { route } => {
            return Ok(Pass {
                reason: Reason::Established,
                route,
            })
        }
        Hit::Reply { route } => {
            return Ok(Pass {
                reason: Reason::Reply,
                route,
            })
        }
        Hit::Miss => {}
    }
    let allowed = decide(ep, dir, pkt)?;
    let route = new_route();
    conntrack::create(&key, dir, pkt, allowed.rule_set, route)?;
    Ok(Pass {
        reason: allowed.reason,
        route,
    })
}

/// BPF host routing of a packet the sender's egress passed: the receiver's ingress judges it
/// here, as its own hook would (its conntrack entry, its policy, its counters), and a passed
/// packet goes straight into the receiver's namespace. Whatever cannot take this path (the
/// receiver is gone, the TTL runs out) goes to the stack, whose routing and the receiver's hook
/// then handle it.
fn deliver(ctx: &TcContext, route: u32, pkt: &Packet) -> i32 {
    if !route::eligible(pkt) {
        return PASS;
    }
    let Some(receiver) = route::receiver(route, pkt) else {
        return PASS;
    };
    // SAFETY: the context pointer is valid for the program's run.
    let sender = unsafe { (*ctx.skb.skb).ifindex };
    // The receiver's entry routes its replies back to the sender.
    let verdict = track(route, receiver, Direction::Ingress, pkt, || sender);
    count(Direction::Ingress, verdict_reason(&verdict), ctx.len());
    match verdict {
        Ok(_) => route::redirect(ctx, route, pkt).unwrap_or(DROP),
        Err(_) => DROP,
    }
}

/// Anti-spoofing: a packet leaving the pod must carry one of the pod's own addresses. (ARP and
/// neighbour discovery were passed before this point, as `Control`.)
fn source_is_pod(ep: &EndpointInfo, pkt: &Packet) -> bool {
    if pkt.ipv4 {
        ep.flags & endpoint_flag::HAS_IPV4 != 0 && pkt.src == ep.ipv4
    } else {
        ep.flags & endpoint_flag::HAS_IPV6 != 0 && pkt.src == ep.ipv6
    }
}
