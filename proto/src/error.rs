use crate::Digest;

/// Errors from decoding and validating shared formats.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("chunk {digest} is corrupt: {reason}")]
    ChunkCorrupt { digest: Digest, reason: String },
    #[error("manifest schema version {found} is not supported (this build reads versions up to {supported}); upgrade snapctl/snapreg")]
    ManifestVersion { found: u64, supported: u64 },
    #[error("manifest does not parse: {0}")]
    ManifestInvalid(String),
    #[error("invalid digest {text:?}: expected blake3:<64 hex digits>")]
    InvalidDigest { text: String },
    #[error("invalid reference {text:?}: {reason}")]
    InvalidReference { text: String, reason: String },
    #[error("chunk {digest} cannot be decrypted: {reason}")]
    Undecryptable { digest: Digest, reason: String },
    #[error("tenant key file {path}: {reason}")]
    KeyFile { path: String, reason: String },
    #[error("invalid object path {path:?}: {reason}")]
    InvalidPath { path: String, reason: String },
}
