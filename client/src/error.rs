//! Client errors. Each variant a caller (or the exit code) branches on carries the
//! digest, path or address it is about, and says what to do next.

use snapreg_proto::Digest;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    #[error("cannot reach the registry at {url}: {reason}; check --registry / SNAPCTL_REGISTRY and that snapreg is running there")]
    Unreachable { url: String, reason: String },
    #[error("no registry given: pass --registry http://HOST:PORT or set SNAPCTL_REGISTRY")]
    NoRegistry,
    #[error("not found: {0}")]
    NotFound(String),
    #[error("chunk {digest} of {file} is corrupt: {reason}; the registry's copy is damaged — re-push the snapshot from its source")]
    ChunkCorrupt {
        digest: Digest,
        file: String,
        reason: String,
    },
    #[error(
        "manifest from the registry does not verify: asked for {expected}, bytes hash to {actual}"
    )]
    ManifestCorrupt { expected: Digest, actual: Digest },
    #[error("{0}")]
    Format(#[from] snapreg_proto::Error),
    #[error("registry refused: {0}")]
    Registry(String),
    #[error("this host cannot restore the snapshot:\n{0}\n(use --force to try anyway)")]
    Incompatible(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
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
}

impl ClientError {
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        ClientError::Io {
            what: what.into(),
            source,
        }
    }

    /// The documented exit code: 1 failure, 2 usage, 3 not found, 4 incompatible
    /// host, 5 integrity failure.
    pub fn exit_code(&self) -> i32 {
        match self {
            ClientError::Usage(_) | ClientError::NoRegistry => 2,
            ClientError::NotFound(_) => 3,
            ClientError::Incompatible(_) => 4,
            ClientError::ChunkCorrupt { .. } | ClientError::ManifestCorrupt { .. } => 5,
            ClientError::Format(snapreg_proto::Error::InvalidReference { .. }) => 2,
            ClientError::Format(snapreg_proto::Error::ChunkCorrupt { .. }) => 5,
            _ => 1,
        }
    }

    /// Maps a registry answer, keeping the registry's own message.
    pub fn from_status(url: &str, s: tonic::Status) -> Self {
        use tonic::Code;
        let msg = s.message().to_string();
        match s.code() {
            Code::NotFound => ClientError::NotFound(msg),
            Code::DataLoss => ClientError::Registry(format!("integrity failure: {msg}")),
            Code::InvalidArgument => ClientError::Usage(msg),
            Code::Unavailable | Code::Unknown
                if msg.contains("transport")
                    || msg.contains("connect")
                    || msg.contains("error trying to connect") =>
            {
                ClientError::Unreachable {
                    url: url.to_string(),
                    reason: msg,
                }
            }
            // hyper's whole message when the connection dies under a call, e.g. after
            // keep-alive pings went unanswered (a SIGSTOPped or partitioned registry).
            Code::Unavailable | Code::Unknown if msg.contains("http2 error") => {
                ClientError::Unreachable {
                    url: url.to_string(),
                    reason: format!(
                        "{msg}: the connection broke mid-call (the registry stopped answering \
                         keep-alive pings for 20 s, or closed the connection)"
                    ),
                }
            }
            Code::Cancelled | Code::DeadlineExceeded => ClientError::Unreachable {
                url: url.to_string(),
                reason: msg,
            },
            _ => ClientError::Registry(msg),
        }
    }
}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// A path for messages.
pub fn shown(p: &std::path::Path) -> String {
    p.display().to_string()
}
