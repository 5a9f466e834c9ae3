//! Header parsing. Reads through `bpf_skb_load_bytes` (`TcContext::load`), so non-linear skbs
//! parse the same as linear ones and every read is bounds-checked by the kernel: a short packet
//! is a `Malformed` drop, never an out-of-bounds read.

use aya_ebpf::programs::TcContext;
use netpol_common::{ipv4_mapped, Addr, Reason};

const ETH_HLEN: usize = 14;
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
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Fragment {
    None,
    /// The first fragment: it carries the L4 header.
    First,
    /// A later fragment: no L4 header.
    Later,
}

/// The fields the datapath decides on. Ports are in network byte order.
pub struct Packet {
    pub src: Addr,
    pub dst: Addr,
    pub proto: u8,
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub tcp_flags: u8,
    pub fragment: Fragment,
}

pub enum Parsed {
    Ip(Packet),
    /// ARP or IPv6 neighbour discovery: passes whatever the policy says.
    Control,
}

pub fn parse(ctx: &TcContext) -> Result<Parsed, Reason> {
    let ethertype = u16::from_be(load::<u16>(ctx, 12)?);
    match ethertype {
        ETH_P_IP => parse_ipv4(ctx),
        ETH_P_IPV6 => parse_ipv6(ctx),
        ETH_P_ARP => Ok(Parsed::Control),
        _ => Err(Reason::UnsupportedL3),
    }
}

#[inline(always)]
fn load<T>(ctx: &TcContext, offset: usize) -> Result<T, Reason> {
    ctx.load::<T>(offset).map_err(|_| Reason::Malformed)
}

fn parse_ipv4(ctx: &TcContext) -> Result<Parsed, Reason> {
    let ver_ihl: u8 = load(ctx, ETH_HLEN)?;
    let ihl = usize::from(ver_ihl & 0x0f) * 4;
    if ver_ihl >> 4 != 4 || ihl < 20 {
        return Err(Reason::Malformed);
    }
    let total_len = usize::from(u16::from_be(load::<u16>(ctx, ETH_HLEN + 2)?));
    if total_len < ihl {
        return Err(Reason::Malformed);
    }
    let frag = u16::from_be(load::<u16>(ctx, ETH_HLEN + 6)?);
    let fragment = match (frag & 0x1fff != 0, frag & 0x2000 != 0) {
        (true, _) => Fragment::Later,
        (false, true) => Fragment::First,
        (false, false) => Fragment::None,
    };
    let proto: u8 = load(ctx, ETH_HLEN + 9)?;
    let src = ipv4_mapped(load::<[u8; 4]>(ctx, ETH_HLEN + 12)?);
    let dst = ipv4_mapped(load::<[u8; 4]>(ctx, ETH_HLEN + 16)?);
    let mut pkt = Packet {
        src,
        dst,
        proto,
        sport: [0; 2],
        dport: [0; 2],
        tcp_flags: 0,
        fragment,
    };
    if fragment != Fragment::Later {
        parse_l4(ctx, ETH_HLEN + ihl, &mut pkt)?;
    }
    Ok(Parsed::Ip(pkt))
}

fn parse_ipv6(ctx: &TcContext) -> Result<Parsed, Reason> {
    let version: u8 = load(ctx, ETH_HLEN)?;
    if version >> 4 != 6 {
        return Err(Reason::Malformed);
    }
    let mut next: u8 = load(ctx, ETH_HLEN + 6)?;
    let src: Addr = load(ctx, ETH_HLEN + 8)?;
    let dst: Addr = load(ctx, ETH_HLEN + 24)?;
    let mut offset = ETH_HLEN + IPV6_HLEN;
    let mut fragment = Fragment::None;
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
                let hdr: [u8; 4] = load(ctx, offset)?;
                next = hdr[0];
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
    let mut pkt = Packet {
        src,
        dst,
        proto: next,
        sport: [0; 2],
        dport: [0; 2],
        tcp_flags: 0,
        fragment,
    };
    if fragment != Fragment::Later {
        if next == IPPROTO_ICMPV6 {
            let icmp: [u8; 2] = load(ctx, offset)?;
            // MLD (130-132, 143), router/neighbour solicitation and advertisement, redirect:
            // the link's own housekeeping, sent from link-local or unspecified addresses.
            if matches!(icmp[0], 130..=132 | 133..=137 | 143) {
                return Ok(Parsed::Control);
            }
        }
        parse_l4(ctx, offset, &mut pkt)?;
    }
    Ok(Parsed::Ip(pkt))
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
            // Echo request/reply: track by identifier, so the reply finds the request's entry.
            let echo = matches!(
                (pkt.proto, hdr[0]),
                (IPPROTO_ICMP, 0 | 8) | (IPPROTO_ICMPV6, 128 | 129)
            );
            if echo {
                pkt.sport = [hdr[4], hdr[5]];
                pkt.dport = [hdr[4], hdr[5]];
            }
        }
        // Other protocols carry no ports: only "all ports" rules can allow them.
        _ => {}
    }
    Ok(())
}
