//! One packet, start to verdict: endpoint, parse, conntrack, policy, count.
//!
//! Fail-closed: any error on an interface that carries our program drops the packet, with its
//! reason counted. Allowed packets return `TC_ACT_UNSPEC` (TCX_NEXT) so programs attached
//! after ours still run; with none, the kernel passes the packet.

use aya_ebpf::programs::TcContext;
use netpol_common::{Direction, Reason};

use crate::{
    conntrack::{self, Hit},
    counters::count,
    maps::ENDPOINTS,
    parse::{parse, Parsed},
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
    let pkt = match parse(ctx)? {
        Parsed::Control => return Ok(Reason::Control),
        Parsed::Ip(pkt) => pkt,
    };
    let key = conntrack::key(ifindex, &pkt);
    match conntrack::lookup(&key, dir, &pkt) {
        Hit::Established => return Ok(Reason::Established),
        Hit::Reply => return Ok(Reason::Reply),
        Hit::Miss => {}
    }
    let allowed = decide(ep, dir, &pkt)?;
    conntrack::create(&key, dir, &pkt, allowed.rule_set)?;
    Ok(allowed.reason)
}
