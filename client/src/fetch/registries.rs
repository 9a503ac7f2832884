//! The bottom layer: chunks from the registries, in preference order (nearest region
//! first). A chunk absent, unreachable or damaged at one registry is asked of the
//! next; any other error (refused access, a bad request) stops at once.

use std::sync::Arc;

use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt, TryFutureExt};
use snapreg_proto::Digest;

use super::{verify_object, ChunkFetch, Fetched, Lane, Origin, Want};
use crate::error::{ClientError, Result};
use crate::remote::Remote;

/// Digests per GetChunks call in [`ChunkFetch::fetch_many`], and calls in flight:
/// ~2 × 32 × 0.5 MiB of chunks ahead of the reader.
const FETCH_BATCH: usize = 32;
const BATCHES_IN_FLIGHT: usize = 2;

pub struct Registries {
    remotes: Vec<(Remote, Arc<str>)>,
}

impl Registries {
    /// `remotes`: nearest first.
    pub fn new(remotes: Vec<Remote>) -> Self {
        let remotes = remotes
            .into_iter()
            .map(|r| {
                let url: Arc<str> = r.url().into();
                (r, url)
            })
            .collect();
        Registries { remotes }
    }

    async fn fetch_from(
        remote: &Remote,
        url: &Arc<str>,
        digest: Digest,
        file: &str,
        lane: Lane,
    ) -> Result<Fetched> {
        let object = remote.get_chunk(digest, lane).await.map_err(|e| match e {
            ClientError::NotFound(m) => ClientError::NotFound(format!("{m} (in {file})")),
            e => e,
        })?;
        let object_bytes = object.len() as u64;
        Ok(Fetched {
            content: verify_object(digest, object, file).await?,
            origin: Origin::Registry {
                url: url.clone(),
                object_bytes,
            },
        })
    }

    async fn fetch_any(&self, digest: Digest, file: &str, lane: Lane) -> Result<Fetched> {
        let mut last_error = None;
        for (remote, url) in &self.remotes {
            match Self::fetch_from(remote, url, digest, file, lane).await {
                Ok(f) => return Ok(f),
                Err(
                    e @ (ClientError::NotFound(_)
                    | ClientError::Unreachable { .. }
                    | ClientError::ChunkCorrupt { .. }),
                ) => {
                    if self.remotes.len() > 1 {
                        tracing::info!(
                            "chunk {digest} not usable from {url}: {e}; trying the next registry"
                        );
                    }
                    last_error = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last_error.unwrap_or_else(|| {
            ClientError::NotFound(format!("chunk {digest} of {file}: no registry to ask"))
        }))
    }

    /// One GetChunks stream of `batch`: its objects (unverified) in the order asked;
    /// an error if the registry sends another chunk or ends the stream early.
    fn batch<'a>(
        remote: &'a Remote,
        url: &'a Arc<str>,
        batch: Vec<Want>,
    ) -> BoxStream<'a, Result<(Digest, Arc<str>, bytes::Bytes)>> {
        let digests: Vec<Digest> = batch.iter().map(|(d, _)| *d).collect();
        async move { remote.get_chunks(&digests, Lane::Bulk).await }
            .map_ok(move |stream| {
                futures::stream::try_unfold(
                    (stream, batch.into_iter()),
                    move |(mut stream, mut expected)| async move {
                        let msg = stream
                            .message()
                            .await
                            .map_err(|s| remote.map_stream_error(s))?;
                        let Some(msg) = msg else {
                            return match expected.next() {
                                Some((d, _)) => Err(ClientError::NotFound(format!(
                                    "{url} ended the stream before chunk {d}"
                                ))),
                                None => Ok(None),
                            };
                        };
                        let digest = Digest::from_slice(&msg.digest)?;
                        match expected.next() {
                            Some((want, file)) if want == digest => {
                                Ok(Some(((digest, file, msg.data), (stream, expected))))
                            }
                            _ => Err(ClientError::Registry(format!(
                                "{url} sent chunk {digest} out of order"
                            ))),
                        }
                    },
                )
            })
            .try_flatten_stream()
            .boxed()
    }
}

impl ChunkFetch for Registries {
    fn fetch<'a>(
        &'a self,
        digest: Digest,
        file: &'a str,
        lane: Lane,
    ) -> BoxFuture<'a, Result<Fetched>> {
        self.fetch_any(digest, file, lane).boxed()
    }

    /// Batched GetChunks streams from the first registry when it is the only one; with
    /// fallbacks, chunk by chunk (a batch cannot fall back per chunk mid-stream).
    fn fetch_many(
        &self,
        wants: Vec<Want>,
        window: usize,
    ) -> BoxStream<'_, Result<(Digest, Fetched)>> {
        let [(remote, url)] = self.remotes.as_slice() else {
            return futures::stream::iter(wants)
                .map(move |(d, file)| async move {
                    Ok((d, self.fetch_any(d, &file, Lane::Bulk).await?))
                })
                .buffer_unordered(window.max(1))
                .boxed();
        };
        let batches: Vec<Vec<Want>> = wants.chunks(FETCH_BATCH).map(<[_]>::to_vec).collect();
        futures::stream::iter(batches)
            .map(move |b| futures::future::ready(Self::batch(remote, url, b)))
            .buffered(BATCHES_IN_FLIGHT)
            .flatten()
            .map(move |item| async move {
                let (digest, file, object) = item?;
                let object_bytes = object.len() as u64;
                let content = verify_object(digest, object, &file).await?;
                let origin = Origin::Registry {
                    url: url.clone(),
                    object_bytes,
                };
                Ok((digest, Fetched { content, origin }))
            })
            // Verification on every core, in arrival order.
            .buffered(window.max(1))
            .boxed()
    }
}
