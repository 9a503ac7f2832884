//! Serving one image file into the pipe CRIU handed over for it: its extents in
//! order (less the byte ranges a lazy restore leaves to the page server), a window of
//! chunk fetches ahead, node-cache files spliced instead of copied, zero runs written
//! from a static page of zeros.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use futures::StreamExt;
use snapreg_proto::manifest::Extent;
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

/// What every file-serving task shares: the image's files, the chunk source, and
/// the first error (which turns the post-restore answer into "fail").
pub(super) struct FileServer<'a> {
    pub files: &'a HashMap<String, Vec<Extent>>,
    /// Files served from memory instead of their extents (rewritten pagemaps).
    pub inline: &'a HashMap<String, Bytes>,
    /// Byte ranges of files left to the page server (a lazy restore), sorted.
    pub left_out: &'a HashMap<String, Vec<(u64, u64)>>,
    pub chunks: &'a Chunks,
    pub progress: &'a Progress,
    pub first_error: &'a Arc<Mutex<Option<ClientError>>>,
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
                        errs.lock()
                            .unwrap()
                            .get_or_insert(ClientError::io(format!("serving {name} to CRIU"), e));
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
        tasks.spawn(async move {
            if let Err(e) = serve_file(chunks, progress, name, extents, pipe, window).await {
                errs.lock().unwrap().get_or_insert(e);
            }
        });
    }
}

/// Writes one file's extents into CRIU's pipe. EPIPE means CRIU closed the file
/// early: not an error here; CRIU's exit code decides.
async fn serve_file(
    chunks: Chunks,
    progress: Progress,
    name: String,
    extents: Vec<Span>,
    pipe: OwnedFd,
    window: usize,
) -> Result<()> {
    let mut pipe =
        Sender::from_owned_fd(pipe).map_err(|e| ClientError::io(format!("pipe for {name}"), e))?;
    let mut pieces = futures::stream::iter(extents)
        .map(|span| {
            let (chunks, name) = (chunks.clone(), name.clone());
            async move {
                let (skip, take) = (span.skip, span.take);
                match span.extent {
                    Extent::Chunk { chunk, .. } => match chunks.cached_file(chunk).await {
                        Some((file, _)) => Ok(Piece::File(file, skip, take)),
                        None => chunks
                            .get(chunk, &name)
                            .await
                            .map(|b| Piece::Bytes(b.slice(skip as usize..(skip + take) as usize))),
                    },
                    Extent::Zero { .. } => Ok(Piece::Zeros(take)),
                }
            }
        })
        .buffered(window.max(1));
    let started = Instant::now();
    let mut served = 0u64;
    while let Some(piece) = pieces.next().await {
        let piece = piece?;
        let res = match &piece {
            Piece::Bytes(data) => pipe.write_all(data).await,
            Piece::File(file, off, len) => splice_all(&pipe, file, *off, *len).await,
            Piece::Zeros(n) => write_zeros(&mut pipe, *n).await,
        };
        match res {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            Err(e) => return Err(ClientError::io(format!("serving {name} to CRIU"), e)),
        }
        let n = piece.len();
        progress.advance(n);
        progress
            .counters
            .bytes_total
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        if !matches!(piece, Piece::Zeros(_)) {
            served += n;
        }
    }
    tracing::debug!(file = %name, bytes = served, elapsed = ?started.elapsed(), "served");
    Ok(())
}

/// Moves `len` bytes of `file` from `start` into the pipe with splice(2): the kernel passes page
/// references from the page cache, so the bytes are copied once (by CRIU's read)
/// instead of three times (read here, write here, read there), and the pipe's lock
/// is held for moments instead of for copies, which CRIU otherwise spins on.
async fn splice_all(
    pipe: &Sender,
    file: &std::fs::File,
    start: u64,
    len: u64,
) -> std::io::Result<()> {
    let end = start + len;
    let mut off = start as i64;
    while (off as u64) < end {
        pipe.writable().await?;
        let moved = pipe.try_io(|| {
            let left = (end - off as u64) as usize;
            nix::fcntl::splice(
                file,
                Some(&mut off),
                pipe,
                None,
                left,
                nix::fcntl::SpliceFFlags::SPLICE_F_MOVE
                    | nix::fcntl::SpliceFFlags::SPLICE_F_NONBLOCK,
            )
            .map_err(std::io::Error::from)
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

async fn write_zeros(pipe: &mut Sender, mut n: u64) -> std::io::Result<()> {
    while n > 0 {
        let k = n.min(ZEROS.len() as u64) as usize;
        pipe.write_all(&ZEROS[..k]).await?;
        n -= k as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use snapreg_proto::Digest;

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
