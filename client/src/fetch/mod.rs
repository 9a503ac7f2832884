//! Chunk fetching: every reader of chunks (pull, pull-restore, prefetch, verify, copy,
//! the weights fill, the node agent) goes through one stack of layers.
//!
//! ```text
//! Chunks            counts by origin, decrypts, names the file in errors
//!  └ Scheduler      one budget per restore, the most urgent reader first (optional)
//!     └ NodeCache   the node chunk cache; what the layers below return is cached
//!        └ Peers    sibling nodes' caches (crate::peer); not held or slow: ↓
//!           └ DirectUrls  presigned object-store URLs; expired or unreachable: ↓
//!              └ Registries  each registry in preference order (nearest first)
//! ```
//!
//! A layer implements [`ChunkFetch`] and wraps the layer below it (an
//! `Arc<dyn ChunkFetch>`), the way object_store's throttling and caching stores wrap
//! a store. Adding one (peers, a shared byte budget) is one file and one line in
//! [`Builder::build`].
//!
//! Invariant: **whatever a layer returns is verified** — the BLAKE3 of its stored
//! content equals the digest asked for — so no layer above ever sees unverified bytes,
//! and a source that sends bad bytes can slow a reader but never corrupt one. The
//! content is the chunk *as stored*: decompressed, still encrypted for an encrypted
//! snapshot (the node cache holds ciphertext); [`Chunks::get`] decrypts.

mod chunks;
mod direct_url;
mod node_cache;
mod peers;
mod registries;
mod scheduler;

use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::StreamExt;
use snapreg_proto::Digest;

use crate::error::Result;

pub use crate::remote::Lane;
pub use chunks::{Builder, Chunks, PeerSummary};
pub use scheduler::{Budget, Priority, SchedulerStats};

/// A chunk as one layer of the stack found it: verified content and where it came from.
#[derive(Clone, Debug)]
pub struct Fetched {
    /// The chunk's stored content (decompressed; ciphertext for an encrypted snapshot).
    pub content: Bytes,
    pub origin: Origin,
}

/// Where a chunk came from, for the transfer counters and `chunks_by_registry`.
#[derive(Clone, Debug)]
pub enum Origin {
    /// The node cache: nothing crossed the network.
    NodeCache,
    /// A registry's GetChunks, `object_bytes` as they crossed the network.
    Registry { url: Arc<str>, object_bytes: u64 },
    /// The object store by a presigned URL the registry at `url` signed.
    DirectUrl { url: Arc<str>, object_bytes: u64 },
    /// A sibling node's cache, through its agent ([`crate::peer`]).
    Peer { node: Arc<str>, object_bytes: u64 },
    /// Another request's fetch of the same chunk, in flight when this one came
    /// (the scheduler): counted once, by that request.
    Joined,
}

/// One chunk a reader wants, with the file it belongs to (for error messages).
pub type Want = (Digest, Arc<str>);

/// One layer of the chunk-fetch stack.
pub trait ChunkFetch: Send + Sync {
    /// One chunk, verified against `digest`; `file` names it in errors; `lane` says
    /// which connection a registry fetch takes.
    fn fetch<'a>(
        &'a self,
        digest: Digest,
        file: &'a str,
        lane: Lane,
    ) -> BoxFuture<'a, Result<Fetched>>;

    /// Many chunks, verified, in any order, at most `window` in flight. Layers that can
    /// batch (GetChunks streams) override it; the default fetches one by one.
    fn fetch_many(
        &self,
        wants: Vec<Want>,
        window: usize,
    ) -> BoxStream<'_, Result<(Digest, Fetched)>> {
        futures::stream::iter(wants)
            .map(move |(digest, file)| async move {
                Ok((digest, self.fetch(digest, &file, Lane::Bulk).await?))
            })
            .buffer_unordered(window.max(1))
            .boxed()
    }
}

/// Decodes and verifies a chunk object off the async threads: codec framing, then the
/// BLAKE3 of the content against `digest`. `file` names it in the error.
pub(crate) async fn verify_object(digest: Digest, object: Bytes, file: &str) -> Result<Bytes> {
    tokio::task::spawn_blocking(move || snapreg_proto::codec::decode_shared(&digest, object))
        .await
        .map_err(|e| crate::error::ClientError::io("decoding a chunk", std::io::Error::other(e)))?
        .map_err(|e| crate::encryption::chunk_error(e, file))
}

#[cfg(test)]
mod tests {
    //! The layers above the network, over an in-memory bottom layer (a stand-in for
    //! the registries, which the e2e suite exercises for real).

    use std::collections::HashMap;
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

    use futures::FutureExt;

    use super::*;
    use crate::cache::ChunkCache;
    use crate::error::ClientError;

    /// Chunks from a map, counting the calls that reach it.
    struct Memory {
        chunks: HashMap<Digest, Bytes>,
        calls: AtomicUsize,
    }

    impl ChunkFetch for Memory {
        fn fetch<'a>(
            &'a self,
            digest: Digest,
            file: &'a str,
            _: Lane,
        ) -> BoxFuture<'a, Result<Fetched>> {
            self.calls.fetch_add(1, Relaxed);
            let found = self.chunks.get(&digest).cloned();
            async move {
                let content = found
                    .ok_or_else(|| ClientError::NotFound(format!("chunk {digest} of {file}")))?;
                Ok(Fetched {
                    origin: Origin::Registry {
                        url: "memory".into(),
                        object_bytes: content.len() as u64,
                    },
                    content,
                })
            }
            .boxed()
        }
    }

    fn memory(contents: &[&[u8]]) -> (Arc<Memory>, Vec<Digest>) {
        let chunks: HashMap<Digest, Bytes> = contents
            .iter()
            .map(|c| (Digest::of(c), Bytes::copy_from_slice(c)))
            .collect();
        let digests = contents.iter().map(|c| Digest::of(c)).collect();
        let layer = Arc::new(Memory {
            chunks,
            calls: AtomicUsize::new(0),
        });
        (layer, digests)
    }

    #[tokio::test]
    async fn node_cache_serves_the_second_read_and_asks_below_once() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(dir.path(), u64::MAX).unwrap();
        let (below, digests) = memory(&[b"first chunk", b"second chunk"]);
        let stack = node_cache::NodeCache::over(cache.clone(), below.clone());
        let first = stack.fetch(digests[0], "f", Lane::Bulk).await.unwrap();
        assert!(matches!(first.origin, Origin::Registry { .. }), "{first:?}");
        let again = stack.fetch(digests[0], "f", Lane::Bulk).await.unwrap();
        assert!(matches!(again.origin, Origin::NodeCache), "{again:?}");
        assert_eq!(again.content, first.content);
        assert_eq!(below.calls.load(Relaxed), 1);
        assert!(cache.contains(&digests[0]) && !cache.contains(&digests[1]));
    }

    #[tokio::test]
    async fn a_rotten_cache_file_is_fetched_again_from_below() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(dir.path(), u64::MAX).unwrap();
        let (below, digests) = memory(&[b"chunk that rots"]);
        let stack = node_cache::NodeCache::over(cache.clone(), below.clone());
        stack.fetch(digests[0], "f", Lane::Bulk).await.unwrap();
        let hex = digests[0].to_hex();
        let file = dir.path().join("chunks").join(&hex[..2]).join(&hex);
        std::fs::write(&file, b"chunk that ROTS").unwrap();
        let again = stack.fetch(digests[0], "f", Lane::Bulk).await.unwrap();
        assert!(matches!(again.origin, Origin::Registry { .. }), "{again:?}");
        assert_eq!(&again.content[..], b"chunk that rots");
        assert_eq!(below.calls.load(Relaxed), 2);
    }

    #[tokio::test]
    async fn fetch_many_returns_each_chunk_once_and_stops_at_the_first_missing() {
        let (below, digests) = memory(&[b"a", b"b", b"c"]);
        let wants: Vec<Want> = digests.iter().map(|d| (*d, Arc::from("f"))).collect();
        let got: Vec<_> = below.fetch_many(wants, 2).collect().await;
        let mut seen: Vec<Digest> = got.into_iter().map(|r| r.unwrap().0).collect();
        seen.sort_by_key(|d| d.to_hex());
        let mut want = digests.clone();
        want.sort_by_key(|d| d.to_hex());
        assert_eq!(seen, want);

        let absent = Digest::of(b"absent");
        let got: Vec<_> = below
            .fetch_many(vec![(absent, Arc::from("pages-1.img"))], 2)
            .collect()
            .await;
        let err = got.into_iter().next().unwrap().unwrap_err().to_string();
        assert!(err.contains("pages-1.img"), "{err}");
    }
}
