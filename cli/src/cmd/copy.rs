use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use snapreg_client::copy::{self, CopyEncryption};
use snapreg_client::ClientError;
use snapreg_proto::encryption::TenantKey;

use super::{parse_ref, Output};
use crate::global::Global;

#[derive(clap::Args)]
pub struct Args {
    source: String,
    destination: String,
    /// Encrypt the copy with this tenant key file.
    #[arg(long, value_name = "FILE", conflicts_with = "to_plaintext")]
    to_key_file: Option<PathBuf>,
    /// Store the copy unencrypted.
    #[arg(long)]
    to_plaintext: bool,
}

pub async fn run(g: &Global, a: &Args) -> anyhow::Result<Output> {
    let (src, dst) = (parse_ref(&a.source)?, parse_ref(&a.destination)?);
    let to = match (&a.to_key_file, a.to_plaintext) {
        (Some(path), _) => {
            CopyEncryption::Key(Arc::new(TenantKey::load(path).map_err(ClientError::from)?))
        }
        (None, true) => CopyEncryption::Plaintext,
        (None, false) => CopyEncryption::Same,
    };
    let remote = g.connect().await?;
    let r = copy::copy(&remote, &src, &dst, to, g.open_cache()?, g.progress("copy"))
        .await
        .with_context(|| format!("copying {src} to {dst} on {}", remote.url()))?;
    Ok(Output {
        human: format!(
            "copied {} ({}) to {} ({}){}: {} files, {} of {} chunks sent, {:.2}s",
            r.source,
            r.source_digest,
            r.reference,
            r.digest,
            r.key_id
                .as_deref()
                .map(|k| format!(", encrypted with key {k}"))
                .unwrap_or_default(),
            r.files,
            r.counters.chunks_transferred,
            r.counters.chunks_total,
            r.seconds
        ),
        json: serde_json::to_value(&r)?,
    })
}
