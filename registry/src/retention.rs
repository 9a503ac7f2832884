//! Retention policies: keep a repository's `keep_last` newest tags and every tag
//! younger than `keep_for`, delete the rest with tombstone records, and let GC reclaim
//! what they held.
//!
//! A policy lives in the object store (`retention/<repo>/_policy.json`, see
//! `proto/src/layout.rs`), the source of truth, so every registry instance on a bucket
//! applies the same one and a rebuilt index loses nothing. Policies are applied by
//! `ApplyRetention` (`snapctl retention apply`) and at the start of every GC that is
//! not a dry run.
//!
//! Rules, in order: the newest tag is always kept (age alone never empties a
//! repository); a tag among the `keep_last` newest is kept; a tag whose record is
//! younger than `keep_for` is kept; the rest are deleted. "Newest" is the tag
//! record's hybrid logical clock, i.e. when the tag was last set. A tag moved by a
//! push while the policy is applied is re-read just before its tombstone is written
//! and kept if it changed.

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};
use snapreg_proto::layout;
use snapreg_proto::tags::{TagRecord, TagTarget};

use crate::clock::now_ms;
use crate::error::{RegistryError, Result};
use crate::registry::{repo_arg, Registry};

/// A repository's policy; zero means "no such rule".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    pub keep_last: u32,
    pub keep_for_seconds: u64,
}

impl Policy {
    fn is_empty(&self) -> bool {
        self.keep_last == 0 && self.keep_for_seconds == 0
    }

    /// Splits a repository's tags into (kept, deleted), newest first.
    fn select(
        &self,
        mut tags: Vec<(String, TagRecord)>,
        now_ms: u64,
    ) -> (Vec<String>, Vec<String>) {
        tags.sort_by(|a, b| b.1.cmp(&a.1));
        let young_after = now_ms.saturating_sub(self.keep_for_seconds.saturating_mul(1000));
        let (mut kept, mut deleted) = (Vec::new(), Vec::new());
        for (i, (tag, rec)) in tags.into_iter().enumerate() {
            let keep = i == 0
                || i < self.keep_last as usize
                || (self.keep_for_seconds > 0 && rec.hlc.physical_ms() >= young_after);
            if keep {
                kept.push(tag);
            } else {
                deleted.push(tag);
            }
        }
        (kept, deleted)
    }
}

/// What applying a repository's policy did (or, on a dry run, would do).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub repository: String,
    pub policy: Policy,
    pub deleted: Vec<String>,
    pub kept: Vec<String>,
}

/// Stores (or, when empty, removes) a repository's policy.
pub async fn set(reg: &Registry, repository: &str, policy: Policy) -> Result<()> {
    repo_arg(repository)?;
    let path = Path::from(layout::retention_path(repository));
    if policy.is_empty() {
        match reg.store().objects().delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    } else {
        let body = serde_json::to_vec(&policy).expect("policy serializes");
        reg.store()
            .objects()
            .put(&path, PutPayload::from(Bytes::from(body)))
            .await?;
    }
    tracing::info!(%repository, ?policy, "retention policy set");
    Ok(())
}

pub async fn get(reg: &Registry, repository: &str) -> Result<Option<Policy>> {
    repo_arg(repository)?;
    let path = Path::from(layout::retention_path(repository));
    match reg.store().objects().get(&path).await {
        Ok(got) => {
            let body = got.bytes().await?;
            serde_json::from_slice(&body).map(Some).map_err(|e| {
                RegistryError::Io(std::io::Error::other(format!(
                    "retention policy object {path} does not parse ({e}); set it again with \
                     `snapctl retention set {repository}`"
                )))
            })
        }
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Every repository that has a policy.
async fn repositories_with_policies(reg: &Registry) -> Result<Vec<String>> {
    let prefix = Path::from(layout::RETENTION);
    let metas: Vec<_> = reg
        .store()
        .objects()
        .list(Some(&prefix))
        .try_collect()
        .await?;
    Ok(metas
        .iter()
        .filter_map(|m| layout::parse_retention_path(m.location.as_ref()).ok())
        .collect())
}

/// Applies the policy of `repository` (or of every repository that has one).
pub async fn apply(
    reg: &Registry,
    repository: Option<&str>,
    dry_run: bool,
) -> Result<Vec<Outcome>> {
    let repos = match repository {
        Some(r) => {
            repo_arg(r)?;
            vec![r.to_string()]
        }
        None => repositories_with_policies(reg).await?,
    };
    let all = reg.index().all_tags()?;
    let mut outcomes = Vec::new();
    for repo in repos {
        let Some(policy) = get(reg, &repo).await? else {
            continue;
        };
        let tags: Vec<(String, TagRecord)> = all
            .iter()
            .filter(|(r, _, rec)| *r == repo && rec.digest().is_some())
            .map(|(_, t, rec)| (t.clone(), rec.clone()))
            .collect();
        let before: std::collections::HashMap<String, TagRecord> = tags.iter().cloned().collect();
        let (mut kept, selected) = policy.select(tags, now_ms());
        let mut deleted = Vec::new();
        for tag in selected {
            if !dry_run {
                // A push may have moved the tag since the listing: then it is new.
                if reg.index().tag_record(&repo, &tag)? != before.get(&tag).cloned() {
                    kept.push(tag);
                    continue;
                }
                reg.write_tag(&repo, &tag, TagTarget::Deleted).await?;
            }
            deleted.push(tag);
        }
        if !deleted.is_empty() {
            tracing::info!(repository = %repo, ?deleted, dry_run, "retention deleted tags");
        }
        outcomes.push(Outcome {
            repository: repo,
            policy,
            deleted,
            kept,
        });
    }
    Ok(outcomes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use snapreg_proto::tags::Hlc;
    use snapreg_proto::Digest;

    fn tag(name: &str, age_s: u64, now_ms: u64) -> (String, TagRecord) {
        (
            name.to_string(),
            TagRecord {
                hlc: Hlc((now_ms - age_s * 1000) << 16),
                target: TagTarget::Manifest(Digest::of(name.as_bytes())),
            },
        )
    }

    #[test]
    fn keeps_the_newest_n_and_the_young_and_always_the_newest() {
        let now = 10_000_000;
        let tags = || {
            vec![
                tag("old", 5000, now),
                tag("new", 10, now),
                tag("mid", 500, now),
                tag("older", 9000, now),
            ]
        };
        let p = Policy {
            keep_last: 2,
            keep_for_seconds: 0,
        };
        assert_eq!(
            p.select(tags(), now),
            (
                vec!["new".into(), "mid".into()],
                vec!["old".into(), "older".into()]
            )
        );
        let p = Policy {
            keep_last: 0,
            keep_for_seconds: 1000,
        };
        assert_eq!(p.select(tags(), now).0, vec!["new", "mid"]);
        // Age alone never empties a repository.
        let p = Policy {
            keep_last: 0,
            keep_for_seconds: 1,
        };
        assert_eq!(p.select(tags(), now).0, vec!["new"]);
        // Either rule keeps a tag.
        let p = Policy {
            keep_last: 1,
            keep_for_seconds: 6000,
        };
        assert_eq!(p.select(tags(), now).0, vec!["new", "mid", "old"]);
    }
}
