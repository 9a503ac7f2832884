//! The direct data path: chunk objects fetched over HTTP(S) straight from the object
//! store, from short-lived URLs the registry presigns (`GetChunkUrls`), so chunk bytes
//! need not pass through the registry process.
//!
//! ```text
//! GetChunkUrls (≤ 1024 digests a call) ─▶ HTTP GET per chunk, in parallel ─▶ verify
//! (codec::decode: BLAKE3 of the uncompressed bytes, exactly as for GetChunks)
//! ```
//!
//! The bytes from a URL are trusted no more than the registry's: every chunk is
//! verified before use, and one that does not verify is an integrity failure (exit 5),
//! never silently re-fetched elsewhere. A URL that does not answer (expired, store
//! unreachable from this node, 404) makes that chunk come through GetChunks instead.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use snapreg_proto::Digest;

use crate::error::{ClientError, Result};
use crate::remote::Remote;

/// Digests per GetChunkUrls call (the registry's limit).
const URLS_PER_CALL: usize = 1024;
const URL_CALLS_IN_FLIGHT: usize = 8;

/// An HTTP client for chunk URLs: one connection pool per process, rustls for https.
#[derive(Clone, Debug)]
pub struct DirectFetcher {
    http: reqwest::Client,
}

impl DirectFetcher {
    pub fn new() -> Result<Self> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            // A chunk is ≤ 16 MiB; a store that stalls longer than this fails over to
            // GetChunks rather than holding a restore.
            .read_timeout(Duration::from_secs(30))
            .tcp_nodelay(true)
            .pool_max_idle_per_host(64)
            .build()
            .map_err(|e| ClientError::Usage(format!("building the HTTP client: {e}")))?;
        Ok(DirectFetcher { http })
    }

    /// GETs one chunk object (codec framing, unverified). `NotFound` for a 404,
    /// `Unreachable` for anything else that is not a 2xx: both mean "use GetChunks".
    pub async fn fetch(&self, url: &str) -> Result<Bytes> {
        let unreachable = |reason: String| ClientError::Unreachable {
            url: redact(url),
            reason,
        };
        let resp = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let status = resp.status();
        if status == reqwest::StatusCode::NOT_FOUND {
            return Err(ClientError::NotFound(format!(
                "chunk object at {}",
                redact(url)
            )));
        }
        if !status.is_success() {
            return Err(unreachable(format!("HTTP {status}")));
        }
        resp.bytes().await.map_err(|e| unreachable(e.to_string()))
    }
}

/// Presigned URLs for `digests` from the registry, `None` when it offers none (a
/// file:// store, an older registry, or direct fetching switched off).
pub async fn chunk_urls(
    remote: &Remote,
    digests: &[Digest],
) -> Result<Option<HashMap<Digest, String>>> {
    use futures::{StreamExt, TryStreamExt};
    // Several calls in flight: a 100 GiB image is ~170 calls, which in sequence would
    // delay the first chunk of a restore by seconds.
    let batches: Vec<Vec<Digest>> = digests.chunks(URLS_PER_CALL).map(<[_]>::to_vec).collect();
    let answers: Vec<_> = futures::stream::iter(batches)
        .map(|batch| async move {
            let urls = remote.chunk_urls(&batch).await?;
            Ok::<_, ClientError>((batch, urls))
        })
        .buffered(URL_CALLS_IN_FLIGHT)
        .try_collect()
        .await?;
    let mut out = HashMap::with_capacity(digests.len());
    for (batch, urls) in answers {
        match urls {
            Some(urls) if urls.len() == batch.len() => {
                out.extend(batch.iter().copied().zip(urls));
            }
            _ => return Ok(None),
        }
    }
    Ok(Some(out))
}

/// A URL without its query (the signature): safe to print.
fn redact(url: &str) -> String {
    url.split('?').next().unwrap_or(url).to_string()
}
