//! One file per subcommand: its arguments, the library calls, and its report (human
//! text, and the JSON object `--json` prints).

pub mod agent;
pub mod cache;
pub mod checkpoint;
pub mod copy;
pub mod export;
pub mod gc;
pub mod host;
pub mod import;
pub mod inspect;
pub mod key;
pub mod ls;
pub mod prefetch;
pub mod pull;
pub mod pull_restore;
pub mod push;
pub mod replication;
pub mod retention;
pub mod rm;
pub mod tag;
pub mod verify;
pub mod weights;

use snapreg_client::ClientError;
use snapreg_proto::reference::Reference;

/// What a command reports: `human` on stdout, or `json` as stdout's last line.
pub struct Output {
    pub human: String,
    pub json: serde_json::Value,
}

pub fn parse_ref(text: &str) -> anyhow::Result<Reference> {
    Ok(text.parse::<Reference>().map_err(ClientError::from)?)
}

/// One line on stdout now, for whoever waits on a long-running command (agent,
/// weights service) to be ready.
pub fn announce(line: &serde_json::Value) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()?;
    Ok(())
}

/// SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
