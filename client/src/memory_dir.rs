//! Room in a memory directory (a tmpfs, `/dev/shm` by default) for images that pass
//! through it: a checkpoint spooled there before its push (checkpoint/route.rs), a
//! restore's files staged there before CRIU reads them (restore/stage.rs).
//!
//! Bytes written to a tmpfs are memory, so "fits" is checked against three limits:
//! - the directory's free space (it must be a tmpfs: a disk would be slower than the
//!   path it replaces);
//! - `MemAvailable`;
//! - the headroom (`memory.max - memory.current`) of snapctl's cgroup and each of its
//!   ancestors, since snapctl (or CRIU, its child) is charged for the tmpfs pages.
//!
//! Every need carries an eighth and 256 MiB of headroom on top.

use std::path::Path;

/// The memory directory used unless told otherwise.
pub const MEMORY_DIR: &str = "/dev/shm";

/// What a memory directory has room for, in bytes.
#[derive(Clone, Copy, Debug)]
pub struct Room {
    pub tmpfs_free: u64,
    pub mem_available: u64,
    pub cgroup_headroom: Option<u64>,
}

/// What must fit: `in_dir` bytes written into the directory, `in_memory` bytes of
/// memory taken meanwhile (the files plus whatever else the operation holds).
#[derive(Clone, Copy, Debug)]
pub struct Need {
    pub in_dir: u64,
    pub in_memory: u64,
}

/// Whether `need` (described as `what`, e.g. "the tree's 11.57 GB resident") fits in
/// `room` with headroom: Ok(why) or Err(why not), both for a report.
pub fn fits(what: &str, need: Need, room: Room) -> Result<String, String> {
    let pad = |b: u64| b + b / 8 + (256 << 20);
    let limits = [
        (
            "free in the memory directory",
            pad(need.in_dir),
            Some(room.tmpfs_free),
        ),
        (
            "MemAvailable",
            pad(need.in_memory),
            Some(room.mem_available),
        ),
        ("cgroup headroom", pad(need.in_memory), room.cgroup_headroom),
    ];
    for (limit, need, have) in limits {
        if let Some(have) = have.filter(|&have| have < need) {
            return Err(format!(
                "{what} needs {}, {limit} is {}",
                gb(need),
                gb(have)
            ));
        }
    }
    Ok(format!("{what} fits in {} free", gb(room.tmpfs_free)))
}

pub fn gb(bytes: u64) -> String {
    format!("{:.2} GB", bytes as f64 / 1e9)
}

/// The room in `dir`, which must be a tmpfs.
pub fn room(dir: &Path) -> Result<Room, String> {
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

/// A `Name:  123 kB` field of a /proc file, in bytes.
pub fn kib_field(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .map(|kib| kib << 10)
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

    fn same(b: u64) -> Need {
        Need {
            in_dir: b,
            in_memory: b,
        }
    }

    #[test]
    fn a_need_fits_only_below_every_limit_with_headroom() {
        assert!(fits("x", same(11 * GB), room(64 * GB, 100 * GB, None)).is_ok());
        let why = fits("x", same(11 * GB), room(12 * GB, 100 * GB, None)).unwrap_err();
        assert!(
            why.contains("free in the memory directory is 12.00 GB"),
            "{why}"
        );
        let why = fits("x", same(11 * GB), room(64 * GB, 10 * GB, None)).unwrap_err();
        assert!(why.contains("MemAvailable"), "{why}");
        let why = fits("x", same(11 * GB), room(64 * GB, 100 * GB, Some(12 * GB))).unwrap_err();
        assert!(why.contains("cgroup headroom"), "{why}");
        assert!(fits("x", same(11 * GB), room(64 * GB, 100 * GB, Some(20 * GB))).is_ok());
        // Memory is checked against the memory need, the directory against its own.
        let both = Need {
            in_dir: 5 * GB,
            in_memory: 10 * GB,
        };
        assert!(fits("x", both, room(6 * GB, 20 * GB, None)).is_ok());
        assert!(fits("x", both, room(6 * GB, 8 * GB, None)).is_err());
    }

    #[test]
    fn dev_shm_is_measured_and_proc_is_no_tmpfs() {
        if let Ok(r) = super::room(Path::new(MEMORY_DIR)) {
            assert!(r.mem_available > 0);
        }
        assert!(super::room(Path::new("/proc")).is_err());
    }
}
