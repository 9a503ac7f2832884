use std::time::Duration;

use serde_json::json;

use super::Output;
use crate::global::Global;

#[derive(clap::Args)]
pub struct Args {
    /// Keep unreferenced chunks younger than this (default: the registry's --gc-grace).
    #[arg(long, value_parser = humantime::parse_duration)]
    grace: Option<Duration>,
    /// Report what would be swept; retention policies are not applied (see
    /// `retention apply --dry-run` for those).
    #[arg(long)]
    dry_run: bool,
}

pub async fn run(g: &Global, a: &Args) -> anyhow::Result<Output> {
    let remote = g.connect().await?;
    let s = remote.collect_garbage(a.grace, a.dry_run).await?;
    let j = json!({
        "dry_run": a.dry_run, "manifests_live": s.manifests_live, "chunks_live": s.chunks_live,
        "chunks_swept": s.chunks_swept, "bytes_swept": s.bytes_swept, "manifests_swept": s.manifests_swept,
        "chunks_kept_young": s.chunks_kept_young, "chunks_kept_leased": s.chunks_kept_leased,
    });
    Ok(Output {
        human: format!(
            "gc{}: swept {} chunks ({} bytes) and {} manifests; live {} chunks; kept {} young, {} leased",
            if a.dry_run { " (dry run)" } else { "" },
            s.chunks_swept, s.bytes_swept, s.manifests_swept, s.chunks_live, s.chunks_kept_young, s.chunks_kept_leased
        ),
        json: j,
    })
}
