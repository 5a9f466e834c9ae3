//! What the agent reads from the node's network namespace: the interface a pod's address is
//! routed to (the route the CNI plugin installs), and the node's own addresses. Reads procfs
//! and calls libc; no aya. Everything is relative to the namespace the agent runs in.

use std::{
    ffi::{CStr, CString},
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use super::DataplaneError;

/// One route of the main table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub dst: IpAddr,
    pub prefix_len: u8,
    pub interface: String,
}

/// Parses `/proc/net/route`: hex fields hold the address bytes as a little-endian u32.
pub fn parse_ipv4_routes(text: &str) -> Vec<Route> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (iface, dst, mask) = (f.first()?, f.get(1)?, f.get(7)?);
            let dst = u32::from_str_radix(dst, 16).ok()?.to_le_bytes();
            let mask = u32::from_str_radix(mask, 16).ok()?.to_le_bytes();
            Some(Route {
                dst: IpAddr::V4(Ipv4Addr::from(dst)),
                prefix_len: u32::from_be_bytes(mask).count_ones() as u8,
                interface: iface.to_string(),
            })
        })
        .collect()
}

/// Parses `/proc/net/ipv6_route`: destination, prefix length, ..., interface last.
pub fn parse_ipv6_routes(text: &str) -> Vec<Route> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (dst, plen, iface) = (f.first()?, f.get(1)?, f.last()?);
            let dst = u128::from_str_radix(dst, 16).ok()?;
            Some(Route {
                dst: IpAddr::V6(Ipv6Addr::from(dst)),
                prefix_len: u8::from_str_radix(plen, 16).ok()?,
                interface: iface.to_string(),
            })
        })
        .collect()
}

/// The interface of the longest route containing `ip` (loopback excluded).
pub fn longest_route(routes: &[Route], ip: IpAddr) -> Option<&Route> {
    routes
        .iter()
        .filter(|r| r.interface != "lo")
        .filter(|r| ipnet::IpNet::new(r.dst, r.prefix_len).is_ok_and(|net| net.contains(&ip)))
        .max_by_key(|r| r.prefix_len)
}

/// Reads the main routing tables of the current network namespace.
pub fn routes() -> Result<Vec<Route>, DataplaneError> {
    let read = |path: &str| {
        fs::read_to_string(path).map_err(|source| DataplaneError::Host {
            what: format!("reading {path}"),
            source: Box::new(source),
        })
    };
    let mut routes = parse_ipv4_routes(&read("/proc/net/route")?);
    // IPv6 may be disabled: no file is no routes.
    if let Ok(text) = fs::read_to_string("/proc/net/ipv6_route") {
        routes.extend(parse_ipv6_routes(&text));
    }
    Ok(routes)
}

pub fn ifindex(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    // SAFETY: valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (index != 0).then_some(index)
}

pub fn ifname(index: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: the buffer holds IF_NAMESIZE bytes as the call requires.
    let ptr = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if ptr.is_null() {
        return None;
    }
    // SAFETY: on success the buffer holds a NUL-terminated name.
    let name = unsafe { CStr::from_ptr(buf.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

/// The node's own addresses (every interface, loopback excluded).
pub fn addresses() -> Result<Vec<IpAddr>, DataplaneError> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(DataplaneError::Host {
            what: "getifaddrs".into(),
            source: Box::new(std::io::Error::last_os_error()),
        });
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: a node of the list getifaddrs returned.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_addr points to a sockaddr whose family says its real type.
            let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
            let ip = match family {
                libc::AF_INET => {
                    // SAFETY: family AF_INET means sockaddr_in.
                    let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                    Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                        sin.sin_addr.s_addr,
                    ))))
                }
                libc::AF_INET6 => {
                    // SAFETY: family AF_INET6 means sockaddr_in6.
                    let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                    Some(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)))
                }
                _ => None,
            };
            if let Some(ip) = ip.filter(|ip| !ip.is_loopback()) {
                if !out.contains(&ip) {
                    out.push(ip);
                }
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: the list came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_matches_routes() {
        let v4 =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                  veth1\t0201F40A\t00000000\t0005\t0\t0\t0\tFFFFFFFF\t0\t0\t0\n\
                  eth0\t0000F40A\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n";
        let v6 = "fd000000000000000000000000000002 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000400 00000001 00000000 00000001 veth9\n";
        let mut routes = parse_ipv4_routes(v4);
        routes.extend(parse_ipv6_routes(v6));
        assert_eq!(routes[0].dst, "10.244.1.2".parse::<IpAddr>().unwrap());
        assert_eq!(routes[0].prefix_len, 32);
        assert_eq!(routes[1].prefix_len, 16);
        let hit =
            |ip: &str| longest_route(&routes, ip.parse().unwrap()).map(|r| r.interface.as_str());
        assert_eq!(hit("10.244.1.2"), Some("veth1"));
        assert_eq!(hit("10.244.1.3"), Some("eth0"));
        assert_eq!(hit("fd00::2"), Some("veth9"));
        assert_eq!(hit("192.0.2.1"), None);
    }
}
