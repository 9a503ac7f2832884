//! Serving one image file into the pipe CRIU handed over for it: its extents in
//! order (less the byte ranges a lazy restore leaves to the lazy-pages daemon), a window of
//! chunk fetches ahead, node-cache files spliced instead of copied, zero runs written
//! from a static page of zeros.
//!
//! Each file task times itself ([`FileServing`]): how long it waited for chunks (the
//! fetch stack behind CRIU) against how long it spent writing into the pipe (CRIU
//! behind, or copying). The restore report carries the largest files' figures, the
//! profile of a restore on a machine without perf.

use std::collections::HashMap;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use snapreg_proto::manifest::Extent;
use snapreg_proto::Digest;
use tokio::io::AsyncWriteExt;
use tokio::net::unix::pipe::Sender;
use tokio::task::JoinSet;

use crate::error::{ClientError, Result};
use crate::fetch::Chunks;
use crate::progress::Progress;

static ZEROS: [u8; 1 << 16] = [0; 1 << 16];

/// One extent, or the part of it that is served, on its way into CRIU's pipe.
enum Piece {
    Bytes(Bytes),
    /// A verified node-cache file from an offset: spliced, its pages never copied
    /// through snapctl.
    File(std::fs::File, u64, u64),
    Zeros(u64),
}

impl Piece {
    fn len(&self) -> u64 {
        match self {
            Piece::Bytes(b) => b.len() as u64,
            Piece::File(_, _, n) | Piece::Zeros(n) => *n,
        }
    }
}

/// The bytes `[skip, skip + take)` of one extent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Span {
    extent: Extent,
    skip: u64,
    take: u64,
}

/// A file's extents less the sorted, disjoint byte ranges `left_out`.
fn spans(extents: &[Extent], left_out: &[(u64, u64)]) -> Vec<Span> {
    let mut out = Vec::with_capacity(extents.len());
    let (mut off, mut c) = (0u64, 0usize);
    for &extent in extents {
        let end = off + extent.len();
        let mut at = off;
        while at < end {
            while c < left_out.len() && left_out[c].1 <= at {
                c += 1;
            }
            let next_cut = left_out.get(c).copied();
            match next_cut {
                Some((s, t)) if s <= at => at = t.min(end),
                Some((s, _)) => {
                    let stop = s.min(end);
                    out.push(Span {
                        extent,
                        skip: at - off,
                        take: stop - at,
                    });
                    at = stop;
                }
                None => {
                    out.push(Span {
                        extent,
                        skip: at - off,
                        take: end - at,
                    });
                    at = end;
                }
            }
        }
        off = end;
    }
    out
}

/// Where serving one file spent its time. The fetch figures are sums over the
/// fetches in flight (a window of them overlap), so they can exceed `seconds`.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct FileServing {
    pub file: String,
    /// Bytes written or spliced into CRIU's pipe (zero runs not counted).
    pub bytes: u64,
    /// From the task's start to its last byte.
    pub seconds: f64,
    /// Waiting for the next extent: the fetch stack was behind CRIU.
    pub waiting_for_chunks_seconds: f64,
    /// Writing or splicing into the pipe: CRIU was behind (or the copy itself).
    pub writing_to_criu_seconds: f64,
    /// Checking node-cache files before splicing them (their BLAKE3), summed.
    pub cache_checks_seconds: f64,
    /// Chunks the node cache lacked, fetched through the stack below it, summed.
    pub fetches_seconds: f64,
}

/// How many files' figures a report keeps: the largest (CRIU's pages files).
const REPORTED_FILES: usize = 4;

/// The `REPORTED_FILES` files that served the most bytes, largest first.
pub(super) fn largest(mut files: Vec<FileServing>) -> Vec<FileServing> {
    files.sort_by_key(|f| std::cmp::Reverse(f.bytes));
    files.truncate(REPORTED_FILES);
    files
}

/// What every file-serving task shares: the image's files, the chunk source, and
/// the first error (which turns the post-restore answer into "fail").
pub(super) struct FileServer<'a> {
    pub files: &'a HashMap<String, Vec<Extent>>,
    /// Files served from memory instead of their extents (rewritten pagemaps).
    pub inline: &'a HashMap<String, Bytes>,
    /// Byte ranges of files left to the lazy-pages daemon (a lazy restore), sorted.
    pub left_out: &'a HashMap<String, Vec<(u64, u64)>>,
    pub chunks: &'a Chunks,
    pub progress: &'a Progress,
    pub first_error: &'a Arc<Mutex<Option<ClientError>>>,
    /// Each served file's timings, as its task ends.
    pub timings: &'a Arc<Mutex<Vec<FileServing>>>,
    pub window: usize,
}

impl FileServer<'_> {
    /// Serves `name` into `pipe` on a task of `tasks`; an error is kept as the first.
    pub fn spawn(&self, tasks: &mut JoinSet<()>, name: String, pipe: OwnedFd) {
        let errs = self.first_error.clone();
        if let Some(bytes) = self.inline.get(&name).cloned() {
            tasks.spawn(async move {
                let written = async { Sender::from_owned_fd(pipe)?.write_all(&bytes).await }.await;
                match written {
                    Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                        keep_first(&errs, ClientError::io(format!("serving {name} to CRIU"), e));
                    }
                    _ => {}
                }
            });
            return;
        }
        let extents = self.files.get(&name).map(Vec::as_slice).unwrap_or(&[]);
        let left_out = self.left_out.get(&name).map(Vec::as_slice).unwrap_or(&[]);
        let extents = spans(extents, left_out);
        let (chunks, progress, window) = (self.chunks.clone(), self.progress.clone(), self.window);
        let timings = self.timings.clone();
        tasks.spawn(async move {
            let mut times = FileServing {
                file: name,
                ..FileServing::default()
            };
            serve_file(chunks, progress, extents, pipe, window, &errs, &mut times).await;
            timings.lock().unwrap().push(times);
        });
    }
}

/// Serves one file's extents into CRIU's pipe, timing itself into `times`: the
/// pieces are made here, a window ahead, and written by a thread of their own
/// ([`feed`]). EPIPE means CRIU closed the file early: not an error here; CRIU's
/// exit code decides.
///
/// An error goes into `first_error` before the pipe closes: the short file makes
/// CRIU exit, and the serving loop stops every file task once it has, so an error
/// kept any later could be lost and the restore reported as CRIU's failure instead
/// of the corrupt chunk's.
async fn serve_file(
    chunks: Chunks,
    progress: Progress,
    extents: Vec<Span>,
    pipe: OwnedFd,
    window: usize,
    first_error: &Arc<Mutex<Option<ClientError>>>,
    times: &mut FileServing,
) {
    let name = times.file.clone();
    let started = Instant::now();
    let (tx, rx) = tokio::sync::mpsc::channel(window.max(1));
    let (errs, file) = (first_error.clone(), name.clone());
    let feeder = tokio::task::spawn_blocking(move || {
        let pipe = std::fs::File::from(pipe);
        match blocking(&pipe).and_then(|()| feed(&pipe, rx, &progress)) {
            Ok(fed) => Some(fed),
            Err(e) => {
                keep_first(&errs, ClientError::io(format!("serving {file} to CRIU"), e));
                None
            }
        }
    });
    let fetch_times: Arc<Mutex<FetchTimes>> = Arc::default();
    let mut pieces = futures::stream::iter(extents)
        .map(|span| piece(chunks.clone(), name.clone(), span, fetch_times.clone()))
        .buffered(window.max(1));
    while let Some(piece) = pieces.next().await {
        let piece = match piece {
            Ok(piece) => piece,
            Err(e) => {
                keep_first(first_error, e);
                break;
            }
        };
        // A send fails once the feeder stopped: CRIU closed the pipe, or an error.
        if tx.send(piece).await.is_err() {
            break;
        }
    }
    drop(tx);
    let fed = feeder.await.unwrap_or_else(|e| {
        let e = ClientError::io(format!("serving {name}"), std::io::Error::other(e));
        keep_first(first_error, e);
        None
    });
    let FetchTimes { checks, fetches } = *fetch_times.lock().unwrap();
    times.seconds = started.elapsed().as_secs_f64();
    times.cache_checks_seconds = checks.as_secs_f64();
    times.fetches_seconds = fetches.as_secs_f64();
    if let Some(fed) = fed {
        times.bytes = fed.bytes;
        times.waiting_for_chunks_seconds = fed.waiting.as_secs_f64();
        times.writing_to_criu_seconds = fed.writing.as_secs_f64();
    }
    tracing::debug!(?times, "served");
}

/// Keeps `e` unless an earlier error was kept.
fn keep_first(first_error: &Mutex<Option<ClientError>>, e: ClientError) {
    first_error.lock().unwrap().get_or_insert(e);
}

/// The pieces' cache checks and fetches, summed over the window in flight.
#[derive(Clone, Copy, Default)]
struct FetchTimes {
    checks: Duration,
    fetches: Duration,
}

/// One span's bytes: a node-cache file to splice (checked, or stored by this
/// restore moments ago), else the chunk's bytes, else zeros. Adds the time of the
/// cache check and of the fetch to `fetch_times`.
async fn piece(
    chunks: Chunks,
    name: String,
    span: Span,
    fetch_times: Arc<Mutex<FetchTimes>>,
) -> Result<Piece> {
    let (skip, take) = (span.skip, span.take);
    let Extent::Chunk { chunk, .. } = span.extent else {
        return Ok(Piece::Zeros(take));
    };
    let checking = Instant::now();
    let cached = chunks.cached_file(chunk).await;
    let checked = checking.elapsed();
    let piece = match cached {
        Some((file, _)) => Ok(Piece::File(file, skip, take)),
        None => fetched(&chunks, chunk, &name, skip, take).await,
    };
    let mut times = fetch_times.lock().unwrap();
    times.checks += checked;
    times.fetches += checking.elapsed() - checked;
    piece
}

/// A chunk the cache lacked, fetched: its cache file if the fetch stored one (a
/// splice moves page references; writing the bytes would copy them into the pipe
/// while CRIU waits on its lock), else its bytes.
async fn fetched(
    chunks: &Chunks,
    chunk: Digest,
    name: &str,
    skip: u64,
    take: u64,
) -> Result<Piece> {
    let bytes = chunks.get(chunk, name).await?;
    Ok(match chunks.stored_file(chunk).await {
        Some((file, _)) => Piece::File(file, skip, take),
        None => Piece::Bytes(bytes.slice(skip as usize..(skip + take) as usize)),
    })
}

/// What one feeder wrote, and where its time went.
#[derive(Default)]
struct Fed {
    /// Bytes written or spliced (zero runs not counted).
    bytes: u64,
    /// Waiting for the next piece.
    waiting: Duration,
    /// In write(2) and splice(2) on the pipe.
    writing: Duration,
}

/// Writes `pieces` into CRIU's pipe (made blocking) with blocking calls on this
/// (blocking-pool) thread, until they end or CRIU closes the pipe (EPIPE: a clean
/// stop). The caller keeps the pipe open until it has kept an error.
///
/// Why a thread and blocking calls: CRIU reads each pagemap run whole, and a pipe
/// moves at most its size per wake-up; a blocked splice is woken by the kernel the
/// moment CRIU frees room, where a non-blocking one waited for the async reactor
/// to notice readiness and schedule the task again.
fn feed(
    mut pipe: &std::fs::File,
    mut pieces: tokio::sync::mpsc::Receiver<Piece>,
    progress: &Progress,
) -> std::io::Result<Fed> {
    let mut fed = Fed::default();
    loop {
        let asked = Instant::now();
        let Some(piece) = pieces.blocking_recv() else {
            return Ok(fed);
        };
        let got = Instant::now();
        fed.waiting += got - asked;
        let res = match &piece {
            Piece::Bytes(data) => pipe.write_all(data),
            Piece::File(file, off, len) => splice_all(pipe, file, *off, *len),
            Piece::Zeros(n) => write_zeros(pipe, *n),
        };
        fed.writing += got.elapsed();
        match res {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(fed),
            Err(e) => return Err(e),
        }
        let n = piece.len();
        progress.advance(n);
        progress
            .counters
            .bytes_total
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        if !matches!(piece, Piece::Zeros(_)) {
            fed.bytes += n;
        }
    }
}

/// Clears O_NONBLOCK on CRIU's pipe, for [`feed`]'s blocking calls.
fn blocking(pipe: &std::fs::File) -> std::io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = OFlag::from_bits_truncate(fcntl(pipe, FcntlArg::F_GETFL)?);
    fcntl(pipe, FcntlArg::F_SETFL(flags - OFlag::O_NONBLOCK))?;
    Ok(())
}

/// Moves `len` bytes of `file` from `start` into the pipe with splice(2): the kernel passes page
/// references from the page cache, so the bytes are copied once (by CRIU's read)
/// instead of three times (read here, write here, read there), and the pipe's lock
/// is held for moments instead of for copies, which CRIU otherwise waits on.
fn splice_all(
    pipe: &std::fs::File,
    file: &std::fs::File,
    start: u64,
    len: u64,
) -> std::io::Result<()> {
    let end = start + len;
    let mut off = start as i64;
    while (off as u64) < end {
        let left = (end - off as u64) as usize;
        let moved = nix::fcntl::splice(
            file,
            Some(&mut off),
            pipe,
            None,
            left,
            nix::fcntl::SpliceFFlags::SPLICE_F_MOVE,
        );
        match moved {
            Ok(0) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "cached chunk file shorter than it was",
                ))
            }
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn write_zeros(mut pipe: &std::fs::File, mut n: u64) -> std::io::Result<()> {
    while n > 0 {
        let k = n.min(ZEROS.len() as u64) as usize;
        pipe.write_all(&ZEROS[..k])?;
        n -= k as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use snapreg_proto::Digest;

    #[test]
    fn feed_writes_bytes_file_ranges_and_zeros_in_order_and_stops_at_a_closed_pipe() {
        use std::io::Read;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chunk");
        std::fs::write(&path, b"0123456789").unwrap();
        let file = || std::fs::File::open(&path).unwrap();
        let (reader, writer) = nix::unistd::pipe().unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let feeder =
            std::thread::spawn(move || feed(&std::fs::File::from(writer), rx, &Progress::hidden()));
        tx.blocking_send(Piece::Bytes(Bytes::from_static(b"ab")))
            .unwrap();
        tx.blocking_send(Piece::File(file(), 3, 4)).unwrap();
        tx.blocking_send(Piece::Zeros(70_000)).unwrap();
        tx.blocking_send(Piece::File(file(), 9, 1)).unwrap();
        drop(tx);
        let mut got = Vec::new();
        std::fs::File::from(reader).read_to_end(&mut got).unwrap();
        let fed = feeder.join().unwrap().unwrap();
        assert_eq!(&got[..6], b"ab3456");
        assert!(got[6..70_006].iter().all(|&b| b == 0));
        assert_eq!(&got[70_006..], b"9");
        assert_eq!(fed.bytes, 7, "zero runs are not counted as served bytes");

        // CRIU closed its end: the feeder stops without an error.
        let (reader, writer) = nix::unistd::pipe().unwrap();
        drop(reader);
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let feeder =
            std::thread::spawn(move || feed(&std::fs::File::from(writer), rx, &Progress::hidden()));
        tx.blocking_send(Piece::Zeros(1 << 20)).unwrap();
        let _ = tx.blocking_send(Piece::Zeros(1));
        drop(tx);
        assert_eq!(feeder.join().unwrap().unwrap().bytes, 0);
    }

    #[test]
    fn the_report_keeps_the_largest_files_first() {
        let f = |file: &str, bytes| FileServing {
            file: file.into(),
            bytes,
            ..FileServing::default()
        };
        let kept = largest(vec![f("a", 1), f("b", 9), f("c", 5), f("d", 0), f("e", 7)]);
        let names: Vec<_> = kept.iter().map(|f| f.file.as_str()).collect();
        assert_eq!(names, ["b", "e", "c", "a"]);
    }

    #[test]
    fn spans_leave_out_ranges_across_and_inside_extents() {
        let c = |i: u8, len| Extent::Chunk {
            chunk: Digest::of(&[i]),
            len,
        };
        let extents = [c(1, 100), Extent::Zero { zero: 50 }, c(2, 100)];
        let span = |extent, skip, take| Span { extent, skip, take };
        assert_eq!(
            spans(&extents, &[]),
            vec![
                span(extents[0], 0, 100),
                span(extents[1], 0, 50),
                span(extents[2], 0, 100)
            ]
        );
        // Cut [20, 30) inside the first, [90, 160) across all three, [240, 250) at the end.
        assert_eq!(
            spans(&extents, &[(20, 30), (90, 160), (240, 250)]),
            vec![
                span(extents[0], 0, 20),
                span(extents[0], 30, 60),
                span(extents[2], 10, 80),
            ]
        );
        assert_eq!(spans(&extents, &[(0, 250)]), vec![]);
    }
}
