//! Short, private working directories for one CRIU run: the image streamer's socket
//! path must fit in `sun_path` (108 bytes), so they live under `/run/snapctl` (root) or
//! `/tmp`, named `<prefix>-<pid>-<nanos>`. `--spool` directories are made here too.

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
