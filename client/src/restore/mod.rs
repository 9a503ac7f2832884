//! `snapctl pull-restore`: the registry streamed straight into `criu restore --stream`,
//! in three stages: [`plan`] (refuse before touching the host), [`serve`] (CRIU
//! running, its files served by [`files`]) and [`finish`] (weights, GPU state, resume).
//!
//! ```text
//! GetManifest ─▶ compatibility rules, files the image reopens ─▶ criu restore --stream
//! CRIU asks for a file ─▶ exists? ─▶ pipe ─▶ one task per file: extents in order,
//!   a window of chunk fetches ahead (node cache first, then the registry, verified,
//!   written to the cache) ─▶ pipe
//! CRIU ─post-restore─▶ snapctl (action script): "ok" only if every byte served verified
//! ```
//!
//! Files the tree wrote and the snapshot carries are put back before CRIU starts
//! ([`crate::written_files`]); the others are checked by [`plan`] and refused if they
//! differ.
//!
//! Every restore that got as far as its manifest reports how it went to the registry
//! ([`outcome`]): Resolve stops offering a snapshot that keeps failing.
//!
//! Why streamed, and not written into a directory for a plain `criu restore -D`: fed
//! by an ideal streamer, CRIU's streamed restore of an 11 GB image on the H200
//! machine took 0–15% longer than its restore from /dev/shm, and a restore staged
//! into memory first lost 1.9–4.1 s in every case measured, because CRIU cannot
//! start reading before the last chunk is written (bench/RESULTS.md, "Is the pipe
//! the limit?"; the staged restore is in commit 95e4528).
//!
//! Memory: at most `window` chunks per file in flight (≤ 2 MiB each), never the image.
//! Small files come first because CRIU asks for them first; pages last, per task.
//! A chunk that fails verification is never written to a pipe: its file is cut short,
//! CRIU fails, and the post-restore answer is "fail" if it got that far, so no
//! restored process resumes on bad bytes.

mod files;
mod finish;
mod lazy;
mod outcome;
mod plan;
mod serve;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use snapreg_proto::manifest::annotations;
use snapreg_proto::reference::Reference;
use tokio::task::JoinHandle;

use crate::cache::ChunkCache;
use crate::criu::Criu;
use crate::error::Result;
use crate::fetch::{Budget, Chunks, PeerSummary, Priority, SchedulerStats};
use crate::peer::PeerConfig;
use crate::progress::{CountersSnapshot, Progress};
use crate::remote::Remote;
use crate::weights::FillReport;
use crate::written_files::{self, PutBack};
use crate::zero_pages::ZeroPagePlan;
use crate::{encryption, pull, work_dir};
pub use files::FileServing;
pub use lazy::LazyReport;
use plan::Plan;
use serve::{CriuRestore, Image};

/// Default window: enough fetches in flight to cover a loopback or rack RTT at
/// ~1 GB/s with 0.5 MiB chunks, at ≤ 32 MiB of memory per file.
pub const DEFAULT_WINDOW: usize = 16;
/// The fetch scheduler's budget for one restore, all readers together (CRIU's files,
/// device memory, the weights fill, the read-ahead): the bytes its fetches may hold
/// at most (`RestoreOptions::fetch_memory`; with the default chunker's 2 MiB chunks
/// at most, 32 fetches in flight), and a cap on the fetches however small chunks are.
pub const DEFAULT_FETCH_MEMORY: u64 = 64 << 20;
const SCHEDULER_REQUESTS: usize = 256;

#[derive(Clone, Debug)]
pub struct RestoreOptions {
    pub detach: bool,
    pub extra_args: Vec<String>,
    /// Restore despite compatibility refusals (each is printed).
    pub force: bool,
    pub cache: ChunkCache,
    /// Chunk fetches in flight ahead of CRIU, per file.
    pub window: usize,
    /// Bytes the restore's chunk fetches may hold in flight, all readers together
    /// ([`DEFAULT_FETCH_MEMORY`]): more fetches in flight where the registry answers
    /// each slowly but many at once, at this much more memory.
    pub fetch_memory: u64,
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
    /// Fetch from sibling nodes that hold or fetch the same snapshot.
    pub peers: Option<PeerConfig>,
    /// How the image's memory goes back into the tree.
    pub memory: MemoryIn,
}

/// How a restore puts the image's memory back into the tree.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MemoryIn {
    /// Every page through CRIU's pipe before the tree resumes (CRIU reads it with
    /// one thread, faulting in a page at a time).
    #[default]
    Streamed,
    /// `--lazy`: the tree resumes first; snapctl, as CRIU's lazy-pages daemon
    /// ([`lazy`]), serves each page it touches and fills the rest behind it.
    Lazy,
    /// `--fill-first`: the same daemon fills every page from many workers while CRIU
    /// holds the tree at its pre-resume: the tree resumes with all its memory, as
    /// streamed, without CRIU's one reader in the way.
    FillFirst,
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
    #[serde(flatten)]
    pub peers: PeerSummary,
    /// Putting CUDA state back (restore + unlock) after CRIU, for CUDA snapshots.
    pub cuda_restore_seconds: Option<f64>,
    /// Separated mode: filling the weights service (concurrent with CRIU).
    pub weights: Option<FillReport>,
    /// Bytes of zero pages left out of the served pagemap (never crossed the pipe).
    pub zero_bytes_left_out: u64,
    /// The pagemap's runs of pages (one read(2) each for CRIU) in the image and as
    /// served, once zero runs were cut out; zero when nothing was cut.
    pub page_runs: crate::zero_pages::PageRuns,
    /// Bytes of the image marked as device memory (their chunks fetched ahead).
    pub device_memory_bytes: u64,
    /// Files the tree writes, put back before CRIU: created, kept or moved aside.
    pub written_files: Vec<PutBack>,
    /// Whether the registry recorded this restore's outcome (restore/outcome.rs).
    pub outcome_recorded: bool,
    /// What the fetch scheduler did: fetches, requests that joined one in flight,
    /// the most in flight at once.
    pub scheduler: Option<SchedulerStats>,
    /// How the memory went back in.
    pub memory: MemoryIn,
    /// `--lazy` and `--fill-first`: what the lazy-pages daemon put in, and when the
    /// last page was in (`restore_seconds` is when CRIU exited: under `--lazy` the tree
    /// was running by then, under `--fill-first` every page was in before it ran).
    pub lazy: Option<LazyReport>,
    /// Where serving the largest image files to CRIU spent its time: waiting for
    /// chunks (the fetch stack behind) or writing into CRIU's pipe (CRIU behind).
    pub serving: Vec<FileServing>,
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

/// Restores `reference` from `remote` (then `opts.fallbacks`, in order) with
/// `criu restore --stream`, every chunk verified before CRIU reads it.
///
/// The restored tree is detached when `opts.detach`: the caller should be a child
/// subreaper ([`become_subreaper`]) so that it reaps the tree's orphans meanwhile.
pub async fn pull_restore(
    remote: &Remote,
    criu: &Criu,
    reference: &Reference,
    opts: &RestoreOptions,
    progress: Progress,
) -> Result<RestoreReport> {
    let started = Instant::now();
    let mut at = outcome::Stage::default();
    let mut result = restore(remote, criu, reference, opts, progress, &mut at).await;
    let recorded = outcome::report(remote, reference, opts, &at, &result, started).await;
    if let Ok(r) = &mut result {
        r.outcome_recorded = recorded;
    }
    result
}

/// The restore itself; `at` follows its phase (what a failure is reported at).
async fn restore(
    remote: &Remote,
    criu: &Criu,
    reference: &Reference,
    opts: &RestoreOptions,
    progress: Progress,
    at: &mut outcome::Stage,
) -> Result<RestoreReport> {
    let started = Instant::now();
    let remotes: Vec<Remote> = std::iter::once(remote.clone())
        .chain(opts.fallbacks.iter().cloned())
        .collect();
    let (digest, manifest) = pull::first_manifest(&remotes, reference).await?;
    tracing::info!(%digest, "manifest fetched");
    at.reached(outcome::Phase::Plan, Some(digest));
    let key = encryption::key_for(&manifest, remote.tenant_key(), &reference.to_string())?;
    let mut plan = Plan::make(manifest, reference, opts)?;
    for w in &plan.warnings {
        progress.warn(w.clone());
    }
    plan.count_totals(&progress);
    at.reached(outcome::Phase::WrittenFiles, None);
    let written_files = put_back_written(&remotes, &plan, key.clone(), opts, &progress).await?;

    at.reached(outcome::Phase::CriuRestore, None);
    let dir = work_dir::create("rs")?;
    let cuda_init = finish::start_cuda_init(&plan);
    let source = ChunkSource {
        remotes,
        key,
        reference,
        digest,
    };
    let (criu_restore, chunks, lazy, zero_plan) =
        start_criu(criu, &mut plan, opts, &source, &dir, &progress).await?;
    let lazy_zero_bytes = lazy.as_ref().map_or(0, |l| l.plan.zero_bytes_left_out);
    progress.placed(lazy_zero_bytes);
    // Under --lazy the daemon's fill fetches the lazy chunks itself: read ahead the rest.
    let lazy_only = lazy
        .as_ref()
        .map(|l| l.plan.lazy_only_chunks(&plan.files))
        .unwrap_or_default();
    let ahead = read_ahead(&plan, &chunks, &lazy_only);
    let weights_fill = finish::start_weights_fill(
        &plan,
        opts.weights_service.as_deref(),
        &chunks.at(Priority::Weights),
        &progress,
        started,
    );
    let log = criu_restore.log.clone();
    let no_cuts = HashMap::new();
    let image = Image {
        files: &plan.files,
        inline: lazy
            .as_ref()
            .map_or(&zero_plan.pagemaps, |l| &l.plan.pagemaps),
        left_out: lazy.as_ref().map_or(&no_cuts, |l| &l.plan.left_out),
        chunks: &chunks,
        window: opts.window,
        resume_when: lazy
            .as_ref()
            .filter(|_| opts.memory == MemoryIn::FillFirst)
            .map(|l| l.daemon.all_in()),
    };
    let mut served = criu_restore.serve(image, &progress).await?;
    let (restore_seconds, files_served) = (served.restore_seconds, served.files_served);
    let serving = std::mem::take(&mut served.timings);
    at.reached(outcome::Phase::CriuRestore, None);
    if let Err(e) = served.outcome(&log) {
        let daemon_failed = match lazy {
            Some(l) => l.daemon.abort().await,
            None => None,
        };
        return Err(daemon_failed.unwrap_or(e));
    }
    at.reached(outcome::Phase::CudaRestore, None);
    // Under --lazy the CUDA restore reads device memory the fill is putting in.
    let lazy = match lazy {
        Some(l) if !plan.cuda_pids.is_empty() => Some(l.device_memory_in(started).await?),
        l => l,
    };
    // The weights fill (and under --lazy the fill of the other pages) goes on beside
    // the CUDA restore: waiting for the weights first or holding the lazy fill brought
    // the first answer no sooner (bench/RESULTS.md, "What runs beside a lazy CUDA
    // restore"). The workers map their weights when resumed.
    let cuda_restore_seconds = finish::restore_cuda(cuda_init, &plan).await?;
    at.reached(outcome::Phase::Weights, None);
    let weights = finish::weights_filled(weights_fill, &plan).await?;
    if weights.is_some() {
        crate::weights::resume(&plan.resume)?;
    }
    // The tree runs (and answers) from here; with --lazy its last pages come now.
    at.reached(outcome::Phase::LazyPages, None);
    let lazy = match lazy {
        Some(l) => Some(l.daemon.finish(&l.plan, started).await?),
        None => None,
    };
    for a in ahead {
        a.abort();
    }
    let cache = opts.cache.clone();
    let _ = tokio::task::spawn_blocking(move || cache.enforce_limit()).await;
    progress.finish();
    Ok(RestoreReport {
        reference: reference.to_string(),
        digest: digest.to_string(),
        pid: plan
            .manifest
            .annotations
            .get(annotations::ROOT_PID)
            .and_then(|p| p.parse().ok()),
        counters: progress.counters.snapshot(),
        files_served,
        restore_seconds,
        seconds: started.elapsed().as_secs_f64(),
        warnings: plan.warnings,
        criu_log: log,
        peak_rss_bytes: peak_rss_bytes(),
        chunks_by_registry: chunks.fetched_from(),
        peers: chunks.peer_summary(),
        cuda_restore_seconds,
        weights,
        zero_bytes_left_out: zero_plan.bytes_left_out + lazy_zero_bytes,
        page_runs: zero_plan.runs,
        device_memory_bytes: plan.manifest.device_memory.iter().map(|s| s.len).sum(),
        written_files,
        outcome_recorded: false,
        scheduler: chunks.scheduler_stats(),
        memory: opts.memory,
        lazy,
        serving,
    })
}

/// Starts CRIU's restore of the image, with the chunk stack that serves it and the
/// zero pages left out of it; under `--lazy` and `--fill-first` the lazy-pages daemon
/// listens first.
async fn start_criu(
    criu: &Criu,
    plan: &mut Plan,
    opts: &RestoreOptions,
    source: &ChunkSource<'_>,
    dir: &Path,
    progress: &Progress,
) -> Result<(CriuRestore, Chunks, Option<lazy::Lazy>, ZeroPagePlan)> {
    let mut args = plan.criu_args(dir, opts);
    let names = plan.files.keys().cloned().collect();
    if opts.memory != MemoryIn::Streamed {
        // The daemon must listen before CRIU starts, and reads images snapctl writes;
        // its pagemaps build on the zero-page plan's.
        let chunks = source.build(plan, opts, progress).await?;
        let zero_plan = plan
            .zero_pages(&chunks, opts.keep_zero_pages, progress)
            .await?;
        let lazy = lazy::begin(criu, plan, &zero_plan, &chunks, dir, progress).await?;
        args.push("--lazy-pages".into());
        match CriuRestore::start(criu, &args, dir, names).await {
            Ok(c) => Ok((c, chunks, Some(lazy), zero_plan)),
            Err(e) => {
                let _ = lazy.daemon.abort().await;
                Err(e)
            }
        }
    } else {
        let criu_restore = CriuRestore::start(criu, &args, dir, names).await?;
        // Built while CRIU starts: asking for presigned URLs is a round trip.
        let chunks = source.build(plan, opts, progress).await?;
        let zero_plan = plan
            .zero_pages(&chunks, opts.keep_zero_pages, progress)
            .await?;
        Ok((criu_restore, chunks, None, zero_plan))
    }
}

/// What the restore's chunk stack is built from.
struct ChunkSource<'a> {
    remotes: Vec<Remote>,
    key: Option<std::sync::Arc<snapreg_proto::encryption::TenantKey>>,
    reference: &'a Reference,
    digest: snapreg_proto::Digest,
}

impl ChunkSource<'_> {
    /// The restore's stack: node cache, presigned URLs, peers, one scheduler.
    async fn build(
        &self,
        plan: &Plan,
        opts: &RestoreOptions,
        progress: &Progress,
    ) -> Result<Chunks> {
        let budget = Budget::for_chunks(
            SCHEDULER_REQUESTS,
            opts.fetch_memory,
            plan.manifest.chunker.max_size.into(),
        );
        Chunks::builder(self.remotes.clone())
            .node_cache(opts.cache.clone())
            .decrypting(self.key.clone())
            .scheduled(budget)
            .direct_urls(plan.manifest.chunk_digests())
            .peers(
                opts.peers.clone(),
                &self.reference.repository,
                self.digest,
                plan.manifest.chunk_digests(),
            )
            .build(progress.clone())
            .await
    }
}

/// The files the tree writes, back as they were at the freeze, before CRIU starts (it
/// reopens them while restoring the tasks' descriptors). Their own small chunk source:
/// the restore's (peers, presigned URLs) is built while CRIU starts.
async fn put_back_written(
    remotes: &[Remote],
    plan: &Plan,
    key: Option<std::sync::Arc<snapreg_proto::encryption::TenantKey>>,
    opts: &RestoreOptions,
    progress: &Progress,
) -> Result<Vec<PutBack>> {
    if plan.manifest.written_files_layer().is_none() {
        return Ok(Vec::new());
    }
    let chunks = Chunks::builder(remotes.to_vec())
        .node_cache(opts.cache.clone())
        .decrypting(key)
        .build(progress.clone())
        .await?;
    written_files::put_back_layer(&plan.manifest, &chunks).await
}

/// Makes this process the reaper of orphaned descendants: a detached restored tree is
/// orphaned when CRIU exits, and its exits must be reaped here meanwhile.
pub fn become_subreaper() {
    // Fails only on kernels before 3.4; the tree is then reaped by init instead.
    let _ = nix::sys::prctl::set_child_subreaper(true);
}

/// The image fetched into the node cache ahead of CRIU, through the restore's
/// scheduler: device memory first (the bulk of a GPU image, which the CUDA restore
/// needs), then every file in the order CRIU asks for them (plan.rs,
/// [`Plan::criu_order`]), less `skip`: under `--lazy`, the chunks only the daemon's
/// fill reads (it fetches them itself, into the node cache, and one decode each is
/// enough). CRIU's own reads go first whenever they wait.
///
/// With peers, only device memory is read ahead: the swarm decides which node brings
/// which chunk from the registry (fetch/peers.rs), and a read-ahead of the whole image
/// would take from the registry what siblings are about to deliver.
fn read_ahead(
    plan: &Plan,
    chunks: &Chunks,
    skip: &std::collections::HashSet<snapreg_proto::Digest>,
) -> Vec<JoinHandle<()>> {
    let device: Vec<_> = crate::device_memory::chunks(&plan.manifest, plan.process_layer())
        .into_iter()
        .map(|d| (d, std::sync::Arc::from("device memory")))
        .collect();
    let mut tasks = Vec::new();
    if !device.is_empty() {
        tasks.push(chunks.at(Priority::DeviceMemory).read_ahead(device));
    }
    if !chunks.has_peers() {
        let mut wants = plan.criu_order();
        wants.retain(|(d, _)| !skip.contains(d));
        tasks.push(chunks.at(Priority::ReadAhead).read_ahead(wants));
    }
    tasks
}
