//! Snapshot references, in container-registry habits without a host part:
//! `repo/name:tag`, `repo/name@blake3:<hex>`, or `repo/name` (meaning `:latest`).
//! The registry address comes from `--registry`, never from the reference.

use std::fmt;
use std::str::FromStr;

use crate::{Digest, Error};

pub const DEFAULT_TAG: &str = "latest";
/// The last component of `REPO/by-digest`, where the OCI listener keeps `REPO`'s OCI
/// content by digest (oci/src/store.rs); access to `REPO` covers it.
pub const OCI_DIGEST_REPOSITORY: &str = "by-digest";
const MAX_REPOSITORY_LEN: usize = 255;
const MAX_TAG_LEN: usize = 128;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reference {
    pub repository: String,
    pub target: Target,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Tag(String),
    Digest(Digest),
}

impl Reference {
    /// The string the registry's GetManifest takes: a tag name or `blake3:<hex>`.
    pub fn target_string(&self) -> String {
        match &self.target {
            Target::Tag(t) => t.clone(),
            Target::Digest(d) => d.to_string(),
        }
    }

    pub fn tag(&self) -> Option<&str> {
        match &self.target {
            Target::Tag(t) => Some(t),
            Target::Digest(_) => None,
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.target {
            Target::Tag(t) => write!(f, "{}:{t}", self.repository),
            Target::Digest(d) => write!(f, "{}@{d}", self.repository),
        }
    }
}

impl FromStr for Reference {
    type Err = Error;
    fn from_str(text: &str) -> Result<Self, Error> {
        let err = |reason: &str| Error::InvalidReference {
            text: text.into(),
            reason: reason.into(),
        };
        let (repository, target) = if let Some((repo, digest)) = text.split_once('@') {
            (
                repo,
                Target::Digest(
                    digest
                        .parse()
                        .map_err(|_| err("the part after '@' must be blake3:<64 hex digits>"))?,
                ),
            )
        } else if let Some((repo, tag)) = text.rsplit_once(':') {
            if repo.contains(':') || tag.contains('/') {
                return Err(err(
                    "references carry no registry host; pass the registry with --registry URL",
                ));
            }
            (repo, Target::Tag(tag.to_string()))
        } else {
            (text, Target::Tag(DEFAULT_TAG.to_string()))
        };
        validate_repository(repository).map_err(|r| err(&r))?;
        if let Target::Tag(t) = &target {
            validate_tag(t).map_err(|r| err(&r))?;
        }
        Ok(Reference {
            repository: repository.to_string(),
            target,
        })
    }
}

/// Repository: `/`-separated components of `[a-z0-9._-]`, each starting with a
/// letter or digit. Lowercase only, as container registries require, so a name maps
/// to one object-store prefix on every backend.
pub fn validate_repository(repo: &str) -> Result<(), String> {
    if repo.is_empty() || repo.len() > MAX_REPOSITORY_LEN {
        return Err(format!(
            "repository must be 1..={MAX_REPOSITORY_LEN} characters, like team/model"
        ));
    }
    for component in repo.split('/') {
        let ok = component
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
            && component
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c));
        if !ok {
            return Err(format!(
                "repository component {component:?} must be lowercase letters, digits, '.', '_' or '-', starting with a letter or digit"
            ));
        }
    }
    Ok(())
}

/// Tag: `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`, as in OCI.
pub fn validate_tag(tag: &str) -> Result<(), String> {
    let ok = !tag.is_empty()
        && tag.len() <= MAX_TAG_LEN
        && tag
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        && tag
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "tag {tag:?} must match [A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}}"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tags_digests_and_default() {
        let r: Reference = "team/llama:v1".parse().unwrap();
        assert_eq!((r.repository.as_str(), r.tag()), ("team/llama", Some("v1")));
        let r: Reference = "team/llama".parse().unwrap();
        assert_eq!(r.tag(), Some("latest"));
        let d = Digest::of(b"x");
        let r: Reference = format!("team/llama@{d}").parse().unwrap();
        assert_eq!(r.target, Target::Digest(d));
        assert_eq!(r.to_string(), format!("team/llama@{d}"));
    }

    #[test]
    fn malformed_references_say_why() {
        for bad in [
            "",
            "Team/x:v1",
            "a//b:v1",
            "localhost:5000/repo:v1",
            "repo:",
            "repo:-x",
            "repo@sha256:00",
            "repo/../x:v1",
            "/x:v1",
        ] {
            let e = bad.parse::<Reference>().unwrap_err();
            assert!(matches!(e, Error::InvalidReference { .. }), "{bad}: {e}");
        }
        let e = "localhost:5000/repo:v1"
            .parse::<Reference>()
            .unwrap_err()
            .to_string();
        assert!(e.contains("--registry"), "{e}");
    }
}
