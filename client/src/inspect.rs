//! A summary of a manifest for `snapctl inspect`: per layer, how many files, bytes,
//! chunks and zero bytes; plus the compatibility record and CRIU options.

use std::collections::HashSet;

use serde::Serialize;
use snapreg_proto::manifest::{Extent, Manifest};
use snapreg_proto::Digest;

#[derive(Debug, Serialize)]
pub struct LayerSummary {
    pub kind: &'static str,
    pub name: Option<String>,
    pub files: usize,
    pub bytes: u64,
    pub zero_bytes: u64,
    pub chunks: usize,
}

#[derive(Debug, Serialize)]
pub struct Summary {
    pub reference: String,
    pub digest: String,
    pub schema_version: u64,
    pub created_unix: u64,
    pub created_by: String,
    pub hostname: String,
    pub bytes_total: u64,
    pub chunks_total: usize,
    pub layers: Vec<LayerSummary>,
    pub compat: snapreg_proto::compat::CompatRecord,
    pub criu: Option<snapreg_proto::manifest::CriuInfo>,
    pub device_memory_bytes: u64,
    /// The tenant key the chunks are encrypted with (none: plaintext).
    pub encryption: Option<snapreg_proto::manifest::Encryption>,
}

pub fn summarize(reference: &str, digest: &Digest, m: &Manifest) -> Summary {
    let layers = m
        .layers
        .iter()
        .map(|l| {
            let mut chunks = HashSet::new();
            let mut zero_bytes = 0;
            for e in l.files.iter().flat_map(|f| &f.extents) {
                match e {
                    Extent::Chunk { chunk, .. } => {
                        chunks.insert(*chunk);
                    }
                    Extent::Zero { zero } => zero_bytes += zero,
                }
            }
            LayerSummary {
                kind: l.kind.as_str(),
                name: l.name.clone(),
                files: l.files.len(),
                bytes: l.files.iter().map(|f| f.size).sum(),
                zero_bytes,
                chunks: chunks.len(),
            }
        })
        .collect();
    Summary {
        reference: reference.to_string(),
        digest: digest.to_string(),
        schema_version: m.schema_version,
        created_unix: m.created.unix_seconds,
        created_by: m.created.tool.clone(),
        hostname: m.created.hostname.clone(),
        bytes_total: m.total_size(),
        chunks_total: m.chunk_digests().len(),
        layers,
        compat: m.compat.clone(),
        criu: m.criu.clone(),
        device_memory_bytes: m.device_memory.iter().map(|s| s.len).sum(),
        encryption: m.encryption.clone(),
    }
}

/// A snapshot's recent restores as the registry recorded them (`RestoreOutcomes`).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct RestoreRecord {
    pub successes: usize,
    pub failures: usize,
    /// Resolve's threshold on this registry (0: off).
    pub failure_threshold: u32,
    pub last_failure: Option<RecordedRestore>,
    /// Newest first.
    pub recent: Vec<RecordedRestore>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct RecordedRestore {
    pub node: String,
    pub gpu_models: Vec<String>,
    pub success: bool,
    pub phase: String,
    pub reason: String,
    pub seconds: f64,
    pub unix_ms: u64,
}

/// The restore record of `digest` in `repository`.
pub async fn restore_record(
    remote: &crate::remote::Remote,
    repository: &str,
    digest: &str,
) -> crate::error::Result<RestoreRecord> {
    let resp = remote.restore_outcomes(repository, digest).await?;
    let recent: Vec<RecordedRestore> = resp
        .outcomes
        .into_iter()
        .map(|o| RecordedRestore {
            node: o.node_name,
            gpu_models: o.gpu_models,
            success: o.success,
            phase: o.phase,
            reason: o.reason,
            seconds: o.seconds,
            unix_ms: o.unix_ms,
        })
        .collect();
    Ok(RestoreRecord {
        successes: recent.iter().filter(|r| r.success).count(),
        failures: recent.iter().filter(|r| !r.success).count(),
        failure_threshold: resp.failure_threshold,
        last_failure: recent.iter().find(|r| !r.success).cloned(),
        recent,
    })
}
