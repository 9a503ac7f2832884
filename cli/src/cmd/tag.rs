use serde_json::json;
use snapreg_client::ClientError;
use snapreg_proto::reference::Target;

use super::{parse_ref, Output};
use crate::global::Global;

#[derive(clap::Args)]
pub struct Args {
    source: String,
    destination: String,
}

pub async fn run(g: &Global, a: &Args) -> anyhow::Result<Output> {
    let src = parse_ref(&a.source)?;
    let dst = parse_ref(&a.destination)?;
    let Target::Tag(dst_tag) = &dst.target else {
        return Err(
            ClientError::Usage(format!("tag destination must be repo:tag, got {dst}")).into(),
        );
    };
    let remote = g.connect().await?;
    let (digest, _) = remote
        .get_manifest(&src.repository, &src.target_string())
        .await?;
    remote.set_tag(&dst.repository, dst_tag, &digest).await?;
    Ok(Output {
        human: format!("{dst} -> {digest}"),
        json: json!({ "reference": dst.to_string(), "digest": digest.to_string() }),
    })
}
