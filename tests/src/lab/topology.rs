//! The network between the lab's namespaces that CNI does not make: each node's own settings
//! (forwarding, IPv6 readiness) and, in a cluster of two, the link joining the nodes with the
//! routes kindnet would install (each node's pod CIDR via that node's InternalIP). Everything
//! is done inside the lab's node and pod namespaces; the machine's namespace is never touched.

use anyhow::{bail, Context, Result};

use super::netns::{nsenter_command, set_sysctl};
use super::options::NodePlan;

/// The node-side name of the link between nodes, as in a kind node container.
pub const NODE_LINK: &str = "eth0";

/// A node before its pods: loopback up (a locally started agent's health endpoints live
/// there), IPv4 forwarding (ptp turns it on as well, but routing between nodes must not depend
/// on it) and, on a dual-stack lab, IPv6 forwarding and readiness.
pub fn prepare_node(netns: &str, dual_stack: bool) -> Result<()> {
    ip(netns, &["link", "set", "lo", "up"])?;
    set_sysctl(netns, "net.ipv4.ip_forward", "1")?;
    if dual_stack {
        prepare_ipv6(netns)?;
        set_sysctl(netns, "net.ipv6.conf.all.forwarding", "1")?;
    }
    Ok(())
}

/// A pod namespace before CNI ADD.
pub fn prepare_pod(netns: &str, dual_stack: bool) -> Result<()> {
    if dual_stack {
        prepare_ipv6(netns)?;
    }
    Ok(())
}

/// Makes IPv6 addresses usable at once: duplicate address detection would hold every new
/// address tentative for a second or more (ptp waits for it), and nothing else on these
/// point-to-point links can hold the same address. `default` covers the interfaces about to
/// be created or moved in; `bindv6only=0` lets a server's `[::]` socket take IPv4 as well.
fn prepare_ipv6(netns: &str) -> Result<()> {
    for (key, value) in [
        ("net.ipv6.conf.all.accept_dad", "0"),
        ("net.ipv6.conf.default.accept_dad", "0"),
        ("net.ipv6.bindv6only", "0"),
    ] {
        set_sysctl(netns, key, value)?;
    }
    Ok(())
}

/// Joins two nodes with a veth pair (`eth0` in each, created directly in the two namespaces),
/// gives each end its InternalIP(s) and routes each node's pod CIDR(s) via the other's address.
pub fn link_nodes(a: (&str, &NodePlan), b: (&str, &NodePlan)) -> Result<()> {
    let ((a_netns, a_plan), (b_netns, b_plan)) = (a, b);
    ip(
        a_netns,
        &[
            "link", "add", NODE_LINK, "type", "veth", "peer", "name", NODE_LINK, "netns", b_netns,
        ],
    )
    .with_context(|| {
        format!(
            "linking nodes {} and {}",
            a_plan.spec_name, b_plan.spec_name
        )
    })?;
    for (netns, plan) in [(a_netns, a_plan), (b_netns, b_plan)] {
        let Some(address) = plan.address else {
            bail!("node {} has no node address", plan.spec_name);
        };
        ip(
            netns,
            &["addr", "add", &address.to_string(), "dev", NODE_LINK],
        )?;
        if let Some(address) = plan.address_v6 {
            ip(
                netns,
                &["addr", "add", &address.to_string(), "dev", NODE_LINK],
            )?;
        }
        ip(netns, &["link", "set", NODE_LINK, "up"])?;
    }
    for ((netns, _), (_, peer)) in [
        ((a_netns, a_plan), (b_netns, b_plan)),
        ((b_netns, b_plan), (a_netns, a_plan)),
    ] {
        let via = peer.address.expect("checked above").addr().to_string();
        ip(
            netns,
            &[
                "route",
                "add",
                &peer.pod_cidr.to_string(),
                "via",
                &via,
                "dev",
                NODE_LINK,
            ],
        )?;
        if let (Some(cidr), Some(via)) = (peer.pod_cidr_v6, peer.address_v6) {
            ip(
                netns,
                &[
                    "-6",
                    "route",
                    "add",
                    &cidr.to_string(),
                    "via",
                    &via.addr().to_string(),
                    "dev",
                    NODE_LINK,
                ],
            )?;
        }
    }
    Ok(())
}

/// `ip ARGS` inside `netns`.
pub fn ip(netns: &str, args: &[&str]) -> Result<()> {
    let output = nsenter_command(netns, "ip")
        .args(args)
        .output()
        .context("running ip")?;
    if !output.status.success() {
        bail!(
            "ip {} in {netns} failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}
