//! Header parsing. Headers are read straight from the packet's linear data when they are there
//! (bounds-checked against `data_end`, which the verifier enforces), and through
//! `bpf_skb_load_bytes` when they are not, so non-linear skbs parse the same as linear ones. A
//! short packet is a `Malformed` drop, never an out-of-bounds read.

use aya_ebpf::programs::TcContext;
use netpol_common::{ipv4_mapped, Addr, Reason};

pub const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_ARP: u16 = 0x0806;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const IPPROTO_SCTP: u8 = 132;

const IPV6_HLEN: usize = 40;
/// Most IPv6 extension headers walked before the packet is called malformed.
const MAX_IPV6_EXT: usize = 8;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Where a packet stands in fragmentation.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub enum Fragment {
    #[default]
    None,
    /// The first fragment: it carries the L4 header.
    First,
    /// A later fragment: no L4 header.
    Later,
}

/// The fields the datapath decides on. Ports are in network byte order.
#[derive(Default)]
pub struct Packet {
    pub src: Addr,
    pub dst: Addr,
    /// IPv4 (the addresses are mapped), else IPv6.
    pub ipv4: bool,
    /// IPv4 TTL or IPv6 hop limit.
    pub ttl: u8,
    pub proto: u8,
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub tcp_flags: u8,
    pub fragment: Fragment,
    /// IP identification of a fragmented datagram (IPv4: 16 bits, IPv6: 32 bits).
    pub frag_id: u32,
    /// For an ICMP error whose quote could be read: the flow it is about. (A flag beside a
    /// zeroed struct, not an `Option`: the verifier rejects the uninitialised bytes LLVM may
    /// copy for a `None`.)
    pub related: Inner,
    pub has_related: bool,
}

/// The flow an ICMP error quotes: the start of the packet that caused it, as that packet was
/// sent (so from the point of view of whoever receives the error, source and destination are
/// its own flow's, in the flow's direction).
#[derive(Default)]
pub struct Inner {
    pub src: Addr,
    pub dst: Addr,
    pub proto: u8,
    pub sport: [u8; 2],
    pub dport: [u8; 2],
}

pub enum Parsed {
    /// The packet's fields are in the `Packet` handed to `parse`.
    Ip,
    /// ARP or IPv6 neighbour discovery: passes whatever the policy says.
    Control,
}

/// Fills `pkt` (zeroed by the caller) from the packet. Filling in place rather than returning
/// a `Packet` keeps one copy on the 512-byte BPF stack.
pub fn parse(ctx: &TcContext, pkt: &mut Packet) -> Result<Parsed, Reason> {
    let ethertype = u16::from_be(load::<u16>(ctx, 12)?);
    match ethertype {
        ETH_P_IP => parse_ipv4(ctx, pkt),
        ETH_P_IPV6 => parse_ipv6(ctx, pkt),
        ETH_P_ARP => Ok(Parsed::Control),
        _ => Err(Reason::UnsupportedL3),
    }
}

/// `size_of::<T>()` bytes at `offset`: direct packet access when they are in the linear data
/// (the common case: a pod's headers are linear), else the helper, which also reads fragments.
#[inline(always)]
fn load<T: Copy>(ctx: &TcContext, offset: usize) -> Result<T, Reason> {
    let start = ctx.data();
    if start + offset + core::mem::size_of::<T>() <= ctx.data_end() {
        // SAFETY: the bytes lie before `data_end`, checked just above (and by the verifier).
        return Ok(unsafe { core::ptr::read_unaligned((start + offset) as *const T) });
    }
    ctx.load::<T>(offset).map_err(|_| Reason::Malformed)
}

fn parse_ipv4(ctx: &TcContext, pkt: &mut Packet) -> Result<Parsed, Reason> {
    // The fixed header in one read: each helper call costs more than the bytes it copies.
    let h: [u8; 20] = load(ctx, ETH_HLEN)?;
    let ihl = usize::from(h[0] & 0x0f) * 4;
    if h[0] >> 4 != 4 || ihl < 20 {
        return Err(Reason::Malformed);
    }
    let total_len = usize::from(u16::from_be_bytes([h[2], h[3]]));
    if total_len < ihl {
        return Err(Reason::Malformed);
    }
    let frag = u16::from_be_bytes([h[6], h[7]]);
    let fragment = match (frag & 0x1fff != 0, frag & 0x2000 != 0) {
        (true, _) => Fragment::Later,
        (false, true) => Fragment::First,
        (false, false) => Fragment::None,
    };
    pkt.src = ipv4_mapped([h[12], h[13], h[14], h[15]]);
    pkt.dst = ipv4_mapped([h[16], h[17], h[18], h[19]]);
    pkt.ipv4 = true;
    pkt.ttl = h[8];
    pkt.proto = h[9];
    pkt.fragment = fragment;
    pkt.frag_id = u32::from(u16::from_be_bytes([h[4], h[5]]));
    if fragment != Fragment::Later {
        parse_l4(ctx, ETH_HLEN + ihl, pkt)?;
    }
    Ok(Parsed::Ip)
}

fn parse_ipv6(ctx: &TcContext, pkt: &mut Packet) -> Result<Parsed, Reason> {
    let h: [u8; 8] = load(ctx, ETH_HLEN)?;
    if h[0] >> 4 != 6 {
        return Err(Reason::Malformed);
    }
    let mut next = h[6];
    pkt.ttl = h[7];
    pkt.src = load(ctx, ETH_HLEN + 8)?;
    pkt.dst = load(ctx, ETH_HLEN + 24)?;
    let mut offset = ETH_HLEN + IPV6_HLEN;
    let mut fragment = Fragment::None;
    let mut frag_id = 0;
    let mut done = false;
    for _ in 0..MAX_IPV6_EXT {
        match next {
            // Hop-by-hop, routing, destination options: length in 8-octet units, not counting
            // the first 8.
            0 | 43 | 60 => {
                let hdr: [u8; 2] = load(ctx, offset)?;
                next = hdr[0];
                offset += (usize::from(hdr[1]) + 1) * 8;
            }
            // Fragment header: fixed 8 bytes.
            44 => {
                let hdr: [u8; 8] = load(ctx, offset)?;
                next = hdr[0];
                frag_id = u32::from_be_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]);
                let off_flags = u16::from_be_bytes([hdr[2], hdr[3]]);
                fragment = if off_flags & 0xfff8 != 0 {
                    Fragment::Later
                } else if off_flags & 1 != 0 {
                    Fragment::First
                } else {
                    Fragment::None
                };
                offset += 8;
            }
            // Authentication header: length in 4-octet units, not counting the first 2.
            51 => {
                let hdr: [u8; 2] = load(ctx, offset)?;
                next = hdr[0];
                offset += (usize::from(hdr[1]) + 2) * 4;
            }
            _ => {
                done = true;
                break;
            }
        }
        if fragment == Fragment::Later {
            done = true;
            break;
        }
    }
    if !done {
        return Err(Reason::Malformed);
    }
    pkt.proto = next;
    pkt.fragment = fragment;
    pkt.frag_id = frag_id;
    if fragment != Fragment::Later {
        if next == IPPROTO_ICMPV6 {
            let icmp: [u8; 2] = load(ctx, offset)?;
            // MLD (130-132, 143), router/neighbour solicitation and advertisement, redirect:
            // the link's own housekeeping, sent from link-local or unspecified addresses.
            if matches!(icmp[0], 130..=132 | 133..=137 | 143) {
                return Ok(Parsed::Control);
            }
        }
        parse_l4(ctx, offset, pkt)?;
    }
    Ok(Parsed::Ip)
}

fn parse_l4(ctx: &TcContext, offset: usize, pkt: &mut Packet) -> Result<(), Reason> {
    match pkt.proto {
        IPPROTO_TCP => {
            // Ports, sequence numbers, data offset and flags.
            let hdr: [u8; 14] = load(ctx, offset)?;
            if usize::from(hdr[12] >> 4) * 4 < 20 {
                return Err(Reason::Malformed);
            }
            pkt.sport = [hdr[0], hdr[1]];
            pkt.dport = [hdr[2], hdr[3]];
            pkt.tcp_flags = hdr[13];
        }
        IPPROTO_UDP => {
            let hdr: [u8; 8] = load(ctx, offset)?;
            pkt.sport = [hdr[0], hdr[1]];
            pkt.dport = [hdr[2], hdr[3]];
        }
        IPPROTO_SCTP => {
            let hdr: [u8; 12] = load(ctx, offset)?;
            pkt.sport = [hdr[0], hdr[1]];
            pkt.dport = [hdr[2], hdr[3]];
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            let hdr: [u8; 8] = load(ctx, offset)?;
            if let Some((sport, dport)) = echo_ports(pkt.proto, hdr[0], [hdr[4], hdr[5]]) {
                pkt.sport = sport;
                pkt.dport = dport;
            }
            let error = matches!(
                (pkt.proto, hdr[0]),
                (IPPROTO_ICMP, 3 | 11 | 12) | (IPPROTO_ICMPV6, 1..=4)
            );
            if error {
                // A quote that cannot be read is no error about a flow of ours: the packet is
                // then judged as plain ICMP by policy.
                pkt.has_related =
                    quoted(ctx, offset + 8, pkt.proto == IPPROTO_ICMP, &mut pkt.related).is_some();
            }
        }
        // Other protocols carry no ports: only "all ports" rules can allow them.
        _ => {}
    }
    Ok(())
}

/// The flow quoted by an ICMP error: the inner IP header and the first 8 bytes after it,
/// written straight into `out` (few stack bytes: this runs two calls deep).
/// IPv6 quotes with extension headers, and quoted non-first fragments, are not followed.
fn quoted(ctx: &TcContext, offset: usize, v4: bool, out: &mut Inner) -> Option<()> {
    let l4 = if v4 {
        let hdr: [u8; 10] = ctx.load(offset).ok()?;
        let ihl = usize::from(hdr[0] & 0x0f) * 4;
        let frag = u16::from_be_bytes([hdr[6], hdr[7]]);
        if hdr[0] >> 4 != 4 || ihl < 20 || frag & 0x1fff != 0 {
            return None;
        }
        out.proto = hdr[9];
        out.src = ipv4_mapped(ctx.load(offset + 12).ok()?);
        out.dst = ipv4_mapped(ctx.load(offset + 16).ok()?);
        offset + ihl
    } else {
        let hdr: [u8; 8] = ctx.load(offset).ok()?;
        if hdr[0] >> 4 != 6 {
            return None;
        }
        out.proto = hdr[6];
        out.src = ctx.load(offset + 8).ok()?;
        out.dst = ctx.load(offset + 24).ok()?;
        offset + IPV6_HLEN
    };
    let l4: [u8; 8] = ctx.load(l4).ok()?;
    let (sport, dport) = match out.proto {
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP => ([l4[0], l4[1]], [l4[2], l4[3]]),
        // Only echo flows are tracked; the quote is the request or reply itself.
        IPPROTO_ICMP | IPPROTO_ICMPV6 => echo_ports(out.proto, l4[0], [l4[4], l4[5]])?,
        _ => return None,
    };
    out.sport = sport;
    out.dport = dport;
    Some(())
}

/// The "ports" of an ICMP echo: its identifier as the source port of a request and as the
/// destination port of a reply, so a reply finds its request's conntrack entry (pod side
/// first, the ports swap with the addresses) and a request the other way does not: a peer
/// allowed to ping the pod does not open the pod's pings to that peer. `None`: not an echo.
#[inline(always)]
fn echo_ports(proto: u8, kind: u8, id: [u8; 2]) -> Option<([u8; 2], [u8; 2])> {
    match (proto, kind) {
        (IPPROTO_ICMP, 8) | (IPPROTO_ICMPV6, 128) => Some((id, [0, 0])),
        (IPPROTO_ICMP, 0) | (IPPROTO_ICMPV6, 129) => Some(([0, 0], id)),
        _ => None,
    }
}
