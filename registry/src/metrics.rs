//! The registry's Prometheus metrics (served by `snapreg serve --metrics-listen`;
//! snapreg-telemetry adds `snapreg_rpc_*` for every call).
//!
//! | metric | what |
//! |---|---|
//! | `snapreg_chunks_sent_total`, `snapreg_chunks_sent_bytes_total` | chunk objects `GetChunks` sent, and their bytes as stored (what crossed the network) |
//! | `snapreg_chunks_received_total`, `snapreg_chunks_received_bytes_total` | chunk objects `PutChunks` received (stored or already present) |
//! | `snapreg_push_chunks_total{result}` | chunks a push named: `stored` (uploaded, new) or `deduplicated` (`FindMissingChunks` found them, or an upload was already present) |
//! | `snapreg_direct_urls_signed_total` | presigned object-store URLs handed out (those bytes bypass the registry) |
//! | `snapreg_pushes_refused_draining_total` | `BeginPush` calls refused while draining for shutdown |
//! | `snapreg_gc_runs_total{dry_run}`, `snapreg_gc_duration_seconds` | garbage collections and how long each took |
//! | `snapreg_gc_reclaimed_bytes_total`, `snapreg_gc_swept_chunks_total` | what GC removed |
//! | `snapreg_scrub_runs_total`, `snapreg_scrub_checked_objects_total`, `snapreg_scrub_findings_total{kind}` | scrubs, objects verified, damaged objects found |
//! | `snapreg_replication_lag_entries{peer}` | commit-log entries the peer has not acknowledged |
//! | `snapreg_replication_lag_seconds{peer}` | while behind: seconds since the peer last acknowledged anything, or since this process started (0 when caught up) |
//! | `snapreg_replication_failures{peer}` | failed attempts at the peer since its last success |
//! | `snapreg_restores_reported_total{outcome,phase}` | restore outcomes nodes reported (`phase` empty on success) |
//! | `snapreg_restore_duration_seconds{outcome}` | how long the reported restores took |
//!
//! The transfer counters are also what the `Stats` RPC answers: one source.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry as MetricsRegistry, Unit};

use crate::clock::now_ms;
use crate::gc::GcReport;
use crate::replication::ReplicationStatus;
use crate::restore_outcomes::Outcome;
use crate::scrub::ScrubReport;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DryRunLabel {
    dry_run: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RestoreLabels {
    outcome: &'static str,
    phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabel {
    peer: String,
}

/// A histogram family with the duration buckets (a type of its own so that the
/// struct below can derive `Default`).
struct Durations<L>(Family<L, Histogram, fn() -> Histogram>);

impl<L: Clone + std::hash::Hash + Eq> Default for Durations<L> {
    fn default() -> Self {
        Durations(Family::new_with_constructor(|| {
            Histogram::new(snapreg_telemetry::duration_buckets())
        }))
    }
}

/// Every registry metric; one per serving process, shared by its handlers.
#[derive(Default)]
pub struct RegistryMetrics {
    pub chunks_sent: Counter,
    pub chunk_bytes_sent: Counter,
    pub chunks_received: Counter,
    pub chunk_bytes_received: Counter,
    pub push_chunks: Family<ResultLabel, Counter>,
    pub direct_urls_signed: Counter,
    pub pushes_refused_draining: Counter,
    gc_runs: Family<DryRunLabel, Counter>,
    gc_reclaimed_bytes: Counter,
    gc_swept_chunks: Counter,
    gc_duration: Option<Histogram>,
    scrub_runs: Counter,
    scrub_checked: Counter,
    scrub_findings: Family<KindLabel, Counter>,
    replication_lag_entries: Family<PeerLabel, Gauge>,
    replication_lag_seconds: Family<PeerLabel, Gauge<f64, AtomicU64>>,
    replication_failures: Family<PeerLabel, Gauge>,
    restores: Family<RestoreLabels, Counter>,
    restore_durations: Durations<OutcomeLabel>,
    /// When this process started (lag of a peer that never acknowledged anything).
    started_ms: u64,
}

impl RegistryMetrics {
    /// The metrics, registered in `registry`.
    pub fn new(registry: &mut MetricsRegistry) -> Arc<Self> {
        let m = RegistryMetrics {
            gc_duration: Some(Histogram::new(snapreg_telemetry::duration_buckets())),
            started_ms: now_ms(),
            ..Default::default()
        };
        m.register_transfers(registry);
        m.register_maintenance(registry);
        Arc::new(m)
    }

    /// Metrics no endpoint shows (tests and embedders without `--metrics-listen`).
    pub fn unregistered() -> Arc<Self> {
        RegistryMetrics::new(&mut MetricsRegistry::default())
    }

    fn register_transfers(&self, r: &mut MetricsRegistry) {
        let chunks = "Chunk objects GetChunks sent";
        r.register("snapreg_chunks_sent", chunks, self.chunks_sent.clone());
        let bytes = "Bytes of the chunk objects GetChunks sent, as stored";
        r.register_with_unit(
            "snapreg_chunks_sent",
            bytes,
            Unit::Bytes,
            self.chunk_bytes_sent.clone(),
        );
        let chunks = "Chunk objects PutChunks received";
        r.register(
            "snapreg_chunks_received",
            chunks,
            self.chunks_received.clone(),
        );
        let bytes = "Bytes of the chunk objects PutChunks received";
        r.register_with_unit(
            "snapreg_chunks_received",
            bytes,
            Unit::Bytes,
            self.chunk_bytes_received.clone(),
        );
        let help = "Chunks pushes named, stored (new) or deduplicated (already held)";
        r.register("snapreg_push_chunks", help, self.push_chunks.clone());
        let help = "Presigned object-store URLs handed out for direct chunk reads";
        r.register(
            "snapreg_direct_urls_signed",
            help,
            self.direct_urls_signed.clone(),
        );
        let help = "BeginPush calls refused while draining for shutdown";
        r.register(
            "snapreg_pushes_refused_draining",
            help,
            self.pushes_refused_draining.clone(),
        );
    }

    fn register_maintenance(&self, r: &mut MetricsRegistry) {
        r.register(
            "snapreg_gc_runs",
            "Garbage collections run",
            self.gc_runs.clone(),
        );
        let help = "Bytes of chunk objects garbage collection removed";
        r.register_with_unit(
            "snapreg_gc_reclaimed",
            help,
            Unit::Bytes,
            self.gc_reclaimed_bytes.clone(),
        );
        r.register(
            "snapreg_gc_swept_chunks",
            "Chunks garbage collection removed",
            self.gc_swept_chunks.clone(),
        );
        if let Some(h) = &self.gc_duration {
            r.register(
                "snapreg_gc_duration_seconds",
                "How long each garbage collection took",
                h.clone(),
            );
        }
        r.register("snapreg_scrub_runs", "Scrubs run", self.scrub_runs.clone());
        let help = "Objects scrubs read and verified";
        r.register(
            "snapreg_scrub_checked_objects",
            help,
            self.scrub_checked.clone(),
        );
        let help = "Damaged objects scrubs found, by kind (chunk, manifest)";
        r.register("snapreg_scrub_findings", help, self.scrub_findings.clone());
        let help = "Commit-log entries a replication peer has not acknowledged";
        r.register(
            "snapreg_replication_lag_entries",
            help,
            self.replication_lag_entries.clone(),
        );
        let help = "While a peer is behind, seconds since it last acknowledged (0 when caught up)";
        r.register(
            "snapreg_replication_lag_seconds",
            help,
            self.replication_lag_seconds.clone(),
        );
        let help = "Restore outcomes nodes reported, by outcome and failed phase";
        r.register("snapreg_restores_reported", help, self.restores.clone());
        let help = "How long the restores nodes reported took";
        r.register(
            "snapreg_restore_duration_seconds",
            help,
            self.restore_durations.0.clone(),
        );
        let help = "Failed replication attempts at a peer since its last success";
        r.register(
            "snapreg_replication_failures",
            help,
            self.replication_failures.clone(),
        );
    }

    pub fn push_chunks(&self, result: &'static str, n: u64) {
        self.push_chunks
            .get_or_create(&ResultLabel { result })
            .inc_by(n);
    }

    pub fn record_gc(&self, report: &GcReport, dry_run: bool, took: Duration) {
        let dry_run = if dry_run { "true" } else { "false" };
        self.gc_runs.get_or_create(&DryRunLabel { dry_run }).inc();
        if let Some(h) = &self.gc_duration {
            h.observe(took.as_secs_f64());
        }
        if dry_run == "false" {
            self.gc_reclaimed_bytes.inc_by(report.bytes_swept);
            self.gc_swept_chunks.inc_by(report.chunks_swept);
        }
    }

    pub fn record_scrub(&self, report: &ScrubReport) {
        self.scrub_runs.inc();
        self.scrub_checked
            .inc_by(report.chunks_checked + report.manifests_checked);
        for d in &report.damaged {
            self.scrub_findings
                .get_or_create(&KindLabel { kind: d.kind })
                .inc();
        }
    }

    pub fn record_restore(&self, o: &Outcome) {
        let outcome = if o.success { "success" } else { "failure" };
        let phase = o.phase.chars().take(32).collect();
        self.restores
            .get_or_create(&RestoreLabels { outcome, phase })
            .inc();
        self.restore_durations
            .0
            .get_or_create(&OutcomeLabel { outcome })
            .observe(o.seconds);
    }

    /// Copies the replicator's view into the lag gauges (before each scrape).
    pub fn update_replication(&self, status: &ReplicationStatus) {
        let now = now_ms();
        for p in &status.peers {
            let label = PeerLabel {
                peer: p.name.clone(),
            };
            self.replication_lag_entries
                .get_or_create(&label)
                .set(p.entries_behind as i64);
            let since = p.last_success_unix_ms.max(self.started_ms);
            let seconds = if p.entries_behind == 0 {
                0.0
            } else {
                now.saturating_sub(since) as f64 / 1000.0
            };
            self.replication_lag_seconds
                .get_or_create(&label)
                .set(seconds);
            self.replication_failures
                .get_or_create(&label)
                .set(p.failures as i64);
        }
    }
}
