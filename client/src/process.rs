//! Facts about a live process tree, read from /proc before a checkpoint: its PIDs,
//! huge-page memory (unsupported with CRIU's streaming), and the files the image
//! will reopen by path (which a restoring host must have).

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use snapreg_proto::manifest::ExternalFile;

use crate::error::{ClientError, Result};

/// The PID and every descendant, parents first.
pub fn tree(root: u32) -> Result<Vec<u32>> {
    if !Path::new(&format!("/proc/{root}")).exists() {
        return Err(ClientError::NotFound(format!("no process with PID {root}")));
    }
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let pid = out[i];
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
            for t in tasks.flatten() {
                let children =
                    std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
                out.extend(
                    children
                        .split_whitespace()
                        .filter_map(|c| c.parse::<u32>().ok()),
                );
            }
        }
        i += 1;
    }
    Ok(out)
}

/// Refuses a tree holding hugetlb memory: CRIU reads those pages late on restore and
/// the streamed pages file is gone by then (CRIU's CI excludes them with --stream).
pub fn refuse_huge_pages(pids: &[u32]) -> Result<()> {
    for pid in pids {
        let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
        let mut header = "";
        for line in smaps.lines() {
            if line.split_whitespace().next().is_some_and(|f| {
                f.contains('-') && f.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
            }) {
                header = line;
            } else if let Some(flags) = line.strip_prefix("VmFlags:") {
                if flags.split_whitespace().any(|f| f == "ht") {
                    return Err(ClientError::Usage(format!(
                        "PID {pid} maps huge-page memory ({}); CRIU cannot stream hugetlb pages: use --spool DIR, or free the huge pages first",
                        header.trim()
                    )));
                }
            }
        }
    }
    Ok(())
}

/// Regular files the tree has open or mapped, by path: CRIU reopens them on restore.
pub fn external_files(pids: &[u32]) -> Vec<ExternalFile> {
    let mut files = BTreeMap::new();
    let mut note = |path: &str| {
        if !path.starts_with('/')
            || path.starts_with("/dev/")
            || path.starts_with("/proc/")
            || path.ends_with(" (deleted)")
        {
            return;
        }
        if let Ok(meta) = std::fs::metadata(path) {
            if meta.is_file() {
                files.insert(
                    path.to_string(),
                    ExternalFile {
                        path: path.to_string(),
                        size: meta.len(),
                        mtime: meta.mtime(),
                        ..ExternalFile::default()
                    },
                );
            }
        }
    };
    for pid in pids {
        if let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
            for fd in fds.flatten() {
                if let Ok(target) = std::fs::read_link(fd.path()) {
                    note(&target.to_string_lossy());
                }
            }
        }
        for line in std::fs::read_to_string(format!("/proc/{pid}/maps"))
            .unwrap_or_default()
            .lines()
        {
            if let Some(path) = line.split_whitespace().nth(5) {
                note(path);
            }
        }
    }
    files.into_values().collect()
}

/// Checks, before CRIU starts, that every file the image reopens is here unchanged
/// in size (CRIU refuses a size change; an mtime change only warns).
pub fn check_external_files(files: &[ExternalFile]) -> Result<Vec<String>> {
    let mut problems = Vec::new();
    let mut warnings = Vec::new();
    for f in files {
        match std::fs::metadata(&f.path) {
            Err(_) => problems.push(format!("{} is missing{}", f.path, left_out_note(f))),
            Ok(m) if m.len() != f.size => problems.push(format!(
                "{} is {} bytes, the image expects {}{}",
                f.path,
                m.len(),
                f.size,
                left_out_note(f)
            )),
            Ok(m) if m.mtime() != f.mtime => {
                warnings.push(format!("{} was modified since the checkpoint", f.path))
            }
            Ok(_) => {}
        }
    }
    if problems.is_empty() {
        Ok(warnings)
    } else {
        Err(ClientError::Incompatible(format!(
            "files the image reopens by path:\n  {}",
            problems.join("\n  ")
        )))
    }
}

/// Why a file the tree wrote is not in the snapshot to be put back.
fn left_out_note(f: &ExternalFile) -> String {
    match (&f.left_out, f.written) {
        (Some(reason), _) => {
            format!(" (the process writes it; its content was left out of the snapshot: {reason})")
        }
        (None, true) => " (the process writes it; the snapshot does not carry it)".into(),
        (None, false) => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_tree_and_files() {
        let me = std::process::id();
        assert_eq!(tree(me).unwrap()[0], me);
        let files = external_files(&[me]);
        let exe = std::env::current_exe().unwrap();
        let exe = files
            .iter()
            .find(|f| Path::new(&f.path) == exe)
            .unwrap_or_else(|| panic!("{files:?}"));
        // Only the executable: the other tests of this binary open, grow and delete
        // files concurrently.
        assert!(check_external_files(std::slice::from_ref(exe)).is_ok());
        let mut moved = exe.clone();
        moved.size += 1;
        assert!(check_external_files(&[moved]).is_err());
        assert!(refuse_huge_pages(&[me]).is_ok());
        assert!(matches!(tree(u32::MAX - 1), Err(ClientError::NotFound(_))));
    }
}
