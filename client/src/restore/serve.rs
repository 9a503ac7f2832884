//! Stage 2 of a restore: `criu restore --stream` running, its requests answered.
//!
//! CRIU asks for each image file by name; a blocking task answers "exists" and hands
//! the pipe CRIU sent to the async side, which serves the file on a task of its own
//! ([`super::files`]). CRIU's post-restore action script waits until every file served
//! so far has been served whole and verified: only then does it answer "ok", so no
//! restored process resumes on bad bytes. Under `--fill-first` the pre-resume script
//! waits too, until the lazy-pages daemon has put every page in.

use std::collections::{HashMap, HashSet};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use snapreg_proto::manifest::Extent;
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};

use super::files::{self, FileServer, FileServing};
use super::lazy::AllIn;
use crate::action::ActionServer;
use crate::criu::{self, Criu};
use crate::criu_stream;
use crate::error::{ClientError, Result};
use crate::fetch::Chunks;
use crate::progress::Progress;

/// A started `criu restore --stream` and the loop answering its requests.
pub(super) struct CriuRestore {
    child: tokio::process::Child,
    requests: mpsc::UnboundedReceiver<(String, OwnedFd)>,
    request_loop: JoinHandle<std::io::Result<()>>,
    /// The streamer connection, shut down once CRIU exits to end the request loop.
    connection: UnixStream,
    actions: ActionServer,
    pub log: PathBuf,
    started: Instant,
}

/// How the restore went, once CRIU exited and every serving task stopped.
pub(super) struct Served {
    pub status: ExitStatus,
    /// From CRIU's start to its exit (or, detached, to the tree running).
    pub restore_seconds: f64,
    pub files_served: usize,
    /// The first file that could not be served whole and verified.
    pub first_error: Option<ClientError>,
    /// Where serving the largest files spent its time.
    pub timings: Vec<FileServing>,
    pub stderr: String,
}

/// What the serving tasks read from.
pub(super) struct Image<'a> {
    pub files: &'a HashMap<String, Vec<Extent>>,
    pub inline: &'a HashMap<String, Bytes>,
    pub left_out: &'a HashMap<String, Vec<(u64, u64)>>,
    pub chunks: &'a Chunks,
    pub window: usize,
    /// `--fill-first`: CRIU's pre-resume waits for this (every page in).
    pub resume_when: Option<AllIn>,
}

impl CriuRestore {
    /// Binds the streamer and action sockets in `dir`, starts CRIU with `args`, and
    /// answers its requests for `names` from now on.
    pub async fn start(
        criu: &Criu,
        args: &[String],
        dir: &Path,
        names: HashSet<String>,
    ) -> Result<Self> {
        let listener = criu_stream::bind(dir, criu_stream::SERVE_SOCKET)
            .map_err(|e| ClientError::io("binding the streamer socket", e))?;
        let action_socket = dir.join("action.sock");
        let actions = ActionServer::bind(&action_socket)
            .map_err(|e| ClientError::io("binding the action socket", e))?;
        let started = Instant::now();
        let log = dir.join("restore.log");
        let (child, sock) =
            criu::start_streaming(criu, args, &listener, &action_socket, &log).await?;
        tracing::info!("criu restore started");
        let connection = sock
            .try_clone()
            .map_err(|e| ClientError::io("streamer socket", e))?;
        let (tx, requests) = mpsc::unbounded_channel();
        let request_loop =
            tokio::task::spawn_blocking(move || criu_stream::serve_requests(sock, names, tx));
        Ok(CriuRestore {
            child,
            requests,
            request_loop,
            connection,
            actions,
            log,
            started,
        })
    }

    /// Serves every file CRIU asks for until it exits; answers its post-restore (and,
    /// under `--fill-first`, its pre-resume once every page is in).
    pub async fn serve(mut self, mut image: Image<'_>, progress: &Progress) -> Result<Served> {
        let mut resume_when = image.resume_when.take();
        let mut held: Option<JoinHandle<()>> = None;
        let first_error: Arc<Mutex<Option<ClientError>>> = Arc::default();
        let timings: Arc<Mutex<Vec<FileServing>>> = Arc::default();
        let server = FileServer {
            files: image.files,
            inline: image.inline,
            left_out: image.left_out,
            chunks: image.chunks,
            progress,
            first_error: &first_error,
            timings: &timings,
            window: image.window,
        };
        let mut tasks: JoinSet<()> = JoinSet::new();
        let mut served = 0usize;
        let stderr_task = self.collect_stderr();
        let status = loop {
            tokio::select! {
                Some((name, fd)) = self.requests.recv() => {
                    served += 1;
                    server.spawn(&mut tasks, name, fd);
                }
                Some(req) = self.actions.next() => {
                    if req.action == "pre-resume" {
                        if let Some(all_in) = resume_when.take() {
                            // On a task of its own: CRIU's exit is still watched.
                            tracing::info!("pre-resume: held until every page is in");
                            held = Some(tokio::spawn(async move {
                                req.answer(all_in.wait().await).await;
                            }));
                            continue;
                        }
                    }
                    if req.action != "post-restore" {
                        req.answer(Ok(())).await;
                        continue;
                    }
                    tracing::info!("post-restore: verifying every served file");
                    // Every file CRIU asked for must have been served whole and verified.
                    while let Ok((name, fd)) = self.requests.try_recv() {
                        served += 1;
                        server.spawn(&mut tasks, name, fd);
                    }
                    while tasks.join_next().await.is_some() {}
                    let verdict = match first_error.lock().unwrap().as_ref() {
                        None => Ok(()),
                        Some(e) => Err(e.to_string()),
                    };
                    req.answer(verdict).await;
                }
                status = self.child.wait() => {
                    break status.map_err(|e| ClientError::io("waiting for CRIU", e))?
                }
            }
        };
        let restore_seconds = self.started.elapsed().as_secs_f64();
        tracing::info!(restore_seconds, "criu restore exited");
        let _ = self.connection.shutdown(std::net::Shutdown::Both);
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
        if let Some(h) = held {
            h.abort();
        }
        let _ = self.request_loop.await;
        let stderr = stderr_task.await.unwrap_or_default();
        let first_error = first_error.lock().unwrap().take();
        let timings = files::largest(std::mem::take(&mut *timings.lock().unwrap()));
        Ok(Served {
            status,
            restore_seconds,
            files_served: served,
            first_error,
            timings,
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
        })
    }

    /// CRIU's stderr, read to its end on a task of its own (a full pipe would stall it).
    fn collect_stderr(&mut self) -> JoinHandle<Vec<u8>> {
        let mut stderr = self.child.stderr.take();
        tokio::spawn(async move {
            let mut buf = Vec::new();
            if let Some(s) = stderr.as_mut() {
                let _ = tokio::io::AsyncReadExt::read_to_end(s, &mut buf).await;
            }
            buf
        })
    }
}

impl Served {
    /// The restore's outcome: a file that could not be served (exit 5 for a corrupt
    /// chunk, naming it) before CRIU's own failure, which carries its log.
    pub fn outcome(self, log: &Path) -> Result<()> {
        if let Some(e) = self.first_error {
            let criu_side = criu::failure("restore", log, &self.stderr);
            tracing::warn!("restore aborted before the process resumed: {e}\n{criu_side}");
            return Err(match e {
                // Keeps exit code 5 and names the chunk and file.
                e @ ClientError::ChunkCorrupt { .. } => e,
                other => ClientError::Criu(format!(
                    "restore aborted before the process resumed: {other}\n{criu_side}"
                )),
            });
        }
        if !self.status.success() {
            return Err(criu::failure("restore", log, &self.stderr));
        }
        Ok(())
    }
}
