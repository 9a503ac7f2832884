//! The streamed dump: `criu dump --stream` sends each image file through a pipe; one
//! task per file chunks and uploads it as it arrives; at post-dump (every image
//! written, the tasks still frozen) the manifest is committed, and only then does
//! CRIU hear "ok".

use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use snapreg_proto::manifest::{Extent, File, Layer, LayerKind};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::plan::{build_manifest, dump_args, OpenFiles};
use super::{layer_bytes, DumpJob, Dumped};
use crate::action::ActionServer;
use crate::chunker::ChunkerConfig;
use crate::criu;
use crate::criu_stream;
use crate::error::{ClientError, Result};
use crate::progress::Progress;
use crate::push::Uploader;
use crate::weights;
use crate::written_files::{self, CaptureReport};

struct CapturedFile {
    name: String,
    pipe: std::fs::File,
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
    // SAFETY: FIONREAD writes one c_int through the pointer, which points at `n`;
    // the fd is open for the call (borrowed from `sock`).
    unsafe { libc::ioctl(sock.as_raw_fd(), libc::FIONREAD, &mut n) };
    n.max(0) as usize
}

/// Files captured so far: the chunking tasks, and CRIU's order of the files.
struct Captured {
    tasks: FileTasks,
    order: Vec<String>,
    uploader: Arc<Uploader>,
    pagemaps: Pagemaps,
}

impl Captured {
    fn take(&mut self, (name, fd): (String, std::os::fd::OwnedFd)) {
        let f = CapturedFile {
            name,
            pipe: std::fs::File::from(fd),
        };
        capture_file(
            &self.uploader,
            &mut self.tasks,
            &mut self.order,
            &self.pagemaps,
            f,
        );
    }
}

/// What a committed dump reports: files, digest, process and weights bytes, and what
/// became of the files the tree writes.
type Committed = (usize, snapreg_proto::Digest, u64, u64, CaptureReport);

pub(super) async fn dump_streaming(job: &DumpJob<'_>) -> Result<Dumped> {
    let dir = crate::work_dir::create("ck")?;
    let listener = criu_stream::bind(&dir, criu_stream::CAPTURE_SOCKET)
        .map_err(|e| ClientError::io("binding the streamer socket", e))?;
    let mut actions = ActionServer::bind(&dir.join("action.sock"))
        .map_err(|e| ClientError::io("binding the action socket", e))?;
    let uploader = Arc::new(
        Uploader::begin(
            job.remote,
            &job.reference.repository,
            ChunkerConfig::default(),
            job.progress.clone(),
        )
        .await?,
    );
    // The weights do not change while the worker is quiesced: upload them from now,
    // alongside the dump.
    let mut weights_task = job
        .facts
        .weights
        .clone()
        .map(|plan| tokio::spawn(weights::upload_layer(plan, uploader.clone())));

    let t = Instant::now();
    let (child, sock) = match criu::start_streaming(
        job.criu,
        &dump_args(job.opts, &dir),
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
    let clone = || {
        sock.try_clone()
            .map_err(|e| ClientError::io("streamer socket", e))
    };
    let (shutdown_handle, probe_handle) = (clone()?, clone()?);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let idle = Arc::new(AtomicBool::new(false));
    let idle2 = idle.clone();
    let capture =
        tokio::task::spawn_blocking(move || criu_stream::capture_requests(sock, tx, &idle2));

    let criu_pid = child.id().unwrap_or(0);
    let mut captured = Captured {
        tasks: JoinSet::new(),
        order: Vec::new(),
        uploader,
        pagemaps: Arc::default(),
    };
    let work = async {
        let mut stream_done = false;
        loop {
            tokio::select! {
                f = rx.recv(), if !stream_done => match f {
                    Some(f) => captured.take(f),
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
                            captured.take(f);
                        }
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    let commit = commit(job, &mut captured, weights_task.take()).await;
                    req.answer(commit.as_ref().map(|_| ()).map_err(|e| e.to_string())).await;
                    return commit;
                }
            }
        }
    };
    let watchdog = watch_progress(job.progress.clone(), job.opts.stall_timeout);
    let outcome: Result<Committed> = tokio::select! {
        r = work => r,
        () = watchdog => Err(ClientError::Aborted(format!(
            "no progress for {:?} (registry stalled?): the dump was aborted and PID {} released",
            job.opts.stall_timeout, job.opts.pid
        ))),
    };
    // Whatever happened, CRIU must not wait on us: close its socket; dropped tasks
    // closed the pipes.
    let _ = shutdown_handle.shutdown(std::net::Shutdown::Both);
    drop(rx);
    let out = criu_exit(child, &dir).await?;
    let _ = capture.await;
    let dump_seconds = t.elapsed().as_secs_f64();
    let criu_side = || {
        criu::failure(
            "dump",
            &dir.join("dump.log"),
            &String::from_utf8_lossy(&out.stderr),
        )
    };
    match outcome {
        Ok((files, digest, process_bytes, weights_bytes, written_files))
            if out.status.success() =>
        {
            Ok(Dumped {
                files,
                dir,
                dump_seconds,
                digest,
                process_bytes,
                weights_bytes,
                written_files,
            })
        }
        Ok((_, digest, ..)) => Err(ClientError::Criu(format!(
            "the snapshot {digest} was committed but CRIU then failed: {}",
            criu_side()
        ))),
        // CRIU's own failure: its log says why.
        Err(ClientError::Criu(_)) => Err(criu_side()),
        Err(e) => Err(ClientError::Aborted(format!(
            "{e}; PID {} keeps running\n{}",
            job.opts.pid,
            criu_side()
        ))),
    }
}

/// At post-dump: waits for every file's chunks and the weights layer, then commits
/// the manifest. Nothing is visible unless every upload succeeded.
async fn commit(
    job: &DumpJob<'_>,
    captured: &mut Captured,
    weights_task: Option<tokio::task::JoinHandle<Result<Layer>>>,
) -> Result<Committed> {
    let mut done = std::collections::HashMap::new();
    let mut failed = None;
    while let Some(r) = captured.tasks.join_next().await {
        match r
            .map_err(|e| ClientError::Registry(e.to_string()))
            .and_then(|r| r)
        {
            Ok((name, extents)) => {
                done.insert(name, extents);
            }
            Err(e) => {
                failed.get_or_insert(e);
            }
        }
    }
    let mut layers = Vec::new();
    if let Some(task) = weights_task {
        match task
            .await
            .map_err(|e| ClientError::Weights(e.to_string()))
            .and_then(|r| r)
        {
            Ok(l) => layers.push(l),
            Err(e) => {
                failed.get_or_insert(e);
            }
        }
    }
    if let Some(e) = failed {
        return Err(e);
    }
    let mut layer = Layer {
        kind: LayerKind::Process,
        name: None,
        rank: None,
        files: Vec::new(),
    };
    for name in &captured.order {
        let extents = done.remove(name).unwrap_or_default();
        layer.files.push(File {
            path: name.clone(),
            size: extents.iter().map(Extent::len).sum(),
            mode: 0o600,
            extents,
        });
    }
    layers.insert(0, layer);
    // The tasks are frozen: the files they hold open now are those CRIU reopens, as
    // it recorded them.
    let open = OpenFiles::of_frozen_tree(&job.facts, job.opts.pid);
    let written = written_files::capture(
        &captured.uploader,
        &open.written,
        &job.opts.capture_files,
        None,
    )
    .await?;
    let mut manifest = build_manifest(
        &captured.uploader,
        layers.clone(),
        job.opts,
        &job.facts,
        &open,
    );
    written.record(&mut manifest);
    manifest.device_memory = crate::device_memory::manifest_segments(
        &job.facts.device_ranges,
        &captured.pagemaps.lock().unwrap(),
    );
    let digest = captured
        .uploader
        .commit(&job.reference.repository, &manifest, vec![job.tag.clone()])
        .await?;
    Ok((
        captured.order.len(),
        digest,
        layer_bytes(&layers, LayerKind::Process),
        layer_bytes(&layers, LayerKind::Weights),
        written.report,
    ))
}

/// CRIU's exit, bounded: it has its answer (or a closed socket) by now.
async fn criu_exit(
    child: tokio::process::Child,
    dir: &std::path::Path,
) -> Result<std::process::Output> {
    match tokio::time::timeout(Duration::from_secs(60), child.wait_with_output()).await {
        Ok(r) => r.map_err(|e| ClientError::io("waiting for CRIU", e)),
        Err(_) => Err(ClientError::Criu(format!(
            "CRIU did not exit within 60 s; see {}",
            dir.join("dump.log").display()
        ))),
    }
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
