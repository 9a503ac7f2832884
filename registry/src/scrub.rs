//! Scrub: re-read every stored chunk and manifest, verify it against the digest it
//! is stored under, and quarantine what does not verify.
//!
//! A chunk verifies when its object decodes (codec header, zstd frame, length) to
//! bytes whose BLAKE3 is its name; a manifest when its bytes hash to its name and
//! decode as a manifest. A damaged object is copied to `quarantine/<its path>` (kept
//! for inspection, never read back), then dropped from the index, then deleted: from
//! then on the registry reports it missing, so the next push that holds those bytes
//! uploads them again, and a pull or `snapctl verify` of a snapshot that needs it
//! fails naming it instead of serving bad bytes. A crash between the steps leaves the
//! original in place (unindexed or not), which the next scrub finds again.
//!
//! `snapreg scrub --data DIR` runs it on a stopped registry (RocksDB allows one
//! process), like `snapreg reindex`; `snapreg scrub --registry URL` asks a serving one
//! (the `Scrub` RPC). Online, one scrub runs at a time, and a chunk quarantined while
//! a push was told it exists makes that push's commit fail with "does not hold" (the
//! client pushes again and uploads it): never a manifest over a missing chunk.

use std::sync::Arc;
use std::time::Instant;

use futures::TryStreamExt;
use object_store::path::Path;
use object_store::ObjectStoreExt;
use snapreg_proto::manifest::Manifest;
use snapreg_proto::{codec, layout, Digest};

use crate::error::Result;
use crate::registry::Registry;

/// Objects read and verified at once: each is at most a 16 MiB chunk.
const IN_FLIGHT: usize = 4;

#[derive(Debug, Default)]
pub struct ScrubReport {
    pub chunks_checked: u64,
    pub manifests_checked: u64,
    pub bytes_read: u64,
    /// Every object that did not verify.
    pub damaged: Vec<Damaged>,
    /// Whether the damaged objects were moved to `quarantine/` (false on a dry run).
    pub quarantined: bool,
    pub seconds: f64,
}

#[derive(Debug)]
pub struct Damaged {
    /// `chunk` or `manifest`.
    pub kind: &'static str,
    pub digest: String,
    pub path: String,
    pub reason: String,
    /// Where the object now lives (absent on a dry run).
    pub quarantined_to: Option<String>,
}

/// One scrub at a time per process: two would race to quarantine the same object.
static RUNNING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub async fn scrub(reg: &Arc<Registry>, dry_run: bool) -> Result<ScrubReport> {
    let _only_one = RUNNING.lock().await;
    let started = Instant::now();
    let mut report = ScrubReport {
        quarantined: !dry_run,
        ..ScrubReport::default()
    };
    for (prefix, is_chunk) in [(layout::CHUNKS, true), (layout::MANIFESTS, false)] {
        let checks = reg
            .store()
            .list_stream(prefix)
            .map_ok(|meta| {
                let reg = reg.clone();
                async move { check(&reg, meta.location.as_ref(), is_chunk).await }
            })
            .try_buffer_unordered(IN_FLIGHT);
        let mut checks = std::pin::pin!(checks);
        while let Some((path, digest, len, problem)) = checks.try_next().await? {
            let Some(digest) = digest else { continue };
            if is_chunk {
                report.chunks_checked += 1;
            } else {
                report.manifests_checked += 1;
            }
            report.bytes_read += len;
            let Some(reason) = problem else { continue };
            tracing::warn!(%path, %reason, "scrub found a damaged object");
            let quarantined_to = if dry_run {
                None
            } else {
                Some(quarantine(reg, &path, &digest, is_chunk).await?)
            };
            report.damaged.push(Damaged {
                kind: if is_chunk { "chunk" } else { "manifest" },
                digest: digest.to_string(),
                path,
                reason,
                quarantined_to,
            });
        }
    }
    report.seconds = started.elapsed().as_secs_f64();
    tracing::info!(
        chunks = report.chunks_checked,
        manifests = report.manifests_checked,
        damaged = report.damaged.len(),
        "scrub finished"
    );
    Ok(report)
}

/// Reads and verifies one object: (path, its digest unless the name is not ours,
/// bytes read, what is wrong).
async fn check(
    reg: &Registry,
    path: &str,
    is_chunk: bool,
) -> Result<(String, Option<Digest>, u64, Option<String>)> {
    let parsed = if is_chunk {
        layout::parse_chunk_path(path)
    } else {
        layout::parse_manifest_path(path)
    };
    let Ok(digest) = parsed else {
        return Ok((path.to_string(), None, 0, None));
    };
    let bytes = match reg.store().objects().get(&Path::from(path)).await {
        Ok(got) => got.bytes().await?,
        // Swept by a GC between the listing and the read.
        Err(object_store::Error::NotFound { .. }) => return Ok((path.to_string(), None, 0, None)),
        Err(e) => return Err(e.into()),
    };
    let len = bytes.len() as u64;
    let problem = tokio::task::spawn_blocking(move || {
        if is_chunk {
            codec::decode(&digest, &bytes).err().map(|e| e.to_string())
        } else {
            let actual = Digest::of(&bytes);
            if actual != digest {
                Some(format!("manifest bytes hash to {actual}"))
            } else {
                Manifest::decode(&bytes).err().map(|e| e.to_string())
            }
        }
    })
    .await
    .map_err(std::io::Error::other)?;
    Ok((path.to_string(), Some(digest), len, problem))
}

/// Copy to quarantine, drop from the index, delete: see the module comment.
async fn quarantine(reg: &Registry, path: &str, digest: &Digest, is_chunk: bool) -> Result<String> {
    let to = layout::quarantine_path(path);
    let _g = reg.lock_digest(digest).await;
    reg.store()
        .objects()
        .copy(&Path::from(path), &Path::from(to.as_str()))
        .await?;
    if is_chunk {
        reg.index().remove_chunk(digest)?;
        reg.store().delete_chunk(digest).await?;
    } else {
        reg.index().remove_manifest(digest)?;
        reg.store().delete_manifest(digest).await?;
    }
    Ok(to)
}
