//! Pulling: fetch a manifest, fetch its chunks with a window of parallel requests
//! (GetChunks streams, or the store's presigned URLs when the registry offers them:
//! direct.rs), verify each, write files under temporary names, and rename only
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

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use snapreg_proto::encryption::TenantKey;
use snapreg_proto::manifest::{check_relative_path, Extent, Manifest};
use snapreg_proto::reference::Reference;
use snapreg_proto::{codec, Digest};

use crate::direct::{self, DirectFetcher};
use crate::encryption;
use crate::error::{shown, ClientError, Result};
use crate::progress::{CountersSnapshot, Progress};
use crate::remote::Remote;

/// Digests per GetChunks call, and calls in flight: ~2 x 32 x 0.5 MiB of chunks
/// ahead of the writer.
const FETCH_BATCH: usize = 32;
const FETCHES_IN_FLIGHT: usize = 2;

/// HTTP GETs in flight on the direct path: ~32 x 0.5 MiB ahead, like GetChunks.
const DIRECT_IN_FLIGHT: usize = 32;

#[derive(Debug, serde::Serialize)]
pub struct PullReport {
    pub reference: String,
    pub digest: String,
    pub files: usize,
    #[serde(flatten)]
    pub counters: CountersSnapshot,
    /// Chunks fetched from the object store by presigned URL (the rest of
    /// `chunks_transferred` came through the registry).
    pub chunks_direct: u64,
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

pub async fn pull_dir(
    remote: &Remote,
    reference: &Reference,
    dest: &Path,
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
    let mut chunks_direct = 0;
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

        chunks_direct = fetch_into(remote, key, &order, &places, &targets, &progress).await?;

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
        chunks_direct,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Chunk objects (unverified) in `order`, each with whether it came by URL.
fn objects<'a>(
    remote: &'a Remote,
    order: &'a [Digest],
    direct: Option<(DirectFetcher, HashMap<Digest, String>)>,
) -> BoxStream<'a, Result<(Digest, Bytes, bool)>> {
    let Some((fetcher, urls)) = direct else {
        return futures::stream::iter(order.chunks(FETCH_BATCH))
            .map(move |batch| async move {
                let stream = remote.get_chunks(batch).await?;
                Ok::<_, ClientError>(stream.map_err(|s| remote.map_stream_error(s)))
            })
            .buffered(FETCHES_IN_FLIGHT)
            .try_flatten()
            .map(|msg| {
                let msg = msg?;
                Ok((Digest::from_slice(&msg.digest)?, msg.data, false))
            })
            .boxed();
    };
    futures::stream::iter(order)
        .map(move |&d| {
            let (fetcher, url) = (fetcher.clone(), urls.get(&d).cloned());
            async move {
                if let Some(url) = url {
                    match fetcher.fetch(&url).await {
                        Ok(object) => return Ok((d, object, true)),
                        // Expired or unreachable from here: the registry serves it.
                        Err(ClientError::NotFound(_) | ClientError::Unreachable { .. }) => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok((d, remote.get_chunk(d).await?, false))
            }
        })
        .buffered(DIRECT_IN_FLIGHT)
        .boxed()
}

/// Fetches, verifies and writes every chunk of `order`; returns how many came by URL.
async fn fetch_into(
    remote: &Remote,
    key: Option<Arc<TenantKey>>,
    order: &[Digest],
    places: &HashMap<Digest, Vec<(usize, u64, u64)>>,
    targets: &[Target],
    progress: &Progress,
) -> Result<u64> {
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let direct = match direct::chunk_urls(remote, order).await? {
        Some(urls) => Some((DirectFetcher::new()?, urls)),
        None => None,
    };
    let decoded = objects(remote, order, direct)
        .map(|item| {
            let key = key.clone();
            async move {
                let (digest, object, by_url) = item?;
                let object_len = object.len() as u64;
                let data: Bytes = tokio::task::spawn_blocking(move || {
                    let content = codec::decode(&digest, &object)?;
                    encryption::decrypt(key.as_deref(), &digest, content)
                })
                .await
                .map_err(|e| ClientError::io("decoding a chunk", std::io::Error::other(e)))?
                .map_err(|e| {
                    let file = places
                        .get(&digest)
                        .and_then(|p| p.first())
                        .map_or("(no file)", |(i, _, _)| targets[*i].shown.as_str());
                    encryption::chunk_error(e, file)
                })?;
                Ok::<_, ClientError>((digest, data, object_len, by_url))
            }
        })
        .buffered(workers);
    let mut decoded = std::pin::pin!(decoded);
    let mut expected = order.iter();
    let mut by_urls = 0;
    while let Some(item) = decoded.next().await {
        let (digest, data, object_len, by_url) = item?;
        by_urls += by_url as u64;
        if expected.next() != Some(&digest) {
            return Err(ClientError::Registry(format!(
                "registry sent chunk {digest} out of order"
            )));
        }
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
        progress.counters.chunks_transferred.fetch_add(1, Relaxed);
        progress
            .counters
            .bytes_transferred
            .fetch_add(object_len, Relaxed);
    }
    if let Some(d) = expected.next() {
        return Err(ClientError::NotFound(format!(
            "registry ended the stream before chunk {d}"
        )));
    }
    Ok(by_urls)
}
