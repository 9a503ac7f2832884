//! Where a dump goes: streamed into the registry while the tasks are frozen, or spooled
//! to a directory first and pushed after CRIU has released them.
//!
//! | `--spool` | route |
//! |---|---|
//! | `off` (default without `--cuda`) | streamed |
//! | `DIR` | spooled to DIR |
//! | `auto` (default with `--cuda`) | spooled to `snapctl-spool` in the memory directory (`/dev/shm`; `snapctl-spool-huge`, a tmpfs of huge pages, with `--spool-huge-pages`: huge_spool.rs) when the tree fits, else streamed |
//!
//! Why `auto` exists: a streamed dump keeps the tasks frozen until every chunk is
//! hashed, compressed and durable in the registry (so a failed push resumes them and
//! loses nothing); a CUDA worker's dump carries its device memory (11 GB for the
//! medium preset) and stays frozen 15 s that way, against 5–9 s into memory
//! (bench/RESULTS.md). A spooled dump is pushed after CRIU killed the tasks: if that
//! push fails, the images stay in the spool directory and the error says how to push
//! them, so still nothing is lost.
//!
//! "Fits", decided after the CUDA checkpoint moved device memory into host memory: the
//! tree's resident memory (the sum of `Rss` in each task's `smaps_rollup`, an upper
//! bound of what CRIU writes) plus an eighth and 256 MiB must be below each of
//! - the spool's free space (it must be a tmpfs: a disk would be slower than the
//!   registry);
//! - `MemAvailable` (the tasks still hold their memory while the dump is written);
//! - the headroom (`memory.max - memory.current`) of snapctl's cgroup and each of its
//!   ancestors, since CRIU, its child, is charged for the tmpfs pages.
//!
//! Separated mode (`--weights-service`) always streams: its weights are not in the
//! dump, which is small and fast to stream. A tree holding huge pages cannot stream;
//! `auto` then spools or refuses.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use super::{huge_spool, CheckpointOptions};
use crate::error::{ClientError, Result};
use crate::process;

/// The `--spool` choice.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Spool {
    #[default]
    Off,
    Dir(PathBuf),
    Auto,
}

impl FromStr for Spool {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        Ok(match s {
            "off" => Spool::Off,
            "auto" => Spool::Auto,
            dir => Spool::Dir(PathBuf::from(dir)),
        })
    }
}

/// Where `auto` spools unless told otherwise.
pub const MEMORY_DIR: &str = "/dev/shm";

/// The route a dump took, and why (in the report).
#[derive(Clone, Debug, serde::Serialize)]
pub struct Route {
    /// The directory the images were dumped into; `None` when streamed.
    pub spooled_to: Option<PathBuf>,
    pub reason: String,
}

/// What `auto` compares the tree against, in bytes.
#[derive(Clone, Copy, Debug)]
struct Room {
    tmpfs_free: u64,
    mem_available: u64,
    cgroup_headroom: Option<u64>,
}

/// Picks the route for the tree `pids` (after any CUDA checkpoint).
pub(super) fn choose(opts: &CheckpointOptions, pids: &[u32]) -> Result<Route> {
    match &opts.spool {
        Spool::Off => Ok(Route {
            spooled_to: None,
            reason: "streamed (--spool off)".into(),
        }),
        Spool::Dir(dir) => Ok(Route {
            spooled_to: Some(dir.clone()),
            reason: format!("spooled to {} (--spool)", dir.display()),
        }),
        Spool::Auto if opts.weights_service.is_some() => Ok(Route {
            spooled_to: None,
            reason: "streamed (auto: separated mode's dump holds no weights)".into(),
        }),
        Spool::Auto => {
            let tree = resident_bytes(pids);
            let (spool, pages) = huge_spool::prepare(&opts.memory_spool_dir, opts.spool_huge_pages);
            let verdict = room(&spool).and_then(|r| fits(tree, r));
            match verdict {
                Ok(why) => Ok(Route {
                    reason: format!("spooled to {} (auto: {why}; {pages})", spool.display()),
                    spooled_to: Some(spool),
                }),
                Err(why) => {
                    process::refuse_huge_pages(pids).map_err(|e| {
                        ClientError::Usage(format!("{e} (--spool auto could not: {why})"))
                    })?;
                    Ok(Route {
                        spooled_to: None,
                        reason: format!("streamed (auto: {why})"),
                    })
                }
            }
        }
    }
}

/// Whether a tree of `tree` resident bytes fits in `room`: Ok(why) or Err(why not).
fn fits(tree: u64, room: Room) -> std::result::Result<String, String> {
    let need = tree + tree / 8 + (256 << 20);
    let limits = [
        ("free in the memory directory", Some(room.tmpfs_free)),
        ("MemAvailable", Some(room.mem_available)),
        ("cgroup headroom", room.cgroup_headroom),
    ];
    for (what, limit) in limits {
        if let Some(have) = limit.filter(|&have| have < need) {
            return Err(format!(
                "the tree's {} resident needs {}, {what} is {}",
                gb(tree),
                gb(need),
                gb(have)
            ));
        }
    }
    Ok(format!(
        "the tree's {} resident fits in {} free",
        gb(tree),
        gb(room.tmpfs_free)
    ))
}

fn gb(bytes: u64) -> String {
    format!("{:.2} GB", bytes as f64 / 1e9)
}

/// Sum of `Rss` over the tasks' `smaps_rollup` (shared pages count once per task:
/// an overestimate, which is the safe side).
fn resident_bytes(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok())
        .filter_map(|s| kib_field(&s, "Rss:"))
        .sum()
}

/// A `Name:  123 kB` field of a /proc file, in bytes.
fn kib_field(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .map(|kib| kib << 10)
}

fn room(dir: &Path) -> std::result::Result<Room, String> {
    let fs = nix::sys::statfs::statfs(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if fs.filesystem_type() != nix::sys::statfs::TMPFS_MAGIC {
        return Err(format!("{} is not a tmpfs", dir.display()));
    }
    let vfs = nix::sys::statvfs::statvfs(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    Ok(Room {
        tmpfs_free: vfs.blocks_available() * vfs.fragment_size(),
        mem_available: kib_field(&meminfo, "MemAvailable:").ok_or("no MemAvailable")?,
        cgroup_headroom: cgroup_headroom(),
    })
}

/// The least `memory.max - memory.current` of this process's cgroup (v2) and its
/// ancestors; `None` where no limit is set or cgroup v2 is not mounted.
fn cgroup_headroom() -> Option<u64> {
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = own.lines().find_map(|l| l.strip_prefix("0::"))?;
    let mut dir = Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/'));
    let mut least: Option<u64> = None;
    loop {
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).ok();
        if let (Some(max), Some(current)) = (read("memory.max"), read("memory.current")) {
            if let (Ok(max), Ok(current)) = (max.trim().parse::<u64>(), current.trim().parse()) {
                let headroom = max.saturating_sub(current);
                least = Some(least.map_or(headroom, |l| l.min(headroom)));
            }
        }
        if dir == Path::new("/sys/fs/cgroup") || !dir.pop() {
            return least;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GB: u64 = 1_000_000_000;

    fn room(tmpfs: u64, mem: u64, cg: Option<u64>) -> Room {
        Room {
            tmpfs_free: tmpfs,
            mem_available: mem,
            cgroup_headroom: cg,
        }
    }

    #[test]
    fn a_tree_fits_only_below_every_limit_with_headroom() {
        assert!(fits(11 * GB, room(64 * GB, 100 * GB, None)).is_ok());
        let why = fits(11 * GB, room(12 * GB, 100 * GB, None)).unwrap_err();
        assert!(
            why.contains("free in the memory directory is 12.00 GB"),
            "{why}"
        );
        let why = fits(11 * GB, room(64 * GB, 10 * GB, None)).unwrap_err();
        assert!(why.contains("MemAvailable"), "{why}");
        let why = fits(11 * GB, room(64 * GB, 100 * GB, Some(12 * GB))).unwrap_err();
        assert!(why.contains("cgroup headroom"), "{why}");
        assert!(fits(11 * GB, room(64 * GB, 100 * GB, Some(20 * GB))).is_ok());
    }

    #[test]
    fn spool_values_parse() {
        assert_eq!("off".parse::<Spool>().unwrap(), Spool::Off);
        assert_eq!("auto".parse::<Spool>().unwrap(), Spool::Auto);
        assert_eq!(
            "/tmp/x".parse::<Spool>().unwrap(),
            Spool::Dir("/tmp/x".into())
        );
    }

    #[test]
    fn this_process_has_resident_memory_and_dev_shm_is_measured() {
        assert!(resident_bytes(&[std::process::id()]) > 0);
        if let Ok(r) = super::room(Path::new(MEMORY_DIR)) {
            assert!(r.mem_available > 0);
        }
        assert!(super::room(Path::new("/proc")).is_err());
    }
}
