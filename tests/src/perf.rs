//! Traffic between two lab pods for the end-to-end benchmark: an iperf3 run, a request/response
//! loop of 1-byte messages on one connection, and a connect / exchange / close loop.
//!
//! Every socket is created by a thread that has joined a pod's network namespace, so the traffic
//! crosses both pods' veths and the node's forwarding path; nothing here opens a socket in, or
//! sends traffic through, the machine's root namespace. Every process started here is stopped by
//! its own PID.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::lab::{in_netns, nsenter_command};
use nix::poll::{PollFd, PollFlags};

/// How long one send, receive or connect may stall before the measurement fails: far above any
/// round trip here, so it only fires when a policy drops the benchmark's own traffic.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// Exchanges before the clock starts, so the first lookups and cache misses are not counted.
const WARMUP: u32 = 200;

/// The median and the range of a set of measurements.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    pub fn of(values: &[f64]) -> Spread {
        assert!(!values.is_empty(), "a spread of no measurements");
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        };
        Spread {
            median,
            min: sorted[0],
            max: sorted[n - 1],
        }
    }
}

/// The servers of the benchmark in the server pod's namespace, listening on all addresses: one
/// that accepts and closes (for reachability probes), and the listeners of the request/response
/// and connection measurements, which are served only while a measurement runs, so nothing but
/// the benchmark's own connections ever reaches them. Dropping it stops the probe server.
///
/// Sockets are blocking, as in most servers: each side sleeps until its packet arrives. On a
/// virtual machine the wake-up of an idle vCPU is part of every round trip.
pub struct BenchServers {
    echo: TcpListener,
    exchange: TcpListener,
    stop: Arc<AtomicBool>,
    probe: Option<JoinHandle<()>>,
}

impl BenchServers {
    pub fn start(
        netns: &str,
        probe_port: u16,
        echo_port: u16,
        exchange_port: u16,
    ) -> Result<BenchServers> {
        let bind = |port| {
            TcpListener::bind(("0.0.0.0", port))
                .and_then(|l| l.set_nonblocking(true).map(|()| l))
                .with_context(|| format!("binding tcp/{port} in {netns}"))
        };
        let (probe, echo, exchange) = in_netns(netns, || -> Result<_> {
            Ok((bind(probe_port)?, bind(echo_port)?, bind(exchange_port)?))
        })??;
        let stop = Arc::new(AtomicBool::new(false));
        let probe = {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    // Accepted and closed at once; the connect is all a probe needs.
                    let _ = accept(&probe, &stop);
                }
            })
        };
        Ok(BenchServers {
            echo,
            exchange,
            stop,
            probe: Some(probe),
        })
    }

    /// Request/response transactions per second: 1-byte messages ping-ponged on one TCP
    /// connection (Nagle off) from the `client` namespace to `server` (this echo listener's
    /// port on the server pod's address) for `duration`.
    ///
    /// Both ends busy-poll non-blocking sockets (as `SO_BUSY_POLL` or DPDK-style servers do)
    /// instead of sleeping: a round trip is then the datapath's work (both stacks, both veths,
    /// the node's forwarding, the programs) and not the wake-up of an idle virtual CPU, which on
    /// a VM is most of a sleeping round trip and varies from run to run. The programs' cost is a
    /// larger share of such a round trip, so this measures it more strictly, not less. The
    /// client runs on CPU 0 and the echo server on CPU 1.
    pub fn request_response(
        &self,
        client: &str,
        server: SocketAddr,
        duration: Duration,
    ) -> Result<f64> {
        let done = AtomicBool::new(false);
        std::thread::scope(|scope| {
            let echo = scope.spawn(|| -> io::Result<()> {
                pin_to_cpu(1);
                let mut stream = accept(&self.echo, &done)?;
                prepare(&stream)?;
                stream.set_nonblocking(true)?;
                let mut buffer = [0u8; 64];
                loop {
                    match read_spinning(&mut stream, &mut buffer)? {
                        0 => return Ok(()),
                        n => stream.write_all(&buffer[..n])?,
                    }
                }
            });
            let rate = in_netns(client, || -> Result<f64> {
                pin_to_cpu(0);
                let mut stream = TcpStream::connect_timeout(&server, IO_TIMEOUT)
                    .with_context(|| format!("connecting to {server}"))?;
                prepare(&stream)?;
                stream.set_nonblocking(true)?;
                let mut byte = [0u8; 1];
                let mut exchange = || -> io::Result<()> {
                    stream.write_all(&[1])?;
                    match read_spinning(&mut stream, &mut byte)? {
                        1 => Ok(()),
                        _ => Err(ErrorKind::UnexpectedEof.into()),
                    }
                };
                for _ in 0..WARMUP {
                    exchange().context("request/response warm-up")?;
                }
                let start = Instant::now();
                let mut count = 0u64;
                loop {
                    for _ in 0..64 {
                        exchange().with_context(|| format!("request/response with {server}"))?;
                    }
                    count += 64;
                    let elapsed = start.elapsed();
                    if elapsed >= duration {
                        return Ok(count as f64 / elapsed.as_secs_f64());
                    }
                }
            });
            // The client's stream is closed by now, which ends the echo server's loop.
            done.store(true, Ordering::Relaxed);
            let served = echo.join().expect("the echo server panicked");
            let rate = rate??;
            served.context("echo server")?;
            Ok(rate)
        })
    }

    /// New connections per second from the `client` namespace to `server` (this exchange
    /// listener's port on the server pod's address): connect, send one byte, read one of the
    /// two sent back, close, one connection after another for `duration`.
    ///
    /// The client closes with a byte unread, so its kernel resets the connection (RFC 2525,
    /// 2.17) as SO_LINGER 0 would, and the server waits for that reset rather than closing
    /// first: no side keeps a TIME_WAIT socket, so the loop never runs out of ports.
    pub fn connection_rate(
        &self,
        client: &str,
        server: SocketAddr,
        duration: Duration,
    ) -> Result<f64> {
        let done = AtomicBool::new(false);
        std::thread::scope(|scope| {
            let exchanges = scope.spawn(|| -> io::Result<()> {
                favour_this_thread();
                while !done.load(Ordering::Relaxed) {
                    let mut stream = match accept(&self.exchange, &done) {
                        Ok(stream) => stream,
                        Err(e) if e.kind() == ErrorKind::Interrupted => continue, // done
                        Err(e) => return Err(e),
                    };
                    prepare(&stream)?;
                    let mut byte = [0u8; 1];
                    if stream.read(&mut byte)? == 1 {
                        stream.write_all(&[byte[0]; 2])?;
                        let _ = stream.read(&mut byte); // the client's reset
                    }
                }
                Ok(())
            });
            let rate = in_netns(client, || -> Result<f64> {
                favour_this_thread();
                let once = || -> io::Result<()> {
                    let mut stream = TcpStream::connect_timeout(&server, IO_TIMEOUT)?;
                    prepare(&stream)?;
                    stream.write_all(&[1])?;
                    let mut byte = [0u8; 1];
                    stream.read_exact(&mut byte) // dropped with the second byte unread: a reset
                };
                for _ in 0..WARMUP / 10 {
                    once().context("connection warm-up")?;
                }
                let start = Instant::now();
                let mut count = 0u64;
                loop {
                    for _ in 0..16 {
                        once().with_context(|| format!("connection {count} to {server}"))?;
                        count += 1;
                    }
                    let elapsed = start.elapsed();
                    if elapsed >= duration {
                        return Ok(count as f64 / elapsed.as_secs_f64());
                    }
                }
            });
            done.store(true, Ordering::Relaxed);
            let served = exchanges.join().expect("the exchange server panicked");
            let rate = rate??;
            served.context("exchange server")?;
            Ok(rate)
        })
    }
}

impl Drop for BenchServers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(probe) = self.probe.take() {
            let _ = probe.join();
        }
    }
}

/// Gives the calling thread nice -20, so that on a machine busy with other work (builds, other
/// tests) a woken measurement thread preempts that work at once instead of waiting for its
/// turn, which otherwise makes round trips bimodal. Only the request/response and connection
/// threads get it: they sleep between packets, so they cannot starve anything. Best effort.
fn favour_this_thread() {
    // /proc/thread-self links to `<pid>/task/<tid>`; setpriority on a tid is per thread.
    let Ok(link) = std::fs::read_link("/proc/thread-self") else {
        return;
    };
    if let Some(tid) = link.file_name().and_then(|t| t.to_str()) {
        let _ = Command::new("renice")
            .args(["-n", "-20", "-p", tid])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Accepts one connection from a non-blocking listener, polling it so that `stop` is seen
/// within 100 ms; gives up with `Interrupted` once `stop` is set.
fn accept(listener: &TcpListener, stop: &AtomicBool) -> io::Result<TcpStream> {
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                // An accepted socket does not inherit the listener's O_NONBLOCK on Linux, but
                // say so rather than rely on it.
                stream.set_nonblocking(false)?;
                return Ok(stream);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        if stop.load(Ordering::Relaxed) {
            return Err(ErrorKind::Interrupted.into());
        }
        let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
        nix::poll::poll(&mut fds, 100u16)?;
    }
}

/// Keeps the calling thread on one CPU (when the machine has it), so that the two busy-polling
/// ends of a request/response run side by side on the same CPUs in every mode and round instead
/// of wherever the scheduler last put them. Best effort: a failure leaves the thread unpinned.
fn pin_to_cpu(cpu: usize) {
    let mut set = nix::sched::CpuSet::new();
    let available = std::thread::available_parallelism().map_or(1, |n| n.get());
    if set.set(cpu % available).is_ok() {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
    }
}

/// One `read` on a non-blocking stream, retried in a busy loop until data (or end of stream)
/// arrives; fails with `TimedOut` after `IO_TIMEOUT`, as a dropped packet would make it.
fn read_spinning(stream: &mut TcpStream, buffer: &mut [u8]) -> io::Result<usize> {
    let mut since: Option<Instant> = None;
    loop {
        match stream.read(buffer) {
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                // The clock is read only once the first attempts found nothing.
                let since = *since.get_or_insert_with(Instant::now);
                if since.elapsed() > IO_TIMEOUT {
                    return Err(ErrorKind::TimedOut.into());
                }
                std::hint::spin_loop();
            }
            other => return other,
        }
    }
}

/// Nagle off, and a receive timeout so a dropped packet fails the measurement instead of
/// hanging it.
fn prepare(stream: &TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))
}

/// A child process killed (by its PID) and reaped when dropped, unless it has already exited.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// What iperf3's client reports for one run.
#[derive(Debug, Clone, Copy)]
pub struct Throughput {
    pub bits_per_second: f64,
    pub retransmits: u64,
    /// CPU use of the sending and the receiving iperf3 process, in percent of one machine.
    pub sender_cpu: f64,
    pub receiver_cpu: f64,
}

/// One single-stream iperf3 TCP run of `duration` from the `client` namespace to an iperf3
/// server started for this run alone (`-1`) in the `server` namespace, bound to `ip`.
pub fn iperf3(
    server: &str,
    client: &str,
    ip: IpAddr,
    port: u16,
    duration: Duration,
) -> Result<Throughput> {
    let (ip, port, secs) = (ip.to_string(), port.to_string(), duration.as_secs().max(1));
    let mut listener = Reaped(
        nsenter_command(server, "iperf3")
            .args(["-s", "-1", "-B", &ip, "-p", &port])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting iperf3 -s (is iperf3 installed? `cargo xtask setup`)")?,
    );
    wait_listening(&mut listener.0, port.parse()?)
        .with_context(|| format!("iperf3 -s in {server}"))?;

    let output = nsenter_command(client, "iperf3")
        .args(["-c", &ip, "-p", &port, "-t", &secs.to_string(), "-J"])
        .args(["--connect-timeout", "2000"])
        .stdin(Stdio::null())
        .output()
        .context("running iperf3 -c")?;
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).with_context(|| {
        format!(
            "iperf3 -c printed no JSON ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        )
    })?;
    if let Some(error) = report.get("error") {
        bail!("iperf3 -c {ip}:{port} from {client} failed: {error}");
    }
    let end = &report["end"];
    let number = |v: &serde_json::Value, what: &str| {
        v.as_f64()
            .with_context(|| format!("iperf3 report has no {what}: {end}"))
    };
    let throughput = Throughput {
        bits_per_second: number(&end["sum_received"]["bits_per_second"], "received rate")?,
        retransmits: end["sum_sent"]["retransmits"].as_u64().unwrap_or(0),
        sender_cpu: number(&end["cpu_utilization_percent"]["host_total"], "host cpu")?,
        receiver_cpu: number(
            &end["cpu_utilization_percent"]["remote_total"],
            "remote cpu",
        )?,
    };

    // `-1`: the server exits after this one test; give it a moment, then stop it by PID.
    let deadline = Instant::now() + IO_TIMEOUT;
    while Instant::now() < deadline && matches!(listener.0.try_wait(), Ok(None)) {
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(listener);
    Ok(throughput)
}

/// Waits until `child` has a TCP socket listening on `port`, read from its own view of
/// /proc/net/tcp (its network namespace's). iperf3's "listening" banner is no signal: stdio
/// buffers it when stdout is not a terminal.
fn wait_listening(child: &mut Child, port: u16) -> Result<()> {
    let table = format!("/proc/{}/net/tcp", child.id());
    let local = format!(":{port:04X}");
    let deadline = Instant::now() + IO_TIMEOUT;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait()? {
            let mut stderr = String::new();
            if let Some(mut err) = child.stderr.take() {
                let _ = err.read_to_string(&mut stderr);
            }
            bail!("exited before listening ({status}): {}", stderr.trim());
        }
        let listening = std::fs::read_to_string(&table)
            .unwrap_or_default()
            .lines()
            .skip(1)
            .any(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                // local_address is ADDR:PORT in hex; state 0A is LISTEN.
                fields.get(1).is_some_and(|a| a.ends_with(&local)) && fields.get(3) == Some(&"0A")
            });
        if listening {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    bail!("not listening on tcp/{port} after {IO_TIMEOUT:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_takes_the_median_and_the_range() {
        assert_eq!(
            Spread::of(&[3.0, 1.0, 2.0]),
            Spread {
                median: 2.0,
                min: 1.0,
                max: 3.0
            }
        );
        assert_eq!(Spread::of(&[4.0, 1.0, 2.0, 3.0]).median, 2.5);
    }
}
