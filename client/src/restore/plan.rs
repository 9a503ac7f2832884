//! Stage 1 of a restore, before CRIU starts: the manifest, the host's compatibility,
//! the GPU map, the checks a separated or CUDA snapshot needs, CRIU's arguments, and
//! (once the chunk source exists) the zero-page plan. Everything here can refuse, and
//! nothing here has touched the host yet.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;

use bytes::Bytes;
use snapreg_proto::compat::{self, CheckOptions};
use snapreg_proto::manifest::{annotations, Extent, Layer, LayerKind, Manifest};
use snapreg_proto::reference::Reference;

use super::RestoreOptions;
use crate::cuda::GpuPair;
use crate::error::{ClientError, Result};
use crate::fetch::Chunks;
use crate::progress::Progress;
use crate::{host, process, written_files, zero_pages};

/// What the restore of one snapshot will do, decided before CRIU starts.
pub(super) struct Plan {
    pub manifest: Manifest,
    /// Compatibility warnings and what `--force` overrode, for the user.
    pub warnings: Vec<String>,
    pub gpu_pairs: Vec<GpuPair>,
    /// The process layer's files by name, as CRIU will ask for them.
    pub files: HashMap<String, Vec<Extent>>,
    /// Separated mode: the weights layer to fill while CRIU restores.
    pub weights_layer: Option<Layer>,
    /// (pid, signal) of the workers to resume once their weights are back.
    pub resume: Vec<(u32, i32)>,
    /// PIDs whose CUDA state comes back after CRIU.
    pub cuda_pids: Vec<u32>,
}

impl Plan {
    /// Checks `manifest` against this host and `opts`; refuses with the reason.
    pub fn make(manifest: Manifest, reference: &Reference, opts: &RestoreOptions) -> Result<Plan> {
        let (warnings, gpu_pairs) = check_host(&manifest, reference, opts)?;
        let weights_layer = weights_layer(&manifest, reference, opts)?;
        let cuda_pids: Vec<u32> = manifest
            .annotations
            .get(annotations::CUDA_PIDS)
            .map(|v| v.split(',').filter_map(|p| p.parse().ok()).collect())
            .unwrap_or_default();
        if !cuda_pids.is_empty() && !opts.detach {
            return Err(ClientError::Usage(format!(
                "{reference} holds CUDA state: restore it with --detach (snapctl puts the GPU state back after CRIU returns)"
            )));
        }
        let files = process_layer(&manifest, reference)?
            .files
            .iter()
            .map(|f| (f.path.clone(), f.extents.clone()))
            .collect();
        let resume =
            crate::weights::resume_list(manifest.annotations.get(annotations::WEIGHTS_RESUME));
        Ok(Plan {
            warnings,
            gpu_pairs,
            files,
            weights_layer,
            resume,
            cuda_pids,
            manifest,
        })
    }

    pub fn process_layer(&self) -> &Layer {
        self.manifest
            .layers
            .iter()
            .find(|l| l.kind == LayerKind::Process)
            .expect("checked by Plan::make")
    }

    /// Every chunk of the process layer, in the order CRIU reads them: the small
    /// files first, then each task's pages, root first (`pages-<id>.img` by id;
    /// shared/CRIU-STREAM.md §6), each file's chunks in file order.
    pub fn criu_order(&self) -> Vec<crate::fetch::Want> {
        let pages_id = |name: &str| -> Option<u64> {
            name.strip_prefix("pages-")?
                .strip_suffix(".img")?
                .parse()
                .ok()
        };
        let mut names: Vec<&String> = self.files.keys().collect();
        names.sort_by_key(|n| (pages_id(n).is_some(), pages_id(n), n.as_str()));
        let mut out = Vec::new();
        for name in names {
            let file: std::sync::Arc<str> = name.as_str().into();
            for e in &self.files[name] {
                if let Extent::Chunk { chunk, .. } = e {
                    out.push((*chunk, file.clone()));
                }
            }
        }
        out
    }

    /// Sets the transfer totals: the process layer's bytes, its zero runs, the chunks.
    pub fn count_totals(&self, progress: &Progress) {
        let layer = self.process_layer();
        progress.add_total(layer.files.iter().map(|f| f.size).sum());
        for f in &layer.files {
            for e in &f.extents {
                if let Extent::Zero { zero } = e {
                    progress.counters.zero_bytes.fetch_add(*zero, Relaxed);
                }
            }
        }
        progress
            .counters
            .chunks_total
            .store(self.manifest.chunk_digests().len() as u64, Relaxed);
    }

    /// `criu restore` arguments: the image directory, the log, the options the
    /// snapshot's dump requires, then the caller's.
    pub fn criu_args(&self, dir: &Path, opts: &RestoreOptions) -> Vec<String> {
        let mut args: Vec<String> = vec!["restore".into(), "-D".into(), dir.display().to_string()];
        args.extend(["-o".into(), "restore.log".into(), "-v4".into()]);
        if opts.detach {
            args.push("-d".into());
        }
        let restore_options = self
            .manifest
            .criu
            .as_ref()
            .map(|c| c.restore_options.clone())
            .unwrap_or_default();
        if restore_options.iter().any(|o| o == "--tcp-established") {
            args.extend(["--network-lock".into(), "nftables".into()]);
        }
        args.extend(restore_options);
        args.extend(opts.extra_args.iter().cloned());
        args
    }

    /// Zero pages of private anonymous memory left out of the served pagemap (unless
    /// `keep`): reads the two small files the plan needs while CRIU waits for its
    /// first answers, and adds the rewritten pagemaps to the files served.
    pub async fn zero_pages(
        &mut self,
        chunks: &Chunks,
        keep: bool,
        progress: &Progress,
    ) -> Result<zero_pages::ZeroPagePlan> {
        if keep {
            return Ok(zero_pages::ZeroPagePlan::default());
        }
        let mut small = HashMap::new();
        for name in zero_pages::needed(&self.files) {
            let bytes = file_bytes(chunks, &name, &self.files[&name]).await?;
            small.insert(name, bytes);
        }
        let plan = zero_pages::plan(&self.files, &small);
        self.files.extend(plan.pages.clone());
        if plan.bytes_left_out > 0 {
            tracing::info!(
                bytes = plan.bytes_left_out,
                "zero pages left out of the pagemap"
            );
            progress.placed(plan.bytes_left_out);
        }
        Ok(plan)
    }
}

/// Compatibility (each mismatch named; `--force` turns them into warnings), the GPU
/// map, and the files the image reopens by path (but those it writes and carries).
fn check_host(
    manifest: &Manifest,
    reference: &Reference,
    opts: &RestoreOptions,
) -> Result<(Vec<String>, Vec<GpuPair>)> {
    let mut facts = host::facts();
    facts.gpu = crate::cuda::host_gpu();
    let check = CheckOptions {
        gpu_remapped: opts.gpu_map.is_some(),
        ..CheckOptions::default()
    };
    let verdict = compat::check(&manifest.compat, &facts, &check);
    let gpu_pairs = match (&opts.gpu_map, &manifest.compat.gpu, &facts.gpu) {
        (None, ..) => Vec::new(),
        (Some(map), Some(snapshot), Some(host)) => crate::cuda::gpu_pairs(map, snapshot, host)?,
        (Some(_), None, _) => {
            return Err(ClientError::Usage(format!(
                "{reference} holds no GPU state: drop --gpu-map"
            )))
        }
        (Some(_), _, None) => {
            return Err(ClientError::Usage(
                "--gpu-map: this host has no NVIDIA GPU".into(),
            ))
        }
    };
    let mut warnings: Vec<String> = verdict
        .warnings
        .iter()
        .map(|w| format!("warning: {w}"))
        .collect();
    if !verdict.is_compatible() {
        let list = verdict
            .mismatches
            .iter()
            .map(|m| format!("  {m}"))
            .collect::<Vec<_>>()
            .join("\n");
        if !opts.force {
            return Err(ClientError::Incompatible(list));
        }
        warnings.push(format!("--force overrode:\n{list}"));
    }
    // Written files the snapshot carries are put back instead.
    match process::check_external_files(&written_files::left_to_check(manifest)) {
        Ok(w) => warnings.extend(w),
        Err(e) if opts.force => warnings.push(format!("--force overrode: {e}")),
        Err(e) => return Err(e),
    }
    Ok((warnings, gpu_pairs))
}

/// The weights layer of a separated snapshot, which needs a weights service and a
/// detached restore (snapctl resumes the workers after CRIU returns).
fn weights_layer(
    manifest: &Manifest,
    reference: &Reference,
    opts: &RestoreOptions,
) -> Result<Option<Layer>> {
    let Some(layer) = manifest
        .layers
        .iter()
        .find(|l| l.kind == LayerKind::Weights)
    else {
        return Ok(None);
    };
    if opts.weights_service.is_none() {
        return Err(ClientError::Usage(format!(
            "{reference} keeps its weights apart: pass --weights-service SOCKET (the node's `snapctl weights serve`)"
        )));
    }
    if !opts.detach {
        return Err(ClientError::Usage(format!(
            "{reference} keeps its weights apart: restore it with --detach (snapctl resumes the worker after CRIU returns)"
        )));
    }
    Ok(Some(layer.clone()))
}

fn process_layer<'m>(manifest: &'m Manifest, reference: &Reference) -> Result<&'m Layer> {
    manifest
        .layers
        .iter()
        .find(|l| l.kind == LayerKind::Process)
        .ok_or_else(|| {
            ClientError::Usage(format!(
                "{reference} has no process layer: use `snapctl pull` for plain snapshots"
            ))
        })
}

/// A small file's whole bytes (verified chunks, through the node cache).
pub(super) async fn file_bytes(chunks: &Chunks, name: &str, extents: &[Extent]) -> Result<Bytes> {
    let mut out = bytes::BytesMut::new();
    for e in extents {
        match *e {
            Extent::Chunk { chunk, .. } => out.extend_from_slice(&chunks.get(chunk, name).await?),
            Extent::Zero { zero } => out.resize(out.len() + zero as usize, 0),
        }
    }
    Ok(out.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;
    use snapreg_proto::Digest;

    #[test]
    fn criu_order_is_small_files_then_pages_by_id_each_in_file_order() {
        let chunk = |i: u8| Extent::Chunk {
            chunk: Digest::of(&[i]),
            len: 1,
        };
        let files: HashMap<String, Vec<Extent>> = [
            ("pages-10.img", vec![chunk(6)]),
            (
                "pages-2.img",
                vec![chunk(4), Extent::Zero { zero: 4096 }, chunk(5)],
            ),
            ("pagemap-1.img", vec![chunk(2)]),
            ("core-1.img", vec![chunk(1)]),
            ("pages-1.img", vec![chunk(3), chunk(1)]),
        ]
        .into_iter()
        .map(|(n, e)| (n.to_string(), e))
        .collect();
        let plan = Plan {
            manifest: crate::push::new_manifest(&Default::default(), vec![], true),
            warnings: vec![],
            gpu_pairs: vec![],
            files,
            weights_layer: None,
            resume: vec![],
            cuda_pids: vec![],
        };
        let order: Vec<(Digest, String)> = plan
            .criu_order()
            .into_iter()
            .map(|(d, f)| (d, f.to_string()))
            .collect();
        let want: Vec<(Digest, String)> = [
            (1, "core-1.img"),
            (2, "pagemap-1.img"),
            (3, "pages-1.img"),
            (1, "pages-1.img"),
            (4, "pages-2.img"),
            (5, "pages-2.img"),
            (6, "pages-10.img"),
        ]
        .into_iter()
        .map(|(i, f)| (Digest::of(&[i]), f.to_string()))
        .collect();
        assert_eq!(order, want);
    }
}
