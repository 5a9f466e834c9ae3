//! The agent's HTTP endpoints: `/metrics` (Prometheus), `/healthz` (the run loop is alive) and
//! `/readyz` (the first full programming is done). A minimal HTTP/1.1 responder on a tokio
//! listener: one GET per connection, no keep-alive; that is all kubelet and Prometheus need.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};
use tracing::debug;

use crate::{
    dataplane::{maps, PinDir},
    metrics::{self, ReconcileStats},
};

/// What the endpoints report, shared with the run loop.
#[derive(Debug, Default)]
pub struct Health {
    /// Set once the first full programming from a synced source succeeded.
    pub ready: AtomicBool,
    /// `monotonic_ns` of the loop's last turn.
    pub last_tick_ns: AtomicU64,
    pub stats: ReconcileStats,
}

impl Health {
    pub fn tick(&self) {
        self.last_tick_ns
            .store(maps::monotonic_ns(), Ordering::Relaxed);
    }

    fn alive(&self, stall: Duration) -> bool {
        let last = self.last_tick_ns.load(Ordering::Relaxed);
        maps::monotonic_ns().saturating_sub(last) < stall.as_nanos() as u64
    }
}

/// Serves until the task is dropped. `stall`: how long without a loop turn before `/healthz`
/// fails (the loop turns at least every poll interval).
pub async fn serve(
    listener: TcpListener,
    health: Arc<Health>,
    pins: PinDir,
    stall: Duration,
) -> std::io::Result<()> {
    loop {
        let (stream, peer) = listener.accept().await?;
        let (health, pins) = (health.clone(), pins.clone());
        tokio::spawn(async move {
            if let Err(e) = respond(stream, &health, &pins, stall).await {
                debug!(%peer, error = %e, "http request failed");
            }
        });
    }
}

pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

async fn respond(
    mut stream: TcpStream,
    health: &Health,
    pins: &PinDir,
    stall: Duration,
) -> std::io::Result<()> {
    let mut buf = [0u8; 2048];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    let request = String::from_utf8_lossy(&buf[..n]);
    let path = request
        .lines()
        .next()
        .and_then(|line| line.strip_prefix("GET "))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or("");
    let (status, body) = match path {
        "/metrics" => {
            let pins = pins.clone();
            let stats_text = metrics::render(&health.stats, &pins);
            ("200 OK", stats_text)
        }
        "/healthz" if health.alive(stall) => ("200 OK", "ok\n".to_string()),
        "/healthz" => (
            "503 Service Unavailable",
            "the run loop has stalled\n".to_string(),
        ),
        "/readyz" if health.ready.load(Ordering::Relaxed) => ("200 OK", "ready\n".to_string()),
        "/readyz" => (
            "503 Service Unavailable",
            "not programmed yet (waiting for the first full sync)\n".to_string(),
        ),
        _ => ("404 Not Found", "not found\n".to_string()),
    };
    let content_type = if path == "/metrics" {
        "text/plain; version=0.0.4"
    } else {
        "text/plain"
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}
