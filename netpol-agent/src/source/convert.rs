//! Kubernetes objects -> the compiler's model, validating every field NetworkPolicy semantics
//! read. An invalid policy still isolates the pods it selects in the directions it declares,
//! but grants nothing (fail closed); each problem names the object and the field.

use std::{collections::BTreeSet, net::IpAddr};

use ipnet::IpNet;
use k8s_openapi::{
    api::{
        core::v1 as core,
        discovery::v1::EndpointSlice,
        networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort},
    },
    apimachinery::pkg::{apis::meta::v1 as meta, util::intstr::IntOrString},
};

use super::SourceError;
use crate::policy::{
    model::{
        Backend, ContainerPort, Labels, Namespace, ObjectRef, Peer, Pod, Policy, PortSpec,
        Protocol, Rule, Service, ServicePort, NAMESPACE_NAME_LABEL,
    },
    selector::{LabelSelector, Operator, Requirement},
};

/// Collects field errors of one object.
struct Check<'a> {
    kind: &'static str,
    object: &'a ObjectRef,
    errors: Vec<SourceError>,
}

impl Check<'_> {
    fn fail(&mut self, field: String, reason: impl Into<String>) {
        self.errors.push(SourceError::Invalid {
            kind: self.kind,
            object: self.object.to_string(),
            field,
            reason: reason.into(),
        });
    }
}

pub fn namespace(ns: &core::Namespace) -> Result<Namespace, SourceError> {
    let name = ns.metadata.name.clone().ok_or(SourceError::Invalid {
        kind: "Namespace",
        object: "<unnamed>".into(),
        field: "metadata.name".into(),
        reason: "missing".into(),
    })?;
    let mut labels: Labels = ns.metadata.labels.clone().unwrap_or_default();
    labels.insert(NAMESPACE_NAME_LABEL.into(), name.clone());
    Ok(Namespace { name, labels })
}

fn object_ref(meta: &meta::ObjectMeta, kind: &'static str) -> Result<ObjectRef, SourceError> {
    let name = meta.name.clone().ok_or(SourceError::Invalid {
        kind,
        object: "<unnamed>".into(),
        field: "metadata.name".into(),
        reason: "missing".into(),
    })?;
    let namespace = meta.namespace.clone().unwrap_or_else(|| "default".into());
    Ok(ObjectRef::new(namespace, name))
}

/// A pod, or `None` when it has terminated (its address may be reused). A pod with no address
/// yet is returned with none (`Snapshot::add_pod` keeps it aside).
/// Field errors in container ports drop that port and are reported.
pub fn pod(pod: &core::Pod) -> Result<(Option<Pod>, Vec<SourceError>), SourceError> {
    let id = object_ref(&pod.metadata, "Pod")?;
    let mut check = Check {
        kind: "Pod",
        object: &id,
        errors: Vec::new(),
    };
    let status = pod.status.clone().unwrap_or_default();
    if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return Ok((None, check.errors));
    }
    let mut ips: Vec<IpAddr> = Vec::new();
    let listed = status.pod_ips.unwrap_or_default().into_iter().map(|p| p.ip);
    for (i, ip) in status.pod_ip.into_iter().chain(listed).enumerate() {
        match ip.parse::<IpAddr>() {
            Ok(ip) if !ips.contains(&ip) => ips.push(ip),
            Ok(_) => {}
            Err(_) => check.fail(
                format!("status.podIPs[{i}]"),
                format!("invalid address {ip:?}"),
            ),
        }
    }
    let spec = pod.spec.clone().unwrap_or_default();
    let mut ports = Vec::new();
    for (ci, container) in spec.containers.iter().enumerate() {
        for (pi, port) in container.ports.iter().flatten().enumerate() {
            let field = format!("spec.containers[{ci}].ports[{pi}]");
            let Some(protocol) = protocol_field(port.protocol.as_deref(), &field, &mut check)
            else {
                continue;
            };
            let Ok(number) = u16::try_from(port.container_port) else {
                check.fail(format!("{field}.containerPort"), "out of range");
                continue;
            };
            ports.push(ContainerPort {
                name: port.name.clone(),
                port: number,
                protocol,
            });
        }
    }
    let errors = check.errors;
    let model = Pod {
        labels: pod.metadata.labels.clone().unwrap_or_default(),
        node_name: spec.node_name,
        ips,
        host_network: spec.host_network.unwrap_or(false),
        ports,
        id,
    };
    Ok((Some(model), errors))
}

/// A Service with its ClusterIPs, or `None` when it has none (headless, ExternalName): then
/// pods reach its backends by their own addresses. Invalid ports are dropped and reported;
/// traffic to them is then judged as traffic to an unknown address.
pub fn service(svc: &core::Service) -> Result<(Option<Service>, Vec<SourceError>), SourceError> {
    let id = object_ref(&svc.metadata, "Service")?;
    let mut check = Check {
        kind: "Service",
        object: &id,
        errors: Vec::new(),
    };
    let spec = svc.spec.clone().unwrap_or_default();
    let mut cluster_ips: Vec<IpAddr> = Vec::new();
    let listed = spec.cluster_ips.unwrap_or_default();
    for (i, ip) in spec.cluster_ip.iter().chain(&listed).enumerate() {
        if ip == "None" || ip.is_empty() {
            continue;
        }
        match ip.parse::<IpAddr>() {
            Ok(ip) if !cluster_ips.contains(&ip) => cluster_ips.push(ip),
            Ok(_) => {}
            Err(_) => check.fail(
                format!("spec.clusterIPs[{i}]"),
                format!("invalid address {ip:?}"),
            ),
        }
    }
    let mut ports = Vec::new();
    for (i, port) in spec.ports.iter().flatten().enumerate() {
        let field = format!("spec.ports[{i}]");
        let Some(protocol) = protocol_field(port.protocol.as_deref(), &field, &mut check) else {
            continue;
        };
        let Some(number) = u16::try_from(port.port).ok().filter(|&p| p != 0) else {
            check.fail(format!("{field}.port"), "out of range");
            continue;
        };
        ports.push(ServicePort {
            service: id.clone(),
            name: port.name.clone().unwrap_or_default(),
            port: number,
            protocol,
        });
    }
    let errors = check.errors;
    if cluster_ips.is_empty() {
        return Ok((None, errors));
    }
    Ok((
        Some(Service {
            id,
            cluster_ips,
            ports,
        }),
        errors,
    ))
}

/// The label naming the Service an EndpointSlice belongs to.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The ready backends an EndpointSlice lists, per (Service, port name, protocol). Endpoints
/// whose `ready` condition is unknown count as ready, as kube-proxy counts them.
pub type SliceBackends = Vec<((ObjectRef, String, Protocol), Backend)>;

pub fn endpoint_slice(
    slice: &EndpointSlice,
) -> Result<(SliceBackends, Vec<SourceError>), SourceError> {
    let id = object_ref(&slice.metadata, "EndpointSlice")?;
    let mut check = Check {
        kind: "EndpointSlice",
        object: &id,
        errors: Vec::new(),
    };
    let labels = slice.metadata.labels.clone().unwrap_or_default();
    let Some(service) = labels.get(SERVICE_NAME_LABEL) else {
        // Not managed for a Service: nothing kube-proxy would route to.
        return Ok((Vec::new(), check.errors));
    };
    let service = ObjectRef::new(id.namespace.clone(), service.clone());
    if slice.address_type == "FQDN" {
        return Ok((Vec::new(), check.errors));
    }
    let mut ports = Vec::new();
    for (i, port) in slice.ports.iter().flatten().enumerate() {
        let field = format!("ports[{i}]");
        let Some(protocol) = protocol_field(port.protocol.as_deref(), &field, &mut check) else {
            continue;
        };
        let Some(number) = port
            .port
            .and_then(|p| u16::try_from(p).ok())
            .filter(|&p| p != 0)
        else {
            check.fail(format!("{field}.port"), "missing or out of range");
            continue;
        };
        ports.push((port.name.clone().unwrap_or_default(), protocol, number));
    }
    let mut out = Vec::new();
    for (i, endpoint) in slice.endpoints.iter().enumerate() {
        let ready = endpoint.conditions.as_ref().and_then(|c| c.ready);
        if ready == Some(false) {
            continue;
        }
        for (j, address) in endpoint.addresses.iter().enumerate() {
            let Ok(ip) = address.parse::<IpAddr>() else {
                check.fail(
                    format!("endpoints[{i}].addresses[{j}]"),
                    format!("invalid address {address:?}"),
                );
                continue;
            };
            for (name, protocol, port) in &ports {
                out.push((
                    (service.clone(), name.clone(), *protocol),
                    Backend { ip, port: *port },
                ));
            }
        }
    }
    Ok((out, check.errors))
}

fn protocol_field(value: Option<&str>, field: &str, check: &mut Check<'_>) -> Option<Protocol> {
    match value {
        None => Some(Protocol::Tcp),
        Some(p) => {
            let parsed = Protocol::parse(p);
            if parsed.is_none() {
                check.fail(
                    format!("{field}.protocol"),
                    format!("unknown protocol {p:?}"),
                );
            }
            parsed
        }
    }
}

pub fn network_policy(np: &NetworkPolicy) -> Result<(Policy, Vec<SourceError>), SourceError> {
    let id = object_ref(&np.metadata, "NetworkPolicy")?;
    let mut check = Check {
        kind: "NetworkPolicy",
        object: &id,
        errors: Vec::new(),
    };
    let spec = np.spec.clone().unwrap_or_default();

    let pod_selector = match selector(spec.pod_selector.as_ref(), "spec.podSelector", &mut check) {
        Some(s) => s,
        // Unknown which pods it means: isolate every pod of its namespace.
        None => LabelSelector::everything(),
    };

    let ingress_rules = spec.ingress.clone().unwrap_or_default();
    let egress_rules = spec.egress.clone().unwrap_or_default();
    let (ingress_isolates, egress_isolates) = match &spec.policy_types {
        Some(types) if !types.is_empty() => {
            let (mut i, mut e) = (false, false);
            for (n, t) in types.iter().enumerate() {
                match t.as_str() {
                    "Ingress" => i = true,
                    "Egress" => e = true,
                    other => {
                        check.fail(
                            format!("spec.policyTypes[{n}]"),
                            format!("unknown type {other:?}"),
                        );
                        (i, e) = (true, true);
                    }
                }
            }
            (i, e)
        }
        // The API server's defaulting: Ingress always, Egress when egress rules exist.
        _ => (true, !egress_rules.is_empty()),
    };

    let ingress = ingress_rules
        .iter()
        .enumerate()
        .map(|(i, r)| {
            rule(
                r.from.as_deref(),
                r.ports.as_deref(),
                &format!("spec.ingress[{i}]"),
                "from",
                &mut check,
            )
        })
        .collect();
    let egress = egress_rules
        .iter()
        .enumerate()
        .map(|(i, r)| {
            rule(
                r.to.as_deref(),
                r.ports.as_deref(),
                &format!("spec.egress[{i}]"),
                "to",
                &mut check,
            )
        })
        .collect();

    let policy = Policy {
        id: id.clone(),
        pod_selector,
        ingress_isolates,
        egress_isolates,
        ingress,
        egress,
    };
    let errors = check.errors;
    let policy = if errors.is_empty() {
        policy
    } else {
        policy.deny_only()
    };
    Ok((policy, errors))
}

fn rule(
    peers: Option<&[NetworkPolicyPeer]>,
    ports: Option<&[NetworkPolicyPort]>,
    field: &str,
    peers_field: &str,
    check: &mut Check<'_>,
) -> Rule {
    let peers = peers
        .unwrap_or_default()
        .iter()
        .enumerate()
        .filter_map(|(i, p)| peer(p, &format!("{field}.{peers_field}[{i}]"), check))
        .collect();
    let ports = ports
        .unwrap_or_default()
        .iter()
        .enumerate()
        .filter_map(|(i, p)| port(p, &format!("{field}.ports[{i}]"), check))
        .collect();
    Rule { peers, ports }
}

fn peer(p: &NetworkPolicyPeer, field: &str, check: &mut Check<'_>) -> Option<Peer> {
    if let Some(block) = &p.ip_block {
        if p.pod_selector.is_some() || p.namespace_selector.is_some() {
            check.fail(
                field.to_string(),
                "ipBlock cannot be combined with selectors",
            );
            return None;
        }
        let cidr = parse_cidr(&block.cidr, &format!("{field}.ipBlock.cidr"), check)?;
        let mut except = Vec::new();
        for (i, e) in block.except.iter().flatten().enumerate() {
            let f = format!("{field}.ipBlock.except[{i}]");
            let net = parse_cidr(e, &f, check)?;
            if !cidr.contains(&net) || net.prefix_len() <= cidr.prefix_len() {
                check.fail(f, format!("{e} is not strictly inside {}", block.cidr));
                return None;
            }
            except.push(net);
        }
        return Some(Peer::IpBlock { cidr, except });
    }
    if p.pod_selector.is_none() && p.namespace_selector.is_none() {
        check.fail(
            field.to_string(),
            "a peer needs podSelector, namespaceSelector or ipBlock",
        );
        return None;
    }
    let pods = match &p.pod_selector {
        Some(s) => Some(selector(Some(s), &format!("{field}.podSelector"), check)?),
        None => None,
    };
    let namespaces = match &p.namespace_selector {
        Some(s) => Some(selector(
            Some(s),
            &format!("{field}.namespaceSelector"),
            check,
        )?),
        None => None,
    };
    Some(Peer::Pods { namespaces, pods })
}

fn parse_cidr(s: &str, field: &str, check: &mut Check<'_>) -> Option<IpNet> {
    match s.parse::<IpNet>() {
        Ok(net) => Some(net),
        Err(_) => {
            check.fail(field.to_string(), format!("invalid CIDR {s:?}"));
            None
        }
    }
}

fn port(p: &NetworkPolicyPort, field: &str, check: &mut Check<'_>) -> Option<PortSpec> {
    let protocol = match p.protocol.as_deref() {
        None => Protocol::Tcp,
        Some(s) => match Protocol::parse(s) {
            Some(p) => p,
            None => {
                check.fail(
                    format!("{field}.protocol"),
                    format!("unknown protocol {s:?}"),
                );
                return None;
            }
        },
    };
    match (&p.port, p.end_port) {
        (None, None) => Some(PortSpec::AllOf { protocol }),
        (None, Some(_)) => {
            check.fail(format!("{field}.endPort"), "endPort needs port");
            None
        }
        (Some(IntOrString::String(name)), end) => {
            if end.is_some() {
                check.fail(
                    format!("{field}.endPort"),
                    "endPort cannot follow a named port",
                );
                return None;
            }
            if name.is_empty() {
                check.fail(format!("{field}.port"), "empty port name");
                return None;
            }
            Some(PortSpec::Named {
                protocol,
                name: name.clone(),
            })
        }
        (Some(IntOrString::Int(n)), end) => {
            let first = port_number(*n, &format!("{field}.port"), check)?;
            let last = match end {
                None => first,
                Some(e) => {
                    let last = port_number(e, &format!("{field}.endPort"), check)?;
                    if last < first {
                        check.fail(
                            format!("{field}.endPort"),
                            format!("{last} is below port {first}"),
                        );
                        return None;
                    }
                    last
                }
            };
            Some(PortSpec::Range {
                protocol,
                first,
                last,
            })
        }
    }
}

fn port_number(n: i32, field: &str, check: &mut Check<'_>) -> Option<u16> {
    match u16::try_from(n) {
        Ok(p) if p > 0 => Some(p),
        _ => {
            check.fail(field.to_string(), format!("{n} is not a port (1-65535)"));
            None
        }
    }
}

/// `None` when the selector is invalid (the error is recorded).
fn selector(
    s: Option<&meta::LabelSelector>,
    field: &str,
    check: &mut Check<'_>,
) -> Option<LabelSelector> {
    let Some(s) = s else {
        return Some(LabelSelector::everything());
    };
    let mut out = LabelSelector {
        match_labels: s.match_labels.clone().unwrap_or_default(),
        match_expressions: Vec::new(),
    };
    let mut ok = true;
    for (i, e) in s.match_expressions.iter().flatten().enumerate() {
        let f = format!("{field}.matchExpressions[{i}]");
        let values: BTreeSet<String> = e.values.iter().flatten().cloned().collect();
        let operator = match e.operator.as_str() {
            "In" => Operator::In,
            "NotIn" => Operator::NotIn,
            "Exists" => Operator::Exists,
            "DoesNotExist" => Operator::DoesNotExist,
            other => {
                check.fail(
                    format!("{f}.operator"),
                    format!("unknown operator {other:?}"),
                );
                ok = false;
                continue;
            }
        };
        let needs_values = matches!(operator, Operator::In | Operator::NotIn);
        if needs_values == values.is_empty() {
            let reason = if needs_values {
                "In and NotIn need values"
            } else {
                "Exists and DoesNotExist take no values"
            };
            check.fail(format!("{f}.values"), reason);
            ok = false;
            continue;
        }
        out.match_expressions.push(Requirement {
            key: e.key.clone(),
            operator,
            values,
        });
    }
    ok.then_some(out)
}
