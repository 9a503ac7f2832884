//! The node cache layer: chunks the node already holds (verified as they are read),
//! else from the layer below, then stored in the cache for every later reader on the
//! node. A chunk the cache cannot store is still returned (the cache is an
//! optimisation; a full disk must not fail a restore).

use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};
use snapreg_proto::Digest;

use super::{ChunkFetch, Fetched, Lane, Origin, Want};
use crate::cache::ChunkCache;
use crate::error::Result;

pub struct NodeCache {
    cache: ChunkCache,
    inner: Arc<dyn ChunkFetch>,
}

impl NodeCache {
    pub fn over(cache: ChunkCache, inner: Arc<dyn ChunkFetch>) -> Arc<dyn ChunkFetch> {
        Arc::new(NodeCache { cache, inner })
    }

    async fn fetch_cached(&self, digest: Digest, file: &str, lane: Lane) -> Result<Fetched> {
        let cache = self.cache.clone();
        let cached = tokio::task::spawn_blocking(move || cache.get(&digest))
            .await
            .ok()
            .flatten();
        if let Some(content) = cached {
            return Ok(Fetched {
                content,
                origin: Origin::NodeCache,
            });
        }
        let fetched = self.inner.fetch(digest, file, lane).await?;
        self.store(digest, fetched.content.clone()).await;
        Ok(fetched)
    }

    async fn store(&self, digest: Digest, content: Bytes) {
        let cache = self.cache.clone();
        let stored = tokio::task::spawn_blocking(move || cache.put(&digest, &content)).await;
        if let Ok(Err(e)) = stored {
            tracing::warn!("node cache: cannot store {digest}: {e}");
        }
    }
}

impl ChunkFetch for NodeCache {
    fn fetch<'a>(
        &'a self,
        digest: Digest,
        file: &'a str,
        lane: Lane,
    ) -> BoxFuture<'a, Result<Fetched>> {
        self.fetch_cached(digest, file, lane).boxed()
    }

    /// What the cache holds, read one by one; the rest asked of the layer below in
    /// one call (so it can batch, or schedule across peers), and stored as it comes.
    fn fetch_many(
        &self,
        wants: Vec<Want>,
        window: usize,
    ) -> BoxStream<'_, Result<(Digest, Fetched)>> {
        let cache = self.cache.clone();
        let all = wants.clone();
        async move {
            let (cached, missing): (Vec<Want>, Vec<Want>) =
                tokio::task::spawn_blocking(move || {
                    wants.into_iter().partition(|(d, _)| cache.contains(d))
                })
                .await
                .unwrap_or((Vec::new(), all));
            let from_cache = futures::stream::iter(cached)
                .map(move |(digest, file)| async move {
                    Ok((digest, self.fetch_cached(digest, &file, Lane::Bulk).await?))
                })
                .buffer_unordered(window.max(1));
            let from_below = self
                .inner
                .fetch_many(missing, window)
                .then(move |item| async move {
                    if let Ok((digest, fetched)) = &item {
                        self.store(*digest, fetched.content.clone()).await;
                    }
                    item
                });
            from_cache.chain(from_below)
        }
        .flatten_stream()
        .boxed()
    }
}
