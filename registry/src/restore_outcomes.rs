//! Restore outcomes: how each restore of a snapshot went, so that a snapshot that
//! fails wherever it lands stops being offered (a bad snapshot otherwise crashes on
//! every node the scheduler sends it to, and every retry restores it again).
//!
//! `snapctl pull-restore` reports each restore's outcome (`ReportRestore`). Resolve
//! withholds a snapshot from a node when the newest `--restore-failure-threshold`
//! outcomes recorded on nodes *like it* all failed: "like it" is the same list of
//! GPU models (a snapshot that crashes on one GPU type may restore on another; nodes
//! without GPUs form one class). A success on such a node ends the run, so once a
//! fixed node or driver restores it (e.g. `pull-restore` by explicit reference,
//! which Resolve does not gate), it is offered again. Threshold 0 turns this off.
//!
//! Storage: the object store, so every instance on one bucket sees every report:
//!
//! ```text
//! restores/<manifest hex>/<unix ms, 13 digits>-<node>-<8 hex>.json   one outcome, written once
//! ```
//!
//! Each object is one JSON [`Outcome`] (`version` 1; another version is skipped). The
//! random suffix keeps two reports of one node in the same millisecond apart.
//! Names sort by time; the writer keeps the newest [`KEEP`] per snapshot and deletes
//! older ones. Outcomes are a hint about the future, not data: a lost one costs at
//! most one more failed restore, and reindex, scrub and GC do not read them (GC
//! leaves a deleted snapshot's outcomes; they are tiny and never read again).

use std::sync::Arc;

use futures::TryStreamExt;
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};
use snapreg_proto::Digest;

use crate::clock::now_ms;
use crate::error::{RegistryError, Result};
use crate::registry::Registry;

/// Outcomes kept per snapshot.
pub const KEEP: usize = 20;
/// The longest reason kept (bytes, cut at a character boundary).
const MAX_REASON: usize = 1000;
const PREFIX: &str = "restores";
const VERSION: u32 = 1;

/// One restore's outcome, as stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    pub version: u32,
    pub repository: String,
    pub node_name: String,
    /// In CUDA order; empty without GPUs.
    pub gpu_models: Vec<String>,
    pub success: bool,
    pub phase: String,
    pub reason: String,
    pub seconds: f64,
    pub unix_ms: u64,
}

impl Outcome {
    /// A new outcome stamped now, its reason cut to [`MAX_REASON`].
    pub fn new(repository: &str, node_name: &str, gpu_models: Vec<String>, success: bool) -> Self {
        Outcome {
            version: VERSION,
            repository: repository.to_string(),
            node_name: node_name.to_string(),
            gpu_models,
            success,
            phase: String::new(),
            reason: String::new(),
            seconds: 0.0,
            unix_ms: now_ms(),
        }
    }

    pub fn failed_at(mut self, phase: &str, reason: &str) -> Self {
        self.phase = phase.to_string();
        let mut cut = reason.len().min(MAX_REASON);
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        self.reason = reason[..cut].to_string();
        self
    }
}

fn dir(snapshot: &Digest) -> StorePath {
    StorePath::from(format!("{PREFIX}/{}", snapshot.to_hex()))
}

/// A node name as it may appear in an object name (anything else becomes `_`).
fn name_part(node: &str) -> String {
    let clean: String = node
        .chars()
        .take(64)
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if clean.is_empty() {
        "unnamed".into()
    } else {
        clean
    }
}

/// Records `outcome` for `snapshot` and drops what is beyond the newest [`KEEP`].
pub async fn record(reg: &Registry, snapshot: &Digest, outcome: &Outcome) -> Result<()> {
    let store = reg.store().object_store();
    let name = format!(
        "{:013}-{}.json",
        outcome.unix_ms,
        name_part(&outcome.node_name)
    );
    let path = dir(snapshot).clone().join(name);
    let body = serde_json::to_vec(outcome).map_err(|e| RegistryError::Io(e.into()))?;
    store.put(&path, PutPayload::from(body)).await?;
    let mut names = list(&store, snapshot).await?;
    names.sort();
    let excess = names.len().saturating_sub(KEEP);
    for old in names.into_iter().take(excess) {
        let _ = store.delete(&old).await;
    }
    Ok(())
}

async fn list(store: &Arc<dyn ObjectStore>, snapshot: &Digest) -> Result<Vec<StorePath>> {
    let prefix = dir(snapshot);
    Ok(store
        .list(Some(&prefix))
        .map_ok(|m| m.location)
        .try_collect()
        .await?)
}

/// The snapshot's recorded outcomes, newest first; unreadable ones are skipped (and
/// logged).
pub async fn recent(reg: &Registry, snapshot: &Digest) -> Result<Vec<Outcome>> {
    let store = reg.store().object_store();
    let mut names = list(&store, snapshot).await?;
    names.sort();
    let mut out = Vec::new();
    for path in names.iter().rev().take(KEEP) {
        let bytes = match store.get(path).await {
            Ok(got) => got.bytes().await?,
            Err(object_store::Error::NotFound { .. }) => continue, // pruned meanwhile
            Err(e) => return Err(e.into()),
        };
        match serde_json::from_slice::<Outcome>(&bytes) {
            Ok(o) if o.version == VERSION => out.push(o),
            Ok(o) => tracing::warn!("{path}: restore outcome version {} skipped", o.version),
            Err(e) => tracing::warn!("{path}: not a restore outcome ({e}); skipped"),
        }
    }
    Ok(out)
}

/// Why Resolve withholds the snapshot from a node with `gpu_models`, if it does:
/// the newest `threshold` outcomes on such nodes (`outcomes` newest first) all failed.
pub fn withheld(outcomes: &[Outcome], gpu_models: &[String], threshold: u32) -> Option<String> {
    if threshold == 0 {
        return None;
    }
    let alike: Vec<&Outcome> = outcomes
        .iter()
        .filter(|o| o.gpu_models == gpu_models)
        .take(threshold as usize)
        .collect();
    if alike.len() < threshold as usize || alike.iter().any(|o| o.success) {
        return None;
    }
    let last = alike[0];
    let class = if gpu_models.is_empty() {
        "without GPUs".to_string()
    } else {
        format!("with {}", gpu_models.join(" + "))
    };
    Some(format!(
        "withheld: its last {threshold} restores on nodes {class} failed (newest on {} at {}: {}); \
         push a new snapshot, or fix the cause and restore it once by reference \
         (`snapctl pull-restore REPO@DIGEST`): a success offers it again",
        last.node_name, last.phase, last.reason
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn o(gpus: &[&str], success: bool) -> Outcome {
        let gpus = gpus.iter().map(|g| g.to_string()).collect();
        let out = Outcome::new("r", "n1", gpus, success);
        if success {
            out
        } else {
            out.failed_at("criu-restore", "exit 1")
        }
    }

    const H100: &[&str] = &["NVIDIA H100"];

    #[test]
    fn withholds_after_threshold_failures_in_a_row_on_alike_nodes() {
        let h100: Vec<String> = vec!["NVIDIA H100".into()];
        assert!(
            withheld(&[o(H100, false)], &h100, 2).is_none(),
            "one failure is not enough"
        );
        let why = withheld(&[o(H100, false), o(H100, false)], &h100, 2).unwrap();
        assert!(
            why.contains("last 2 restores on nodes with NVIDIA H100 failed"),
            "{why}"
        );
        assert!(
            why.contains("criu-restore: exit 1") && why.contains("a success offers it again"),
            "{why}"
        );
    }

    #[test]
    fn a_newer_success_or_another_gpu_class_does_not_count() {
        let h100: Vec<String> = vec!["NVIDIA H100".into()];
        let newest_ok = [o(H100, true), o(H100, false), o(H100, false)];
        assert!(withheld(&newest_ok, &h100, 2).is_none());
        let other_class = [
            o(&["NVIDIA A10"], false),
            o(&["NVIDIA A10"], false),
            o(H100, true),
        ];
        assert!(withheld(&other_class, &h100, 2).is_none());
        assert!(withheld(&other_class, &["NVIDIA A10".to_string()], 2).is_some());
        assert!(withheld(&[o(&[], false), o(&[], false)], &[], 2)
            .unwrap()
            .contains("without GPUs"));
    }

    #[test]
    fn threshold_zero_never_withholds() {
        assert!(withheld(&[o(&[], false), o(&[], false)], &[], 0).is_none());
    }

    #[test]
    fn reasons_are_cut_at_a_character_boundary_and_names_are_cleaned() {
        let long = "é".repeat(600);
        let out = Outcome::new("r", "n", vec![], false).failed_at("x", &long);
        assert!(out.reason.len() <= MAX_REASON && out.reason.chars().all(|c| c == 'é'));
        assert_eq!(name_part("node/../a b"), "node_.._a_b");
        assert_eq!(name_part(""), "unnamed");
    }
}
