use serde_json::json;

use super::Output;
use crate::global::Global;

#[derive(clap::Subcommand)]
pub enum Command {
    /// Per peer: entries behind, last success, last error, what was sent.
    Status,
}

pub async fn run(g: &Global, command: &Command) -> anyhow::Result<Output> {
    let Command::Status = command;
    let remote = g.connect().await?;
    let s = remote.replication_status().await?;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let mut human = vec![format!("replication log head: {}", s.log_head)];
    let mut peers = Vec::new();
    for p in &s.peers {
        let since = match p.last_success_unix_ms {
            0 => "never".to_string(),
            t => format!("{:.1}s ago", now_ms.saturating_sub(t) as f64 / 1000.0),
        };
        human.push(format!(
            "{}\t{}\t{} behind\tlast success {since}\t{}",
            p.name,
            p.url,
            p.entries_behind,
            if p.last_error.is_empty() {
                "ok".to_string()
            } else {
                format!("last error: {}", p.last_error)
            }
        ));
        peers.push(json!({
            "name": p.name, "url": p.url, "repository_prefixes": p.repository_prefixes, "acked_seq": p.acked_seq,
            "entries_behind": p.entries_behind, "last_success_unix_ms": p.last_success_unix_ms, "last_error": p.last_error,
            "chunks_sent": p.chunks_sent, "bytes_sent": p.bytes_sent, "manifests_sent": p.manifests_sent,
            "records_sent": p.records_sent, "failures": p.failures,
        }));
    }
    Ok(Output {
        human: human.join("\n"),
        json: json!({ "log_head": s.log_head, "peers": peers }),
    })
}
