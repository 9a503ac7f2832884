//! The lazy-pages daemon inside snapctl: CRIU hands it each task's userfaultfd
//! ([`crate::lazy_pages::socket`]); it answers page faults and fills every missing
//! piece from the chunk stack, many at once.
//!
//! ```text
//! event thread (std)  accepts CRIU; takes the uffds; then polls them all: reads faults
//!                     and events, applies events to each task's Missing, hands faults
//!                     on; notes "restore finished"; closes a task's uffd once it
//!                     misses nothing; ends when every uffd is closed
//! fault server        per fault: the missing piece around the page, from its chunk
//!                     (Demand priority), copied whole; a page not missing gets the
//!                     zero page (never dumped, or dropped since)
//! fillers (≥ 16)      after "restore finished": claim the lowest unclaimed piece
//!                     and the pieces after it from its chunk, device memory's
//!                     before the rest, fetch that chunk once (verified), copy the
//!                     pieces in; until nothing is missing
//! ```
//!
//! **Copies against events.** A task that drops memory (`madvise`, `munmap`) goes on
//! once the daemon has read the event, and a copy that lands after that puts dropped
//! bytes back. So every copy holds `events` shared from its check that the piece is
//! still missing until the copy returns, and the event thread holds it exclusively
//! while it reads and applies events: an event is never read between a check and its
//! copy, and a check after it sees the change. The kernel fails a copy with EAGAIN
//! while an event is unread; the copy lets go and checks again. `snapreg-bench
//! fill-events` measured the scheme: 0 of 600 rounds refilled a dropped page, against
//! 17–19 of 200 with the same tracking and no lock.
//!
//! Copies are ioctls of at most one chunk (512 KiB on average) made on the runtime's
//! threads, no await inside the shared hold.

use std::collections::VecDeque;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use snapreg_proto::Digest;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{LazyReport, Tree};
use crate::error::{ClientError, Result};
use crate::fetch::{Chunks, Priority};
use crate::lazy_pages::missing::{Missing, Piece, Source};
use crate::lazy_pages::LazyPlan;
use crate::lazy_pages::{socket, PAGE};
use crate::progress::Progress;
use crate::uffd::{self, Event};

/// How long the event thread waits in one poll.
const POLL_MS: i32 = 20;
/// The longest a restore may take to hand over its uffds and finish (bounds the
/// event thread's wait on CRIU; a failed restore stops it at once).
const CRIU_WAIT: Duration = Duration::from_secs(3600);
/// Tries a copy makes while events keep arriving (1 ms apart) before it fails.
const COPY_TRIES: usize = 10_000;
/// Decoded chunks kept for the next piece or fault in the same chunk.
const CHUNKS_KEPT: usize = 16;

/// The running daemon.
pub(in crate::restore) struct LazyDaemon {
    shared: Arc<Shared>,
    events: Option<std::thread::JoinHandle<Result<()>>>,
    work: JoinHandle<Result<()>>,
    pids: Vec<u64>,
    fillers: usize,
    device_memory_seconds: Option<f64>,
}

/// One task's uffd and what it misses; closed (None) once it misses nothing.
struct Slot {
    uffd: Option<Arc<OwnedFd>>,
    missing: Missing,
}

#[derive(Default)]
struct Counters {
    bytes_filled: AtomicU64,
    bytes_on_fault: AtomicU64,
    faults: AtomicU64,
    zero_faults: AtomicU64,
    forks: AtomicU64,
    remaps: AtomicU64,
    removes: AtomicU64,
    unmaps: AtomicU64,
    fetch_nanos: AtomicU64,
    fault_fetch_nanos: AtomicU64,
    copy_nanos: AtomicU64,
    fill_claims: AtomicU64,
    fill_pieces: AtomicU64,
}

struct Shared {
    /// Shared by every check-and-copy, exclusive while events are read and applied.
    events: RwLock<()>,
    slots: Mutex<Vec<Slot>>,
    /// CRIU said "restore finished": the fill may start.
    finished: tokio::sync::Notify,
    finished_flag: AtomicBool,
    /// When the fill began (after "restore finished") and when its last worker ended.
    fill_started: Mutex<Option<Instant>>,
    fill_ended: Mutex<Option<Instant>>,
    /// Every task's uffd closed after "restore finished": every page is in.
    all_in: AtomicBool,
    stop: AtomicBool,
    next_claim: AtomicU64,
    fill: Chunks,
    fill_first: Chunks,
    demand: Chunks,
    kept: Mutex<VecDeque<(Digest, Bytes)>>,
    counters: Counters,
    progress: Progress,
}

impl Shared {
    /// A worker failed: every other one stops now rather than wait for its piece.
    fn stop_on_error(&self, r: Result<()>) -> Result<()> {
        if r.is_err() {
            self.stop.store(true, Ordering::SeqCst);
        }
        r
    }

    /// `n` more bytes of the image are in the tree.
    fn copied(&self, n: u64) {
        self.progress.placed(n);
    }
}

impl LazyDaemon {
    /// Binds `<dir>/lazy-pages.socket` and starts serving; call before `criu restore
    /// --lazy-pages -W <dir>`.
    pub fn start(dir: &Path, tree: Tree, chunks: &Chunks, progress: &Progress) -> Result<Self> {
        let listener =
            socket::bind(dir).map_err(|e| ClientError::io("binding the lazy-pages socket", e))?;
        // A worker mostly waits on its fetch: 16 in flight filled a 2 GiB process
        // 0.4-0.5 s sooner than 4 on 2 cores (bench/RESULTS.md). At least as many
        // as the scheduler lets fetch at once, so a larger budget is used.
        let per_core = std::thread::available_parallelism().map_or(2, |n| n.get() * 2);
        let fillers = per_core
            .clamp(16, 64)
            .max(chunks.budget().map_or(0, |b| b.requests));
        let pids: Vec<u64> = tree.missing.keys().copied().collect();
        let shared = Arc::new(Shared {
            events: RwLock::new(()),
            slots: Mutex::new(Vec::new()),
            finished: tokio::sync::Notify::new(),
            finished_flag: AtomicBool::new(false),
            fill_started: Mutex::new(None),
            fill_ended: Mutex::new(None),
            all_in: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            next_claim: AtomicU64::new(1),
            fill: chunks.at(Priority::ReadAhead),
            fill_first: chunks.at(Priority::DeviceMemory),
            demand: chunks.at(Priority::Demand),
            kept: Mutex::default(),
            counters: Counters::default(),
            progress: progress.clone(),
        });
        let (faults_tx, faults_rx) = mpsc::unbounded_channel();
        let events = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("lazy-pages-events".into())
                .spawn(move || {
                    let ended = event_thread(&shared, &listener, tree, &faults_tx);
                    if ended.is_err() {
                        shared.stop.store(true, Ordering::SeqCst);
                    }
                    // Whatever ended it, nothing waits for "restore finished" now, and
                    // the fault server's channel closes with `faults_tx`.
                    shared.finished_flag.store(true, Ordering::SeqCst);
                    shared.finished.notify_waiters();
                    ended
                })
                .map_err(|e| ClientError::io("starting the lazy-pages event thread", e))?
        };
        let work = {
            let (shared, pids) = (shared.clone(), pids.clone());
            tokio::spawn(async move {
                let done = serve(&shared, faults_rx, fillers).await;
                if done.is_err() {
                    // At once: a resumed tree must not run on until `finish`.
                    shared.stop.store(true, Ordering::SeqCst);
                    kill_tree(&pids);
                }
                done
            })
        };
        Ok(LazyDaemon {
            shared,
            events: Some(events),
            work,
            pids,
            fillers,
            device_memory_seconds: None,
        })
    }

    /// Waits until nothing the fill puts in first (device memory) is missing; false if
    /// the daemon stopped before (`finish` says why). Notes when it was.
    pub async fn first_in(&mut self, started: Instant) -> bool {
        // Every uffd has arrived once CRIU said "restore finished".
        let in_ = until(&self.shared, |s| {
            s.finished_flag.load(Ordering::SeqCst) && !first_missing(s)
        })
        .await;
        if in_ {
            self.device_memory_seconds = Some(started.elapsed().as_secs_f64());
        }
        in_
    }

    /// What `--fill-first` holds CRIU's pre-resume on: resolves once every page is in.
    pub fn all_in(&self) -> AllIn {
        AllIn(self.shared.clone())
    }

    /// CRIU's restore failed: nothing is coming. The daemon's own failure, if it
    /// failed first (a page that did not verify, under `--fill-first` while CRIU held
    /// the tree: the cause of CRIU's failure, since the daemon killed the tree).
    pub async fn abort(mut self) -> Option<ClientError> {
        let failed_first = if self.work.is_finished() {
            match (&mut self.work).await {
                Ok(Err(e)) => Some(not_every_page(e)),
                _ => None,
            }
        } else {
            None
        };
        self.shared.stop.store(true, Ordering::SeqCst);
        self.work.abort();
        if let Some(t) = self.events.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        failed_first
    }

    /// Waits until every lazy page is in the tree. If the pages cannot all come back,
    /// kills the tree (it would read zeros) and fails.
    pub async fn finish(mut self, plan: &LazyPlan, started: Instant) -> Result<LazyReport> {
        let work = match (&mut self.work).await {
            Ok(r) => r,
            Err(e) => Err(ClientError::io(
                "lazy-pages daemon",
                std::io::Error::other(e),
            )),
        };
        if work.is_err() {
            self.shared.stop.store(true, Ordering::SeqCst);
        }
        let events = match self.events.take() {
            Some(t) => tokio::task::spawn_blocking(move || t.join())
                .await
                .map_err(|e| ClientError::io("lazy-pages events", std::io::Error::other(e)))?
                .unwrap_or_else(|_| {
                    Err(ClientError::Criu(
                        "the lazy-pages event thread panicked".into(),
                    ))
                }),
            None => Ok(()),
        };
        if let Err(e) = work.and(events) {
            kill_tree(&self.pids);
            return Err(not_every_page(e));
        }
        let c = &self.shared.counters;
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let since = |t: &Mutex<Option<Instant>>| {
            t.lock()
                .unwrap()
                .map(|t| t.saturating_duration_since(started).as_secs_f64())
        };
        Ok(LazyReport {
            lazy_bytes: plan.lazy_bytes,
            device_memory_bytes: plan.first_bytes,
            device_memory_seconds: self.device_memory_seconds,
            bytes_filled: n(&c.bytes_filled),
            bytes_on_fault: n(&c.bytes_on_fault),
            faults: n(&c.faults),
            zero_faults: n(&c.zero_faults),
            forks: n(&c.forks),
            remaps: n(&c.remaps),
            removes: n(&c.removes),
            unmaps: n(&c.unmaps),
            fillers: self.fillers,
            fill_started_seconds: since(&self.shared.fill_started),
            fill_ended_seconds: since(&self.shared.fill_ended),
            fill_fetch_seconds: n(&c.fetch_nanos) as f64 / 1e9,
            fault_fetch_seconds: n(&c.fault_fetch_nanos) as f64 / 1e9,
            fill_copy_seconds: n(&c.copy_nanos) as f64 / 1e9,
            fill_claims: n(&c.fill_claims),
            fill_pieces: n(&c.fill_pieces),
            all_present_seconds: started.elapsed().as_secs_f64(),
        })
    }
}

impl Drop for LazyDaemon {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
    }
}

/// The restore's error once the daemon could not put every page in (and killed the tree).
fn not_every_page(e: ClientError) -> ClientError {
    ClientError::TreeKilled { cause: Box::new(e) }
}

/// Every page in the tree, or the daemon stopped; see [`LazyDaemon::all_in`].
pub(in crate::restore) struct AllIn(Arc<Shared>);

impl AllIn {
    /// Waits until every task's uffd is closed with nothing missing (`Ok`), or the
    /// daemon stopped first (`Err`: it kills the tree, and `finish` says why).
    pub async fn wait(self) -> std::result::Result<(), String> {
        match until(&self.0, |s| s.all_in.load(Ordering::SeqCst)).await {
            true => Ok(()),
            false => Err("not every page came back before the resume".into()),
        }
    }
}

/// Polls until `done` holds (true) or the daemon stopped (false), bounded by
/// [`CRIU_WAIT`]; the fill ends (or stops) long before.
async fn until(shared: &Shared, done: impl Fn(&Shared) -> bool) -> bool {
    let deadline = Instant::now() + CRIU_WAIT;
    while Instant::now() < deadline {
        if shared.stop.load(Ordering::SeqCst) {
            return false;
        }
        if done(shared) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    false
}

/// SIGKILLs the restored tasks and every descendant they have now (a child forked
/// after the restore would read zeros too). Children are found before anyone dies:
/// a killed parent's children move to another parent.
fn kill_tree(pids: &[u64]) {
    let mut all: Vec<u64> = pids.to_vec();
    let mut i = 0;
    // Bounded: a pid is taken once, and a machine has finitely many.
    while i < all.len() && all.len() < 1 << 16 {
        for child in children(all[i]) {
            if !all.contains(&child) {
                all.push(child);
            }
        }
        i += 1;
    }
    for pid in all {
        if let Ok(pid) = i32::try_from(pid) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// The children of every thread of `pid` (`/proc/PID/task/TID/children`).
fn children(pid: u64) -> Vec<u64> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("children")).ok())
        .flat_map(|text| {
            text.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u64>>()
        })
        .collect()
}

type Fault = (usize, u64);

/// The event thread: CRIU's socket, then every task's uffd, until all are closed.
fn event_thread(
    shared: &Shared,
    listener: &UnixListener,
    mut tree: Tree,
    faults: &mpsc::UnboundedSender<Fault>,
) -> Result<()> {
    let deadline = Instant::now() + CRIU_WAIT;
    let go_on = || !shared.stop.load(Ordering::SeqCst) && Instant::now() < deadline;
    let criu = |e: std::io::Error| ClientError::Criu(format!("lazy-pages socket: {e}"));
    let mut conn = socket::accept(listener, deadline, go_on).map_err(criu)?;
    let taken = socket::take_uffds(&mut conn, tree.tasks, go_on).map_err(criu)?;
    {
        let mut slots = shared.slots.lock().unwrap();
        for t in taken {
            // A task with nothing lazy: its uffd closes at the first round below.
            let missing = tree.missing.remove(&t.pid).unwrap_or_else(Missing::none);
            slots.push(Slot {
                uffd: Some(Arc::new(t.uffd)),
                missing,
            });
        }
    }
    let mut finished = false;
    while go_on() {
        let open = close_complete(shared);
        if open.is_empty() && finished {
            shared.all_in.store(true, Ordering::SeqCst);
            return Ok(());
        }
        let mut fds: Vec<_> = open.iter().map(|(_, fd)| fd.as_fd()).collect();
        if !finished {
            fds.push(conn.as_fd());
        }
        for i in uffd::ready(&fds, POLL_MS) {
            if i == open.len() {
                socket::restore_finished(&mut conn, go_on).map_err(criu)?;
                finished = true;
                shared.finished_flag.store(true, Ordering::SeqCst);
                shared.finished.notify_waiters();
                continue;
            }
            let (slot, fd) = &open[i];
            for f in read_events(shared, *slot, fd)? {
                let _ = faults.send(f);
            }
        }
    }
    if shared.stop.load(Ordering::SeqCst) {
        return Ok(());
    }
    Err(ClientError::Criu(format!(
        "the lazy restore did not finish within {} s",
        CRIU_WAIT.as_secs()
    )))
}

/// Closes the uffd of every task that misses nothing (the kernel serves its faults
/// from then on); returns the open ones.
fn close_complete(shared: &Shared) -> Vec<(usize, Arc<OwnedFd>)> {
    let mut slots = shared.slots.lock().unwrap();
    let mut open = Vec::new();
    for (i, s) in slots.iter_mut().enumerate() {
        if s.missing.is_empty() {
            s.uffd = None;
        }
        if let Some(fd) = &s.uffd {
            open.push((i, fd.clone()));
        }
    }
    open
}

/// Reads everything waiting on one task's uffd under the exclusive hold, applies its
/// events, and returns its faults.
fn read_events(shared: &Shared, slot: usize, fd: &OwnedFd) -> Result<Vec<Fault>> {
    let _held = shared.events.write().unwrap();
    let mut faults = Vec::new();
    loop {
        let msgs = uffd::read(fd).map_err(|e| ClientError::io("reading a userfaultfd", e))?;
        if msgs.is_empty() {
            return Ok(faults);
        }
        let mut slots = shared.slots.lock().unwrap();
        let c = &shared.counters;
        for m in msgs {
            let missing = &mut slots[slot].missing;
            match m.into_event() {
                Event::PageFault(addr) => faults.push((slot, addr)),
                Event::Fork(child) => {
                    c.forks.fetch_add(1, Ordering::Relaxed);
                    let missing = missing.forked();
                    slots.push(Slot {
                        uffd: Some(Arc::new(child)),
                        missing,
                    });
                }
                Event::Remap { from, to, len } => {
                    c.remaps.fetch_add(1, Ordering::Relaxed);
                    missing.remap(from, to, len);
                }
                Event::Remove { start, end } => {
                    c.removes.fetch_add(1, Ordering::Relaxed);
                    missing.forget(start, end);
                }
                Event::Unmap { start, end } => {
                    c.unmaps.fetch_add(1, Ordering::Relaxed);
                    missing.forget(start, end);
                }
                Event::Unknown(e) => {
                    return Err(ClientError::Criu(format!(
                        "userfaultfd event {e:#x}, which the daemon did not ask for"
                    )))
                }
            }
        }
    }
}

/// The fault server and, after "restore finished", the fillers; until every piece is
/// in and the event thread has closed the fault channel.
async fn serve(
    shared: &Arc<Shared>,
    mut faults: mpsc::UnboundedReceiver<Fault>,
    fillers: usize,
) -> Result<()> {
    let fault_server = async {
        let mut running = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                f = faults.recv() => match f {
                    Some((slot, addr)) => {
                        let shared = shared.clone();
                        running.spawn(async move {
                            shared.stop_on_error(serve_fault(&shared, slot, addr).await)
                        });
                    }
                    None => break,
                },
                Some(done) = running.join_next() => flatten(done)?,
            }
        }
        while let Some(done) = running.join_next().await {
            flatten(done)?;
        }
        Ok::<_, ClientError>(())
    };
    let fill = async {
        let wait = shared.finished.notified();
        if !shared.finished_flag.load(Ordering::SeqCst) {
            wait.await;
        }
        *shared.fill_started.lock().unwrap() = Some(Instant::now());
        let workers = (0..fillers).map(|_| {
            let shared = shared.clone();
            tokio::spawn(async move { shared.stop_on_error(fill_worker(&shared).await) })
        });
        for w in futures::future::join_all(workers).await {
            flatten(w)?;
        }
        *shared.fill_ended.lock().unwrap() = Some(Instant::now());
        Ok::<_, ClientError>(())
    };
    tokio::try_join!(fault_server, fill).map(|_| ())
}

fn flatten(joined: std::result::Result<Result<()>, tokio::task::JoinError>) -> Result<()> {
    joined.map_err(|e| ClientError::io("lazy-pages worker", std::io::Error::other(e)))?
}

/// What a copy attempt came to.
enum Copied {
    /// In (or already there): `n` bytes copied by this attempt.
    Done(u64),
    /// An event is unread: let go, wait, check again.
    Again,
    /// Not there any more, or changed since the look-up: an event took it.
    Released,
    /// Nothing is mapped there (ENOENT): nothing to fill.
    Unmapped,
    /// The task is gone (ESRCH): its memory went with it.
    TaskGone,
}

/// One fill worker: claims pieces in address order, a chunk's at a time, until
/// nothing is missing.
async fn fill_worker(shared: &Shared) -> Result<()> {
    while !shared.stop.load(Ordering::SeqCst) {
        let id = shared.next_claim.fetch_add(1, Ordering::Relaxed);
        let Some((slot, pieces, file, first)) = claim(shared, id) else {
            if nothing_missing(shared) {
                return Ok(());
            }
            // The rest is claimed by others (or waits on an event): look again soon.
            tokio::time::sleep(Duration::from_millis(2)).await;
            continue;
        };
        let fetching = Instant::now();
        // Every piece of a claim comes from this one chunk (or is zeros).
        let chunk = match pieces[0].source {
            Source::Chunk { chunk, .. } => {
                let at = if first {
                    &shared.fill_first
                } else {
                    &shared.fill
                };
                let c = &shared.counters;
                c.fill_claims.fetch_add(1, Ordering::Relaxed);
                c.fill_pieces
                    .fetch_add(pieces.len() as u64, Ordering::Relaxed);
                Some((chunk, kept_chunk(shared, at, chunk, &file).await?))
            }
            Source::Zero | Source::Hole => None,
        };
        add_nanos(&shared.counters.fetch_nanos, fetching.elapsed());
        for piece in &pieces {
            let bytes = match (piece.source, &chunk) {
                (Source::Chunk { skip, .. }, Some((digest, bytes))) => {
                    Some(cut(bytes, *digest, skip, piece.len, &file)?)
                }
                _ => None,
            };
            fill_piece(shared, slot, piece, id, bytes.as_deref()).await?;
        }
    }
    Ok(())
}

/// Copies one claimed piece in, trying again while events keep the kernel busy;
/// counts it as placed if it holds bytes of the image (not a hole).
async fn fill_piece(
    shared: &Shared,
    slot: usize,
    piece: &Piece,
    id: u64,
    bytes: Option<&[u8]>,
) -> Result<()> {
    let image_bytes = piece.source != Source::Hole;
    for _ in 0..COPY_TRIES {
        let copying = Instant::now();
        let copied = copy_claimed(shared, slot, piece.vaddr, id, bytes)?;
        add_nanos(&shared.counters.copy_nanos, copying.elapsed());
        match copied {
            Copied::Done(n) => {
                if image_bytes {
                    shared.counters.bytes_filled.fetch_add(n, Ordering::Relaxed);
                    shared.copied(n);
                }
                return Ok(());
            }
            Copied::Again => tokio::time::sleep(Duration::from_millis(1)).await,
            _ => return Ok(()),
        }
    }
    Ok(())
}

fn add_nanos(counter: &AtomicU64, d: Duration) {
    counter.fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
}

/// The lowest unclaimed piece of the first open task that has one, with the pieces
/// after it from the same chunk, device memory of any task first; whether it was
/// device memory.
fn claim(shared: &Shared, id: u64) -> Option<(usize, Vec<Piece>, Arc<str>, bool)> {
    let mut slots = shared.slots.lock().unwrap();
    for first in [true, false] {
        let found = slots.iter_mut().enumerate().find_map(|(i, s)| {
            s.uffd.as_ref()?;
            let p = if first {
                s.missing.claim_first(id)
            } else {
                s.missing.claim(id)
            }?;
            Some((i, p, s.missing.pages_file.clone(), first))
        });
        if found.is_some() {
            return found;
        }
    }
    None
}

/// Whether any open task still misses device memory.
fn first_missing(shared: &Shared) -> bool {
    shared
        .slots
        .lock()
        .unwrap()
        .iter_mut()
        .any(|s| s.uffd.is_some() && s.missing.first_missing())
}

/// Whether every open task has all its pages. Workers only ask after "restore
/// finished", when every uffd has long arrived (CRIU sends them before it restores).
fn nothing_missing(shared: &Shared) -> bool {
    shared
        .slots
        .lock()
        .unwrap()
        .iter()
        .all(|s| s.uffd.is_none() || s.missing.is_empty())
}

/// Copies the piece claimed as `id` at `vaddr` (zeros when `bytes` is None), if it is
/// still claimed, under the shared hold; marks it done.
fn copy_claimed(
    shared: &Shared,
    slot: usize,
    vaddr: u64,
    id: u64,
    bytes: Option<&[u8]>,
) -> Result<Copied> {
    let _held = shared.events.read().unwrap();
    let (fd, piece) = {
        let slots = shared.slots.lock().unwrap();
        let s = &slots[slot];
        match (&s.uffd, s.missing.claimed(vaddr, id)) {
            (Some(fd), Some(p)) => (fd.clone(), p),
            _ => return Ok(Copied::Released),
        }
    };
    // An event may have cut the piece: copy what is left of it (its start is the
    // claim's address, so the bytes still line up).
    let copied = match bytes {
        Some(b) => uffd::copy(&fd, vaddr, b.as_ptr(), piece.len.min(b.len() as u64)),
        None => uffd::zeropage(&fd, vaddr, piece.len),
    };
    let outcome = settle(copied, vaddr)?;
    let mut slots = shared.slots.lock().unwrap();
    match outcome {
        Copied::Done(_) | Copied::Unmapped => slots[slot].missing.done(vaddr, id),
        Copied::TaskGone => slots[slot].missing = Missing::none(),
        Copied::Again | Copied::Released => {}
    }
    Ok(outcome)
}

/// A copy's result, as the fill and the fault server take it.
fn settle(copied: std::io::Result<u64>, vaddr: u64) -> Result<Copied> {
    match copied {
        Ok(n) => Ok(Copied::Done(n)),
        Err(e) => match e.raw_os_error() {
            Some(libc::EAGAIN) => Ok(Copied::Again),
            Some(libc::ENOENT) => Ok(Copied::Unmapped),
            Some(libc::ESRCH) => Ok(Copied::TaskGone),
            _ => Err(ClientError::io(
                format!("copying pages in at {vaddr:#x}"),
                e,
            )),
        },
    }
}

/// Answers one page fault with the whole missing piece around it (one chunk's slice:
/// a thread reading through missing memory faults once per piece, not per page), or
/// with the zero page where nothing is missing.
async fn serve_fault(shared: &Shared, slot: usize, addr: u64) -> Result<()> {
    let c = &shared.counters;
    c.faults.fetch_add(1, Ordering::Relaxed);
    for _ in 0..COPY_TRIES {
        let (piece, file) = {
            let slots = shared.slots.lock().unwrap();
            let s = &slots[slot];
            if s.uffd.is_none() {
                // Closed: the kernel woke the thread and serves its fault itself.
                return Ok(());
            }
            (s.missing.piece_at(addr), s.missing.pages_file.clone())
        };
        let bytes = match piece {
            Some(Piece {
                len,
                source: Source::Chunk { chunk, skip },
                ..
            }) => {
                let fetching = Instant::now();
                let bytes = slice(shared, &shared.demand, chunk, skip, len, &file).await?;
                add_nanos(&c.fault_fetch_nanos, fetching.elapsed());
                Some(bytes)
            }
            _ => None,
        };
        match copy_fault(shared, slot, addr, piece, bytes.as_deref())? {
            Copied::Again => tokio::time::sleep(Duration::from_millis(1)).await,
            // The piece changed between the look-up and the copy: look again.
            Copied::Released => {}
            Copied::Done(n) if bytes.is_some() => {
                c.bytes_on_fault.fetch_add(n, Ordering::Relaxed);
                shared.copied(n);
                return Ok(());
            }
            Copied::Done(n) => {
                c.zero_faults.fetch_add(1, Ordering::Relaxed);
                if piece.is_some_and(|p| p.source == Source::Zero) {
                    // A zero run of the image (kept in trees of several tasks).
                    shared.copied(n);
                }
                return Ok(());
            }
            Copied::Unmapped | Copied::TaskGone => return Ok(()),
        }
    }
    Err(ClientError::Criu(format!(
        "a page fault at {addr:#x} could not be answered while events kept coming"
    )))
}

/// Under the shared hold: if the piece at `addr` is still what the look-up found,
/// copies it in (the zero page where nothing is missing) and wakes the faulting
/// thread; the piece leaves the fill's work unless a worker has claimed it.
fn copy_fault(
    shared: &Shared,
    slot: usize,
    addr: u64,
    looked_up: Option<Piece>,
    bytes: Option<&[u8]>,
) -> Result<Copied> {
    let _held = shared.events.read().unwrap();
    let fd = {
        let slots = shared.slots.lock().unwrap();
        let s = &slots[slot];
        let Some(fd) = s.uffd.clone() else {
            return Ok(Copied::TaskGone);
        };
        if s.missing.piece_at(addr) != looked_up {
            return Ok(Copied::Released);
        }
        fd
    };
    let copied = match (looked_up, bytes) {
        (Some(p), Some(b)) => uffd::copy(&fd, p.vaddr, b.as_ptr(), p.len.min(b.len() as u64)),
        (Some(p), None) => uffd::zeropage(&fd, p.vaddr, p.len),
        (None, _) => uffd::zeropage(&fd, addr, PAGE),
    };
    let outcome = settle(copied, addr)?;
    if let (Copied::Done(_), Some(p)) = (&outcome, looked_up) {
        shared.slots.lock().unwrap()[slot].missing.served(p);
    }
    if let Copied::Done(0) = outcome {
        // Someone else put it in; the waiter may still be asleep.
        let _ = uffd::wake(&fd, addr, PAGE);
    }
    Ok(outcome)
}

/// `len` bytes of `chunk` from `skip`, verified, through the kept chunks.
async fn slice(
    shared: &Shared,
    chunks: &Chunks,
    chunk: Digest,
    skip: u64,
    len: u64,
    file: &str,
) -> Result<Bytes> {
    let bytes = kept_chunk(shared, chunks, chunk, file).await?;
    cut(&bytes, chunk, skip, len, file)
}

/// `chunk`'s bytes, verified: from the chunks kept, else fetched and kept.
async fn kept_chunk(shared: &Shared, chunks: &Chunks, chunk: Digest, file: &str) -> Result<Bytes> {
    let kept = shared
        .kept
        .lock()
        .unwrap()
        .iter()
        .find(|(d, _)| *d == chunk)
        .map(|(_, b)| b.clone());
    if let Some(b) = kept {
        return Ok(b);
    }
    let b = chunks.get(chunk, file).await?;
    let mut kept = shared.kept.lock().unwrap();
    if kept.len() == CHUNKS_KEPT {
        kept.pop_front();
    }
    kept.push_back((chunk, b.clone()));
    Ok(b)
}

/// `len` bytes of `chunk`'s `bytes` from `skip`.
fn cut(bytes: &Bytes, chunk: Digest, skip: u64, len: u64, file: &str) -> Result<Bytes> {
    let (s, t) = (skip as usize, (skip + len) as usize);
    if t > bytes.len() {
        return Err(ClientError::Criu(format!(
            "{file}: chunk {chunk} holds {} bytes, its extent more",
            bytes.len()
        )));
    }
    Ok(bytes.slice(s..t))
}
