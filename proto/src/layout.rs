//! Where things live in the object store (the source of truth).
//!
//! ```text
//! snapreg-layout.json                      {"layout_version": 1}; written first, checked at start
//! chunks/<first 2 hex>/<64 hex>            chunk objects (codec framing); put once, never rewritten
//! manifests/<64 hex>                       manifest bytes, exactly as the client encoded them
//! tags/<repository>/<tag>/<hlc>-<target>   append-only tag records (see tags.rs)
//! retention/<repository>/_policy.json      a repository's retention policy (registry retention.rs)
//! quarantine/<original path>               objects scrub found damaged, kept for inspection
//! ```
//!
//! `_policy.json` cannot collide with a repository component (those start with a
//! letter or digit). Nothing reads `quarantine/` back: a quarantined chunk is simply
//! missing, and the next push that has its bytes uploads it again.
//!
//! The two-hex fan-out keeps directories of the local backend to ~1/256 of the chunk
//! count; object stores do not care. Everything in the registry's RocksDB index can be
//! rebuilt by listing these prefixes.

use crate::reference::{validate_repository, validate_tag};
use crate::tags::TagRecord;
use crate::{Digest, Error};

pub const LAYOUT_OBJECT: &str = "snapreg-layout.json";
pub const LAYOUT_VERSION: u64 = 1;
pub const CHUNKS: &str = "chunks";
pub const MANIFESTS: &str = "manifests";
pub const TAGS: &str = "tags";
pub const RETENTION: &str = "retention";
pub const QUARANTINE: &str = "quarantine";
const RETENTION_OBJECT: &str = "_policy.json";

pub fn layout_object_body() -> String {
    format!("{{\"layout_version\": {LAYOUT_VERSION}}}\n")
}

pub fn chunk_path(d: &Digest) -> String {
    let hex = d.to_hex();
    format!("{CHUNKS}/{}/{hex}", &hex[..2])
}

pub fn manifest_path(d: &Digest) -> String {
    format!("{MANIFESTS}/{}", d.to_hex())
}

pub fn tag_dir(repository: &str, tag: &str) -> String {
    format!("{TAGS}/{repository}/{tag}")
}

pub fn tag_record_path(repository: &str, tag: &str, record: &TagRecord) -> String {
    format!("{}/{}", tag_dir(repository, tag), record.object_name())
}

pub fn retention_path(repository: &str) -> String {
    format!("{RETENTION}/{repository}/{RETENTION_OBJECT}")
}

/// Parses `retention/<repo...>/_policy.json` back into the repository.
pub fn parse_retention_path(path: &str) -> Result<String, Error> {
    let repo = path
        .strip_prefix("retention/")
        .and_then(|r| r.strip_suffix(&format!("/{RETENTION_OBJECT}")))
        .ok_or_else(|| Error::InvalidPath {
            path: path.into(),
            reason: format!("expected {RETENTION}/<repository>/{RETENTION_OBJECT}"),
        })?;
    validate_repository(repo).map_err(|reason| Error::InvalidPath {
        path: path.into(),
        reason,
    })?;
    Ok(repo.to_string())
}

/// Where scrub moves a damaged object (`chunks/ab/ab..` -> `quarantine/chunks/ab/ab..`).
pub fn quarantine_path(original: &str) -> String {
    format!("{QUARANTINE}/{original}")
}

/// Parses `chunks/<2>/<hex>` back into a digest.
pub fn parse_chunk_path(path: &str) -> Result<Digest, Error> {
    let bad = |reason: &str| Error::InvalidPath {
        path: path.into(),
        reason: reason.into(),
    };
    let mut parts = path.split('/');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(CHUNKS), Some(fan), Some(hex), None) if hex.starts_with(fan) => {
            Digest::from_hex(hex).map_err(|_| bad("not a digest"))
        }
        _ => Err(bad("expected chunks/<2 hex>/<64 hex>")),
    }
}

pub fn parse_manifest_path(path: &str) -> Result<Digest, Error> {
    path.strip_prefix("manifests/")
        .and_then(|hex| Digest::from_hex(hex).ok())
        .ok_or_else(|| Error::InvalidPath {
            path: path.into(),
            reason: "expected manifests/<64 hex>".into(),
        })
}

/// Parses `tags/<repo...>/<tag>/<record>` into (repository, tag, record).
pub fn parse_tag_record_path(path: &str) -> Result<(String, String, TagRecord), Error> {
    let bad = |reason: String| Error::InvalidPath {
        path: path.into(),
        reason,
    };
    let rest = path
        .strip_prefix("tags/")
        .ok_or_else(|| bad("not under tags/".into()))?;
    let (rest, record) = rest
        .rsplit_once('/')
        .ok_or_else(|| bad("no record name".into()))?;
    let (repo, tag) = rest.rsplit_once('/').ok_or_else(|| bad("no tag".into()))?;
    validate_repository(repo).map_err(bad)?;
    validate_tag(tag).map_err(bad)?;
    Ok((repo.to_string(), tag.to_string(), TagRecord::parse(record)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tags::{Hlc, TagTarget};

    /// Golden layout: these exact paths are on disk in deployed registries.
    #[test]
    fn golden_paths() {
        let d = Digest::of(b"golden");
        let hex = d.to_hex();
        assert_eq!(chunk_path(&d), format!("chunks/{}/{hex}", &hex[..2]));
        assert_eq!(manifest_path(&d), format!("manifests/{hex}"));
        let rec = TagRecord {
            hlc: Hlc(0x0193_0000_0001),
            target: TagTarget::Manifest(d),
        };
        assert_eq!(
            tag_record_path("team/llama", "v1", &rec),
            format!("tags/team/llama/v1/0000019300000001-{hex}")
        );
        assert_eq!(layout_object_body(), "{\"layout_version\": 1}\n");
    }

    #[test]
    fn paths_parse_back() {
        let d = Digest::of(b"x");
        assert_eq!(parse_chunk_path(&chunk_path(&d)).unwrap(), d);
        assert_eq!(parse_manifest_path(&manifest_path(&d)).unwrap(), d);
        let rec = TagRecord {
            hlc: Hlc(5),
            target: TagTarget::Deleted,
        };
        let (repo, tag, r) = parse_tag_record_path(&tag_record_path("a/b/c", "t", &rec)).unwrap();
        assert_eq!((repo.as_str(), tag.as_str(), r), ("a/b/c", "t", rec));
        assert!(parse_chunk_path("chunks/zz/abc").is_err());
        assert!(parse_tag_record_path("tags/x").is_err());
        assert_eq!(
            parse_retention_path(&retention_path("team/llama")).unwrap(),
            "team/llama"
        );
        assert!(parse_retention_path("retention/x/other.json").is_err());
        assert_eq!(
            quarantine_path(&chunk_path(&d)),
            format!("quarantine/{}", chunk_path(&d))
        );
    }
}
