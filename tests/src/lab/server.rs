//! The servers behind every declared container port. Sockets are created inside the pod's
//! namespace (see `netns::in_netns`) and served from ordinary threads. Every blocking call has
//! a short timeout so a stop flag ends all threads promptly when the lab is dropped.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{
    IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket,
};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::poll::{PollFd, PollFlags};

use super::netns::in_netns;
use super::spec::{PodPort, Protocol};

/// How often blocked threads look at the stop flag.
const STOP_CHECK: Duration = Duration::from_millis(100);
/// How long a new connection may stay silent before it is treated as a telnet-style client.
const FIRST_BYTES_WAIT: Duration = Duration::from_millis(300);
/// Upper bound for reading an HTTP request head.
const HTTP_HEAD_WAIT: Duration = Duration::from_secs(2);
const HTTP_HEAD_MAX: usize = 16 * 1024;
const HTTP_METHODS: [&str; 7] = [
    "GET ", "HEAD ", "POST ", "PUT ", "DELETE ", "OPTIONS ", "PATCH ",
];

/// All servers of a lab; dropping it stops and joins every thread.
#[derive(Default)]
pub struct Servers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

enum Bound {
    Tcp(TcpListener),
    Udp(UdpSocket),
}

impl Servers {
    /// Binds every port inside `netns` and serves them, answering with `identity`
    /// (`<ns>/<pod>`) so a client can tell which pod replied. A dual-stack pod binds `[::]`,
    /// which (with the namespace's `bindv6only=0`) also accepts IPv4; others bind 0.0.0.0.
    pub fn serve_pod(
        &mut self,
        netns: &str,
        identity: &str,
        ports: &[PodPort],
        dual_stack: bool,
    ) -> Result<()> {
        if let Some(sctp) = ports.iter().find(|p| p.protocol == Protocol::Sctp) {
            bail!(
                "{identity}: port {} is SCTP, which the lab cannot serve",
                sctp.port
            );
        }
        let any: IpAddr = if dual_stack {
            Ipv6Addr::UNSPECIFIED.into()
        } else {
            Ipv4Addr::UNSPECIFIED.into()
        };
        let sockets = in_netns(netns, || {
            ports
                .iter()
                .map(|port| bind(any, port))
                .collect::<Result<Vec<_>>>()
        })??;
        let reply = format!("{identity}\n");
        for socket in sockets {
            let stop = Arc::clone(&self.stop);
            let reply = reply.clone();
            let thread = match socket {
                Bound::Tcp(listener) => {
                    std::thread::spawn(move || accept_loop(listener, &stop, &reply))
                }
                Bound::Udp(socket) => {
                    std::thread::spawn(move || answer_datagrams(socket, &stop, &reply))
                }
            };
            self.threads.push(thread);
        }
        Ok(())
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            // A panicked server thread has already printed its panic; teardown goes on.
            let _ = thread.join();
        }
    }
}

fn bind(any: IpAddr, port: &PodPort) -> Result<Bound> {
    let address = SocketAddr::new(any, port.port);
    match port.protocol {
        Protocol::Tcp => {
            let listener =
                TcpListener::bind(address).with_context(|| format!("binding tcp/{}", port.port))?;
            listener
                .set_nonblocking(true)
                .context("making the listener non-blocking")?;
            Ok(Bound::Tcp(listener))
        }
        Protocol::Udp => {
            let socket =
                UdpSocket::bind(address).with_context(|| format!("binding udp/{}", port.port))?;
            socket
                .set_read_timeout(Some(STOP_CHECK))
                .context("setting the udp read timeout")?;
            Ok(Bound::Udp(socket))
        }
        Protocol::Sctp => bail!("sctp/{} cannot be served", port.port),
    }
}

fn accept_loop(listener: TcpListener, stop: &Arc<AtomicBool>, reply: &str) {
    let mut connections: Vec<JoinHandle<()>> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        if !wait_readable(&listener) {
            continue;
        }
        match listener.accept() {
            Ok((stream, _)) => {
                let stop = Arc::clone(stop);
                let reply = reply.to_string();
                connections.retain(|c| !c.is_finished());
                connections.push(std::thread::spawn(move || {
                    // Errors here are the client's business (it went away); nothing to report.
                    let _ = serve_connection(stream, &stop, &reply);
                }));
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                eprintln!("netpol lab: accept failed on {reply:?}: {e}");
                std::thread::sleep(STOP_CHECK);
            }
        }
    }
    for connection in connections {
        let _ = connection.join();
    }
}

/// Waits up to `STOP_CHECK` for a pending connection.
fn wait_readable(listener: &TcpListener) -> bool {
    let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
    let timeout = u16::try_from(STOP_CHECK.as_millis()).unwrap_or(u16::MAX);
    nix::poll::poll(&mut fds, timeout).is_ok_and(|ready| ready > 0)
}

fn serve_connection(mut stream: TcpStream, stop: &AtomicBool, reply: &str) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    let mut buffer = read_first_bytes(&mut stream)?;
    if looks_like_http(&buffer) {
        read_http_head(&mut stream, &mut buffer)?;
        let head_only = buffer.starts_with(b"HEAD ");
        let response = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
            reply.len(),
            if head_only { "" } else { reply }
        );
        stream.write_all(response.as_bytes())?;
        return stream.shutdown(Shutdown::Write);
    }
    echo_lines(stream, buffer, stop)
}

/// Reads until a method can be recognised, a line ends, the peer is silent for
/// `FIRST_BYTES_WAIT`, or it closes.
fn read_first_bytes(stream: &mut TcpStream) -> io::Result<Vec<u8>> {
    let deadline = Instant::now() + FIRST_BYTES_WAIT;
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 1024];
    while buffer.len() < 8 && !buffer.contains(&b'\n') {
        let Some(left) = deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
        else {
            break;
        };
        stream.set_read_timeout(Some(left))?;
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            Err(e) if is_timeout(&e) => break,
            Err(e) => return Err(e),
        }
    }
    Ok(buffer)
}

fn looks_like_http(first_bytes: &[u8]) -> bool {
    HTTP_METHODS
        .iter()
        .any(|method| first_bytes.starts_with(method.as_bytes()))
}

/// Reads the rest of the request head; closing with unread bytes would send the client a RST
/// instead of our response.
fn read_http_head(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> io::Result<()> {
    stream.set_read_timeout(Some(HTTP_HEAD_WAIT))?;
    let mut chunk = [0u8; 1024];
    while !buffer.windows(4).any(|w| w == b"\r\n\r\n") && buffer.len() < HTTP_HEAD_MAX {
        match stream.read(&mut chunk)? {
            0 => break,
            n => buffer.extend_from_slice(&chunk[..n]),
        }
    }
    Ok(())
}

/// Sends back every complete line until the peer closes or the lab stops; long-lived
/// connection tests use this to see whether an established flow still passes.
fn echo_lines(mut stream: TcpStream, mut pending: Vec<u8>, stop: &AtomicBool) -> io::Result<()> {
    stream.set_read_timeout(Some(STOP_CHECK))?;
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = pending.iter().rposition(|&b| b == b'\n') {
            stream.write_all(&pending[..=end])?;
            pending.drain(..=end);
        }
        if stop.load(Ordering::Relaxed) {
            return stream.shutdown(Shutdown::Both);
        }
        match stream.read(&mut chunk) {
            Ok(0) => return stream.write_all(&pending), // an unterminated last line
            Ok(n) => pending.extend_from_slice(&chunk[..n]),
            Err(e) if is_timeout(&e) => {}
            Err(e) => return Err(e),
        }
    }
}

fn answer_datagrams(socket: UdpSocket, stop: &AtomicBool, reply: &str) {
    let mut buffer = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        match socket.recv_from(&mut buffer) {
            Ok((_, peer)) => {
                if let Err(e) = socket.send_to(reply.as_bytes(), peer) {
                    eprintln!("netpol lab: udp reply from {reply:?} to {peer} failed: {e}");
                }
            }
            Err(e) if is_timeout(&e) || e.kind() == ErrorKind::Interrupted => {}
            // An ICMP error for an earlier reply surfaces here; the next datagram is unaffected.
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => {}
            Err(e) => {
                eprintln!("netpol lab: udp server {reply:?} failed: {e}");
                std::thread::sleep(STOP_CHECK);
            }
        }
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_http_requests_but_not_echo_lines() {
        assert!(looks_like_http(b"GET / HTTP/1.1\r\n"));
        assert!(looks_like_http(b"HEAD /x HTTP/1.0\r\n"));
        assert!(
            !looks_like_http(b"hello\n"),
            "a plain line goes to the echo server"
        );
        assert!(
            !looks_like_http(b""),
            "a silent client goes to the echo server"
        );
    }
}
