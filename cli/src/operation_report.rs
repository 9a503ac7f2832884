//! The report each snapshot-moving command leaves for the node agent's metrics
//! (snapreg_client::node_reports has the format). Built from the command's JSON
//! result, DESIGN's JSON contract: its transfer counters, and its phase timings
//! under the names below. Best effort: a report that cannot be written is logged
//! and never changes the command's outcome.

use std::collections::BTreeMap;
use std::time::Instant;

use snapreg_client::cache;
use snapreg_client::node_reports::{self, OperationReport, Outcome};
use snapreg_client::progress::CountersSnapshot;

use crate::cmd::Output;
use crate::global::Global;

/// JSON result field (a JSON pointer) → (phase name, factor to seconds).
const PHASES: &[(&str, &str, f64)] = &[
    ("/restore_seconds", "criu-restore", 1.0),
    ("/cuda_restore_seconds", "cuda-restore", 1.0),
    // `--lazy`: from the command's start until the last page was in.
    ("/lazy/all_present_seconds", "lazy-pages", 1.0),
    ("/freeze_ms", "freeze", 0.001),
    ("/dump_seconds", "dump", 1.0),
    ("/cuda_checkpoint_seconds", "cuda-checkpoint", 1.0),
];

pub fn record(
    g: &Global,
    operation: &str,
    started: Instant,
    result: &anyhow::Result<Option<Output>>,
) {
    let dir = g.cache.clone().unwrap_or_else(cache::default_dir);
    let json = match result {
        Ok(Some(out)) => Some(&out.json),
        _ => None,
    };
    let report = OperationReport {
        version: node_reports::VERSION,
        operation: operation.to_string(),
        outcome: if result.is_ok() {
            Outcome::Ok
        } else {
            Outcome::Error
        },
        seconds: started.elapsed().as_secs_f64(),
        phases: json.map(phases).unwrap_or_default(),
        counters: json
            .and_then(|j| serde_json::from_value::<CountersSnapshot>(j.clone()).ok())
            .unwrap_or_default(),
    };
    match node_reports::record(&dir, &report) {
        Ok(true) => {}
        // No agent on this node asked for reports, or too many wait.
        Ok(false) => tracing::debug!("no operation report left in {}", dir.display()),
        Err(e) => tracing::warn!("leaving the operation report in {}: {e}", dir.display()),
    }
}

fn phases(json: &serde_json::Value) -> BTreeMap<String, f64> {
    PHASES
        .iter()
        .filter_map(|(field, phase, factor)| {
            let v = json.pointer(field)?.as_f64()?;
            Some((phase.to_string(), v * factor))
        })
        .collect()
}
