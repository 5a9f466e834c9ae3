//! Probes by name, the way a user in a pod runs them: `curl frontend-svc`, `telnet backend-svc
//! 5678`. The name is resolved inside the pod as the pod's libc would (`ip netns exec` with the
//! pod's /etc/netns resolv.conf and hosts, `getent ahostsv4`), then the connection is made from
//! the pod's namespace to the address found. A name that does not resolve in time is
//! [`ProbeOutcome::Unresolved`], told apart from a connection that fails.

use std::fmt;
use std::io::Read;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use super::netns::in_netns;
use super::probe::{classify, exchange_datagram, http_get, ProbeKind, ProbeOutcome};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameProbe {
    /// The source pod as (namespace, name).
    pub from: (String, String),
    /// A DNS name as the pod would type it (`frontend-svc`, `db-sts-0.db-svc.app1-ns.svc.cluster.local`);
    /// an IP address literal skips resolution.
    pub name: String,
    pub port: u16,
    pub kind: ProbeKind,
}

impl NameProbe {
    pub fn new(from: (&str, &str), name: &str, port: u16, kind: ProbeKind) -> NameProbe {
        NameProbe {
            from: (from.0.to_string(), from.1.to_string()),
            name: name.to_string(),
            port,
            kind,
        }
    }

    pub fn http(from: (&str, &str), name: &str, port: u16) -> NameProbe {
        NameProbe::new(from, name, port, ProbeKind::Http)
    }

    pub fn tcp(from: (&str, &str), name: &str, port: u16) -> NameProbe {
        NameProbe::new(from, name, port, ProbeKind::TcpConnect)
    }

    pub fn udp(from: (&str, &str), name: &str, port: u16) -> NameProbe {
        NameProbe::new(from, name, port, ProbeKind::Udp)
    }

    /// Reads the command a user would type in the pod:
    /// - `curl NAME`, `curl NAME:PORT`, `curl http://NAME[:PORT]/path` (also `wget`): HTTP,
    ///   port 80 by default; flags may come first, the URL is the last word;
    /// - `telnet NAME PORT`: a TCP connect;
    /// - `nc [-z] [-w N] NAME PORT` (also `ncat`, `netcat`): a TCP connect, with `-u` UDP.
    pub fn parse(from: (&str, &str), command: &str) -> Result<NameProbe> {
        let words: Vec<&str> = command.split_whitespace().collect();
        let Some((&program, args)) = words.split_first() else {
            bail!("an empty probe command");
        };
        let probe = match program {
            "curl" | "wget" => {
                let Some(url) = args.iter().rev().find(|a| !a.starts_with('-')) else {
                    bail!("{command:?}: no URL");
                };
                let (name, port) = parse_url(url).with_context(|| format!("{command:?}"))?;
                NameProbe::http(from, &name, port)
            }
            "telnet" => match args {
                [name, port] => NameProbe::tcp(from, name, parse_port(port)?),
                _ => bail!("{command:?}: expected `telnet NAME PORT`"),
            },
            "nc" | "ncat" | "netcat" => {
                let mut udp = false;
                let mut operands = Vec::new();
                let mut words = args.iter();
                while let Some(word) = words.next() {
                    match word.strip_prefix('-') {
                        Some("w" | "W" | "i" | "q") => {
                            words.next(); // the option's value
                        }
                        Some(flags) => udp |= flags.contains('u'),
                        None => operands.push(*word),
                    }
                }
                let [name, port] = operands[..] else {
                    bail!("{command:?}: expected `nc [-z] [-u] NAME PORT`");
                };
                let kind = if udp {
                    ProbeKind::Udp
                } else {
                    ProbeKind::TcpConnect
                };
                NameProbe::new(from, name, parse_port(port)?, kind)
            }
            other => {
                bail!("{command:?}: {other} is not a probe the lab knows (curl, wget, telnet, nc)")
            }
        };
        check_name(&probe.name).with_context(|| format!("{command:?}"))?;
        Ok(probe)
    }
}

impl fmt::Display for NameProbe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            ProbeKind::Http => "curl",
            ProbeKind::TcpConnect => "telnet",
            ProbeKind::Udp => "udp",
        };
        write!(
            f,
            "{kind} {}/{} -> {}:{}",
            self.from.0, self.from.1, self.name, self.port
        )
    }
}

/// `http://name:port/path`, `name:port`, `name` -> (name, port); HTTPS is not something the
/// lab's servers speak.
fn parse_url(url: &str) -> Result<(String, u16)> {
    ensure!(
        !url.starts_with("https://"),
        "the lab's servers speak plain HTTP"
    );
    let rest = url.strip_prefix("http://").unwrap_or(url);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if let Some(bracketed) = authority.strip_prefix('[') {
        // An IPv6 literal: [addr] or [addr]:port.
        let (address, after) = bracketed
            .split_once(']')
            .context("an unclosed [ in the URL")?;
        let port = match after.strip_prefix(':') {
            Some(port) => parse_port(port)?,
            None => 80,
        };
        return Ok((address.to_string(), port));
    }
    match authority.rsplit_once(':') {
        Some((name, port)) => Ok((name.to_string(), parse_port(port)?)),
        None => Ok((authority.to_string(), 80)),
    }
}

fn parse_port(text: &str) -> Result<u16> {
    text.parse::<u16>()
        .ok()
        .filter(|&p| p != 0)
        .with_context(|| format!("{text:?} is not a port number"))
}

/// Names reach `getent` as an argument, so only what a DNS name (or address) can hold passes.
fn check_name(name: &str) -> Result<()> {
    ensure!(
        !name.is_empty()
            && !name.starts_with('-')
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-.:_".contains(&b)),
        "{name:?} is not a host name"
    );
    Ok(())
}

/// Resolves `name` inside the pod namespace `netns` the way a process in the pod would, and
/// returns its first IPv4 address, or `None` when it does not resolve within `timeout`.
pub fn resolve(netns: &str, name: &str, timeout: Duration) -> Result<Option<IpAddr>> {
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(Some(ip));
    }
    check_name(name)?;
    // `ip netns exec` (not nsenter) because it bind-mounts /etc/netns/<netns>/* over /etc.
    let mut child = Command::new("ip")
        .args(["netns", "exec", netns, "getent", "ahostsv4", name])
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("running ip netns exec getent")?;
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().context("waiting for getent")? {
            break status;
        }
        if Instant::now() > deadline {
            // `ip netns exec` execs getent, so this pid is getent's own.
            let _ = child.kill();
            let _ = child.wait();
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let mut stdout = String::new();
    child
        .stdout
        .take()
        .expect("stdout is piped")
        .read_to_string(&mut stdout)
        .context("reading getent's output")?;
    match status.code() {
        Some(0) => parse_getent(&stdout)
            .map(Some)
            .with_context(|| format!("getent ahostsv4 {name} printed {stdout:?}")),
        // 2: the name is not found.
        Some(2) => Ok(None),
        _ => bail!("getent ahostsv4 {name} in {netns} failed ({status})"),
    }
}

/// The address of getent's first line: `10.96.0.11      STREAM frontend-svc...`.
fn parse_getent(stdout: &str) -> Result<IpAddr> {
    stdout
        .split_whitespace()
        .next()
        .context("no address")?
        .parse()
        .context("not an address")
}

/// Resolves the probe's name in `netns`, then probes the address from there.
pub fn run_name_probe(
    netns: &str,
    probe: &NameProbe,
    resolve_timeout: Duration,
    timeout: Duration,
) -> ProbeOutcome {
    let ip = match resolve(netns, &probe.name, resolve_timeout) {
        Ok(Some(ip)) => ip,
        Ok(None) => return ProbeOutcome::Unresolved,
        Err(e) => return ProbeOutcome::Error(format!("resolving {}: {e:#}", probe.name)),
    };
    let target = SocketAddr::new(ip, probe.port);
    let result = match probe.kind {
        ProbeKind::Http => match http_get(netns, target, &probe.name, timeout) {
            Ok(Ok((200, _))) => return ProbeOutcome::Connected,
            Ok(Ok((status, _))) => {
                return ProbeOutcome::Error(format!("{target} answered http status {status}"))
            }
            Ok(Err(e)) => Ok(Err(e)),
            Err(e) => Err(e),
        },
        ProbeKind::TcpConnect => in_netns(netns, || {
            TcpStream::connect_timeout(&target, timeout).map(drop)
        }),
        ProbeKind::Udp => in_netns(netns, || exchange_datagram(target, timeout)),
    };
    match result {
        Ok(result) => classify(result),
        Err(e) => ProbeOutcome::Error(format!("{e:#}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FROM: (&str, &str) = ("app1-ns", "frontend");

    #[test]
    fn parses_the_demos_commands() {
        assert_eq!(
            NameProbe::parse(FROM, "curl frontend-svc").unwrap(),
            NameProbe::http(FROM, "frontend-svc", 80)
        );
        assert_eq!(
            NameProbe::parse(FROM, "telnet backend-svc 5678").unwrap(),
            NameProbe::tcp(FROM, "backend-svc", 5678)
        );
        assert_eq!(
            NameProbe::parse(
                FROM,
                "telnet db-sts-0.db-svc.app1-ns.svc.cluster.local 3306"
            )
            .unwrap(),
            NameProbe::tcp(FROM, "db-sts-0.db-svc.app1-ns.svc.cluster.local", 3306)
        );
    }

    #[test]
    fn parses_urls_flags_and_netcat() {
        for (command, expected) in [
            (
                "curl -s -m 2 http://backend-svc:5678/health",
                NameProbe::http(FROM, "backend-svc", 5678),
            ),
            (
                "curl backend-svc:5678",
                NameProbe::http(FROM, "backend-svc", 5678),
            ),
            ("wget -qO- http://web/", NameProbe::http(FROM, "web", 80)),
            (
                "curl http://[fd00::2]:8080/",
                NameProbe::http(FROM, "fd00::2", 8080),
            ),
            (
                "nc -z -w 2 db-svc 3306",
                NameProbe::tcp(FROM, "db-svc", 3306),
            ),
            (
                "nc -zu kube-dns.kube-system 53",
                NameProbe::udp(FROM, "kube-dns.kube-system", 53),
            ),
        ] {
            assert_eq!(
                NameProbe::parse(FROM, command).unwrap(),
                expected,
                "{command}"
            );
        }
        for bad in [
            "",
            "ping web",
            "telnet web",
            "curl https://web/",
            "telnet web 0",
            "telnet $(reboot) 80",
        ] {
            assert!(
                NameProbe::parse(FROM, bad).is_err(),
                "{bad:?} must be refused"
            );
        }
    }

    #[test]
    fn reads_getents_first_address_and_displays_probes() {
        let out = "10.96.0.11      STREAM frontend-svc.app1-ns.svc.cluster.local\n10.96.0.11      DGRAM  \n";
        assert_eq!(
            parse_getent(out).unwrap(),
            "10.96.0.11".parse::<IpAddr>().unwrap()
        );
        assert!(parse_getent("").is_err());
        assert_eq!(
            NameProbe::tcp(FROM, "backend-svc", 5678).to_string(),
            "telnet app1-ns/frontend -> backend-svc:5678"
        );
    }
}
