//! Stage 1 of a checkpoint: what must hold before CRIU looks at the tree, CRIU's
//! arguments, and what the manifest records besides the images.

use std::path::Path;
use std::sync::Arc;

use snapreg_proto::manifest::{annotations, ExternalFile, Layer, Manifest};

use super::{CheckpointOptions, Spool};
use crate::cuda::Checkpointed;
use crate::error::{ClientError, Result};
use crate::process;
use crate::push::Uploader;
use crate::weights::WeightsPlan;
use crate::written_files::WrittenFile;

/// CRIU options that a restore must repeat when they were given to the dump.
const SYMMETRIC_OPTIONS: &[&str] = &[
    "--tcp-established",
    "--shell-job",
    "--ext-unix-sk",
    "--file-locks",
    "--link-remap",
    "--skip-in-flight",
];

/// Refuses a tree the dump cannot carry (huge pages when streaming) or one still
/// holding weights (separated mode); returns the weights the tree released.
pub(super) fn check_tree(
    opts: &CheckpointOptions,
    pids: &[u32],
) -> Result<Option<Arc<WeightsPlan>>> {
    if opts.spool == Spool::Off {
        // Streaming cannot carry hugetlb pages; CRIU's own directory dump can (`auto`
        // decides later, see route.rs).
        process::refuse_huge_pages(pids)?;
    }
    match &opts.weights_service {
        Some(_) if matches!(opts.spool, Spool::Dir(_)) => Err(ClientError::Usage(
            "--weights-service streams the dump: drop --spool".into(),
        )),
        Some(socket) => Ok(Some(Arc::new(WeightsPlan::prepare(socket, pids)?))),
        None => Ok(None),
    }
}

/// What the manifest records about the dumped tree besides its images and its open
/// files ([`OpenFiles`]), known before CRIU starts.
pub(super) struct TreeFacts {
    pub cuda_pids: Vec<u32>,
    pub gpu: Option<snapreg_proto::compat::GpuRecord>,
    /// Separated mode: the buffers the tree released, uploaded as the weights layer.
    pub weights: Option<Arc<WeightsPlan>>,
    /// Address ranges the CUDA checkpoint added, per PID (device memory in host pages).
    pub device_ranges: std::collections::HashMap<u32, Vec<(u64, u64)>>,
    pub pids: Vec<u32>,
}

impl TreeFacts {
    pub fn new(
        pids: &[u32],
        cuda: Option<&Checkpointed<'_>>,
        weights: Option<Arc<WeightsPlan>>,
    ) -> Self {
        TreeFacts {
            cuda_pids: cuda.map(|g| g.pids.clone()).unwrap_or_default(),
            gpu: crate::cuda::host_gpu(),
            weights,
            device_ranges: cuda.map(|g| g.device_ranges.clone()).unwrap_or_default(),
            pids: pids.to_vec(),
        }
    }
}

/// The regular files the tree holds open or mapped, which CRIU reopens by path, and
/// those of them it writes: listed at CRIU's post-dump, while the tasks are frozen.
/// Listed any earlier, a file the tree opens and renames or removes (a state file
/// rewritten through `NAME.tmp`) can be open in the list and gone from the image, and
/// the restore then refuses the missing file.
pub(super) struct OpenFiles {
    pub external: Vec<ExternalFile>,
    pub written: Vec<WrittenFile>,
}

impl OpenFiles {
    /// Call only while CRIU holds the tree frozen. The tree is walked again from its
    /// root: a child forked before the freeze is in the image too.
    pub fn of_frozen_tree(facts: &TreeFacts, root: u32) -> Self {
        let pids = process::tree(root).unwrap_or_else(|_| facts.pids.clone());
        OpenFiles {
            external: process::external_files(&pids),
            written: crate::written_files::written(&pids),
        }
    }
}

fn restore_options(opts: &CheckpointOptions) -> Vec<String> {
    let mut out = Vec::new();
    if opts.tcp_established {
        out.push("--tcp-established".to_string());
    }
    if opts.shell_job {
        out.push("--shell-job".to_string());
    }
    out.extend(
        opts.extra_args
            .iter()
            .filter(|a| SYMMETRIC_OPTIONS.contains(&a.as_str()))
            .cloned(),
    );
    out.dedup();
    out
}

pub(super) fn dump_args(opts: &CheckpointOptions, dir: &Path) -> Vec<String> {
    let mut args = vec![
        "dump".into(),
        "-t".into(),
        opts.pid.to_string(),
        "-D".into(),
        dir.display().to_string(),
    ];
    args.extend(["-o".into(), "dump.log".into(), "-v4".into()]);
    if opts.leave_running {
        args.push("--leave-running".into());
    }
    if opts.tcp_established {
        // The default network lock runs `iptables`, absent on these hosts (CRIU-STREAM §9).
        args.extend([
            "--tcp-established".into(),
            "--network-lock".into(),
            "nftables".into(),
        ]);
    }
    if opts.shell_job {
        args.push("--shell-job".into());
    }
    args.extend(opts.extra_args.iter().cloned());
    args
}

pub(super) fn build_manifest(
    uploader: &Uploader,
    layers: Vec<Layer>,
    opts: &CheckpointOptions,
    facts: &TreeFacts,
    open: &OpenFiles,
) -> Manifest {
    let mut m = uploader.new_manifest(layers, true);
    if let Some(c) = m.criu.as_mut() {
        c.restore_options = restore_options(opts);
        c.external_files = open.external.clone();
    }
    m.annotations
        .insert(annotations::ROOT_PID.into(), opts.pid.to_string());
    if !facts.cuda_pids.is_empty() {
        let pids: Vec<String> = facts.cuda_pids.iter().map(u32::to_string).collect();
        m.annotations
            .insert(annotations::CUDA_PIDS.into(), pids.join(","));
        m.compat.gpu = facts.gpu.clone();
    }
    if let Some(w) = &facts.weights {
        m.annotations
            .insert(annotations::WEIGHTS_RESUME.into(), w.resume_annotation());
    }
    m
}
