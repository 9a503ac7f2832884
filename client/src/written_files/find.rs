//! Which regular files a tree holds open for writing, read from /proc: the fd's target
//! (readlink of /proc/PID/fd/N) and its open flags (the octal `flags:` line of
//! /proc/PID/fdinfo/N). The same rules as the external files CRIU reopens
//! (process.rs): absolute paths of regular files, nothing under /dev or /proc, nothing
//! deleted.

use std::collections::BTreeMap;
use std::path::PathBuf;

/// A file the tree writes, and one descriptor it is open through.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WrittenFile {
    /// The path CRIU will reopen.
    pub path: String,
    pub pid: u32,
    pub fd: u32,
}

impl WrittenFile {
    /// The process's own open file: the same inode even if the path was renamed since.
    pub fn proc_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/fd/{}", self.pid, self.fd))
    }
}

/// Every file the tree of `pids` holds open with O_WRONLY or O_RDWR, once per path,
/// sorted by path.
pub fn written(pids: &[u32]) -> Vec<WrittenFile> {
    let mut out = BTreeMap::new();
    for &pid in pids {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for entry in fds.flatten() {
            let Some(fd) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(target) = std::fs::read_link(entry.path()) else {
                continue;
            };
            let path = target.to_string_lossy().into_owned();
            if !reopened_by_path(&path) || !opened_for_writing(pid, fd) {
                continue;
            }
            if std::fs::metadata(&path).is_ok_and(|m| m.is_file()) {
                out.entry(path.clone())
                    .or_insert(WrittenFile { path, pid, fd });
            }
        }
    }
    out.into_values().collect()
}

fn reopened_by_path(path: &str) -> bool {
    path.starts_with('/')
        && !path.starts_with("/dev/")
        && !path.starts_with("/proc/")
        && !path.starts_with("/sys/")
        && !path.ends_with(" (deleted)")
}

/// Whether the fd's access mode is O_WRONLY or O_RDWR.
fn opened_for_writing(pid: u32, fd: u32) -> bool {
    let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).unwrap_or_default();
    flags_write(&info)
}

fn flags_write(fdinfo: &str) -> bool {
    fdinfo
        .lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .and_then(|f| i32::from_str_radix(f.trim(), 8).ok())
        .is_some_and(|flags| flags & libc::O_ACCMODE != libc::O_RDONLY)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn access_mode_comes_from_the_octal_flags() {
        assert!(flags_write("pos:\t0\nflags:\t0102001\nmnt_id:\t30\n")); // O_WRONLY|O_APPEND|O_CREAT
        assert!(flags_write("flags:\t02\n")); // O_RDWR
        assert!(!flags_write("pos:\t0\nflags:\t0100000\n")); // O_RDONLY|O_LARGEFILE
        assert!(!flags_write("pos:\t0\n"));
    }

    #[test]
    fn own_log_is_found_and_files_only_read_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let log_path = dir.path().join("own.log");
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .unwrap();
        writeln!(log, "started").unwrap();
        let read_path = dir.path().join("read-only");
        std::fs::write(&read_path, b"x").unwrap();
        let _reader = std::fs::File::open(&read_path).unwrap();
        let found = written(&[std::process::id()]);
        let mine: Vec<_> = found
            .iter()
            .filter(|w| w.path.starts_with(&*dir.path().to_string_lossy()))
            .collect();
        assert_eq!(mine.len(), 1, "{found:?}");
        assert_eq!(mine[0].path, log_path.to_string_lossy());
        assert_eq!(std::fs::read(mine[0].proc_path()).unwrap(), b"started\n");
    }
}
