use anyhow::Context;
use snapreg_client::oci_image::{self, ExportTarget};

use super::{parse_ref, Output};
use crate::global::Global;

#[derive(clap::Args)]
pub struct Args {
    /// The snapshot.
    reference: String,
    /// oci:DIR[:NAME] (an OCI image layout) or oci-archive:FILE[:NAME] (the same,
    /// tarred): what skopeo, podman and buildah read.
    target: String,
}

pub async fn run(g: &Global, a: &Args) -> anyhow::Result<Output> {
    let reference = parse_ref(&a.reference)?;
    let target: ExportTarget = a.target.parse()?;
    let remote = g.connect().await?;
    let progress = g.progress("export");
    let report = oci_image::export(&remote, &reference, &target, progress)
        .await
        .with_context(|| {
            format!(
                "exporting {reference} from {} to {}",
                remote.url(),
                a.target
            )
        })?;
    Ok(Output {
        human: format!(
            "exported {} ({}) to {} as OCI manifest {}: {} blobs, {} bytes, {:.2}s",
            report.reference,
            report.digest,
            a.target,
            report.manifest_digest,
            report.blobs,
            report.bytes,
            report.seconds
        ),
        json: serde_json::to_value(&report)?,
    })
}
