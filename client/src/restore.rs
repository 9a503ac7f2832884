//! `snapctl pull-restore`: the registry streamed straight into `criu restore --stream`.
//!
//! ```text
//! GetManifest ─▶ compatibility rules, files the image reopens ─▶ criu restore --stream
//! CRIU asks for a file ─▶ exists? ─▶ pipe ─▶ one task per file: extents in order,
//!   a window of chunk fetches ahead (node cache first, then the registry, verified,
//!   written to the cache) ─▶ pipe
//! CRIU ─post-restore─▶ snapctl (action script): "ok" only if every byte served verified
//! ```
//!
//! Memory: at most `window` chunks per file in flight (≤ 2 MiB each), never the image.
//! Small files come first because CRIU asks for them first; pages last, per task.
//! A chunk that fails verification is never written to a pipe: its file is cut short,
//! CRIU fails, and the post-restore answer is "fail" if it got that far, so no
//! restored process resumes on bad bytes.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use futures::StreamExt;
use snapreg_proto::compat::{self, CheckOptions};
use snapreg_proto::encryption::TenantKey;
use snapreg_proto::manifest::{Extent, LayerKind};
use snapreg_proto::reference::Reference;
use snapreg_proto::{codec, Digest};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::action::ActionServer;
use crate::cache::ChunkCache;
use crate::criu::{self, Criu};
use crate::direct::{self, DirectFetcher};
use crate::encryption;
use crate::error::{ClientError, Result};
use crate::progress::{CountersSnapshot, Progress};
use crate::remote::Remote;
use crate::{criu_stream, host, process, pull, zero_pages};

#[derive(Clone, Debug)]
pub struct RestoreOptions {
    pub detach: bool,
    pub extra_args: Vec<String>,
    /// Restore despite compatibility refusals (each is printed).
    pub force: bool,
    pub cache: ChunkCache,
    /// Chunk fetches in flight ahead of CRIU, per file.
    pub window: usize,
    /// Registries to fall back to, in preference order, for the manifest and for
    /// each chunk the first registry lacks.
    pub fallbacks: Vec<Remote>,
    /// Separated mode: fill the snapshot's weights layer into this weights service
    /// while CRIU restores the process.
    pub weights_service: Option<PathBuf>,
    /// Serve zero pages of private anonymous memory too (they are left out of the
    /// served pagemap otherwise; see zero_pages.rs).
    pub keep_zero_pages: bool,
    /// `OLD=NEW,…`: restore the snapshot's GPUs (index or UUID) onto these of this
    /// host (index or UUID), through the CUDA restore's GPU pairs.
    pub gpu_map: Option<String>,
}

#[derive(Debug, serde::Serialize)]
pub struct RestoreReport {
    pub reference: String,
    pub digest: String,
    /// The restored tree's root PID (CRIU restores the original PIDs).
    pub pid: Option<u32>,
    #[serde(flatten)]
    pub counters: CountersSnapshot,
    pub files_served: usize,
    /// From CRIU's start to its exit (or, detached, to the tree running).
    pub restore_seconds: f64,
    pub seconds: f64,
    pub warnings: Vec<String>,
    pub criu_log: PathBuf,
    /// snapctl's own peak resident memory (VmHWM): bounded by the fetch window, not
    /// by the image size.
    pub peak_rss_bytes: Option<u64>,
    /// Chunks fetched from each registry (nearest first in the request).
    pub chunks_by_registry: BTreeMap<String, u64>,
    /// Putting CUDA state back (restore + unlock) after CRIU, for CUDA snapshots.
    pub cuda_restore_seconds: Option<f64>,
    /// Separated mode: filling the weights service (concurrent with CRIU).
    pub weights: Option<crate::weights::FillReport>,
    /// Bytes of zero pages left out of the served pagemap (never crossed the pipe).
    pub zero_bytes_left_out: u64,
    /// Bytes of the image marked as device memory (their chunks fetched ahead).
    pub device_memory_bytes: u64,
}

fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// Chunks by digest: the node cache first, then the nearest registry's presigned
/// URLs when it offered them (direct.rs), then each registry in preference order
/// (nearest region first); whatever arrives is verified, then cached. The cache holds
/// chunks as stored (encrypted, for an encrypted snapshot); [`ChunkSource::get`]
/// decrypts on the way out.
#[derive(Clone)]
pub struct ChunkSource {
    remotes: Vec<Remote>,
    cache: ChunkCache,
    progress: Progress,
    fetched_from: Arc<Mutex<BTreeMap<String, u64>>>,
    direct: Option<Arc<DirectUrls>>,
    key: Option<Arc<TenantKey>>,
}

/// Presigned chunk URLs from one registry, and the client that fetches them.
struct DirectUrls {
    fetcher: DirectFetcher,
    urls: HashMap<Digest, String>,
    /// How direct fetches are counted in `chunks_by_registry`.
    label: String,
}

impl ChunkSource {
    /// `remotes`: the registries to ask, nearest first (at least one).
    pub fn new(remotes: Vec<Remote>, cache: ChunkCache, progress: Progress) -> Self {
        ChunkSource {
            remotes,
            cache,
            progress,
            fetched_from: Arc::default(),
            direct: None,
            key: None,
        }
    }

    /// Decrypts what [`ChunkSource::get`] returns with this tenant key
    /// ([`encryption::key_for`] the snapshot).
    pub fn decrypting(mut self, key: Option<Arc<TenantKey>>) -> Self {
        self.key = key;
        self
    }

    /// Asks the nearest registry for presigned URLs of `chunks`: those it signs are
    /// then fetched from the object store directly (counted as "URL (direct)").
    pub async fn use_direct(mut self, chunks: &[Digest]) -> Result<Self> {
        let Some(remote) = self.remotes.first() else {
            return Ok(self);
        };
        if let Some(urls) = direct::chunk_urls(remote, chunks).await? {
            self.direct = Some(Arc::new(DirectUrls {
                fetcher: DirectFetcher::new()?,
                urls,
                label: format!("{} (direct)", remote.url()),
            }));
        }
        Ok(self)
    }

    /// Chunks fetched per registry URL.
    pub fn fetched_from(&self) -> BTreeMap<String, u64> {
        self.fetched_from.lock().unwrap().clone()
    }

    /// A chunk's bytes as its files hold them (decrypted), `file` naming it in errors.
    pub async fn get(&self, digest: Digest, file: &str) -> Result<Bytes> {
        let content = self.content(digest, file).await?;
        let Some(key) = self.key.clone() else {
            return Ok(content);
        };
        tokio::task::spawn_blocking(move || key.decrypt_chunk(&digest, &content))
            .await
            .map_err(|e| ClientError::io("decrypting a chunk", std::io::Error::other(e)))?
            .map_err(|e| encryption::chunk_error(e, file))
    }

    /// The node cache's verified file of a chunk whose stored bytes are its file
    /// bytes (a plaintext snapshot), for splicing into CRIU's pipe without copying
    /// it through this process; `None` if not cached (or encrypted: then the bytes
    /// must be decrypted here).
    async fn cached_file(&self, digest: Digest) -> Option<(std::fs::File, u64)> {
        // A stat on this thread: a restore from a cold cache asks this of every chunk.
        if self.key.is_some() || !self.cache.contains(&digest) {
            return None;
        }
        let cache = self.cache.clone();
        let file = tokio::task::spawn_blocking(move || cache.open_verified(&digest))
            .await
            .ok()
            .flatten()?;
        self.progress.counters.chunks_cached.fetch_add(1, Relaxed);
        Some(file)
    }

    /// A chunk as stored, verified against its digest (and now in the node cache):
    /// enough to warm the cache ahead of a restore.
    pub async fn content(&self, digest: Digest, file: &str) -> Result<Bytes> {
        let cache = self.cache.clone();
        let cached = tokio::task::spawn_blocking(move || cache.get(&digest))
            .await
            .ok()
            .flatten();
        if let Some(b) = cached {
            self.progress.counters.chunks_cached.fetch_add(1, Relaxed);
            return Ok(b);
        }
        if let Some(direct) = &self.direct {
            if let Some(url) = direct.urls.get(&digest) {
                match direct.fetcher.fetch(url).await {
                    Ok(object) => return self.accept(digest, object, file, &direct.label).await,
                    // Expired, unreachable from this node, absent: the registry serves it.
                    Err(e @ (ClientError::NotFound(_) | ClientError::Unreachable { .. })) => {
                        tracing::info!(
                            "chunk {digest}: direct URL failed ({e}); asking the registry"
                        );
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        let mut last_error = None;
        for remote in &self.remotes {
            match self.fetch_from(remote, digest, file).await {
                Ok(data) => return Ok(data),
                // Absent, unreachable or damaged there: the next registry may have it.
                Err(
                    e @ (ClientError::NotFound(_)
                    | ClientError::Unreachable { .. }
                    | ClientError::ChunkCorrupt { .. }),
                ) => {
                    if self.remotes.len() > 1 {
                        tracing::info!(
                            "chunk {digest} not usable from {}: {e}; trying the next registry",
                            remote.url()
                        );
                    }
                    last_error = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last_error.unwrap_or_else(|| {
            ClientError::NotFound(format!("chunk {digest} of {file}: no registry to ask"))
        }))
    }

    async fn fetch_from(&self, remote: &Remote, digest: Digest, file: &str) -> Result<Bytes> {
        let object = remote.get_chunk(digest).await.map_err(|e| match e {
            ClientError::NotFound(m) => ClientError::NotFound(format!("{m} (in {file})")),
            e => e,
        })?;
        self.accept(digest, object, file, remote.url()).await
    }

    /// Verifies a chunk object, caches and counts it.
    async fn accept(&self, digest: Digest, object: Bytes, file: &str, from: &str) -> Result<Bytes> {
        let object_len = object.len() as u64;
        let cache = self.cache.clone();
        let data = tokio::task::spawn_blocking(move || {
            let data = codec::decode(&digest, &object)?;
            if let Err(e) = cache.put(&digest, &data) {
                tracing::warn!("node cache: cannot store {digest}: {e}");
            }
            Ok::<_, snapreg_proto::Error>(data)
        })
        .await
        .map_err(|e| ClientError::io("decoding a chunk", std::io::Error::other(e)))?
        .map_err(|e| encryption::chunk_error(e, file))?;
        self.progress
            .counters
            .chunks_transferred
            .fetch_add(1, Relaxed);
        self.progress
            .counters
            .bytes_transferred
            .fetch_add(object_len, Relaxed);
        *self
            .fetched_from
            .lock()
            .unwrap()
            .entry(from.to_string())
            .or_default() += 1;
        Ok(data)
    }
}

static ZEROS: [u8; 1 << 16] = [0; 1 << 16];

/// A small file's whole bytes (verified chunks, through the node cache).
async fn file_bytes(source: &ChunkSource, name: &str, extents: &[Extent]) -> Result<Bytes> {
    let mut out = bytes::BytesMut::new();
    for e in extents {
        match *e {
            Extent::Chunk { chunk, .. } => out.extend_from_slice(&source.get(chunk, name).await?),
            Extent::Zero { zero } => out.resize(out.len() + zero as usize, 0),
        }
    }
    Ok(out.freeze())
}

/// One extent on its way into CRIU's pipe.
enum Piece {
    Bytes(Bytes),
    /// A verified node-cache file: spliced, its pages never copied through snapctl.
    File(std::fs::File, u64),
    Zeros(u64),
}

impl Piece {
    fn len(&self) -> u64 {
        match self {
            Piece::Bytes(b) => b.len() as u64,
            Piece::File(_, n) | Piece::Zeros(n) => *n,
        }
    }
}

/// Moves `len` bytes of `file` into the pipe with splice(2): the kernel passes page
/// references from the page cache, so the bytes are copied once (by CRIU's read)
/// instead of three times (read here, write here, read there), and the pipe's lock
/// is held for moments instead of for copies, which CRIU otherwise spins on.
async fn splice_all(
    pipe: &tokio::net::unix::pipe::Sender,
    file: &std::fs::File,
    len: u64,
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut off: libc::loff_t = 0;
    while (off as u64) < len {
        pipe.writable().await?;
        let moved = pipe.try_io(|| {
            let left = (len - off as u64) as usize;
            // SAFETY: both fds are open for the call; `off` is ours.
            let n = unsafe {
                libc::splice(
                    file.as_raw_fd(),
                    &mut off,
                    pipe.as_raw_fd(),
                    std::ptr::null_mut(),
                    left,
                    libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
                )
            };
            if n < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(n)
            }
        });
        match moved {
            Ok(0) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "cached chunk file shorter than it was",
                ))
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

async fn write_zeros(pipe: &mut tokio::net::unix::pipe::Sender, mut n: u64) -> std::io::Result<()> {
    while n > 0 {
        let k = n.min(ZEROS.len() as u64) as usize;
        pipe.write_all(&ZEROS[..k]).await?;
        n -= k as u64;
    }
    Ok(())
}

/// Writes one file's extents into CRIU's pipe. EPIPE means CRIU closed the file
/// early: not an error here; CRIU's exit code decides.
async fn serve_file(
    source: ChunkSource,
    name: String,
    extents: Vec<Extent>,
    pipe: OwnedFd,
    window: usize,
) -> Result<()> {
    let mut pipe = tokio::net::unix::pipe::Sender::from_owned_fd(pipe)
        .map_err(|e| ClientError::io(format!("pipe for {name}"), e))?;
    let mut pieces = futures::stream::iter(extents)
        .map(|e| {
            let (source, name) = (source.clone(), name.clone());
            async move {
                match e {
                    Extent::Chunk { chunk, .. } => match source.cached_file(chunk).await {
                        Some((file, len)) => Ok(Piece::File(file, len)),
                        None => source.get(chunk, &name).await.map(Piece::Bytes),
                    },
                    Extent::Zero { zero } => Ok(Piece::Zeros(zero)),
                }
            }
        })
        .buffered(window.max(1));
    let counters = source.progress.counters.clone();
    let started = Instant::now();
    let mut served = 0u64;
    while let Some(piece) = pieces.next().await {
        let piece = piece?;
        let res = match &piece {
            Piece::Bytes(data) => pipe.write_all(data).await,
            Piece::File(file, len) => splice_all(&pipe, file, *len).await,
            Piece::Zeros(n) => write_zeros(&mut pipe, *n).await,
        };
        match res {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            Err(e) => return Err(ClientError::io(format!("serving {name} to CRIU"), e)),
        }
        let n = piece.len();
        source.progress.advance(n);
        counters.bytes_total.fetch_add(n, Relaxed);
        if !matches!(piece, Piece::Zeros(_)) {
            served += n;
        }
    }
    tracing::debug!(file = %name, bytes = served, elapsed = ?started.elapsed(), "served");
    Ok(())
}

/// What every file-serving task shares: the image's files, the chunk source, and
/// the first error (which turns the post-restore answer into "fail").
struct Serving<'a> {
    files: &'a HashMap<String, Vec<Extent>>,
    /// Files served from memory instead of their extents (rewritten pagemaps).
    inline: &'a HashMap<String, Bytes>,
    source: &'a ChunkSource,
    first_error: &'a Arc<Mutex<Option<ClientError>>>,
    window: usize,
}

impl Serving<'_> {
    fn spawn_file(&self, tasks: &mut JoinSet<()>, name: String, fd: OwnedFd) {
        if let Some(bytes) = self.inline.get(&name).cloned() {
            let errs = self.first_error.clone();
            tasks.spawn(async move {
                let written = async {
                    let mut pipe = tokio::net::unix::pipe::Sender::from_owned_fd(fd)?;
                    pipe.write_all(&bytes).await
                }
                .await;
                match written {
                    Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                        errs.lock()
                            .unwrap()
                            .get_or_insert(ClientError::io(format!("serving {name} to CRIU"), e));
                    }
                    _ => {}
                }
            });
            return;
        }
        let extents = self.files.get(&name).cloned().unwrap_or_default();
        let (src, errs, window) = (self.source.clone(), self.first_error.clone(), self.window);
        tasks.spawn(async move {
            if let Err(e) = serve_file(src, name, extents, fd, window).await {
                errs.lock().unwrap().get_or_insert(e);
            }
        });
    }
}

/// Answers CRIU's requests; hands each file's pipe (write end) to `tx`.
fn serve_loop(
    mut sock: UnixStream,
    names: std::collections::HashSet<String>,
    tx: mpsc::UnboundedSender<(String, OwnedFd)>,
) -> std::io::Result<()> {
    while let Some(name) = criu_stream::read_request(&mut sock)? {
        let exists = names.contains(&name);
        criu_stream::send_reply(&mut sock, exists)?;
        if exists {
            let fd = criu_stream::recv_fd(&sock)?;
            if tx.send((name, fd)).is_err() {
                return Ok(());
            }
        }
    }
    Ok(())
}

#[derive(Debug, serde::Serialize)]
pub struct PrefetchReport {
    pub reference: String,
    pub digest: String,
    #[serde(flatten)]
    pub counters: CountersSnapshot,
    pub chunks_by_registry: BTreeMap<String, u64>,
    pub seconds: f64,
}

/// Warms the node cache with every chunk of a snapshot (all layers), so that a
/// restore on this node fetches nothing: what a scheduler runs before placing a pod.
pub async fn prefetch(
    remotes: Vec<Remote>,
    reference: &Reference,
    cache: ChunkCache,
    window: usize,
    progress: Progress,
) -> Result<PrefetchReport> {
    let started = Instant::now();
    let (digest, manifest) = first_manifest(&remotes, reference).await?;
    let chunks = manifest.chunk_digests();
    progress
        .counters
        .chunks_total
        .store(chunks.len() as u64, Relaxed);
    progress
        .counters
        .bytes_total
        .store(manifest.total_size(), Relaxed);
    let source = ChunkSource::new(remotes, cache.clone(), progress.clone())
        .use_direct(&chunks)
        .await?;
    let mut fetches = futures::stream::iter(chunks)
        .map(|d| {
            let source = source.clone();
            async move {
                source
                    .content(d, "(prefetch)")
                    .await
                    .map(|b| b.len() as u64)
            }
        })
        .buffer_unordered(window.max(1));
    while let Some(n) = fetches.next().await {
        progress.advance(n?);
    }
    let _ = tokio::task::spawn_blocking(move || cache.enforce_limit()).await;
    progress.finish();
    Ok(PrefetchReport {
        reference: reference.to_string(),
        digest: digest.to_string(),
        counters: progress.counters.snapshot(),
        chunks_by_registry: source.fetched_from(),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The manifest from the first registry that has the reference.
async fn first_manifest(
    remotes: &[Remote],
    reference: &Reference,
) -> Result<(Digest, snapreg_proto::manifest::Manifest)> {
    let mut last = None;
    for r in remotes {
        match pull::fetch_manifest(r, reference).await {
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

pub async fn pull_restore(
    remote: &Remote,
    criu: &Criu,
    reference: &Reference,
    opts: &RestoreOptions,
    progress: Progress,
) -> Result<RestoreReport> {
    let started = Instant::now();
    let remotes: Vec<Remote> = std::iter::once(remote.clone())
        .chain(opts.fallbacks.iter().cloned())
        .collect();
    let (digest, manifest) = first_manifest(&remotes, reference).await?;
    tracing::info!(%digest, "manifest fetched");
    let key = encryption::key_for(&manifest, remote.tenant_key(), &reference.to_string())?;

    let mut warnings = Vec::new();
    let mut facts = host::facts();
    facts.gpu = crate::cuda::host_gpu();
    let check = CheckOptions {
        gpu_remapped: opts.gpu_map.is_some(),
        ..CheckOptions::default()
    };
    let verdict = compat::check(&manifest.compat, &facts, &check);
    let gpu_pairs = match (&opts.gpu_map, &manifest.compat.gpu, &facts.gpu) {
        (None, ..) => Vec::new(),
        (Some(map), Some(snapshot), Some(host)) => crate::cuda::gpu_pairs(map, snapshot, host)?,
        (Some(_), None, _) => {
            return Err(ClientError::Usage(format!(
                "{reference} holds no GPU state: drop --gpu-map"
            )))
        }
        (Some(_), _, None) => {
            return Err(ClientError::Usage(
                "--gpu-map: this host has no NVIDIA GPU".into(),
            ))
        }
    };
    warnings.extend(verdict.warnings.iter().map(|w| format!("warning: {w}")));
    if !verdict.is_compatible() {
        let list = verdict
            .mismatches
            .iter()
            .map(|m| format!("  {m}"))
            .collect::<Vec<_>>()
            .join("\n");
        if !opts.force {
            return Err(ClientError::Incompatible(list));
        }
        warnings.push(format!("--force overrode:\n{list}"));
    }
    if let Some(info) = &manifest.criu {
        match process::check_external_files(&info.external_files) {
            Ok(w) => warnings.extend(w),
            Err(e) if opts.force => warnings.push(format!("--force overrode: {e}")),
            Err(e) => return Err(e),
        }
    }
    for w in &warnings {
        eprintln!("snapctl: {w}");
    }
    let weights_layer = manifest
        .layers
        .iter()
        .find(|l| l.kind == LayerKind::Weights);
    let resume =
        crate::weights::resume_list(manifest.annotations.get(crate::weights::RESUME_ANNOTATION));
    if weights_layer.is_some() {
        if opts.weights_service.is_none() {
            return Err(ClientError::Usage(format!(
                "{reference} keeps its weights apart: pass --weights-service SOCKET (the node's `snapctl weights serve`)"
            )));
        }
        if !opts.detach {
            return Err(ClientError::Usage(format!(
                "{reference} keeps its weights apart: restore it with --detach (snapctl resumes the worker after CRIU returns)"
            )));
        }
    }
    let layer = manifest
        .layers
        .iter()
        .find(|l| l.kind == LayerKind::Process)
        .ok_or_else(|| {
            ClientError::Usage(format!(
                "{reference} has no process layer: use `snapctl pull` for plain snapshots"
            ))
        })?;
    let mut files: HashMap<String, Vec<Extent>> = layer
        .files
        .iter()
        .map(|f| (f.path.clone(), f.extents.clone()))
        .collect();
    progress.add_total(layer.files.iter().map(|f| f.size).sum());
    for f in &layer.files {
        for e in &f.extents {
            if let Extent::Zero { zero } = e {
                progress.counters.zero_bytes.fetch_add(*zero, Relaxed);
            }
        }
    }
    progress
        .counters
        .chunks_total
        .store(manifest.chunk_digests().len() as u64, Relaxed);

    let dir = crate::checkpoint::work_dir("rs")?;
    let listener = criu_stream::bind(&dir, criu_stream::SERVE_SOCKET)
        .map_err(|e| ClientError::io("binding the streamer socket", e))?;
    let mut actions = ActionServer::bind(&dir.join("action.sock"))
        .map_err(|e| ClientError::io("binding the action socket", e))?;
    // The detached tree is orphaned when CRIU exits: be its reaper meanwhile.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };

    let mut args: Vec<String> = vec!["restore".into(), "-D".into(), dir.display().to_string()];
    args.extend(["-o".into(), "restore.log".into(), "-v4".into()]);
    if opts.detach {
        args.push("-d".into());
    }
    let restore_options = manifest
        .criu
        .as_ref()
        .map(|c| c.restore_options.clone())
        .unwrap_or_default();
    if restore_options.iter().any(|o| o == "--tcp-established") {
        args.extend(["--network-lock".into(), "nftables".into()]);
    }
    args.extend(restore_options);
    args.extend(opts.extra_args.iter().cloned());

    // CUDA snapshots: initialise the driver while CRIU restores (cuInit costs seconds).
    let cuda_pids: Vec<u32> = manifest
        .annotations
        .get(crate::checkpoint::CUDA_PIDS_ANNOTATION)
        .map(|v| v.split(',').filter_map(|p| p.parse().ok()).collect())
        .unwrap_or_default();
    if !cuda_pids.is_empty() && !opts.detach {
        return Err(ClientError::Usage(format!(
            "{reference} holds CUDA state: restore it with --detach (snapctl puts the GPU state back after CRIU returns)"
        )));
    }
    let cuda_init =
        (!cuda_pids.is_empty()).then(|| tokio::task::spawn_blocking(crate::cuda::Cuda::load));
    let t = Instant::now();
    let log = dir.join("restore.log");
    let (mut child, sock) =
        criu::start_streaming(criu, &args, &listener, &dir.join("action.sock"), &log).await?;
    tracing::info!("criu restore started");
    let shutdown_handle = sock
        .try_clone()
        .map_err(|e| ClientError::io("streamer socket", e))?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let names = files.keys().cloned().collect();
    let serving = tokio::task::spawn_blocking(move || serve_loop(sock, names, tx));

    let source = ChunkSource::new(remotes, opts.cache.clone(), progress.clone())
        .decrypting(key)
        .use_direct(&manifest.chunk_digests())
        .await?;
    // Weights and process restore concurrently: the restore takes max(), not the sum.
    let weights_fill = match (weights_layer, &opts.weights_service) {
        (Some(l), Some(socket)) => {
            let (l, socket, source) = (l.clone(), socket.clone(), source.clone());
            let key_id = manifest.encryption.as_ref().map(|e| e.key_id.clone());
            progress.add_total(l.files.iter().map(|f| f.size).sum());
            Some(tokio::spawn(async move {
                crate::weights::fill_layer(&socket, &l, key_id, source).await
            }))
        }
        _ => None,
    };
    // CRIU waits for its first answers meanwhile: the plan reads two small files.
    let zero_plan = if opts.keep_zero_pages {
        zero_pages::ZeroPagePlan::default()
    } else {
        let mut small = HashMap::new();
        for name in zero_pages::needed(&files) {
            let bytes = file_bytes(&source, &name, &files[&name]).await?;
            small.insert(name, bytes);
        }
        zero_pages::plan(&files, &small)
    };
    files.extend(zero_plan.pages.clone());
    if zero_plan.bytes_left_out > 0 {
        tracing::info!(
            bytes = zero_plan.bytes_left_out,
            "zero pages left out of the pagemap"
        );
        progress.advance(zero_plan.bytes_left_out);
        progress
            .counters
            .bytes_total
            .fetch_add(zero_plan.bytes_left_out, Relaxed);
    }
    // Device memory (the bulk of a GPU image) is fetched ahead of CRIU, wider than
    // the in-order window; CRIU then finds it in the node cache.
    let device_chunks = crate::device_memory::chunks(&manifest, layer);
    let device_memory_bytes: u64 = manifest.device_memory.iter().map(|s| s.len).sum();
    let ahead = (!device_chunks.is_empty()).then(|| {
        let (source, cache) = (source.clone(), opts.cache.clone());
        tokio::spawn(async move {
            // Only what the node lacks: re-reading cached chunks here would verify
            // them twice (serving verifies what it splices).
            let missing = tokio::task::spawn_blocking(move || {
                device_chunks
                    .into_iter()
                    .filter(|d| !cache.contains(d))
                    .collect::<Vec<_>>()
            })
            .await
            .unwrap_or_default();
            futures::stream::iter(missing)
                .map(|d| {
                    let source = source.clone();
                    async move { source.content(d, "device memory").await }
                })
                .buffer_unordered(DEVICE_MEMORY_WINDOW)
                .for_each(|_| async {})
                .await
        })
    });
    let first_error: Arc<Mutex<Option<ClientError>>> = Arc::default();
    let mut tasks: JoinSet<()> = JoinSet::new();
    let mut served = 0usize;
    let server = Serving {
        files: &files,
        inline: &zero_plan.pagemaps,
        source: &source,
        first_error: &first_error,
        window: opts.window,
    };
    let mut stderr = child.stderr.take();
    let stderr_task = tokio::spawn(async move {
        let mut buf = Vec::new();
        if let Some(s) = stderr.as_mut() {
            let _ = tokio::io::AsyncReadExt::read_to_end(s, &mut buf).await;
        }
        buf
    });
    let status = loop {
        tokio::select! {
            Some((name, fd)) = rx.recv() => {
                served += 1;
                server.spawn_file(&mut tasks, name, fd);
            }
            Some(req) = actions.next() => {
                if req.action != "post-restore" {
                    req.answer(Ok(())).await;
                    continue;
                }
                tracing::info!("post-restore: verifying every served file");
                // Every file CRIU asked for must have been served whole and verified.
                while let Ok((name, fd)) = rx.try_recv() {
                    served += 1;
                    server.spawn_file(&mut tasks, name, fd);
                }
                while tasks.join_next().await.is_some() {}
                let verdict = match first_error.lock().unwrap().as_ref() {
                    None => Ok(()),
                    Some(e) => Err(e.to_string()),
                };
                req.answer(verdict).await;
            }
            status = child.wait() => break status.map_err(|e| ClientError::io("waiting for CRIU", e))?,
        }
    };
    let restore_seconds = t.elapsed().as_secs_f64();
    tracing::info!(restore_seconds, "criu restore exited");
    if let Some(a) = ahead {
        a.abort();
    }
    let _ = shutdown_handle.shutdown(std::net::Shutdown::Both);
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    let _ = serving.await;
    let stderr = stderr_task.await.unwrap_or_default();
    let cache = opts.cache.clone();
    let _ = tokio::task::spawn_blocking(move || cache.enforce_limit()).await;

    let weights = match weights_fill {
        None => None,
        Some(task) => match task
            .await
            .map_err(|e| ClientError::Weights(e.to_string()))
            .and_then(|r| r)
        {
            Ok(r) => Some(r),
            Err(e) => {
                // The tree waits for weights that will not come: it must not linger.
                if status.success() {
                    for (p, _) in &resume {
                        unsafe { libc::kill(*p as i32, libc::SIGKILL) };
                    }
                }
                return Err(e);
            }
        },
    };
    if let Some(e) = first_error.lock().unwrap().take() {
        let criu_side = criu::failure("restore", &log, &String::from_utf8_lossy(&stderr));
        tracing::warn!("restore aborted before the process resumed: {e}\n{criu_side}");
        return Err(match e {
            // Keeps exit code 5 and names the chunk and file.
            ClientError::ChunkCorrupt { .. } => e,
            other => ClientError::Criu(format!(
                "restore aborted before the process resumed: {other}\n{criu_side}"
            )),
        });
    }
    if !status.success() {
        return Err(criu::failure(
            "restore",
            &log,
            &String::from_utf8_lossy(&stderr),
        ));
    }
    let mut cuda_restore_seconds = None;
    if let Some(init) = cuda_init {
        let t_cuda = Instant::now();
        let pids = cuda_pids.clone();
        let done = init
            .await
            .map_err(|e| ClientError::Cuda(e.to_string()))
            .and_then(|loaded| loaded)
            .and_then(|cuda| crate::cuda::restore_pids(&cuda, &pids, &gpu_pairs));
        if let Err(e) = done {
            // A process whose GPU state cannot come back must not linger half-alive.
            for p in &cuda_pids {
                unsafe { libc::kill(*p as i32, libc::SIGKILL) };
            }
            return Err(e);
        }
        cuda_restore_seconds = Some(t_cuda.elapsed().as_secs_f64());
    }
    if weights.is_some() {
        crate::weights::resume(&resume)?;
    }
    progress.finish();
    Ok(RestoreReport {
        reference: reference.to_string(),
        digest: digest.to_string(),
        pid: manifest
            .annotations
            .get("org.snapreg.root-pid")
            .and_then(|p| p.parse().ok()),
        counters: progress.counters.snapshot(),
        files_served: served,
        restore_seconds,
        seconds: started.elapsed().as_secs_f64(),
        warnings,
        criu_log: log,
        peak_rss_bytes: peak_rss_bytes(),
        chunks_by_registry: source.fetched_from(),
        cuda_restore_seconds,
        weights,
        zero_bytes_left_out: zero_plan.bytes_left_out,
        device_memory_bytes,
    })
}

/// Default window: enough fetches in flight to cover a loopback or rack RTT at
/// ~1 GB/s with 0.5 MiB chunks, at ≤ 32 MiB of memory per file.
pub const DEFAULT_WINDOW: usize = 16;
/// Chunk fetches in flight for device memory, ahead of CRIU.
const DEVICE_MEMORY_WINDOW: usize = 64;
