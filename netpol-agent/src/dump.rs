//! `netpol-agent dump`: what the kernel holds, decoded. Reads the pinned maps and the TCX
//! chains of each endpoint's interface; names come from the names file when it is there.

use std::{collections::BTreeMap, fmt::Write as _, path::Path};

use ipnet::IpNet;

use netpol_common::{endpoint_flag, identity, Direction, EndpointInfo};
use serde::Serialize;

use crate::{
    dataplane::{
        attach::{self, AttachedProgram, Hook},
        host, maps, DataplaneError, PinDir,
    },
    names::Names,
    policy::{
        desired::{self, MapContents},
        model::Protocol,
    },
};

#[derive(Debug, Serialize)]
pub struct Dump {
    pub node: String,
    pub pin_dir: String,
    pub endpoints: Vec<EndpointDump>,
    pub ipcache: Vec<IpcacheDump>,
    pub services: Vec<ServiceDump>,
    pub counters: Vec<CounterDump>,
}

/// A ClusterIP port the egress hook recognises before kube-proxy's DNAT.
#[derive(Debug, Serialize)]
pub struct ServiceDump {
    pub address: String,
    pub protocol: String,
    pub port: u16,
    pub identity: u32,
    pub name: String,
}

#[derive(Debug, Serialize)]
pub struct EndpointDump {
    pub pod: Option<String>,
    pub interface: Option<String>,
    pub ifindex: u32,
    pub identity: u32,
    pub addresses: Vec<String>,
    pub attachments: Vec<HookDump>,
    pub ingress: DirectionDump,
    pub egress: DirectionDump,
}

#[derive(Debug, Serialize)]
pub struct HookDump {
    pub hook: &'static str,
    pub pinned: bool,
    /// Programs on the hook in TCX order.
    pub programs: Vec<AttachedProgram>,
}

#[derive(Debug, Serialize)]
pub struct DirectionDump {
    pub isolated: bool,
    pub class: u32,
    pub policies: Vec<String>,
    pub allow: Vec<AllowDump>,
}

#[derive(Debug, Serialize)]
pub struct AllowDump {
    pub peer: String,
    pub peer_id: u32,
    pub protocol: String,
    pub ports: String,
    pub rules: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct IpcacheDump {
    pub prefix: String,
    pub identity: u32,
    pub name: String,
}

#[derive(Debug, Serialize)]
pub struct CounterDump {
    pub direction: &'static str,
    pub reason: &'static str,
    pub drop: bool,
    pub packets: u64,
    pub bytes: u64,
}

pub fn collect(
    pins: &PinDir,
    state_dir: &Path,
    pod_filter: Option<&str>,
) -> Result<Dump, DataplaneError> {
    let names = Names::read(state_dir);
    let contents = maps::read(pins)?;
    let linked = attach::pinned_ifindexes(pins)?;
    let mut endpoints = Vec::new();
    for (&ifindex, info) in &contents.endpoints {
        let pod = names.endpoints.get(&ifindex).cloned();
        if pod_filter.is_some_and(|f| pod.as_deref() != Some(f)) {
            continue;
        }
        let interface = host::ifname(ifindex);
        let attachments = Hook::ALL
            .into_iter()
            .map(|hook| HookDump {
                hook: hook.name(),
                pinned: linked.contains(&ifindex),
                programs: match interface.as_deref().map(|i| attach::attached(i, hook)) {
                    Some(Ok(programs)) => programs,
                    // Without CAP_SYS_ADMIN the chain cannot be named; our pinned link can.
                    Some(Err(_)) if linked.contains(&ifindex) => vec![AttachedProgram {
                        id: 0,
                        tag: "unknown (no CAP_SYS_ADMIN)".into(),
                        name: hook.program().into(),
                        ours: true,
                    }],
                    _ => Vec::new(),
                },
            })
            .collect();
        endpoints.push(EndpointDump {
            pod,
            interface,
            ifindex,
            identity: info.identity,
            addresses: addresses(info),
            attachments,
            ingress: direction(&contents, &names, info, Direction::Ingress),
            egress: direction(&contents, &names, info, Direction::Egress),
        });
    }
    let ipcache = contents
        .ipcache
        .iter()
        .map(|(key, value)| IpcacheDump {
            prefix: IpNet::from(desired::addr_from_bytes(key.addr)).to_string(),
            identity: value.identity,
            name: peer_name(&names, value.identity),
        })
        .collect();
    let services = contents
        .services
        .iter()
        .map(|(key, value)| ServiceDump {
            address: desired::addr_from_bytes(key.addr).to_string(),
            protocol: protocol_name(Some(key.proto)),
            port: u16::from_be_bytes(key.port),
            identity: value.identity,
            name: peer_name(&names, value.identity),
        })
        .collect();
    let counters = maps::counters(pins)?
        .into_iter()
        .map(|((dir, reason), c)| CounterDump {
            direction: dir.name(),
            reason: reason.name(),
            drop: reason.is_drop(),
            packets: c.packets,
            bytes: c.bytes,
        })
        .collect();
    Ok(Dump {
        node: names.node.clone(),
        pin_dir: pins.path().display().to_string(),
        endpoints,
        ipcache,
        services,
        counters,
    })
}

fn protocol_name(proto: Option<u8>) -> String {
    match proto {
        None => "any".to_string(),
        Some(n) => Protocol::from_number(n).map_or_else(|| n.to_string(), |p| p.name().to_string()),
    }
}

fn addresses(info: &EndpointInfo) -> Vec<String> {
    let mut out = Vec::new();
    if info.flags & endpoint_flag::HAS_IPV4 != 0 {
        out.push(desired::addr_from_bytes(info.ipv4).to_string());
    }
    if info.flags & endpoint_flag::HAS_IPV6 != 0 {
        out.push(desired::addr_from_bytes(info.ipv6).to_string());
    }
    out
}

fn peer_name(names: &Names, id: u32) -> String {
    match id {
        identity::ANY => "any".into(),
        identity::HOST => "host".into(),
        identity::WORLD => "world".into(),
        id => names
            .identities
            .get(&id)
            .cloned()
            .unwrap_or_else(|| format!("identity {id}")),
    }
}

fn direction(
    contents: &MapContents,
    names: &Names,
    info: &EndpointInfo,
    dir: Direction,
) -> DirectionDump {
    let (flag, class) = match dir {
        Direction::Ingress => (endpoint_flag::ISOLATED_INGRESS, info.ingress_class),
        Direction::Egress => (endpoint_flag::ISOLATED_EGRESS, info.egress_class),
    };
    // CIDR sets of this class, by the prefixes that point at them.
    let mut cidr_sets: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for ((prefix, key), value) in &contents.cidr {
        if let Some(entry) = desired::cidr_entry_from_key(*prefix, key) {
            if entry.class == class {
                cidr_sets
                    .entry(value.set)
                    .or_default()
                    .push(entry.net.to_string());
            }
        }
    }
    let allow = contents
        .policy
        .iter()
        .map(|((prefix, key), value)| (desired::policy_entry_from_key(*prefix, key), value))
        .filter(|(entry, _)| class != 0 && entry.class == class)
        .map(|(entry, value)| {
            let peer = if entry.peer >= identity::FIRST_CIDR_SET {
                format!(
                    "cidr {}",
                    cidr_sets
                        .get(&entry.peer)
                        .map(|v| v.join(","))
                        .unwrap_or_default()
                )
            } else {
                peer_name(names, entry.peer)
            };
            let protocol = protocol_name(entry.proto);
            let ports = match entry.port {
                None => "any".to_string(),
                Some(p) if p.first() == p.last() => p.first().to_string(),
                Some(p) => format!("{}-{}", p.first(), p.last()),
            };
            AllowDump {
                peer,
                peer_id: entry.peer,
                protocol,
                ports,
                rules: names
                    .rule_sets
                    .get(&value.rule_set)
                    .cloned()
                    .unwrap_or_default(),
            }
        })
        .collect();
    DirectionDump {
        isolated: info.flags & flag != 0,
        class,
        policies: names.classes.get(&class).cloned().unwrap_or_default(),
        allow,
    }
}

pub fn render_table(dump: &Dump) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "node {}  (pins {})", dump.node, dump.pin_dir);
    if dump.endpoints.is_empty() {
        let _ = writeln!(s, "no endpoints");
    }
    for ep in &dump.endpoints {
        let _ = writeln!(
            s,
            "\nPOD {}  interface {} (ifindex {})  identity {}  addresses {}",
            ep.pod.as_deref().unwrap_or("<unknown>"),
            ep.interface.as_deref().unwrap_or("<gone>"),
            ep.ifindex,
            ep.identity,
            ep.addresses.join(",")
        );
        for h in &ep.attachments {
            let progs: Vec<String> = h
                .programs
                .iter()
                .map(|p| {
                    format!(
                        "{}#{}{}",
                        p.name,
                        p.id,
                        if p.ours { "" } else { " (foreign)" }
                    )
                })
                .collect();
            let _ = writeln!(
                s,
                "  {:<11} tcx: {}{}",
                h.hook,
                if progs.is_empty() {
                    "NOTHING ATTACHED".to_string()
                } else {
                    progs.join(" -> ")
                },
                if h.pinned { "  [link pinned]" } else { "" }
            );
        }
        for (name, d) in [("ingress", &ep.ingress), ("egress", &ep.egress)] {
            if !d.isolated {
                let _ = writeln!(s, "  {name}: not isolated (all allowed)");
                continue;
            }
            let _ = writeln!(
                s,
                "  {name}: isolated by {} (class {})",
                d.policies.join(", "),
                d.class
            );
            if d.allow.is_empty() {
                let _ = writeln!(s, "    (nothing allowed)");
                continue;
            }
            let _ = writeln!(s, "    {:<44} {:<6} {:<12} RULES", "PEER", "PROTO", "PORTS");
            for a in &d.allow {
                let _ = writeln!(
                    s,
                    "    {:<44} {:<6} {:<12} {}",
                    a.peer,
                    a.protocol,
                    a.ports,
                    a.rules.join(" ")
                );
            }
        }
    }
    if !dump.services.is_empty() {
        let _ = writeln!(
            s,
            "\nSERVICES (egress to these is judged by their backends)"
        );
        for svc in &dump.services {
            let _ = writeln!(
                s,
                "  {:<40} -> {}",
                format!("{}:{}/{}", svc.address, svc.port, svc.protocol),
                svc.name
            );
        }
    }
    if !dump.counters.is_empty() {
        let _ = writeln!(s, "\nCOUNTERS");
        let _ = writeln!(
            s,
            "  {:<8} {:<20} {:>10} {:>12}",
            "DIR", "REASON", "PACKETS", "BYTES"
        );
        for c in &dump.counters {
            let _ = writeln!(
                s,
                "  {:<8} {:<20} {:>10} {:>12}",
                c.direction, c.reason, c.packets, c.bytes
            );
        }
    }
    s
}

/// One tracked flow, decoded.
#[derive(Debug, Serialize)]
pub struct FlowDump {
    pub pod: Option<String>,
    pub ifindex: u32,
    /// Direction (from the pod's point of view) of the packet that opened the flow.
    pub direction: &'static str,
    pub protocol: String,
    pub source: String,
    pub destination: String,
    pub state: &'static str,
    /// Seconds until the entry expires (negative: expired, waiting for reuse or GC).
    pub expires_in_s: i64,
    /// The rule set that allowed the opening packet (0: not isolated, or from the node).
    pub rule_set: u32,
    /// How the flow's packets travel: `bpf:<pod>` (BPF host routing to that local pod, or its
    /// interface index when unnamed) or `kernel` (the node's IP stack).
    pub route: String,
}

pub use crate::dataplane::maps::monotonic_ns;

pub fn collect_conntrack(
    pins: &PinDir,
    state_dir: &Path,
    pod_filter: Option<&str>,
) -> Result<Vec<FlowDump>, DataplaneError> {
    use netpol_common::ct::tcp_state;
    let names = Names::read(state_dir);
    let now = monotonic_ns() as i64;
    let mut flows: Vec<FlowDump> = maps::conntrack(pins)?
        .into_iter()
        .filter_map(|(key, value)| {
            let pod = names.endpoints.get(&key.ifindex).cloned();
            if pod_filter.is_some_and(|f| pod.as_deref() != Some(f)) {
                return None;
            }
            let addr = |a, port: [u8; 2]| {
                let ip = desired::addr_from_bytes(a);
                let port = u16::from_be_bytes(port);
                if ip.is_ipv6() {
                    format!("[{ip}]:{port}")
                } else {
                    format!("{ip}:{port}")
                }
            };
            let protocol = Protocol::from_number(key.proto).map_or_else(
                || match key.proto {
                    1 => "ICMP".to_string(),
                    58 => "ICMPv6".to_string(),
                    n => n.to_string(),
                },
                |p| p.name().to_string(),
            );
            let opened = key.opened(value.opened_dir());
            Some(FlowDump {
                pod,
                ifindex: key.ifindex,
                direction: opened.dir.name(),
                protocol,
                source: addr(opened.saddr, opened.sport),
                destination: addr(opened.daddr, opened.dport),
                state: match value.state {
                    tcp_state::SYN_SENT => "syn-sent",
                    tcp_state::ESTABLISHED => "established",
                    tcp_state::CLOSING => "closing",
                    _ => "-",
                },
                expires_in_s: (value.expires as i64 - now) / 1_000_000_000,
                rule_set: value.rule_set,
                route: match value.route {
                    0 => "kernel".to_string(),
                    ifindex => match names.endpoints.get(&ifindex) {
                        Some(pod) => format!("bpf:{pod}"),
                        None => format!("bpf:if{ifindex}"),
                    },
                },
            })
        })
        .collect();
    flows.sort_by(|a, b| {
        (&a.pod, &a.source, &a.destination).cmp(&(&b.pod, &b.source, &b.destination))
    });
    Ok(flows)
}

pub fn render_conntrack(flows: &[FlowDump]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<28} {:<8} {:<7} {:<24} {:<24} {:<12} {:>8} {:>8}  ROUTE",
        "POD", "OPENED", "PROTO", "SOURCE", "DESTINATION", "STATE", "TTL(s)", "RULESET"
    );
    for f in flows {
        let _ = writeln!(
            s,
            "{:<28} {:<8} {:<7} {:<24} {:<24} {:<12} {:>8} {:>8}  {}",
            f.pod.as_deref().unwrap_or("<unknown>"),
            f.direction,
            f.protocol,
            f.source,
            f.destination,
            f.state,
            f.expires_in_s,
            f.rule_set,
            f.route
        );
    }
    let _ = writeln!(s, "{} flow(s)", flows.len());
    s
}
