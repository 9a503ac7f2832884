//! The memory spool on huge pages, `--spool-huge-pages`: `--spool auto` then dumps into
//! `<memory directory>/snapctl-spool-huge`, where snapctl mounts a tmpfs of
//! transparent huge pages the first time (`huge=always`, mode 0700, no devices, no
//! exec, the memory directory's size as its cap). Without it the spool is
//! `<memory directory>/snapctl-spool`, a plain directory.
//!
//! Why, and why not by default: a spooled dump's freeze is CRIU writing the tree into
//! the tmpfs (bench/RESULTS.md, "The spool on huge pages").
//! - On the H200 GPU machine, an 11.8 GB process dumped in 3.7–4.7 s on huge pages
//!   against 6.8–6.9 s into /dev/shm.
//! - On the 2-core test VM, a 2 GiB process stayed frozen 5.1–5.3 s on huge pages
//!   against 1.0–1.1 s. There, writing 2 GB into a fresh huge-page tmpfs took 5.0 s the
//!   first time and 0.3 s the fourth, against 0.6 s on small pages, which points at
//!   memory the VM's host backs lazily.
//!
//! So it is the operator's choice per machine kind; the chart turns it on for GPU
//! nodes, and bench/spool/huge_tmpfs_ab.sh measures a node.
//!
//! - A mount already at that path (snapctl's from an earlier checkpoint, or the
//!   operator's) is used as it is.
//! - Where snapctl cannot mount (not root, no CAP_SYS_ADMIN in a container, a memory
//!   directory that is not a tmpfs), it spools into the plain directory, and the
//!   route's reason says why.
//! - The mount outlives snapctl on purpose: empty, a tmpfs holds no memory, and a
//!   failed push's images stay in it to be pushed by hand.
//! - Two snapctl processes spooling at once mount once: the check and the mount run
//!   under an exclusive lock on `<memory directory>/.snapctl-spool.lock`.

use std::path::{Path, PathBuf};

use nix::mount::MsFlags;

/// The spool's directory under `memory_dir`: a plain directory.
const SPOOL_NAME: &str = "snapctl-spool";
/// With `--spool-huge-pages`: the huge-page mount, apart from the plain directory.
const HUGE_SPOOL_NAME: &str = "snapctl-spool-huge";

/// The spool directory under `memory_dir`: with `huge`, a huge-page tmpfs where one is
/// mounted or can be, else the plain directory; and a note on its pages for the
/// route's reason.
pub(super) fn prepare(memory_dir: &Path, huge: bool) -> (PathBuf, String) {
    let plain = memory_dir.join(SPOOL_NAME);
    let (spool, note) = match huge {
        false => (plain, "small pages".to_string()),
        true => {
            let spool = memory_dir.join(HUGE_SPOOL_NAME);
            match mount_huge(memory_dir, &spool) {
                Ok(note) => (spool, note),
                Err(why) => (plain, format!("small pages: {why}")),
            }
        }
    };
    // A failure shows when the route measures the spool's room.
    let _ = std::fs::create_dir_all(&spool);
    (spool, note)
}

fn mount_huge(memory_dir: &Path, spool: &Path) -> Result<String, String> {
    std::fs::create_dir_all(spool).map_err(|e| format!("creating {}: {e}", spool.display()))?;
    let lock_path = memory_dir.join(".snapctl-spool.lock");
    let lock = std::fs::File::create(&lock_path)
        .map_err(|e| format!("creating {}: {e}", lock_path.display()))?;
    let _lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| format!("locking {}: {e}", lock_path.display()))?;
    let spool = std::fs::canonicalize(spool).map_err(|e| format!("{}: {e}", spool.display()))?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("reading /proc/self/mountinfo: {e}"))?;
    if let Some(mount) = mount_at(&mountinfo, &spool) {
        return Ok(match mount.huge() {
            true => "huge pages".into(),
            false => format!("the {} mounted there, without huge pages", mount.fs_type),
        });
    }
    // Only memory is put on memory: a directory on disk stays what it is (and `auto`
    // then streams, route.rs).
    let fs = nix::sys::statfs::statfs(memory_dir)
        .map_err(|e| format!("{}: {e}", memory_dir.display()))?;
    if fs.filesystem_type() != nix::sys::statfs::TMPFS_MAGIC {
        return Err(format!("{} is not a tmpfs", memory_dir.display()));
    }
    let cap = nix::sys::statvfs::statvfs(memory_dir)
        .map(|v| v.blocks() * v.fragment_size())
        .map_err(|e| format!("{}: {e}", memory_dir.display()))?;
    nix::mount::mount(
        Some("snapctl-spool"),
        &spool,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some(format!("huge=always,mode=0700,size={cap}").as_str()),
    )
    .map_err(|e| format!("cannot mount a huge-page tmpfs on {}: {e}", spool.display()))?;
    tracing::info!(spool = %spool.display(), cap, "mounted a huge-page tmpfs for the spool");
    Ok("huge pages".into())
}

/// One line of /proc/self/mountinfo, as far as it matters here.
#[derive(Debug, PartialEq, Eq)]
struct Mount {
    fs_type: String,
    super_options: String,
}

impl Mount {
    fn huge(&self) -> bool {
        self.fs_type == "tmpfs"
            && self
                .super_options
                .split(',')
                .any(|o| o == "huge=always" || o == "huge=within_size")
    }
}

/// The topmost mount at `path` in a mountinfo text (proc(5): mount point is the 5th
/// field, octal-escaped; after the ` - ` separator come the type, the source and the
/// super options).
fn mount_at(mountinfo: &str, path: &Path) -> Option<Mount> {
    let want = path.to_str()?;
    mountinfo.lines().rev().find_map(|line| {
        let (fields, rest) = line.split_once(" - ")?;
        let point = unescape(fields.split(' ').nth(4)?);
        let mut rest = rest.split(' ');
        let fs_type = rest.next()?.to_string();
        let super_options = rest.nth(1).unwrap_or_default().to_string();
        (point == want).then_some(Mount {
            fs_type,
            super_options,
        })
    })
}

/// Undoes mountinfo's `\ooo` escapes (space, tab, newline, backslash).
fn unescape(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut rest = field;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest
            .get(i + 1..i + 4)
            .and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(c) => {
                out.push(c as char);
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
30 22 0:25 / /dev/shm rw,nosuid,nodev shared:4 - tmpfs tmpfs rw,size=65536k
41 30 0:40 / /dev/shm/snapctl-spool-huge rw,nosuid,nodev,noexec - tmpfs snapctl-spool rw,size=65536k,mode=700,huge=always
42 22 0:41 / /mnt/my\\040spool rw - tmpfs none rw,size=1024k
43 42 0:42 / /mnt/my\\040spool rw - tmpfs none rw,size=2048k,huge=within_size
";

    #[test]
    fn finds_the_topmost_mount_at_a_path_and_whether_it_has_huge_pages() {
        let spool = mount_at(MOUNTINFO, Path::new("/dev/shm/snapctl-spool-huge")).unwrap();
        assert!(spool.huge(), "{spool:?}");
        let shm = mount_at(MOUNTINFO, Path::new("/dev/shm")).unwrap();
        assert!(!shm.huge(), "{shm:?}");
        // Stacked mounts: the last line is the one on top. Escaped spaces match.
        let stacked = mount_at(MOUNTINFO, Path::new("/mnt/my spool")).unwrap();
        assert_eq!(stacked.super_options, "rw,size=2048k,huge=within_size");
        assert!(stacked.huge());
        assert_eq!(mount_at(MOUNTINFO, Path::new("/dev/shm/other")), None);
        assert_eq!(mount_at("garbage\n\n1 2 3", Path::new("/")), None);
    }

    #[test]
    fn unescapes_mountinfo_octal_and_keeps_a_lone_backslash() {
        assert_eq!(unescape("/a\\040b\\011c"), "/a b\tc");
        assert_eq!(unescape("/a\\b"), "/a\\b");
        assert_eq!(unescape("/tail\\"), "/tail\\");
    }
}
