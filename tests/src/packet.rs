//! Crafted packets for `BPF_PROG_TEST_RUN`: Ethernet frames with IPv4/IPv6 and TCP, UDP, SCTP
//! or ICMP, with knobs for the malformed cases (IP options, fragments, extension headers).
//! Checksums are left zero: the classifiers never read them.

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const SCTP: u8 = 132;
pub const ICMP: u8 = 1;
pub const ICMPV6: u8 = 58;

pub const SYN: u8 = 0x02;
pub const ACK: u8 = 0x10;
pub const FIN: u8 = 0x01;

fn ethernet(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
    f.extend(ethertype.to_be_bytes());
    f.extend(payload);
    f
}

pub fn tcp(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut h = vec![0u8; 20];
    h[0..2].copy_from_slice(&sport.to_be_bytes());
    h[2..4].copy_from_slice(&dport.to_be_bytes());
    h[12] = 5 << 4;
    h[13] = flags;
    h
}

pub fn udp(sport: u16, dport: u16) -> Vec<u8> {
    let mut h = vec![0u8; 8];
    h[0..2].copy_from_slice(&sport.to_be_bytes());
    h[2..4].copy_from_slice(&dport.to_be_bytes());
    h[4..6].copy_from_slice(&8u16.to_be_bytes());
    h
}

pub fn sctp(sport: u16, dport: u16) -> Vec<u8> {
    let mut h = vec![0u8; 12];
    h[0..2].copy_from_slice(&sport.to_be_bytes());
    h[2..4].copy_from_slice(&dport.to_be_bytes());
    h
}

/// ICMP (or ICMPv6) echo: `kind` 8/0 (v4) or 128/129 (v6).
pub fn icmp_echo(kind: u8, id: u16) -> Vec<u8> {
    let mut h = vec![0u8; 8];
    h[0] = kind;
    h[4..6].copy_from_slice(&id.to_be_bytes());
    h
}

/// IPv4 knobs.
#[derive(Clone, Default)]
pub struct V4 {
    /// Raw option bytes (a multiple of 4) after the 20-byte header; IHL follows.
    pub options: Vec<u8>,
    /// The identification field (fragments of one datagram share it).
    pub id: u16,
    /// The flags/fragment-offset field.
    pub frag: u16,
    /// Overrides the IHL nibble (for malformed headers).
    pub ihl: Option<u8>,
    /// Overrides the total-length field (for malformed headers).
    pub total_len: Option<u16>,
}

pub fn ipv4(src: [u8; 4], dst: [u8; 4], proto: u8, l4: &[u8], v4: &V4) -> Vec<u8> {
    let hlen = 20 + v4.options.len();
    let mut h = vec![0u8; 20];
    h[0] = 0x40 | v4.ihl.unwrap_or((hlen / 4) as u8);
    let total = v4.total_len.unwrap_or((hlen + l4.len()) as u16);
    h[2..4].copy_from_slice(&total.to_be_bytes());
    h[4..6].copy_from_slice(&v4.id.to_be_bytes());
    h[6..8].copy_from_slice(&v4.frag.to_be_bytes());
    h[8] = 64;
    h[9] = proto;
    h[12..16].copy_from_slice(&src);
    h[16..20].copy_from_slice(&dst);
    h.extend(&v4.options);
    h.extend(l4);
    ethernet(0x0800, &h)
}

/// IPv6 with extension headers `(type, body)`: each body is padded to the 8-byte rule and gets
/// its next-header and length bytes filled in.
pub fn ipv6(src: [u8; 16], dst: [u8; 16], proto: u8, ext: &[(u8, Vec<u8>)], l4: &[u8]) -> Vec<u8> {
    let mut chain = Vec::new();
    for (i, (_, body)) in ext.iter().enumerate() {
        let next = ext.get(i + 1).map_or(proto, |(t, _)| *t);
        let mut e = vec![next, 0];
        e.extend(body);
        while e.len() % 8 != 0 {
            e.push(0);
        }
        e[1] = (e.len() / 8 - 1) as u8;
        chain.extend(e);
    }
    let first = ext.first().map_or(proto, |(t, _)| *t);
    let mut h = vec![0u8; 40];
    h[0] = 0x60;
    h[4..6].copy_from_slice(&((chain.len() + l4.len()) as u16).to_be_bytes());
    h[6] = first;
    h[7] = 64;
    h[8..24].copy_from_slice(&src);
    h[24..40].copy_from_slice(&dst);
    h.extend(chain);
    h.extend(l4);
    ethernet(0x86dd, &h)
}

pub fn arp() -> Vec<u8> {
    ethernet(0x0806, &[0u8; 28])
}

pub fn ethertype(ethertype: u16) -> Vec<u8> {
    ethernet(ethertype, &[0u8; 46])
}

/// An ICMP (or ICMPv6) error of `kind`/`code` quoting `quoted`, an IP packet without its
/// Ethernet header (as `ipv4`/`ipv6` build it, minus the first 14 bytes).
pub fn icmp_error(kind: u8, code: u8, quoted: &[u8]) -> Vec<u8> {
    let mut h = vec![kind, code, 0, 0, 0, 0, 0, 0];
    h.extend(&quoted[14..]);
    h
}

/// An IPv6 fragment header body for `ipv6`'s extension list: offset in 8-byte units, the
/// more-fragments flag, the identification.
pub fn ipv6_fragment(offset: u16, more: bool, id: u32) -> (u8, Vec<u8>) {
    let off_flags = (offset << 3) | u16::from(more);
    let mut body = off_flags.to_be_bytes().to_vec();
    body.extend(id.to_be_bytes());
    (44, body)
}
