//! `snapctl checkpoint`: `criu dump --stream` straight into the registry.
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
//! CRIU waits forever on a streamer that stops reading, with the tasks frozen: the
//! watchdog is what bounds a checkpoint's worst case.
//!
//! `--spool DIR` dumps to a local directory first (the tasks are released at CRIU's
//! speed) and pushes afterwards; the images stay in DIR if the push fails.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use snapreg_proto::manifest::{Extent, File, Layer, LayerKind, Manifest};
use snapreg_proto::reference::Reference;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::action::ActionServer;
use crate::chunker::ChunkerConfig;
use crate::criu::{self, Criu};
use crate::error::{ClientError, Result};
use crate::progress::{CountersSnapshot, Progress};
use crate::push::{self, Uploader};
use crate::remote::Remote;
use crate::weights::{self, WeightsPlan};
use crate::{criu_stream, process};

/// CRIU options that a restore must repeat when they were given to the dump.
const SYMMETRIC_OPTIONS: &[&str] = &[
    "--tcp-established",
    "--shell-job",
    "--ext-unix-sk",
    "--file-locks",
    "--link-remap",
    "--skip-in-flight",
];

#[derive(Clone, Debug)]
pub struct CheckpointOptions {
    pub pid: u32,
    pub leave_running: bool,
    pub tcp_established: bool,
    pub shell_job: bool,
    pub extra_args: Vec<String>,
    pub spool: Option<PathBuf>,
    /// No byte read from CRIU and none uploaded for this long aborts the dump.
    pub stall_timeout: Duration,
    /// Checkpoint the tree's CUDA state into host memory first (and put it back if
    /// anything fails, or after a --leave-running dump).
    pub cuda: bool,
    /// Separated mode: the weights service whose buffers the tree released become
    /// the snapshot's weights layer.
    pub weights_service: Option<PathBuf>,
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
    /// Bytes of the CRIU image (process layer) and of the weights layer.
    pub process_bytes: u64,
    pub weights_bytes: u64,
}

/// A short, private working directory: the streamer socket path must fit in 108 bytes.
pub fn work_dir(prefix: &str) -> Result<PathBuf> {
    let base = if Path::new("/run").is_dir() && unsafe { libc::geteuid() } == 0 {
        "/run/snapctl"
    } else {
        "/tmp"
    };
    std::fs::create_dir_all(base).map_err(|e| ClientError::io(format!("creating {base}"), e))?;
    let dir = PathBuf::from(base).join(format!("{prefix}-{}-{}", std::process::id(), unique()));
    std::fs::create_dir_all(&dir)
        .map_err(|e| ClientError::io(format!("creating {}", dir.display()), e))?;
    Ok(dir)
}

fn unique() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as u64)
}

fn restore_options(opts: &CheckpointOptions) -> Vec<String> {
    let mut out = Vec::new();
    if opts.tcp_established {
        out.push("--tcp-established".to_string());
    }
    if opts.shell_job {
        out.push("--shell-job".to_string());
    }
    out.extend(
        opts.extra_args
            .iter()
            .filter(|a| SYMMETRIC_OPTIONS.contains(&a.as_str()))
            .cloned(),
    );
    out.dedup();
    out
}

fn dump_args(opts: &CheckpointOptions, dir: &Path) -> Vec<String> {
    let mut args = vec![
        "dump".into(),
        "-t".into(),
        opts.pid.to_string(),
        "-D".into(),
        dir.display().to_string(),
    ];
    args.extend(["-o".into(), "dump.log".into(), "-v4".into()]);
    if opts.leave_running {
        args.push("--leave-running".into());
    }
    if opts.tcp_established {
        // The default network lock runs `iptables`, absent on these hosts (CRIU-STREAM §9).
        args.extend([
            "--tcp-established".into(),
            "--network-lock".into(),
            "nftables".into(),
        ]);
    }
    if opts.shell_job {
        args.push("--shell-job".into());
    }
    args.extend(opts.extra_args.iter().cloned());
    args
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
    if opts.spool.is_none() {
        // Streaming cannot carry hugetlb pages; CRIU's own directory dump can.
        process::refuse_huge_pages(&pids)?;
    }
    // Before CUDA: a worker still holding weights must be refused untouched.
    let weights = match &opts.weights_service {
        Some(_) if opts.spool.is_some() => {
            return Err(ClientError::Usage(
                "--weights-service streams the dump: drop --spool".into(),
            ))
        }
        Some(socket) => Some(Arc::new(WeightsPlan::prepare(socket, &pids)?)),
        None => None,
    };
    // CUDA first: the device state must be in host memory before CRIU looks.
    let cuda = if opts.cuda {
        Some(crate::cuda::Cuda::load()?)
    } else {
        None
    };
    let t_cuda = Instant::now();
    let mut cuda_guard = match &cuda {
        Some(c) => Some(crate::cuda::checkpoint_tree(c, &pids)?),
        None => None,
    };
    let cuda_checkpoint_seconds = cuda_guard.as_ref().map(|_| t_cuda.elapsed().as_secs_f64());
    let facts = TreeFacts {
        external: process::external_files(&pids),
        cuda_pids: cuda_guard
            .as_ref()
            .map(|g| g.pids.clone())
            .unwrap_or_default(),
        gpu: crate::cuda::host_gpu(),
        weights,
        device_ranges: cuda_guard
            .as_ref()
            .map(|g| g.device_ranges.clone())
            .unwrap_or_default(),
    };

    let dumped = match &opts.spool {
        Some(spool) => {
            spooled(
                remote,
                criu,
                reference,
                opts,
                spool,
                &tag,
                &facts,
                progress.clone(),
            )
            .await
        }
        None => {
            streamed(
                remote,
                criu,
                reference,
                opts,
                &tag,
                &facts,
                progress.clone(),
            )
            .await
        }
    };
    // A failed dump resumed the tasks, --leave-running keeps them: either way their
    // CUDA state goes back on the GPU (the guard's drop). Killed tasks need nothing.
    if let (Ok(_), false, Some(g)) = (&dumped, opts.leave_running, cuda_guard.take()) {
        g.forget();
    }
    drop(cuda_guard);
    let Dumped {
        files,
        dir,
        dump_seconds,
        digest,
        process_bytes,
        weights_bytes,
    } = dumped?;
    progress.finish();
    Ok(CheckpointReport {
        reference: reference.to_string(),
        digest: digest.to_string(),
        pid: opts.pid,
        files,
        counters: progress.counters.snapshot(),
        freeze_ms: criu::read_freeze_ms(&dir.join("stats-dump")),
        dump_seconds,
        seconds: started.elapsed().as_secs_f64(),
        criu_log: dir.join("dump.log"),
        cuda_pids: facts.cuda_pids,
        cuda_checkpoint_seconds,
        process_bytes,
        weights_bytes,
    })
}

/// What the manifest records about the dumped tree besides its images.
struct TreeFacts {
    external: Vec<snapreg_proto::manifest::ExternalFile>,
    cuda_pids: Vec<u32>,
    gpu: Option<snapreg_proto::compat::GpuRecord>,
    /// Separated mode: the buffers the tree released, uploaded as the weights layer.
    weights: Option<Arc<WeightsPlan>>,
    /// Address ranges the CUDA checkpoint added, per PID (device memory in host pages).
    device_ranges: std::collections::HashMap<u32, Vec<(u64, u64)>>,
}

/// Annotation listing the PIDs whose CUDA state is in the image (restore puts it back).
pub const CUDA_PIDS_ANNOTATION: &str = "org.snapreg.cuda-pids";

fn build_manifest(
    uploader: &Uploader,
    layers: Vec<Layer>,
    opts: &CheckpointOptions,
    facts: &TreeFacts,
) -> Manifest {
    let mut m = uploader.new_manifest(layers, true);
    if let Some(c) = m.criu.as_mut() {
        c.restore_options = restore_options(opts);
        c.external_files = facts.external.clone();
    }
    m.annotations
        .insert("org.snapreg.root-pid".into(), opts.pid.to_string());
    if !facts.cuda_pids.is_empty() {
        let pids: Vec<String> = facts.cuda_pids.iter().map(u32::to_string).collect();
        m.annotations
            .insert(CUDA_PIDS_ANNOTATION.into(), pids.join(","));
        m.compat.gpu = facts.gpu.clone();
    }
    if let Some(w) = &facts.weights {
        m.annotations
            .insert(weights::RESUME_ANNOTATION.into(), w.resume_annotation());
    }
    m
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
}

#[allow(clippy::too_many_arguments)]
async fn spooled(
    remote: &Remote,
    criu: &Criu,
    reference: &Reference,
    opts: &CheckpointOptions,
    spool: &Path,
    tag: &str,
    facts: &TreeFacts,
    progress: Progress,
) -> Result<Dumped> {
    let dir = spool.join(format!("ck-{}-{}", opts.pid, unique()));
    std::fs::create_dir_all(&dir)
        .map_err(|e| ClientError::io(format!("creating {}", dir.display()), e))?;
    let t = Instant::now();
    let status = tokio::process::Command::new(&criu.path)
        .args(dump_args(opts, &dir))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .await
        .map_err(|e| ClientError::Criu(format!("cannot run {}: {e}", criu.path.display())))?;
    let dump_seconds = t.elapsed().as_secs_f64();
    if !status.status.success() {
        return Err(criu::failure(
            "dump",
            &dir.join("dump.log"),
            &String::from_utf8_lossy(&status.stderr),
        ));
    }
    // The tasks are released; the push can take its time.
    let uploader = Uploader::begin(
        remote,
        &reference.repository,
        ChunkerConfig::default(),
        progress.clone(),
    )
    .await?;
    let mut layer = Layer {
        kind: LayerKind::Process,
        name: None,
        rank: None,
        files: Vec::new(),
    };
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .map_err(|e| ClientError::io(format!("listing {}", dir.display()), e))?
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".img"))
        .collect();
    names.sort();
    for name in &names {
        let path = dir.join(name);
        let f = std::fs::File::open(&path)
            .map_err(|e| ClientError::io(format!("opening {}", path.display()), e))?;
        let aligned = uploader.config().is_page_aligned(name);
        let extents = match uploader.chunk_stream(f, aligned).await {
            Ok(x) => x,
            Err(e) => return Err(kept_note(uploader.abort().await.unwrap_or(e), &dir)),
        };
        layer.files.push(File {
            path: name.clone(),
            size: extents.iter().map(Extent::len).sum(),
            mode: 0o600,
            extents,
        });
    }
    let process_bytes = layer.files.iter().map(|f| f.size).sum();
    let manifest = build_manifest(&uploader, vec![layer.clone()], opts, facts);
    let digest = uploader
        .commit(&reference.repository, &manifest, vec![tag.to_string()])
        .await
        .map_err(|e| kept_note(e, &dir))?;
    // Uploaded: the images go, the log and stats stay for the report.
    for name in &names {
        let _ = std::fs::remove_file(dir.join(name));
    }
    Ok(Dumped {
        files: layer.files.len(),
        dir,
        dump_seconds,
        digest,
        process_bytes,
        weights_bytes: 0,
    })
}

fn kept_note(e: ClientError, dir: &Path) -> ClientError {
    ClientError::Registry(format!(
        "{e}; the images are kept in {} — push them with `snapctl push {} REF`",
        dir.display(),
        dir.display()
    ))
}

struct CapturedFile {
    name: String,
    pipe: std::fs::File,
}

/// Reads CRIU's requests on the capture socket; hands each file's pipe to `tx`.
/// `idle` is true while the thread waits for the next request.
fn capture_loop(
    mut sock: UnixStream,
    tx: mpsc::UnboundedSender<CapturedFile>,
    idle: Arc<AtomicBool>,
) -> std::io::Result<()> {
    loop {
        idle.store(true, Ordering::SeqCst);
        let Some(name) = criu_stream::read_request(&mut sock)? else {
            return Ok(());
        };
        idle.store(false, Ordering::SeqCst);
        let fd = criu_stream::recv_fd(&sock)?;
        if tx
            .send(CapturedFile {
                name,
                pipe: std::fs::File::from(fd),
            })
            .is_err()
        {
            return Ok(());
        }
    }
}

type FileTasks = JoinSet<Result<(String, Vec<Extent>)>>;

/// Starts chunking and uploading one captured file, remembering CRIU's order.
fn capture_file(
    uploader: &Arc<Uploader>,
    files: &mut FileTasks,
    order: &mut Vec<String>,
    pagemaps: &Pagemaps,
    f: CapturedFile,
) {
    order.push(f.name.clone());
    let up = uploader.clone();
    let keep = (f.name.starts_with("pagemap-") && !f.name.starts_with("pagemap-shmem-"))
        .then(|| pagemaps.clone());
    files.spawn(async move {
        let aligned = up.config().is_page_aligned(&f.name);
        let extents = match keep {
            // Kept in memory as well (a few KB): device-memory segments need them.
            Some(pagemaps) => {
                let reader = Tee {
                    inner: f.pipe,
                    copy: Vec::new(),
                    name: f.name.clone(),
                    into: pagemaps,
                };
                up.chunk_stream(reader, aligned).await?
            }
            None => up.chunk_stream(f.pipe, aligned).await?,
        };
        Ok((f.name, extents))
    });
}

/// Pagemap images captured during the dump, by name.
type Pagemaps = Arc<std::sync::Mutex<std::collections::HashMap<String, Vec<u8>>>>;

/// A reader that keeps a copy of what it reads, stored under `name` at the end.
struct Tee {
    inner: std::fs::File,
    copy: Vec<u8>,
    name: String,
    into: Pagemaps,
}

impl std::io::Read for Tee {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.copy.extend_from_slice(&buf[..n]);
        if n == 0 {
            self.into
                .lock()
                .unwrap()
                .insert(self.name.clone(), std::mem::take(&mut self.copy));
        }
        Ok(n)
    }
}

/// Bytes CRIU sent on the socket that the capture thread has not read yet.
fn pending_bytes(sock: &UnixStream) -> usize {
    use std::os::fd::AsRawFd;
    let mut n: libc::c_int = 0;
    unsafe { libc::ioctl(sock.as_raw_fd(), libc::FIONREAD, &mut n) };
    n.max(0) as usize
}

async fn streamed(
    remote: &Remote,
    criu: &Criu,
    reference: &Reference,
    opts: &CheckpointOptions,
    tag: &str,
    facts: &TreeFacts,
    progress: Progress,
) -> Result<Dumped> {
    let dir = work_dir("ck")?;
    let listener = criu_stream::bind(&dir, criu_stream::CAPTURE_SOCKET)
        .map_err(|e| ClientError::io("binding the streamer socket", e))?;
    let mut actions = ActionServer::bind(&dir.join("action.sock"))
        .map_err(|e| ClientError::io("binding the action socket", e))?;
    let uploader = Uploader::begin(
        remote,
        &reference.repository,
        ChunkerConfig::default(),
        progress.clone(),
    )
    .await?;
    let uploader = Arc::new(uploader);
    // The weights do not change while the worker is quiesced: upload them from now,
    // alongside the dump.
    let mut weights_task = facts
        .weights
        .clone()
        .map(|plan| tokio::spawn(weights::upload_layer(plan, uploader.clone())));

    let t = Instant::now();
    let (child, sock) = match criu::start_streaming(
        criu,
        &dump_args(opts, &dir),
        &listener,
        &dir.join("action.sock"),
        &dir.join("dump.log"),
    )
    .await
    {
        Ok(started) => started,
        Err(e) => {
            uploader.abort().await;
            return Err(e);
        }
    };
    let shutdown_handle = sock
        .try_clone()
        .map_err(|e| ClientError::io("streamer socket", e))?;
    let probe_handle = sock
        .try_clone()
        .map_err(|e| ClientError::io("streamer socket", e))?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let idle = Arc::new(AtomicBool::new(false));
    let idle2 = idle.clone();
    let capture = tokio::task::spawn_blocking(move || capture_loop(sock, tx, idle2));

    let criu_pid = child.id().unwrap_or(0);
    let pagemaps: Pagemaps = Arc::default();
    let work = async {
        let mut files: FileTasks = JoinSet::new();
        let mut order: Vec<String> = Vec::new();
        let mut stream_done = false;
        loop {
            tokio::select! {
                f = rx.recv(), if !stream_done => match f {
                    Some(f) => capture_file(&uploader, &mut files, &mut order, &pagemaps, f),
                    // CRIU may close the stream just before it runs post-dump: wait for
                    // the script, unless CRIU exits (a failed dump) first.
                    None => stream_done = true,
                },
                () = tokio::time::sleep(Duration::from_millis(20)), if stream_done => {
                    if has_exited(criu_pid) {
                        return Err(ClientError::Criu("CRIU exited before post-dump".into()));
                    }
                }
                Some(req) = actions.next() => {
                    if req.action != "post-dump" {
                        req.answer(Ok(())).await;
                        continue;
                    }
                    // Every image is written: wait until each request is taken and
                    // each pipe drained, then commit.
                    while !(idle.load(Ordering::SeqCst) && pending_bytes(&probe_handle) == 0 && rx.is_empty()) {
                        if let Ok(f) = rx.try_recv() {
                            capture_file(&uploader, &mut files, &mut order, &pagemaps, f);
                        }
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    let mut layer = Layer { kind: LayerKind::Process, name: None, rank: None, files: Vec::new() };
                    let mut done = std::collections::HashMap::new();
                    let mut failed = None;
                    while let Some(r) = files.join_next().await {
                        match r.map_err(|e| ClientError::Registry(e.to_string())).and_then(|r| r) {
                            Ok((name, extents)) => { done.insert(name, extents); }
                            Err(e) => { failed.get_or_insert(e); }
                        }
                    }
                    let mut layers = Vec::new();
                    if let Some(task) = weights_task.take() {
                        match task.await.map_err(|e| ClientError::Weights(e.to_string())).and_then(|r| r) {
                            Ok(l) => layers.push(l),
                            Err(e) => { failed.get_or_insert(e); }
                        }
                    }
                    let commit = match failed {
                        Some(e) => Err(e),
                        None => {
                            for name in &order {
                                let extents = done.remove(name).unwrap_or_default();
                                layer.files.push(File { path: name.clone(), size: extents.iter().map(Extent::len).sum(), mode: 0o600, extents });
                            }
                            layers.insert(0, layer.clone());
                            let mut manifest = build_manifest(&uploader, layers.clone(), opts, facts);
                            manifest.device_memory = crate::device_memory::manifest_segments(
                                &facts.device_ranges,
                                &pagemaps.lock().unwrap(),
                            );
                            uploader.commit(&reference.repository, &manifest, vec![tag.to_string()]).await
                        }
                    };
                    match commit {
                        Ok(d) => {
                            req.answer(Ok(())).await;
                            return Ok((order.len(), d, layer_bytes(&layers, LayerKind::Process), layer_bytes(&layers, LayerKind::Weights)));
                        }
                        Err(e) => {
                            req.answer(Err(e.to_string())).await;
                            return Err(e);
                        }
                    }
                }
            }
        }
    };
    let watchdog = watch_progress(progress.clone(), opts.stall_timeout);
    let outcome: Result<(usize, snapreg_proto::Digest, u64, u64)> = tokio::select! {
        r = work => r,
        () = watchdog => Err(ClientError::Aborted(format!(
            "no progress for {:?} (registry stalled?): the dump was aborted and PID {} released",
            opts.stall_timeout, opts.pid
        ))),
    };
    // Whatever happened, CRIU must not wait on us: close its socket; dropped tasks
    // closed the pipes.
    let _ = shutdown_handle.shutdown(std::net::Shutdown::Both);
    drop(rx);
    let out = match tokio::time::timeout(Duration::from_secs(60), child.wait_with_output()).await {
        Ok(r) => r.map_err(|e| ClientError::io("waiting for CRIU", e))?,
        Err(_) => {
            return Err(ClientError::Criu(format!(
                "CRIU did not exit within 60 s; see {}",
                dir.join("dump.log").display()
            )))
        }
    };
    let _ = capture.await;
    let dump_seconds = t.elapsed().as_secs_f64();
    match outcome {
        Ok((files, digest, process_bytes, weights_bytes)) if out.status.success() => Ok(Dumped {
            files,
            dir,
            dump_seconds,
            digest,
            process_bytes,
            weights_bytes,
        }),
        Ok((_, digest, ..)) => Err(ClientError::Criu(format!(
            "the snapshot {digest} was committed but CRIU then failed: {}",
            criu::failure(
                "dump",
                &dir.join("dump.log"),
                &String::from_utf8_lossy(&out.stderr)
            )
        ))),
        Err(e) => {
            let criu_side = criu::failure(
                "dump",
                &dir.join("dump.log"),
                &String::from_utf8_lossy(&out.stderr),
            );
            match e {
                // CRIU's own failure: its log says why.
                ClientError::Criu(_) => Err(criu_side),
                e => Err(ClientError::Aborted(format!(
                    "{e}; PID {} keeps running\n{criu_side}",
                    opts.pid
                ))),
            }
        }
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

/// Whether a child has exited (gone, or a zombie not yet reaped).
fn has_exited(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| {
        s.rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

/// Resolves when neither bytes from CRIU nor bytes to the registry moved for `limit`.
async fn watch_progress(progress: Progress, limit: Duration) {
    let mut last = (u64::MAX, u64::MAX);
    let mut since = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let c = progress.counters.snapshot();
        let now = (c.bytes_total, c.bytes_transferred + c.chunks_total);
        if now != last {
            last = now;
            since = Instant::now();
        } else if since.elapsed() >= limit {
            return;
        }
    }
}
