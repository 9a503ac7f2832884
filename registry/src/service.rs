//! `snapreg.v1.Registry` handlers: each turns its request into domain values (wire
//! fields parsed here, named in the error when they do not parse), calls
//! [`Registry`] or a domain module, and turns the answer back into protobuf.
//! `From<RegistryError> for Status` below is the one place errors become statuses.

use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use snapreg_proto::compat::CheckOptions;
use snapreg_proto::pb::{self, registry_server};
use snapreg_proto::tags::TagTarget;
use snapreg_proto::Digest;
use tokio::sync::watch;
use tonic::{Request, Response, Status, Streaming};

use crate::drain::Drain;
use crate::error::{RegistryError, Result};
use crate::gc::GcReport;
use crate::metrics::RegistryMetrics;
use crate::registry::{Registry, ReplicatedRecord};
use crate::replication::{ReplicationStatus, Replicator};
use crate::restore_outcomes::Outcome as RestoreOutcome;
use crate::retention::{Outcome, Policy};
use crate::scheduler::{
    CommitEvent, GpuFacts, NodeFacts, NodeRegistration, RegisteredNode, ResolveQuery, Resolved,
};
use crate::scrub::ScrubReport;
use crate::tracker::{Announce, Tracker};

/// Chunks fetched from the store ahead of the one being sent, per GetChunks stream.
const GET_CHUNKS_READAHEAD: usize = 8;
/// Digests one FindMissingChunks or GetChunks call may name: 64 Ki x 34 bytes stays
/// far below the message limit, and clients ask for 512 and 32 at a time.
const MAX_DIGESTS_PER_CALL: usize = 1 << 16;

impl From<RegistryError> for Status {
    fn from(e: RegistryError) -> Status {
        use RegistryError::*;
        let msg = e.to_string();
        match e {
            ChunkCorrupt { .. } => Status::data_loss(msg),
            ChunkMissing { .. }
            | TagNotFound { .. }
            | RepositoryNotFound { .. }
            | ManifestNotFound { .. } => Status::not_found(msg),
            ManifestIncomplete { .. }
            | LeaseUnknown { .. }
            | ManifestTagged { .. }
            | ManifestBusy { .. } => Status::failed_precondition(msg),
            Manifest(snapreg_proto::Error::ManifestVersion { .. }) => {
                Status::failed_precondition(msg)
            }
            Manifest(_) | InvalidArgument { .. } => Status::invalid_argument(msg),
            Store(object_store::Error::NotFound { .. }) => Status::not_found(msg),
            Busy(_) | Draining => Status::unavailable(msg),
            EncryptionRequired { .. } | PermissionDenied(_) => Status::permission_denied(msg),
            Unauthenticated(_) => Status::unauthenticated(msg),
            Store(_)
            | Index(_)
            | Io(_)
            | LayoutVersion { .. }
            | PeerSetup { .. }
            | PeerCall { .. } => {
                tracing::error!("internal error: {msg}");
                Status::unavailable(format!("registry storage failed: {msg}"))
            }
        }
    }
}

/// A manifest digest as text ("blake3:<hex>").
fn manifest_digest_arg(text: &str) -> Result<Digest> {
    text.parse()
        .map_err(|e| RegistryError::invalid("digest", format!("{e} (want blake3:<64 hex>)")))
}

fn digest_arg(field: &'static str, bytes: &[u8]) -> Result<Digest> {
    Digest::from_slice(bytes)
        .map_err(|_| RegistryError::invalid(field, "must be a 32-byte BLAKE3 digest"))
}

fn digests_arg(field: &'static str, list: &[Bytes]) -> Result<Vec<Digest>> {
    if list.len() > MAX_DIGESTS_PER_CALL {
        return Err(RegistryError::invalid(
            field,
            format!(
                "{} digests in one call; send at most {MAX_DIGESTS_PER_CALL}",
                list.len()
            ),
        ));
    }
    list.iter().map(|b| digest_arg(field, b)).collect()
}

fn digest_bytes(d: &Digest) -> Bytes {
    Bytes::copy_from_slice(&d.0)
}

/// A required message field: handlers past this never see an `Option`.
fn required<T>(field: &'static str, value: Option<T>, what: &str) -> Result<T> {
    value.ok_or_else(|| RegistryError::invalid(field, format!("{what} are required")))
}

impl From<pb::NodeFacts> for NodeFacts {
    fn from(n: pb::NodeFacts) -> Self {
        NodeFacts {
            arch: n.arch,
            cpu_features: n.cpu_features,
            kernel: n.kernel,
            criu_version: n.criu_version,
            container_image: n.container_image,
            gpu: n.gpu.map(|g| GpuFacts {
                models: g.models,
                driver_version: g.driver_version,
                cuda_driver_api: g.cuda_driver_api,
                mig_profile: g.mig_profile,
            }),
            labels: n.labels.into_iter().collect(),
        }
    }
}

impl From<NodeFacts> for pb::NodeFacts {
    fn from(n: NodeFacts) -> Self {
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

impl From<RegisteredNode> for pb::NodeInfo {
    fn from(n: RegisteredNode) -> Self {
        pb::NodeInfo {
            node_name: n.name,
            agent_url: n.node.agent_url,
            facts: Some(n.node.facts.into()),
            cache_bytes: n.node.cache_bytes,
            cache_chunks: n.node.cache_chunks,
            cache_limit_bytes: n.node.cache_limit_bytes,
            registered_unix_ms: n.registered_unix_ms,
        }
    }
}

impl TryFrom<pb::ResolveRequest> for ResolveQuery {
    type Error = RegistryError;

    fn try_from(req: pb::ResolveRequest) -> Result<Self> {
        let node = required("node", req.node, "the node's facts")?.into();
        let cached = req
            .cached_digests
            .iter()
            .map(|b| {
                Digest::from_slice(b).map_err(|_| {
                    RegistryError::invalid("cached_digests", "each must be a 32-byte BLAKE3 digest")
                })
            })
            .collect::<Result<_>>()?;
        Ok(ResolveQuery {
            repository: req.repository,
            node,
            cached,
            options: CheckOptions {
                required_labels: req.required_labels.into_iter().collect(),
                gpu_remapped: req.gpu_remapped,
            },
        })
    }
}

impl From<Resolved> for pb::ResolveResponse {
    fn from(r: Resolved) -> Self {
        pb::ResolveResponse {
            compatible: r
                .compatible
                .into_iter()
                .map(|s| pb::ResolvedSnapshot {
                    tag: s.tag,
                    digest: s.digest.to_string(),
                    bytes_total: s.bytes_total,
                    bytes_stored: s.bytes_stored,
                    cached_bytes: s.cached_bytes,
                    created_unix: s.created_unix,
                    hlc: s.hlc.0,
                    chunks: s.chunks,
                    chunks_cached: s.chunks_cached,
                    warnings: s.warnings,
                })
                .collect(),
            incompatible: r
                .incompatible
                .into_iter()
                .map(|s| pb::IncompatibleSnapshot {
                    tag: s.tag,
                    digest: s.digest.to_string(),
                    mismatches: s.mismatches,
                    fields: s.fields,
                })
                .collect(),
        }
    }
}

impl From<CommitEvent> for pb::WatchEvent {
    fn from(e: CommitEvent) -> Self {
        let (kind, digest) = match e.target {
            TagTarget::Manifest(d) => (pb::watch_event::Kind::TagMoved, d.to_string()),
            TagTarget::Deleted => (pb::watch_event::Kind::TagDeleted, String::new()),
        };
        pb::WatchEvent {
            sequence: e.sequence,
            kind: kind as i32,
            repository: e.repository,
            tag: e.tag,
            digest,
            hlc: e.hlc.0,
        }
    }
}

impl From<GcReport> for pb::CollectGarbageResponse {
    fn from(r: GcReport) -> Self {
        pb::CollectGarbageResponse {
            manifests_live: r.manifests_live,
            chunks_live: r.chunks_live,
            chunks_swept: r.chunks_swept,
            bytes_swept: r.bytes_swept,
            manifests_swept: r.manifests_swept,
            chunks_kept_young: r.chunks_kept_young,
            chunks_kept_leased: r.chunks_kept_leased,
        }
    }
}

impl From<ScrubReport> for pb::ScrubResponse {
    fn from(r: ScrubReport) -> Self {
        pb::ScrubResponse {
            chunks_checked: r.chunks_checked,
            manifests_checked: r.manifests_checked,
            bytes_read: r.bytes_read,
            damaged: r
                .damaged
                .into_iter()
                .map(|d| pb::DamagedObject {
                    kind: d.kind.into(),
                    digest: d.digest,
                    path: d.path,
                    reason: d.reason,
                    quarantined_to: d.quarantined_to.unwrap_or_default(),
                })
                .collect(),
            quarantined: r.quarantined,
            seconds: r.seconds,
        }
    }
}

impl From<ReplicationStatus> for pb::ReplicationStatusResponse {
    fn from(s: ReplicationStatus) -> Self {
        pb::ReplicationStatusResponse {
            log_head: s.log_head,
            peers: s
                .peers
                .into_iter()
                .map(|p| pb::PeerReplicationStatus {
                    name: p.name,
                    url: p.url,
                    repository_prefixes: p.repository_prefixes,
                    acked_seq: p.acked_seq,
                    entries_behind: p.entries_behind,
                    last_success_unix_ms: p.last_success_unix_ms,
                    last_error: p.last_error,
                    chunks_sent: p.chunks_sent,
                    bytes_sent: p.bytes_sent,
                    manifests_sent: p.manifests_sent,
                    records_sent: p.records_sent,
                    failures: p.failures,
                })
                .collect(),
        }
    }
}

impl From<Policy> for pb::RetentionPolicy {
    fn from(p: Policy) -> Self {
        pb::RetentionPolicy {
            keep_last: p.keep_last,
            keep_for_seconds: p.keep_for_seconds,
        }
    }
}

impl From<Outcome> for pb::RetentionOutcome {
    fn from(o: Outcome) -> Self {
        pb::RetentionOutcome {
            repository: o.repository,
            policy: Some(o.policy.into()),
            deleted: o.deleted,
            kept: o.kept,
        }
    }
}

/// What the serving process shares with the handlers: its metrics, its drain, and
/// the signal that it stops.
#[derive(Clone)]
pub struct Lifecycle {
    pub metrics: Arc<RegistryMetrics>,
    pub drain: Arc<Drain>,
    /// Turns true when the server shuts down.
    pub stop: watch::Receiver<bool>,
}

/// The RPC handlers over one registry; what the server mounts (behind access.rs).
pub struct RegistryService {
    reg: Arc<Registry>,
    replicator: Arc<Replicator>,
    tracker: Tracker,
    /// Counters (the Stats RPC answers from them too).
    metrics: Arc<RegistryMetrics>,
    /// Pushes open here, and whether the server is draining for shutdown.
    drain: Arc<Drain>,
    started_unix: u64,
    /// Turns true when the server shuts down: ends Watch streams, which would
    /// otherwise hold a graceful shutdown open forever.
    stop: watch::Receiver<bool>,
}

impl RegistryService {
    pub fn new(reg: Arc<Registry>, replicator: Arc<Replicator>, lifecycle: Lifecycle) -> Self {
        let Lifecycle {
            metrics,
            drain,
            stop,
        } = lifecycle;
        RegistryService {
            reg,
            replicator,
            tracker: Tracker::default(),
            metrics,
            drain,
            started_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            stop,
        }
    }
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::ChunkData, Status>> + Send>>;
type EventStream = Pin<Box<dyn Stream<Item = Result<pb::WatchEvent, Status>> + Send>>;
type Rpc<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl registry_server::Registry for RegistryService {
    async fn begin_push(&self, req: Request<pb::BeginPushRequest>) -> Rpc<pb::BeginPushResponse> {
        if let Err(e) = self.drain.admit_push() {
            self.metrics.pushes_refused_draining.inc();
            return Err(e.into());
        }
        let lease = self.reg.begin_push(&req.into_inner().repository).await?;
        self.drain.opened(&lease.id);
        Ok(Response::new(pb::BeginPushResponse {
            lease_id: lease.id,
            ttl_seconds: lease.ttl.as_secs(),
        }))
    }

    async fn find_missing_chunks(
        &self,
        req: Request<pb::FindMissingChunksRequest>,
    ) -> Rpc<pb::FindMissingChunksResponse> {
        let req = req.into_inner();
        let digests = digests_arg("digests", &req.digests)?;
        let asked = digests.len() as u64;
        let missing = self.reg.find_missing(&req.lease_id, digests).await?;
        self.metrics
            .push_chunks("deduplicated", asked - missing.len() as u64);
        Ok(Response::new(pb::FindMissingChunksResponse {
            missing: missing.iter().map(digest_bytes).collect(),
        }))
    }

    async fn put_chunks(
        &self,
        req: Request<Streaming<pb::PutChunkRequest>>,
    ) -> Rpc<pb::PutChunksResponse> {
        let mut stream = req.into_inner();
        let mut resp = pb::PutChunksResponse::default();
        // A stream carries one lease, in practice: checked once, not per chunk.
        let mut checked_lease: Option<String> = None;
        while let Some(msg) = stream.message().await? {
            if checked_lease.as_deref() != Some(msg.lease_id.as_str()) {
                self.reg.check_lease(&msg.lease_id).await?;
                checked_lease = Some(msg.lease_id.clone());
            }
            let digest = digest_arg("digest", &msg.digest)?;
            let len = msg.data.len() as u64;
            self.metrics.chunks_received.inc();
            self.metrics.chunk_bytes_received.inc_by(len);
            if self.reg.put_chunk(&msg.lease_id, digest, msg.data).await? {
                resp.chunks_stored += 1;
                resp.bytes_stored += len;
                self.metrics.push_chunks("stored", 1);
            } else {
                resp.chunks_already_present += 1;
                self.metrics.push_chunks("deduplicated", 1);
            }
        }
        Ok(Response::new(resp))
    }

    type GetChunksStream = ChunkStream;

    async fn get_chunks(&self, req: Request<pb::GetChunksRequest>) -> Rpc<ChunkStream> {
        let digests = digests_arg("digests", &req.into_inner().digests)?;
        let reg = self.reg.clone();
        let metrics = self.metrics.clone();
        let stream = futures::stream::iter(digests)
            .map(move |d| {
                let (reg, metrics) = (reg.clone(), metrics.clone());
                async move {
                    let data = reg.get_chunk(&d).await?;
                    metrics.chunks_sent.inc();
                    metrics.chunk_bytes_sent.inc_by(data.len() as u64);
                    Ok(pb::ChunkData {
                        digest: digest_bytes(&d),
                        data,
                    })
                }
            })
            .buffered(GET_CHUNKS_READAHEAD)
            .map(|r: Result<pb::ChunkData>| r.map_err(Status::from));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn put_manifest(
        &self,
        req: Request<pb::PutManifestRequest>,
    ) -> Rpc<pb::PutManifestResponse> {
        let req = req.into_inner();
        let d = self
            .reg
            .put_manifest(&req.repository, &req.lease_id, req.manifest, &req.tags)
            .await;
        if matches!(d, Ok(_) | Err(RegistryError::LeaseUnknown { .. })) {
            self.drain.closed(&req.lease_id);
        }
        let d = d?;
        Ok(Response::new(pb::PutManifestResponse {
            digest: d.to_string(),
        }))
    }

    async fn get_manifest(
        &self,
        req: Request<pb::GetManifestRequest>,
    ) -> Rpc<pb::GetManifestResponse> {
        let req = req.into_inner();
        let (digest, manifest) = self
            .reg
            .get_manifest(&req.repository, &req.reference)
            .await?;
        Ok(Response::new(pb::GetManifestResponse {
            digest: digest.to_string(),
            manifest,
        }))
    }

    async fn list_repositories(
        &self,
        _req: Request<pb::ListRepositoriesRequest>,
    ) -> Rpc<pb::ListRepositoriesResponse> {
        Ok(Response::new(pb::ListRepositoriesResponse {
            repositories: self.reg.repositories().await?,
        }))
    }

    async fn list_tags(&self, req: Request<pb::ListTagsRequest>) -> Rpc<pb::ListTagsResponse> {
        let tags = self.reg.tags(&req.into_inner().repository).await?;
        Ok(Response::new(pb::ListTagsResponse {
            tags: tags
                .into_iter()
                .map(|t| pb::TagInfo {
                    tag: t.tag,
                    digest: t.digest.to_string(),
                    hlc: t.hlc.0,
                })
                .collect(),
        }))
    }

    async fn set_tag(&self, req: Request<pb::SetTagRequest>) -> Rpc<pb::SetTagResponse> {
        let req = req.into_inner();
        let hlc = self
            .reg
            .set_tag(&req.repository, &req.tag, &req.digest)
            .await?;
        Ok(Response::new(pb::SetTagResponse { hlc: hlc.0 }))
    }

    async fn delete_tag(&self, req: Request<pb::DeleteTagRequest>) -> Rpc<pb::DeleteTagResponse> {
        let req = req.into_inner();
        let digest = self.reg.delete_tag(&req.repository, &req.tag).await?;
        Ok(Response::new(pb::DeleteTagResponse {
            digest: digest.to_string(),
        }))
    }

    async fn collect_garbage(
        &self,
        req: Request<pb::CollectGarbageRequest>,
    ) -> Rpc<pb::CollectGarbageResponse> {
        let req = req.into_inner();
        let grace = req
            .grace_seconds
            .map_or(self.reg.gc_grace(), std::time::Duration::from_secs);
        let started = std::time::Instant::now();
        let report = crate::gc::collect(&self.reg, grace, req.dry_run).await?;
        self.metrics
            .record_gc(&report, req.dry_run, started.elapsed());
        Ok(Response::new(report.into()))
    }

    async fn replicate_tag_record(
        &self,
        req: Request<pb::ReplicateTagRecordRequest>,
    ) -> Rpc<pb::ReplicateTagRecordResponse> {
        let req = req.into_inner();
        let current = self
            .reg
            .replicate_tag_record(ReplicatedRecord {
                repository: req.repository,
                tag: req.tag,
                record_name: req.record_name,
                lease_id: req.lease_id,
                manifest: req.manifest,
            })
            .await?;
        Ok(Response::new(pb::ReplicateTagRecordResponse { current }))
    }

    async fn replication_status(
        &self,
        _req: Request<pb::ReplicationStatusRequest>,
    ) -> Rpc<pb::ReplicationStatusResponse> {
        Ok(Response::new(self.replicator.status(&self.reg)?.into()))
    }

    async fn resolve(&self, req: Request<pb::ResolveRequest>) -> Rpc<pb::ResolveResponse> {
        let query = ResolveQuery::try_from(req.into_inner())?;
        let resolved = crate::scheduler::resolve(&self.reg, query).await?;
        Ok(Response::new(resolved.into()))
    }

    type WatchStream = EventStream;

    async fn watch(&self, req: Request<pb::WatchRequest>) -> Rpc<EventStream> {
        let events =
            crate::scheduler::watch(&self.reg, req.into_inner().from_sequence, self.stop.clone());
        let events = events.map(|e| e.map(pb::WatchEvent::from).map_err(Status::from));
        Ok(Response::new(Box::pin(events)))
    }

    async fn register_node(
        &self,
        req: Request<pb::RegisterNodeRequest>,
    ) -> Rpc<pb::RegisterNodeResponse> {
        let req = req.into_inner();
        let node = NodeRegistration {
            agent_url: req.agent_url,
            facts: required("facts", req.facts, "the node's facts")?.into(),
            cache_bytes: req.cache_bytes,
            cache_chunks: req.cache_chunks,
            cache_limit_bytes: req.cache_limit_bytes,
        };
        let registered_unix_ms = crate::scheduler::register_node(&self.reg, &req.node_name, node)?;
        Ok(Response::new(pb::RegisterNodeResponse {
            registered_unix_ms,
        }))
    }

    async fn list_nodes(&self, _req: Request<pb::ListNodesRequest>) -> Rpc<pb::ListNodesResponse> {
        let nodes = crate::scheduler::list_nodes(&self.reg)?;
        Ok(Response::new(pb::ListNodesResponse {
            nodes: nodes.into_iter().map(pb::NodeInfo::from).collect(),
        }))
    }

    async fn get_chunk_urls(
        &self,
        req: Request<pb::GetChunkUrlsRequest>,
    ) -> Rpc<pb::GetChunkUrlsResponse> {
        let digests = req
            .into_inner()
            .digests
            .iter()
            .map(|b| digest_arg("digests", b))
            .collect::<Result<Vec<_>>>()?;
        let urls = self.reg.chunk_urls(&digests).await?;
        if let Some(u) = &urls {
            self.metrics.direct_urls_signed.inc_by(u.len() as u64);
        }
        Ok(Response::new(pb::GetChunkUrlsResponse {
            urls: urls.unwrap_or_default(),
            expires_seconds: crate::registry::CHUNK_URL_TTL.as_secs(),
        }))
    }

    async fn delete_manifest(
        &self,
        req: Request<pb::DeleteManifestRequest>,
    ) -> Rpc<pb::DeleteManifestResponse> {
        let req = req.into_inner();
        let d = self
            .reg
            .delete_manifest(&req.repository, &req.digest)
            .await?;
        Ok(Response::new(pb::DeleteManifestResponse {
            digest: d.to_string(),
        }))
    }

    async fn set_retention(
        &self,
        req: Request<pb::SetRetentionRequest>,
    ) -> Rpc<pb::SetRetentionResponse> {
        let req = req.into_inner();
        let p = req.policy.unwrap_or_default();
        let policy = Policy {
            keep_last: p.keep_last,
            keep_for_seconds: p.keep_for_seconds,
        };
        crate::retention::set(&self.reg, &req.repository, policy).await?;
        Ok(Response::new(pb::SetRetentionResponse {}))
    }

    async fn get_retention(
        &self,
        req: Request<pb::GetRetentionRequest>,
    ) -> Rpc<pb::GetRetentionResponse> {
        let policy = crate::retention::get(&self.reg, &req.into_inner().repository).await?;
        Ok(Response::new(pb::GetRetentionResponse {
            policy: policy.map(pb::RetentionPolicy::from),
        }))
    }

    async fn apply_retention(
        &self,
        req: Request<pb::ApplyRetentionRequest>,
    ) -> Rpc<pb::ApplyRetentionResponse> {
        let req = req.into_inner();
        // An empty repository means every repository that has a policy.
        let repo = (!req.repository.is_empty()).then_some(req.repository.as_str());
        let outcomes = crate::retention::apply(&self.reg, repo, req.dry_run).await?;
        Ok(Response::new(pb::ApplyRetentionResponse {
            repositories: outcomes
                .into_iter()
                .map(pb::RetentionOutcome::from)
                .collect(),
        }))
    }

    async fn scrub(&self, req: Request<pb::ScrubRequest>) -> Rpc<pb::ScrubResponse> {
        let report = crate::scrub::scrub(&self.reg, req.into_inner().dry_run).await?;
        self.metrics.record_scrub(&report);
        Ok(Response::new(report.into()))
    }

    async fn swarm(&self, req: Request<pb::SwarmRequest>) -> Rpc<pb::SwarmResponse> {
        let req = req.into_inner();
        let snapshot: Digest = req
            .digest
            .parse()
            .map_err(|e| RegistryError::invalid("digest", format!("{e}")))?;
        let nodes = crate::scheduler::list_nodes(&self.reg)?;
        let answer = self.tracker.announce(
            &Announce {
                snapshot,
                node: req.node_name.trim(),
                complete: req.complete,
                max_peers: req.max_peers as usize,
            },
            &nodes,
        );
        Ok(Response::new(pb::SwarmResponse {
            peers: answer
                .peers
                .into_iter()
                .map(|p| pb::SwarmPeer {
                    node_name: p.node_name,
                    agent_url: p.agent_url,
                    complete: p.complete,
                    zone: p.zone,
                    region: p.region,
                })
                .collect(),
            seat: answer.seat,
            members: answer.members,
        }))
    }

    async fn who_am_i(&self, _req: Request<pb::WhoAmIRequest>) -> Rpc<pb::WhoAmIResponse> {
        // Answered by access.rs, which knows the caller; this layer knows no one.
        Ok(Response::new(pb::WhoAmIResponse::default()))
    }

    async fn report_restore(
        &self,
        req: Request<pb::ReportRestoreRequest>,
    ) -> Rpc<pb::ReportRestoreResponse> {
        let req = req.into_inner();
        let digest = manifest_digest_arg(&req.digest)?;
        let o = required("outcome", req.outcome, "the restore outcome fields")?;
        let mut outcome =
            RestoreOutcome::new(&req.repository, &o.node_name, o.gpu_models, o.success);
        if !o.success {
            outcome = outcome.failed_at(&o.phase, &o.reason);
        }
        outcome.seconds = o.seconds;
        crate::restore_outcomes::record(&self.reg, &digest, &outcome).await?;
        self.metrics.record_restore(&outcome);
        Ok(Response::new(pb::ReportRestoreResponse {}))
    }

    async fn restore_outcomes(
        &self,
        req: Request<pb::RestoreOutcomesRequest>,
    ) -> Rpc<pb::RestoreOutcomesResponse> {
        let digest = manifest_digest_arg(&req.into_inner().digest)?;
        let outcomes = crate::restore_outcomes::recent(&self.reg, &digest).await?;
        Ok(Response::new(pb::RestoreOutcomesResponse {
            outcomes: outcomes
                .into_iter()
                .map(|o| pb::RestoreOutcome {
                    node_name: o.node_name,
                    gpu_models: o.gpu_models,
                    success: o.success,
                    phase: o.phase,
                    reason: o.reason,
                    seconds: o.seconds,
                    unix_ms: o.unix_ms,
                })
                .collect(),
            failure_threshold: self.reg.restore_failure_threshold(),
        }))
    }

    async fn stats(&self, _req: Request<pb::StatsRequest>) -> Rpc<pb::StatsResponse> {
        let m = &self.metrics;
        let (swarms, swarm_members) = self.tracker.size();
        Ok(Response::new(pb::StatsResponse {
            chunks_sent: m.chunks_sent.get(),
            chunk_bytes_sent: m.chunk_bytes_sent.get(),
            chunks_received: m.chunks_received.get(),
            chunk_bytes_received: m.chunk_bytes_received.get(),
            swarms,
            swarm_members,
            started_unix: self.started_unix,
        }))
    }
}
