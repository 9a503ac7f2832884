//! Objects in the store: chunks, manifests, tag records, the layout-version object.
//!
//! Publish, never overwrite in place: a chunk object is written once under its digest
//! (a second writer of the same digest writes equivalent bytes, so a race is
//! harmless), manifests likewise, tag records are new names each time. On the local
//! backend every write is fsync'd (file and directory) before it returns, which is
//! what lets the index record it as durable.

use std::sync::Arc;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStore, ObjectStoreExt, PutPayload};
use snapreg_proto::layout;
use snapreg_proto::tags::TagRecord;
use snapreg_proto::Digest;

use crate::error::{RegistryError, Result};

#[derive(Clone, Debug)]
pub struct ChunkStore {
    store: Arc<dyn ObjectStore>,
}

impl ChunkStore {
    pub fn new(store: Arc<dyn ObjectStore>) -> Self {
        ChunkStore { store }
    }

    /// Writes the layout-version object on a new store; refuses a store written by an
    /// incompatible layout.
    pub async fn check_layout(&self) -> Result<()> {
        let path = Path::from(layout::LAYOUT_OBJECT);
        match self.store.get(&path).await {
            Ok(got) => {
                let body = got.bytes().await?;
                let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                if v["layout_version"].as_u64() != Some(layout::LAYOUT_VERSION) {
                    return Err(RegistryError::LayoutVersion {
                        found: String::from_utf8_lossy(&body).trim().to_string(),
                        supported: layout::LAYOUT_VERSION,
                    });
                }
                Ok(())
            }
            Err(object_store::Error::NotFound { .. }) => {
                self.store
                    .put(&path, layout::layout_object_body().into())
                    .await?;
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    pub async fn put_chunk(&self, digest: &Digest, object: Bytes) -> Result<()> {
        self.store
            .put(
                &Path::from(layout::chunk_path(digest)),
                PutPayload::from(object),
            )
            .await?;
        Ok(())
    }

    pub async fn get_chunk(&self, digest: &Digest) -> Result<Bytes> {
        match self
            .store
            .get(&Path::from(layout::chunk_path(digest)))
            .await
        {
            Ok(got) => Ok(got.bytes().await?),
            Err(object_store::Error::NotFound { .. }) => {
                Err(RegistryError::ChunkMissing { digest: *digest })
            }
            Err(e) => Err(e.into()),
        }
    }

    pub async fn delete_chunk(&self, digest: &Digest) -> Result<()> {
        ignore_not_found(
            self.store
                .delete(&Path::from(layout::chunk_path(digest)))
                .await,
        )
    }

    pub async fn put_manifest(&self, digest: &Digest, bytes: Bytes) -> Result<()> {
        self.store
            .put(
                &Path::from(layout::manifest_path(digest)),
                PutPayload::from(bytes),
            )
            .await?;
        Ok(())
    }

    pub async fn get_manifest(&self, digest: &Digest) -> Result<Bytes> {
        match self
            .store
            .get(&Path::from(layout::manifest_path(digest)))
            .await
        {
            Ok(got) => Ok(got.bytes().await?),
            Err(object_store::Error::NotFound { .. }) => {
                Err(RegistryError::ManifestNotFound { digest: *digest })
            }
            Err(e) => Err(e.into()),
        }
    }

    pub async fn delete_manifest(&self, digest: &Digest) -> Result<()> {
        ignore_not_found(
            self.store
                .delete(&Path::from(layout::manifest_path(digest)))
                .await,
        )
    }

    pub async fn put_tag_record(
        &self,
        repository: &str,
        tag: &str,
        record: &TagRecord,
    ) -> Result<()> {
        let path = Path::from(layout::tag_record_path(repository, tag, record));
        self.store.put(&path, PutPayload::from_static(b"")).await?;
        Ok(())
    }

    /// The object store itself, for modules that own a prefix of their own
    /// (retention policies, scrub's quarantine).
    pub(crate) fn objects(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// Lists every object under a top-level prefix (`chunks`, `manifests`, `tags`).
    pub async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        let prefix = Path::from(prefix);
        Ok(self.store.list(Some(&prefix)).try_collect().await?)
    }

    /// Streams the objects under a prefix, for listings too big to hold (GC sweep).
    pub fn list_stream(
        &self,
        prefix: &str,
    ) -> impl futures::Stream<Item = Result<ObjectMeta>> + Send + 'static {
        let prefix = Path::from(prefix);
        self.store
            .list(Some(&prefix))
            .map(|r| r.map_err(RegistryError::from))
    }
}

fn ignore_not_found(r: object_store::Result<()>) -> Result<()> {
    match r {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
        Err(e) => Err(e.into()),
    }
}
