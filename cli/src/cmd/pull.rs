use std::path::PathBuf;

use anyhow::Context;
use snapreg_client::{podman, pull, ClientError};

use super::{parse_ref, Output};
use crate::global::Global;

#[derive(clap::Args)]
pub struct Args {
    #[arg(long, value_name = "OUT.tar")]
    podman_archive: Option<PathBuf>,
    /// REF DIR (or REF alone with --podman-archive).
    #[arg(required = true, num_args = 1..=2, value_name = "REF DIR")]
    args: Vec<String>,
}

pub async fn run(g: &Global, a: &Args) -> anyhow::Result<Output> {
    // The directory, or with --podman-archive the archive.
    let (reference, into) = match (&a.podman_archive, a.args.as_slice()) {
        (Some(out), [r]) => (r, out.clone()),
        (None, [r, d]) => (r, PathBuf::from(d)),
        _ => {
            return Err(ClientError::Usage(
                "usage: pull REF DIR, or pull --podman-archive OUT.tar REF".into(),
            )
            .into())
        }
    };
    let reference = parse_ref(reference)?;
    let remote = g.connect().await?;
    let progress = g.progress("pull");
    let report = match &a.podman_archive {
        None => pull::pull_dir(&remote, &reference, &into, g.peers()?, progress).await,
        Some(_) => podman::pull_archive(&remote, &reference, &into, progress).await,
    }
    .with_context(|| {
        format!(
            "pulling {reference} from {} into {}",
            remote.url(),
            into.display()
        )
    })?;
    let c = &report.counters;
    Ok(Output {
        human: format!(
            "pulled {} ({}): {} files, {} bytes, {} chunks fetched ({} bytes), {:.2}s",
            report.reference,
            report.digest,
            report.files,
            c.bytes_total,
            c.chunks_transferred,
            c.bytes_transferred,
            report.seconds
        ),
        json: serde_json::to_value(&report)?,
    })
}
