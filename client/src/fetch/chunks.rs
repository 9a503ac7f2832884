//! [`Chunks`], the top of the stack readers hold: it builds the layers, counts every
//! chunk by where it came from (the transfer counters of DESIGN's JSON contract), and
//! decrypts for readers that want file bytes.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use snapreg_proto::encryption::TenantKey;
use snapreg_proto::manifest::Extent;
use snapreg_proto::Digest;

use super::direct_url::DirectUrls;
use super::node_cache::NodeCache;
use super::peers::Peers;
use super::registries::Registries;
use super::scheduler::{Budget, Priority, Scheduler, SchedulerStats};
use super::{ChunkFetch, Fetched, Lane, Origin, Want};
use crate::cache::ChunkCache;
use crate::encryption;
use crate::error::{ClientError, Result};
use crate::peer::swarm::Swarm;
use crate::peer::PeerConfig;
use crate::progress::Progress;
use crate::remote::Remote;

/// How a reader's stack is made: registries always; the rest as asked.
pub struct Builder {
    remotes: Vec<Remote>,
    cache: Option<ChunkCache>,
    direct_for: Option<Vec<Digest>>,
    key: Option<Arc<TenantKey>>,
    swarm: Option<SwarmSpec>,
    budget: Option<Budget>,
}

/// The snapshot whose swarm a reader joins.
struct SwarmSpec {
    config: PeerConfig,
    repository: String,
    snapshot: Digest,
    chunks: Vec<Digest>,
}

impl Builder {
    /// Fetches from sibling nodes that hold or fetch the same snapshot (the
    /// manifest `snapshot` of `repository`, whose distinct chunks are `chunks`),
    /// found through the nearest registry's tracker; `None` leaves peers out.
    pub fn peers(
        mut self,
        config: Option<PeerConfig>,
        repository: &str,
        snapshot: Digest,
        chunks: Vec<Digest>,
    ) -> Self {
        self.swarm = config.map(|config| SwarmSpec {
            config,
            repository: repository.to_string(),
            snapshot,
            chunks,
        });
        self
    }

    /// Reads through the node cache, and fills it.
    pub fn node_cache(mut self, cache: ChunkCache) -> Self {
        self.cache = Some(cache);
        self
    }

    /// Fetches `chunks` by presigned URL where the nearest registry signs them.
    pub fn direct_urls(mut self, chunks: Vec<Digest>) -> Self {
        self.direct_for = Some(chunks);
        self
    }

    /// [`Chunks::get`] decrypts with this tenant key ([`encryption::key_for`] the
    /// snapshot).
    pub fn decrypting(mut self, key: Option<Arc<TenantKey>>) -> Self {
        self.key = key;
        self
    }

    /// Every fetch through one [`Scheduler`] with this budget, readers at the priority
    /// of their [`Chunks::at`]: a restore's CRIU stream, device memory, weights fill
    /// and read-ahead share it.
    pub fn scheduled(mut self, budget: Budget) -> Self {
        self.budget = Some(budget);
        self
    }

    /// The stack, bottom up; asks the registry for URLs now when `direct_urls` was set.
    pub async fn build(self, progress: Progress) -> Result<Chunks> {
        let nearest = self.remotes.first().cloned();
        let mut stack: Arc<dyn ChunkFetch> = Arc::new(Registries::new(self.remotes));
        if let (Some(chunks), Some(remote)) = (&self.direct_for, &nearest) {
            stack = DirectUrls::over(remote, chunks, stack).await?;
        }
        let mut swarm = None;
        if let (Some(spec), Some(remote)) = (self.swarm, &nearest) {
            let held = match &self.cache {
                Some(cache) => {
                    let (cache, chunks) = (cache.clone(), spec.chunks.clone());
                    tokio::task::spawn_blocking(move || {
                        chunks.iter().filter(|d| cache.contains(d)).count()
                    })
                    .await
                    .unwrap_or(0)
                }
                None => 0,
            };
            let joined = Swarm::join(
                remote.clone(),
                &spec.repository,
                spec.snapshot,
                spec.chunks,
                held,
                spec.config,
            )
            .await;
            stack = Peers::over(joined.clone(), stack);
            swarm = Some(joined);
        }
        if let Some(cache) = &self.cache {
            stack = NodeCache::over(cache.clone(), stack);
        }
        let scheduler = self.budget.map(|b| Scheduler::over(stack.clone(), b));
        Ok(Chunks {
            stack,
            scheduler,
            priority: Priority::Demand,
            cache: self.cache,
            key: self.key,
            progress,
            by_source: Arc::default(),
            by_peer: Arc::default(),
            stored_here: Arc::default(),
            swarm,
        })
    }
}

/// A reader's chunk source: the layers, the counters, the tenant key.
#[derive(Clone)]
pub struct Chunks {
    stack: Arc<dyn ChunkFetch>,
    /// When built [`Builder::scheduled`]: every fetch goes through it at `priority`.
    scheduler: Option<Arc<Scheduler>>,
    priority: Priority,
    cache: Option<ChunkCache>,
    key: Option<Arc<TenantKey>>,
    progress: Progress,
    by_source: Arc<Mutex<BTreeMap<String, u64>>>,
    by_peer: Arc<Mutex<BTreeMap<String, u64>>>,
    /// Chunks this source fetched from below the node cache, which that layer
    /// verified in memory and stored moments ago: their cache files are spliced
    /// without hashing them again. Bounded by the snapshot's chunks.
    stored_here: Arc<Mutex<HashSet<Digest>>>,
    swarm: Option<Arc<Swarm>>,
}

/// What the peers did for one reader, for its report.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct PeerSummary {
    /// Parents the reader fetched from or could have.
    pub peers: usize,
    /// Chunks fetched from each peer, by node name.
    pub chunks_by_peer: BTreeMap<String, u64>,
    /// "node: reason" for each peer lost or dropped (bad bytes, a broken stream).
    pub peer_problems: Vec<String>,
}

impl Chunks {
    /// `remotes`: the registries to ask, nearest first (at least one).
    pub fn builder(remotes: Vec<Remote>) -> Builder {
        Builder {
            remotes,
            cache: None,
            direct_for: None,
            key: None,
            swarm: None,
            budget: None,
        }
    }

    /// The same source, fetching at `priority` (under a scheduler; else the same).
    pub fn at(&self, priority: Priority) -> Chunks {
        Chunks {
            priority,
            ..self.clone()
        }
    }

    /// Whether this source fetches from sibling nodes too.
    pub fn has_peers(&self) -> bool {
        self.swarm.is_some()
    }

    /// The scheduler's budget, if fetches go through one.
    pub fn budget(&self) -> Option<Budget> {
        self.scheduler.as_ref().map(|s| s.budget())
    }

    /// What the scheduler did, if there is one.
    pub fn scheduler_stats(&self) -> Option<SchedulerStats> {
        self.scheduler.as_ref().map(|s| s.stats())
    }

    async fn fetch_one(&self, digest: Digest, file: &str) -> Result<Fetched> {
        match &self.scheduler {
            Some(s) => s.fetch(digest, file, self.priority).await,
            // Nothing else of this reader's is in flight to be urgent against.
            None => self.stack.fetch(digest, file, Lane::Bulk).await,
        }
    }

    /// Many chunks through the scheduler one by one, or the stack's own `fetch_many`
    /// (which may batch) without one.
    fn fetch_many(
        &self,
        wants: Vec<Want>,
        window: usize,
    ) -> BoxStream<'_, Result<(Digest, Fetched)>> {
        if self.scheduler.is_none() {
            return self.stack.fetch_many(wants, window);
        }
        futures::stream::iter(wants)
            .map(move |(digest, file)| async move { Ok((digest, self.fetch_one(digest, &file).await?)) })
            .buffer_unordered(window.max(1))
            .boxed()
    }

    /// Fetches `wants` into the node cache ahead of their readers, in order, at this
    /// source's priority, as far as the scheduler's budget allows (three quarters of
    /// it, so a Demand never waits long for a permit). Chunks the cache already holds
    /// are left alone. Failures are left to the reader
    /// that needs the chunk, which fetches it again with its own error.
    pub fn read_ahead(&self, wants: Vec<Want>) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let mut seen = std::collections::HashSet::new();
            let wants: Vec<Want> = wants.into_iter().filter(|(d, _)| seen.insert(*d)).collect();
            let missing = match this.cache.clone() {
                Some(cache) => tokio::task::spawn_blocking(move || {
                    wants
                        .into_iter()
                        .filter(|(d, _)| !cache.contains(d))
                        .collect::<Vec<_>>()
                })
                .await
                .unwrap_or_default(),
                None => wants,
            };
            let width = this.budget().map_or(1, |b| (b.requests * 3 / 4).max(1));
            futures::stream::iter(missing)
                .map(|(digest, file)| {
                    let this = &this;
                    async move {
                        if let Err(e) = this.stored(digest, &file).await {
                            tracing::debug!("read-ahead of {digest} ({file}): {e}");
                        }
                    }
                })
                .buffer_unordered(width)
                .for_each(|_| async {})
                .await;
        })
    }

    /// What the peers did so far.
    pub fn peer_summary(&self) -> PeerSummary {
        PeerSummary {
            peers: self.swarm.as_ref().map_or(0, |s| s.parent_count()),
            chunks_by_peer: self.by_peer.lock().unwrap().clone(),
            peer_problems: self
                .swarm
                .as_ref()
                .map(|s| s.problems())
                .unwrap_or_default(),
        }
    }

    /// Many chunks as stored (verified, ciphertext for an encrypted snapshot), in
    /// any order, `window` in flight: what a prefetch warms the cache with.
    pub fn stored_many(
        &self,
        wants: Vec<Want>,
        window: usize,
    ) -> BoxStream<'_, Result<(Digest, Bytes)>> {
        self.fetch_many(wants, window)
            .map(move |item| item.map(|(digest, fetched)| (digest, self.count(fetched))))
            .boxed()
    }

    /// Chunks fetched per source (a registry URL, or one with " (direct)" for its
    /// presigned URLs).
    pub fn fetched_from(&self) -> BTreeMap<String, u64> {
        self.by_source.lock().unwrap().clone()
    }

    /// A chunk as stored, verified (and now in the node cache, if there is one):
    /// enough to warm the cache ahead of a restore.
    pub async fn stored(&self, digest: Digest, file: &str) -> Result<Bytes> {
        let fetched = self.fetch_one(digest, file).await?;
        if self.cache.is_some() && !matches!(fetched.origin, Origin::NodeCache) {
            self.stored_here.lock().unwrap().insert(digest);
        }
        Ok(self.count(fetched))
    }

    /// A chunk's bytes as its files hold them (decrypted), `file` naming it in errors.
    pub async fn get(&self, digest: Digest, file: &str) -> Result<Bytes> {
        let content = self.stored(digest, file).await?;
        self.decrypt(digest, content, file).await
    }

    /// A file's bytes (its `extents`) in order, `window` chunks fetched ahead: each
    /// chunk as its file holds it, zero runs as pieces of at most 1 MiB of shared
    /// zeros (never allocated whole: a KV cache's zero run is gigabytes).
    pub fn extents<'a>(
        &'a self,
        extents: &'a [Extent],
        file: &'a str,
        window: usize,
    ) -> BoxStream<'a, Result<Bytes>> {
        static ZEROS: [u8; 1 << 20] = [0; 1 << 20];
        futures::stream::iter(extents.iter().copied())
            .map(move |e| async move {
                Ok(match e {
                    Extent::Chunk { chunk, .. } => vec![self.get(chunk, file).await?],
                    Extent::Zero { zero } => {
                        let full = (zero / ZEROS.len() as u64) as usize;
                        let rest = (zero % ZEROS.len() as u64) as usize;
                        let mut v = vec![Bytes::from_static(&ZEROS); full];
                        if rest > 0 {
                            v.push(Bytes::from_static(&ZEROS[..rest]));
                        }
                        v
                    }
                })
            })
            .buffered(window.max(1))
            .flat_map(|pieces: Result<Vec<Bytes>>| match pieces {
                Ok(v) => futures::stream::iter(v.into_iter().map(Ok)).boxed(),
                Err(e) => futures::stream::once(async move { Err(e) }).boxed(),
            })
            .boxed()
    }

    /// Many chunks as their files hold them, in any order, `window` in flight.
    pub fn get_many(
        &self,
        wants: Vec<Want>,
        window: usize,
    ) -> BoxStream<'_, Result<(Digest, Bytes)>> {
        let names: std::collections::HashMap<Digest, Arc<str>> =
            wants.iter().map(|(d, f)| (*d, f.clone())).collect();
        self.fetch_many(wants, window)
            .map(move |item| {
                let file = item.as_ref().ok().and_then(|(d, _)| names.get(d).cloned());
                (item, file)
            })
            .map(move |(item, file)| async move {
                let (digest, fetched) = item?;
                let content = self.count(fetched);
                let file = file.unwrap_or_else(|| "(no file)".into());
                Ok((digest, self.decrypt(digest, content, &file).await?))
            })
            .buffered(window.max(1))
            .boxed()
    }

    /// The node cache's verified file of a chunk whose stored bytes are its file bytes
    /// (a plaintext snapshot), for splicing into CRIU's pipe without copying it through
    /// this process; `None` if not cached (or encrypted: then the bytes must be
    /// decrypted here). Counted as served by the node cache.
    pub async fn cached_file(&self, digest: Digest) -> Option<(std::fs::File, u64)> {
        let file = self.cache_file(digest).await?;
        self.progress.counters.chunks_cached.fetch_add(1, Relaxed);
        Some(file)
    }

    /// The same for a chunk just fetched through this source (and so counted
    /// already): its bytes went into the node cache on their way up.
    pub async fn stored_file(&self, digest: Digest) -> Option<(std::fs::File, u64)> {
        self.cache_file(digest).await
    }

    async fn cache_file(&self, digest: Digest) -> Option<(std::fs::File, u64)> {
        let cache = self.cache.clone()?;
        // A stat on this thread: a restore from a cold cache asks this of every chunk.
        if self.key.is_some() || !cache.contains(&digest) {
            return None;
        }
        let fresh = self.stored_here.lock().unwrap().contains(&digest);
        tokio::task::spawn_blocking(move || match fresh {
            true => cache.open_stored(&digest),
            false => cache.open_verified(&digest),
        })
        .await
        .ok()
        .flatten()
    }

    /// Chunks of `digests` the node cache lacks (all of them without a cache).
    pub async fn missing_from_cache(&self, digests: Vec<Digest>) -> Vec<Digest> {
        let Some(cache) = self.cache.clone() else {
            return digests;
        };
        tokio::task::spawn_blocking(move || {
            digests.into_iter().filter(|d| !cache.contains(d)).collect()
        })
        .await
        .unwrap_or_default()
    }

    fn count(&self, fetched: Fetched) -> Bytes {
        let counters = &self.progress.counters;
        let (source, object_bytes) = match fetched.origin {
            Origin::NodeCache => {
                counters.chunks_cached.fetch_add(1, Relaxed);
                return fetched.content;
            }
            Origin::Joined => return fetched.content,
            Origin::Registry { url, object_bytes } => (url, object_bytes),
            Origin::DirectUrl { url, object_bytes } => {
                counters.chunks_direct.fetch_add(1, Relaxed);
                counters.bytes_direct.fetch_add(object_bytes, Relaxed);
                (url, object_bytes)
            }
            Origin::Peer { node, object_bytes } => {
                counters.chunks_transferred.fetch_add(1, Relaxed);
                counters.bytes_transferred.fetch_add(object_bytes, Relaxed);
                counters.chunks_from_peers.fetch_add(1, Relaxed);
                counters.bytes_from_peers.fetch_add(object_bytes, Relaxed);
                *self
                    .by_peer
                    .lock()
                    .unwrap()
                    .entry(node.to_string())
                    .or_default() += 1;
                return fetched.content;
            }
        };
        counters.chunks_transferred.fetch_add(1, Relaxed);
        counters.bytes_transferred.fetch_add(object_bytes, Relaxed);
        *self
            .by_source
            .lock()
            .unwrap()
            .entry(source.to_string())
            .or_default() += 1;
        fetched.content
    }

    async fn decrypt(&self, digest: Digest, content: Bytes, file: &str) -> Result<Bytes> {
        let Some(key) = self.key.clone() else {
            return Ok(content);
        };
        tokio::task::spawn_blocking(move || key.decrypt_chunk(&digest, &content))
            .await
            .map_err(|e| ClientError::io("decrypting a chunk", std::io::Error::other(e)))?
            .map_err(|e| encryption::chunk_error(e, file))
    }
}
