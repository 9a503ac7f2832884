//! Objects in the store: chunks, manifests, tag records, the layout-version object,
//! and the objects that let several instances share one store (`shared_store.rs`).
//!
//! Publish, never overwrite in place: a chunk object is written once under its digest
//! (a second writer of the same digest writes equivalent bytes, so a race is
//! harmless), manifests likewise, tag records are new names each time. On the local
//! backend every write is fsync'd (file and directory) before it returns, which is
//! what lets the index record it as durable.
//!
//! Backends: `file:///path` (the embedded default under `<data>/store`) and
//! `s3://bucket[/prefix]`, configured from the standard `AWS_*` variables
//! (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, and for a self-hosted
//! server `AWS_ENDPOINT_URL` plus `AWS_ALLOW_HTTP=true` when it speaks plain HTTP).
//! Only S3 can hand out presigned chunk URLs ([`ChunkStore::chunk_urls`]).

use std::io::{Read, Seek, SeekFrom};
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::prefix::PrefixStore;
use object_store::signer::{Method, Signer};
use object_store::{
    GetResult, GetResultPayload, ObjectMeta, ObjectStore, ObjectStoreExt, PutPayload,
};
use snapreg_proto::layout;
use snapreg_proto::tags::TagRecord;
use snapreg_proto::Digest;

use crate::error::{RegistryError, Result};

#[derive(Clone)]
pub struct ChunkStore {
    store: Arc<dyn ObjectStore>,
    /// Presigns GET URLs for chunk objects; `None` for stores that cannot (local).
    signer: Option<Arc<dyn Signer>>,
}

impl std::fmt::Debug for ChunkStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkStore")
            .field("store", &self.store)
            .field("signs_urls", &self.signer.is_some())
            .finish()
    }
}

impl ChunkStore {
    pub fn new(store: Arc<dyn ObjectStore>) -> Self {
        ChunkStore {
            store,
            signer: None,
        }
    }

    /// The object store itself (prefix applied), for what lives beside the chunks
    /// (access tokens).
    pub fn object_store(&self) -> Arc<dyn ObjectStore> {
        self.store.clone()
    }

    /// Opens the store a `--store` URL names; `None` is the local directory `default_dir`.
    pub fn open(url: Option<&str>, default_dir: PathBuf) -> Result<Self> {
        let local = |dir: PathBuf| -> Result<Self> {
            std::fs::create_dir_all(&dir)?;
            // fsync on: the index records a chunk as durable right after this returns.
            Ok(ChunkStore::new(Arc::new(
                LocalFileSystem::new_with_prefix(&dir)?.with_fsync(true),
            )))
        };
        let Some(url) = url else {
            return local(default_dir);
        };
        let parsed = url::Url::parse(url)
            .map_err(|e| RegistryError::invalid("--store", format!("{url:?} is not a URL: {e}")))?;
        match parsed.scheme() {
            "file" => local(PathBuf::from(parsed.path())),
            "s3" => {
                // AmazonS3Builder takes the bucket from the URL and ignores its path.
                let s3 = object_store::aws::AmazonS3Builder::from_env().with_url(url);
                Self::s3(s3, parsed.path().trim_matches('/'))
            }
            other => Err(RegistryError::invalid(
                "--store",
                format!("scheme {other:?} is not supported; use file:///path or s3://bucket/prefix (credentials and endpoint from AWS_* variables)"),
            )),
        }
    }

    /// An S3 store (its bucket, endpoint and credentials set on `s3`) under `prefix`,
    /// applied to objects and presigned URLs alike.
    pub fn s3(s3: object_store::aws::AmazonS3Builder, prefix: &str) -> Result<Self> {
        let store: Arc<PrefixStore<_>> = Arc::new(PrefixStore::new(s3.build()?, prefix));
        Ok(ChunkStore {
            store: store.clone(),
            signer: Some(store),
        })
    }

    /// Presigned GET URLs for chunk objects, valid for `expires_in`, in the order asked;
    /// `None` when the store cannot sign (the client then fetches through GetChunks).
    /// Signing is local computation: nothing is asked of the store.
    pub async fn chunk_urls(
        &self,
        digests: &[Digest],
        expires_in: Duration,
    ) -> Result<Option<Vec<String>>> {
        let Some(signer) = &self.signer else {
            return Ok(None);
        };
        let paths: Vec<Path> = digests
            .iter()
            .map(|d| Path::from(layout::chunk_path(d)))
            .collect();
        let urls = signer.signed_urls(Method::GET, &paths, expires_in).await?;
        Ok(Some(urls.into_iter().map(String::from).collect()))
    }

    /// The stored size of a chunk object, `None` when it is not in the store.
    pub async fn chunk_size(&self, digest: &Digest) -> Result<Option<u64>> {
        self.object_size(&Path::from(layout::chunk_path(digest)))
            .await
    }

    /// The size of a manifest object, `None` when it is not in the store.
    pub async fn manifest_size(&self, digest: &Digest) -> Result<Option<u64>> {
        self.object_size(&Path::from(layout::manifest_path(digest)))
            .await
    }

    async fn object_size(&self, path: &Path) -> Result<Option<u64>> {
        match self.store.head(path).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Every tag record under `tags/<prefix>` as (repository, tag, record); a prefix of
    /// `repo/tag` also lists the tags of a repository named `repo/tag/...`, which the
    /// caller filters out.
    pub async fn tag_records(&self, prefix: &str) -> Result<Vec<(String, String, TagRecord)>> {
        let dir = if prefix.is_empty() {
            layout::TAGS.to_string()
        } else {
            format!("{}/{prefix}", layout::TAGS)
        };
        Ok(self
            .list(&dir)
            .await?
            .iter()
            .filter_map(|m| layout::parse_tag_record_path(m.location.as_ref()).ok())
            .collect())
    }

    /// The records of one tag that order after `after` (all of them when `None`):
    /// record names are fixed-width HLCs, so one listing from an offset finds every
    /// newer record without reading the tag's history.
    pub async fn tag_records_after(
        &self,
        repository: &str,
        tag: &str,
        after: Option<&TagRecord>,
    ) -> Result<Vec<TagRecord>> {
        let dir = Path::from(layout::tag_dir(repository, tag));
        let listing = match after {
            Some(rec) => {
                let offset = Path::from(layout::tag_record_path(repository, tag, rec));
                self.store.list_with_offset(Some(&dir), &offset)
            }
            None => self.store.list(Some(&dir)),
        };
        let metas: Vec<ObjectMeta> = listing.try_collect().await?;
        Ok(metas
            .iter()
            .filter_map(|m| layout::parse_tag_record_path(m.location.as_ref()).ok())
            .filter(|(r, t, _)| r == repository && t == tag)
            .map(|(_, _, rec)| rec)
            .collect())
    }

    /// Writes a small object outside the content-addressed prefixes (leases, sweep logs).
    pub async fn put_raw(&self, path: &str, body: Bytes) -> Result<()> {
        self.store
            .put(&Path::from(path), PutPayload::from(body))
            .await?;
        Ok(())
    }

    /// Reads such an object; `None` when it is gone.
    pub async fn get_raw(&self, path: &str) -> Result<Option<Bytes>> {
        match self.store.get(&Path::from(path)).await {
            Ok(got) => Ok(Some(got.bytes().await?)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn delete_raw(&self, path: &str) -> Result<()> {
        ignore_not_found(self.store.delete(&Path::from(path)).await)
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
            Ok(got) => object_bytes(got).await,
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

/// An object's bytes. A local file is read straight into an uninitialised buffer:
/// object_store 0.14's `GetResult::bytes` zero-fills the whole buffer before it reads
/// (`local::read_range`), which was 6% of the registry's CPU while it served a restore
/// (bench/RESULTS.md, "where the registry's serving time goes"). Other backends
/// stream, and keep object_store's own collection.
async fn object_bytes(got: GetResult) -> Result<Bytes> {
    match got.payload {
        GetResultPayload::File(file, path) => {
            let range = got.range;
            tokio::task::spawn_blocking(move || read_file_range(file, &path, range))
                .await
                .map_err(|e| RegistryError::Io(std::io::Error::other(e)))?
        }
        payload => Ok(GetResult { payload, ..got }.bytes().await?),
    }
}

/// `range` of `file`, all of it or an error: a file shorter than its listed size (cut
/// under the registry's feet) is an error, never a short chunk.
fn read_file_range(
    mut file: std::fs::File,
    path: &std::path::Path,
    range: Range<u64>,
) -> Result<Bytes> {
    let want = range.end - range.start;
    let mut buf = Vec::with_capacity(want as usize);
    file.seek(SeekFrom::Start(range.start))?;
    // `read_to_end` reads into the spare capacity without initialising it first.
    file.take(want).read_to_end(&mut buf)?;
    if buf.len() as u64 != want {
        return Err(RegistryError::Io(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!(
                "{}: read {} of {want} bytes; the object changed while it was read",
                path.display(),
                buf.len()
            ),
        )));
    }
    Ok(buf.into())
}

fn ignore_not_found(r: object_store::Result<()>) -> Result<()> {
    match r {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_local_chunk_reads_back_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(None, dir.path().join("store")).unwrap();
        // Larger than object_store's 8 KiB stream pieces, and not a multiple of a page.
        let data: Vec<u8> = (0..3 * 1024 * 1024 + 17)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let digest = Digest::of(&data);
        store
            .put_chunk(&digest, Bytes::from(data.clone()))
            .await
            .unwrap();
        assert_eq!(store.get_chunk(&digest).await.unwrap(), data);
        assert!(matches!(
            store.get_chunk(&Digest::of(b"absent")).await,
            Err(RegistryError::ChunkMissing { .. })
        ));
    }

    #[test]
    fn a_file_shorter_than_its_range_is_an_error_not_a_short_chunk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("object");
        std::fs::write(&path, (0..100u8).collect::<Vec<_>>()).unwrap();
        let open = || std::fs::File::open(&path).unwrap();
        assert_eq!(
            read_file_range(open(), &path, 10..50).unwrap(),
            (10..50u8).collect::<Vec<_>>()
        );
        let err = read_file_range(open(), &path, 0..200).unwrap_err();
        assert!(err.to_string().contains("read 100 of 200 bytes"), "{err}");
    }
}
