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
    // A registry older than RestoreOutcomes answers UNIMPLEMENTED: show the rest.
    let restores =
        inspect::restore_record(&remote, &reference.repository, &digest.to_string()).await;
    let restores = match restores {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::warn!("no restore record: {e}");
            None
        }
    };
    let mut json = serde_json::to_value(&s)?;
    json["restores"] = serde_json::to_value(&restores)?;
    let mut human = human(&s);
    if let Some(r) = &restores {
        human += &restores_human(r);
    }
    Ok(Output { human, json })
}

fn restores_human(r: &inspect::RestoreRecord) -> String {
    let mut out = format!(
        "\nrestores: {} succeeded, {} failed of the last {} recorded",
        r.successes,
        r.failures,
        r.recent.len()
    );
    if let Some(f) = &r.last_failure {
        out += &format!("\nlast failure: on {} at {}: {}", f.node, f.phase, f.reason);
    }
    out
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
