//! `snapctl prefetch`: every chunk of a snapshot (all layers) into the node cache, so
//! that a restore on this node fetches nothing — what a scheduler runs before placing
//! a pod. Chunks move as stored (ciphertext for an encrypted snapshot): no key needed.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use futures::StreamExt;
use snapreg_proto::reference::Reference;

use crate::cache::ChunkCache;
use crate::error::Result;
use crate::fetch::{Chunks, PeerSummary};
use crate::peer::PeerConfig;
use crate::progress::{CountersSnapshot, Progress};
use crate::pull;
use crate::remote::Remote;

#[derive(Debug, serde::Serialize)]
pub struct PrefetchReport {
    pub reference: String,
    pub digest: String,
    #[serde(flatten)]
    pub counters: CountersSnapshot,
    pub chunks_by_registry: BTreeMap<String, u64>,
    #[serde(flatten)]
    pub peers: PeerSummary,
    pub seconds: f64,
}

/// Warms `cache` from `remotes` (nearest first) and, with `peers`, from sibling
/// nodes fetching the same snapshot; `window` chunks in flight; then enforces the
/// cache's size limit.
pub async fn prefetch(
    remotes: Vec<Remote>,
    reference: &Reference,
    cache: ChunkCache,
    window: usize,
    peers: Option<PeerConfig>,
    progress: Progress,
) -> Result<PrefetchReport> {
    let started = Instant::now();
    let (digest, manifest) = pull::first_manifest(&remotes, reference).await?;
    let digests = manifest.chunk_digests();
    progress
        .counters
        .chunks_total
        .store(digests.len() as u64, Relaxed);
    progress
        .counters
        .bytes_total
        .store(manifest.total_size(), Relaxed);
    let chunks = Chunks::builder(remotes)
        .node_cache(cache.clone())
        .direct_urls(digests.clone())
        .peers(peers, &reference.repository, digest, digests.clone())
        .build(progress.clone())
        .await?;
    let file: std::sync::Arc<str> = "(prefetch)".into();
    let wants = digests.into_iter().map(|d| (d, file.clone())).collect();
    let mut fetches = chunks.stored_many(wants, window.max(1));
    while let Some(item) = fetches.next().await {
        progress.advance(item?.1.len() as u64);
    }
    drop(fetches);
    let _ = tokio::task::spawn_blocking(move || cache.enforce_limit()).await;
    progress.finish();
    Ok(PrefetchReport {
        reference: reference.to_string(),
        digest: digest.to_string(),
        counters: progress.counters.snapshot(),
        chunks_by_registry: chunks.fetched_from(),
        peers: chunks.peer_summary(),
        seconds: started.elapsed().as_secs_f64(),
    })
}
