//! The HTTP side: requests parsed (names.rs), answered with the spec's status
//! codes and headers, errors as `{"errors": [...]}` (error.rs).

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use snapreg_client::remote::Remote;

use crate::digest::OciDigest;
use crate::error::{OciError, Result};
use crate::names::{self, Route};
use crate::store::{self, digest_repo, digest_tag};
use crate::{auth, content, ingest, manifests, uploads, Gateway};

/// The header every /v2/ answer carries (Docker's clients look for it).
const API_VERSION: (&str, &str) = ("docker-distribution-api-version", "registry/2.0");
const DIGEST_HEADER: &str = "docker-content-digest";
/// Page size of tag and catalog listings when the client gives none.
const DEFAULT_PAGE: usize = 1000;

/// Every request of the listener comes here.
pub async fn dispatch(State(gw): State<Arc<Gateway>>, req: Request) -> Response {
    let base = format!(
        "{}://{}",
        gw.scheme,
        req.headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("localhost")
    );
    let (method, route) = (req.method().to_string(), route_name(req.uri().path()));
    let token = auth::token_of(req.headers());
    let mut resp = match token {
        Err(e) => e.into_response(),
        Ok(token) => match gw.remote(token.as_deref()) {
            Err(e) => e.into_response(),
            Ok(remote) => match handle(&gw, &remote, token.as_deref(), req).await {
                Ok(r) => r,
                Err(e) => refused_as(e, &remote, token.is_some())
                    .await
                    .into_response(),
            },
        },
    };
    gw.metrics.request(&method, route, resp.status().as_u16());
    let h = resp.headers_mut();
    h.insert(API_VERSION.0, HeaderValue::from_static(API_VERSION.1));
    if resp.status() == StatusCode::UNAUTHORIZED {
        if let Ok(v) = HeaderValue::from_str(&auth::challenge(&base)) {
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
        }
    }
    resp
}

/// The route label of a request path, for metrics.
fn route_name(path: &str) -> &'static str {
    match path {
        "/v2" | "/v2/" => return "ping",
        "/v2/token" => return "token",
        "/v2/_catalog" => return "catalog",
        _ => {}
    }
    match path.strip_prefix("/v2/").map(names::parse) {
        Some(Ok(Route::Manifest { .. })) => "manifest",
        Some(Ok(Route::Blob { .. })) => "blob",
        Some(Ok(Route::UploadStart { .. } | Route::Upload { .. })) => "upload",
        Some(Ok(Route::Tags { .. })) => "tags",
        Some(Ok(Route::Referrers { .. })) => "referrers",
        _ => "other",
    }
}

/// A refusal is 401 (ask for credentials) when the caller sent none or sent a token
/// the registry does not know; 403 when the token lacks the scope.
async fn refused_as(e: OciError, remote: &Remote, had_token: bool) -> OciError {
    if e.status != StatusCode::FORBIDDEN {
        return e;
    }
    if !had_token || remote.who_am_i().await.is_err() {
        return OciError::unauthorized(e.message);
    }
    e
}

async fn handle(
    gw: &Gateway,
    remote: &Remote,
    token: Option<&str>,
    req: Request,
) -> Result<Response> {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_string();
    let query: HashMap<String, String> =
        form_urlencoded::parse(parts.uri.query().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    let method = parts.method.clone();
    match path.as_str() {
        "/v2" | "/v2/" => return ping(remote).await,
        "/v2/token" => return issue_token(remote, token).await,
        "/v2/_catalog" => return catalog(remote, &query).await,
        _ => {}
    }
    let Some(rest) = path.strip_prefix("/v2/") else {
        return Err(OciError::new(
            StatusCode::NOT_FOUND,
            "UNSUPPORTED",
            format!("{path}: only /v2/ is served here"),
        ));
    };
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    match (names::parse(rest)?, method) {
        (Route::Manifest { name, reference }, m) if m == Method::GET || m == Method::HEAD => {
            let served = manifests::get(remote, &gw.recorder()?, &name, &reference).await?;
            let mut resp = Response::new(if m == Method::HEAD {
                Body::empty()
            } else {
                Body::from(served.bytes.clone())
            });
            let h = resp.headers_mut();
            h.insert(header::CONTENT_TYPE, header_value(&served.media_type)?);
            h.insert(
                header::CONTENT_LENGTH,
                HeaderValue::from(served.bytes.len()),
            );
            h.insert(DIGEST_HEADER, header_value(&served.digest.to_string())?);
            Ok(resp)
        }
        (Route::Manifest { name, reference }, Method::PUT) => {
            let body = axum::body::to_bytes(body, crate::media::MAX_MANIFEST_BYTES + 1)
                .await
                .map_err(|e| OciError::manifest_invalid(format!("reading the manifest: {e}")))?;
            let digest = manifests::put(
                remote,
                &name,
                &reference,
                content_type.as_deref(),
                body.to_vec(),
            )
            .await?;
            created(&format!("/v2/{name}/manifests/{digest}"), &digest)
        }
        (Route::Manifest { name, reference }, Method::DELETE) => {
            manifests::delete(remote, &name, &reference).await?;
            Ok(StatusCode::ACCEPTED.into_response())
        }
        (Route::Blob { name, digest }, m) if m == Method::GET || m == Method::HEAD => {
            let file = store::holder(remote, &name, &digest)
                .await?
                .and_then(|h| h.blob(&digest).cloned())
                .ok_or_else(|| OciError::blob_unknown(&digest))?;
            let size = file.size;
            let body = if m == Method::HEAD {
                Body::empty()
            } else {
                Body::from_stream(content::stream(remote.clone(), file))
            };
            let mut resp = Response::new(body);
            let h = resp.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
            h.insert(DIGEST_HEADER, header_value(&digest.to_string())?);
            Ok(resp)
        }
        (Route::Blob { name, digest }, Method::DELETE) => {
            store::holder(remote, &name, &digest)
                .await?
                .filter(|h| h.blob(&digest).is_some())
                .ok_or_else(|| OciError::blob_unknown(&digest))?;
            remote
                .delete_tag(&digest_repo(&name), &digest_tag(&digest))
                .await?;
            Ok(StatusCode::ACCEPTED.into_response())
        }
        (Route::UploadStart { name }, Method::POST) => {
            start_upload(gw, remote, &name, &query, body).await
        }
        (Route::Upload { name, id }, Method::PATCH) => {
            let range = match content_range(&parts.headers) {
                Ok(r) => r,
                Err(e) => return Err(uploads::drained(body.into_data_stream(), e).await),
            };
            let st = gw
                .uploads
                .append(&name, &id, range, body.into_data_stream())
                .await?;
            upload_status(StatusCode::ACCEPTED, &name, &id, st.size)
        }
        (Route::Upload { name, id }, Method::PUT) => {
            let checked =
                digest_param(&query).and_then(|d| content_range(&parts.headers).map(|r| (d, r)));
            let (digest, range) = match checked {
                Ok(x) => x,
                Err(e) => return Err(uploads::drained(body.into_data_stream(), e).await),
            };
            gw.uploads
                .append(&name, &id, range, body.into_data_stream())
                .await?;
            finish_upload(gw, remote, &name, &id, &digest).await
        }
        (Route::Upload { name, id }, Method::GET) => {
            let st = gw.uploads.status(&name, &id).await?;
            upload_status(StatusCode::NO_CONTENT, &name, &id, st.size)
        }
        (Route::Upload { name, id }, Method::DELETE) => {
            gw.uploads.cancel(&name, &id).await?;
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        (Route::Tags { name }, Method::GET) => tags(remote, &name, &query).await,
        (Route::Referrers { .. }, _) => Err(OciError::new(
            StatusCode::NOT_FOUND,
            "UNSUPPORTED",
            "the referrers API is not served here; clients fall back to sha256-<hex> tags",
        )),
        (_, m) => Err(OciError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "UNSUPPORTED",
            format!("{m} {path} is not part of the API"),
        )),
    }
}

async fn ping(remote: &Remote) -> Result<Response> {
    remote.who_am_i().await?;
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        "{}",
    )
        .into_response())
}

/// `GET /v2/token`: the caller's own token back, once the registry knows it.
async fn issue_token(remote: &Remote, token: Option<&str>) -> Result<Response> {
    remote
        .who_am_i()
        .await
        .map_err(|e| OciError::unauthorized(e.to_string()))?;
    let t = token.unwrap_or(auth::ANONYMOUS);
    let body = serde_json::json!({ "token": t, "access_token": t, "expires_in": 3600 });
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response())
}

async fn start_upload(
    gw: &Gateway,
    remote: &Remote,
    name: &str,
    query: &HashMap<String, String>,
    body: Body,
) -> Result<Response> {
    if let Some(mount) = query.get("mount") {
        let digest: OciDigest = mount.parse().map_err(OciError::digest_invalid)?;
        let from = query.get("from").map(String::as_str).unwrap_or(name);
        if names::parse(&format!("{from}/tags/list")).is_ok() {
            if let Ok(Some(h)) = store::holder(remote, from, &digest).await {
                if h.blob(&digest).is_some() {
                    remote
                        .set_tag(&digest_repo(name), &digest_tag(&digest), &h.digest)
                        .await?;
                    return created(&format!("/v2/{name}/blobs/{digest}"), &digest);
                }
            }
        }
        // Not there (or not readable): the client uploads instead, as the spec says.
    }
    let id = gw.uploads.start(name).await?;
    if query.contains_key("digest") {
        let digest = digest_param(query)?;
        gw.uploads
            .append(name, &id, None, body.into_data_stream())
            .await?;
        return finish_upload(gw, remote, name, &id, &digest).await;
    }
    upload_status(StatusCode::ACCEPTED, name, &id, 0)
}

async fn finish_upload(
    gw: &Gateway,
    remote: &Remote,
    name: &str,
    id: &str,
    digest: &OciDigest,
) -> Result<Response> {
    let exists = store::holder(remote, name, digest)
        .await?
        .is_some_and(|h| h.blob(digest).is_some());
    gw.uploads
        .finish(name, id, digest, |spooled| async move {
            if !exists {
                ingest::ingest(remote, name, &spooled).await?;
            }
            Ok(())
        })
        .await?;
    created(&format!("/v2/{name}/blobs/{digest}"), digest)
}

fn digest_param(query: &HashMap<String, String>) -> Result<OciDigest> {
    query
        .get("digest")
        .ok_or_else(|| OciError::digest_invalid("the closing PUT needs ?digest=sha256:<hex>"))?
        .parse()
        .map_err(OciError::digest_invalid)
}

/// `Content-Range: <start>-<end>` (inclusive), if sent.
fn content_range(headers: &HeaderMap) -> Result<Option<(u64, u64)>> {
    let Some(v) = headers.get(header::CONTENT_RANGE) else {
        return Ok(None);
    };
    let text = v.to_str().unwrap_or_default();
    let text = text.strip_prefix("bytes ").unwrap_or(text);
    let (a, b) = text.split_once('-').unwrap_or(("", ""));
    match (a.trim().parse::<u64>(), b.trim().parse::<u64>()) {
        (Ok(a), Ok(b)) if b >= a => Ok(Some((a, b))),
        _ => Err(OciError::new(
            StatusCode::RANGE_NOT_SATISFIABLE,
            "BLOB_UPLOAD_INVALID",
            format!("Content-Range {text:?}: expected <start>-<end>"),
        )),
    }
}

fn upload_status(status: StatusCode, name: &str, id: &str, size: u64) -> Result<Response> {
    let mut resp = status.into_response();
    let h = resp.headers_mut();
    h.insert(
        header::LOCATION,
        header_value(&format!("/v2/{name}/blobs/uploads/{id}"))?,
    );
    h.insert(
        header::RANGE,
        header_value(&format!("0-{}", size.saturating_sub(1)))?,
    );
    h.insert("docker-upload-uuid", header_value(id)?);
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(0));
    Ok(resp)
}

fn created(location: &str, digest: &OciDigest) -> Result<Response> {
    let mut resp = StatusCode::CREATED.into_response();
    let h = resp.headers_mut();
    h.insert(header::LOCATION, header_value(location)?);
    h.insert(DIGEST_HEADER, header_value(&digest.to_string())?);
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(0));
    Ok(resp)
}

async fn tags(remote: &Remote, name: &str, query: &HashMap<String, String>) -> Result<Response> {
    let mut all: Vec<String> = remote
        .list_tags(name)
        .await?
        .into_iter()
        .map(|t| t.tag)
        .collect();
    all.sort();
    paged(
        &format!("/v2/{name}/tags/list"),
        "tags",
        serde_json::json!(name),
        all,
        query,
    )
}

async fn catalog(remote: &Remote, query: &HashMap<String, String>) -> Result<Response> {
    let suffix = format!("/{}", store::DIGEST_REPO);
    let mut all: Vec<String> = remote
        .list_repositories()
        .await?
        .into_iter()
        .filter(|r| !r.ends_with(&suffix))
        .collect();
    all.sort();
    paged(
        "/v2/_catalog",
        "repositories",
        serde_json::Value::Null,
        all,
        query,
    )
}

/// A sorted listing cut by `last` and `n`, with a `Link` to the next page.
fn paged(
    path: &str,
    field: &str,
    name: serde_json::Value,
    all: Vec<String>,
    query: &HashMap<String, String>,
) -> Result<Response> {
    let n = match query.get("n") {
        Some(n) => n.parse::<usize>().map_err(|_| {
            OciError::new(
                StatusCode::BAD_REQUEST,
                "PAGINATION_NUMBER_INVALID",
                format!("n={n:?}"),
            )
        })?,
        None => DEFAULT_PAGE,
    };
    let after: Vec<String> = match query.get("last") {
        Some(last) => all.into_iter().filter(|t| t > last).collect(),
        None => all,
    };
    let more = after.len() > n;
    let page: Vec<String> = after.into_iter().take(n).collect();
    let mut body = serde_json::json!({ field: page });
    if !name.is_null() {
        body["name"] = name;
    }
    let mut resp = (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response();
    if let (true, Some(last)) = (more, page.last()) {
        let link = format!("<{path}?n={n}&last={last}>; rel=\"next\"");
        resp.headers_mut()
            .insert(header::LINK, header_value(&link)?);
    }
    Ok(resp)
}

fn header_value(s: &str) -> Result<HeaderValue> {
    HeaderValue::from_str(s)
        .map_err(|_| OciError::internal(format!("{s:?} cannot be a header value")))
}
