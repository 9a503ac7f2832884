use anyhow::Context;
use snapreg_client::inspect::{self, Summary};
use snapreg_client::pull;

use super::{parse_ref, Output};
use crate::global::Global;

#[derive(clap::Args)]
pub struct Args {
    reference: String,
}

pub async fn run(g: &Global, a: &Args) -> anyhow::Result<Output> {
    let reference = parse_ref(&a.reference)?;
    let remote = g.connect().await?;
    let (digest, manifest) = pull::fetch_manifest(&remote, &reference)
        .await
        .with_context(|| format!("inspecting {reference}"))?;
    let s = inspect::summarize(&reference.to_string(), &digest, &manifest);
    Ok(Output {
        human: human(&s),
        json: serde_json::to_value(&s)?,
    })
}

fn human(s: &Summary) -> String {
    let mut human = format!(
        "{} {}\ncreated by {} on {:?}\n",
        s.reference, s.digest, s.created_by, s.hostname
    );
    for l in &s.layers {
        human += &format!(
            "layer {:<8} {:>4} files {:>14} bytes {:>14} zero {:>7} chunks{}\n",
            l.kind,
            l.files,
            l.bytes,
            l.zero_bytes,
            l.chunks,
            l.name
                .as_deref()
                .map(|n| format!("  ({n})"))
                .unwrap_or_default()
        );
    }
    human += &format!(
        "compat: arch {} kernel {} criu {:?}",
        s.compat.arch, s.compat.kernel, s.compat.criu_version
    );
    if let Some(e) = &s.encryption {
        human += &format!(
            "\nencrypted: tenant key {} ({}), {}",
            e.key_id, e.tenant, e.scheme
        );
    }
    human
}
