use anyhow::Context;
use snapreg_client::{restore, verify};

use super::{parse_ref, Output};
use crate::global::Global;

#[derive(clap::Args)]
pub struct Args {
    reference: String,
    /// Chunk fetches in flight.
    #[arg(long, default_value_t = restore::DEFAULT_WINDOW)]
    window: usize,
}

pub async fn run(g: &Global, a: &Args) -> anyhow::Result<Output> {
    let reference = parse_ref(&a.reference)?;
    let remote = g.connect().await?;
    let context = || format!("verifying {reference} on {}", remote.url());
    let r = verify::verify(&remote, &reference, a.window, g.progress("verify"))
        .await
        .with_context(context)?;
    if let Some(e) = r.failure() {
        return Err(anyhow::Error::new(e).context(context()));
    }
    Ok(Output {
        human: format!(
            "verified {} ({}): {} files, {} chunks ({} bytes) all intact{}, {:.2}s",
            r.reference,
            r.digest,
            r.files,
            r.chunks_ok,
            r.counters.bytes_transferred,
            if r.content_checked {
                ""
            } else {
                " as stored (encrypted; pass its --key-file to check the content too)"
            },
            r.seconds
        ),
        json: serde_json::to_value(&r)?,
    })
}
