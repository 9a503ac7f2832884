use std::time::Duration;

use serde_json::{json, Value};
use snapreg_client::remote::Remote;
use snapreg_proto::pb::RetentionPolicy;

use super::Output;
use crate::global::Global;

#[derive(clap::Subcommand)]
pub enum Command {
    /// Keep the N newest tags of REPO and every tag younger than the age; GC (or
    /// `retention apply`) deletes the rest. Both zero removes the policy.
    Set {
        repository: String,
        #[arg(long, default_value_t = 0)]
        keep_last: u32,
        /// e.g. 7d, 12h.
        #[arg(long, value_parser = humantime::parse_duration)]
        keep_for: Option<Duration>,
    },
    /// Show REPO's policy.
    Show { repository: String },
    /// Delete the tags policies do not keep (REPO's, or every repository's) now.
    Apply {
        repository: Option<String>,
        #[arg(long)]
        dry_run: bool,
    },
}

pub async fn run(g: &Global, command: &Command) -> anyhow::Result<Output> {
    let remote = g.connect().await?;
    match command {
        Command::Set {
            repository,
            keep_last,
            keep_for,
        } => {
            let policy = RetentionPolicy {
                keep_last: *keep_last,
                keep_for_seconds: keep_for.map_or(0, |d| d.as_secs()),
            };
            remote.set_retention(repository, policy).await?;
            Ok(Output {
                human: format!(
                    "{repository}: keep the last {} tags and those younger than {}s (0: no such rule)",
                    policy.keep_last, policy.keep_for_seconds
                ),
                json: json!({ "repository": repository, "policy": show(&policy) }),
            })
        }
        Command::Show { repository } => {
            let p = remote.get_retention(repository).await?;
            Ok(Output {
                human: match &p {
                    Some(p) => format!(
                        "{repository}: keep last {}, keep for {}s",
                        p.keep_last, p.keep_for_seconds
                    ),
                    None => format!("{repository}: no retention policy"),
                },
                json: json!({ "repository": repository, "policy": p.as_ref().map(show) }),
            })
        }
        Command::Apply {
            repository,
            dry_run,
        } => apply(&remote, repository.as_deref(), *dry_run).await,
    }
}

fn show(p: &RetentionPolicy) -> Value {
    json!({ "keep_last": p.keep_last, "keep_for_seconds": p.keep_for_seconds })
}

async fn apply(remote: &Remote, repository: Option<&str>, dry_run: bool) -> anyhow::Result<Output> {
    let outcomes = remote.apply_retention(repository, dry_run).await?;
    let human = outcomes
        .iter()
        .map(|o| {
            format!(
                "{}: {} {} tags ({}), kept {}",
                o.repository,
                if dry_run { "would delete" } else { "deleted" },
                o.deleted.len(),
                o.deleted.join(", "),
                o.kept.len()
            )
        })
        .collect::<Vec<_>>()
        .join("\n");
    let list: Vec<_> = outcomes
        .iter()
        .map(|o| {
            json!({ "repository": o.repository, "policy": o.policy.as_ref().map(show),
                    "deleted": o.deleted, "kept": o.kept })
        })
        .collect();
    Ok(Output {
        human,
        json: json!({ "dry_run": dry_run, "repositories": list }),
    })
}
