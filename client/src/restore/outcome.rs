//! Telling the registry how a restore went (`ReportRestore`), so Resolve stops
//! offering a snapshot whose restores keep failing on nodes like this one
//! (registry/src/restore_outcomes.rs has the rule).
//!
//! Every restore that fetched its manifest reports once, at the end: success, or
//! failure with the phase it stopped in and its error. Best effort: a report that
//! fails (or takes over [`REPORT_TIMEOUT`]) is logged and never changes the
//! restore's result; the report's `outcome_recorded` says whether it landed.

use std::time::{Duration, Instant};

use snapreg_proto::pb;
use snapreg_proto::reference::Reference;
use snapreg_proto::Digest;

use super::{RestoreOptions, RestoreReport};
use crate::error::Result;
use crate::remote::Remote;

const REPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a restore is, as a failure reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Phase {
    /// Before the manifest: nothing to report against.
    #[default]
    Manifest,
    /// Compatibility and the files the image reopens, checked before the host changes.
    Plan,
    WrittenFiles,
    /// CRIU restoring the tree from the served image.
    CriuRestore,
    CudaRestore,
    /// Separated mode: waiting for the weights fill, then resuming the workers.
    Weights,
    /// `--lazy`: the pages served after the tree resumed.
    LazyPages,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Manifest => "manifest",
            Phase::Plan => "plan",
            Phase::WrittenFiles => "written-files",
            Phase::CriuRestore => "criu-restore",
            Phase::Weights => "weights",
            Phase::LazyPages => "lazy-pages",
            Phase::CudaRestore => "cuda-restore",
        }
    }
}

/// The restore's progress: its snapshot once known, and its phase.
#[derive(Debug, Default)]
pub struct Stage {
    digest: Option<Digest>,
    phase: Phase,
}

impl Stage {
    pub fn reached(&mut self, phase: Phase, digest: Option<Digest>) {
        self.phase = phase;
        if digest.is_some() {
            self.digest = digest;
        }
    }
}

/// Reports the restore's outcome to `remote`; whether it was recorded.
pub async fn report(
    remote: &Remote,
    reference: &Reference,
    opts: &RestoreOptions,
    at: &Stage,
    result: &Result<RestoreReport>,
    started: Instant,
) -> bool {
    let Some(digest) = at.digest else {
        return false;
    };
    let (phase, reason) = match result {
        Ok(_) => (String::new(), String::new()),
        Err(e) => (at.phase.as_str().to_string(), e.to_string()),
    };
    let facts = crate::host::facts();
    let node_name = opts
        .peers
        .as_ref()
        .and_then(|p| p.node_name.clone())
        .unwrap_or_else(crate::host::hostname);
    let req = pb::ReportRestoreRequest {
        repository: reference.repository.clone(),
        digest: digest.to_string(),
        outcome: Some(pb::RestoreOutcome {
            node_name,
            gpu_models: facts
                .gpu
                .map(|g| g.devices.into_iter().map(|d| d.model).collect())
                .unwrap_or_default(),
            success: result.is_ok(),
            phase,
            reason,
            seconds: started.elapsed().as_secs_f64(),
            unix_ms: 0,
        }),
    };
    match tokio::time::timeout(REPORT_TIMEOUT, remote.report_restore(req)).await {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            tracing::warn!("the registry did not record this restore's outcome: {e}");
            false
        }
        Err(_) => {
            tracing::warn!(
                "the registry did not record this restore's outcome within {REPORT_TIMEOUT:?}"
            );
            false
        }
    }
}
