//! Serving one image file into the pipe CRIU handed over for it: its extents in
//! order, a window of chunk fetches ahead, node-cache files spliced instead of
//! copied, zero runs written from a static page of zeros.

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

/// What every file-serving task shares: the image's files, the chunk source, and
/// the first error (which turns the post-restore answer into "fail").
pub(super) struct FileServer<'a> {
    pub files: &'a HashMap<String, Vec<Extent>>,
    /// Files served from memory instead of their extents (rewritten pagemaps).
    pub inline: &'a HashMap<String, Bytes>,
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
        let extents = self.files.get(&name).cloned().unwrap_or_default();
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
    extents: Vec<Extent>,
    pipe: OwnedFd,
    window: usize,
) -> Result<()> {
    let mut pipe =
        Sender::from_owned_fd(pipe).map_err(|e| ClientError::io(format!("pipe for {name}"), e))?;
    let mut pieces = futures::stream::iter(extents)
        .map(|e| {
            let (chunks, name) = (chunks.clone(), name.clone());
            async move {
                match e {
                    Extent::Chunk { chunk, .. } => match chunks.cached_file(chunk).await {
                        Some((file, len)) => Ok(Piece::File(file, len)),
                        None => chunks.get(chunk, &name).await.map(Piece::Bytes),
                    },
                    Extent::Zero { zero } => Ok(Piece::Zeros(zero)),
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
            Piece::File(file, len) => splice_all(&pipe, file, *len).await,
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

/// Moves `len` bytes of `file` into the pipe with splice(2): the kernel passes page
/// references from the page cache, so the bytes are copied once (by CRIU's read)
/// instead of three times (read here, write here, read there), and the pipe's lock
/// is held for moments instead of for copies, which CRIU otherwise spins on.
async fn splice_all(pipe: &Sender, file: &std::fs::File, len: u64) -> std::io::Result<()> {
    let mut off: i64 = 0;
    while (off as u64) < len {
        pipe.writable().await?;
        let moved = pipe.try_io(|| {
            let left = (len - off as u64) as usize;
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
