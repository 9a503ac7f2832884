//! Garbage collection: apply retention policies, mark from tags, sweep what is
//! unreferenced and old.
//!
//! | concurrent with GC | why it is safe |
//! |---|---|
//! | a push's "which are missing" | it leases each digest under the digest's stripe lock; the sweep re-checks leases under the same lock before deleting |
//! | a push uploading chunks | uploads join the lease, and are younger than the grace period |
//! | a manifest commit | its manifest and chunks stay leased until the tag is written; then, before the lease ends, they join `gc_committed`, which the sweep treats as live |
//! | `SetTag` on an old manifest | the same: leased while the record is written, then `gc_committed` |
//! | another GC | one GC at a time (`gc_running`) |
//!
//! `gc_committed` is switched on before the mark reads the tags, so every commit is
//! either in the mark or in that set. The store is listed for the sweep (not the
//! index), so objects a crash left out of the index are collected too.
//!
//! Other instances on the same store (shared_store.rs): GC first takes the store's GC
//! lock, which it only gets while no other instance holds a push lease (and which
//! makes their new pushes wait); it marks from every tag record in the store, not
//! just those this index knows; and it writes each batch of candidates to a sweep log
//! before deleting any, so the other instances forget them.

use std::collections::HashSet;
use std::time::{Duration, Instant, SystemTime};

use futures::TryStreamExt;
use snapreg_proto::layout;
use snapreg_proto::manifest::Manifest;
use snapreg_proto::pb::CollectGarbageResponse;
use snapreg_proto::Digest;

use crate::error::Result;
use crate::server::{now_ms, Registry};

pub async fn collect(
    reg: &Registry,
    grace: Duration,
    dry_run: bool,
) -> Result<CollectGarbageResponse> {
    let _only_one = reg.gc_running.lock().await;
    reg.shared.lock_gc(&reg.store, reg.config.lease_ttl).await?;
    // Expired tags first, so this very GC reclaims what they held.
    if !dry_run {
        crate::retention::apply(reg, None, false).await?;
    }
    *reg.gc_committed.lock().unwrap() = Some(HashSet::new());
    let result = mark_and_sweep(reg, grace, dry_run).await;
    *reg.gc_committed.lock().unwrap() = None;
    reg.shared.unlock_gc(&reg.store).await?;
    result
}

/// Candidates written to one sweep log before any of them is deleted.
const SWEEP_BATCH: usize = 1024;

async fn mark_and_sweep(
    reg: &Registry,
    grace: Duration,
    dry_run: bool,
) -> Result<CollectGarbageResponse> {
    let started = Instant::now();
    let cutoff = SystemTime::now() - grace;
    let mut stats = CollectGarbageResponse::default();
    reg.index.drop_expired_leases(now_ms())?;

    // Mark, from every instance's tag records.
    reg.refresh_tags("").await?;
    let mut live_manifests = HashSet::new();
    let mut live_chunks: HashSet<Digest> = HashSet::new();
    for (_, _, record) in reg.index.all_tags()? {
        let Some(d) = record.digest() else { continue };
        if live_manifests.insert(d) {
            let manifest = Manifest::decode(&reg.store.get_manifest(&d).await?)?;
            live_chunks.extend(manifest.chunk_digests());
        }
    }
    stats.manifests_live = live_manifests.len() as u64;
    stats.chunks_live = live_chunks.len() as u64;

    // Sweep chunks, then manifests.
    for (prefix, is_chunk) in [(layout::CHUNKS, true), (layout::MANIFESTS, false)] {
        let mut listing = std::pin::pin!(reg.store.list_stream(prefix));
        let mut batch = Vec::new();
        loop {
            let next = listing.try_next().await?;
            if let Some(meta) = &next {
                let path = meta.location.as_ref();
                let parsed = if is_chunk {
                    layout::parse_chunk_path(path)
                } else {
                    layout::parse_manifest_path(path)
                };
                let Ok(d) = parsed else { continue };
                if (is_chunk && live_chunks.contains(&d))
                    || (!is_chunk && live_manifests.contains(&d))
                {
                    continue;
                }
                if SystemTime::from(meta.last_modified) > cutoff {
                    stats.chunks_kept_young += is_chunk as u64;
                    continue;
                }
                batch.push((d, meta.size));
                if batch.len() < SWEEP_BATCH {
                    continue;
                }
            }
            reg.shared
                .refresh_gc(&reg.store, reg.config.lease_ttl)
                .await?;
            if !dry_run {
                let ds: Vec<Digest> = batch.iter().map(|(d, _)| *d).collect();
                let (chunks, manifests) = if is_chunk {
                    (&ds[..], &[][..])
                } else {
                    (&[][..], &ds[..])
                };
                reg.shared
                    .log_sweep(&reg.store, &reg.index, chunks, manifests)
                    .await?;
            }
            for (d, size) in batch.drain(..) {
                sweep_one(reg, d, size, is_chunk, dry_run, &mut stats).await?;
            }
            if next.is_none() {
                break;
            }
        }
    }
    tracing::info!(?stats, elapsed = ?started.elapsed(), dry_run, "garbage collection finished");
    Ok(stats)
}

/// Deletes one unreferenced, old object unless a push holds it.
async fn sweep_one(
    reg: &Registry,
    d: Digest,
    size: u64,
    is_chunk: bool,
    dry_run: bool,
    stats: &mut CollectGarbageResponse,
) -> Result<()> {
    let _g = reg.lock_digest(&d).await;
    let committed = reg
        .gc_committed
        .lock()
        .unwrap()
        .as_ref()
        .is_some_and(|s| s.contains(&d));
    if committed || reg.index.is_leased(&d, now_ms())? {
        stats.chunks_kept_leased += is_chunk as u64;
        return Ok(());
    }
    if !dry_run {
        // Index first: a crash between the two leaves an unindexed object,
        // which a later push re-uploads harmlessly and a later GC removes.
        if is_chunk {
            reg.index.remove_chunk(&d)?;
            reg.store.delete_chunk(&d).await?;
        } else {
            reg.index.remove_manifest(&d)?;
            reg.store.delete_manifest(&d).await?;
        }
    }
    if is_chunk {
        stats.chunks_swept += 1;
        stats.bytes_swept += size;
    } else {
        stats.manifests_swept += 1;
    }
    Ok(())
}
