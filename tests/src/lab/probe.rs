//! Probes: one connection attempt from inside a pod's namespace, classified the way a policy
//! test needs it — connected, refused (the path is open but nothing listens), timed out (the
//! packets were dropped), or something else went wrong.

use std::fmt;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

use super::netns::{in_netns, nsenter_command};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// The source pod as (namespace, name).
    pub from: (String, String),
    pub to_ip: IpAddr,
    pub port: u16,
    pub kind: ProbeKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProbeKind {
    /// `curl http://ip:port/`, run as a real process in the source pod's namespace.
    Http,
    /// A telnet-style TCP connect, closed as soon as it is established.
    TcpConnect,
    /// One datagram out, one reply expected back.
    Udp,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeOutcome {
    Connected,
    /// A RST or an ICMP port unreachable came back: the network let the packet through, but
    /// nothing listens there.
    Refused,
    /// Nothing came back within the probe timeout: the packet (or its reply) was dropped.
    TimedOut,
    /// A probe by name (`NameProbe`) found no address: the name does not exist, or no DNS
    /// answer came back in time (e.g. a policy drops the pod's DNS traffic).
    Unresolved,
    /// Anything else, e.g. no route to the address (ICMP host or net unreachable) or a curl
    /// failure; the message says which.
    Error(String),
}

impl ProbeOutcome {
    pub fn is_open(&self) -> bool {
        *self == ProbeOutcome::Connected
    }
}

impl fmt::Display for ProbeOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProbeOutcome::Connected => f.write_str("connected"),
            ProbeOutcome::Refused => f.write_str("refused"),
            ProbeOutcome::TimedOut => f.write_str("timed out"),
            ProbeOutcome::Unresolved => f.write_str("unresolved"),
            ProbeOutcome::Error(message) => write!(f, "error: {message}"),
        }
    }
}

impl Probe {
    pub fn new(from: (&str, &str), to_ip: IpAddr, port: u16, kind: ProbeKind) -> Probe {
        Probe {
            from: (from.0.to_string(), from.1.to_string()),
            to_ip,
            port,
            kind,
        }
    }

    pub fn http(from: (&str, &str), to_ip: IpAddr, port: u16) -> Probe {
        Probe::new(from, to_ip, port, ProbeKind::Http)
    }

    pub fn tcp(from: (&str, &str), to_ip: IpAddr, port: u16) -> Probe {
        Probe::new(from, to_ip, port, ProbeKind::TcpConnect)
    }

    pub fn udp(from: (&str, &str), to_ip: IpAddr, port: u16) -> Probe {
        Probe::new(from, to_ip, port, ProbeKind::Udp)
    }

    pub fn target(&self) -> SocketAddr {
        SocketAddr::new(self.to_ip, self.port)
    }
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            ProbeKind::Http => "http",
            ProbeKind::TcpConnect => "tcp",
            ProbeKind::Udp => "udp",
        };
        write!(
            f,
            "{kind} {}/{} -> {}",
            self.from.0,
            self.from.1,
            self.target()
        )
    }
}

/// Runs `probe` from inside the network namespace `netns`.
pub fn run_probe(netns: &str, probe: &Probe, timeout: Duration) -> ProbeOutcome {
    let target = probe.target();
    let outcome = match probe.kind {
        ProbeKind::Http => return probe_http(netns, target, timeout),
        ProbeKind::TcpConnect => in_netns(netns, || {
            TcpStream::connect_timeout(&target, timeout).map(drop)
        }),
        ProbeKind::Udp => in_netns(netns, || exchange_datagram(target, timeout)),
    };
    match outcome {
        Ok(result) => classify(result),
        Err(e) => ProbeOutcome::Error(format!("{e:#}")),
    }
}

/// Connects from inside `netns` and hands back the stream, which stays in that namespace.
pub fn connect_tcp(
    netns: &str,
    target: SocketAddr,
    timeout: Duration,
) -> anyhow::Result<TcpStream> {
    let stream = in_netns(netns, || TcpStream::connect_timeout(&target, timeout))?;
    Ok(stream?)
}

pub fn classify(result: io::Result<()>) -> ProbeOutcome {
    match result {
        Ok(()) => ProbeOutcome::Connected,
        Err(e) => match e.kind() {
            ErrorKind::ConnectionRefused => ProbeOutcome::Refused,
            ErrorKind::TimedOut | ErrorKind::WouldBlock => ProbeOutcome::TimedOut,
            _ => ProbeOutcome::Error(e.to_string()),
        },
    }
}

/// The probe's datagram is a well-formed DNS query (A record of a name under cluster.local), so
/// the cluster DNS server answers it like the lab's own UDP servers do; any reply counts.
const UDP_PROBE: &[u8] = &[
    0x6e, 0x70, // id
    0x01, 0x00, // flags: a standard query, recursion desired
    0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // one question
    5, b'p', b'r', b'o', b'b', b'e', 10, b'n', b'e', b't', b'p', b'o', b'l', b'-', b'l', b'a',
    b'b', 7, b'c', b'l', b'u', b's', b't', b'e', b'r', 5, b'l', b'o', b'c', b'a', b'l', 0, 0x00,
    0x01, // type A
    0x00, 0x01, // class IN
];

pub fn exchange_datagram(target: SocketAddr, timeout: Duration) -> io::Result<()> {
    let any: IpAddr = match target {
        SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    let socket = UdpSocket::bind((any, 0))?;
    // Connected, so an ICMP port unreachable is reported to us as ECONNREFUSED.
    socket.connect(target)?;
    socket.set_read_timeout(Some(timeout))?;
    socket.send(UDP_PROBE)?;
    let mut reply = [0u8; 512];
    socket.recv(&mut reply).map(drop)
}

/// An HTTP/1.1 GET of `/` from inside `netns`, the request curl would send; returns the
/// status code and the body (the lab's servers answer with the pod's `<ns>/<name>`).
pub fn http_get(
    netns: &str,
    target: SocketAddr,
    host: &str,
    timeout: Duration,
) -> anyhow::Result<io::Result<(u16, String)>> {
    let mut stream = match connect_tcp(netns, target, timeout) {
        Ok(stream) => stream,
        Err(e) => {
            return match e.downcast::<io::Error>() {
                Ok(io) => Ok(Err(io)),
                Err(e) => Err(e),
            }
        }
    };
    Ok(exchange_http(&mut stream, host, timeout))
}

fn exchange_http(
    stream: &mut TcpStream,
    host: &str,
    timeout: Duration,
) -> io::Result<(u16, String)> {
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let request = format!(
        "GET / HTTP/1.1\r\nHost: {host}\r\nUser-Agent: netpol-lab\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes())?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| {
            io::Error::new(
                ErrorKind::InvalidData,
                format!("not an HTTP response: {head:?}"),
            )
        })?;
    Ok((status, body.to_string()))
}

/// curl's exit code tells the outcome apart: 7 is "could not connect", refused or no route,
/// told apart only by the connect error `-v` prints (in the C locale, so the text is stable);
/// 28 is its own timeout.
fn probe_http(netns: &str, target: SocketAddr, timeout: Duration) -> ProbeOutcome {
    let url = format!("http://{target}/");
    let output = nsenter_command(netns, "curl")
        // -sSv: no progress meter, but the connect error; --noproxy: the request must go to
        // `target` itself even if the environment names a proxy; -g: the brackets of an IPv6
        // URL are an address, not a glob range.
        .env("LC_ALL", "C")
        .args([
            "-sSvg",
            "--noproxy",
            "*",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .arg("-m")
        .arg(format!("{:.3}", timeout.as_secs_f64()))
        .arg(&url)
        .output();
    let output = match output {
        Ok(output) => output,
        Err(e) => return ProbeOutcome::Error(format!("running curl: {e}")),
    };
    let status = String::from_utf8_lossy(&output.stdout).trim().to_string();
    let stderr = String::from_utf8_lossy(&output.stderr);
    let refused = stderr
        .lines()
        .any(|l| l.starts_with("* connect to ") && l.ends_with("Connection refused"));
    // The verbose trace is noise in an error message; curl's own error line is the last one.
    let error = stderr
        .lines()
        .rfind(|l| l.starts_with("curl: "))
        .unwrap_or_default();
    match output.status.code() {
        Some(0) if status == "200" => ProbeOutcome::Connected,
        Some(0) => ProbeOutcome::Error(format!("{url} answered http status {status}")),
        Some(7) if refused => ProbeOutcome::Refused,
        Some(28) => ProbeOutcome::TimedOut,
        _ => ProbeOutcome::Error(format!("curl {url} failed ({}): {error}", output.status)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_socket_errors() {
        let err = |kind| Err(io::Error::from(kind));
        assert_eq!(classify(Ok(())), ProbeOutcome::Connected);
        assert_eq!(
            classify(err(ErrorKind::ConnectionRefused)),
            ProbeOutcome::Refused
        );
        assert_eq!(classify(err(ErrorKind::TimedOut)), ProbeOutcome::TimedOut);
        assert_eq!(
            classify(err(ErrorKind::WouldBlock)),
            ProbeOutcome::TimedOut,
            "a recv timeout"
        );
        assert!(
            matches!(
                classify(err(ErrorKind::HostUnreachable)),
                ProbeOutcome::Error(_)
            ),
            "no route is not 'no listener'"
        );
        assert!(ProbeOutcome::Connected.is_open() && !ProbeOutcome::Refused.is_open());
    }

    #[test]
    fn displays_probes_for_test_messages() {
        let probe = Probe::http(("a", "web"), "10.244.1.2".parse().unwrap(), 80);
        assert_eq!(probe.to_string(), "http a/web -> 10.244.1.2:80");
    }
}
