use serde_json::json;

use super::Output;
use crate::global::Global;

#[derive(clap::Args)]
pub struct Args {
    repository: Option<String>,
}

pub async fn run(g: &Global, a: &Args) -> anyhow::Result<Output> {
    let remote = g.connect().await?;
    let Some(repo) = &a.repository else {
        let repos = remote.list_repositories().await?;
        return Ok(Output {
            human: repos.join("\n"),
            json: json!({ "repositories": repos }),
        });
    };
    let tags = remote.list_tags(repo).await?;
    let human = tags
        .iter()
        .map(|t| format!("{}:{}\t{}", repo, t.tag, t.digest))
        .collect::<Vec<_>>()
        .join("\n");
    let list: Vec<_> = tags
        .iter()
        .map(|t| json!({ "tag": t.tag, "digest": t.digest }))
        .collect();
    Ok(Output {
        human,
        json: json!({ "repository": repo, "tags": list }),
    })
}
