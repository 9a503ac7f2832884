//! Blob uploads (distribution spec, "Pushing blobs"): monolithic (`POST ?digest=`),
//! `POST` then `PUT`, and chunked (`POST`, `PATCH`..., `PUT ?digest=`).
//!
//! An upload session is registry-local: its bytes go to a spool file under the
//! registry's data directory (`oci-uploads/<id>`) while a SHA-256 runs over them.
//! At the closing `PUT` the digest and size are checked, the blob is stored through
//! the chunker (ingest.rs) and the spool file is removed. Until then nothing is
//! visible: a session that fails, is cancelled (`DELETE`) or idles past
//! [`SESSION_IDLE`] leaves nothing behind; a restart forgets sessions (clients start
//! the upload again) and clears the spool directory.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use tokio::io::AsyncWriteExt;

use crate::digest::{OciDigest, Sha256};
use crate::error::{OciError, Result};

/// A session with no request for this long is dropped with its spool file.
pub const SESSION_IDLE: Duration = Duration::from_secs(3600);

/// A blob whose bytes are in a local file and whose digest and size were checked.
#[derive(Debug)]
pub struct Spooled {
    pub path: PathBuf,
    pub size: u64,
    pub digest: OciDigest,
}

/// One upload in progress.
struct Session {
    repo: String,
    path: PathBuf,
    size: u64,
    hash: Sha256,
    last: Instant,
}

/// The upload sessions of one gateway.
pub struct Uploads {
    dir: PathBuf,
    /// Bytes received (metrics.rs `snapreg_oci_upload_bytes`).
    received: prometheus_client::metrics::counter::Counter,
    sessions: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Session>>>>,
}

/// Where an upload stands: bytes received so far.
pub struct Status {
    pub size: u64,
}

impl Uploads {
    /// Uploads spooled under `dir`, which is emptied now (sessions do not survive a
    /// restart).
    pub fn new(
        dir: &Path,
        received: prometheus_client::metrics::counter::Counter,
    ) -> std::io::Result<Uploads> {
        if dir.exists() {
            std::fs::remove_dir_all(dir)?;
        }
        std::fs::create_dir_all(dir)?;
        Ok(Uploads {
            dir: dir.to_path_buf(),
            received,
            sessions: Mutex::default(),
        })
    }

    /// Opens a session for `repo`; returns its id.
    pub async fn start(&self, repo: &str) -> Result<String> {
        let id = format!("{:032x}", rand::random::<u128>());
        let path = self.dir.join(&id);
        tokio::fs::File::create(&path)
            .await
            .map_err(|e| spool_error(&path, e))?;
        let session = Session {
            repo: repo.to_string(),
            path,
            size: 0,
            hash: Sha256::default(),
            last: Instant::now(),
        };
        self.sessions
            .lock()
            .unwrap()
            .insert(id.clone(), Arc::new(tokio::sync::Mutex::new(session)));
        Ok(id)
    }

    fn session(&self, repo: &str, id: &str) -> Result<Arc<tokio::sync::Mutex<Session>>> {
        let s = self.sessions.lock().unwrap().get(id).cloned();
        match s {
            Some(s) if s.try_lock().map_or(true, |s| s.repo == repo) => Ok(s),
            _ => Err(OciError::upload_unknown(id)),
        }
    }

    pub async fn status(&self, repo: &str, id: &str) -> Result<Status> {
        let s = self.session(repo, id)?;
        let s = s.lock().await;
        Ok(Status { size: s.size })
    }

    /// Appends a request body. `range` is the `Content-Range` start and end (inclusive)
    /// when the client sent one: the start must be where the upload stands.
    pub async fn append(
        &self,
        repo: &str,
        id: &str,
        range: Option<(u64, u64)>,
        body: impl Stream<Item = std::result::Result<Bytes, axum::Error>>,
    ) -> Result<Status> {
        let s = match self.session(repo, id) {
            Ok(s) => s,
            Err(e) => return Err(drained(body, e).await),
        };
        let mut s = s.lock().await;
        if let Some((start, _)) = range {
            if start != s.size {
                let e = OciError::new(
                    axum::http::StatusCode::RANGE_NOT_SATISFIABLE,
                    "BLOB_UPLOAD_INVALID",
                    format!("this chunk starts at byte {start}, but the upload has {} bytes; send from there", s.size),
                );
                return Err(drained(body, e).await);
            }
        }
        let (before, hash_before) = (s.size, s.hash.clone());
        let written = write_body(&mut s, body).await;
        self.received.inc_by(s.size.saturating_sub(before));
        if let Err(e) = written {
            // Whatever part of the body arrived is dropped: the upload stays where it was.
            truncate(&s.path, before).await;
            (s.size, s.hash) = (before, hash_before);
            return Err(e);
        }
        if let Some((start, end)) = range {
            if end + 1 - start != s.size - before {
                let got = s.size - before;
                truncate(&s.path, before).await;
                (s.size, s.hash) = (before, hash_before);
                return Err(OciError::new(
                    axum::http::StatusCode::RANGE_NOT_SATISFIABLE,
                    "BLOB_UPLOAD_INVALID",
                    format!("Content-Range says {start}-{end} but the body had {got} bytes"),
                ));
            }
        }
        s.last = Instant::now();
        Ok(Status { size: s.size })
    }

    /// Ends a session: checks the digest, then hands the spooled blob to `store`.
    /// The session and its spool file are gone afterwards, whatever happened.
    pub async fn finish<F, Fut, T>(
        &self,
        repo: &str,
        id: &str,
        digest: &OciDigest,
        store: F,
    ) -> Result<T>
    where
        F: FnOnce(Spooled) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let s = self.session(repo, id)?;
        self.sessions.lock().unwrap().remove(id);
        let s = s.lock().await;
        let _remove = RemoveOnDrop(s.path.clone());
        let got = s.hash.current();
        if got != *digest {
            return Err(OciError::digest_invalid(format!(
                "the {} bytes uploaded hash to {got}, not {digest}; nothing was stored",
                s.size
            )));
        }
        store(Spooled {
            path: s.path.clone(),
            size: s.size,
            digest: *digest,
        })
        .await
    }

    /// Cancels a session (`DELETE`).
    pub async fn cancel(&self, repo: &str, id: &str) -> Result<()> {
        let s = self.session(repo, id)?;
        self.sessions.lock().unwrap().remove(id);
        let s = s.lock().await;
        let _ = tokio::fs::remove_file(&s.path).await;
        Ok(())
    }

    /// Drops the sessions idle past [`SESSION_IDLE`]; returns how many.
    pub async fn expire(&self) -> usize {
        let all: Vec<_> = self
            .sessions
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut n = 0;
        for (id, s) in all {
            let Ok(s) = s.try_lock() else { continue };
            if s.last.elapsed() > SESSION_IDLE {
                self.sessions.lock().unwrap().remove(&id);
                let _ = tokio::fs::remove_file(&s.path).await;
                n += 1;
            }
        }
        n
    }
}

async fn write_body(
    s: &mut Session,
    body: impl Stream<Item = std::result::Result<Bytes, axum::Error>>,
) -> Result<()> {
    let mut f = tokio::fs::OpenOptions::new()
        .append(true)
        .open(&s.path)
        .await
        .map_err(|e| spool_error(&s.path, e))?;
    let mut body = std::pin::pin!(body);
    while let Some(piece) = body.next().await {
        let piece = piece.map_err(|e| {
            OciError::upload_invalid(format!(
                "the request body broke off after {} bytes: {e}",
                s.size
            ))
        })?;
        f.write_all(&piece)
            .await
            .map_err(|e| spool_error(&s.path, e))?;
        s.hash.update(&piece);
        s.size += piece.len() as u64;
    }
    f.flush().await.map_err(|e| spool_error(&s.path, e))?;
    Ok(())
}

/// A refusal sent only once the client has sent its body (up to [`MAX_DRAIN`]):
/// answering while it still sends makes HTTP/1.1 clients see a reset instead of the
/// answer.
pub(crate) async fn drained(
    body: impl Stream<Item = std::result::Result<Bytes, axum::Error>>,
    e: OciError,
) -> OciError {
    let mut body = std::pin::pin!(body);
    let mut n = 0usize;
    while let Some(Ok(piece)) = body.next().await {
        n += piece.len();
        if n > MAX_DRAIN {
            break;
        }
    }
    e
}

/// Most of a refused body read (and dropped) before answering.
const MAX_DRAIN: usize = 64 << 20;

async fn truncate(path: &Path, len: u64) {
    if let Ok(f) = tokio::fs::OpenOptions::new().write(true).open(path).await {
        let _ = f.set_len(len).await;
    }
}

fn spool_error(path: &Path, e: std::io::Error) -> OciError {
    OciError::new(
        axum::http::StatusCode::INSUFFICIENT_STORAGE,
        "UNKNOWN",
        format!(
            "the registry cannot spool the upload at {}: {e}; free space under its data \
             directory and push again",
            path.display()
        ),
    )
}

/// Removes a spool (or scratch) file when dropped, however the work ends.
pub(crate) struct RemoveOnDrop(pub(crate) PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
