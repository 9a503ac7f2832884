//! Stage 2, staged (`--stage`): the image's files written into a memory directory
//! first, all chunks at once, then read by a plain `criu restore -D` as from a local
//! disk. The alternative to [`super::serve`]'s streamed restore.
//!
//! Why: a streamed restore makes CRIU premap every private mapping, read(2) each
//! pagemap run from the pipe into it and move it into place afterwards; from a
//! directory, CRIU's restorer preadv(2)s the same runs straight into the tasks'
//! mappings. CRIU's streamed reads were measured at 0.96–1.34 GB/s on the H200
//! machine while a local restore read its image at ~1.9 GB/s (bench/RESULTS.md). A
//! staged restore pays a write of the served bytes instead (zero pages still left
//! out), many chunks in parallel, and holds them in memory while CRIU runs.
//!
//! | `--stage` | stage 2 |
//! |---|---|
//! | `off` (default) | streamed |
//! | `auto` | staged into the memory directory (`--memory-stage-dir`, /dev/shm) when the image fits there, in `MemAvailable` twice over (the files and the restored tasks) and in the cgroup's headroom (crate::memory_dir); else streamed |
//! | `DIR` | staged into DIR |
//!
//! `--lazy` always streams: its pages come from the page server.
//!
//! ```text
//! <DIR>/snapctl-stage-<pid>-<nanos>/   the image files CRIU reads (zero runs are holes)
//! <work dir>/restore.log               CRIU's log (`--work-dir`), kept after the restore
//! ```
//!
//! The staging directory is removed when the restore ends, however it ends.
//! Integrity is the streamed path's: every chunk is verified before it is written (a
//! node-cache file is hashed, a fetched chunk verified by the stack), so nothing
//! unverified is in the directory when CRIU starts, and a chunk that fails stops the
//! restore before CRIU runs.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use snapreg_proto::manifest::Extent;
use snapreg_proto::Digest;

use super::serve::{self, Served};
use crate::action::ActionServer;
use crate::criu::{self, Criu};
use crate::error::{ClientError, Result};
use crate::fetch::Chunks;
use crate::memory_dir::{self, Need};
use crate::progress::Progress;
use crate::work_dir::{self, RemoveOnDrop};

/// Chunks written into the staging directory at once.
const PARALLEL: usize = 32;

/// The `--stage` choice.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Stage {
    #[default]
    Off,
    Auto,
    Dir(PathBuf),
}

impl FromStr for Stage {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        Ok(match s {
            "off" => Stage::Off,
            "auto" => Stage::Auto,
            dir => Stage::Dir(PathBuf::from(dir)),
        })
    }
}

/// How stage 2 went, in the report (absent with `--stage off`).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct StageReport {
    /// The directory the image was staged in; `None` when streamed.
    pub staged_in: Option<PathBuf>,
    /// Why staged or streamed.
    pub reason: String,
    /// Bytes written into the directory (zero runs are holes, not counted).
    pub bytes: u64,
    /// From the first chunk to the last file complete, before CRIU started.
    pub seconds: f64,
}

/// Where to stage an image whose files hold `files` (`auto`: in `memory_dir`): the
/// base directory, or `None` (streamed), with the reason; `None` for `off`.
pub(super) fn choose(
    stage: &Stage,
    lazy: bool,
    files: &HashMap<String, Vec<Extent>>,
    memory_dir: &Path,
) -> Option<StageReport> {
    let decided = |staged_in: Option<PathBuf>, reason: String| {
        Some(StageReport {
            staged_in,
            reason,
            ..StageReport::default()
        })
    };
    match stage {
        Stage::Off => None,
        _ if lazy => decided(None, "streamed (--lazy serves pages itself)".into()),
        Stage::Dir(dir) => decided(
            Some(dir.clone()),
            format!("staged in {} (--stage)", dir.display()),
        ),
        Stage::Auto => {
            let bytes = data_bytes(files);
            let what = format!("the image's {} of data", memory_dir::gb(bytes));
            // The files, and the restored tasks' copy of them while CRIU runs.
            let need = Need {
                in_dir: bytes,
                in_memory: 2 * bytes,
            };
            let base = memory_dir.to_path_buf();
            match memory_dir::room(&base).and_then(|room| memory_dir::fits(&what, need, room)) {
                Ok(why) => decided(
                    Some(base.clone()),
                    format!("staged in {} (auto: {why})", base.display()),
                ),
                Err(why) => decided(None, format!("streamed (auto: {why})")),
            }
        }
    }
}

/// The image's bytes that are not zero runs (an upper bound of what is staged: the
/// zero-page plan leaves out more).
fn data_bytes(files: &HashMap<String, Vec<Extent>>) -> u64 {
    files
        .values()
        .flatten()
        .filter(|e| matches!(e, Extent::Chunk { .. }))
        .map(Extent::len)
        .sum()
}

/// One chunk's place in a staged file.
struct Job {
    out: Arc<File>,
    /// The staged file's path, for a descriptor of the job's own (sendfile writes at
    /// its file position).
    path: Arc<Path>,
    at: u64,
    chunk: Digest,
    file: Arc<str>,
}

/// A staged image: its directory, removed on drop.
pub(super) struct Staged {
    pub dir: RemoveOnDrop,
}

impl Staged {
    /// A fresh staging directory under `base`.
    pub fn create(base: &Path) -> Result<Staged> {
        let dir = work_dir::create_in(base, "snapctl-stage")?;
        Ok(Staged {
            dir: RemoveOnDrop::fresh_dir(dir)?,
        })
    }

    /// Writes every file of `files` (`inline` ones from memory), chunks verified and
    /// written `PARALLEL` at once; zero runs stay holes. Returns the bytes written.
    pub async fn write(
        &self,
        files: &HashMap<String, Vec<Extent>>,
        inline: &HashMap<String, Bytes>,
        chunks: &Chunks,
        progress: &Progress,
    ) -> Result<u64> {
        let (mut jobs, mut zeros) = (Vec::new(), 0);
        for (name, extents) in files {
            let path = self.dir.path.join(name);
            let io = |e| ClientError::io(format!("staging {}", path.display()), e);
            let out = File::create(&path).map_err(io)?;
            if let Some(bytes) = inline.get(name) {
                out.write_all_at(bytes, 0).map_err(io)?;
                progress.advance(bytes.len() as u64);
                continue;
            }
            let out = Arc::new(out);
            let path: Arc<Path> = path.as_path().into();
            let file: Arc<str> = name.as_str().into();
            let mut at = 0;
            for e in extents {
                match *e {
                    Extent::Chunk { chunk, .. } => jobs.push(Job {
                        out: out.clone(),
                        path: path.clone(),
                        at,
                        chunk,
                        file: file.clone(),
                    }),
                    Extent::Zero { zero } => zeros += zero,
                }
                at += e.len();
            }
            out.set_len(at).map_err(io)?;
        }
        let written = futures::stream::iter(jobs)
            .map(|job| write_chunk(chunks, job, progress))
            .buffer_unordered(PARALLEL)
            .try_fold(0u64, |sum, n| async move { Ok(sum + n) })
            .await?;
        progress.advance(zeros);
        progress
            .counters
            .bytes_total
            .fetch_add(written + zeros, Relaxed);
        Ok(written)
    }
}

/// One chunk, verified, written at its place; returns its length. A node-cache file
/// (hashed by [`Chunks::cached_file`]) is copied by the kernel, never through this
/// process; a fetched chunk is written from the bytes the stack verified.
async fn write_chunk(chunks: &Chunks, job: Job, progress: &Progress) -> Result<u64> {
    let cached = chunks.cached_file(job.chunk).await;
    let Job {
        out,
        path,
        at,
        file,
        ..
    } = job;
    let written = match cached {
        Some((src, len)) => {
            tokio::task::spawn_blocking(move || copy_into(&src, len, &path, at).map(|()| len)).await
        }
        None => {
            let bytes = chunks.get(job.chunk, &file).await?;
            let len = bytes.len() as u64;
            tokio::task::spawn_blocking(move || out.write_all_at(&bytes, at).map(|()| len)).await
        }
    };
    let len = written
        .map_err(|e| ClientError::io(format!("staging {file}"), std::io::Error::other(e)))?
        .map_err(|e| ClientError::io(format!("staging {file}"), e))?;
    progress.advance(len);
    Ok(len)
}

/// `len` bytes of `src` from its start into the file at `path` at `at`, by
/// sendfile(2): page cache to tmpfs inside the kernel. (copy_file_range(2) would
/// take offsets on both sides, but refuses to cross file system types.)
fn copy_into(src: &File, len: u64, path: &Path, at: u64) -> std::io::Result<()> {
    use std::io::{Seek, SeekFrom};
    let mut out = File::options().write(true).open(path)?;
    out.seek(SeekFrom::Start(at))?;
    let mut off: i64 = 0;
    while (off as u64) < len {
        let left = (len - off as u64) as usize;
        match nix::sys::sendfile::sendfile(&out, src, Some(&mut off), left) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Runs `criu <args>` (reading the staged directory its `-D` names, its log and the
/// action socket in `work`) to its exit. Every byte was verified before CRIU started,
/// so the post-restore answer is "ok".
pub(super) async fn restore(criu: &Criu, args: &[String], work: &Path) -> Result<Served> {
    let action_socket = work.join("action.sock");
    let mut actions = ActionServer::bind(&action_socket)
        .map_err(|e| ClientError::io("binding the action socket", e))?;
    let started = Instant::now();
    let mut child = criu::start(criu, args, &action_socket)?;
    tracing::info!("criu restore started on the staged image");
    let stderr = serve::collect_stderr(&mut child);
    let status = loop {
        tokio::select! {
            Some(req) = actions.next() => req.answer(Ok(())).await,
            status = child.wait() => {
                break status.map_err(|e| ClientError::io("waiting for CRIU", e))?
            }
        }
    };
    let restore_seconds = started.elapsed().as_secs_f64();
    tracing::info!(restore_seconds, "criu restore exited");
    let stderr = stderr.await.unwrap_or_default();
    Ok(Served {
        status,
        restore_seconds,
        files_served: 0,
        first_error: None,
        timings: Vec::new(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_values_parse() {
        assert_eq!("off".parse::<Stage>().unwrap(), Stage::Off);
        assert_eq!("auto".parse::<Stage>().unwrap(), Stage::Auto);
        assert_eq!(
            "/dev/shm".parse::<Stage>().unwrap(),
            Stage::Dir("/dev/shm".into())
        );
    }

    #[test]
    fn off_decides_nothing_and_lazy_always_streams() {
        let (files, shm) = (HashMap::new(), Path::new("/dev/shm"));
        assert!(choose(&Stage::Off, false, &files, shm).is_none());
        let lazy = choose(&Stage::Dir(shm.into()), true, &files, shm).unwrap();
        assert!(lazy.staged_in.is_none() && lazy.reason.contains("--lazy"));
        let proc = choose(&Stage::Auto, false, &files, Path::new("/proc")).unwrap();
        assert!(proc.staged_in.is_none() && proc.reason.contains("not a tmpfs"));
        let dir = choose(&Stage::Dir("/x".into()), false, &files, shm).unwrap();
        assert_eq!(dir.staged_in, Some(PathBuf::from("/x")));
    }

    #[test]
    fn a_cached_file_is_copied_whole_at_its_place() {
        let d = tempfile::tempdir().unwrap();
        let (src, out) = (d.path().join("src"), d.path().join("out"));
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&src, &data).unwrap();
        File::create(&out).unwrap().set_len(400_000).unwrap();
        copy_into(&File::open(&src).unwrap(), data.len() as u64, &out, 4096).unwrap();
        let got = std::fs::read(&out).unwrap();
        assert_eq!(got.len(), 400_000);
        assert!(got[..4096].iter().all(|&b| b == 0));
        assert_eq!(&got[4096..4096 + data.len()], &data[..]);
        // A source shorter than promised is an error, not a short file.
        let short = copy_into(&File::open(&src).unwrap(), 400_000, &out, 0);
        assert!(short.is_err());
    }

    #[test]
    fn only_chunk_bytes_count_as_data() {
        let d = Digest::of(b"x");
        let files = HashMap::from([(
            "pages-1.img".to_string(),
            vec![
                Extent::Chunk { chunk: d, len: 10 },
                Extent::Zero { zero: 1 << 30 },
                Extent::Chunk { chunk: d, len: 5 },
            ],
        )]);
        assert_eq!(data_bytes(&files), 15);
    }
}
