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
//!   the caller's sequence, then waits on [`Registry::log_appended`] (bumped after each
//!   append) and sends what is new; it ends when the caller goes away or the server
//!   shuts down. A manifest record is `TAG_MOVED`, a tombstone `TAG_DELETED`.
//! - **Nodes.** `RegisterNode` stores a node agent's facts, URL and cache summary
//!   under index.rs `n/<node name>` (JSON, stamped with the registry's time; node-local,
//!   not replicated); `ListNodes` returns them all, by name.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use snapreg_proto::compat::{self, CheckOptions, CompatRecord, GpuDevice, GpuRecord};
use snapreg_proto::manifest::{Extent, Manifest};
use snapreg_proto::pb;
use snapreg_proto::tags::{TagRecord, TagTarget};
use snapreg_proto::Digest;
use tonic::Status;

use crate::error::RegistryError;
use crate::server::Registry;

/// Log entries read per batch by a Watch stream.
const WATCH_BATCH: usize = 256;
/// Events buffered per Watch stream before it waits for the caller.
const WATCH_BUFFER: usize = 64;

pub type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchEvent, Status>> + Send>>;

/// The node's facts as the compatibility rules take them.
pub fn node_record(n: pb::NodeFacts) -> CompatRecord {
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
        labels: n.labels.into_iter().collect(),
    }
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

pub async fn resolve(
    reg: &Arc<Registry>,
    req: pb::ResolveRequest,
) -> Result<pb::ResolveResponse, Status> {
    snapreg_proto::reference::validate_repository(&req.repository)
        .map_err(|r| RegistryError::invalid("repository", r))?;
    let node = node_record(
        req.node
            .ok_or_else(|| RegistryError::invalid("node", "the node's facts are required"))?,
    );
    let cached = req
        .cached_digests
        .iter()
        .map(|b| {
            Digest::from_slice(b).map_err(|_| {
                RegistryError::invalid("cached_digests", "each must be a 32-byte BLAKE3 digest")
            })
        })
        .collect::<Result<HashSet<Digest>, _>>()?;
    let opts = CheckOptions {
        required_labels: req.required_labels.into_iter().collect(),
        gpu_remapped: req.gpu_remapped,
    };
    reg.refresh_tags(&req.repository).await?;
    let tags: Vec<(String, TagRecord, Digest)> = reg
        .index
        .all_tags()?
        .into_iter()
        .filter(|(r, _, _)| *r == req.repository)
        .filter_map(|(_, tag, rec)| rec.digest().map(|d| (tag, rec, d)))
        .collect();
    if tags.is_empty() {
        return Err(Status::not_found(format!(
            "repository {:?} has no tags; `snapctl ls` lists repositories",
            req.repository
        )));
    }
    let mut manifests: HashMap<Digest, Manifest> = HashMap::new();
    let mut compatible = Vec::new();
    let mut incompatible = Vec::new();
    for (tag, rec, digest) in tags {
        if let Entry::Vacant(slot) = manifests.entry(digest) {
            let bytes = reg.store.get_manifest(&digest).await?;
            slot.insert(Manifest::decode(&bytes).map_err(RegistryError::from)?);
        }
        let m = &manifests[&digest];
        let verdict = compat::check(&m.compat, &node, &opts);
        if !verdict.is_compatible() {
            incompatible.push(pb::IncompatibleSnapshot {
                tag,
                digest: digest.to_string(),
                mismatches: verdict.mismatches.iter().map(|x| x.to_string()).collect(),
                fields: verdict
                    .mismatches
                    .iter()
                    .map(|x| x.field.to_string())
                    .collect(),
            });
            continue;
        }
        let (bytes_total, bytes_stored, chunks, cached_bytes, chunks_cached) = sizes(m, &cached);
        compatible.push(pb::ResolvedSnapshot {
            tag,
            digest: digest.to_string(),
            bytes_total,
            bytes_stored,
            cached_bytes,
            created_unix: m.created.unix_seconds,
            hlc: rec.hlc.0,
            chunks,
            chunks_cached,
            warnings: verdict.warnings.iter().map(|x| x.to_string()).collect(),
        });
    }
    compatible
        .sort_by(|a, b| (b.created_unix, b.hlc, &b.tag).cmp(&(a.created_unix, a.hlc, &a.tag)));
    Ok(pb::ResolveResponse {
        compatible,
        incompatible,
    })
}

/// The event a log entry stands for; `None` for an entry that does not parse.
fn event(seq: u64, e: crate::index::LogEntry) -> Option<pb::WatchEvent> {
    let rec = TagRecord::parse(&e.record_name).ok()?;
    let (kind, digest) = match rec.target {
        TagTarget::Manifest(d) => (pb::watch_event::Kind::TagMoved, d.to_string()),
        TagTarget::Deleted => (pb::watch_event::Kind::TagDeleted, String::new()),
    };
    Some(pb::WatchEvent {
        sequence: seq,
        kind: kind as i32,
        repository: e.repository,
        tag: e.tag,
        digest,
        hlc: rec.hlc.0,
    })
}

pub fn watch(reg: &Arc<Registry>, from_sequence: u64) -> WatchStream {
    let (tx, rx) = tokio::sync::mpsc::channel(WATCH_BUFFER);
    let reg = reg.clone();
    tokio::spawn(async move {
        let mut appended = reg.log_appended.subscribe();
        let mut stop = reg.shutting_down.subscribe();
        let mut after = from_sequence;
        loop {
            // Mark the current version seen *before* reading: an append after the read
            // below then always wakes the wait that follows it.
            appended.borrow_and_update();
            loop {
                let batch = match reg.index.log_entries_after(after, WATCH_BATCH) {
                    Ok(b) => b,
                    Err(e) => {
                        let _ = tx.send(Err(Status::from(e))).await;
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

/// A node agent's registration as index.rs stores it under `n/<node name>` (JSON).
#[derive(serde::Serialize, serde::Deserialize)]
struct NodeEntry {
    agent_url: String,
    facts: NodeFactsJson,
    cache_bytes: u64,
    cache_chunks: u64,
    cache_limit_bytes: u64,
    registered_unix_ms: u64,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct NodeFactsJson {
    arch: String,
    cpu_features: Vec<String>,
    kernel: String,
    criu_version: Option<String>,
    container_image: Option<String>,
    gpu: Option<GpuFactsJson>,
    labels: std::collections::BTreeMap<String, String>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct GpuFactsJson {
    models: Vec<String>,
    driver_version: String,
    cuda_driver_api: u32,
    mig_profile: Option<String>,
}

impl From<pb::NodeFacts> for NodeFactsJson {
    fn from(n: pb::NodeFacts) -> Self {
        NodeFactsJson {
            arch: n.arch,
            cpu_features: n.cpu_features,
            kernel: n.kernel,
            criu_version: n.criu_version,
            container_image: n.container_image,
            gpu: n.gpu.map(|g| GpuFactsJson {
                models: g.models,
                driver_version: g.driver_version,
                cuda_driver_api: g.cuda_driver_api,
                mig_profile: g.mig_profile,
            }),
            labels: n.labels.into_iter().collect(),
        }
    }
}

impl From<NodeFactsJson> for pb::NodeFacts {
    fn from(n: NodeFactsJson) -> Self {
        pb::NodeFacts {
            arch: n.arch,
            cpu_features: n.cpu_features,
            kernel: n.kernel,
            criu_version: n.criu_version,
            container_image: n.container_image,
            gpu: n.gpu.map(|g| pb::GpuFacts {
                models: g.models,
                driver_version: g.driver_version,
                cuda_driver_api: g.cuda_driver_api,
                mig_profile: g.mig_profile,
            }),
            labels: n.labels.into_iter().collect(),
        }
    }
}

/// `RegisterNode`: stores (replaces) the node's entry, stamped with the registry's time.
pub fn register_node(
    reg: &Registry,
    req: pb::RegisterNodeRequest,
) -> Result<pb::RegisterNodeResponse, Status> {
    let name = req.node_name.trim();
    if name.is_empty() || name.len() > 253 || name.chars().any(|c| c.is_control()) {
        return Err(RegistryError::invalid(
            "node_name",
            "must be 1-253 printable characters (e.g. the node's hostname)",
        )
        .into());
    }
    let facts = req
        .facts
        .ok_or_else(|| RegistryError::invalid("facts", "the node's facts are required"))?;
    let registered_unix_ms = crate::server::now_ms();
    let entry = NodeEntry {
        agent_url: req.agent_url,
        facts: facts.into(),
        cache_bytes: req.cache_bytes,
        cache_chunks: req.cache_chunks,
        cache_limit_bytes: req.cache_limit_bytes,
        registered_unix_ms,
    };
    let value = serde_json::to_vec(&entry).map_err(|e| Status::internal(e.to_string()))?;
    reg.index.put_node(name, &value)?;
    Ok(pb::RegisterNodeResponse { registered_unix_ms })
}

/// `ListNodes`: every registered node, by name (unreadable entries are skipped).
pub fn list_nodes(reg: &Registry) -> Result<pb::ListNodesResponse, Status> {
    let nodes = reg
        .index
        .nodes()?
        .into_iter()
        .filter_map(|(node_name, v)| {
            let e: NodeEntry = serde_json::from_slice(&v).ok()?;
            Some(pb::NodeInfo {
                node_name,
                agent_url: e.agent_url,
                facts: Some(e.facts.into()),
                cache_bytes: e.cache_bytes,
                cache_chunks: e.cache_chunks,
                cache_limit_bytes: e.cache_limit_bytes,
                registered_unix_ms: e.registered_unix_ms,
            })
        })
        .collect();
    Ok(pb::ListNodesResponse { nodes })
}
