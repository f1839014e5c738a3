//! Applying the desired ruleset: [`Proxier`] diffs against what it last applied; [`SyncLoop`] coalesces events.

use std::collections::BTreeSet;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::metrics::Metrics;
use crate::model::{Model, ModelEvent, Protocol};
use crate::nft::{Conntrack, Nft, NftError};
use crate::ruleset::{FrontendAddr, Ruleset, RulesetConfig, RulesetStats};

/// How much of the table a sync rewrites.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncKind {
    /// Delete and recreate the table (start-up, or after a failed sync: nothing about the kernel is assumed).
    Rebuild,
    /// Rewrite every chain and map in place, keeping the affinity map (periodic drift repair).
    Resync,
    /// Only what changed since the last successful sync.
    Incremental,
}

impl SyncKind {
    fn index(self) -> usize {
        match self {
            SyncKind::Rebuild => 0,
            SyncKind::Resync => 1,
            SyncKind::Incremental => 2,
        }
    }
}

/// Result of one successful sync.
#[derive(Debug, Clone, Copy)]
pub struct SyncReport {
    pub kind: SyncKind,
    pub took: Duration,
    /// Bytes of nft script applied (0 when nothing changed).
    pub script_bytes: usize,
    pub stats: RulesetStats,
}

/// Programs the kernel from the model. Holds what it last applied, so it never has to list the table.
pub struct Proxier {
    config: RulesetConfig,
    nft: Nft,
    conntrack: Conntrack,
    applied: Option<Ruleset>,
    metrics: Arc<Metrics>,
}

impl Proxier {
    pub fn new(
        config: RulesetConfig,
        nft: Nft,
        conntrack: Conntrack,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            config,
            nft,
            conntrack,
            applied: None,
            metrics,
        }
    }

    /// The ruleset last applied, if the last sync succeeded.
    pub fn applied(&self) -> Option<&Ruleset> {
        self.applied.as_ref()
    }

    /// Syncs the kernel to `model`. An incremental or resync request becomes a rebuild when the previous sync
    /// failed (the kernel's state is then unknown). On error nothing of this sync was applied (one transaction).
    pub fn sync(&mut self, model: &Model, kind: SyncKind) -> Result<SyncReport, NftError> {
        let start = Instant::now();
        let desired = Ruleset::compute(model, &self.config);
        let (kind, script) = match (&self.applied, kind) {
            (None, _) | (Some(_), SyncKind::Rebuild) => (
                SyncKind::Rebuild,
                Some(desired.render_rebuild(&self.config)),
            ),
            (Some(old), SyncKind::Resync) => (
                SyncKind::Resync,
                Some(desired.render_resync(old, &self.config)),
            ),
            (Some(old), SyncKind::Incremental) => {
                (SyncKind::Incremental, desired.render_incremental(old))
            }
        };
        let script_bytes = script.as_ref().map_or(0, String::len);
        if let Some(script) = &script {
            if let Err(e) = self.nft.apply(script) {
                self.applied = None;
                self.metrics.record_error();
                return Err(e);
            }
        }
        if let Some(old) = &self.applied {
            self.flush_stale_udp(old, &desired);
        }
        let stats = desired.stats();
        self.applied = Some(desired);
        let took = start.elapsed();
        self.metrics
            .record_success(kind.index(), took, stats, model.service_count());
        Ok(SyncReport {
            kind,
            took,
            script_bytes,
            stats,
        })
    }

    /// UDP has no connection end: a conntrack entry keeps sending a flow to a removed endpoint, or keeps a flow
    /// un-NATed that was created while a Service had no endpoints. Delete those entries, as upstream does.
    fn flush_stale_udp(&self, old: &Ruleset, new: &Ruleset) {
        let empty = BTreeSet::new();
        for (fe, old_eps) in &old.udp_backends {
            let new_eps = new.udp_backends.get(fe).unwrap_or(&empty);
            let mut base = vec!["-p".to_string(), "udp".to_string()];
            if let FrontendAddr::Ip(ip) = fe.addr {
                base.extend(["--orig-dst".to_string(), ip.to_string()]);
            }
            base.extend(["--orig-port-dst".to_string(), fe.port.to_string()]);
            for gone in old_eps.difference(new_eps) {
                let mut filter = base.clone();
                filter.extend(["--reply-src".to_string(), gone.to_string()]);
                if let Err(e) = self.conntrack.delete(&filter) {
                    warn!(error = %e, "cannot flush stale UDP conntrack entries");
                }
            }
        }
        for (fe, new_eps) in &new.udp_backends {
            debug_assert!(fe.protocol == Protocol::Udp);
            let had = old.udp_backends.get(fe).is_some_and(|e| !e.is_empty());
            if !had && !new_eps.is_empty() {
                let mut filter = vec!["-p".to_string(), "udp".to_string()];
                if let FrontendAddr::Ip(ip) = fe.addr {
                    filter.extend(["--orig-dst".to_string(), ip.to_string()]);
                }
                filter.extend(["--orig-port-dst".to_string(), fe.port.to_string()]);
                if let Err(e) = self.conntrack.delete(&filter) {
                    warn!(error = %e, "cannot flush UDP conntrack entries of a Service that gained endpoints");
                }
            }
        }
    }
}

/// Timing of the sync loop.
#[derive(Debug, Clone, Copy)]
pub struct SyncTiming {
    /// How long after the first change of a burst the sync runs, so the burst is applied as one transaction.
    pub debounce: Duration,
    /// Minimum time between two syncs.
    pub min_sync_period: Duration,
    /// How often everything is rewritten to repair drift (someone else changing our table).
    pub resync_period: Duration,
}

impl Default for SyncTiming {
    fn default() -> Self {
        Self {
            debounce: Duration::from_millis(100),
            min_sync_period: Duration::from_millis(100),
            resync_period: Duration::from_secs(3600),
        }
    }
}

/// Feeds model events into a [`Proxier`]: bursts are coalesced, a failed sync is retried, and a periodic resync
/// repairs drift. Runs on its own thread (nft is a blocking child process).
pub struct SyncLoop {
    pub proxier: Proxier,
    pub model: Model,
    pub timing: SyncTiming,
    /// Called after each successful sync with the applied ruleset (health-check node ports follow it).
    pub on_synced: Box<dyn FnMut(&Ruleset) + Send>,
}

impl SyncLoop {
    /// Runs until `events` is closed. The first sync happens once the first event arrived (so an empty model is
    /// never applied before the source has listed everything).
    pub fn run(mut self, events: Receiver<ModelEvent>) {
        let mut dirty_since: Option<Instant> = None;
        let mut last_sync = Instant::now() - self.timing.min_sync_period;
        let mut next_resync = Instant::now() + self.timing.resync_period;
        let mut synced_once = false;
        let retry = Duration::from_secs(1);
        loop {
            let now = Instant::now();
            let wake = match dirty_since {
                Some(t) => (t + self.timing.debounce).max(last_sync + self.timing.min_sync_period),
                None => next_resync,
            };
            match events.recv_timeout(wake.saturating_duration_since(now)) {
                Ok(ev) => {
                    self.model.apply(ev);
                    while let Ok(ev) = events.try_recv() {
                        self.model.apply(ev);
                    }
                    dirty_since.get_or_insert_with(Instant::now);
                    continue;
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    info!("model source closed; sync loop stops");
                    return;
                }
            }
            let now = Instant::now();
            let kind = if dirty_since.is_some() {
                SyncKind::Incremental
            } else if synced_once && now >= next_resync {
                SyncKind::Resync
            } else {
                continue;
            };
            last_sync = now;
            match self.proxier.sync(&self.model, kind) {
                Ok(report) => {
                    synced_once = true;
                    dirty_since = None;
                    if report.kind != SyncKind::Incremental {
                        next_resync = Instant::now() + self.timing.resync_period;
                    }
                    info!(
                        kind = ?report.kind,
                        took_ms = report.took.as_secs_f64() * 1000.0,
                        bytes = report.script_bytes,
                        elements = report.stats.elements,
                        "synced nftables"
                    );
                    if let Some(applied) = self.proxier.applied() {
                        (self.on_synced)(applied);
                    }
                }
                Err(e) => {
                    warn!(error = %e, "sync failed; retrying with a full rebuild");
                    // Retry soon (as a rebuild, since the proxier forgot what is applied).
                    dirty_since = Some(Instant::now() + retry);
                }
            }
        }
    }
}
