//! Client errors. Each variant a caller branches on carries the digest, path or address
//! it is about; [`ClientError::kind`] sorts them into the cases callers treat alike
//! (snapctl turns a kind into an exit code and adds the flags to look at; the node
//! agent turns it into a gRPC status). Messages say what happened, not which flag
//! to pass: the library has no flags.

use snapreg_proto::Digest;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    #[error("cannot reach the registry at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("no registry given")]
    NoRegistry,
    #[error("not found: {0}")]
    NotFound(String),
    #[error("chunk {digest} of {file} is corrupt: {reason}; the registry's copy is damaged — re-push the snapshot from its source")]
    ChunkCorrupt {
        digest: Digest,
        file: String,
        reason: String,
    },
    #[error("chunk {digest} of {file} cannot be decrypted: {reason}")]
    Undecryptable {
        digest: Digest,
        file: String,
        reason: String,
    },
    /// The snapshot is encrypted and no (or another) tenant key was given.
    #[error("{0}")]
    KeyRequired(String),
    #[error(
        "manifest from the registry does not verify: asked for {expected}, bytes hash to {actual}"
    )]
    ManifestCorrupt { expected: Digest, actual: Digest },
    /// `--lazy` / `--fill-first`: the lazy-pages daemon could not put every page in,
    /// so it killed the restored tree; `cause` says why, and its kind is this error's
    /// (a corrupt chunk stays an integrity failure).
    #[error("lazy restore: not every page came back ({cause}); the restored tree was killed rather than left reading zeros. Restore again, or without --lazy and --fill-first")]
    TreeKilled { cause: Box<ClientError> },
    #[error("{0}")]
    Format(#[from] snapreg_proto::Error),
    #[error("registry refused: {0}")]
    Registry(String),
    /// No valid token, or a token without the scope the call needs (gRPC
    /// UNAUTHENTICATED / PERMISSION_DENIED); the registry's message says what to do.
    #[error("access refused by {url}: {message}")]
    Auth { url: String, message: String },
    /// The handshake failed: a server certificate not trusted, or a server that
    /// requires a client certificate this side lacks.
    #[error("TLS with {url} failed: {reason}")]
    Tls { url: String, reason: String },
    /// Each line of the list is one refusal of the compatibility check.
    #[error("this host cannot restore the snapshot:\n{0}")]
    Incompatible(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    /// A file the snapshot's process writes could not be put back before CRIU; the
    /// restore stopped there, and nothing half-written is left under its name.
    #[error("cannot put back {path}, a file the restored process writes: {source}; nothing half-written is left under that name: {advice}")]
    PutBack {
        path: String,
        source: std::io::Error,
        advice: &'static str,
    },
    #[error("CRIU: {0}")]
    Criu(String),
    #[error("CUDA: {0}")]
    Cuda(String),
    #[error("{0}")]
    Usage(String),
    /// An operation stopped partway on purpose (watchdog, failed commit) after
    /// putting things back; the message says what was left as it was.
    #[error("aborted: {0}")]
    Aborted(String),
    #[error("weights service: {0}")]
    Weights(String),
    /// snapctl as CRIU's action script (action.rs) refuses CRIU's next step: the
    /// snapctl that runs CRIU said no, or is gone.
    #[error("action script ({action}): {reason}")]
    ActionScript { action: String, reason: String },
}

/// The cases callers treat alike; snapctl's exit codes are documented per kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// Anything else that went wrong.
    Failure,
    /// A bad argument, reference, key file or missing registry.
    Usage,
    NotFound,
    /// The host fails the snapshot's compatibility check.
    Incompatible,
    /// Bytes that do not hash (or decrypt) to what they should.
    Integrity,
    /// Authentication, authorization, the TLS handshake, or an encrypted snapshot
    /// without its tenant key.
    AccessRefused,
}

impl ClientError {
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        ClientError::Io {
            what: what.into(),
            source,
        }
    }

    /// [`ClientError::PutBack`] with the advice its cause calls for.
    pub fn put_back(path: &std::path::Path, source: std::io::Error) -> Self {
        let advice = match source.raw_os_error() {
            Some(libc::ENOSPC | libc::EDQUOT) => "free space on its filesystem and restore again",
            Some(libc::EROFS) => {
                "its filesystem is read-only: make it writable, or restore on another node"
            }
            Some(libc::EACCES | libc::EPERM) => {
                "restore as a user that may write there (CRIU needs root anyway)"
            }
            _ => "fix that and restore again",
        };
        ClientError::PutBack {
            path: path.display().to_string(),
            source,
            advice,
        }
    }

    pub fn kind(&self) -> ErrorKind {
        use snapreg_proto::Error as Proto;
        match self {
            ClientError::TreeKilled { cause } => cause.kind(),
            ClientError::Usage(_)
            | ClientError::NoRegistry
            | ClientError::Format(Proto::InvalidReference { .. } | Proto::KeyFile { .. }) => {
                ErrorKind::Usage
            }
            ClientError::NotFound(_) => ErrorKind::NotFound,
            ClientError::Incompatible(_) => ErrorKind::Incompatible,
            ClientError::ChunkCorrupt { .. }
            | ClientError::ManifestCorrupt { .. }
            | ClientError::Undecryptable { .. }
            | ClientError::Format(Proto::ChunkCorrupt { .. } | Proto::Undecryptable { .. }) => {
                ErrorKind::Integrity
            }
            ClientError::Auth { .. } | ClientError::Tls { .. } | ClientError::KeyRequired(_) => {
                ErrorKind::AccessRefused
            }
            _ => ErrorKind::Failure,
        }
    }
}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// A path for messages.
pub fn shown(p: &std::path::Path) -> String {
    p.display().to_string()
}
