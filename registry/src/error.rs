//! The crate's one error enum. Each variant is a case a caller branches on and names
//! its digest, repository or field; service.rs alone turns them into `tonic::Status`.

use snapreg_proto::Digest;

/// Any error a source of a [`RegistryError`] may carry (TLS and credential setup).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

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
    #[error("repository {repository:?} has no tags; `snapctl ls` lists repositories")]
    RepositoryNotFound { repository: String },
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
    /// This instance is shutting down (drain.rs) and takes no new pushes.
    #[error("this registry instance is shutting down and takes no new pushes; push again (another instance behind the same address takes it)")]
    Draining,
    /// The caller presented no usable credentials (auth.rs says what each message holds).
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller's token does not grant what the call needs.
    #[error("{0}")]
    PermissionDenied(String),
    /// A replication peer's settings cannot be used (token file, URL, TLS files).
    #[error("{what}")]
    PeerSetup {
        what: String,
        #[source]
        source: BoxError,
    },
    /// A call to a replication peer failed: its refusal, or the transport's error
    /// (both arrive as a status; its source chain holds the transport's cause).
    #[error("{call}")]
    PeerCall {
        call: &'static str,
        #[source]
        source: Box<tonic::Status>,
    },
}

impl RegistryError {
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        RegistryError::InvalidArgument {
            field,
            reason: reason.into(),
        }
    }

    /// The message and every source below it, joined by ": " (what logs and the
    /// replication status show).
    pub fn chain(&self) -> String {
        let mut out = self.to_string();
        let mut cur = std::error::Error::source(self);
        while let Some(c) = cur {
            out = format!("{out}: {c}");
            cur = c.source();
        }
        out
    }
}

pub type Result<T, E = RegistryError> = std::result::Result<T, E>;
