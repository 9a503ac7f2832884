//! The node agent's Prometheus metrics (`snapctl agent --metrics-listen`).
//!
//! | metric | what |
//! |---|---|
//! | `snapreg_node_fetched_chunks_total{path}`, `snapreg_node_fetched_bytes_total{path}` | chunks this node fetched, and their bytes as stored, by path: `registry`, `direct` (presigned object-store URL) or `peer` |
//! | `snapreg_node_cache_hits_total`, `snapreg_node_cache_misses_total` | chunk reads of prefetch and pull-restore the node cache served / had to fetch |
//! | `snapreg_node_operations_total{operation,outcome}` | snapctl operations on this node (`pull`, `pull-restore`, `checkpoint`, `push`, `prefetch`), `ok` or `error` |
//! | `snapreg_node_operation_duration_seconds{operation}` | how long each took |
//! | `snapreg_node_phase_duration_seconds{operation,phase}` | restore and checkpoint phases: `criu-restore`, `cuda-restore`, `freeze`, `dump`, `cuda-checkpoint` |
//! | `snapreg_node_reports_rejected_total` | operation reports the agent could not read (node_reports.rs) |
//! | `snapreg_node_peer_served_chunks_total`, `snapreg_node_peer_served_bytes_total`, `snapreg_node_peer_calls_refused_total` | what this agent served to sibling nodes |
//! | `snapreg_node_cache_bytes`, `snapreg_node_cache_limit_bytes` | the node cache's size and limit (updated on each registration tick) |
//!
//! Operations the agent runs itself (Prefetch) are counted directly; those of
//! snapctl processes arrive as operation reports (node_reports.rs), taken before
//! each scrape and on each registration tick.

use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::cache::Usage;
use crate::node_reports::{self, OperationReport};
use crate::peer::serve::Served;

/// Reports taken per pass (a backlog drains over several scrapes).
const TAKE_PER_PASS: usize = 1000;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PathLabel {
    path: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabels {
    operation: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabel {
    operation: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    operation: String,
    phase: String,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

fn histograms<L: Clone + std::hash::Hash + Eq>() -> Histograms<L> {
    Family::new_with_constructor(|| Histogram::new(snapreg_telemetry::duration_buckets()))
}

/// Every node metric; one per agent process.
pub struct NodeMetrics {
    fetched_chunks: Family<PathLabel, Counter>,
    fetched_bytes: Family<PathLabel, Counter>,
    cache_hits: Counter,
    cache_misses: Counter,
    operations: Family<OperationLabels, Counter>,
    durations: Histograms<OperationLabel>,
    phases: Histograms<PhaseLabels>,
    rejected: Counter,
    peer_chunks: Counter,
    peer_bytes: Counter,
    peer_refused: Counter,
    cache_bytes: Gauge,
    cache_limit: Gauge,
    /// Where reports wait and what the peer service counted (set when the agent runs).
    sources: Mutex<Option<(PathBuf, Arc<Served>)>>,
}

impl NodeMetrics {
    pub fn new(r: &mut Registry) -> Arc<Self> {
        let m = NodeMetrics {
            fetched_chunks: Family::default(),
            fetched_bytes: Family::default(),
            cache_hits: Counter::default(),
            cache_misses: Counter::default(),
            operations: Family::default(),
            durations: histograms(),
            phases: histograms(),
            rejected: Counter::default(),
            peer_chunks: Counter::default(),
            peer_bytes: Counter::default(),
            peer_refused: Counter::default(),
            cache_bytes: Gauge::default(),
            cache_limit: Gauge::default(),
            sources: Mutex::new(None),
        };
        m.register(r);
        Arc::new(m)
    }

    fn register(&self, r: &mut Registry) {
        let help = "Chunks this node fetched, by path (registry, direct, peer)";
        r.register(
            "snapreg_node_fetched_chunks",
            help,
            self.fetched_chunks.clone(),
        );
        let help = "Bytes of the chunks this node fetched, as stored, by path";
        r.register_with_unit(
            "snapreg_node_fetched",
            help,
            Unit::Bytes,
            self.fetched_bytes.clone(),
        );
        let help = "Chunk reads the node cache served";
        r.register("snapreg_node_cache_hits", help, self.cache_hits.clone());
        let help = "Chunk reads the node cache could not serve (fetched instead)";
        r.register("snapreg_node_cache_misses", help, self.cache_misses.clone());
        let help = "snapctl operations on this node, by outcome";
        r.register("snapreg_node_operations", help, self.operations.clone());
        let help = "How long snapctl operations on this node took";
        r.register(
            "snapreg_node_operation_duration_seconds",
            help,
            self.durations.clone(),
        );
        let help = "How long each phase of a restore or checkpoint took";
        r.register(
            "snapreg_node_phase_duration_seconds",
            help,
            self.phases.clone(),
        );
        let help = "Operation reports the agent could not read";
        r.register("snapreg_node_reports_rejected", help, self.rejected.clone());
        let help = "Chunks this agent served to sibling nodes";
        r.register(
            "snapreg_node_peer_served_chunks",
            help,
            self.peer_chunks.clone(),
        );
        let help = "Bytes of the chunks this agent served to sibling nodes";
        r.register_with_unit(
            "snapreg_node_peer_served",
            help,
            Unit::Bytes,
            self.peer_bytes.clone(),
        );
        let help = "Peer calls this agent refused (no certificate or token)";
        r.register(
            "snapreg_node_peer_calls_refused",
            help,
            self.peer_refused.clone(),
        );
        let help = "Bytes the node chunk cache holds";
        r.register_with_unit(
            "snapreg_node_cache",
            help,
            Unit::Bytes,
            self.cache_bytes.clone(),
        );
        let help = "The node chunk cache's size limit";
        r.register_with_unit(
            "snapreg_node_cache_limit",
            help,
            Unit::Bytes,
            self.cache_limit.clone(),
        );
    }

    /// Where this agent's reports wait (its node cache; asks snapctl to leave them
    /// there) and its peer counters.
    pub(super) fn attach(&self, cache_dir: PathBuf, served: Arc<Served>) {
        if let Err(e) = node_reports::enable(&cache_dir) {
            tracing::warn!("agent: operation reports off: {e}");
        }
        *self.sources.lock().unwrap() = Some((cache_dir, served));
    }

    /// Folds in one operation's report.
    pub fn fold(&self, r: &OperationReport) {
        let c = &r.counters;
        let registry_chunks = c
            .chunks_transferred
            .saturating_sub(c.chunks_from_peers + c.chunks_direct);
        let registry_bytes = c
            .bytes_transferred
            .saturating_sub(c.bytes_from_peers + c.bytes_direct);
        for (path, chunks, bytes) in [
            ("registry", registry_chunks, registry_bytes),
            ("direct", c.chunks_direct, c.bytes_direct),
            ("peer", c.chunks_from_peers, c.bytes_from_peers),
        ] {
            let label = PathLabel { path };
            self.fetched_chunks.get_or_create(&label).inc_by(chunks);
            self.fetched_bytes.get_or_create(&label).inc_by(bytes);
        }
        // Only these read through the node cache (pull writes files directly).
        if r.operation == "prefetch" || r.operation == "pull-restore" {
            self.cache_hits.inc_by(c.chunks_cached);
            self.cache_misses.inc_by(c.chunks_transferred);
        }
        let operation = r.operation.clone();
        let outcome = r.outcome.as_str();
        self.operations
            .get_or_create(&OperationLabels {
                operation: operation.clone(),
                outcome,
            })
            .inc();
        self.durations
            .get_or_create(&OperationLabel {
                operation: operation.clone(),
            })
            .observe(r.seconds);
        for (phase, seconds) in &r.phases {
            let labels = PhaseLabels {
                operation: operation.clone(),
                phase: phase.clone(),
            };
            self.phases.get_or_create(&labels).observe(*seconds);
        }
    }

    /// Takes the waiting operation reports and copies the peer counters (before each
    /// scrape, and on each registration tick).
    pub fn refresh(&self) {
        // Held throughout: a scrape and a tick must not both fold the same report.
        let sources = self.sources.lock().unwrap();
        let Some((dir, served)) = &*sources else {
            return;
        };
        match node_reports::take(dir, TAKE_PER_PASS) {
            Ok(taken) => {
                for r in &taken.reports {
                    self.fold(r);
                }
                for (path, why) in &taken.rejected {
                    tracing::warn!("agent: dropped operation report {}: {why}", path.display());
                }
                self.rejected.inc_by(taken.rejected.len() as u64);
            }
            Err(e) => tracing::warn!("agent: reading operation reports in {}: {e}", dir.display()),
        }
        catch_up(&self.peer_chunks, served.chunks.load(Relaxed));
        catch_up(&self.peer_bytes, served.bytes.load(Relaxed));
        catch_up(&self.peer_refused, served.refused.load(Relaxed));
    }

    pub(super) fn cache_usage(&self, u: &Usage) {
        self.cache_bytes.set(u.bytes as i64);
        self.cache_limit.set(u.limit_bytes as i64);
    }
}

/// Raises a counter to `value` (counters only go up; `value` is another counter).
fn catch_up(counter: &Counter, value: u64) {
    let now = counter.get();
    if value > now {
        counter.inc_by(value - now);
    }
}
