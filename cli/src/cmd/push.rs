use std::path::PathBuf;

use anyhow::Context;
use snapreg_client::{podman, push, ClientError};

use super::{parse_ref, Output};
use crate::global::Global;

#[derive(clap::Args)]
pub struct Args {
    #[arg(long, value_name = "FILE")]
    podman_archive: Option<PathBuf>,
    /// DIR REF (or REF alone with --podman-archive).
    #[arg(required = true, num_args = 1..=2, value_name = "DIR REF")]
    args: Vec<String>,
}

pub async fn run(g: &Global, a: &Args) -> anyhow::Result<Output> {
    // The directory, or with --podman-archive the archive.
    let (source, reference) = match (&a.podman_archive, a.args.as_slice()) {
        (Some(archive), [r]) => (archive.clone(), r),
        (None, [d, r]) => (PathBuf::from(d), r),
        _ => {
            return Err(ClientError::Usage(
                "usage: push DIR REF, or push --podman-archive FILE REF".into(),
            )
            .into())
        }
    };
    let reference = parse_ref(reference)?;
    let remote = g.connect().await?;
    let progress = g.progress("push");
    let report = match &a.podman_archive {
        None => push::push_dir(&remote, &source, &reference, progress).await,
        Some(_) => podman::push_archive(&remote, &source, &reference, progress).await,
    }
    .with_context(|| {
        format!(
            "pushing {} to {} as {reference}",
            source.display(),
            remote.url()
        )
    })?;
    let c = &report.counters;
    Ok(Output {
        human: format!(
            "pushed {} ({}): {} files, {} bytes, {} of {} chunks sent ({} bytes), {} zero bytes skipped, {:.2}s",
            report.reference, report.digest, report.files, c.bytes_total, c.chunks_transferred, c.chunks_total,
            c.bytes_transferred, c.zero_bytes, report.seconds
        ),
        json: serde_json::to_value(&report)?,
    })
}
