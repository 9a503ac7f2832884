//! The node cache layer: chunks the node already holds (verified as they are read),
//! else from the layer below, then stored in the cache for every later reader on the
//! node. A chunk the cache cannot store is still returned (the cache is an
//! optimisation; a full disk must not fail a restore).

use std::sync::Arc;

use futures::future::BoxFuture;
use futures::FutureExt;
use snapreg_proto::Digest;

use super::{ChunkFetch, Fetched, Origin};
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

    async fn fetch_cached(&self, digest: Digest, file: &str) -> Result<Fetched> {
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
        let fetched = self.inner.fetch(digest, file).await?;
        let (cache, content) = (self.cache.clone(), fetched.content.clone());
        let stored = tokio::task::spawn_blocking(move || cache.put(&digest, &content)).await;
        if let Ok(Err(e)) = stored {
            tracing::warn!("node cache: cannot store {digest}: {e}");
        }
        Ok(fetched)
    }
}

impl ChunkFetch for NodeCache {
    fn fetch<'a>(&'a self, digest: Digest, file: &'a str) -> BoxFuture<'a, Result<Fetched>> {
        self.fetch_cached(digest, file).boxed()
    }
}
