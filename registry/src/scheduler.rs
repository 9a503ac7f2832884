//! The scheduler API: `Resolve` and `Watch`.
//!
//! - **Resolve.** Every current tag of a repository, its manifest checked against the
//!   node's facts with [`snapreg_proto::compat::check`] — the function pull-restore
//!   uses, so a node the scheduler picks never refuses the snapshot it is given.
//!   Compatible snapshots come newest first (manifest `created.unix_seconds`, then the
//!   tag record's HLC), with their logical size, the bytes of their distinct chunks,
//!   and how many of those the node caches (from the digests the caller sends).
//!   Incompatible ones come with their mismatches, so a scheduler can explain.
//! - **Watch.** The replication log (index.rs `r/<seq>`) is the event source: durable,
//!   ordered, numbered per registry, holding exactly this registry's own tag commits
//!   (replicated-in records are never logged). A stream first sends every entry above
//!   the caller's sequence, then waits on [`Registry::subscribe_log`] (changed after each
//!   append) and sends what is new; it ends when the caller goes away or the server
//!   shuts down. A manifest record is `TAG_MOVED`, a tombstone `TAG_DELETED`.
//! - **Nodes.** `RegisterNode` stores a node agent's facts, URL and cache summary
//!   under index.rs `n/<node name>` (JSON, stamped with the registry's time; node-local,
//!   not replicated); `ListNodes` returns them all, by name.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use snapreg_proto::compat::{self, CheckOptions, CompatRecord, GpuDevice, GpuRecord};
use snapreg_proto::manifest::{Extent, Manifest};
use snapreg_proto::tags::{Hlc, TagRecord, TagTarget};
use snapreg_proto::Digest;
use tokio::sync::watch;

use crate::clock::now_ms;
use crate::error::{RegistryError, Result};
use crate::index::LogEntry;
use crate::registry::{repo_arg, Registry};

/// Log entries read per batch by a Watch stream.
const WATCH_BATCH: usize = 256;
/// Events buffered per Watch stream before it waits for the caller.
const WATCH_BUFFER: usize = 64;

/// A node's facts, as agents report them and as index.rs stores them (JSON).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NodeFacts {
    pub arch: String,
    pub cpu_features: Vec<String>,
    pub kernel: String,
    pub criu_version: Option<String>,
    pub container_image: Option<String>,
    pub gpu: Option<GpuFacts>,
    pub labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GpuFacts {
    pub models: Vec<String>,
    pub driver_version: String,
    pub cuda_driver_api: u32,
    pub mig_profile: Option<String>,
}

/// The node's facts as the compatibility rules take them.
impl From<NodeFacts> for CompatRecord {
    fn from(n: NodeFacts) -> Self {
        CompatRecord {
            arch: n.arch,
            cpu_features: n.cpu_features,
            kernel: n.kernel,
            criu_version: n.criu_version,
            container_image: n.container_image,
            gpu: n.gpu.map(|g| GpuRecord {
                devices: g
                    .models
                    .into_iter()
                    .map(|model| GpuDevice { model, uuid: None })
                    .collect(),
                driver_version: g.driver_version,
                cuda_driver_api: g.cuda_driver_api,
                mig_profile: g.mig_profile,
            }),
            labels: n.labels,
        }
    }
}

/// What a scheduler asks Resolve.
#[derive(Clone, Debug)]
pub struct ResolveQuery {
    pub repository: String,
    pub node: NodeFacts,
    /// Chunks the node caches.
    pub cached: HashSet<Digest>,
    pub options: CheckOptions,
}

/// A snapshot the node can restore, with what it would cost.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompatibleSnapshot {
    pub tag: String,
    pub digest: Digest,
    /// Logical bytes of every file.
    pub bytes_total: u64,
    /// Uncompressed bytes of its distinct chunks.
    pub bytes_stored: u64,
    /// Of `bytes_stored`, what the node caches.
    pub cached_bytes: u64,
    pub created_unix: u64,
    pub hlc: Hlc,
    pub chunks: u64,
    pub chunks_cached: u64,
    pub warnings: Vec<String>,
}

/// A snapshot the node cannot restore, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IncompatibleSnapshot {
    pub tag: String,
    pub digest: Digest,
    pub mismatches: Vec<String>,
    /// The compatibility fields that mismatch, one per mismatch.
    pub fields: Vec<String>,
}

/// Resolve's answer: compatible snapshots newest first, then the rest.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resolved {
    pub compatible: Vec<CompatibleSnapshot>,
    pub incompatible: Vec<IncompatibleSnapshot>,
}

/// Sizes of one manifest: (bytes_total, bytes_stored, chunks, cached_bytes, chunks_cached).
fn sizes(m: &Manifest, cached: &HashSet<Digest>) -> (u64, u64, u64, u64, u64) {
    let mut seen = HashSet::new();
    let (mut stored, mut chunks, mut cached_bytes, mut chunks_cached) = (0, 0, 0, 0);
    for e in m
        .layers
        .iter()
        .flat_map(|l| &l.files)
        .flat_map(|f| &f.extents)
    {
        if let Extent::Chunk { chunk, len } = e {
            if seen.insert(*chunk) {
                stored += len;
                chunks += 1;
                if cached.contains(chunk) {
                    cached_bytes += len;
                    chunks_cached += 1;
                }
            }
        }
    }
    (m.total_size(), stored, chunks, cached_bytes, chunks_cached)
}

/// Why the snapshot's recent restores on nodes like `node` keep it from being
/// offered (restore_outcomes.rs), if they do.
async fn withheld_by_outcomes(
    reg: &Registry,
    digest: &Digest,
    node: &CompatRecord,
) -> Result<Option<String>> {
    let threshold = reg.restore_failure_threshold();
    if threshold == 0 {
        return Ok(None);
    }
    let outcomes = crate::restore_outcomes::recent(reg, digest).await?;
    let models = gpu_models(node);
    Ok(crate::restore_outcomes::withheld(
        &outcomes, &models, threshold,
    ))
}

/// A node's GPU models in CUDA order (empty without GPUs).
pub fn gpu_models(node: &CompatRecord) -> Vec<String> {
    node.gpu
        .as_ref()
        .map(|g| g.devices.iter().map(|d| d.model.clone()).collect())
        .unwrap_or_default()
}

pub async fn resolve(reg: &Registry, query: ResolveQuery) -> Result<Resolved> {
    repo_arg(&query.repository)?;
    let node = CompatRecord::from(query.node);
    let tags = reg.current_tags(&query.repository).await?;
    let mut manifests: HashMap<Digest, Manifest> = HashMap::new();
    let mut resolved = Resolved::default();
    for (tag, rec, digest) in tags {
        if let Entry::Vacant(slot) = manifests.entry(digest) {
            let bytes = reg.store().get_manifest(&digest).await?;
            slot.insert(Manifest::decode(&bytes)?);
        }
        let m = &manifests[&digest];
        let verdict = compat::check(&m.compat, &node, &query.options);
        if !verdict.is_compatible() {
            resolved.incompatible.push(IncompatibleSnapshot {
                tag,
                digest,
                mismatches: verdict.mismatches.iter().map(|x| x.to_string()).collect(),
                fields: verdict
                    .mismatches
                    .iter()
                    .map(|x| x.field.to_string())
                    .collect(),
            });
            continue;
        }
        if let Some(why) = withheld_by_outcomes(reg, &digest, &node).await? {
            resolved.incompatible.push(IncompatibleSnapshot {
                tag,
                digest,
                mismatches: vec![why],
                fields: vec!["restore_outcomes".into()],
            });
            continue;
        }
        let (bytes_total, bytes_stored, chunks, cached_bytes, chunks_cached) =
            sizes(m, &query.cached);
        resolved.compatible.push(CompatibleSnapshot {
            tag,
            digest,
            bytes_total,
            bytes_stored,
            cached_bytes,
            created_unix: m.created.unix_seconds,
            hlc: rec.hlc,
            chunks,
            chunks_cached,
            warnings: verdict.warnings.iter().map(|x| x.to_string()).collect(),
        });
    }
    resolved
        .compatible
        .sort_by(|a, b| (b.created_unix, b.hlc, &b.tag).cmp(&(a.created_unix, a.hlc, &a.tag)));
    Ok(resolved)
}

/// One commit of this registry, as Watch streams it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommitEvent {
    pub sequence: u64,
    pub repository: String,
    pub tag: String,
    pub hlc: Hlc,
    /// The manifest the tag moved to, or a deletion.
    pub target: TagTarget,
}

pub type EventStream = Pin<Box<dyn Stream<Item = Result<CommitEvent>> + Send>>;

/// The event a log entry stands for; `None` for an entry that does not parse.
fn event(seq: u64, e: LogEntry) -> Option<CommitEvent> {
    let rec = TagRecord::parse(&e.record_name).ok()?;
    Some(CommitEvent {
        sequence: seq,
        repository: e.repository,
        tag: e.tag,
        hlc: rec.hlc,
        target: rec.target,
    })
}

/// Every commit after `from_sequence`, then each new one as it is appended, until
/// the caller goes away or `stop` turns true (or its sender is dropped).
pub fn watch(
    reg: &Arc<Registry>,
    from_sequence: u64,
    mut stop: watch::Receiver<bool>,
) -> EventStream {
    let (tx, rx) = tokio::sync::mpsc::channel(WATCH_BUFFER);
    let reg = reg.clone();
    tokio::spawn(async move {
        let mut appended = reg.subscribe_log();
        let mut after = from_sequence;
        loop {
            // Mark the current version seen *before* reading: an append after the read
            // below then always wakes the wait that follows it.
            appended.borrow_and_update();
            loop {
                let batch = match reg.log_entries_after(after, WATCH_BATCH) {
                    Ok(b) => b,
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                };
                let full = batch.len() == WATCH_BATCH;
                for (seq, entry) in batch {
                    after = seq;
                    if let Some(ev) = event(seq, entry) {
                        if tx.send(Ok(ev)).await.is_err() {
                            return; // the caller went away
                        }
                    }
                }
                if !full {
                    break;
                }
            }
            tokio::select! {
                r = appended.changed() => if r.is_err() { return },
                _ = stop.wait_for(|s| *s) => return,
                _ = tx.closed() => return,
            }
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// What a node agent reports when it registers.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NodeRegistration {
    pub agent_url: String,
    pub facts: NodeFacts,
    pub cache_bytes: u64,
    pub cache_chunks: u64,
    pub cache_limit_bytes: u64,
}

/// A registration as index.rs stores it under `n/<node name>` (JSON).
#[derive(serde::Serialize, serde::Deserialize)]
struct NodeEntry {
    #[serde(flatten)]
    node: NodeRegistration,
    registered_unix_ms: u64,
}

/// A registered node, as ListNodes shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegisteredNode {
    pub name: String,
    pub node: NodeRegistration,
    /// The registry's time when the node last registered.
    pub registered_unix_ms: u64,
}

/// `RegisterNode`: stores (replaces) the node's entry, stamped with the registry's
/// time, which it returns.
pub fn register_node(reg: &Registry, name: &str, node: NodeRegistration) -> Result<u64> {
    let name = name.trim();
    if name.is_empty() || name.len() > 253 || name.chars().any(|c| c.is_control()) {
        return Err(RegistryError::invalid(
            "node_name",
            "must be 1-253 printable characters (e.g. the node's hostname)",
        ));
    }
    let registered_unix_ms = now_ms();
    let entry = NodeEntry {
        node,
        registered_unix_ms,
    };
    let value = serde_json::to_vec(&entry).expect("a node entry serializes");
    reg.index().put_node(name, &value)?;
    Ok(registered_unix_ms)
}

/// `ListNodes`: every registered node, by name (unreadable entries are skipped).
pub fn list_nodes(reg: &Registry) -> Result<Vec<RegisteredNode>> {
    Ok(reg
        .index()
        .nodes()?
        .into_iter()
        .filter_map(|(name, v)| {
            let e: NodeEntry = serde_json::from_slice(&v).ok()?;
            Some(RegisteredNode {
                name,
                node: e.node,
                registered_unix_ms: e.registered_unix_ms,
            })
        })
        .collect())
}
