//! 100,000 random and mutated frames against a reference that knows what may pass.

use std::collections::HashSet;

use netpol_tests::packet::{self as p, V4};

use crate::harness::*;

/// A small deterministic generator (xorshift), so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The reference: what may pass at the pod's ingress, read directly from the frame by a
/// parser separate from the program's, with the state a stateful filter legitimately keeps:
/// first fragments it passed (their later fragments may follow) and flows it passed (ICMP
/// errors about them may follow).
/// (source, destination, protocol, source port, destination port).
type Flow = ([u8; 4], [u8; 4], u8, u16, u16);

#[derive(Default)]
struct Reference {
    /// (source, destination, protocol, IP id) of passed first fragments.
    first_fragments: HashSet<([u8; 4], [u8; 4], u8, u16)>,
    flows: HashSet<Flow>,
}

struct V4View {
    src: [u8; 4],
    dst: [u8; 4],
    proto: u8,
    id: u16,
    first_fragment: bool,
    later_fragment: bool,
    /// Source and destination port (or ICMP type/code and the next 2 bytes).
    sport: u16,
    dport: u16,
    l4: usize,
}

fn view_v4(pkt: &[u8], at: usize) -> Option<V4View> {
    let b = pkt.get(at..at + 20)?;
    let ihl = usize::from(b[0] & 0x0f) * 4;
    if b[0] >> 4 != 4 || ihl < 20 {
        return None;
    }
    let frag = u16::from_be_bytes([b[6], b[7]]);
    let l4 = at + ihl;
    let later = frag & 0x1fff != 0;
    let ports = pkt.get(l4..l4 + 4);
    if !later && ports.is_none() {
        return None;
    }
    let ports = ports.unwrap_or(&[0; 4]);
    Some(V4View {
        src: [b[12], b[13], b[14], b[15]],
        dst: [b[16], b[17], b[18], b[19]],
        proto: b[9],
        id: u16::from_be_bytes([b[4], b[5]]),
        first_fragment: !later && frag & 0x2000 != 0,
        later_fragment: later,
        sport: u16::from_be_bytes([ports[0], ports[1]]),
        dport: u16::from_be_bytes([ports[2], ports[3]]),
        l4,
    })
}

impl Reference {
    /// Whether the packet may pass, and whether it opens state (a flow or a first fragment)
    /// the reference should remember once the program passed it.
    fn allows(&self, pkt: &[u8]) -> bool {
        // Passing without policy: ARP and IPv6 neighbour discovery / MLD.
        let ethertype = u16::from_be_bytes([pkt[12], pkt[13]]);
        if ethertype == 0x0806 {
            return true;
        }
        if ethertype == 0x0800 {
            let Some(v) = view_v4(pkt, 14) else {
                return false;
            };
            if v.later_fragment {
                return self
                    .first_fragments
                    .contains(&(v.src, v.dst, v.proto, v.id));
            }
            if v.proto == p::ICMP && matches!(pkt[v.l4], 3 | 11 | 12) {
                // An error about a flow the filter passed: the quote is the pod's reply,
                // so the flow is the quote reversed. (TCP/UDP/SCTP quotes only here: no
                // echo flow is ever allowed in.)
                if let Some(q) = view_v4(pkt, v.l4 + 8) {
                    let flow = (q.dst, q.src, q.proto, q.dport, q.sport);
                    if !q.later_fragment && self.flows.contains(&flow) {
                        return true;
                    }
                }
            }
            return policy_allows_v4(&v);
        }
        if ethertype == 0x86dd && pkt.len() >= 14 + 40 {
            // Walk the extension headers (at most 8, as RFC 8200 chains go) to the transport.
            let (mut next, mut at) = (pkt[20], 14 + 40);
            for _ in 0..8 {
                match next {
                    0 | 43 | 60 | 51 | 44 if pkt.len() >= at + 2 => {
                        let len = match next {
                            44 => 8,
                            51 => (usize::from(pkt[at + 1]) + 2) * 4,
                            _ => (usize::from(pkt[at + 1]) + 1) * 8,
                        };
                        next = pkt[at];
                        at += len;
                    }
                    _ => break,
                }
            }
            // Neighbour discovery and MLD pass whatever their source; anything else only from
            // PEER6 (the only IPv6 peer the policy names).
            let control =
                next == p::ICMPV6 && pkt.get(at).is_some_and(|t| matches!(t, 130..=137 | 143));
            return control || pkt[22..38] == PEER6;
        }
        false
    }

    /// Records what a passed packet (one `allows` accepted, or a reported violation) lets
    /// through later.
    fn passed(&mut self, pkt: &[u8]) {
        if u16::from_be_bytes([pkt[12], pkt[13]]) != 0x0800 {
            return;
        }
        let Some(v) = view_v4(pkt, 14) else {
            return;
        };
        if v.later_fragment {
            return;
        }
        // Whatever let a first fragment through (policy, or an error about a flow) lets the
        // rest of its datagram through.
        if v.first_fragment {
            self.first_fragments.insert((v.src, v.dst, v.proto, v.id));
        }
        if policy_allows_v4(&v) {
            self.flows.insert((v.src, v.dst, v.proto, v.sport, v.dport));
        }
    }
}

/// The only IPv4 flows the policy allows in: from PEER to TCP 80, UDP 53, SCTP 3868, and
/// 192.168.0.0/16 minus 192.168.1.0/24 to TCP 443.
fn policy_allows_v4(v: &V4View) -> bool {
    let from_block = v.src[0] == 192 && v.src[1] == 168 && v.src[2] != 1;
    (v.src == PEER
        && matches!(
            (v.proto, v.dport),
            (p::TCP, 80) | (p::UDP, 53) | (p::SCTP, 3868)
        ))
        || (from_block && v.proto == p::TCP && v.dport == 443)
}

#[test]
fn root_prog_fuzz_nothing_outside_allowed_flows_passes() {
    let mut h = Harness::new(true);
    let mut rng = Rng(0x5eed_1234_abcd_9876);
    let seeds: Vec<Vec<u8>> = vec![
        p::ipv4(PEER, POD, p::TCP, &p::tcp(1000, 80, p::SYN), &V4::default()),
        p::ipv4(PEER, POD, p::UDP, &p::udp(1000, 53), &V4::default()),
        p::ipv4(PEER, POD, p::SCTP, &p::sctp(1000, 3868), &V4::default()),
        p::ipv4(
            [192, 168, 2, 2],
            POD,
            p::TCP,
            &p::tcp(1000, 443, p::SYN),
            &V4::default(),
        ),
        p::ipv4(
            OTHER,
            POD,
            p::TCP,
            &p::tcp(1000, 80, p::SYN),
            &V4::default(),
        ),
        p::ipv4(
            PEER,
            POD,
            p::TCP,
            &p::tcp(1000, 80, p::SYN),
            &V4 {
                options: vec![1; 8],
                ..V4::default()
            },
        ),
        // Fragments: a first one to an allowed port, and later ones whose ids mutate.
        p::ipv4(
            PEER,
            POD,
            p::UDP,
            &p::udp(1000, 53),
            &V4 {
                id: 7,
                frag: 0x2000,
                ..V4::default()
            },
        ),
        p::ipv4(
            PEER,
            POD,
            p::UDP,
            &[0u8; 24],
            &V4 {
                id: 7,
                frag: 3,
                ..V4::default()
            },
        ),
        // An ICMP error quoting the pod's reply to an allowed flow.
        p::ipv4(
            [10, 0, 0, 1],
            POD,
            p::ICMP,
            &p::icmp_error(
                3,
                1,
                &p::ipv4(
                    POD,
                    PEER,
                    p::TCP,
                    &p::tcp(80, 1000, p::SYN | p::ACK),
                    &V4::default(),
                ),
            ),
            &V4::default(),
        ),
    ];
    let (mut passed, mut runs, mut refused) = (0u32, 0u32, 0u32);
    let mut violations = Vec::new();
    let mut reference = Reference::default();
    for i in 0..100_000u32 {
        let pkt: Vec<u8> = if i % 4 == 0 {
            // Random bytes behind an IPv4 or IPv6 ethertype (at least the fixed IP header:
            // test runs refuse shorter frames).
            let v6 = rng.below(2) == 0;
            let len = if v6 { 54 } else { 34 } + rng.below(100) as usize;
            let mut b: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            let et: u16 = if v6 { 0x86dd } else { 0x0800 };
            b[12..14].copy_from_slice(&et.to_be_bytes());
            b
        } else {
            // A valid packet with a few bytes of its IP or transport headers mutated.
            let mut b = seeds[rng.below(seeds.len() as u64) as usize].clone();
            for _ in 0..1 + rng.below(3) {
                let at = 14 + rng.below((b.len() - 14) as u64) as usize;
                b[at] = rng.next() as u8;
            }
            if rng.below(8) == 0 {
                let keep = 34 + rng.below((b.len() - 34) as u64) as usize;
                b.truncate(keep);
            }
            b
        };
        let Ok((verdict, _)) = h.dp.test_run(IN, &pkt, 1) else {
            // The kernel refused the frame before any program ran (e.g. a mutated IHL past
            // the frame's end): nothing to judge.
            refused += 1;
            continue;
        };
        runs += 1;
        if verdict == PASS {
            passed += 1;
            if !reference.allows(&pkt) && violations.len() < 10 {
                violations.push(format!("{pkt:02x?}"));
            }
            reference.passed(&pkt);
        }
    }
    assert!(
        violations.is_empty(),
        "packets outside any allowed flow passed:\n{}",
        violations.join("\n")
    );
    // The fuzz must exercise both verdicts to mean anything.
    assert!(
        passed > 1000 && passed < runs - 1000,
        "{passed} of {runs} passed"
    );
    assert!(
        runs >= 90_000,
        "only {runs} of 100000 frames ran ({refused} refused by the kernel)"
    );
    println!(
        "fuzz: {runs} packets run ({refused} refused by test_run), {passed} passed, all inside allowed flows"
    );
}
