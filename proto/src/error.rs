use crate::Digest;

/// Errors from decoding and validating shared formats.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("chunk {digest} is corrupt: {reason}")]
    ChunkCorrupt { digest: Digest, reason: String },
    #[error("manifest schema version {found} is not supported (this build reads {supported}); upgrade snapctl/snapreg")]
    ManifestVersion { found: u64, supported: u64 },
    #[error("manifest does not parse: {0}")]
    ManifestInvalid(String),
    #[error("invalid digest {text:?}: expected blake3:<64 hex digits>")]
    InvalidDigest { text: String },
    #[error("invalid reference {text:?}: {reason}")]
    InvalidReference { text: String, reason: String },
    #[error("invalid object path {path:?}: {reason}")]
    InvalidPath { path: String, reason: String },
}
