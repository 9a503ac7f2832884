//! Finding a usable CRIU: `--criu PATH`, then `SNAPCTL_CRIU` (both arrive here as
//! `explicit`), then the prefix `deploy/install-criu.sh` installs into, then `PATH`.
//! CRIU ≥ 4.2 is required: 3.17 fails at start-up on current kernels and 4.1 cannot
//! dump a process holding an inet socket (shared/CRIU-STREAM.md §1).

use std::path::{Path, PathBuf};
use std::process::Command;

use prost::Message;

use crate::criu_image::StatsEntry;
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

/// `criu <args>` with snapctl as its action script, answering on `action_socket`
/// ([`crate::action`]); stdin and stdout null, stderr piped for the error.
pub fn with_action_script(
    criu: &Criu,
    args: &[String],
    action_socket: &Path,
) -> Result<tokio::process::Command> {
    let self_exe =
        std::env::current_exe().map_err(|e| ClientError::io("finding snapctl's own path", e))?;
    let mut cmd = tokio::process::Command::new(&criu.path);
    cmd.args(args)
        .arg("--action-script")
        .arg(&self_exe)
        .env(crate::action::ENV_SOCKET, action_socket)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    Ok(cmd)
}

/// Starts `criu <args> --stream` with snapctl as its action script (answering on
/// `action_socket`) and waits for its one connection to the streamer `listener`.
/// If CRIU exits first, the error carries its stderr and log tail.
pub async fn start_streaming(
    criu: &Criu,
    args: &[String],
    listener: &std::os::unix::net::UnixListener,
    action_socket: &Path,
    log: &Path,
) -> Result<(tokio::process::Child, std::os::unix::net::UnixStream)> {
    let mut child = with_action_script(criu, args, action_socket)?
        .arg("--stream")
        .spawn()
        .map_err(|e| ClientError::Criu(format!("cannot run {}: {e}", criu.path.display())))?;
    match crate::criu_stream::accept_from(listener, &mut child).await {
        Ok(Some(sock)) => Ok((child, sock)),
        Ok(None) => {
            let out = child
                .wait_with_output()
                .await
                .map_err(|e| ClientError::io("CRIU output", e))?;
            Err(failure(
                &args[0],
                log,
                &String::from_utf8_lossy(&out.stderr),
            ))
        }
        Err(e) => Err(ClientError::io("accepting CRIU's connection", e)),
    }
}

/// The lines of a CRIU log worth showing: its last `Error` lines (without the
/// harmless RLIMIT one every log has here), else its last lines.
pub fn log_tail(log: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let errors: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("Error") && !l.contains("RLIMIT_NOFILE"))
        .collect();
    let lines: Vec<&str> = if errors.is_empty() {
        text.lines().collect()
    } else {
        errors
    };
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A CRIU failure with what to read: its stderr (errors before the log opens), the
/// tail of its log, and where the full log stays.
pub fn failure(what: &str, log: &Path, stderr: &str) -> ClientError {
    let mut msg = format!("criu {what} failed");
    let stderr = stderr.trim();
    if !stderr.is_empty() {
        msg += &format!(
            ":\n{}",
            stderr
                .lines()
                .rev()
                .take(5)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    let tail = log_tail(log, 8);
    if !tail.is_empty() {
        msg += &format!("\nlast lines of {}:\n{tail}", log.display());
    }
    msg += &format!("\nfull log: {}", log.display());
    ClientError::Criu(msg)
}

/// Time the tasks were frozen, from CRIU's `stats-dump`: two magics, a u32 LE length,
/// then a `stats_entry` (images/stats.proto) whose `dump.frozen_time` is in µs.
pub fn read_freeze_ms(path: &Path) -> Option<f64> {
    parse_freeze_ms(&std::fs::read(path).ok()?)
}

/// [`read_freeze_ms`] on the file's bytes.
pub fn parse_freeze_ms(b: &[u8]) -> Option<f64> {
    let len = u32::from_le_bytes(b.get(8..12)?.try_into().ok()?) as usize;
    let entry = b.get(12..12usize.checked_add(len)?)?;
    let stats = StatsEntry::decode(entry).ok()?;
    Some(f64::from(stats.dump?.frozen_time) / 1000.0)
}

#[cfg(test)]
mod stats_tests {
    /// A `stats-dump` written by CRIU 4.2.1 here: frozen for 5264 µs.
    #[test]
    fn reads_frozen_time() {
        let bytes: &[u8] = &[
            0x40, 0x59, 0x10, 0x55, 0x06, 0x33, 0x09, 0x57, 0x21, 0, 0, 0, 0x0a, 0x1f, 0x08, 0x85,
            0x01, 0x10, 0x90, 0x29, 0x18, 0xcb, 0x03, 0x20, 0x7e, 0x28, 0x3a, 0x30, 0x00, 0x38,
            0x1f, 0x40, 0x00, 0x48, 0x00, 0x50, 0x06, 0x58, 0x06, 0x60, 0x00, 0x68, 0x00, 0x70,
            0x00,
        ];
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("stats-dump");
        std::fs::write(&p, bytes).unwrap();
        assert_eq!(super::read_freeze_ms(&p), Some(5.264));
        std::fs::write(&p, &bytes[..20]).unwrap();
        assert_eq!(super::read_freeze_ms(&p), None);
    }
}
