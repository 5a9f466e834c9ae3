//! The benchmark's rules, written twice: as NetworkPolicies (with the decoy pods they select)
//! for netpol-agent, and as kube-router-style ipsets and iptables chains for the node.

use std::net::Ipv4Addr;

use serde_json::{json, Value};

use super::{BENCH_PORTS, NS, RULES};

/// A peer of one rule: an ipBlock of one address, or a pod selected by one label.
#[derive(Debug, Clone)]
pub enum Peer {
    Block(Ipv4Addr),
    Pod {
        label: (String, String),
        ip: Ipv4Addr,
    },
}

#[derive(Debug, Clone)]
pub struct Rule {
    pub peer: Peer,
    pub ports: Vec<u16>,
}

/// `RULES - 1` decoys that never match the benchmark's traffic (other addresses, other ports),
/// half ipBlocks and half pods on another node, then `allowed` on the benchmark ports.
pub fn rules(direction: &str, first_octet: u8, first_port: u16, allowed: Peer) -> Vec<Rule> {
    let mut rules: Vec<Rule> = (0..RULES - 1)
        .map(|i| {
            let n = u16::try_from(i).expect("fewer than 65536 rules");
            let [hi, lo] = n.to_be_bytes();
            let peer = if i % 2 == 0 {
                Peer::Block(Ipv4Addr::new(10, first_octet, hi, lo))
            } else {
                Peer::Pod {
                    label: ("decoy".into(), format!("{direction}-{i}")),
                    ip: Ipv4Addr::new(10, first_octet + 1, hi, lo),
                }
            };
            Rule {
                peer,
                ports: vec![first_port + n],
            }
        })
        .collect();
    rules.push(Rule {
        peer: allowed,
        ports: BENCH_PORTS.to_vec(),
    });
    rules
}

/// The policies and the decoy pods (on node `elsewhere`) as manifests for the agent.
pub fn manifests(ingress: &[Rule], egress: &[Rule]) -> String {
    let decoys = ingress.iter().chain(egress).filter_map(|r| match &r.peer {
        Peer::Pod { label, ip } if label.0 == "decoy" => Some(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("decoy-{}", label.1), "namespace": NS,
                         "labels": {&label.0: &label.1}},
            "spec": {"nodeName": "elsewhere", "containers": [{"name": "c"}]},
            "status": {"phase": "Running", "podIP": ip.to_string(),
                       "podIPs": [{"ip": ip.to_string()}]},
        })),
        _ => None,
    });
    let peer = |p: &Peer| match p {
        Peer::Block(ip) => json!({"ipBlock": {"cidr": format!("{ip}/32")}}),
        Peer::Pod { label, .. } => json!({"podSelector": {"matchLabels": {&label.0: &label.1}}}),
    };
    let ports = |r: &Rule| -> Vec<Value> {
        r.ports
            .iter()
            .map(|p| json!({"protocol": "TCP", "port": p}))
            .collect()
    };
    let server_ingress = json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "server-ingress", "namespace": NS},
        "spec": {
            "podSelector": {"matchLabels": {"role": "server"}},
            "policyTypes": ["Ingress"],
            "ingress": ingress.iter().map(|r| json!({"from": [peer(&r.peer)], "ports": ports(r)}))
                .collect::<Vec<_>>(),
        },
    });
    let client_egress = json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "client-egress", "namespace": NS},
        "spec": {
            "podSelector": {"matchLabels": {"role": "client"}},
            "policyTypes": ["Egress"],
            "egress": egress.iter().map(|r| json!({"to": [peer(&r.peer)], "ports": ports(r)}))
                .collect::<Vec<_>>(),
        },
    });
    decoys
        .chain([server_ingress, client_egress])
        .map(|doc| format!("---\n{}", serde_yaml::to_string(&doc).expect("yaml")))
        .collect()
}

/// The same rules, kube-router style: `ipset restore` input (a hash:net set per ipBlock peer,
/// a hash:ip set of pod addresses per pod peer), the `iptables-restore` input, and the
/// `ipset restore` input that destroys the sets again.
pub struct Netfilter {
    pub ipsets: String,
    pub rules: String,
    pub destroy: String,
}

pub fn netfilter(
    client: Ipv4Addr,
    server: Ipv4Addr,
    ingress: &[Rule],
    egress: &[Rule],
) -> Netfilter {
    let mut ipsets = String::new();
    let mut destroy = String::new();
    // The rules of one pod and direction, in order, then DROP. A match RETURNs rather than
    // ACCEPTs (kube-router marks and returns), so a packet between two policed pods passes the
    // source's egress chain, then the destination's ingress chain.
    let mut chain = |name: &str, prefix: &str, rules: &[Rule], side: &str| -> String {
        let mut body = String::new();
        for (i, rule) in rules.iter().enumerate() {
            let set = format!("{prefix}-{i:04}");
            let (kind, member) = match &rule.peer {
                Peer::Block(ip) => ("hash:net", format!("{ip}/32")),
                Peer::Pod { ip, .. } => ("hash:ip", ip.to_string()),
            };
            ipsets.push_str(&format!(
                "create {set} {kind} family inet\nadd {set} {member}\n"
            ));
            destroy.push_str(&format!("destroy {set}\n"));
            for port in &rule.ports {
                body.push_str(&format!(
                    "-A {name} -m set --match-set {set} {side} -p tcp -m tcp --dport {port} -j RETURN\n"
                ));
            }
        }
        body.push_str(&format!("-A {name} -j DROP\n"));
        body
    };
    let (egress_chain, ingress_chain) = ("NP-POD-EGRESS-client", "NP-POD-INGRESS-server");
    let egress_rules = chain(egress_chain, "np-eg", egress, "dst");
    let ingress_rules = chain(ingress_chain, "np-in", ingress, "src");
    let rules = format!(
        "*filter\n:FORWARD ACCEPT [0:0]\n:{egress_chain} - [0:0]\n:{ingress_chain} - [0:0]\n\
         -A FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n\
         -A FORWARD -s {client}/32 -j {egress_chain}\n\
         -A FORWARD -d {server}/32 -j {ingress_chain}\n\
         {egress_rules}{ingress_rules}COMMIT\n"
    );
    Netfilter {
        ipsets,
        rules,
        destroy,
    }
}
