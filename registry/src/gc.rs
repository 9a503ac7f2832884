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
use snapreg_proto::Digest;

use crate::clock::now_ms;
use crate::error::Result;
use crate::registry::Registry;

/// What one collection found and (unless a dry run) removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    pub manifests_live: u64,
    pub chunks_live: u64,
    pub chunks_swept: u64,
    pub bytes_swept: u64,
    pub manifests_swept: u64,
    /// Unreferenced chunks kept because they are younger than the grace period.
    pub chunks_kept_young: u64,
    /// Unreferenced objects kept because a push or commit holds them.
    pub chunks_kept_leased: u64,
}

/// Collects garbage: retention first (unless `dry_run`), then mark and sweep what is
/// unreferenced and older than `grace`.
pub async fn collect(reg: &Registry, grace: Duration, dry_run: bool) -> Result<GcReport> {
    let _only_one = reg.gc_exclusive().await;
    let (store, shared) = (reg.store(), reg.shared());
    shared.lock_gc(store, reg.lease_ttl()).await?;
    // Expired tags first, so this very GC reclaims what they held.
    let result = async {
        if !dry_run {
            crate::retention::apply(reg, None, false).await?;
        }
        let _tracking = reg.track_commits();
        mark_and_sweep(reg, grace, dry_run).await
    }
    .await;
    shared.unlock_gc(store).await?;
    result
}

/// Candidates written to one sweep log before any of them is deleted.
const SWEEP_BATCH: usize = 1024;

async fn mark_and_sweep(reg: &Registry, grace: Duration, dry_run: bool) -> Result<GcReport> {
    let started = Instant::now();
    let cutoff = SystemTime::now() - grace;
    let mut stats = GcReport::default();
    let (store, index) = (reg.store(), reg.index());
    index.drop_expired_leases(now_ms())?;

    // Mark, from every instance's tag records.
    reg.refresh_tags("").await?;
    let mut live_manifests = HashSet::new();
    let mut live_chunks: HashSet<Digest> = HashSet::new();
    for (_, _, record) in index.all_tags()? {
        let Some(d) = record.digest() else { continue };
        if live_manifests.insert(d) {
            let manifest = Manifest::decode(&store.get_manifest(&d).await?)?;
            live_chunks.extend(manifest.chunk_digests());
        }
    }
    stats.manifests_live = live_manifests.len() as u64;
    stats.chunks_live = live_chunks.len() as u64;

    // Sweep chunks, then manifests.
    for (prefix, is_chunk) in [(layout::CHUNKS, true), (layout::MANIFESTS, false)] {
        let mut listing = std::pin::pin!(store.list_stream(prefix));
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
            reg.shared().refresh_gc(store, reg.lease_ttl()).await?;
            if !dry_run {
                let ds: Vec<Digest> = batch.iter().map(|(d, _)| *d).collect();
                let (chunks, manifests) = if is_chunk {
                    (&ds[..], &[][..])
                } else {
                    (&[][..], &ds[..])
                };
                reg.shared()
                    .log_sweep(store, index, chunks, manifests)
                    .await?;
            }
            sweep_batch(
                reg,
                std::mem::take(&mut batch),
                is_chunk,
                dry_run,
                &mut stats,
            )
            .await?;
            if next.is_none() {
                break;
            }
        }
    }
    tracing::info!(?stats, elapsed = ?started.elapsed(), dry_run, "garbage collection finished");
    Ok(stats)
}

/// Deletes a batch of unreferenced, old objects, except those a push holds.
///
/// Index entries go first and durably, objects after, so a crash in between leaves
/// at worst an unindexed object (a later push re-uploads it harmlessly, a later GC
/// removes it), never an entry for a missing object. One fsync per batch, not one
/// per object (a synced delete each made GC sweep ~32 objects a second: bench cost):
/// 1. under each digest's lock: skip it if a push holds it, else drop its entry
///    from the index (not yet synced);
/// 2. sync the index once;
/// 3. under each digest's lock again: delete the object unless the index holds it
///    again (a push found the object in the store meanwhile and re-indexed it, or
///    uploaded it anew), in which case it stays.
async fn sweep_batch(
    reg: &Registry,
    batch: Vec<(Digest, u64)>,
    is_chunk: bool,
    dry_run: bool,
    stats: &mut GcReport,
) -> Result<()> {
    let mut removed = Vec::with_capacity(batch.len());
    for (d, size) in batch {
        let _g = reg.lock_digest(&d).await;
        if reg.committed_since_mark(&d) || reg.index().is_leased(&d, now_ms())? {
            stats.chunks_kept_leased += is_chunk as u64;
            continue;
        }
        if !dry_run {
            reg.index().remove_unsynced(&d, is_chunk)?;
        }
        removed.push((d, size));
    }
    if !dry_run && !removed.is_empty() {
        reg.index().sync()?;
    }
    for (d, size) in removed {
        if !dry_run {
            let _g = reg.lock_digest(&d).await;
            // Re-indexed, leased or committed by a push since the first pass: keep the
            // object (a push that found it present before the index entry went is
            // holding a lease on it, not uploading it again).
            if reg.index().has(&d, is_chunk)?
                || reg.committed_since_mark(&d)
                || reg.index().is_leased(&d, now_ms())?
            {
                continue;
            }
            if is_chunk {
                reg.store().delete_chunk(&d).await?;
            } else {
                reg.store().delete_manifest(&d).await?;
            }
        }
        if is_chunk {
            stats.chunks_swept += 1;
            stats.bytes_swept += size;
        } else {
            stats.manifests_swept += 1;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{self, chunk};

    #[tokio::test]
    async fn sweeps_only_what_no_tag_holds_and_only_past_the_grace_period() {
        let t = testutil::registry().await;
        let reg = &t.reg;
        let (shared, only_a) = (chunk(1, 5000), chunk(2, 5000));
        testutil::push(reg, "r", "a", &[shared.clone(), only_a.clone()]).await;
        let b = testutil::push(reg, "r", "b", std::slice::from_ref(&shared)).await;
        reg.delete_tag("r", "a").await.unwrap();

        // Within the grace period nothing goes.
        let young = collect(reg, Duration::from_secs(3600), false)
            .await
            .unwrap();
        assert_eq!(
            (young.chunks_swept, young.manifests_swept),
            (0, 0),
            "{young:?}"
        );
        assert_eq!(young.chunks_kept_young, 1, "{young:?}");

        // A dry run reports what a real one removes, and removes nothing.
        let dry = collect(reg, Duration::ZERO, true).await.unwrap();
        assert_eq!((dry.chunks_swept, dry.manifests_swept), (1, 1), "{dry:?}");
        assert!(reg.store().get_chunk(&only_a.0).await.is_ok());

        let swept = collect(reg, Duration::ZERO, false).await.unwrap();
        assert_eq!(
            swept,
            GcReport {
                manifests_live: 1,
                chunks_live: 1,
                chunks_swept: 1,
                bytes_swept: only_a.1.len() as u64,
                manifests_swept: 1,
                ..GcReport::default()
            }
        );
        assert!(matches!(
            reg.store().get_chunk(&only_a.0).await,
            Err(crate::RegistryError::ChunkMissing { .. })
        ));
        assert!(!reg.index().has_chunk(&only_a.0).unwrap());
        // What the remaining tag needs is intact.
        assert!(reg.store().get_chunk(&shared.0).await.is_ok());
        assert_eq!(reg.get_manifest("r", "b").await.unwrap().0, b);
    }

    #[tokio::test]
    async fn a_push_in_progress_keeps_its_chunks() {
        let t = testutil::registry().await;
        let reg = &t.reg;
        let pending = chunk(3, 1000);
        let lease = reg.begin_push("r").await.unwrap();
        assert_eq!(
            reg.find_missing(&lease.id, vec![pending.0]).await.unwrap(),
            vec![pending.0]
        );
        reg.put_chunk(&lease.id, pending.0, pending.1.clone())
            .await
            .unwrap();
        // Unreferenced and past a zero grace period, but leased: kept.
        let report = collect(reg, Duration::ZERO, false).await.unwrap();
        assert_eq!(report.chunks_swept, 0, "{report:?}");
        assert_eq!(report.chunks_kept_leased, 1, "{report:?}");
        // The push commits over the chunk GC left alone.
        reg.put_manifest(
            "r",
            &lease.id,
            testutil::manifest(&[pending]),
            &["v1".into()],
        )
        .await
        .unwrap();
    }
}
