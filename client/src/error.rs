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
    #[error("{0}")]
    Format(#[from] snapreg_proto::Error),
    #[error("registry refused: {0}")]
    Registry(String),
    /// No valid token, or a token without the scope the call needs (gRPC
    /// UNAUTHENTICATED / PERMISSION_DENIED); the registry's message says what to do.
    #[error("access refused by {url}: {message}")]
    Auth { url: String, message: String },
    #[error("TLS with {url} failed: {reason}; for a registry with a private CA pass it with --ca-cert or SNAPCTL_CA_CERT, and where it requires client certificates pass --client-cert and --client-key")]
    Tls { url: String, reason: String },
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
    #[error("weights service: {0}")]
    Weights(String),
}

impl ClientError {
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        ClientError::Io {
            what: what.into(),
            source,
        }
    }

    /// The documented exit code: 1 failure, 2 usage, 3 not found, 4 incompatible
    /// host, 5 integrity failure (including a chunk that does not decrypt), 6 access
    /// refused (authentication, authorization, the TLS handshake, or an encrypted
    /// snapshot without its tenant key).
    pub fn exit_code(&self) -> i32 {
        match self {
            ClientError::Usage(_) | ClientError::NoRegistry => 2,
            ClientError::NotFound(_) => 3,
            ClientError::Incompatible(_) => 4,
            ClientError::ChunkCorrupt { .. }
            | ClientError::ManifestCorrupt { .. }
            | ClientError::Undecryptable { .. } => 5,
            ClientError::Format(snapreg_proto::Error::InvalidReference { .. }) => 2,
            ClientError::Format(
                snapreg_proto::Error::ChunkCorrupt { .. }
                | snapreg_proto::Error::Undecryptable { .. },
            ) => 5,
            ClientError::Auth { .. } | ClientError::Tls { .. } | ClientError::KeyRequired(_) => 6,
            ClientError::Format(snapreg_proto::Error::KeyFile { .. }) => 2,
            _ => 1,
        }
    }

    /// A connection that failed: a TLS refusal (certificate not trusted, or one the
    /// server requires and we lack) is told apart from an unreachable address.
    pub fn connect_failed(url: &str, reason: String) -> Self {
        let lower = reason.to_ascii_lowercase();
        if lower.contains("certificate") || lower.contains("tls") || lower.contains("handshake") {
            ClientError::Tls {
                url: url.to_string(),
                reason,
            }
        } else {
            ClientError::Unreachable {
                url: url.to_string(),
                reason,
            }
        }
    }

    /// Maps a registry answer, keeping the registry's own message.
    pub fn from_status(url: &str, s: tonic::Status) -> Self {
        use tonic::Code;
        let msg = s.message().to_string();
        match s.code() {
            Code::Unauthenticated | Code::PermissionDenied => ClientError::Auth {
                url: url.to_string(),
                message: msg,
            },
            Code::NotFound => ClientError::NotFound(msg),
            Code::DataLoss => ClientError::Registry(format!("integrity failure: {msg}")),
            Code::InvalidArgument => ClientError::Usage(msg),
            Code::Unavailable | Code::Unknown
                if msg.contains("transport")
                    || msg.contains("connect")
                    || msg.contains("error trying to connect") =>
            {
                // The transport's own cause (e.g. the server's TLS alert) is in the source.
                ClientError::connect_failed(url, crate::remote::error_chain(&s))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_refusals_exit_6_with_the_registry_message() {
        for s in [
            tonic::Status::unauthenticated("this registry requires a token: issue one"),
            tonic::Status::permission_denied("token x grants pull"),
        ] {
            let msg = s.message().to_string();
            let e = ClientError::from_status("http://r:5000", s);
            assert_eq!(e.exit_code(), 6, "{e}");
            assert!(e.to_string().contains(&msg), "{e}");
            assert!(e.to_string().contains("http://r:5000"), "{e}");
        }
    }

    #[test]
    fn certificate_failures_are_tls_refusals_not_unreachable() {
        let e = ClientError::connect_failed(
            "https://r:5000",
            "transport error: invalid peer certificate: UnknownIssuer".into(),
        );
        assert!(matches!(e, ClientError::Tls { .. }), "{e:?}");
        assert_eq!(e.exit_code(), 6);
        assert!(e.to_string().contains("--ca-cert"), "{e}");
        let e = ClientError::connect_failed("http://r:5000", "connection refused".into());
        assert!(matches!(e, ClientError::Unreachable { .. }), "{e:?}");
        assert_eq!(e.exit_code(), 1);
    }
}
