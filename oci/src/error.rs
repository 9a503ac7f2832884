//! Errors as the distribution spec returns them: an HTTP status and a body
//! `{"errors": [{"code", "message", "detail"}]}` with one of the spec's codes.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use snapreg_client::error::{ClientError, ErrorKind};

use crate::digest::OciDigest;

#[derive(Debug, thiserror::Error)]
#[error("{code}: {message}")]
pub struct OciError {
    pub status: StatusCode,
    /// One of the distribution spec's error codes (`BLOB_UNKNOWN`, ...).
    pub code: &'static str,
    pub message: String,
}

pub type Result<T, E = OciError> = std::result::Result<T, E>;

impl OciError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        OciError {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn blob_unknown(d: &OciDigest) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "BLOB_UNKNOWN",
            format!("blob {d} is not in this repository; push it first"),
        )
    }

    pub fn manifest_unknown(what: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "MANIFEST_UNKNOWN",
            format!("manifest {what} is not in this repository"),
        )
    }

    pub fn name_invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "NAME_INVALID", message)
    }

    pub fn digest_invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "DIGEST_INVALID", message)
    }

    pub fn manifest_invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "MANIFEST_INVALID", message)
    }

    pub fn upload_unknown(id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "BLOB_UPLOAD_UNKNOWN",
            format!("upload {id} is unknown or expired here; start the upload again"),
        )
    }

    pub fn upload_invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "BLOB_UPLOAD_INVALID", message)
    }

    pub fn size_invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "SIZE_INVALID", message)
    }

    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "UNSUPPORTED", message)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN", message)
    }

    /// A registry error met while serving `what` (a manifest, a blob): not found
    /// becomes `not_found`, refused access 401/403, the rest a 500 that carries the
    /// registry's own message.
    pub fn from_client(e: ClientError, not_found: impl FnOnce() -> OciError) -> Self {
        match e.kind() {
            ErrorKind::NotFound => not_found(),
            ErrorKind::AccessRefused => match e {
                ClientError::Auth { message, .. } => Self::new(
                    StatusCode::FORBIDDEN,
                    "DENIED",
                    format!("the registry refused: {message}"),
                ),
                other => Self::new(StatusCode::FORBIDDEN, "DENIED", other.to_string()),
            },
            ErrorKind::Usage => Self::new(StatusCode::BAD_REQUEST, "UNSUPPORTED", e.to_string()),
            _ => Self::internal(e.to_string()),
        }
    }
}

impl From<ClientError> for OciError {
    fn from(e: ClientError) -> Self {
        let message = e.to_string();
        OciError::from_client(e, || {
            OciError::new(StatusCode::NOT_FOUND, "NAME_UNKNOWN", message)
        })
    }
}

impl IntoResponse for OciError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(code = self.code, message = %self.message, "OCI request failed");
        }
        let body = serde_json::json!({
            "errors": [{ "code": self.code, "message": self.message, "detail": {} }]
        });
        let mut resp = (self.status, body.to_string()).into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        resp
    }
}
