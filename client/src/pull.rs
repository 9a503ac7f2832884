//! Pulling: fetch a manifest, fetch its chunks through the fetch stack with a window
//! of parallel requests (GetChunks streams, or the store's presigned URLs when the
//! registry offers them), verified, write files under temporary names, and rename only
//! complete, verified files into place.
//!
//! Crash or error at any point leaves only `.<name>.snapreg-partial` files (removed
//! on a clean error), never a file under its final name with wrong contents.

use std::collections::HashMap;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use snapreg_proto::encryption::TenantKey;
use snapreg_proto::manifest::{check_relative_path, Extent, Manifest};
use snapreg_proto::reference::Reference;
use snapreg_proto::Digest;

use crate::encryption;
use crate::error::{shown, ClientError, Result};
use crate::fetch::{Chunks, PeerSummary, Want};
use crate::peer::PeerConfig;
use crate::progress::{CountersSnapshot, Progress};
use crate::remote::Remote;

/// Chunks in flight (fetched, being verified) ahead of the writer: ~32 × 0.5 MiB,
/// over GetChunks batches or HTTP GETs alike.
const FETCH_WINDOW: usize = 32;

#[derive(Debug, serde::Serialize)]
pub struct PullReport {
    pub reference: String,
    pub digest: String,
    pub files: usize,
    /// `chunks_direct` among them: fetched from the object store by presigned URL
    /// (the rest of `chunks_transferred` came through a registry or a peer).
    #[serde(flatten)]
    pub counters: CountersSnapshot,
    #[serde(flatten)]
    pub peers: PeerSummary,
    pub seconds: f64,
}

/// Where a layer's file lands under the destination directory. Manifest::decode has
/// already refused absolute and `..` paths; checked again here because this is where
/// a name turns into a place on disk.
pub fn file_dest(dest: &Path, layer_name: Option<&str>, path: &str) -> Result<PathBuf> {
    let mut rel = PathBuf::new();
    for part in layer_name.into_iter().chain([path]) {
        check_relative_path(part).map_err(|reason| {
            ClientError::Format(snapreg_proto::Error::ManifestInvalid(format!(
                "file {part:?} would land outside {}: {reason}",
                shown(dest)
            )))
        })?;
        rel.push(part);
    }
    Ok(dest.join(rel))
}

/// Refuses a destination whose directories below `dest` include a symlink (left by
/// an earlier run or planted): writing through it could land anywhere.
fn refuse_symlinks_below(dest: &Path, file: &Path) -> Result<()> {
    let Ok(rel) = file.strip_prefix(dest) else {
        return Ok(());
    };
    let mut at = dest.to_path_buf();
    for c in rel.components() {
        at.push(c);
        match std::fs::symlink_metadata(&at) {
            Ok(m) if m.file_type().is_symlink() && at != file => {
                return Err(ClientError::io(
                    format!("pulling into {}", shown(dest)),
                    std::io::Error::other(format!(
                        "{} is a symlink; remove it or pull into an empty directory",
                        shown(&at)
                    )),
                ));
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    Ok(())
}

/// Creates (truncating) a partial file without following a symlink planted under
/// its name.
fn create_partial(partial: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::symlink_metadata(partial) {
        Ok(m) if m.file_type().is_symlink() => std::fs::remove_file(partial)?,
        _ => {}
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o600)
        .open(partial)
}

fn partial_name(final_path: &Path) -> PathBuf {
    let name = final_path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    final_path.with_file_name(format!(".{name}.snapreg-partial"))
}

struct Target {
    shown: String,
    final_path: PathBuf,
    partial: PathBuf,
    file: std::fs::File,
    mode: u32,
}

pub async fn fetch_manifest(remote: &Remote, reference: &Reference) -> Result<(Digest, Manifest)> {
    let (digest, bytes) = remote
        .get_manifest(&reference.repository, &reference.target_string())
        .await?;
    Ok((digest, Manifest::decode(&bytes)?))
}

/// The manifest from the first of `remotes` (nearest first) that has the reference.
pub async fn first_manifest(
    remotes: &[Remote],
    reference: &Reference,
) -> Result<(Digest, Manifest)> {
    let mut last = None;
    for r in remotes {
        match fetch_manifest(r, reference).await {
            Ok(m) => return Ok(m),
            Err(e @ (ClientError::NotFound(_) | ClientError::Unreachable { .. }))
                if remotes.len() > 1 =>
            {
                last = Some(e)
            }
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| ClientError::NotFound(format!("{reference}: no registry to ask"))))
}

pub async fn pull_dir(
    remote: &Remote,
    reference: &Reference,
    dest: &Path,
    peers: Option<PeerConfig>,
    progress: Progress,
) -> Result<PullReport> {
    let started = Instant::now();
    let (digest, manifest) = fetch_manifest(remote, reference).await?;
    let key = encryption::key_for(&manifest, remote.tenant_key(), &reference.to_string())?;
    std::fs::create_dir_all(dest)
        .map_err(|e| ClientError::io(format!("creating {}", shown(dest)), e))?;

    let mut targets = Vec::new();
    // digest -> every (target, offset, extent length) it fills, in first-use order.
    let mut order: Vec<Digest> = Vec::new();
    let mut places: HashMap<Digest, Vec<(usize, u64, u64)>> = HashMap::new();
    let counters = progress.counters.clone();
    let mut peer_summary = PeerSummary::default();
    let result = async {
        for layer in &manifest.layers {
            for f in &layer.files {
                let final_path = file_dest(dest, layer.name.as_deref(), &f.path)?;
                refuse_symlinks_below(dest, &final_path)?;
                if let Some(parent) = final_path.parent() {
                    std::fs::create_dir_all(parent)
                        .map_err(|e| ClientError::io(format!("creating {}", shown(parent)), e))?;
                }
                let partial = partial_name(&final_path);
                let file = create_partial(&partial)
                    .map_err(|e| ClientError::io(format!("creating {}", shown(&partial)), e))?;
                // Sparse: zero extents are never written.
                file.set_len(f.size)
                    .map_err(|e| ClientError::io(format!("sizing {}", shown(&partial)), e))?;
                let idx = targets.len();
                targets.push(Target {
                    shown: f.path.clone(),
                    final_path,
                    partial,
                    file,
                    mode: f.mode,
                });
                let mut off = 0;
                for e in &f.extents {
                    match *e {
                        Extent::Chunk { chunk, len } => {
                            let v = places.entry(chunk).or_default();
                            if v.is_empty() {
                                order.push(chunk);
                            }
                            v.push((idx, off, len));
                        }
                        Extent::Zero { zero } => {
                            counters.zero_bytes.fetch_add(zero, Relaxed);
                        }
                    }
                    off += e.len();
                }
            }
        }
        let total = manifest.total_size();
        counters.bytes_total.store(total, Relaxed);
        counters.chunks_total.store(order.len() as u64, Relaxed);
        progress.add_total(total);
        progress.advance(counters.zero_bytes.load(Relaxed));

        let source = Source {
            remote,
            key,
            peers,
            repository: &reference.repository,
            snapshot: digest,
        };
        peer_summary = fetch_into(source, &order, &places, &targets, &progress).await?;

        for t in &targets {
            t.file
                .sync_all()
                .map_err(|e| ClientError::io(format!("syncing {}", shown(&t.partial)), e))?;
            std::fs::set_permissions(&t.partial, std::fs::Permissions::from_mode(t.mode)).map_err(
                |e| ClientError::io(format!("setting mode of {}", shown(&t.partial)), e),
            )?;
            std::fs::rename(&t.partial, &t.final_path).map_err(|e| {
                ClientError::io(format!("renaming into {}", shown(&t.final_path)), e)
            })?;
        }
        Ok(())
    }
    .await;
    if let Err(e) = result {
        for t in &targets {
            let _ = std::fs::remove_file(&t.partial);
        }
        return Err(e);
    }
    progress.finish();
    Ok(PullReport {
        reference: reference.to_string(),
        digest: digest.to_string(),
        files: targets.len(),
        counters: progress.counters.snapshot(),
        peers: peer_summary,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Where a pull's chunks come from.
struct Source<'a> {
    remote: &'a Remote,
    key: Option<Arc<TenantKey>>,
    peers: Option<PeerConfig>,
    repository: &'a str,
    snapshot: Digest,
}

/// Fetches, verifies and writes every chunk of `order` (from peers, and through the
/// registry's presigned URLs where it offers them); returns how many came by URL and
/// what the peers did.
async fn fetch_into(
    source: Source<'_>,
    order: &[Digest],
    places: &HashMap<Digest, Vec<(usize, u64, u64)>>,
    targets: &[Target],
    progress: &Progress,
) -> Result<PeerSummary> {
    let chunks = Chunks::builder(vec![source.remote.clone()])
        .decrypting(source.key)
        .direct_urls(order.to_vec())
        .peers(
            source.peers,
            source.repository,
            source.snapshot,
            order.to_vec(),
        )
        .build(progress.clone())
        .await?;
    let wants: Vec<Want> = order
        .iter()
        .map(|d| {
            let first = places.get(d).and_then(|p| p.first());
            let file = first.map_or("(no file)", |(i, _, _)| targets[*i].shown.as_str());
            (*d, Arc::from(file))
        })
        .collect();
    let mut fetched = chunks.get_many(wants, FETCH_WINDOW);
    while let Some(item) = fetched.next().await {
        let (digest, data) = item?;
        for &(idx, off, len) in places.get(&digest).map(Vec::as_slice).unwrap_or_default() {
            let t = &targets[idx];
            // A verified chunk of another length than its extent would spill into the
            // next extent (or past the file's end): the manifest is inconsistent.
            if data.len() as u64 != len {
                return Err(ClientError::ChunkCorrupt {
                    digest,
                    file: t.shown.clone(),
                    reason: format!(
                        "it has {} bytes where the manifest's extent says {len}",
                        data.len()
                    ),
                });
            }
            t.file
                .write_all_at(&data, off)
                .map_err(|e| ClientError::io(format!("writing {}", shown(&t.partial)), e))?;
            progress.advance(data.len() as u64);
        }
    }
    drop(fetched);
    Ok(chunks.peer_summary())
}
