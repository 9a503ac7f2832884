//! Pushing: chunk every file, upload what the registry lacks, commit the manifest.
//!
//! ```text
//! file ──read──▶ chunker (1 thread) ──pieces──▶ BLAKE3 (N threads, order kept)
//!        ──▶ extents of the manifest
//!        ──▶ Uploader: batches ─▶ FindMissingChunks ─▶ zstd (N threads) ─▶ PutChunks
//! ```
//!
//! Compression runs only on chunks the registry lacks, so a second push of the same
//! image costs hashing alone. With a tenant key the hashing step compresses and
//! encrypts every chunk first (the address is the BLAKE3 of the encrypted bytes, see
//! snapreg_proto::encryption), so an encrypted re-push costs that work too. Memory is
//! bounded by the channel depths and two batches in flight (~100 MiB), whatever the
//! image size.
//!
//! Crash points: before the commit nothing is visible (uploaded chunks are
//! unreferenced, kept by the lease and the GC grace period, and reused by a retry);
//! the commit is one RPC that the registry accepts only when every chunk is durable.

use std::collections::HashSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use futures::StreamExt;
use snapreg_proto::encryption::{self, TenantKey};
use snapreg_proto::manifest::{
    Created, CriuInfo, Encryption, Extent, File, Layer, LayerKind, Manifest,
    ENCRYPTED_SCHEMA_VERSION, SCHEMA_VERSION,
};
use snapreg_proto::reference::Reference;
use snapreg_proto::{codec, Digest};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::chunker::{Chunker, ChunkerConfig, Piece};
use crate::error::{shown, ClientError, Result};
use crate::progress::{CountersSnapshot, Progress};
use crate::remote::Remote;

/// Chunks per FindMissingChunks call and bytes per upload batch: large enough to
/// amortise a round trip, small enough to keep memory bounded.
const BATCH_CHUNKS: usize = 512;
const BATCH_BYTES: usize = 32 << 20;
const BATCHES_IN_FLIGHT: usize = 2;

fn workers() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// Uploads the chunks of one push under one lease. Shared (`&self`) by every stream
/// of a push: a checkpoint chunks CRIU's files concurrently into one uploader.
pub struct Uploader {
    remote: Remote,
    lease: String,
    cfg: ChunkerConfig,
    key: Option<Arc<TenantKey>>,
    progress: Progress,
    tx: std::sync::Mutex<Option<mpsc::Sender<(Digest, Bytes)>>>,
    task: tokio::sync::Mutex<Option<tokio::task::JoinHandle<Result<()>>>>,
    queued: Mutex<HashSet<Digest>>,
}

impl Uploader {
    pub async fn begin(
        remote: &Remote,
        repository: &str,
        cfg: ChunkerConfig,
        progress: Progress,
    ) -> Result<Self> {
        let key = remote.tenant_key().cloned();
        if key.is_some()
            && cfg.max_size > snapreg_proto::codec::MAX_CHUNK_LEN - encryption::OVERHEAD
        {
            return Err(ClientError::Usage(format!(
                "chunks of up to {} bytes cannot be encrypted: the limit is {}",
                cfg.max_size,
                snapreg_proto::codec::MAX_CHUNK_LEN - encryption::OVERHEAD
            )));
        }
        let lease = remote.begin_push(repository).await?;
        let (tx, rx) = mpsc::channel(64);
        let task = tokio::spawn(upload_loop(
            remote.clone(),
            lease.clone(),
            rx,
            progress.clone(),
            key.is_some(),
        ));
        Ok(Uploader {
            remote: remote.clone(),
            lease,
            cfg,
            key,
            progress,
            tx: std::sync::Mutex::new(Some(tx)),
            task: tokio::sync::Mutex::new(Some(task)),
            queued: Mutex::default(),
        })
    }

    pub fn config(&self) -> &ChunkerConfig {
        &self.cfg
    }

    pub fn progress(&self) -> &Progress {
        &self.progress
    }

    /// The key this push encrypts with: weights the service remembers under another
    /// key (or none) cannot be reused by digest.
    pub fn key_id(&self) -> Option<String> {
        self.key.as_ref().map(|k| k.id().to_string())
    }

    /// A manifest for this host and this push: creation info, chunker parameters,
    /// compatibility record, and the encryption section when the push encrypts.
    pub fn new_manifest(&self, layers: Vec<Layer>, is_criu_image: bool) -> Manifest {
        let mut m = new_manifest(&self.cfg, layers, is_criu_image);
        self.mark_encryption(&mut m);
        m
    }

    /// Sets `m`'s schema version and encryption section to what this push writes.
    pub fn mark_encryption(&self, m: &mut Manifest) {
        m.encryption = self.key.as_ref().map(|k| Encryption {
            scheme: encryption::SCHEME.into(),
            key_id: k.id().to_string(),
            tenant: k.tenant().to_string(),
        });
        m.schema_version = match m.encryption {
            Some(_) => ENCRYPTED_SCHEMA_VERSION,
            None => SCHEMA_VERSION,
        };
    }

    /// Whether the registry holds every one of `digests`; they are then covered by
    /// this push's lease like the chunks it uploads.
    pub async fn all_present(&self, digests: &[Digest]) -> Result<bool> {
        Ok(self
            .remote
            .find_missing(&self.lease, digests)
            .await?
            .is_empty())
    }

    /// Chunks one stream into extents, queueing its chunks for upload.
    pub async fn chunk_stream<R: Read + Send + 'static>(
        &self,
        reader: R,
        aligned: bool,
    ) -> Result<Vec<Extent>> {
        let tx = self
            .tx
            .lock()
            .unwrap()
            .clone()
            .ok_or_else(|| ClientError::Registry("push already finished".into()))?;
        let (piece_tx, piece_rx) = mpsc::channel::<std::io::Result<Piece>>(8);
        let cfg = self.cfg.clone();
        let key = self.key.clone();
        let reader_task = tokio::task::spawn_blocking(move || {
            for piece in Chunker::new(reader, cfg, aligned) {
                let failed = piece.is_err();
                if piece_tx.blocking_send(piece).is_err() || failed {
                    break;
                }
            }
        });
        let mut hashed = tokio_stream::wrappers::ReceiverStream::new(piece_rx)
            .map(|piece| {
                let key = key.clone();
                async move {
                    match piece? {
                        Piece::Zero(n) => Ok::<_, std::io::Error>(Hashed::Zero(n)),
                        Piece::Data(d) => tokio::task::spawn_blocking(move || {
                            let len = d.len() as u64;
                            let content = match &key {
                                Some(k) => k.encrypt_chunk(&d),
                                None => Bytes::from(d),
                            };
                            Hashed::Data(Digest::of(&content), content, len)
                        })
                        .await
                        .map_err(std::io::Error::other),
                    }
                }
            })
            .buffered(workers() * 2);

        let counters = &self.progress.counters;
        let mut extents: Vec<Extent> = Vec::new();
        while let Some(piece) = hashed.next().await {
            match piece.map_err(|e| ClientError::io("reading the stream to chunk", e))? {
                Hashed::Zero(n) => {
                    counters.zero_bytes.fetch_add(n, Relaxed);
                    counters.bytes_total.fetch_add(n, Relaxed);
                    self.progress.advance(n);
                    match extents.last_mut() {
                        Some(Extent::Zero { zero }) => *zero += n,
                        _ => extents.push(Extent::Zero { zero: n }),
                    }
                }
                Hashed::Data(digest, data, len) => {
                    counters.bytes_total.fetch_add(len, Relaxed);
                    extents.push(Extent::Chunk { chunk: digest, len });
                    self.progress.advance(len);
                    if self.queued.lock().unwrap().insert(digest) {
                        counters.chunks_total.fetch_add(1, Relaxed);
                        if tx.send((digest, data)).await.is_err() {
                            return Err(ClientError::Registry(
                                "upload stopped; see the error that follows".into(),
                            ));
                        }
                    }
                }
            }
        }
        reader_task
            .await
            .map_err(|e| ClientError::io("chunker thread", std::io::Error::other(e)))?;
        Ok(extents)
    }

    /// Waits for every queued chunk to be durable in the registry, then commits.
    pub async fn commit(
        &self,
        repository: &str,
        manifest: &Manifest,
        tags: Vec<String>,
    ) -> Result<Digest> {
        self.tx.lock().unwrap().take();
        if let Some(task) = self.task.lock().await.take() {
            task.await
                .map_err(|e| ClientError::Registry(format!("upload task failed: {e}")))??;
        }
        self.remote
            .put_manifest(
                repository,
                &self.lease,
                Bytes::from(manifest.encode()),
                tags,
            )
            .await
    }

    /// Stops uploading; returns the upload's own error if it had already failed (the
    /// root cause behind a producer's "upload stopped").
    pub async fn abort(&self) -> Option<ClientError> {
        self.tx.lock().unwrap().take();
        let task = self.task.lock().await.take()?;
        if task.is_finished() {
            return task.await.ok().and_then(Result::err);
        }
        task.abort();
        None
    }
}

impl Drop for Uploader {
    fn drop(&mut self) {
        if let Some(task) = self.task.get_mut().take() {
            task.abort();
        }
    }
}

/// A piece of a stream once its data is hashed: the chunk's stored content (encrypted
/// when the push is) and its length in the file.
enum Hashed {
    Zero(u64),
    Data(Digest, Bytes, u64),
}

async fn upload_loop(
    remote: Remote,
    lease: String,
    mut rx: mpsc::Receiver<(Digest, Bytes)>,
    progress: Progress,
    encrypted: bool,
) -> Result<()> {
    let mut inflight: JoinSet<Result<()>> = JoinSet::new();
    let mut batch: Vec<(Digest, Bytes)> = Vec::new();
    let mut bytes = 0;
    loop {
        let item = rx.recv().await;
        let done = item.is_none();
        if let Some((d, data)) = item {
            bytes += data.len();
            batch.push((d, data));
        }
        if (done && !batch.is_empty()) || batch.len() >= BATCH_CHUNKS || bytes >= BATCH_BYTES {
            while inflight.len() >= BATCHES_IN_FLIGHT {
                inflight
                    .join_next()
                    .await
                    .expect("non-empty")
                    .map_err(|e| ClientError::Registry(e.to_string()))??;
            }
            let (r, l, p) = (remote.clone(), lease.clone(), progress.clone());
            inflight.spawn(upload_batch(r, l, std::mem::take(&mut batch), p, encrypted));
            bytes = 0;
        }
        if done {
            break;
        }
    }
    while let Some(r) = inflight.join_next().await {
        r.map_err(|e| ClientError::Registry(e.to_string()))??;
    }
    Ok(())
}

async fn upload_batch(
    remote: Remote,
    lease: String,
    batch: Vec<(Digest, Bytes)>,
    progress: Progress,
    encrypted: bool,
) -> Result<()> {
    let digests: Vec<Digest> = batch.iter().map(|(d, _)| *d).collect();
    let missing: HashSet<Digest> = remote
        .find_missing(&lease, &digests)
        .await?
        .into_iter()
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let counters = progress.counters.clone();
    // Encrypted chunks were compressed before encryption; ciphertext never compresses.
    let encode = if encrypted {
        codec::encode_raw
    } else {
        codec::encode
    };
    let encoded =
        futures::stream::iter(batch.into_iter().filter(move |(d, _)| missing.contains(d)))
            .map(move |(d, raw)| tokio::task::spawn_blocking(move || (d, encode(&raw))))
            .buffered(workers())
            .filter_map(move |r| {
                let counters = counters.clone();
                async move {
                    let (d, obj) = r.ok()?;
                    counters.chunks_transferred.fetch_add(1, Relaxed);
                    counters
                        .bytes_transferred
                        .fetch_add(obj.len() as u64, Relaxed);
                    Some((d, obj))
                }
            });
    remote.put_chunks(&lease, encoded).await?;
    Ok(())
}

#[derive(Debug, serde::Serialize)]
pub struct PushReport {
    pub reference: String,
    pub digest: String,
    pub files: usize,
    #[serde(flatten)]
    pub counters: CountersSnapshot,
    pub seconds: f64,
}

/// Pushes every regular file under `dir` as one layer and tags the manifest.
pub async fn push_dir(
    remote: &Remote,
    dir: &Path,
    reference: &Reference,
    progress: Progress,
) -> Result<PushReport> {
    let started = Instant::now();
    let tag = required_tag(reference, "push")?;
    let files = list_files(dir)?;
    let kind = if files.iter().any(|(rel, _)| rel == "inventory.img") {
        LayerKind::Process
    } else {
        LayerKind::Extra
    };
    for (_, p) in &files {
        let size = std::fs::metadata(p)
            .map_err(|e| ClientError::io(format!("reading {}", shown(p)), e))?
            .len();
        progress.add_total(size);
    }

    let uploader = Uploader::begin(
        remote,
        &reference.repository,
        ChunkerConfig::default(),
        progress.clone(),
    )
    .await?;
    let mut layer = Layer {
        kind,
        name: None,
        rank: None,
        files: Vec::new(),
    };
    for (rel, path) in &files {
        progress.message(rel.clone());
        let file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) => {
                uploader.abort().await;
                return Err(ClientError::io(format!("opening {}", shown(path)), e));
            }
        };
        let meta = file
            .metadata()
            .map_err(|e| ClientError::io(format!("reading {}", shown(path)), e))?;
        let aligned = uploader.config().is_page_aligned(rel);
        let extents = match uploader.chunk_stream(file, aligned).await {
            Ok(x) => x,
            Err(e) => return Err(uploader.abort().await.unwrap_or(e)),
        };
        let size = extents.iter().map(Extent::len).sum();
        if size != meta.len() {
            uploader.abort().await;
            return Err(ClientError::io(
                format!(
                    "{} changed while it was pushed ({} bytes, then {size})",
                    shown(path),
                    meta.len()
                ),
                std::io::Error::other("file changed"),
            ));
        }
        use std::os::unix::fs::PermissionsExt;
        layer.files.push(File {
            path: rel.clone(),
            size,
            mode: meta.permissions().mode() & 0o7777,
            extents,
        });
    }

    let manifest = uploader.new_manifest(vec![layer], kind == LayerKind::Process);
    let digest = uploader
        .commit(&reference.repository, &manifest, vec![tag])
        .await?;
    progress.finish();
    Ok(PushReport {
        reference: reference.to_string(),
        digest: digest.to_string(),
        files: files.len(),
        counters: progress.counters.snapshot(),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The tag a new snapshot is committed under: pushes name a tag, never a digest.
pub fn required_tag(reference: &Reference, verb: &str) -> Result<String> {
    reference.tag().map(str::to_string).ok_or_else(|| {
        ClientError::Usage(format!("{verb} needs repo:tag, not a digest: {reference}"))
    })
}

/// A plaintext manifest for this host: creation info, chunker parameters,
/// compatibility record ([`Uploader::new_manifest`] adds the push's encryption).
pub fn new_manifest(cfg: &ChunkerConfig, layers: Vec<Layer>, is_criu_image: bool) -> Manifest {
    let facts = crate::host::facts();
    let criu = is_criu_image.then(|| CriuInfo {
        version: facts.criu_version.clone().unwrap_or_default(),
        ..CriuInfo::default()
    });
    Manifest {
        schema_version: SCHEMA_VERSION,
        created: Created {
            unix_seconds: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            tool: format!("snapctl {}", env!("CARGO_PKG_VERSION")),
            hostname: crate::host::hostname(),
        },
        chunker: cfg.params(),
        layers,
        criu,
        compat: facts,
        device_memory: Vec::new(),
        ranks: Vec::new(),
        annotations: Default::default(),
        encryption: None,
    }
}

/// Regular files under `dir`, sorted, as (relative path, full path). Sockets and
/// other special files (a streamer socket left in an images dir) are skipped.
fn list_files(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let meta = std::fs::metadata(dir)
        .map_err(|e| ClientError::io(format!("reading directory {}", shown(dir)), e))?;
    if !meta.is_dir() {
        return Err(ClientError::Usage(format!(
            "{} is not a directory",
            shown(dir)
        )));
    }
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = std::fs::read_dir(&d)
            .map_err(|e| ClientError::io(format!("listing {}", shown(&d)), e))?;
        for entry in entries {
            let entry = entry.map_err(|e| ClientError::io(format!("listing {}", shown(&d)), e))?;
            let ft = entry
                .file_type()
                .map_err(|e| ClientError::io(format!("reading {}", shown(&entry.path())), e))?;
            let path = entry.path();
            if ft.is_dir() {
                stack.push(path);
            } else if ft.is_file() {
                let rel = path
                    .strip_prefix(dir)
                    .expect("under dir")
                    .to_string_lossy()
                    .into_owned();
                out.push((rel, path));
            } else {
                tracing::debug!(path = %path.display(), "skipping non-regular file");
            }
        }
    }
    out.sort();
    Ok(out)
}
