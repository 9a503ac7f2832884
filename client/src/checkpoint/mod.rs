//! `snapctl checkpoint`: `criu dump --stream` straight into the registry, in three
//! stages: [`plan`] (the tree's checks, its CUDA state into host memory, CRIU's
//! arguments, the manifest's records), the dump ([`capture`] streaming, or [`spool`]
//! through a local directory), and the finish here (GPU state put back where the
//! tasks keep running, the report).
//!
//! ```text
//! criu dump --stream ──pipes──▶ capture thread (one per socket) ──▶ one task per file:
//!   chunker ─▶ BLAKE3 ─▶ Uploader (FindMissing ─▶ zstd ─▶ PutChunks)
//! criu ──post-dump──▶ snapctl as action script ──▶ wait for every file, commit manifest
//!   ──▶ "ok": CRIU kills (or, with --leave-running, resumes) the tasks
//! ```
//!
//! No image byte touches local disk, and memory is bounded by the uploader's
//! channels. What each failure leaves:
//!
//! | failure | outcome |
//! |---|---|
//! | CRIU fails before post-dump | no commit; CRIU resumes the tasks; error carries CRIU's log tail |
//! | registry dies | uploads fail, snapctl closes the pipes; CRIU fails and resumes the tasks |
//! | registry stalls | no progress for `--stall-timeout`: snapctl closes the pipes and the socket, CRIU resumes the tasks |
//! | commit fails in post-dump | the script answers "fail"; CRIU resumes the tasks; nothing visible |
//!
//! Files the tree holds open for writing are read at post-dump too, while the tasks
//! are frozen, into the snapshot's "files" layer ([`crate::written_files`]).
//!
//! CRIU waits forever on a streamer that stops reading, with the tasks frozen: the
//! watchdog is what bounds a checkpoint's worst case.
//!
//! `--spool DIR` dumps to a local directory first (the tasks are released at CRIU's
//! speed) and pushes afterwards; the images stay in DIR if the push fails. `--spool
//! auto` (the default with `--cuda`) does that in memory when the tree fits
//! ([`route`] says when, and why).

mod capture;
mod huge_spool;
mod plan;
mod route;
mod spool;

pub use route::{Route, Spool, MEMORY_DIR};

use std::path::PathBuf;
use std::time::{Duration, Instant};

use snapreg_proto::manifest::{Layer, LayerKind};
use snapreg_proto::reference::Reference;

use crate::criu::{self, Criu};
use crate::cuda::{Checkpointed, Cuda};
use crate::error::Result;
use crate::process;
use crate::progress::{CountersSnapshot, Progress};
use crate::push;
use crate::remote::Remote;
use crate::written_files::{CaptureLimits, CaptureReport};
use plan::TreeFacts;

#[derive(Clone, Debug)]
pub struct CheckpointOptions {
    pub pid: u32,
    pub leave_running: bool,
    pub tcp_established: bool,
    pub shell_job: bool,
    pub extra_args: Vec<String>,
    pub spool: Spool,
    /// The tmpfs `--spool auto` dumps into.
    pub memory_spool_dir: PathBuf,
    /// `--spool auto` spools into a tmpfs of huge pages it mounts (huge_spool.rs).
    pub spool_huge_pages: bool,
    /// No byte read from CRIU and none uploaded for this long aborts the dump.
    pub stall_timeout: Duration,
    /// Checkpoint the tree's CUDA state into host memory first (and put it back if
    /// anything fails, or after a --leave-running dump).
    pub cuda: bool,
    /// Separated mode: the weights service whose buffers the tree released become
    /// the snapshot's weights layer.
    pub weights_service: Option<PathBuf>,
    /// Which files the tree writes are carried in the snapshot.
    pub capture_files: CaptureLimits,
}

#[derive(Debug, serde::Serialize)]
pub struct CheckpointReport {
    pub reference: String,
    pub digest: String,
    pub pid: u32,
    pub files: usize,
    #[serde(flatten)]
    pub counters: CountersSnapshot,
    /// Time the tasks were frozen, as CRIU measured it.
    pub freeze_ms: Option<f64>,
    /// From CRIU's start to its exit.
    pub dump_seconds: f64,
    pub seconds: f64,
    pub criu_log: PathBuf,
    /// PIDs whose CUDA state was checkpointed, and how long lock + checkpoint took.
    pub cuda_pids: Vec<u32>,
    pub cuda_checkpoint_seconds: Option<f64>,
    /// Streamed or spooled, and why.
    pub route: Route,
    /// Bytes of the CRIU image (process layer) and of the weights layer.
    pub process_bytes: u64,
    pub weights_bytes: u64,
    /// Files the tree held open for writing: captured, or left out and why.
    pub written_files: CaptureReport,
}

/// One dump: where it goes, with what, and what the manifest will record.
struct DumpJob<'a> {
    remote: &'a Remote,
    criu: &'a Criu,
    reference: &'a Reference,
    opts: &'a CheckpointOptions,
    tag: String,
    facts: TreeFacts,
    progress: Progress,
}

/// What a dump left behind: how many image files, where CRIU's log and stats are,
/// how long CRIU ran, and the committed snapshot.
struct Dumped {
    files: usize,
    dir: PathBuf,
    dump_seconds: f64,
    digest: snapreg_proto::Digest,
    process_bytes: u64,
    weights_bytes: u64,
    written_files: CaptureReport,
}

pub async fn checkpoint(
    remote: &Remote,
    criu: &Criu,
    reference: &Reference,
    opts: &CheckpointOptions,
    progress: Progress,
) -> Result<CheckpointReport> {
    let started = Instant::now();
    let tag = push::required_tag(reference, "checkpoint")?;
    let pids = process::tree(opts.pid)?;
    // Before CUDA: a worker still holding weights must be refused untouched.
    let weights = plan::check_tree(opts, &pids)?;
    // CUDA first: the device state must be in host memory before CRIU looks.
    let cuda = if opts.cuda { Some(Cuda::load()?) } else { None };
    let t_cuda = Instant::now();
    let mut cuda_guard = match &cuda {
        Some(c) => Some(crate::cuda::checkpoint_tree(c, &pids)?),
        None => None,
    };
    let cuda_checkpoint_seconds = cuda_guard.as_ref().map(|_| t_cuda.elapsed().as_secs_f64());
    let job = DumpJob {
        remote,
        criu,
        reference,
        opts,
        tag,
        facts: TreeFacts::new(&pids, cuda_guard.as_ref(), weights),
        progress: progress.clone(),
    };
    let dumped = dump(&job).await;
    release_gpu_state(dumped.is_ok(), opts.leave_running, &mut cuda_guard);
    let (dumped, route) = dumped?;
    progress.finish();
    Ok(CheckpointReport {
        reference: reference.to_string(),
        digest: dumped.digest.to_string(),
        pid: opts.pid,
        files: dumped.files,
        counters: progress.counters.snapshot(),
        freeze_ms: criu::read_freeze_ms(&dumped.dir.join("stats-dump")),
        dump_seconds: dumped.dump_seconds,
        seconds: started.elapsed().as_secs_f64(),
        criu_log: dumped.dir.join("dump.log"),
        cuda_pids: job.facts.cuda_pids,
        cuda_checkpoint_seconds,
        route,
        process_bytes: dumped.process_bytes,
        weights_bytes: dumped.weights_bytes,
        written_files: dumped.written_files,
    })
}

/// The dump on the route chosen now, after the CUDA checkpoint put device memory
/// into host memory.
async fn dump(job: &DumpJob<'_>) -> Result<(Dumped, Route)> {
    let route = route::choose(job.opts, &job.facts.pids)?;
    tracing::info!(route = %route.reason, "dumping");
    let dumped = match &route.spooled_to {
        Some(dir) => spool::dump_then_push(job, dir).await,
        None => capture::dump_streaming(job).await,
    };
    dumped.map(|d| (d, route))
}

/// A failed dump resumed the tasks, --leave-running keeps them: either way their CUDA
/// state goes back on the GPU (the guard's drop). Killed tasks need nothing.
/// The guard is consumed either way.
fn release_gpu_state(dumped: bool, leave_running: bool, guard: &mut Option<Checkpointed<'_>>) {
    if let (true, false, Some(g)) = (dumped, leave_running, guard.take()) {
        g.forget();
    }
}

fn layer_bytes(layers: &[Layer], kind: LayerKind) -> u64 {
    layers
        .iter()
        .filter(|l| l.kind == kind)
        .flat_map(|l| &l.files)
        .map(|f| f.size)
        .sum()
}
