//! What depends on earlier packets: conntrack, related ICMP errors, fragments, Service
//! ports before DNAT, and garbage collection.

use netpol_agent::dataplane::maps;
use netpol_common::Reason;
use netpol_tests::packet::{self as p, V4};

use crate::harness::*;

const ROUTER: [u8; 4] = [10, 0, 0, 1];

#[test]
fn root_prog_icmp_errors_about_tracked_flows_are_related() {
    let mut h = Harness::new(true);
    let v4 = V4::default();
    // A flow the pod opened (egress TCP 8080 to the peer) and one it accepted (UDP 53).
    let syn = p::ipv4(POD, PEER, p::TCP, &p::tcp(43000, 8080, p::SYN), &v4);
    h.expect("egress SYN", OUT, &syn, PASS, Reason::AllowedByPolicy);
    let query = p::ipv4(PEER, POD, p::UDP, &p::udp(43001, 53), &v4);
    h.expect("inbound DNS", IN, &query, PASS, Reason::AllowedByPolicy);

    let cases: Vec<(&str, &'static str, Vec<u8>, i32, Reason)> = vec![
        (
            "host unreachable about the pod's SYN",
            IN,
            p::ipv4(ROUTER, POD, p::ICMP, &p::icmp_error(3, 1, &syn), &v4),
            PASS,
            Reason::Related,
        ),
        (
            "fragmentation needed about the pod's SYN",
            IN,
            p::ipv4(PEER, POD, p::ICMP, &p::icmp_error(3, 4, &syn), &v4),
            PASS,
            Reason::Related,
        ),
        (
            "time exceeded about the pod's SYN",
            IN,
            p::ipv4(ROUTER, POD, p::ICMP, &p::icmp_error(11, 0, &syn), &v4),
            PASS,
            Reason::Related,
        ),
        (
            "port unreachable from the pod about an accepted datagram",
            OUT,
            p::ipv4(POD, PEER, p::ICMP, &p::icmp_error(3, 3, &query), &v4),
            PASS,
            Reason::Related,
        ),
        (
            "unreachable about a flow never tracked",
            IN,
            p::ipv4(
                ROUTER,
                POD,
                p::ICMP,
                &p::icmp_error(
                    3,
                    1,
                    &p::ipv4(POD, OTHER, p::TCP, &p::tcp(43002, 9999, p::SYN), &v4),
                ),
                &v4,
            ),
            DROP,
            Reason::DeniedByPolicy,
        ),
        (
            "an error with a cut quote is plain ICMP",
            IN,
            p::ipv4(
                ROUTER,
                POD,
                p::ICMP,
                &p::icmp_error(3, 1, &syn[..14 + 12]),
                &v4,
            ),
            DROP,
            Reason::DeniedByPolicy,
        ),
    ];
    for (what, program, packet, verdict, reason) in cases {
        h.expect(what, program, &packet, verdict, reason);
    }

    // IPv6: packet too big about the pod's own v6 flow, and one about nothing tracked.
    let syn6 = p::ipv6(POD6, PEER6, p::TCP, &[], &p::tcp(43003, 8080, p::SYN));
    h.expect("egress v6 SYN", OUT, &syn6, PASS, Reason::AllowedByPolicy);
    let ptb = p::ipv6(PEER6, POD6, p::ICMPV6, &[], &p::icmp_error(2, 0, &syn6));
    h.expect("packet too big (v6)", IN, &ptb, PASS, Reason::Related);
    let stray6 = p::ipv6(POD6, PEER6, p::TCP, &[], &p::tcp(43004, 8080, p::SYN));
    let unrelated = p::ipv6(PEER6, POD6, p::ICMPV6, &[], &p::icmp_error(1, 4, &stray6));
    h.expect(
        "unreachable (v6) about nothing tracked",
        IN,
        &unrelated,
        DROP,
        Reason::DeniedByPolicy,
    );
}

#[test]
fn root_prog_fragments_pass_only_with_their_first() {
    let mut h = Harness::new(true);
    let first = |id: u16| V4 {
        id,
        frag: 0x2000, // more fragments, offset 0
        ..V4::default()
    };
    let later = |id: u16| V4 {
        id,
        frag: 185, // offset 1480 bytes, last fragment
        ..V4::default()
    };
    let dns = p::udp(44000, 53);
    let other_port = p::udp(44001, 54);
    let cases: Vec<(&str, Vec<u8>, i32, Reason)> = vec![
        (
            "first fragment to an allowed port",
            p::ipv4(PEER, POD, p::UDP, &dns, &first(77)),
            PASS,
            Reason::AllowedByPolicy,
        ),
        (
            "its later fragment",
            p::ipv4(PEER, POD, p::UDP, &[0u8; 64], &later(77)),
            PASS,
            Reason::FragmentOfFlow,
        ),
        (
            "a later fragment of another datagram",
            p::ipv4(PEER, POD, p::UDP, &[0u8; 64], &later(78)),
            DROP,
            Reason::Fragment,
        ),
        (
            "a later fragment with the id but from another source",
            p::ipv4(OTHER, POD, p::UDP, &[0u8; 64], &later(77)),
            DROP,
            Reason::Fragment,
        ),
        (
            "first fragment to a denied port",
            p::ipv4(PEER, POD, p::UDP, &other_port, &first(79)),
            DROP,
            Reason::DeniedByPolicy,
        ),
        (
            "the denied datagram's later fragment",
            p::ipv4(PEER, POD, p::UDP, &[0u8; 64], &later(79)),
            DROP,
            Reason::Fragment,
        ),
    ];
    for (what, packet, verdict, reason) in cases {
        h.expect(what, IN, &packet, verdict, reason);
    }
    // A reply datagram in fragments passes on its first fragment's conntrack hit.
    let reply_first = p::ipv4(POD, PEER, p::UDP, &p::udp(53, 44000), &first(80));
    h.expect(
        "fragmented reply, first",
        OUT,
        &reply_first,
        PASS,
        Reason::Reply,
    );
    let reply_later = p::ipv4(POD, PEER, p::UDP, &[0u8; 64], &later(80));
    h.expect(
        "fragmented reply, later",
        OUT,
        &reply_later,
        PASS,
        Reason::FragmentOfFlow,
    );

    // IPv6: the identification is 32 bits, in the fragment header.
    let first6 = p::ipv6(
        PEER6,
        POD6,
        p::UDP,
        &[p::ipv6_fragment(0, true, 0x0102_0304)],
        &p::udp(44002, 53),
    );
    h.expect(
        "v6 first fragment",
        IN,
        &first6,
        PASS,
        Reason::AllowedByPolicy,
    );
    let later6 = |id| {
        p::ipv6(
            PEER6,
            POD6,
            p::UDP,
            &[p::ipv6_fragment(185, false, id)],
            &[0u8; 64],
        )
    };
    h.expect(
        "v6 later fragment",
        IN,
        &later6(0x0102_0304),
        PASS,
        Reason::FragmentOfFlow,
    );
    h.expect(
        "v6 later fragment of another datagram",
        IN,
        &later6(0x0102_0305),
        DROP,
        Reason::Fragment,
    );
}

/// `good-svc` (10.96.0.50:80) is backed by the peer on 8080, which egress allows;
/// `bad-svc` (10.96.0.51:80) by the other pod, which it does not.
const SERVICES: &str = r#"
{apiVersion: v1, kind: Service, metadata: {name: good-svc, namespace: t}, spec: {clusterIP: 10.96.0.50, ports: [{port: 80}]}}
---
{apiVersion: discovery.k8s.io/v1, kind: EndpointSlice, metadata: {name: good-svc-1, namespace: t, labels: {kubernetes.io/service-name: good-svc}}, addressType: IPv4, ports: [{port: 8080}], endpoints: [{addresses: [10.0.0.3]}]}
---
{apiVersion: v1, kind: Service, metadata: {name: bad-svc, namespace: t}, spec: {clusterIP: 10.96.0.51, ports: [{port: 80}]}}
---
{apiVersion: discovery.k8s.io/v1, kind: EndpointSlice, metadata: {name: bad-svc-1, namespace: t, labels: {kubernetes.io/service-name: bad-svc}}, addressType: IPv4, ports: [{port: 8080}], endpoints: [{addresses: [10.0.0.4]}]}
"#;

#[test]
fn root_prog_egress_to_a_cluster_ip_before_dnat() {
    let mut h = Harness::with(true, SERVICES);
    let v4 = V4::default();
    let good = [10, 96, 0, 50];
    let bad = [10, 96, 0, 51];
    let syn = p::ipv4(POD, good, p::TCP, &p::tcp(45000, 80, p::SYN), &v4);
    h.expect("to good-svc:80", OUT, &syn, PASS, Reason::AllowedByPolicy);
    // The reply comes back un-DNATed, from the ClusterIP: conntrack knows it.
    let synack = p::ipv4(good, POD, p::TCP, &p::tcp(80, 45000, p::SYN | p::ACK), &v4);
    h.expect("reply from good-svc", IN, &synack, PASS, Reason::Reply);
    let cases: Vec<(&str, Vec<u8>, Reason)> = vec![
        (
            "to bad-svc:80 (backend not allowed)",
            p::ipv4(POD, bad, p::TCP, &p::tcp(45001, 80, p::SYN), &v4),
            Reason::DeniedByPolicy,
        ),
        (
            "to good-svc's address on a port it does not serve",
            p::ipv4(POD, good, p::TCP, &p::tcp(45002, 8080, p::SYN), &v4),
            Reason::DeniedByPolicy,
        ),
        (
            "to good-svc:80 over UDP",
            p::ipv4(POD, good, p::UDP, &p::udp(45003, 80), &v4),
            Reason::DeniedByPolicy,
        ),
    ];
    for (what, packet, reason) in cases {
        h.expect(what, OUT, &packet, DROP, reason);
    }
}

#[test]
fn root_prog_gc_removes_only_expired_entries() {
    let mut h = Harness::new(true);
    let v4 = V4::default();
    let syn = p::ipv4(POD, PEER, p::TCP, &p::tcp(46000, 8080, p::SYN), &v4);
    let synack = p::ipv4(
        PEER,
        POD,
        p::TCP,
        &p::tcp(8080, 46000, p::SYN | p::ACK),
        &v4,
    );
    h.expect("SYN", OUT, &syn, PASS, Reason::AllowedByPolicy);
    h.expect("SYN-ACK", IN, &synack, PASS, Reason::Reply);
    let dns = p::ipv4(PEER, POD, p::UDP, &p::udp(46001, 53), &v4);
    h.expect("UDP", IN, &dns, PASS, Reason::AllowedByPolicy);
    let frag = V4 {
        id: 9,
        frag: 0x2000,
        ..V4::default()
    };
    let first = p::ipv4(PEER, POD, p::UDP, &p::udp(46002, 53), &frag);
    h.expect("first fragment", IN, &first, PASS, Reason::AllowedByPolicy);
    assert_eq!(maps::conntrack(&h.pins).unwrap().len(), 3);

    let now = maps::monotonic_ns();
    let nothing = netpol_agent::conntrack::gc_at(&h.pins, now).unwrap();
    assert_eq!(
        nothing.flows + nothing.fragments,
        0,
        "nothing has expired yet"
    );
    // Two minutes on: the UDP flows (60 s) and the fragment (30 s) are dead, the established
    // TCP flow (6 h) is not.
    let later = netpol_agent::conntrack::gc_at(&h.pins, now + 120_000_000_000).unwrap();
    assert_eq!((later.flows, later.fragments), (2, 1));
    let left = maps::conntrack(&h.pins).unwrap();
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0].0.proto, p::TCP);
}

/// An upgrade that changed a map's layout: the loader must not adopt the old pin (the program
/// would read its bytes as something else and the agent could not read it back); the pin is
/// replaced by an empty map of this build's layout, and pins with the right layout are kept.
#[test]
fn root_prog_a_pinned_map_with_another_layout_is_replaced() {
    use netpol_agent::dataplane::{self, Dataplane, PinDir};
    use netpol_common::map_name;

    let node = format!("layout-{}", std::process::id());
    let pins = PinDir::for_node(std::path::Path::new(dataplane::BPFFS), &node);
    let map_id = |name: &str| -> u64 {
        let out = std::process::Command::new("bpftool")
            .args(["-j", "map", "show", "pinned"])
            .arg(pins.map(name))
            .output()
            .expect("bpftool (cargo xtask setup installs it)");
        assert!(out.status.success(), "bpftool map show {name}: {out:?}");
        let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        info["id"].as_u64().unwrap()
    };
    drop(Dataplane::load(&pins).expect("first load (needs root)"));
    let endpoints = map_id(map_name::ENDPOINTS);
    // Stand in for an older build's conntrack table: same name, 32-byte values.
    std::fs::remove_file(pins.map(map_name::CONNTRACK)).unwrap();
    let created = std::process::Command::new("bpftool")
        .args(["map", "create"])
        .arg(pins.map(map_name::CONNTRACK))
        .args([
            "type", "lru_hash", "key", "44", "value", "32", "entries", "64",
        ])
        .args(["name", map_name::CONNTRACK])
        .status()
        .unwrap();
    assert!(created.success(), "bpftool map create");
    let old = map_id(map_name::CONNTRACK);

    let loaded = Dataplane::load(&pins);
    let conntrack = maps::conntrack(&pins);
    let replaced = map_id(map_name::CONNTRACK);
    let kept = map_id(map_name::ENDPOINTS);
    dataplane::reset(&pins).expect("reset");
    loaded.expect("the load replaces the old table");
    assert_ne!(replaced, old, "the old-layout table was adopted");
    assert_eq!(
        conntrack.expect("the new table reads back with this build's layout"),
        vec![]
    );
    assert_eq!(kept, endpoints, "a pin with the right layout must be kept");
}

#[test]
fn root_prog_an_echo_request_is_no_reply_to_one_the_other_way() {
    // `other` may send the pod anything; the pod may send `other` only TCP.
    let mut h = Harness::with(true, crate::agreement::EVERY_SHAPE);
    let v4 = V4::default();
    let ping_in = p::ipv4(OTHER, POD, p::ICMP, &p::icmp_echo(8, 7), &v4);
    let pong_out = p::ipv4(POD, OTHER, p::ICMP, &p::icmp_echo(0, 7), &v4);
    let ping_out = p::ipv4(POD, OTHER, p::ICMP, &p::icmp_echo(8, 7), &v4);
    let pong_in = p::ipv4(OTHER, POD, p::ICMP, &p::icmp_echo(0, 7), &v4);
    h.expect(
        "echo request in",
        IN,
        &ping_in,
        PASS,
        Reason::AllowedByPolicy,
    );
    h.expect("its reply", OUT, &pong_out, PASS, Reason::Reply);
    h.expect(
        "a request out with the same identifier",
        OUT,
        &ping_out,
        DROP,
        Reason::DeniedByPolicy,
    );
    h.expect(
        "a reply in that answers nothing",
        IN,
        &pong_in,
        PASS,
        Reason::AllowedByPolicy,
    );
}
