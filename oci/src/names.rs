//! The request paths of the distribution API, parsed. Repository names hold
//! slashes, so routes are recognised by their last fixed segment, as the spec's
//! grammar allows (`<name>` never contains `/manifests/`, `/blobs/`, ...).

use snapreg_proto::reference::{validate_repository, validate_tag};

use crate::digest::OciDigest;
use crate::error::{OciError, Result};
use crate::store::DIGEST_REPO;

/// What a manifest request names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reference {
    Tag(String),
    Digest(OciDigest),
}

impl std::fmt::Display for Reference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reference::Tag(t) => f.write_str(t),
            Reference::Digest(d) => d.fmt(f),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    Manifest {
        name: String,
        reference: Reference,
    },
    Blob {
        name: String,
        digest: OciDigest,
    },
    /// `POST /v2/<name>/blobs/uploads/`
    UploadStart {
        name: String,
    },
    /// `/v2/<name>/blobs/uploads/<id>`
    Upload {
        name: String,
        id: String,
    },
    Tags {
        name: String,
    },
    Referrers {
        name: String,
        digest: OciDigest,
    },
}

/// Parses the part of a path after `/v2/`.
pub fn parse(rest: &str) -> Result<Route> {
    if let Some(name) = rest.strip_suffix("/tags/list") {
        return Ok(Route::Tags {
            name: name_arg(name)?,
        });
    }
    if let Some((name, id)) = rest.rsplit_once("/blobs/uploads") {
        let id = id.trim_start_matches('/');
        let name = name_arg(name)?;
        return Ok(if id.is_empty() {
            Route::UploadStart { name }
        } else {
            Route::Upload {
                name,
                id: id.to_string(),
            }
        });
    }
    if let Some((name, reference)) = rest.rsplit_once("/manifests/") {
        let name = name_arg(name)?;
        let reference = if reference.contains(':') {
            Reference::Digest(reference.parse().map_err(OciError::digest_invalid)?)
        } else {
            validate_tag(reference).map_err(|r| {
                OciError::new(axum::http::StatusCode::BAD_REQUEST, "TAG_INVALID", r)
            })?;
            Reference::Tag(reference.to_string())
        };
        return Ok(Route::Manifest { name, reference });
    }
    if let Some((name, digest)) = rest.rsplit_once("/blobs/") {
        return Ok(Route::Blob {
            name: name_arg(name)?,
            digest: digest.parse().map_err(OciError::digest_invalid)?,
        });
    }
    if let Some((name, digest)) = rest.rsplit_once("/referrers/") {
        return Ok(Route::Referrers {
            name: name_arg(name)?,
            digest: digest.parse().map_err(OciError::digest_invalid)?,
        });
    }
    Err(OciError::new(
        axum::http::StatusCode::NOT_FOUND,
        "UNSUPPORTED",
        format!("/v2/{rest} is not a distribution API path"),
    ))
}

/// A repository name: snapreg's rule (lowercase components), and not one of the
/// repositories that hold content by digest.
fn name_arg(name: &str) -> Result<String> {
    validate_repository(name).map_err(OciError::name_invalid)?;
    if name == DIGEST_REPO || name.ends_with(&format!("/{DIGEST_REPO}")) {
        return Err(OciError::name_invalid(format!(
            "{name:?}: repositories named .../{DIGEST_REPO} hold OCI content by digest for \
             the repository above them; choose another name"
        )));
    }
    Ok(name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_by_their_last_fixed_segment() {
        let d = OciDigest::of(b"x");
        assert_eq!(
            parse("team/app/manifests/v1").unwrap(),
            Route::Manifest {
                name: "team/app".into(),
                reference: Reference::Tag("v1".into())
            }
        );
        assert_eq!(
            parse(&format!("a/blobs/{d}")).unwrap(),
            Route::Blob {
                name: "a".into(),
                digest: d
            }
        );
        assert_eq!(
            parse("a/b/blobs/uploads/").unwrap(),
            Route::UploadStart { name: "a/b".into() }
        );
        assert_eq!(
            parse("a/b/blobs/uploads/abc").unwrap(),
            Route::Upload {
                name: "a/b".into(),
                id: "abc".into()
            }
        );
        assert_eq!(
            parse("x/tags/list").unwrap(),
            Route::Tags { name: "x".into() }
        );
        // A repository may itself be called "manifests".
        assert_eq!(
            parse("manifests/manifests/latest").unwrap(),
            Route::Manifest {
                name: "manifests".into(),
                reference: Reference::Tag("latest".into())
            }
        );
    }

    #[test]
    fn refuses_bad_names_tags_and_digests() {
        assert_eq!(
            parse("Upper/manifests/v1").unwrap_err().code,
            "NAME_INVALID"
        );
        assert_eq!(
            parse("a/by-digest/manifests/v1").unwrap_err().code,
            "NAME_INVALID"
        );
        assert_eq!(parse("a/manifests/-bad").unwrap_err().code, "TAG_INVALID");
        assert_eq!(
            parse("a/manifests/sha256:00").unwrap_err().code,
            "DIGEST_INVALID"
        );
        assert_eq!(parse("a/blobs/md5:00").unwrap_err().code, "DIGEST_INVALID");
        assert_eq!(parse("a/whatever").unwrap_err().code, "UNSUPPORTED");
    }
}
