//! The registry's domain: [`Registry`] owns the chunk store, the index, the tag clock,
//! the commit log and the shared-store leases, and every operation the RPCs expose,
//! taking and returning domain types (digests, bytes, tag records), never protobuf.
//!
//! Commit order (lib.rs invariants): a chunk joins the index only after its object is
//! durable; a manifest is stored only after every chunk it names is present; a tag
//! record is written only after its manifest is stored; the commit log entry (which
//! replication and Watch read) only after the record.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use snapreg_proto::codec;
use snapreg_proto::manifest::Manifest;
use snapreg_proto::reference::{validate_repository, validate_tag};
use snapreg_proto::tags::{Hlc, HlcClock, TagRecord, TagTarget};
use snapreg_proto::Digest;
use tokio::sync::{watch, Mutex, MutexGuard};

use crate::chunk_store::ChunkStore;
use crate::clock::now_ms;
use crate::error::{RegistryError, Result};
use crate::index::{Index, LogEntry, RebuildStats};
use crate::shared_store::{self, SharedStore};
use crate::tenant_keys::TenantKeyRule;

/// Store lookups in flight for digests a FindMissingChunks or a commit does not find
/// in the index (another instance may have stored them).
const STORE_LOOKUPS: usize = 32;

/// How long a presigned chunk URL stays valid: long enough for a large pull to work
/// through its list; a client that outlives it falls back to GetChunks per chunk.
pub const CHUNK_URL_TTL: Duration = Duration::from_secs(900);

/// Digests per GetChunkUrls call: ~0.5 GiB of chunks, a ~300 KiB answer.
const MAX_CHUNK_URLS: usize = 1024;

/// What the domain needs to open: where its data lives and its policies.
#[derive(Clone, Debug)]
pub struct RegistryConfig {
    /// Holds the RocksDB index (`index/`) and, by default, the object store (`store/`).
    pub data_dir: PathBuf,
    /// `file:///path` or `s3://bucket/prefix`; `None` means `<data_dir>/store`.
    pub store_url: Option<String>,
    /// Unreferenced chunks younger than this survive GC.
    pub gc_grace: Duration,
    /// How long a push lease lives without activity, and after its commit.
    pub lease_ttl: Duration,
    /// Repositories that take only snapshots encrypted with a given tenant key.
    pub tenant_keys: Vec<TenantKeyRule>,
    /// Resolve withholds a snapshot after this many failed restores in a row on
    /// nodes like the asking one (restore_outcomes.rs); 0 never withholds.
    pub restore_failure_threshold: u32,
}

impl RegistryConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        RegistryConfig {
            data_dir: data_dir.into(),
            store_url: None,
            gc_grace: Duration::from_secs(3600),
            lease_ttl: Duration::from_secs(3600),
            tenant_keys: Vec::new(),
            restore_failure_threshold: 2,
        }
    }

    /// The object store this configuration names.
    pub fn open_store(&self) -> Result<ChunkStore> {
        ChunkStore::open(self.store_url.as_deref(), self.data_dir.join("store"))
    }
}

/// A push lease as BeginPush hands it out.
#[derive(Clone, Debug)]
pub struct Lease {
    pub id: String,
    pub ttl: Duration,
}

/// A current tag of a repository, as ListTags shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TagInfo {
    pub tag: String,
    pub digest: Digest,
    pub hlc: Hlc,
}

/// A tag record sent by a peer (ReplicateTagRecord), with the manifest it names when
/// the peer sends it along.
#[derive(Clone, Debug)]
pub struct ReplicatedRecord {
    pub repository: String,
    pub tag: String,
    pub record_name: String,
    /// The peer's lease on this registry (empty for a tombstone).
    pub lease_id: String,
    /// The manifest's bytes; empty when this registry already holds it.
    pub manifest: Bytes,
}

/// Shared state of one registry instance.
pub struct Registry {
    store: ChunkStore,
    index: Index,
    clock: HlcClock,
    config: RegistryConfig,
    /// Per-digest critical sections (see lib.rs invariants), striped by first byte.
    stripes: Vec<Mutex<()>>,
    gc_running: Mutex<()>,
    /// While a GC runs: digests committed (manifests, their chunks) since its mark
    /// began, which it must treat as live. `None` when no GC runs.
    gc_committed: std::sync::Mutex<Option<HashSet<Digest>>>,
    /// The last commit-log sequence; appends happen under this lock, so entries
    /// become visible in sequence order and no reader skips one.
    log_seq: std::sync::Mutex<u64>,
    /// Sent after every append: wakes Watch streams and replication loops.
    log_head: watch::Sender<u64>,
    /// Store leases and sweep logs shared with other instances on the same store.
    shared: SharedStore,
}

pub(crate) fn repo_arg(repo: &str) -> Result<()> {
    validate_repository(repo).map_err(|r| RegistryError::invalid("repository", r))
}

fn tag_arg(tag: &str) -> Result<()> {
    validate_tag(tag).map_err(|r| RegistryError::invalid("tag", r))
}

/// Ends tracking commits for GC when dropped (see [`Registry::track_commits`]).
pub(crate) struct CommitTracking<'a>(&'a Registry);

impl Drop for CommitTracking<'_> {
    fn drop(&mut self) {
        *self.0.gc_committed.lock().unwrap() = None;
    }
}

impl Registry {
    /// Opens (creating when new) the store and index; rebuilds the index when it is new.
    pub async fn open(config: RegistryConfig) -> Result<Arc<Registry>> {
        std::fs::create_dir_all(&config.data_dir)?;
        let store = config.open_store()?;
        store.check_layout().await?;
        let index = Index::open(&config.data_dir.join("index"))?;
        if !index.is_built()? {
            let stats = shared_store::rebuild_index(&store, &index).await?;
            tracing::info!(?stats, "index built from the store");
        }
        let clock = HlcClock::default();
        clock.observe(index.max_hlc()?);
        let head = index.log_head()?;
        let shared = SharedStore::for_data_dir(&config.data_dir)?;
        shared.clear_stale_gc_lock(&store).await?;
        Ok(Arc::new(Registry {
            store,
            index,
            clock,
            config,
            stripes: (0..256).map(|_| Mutex::new(())).collect(),
            gc_running: Mutex::new(()),
            gc_committed: std::sync::Mutex::new(None),
            log_seq: std::sync::Mutex::new(head),
            log_head: watch::Sender::new(head),
            shared,
        }))
    }

    pub fn store(&self) -> &ChunkStore {
        &self.store
    }

    pub fn index(&self) -> &Index {
        &self.index
    }

    pub(crate) fn shared(&self) -> &SharedStore {
        &self.shared
    }

    pub fn gc_grace(&self) -> Duration {
        self.config.gc_grace
    }

    pub fn restore_failure_threshold(&self) -> u32 {
        self.config.restore_failure_threshold
    }

    pub fn lease_ttl(&self) -> Duration {
        self.config.lease_ttl
    }

    /// Rebuilds the index from the store (`snapreg reindex`).
    pub async fn rebuild_index(&self) -> Result<RebuildStats> {
        shared_store::rebuild_index(&self.store, &self.index).await
    }

    pub(crate) async fn lock_digest(&self, d: &Digest) -> MutexGuard<'_, ()> {
        self.stripes[d.0[0] as usize].lock().await
    }

    /// One GC at a time: held for the whole collection.
    pub(crate) async fn gc_exclusive(&self) -> MutexGuard<'_, ()> {
        self.gc_running.lock().await
    }

    /// From now until the guard drops, commits are recorded for
    /// [`Registry::committed_since_mark`]. Called before GC's mark reads the tags, so
    /// every commit is either in the mark or in that set.
    pub(crate) fn track_commits(&self) -> CommitTracking<'_> {
        *self.gc_committed.lock().unwrap() = Some(HashSet::new());
        CommitTracking(self)
    }

    /// Whether `d` was committed while a GC tracks commits.
    pub(crate) fn committed_since_mark(&self, d: &Digest) -> bool {
        self.gc_committed
            .lock()
            .unwrap()
            .as_ref()
            .is_some_and(|s| s.contains(d))
    }

    /// Called by every commit (manifest, tag) before its lease is released, so a GC
    /// whose mark began earlier still sees these digests as live.
    fn note_committed(&self, digests: impl IntoIterator<Item = Digest>) {
        if let Some(set) = self.gc_committed.lock().unwrap().as_mut() {
            set.extend(digests);
        }
    }

    /// The last sequence of the commit log (0: empty).
    pub fn log_head(&self) -> u64 {
        *self.log_seq.lock().unwrap()
    }

    /// Changes whenever the commit log grows.
    pub fn subscribe_log(&self) -> watch::Receiver<u64> {
        self.log_head.subscribe()
    }

    /// Up to `limit` commit-log entries after sequence `after`, in order.
    pub fn log_entries_after(&self, after: u64, limit: usize) -> Result<Vec<(u64, LogEntry)>> {
        self.index.log_entries_after(after, limit)
    }

    /// Appends a tag record this registry wrote (durably, after the record itself).
    fn log_commit(&self, repository: &str, tag: &str, record: &TagRecord) -> Result<()> {
        let mut last = self.log_seq.lock().unwrap();
        let seq = *last + 1;
        self.index.put_log_entry(
            seq,
            &LogEntry {
                repository: repository.into(),
                tag: tag.into(),
                record_name: record.object_name(),
            },
        )?;
        *last = seq;
        self.log_head.send_replace(seq);
        Ok(())
    }

    /// Takes a push lease (BeginPush): in the index, and in the store for other
    /// instances' GC.
    pub async fn begin_push(&self, repository: &str) -> Result<Lease> {
        repo_arg(repository)?;
        let id = format!("{:032x}", rand::random::<u128>());
        self.take_lease(&id).await?;
        Ok(Lease {
            id,
            ttl: self.config.lease_ttl,
        })
    }

    async fn take_lease(&self, id: &str) -> Result<()> {
        let ttl = self.config.lease_ttl;
        self.index
            .put_lease(id, now_ms() + ttl.as_millis() as u64)?;
        self.shared
            .begin_push(&self.store, &self.index, id, ttl)
            .await
    }

    /// Fails unless `lease` is live; activity extends it.
    pub async fn check_lease(&self, lease: &str) -> Result<()> {
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

    /// The digests the registry does not hold; every digest asked about joins the lease.
    pub async fn find_missing(&self, lease: &str, digests: Vec<Digest>) -> Result<Vec<Digest>> {
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

    /// Verifies and stores one uploaded chunk object under a lease the caller has
    /// checked ([`Registry::check_lease`]); returns whether it was new.
    pub async fn put_chunk(&self, lease: &str, digest: Digest, object: Bytes) -> Result<bool> {
        if object.len() > codec::MAX_OBJECT_LEN {
            return Err(RegistryError::invalid(
                "data",
                format!(
                    "chunk {digest} is a {}-byte object, over the {}-byte limit (a {}-byte chunk plus the codec header); chunk with a smaller max_size",
                    object.len(),
                    codec::MAX_OBJECT_LEN,
                    codec::MAX_CHUNK_LEN
                ),
            ));
        }
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

    /// A stored chunk object, as uploaded (the reader verifies it).
    pub async fn get_chunk(&self, digest: &Digest) -> Result<Bytes> {
        self.store.get_chunk(digest).await
    }

    /// Presigned URLs for chunk objects, valid for [`CHUNK_URL_TTL`]; `None` when the
    /// store cannot sign (the local backend).
    pub async fn chunk_urls(&self, digests: &[Digest]) -> Result<Option<Vec<String>>> {
        if digests.len() > MAX_CHUNK_URLS {
            return Err(RegistryError::invalid(
                "digests",
                format!("at most {MAX_CHUNK_URLS} per call, got {}", digests.len()),
            ));
        }
        self.store.chunk_urls(digests, CHUNK_URL_TTL).await
    }

    /// Commits a manifest under a live lease and points `tags` at it; ends the lease.
    pub async fn put_manifest(
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

    /// Writes a local tag record: the store, the index, then the commit log.
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
        self.log_commit(repository, tag, &record)?;
        Ok(record)
    }

    /// The manifest `reference` (a tag or `blake3:<hex>`) names: its digest and bytes.
    pub async fn get_manifest(&self, repository: &str, reference: &str) -> Result<(Digest, Bytes)> {
        repo_arg(repository)?;
        let digest = self.resolve(repository, reference).await?;
        Ok((digest, self.store.get_manifest(&digest).await?))
    }

    /// Every repository with at least one current tag.
    pub async fn repositories(&self) -> Result<Vec<String>> {
        self.refresh_tags("").await?;
        let mut repos: Vec<String> = self
            .index
            .all_tags()?
            .into_iter()
            .filter(|(_, _, r)| r.digest().is_some())
            .map(|(repo, _, _)| repo)
            .collect();
        repos.dedup();
        Ok(repos)
    }

    /// The current tags of a repository; an error when it has none.
    pub async fn tags(&self, repository: &str) -> Result<Vec<TagInfo>> {
        repo_arg(repository)?;
        let tags = self.current_tags(repository).await?;
        Ok(tags
            .into_iter()
            .map(|(tag, rec, digest)| TagInfo {
                tag,
                digest,
                hlc: rec.hlc,
            })
            .collect())
    }

    /// (tag, record, manifest digest) of every current tag of `repository`, read
    /// after folding in the store's records; an error when there are none.
    pub(crate) async fn current_tags(
        &self,
        repository: &str,
    ) -> Result<Vec<(String, TagRecord, Digest)>> {
        self.refresh_tags(repository).await?;
        let tags: Vec<_> = self
            .index
            .all_tags()?
            .into_iter()
            .filter(|(r, _, _)| r == repository)
            .filter_map(|(_, tag, rec)| rec.digest().map(|d| (tag, rec, d)))
            .collect();
        if tags.is_empty() {
            return Err(RegistryError::RepositoryNotFound {
                repository: repository.to_string(),
            });
        }
        Ok(tags)
    }

    /// Points a tag at the manifest `reference` names; returns the new record's HLC.
    pub async fn set_tag(&self, repository: &str, tag: &str, reference: &str) -> Result<Hlc> {
        repo_arg(repository)?;
        tag_arg(tag)?;
        let digest = self.resolve(repository, reference).await?;
        // Protect the manifest and its chunks from a GC already past its mark phase.
        let manifest = Manifest::decode(&self.store.get_manifest(&digest).await?)?;
        crate::tenant_keys::check(&self.config.tenant_keys, repository, &manifest)?;
        let lease = format!("tag-{:032x}", rand::random::<u128>());
        let chunks = manifest.chunk_digests();
        self.take_lease(&lease).await?;
        self.index.lease_digests(&lease, &[digest])?;
        self.index.lease_digests(&lease, &chunks)?;
        let rec = self
            .write_tag(repository, tag, TagTarget::Manifest(digest))
            .await?;
        self.note_committed(chunks.into_iter().chain([digest]));
        self.end_lease(&lease).await?;
        Ok(rec.hlc)
    }

    /// Deletes a tag (a tombstone record); returns the digest it pointed at.
    pub async fn delete_tag(&self, repository: &str, tag: &str) -> Result<Digest> {
        repo_arg(repository)?;
        // Not a digest: `resolve` takes those, and a tag record named after one would
        // be a path no tag can have.
        tag_arg(tag)?;
        let digest = self.resolve(repository, tag).await?;
        self.write_tag(repository, tag, TagTarget::Deleted).await?;
        Ok(digest)
    }

    /// Writes a tag record a peer sent, exactly as its origin wrote it (same HLC, same
    /// target, hence the same object name), storing its manifest first when given.
    /// Not logged for onward replication. Returns whether the record is now current.
    pub async fn replicate_tag_record(&self, req: ReplicatedRecord) -> Result<bool> {
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
    pub async fn delete_manifest(&self, repository: &str, digest: &str) -> Result<Digest> {
        repo_arg(repository)?;
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
        if self.committed_since_mark(&d) || self.index.is_leased(&d, now_ms())? {
            return Err(RegistryError::ManifestBusy { digest: d });
        }
        // Index first, as GC does: a crash between leaves an unindexed object for GC.
        self.index.remove_manifest(&d)?;
        self.store.delete_manifest(&d).await?;
        tracing::info!(digest = %d, "manifest deleted");
        Ok(d)
    }

    /// The manifest digest a tag or `blake3:<hex>` reference names.
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{self, chunk};

    #[tokio::test]
    async fn an_upload_is_verified_against_its_digest() {
        let t = testutil::registry().await;
        let reg = &t.reg;
        let lease = reg.begin_push("r").await.unwrap();
        let (d, _, _) = chunk(1, 1000);
        let (_, other, _) = chunk(2, 1000);
        match reg.put_chunk(&lease.id, d, other).await {
            Err(RegistryError::ChunkCorrupt { digest, .. }) => assert_eq!(digest, d),
            r => panic!("expected ChunkCorrupt, got {r:?}"),
        }
        assert!(!reg.index().has_chunk(&d).unwrap());
        let huge = Bytes::from(vec![0u8; codec::MAX_OBJECT_LEN + 1]);
        assert!(matches!(
            reg.put_chunk(&lease.id, d, huge).await,
            Err(RegistryError::InvalidArgument { field: "data", .. })
        ));
    }

    #[tokio::test]
    async fn a_manifest_needs_its_chunks_and_a_live_lease() {
        let t = testutil::registry().await;
        let reg = &t.reg;
        let c = chunk(3, 1000);
        let bytes = testutil::manifest(std::slice::from_ref(&c));
        assert!(matches!(
            reg.put_manifest("r", "no-such-lease", bytes.clone(), &[])
                .await,
            Err(RegistryError::LeaseUnknown { .. })
        ));
        let lease = reg.begin_push("r").await.unwrap();
        match reg.put_manifest("r", &lease.id, bytes, &[]).await {
            Err(RegistryError::ManifestIncomplete { count, first }) => {
                assert_eq!((count, first), (1, c.0))
            }
            r => panic!("expected ManifestIncomplete, got {r:?}"),
        }
        assert!(matches!(
            reg.begin_push("Not A Repo").await,
            Err(RegistryError::InvalidArgument {
                field: "repository",
                ..
            })
        ));
    }

    #[tokio::test]
    async fn tags_move_are_listed_and_logged() {
        let t = testutil::registry().await;
        let reg = &t.reg;
        let log = reg.subscribe_log();
        let v1 = testutil::push(reg, "team/app", "v1", &[chunk(4, 100)]).await;
        let v2 = testutil::push(reg, "team/app", "v2", &[chunk(5, 100)]).await;
        assert!(log.has_changed().unwrap());
        assert_eq!(reg.log_head(), 2);
        reg.set_tag("team/app", "v1", &v2.to_string())
            .await
            .unwrap();
        let tags = reg.tags("team/app").await.unwrap();
        assert_eq!(
            tags.iter()
                .map(|t| (t.tag.as_str(), t.digest))
                .collect::<Vec<_>>(),
            [("v1", v2), ("v2", v2)]
        );
        assert_eq!(reg.repositories().await.unwrap(), ["team/app"]);
        // v1's manifest is untagged now: it may be deleted, v2's may not.
        reg.delete_manifest("team/app", &v1.to_string())
            .await
            .unwrap();
        assert!(matches!(
            reg.delete_manifest("team/app", &v2.to_string()).await,
            Err(RegistryError::ManifestTagged { .. })
        ));
        assert_eq!(reg.delete_tag("team/app", "v1").await.unwrap(), v2);
        assert_eq!(reg.log_head(), 4);
        assert!(matches!(
            reg.get_manifest("team/app", "v1").await,
            Err(RegistryError::TagNotFound { .. })
        ));
        assert!(matches!(
            reg.tags("team/none").await,
            Err(RegistryError::RepositoryNotFound { .. })
        ));
    }
}
