//! Prometheus metrics, rendered in the text exposition format. Reconcile figures are kept by
//! the run loop; kernel figures (map fill, verdict counters, conntrack) are read from the
//! pinned maps at scrape time, so they are never stale. Label values come from fixed sets
//! (map names, directions, reasons), never from pod names.

use std::{fmt::Write as _, sync::Mutex, time::Duration};

use netpol_common::{map_name, policy_prefix};

use crate::dataplane::{maps, DataplaneError, PinDir};

/// Upper bounds (seconds) of the reconcile-duration histogram.
const BUCKETS: [f64; 8] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0];

/// What the run loop records about its passes.
#[derive(Debug, Default)]
pub struct ReconcileStats {
    inner: Mutex<Stats>,
}

#[derive(Clone, Debug, Default)]
struct Stats {
    passes: u64,
    failures: u64,
    /// Cumulative counts per bucket, then +Inf.
    buckets: [u64; BUCKETS.len()],
    sum_seconds: f64,
    map_changes: u64,
    last_success_unix: f64,
}

impl ReconcileStats {
    pub fn record_success(&self, took: Duration, map_changes: usize) {
        let mut s = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let secs = took.as_secs_f64();
        s.passes += 1;
        s.sum_seconds += secs;
        for (i, bound) in BUCKETS.iter().enumerate() {
            if secs <= *bound {
                s.buckets[i] += 1;
            }
        }
        s.map_changes += map_changes as u64;
        s.last_success_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
    }

    pub fn record_failure(&self) {
        let mut s = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        s.failures += 1;
    }

    fn get(&self) -> Stats {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// The whole exposition: reconcile figures, then what the kernel holds now.
pub fn render(stats: &ReconcileStats, pins: &PinDir) -> String {
    let mut out = String::new();
    let s = stats.get();
    let total = s.passes;
    header(
        &mut out,
        "netpol_reconcile_duration_seconds",
        "histogram",
        "Time of a successful reconcile pass (compile, diff, write, attach).",
    );
    for (bound, count) in BUCKETS.iter().zip(s.buckets) {
        let _ = writeln!(
            out,
            "netpol_reconcile_duration_seconds_bucket{{le=\"{bound}\"}} {count}"
        );
    }
    let _ = writeln!(
        out,
        "netpol_reconcile_duration_seconds_bucket{{le=\"+Inf\"}} {total}"
    );
    let _ = writeln!(
        out,
        "netpol_reconcile_duration_seconds_sum {}",
        s.sum_seconds
    );
    let _ = writeln!(out, "netpol_reconcile_duration_seconds_count {total}");
    header(
        &mut out,
        "netpol_reconcile_failures_total",
        "counter",
        "Reconcile passes that failed (retried).",
    );
    let _ = writeln!(out, "netpol_reconcile_failures_total {}", s.failures);
    header(
        &mut out,
        "netpol_map_changes_total",
        "counter",
        "Map entries written or removed by reconciles.",
    );
    let _ = writeln!(out, "netpol_map_changes_total {}", s.map_changes);
    header(
        &mut out,
        "netpol_last_reconcile_success_timestamp_seconds",
        "gauge",
        "When the last reconcile succeeded.",
    );
    let _ = writeln!(
        out,
        "netpol_last_reconcile_success_timestamp_seconds {}",
        s.last_success_unix
    );
    if let Err(e) = kernel(&mut out, pins) {
        header(
            &mut out,
            "netpol_kernel_read_errors",
            "gauge",
            "1 when the pinned maps could not be read.",
        );
        let _ = writeln!(out, "netpol_kernel_read_errors 1");
        let _ = writeln!(out, "# {e}");
    }
    out
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn kernel(out: &mut String, pins: &PinDir) -> Result<(), DataplaneError> {
    let contents = maps::read(pins)?;
    let conntrack = maps::conntrack(pins)?.len();
    let hashed = contents
        .policy
        .keys()
        .filter(|(prefix, key)| policy_prefix::hashed(*prefix, key.port))
        .count();
    let entries = [
        (map_name::ENDPOINTS, contents.endpoints.len()),
        (map_name::IPCACHE, contents.ipcache.len()),
        (map_name::CIDR, contents.cidr.len()),
        (map_name::POLICY, hashed),
        (map_name::PORT_RANGES, contents.policy.len() - hashed),
        (map_name::CLASSES, contents.classes.len()),
        (map_name::SERVICES, contents.services.len()),
        (map_name::CONNTRACK, conntrack),
    ];
    header(
        out,
        "netpol_map_entries",
        "gauge",
        "Entries in each pinned map.",
    );
    for (name, n) in entries {
        let _ = writeln!(out, "netpol_map_entries{{map=\"{name}\"}} {n}");
    }
    header(
        out,
        "netpol_map_capacity",
        "gauge",
        "max_entries of each pinned map.",
    );
    for (name, _) in entries {
        let _ = writeln!(
            out,
            "netpol_map_capacity{{map=\"{name}\"}} {}",
            maps::capacity(pins, name)?
        );
    }
    header(
        out,
        "netpol_conntrack_entries",
        "gauge",
        "Tracked flows (live or expired, not yet collected).",
    );
    let _ = writeln!(out, "netpol_conntrack_entries {conntrack}");
    header(
        out,
        "netpol_packets_total",
        "counter",
        "Packets by direction (from the pod's view), verdict and reason.",
    );
    let counters = maps::counters(pins)?;
    for ((dir, reason), c) in &counters {
        let verdict = if reason.is_drop() { "drop" } else { "pass" };
        let _ = writeln!(
            out,
            "netpol_packets_total{{direction=\"{}\",verdict=\"{verdict}\",reason=\"{}\"}} {}",
            dir.name(),
            reason.name(),
            c.packets
        );
    }
    header(
        out,
        "netpol_bytes_total",
        "counter",
        "Bytes by direction, verdict and reason.",
    );
    for ((dir, reason), c) in &counters {
        let verdict = if reason.is_drop() { "drop" } else { "pass" };
        let _ = writeln!(
            out,
            "netpol_bytes_total{{direction=\"{}\",verdict=\"{verdict}\",reason=\"{}\"}} {}",
            dir.name(),
            reason.name(),
            c.bytes
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_count_every_pass() {
        let stats = ReconcileStats::default();
        stats.record_success(Duration::from_millis(3), 10);
        stats.record_success(Duration::from_millis(40), 0);
        stats.record_success(Duration::from_secs(9), 1);
        stats.record_failure();
        let pins = PinDir::for_node(std::path::Path::new("/nonexistent"), "n");
        let text = render(&stats, &pins);
        assert!(
            text.contains("netpol_reconcile_duration_seconds_bucket{le=\"0.005\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("netpol_reconcile_duration_seconds_bucket{le=\"0.05\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("netpol_reconcile_duration_seconds_bucket{le=\"5\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("netpol_reconcile_duration_seconds_bucket{le=\"+Inf\"} 3"),
            "{text}"
        );
        assert!(text.contains("netpol_reconcile_failures_total 1"));
        assert!(text.contains("netpol_map_changes_total 11"));
        assert!(
            text.contains("netpol_kernel_read_errors 1"),
            "no pins here: reported, not fatal"
        );
    }
}
