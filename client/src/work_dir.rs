//! Short, private working directories for one CRIU run: the image streamer's socket
//! path must fit in `sun_path` (108 bytes), so they live under `/run/snapctl` (root) or
//! `/tmp`, named `<prefix>-<pid>-<nanos>`. `--spool` directories are made here too.
//! [`RemoveOnDrop`] guards what an export assembles before renaming it into place.
//!
//! A run's directory outlives it: CRIU's log in it is what an error (and a report's
//! `criu_log`) points at. So that a node restoring all day does not fill `/run` (a
//! tmpfs: memory) or its spool, each new directory prunes its base down to the newest
//! [`KEEP`] directories of runs that have ended. Never pruned: a directory whose PID
//! is alive, and one that holds CRIU images (`*.img`: a spooled dump whose push
//! failed, kept for `snapctl push`).

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

/// Directories of ended runs kept under a base: the last operations' CRIU logs.
pub const KEEP: usize = 32;

/// A new directory `<prefix>-<pid>-<nanos>` under `base` (created if missing); the
/// base is pruned to [`KEEP`] ended runs.
pub fn create_in(base: &Path, prefix: &str) -> Result<PathBuf> {
    std::fs::create_dir_all(base)
        .map_err(|e| ClientError::io(format!("creating {}", base.display()), e))?;
    let dir = base.join(format!("{prefix}-{}-{}", std::process::id(), unique()));
    std::fs::create_dir_all(&dir)
        .map_err(|e| ClientError::io(format!("creating {}", dir.display()), e))?;
    prune(base, KEEP);
    Ok(dir)
}

/// Removes all but the newest `keep` (by modification time) directories under `base`
/// named `<prefix>-<pid>-<nanos>` whose PID is not running and that hold no image.
/// Best effort: another snapctl may be pruning too, and what cannot be read or
/// removed stays.
fn prune(base: &Path, keep: usize) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    let mut ended: Vec<(std::time::SystemTime, PathBuf)> = entries
        .filter_map(|e| {
            let e = e.ok()?;
            let pid = run_pid(e.file_name().to_str()?)?;
            let meta = e.metadata().ok()?;
            let alive = Path::new("/proc").join(pid.to_string()).exists();
            let modified = meta.modified().ok()?;
            (meta.is_dir() && !alive && !holds_images(&e.path())).then(|| (modified, e.path()))
        })
        .collect();
    ended.sort_by_key(|(t, _)| std::cmp::Reverse(*t));
    for (_, path) in ended.into_iter().skip(keep) {
        let _ = std::fs::remove_dir_all(path);
    }
}

/// Whether `dir` holds a CRIU image file (or cannot be read: then it is kept too).
fn holds_images(dir: &Path) -> bool {
    std::fs::read_dir(dir).map_or(true, |entries| {
        entries
            .flatten()
            .any(|e| e.path().extension().is_some_and(|x| x == "img"))
    })
}

/// The PID in the name of a directory snapctl made, `<prefix>-<pid>-<nanos>` with
/// one of snapctl's prefixes (`rs`, `ck`, `ck-action`, a spool's `ck-<pid>`); `None`
/// for any other name, so nothing else in a shared base (`/tmp`, a `--spool DIR`) is
/// ever pruned.
fn run_pid(name: &str) -> Option<u32> {
    let mut fields = name.rsplitn(3, '-');
    let nanos: u64 = fields.next()?.parse().ok()?;
    let pid = fields.next()?.parse().ok()?;
    let prefix = fields.next()?;
    let spool = prefix
        .strip_prefix("ck-")
        .is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    let ours = matches!(prefix, "rs" | "ck" | "ck-action") || spool;
    (ours && nanos < 1_000_000_000).then_some(pid)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_names_give_their_pid_and_nothing_else_does() {
        assert_eq!(run_pid("rs-4242-123456"), Some(4242));
        assert_eq!(run_pid("ck-action-77-9"), Some(77));
        assert_eq!(run_pid("ck-1024-3933-743577976"), Some(3933));
        for other in [
            "plain-spool",
            "rs-x-1",
            "rs-1-x",
            "-5-6",
            "rs",
            "lost+found",
            "backup-2024-12",
            "ck-x-1-2",
            "rs-1-1000000000",
        ] {
            assert_eq!(run_pid(other), None, "{other}");
        }
    }

    #[test]
    fn pruning_keeps_the_newest_ended_runs_and_every_live_one() {
        let base = tempfile::tempdir().unwrap();
        let dead = u32::MAX - 1; // above pid_max: never a running process
        let mut ended = Vec::new();
        for i in 0..5u64 {
            let d = base.path().join(format!("rs-{dead}-{i}"));
            std::fs::create_dir(&d).unwrap();
            std::fs::write(d.join("restore.log"), "log").unwrap();
            let t = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000 + i);
            std::fs::File::open(&d).unwrap().set_modified(t).unwrap();
            ended.push(d);
        }
        let live = base.path().join(format!("rs-{}-1", std::process::id()));
        std::fs::create_dir(&live).unwrap();
        let other = base.path().join("plain-spool");
        std::fs::create_dir(&other).unwrap();
        // A spooled dump whose push failed: the oldest of all, still kept.
        let kept = base.path().join(format!("ck-7-{dead}-1"));
        std::fs::create_dir(&kept).unwrap();
        std::fs::write(kept.join("pages-1.img"), "pages").unwrap();
        let t = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1);
        std::fs::File::open(&kept).unwrap().set_modified(t).unwrap();

        prune(base.path(), 2);

        let exists: Vec<bool> = ended.iter().map(|d| d.exists()).collect();
        assert_eq!(
            exists,
            [false, false, false, true, true],
            "the two newest stay"
        );
        assert!(
            live.exists(),
            "a running process's directory is never removed"
        );
        assert!(
            other.exists(),
            "a directory not named like a run is not ours"
        );
        assert!(
            kept.join("pages-1.img").exists(),
            "images waiting for `snapctl push` are never pruned"
        );

        // Through create_in: the new directory (this process, alive) is kept too.
        let made = create_in(base.path(), "ck").unwrap();
        assert!(made.exists() && live.exists());
    }
}
