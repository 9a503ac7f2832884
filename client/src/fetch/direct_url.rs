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
//! unreachable from this node, 404) makes that chunk come through the layer below
//! (the registries) instead.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;
use snapreg_proto::Digest;

use super::{verify_object, ChunkFetch, Fetched, Lane, Origin};
use crate::error::{ClientError, Result};
use crate::remote::Remote;

/// The layer: chunks the registry presigned a URL for come from the object store;
/// the rest, and those whose URL fails, from `inner`.
pub struct DirectUrls {
    fetcher: DirectFetcher,
    urls: HashMap<Digest, String>,
    /// The registry that signed the URLs (counted as "URL (direct)").
    signer: Arc<str>,
    inner: Arc<dyn ChunkFetch>,
}

impl DirectUrls {
    /// Asks `remote` for URLs of `chunks`; `inner` alone when it offers none.
    pub async fn over(
        remote: &Remote,
        chunks: &[Digest],
        inner: Arc<dyn ChunkFetch>,
    ) -> Result<Arc<dyn ChunkFetch>> {
        let Some(urls) = chunk_urls(remote, chunks).await? else {
            return Ok(inner);
        };
        Ok(Arc::new(DirectUrls {
            fetcher: DirectFetcher::new()?,
            urls,
            signer: format!("{} (direct)", remote.url()).into(),
            inner,
        }))
    }

    async fn fetch_direct(&self, digest: Digest, file: &str, lane: Lane) -> Result<Fetched> {
        if let Some(url) = self.urls.get(&digest) {
            match self.fetcher.fetch(url).await {
                Ok(object) => {
                    let object_bytes = object.len() as u64;
                    return Ok(Fetched {
                        content: verify_object(digest, object, file).await?,
                        origin: Origin::DirectUrl {
                            url: self.signer.clone(),
                            object_bytes,
                        },
                    });
                }
                // Expired, unreachable from this node, absent: the registry serves it.
                Err(e @ (ClientError::NotFound(_) | ClientError::Unreachable { .. })) => {
                    tracing::info!("chunk {digest}: direct URL failed ({e}); asking the registry");
                }
                Err(e) => return Err(e),
            }
        }
        self.inner.fetch(digest, file, lane).await
    }
}

impl ChunkFetch for DirectUrls {
    fn fetch<'a>(
        &'a self,
        digest: Digest,
        file: &'a str,
        lane: Lane,
    ) -> BoxFuture<'a, Result<Fetched>> {
        self.fetch_direct(digest, file, lane).boxed()
    }
}

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
async fn chunk_urls(
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
