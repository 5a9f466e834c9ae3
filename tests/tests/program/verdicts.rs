//! Every protocol path and malformed or unusual headers, one packet at a time.

use netpol_agent::dataplane::maps;
use netpol_common::Reason;
use netpol_tests::packet::{self as p, V4};

use crate::harness::*;

#[test]
fn root_prog_policy_verdicts_per_protocol() {
    let mut h = Harness::new(true);
    let v4 = V4::default();
    let cases: Vec<(&str, &'static str, Vec<u8>, i32, Reason)> = vec![
        (
            "tcp from peer to 80",
            IN,
            p::ipv4(PEER, POD, p::TCP, &p::tcp(40000, 80, p::SYN), &v4),
            PASS,
            Reason::AllowedByPolicy,
        ),
        (
            "tcp from peer to 81",
            IN,
            p::ipv4(PEER, POD, p::TCP, &p::tcp(40001, 81, p::SYN), &v4),
            DROP,
            Reason::DeniedByPolicy,
        ),
        (
            "tcp from other to 80",
            IN,
            p::ipv4(OTHER, POD, p::TCP, &p::tcp(40002, 80, p::SYN), &v4),
            DROP,
            Reason::DeniedByPolicy,
        ),
        (
            "udp from peer to 53",
            IN,
            p::ipv4(PEER, POD, p::UDP, &p::udp(40003, 53), &v4),
            PASS,
            Reason::AllowedByPolicy,
        ),
        (
            "tcp from peer to 53",
            IN,
            p::ipv4(PEER, POD, p::TCP, &p::tcp(40004, 53, p::SYN), &v4),
            DROP,
            Reason::DeniedByPolicy,
        ),
        (
            "sctp from peer to 3868",
            IN,
            p::ipv4(PEER, POD, p::SCTP, &p::sctp(40005, 3868), &v4),
            PASS,
            Reason::AllowedByPolicy,
        ),
        (
            "sctp from peer to 3869",
            IN,
            p::ipv4(PEER, POD, p::SCTP, &p::sctp(40006, 3869), &v4),
            DROP,
            Reason::DeniedByPolicy,
        ),
        (
            "icmp echo from peer (port rules only)",
            IN,
            p::ipv4(PEER, POD, p::ICMP, &p::icmp_echo(8, 7), &v4),
            DROP,
            Reason::DeniedByPolicy,
        ),
        (
            "ipBlock 192.168.7.1 to 443",
            IN,
            p::ipv4(
                [192, 168, 7, 1],
                POD,
                p::TCP,
                &p::tcp(40007, 443, p::SYN),
                &v4,
            ),
            PASS,
            Reason::AllowedByPolicy,
        ),
        (
            "ipBlock except 192.168.1.1 to 443",
            IN,
            p::ipv4(
                [192, 168, 1, 1],
                POD,
                p::TCP,
                &p::tcp(40008, 443, p::SYN),
                &v4,
            ),
            DROP,
            Reason::DeniedByPolicy,
        ),
        (
            "ipv6 tcp from peer to 80",
            IN,
            p::ipv6(PEER6, POD6, p::TCP, &[], &p::tcp(40009, 80, p::SYN)),
            PASS,
            Reason::AllowedByPolicy,
        ),
        (
            "ipv6 sctp from peer to 3868",
            IN,
            p::ipv6(PEER6, POD6, p::SCTP, &[], &p::sctp(40010, 3868)),
            PASS,
            Reason::AllowedByPolicy,
        ),
        (
            "egress tcp to peer 8080",
            OUT,
            p::ipv4(POD, PEER, p::TCP, &p::tcp(40011, 8080, p::SYN), &v4),
            PASS,
            Reason::AllowedByPolicy,
        ),
        (
            "egress tcp to other 8080",
            OUT,
            p::ipv4(POD, OTHER, p::TCP, &p::tcp(40012, 8080, p::SYN), &v4),
            DROP,
            Reason::DeniedByPolicy,
        ),
        (
            "egress udp to peer 8080",
            OUT,
            p::ipv4(POD, PEER, p::UDP, &p::udp(40013, 8080), &v4),
            DROP,
            Reason::DeniedByPolicy,
        ),
    ];
    for (what, program, packet, verdict, reason) in cases {
        h.expect(what, program, &packet, verdict, reason);
    }
}

#[test]
fn root_prog_conntrack_replies_and_established() {
    let mut h = Harness::new(true);
    let v4 = V4::default();
    let syn = p::ipv4(POD, PEER, p::TCP, &p::tcp(41000, 8080, p::SYN), &v4);
    let synack = p::ipv4(
        PEER,
        POD,
        p::TCP,
        &p::tcp(8080, 41000, p::SYN | p::ACK),
        &v4,
    );
    let ack = p::ipv4(POD, PEER, p::TCP, &p::tcp(41000, 8080, p::ACK), &v4);
    let fin = p::ipv4(
        PEER,
        POD,
        p::TCP,
        &p::tcp(8080, 41000, p::FIN | p::ACK),
        &v4,
    );
    h.expect(
        "egress SYN allowed",
        OUT,
        &syn,
        PASS,
        Reason::AllowedByPolicy,
    );
    h.expect("SYN-ACK is a reply", IN, &synack, PASS, Reason::Reply);
    h.expect("ACK is established", OUT, &ack, PASS, Reason::Established);
    h.expect(
        "FIN from the peer is a reply",
        IN,
        &fin,
        PASS,
        Reason::Reply,
    );
    // The same ports the other way round are a new flow, and ingress does not allow it.
    let inbound = p::ipv4(PEER, POD, p::TCP, &p::tcp(41001, 8080, p::SYN), &v4);
    h.expect(
        "new inbound on the same port",
        IN,
        &inbound,
        DROP,
        Reason::DeniedByPolicy,
    );
    // ICMP echo: the request allowed? Egress allows only TCP 8080, so no.
    let ping = p::ipv4(POD, PEER, p::ICMP, &p::icmp_echo(8, 9), &v4);
    h.expect(
        "echo request to peer",
        OUT,
        &ping,
        DROP,
        Reason::DeniedByPolicy,
    );
    let flows = maps::conntrack(&h.pins).unwrap();
    assert_eq!(flows.len(), 1, "one tracked flow: {flows:?}");
}

#[test]
fn root_prog_malformed_and_edge_cases() {
    let mut h = Harness::new(true);
    let v4 = V4::default();
    let tcp80 = p::tcp(42000, 80, p::SYN);
    // IPv4 options: IHL 6 puts the ports 4 bytes later; reading at 20 would see the options.
    let opts = V4 {
        options: vec![1, 1, 1, 1],
        ..V4::default()
    };
    h.expect(
        "ipv4 options honoured",
        IN,
        &p::ipv4(PEER, POD, p::TCP, &tcp80, &opts),
        PASS,
        Reason::AllowedByPolicy,
    );
    let bad_ihl = V4 {
        ihl: Some(4),
        ..V4::default()
    };
    h.expect(
        "IHL below 5",
        IN,
        &p::ipv4(PEER, POD, p::TCP, &tcp80, &bad_ihl),
        DROP,
        Reason::Malformed,
    );
    // (BPF_PROG_TEST_RUN itself refuses frames shorter than Ethernet + 20 bytes, so a short
    // header is one whose own length fields are inconsistent.)
    let short = V4 {
        total_len: Some(12),
        ..V4::default()
    };
    h.expect(
        "total length below the header",
        IN,
        &p::ipv4(PEER, POD, p::TCP, &tcp80, &short),
        DROP,
        Reason::Malformed,
    );
    let mut short_l4 = p::ipv4(PEER, POD, p::TCP, &tcp80, &v4);
    short_l4.truncate(14 + 20 + 3);
    h.expect(
        "truncated tcp header",
        IN,
        &short_l4,
        DROP,
        Reason::Malformed,
    );
    let later = V4 {
        id: 4242,
        frag: 100,
        ..V4::default()
    };
    h.expect(
        "non-first fragment",
        IN,
        &p::ipv4(PEER, POD, p::TCP, &[0u8; 16], &later),
        DROP,
        Reason::Fragment,
    );
    // IPv6 extension headers are walked to the transport header.
    let ext = vec![(0u8, vec![0u8; 6]), (60u8, vec![0u8; 14])];
    h.expect(
        "ipv6 hop-by-hop + dest options",
        IN,
        &p::ipv6(PEER6, POD6, p::TCP, &ext, &tcp80),
        PASS,
        Reason::AllowedByPolicy,
    );
    let overlong: Vec<(u8, Vec<u8>)> = (0..9).map(|_| (60u8, vec![0u8; 6])).collect();
    h.expect(
        "overlong extension chain",
        IN,
        &p::ipv6(PEER6, POD6, p::TCP, &overlong, &tcp80),
        DROP,
        Reason::Malformed,
    );
    let mut cut = p::ipv6(PEER6, POD6, p::TCP, &ext, &tcp80);
    cut.truncate(14 + 40 + 4);
    h.expect("ipv6 chain cut short", IN, &cut, DROP, Reason::Malformed);
    h.expect("arp", IN, &p::arp(), PASS, Reason::Control);
    let ns = {
        let mut icmp = vec![135u8, 0, 0, 0];
        icmp.extend([0u8; 20]);
        p::ipv6(
            [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            POD6,
            p::ICMPV6,
            &[],
            &icmp,
        )
    };
    h.expect("neighbour solicitation", IN, &ns, PASS, Reason::Control);
    h.expect(
        "unknown ethertype",
        IN,
        &p::ethertype(0x88b5),
        DROP,
        Reason::UnsupportedL3,
    );
    h.expect(
        "spoofed source leaving the pod",
        OUT,
        &p::ipv4(OTHER, PEER, p::TCP, &p::tcp(1, 8080, p::SYN), &v4),
        DROP,
        Reason::Spoofed,
    );
    h.expect(
        "spoofed ipv6 source",
        OUT,
        &p::ipv6(PEER6, POD6, p::TCP, &[], &p::tcp(1, 8080, p::SYN)),
        DROP,
        Reason::Spoofed,
    );

    let mut bare = Harness::new(false);
    let pkt = p::ipv4(PEER, POD, p::TCP, &tcp80, &v4);
    bare.expect(
        "interface without endpoint",
        IN,
        &pkt,
        DROP,
        Reason::NoEndpoint,
    );
}
