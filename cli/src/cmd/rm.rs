use anyhow::Context;
use serde_json::json;
use snapreg_proto::reference::Target;

use super::{parse_ref, Output};
use crate::global::Global;

#[derive(clap::Args)]
pub struct Args {
    reference: String,
}

pub async fn run(g: &Global, a: &Args) -> anyhow::Result<Output> {
    let r = parse_ref(&a.reference)?;
    let remote = g.connect().await?;
    match &r.target {
        Target::Tag(tag) => {
            let digest = remote.delete_tag(&r.repository, tag).await?;
            Ok(Output {
                human: format!("deleted {r} (was {digest})"),
                json: json!({ "deleted": r.to_string(), "digest": digest.to_string() }),
            })
        }
        Target::Digest(d) => {
            let digest = remote
                .delete_manifest(&r.repository, d)
                .await
                .with_context(|| format!("deleting manifest {r}"))?;
            Ok(Output {
                human: format!("deleted manifest {digest}; its chunks go at the next gc"),
                json: json!({ "deleted": r.to_string(), "digest": digest.to_string() }),
            })
        }
    }
}
