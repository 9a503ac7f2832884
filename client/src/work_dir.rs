//! Short, private working directories for one CRIU run: the image streamer's socket
//! path must fit in `sun_path` (108 bytes), so they live under `/run/snapctl` (root) or
//! `/tmp`, named `<prefix>-<pid>-<nanos>`. `--spool` directories are made here too.
//! [`RemoveOnDrop`] guards what an export assembles before renaming it into place.

use std::path::{Path, PathBuf};

use crate::error::{ClientError, Result};

pub fn create(prefix: &str) -> Result<PathBuf> {
    let base = if Path::new("/run").is_dir() && nix::unistd::geteuid().is_root() {
        "/run/snapctl"
    } else {
        "/tmp"
    };
    create_in(Path::new(base), prefix)
}

/// A new directory `<prefix>-<pid>-<nanos>` under `base` (created if missing).
pub fn create_in(base: &Path, prefix: &str) -> Result<PathBuf> {
    std::fs::create_dir_all(base)
        .map_err(|e| ClientError::io(format!("creating {}", base.display()), e))?;
    let dir = base.join(format!("{prefix}-{}-{}", std::process::id(), unique()));
    std::fs::create_dir_all(&dir)
        .map_err(|e| ClientError::io(format!("creating {}", dir.display()), e))?;
    Ok(dir)
}

fn unique() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as u64)
}

/// A temporary file or directory, removed on drop unless disarmed.
pub struct RemoveOnDrop {
    pub path: PathBuf,
    is_dir: bool,
    armed: bool,
}

impl RemoveOnDrop {
    /// A directory at `path`, created empty (what an earlier run left there removed).
    pub fn fresh_dir(path: PathBuf) -> Result<Self> {
        if path.exists() {
            std::fs::remove_dir_all(&path).map_err(|e| {
                ClientError::io(format!("removing stale {}", crate::error::shown(&path)), e)
            })?;
        }
        std::fs::create_dir_all(&path)
            .map_err(|e| ClientError::io(format!("creating {}", crate::error::shown(&path)), e))?;
        Ok(RemoveOnDrop {
            path,
            is_dir: true,
            armed: true,
        })
    }

    /// A file the caller is about to write at `path`.
    pub fn file(path: PathBuf) -> Self {
        RemoveOnDrop {
            path,
            is_dir: false,
            armed: true,
        }
    }

    /// Keeps the path (it was renamed into place).
    pub fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if self.armed {
            let _ = if self.is_dir {
                std::fs::remove_dir_all(&self.path)
            } else {
                std::fs::remove_file(&self.path)
            };
        }
    }
}
