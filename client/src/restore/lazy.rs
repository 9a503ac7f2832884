//! `pull-restore --lazy`: the tree resumes before its memory is all back
//! ([`crate::lazy_pages`] has the protocol). Around the usual stages:
//!
//! ```text
//! plan ─▶ small files fetched; pagemaps rewritten (lazy runs PE_LAZY only); the images
//!         the daemon reads written to <dir>/lazy
//!      ─▶ criu lazy-pages started on a socketpair to snapctl; waits until it listens
//!      ─▶ criu restore --stream --lazy-pages: every eager byte streamed and verified,
//!         post-restore "ok", the tree resumes           ◀── first answer possible here
//!      ─▶ the page server answers the daemon's faults and background fill from the
//!         chunk stack (verified, through the restore's scheduler; the read-ahead puts
//!         the rest in the node cache meanwhile)
//!      ─▶ the daemon closes when every page is in       ◀── all pages present
//! ```
//!
//! A page that cannot be served whole and verified, or a daemon that dies, would leave
//! the tree reading zeros: the tree is killed instead and the restore fails, naming why.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::{StreamExt, TryStreamExt};
use snapreg_proto::manifest::Extent;
use snapreg_proto::Digest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::task::JoinHandle;

use super::plan::{file_bytes, Plan};
use crate::criu::Criu;
use crate::error::{ClientError, Result};
use crate::fetch::{Chunks, Priority};
use crate::lazy_pages::{self, Iov, LazyPlan, LazyTask, IOV_LEN, PAGE};
use crate::progress::Progress;
use crate::zero_pages::{self, ZeroPagePlan};

/// Small image files fetched at once before the daemon starts.
const SMALL_FILES_AT_ONCE: usize = 16;
/// How long the daemon may take to start listening.
const DAEMON_START: Duration = Duration::from_secs(30);
/// Answers the page server prepares ahead of the one being written.
const ANSWERS_AHEAD: usize = 8;
/// Chunks the page server keeps decoded: a background request of up to 4 MiB reads
/// a few chunks, and the next request continues in the last of them.
const CHUNKS_KEPT: usize = 16;

/// What the lazy part of a restore did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct LazyReport {
    /// Bytes of pages left to the page server instead of CRIU's pipe.
    pub lazy_bytes: u64,
    /// Requests the daemon made; of them, single pages (mostly the tree's faults).
    pub requests: u64,
    pub single_page_requests: u64,
    pub bytes_served: u64,
    /// From the command's start until every lazy page was in the tree.
    pub all_present_seconds: f64,
}

/// A lazy restore under way: its plan and its daemon.
pub(super) struct Lazy {
    pub plan: LazyPlan,
    pub daemon: LazyDaemon,
}

/// Checks the kernel, plans, writes the daemon's images and starts it: call before
/// `criu restore`, whose arguments then take `--lazy-pages`.
pub(super) async fn begin(
    criu: &Criu,
    plan: &Plan,
    zero_plan: &ZeroPagePlan,
    chunks: &Chunks,
    dir: &Path,
    progress: &Progress,
) -> Result<Lazy> {
    check_kernel(criu).await?;
    let lazy = prepare(plan, zero_plan, chunks, dir).await?;
    tracing::info!(bytes = lazy.lazy_bytes, "pages left to the page server");
    let daemon = LazyDaemon::start(criu, dir, &lazy, &plan.files, chunks, progress).await?;
    Ok(Lazy { plan: lazy, daemon })
}

/// Refuses a kernel without the userfaultfd features a lazy restore needs (without
/// them a child forked after the restore would read zeros where pages are missing).
async fn check_kernel(criu: &Criu) -> Result<()> {
    let out = tokio::process::Command::new(&criu.path)
        .args(["check", "--feature", "uffd-noncoop"])
        .output()
        .await
        .map_err(|e| ClientError::io("running criu check", e))?;
    if out.status.success() {
        return Ok(());
    }
    Err(ClientError::Usage(format!(
        "--lazy needs userfaultfd with non-cooperative events, which this kernel or CRIU lacks ({}); restore without --lazy",
        String::from_utf8_lossy(&out.stdout).trim()
    )))
}

/// Fetches the small files, plans which pages are lazy (over the zero-page plan's
/// pagemaps, when it rewrote them) and writes the images the daemon reads into
/// `<dir>/lazy`.
async fn prepare(
    plan: &Plan,
    zero_plan: &ZeroPagePlan,
    chunks: &Chunks,
    dir: &Path,
) -> Result<LazyPlan> {
    let images = dir.join("lazy");
    std::fs::create_dir_all(&images).map_err(|e| ClientError::io("creating the lazy dir", e))?;
    // The small files, fetched together (CRIU and the daemon wait on them).
    let small: Vec<(String, Bytes)> = futures::stream::iter(
        plan.files
            .iter()
            .filter(|(name, _)| !name.starts_with("pages-")),
    )
    .map(|(name, extents)| async move {
        Ok::<_, ClientError>((name.clone(), file_bytes(chunks, name, extents).await?))
    })
    .buffer_unordered(SMALL_FILES_AT_ONCE)
    .try_collect()
    .await?;
    let (mut pagemaps, mut eager) = (HashMap::new(), lazy_pages::Eager::new());
    for (name, bytes) in small {
        if lazy_pages::task_pagemap_pid(&name).is_some() {
            device_memory_addresses(plan, &bytes, &mut eager);
            let served = zero_plan.pagemaps.get(&name).cloned().unwrap_or(bytes);
            pagemaps.insert(name, served);
        } else {
            write(&images, &name, &bytes)?;
        }
    }
    let lazy = lazy_pages::plan(&plan.files, &pagemaps, &eager).map_err(|why| {
        ClientError::Usage(format!(
            "this snapshot cannot be restored lazily: {why}; restore without --lazy"
        ))
    })?;
    for (name, bytes) in &lazy.pagemaps {
        write(&images, name, bytes)?;
    }
    Ok(lazy)
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    std::fs::write(dir.join(name), bytes)
        .map_err(|e| ClientError::io(format!("writing {name} for the lazy-pages daemon"), e))
}

/// The device memory of a CUDA image in the task whose original pagemap is
/// `pagemap`, as dump-time addresses by pages file: served eagerly. (Addresses, not
/// file offsets: the zero-page plan may have cut the pages file since.)
fn device_memory_addresses(plan: &Plan, pagemap: &[u8], eager: &mut lazy_pages::Eager) {
    let Some((pages_id, runs)) = zero_pages::page_runs(pagemap) else {
        return;
    };
    let file = format!("pages-{pages_id}.img");
    for seg in plan
        .manifest
        .device_memory
        .iter()
        .filter(|s| s.file == file)
    {
        let (s, t) = (seg.offset, seg.offset + seg.len);
        for &(vaddr, len, off) in &runs {
            let (a, b) = (s.max(off), t.min(off + len));
            if a < b {
                eager
                    .entry(file.clone())
                    .or_default()
                    .push((vaddr + (a - off), vaddr + (b - off)));
            }
        }
    }
}

/// The running daemon and the page server answering it.
pub(super) struct LazyDaemon {
    daemon: tokio::process::Child,
    server: JoinHandle<Result<Served>>,
    log: PathBuf,
    pids: Vec<u64>,
}

#[derive(Default)]
struct Served {
    requests: u64,
    single_page_requests: u64,
    bytes: u64,
}

impl LazyDaemon {
    /// Starts `criu lazy-pages` with images in `<dir>/lazy`, its work dir `dir` (where
    /// `criu restore` looks for its socket), and its page server on a socketpair to a
    /// task of snapctl serving `lazy`'s runs; returns once the daemon listens.
    pub async fn start(
        criu: &Criu,
        dir: &Path,
        lazy: &LazyPlan,
        files: &HashMap<String, Vec<Extent>>,
        chunks: &Chunks,
        progress: &Progress,
    ) -> Result<LazyDaemon> {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()
            .map_err(|e| ClientError::io("socketpair for the page server", e))?;
        let (status_rd, status_wr) =
            nix::unistd::pipe().map_err(|e| ClientError::io("status pipe", e.into()))?;
        let log = dir.join("lazy-pages.log");
        let mut cmd = tokio::process::Command::new(&criu.path);
        cmd.arg("lazy-pages")
            .arg("-D")
            .arg(dir.join("lazy"))
            .arg("-W")
            .arg(dir)
            .args(["--page-server", "--ps-socket", "3", "--status-fd", "4"])
            .args(["-o", "lazy-pages.log", "-v4"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true);
        let fds = [OwnedFd::from(theirs), status_wr];
        let raw = [fds[0].as_raw_fd(), fds[1].as_raw_fd()];
        // SAFETY: between fork and exec the closure only calls fcntl and dup2, which
        // are async-signal-safe, and allocates nothing. Both fds are first moved above
        // 10 so that placing one on 3 or 4 cannot close the other.
        unsafe {
            cmd.pre_exec(move || {
                let mut high = [0; 2];
                for (h, fd) in high.iter_mut().zip(raw) {
                    *h = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10);
                    if *h < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                for (target, fd) in [3, 4].into_iter().zip(high) {
                    if libc::dup2(fd, target) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let mut daemon = cmd
            .spawn()
            .map_err(|e| ClientError::io("starting criu lazy-pages", e))?;
        drop(fds);
        wait_ready(&mut daemon, status_rd, &log).await?;
        ours.set_nonblocking(true)
            .map_err(|e| ClientError::io("page server socket", e))?;
        let sock =
            UnixStream::from_std(ours).map_err(|e| ClientError::io("page server socket", e))?;
        let pages = PageSource::new(lazy, files, chunks.at(Priority::Demand));
        let pids: Vec<u64> = lazy.tasks.keys().copied().collect();
        let server = {
            let (pids, progress) = (pids.clone(), progress.clone());
            tokio::spawn(async move {
                let served = serve(sock, pages, progress).await;
                if served.is_err() {
                    // At once: a resumed tree must not run on until `finish`.
                    kill_tree(&pids);
                }
                served
            })
        };
        Ok(LazyDaemon {
            daemon,
            server,
            log,
            pids,
        })
    }

    /// CRIU's restore failed: the daemon has nothing to wait for.
    pub async fn abort(mut self) {
        let _ = self.daemon.kill().await;
        self.server.abort();
    }

    /// Waits until every lazy page is in the tree. If the pages cannot all come back,
    /// kills the tree (it would read zeros) and fails.
    pub async fn finish(mut self, lazy_bytes: u64, started: Instant) -> Result<LazyReport> {
        let served = match (&mut self.server).await {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(e)) => Err(e),
            Err(e) => Err(ClientError::io("page server", std::io::Error::other(e))),
        };
        let status = tokio::time::timeout(Duration::from_secs(30), self.daemon.wait()).await;
        let daemon_ok = matches!(status, Ok(Ok(s)) if s.success());
        match served {
            Ok(s) if daemon_ok => Ok(LazyReport {
                lazy_bytes,
                requests: s.requests,
                single_page_requests: s.single_page_requests,
                bytes_served: s.bytes,
                all_present_seconds: started.elapsed().as_secs_f64(),
            }),
            other => {
                let _ = self.daemon.kill().await;
                kill_tree(&self.pids);
                let why = match other {
                    Err(e) => e.to_string(),
                    Ok(_) => format!("criu lazy-pages failed: {}", log_tail(&self.log)),
                };
                Err(ClientError::Criu(format!(
                    "lazy restore: not every page came back ({why}); the restored tree was killed rather than left reading zeros. Restore again, or without --lazy"
                )))
            }
        }
    }
}

async fn wait_ready(daemon: &mut tokio::process::Child, status: OwnedFd, log: &Path) -> Result<()> {
    let read = tokio::task::spawn_blocking(move || {
        let mut byte = [0u8; 1];
        nix::unistd::read(&status, &mut byte)
    });
    tokio::select! {
        r = tokio::time::timeout(DAEMON_START, read) => match r {
            Ok(Ok(Ok(1))) => Ok(()),
            _ => {
                let _ = daemon.kill().await;
                Err(ClientError::Criu(format!(
                    "criu lazy-pages did not start: {}",
                    log_tail(log)
                )))
            }
        },
        s = daemon.wait() => Err(ClientError::Criu(format!(
            "criu lazy-pages exited at start ({}): {}",
            s.map(|s| s.to_string()).unwrap_or_default(),
            log_tail(log)
        ))),
    }
}

fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let errors: Vec<&str> = text.lines().filter(|l| l.contains("Error")).collect();
    let lines = if errors.is_empty() {
        text.lines().rev().take(3).collect::<Vec<_>>()
    } else {
        errors.into_iter().rev().take(3).collect()
    };
    format!("{} (log: {})", lines.join(" | "), log.display())
}

fn kill_tree(pids: &[u64]) {
    for &pid in pids {
        if let Ok(pid) = i32::try_from(pid) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Lazy pages by task, read from the chunk stack.
struct PageSource {
    tasks: HashMap<u64, LazyTask>,
    /// Each pages file's extents with their offsets.
    files: HashMap<Arc<str>, Vec<(u64, Extent)>>,
    chunks: Chunks,
    kept: Mutex<std::collections::VecDeque<(Digest, Bytes)>>,
}

impl PageSource {
    fn new(lazy: &LazyPlan, files: &HashMap<String, Vec<Extent>>, chunks: Chunks) -> Arc<Self> {
        let mut by_file = HashMap::new();
        for task in lazy.tasks.values() {
            let extents = files
                .get(&*task.pages_file)
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            let mut off = 0;
            let placed: Vec<(u64, Extent)> = extents
                .iter()
                .map(|e| {
                    let at = off;
                    off += e.len();
                    (at, *e)
                })
                .collect();
            by_file.insert(task.pages_file.clone(), placed);
        }
        Arc::new(PageSource {
            tasks: lazy.tasks.clone(),
            files: by_file,
            chunks,
            kept: Mutex::default(),
        })
    }

    /// The answer to one GET: its header and pages.
    async fn answer(&self, iov: Iov) -> Result<(Iov, Bytes)> {
        let bad = |what: String| ClientError::Criu(format!("lazy-pages daemon asked {what}"));
        if iov.cmd != lazy_pages::PS_IOV_GET {
            return Err(bad(format!("command {:#x}", iov.cmd)));
        }
        let task = self
            .tasks
            .get(&iov.dst_id)
            .ok_or_else(|| bad(format!("for task {}, not in the image", iov.dst_id)))?;
        let (offset, pages) = task.locate(iov.vaddr, iov.nr_pages).ok_or_else(|| {
            bad(format!(
                "for {} pages at {:#x} of task {}, not a lazy run",
                iov.nr_pages, iov.vaddr, iov.dst_id
            ))
        })?;
        let bytes = self.read(&task.pages_file, offset, pages * PAGE).await?;
        Ok((iov.reply(pages), bytes))
    }

    /// `len` bytes of `file` from `offset`, chunk by chunk.
    async fn read(&self, file: &Arc<str>, offset: u64, len: u64) -> Result<Bytes> {
        let extents = &self.files[file];
        let end = offset + len;
        let first = extents
            .partition_point(|(at, _)| *at <= offset)
            .saturating_sub(1);
        let mut out = BytesMut::with_capacity(len as usize);
        for &(at, extent) in &extents[first..] {
            if at >= end {
                break;
            }
            let (s, t) = (offset.max(at) - at, end.min(at + extent.len()) - at);
            if s >= t {
                continue;
            }
            match extent {
                Extent::Zero { .. } => out.resize(out.len() + (t - s) as usize, 0),
                Extent::Chunk { chunk, .. } => {
                    let bytes = self.chunk(chunk, file).await?;
                    out.extend_from_slice(&bytes[s as usize..t as usize]);
                }
            }
        }
        if out.len() as u64 != len {
            return Err(ClientError::Criu(format!(
                "{file}: {len} bytes at {offset} lie beyond its end"
            )));
        }
        Ok(out.freeze())
    }

    async fn chunk(&self, digest: Digest, file: &str) -> Result<Bytes> {
        if let Some((_, b)) = self.kept.lock().unwrap().iter().find(|(d, _)| *d == digest) {
            return Ok(b.clone());
        }
        let bytes = self.chunks.get(digest, file).await?;
        let mut kept = self.kept.lock().unwrap();
        if kept.len() == CHUNKS_KEPT {
            kept.pop_front();
        }
        kept.push_back((digest, bytes.clone()));
        Ok(bytes)
    }
}

/// The page server: requests read as they come, answered strictly in order, up to
/// [`ANSWERS_AHEAD`] prepared at once; ends on the daemon's close, answered with 0.
async fn serve(sock: UnixStream, pages: Arc<PageSource>, progress: Progress) -> Result<Served> {
    let (mut rd, mut wr) = sock.into_split();
    let requests = futures::stream::unfold(&mut rd, |rd| async move {
        let mut buf = [0u8; IOV_LEN];
        match rd.read_exact(&mut buf).await {
            Ok(_) => {
                let iov = Iov::decode(&buf);
                let closing = iov.cmd == lazy_pages::PS_IOV_CLOSE
                    || iov.cmd == lazy_pages::PS_IOV_FORCE_CLOSE;
                (!closing).then_some((Ok(iov), rd))
            }
            Err(e) => Some((Err(e), rd)),
        }
    });
    let mut answers = requests
        .map(|r| {
            let pages = pages.clone();
            async move {
                let iov = r.map_err(|e| ClientError::io("reading the lazy-pages daemon", e))?;
                pages.answer(iov).await
            }
        })
        .buffered(ANSWERS_AHEAD)
        .boxed();
    let mut served = Served::default();
    while let Some(answer) = answers.next().await {
        let (header, bytes) = answer?;
        wr.write_all(&header.encode())
            .await
            .map_err(|e| ClientError::io("answering the lazy-pages daemon", e))?;
        wr.write_all(&bytes)
            .await
            .map_err(|e| ClientError::io("answering the lazy-pages daemon", e))?;
        served.requests += 1;
        served.single_page_requests += u64::from(header.nr_pages == 1);
        served.bytes += bytes.len() as u64;
        progress.advance(bytes.len() as u64);
        progress
            .counters
            .bytes_total
            .fetch_add(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
    }
    drop(answers);
    wr.write_all(&0i32.to_ne_bytes())
        .await
        .map_err(|e| ClientError::io("closing the lazy-pages session", e))?;
    let mut rest = Vec::new();
    let _ = rd.read_to_end(&mut rest).await;
    Ok(served)
}
