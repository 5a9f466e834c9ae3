//! The cluster DNS server: dnsmasq in the CoreDNS pod's network namespace, answering only
//! from the hosts file the lab renders (`dns::cluster_hosts`). It never forwards: it reads no
//! resolv.conf, no /etc/hosts and no configuration file, and has no upstream server, so a name
//! outside the cluster gets REFUSED and one inside cluster.local that it does not know gets
//! NXDOMAIN. The process is recorded in the lab state as soon as it exists and is stopped by
//! its pid, never by name.

use std::fs::File;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::dns::CLUSTER_DOMAIN;
use super::netns::{in_netns, nsenter_command};
use super::state;

/// How long dnsmasq may take to answer on its TCP port after the spawn.
const READY_WAIT: Duration = Duration::from_secs(5);
const EXIT_WAIT: Duration = Duration::from_secs(2);

/// A running dnsmasq; dropping it stops the process.
pub struct Dnsmasq {
    child: Child,
    log: PathBuf,
}

impl Dnsmasq {
    /// Starts dnsmasq inside `netns` on port 53 of `addresses` (UDP and TCP), serving
    /// `hosts_file`; logs go to `log`. Returns once it accepts TCP connections.
    pub fn start(
        lab_dir: &Path,
        netns: &str,
        addresses: &[IpAddr],
        hosts_file: &Path,
        log: &Path,
    ) -> Result<Dnsmasq> {
        let Some(&probe_address) = addresses.first() else {
            bail!("dnsmasq needs an address to listen on");
        };
        let listen: Vec<String> = addresses.iter().map(IpAddr::to_string).collect();
        let log_file = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let child = nsenter_command(netns, "dnsmasq")
            .args([
                // In the foreground, so the pid we hold is dnsmasq's and it never daemonizes.
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--pid-file", // no argument: no pid file
                "--bind-interfaces",
                "--port=53",
                // Root keeps the lab's hosts file readable whatever the umask made of its
                // directory; the process lives in a pod namespace with no way out of the lab.
                "--user=root",
                "--log-facility=-",
                "--log-queries",
            ])
            .arg(format!("--listen-address={}", listen.join(",")))
            .arg(format!("--local=/{CLUSTER_DOMAIN}/"))
            .arg(format!("--addn-hosts={}", hosts_file.display()))
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().context("duplicating the log file")?)
            .stderr(log_file)
            .spawn()
            .context("starting dnsmasq (Debian package dnsmasq-base)")?;
        let mut dnsmasq = Dnsmasq {
            child,
            log: log.to_path_buf(),
        };
        state::record_process(lab_dir, dnsmasq.child.id())?;
        dnsmasq
            .wait_ready(netns, SocketAddr::new(probe_address, 53))
            .with_context(|| format!("dnsmasq in {netns} (log {})", log.display()))?;
        Ok(dnsmasq)
    }

    fn wait_ready(&mut self, netns: &str, target: SocketAddr) -> Result<()> {
        let deadline = Instant::now() + READY_WAIT;
        loop {
            if let Some(status) = self.child.try_wait().context("waiting for dnsmasq")? {
                bail!("dnsmasq exited ({status}): {}", self.log_tail());
            }
            let connected = in_netns(netns, || {
                TcpStream::connect_timeout(&target, Duration::from_millis(200))
            })?;
            if connected.is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "dnsmasq does not answer on {target} after {READY_WAIT:?}: {}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(5)..].join(" | ")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then SIGKILL if it has not exited in time; reaps the process either way.
    fn stop(&mut self) -> Result<()> {
        if self.child.try_wait()?.is_some() {
            return Ok(());
        }
        let pid = Pid::from_raw(i32::try_from(self.child.id()).context("pid out of range")?);
        kill(pid, Signal::SIGTERM).context("signalling dnsmasq")?;
        let deadline = Instant::now() + EXIT_WAIT;
        while self.child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                self.child.kill().context("killing dnsmasq")?;
                self.child.wait().context("reaping dnsmasq")?;
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!(
                "netpol lab: stopping dnsmasq (pid {}) failed: {e:#}",
                self.child.id()
            );
        }
    }
}
