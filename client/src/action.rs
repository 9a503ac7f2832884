//! snapctl as CRIU's action script.
//!
//! CRIU runs `--action-script` at fixed points; snapctl answers three of them:
//! `post-dump` runs after every image is written and before the tasks are killed (a
//! non-zero exit makes CRIU resume them), `post-restore` runs after the tree is
//! restored and before it is resumed (a non-zero exit makes CRIU kill it), and
//! `pre-resume` runs after CRIU told its lazy-pages daemon "restore finished" and just
//! before the tasks run (CRIU only logs its exit code): `pull-restore --fill-first`
//! holds it until every page is in (cr-restore.c, `restore_root_task`). snapctl
//! passes its own executable as the script and the path of a control socket in
//! [`ENV_SOCKET`] (CRIU's environment reaches the script). The script connects, names
//! the action, and exits 0 only on an `ok` answer: the snapshot is committed, or every
//! byte CRIU was served verified. Other actions exit 0 at once.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

use crate::error::{ClientError, Result};

pub const ENV_SOCKET: &str = "SNAPCTL_ACTION_SOCKET";
const ENV_ACTION: &str = "CRTOOLS_SCRIPT_ACTION";
/// The actions snapctl answers; every other one is a no-op.
pub const DECIDING_ACTIONS: &[&str] = &["post-dump", "post-restore", "pre-resume"];

/// Called first thing in `main`: `None` unless CRIU started this process as an action
/// script; then whether CRIU may go on (the caller exits 0 on `Ok`, non-zero on `Err`).
pub fn run_if_action_script() -> Option<Result<()>> {
    let action = std::env::var(ENV_ACTION).ok()?;
    let Some(socket) = std::env::var_os(ENV_SOCKET) else {
        return Some(Ok(()));
    };
    if !DECIDING_ACTIONS.contains(&action.as_str()) {
        return Some(Ok(()));
    }
    let verdict = (|| -> std::io::Result<String> {
        let mut s = std::os::unix::net::UnixStream::connect(&socket)?;
        writeln!(s, "{action}")?;
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line)?;
        Ok(line.trim().to_string())
    })();
    Some(match verdict {
        Ok(v) if v == "ok" => Ok(()),
        Ok(v) => Err(ClientError::ActionScript { action, reason: v }),
        Err(e) => Err(ClientError::ActionScript {
            action,
            reason: format!("snapctl is gone: {e}"),
        }),
    })
}

/// The snapctl side: accepts the script's connections on a task of its own and hands
/// each named request over a channel, so `next` is cancel-safe inside `select!` (an
/// accept-then-read future dropped halfway would close the script's connection, and
/// CRIU would read that as a failed post-dump).
pub struct ActionServer {
    requests: tokio::sync::mpsc::Receiver<ActionRequest>,
    task: tokio::task::JoinHandle<()>,
}

pub struct ActionRequest {
    pub action: String,
    stream: UnixStream,
}

impl ActionServer {
    pub fn bind(path: &Path) -> std::io::Result<Self> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
        let (tx, requests) = tokio::sync::mpsc::channel(4);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let mut reader = tokio::io::BufReader::new(stream);
                let mut line = String::new();
                if reader.read_line(&mut line).await.is_err() {
                    continue;
                }
                let req = ActionRequest {
                    action: line.trim().to_string(),
                    stream: reader.into_inner(),
                };
                if tx.send(req).await.is_err() {
                    break;
                }
            }
        });
        Ok(ActionServer { requests, task })
    }

    /// The next request from CRIU's action script; `None` once the server stopped.
    pub async fn next(&mut self) -> Option<ActionRequest> {
        self.requests.recv().await
    }
}

impl Drop for ActionServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ActionRequest {
    /// `Ok` lets CRIU go on; `Err(reason)` makes it back out (resume / kill the tree).
    pub async fn answer(mut self, verdict: Result<(), String>) {
        let line = match verdict {
            Ok(()) => "ok\n".to_string(),
            Err(reason) => format!("fail: {}\n", reason.replace('\n', " ")),
        };
        let _ = self.stream.write_all(line.as_bytes()).await;
    }
}
