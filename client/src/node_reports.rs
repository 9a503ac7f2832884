//! Operation reports: how each snapctl operation on a node went, left for the node
//! agent, which folds them into its Prometheus metrics (agent/metrics.rs).
//!
//! snapctl runs as a short-lived process per operation; the agent is the one
//! long-lived process on the node with a `/metrics` endpoint, and both already share
//! the node cache directory. So each operation writes one small file there and the
//! agent takes them (the way node_exporter's textfile collector takes files, but
//! folded into counters and histograms, then deleted).
//!
//! ```text
//! <cache>/reports/<unix ms>-<pid>.json     one report, complete (written as
//! <cache>/reports/.tmp-<unix ms>-<pid>     this, fsync'd, then renamed)
//! ```
//!
//! A report is one JSON object:
//!
//! ```json
//! {"version": 1, "operation": "pull-restore", "outcome": "ok", "seconds": 3.2,
//!  "phases": {"criu-restore": 2.1, "cuda-restore": 0.7},
//!  "counters": {"chunks_transferred": 10, "bytes_transferred": 40960, ...}}
//! ```
//!
//! `outcome` is `ok` or `error`; `phases` maps a phase name to its seconds;
//! `counters` is [`CountersSnapshot`]. A reader refuses any other `version`.
//!
//! Writers add reports only where an agent made `reports/` ([`enable`]), and only
//! while fewer than [`MAX_WAITING`] wait: a node without an agent, or whose agent
//! stopped, must not fill its disk with reports.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::progress::CountersSnapshot;

/// The report format this snapctl writes and reads.
pub const VERSION: u32 = 1;
/// Reports left waiting before writers stop adding more.
pub const MAX_WAITING: usize = 10_000;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OperationReport {
    pub version: u32,
    /// The snapctl subcommand: `pull`, `pull-restore`, `checkpoint`, `push`, `prefetch`.
    pub operation: String,
    pub outcome: Outcome,
    pub seconds: f64,
    #[serde(default)]
    pub phases: BTreeMap<String, f64>,
    #[serde(default)]
    pub counters: CountersSnapshot,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Ok,
    Error,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Error => "error",
        }
    }
}

fn reports_dir(cache_dir: &Path) -> PathBuf {
    cache_dir.join("reports")
}

/// Makes `reports/` in `cache_dir`: the agent's "leave me reports".
pub fn enable(cache_dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(reports_dir(cache_dir))
}

/// Leaves `report` for the agent of the node whose cache is `cache_dir`. Returns
/// false (writing nothing) when no agent asked for reports ([`enable`]) or
/// [`MAX_WAITING`] already wait.
pub fn record(cache_dir: &Path, report: &OperationReport) -> std::io::Result<bool> {
    let dir = reports_dir(cache_dir);
    if !dir.is_dir() || std::fs::read_dir(&dir)?.take(MAX_WAITING).count() >= MAX_WAITING {
        return Ok(false);
    }
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let name = format!("{ms}-{}", std::process::id());
    let tmp = dir.join(format!(".tmp-{name}"));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec(report).map_err(std::io::Error::other)?)?;
        f.sync_all()?;
        std::fs::rename(&tmp, dir.join(format!("{name}.json")))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map(|()| true)
}

/// What [`take`] found.
#[derive(Debug, Default)]
pub struct Taken {
    pub reports: Vec<OperationReport>,
    /// Files that were not a report this snapctl reads (named, with why).
    pub rejected: Vec<(PathBuf, String)>,
}

/// Reads and deletes up to `max` waiting reports (staging files are left alone).
/// Unreadable ones are deleted too, and listed in [`Taken::rejected`].
pub fn take(cache_dir: &Path, max: usize) -> std::io::Result<Taken> {
    let dir = reports_dir(cache_dir);
    let mut taken = Taken::default();
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(taken),
        Err(e) => return Err(e),
    };
    for entry in entries.take(max) {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if name.starts_with(".tmp-") || !name.ends_with(".json") {
            continue;
        }
        match parse(&path) {
            Ok(r) => taken.reports.push(r),
            Err(why) => taken.rejected.push((path.clone(), why)),
        }
        let _ = std::fs::remove_file(&path);
    }
    Ok(taken)
}

fn parse(path: &Path) -> Result<OperationReport, String> {
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    let value: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
    match value.get("version").and_then(|v| v.as_u64()) {
        Some(v) if v == u64::from(VERSION) => {}
        Some(v) => return Err(format!("report version {v} is not {VERSION}")),
        None => return Err("no \"version\" field".into()),
    }
    serde_json::from_value(value).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(op: &str) -> OperationReport {
        OperationReport {
            version: VERSION,
            operation: op.into(),
            outcome: Outcome::Ok,
            seconds: 1.5,
            phases: BTreeMap::from([("criu-restore".to_string(), 1.0)]),
            counters: CountersSnapshot {
                chunks_transferred: 3,
                bytes_transferred: 300,
                ..Default::default()
            },
        }
    }

    #[test]
    fn a_recorded_report_is_taken_once() {
        let dir = tempfile::tempdir().unwrap();
        assert!(
            !record(dir.path(), &report("pull")).unwrap(),
            "no agent asked"
        );
        enable(dir.path()).unwrap();
        assert!(record(dir.path(), &report("pull")).unwrap());
        let first = take(dir.path(), 100).unwrap();
        assert_eq!(first.reports, vec![report("pull")]);
        assert!(take(dir.path(), 100).unwrap().reports.is_empty());
    }

    #[test]
    fn unknown_versions_and_garbage_are_rejected_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let reports = dir.path().join("reports");
        std::fs::create_dir_all(&reports).unwrap();
        std::fs::write(reports.join("1-1.json"), r#"{"version":2,"operation":"x"}"#).unwrap();
        std::fs::write(reports.join("2-1.json"), b"{not json").unwrap();
        std::fs::write(reports.join(".tmp-3-1"), b"half").unwrap();
        let taken = take(dir.path(), 100).unwrap();
        assert!(taken.reports.is_empty());
        assert_eq!(taken.rejected.len(), 2, "{:?}", taken.rejected);
        assert!(taken
            .rejected
            .iter()
            .any(|(_, why)| why.contains("version 2")));
        let left: Vec<_> = std::fs::read_dir(&reports).unwrap().collect();
        assert_eq!(left.len(), 1, "only the staging file stays");
    }
}
