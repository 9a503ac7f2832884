use serde_json::json;
use snapreg_client::cache::ChunkCache;
use snapreg_client::ClientError;

use super::Output;
use crate::global::{parse_size, Global};

#[derive(clap::Subcommand)]
pub enum Command {
    /// List cached chunks (least recently used first) and the total.
    Ls,
    /// Evict least-recently-used chunks down to --to (default: the cache size limit).
    Prune {
        #[arg(long, value_parser = parse_size)]
        to: Option<u64>,
    },
}

pub fn run(g: &Global, command: &Command) -> anyhow::Result<Output> {
    let cache = g.open_cache()?;
    match command {
        Command::Ls => ls(&cache),
        Command::Prune { to } => {
            let s = cache
                .prune_to(to.unwrap_or(g.cache_size))
                .map_err(|e| ClientError::io("pruning the cache", e))?;
            Ok(Output {
                human: format!(
                    "removed {} chunks ({} bytes); {} chunks ({} bytes) left",
                    s.chunks_removed, s.bytes_removed, s.chunks_left, s.bytes_left
                ),
                json: serde_json::to_value(&s)?,
            })
        }
    }
}

fn ls(cache: &ChunkCache) -> anyhow::Result<Output> {
    let mut entries = cache
        .entries()
        .map_err(|e| ClientError::io(format!("reading {}", cache.dir().display()), e))?;
    entries.sort_by_key(|e| e.last_used_unix);
    let usage = cache
        .usage()
        .map_err(|e| ClientError::io("reading the cache", e))?;
    let mut human: Vec<String> = entries
        .iter()
        .map(|e| format!("{}\t{}\t{}", e.digest, e.bytes, e.last_used_unix))
        .collect();
    human.push(format!(
        "{} chunks, {} bytes of {} allowed, in {}",
        usage.chunks,
        usage.bytes,
        usage.limit_bytes,
        cache.dir().display()
    ));
    Ok(Output {
        human: human.join("\n"),
        json: json!({ "dir": cache.dir(), "usage": usage, "entries": entries }),
    })
}
