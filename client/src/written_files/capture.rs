//! Reading the written files into the snapshot, within limits, while the tree is
//! frozen; and recording them in the manifest.

use std::io::Read;
use std::os::unix::fs::MetadataExt;

use snapreg_proto::manifest::{
    Extent, ExternalFile, File, Layer, LayerKind, Manifest, WRITTEN_FILES_LAYER,
};

use super::find::WrittenFile;
use crate::error::Result;
use crate::push::Uploader;

/// How much of the written files a checkpoint carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaptureLimits {
    /// Off: every written file is left out (a restore checks them as before).
    pub enabled: bool,
    /// A file bigger than this is left out.
    pub per_file: u64,
    /// Files past this many bytes in all (in path order) are left out.
    pub total: u64,
}

impl CaptureLimits {
    /// Logs and scratch files of a worker are KBs to MBs; 16 MiB keeps a forgotten
    /// data file from turning a checkpoint's freeze into a bulk copy (read at disk
    /// speed while the tasks are frozen: ~0.1 s at the 1.3 GB/s of DESIGN's disk).
    pub const DEFAULT_PER_FILE: u64 = 16 << 20;
    /// Four files at the per-file limit: bounds the freeze the same way.
    pub const DEFAULT_TOTAL: u64 = 64 << 20;
}

impl Default for CaptureLimits {
    fn default() -> Self {
        CaptureLimits {
            enabled: true,
            per_file: Self::DEFAULT_PER_FILE,
            total: Self::DEFAULT_TOTAL,
        }
    }
}

/// What a checkpoint did with the files its tree writes.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct CaptureReport {
    pub captured: Vec<CapturedFile>,
    pub left_out: Vec<LeftOut>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct CapturedFile {
    pub path: String,
    pub size: u64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct LeftOut {
    pub path: String,
    pub size: u64,
    pub reason: String,
}

/// The captured layer and the manifest records of every written file.
#[derive(Debug, Default)]
pub struct Capture {
    pub layer: Option<Layer>,
    pub report: CaptureReport,
    /// One `written` external-file record per file, stat'd at the capture.
    records: Vec<ExternalFile>,
}

impl Capture {
    /// Marks the written files among `m`'s external files (with their size and mtime
    /// at the freeze, which is what CRIU recorded) and adds the captured layer.
    pub fn record(&self, m: &mut Manifest) {
        let Some(criu) = m.criu.as_mut() else {
            return;
        };
        for r in &self.records {
            match criu.external_files.iter_mut().find(|f| f.path == r.path) {
                Some(f) => *f = r.clone(),
                None => criu.external_files.push(r.clone()),
            }
        }
        if let Some(layer) = &self.layer {
            m.layers.push(layer.clone());
        }
    }

    /// Bytes captured, for the report.
    pub fn bytes(&self) -> u64 {
        self.report.captured.iter().map(|c| c.size).sum()
    }
}

/// Reads each of `files` (through the process's descriptor while it exists, else by
/// path) into `uploader` within `limits`. `left_out` leaves every file out for that
/// reason. A file that cannot be read is left out, not fatal: the restore then checks
/// it as it always did.
pub async fn capture(
    uploader: &Uploader,
    files: &[WrittenFile],
    limits: &CaptureLimits,
    left_out: Option<&str>,
) -> Result<Capture> {
    let mut out = Capture::default();
    let mut layer_files = Vec::new();
    let mut total = 0u64;
    let off = (!limits.enabled).then_some("capture turned off at checkpoint");
    for w in files {
        let (file, meta) = match open(w) {
            Ok(opened) => opened,
            Err(e) => {
                let reason = format!("could not be read at the checkpoint: {e}");
                out.leave(w, None, reason);
                continue;
            }
        };
        let size = meta.len();
        let reason = match left_out.or(off) {
            Some(r) => Some(r.to_string()),
            None if size > limits.per_file => Some(format!(
                "{size} bytes, over the per-file limit of {}",
                limits.per_file
            )),
            None if total + size > limits.total => Some(format!(
                "{size} bytes, past the limit of {} for all written files",
                limits.total
            )),
            None => None,
        };
        if let Some(reason) = reason {
            out.leave(w, Some(&meta), reason);
            continue;
        }
        let extents = uploader.chunk_stream(file.take(size), false).await?;
        let read: u64 = extents.iter().map(Extent::len).sum();
        total += read;
        tracing::debug!(path = %w.path, bytes = read, "written file captured");
        out.records.push(record(w, &meta, read, None));
        out.report.captured.push(CapturedFile {
            path: w.path.clone(),
            size: read,
        });
        layer_files.push(File {
            path: w.path.trim_start_matches('/').to_string(),
            size: read,
            mode: meta.mode() & 0o7777,
            extents,
        });
    }
    if !layer_files.is_empty() {
        out.layer = Some(Layer {
            kind: LayerKind::Extra,
            name: Some(WRITTEN_FILES_LAYER.into()),
            rank: None,
            files: layer_files,
        });
    }
    Ok(out)
}

impl Capture {
    fn leave(&mut self, w: &WrittenFile, meta: Option<&std::fs::Metadata>, reason: String) {
        let size = meta.map_or(0, |m| m.len());
        tracing::info!(path = %w.path, size, %reason, "written file left out");
        if let Some(meta) = meta {
            self.records
                .push(record(w, meta, size, Some(reason.clone())));
        }
        self.report.left_out.push(LeftOut {
            path: w.path.clone(),
            size,
            reason,
        });
    }
}

fn open(w: &WrittenFile) -> std::io::Result<(std::fs::File, std::fs::Metadata)> {
    let file = std::fs::File::open(w.proc_path()).or_else(|_| std::fs::File::open(&w.path))?;
    let meta = file.metadata()?;
    Ok((file, meta))
}

fn record(
    w: &WrittenFile,
    meta: &std::fs::Metadata,
    size: u64,
    left_out: Option<String>,
) -> ExternalFile {
    ExternalFile {
        path: w.path.clone(),
        size,
        mtime: meta.mtime(),
        written: true,
        left_out,
    }
}
