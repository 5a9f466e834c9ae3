//! Routes to the other nodes' pod CIDRs via their InternalIP, as kindnet keeps them: nodes on
//! one L2 network need nothing else for pod-to-pod traffic across nodes. Routes are installed
//! with `ip route replace` under netpol's own routing protocol number, so the ones that are no
//! longer wanted (a node left, its CIDR changed) are found and removed without touching any
//! other route.

use std::{net::IpAddr, process::Command};

use ipnet::IpNet;
use serde::Deserialize;

use super::NodeNet;

/// The `proto` netpol's routes carry (an unassigned number; see /etc/iproute2/rt_protos).
pub const RTPROT_NETPOL: u8 = 78;

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Route {
    pub dst: IpNet,
    pub via: IpAddr,
}

#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("running ip {args}")]
    Spawn {
        args: String,
        #[source]
        source: std::io::Error,
    },
    #[error("ip {args} failed: {stderr}")]
    Failed { args: String, stderr: String },
    #[error("reading `ip route show` output")]
    Parse(#[source] serde_json::Error),
}

/// The routes this node needs: every other node's pod CIDR via that node's address of the
/// same family.
pub fn plan(me: &str, nodes: &[NodeNet]) -> Vec<Route> {
    let mut routes = Vec::new();
    for node in nodes.iter().filter(|n| n.name != me) {
        for dst in &node.pod_cidrs {
            let via = node
                .addresses
                .iter()
                .find(|a| a.is_ipv4() == matches!(dst, IpNet::V4(_)));
            if let Some(&via) = via {
                routes.push(Route { dst: *dst, via });
            }
        }
    }
    routes.sort();
    routes
}

/// What a sync changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub replaced: usize,
    pub removed: usize,
}

/// What turns `have` into `want`: routes to replace (new, or a node's new address), and
/// routes to delete. A destination still wanted is never deleted: `replace` already moved it
/// to its new gateway, and deleting the old gateway's route would find nothing.
pub fn changes<'a>(want: &'a [Route], have: &'a [Route]) -> (Vec<&'a Route>, Vec<&'a Route>) {
    let replace = want.iter().filter(|r| !have.contains(r)).collect();
    let remove = have
        .iter()
        .filter(|r| !want.iter().any(|w| w.dst == r.dst))
        .collect();
    (replace, remove)
}

/// Makes netpol's routes in the current network namespace exactly `want`.
pub fn sync(want: &[Route]) -> Result<SyncReport, RouteError> {
    let have = installed()?;
    let (replace, remove) = changes(want, &have);
    let proto = RTPROT_NETPOL.to_string();
    for route in &replace {
        let (dst, via) = (route.dst.to_string(), route.via.to_string());
        ip(&["route", "replace", &dst, "via", &via, "proto", &proto])?;
    }
    for route in &remove {
        let (dst, via) = (route.dst.to_string(), route.via.to_string());
        ip(&["route", "del", &dst, "via", &via, "proto", &proto])?;
    }
    Ok(SyncReport {
        replaced: replace.len(),
        removed: remove.len(),
    })
}

#[derive(Deserialize)]
struct IpRoute {
    dst: String,
    gateway: Option<String>,
}

/// netpol's routes in the current network namespace, both families.
pub fn installed() -> Result<Vec<Route>, RouteError> {
    let mut out = Vec::new();
    for family in ["-4", "-6"] {
        let proto = RTPROT_NETPOL.to_string();
        let json = ip(&["-j", family, "route", "show", "proto", &proto])?;
        let routes: Vec<IpRoute> = if json.trim().is_empty() {
            Vec::new()
        } else {
            serde_json::from_str(&json).map_err(RouteError::Parse)?
        };
        for r in routes {
            let (Ok(dst), Some(Ok(via))) = (
                r.dst.parse::<IpNet>(),
                r.gateway.as_deref().map(str::parse::<IpAddr>),
            ) else {
                continue;
            };
            out.push(Route { dst, via });
        }
    }
    Ok(out)
}

fn ip(args: &[&str]) -> Result<String, RouteError> {
    let joined = args.join(" ");
    let output = Command::new("ip")
        .args(args)
        .output()
        .map_err(|source| RouteError::Spawn {
            args: joined.clone(),
            source,
        })?;
    if !output.status.success() {
        return Err(RouteError::Failed {
            args: joined,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, cidrs: &[&str], addrs: &[&str]) -> NodeNet {
        NodeNet {
            name: name.into(),
            pod_cidrs: cidrs.iter().map(|c| c.parse().unwrap()).collect(),
            addresses: addrs.iter().map(|a| a.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn a_moved_node_is_replaced_not_deleted() {
        let r = |dst: &str, via: &str| Route {
            dst: dst.parse().unwrap(),
            via: via.parse().unwrap(),
        };
        let have = [
            r("10.244.1.0/24", "172.18.0.3"),
            r("10.244.2.0/24", "172.18.0.4"),
        ];
        let want = [
            r("10.244.1.0/24", "172.18.0.9"),
            r("10.244.3.0/24", "172.18.0.5"),
        ];
        let (replace, remove) = changes(&want, &have);
        assert_eq!(replace, [&want[0], &want[1]]);
        assert_eq!(
            remove,
            [&have[1]],
            "10.244.1.0/24 is moved by replace, not deleted"
        );
        let (replace, remove) = changes(&want, &want);
        assert!(
            replace.is_empty() && remove.is_empty(),
            "in sync: nothing to do"
        );
    }

    #[test]
    fn plan_routes_other_nodes_cidrs_via_same_family_addresses() {
        let nodes = [
            node("a", &["10.244.0.0/24"], &["172.18.0.2"]),
            node(
                "b",
                &["10.244.1.0/24", "fd00:10:244:1::/64"],
                &["172.18.0.3", "fc00:f853::3"],
            ),
            node(
                "c",
                &["10.244.2.0/24", "fd00:10:244:2::/64"],
                &["172.18.0.4"],
            ),
            node("d", &[], &["172.18.0.5"]),
        ];
        let routes = plan("a", &nodes);
        let shown: Vec<String> = routes
            .iter()
            .map(|r| format!("{} via {}", r.dst, r.via))
            .collect();
        assert_eq!(
            shown,
            [
                "10.244.1.0/24 via 172.18.0.3",
                "10.244.2.0/24 via 172.18.0.4",
                "fd00:10:244:1::/64 via fc00:f853::3",
            ],
            "own CIDR skipped; c has no IPv6 address for its v6 CIDR; d has no CIDR"
        );
    }
}
