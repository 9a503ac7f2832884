//! Registry errors, and the one place they become `tonic::Status`.

use snapreg_proto::Digest;
use tonic::Status;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    #[error("object store: {0}")]
    Store(#[from] object_store::Error),
    #[error("index (RocksDB): {0}")]
    Index(#[from] rocksdb::Error),
    #[error("chunk {digest} failed verification: {reason}")]
    ChunkCorrupt { digest: Digest, reason: String },
    #[error("chunk {digest} not found")]
    ChunkMissing { digest: Digest },
    #[error("manifest names {count} chunks the registry does not hold (first: {first}); upload them before committing")]
    ManifestIncomplete { count: usize, first: Digest },
    #[error("{0}")]
    Manifest(#[from] snapreg_proto::Error),
    #[error("repository {repository:?} has no tag {tag:?}")]
    TagNotFound { repository: String, tag: String },
    #[error("manifest {digest} not found")]
    ManifestNotFound { digest: Digest },
    #[error("manifest {digest} is still tagged ({tags}); `snapctl rm` those tags first")]
    ManifestTagged { digest: Digest, tags: String },
    #[error("manifest {digest} is held by a push or tag update in progress; try again once it has finished")]
    ManifestBusy { digest: Digest },
    #[error("push lease {lease:?} is unknown or expired; start the push again")]
    LeaseUnknown { lease: String },
    #[error("invalid argument {field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    #[error("store layout version {found} is not supported (this snapreg reads {supported})")]
    LayoutVersion { found: String, supported: u64 },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("repository {repository} only takes snapshots encrypted with its tenant's key ({rule}); this one is {found}: push it with snapctl --key-file and that tenant's key file")]
    EncryptionRequired {
        repository: String,
        rule: String,
        found: String,
    },
    /// Another instance on the same store holds what this call needs (GC vs push).
    #[error("{0}")]
    Busy(String),
}

impl RegistryError {
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        RegistryError::InvalidArgument {
            field,
            reason: reason.into(),
        }
    }
}

impl From<RegistryError> for Status {
    fn from(e: RegistryError) -> Status {
        use RegistryError::*;
        let msg = e.to_string();
        match e {
            ChunkCorrupt { .. } => Status::data_loss(msg),
            ChunkMissing { .. } | TagNotFound { .. } | ManifestNotFound { .. } => {
                Status::not_found(msg)
            }
            ManifestIncomplete { .. }
            | LeaseUnknown { .. }
            | ManifestTagged { .. }
            | ManifestBusy { .. } => Status::failed_precondition(msg),
            Manifest(snapreg_proto::Error::ManifestVersion { .. }) => {
                Status::failed_precondition(msg)
            }
            Manifest(_) | InvalidArgument { .. } => Status::invalid_argument(msg),
            Store(object_store::Error::NotFound { .. }) => Status::not_found(msg),
            Busy(_) => Status::unavailable(msg),
            EncryptionRequired { .. } => Status::permission_denied(msg),
            Store(_) | Index(_) | Io(_) | LayoutVersion { .. } => {
                tracing::error!("internal error: {msg}");
                Status::unavailable(format!("registry storage failed: {msg}"))
            }
        }
    }
}

pub type Result<T, E = RegistryError> = std::result::Result<T, E>;
