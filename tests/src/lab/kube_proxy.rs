//! The lab's kube-proxy: the rules kube-proxy's iptables mode writes for ClusterIP Services,
//! rendered as one `iptables-restore` input and loaded into a node's network namespace (never
//! the machine's). `render` is pure; `install` runs iptables-restore inside the node.
//!
//! Shape, as kube-proxy writes it: PREROUTING and OUTPUT jump to KUBE-SERVICES, which matches
//! each ClusterIP:port and jumps to that port's KUBE-SVC-* chain; it picks one KUBE-SEP-* chain
//! per endpoint with `-m statistic --mode random --probability 1/(n-i)`, which DNATs to the
//! pod's ip:targetPort. Pod-to-Service traffic keeps its source address (the backend, and
//! NetworkPolicy, see the client pod); only hairpin traffic (a pod reaching itself through
//! its Service) is masqueraded, as kube-proxy does, or the pod would drop its own address as
//! a martian source. A port without endpoints is rejected in the filter table.

use std::fmt::Write as _;
use std::io::Write as _;
use std::process::Stdio;

use anyhow::{bail, Context, Result};

use super::netns::nsenter_command;
use super::services::{LabService, SERVICE_CIDR};
use super::spec::Protocol;
use super::topology::ip;

/// The rules for `services`, or `None` when there is nothing to install (no Service with a
/// ClusterIP), so a lab without Services never needs iptables.
pub fn render(services: &[LabService]) -> Option<String> {
    if services.iter().all(LabService::is_headless) {
        return None;
    }
    let mut chains = vec![
        "KUBE-SERVICES".to_string(),
        "KUBE-MARK-MASQ".to_string(),
        "KUBE-POSTROUTING".to_string(),
    ];
    let mut rules = vec![
        r#"-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES"#
            .to_string(),
        r#"-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES"#
            .to_string(),
        r#"-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING"#
            .to_string(),
        "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000".to_string(),
        "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN".to_string(),
        "-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0".to_string(),
        r#"-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE"#
            .to_string(),
    ];
    let mut rejects = Vec::new();
    for service in services {
        let Some(cluster_ip) = service.cluster_ip else {
            continue; // headless: DNS hands out the pods' addresses, no proxying
        };
        for (index, port) in service.ports.iter().enumerate() {
            let id = service.port_id(index);
            let proto = protocol_name(port.protocol);
            let matches = format!("-d {cluster_ip}/32 -p {proto}");
            let dport = format!("-m {proto} --dport {}", port.port);
            let backends: Vec<_> = service.backends(index).collect();
            if backends.is_empty() {
                rejects.push(format!(
                    r#"-A KUBE-SERVICES {matches} -m comment --comment "{id} has no endpoints" {dport} -j REJECT --reject-with icmp-port-unreachable"#
                ));
                continue;
            }
            let svc_chain = format!("KUBE-SVC-{}", chain_hash(&[&id, proto]));
            rules.push(format!(
                r#"-A KUBE-SERVICES {matches} -m comment --comment "{id} cluster IP" {dport} -j {svc_chain}"#
            ));
            chains.push(svc_chain.clone());
            let count = backends.len();
            for (i, (endpoint, target)) in backends.into_iter().enumerate() {
                let destination = format!("{}:{target}", endpoint.ip);
                let sep_chain = format!("KUBE-SEP-{}", chain_hash(&[&id, proto, &destination]));
                let statistic = match count - i {
                    1 => String::new(),
                    left => format!(
                        " -m statistic --mode random --probability {:.10}",
                        1.0 / left as f64
                    ),
                };
                rules.push(format!(
                    r#"-A {svc_chain} -m comment --comment "{id} -> {destination}"{statistic} -j {sep_chain}"#
                ));
                rules.push(format!(
                    r#"-A {sep_chain} -s {}/32 -m comment --comment "{id}" -j KUBE-MARK-MASQ"#,
                    endpoint.ip
                ));
                rules.push(format!(
                    r#"-A {sep_chain} -p {proto} -m comment --comment "{id}" -m {proto} -j DNAT --to-destination {destination}"#
                ));
                chains.push(sep_chain);
            }
        }
    }

    let mut text = String::from("*nat\n");
    for builtin in ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"] {
        let _ = writeln!(text, ":{builtin} ACCEPT [0:0]");
    }
    for chain in &chains {
        let _ = writeln!(text, ":{chain} - [0:0]");
    }
    for rule in &rules {
        let _ = writeln!(text, "{rule}");
    }
    text.push_str("COMMIT\n*filter\n");
    for builtin in ["INPUT", "FORWARD", "OUTPUT"] {
        let _ = writeln!(text, ":{builtin} ACCEPT [0:0]");
    }
    text.push_str(":KUBE-SERVICES - [0:0]\n");
    for hook in ["FORWARD", "OUTPUT"] {
        let _ = writeln!(
            text,
            r#"-A {hook} -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES"#
        );
    }
    for rule in &rejects {
        let _ = writeln!(text, "{rule}");
    }
    text.push_str("COMMIT\n");
    Some(text)
}

/// The interface the service CIDR is routed to in a node; see [`install`].
pub const SERVICE_ROUTE_DEVICE: &str = "kube-svc0";
const SERVICE_ROUTE_PEER: &str = "kube-svc1";

/// Loads `rules` into the node's nat and filter tables, replacing whatever they held (the
/// node namespace is the lab's own; nothing else writes iptables rules there).
///
/// A real node has a default route; a lab node has none, so a packet to a ClusterIP without
/// a DNAT (a port without endpoints) would be answered "network unreachable" by routing before
/// the filter table's REJECT sees it, and the node's own connections to a ClusterIP would fail
/// before OUTPUT's DNAT. The service CIDR is therefore routed to a dead end, which is what the
/// default route amounts to for these packets: a veth whose peer stays down (both ends in the
/// node; this kernel has no dummy interfaces), so whatever goes out there is dropped.
pub fn install(node_netns: &str, rules: &str) -> Result<()> {
    let cidr = SERVICE_CIDR.to_string();
    ip(
        node_netns,
        &[
            "link",
            "add",
            SERVICE_ROUTE_DEVICE,
            "type",
            "veth",
            "peer",
            "name",
            SERVICE_ROUTE_PEER,
        ],
    )?;
    ip(node_netns, &["link", "set", SERVICE_ROUTE_DEVICE, "up"])?;
    ip(
        node_netns,
        &["route", "add", &cidr, "dev", SERVICE_ROUTE_DEVICE],
    )?;
    let mut child = nsenter_command(node_netns, "iptables-restore")
        .args(["-w", "5"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting iptables-restore")?;
    let written = child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(rules.as_bytes());
    let output = child
        .wait_with_output()
        .context("waiting for iptables-restore")?;
    written.context("writing the rules to iptables-restore")?;
    if !output.status.success() {
        bail!(
            "iptables-restore in {node_netns} failed ({}): {}\nrules:\n{rules}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

fn protocol_name(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Sctp => "sctp",
    }
}

/// 16 base32 characters naming a chain, stable for the same input. kube-proxy hashes with
/// SHA-256; any stable hash gives the same shape, and chain names must fit in 28 characters.
fn chain_hash(parts: &[&str]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let fnv = |seed: u64| {
        parts
            .iter()
            .flat_map(|p| p.bytes().chain([0]))
            .fold(seed, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
            })
    };
    let bits =
        (u128::from(fnv(0xcbf2_9ce4_8422_2325)) << 64) | u128::from(fnv(0x6c62_272e_07bb_0142));
    (0..16)
        .map(|i| char::from(ALPHABET[((bits >> (123 - 5 * i)) & 31) as usize]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::services::{LabServicePort, ServiceEndpoint, TargetPort};

    fn endpoint(pod: &str, ip: &str, port: Option<u16>) -> ServiceEndpoint {
        ServiceEndpoint {
            pod: pod.into(),
            ip: ip.parse().unwrap(),
            node: "n".into(),
            hostname: None,
            target_ports: vec![port],
        }
    }

    fn service(
        name: &str,
        cluster_ip: Option<&str>,
        endpoints: Vec<ServiceEndpoint>,
    ) -> LabService {
        LabService {
            namespace: "ns".into(),
            name: name.into(),
            cluster_ip: cluster_ip.map(|ip| ip.parse().unwrap()),
            ports: vec![LabServicePort {
                name: "http".into(),
                port: 80,
                protocol: Protocol::Tcp,
                target_port: TargetPort::Name("http".into()),
            }],
            endpoints,
        }
    }

    #[test]
    fn splits_evenly_over_endpoints_and_dnats_to_target_ports() {
        let svc = service(
            "web",
            Some("10.96.0.11"),
            vec![
                endpoint("a", "10.244.1.2", Some(8080)),
                endpoint("b", "10.244.1.3", None),
                endpoint("c", "10.244.2.2", Some(8081)),
                endpoint("d", "10.244.2.3", Some(8080)),
            ],
        );
        let rules = render(&[svc]).expect("a ClusterIP Service has rules");
        let lines: Vec<&str> = rules.lines().collect();
        let jump = lines
            .iter()
            .find(|l| l.starts_with("-A KUBE-SERVICES -d 10.96.0.11/32 -p tcp"))
            .expect("the ClusterIP is matched");
        assert!(jump.contains("--dport 80 -j KUBE-SVC-"), "{jump}");
        let probabilities: Vec<&str> = lines
            .iter()
            .filter(|l| l.starts_with("-A KUBE-SVC-"))
            .map(|l| {
                l.split("--probability ")
                    .nth(1)
                    .map_or("last", |p| &p[..12])
            })
            .collect();
        assert_eq!(
            probabilities,
            ["0.3333333333", "0.5000000000", "last"],
            "three endpoints serve the port (b lacks it): 1/3, 1/2, the rest"
        );
        for destination in ["10.244.1.2:8080", "10.244.2.2:8081", "10.244.2.3:8080"] {
            assert!(
                rules.contains(&format!("-j DNAT --to-destination {destination}\n")),
                "no DNAT to {destination}:\n{rules}"
            );
        }
        assert!(
            !rules.contains("10.244.1.3"),
            "b is no endpoint of the port"
        );
        assert!(
            rules.contains("-A KUBE-SEP-") && rules.contains("-s 10.244.1.2/32"),
            "hairpin traffic is marked for masquerade"
        );
        assert!(
            rules.contains("-A PREROUTING") && rules.contains("-A OUTPUT -m comment"),
            "both pod and node traffic pass KUBE-SERVICES"
        );
    }

    #[test]
    fn headless_services_have_no_rules_and_empty_ones_reject() {
        assert_eq!(render(&[service("db", None, vec![])]), None);
        let rules = render(&[service("empty", Some("10.96.0.12"), vec![])]).unwrap();
        let filter = rules.split("*filter").nth(1).unwrap();
        assert!(
            filter.contains("-d 10.96.0.12/32 -p tcp -m comment --comment \"ns/empty:http has no endpoints\" -m tcp --dport 80 -j REJECT"),
            "{rules}"
        );
        assert!(
            !rules.contains("KUBE-SVC-"),
            "no service chain without endpoints"
        );
    }

    #[test]
    fn chain_names_are_stable_distinct_and_short() {
        let a = chain_hash(&["ns/web:http", "tcp"]);
        assert_eq!(a, chain_hash(&["ns/web:http", "tcp"]));
        assert_ne!(a, chain_hash(&["ns/web:http", "udp"]));
        assert_ne!(
            chain_hash(&["ab", "c"]),
            chain_hash(&["a", "bc"]),
            "parts are separated"
        );
        assert_eq!(a.len(), 16);
        assert!(a
            .bytes()
            .all(|b| b.is_ascii_uppercase() || (b'2'..=b'7').contains(&b)));
        assert!(
            format!("KUBE-SEP-{a}").len() <= 28,
            "iptables chain names are limited"
        );
    }
}
