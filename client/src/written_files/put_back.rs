//! Putting the captured files back before CRIU reopens them.
//!
//! | what is at the path | what happens | reported as |
//! |---|---|---|
//! | nothing | parents created, the file written with its mode and mtime | `created` |
//! | the same bytes and mode | left alone | `kept` |
//! | anything else (other bytes, mode, a symlink) | hard-linked to `PATH.snapreg-moved-aside-<unix seconds>`, then replaced | `moved_aside` |
//! | a directory or another non-file | refused: the restore stops before CRIU | error |
//!
//! Every write goes to `.NAME.snapreg-partial-<pid>` in the same directory, is
//! fsync'd and renamed over the name: a full disk or a crash leaves the name as it was
//! (the partial file is removed on error). The moved-aside name is a hard link taken
//! before the rename, so the path never disappears in between.

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use snapreg_proto::manifest::{annotations, Extent, ExternalFile, Manifest};

use crate::error::{ClientError, Result};
use crate::fetch::Chunks;

/// What a moved-aside file's name carries after the original path.
pub const MOVED_ASIDE: &str = ".snapreg-moved-aside-";

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Created,
    Kept,
    MovedAside,
}

/// What the restore did with one written file.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PutBack {
    pub path: String,
    pub action: Action,
    /// Where the file that was in the way went (`moved_aside` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub moved_aside_to: Option<String>,
    pub size: u64,
}

/// The external files a restore still checks: all but the written ones it puts back.
pub fn left_to_check(m: &Manifest) -> Vec<ExternalFile> {
    let put_back: Vec<&str> = m
        .written_files_layer()
        .map(|l| l.files.iter().map(|f| f.path.as_str()).collect())
        .unwrap_or_default();
    m.criu
        .iter()
        .flat_map(|c| &c.external_files)
        .filter(|f| !(f.written && put_back.contains(&f.layer_path())))
        .cloned()
        .collect()
}

/// Puts back every file of `m`'s written-files layer, its bytes read through
/// `chunks` (verified). One file is in memory at a time (a captured file is at most
/// the checkpoint's per-file limit).
pub async fn put_back_layer(m: &Manifest, chunks: &Chunks) -> Result<Vec<PutBack>> {
    let Some(layer) = m.written_files_layer() else {
        return Ok(Vec::new());
    };
    refuse_while_the_original_writes(m)?;
    let records = m
        .criu
        .as_ref()
        .map(|c| c.external_files.as_slice())
        .unwrap_or_default();
    let mut out = Vec::new();
    for f in &layer.files {
        let Some(record) = records
            .iter()
            .find(|r| r.written && r.layer_path() == f.path)
        else {
            tracing::warn!(path = %f.path, "a captured file no external file names: not put back");
            continue;
        };
        let mut content = BytesMut::with_capacity(f.size as usize);
        for e in &f.extents {
            match *e {
                Extent::Chunk { chunk, .. } => {
                    content.extend_from_slice(&chunks.get(chunk, &record.path).await?)
                }
                Extent::Zero { zero } => content.resize(content.len() + zero as usize, 0),
            }
        }
        let (path, mode, mtime) = (PathBuf::from(&record.path), f.mode, record.mtime);
        let done = tokio::task::spawn_blocking(move || {
            put_back(&path, mode, mtime, &content, SystemTime::now())
        })
        .await
        .map_err(|e| ClientError::io("putting back written files", std::io::Error::other(e)))??;
        tracing::info!(path = %done.path, action = ?done.action, "written file put back");
        out.push(done);
    }
    Ok(out)
}

/// The original tree still running here and writing one of the files (a restore on
/// the node it was checkpointed on with --leave-running): moving its file aside would
/// leave it writing under the moved-aside name, and CRIU would fail on its PIDs anyway.
fn refuse_while_the_original_writes(m: &Manifest) -> Result<()> {
    let root = m
        .annotations
        .get(annotations::ROOT_PID)
        .and_then(|p| p.parse::<u32>().ok());
    let Some(Ok(pids)) = root.map(crate::process::tree) else {
        return Ok(());
    };
    let layer_paths: Vec<&str> = m
        .written_files_layer()
        .map(|l| l.files.iter().map(|f| f.path.as_str()).collect())
        .unwrap_or_default();
    let busy: Vec<String> = super::find::written(&pids)
        .into_iter()
        .filter(|w| layer_paths.contains(&w.path.trim_start_matches('/')))
        .map(|w| format!("{} (PID {})", w.path, w.pid))
        .collect();
    if busy.is_empty() {
        return Ok(());
    }
    Err(ClientError::Aborted(format!(
        "the checkpointed process still runs here and writes {}: stop it before restoring (CRIU restores its PIDs); nothing was put back or started",
        busy.join(", ")
    )))
}

/// Puts `content` at `path` with `mode` (permission bits) and `mtime` (unix seconds),
/// moving a different file in the way aside; `now` names the moved-aside file.
pub fn put_back(
    path: &Path,
    mode: u32,
    mtime: i64,
    content: &[u8],
    now: SystemTime,
) -> Result<PutBack> {
    let fail = |source: std::io::Error| ClientError::put_back(path, source);
    refuse_system_paths(path).map_err(fail)?;
    let mode = mode & 0o7777;
    let report = |action, moved_aside_to| PutBack {
        path: path.display().to_string(),
        action,
        moved_aside_to,
        size: content.len() as u64,
    };
    let in_the_way = match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => {
            let e = std::io::Error::other("a directory is in the way: move it and restore again");
            return Err(fail(e));
        }
        Ok(meta) => {
            if meta.is_file()
                && meta.mode() & 0o7777 == mode
                && same_bytes(path, &meta, content).map_err(fail)?
            {
                return Ok(report(Action::Kept, None));
            }
            true
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(fail(e)),
    };
    let parent = path.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(parent).map_err(fail)?;
    let staged = stage(path, mode, mtime, content).map_err(fail)?;
    let aside = match in_the_way {
        true => Some(
            move_aside(path, now)
                .inspect_err(|_| {
                    let _ = std::fs::remove_file(&staged);
                })
                .map_err(fail)?,
        ),
        false => None,
    };
    if let Err(e) = std::fs::rename(&staged, path) {
        let _ = std::fs::remove_file(&staged);
        return Err(fail(e));
    }
    if let Ok(dir) = std::fs::File::open(parent) {
        let _ = dir.sync_all();
    }
    Ok(match aside {
        Some(a) => report(Action::MovedAside, Some(a.display().to_string())),
        None => report(Action::Created, None),
    })
}

/// Never writes into the kernel's trees, whatever a manifest says.
fn refuse_system_paths(path: &Path) -> std::io::Result<()> {
    let bad = !path.is_absolute()
        || ["/proc", "/sys", "/dev"]
            .iter()
            .any(|p| path.starts_with(p))
        || path
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir));
    match bad {
        true => Err(std::io::Error::other(
            "not a path a restore writes (absolute, outside /proc, /sys, /dev)",
        )),
        false => Ok(()),
    }
}

fn same_bytes(path: &Path, meta: &std::fs::Metadata, content: &[u8]) -> std::io::Result<bool> {
    if meta.len() != content.len() as u64 {
        return Ok(false);
    }
    let mut buf = Vec::with_capacity(content.len());
    std::fs::File::open(path)?.read_to_end(&mut buf)?;
    Ok(buf == content)
}

/// The content in a partial file beside `path`, whole and fsync'd; removed on error.
fn stage(path: &Path, mode: u32, mtime: i64, content: &[u8]) -> std::io::Result<PathBuf> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let staged = path.with_file_name(format!(".{name}.snapreg-partial-{}", std::process::id()));
    let _ = std::fs::remove_file(&staged);
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&staged)?;
        f.write_all(content)?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.set_modified(UNIX_EPOCH + Duration::from_secs(mtime.max(0) as u64))?;
        f.sync_all()
    })();
    match written {
        Ok(()) => Ok(staged),
        Err(e) => {
            let _ = std::fs::remove_file(&staged);
            Err(e)
        }
    }
}

/// A second name for the file in the way, `PATH.snapreg-moved-aside-<unix seconds>`
/// (`-2`, `-3`… after it when taken); a rename where the filesystem has no hard links.
fn move_aside(path: &Path, now: SystemTime) -> std::io::Result<PathBuf> {
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let base = format!("{}{MOVED_ASIDE}{secs}", path.display());
    for n in 1..1000 {
        let aside = PathBuf::from(if n == 1 {
            base.clone()
        } else {
            format!("{base}-{n}")
        });
        match std::fs::hard_link(path, &aside) {
            Ok(()) => return Ok(aside),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(_) => match std::fs::symlink_metadata(&aside) {
                Ok(_) => continue,
                Err(_) => return std::fs::rename(path, &aside).map(|()| aside),
            },
        }
    }
    Err(std::io::Error::other(format!(
        "{base}-2 … -999 are all taken: clear them out"
    )))
}

#[cfg(test)]
mod tests;
