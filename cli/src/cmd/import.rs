use std::path::PathBuf;

use anyhow::Context;
use snapreg_client::podman;

use super::{parse_ref, Output};
use crate::global::Global;

#[derive(clap::Args)]
pub struct Args {
    /// A container checkpoint archive: the kubelet's
    /// (/var/lib/kubelet/checkpoints/checkpoint-POD_NAMESPACE-CONTAINER-TIME.tar,
    /// written by CRI-O) or Podman's (`podman container checkpoint --export`); plain,
    /// gzip or zstd.
    archive: PathBuf,
    /// The snapshot to create (repo:tag).
    reference: String,
}

pub async fn run(g: &Global, a: &Args) -> anyhow::Result<Output> {
    let reference = parse_ref(&a.reference)?;
    let remote = g.connect().await?;
    let progress = g.progress("import");
    let report = podman::push_archive(&remote, &a.archive, &reference, progress)
        .await
        .with_context(|| {
            format!(
                "importing {} into {} as {reference}",
                a.archive.display(),
                remote.url()
            )
        })?;
    let c = &report.counters;
    Ok(Output {
        human: format!(
            "imported {} as {} ({}): {} files, {} bytes, {} chunks sent, {:.2}s",
            a.archive.display(),
            report.reference,
            report.digest,
            report.files,
            c.bytes_total,
            c.chunks_transferred,
            report.seconds
        ),
        json: serde_json::to_value(&report)?,
    })
}
