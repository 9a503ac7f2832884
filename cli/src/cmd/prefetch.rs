use anyhow::Context;
use snapreg_client::{prefetch, restore};

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
    let remotes = g.connect_all().await?;
    let r = prefetch::prefetch(
        remotes,
        &reference,
        g.open_cache()?,
        a.window,
        g.peers()?,
        g.progress("prefetch"),
    )
    .await
    .with_context(|| format!("prefetching {reference}"))?;
    Ok(Output {
        human: format!(
            "prefetched {} ({}): {} chunks fetched ({} from peers), {} already cached, {:.2}s",
            r.reference,
            r.digest,
            r.counters.chunks_transferred,
            r.counters.chunks_from_peers,
            r.counters.chunks_cached,
            r.seconds
        ),
        json: serde_json::to_value(&r)?,
    })
}
