//! BPF host routing between the pods of one node (what Cilium calls eBPF host routing).
//!
//! A packet leaving a pod for another pod of the same node is judged by the sender's egress
//! policy and, in the same run, by the receiver's ingress policy, then handed straight into the
//! receiver's network namespace with `bpf_redirect_peer`: the node's IP stack (routing,
//! netfilter, neighbour output), the host-side veth's transmit queue and the receiver's own
//! program run are skipped. The node's routing table still decides where the packet goes
//! (`bpf_fib_lookup`); the TTL or hop limit drops by one as a routed hop's would.
//!
//! Only flows the node would not translate take this path: the conntrack entry of a flow
//! records (`CtValue::route`) whether its opening packet was addressed to a local pod's own
//! address. A flow to a ClusterIP goes through the stack, where kube-proxy's DNAT applies, and
//! so do its replies, which need the reverse translation. Fragments, expiring TTLs and
//! everything before a verdict (ARP, neighbour discovery) go through the stack too.
//!
//! The agent turns the path on or off (`--host-routing`) in `NP_CONFIG`. Off takes effect at
//! the next packet; on, for flows opened after it.

use aya_ebpf::{
    bindings::{bpf_fib_lookup as FibParams, BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_SKIP_NEIGH},
    helpers::{bpf_fib_lookup, bpf_redirect_peer},
    programs::TcContext,
};
use netpol_common::{endpoint_flag, EndpointInfo};

use crate::{
    maps::{CONFIG, ENDPOINTS},
    parse::{Fragment, Packet, ETH_HLEN},
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
/// Offset of the IPv4 TTL (followed by the protocol) and header checksum; of the IPv6 hop limit.
const IPV4_TTL: usize = ETH_HLEN + 8;
const IPV4_CHECKSUM: usize = ETH_HLEN + 10;
const IPV6_HOP_LIMIT: usize = ETH_HLEN + 7;

#[inline(always)]
fn enabled() -> bool {
    CONFIG.get(0).is_some_and(|c| c.host_routing != 0)
}

/// Whether this packet may be delivered by BPF host routing at all (its flow's route aside).
#[inline(always)]
pub fn eligible(pkt: &Packet) -> bool {
    enabled() && pkt.fragment == Fragment::None && pkt.ttl > 1
}

/// The host-side ifindex of the local pod the node routes this packet to, or 0 when the node
/// routes it anywhere else (another node, the node itself, a ClusterIP, nowhere).
pub fn local_pod(ctx: &TcContext, ifindex: u32, pkt: &Packet) -> u32 {
    if !eligible(pkt) {
        return 0;
    }
    // SAFETY: all-zero is a valid value of this plain C struct.
    let mut params: FibParams = unsafe { core::mem::zeroed() };
    params.l4_protocol = pkt.proto;
    params.ifindex = ifindex;
    if pkt.ipv4 {
        params.family = AF_INET;
        params.__bindgen_anon_3.ipv4_src = v4(&pkt.src);
        params.__bindgen_anon_4.ipv4_dst = v4(&pkt.dst);
    } else {
        params.family = AF_INET6;
        params.__bindgen_anon_3.ipv6_src = v6(&pkt.src);
        params.__bindgen_anon_4.ipv6_dst = v6(&pkt.dst);
    }
    // SAFETY: `params` is a valid struct of the size passed; the context is the program's skb.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.skb.skb.cast(),
            &mut params,
            core::mem::size_of::<FibParams>() as i32,
            BPF_FIB_LOOKUP_SKIP_NEIGH,
        )
    };
    if rc != i64::from(BPF_FIB_LKUP_RET_SUCCESS) || params.ifindex == ifindex {
        return 0;
    }
    match receiver(params.ifindex, pkt) {
        Some(_) => params.ifindex,
        None => 0,
    }
}

/// The endpoint on `route` if it still is the packet's destination (an interface index can
/// outlive its pod).
#[inline(always)]
pub fn receiver(route: u32, pkt: &Packet) -> Option<&'static EndpointInfo> {
    // SAFETY: values are plain data; the agent replaces entries whole.
    let ep = unsafe { ENDPOINTS.get(route) }?;
    let owned = if pkt.ipv4 {
        ep.flags & endpoint_flag::HAS_IPV4 != 0 && ep.ipv4 == pkt.dst
    } else {
        ep.flags & endpoint_flag::HAS_IPV6 != 0 && ep.ipv6 == pkt.dst
    };
    owned.then_some(ep)
}

/// Takes one off the TTL (fixing the IPv4 checksum) and moves the packet into the namespace of
/// the pod behind `route`. Returns the TC action.
pub fn redirect(ctx: &TcContext, route: u32, pkt: &Packet) -> Result<i32, ()> {
    let ttl = pkt.ttl - 1;
    if pkt.ipv4 {
        // The checksum covers TTL and protocol as one 16-bit word.
        let old = u16::from_ne_bytes([pkt.ttl, pkt.proto]);
        let new = u16::from_ne_bytes([ttl, pkt.proto]);
        ctx.l3_csum_replace(IPV4_CHECKSUM, u64::from(old), u64::from(new), 2)
            .map_err(|_| ())?;
        ctx.store(IPV4_TTL, &ttl, 0).map_err(|_| ())?;
    } else {
        ctx.store(IPV6_HOP_LIMIT, &ttl, 0).map_err(|_| ())?;
    }
    // SAFETY: plain helper; it only records the target, the kernel moves the packet after the
    // program returns.
    Ok(unsafe { bpf_redirect_peer(route, 0) } as i32)
}

fn v4(addr: &[u8; 16]) -> u32 {
    u32::from_ne_bytes([addr[12], addr[13], addr[14], addr[15]])
}

fn v6(addr: &[u8; 16]) -> [u32; 4] {
    let word = |i: usize| u32::from_ne_bytes([addr[i], addr[i + 1], addr[i + 2], addr[i + 3]]);
    [word(0), word(4), word(8), word(12)]
}
