//! Finding a usable CRIU: `--criu PATH`, then `SNAPCTL_CRIU` (both arrive here as
//! `explicit`), then the prefix `deploy/install-criu.sh` installs into, then `PATH`.
//! CRIU ≥ 4.2 is required: 3.17 fails at start-up on current kernels and 4.1 cannot
//! dump a process holding an inet socket (shared/CRIU-STREAM.md §1).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{ClientError, Result};

pub const MIN_VERSION: (u64, u64) = (4, 2);
/// Where deploy/install-criu.sh puts its wrapper by default.
pub const INSTALL_PREFIX_WRAPPER: &str = "/opt/snapreg-criu/bin/criu";

const HOW_TO_FIX: &str = "install one with `sudo deploy/install-criu.sh` (it prints the path to use) and pass it with --criu PATH or SNAPCTL_CRIU";

#[derive(Clone, Debug, serde::Serialize)]
pub struct Criu {
    pub path: PathBuf,
    pub version: String,
}

pub fn locate(explicit: Option<&Path>) -> Result<Criu> {
    if let Some(p) = explicit {
        return probe(p);
    }
    if let Some(p) = std::env::var_os("SNAPCTL_CRIU") {
        return probe(Path::new(&p));
    }
    let wrapper = Path::new(INSTALL_PREFIX_WRAPPER);
    if wrapper.exists() {
        return probe(wrapper);
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("criu"))
        .find(|p| p.is_file());
    match on_path {
        Some(p) => probe(&p),
        None => Err(ClientError::Criu(format!("no CRIU found; {HOW_TO_FIX}"))),
    }
}

fn probe(path: &Path) -> Result<Criu> {
    let out = Command::new(path).arg("--version").output().map_err(|e| {
        ClientError::Criu(format!("cannot run {}: {e}; {HOW_TO_FIX}", path.display()))
    })?;
    let text = String::from_utf8_lossy(&out.stdout);
    let version = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Version:"))
        .map(|v| v.trim().to_string())
        .ok_or_else(|| {
            ClientError::Criu(format!(
                "{} --version printed no version ({}); {HOW_TO_FIX}",
                path.display(),
                text.trim()
            ))
        })?;
    let mut parts = version.split('.').map(|p| p.parse::<u64>().unwrap_or(0));
    let got = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if got < MIN_VERSION {
        return Err(ClientError::Criu(format!(
            "{} is CRIU {version}; snapreg needs {}.{} or newer; {HOW_TO_FIX}",
            path.display(),
            MIN_VERSION.0,
            MIN_VERSION.1
        )));
    }
    Ok(Criu {
        path: path.to_path_buf(),
        version,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn fake(dir: &Path, version: &str) -> PathBuf {
        let p = dir.join("criu");
        std::fs::write(&p, format!("#!/bin/sh\necho 'Version: {version}'\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    #[test]
    fn too_old_criu_is_refused_with_the_fix() {
        let d = tempfile::tempdir().unwrap();
        let e = locate(Some(&fake(d.path(), "4.1.1")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("4.1.1") && e.contains("install-criu.sh"), "{e}");
        assert_eq!(
            locate(Some(&fake(d.path(), "4.2.1"))).unwrap().version,
            "4.2.1"
        );
        let e = locate(Some(&d.path().join("absent")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot run"), "{e}");
    }
}
