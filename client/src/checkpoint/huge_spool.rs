//! The memory spool on huge pages: `--spool auto` dumps into
//! `<memory directory>/snapctl-spool`, and snapctl mounts a tmpfs of transparent huge
//! pages there the first time (`huge=always`, mode 0700, no devices, no exec, the
//! memory directory's size as its cap).
//!
//! Why: a spooled dump's freeze is CRIU writing the tree into the tmpfs. On the H200
//! GPU machine, dumping an 11.8 GB process took 3.7–4.7 s into a huge-page tmpfs
//! against 6.8–6.9 s into /dev/shm (bench/RESULTS.md, "The spool on huge pages").
//!
//! - A mount already at that path (snapctl's from an earlier checkpoint, or the
//!   operator's) is used as it is.
//! - `--spool-small-pages` mounts nothing: the spool is then `snapctl-spool-small`, a
//!   plain directory of the memory directory's own tmpfs.
//! - Where snapctl cannot mount (not root, no CAP_SYS_ADMIN in a container), it spools
//!   into a plain directory there, as before, and the route's reason says why.
//! - The mount outlives snapctl on purpose: empty, a tmpfs holds no memory, and a
//!   failed push's images stay in it to be pushed by hand.
//! - Two snapctl processes spooling at once mount once: the check and the mount run
//!   under an exclusive lock on `<memory directory>/.snapctl-spool.lock`.

use std::path::{Path, PathBuf};

use nix::mount::MsFlags;

/// The spool's directory under `memory_dir`: the huge-page mount.
const SPOOL_NAME: &str = "snapctl-spool";
/// With `--spool-small-pages`: a plain directory, apart from the mount.
const SMALL_SPOOL_NAME: &str = "snapctl-spool-small";

/// The spool directory under `memory_dir`, on a huge-page tmpfs where one is mounted
/// or can be (and `huge`): the directory and a note on its pages for the route's
/// reason.
pub(super) fn prepare(memory_dir: &Path, huge: bool) -> (PathBuf, String) {
    let spool = memory_dir.join(if huge { SPOOL_NAME } else { SMALL_SPOOL_NAME });
    // A failure shows when the route measures the spool's room.
    let _ = std::fs::create_dir_all(&spool);
    let note = match huge {
        false => "small pages (--spool-small-pages)".to_string(),
        true => mount_huge(memory_dir, &spool).unwrap_or_else(|why| format!("small pages: {why}")),
    };
    (spool, note)
}

fn mount_huge(memory_dir: &Path, spool: &Path) -> Result<String, String> {
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
41 30 0:40 / /dev/shm/snapctl-spool rw,nosuid,nodev,noexec - tmpfs snapctl-spool rw,size=65536k,mode=700,huge=always
42 22 0:41 / /mnt/my\\040spool rw - tmpfs none rw,size=1024k
43 42 0:42 / /mnt/my\\040spool rw - tmpfs none rw,size=2048k,huge=within_size
";

    #[test]
    fn finds_the_topmost_mount_at_a_path_and_whether_it_has_huge_pages() {
        let spool = mount_at(MOUNTINFO, Path::new("/dev/shm/snapctl-spool")).unwrap();
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
