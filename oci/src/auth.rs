//! Credentials on the OCI listener: the registry's own tokens, taken the way
//! container registries take them.
//!
//! - `Authorization: Bearer <token>`: a snapreg token, as `snapctl` sends it.
//! - `Authorization: Basic base64(user:<token>)`: the token as the password (the user
//!   name is ignored), what `skopeo --creds`, `podman login` and `docker login` send.
//! - The token flow: a 401 carries `WWW-Authenticate: Bearer realm="<base>/v2/token",
//!   service="snapreg"`; `GET /v2/token` with Basic credentials checks them with the
//!   registry and answers `{"token": <the same token>}`; without credentials it answers
//!   the token `anonymous` when the registry lets anonymous callers in.
//!
//! Every request is made to the registry with the caller's token, so what a token may
//! do (scope, repository pattern, `--anonymous`) is decided there, once, for both
//! listeners.

use axum::http::HeaderMap;
use base64::Engine;
use snapreg_proto::credentials::BearerToken;

use crate::error::{OciError, Result};

/// The token the token endpoint hands to callers without credentials.
pub const ANONYMOUS: &str = "anonymous";

/// The caller's token, if it sent one.
pub fn token_of(headers: &HeaderMap) -> Result<Option<String>> {
    let Some(value) = headers.get(axum::http::header::AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value
        .to_str()
        .map_err(|_| OciError::unauthorized("the Authorization header is not ASCII"))?;
    let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
    let token = match scheme.to_ascii_lowercase().as_str() {
        "bearer" => rest.trim().to_string(),
        "basic" => {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(rest.trim())
                .map_err(|_| OciError::unauthorized("Basic credentials are not base64"))?;
            let text = String::from_utf8(decoded)
                .map_err(|_| OciError::unauthorized("Basic credentials are not UTF-8"))?;
            let (_user, password) = text
                .split_once(':')
                .ok_or_else(|| OciError::unauthorized("Basic credentials need user:password"))?;
            password.to_string()
        }
        other => {
            return Err(OciError::unauthorized(format!(
                "authorization scheme {other:?}: use Bearer <token> or Basic with the token as password"
            )))
        }
    };
    Ok(match token.as_str() {
        "" | ANONYMOUS => None,
        _ => Some(token),
    })
}

/// The token as the registry takes it.
pub fn bearer(token: Option<&str>) -> Result<BearerToken> {
    BearerToken::new(token).map_err(|e| OciError::unauthorized(e.to_string()))
}

/// The challenge a 401 carries.
pub fn challenge(base: &str) -> String {
    format!("Bearer realm=\"{base}/v2/token\",service=\"snapreg\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(axum::http::header::AUTHORIZATION, v.parse().unwrap());
        h
    }

    #[test]
    fn takes_bearer_and_basic_and_anonymous() {
        assert_eq!(token_of(&HeaderMap::new()).unwrap(), None);
        assert_eq!(
            token_of(&with("Bearer abc")).unwrap().as_deref(),
            Some("abc")
        );
        let basic = base64::engine::general_purpose::STANDARD.encode("me:tok:en");
        assert_eq!(
            token_of(&with(&format!("Basic {basic}")))
                .unwrap()
                .as_deref(),
            Some("tok:en")
        );
        assert_eq!(token_of(&with("Bearer anonymous")).unwrap(), None);
        assert_eq!(
            token_of(&with("Digest x")).unwrap_err().code,
            "UNAUTHORIZED"
        );
    }
}
