//! Prometheus text-format metrics of the sync loop (`/metrics`).

use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::ruleset::RulesetStats;

/// Upper bounds (seconds) of the sync duration histogram: 1 ms to 10 s covers an incremental change up to a full
/// sync of a large cluster.
const BUCKETS: [f64; 12] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Kinds of sync, a label of the duration histogram.
pub const SYNC_KINDS: [&str; 3] = ["rebuild", "resync", "incremental"];

#[derive(Debug, Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

#[derive(Debug, Default)]
struct Inner {
    durations: [Histogram; SYNC_KINDS.len()],
    errors: u64,
    stats: RulesetStats,
    services: usize,
    last_success_unix: f64,
    last_sync_ok: Option<bool>,
}

/// Shared between the sync loop (writer) and the HTTP servers (readers).
#[derive(Debug, Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

impl Metrics {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave these counters inconsistent in a way that matters.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn record_success(
        &self,
        kind: usize,
        took: Duration,
        stats: RulesetStats,
        services: usize,
    ) {
        let mut m = self.lock();
        let h = &mut m.durations[kind];
        let secs = took.as_secs_f64();
        for (i, b) in BUCKETS.iter().enumerate() {
            if secs <= *b {
                h.counts[i] += 1;
            }
        }
        h.count += 1;
        h.sum += secs;
        m.stats = stats;
        m.services = services;
        m.last_success_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        m.last_sync_ok = Some(true);
    }

    pub(crate) fn record_error(&self) {
        let mut m = self.lock();
        m.errors += 1;
        m.last_sync_ok = Some(false);
    }

    /// Healthy once a sync has succeeded and the latest one did too.
    pub fn healthy(&self) -> bool {
        self.lock().last_sync_ok == Some(true)
    }

    /// Unix time of the last successful sync (0 before the first).
    pub fn last_success_unix(&self) -> f64 {
        self.lock().last_success_unix
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let m = self.lock();
        let mut s = String::new();
        s.push_str("# HELP windlass_proxy_sync_duration_seconds Time to compute and apply one nftables sync.\n");
        s.push_str("# TYPE windlass_proxy_sync_duration_seconds histogram\n");
        for (kind, h) in SYNC_KINDS.iter().zip(&m.durations) {
            for (b, c) in BUCKETS.iter().zip(&h.counts) {
                let _ = writeln!(
                    s,
                    "windlass_proxy_sync_duration_seconds_bucket{{kind=\"{kind}\",le=\"{b}\"}} {c}"
                );
            }
            let _ = writeln!(
                s,
                "windlass_proxy_sync_duration_seconds_bucket{{kind=\"{kind}\",le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(
                s,
                "windlass_proxy_sync_duration_seconds_sum{{kind=\"{kind}\"}} {}",
                h.sum
            );
            let _ = writeln!(
                s,
                "windlass_proxy_sync_duration_seconds_count{{kind=\"{kind}\"}} {}",
                h.count
            );
        }
        let gauges: [(&str, &str, &str, f64); 6] = [
            (
                "windlass_proxy_sync_errors_total",
                "counter",
                "Syncs nft rejected or could not run.",
                m.errors as f64,
            ),
            (
                "windlass_proxy_map_elements",
                "gauge",
                "Elements in the proxy's nftables maps and sets.",
                m.stats.elements as f64,
            ),
            (
                "windlass_proxy_chains",
                "gauge",
                "Chains in the proxy's nftables table.",
                m.stats.chains as f64,
            ),
            (
                "windlass_proxy_frontends",
                "gauge",
                "Service frontends (address or NodePort, protocol, port) programmed.",
                m.stats.frontends as f64,
            ),
            (
                "windlass_proxy_services",
                "gauge",
                "Services in the proxy's model.",
                m.services as f64,
            ),
            (
                "windlass_proxy_last_sync_success_timestamp_seconds",
                "gauge",
                "Unix time of the last successful sync.",
                m.last_success_unix,
            ),
        ];
        for (name, ty, help, v) in gauges {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {ty}\n{name} {v}");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_land_in_cumulative_buckets_and_errors_are_counted() {
        let m = Metrics::new();
        assert!(!m.healthy());
        m.record_success(2, Duration::from_millis(3), RulesetStats::default(), 1);
        m.record_error();
        assert!(!m.healthy());
        let text = m.render();
        assert!(text.contains(
            "windlass_proxy_sync_duration_seconds_bucket{kind=\"incremental\",le=\"0.001\"} 0"
        ));
        assert!(text.contains(
            "windlass_proxy_sync_duration_seconds_bucket{kind=\"incremental\",le=\"0.005\"} 1"
        ));
        assert!(text.contains("windlass_proxy_sync_duration_seconds_count{kind=\"incremental\"} 1"));
        assert!(text.contains("windlass_proxy_sync_errors_total 1"));
    }
}
