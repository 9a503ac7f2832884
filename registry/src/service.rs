//! `snapreg.v1.Registry` handlers. Each handler validates its input, does its work
//! through [`Registry`], and lets `From<RegistryError> for Status` name the failure.

use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use futures::{Stream, StreamExt, TryStreamExt};
use snapreg_proto::codec;
use snapreg_proto::manifest::Manifest;
use snapreg_proto::pb::{self, registry_server};
use snapreg_proto::reference::{validate_repository, validate_tag};
use snapreg_proto::tags::{TagRecord, TagTarget};
use snapreg_proto::Digest;
use tonic::{Request, Response, Status, Streaming};

use crate::error::{RegistryError, Result};
use crate::server::{now_ms, Registry};

/// Chunks fetched from the store ahead of the one being sent, per GetChunks stream.
const GET_CHUNKS_READAHEAD: usize = 8;
/// Digests one FindMissingChunks or GetChunks call may name: 64 Ki x 34 bytes stays
/// far below the message limit, and clients ask for 512 and 32 at a time.
const MAX_DIGESTS_PER_CALL: usize = 1 << 16;

/// Store lookups in flight for digests a FindMissingChunks or a commit does not find
/// in the index (another instance may have stored them).
const STORE_LOOKUPS: usize = 32;

/// How long a presigned chunk URL stays valid: long enough for a large pull to work
/// through its list; a client that outlives it falls back to GetChunks per chunk.
const CHUNK_URL_TTL: std::time::Duration = std::time::Duration::from_secs(900);

/// Digests per GetChunkUrls call: ~0.5 GiB of chunks, a ~300 KiB answer.
const MAX_CHUNK_URLS: usize = 1024;

pub struct RegistryService {
    reg: Arc<Registry>,
}

impl RegistryService {
    pub fn new(reg: Arc<Registry>) -> Self {
        RegistryService { reg }
    }
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

fn repo_arg(repo: &str) -> Result<()> {
    validate_repository(repo).map_err(|r| RegistryError::invalid("repository", r))
}

fn tag_arg(tag: &str) -> Result<()> {
    validate_tag(tag).map_err(|r| RegistryError::invalid("tag", r))
}

impl Registry {
    async fn check_lease(&self, lease: &str) -> Result<()> {
        match self.index.lease_expiry(lease)? {
            Some(exp) if exp > now_ms() => {
                // Activity extends the lease, here and (now and then) in the store.
                let ttl = self.config.lease_ttl;
                self.index
                    .put_lease(lease, now_ms() + ttl.as_millis() as u64)?;
                self.shared.refresh(&self.store, lease, ttl).await
            }
            _ => Err(RegistryError::LeaseUnknown {
                lease: lease.to_string(),
            }),
        }
    }

    async fn find_missing(&self, lease: &str, digests: Vec<Digest>) -> Result<Vec<Digest>> {
        self.check_lease(lease).await?;
        let looked_up = futures::stream::iter(digests)
            .map(|d| async move {
                // Lease first, then look, under the stripe lock: GC sweeping `d` either
                // finished before (we report it missing) or sees our lease.
                let _g = self.lock_digest(&d).await;
                self.index.lease_digests(lease, &[d])?;
                Ok::<_, RegistryError>((d, self.chunk_present(&d).await?))
            })
            .buffered(STORE_LOOKUPS);
        let found: Vec<(Digest, bool)> = looked_up.try_collect().await?;
        Ok(found
            .into_iter()
            .filter(|(_, present)| !present)
            .map(|(d, _)| d)
            .collect())
    }

    /// Whether a chunk is stored: the index, else the store (another instance may
    /// have written it), indexing what the store has.
    async fn chunk_present(&self, d: &Digest) -> Result<bool> {
        if self.index.has_chunk(d)? {
            return Ok(true);
        }
        match self.store.chunk_size(d).await? {
            Some(len) => {
                self.index.add_chunk(d, len)?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Whether a manifest is stored, like [`Registry::chunk_present`].
    async fn manifest_present(&self, d: &Digest) -> Result<bool> {
        if self.index.has_manifest(d)? {
            return Ok(true);
        }
        match self.store.manifest_size(d).await? {
            Some(len) => {
                self.index.add_manifest(d, len)?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Folds the store's records of one tag that are newer than the indexed one into
    /// the index (another instance may have moved the tag).
    async fn refresh_tag(&self, repository: &str, tag: &str) -> Result<()> {
        let current = self.index.tag_record(repository, tag)?;
        for rec in self
            .store
            .tag_records_after(repository, tag, current.as_ref())
            .await?
        {
            self.clock.observe(rec.hlc);
            self.index.apply_tag_record(repository, tag, &rec)?;
        }
        Ok(())
    }

    /// Folds every tag record under `tags/<prefix>` into the index: a repository's
    /// (`ls REPO`, Resolve) or all of them (`ls`, GC's mark).
    pub(crate) async fn refresh_tags(&self, prefix: &str) -> Result<()> {
        for (repository, tag, rec) in self.store.tag_records(prefix).await? {
            self.clock.observe(rec.hlc);
            self.index.apply_tag_record(&repository, &tag, &rec)?;
        }
        Ok(())
    }

    /// Ends a push lease in the index and in the store.
    async fn end_lease(&self, lease: &str) -> Result<()> {
        self.index.drop_lease(lease)?;
        self.shared.end(&self.store, lease).await
    }

    /// Verifies and stores one uploaded chunk; returns whether it was new.
    async fn put_chunk(&self, lease: &str, digest: Digest, object: Bytes) -> Result<bool> {
        let verify = object.clone();
        tokio::task::spawn_blocking(move || codec::decode(&digest, &verify))
            .await
            .map_err(|e| RegistryError::Io(std::io::Error::other(e)))?
            .map_err(|e| match e {
                snapreg_proto::Error::ChunkCorrupt { digest, reason } => {
                    RegistryError::ChunkCorrupt { digest, reason }
                }
                other => other.into(),
            })?;
        let _g = self.lock_digest(&digest).await;
        self.index.lease_digests(lease, &[digest])?;
        if self.index.has_chunk(&digest)? {
            return Ok(false);
        }
        // Not looked up in the store: a chunk another instance stored is rewritten with
        // the same bytes, which costs one PUT and is harmless.
        let len = object.len() as u64;
        self.store.put_chunk(&digest, object).await?;
        self.index.add_chunk(&digest, len)?;
        Ok(true)
    }

    async fn put_manifest(
        &self,
        repository: &str,
        lease: &str,
        bytes: Bytes,
        tags: &[String],
    ) -> Result<Digest> {
        repo_arg(repository)?;
        for t in tags {
            tag_arg(t)?;
        }
        self.check_lease(lease).await?;
        crate::tenant_keys::check(
            &self.config.tenant_keys,
            repository,
            &Manifest::decode(&bytes)?,
        )?;
        let (digest, chunks) = self.store_manifest(lease, bytes).await?;
        for t in tags {
            self.write_tag(repository, t, TagTarget::Manifest(digest))
                .await?;
        }
        self.note_committed(chunks.iter().copied().chain([digest]));
        self.end_lease(lease).await?;
        tracing::info!(%repository, %digest, ?tags, chunks = chunks.len(), "manifest committed");
        Ok(digest)
    }

    /// Stores a manifest whose chunks are all present (the lease already checked);
    /// the manifest and its chunks join the lease. Returns its digest and chunks.
    async fn store_manifest(&self, lease: &str, bytes: Bytes) -> Result<(Digest, Vec<Digest>)> {
        let manifest = Manifest::decode(&bytes)?;
        let chunks = manifest.chunk_digests();
        let present: Vec<bool> = futures::stream::iter(chunks.clone())
            .map(|d| async move { self.chunk_present(&d).await })
            .buffered(STORE_LOOKUPS)
            .try_collect()
            .await?;
        let missing: Vec<Digest> = chunks
            .iter()
            .zip(present)
            .filter(|(_, present)| !present)
            .map(|(d, _)| *d)
            .collect();
        if let Some(first) = missing.first() {
            return Err(RegistryError::ManifestIncomplete {
                count: missing.len(),
                first: *first,
            });
        }
        let digest = Digest::of(&bytes);
        // The manifest joins the lease too, so GC cannot take it between here and the tag.
        self.index.lease_digests(lease, &[digest])?;
        self.index.lease_digests(lease, &chunks)?;
        if !self.manifest_present(&digest).await? {
            let len = bytes.len() as u64;
            self.store.put_manifest(&digest, bytes).await?;
            self.index.add_manifest(&digest, len)?;
        }
        Ok((digest, chunks))
    }

    pub(crate) async fn write_tag(
        &self,
        repository: &str,
        tag: &str,
        target: TagTarget,
    ) -> Result<TagRecord> {
        let record = TagRecord {
            hlc: self.clock.tick(),
            target,
        };
        self.store.put_tag_record(repository, tag, &record).await?;
        self.index.apply_tag_record(repository, tag, &record)?;
        // A local commit: peers get it (replicated records are never logged).
        self.replication
            .log_commit(&self.index, repository, tag, &record)?;
        self.log_appended.send_modify(|n| *n += 1);
        Ok(record)
    }

    /// Writes a tag record a peer sent, exactly as its origin wrote it (same HLC, same
    /// target, hence the same object name), storing its manifest first when given.
    /// Not logged for onward replication. Returns whether the record is now current.
    async fn replicate_tag_record(&self, req: pb::ReplicateTagRecordRequest) -> Result<bool> {
        repo_arg(&req.repository)?;
        tag_arg(&req.tag)?;
        let record = TagRecord::parse(&req.record_name)
            .map_err(|e| RegistryError::invalid("record_name", e.to_string()))?;
        if record.object_name() != req.record_name {
            return Err(RegistryError::invalid(
                "record_name",
                format!("{:?} is not in canonical form", req.record_name),
            ));
        }
        // Later local ticks order after every record seen from a peer.
        self.clock.observe(record.hlc);
        let mut protected = Vec::new();
        if let Some(target) = record.digest() {
            if !req.manifest.is_empty() {
                let got = Digest::of(&req.manifest);
                if got != target {
                    return Err(RegistryError::invalid(
                        "manifest",
                        format!("bytes hash to {got}, the record names {target}"),
                    ));
                }
                self.check_lease(&req.lease_id).await?;
                let (_, chunks) = self.store_manifest(&req.lease_id, req.manifest).await?;
                protected = chunks;
            } else if !self.manifest_present(&target).await? {
                return Err(RegistryError::ManifestNotFound { digest: target });
            }
            protected.push(target);
        }
        self.store
            .put_tag_record(&req.repository, &req.tag, &record)
            .await?;
        let current = self
            .index
            .apply_tag_record(&req.repository, &req.tag, &record)?;
        self.note_committed(protected);
        if !req.lease_id.is_empty() {
            self.end_lease(&req.lease_id).await?;
        }
        tracing::info!(repository = %req.repository, tag = %req.tag, record = %req.record_name,
            current, "replicated tag record");
        Ok(current)
    }

    /// Deletes an untagged manifest nobody is committing; its chunks go at the next GC.
    async fn delete_manifest(&self, digest: &str) -> Result<Digest> {
        let d: Digest = digest
            .parse()
            .map_err(|_| RegistryError::invalid("digest", "must be blake3:<64 hex digits>"))?;
        if !self.index.has_manifest(&d)? {
            return Err(RegistryError::ManifestNotFound { digest: d });
        }
        let _g = self.lock_digest(&d).await;
        let tags: Vec<String> = self
            .index
            .all_tags()?
            .into_iter()
            .filter(|(_, _, r)| r.digest() == Some(d))
            .map(|(repo, tag, _)| format!("{repo}:{tag}"))
            .collect();
        if !tags.is_empty() {
            return Err(RegistryError::ManifestTagged {
                digest: d,
                tags: tags.join(", "),
            });
        }
        let committing = self
            .gc_committed
            .lock()
            .unwrap()
            .as_ref()
            .is_some_and(|s| s.contains(&d));
        if committing || self.index.is_leased(&d, now_ms())? {
            return Err(RegistryError::ManifestBusy { digest: d });
        }
        // Index first, as GC does: a crash between leaves an unindexed object for GC.
        self.index.remove_manifest(&d)?;
        self.store.delete_manifest(&d).await?;
        tracing::info!(digest = %d, "manifest deleted");
        Ok(d)
    }

    async fn resolve(&self, repository: &str, reference: &str) -> Result<Digest> {
        if reference.starts_with(snapreg_proto::digest::PREFIX) {
            let d: Digest = reference.parse()?;
            return if self.manifest_present(&d).await? {
                Ok(d)
            } else {
                Err(RegistryError::ManifestNotFound { digest: d })
            };
        }
        tag_arg(reference)?;
        self.refresh_tag(repository, reference).await?;
        match self
            .index
            .tag_record(repository, reference)?
            .and_then(|r| r.digest())
        {
            Some(d) => Ok(d),
            None => Err(RegistryError::TagNotFound {
                repository: repository.into(),
                tag: reference.into(),
            }),
        }
    }
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::ChunkData, Status>> + Send>>;

#[tonic::async_trait]
impl registry_server::Registry for RegistryService {
    async fn begin_push(
        &self,
        req: Request<pb::BeginPushRequest>,
    ) -> Result<Response<pb::BeginPushResponse>, Status> {
        let req = req.into_inner();
        repo_arg(&req.repository)?;
        let id = format!("{:032x}", rand::random::<u128>());
        let ttl = self.reg.config.lease_ttl;
        self.reg
            .index
            .put_lease(&id, now_ms() + ttl.as_millis() as u64)
            .map_err(Status::from)?;
        self.reg
            .shared
            .begin_push(&self.reg.store, &self.reg.index, &id, ttl)
            .await?;
        Ok(Response::new(pb::BeginPushResponse {
            lease_id: id,
            ttl_seconds: ttl.as_secs(),
        }))
    }

    async fn find_missing_chunks(
        &self,
        req: Request<pb::FindMissingChunksRequest>,
    ) -> Result<Response<pb::FindMissingChunksResponse>, Status> {
        let req = req.into_inner();
        let digests = digests_arg("digests", &req.digests)?;
        let missing = self.reg.find_missing(&req.lease_id, digests).await?;
        Ok(Response::new(pb::FindMissingChunksResponse {
            missing: missing
                .iter()
                .map(|d| Bytes::copy_from_slice(&d.0))
                .collect(),
        }))
    }

    async fn put_chunks(
        &self,
        req: Request<Streaming<pb::PutChunkRequest>>,
    ) -> Result<Response<pb::PutChunksResponse>, Status> {
        let mut stream = req.into_inner();
        let mut resp = pb::PutChunksResponse::default();
        let mut checked_lease: Option<String> = None;
        while let Some(msg) = stream.message().await? {
            if checked_lease.as_deref() != Some(msg.lease_id.as_str()) {
                self.reg.check_lease(&msg.lease_id).await?;
                checked_lease = Some(msg.lease_id.clone());
            }
            let digest = digest_arg("digest", &msg.digest)?;
            if msg.data.len() > codec::MAX_OBJECT_LEN {
                return Err(RegistryError::invalid(
                    "data",
                    format!(
                        "chunk {digest} is a {}-byte object, over the {}-byte limit (a {}-byte chunk plus the codec header); chunk with a smaller max_size",
                        msg.data.len(),
                        codec::MAX_OBJECT_LEN,
                        codec::MAX_CHUNK_LEN
                    ),
                )
                .into());
            }
            let len = msg.data.len() as u64;
            if self.reg.put_chunk(&msg.lease_id, digest, msg.data).await? {
                resp.chunks_stored += 1;
                resp.bytes_stored += len;
            } else {
                resp.chunks_already_present += 1;
            }
        }
        Ok(Response::new(resp))
    }

    type GetChunksStream = ChunkStream;

    async fn get_chunks(
        &self,
        req: Request<pb::GetChunksRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        let digests = digests_arg("digests", &req.into_inner().digests)?;
        let reg = self.reg.clone();
        let stream = futures::stream::iter(digests)
            .map(move |d| {
                let reg = reg.clone();
                async move {
                    let data = reg.store.get_chunk(&d).await?;
                    Ok(pb::ChunkData {
                        digest: Bytes::copy_from_slice(&d.0),
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
    ) -> Result<Response<pb::PutManifestResponse>, Status> {
        let req = req.into_inner();
        let d = self
            .reg
            .put_manifest(&req.repository, &req.lease_id, req.manifest, &req.tags)
            .await?;
        Ok(Response::new(pb::PutManifestResponse {
            digest: d.to_string(),
        }))
    }

    async fn get_manifest(
        &self,
        req: Request<pb::GetManifestRequest>,
    ) -> Result<Response<pb::GetManifestResponse>, Status> {
        let req = req.into_inner();
        repo_arg(&req.repository)?;
        let digest = self.reg.resolve(&req.repository, &req.reference).await?;
        let manifest = self.reg.store.get_manifest(&digest).await?;
        Ok(Response::new(pb::GetManifestResponse {
            digest: digest.to_string(),
            manifest,
        }))
    }

    async fn list_repositories(
        &self,
        _req: Request<pb::ListRepositoriesRequest>,
    ) -> Result<Response<pb::ListRepositoriesResponse>, Status> {
        self.reg.refresh_tags("").await?;
        let mut repos: Vec<String> = self
            .reg
            .index
            .all_tags()
            .map_err(Status::from)?
            .into_iter()
            .filter(|(_, _, r)| r.digest().is_some())
            .map(|(repo, _, _)| repo)
            .collect();
        repos.dedup();
        Ok(Response::new(pb::ListRepositoriesResponse {
            repositories: repos,
        }))
    }

    async fn list_tags(
        &self,
        req: Request<pb::ListTagsRequest>,
    ) -> Result<Response<pb::ListTagsResponse>, Status> {
        let repo = req.into_inner().repository;
        repo_arg(&repo)?;
        self.reg.refresh_tags(&repo).await?;
        let tags: Vec<pb::TagInfo> = self
            .reg
            .index
            .all_tags()
            .map_err(Status::from)?
            .into_iter()
            .filter(|(r, _, _)| *r == repo)
            .filter_map(|(_, tag, rec)| {
                rec.digest().map(|d| pb::TagInfo {
                    tag,
                    digest: d.to_string(),
                    hlc: rec.hlc.0,
                })
            })
            .collect();
        if tags.is_empty() {
            return Err(Status::not_found(format!(
                "repository {repo:?} has no tags; `snapctl ls` lists repositories"
            )));
        }
        Ok(Response::new(pb::ListTagsResponse { tags }))
    }

    async fn set_tag(
        &self,
        req: Request<pb::SetTagRequest>,
    ) -> Result<Response<pb::SetTagResponse>, Status> {
        let req = req.into_inner();
        repo_arg(&req.repository)?;
        tag_arg(&req.tag)?;
        let digest = self.reg.resolve(&req.repository, &req.digest).await?;
        // Protect the manifest and its chunks from a GC already past its mark phase.
        let manifest = Manifest::decode(&self.reg.store.get_manifest(&digest).await?)
            .map_err(RegistryError::from)?;
        crate::tenant_keys::check(&self.reg.config.tenant_keys, &req.repository, &manifest)?;
        let lease = format!("tag-{:032x}", rand::random::<u128>());
        let reg = &self.reg;
        let chunks = manifest.chunk_digests();
        reg.index
            .put_lease(&lease, now_ms() + reg.config.lease_ttl.as_millis() as u64)
            .map_err(Status::from)?;
        reg.shared
            .begin_push(&reg.store, &reg.index, &lease, reg.config.lease_ttl)
            .await?;
        reg.index
            .lease_digests(&lease, &[digest])
            .map_err(Status::from)?;
        reg.index
            .lease_digests(&lease, &chunks)
            .map_err(Status::from)?;
        let rec = reg
            .write_tag(&req.repository, &req.tag, TagTarget::Manifest(digest))
            .await?;
        reg.note_committed(chunks.into_iter().chain([digest]));
        reg.end_lease(&lease).await?;
        Ok(Response::new(pb::SetTagResponse { hlc: rec.hlc.0 }))
    }

    async fn delete_tag(
        &self,
        req: Request<pb::DeleteTagRequest>,
    ) -> Result<Response<pb::DeleteTagResponse>, Status> {
        let req = req.into_inner();
        repo_arg(&req.repository)?;
        // Not a digest: `resolve` takes those, and a tag record named after one would
        // be a path no tag can have.
        tag_arg(&req.tag)?;
        let digest = self.reg.resolve(&req.repository, &req.tag).await?;
        self.reg
            .write_tag(&req.repository, &req.tag, TagTarget::Deleted)
            .await?;
        Ok(Response::new(pb::DeleteTagResponse {
            digest: digest.to_string(),
        }))
    }

    async fn collect_garbage(
        &self,
        req: Request<pb::CollectGarbageRequest>,
    ) -> Result<Response<pb::CollectGarbageResponse>, Status> {
        let req = req.into_inner();
        let grace = req
            .grace_seconds
            .map_or(self.reg.config.gc_grace, std::time::Duration::from_secs);
        let stats = crate::gc::collect(&self.reg, grace, req.dry_run).await?;
        Ok(Response::new(stats))
    }

    async fn replicate_tag_record(
        &self,
        req: Request<pb::ReplicateTagRecordRequest>,
    ) -> Result<Response<pb::ReplicateTagRecordResponse>, Status> {
        let current = self.reg.replicate_tag_record(req.into_inner()).await?;
        Ok(Response::new(pb::ReplicateTagRecordResponse { current }))
    }

    async fn replication_status(
        &self,
        _req: Request<pb::ReplicationStatusRequest>,
    ) -> Result<Response<pb::ReplicationStatusResponse>, Status> {
        Ok(Response::new(self.reg.replication.status(&self.reg.index)?))
    }

    async fn resolve(
        &self,
        req: Request<pb::ResolveRequest>,
    ) -> Result<Response<pb::ResolveResponse>, Status> {
        Ok(Response::new(
            crate::scheduler::resolve(&self.reg, req.into_inner()).await?,
        ))
    }

    type WatchStream = crate::scheduler::WatchStream;

    async fn watch(
        &self,
        req: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        Ok(Response::new(crate::scheduler::watch(
            &self.reg,
            req.into_inner().from_sequence,
        )))
    }

    async fn register_node(
        &self,
        req: Request<pb::RegisterNodeRequest>,
    ) -> Result<Response<pb::RegisterNodeResponse>, Status> {
        Ok(Response::new(crate::scheduler::register_node(
            &self.reg,
            req.into_inner(),
        )?))
    }

    async fn list_nodes(
        &self,
        _req: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        Ok(Response::new(crate::scheduler::list_nodes(&self.reg)?))
    }

    async fn get_chunk_urls(
        &self,
        req: Request<pb::GetChunkUrlsRequest>,
    ) -> Result<Response<pb::GetChunkUrlsResponse>, Status> {
        let digests = req
            .into_inner()
            .digests
            .iter()
            .map(|b| digest_arg("digests", b))
            .collect::<Result<Vec<_>>>()?;
        if digests.len() > MAX_CHUNK_URLS {
            return Err(RegistryError::invalid(
                "digests",
                format!("at most {MAX_CHUNK_URLS} per call, got {}", digests.len()),
            )
            .into());
        }
        let urls = self.reg.store.chunk_urls(&digests, CHUNK_URL_TTL).await?;
        Ok(Response::new(pb::GetChunkUrlsResponse {
            urls: urls.unwrap_or_default(),
            expires_seconds: CHUNK_URL_TTL.as_secs(),
        }))
    }

    async fn delete_manifest(
        &self,
        req: Request<pb::DeleteManifestRequest>,
    ) -> Result<Response<pb::DeleteManifestResponse>, Status> {
        let req = req.into_inner();
        repo_arg(&req.repository)?;
        let d = self.reg.delete_manifest(&req.digest).await?;
        Ok(Response::new(pb::DeleteManifestResponse {
            digest: d.to_string(),
        }))
    }

    async fn set_retention(
        &self,
        req: Request<pb::SetRetentionRequest>,
    ) -> Result<Response<pb::SetRetentionResponse>, Status> {
        let req = req.into_inner();
        let p = req.policy.unwrap_or_default();
        let policy = crate::retention::Policy {
            keep_last: p.keep_last,
            keep_for_seconds: p.keep_for_seconds,
        };
        crate::retention::set(&self.reg, &req.repository, policy).await?;
        Ok(Response::new(pb::SetRetentionResponse {}))
    }

    async fn get_retention(
        &self,
        req: Request<pb::GetRetentionRequest>,
    ) -> Result<Response<pb::GetRetentionResponse>, Status> {
        let policy = crate::retention::get(&self.reg, &req.into_inner().repository).await?;
        Ok(Response::new(pb::GetRetentionResponse {
            policy: policy.map(|p| pb::RetentionPolicy {
                keep_last: p.keep_last,
                keep_for_seconds: p.keep_for_seconds,
            }),
        }))
    }

    async fn apply_retention(
        &self,
        req: Request<pb::ApplyRetentionRequest>,
    ) -> Result<Response<pb::ApplyRetentionResponse>, Status> {
        let req = req.into_inner();
        let repo = (!req.repository.is_empty()).then_some(req.repository.as_str());
        if let Some(r) = repo {
            repo_arg(r)?;
        }
        let repositories = crate::retention::apply(&self.reg, repo, req.dry_run).await?;
        Ok(Response::new(pb::ApplyRetentionResponse { repositories }))
    }

    async fn scrub(
        &self,
        req: Request<pb::ScrubRequest>,
    ) -> Result<Response<pb::ScrubResponse>, Status> {
        let report = crate::scrub::scrub(&self.reg, req.into_inner().dry_run).await?;
        Ok(Response::new(report.into()))
    }
}
