//! What a gRPC connection presents and trusts, shared by every side that opens one
//! (snapctl, node agents, replicating registries) or serves one (snapreg, agents).
//!
//! - A bearer token travels as gRPC metadata `authorization: Bearer <token>` on every
//!   call; [`BearerToken`] adds it. The registry checks it (registry/src/auth.rs).
//! - TLS is rustls (through tonic). A client trusts the platform's roots unless it is
//!   given a private CA; a server given a client CA requires every client to present a
//!   certificate that CA signed (mutual TLS).
//!
//! Key material is read from PEM files once, when a connection or listener is set up;
//! a file that cannot be read fails then, naming the file.

use std::path::{Path, PathBuf};

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// The metadata key the token travels under (lower case: HTTP/2 header names are).
pub const AUTHORIZATION: &str = "authorization";

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CredentialsError {
    #[error("reading {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the token {reason}; pass the whole token `snapreg token issue` printed")]
    Token { reason: &'static str },
    #[error("{0}")]
    Usage(String),
}

/// Adds `authorization: Bearer <token>` to every request, when there is a token.
#[derive(Clone, Default)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl std::fmt::Debug for BearerToken {
    // Never print the secret, even in debug logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = if self.0.is_some() { "Some(..)" } else { "None" };
        f.debug_tuple("BearerToken").field(&shown).finish()
    }
}

impl BearerToken {
    pub fn new(token: Option<&str>) -> Result<Self, CredentialsError> {
        let Some(token) = token.map(str::trim) else {
            return Ok(BearerToken(None));
        };
        if token.is_empty() {
            return Err(CredentialsError::Token { reason: "is empty" });
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(CredentialsError::Token {
                reason: "contains spaces or characters outside printable ASCII",
            });
        }
        let mut value: MetadataValue<Ascii> =
            format!("Bearer {token}")
                .parse()
                .map_err(|_| CredentialsError::Token {
                    reason: "is not a valid header value",
                })?;
        value.set_sensitive(true);
        Ok(BearerToken(Some(value)))
    }

    pub fn is_set(&self) -> bool {
        self.0.is_some()
    }
}

impl Interceptor for BearerToken {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert(AUTHORIZATION, v.clone());
        }
        Ok(req)
    }
}

fn read(path: &Path) -> Result<Vec<u8>, CredentialsError> {
    std::fs::read(path).map_err(|source| CredentialsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// A token file's content: the token on its first line (a trailing newline is fine).
pub fn read_token_file(path: &Path) -> Result<String, CredentialsError> {
    let text = String::from_utf8(read(path)?).map_err(|_| CredentialsError::Token {
        reason: "file is not UTF-8",
    })?;
    Ok(text.lines().next().unwrap_or_default().trim().to_string())
}

/// TLS for a client of `https://` URLs: trusts `ca` (PEM, one or more certificates)
/// when given, the platform's roots otherwise; presents `identity` (certificate chain
/// and key, PEM) for mutual TLS.
pub fn client_tls(
    ca: Option<&Path>,
    identity: Option<(&Path, &Path)>,
) -> Result<ClientTlsConfig, CredentialsError> {
    let mut tls = ClientTlsConfig::new();
    tls = match ca {
        Some(ca) => tls.ca_certificate(Certificate::from_pem(read(ca)?)),
        None => tls.with_native_roots(),
    };
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
    }
    Ok(tls)
}

/// A client identity needs both halves: checks that cert and key come together.
pub fn identity_pair<'a>(
    cert: Option<&'a Path>,
    key: Option<&'a Path>,
    flags: (&str, &str),
) -> Result<Option<(&'a Path, &'a Path)>, CredentialsError> {
    match (cert, key) {
        (Some(c), Some(k)) => Ok(Some((c, k))),
        (None, None) => Ok(None),
        _ => Err(CredentialsError::Usage(format!(
            "{} and {} go together: give both (a client certificate and its key) or neither",
            flags.0, flags.1
        ))),
    }
}

/// TLS for a listener: its certificate chain and key (PEM); with `client_ca`, every
/// client must present a certificate that CA signed (mutual TLS).
pub fn server_tls(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<ServerTlsConfig, CredentialsError> {
    let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(read(cert)?, read(key)?));
    if let Some(ca) = client_ca {
        tls = tls.client_ca_root(Certificate::from_pem(read(ca)?));
    }
    Ok(tls)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_token_is_added_and_never_printed() {
        let mut t = BearerToken::new(Some("snapreg_ab_cd\n")).unwrap();
        let req = t.call(tonic::Request::new(())).unwrap();
        assert_eq!(
            req.metadata().get(AUTHORIZATION).unwrap(),
            "Bearer snapreg_ab_cd"
        );
        assert!(!format!("{t:?}").contains("snapreg_ab_cd"));
        let mut none = BearerToken::new(None).unwrap();
        let req = none.call(tonic::Request::new(())).unwrap();
        assert!(req.metadata().get(AUTHORIZATION).is_none());
    }

    #[test]
    fn bad_tokens_are_refused_before_sending() {
        for bad in ["", "  ", "a b", "tök"] {
            let e = BearerToken::new(Some(bad)).unwrap_err();
            assert!(e.to_string().contains("snapreg token issue"), "{e}");
        }
    }

    #[test]
    fn missing_files_are_named() {
        let e = client_tls(Some(Path::new("/nonexistent/ca.pem")), None).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/ca.pem"), "{e}");
        let e = identity_pair(Some(Path::new("c")), None, ("--cert", "--key")).unwrap_err();
        assert!(e.to_string().contains("--cert and --key"), "{e}");
    }
}
