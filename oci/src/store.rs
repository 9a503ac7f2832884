//! Where OCI content lives in a snapreg registry: in snapshots, so that chunk dedup,
//! verification, GC, retention and replication apply to it unchanged.
//!
//! ```text
//! repository R (what OCI clients name)
//!   tag T ─▶ a snapshot: an image pushed through /v2/ (layer "oci" below, plus the
//!            native layers of its checkpoint layer), or any native snapshot
//! repository R/by-digest (hidden from /v2/ listings)
//!   tag sha256-<hex>  ─▶ the snapshot holding that blob or manifest: a blob's own
//!                        upload until a manifest names it, then the (latest) image
//!                        naming it; deleting that image moves the tag to another
//!                        holder or removes it, so GC frees what no image uses
//!   tag blake3-<hex>  ─▶ the OCI view of native snapshot blake3:<hex> (view.rs)
//!
//! layer {kind: extra, name: "oci"} of a snapshot that holds OCI content:
//!   manifest.json        the OCI manifest, byte for byte as pushed or generated
//!   blobs/sha256/<hex>   one file per blob: its bytes as chunk and zero extents
//! annotations: org.snapreg.oci.manifest-digest (of manifest.json),
//!              org.snapreg.oci.media-type (its Content-Type)
//! ```
//!
//! A blob's file is a recipe: the same extents a native snapshot's files use, so a
//! tar layer whose members are CRIU images points at the very chunks a native push
//! of those images stored (ingest.rs), and a native snapshot's checkpoint-image
//! layer is its files' extents between generated tar headers (view.rs). Serving a
//! blob streams its extents in order (content.rs); nothing is staged.

use bytes::Bytes;
use snapreg_client::push::Uploader;
use snapreg_client::remote::Remote;
use snapreg_proto::manifest::{Extent, File, Layer, LayerKind, Manifest};
use snapreg_proto::Digest;

use crate::digest::OciDigest;
use crate::error::{OciError, Result};

/// The last component of the repository holding a repository's content by digest.
pub const DIGEST_REPO: &str = snapreg_proto::reference::OCI_DIGEST_REPOSITORY;
/// The extra layer holding OCI manifests and blobs.
pub use snapreg_client::oci_image::{OCI_LAYER, OCI_MANIFEST_FILE as MANIFEST_FILE};

pub mod annotations {
    /// sha256 of the layer's `manifest.json`.
    pub const MANIFEST_DIGEST: &str = "org.snapreg.oci.manifest-digest";
    /// The media type `manifest.json` is served with.
    pub use snapreg_client::oci_image::MEDIA_TYPE_ANNOTATION as MEDIA_TYPE;
    /// On a blob's snapshot: why the blob is not a checkpoint archive.
    pub const NOT_CHECKPOINT: &str = "org.snapreg.oci.not-checkpoint";
}

pub fn digest_repo(repo: &str) -> String {
    format!("{repo}/{DIGEST_REPO}")
}

pub fn digest_tag(d: &OciDigest) -> String {
    format!("sha256-{}", d.hex())
}

/// The tag of a native snapshot's view in the digest repository.
pub fn view_tag(native: &Digest) -> String {
    format!("blake3-{}", hex::encode(native.0))
}

pub fn blob_path(d: &OciDigest) -> String {
    format!("blobs/sha256/{}", d.hex())
}

/// A snapshot that holds OCI content.
#[derive(Clone, Debug)]
pub struct Holder {
    pub digest: Digest,
    pub manifest: Manifest,
}

impl Holder {
    pub fn oci_layer(&self) -> Option<&Layer> {
        oci_layer(&self.manifest)
    }

    /// The OCI manifest this snapshot holds, with its digest and media type.
    pub fn oci_manifest(&self) -> Option<(&File, OciDigest, String)> {
        let file = self
            .oci_layer()?
            .files
            .iter()
            .find(|f| f.path == MANIFEST_FILE)?;
        let a = &self.manifest.annotations;
        let digest = a.get(annotations::MANIFEST_DIGEST)?.parse().ok()?;
        let media = a.get(annotations::MEDIA_TYPE).cloned().unwrap_or_default();
        Some((file, digest, media))
    }

    /// The bytes of blob `d`: a blob file, or the manifest itself (clients may fetch
    /// a manifest as a blob).
    pub fn blob(&self, d: &OciDigest) -> Option<&File> {
        let path = blob_path(d);
        if let Some(f) = self.oci_layer()?.files.iter().find(|f| f.path == path) {
            return Some(f);
        }
        self.oci_manifest()
            .filter(|(_, md, _)| md == d)
            .map(|(f, _, _)| f)
    }
}

pub fn oci_layer(m: &Manifest) -> Option<&Layer> {
    m.layers
        .iter()
        .find(|l| l.kind == LayerKind::Extra && l.name.as_deref() == Some(OCI_LAYER))
}

/// The snapshot `repo/by-digest:sha256-<hex>` names, if any.
pub async fn holder(remote: &Remote, repo: &str, d: &OciDigest) -> Result<Option<Holder>> {
    tagged(remote, &digest_repo(repo), &digest_tag(d)).await
}

/// The snapshot a tag (or `blake3:<hex>`) names, if any.
pub async fn tagged(remote: &Remote, repo: &str, tag: &str) -> Result<Option<Holder>> {
    let Some((digest, bytes)) = tagged_bytes(remote, repo, tag).await? else {
        return Ok(None);
    };
    let manifest = Manifest::decode(&bytes)
        .map_err(|e| OciError::internal(format!("snapshot {digest} of {repo}:{tag}: {e}")))?;
    Ok(Some(Holder { digest, manifest }))
}

/// The digest and exact bytes of the snapshot a tag names, if any.
pub async fn tagged_bytes(
    remote: &Remote,
    repo: &str,
    tag: &str,
) -> Result<Option<(Digest, Bytes)>> {
    match remote.get_manifest(repo, tag).await {
        Ok(x) => Ok(Some(x)),
        Err(e) if e.kind() == snapreg_client::error::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// A file of the `oci` layer.
pub fn oci_file(path: String, size: u64, extents: Vec<Extent>) -> File {
    File {
        path,
        size,
        mode: 0o644,
        extents,
    }
}

pub fn new_oci_layer(files: Vec<File>) -> Layer {
    Layer {
        kind: LayerKind::Extra,
        name: Some(OCI_LAYER.into()),
        rank: None,
        files,
    }
}

/// Appends, merging neighbouring zero runs.
pub fn push_extent(out: &mut Vec<Extent>, e: Extent) {
    match (out.last_mut(), e) {
        (_, e) if e.is_empty() => {}
        (Some(Extent::Zero { zero }), Extent::Zero { zero: more }) => *zero += more,
        _ => out.push(e),
    }
}

/// Small bytes (a manifest, a config, tar headers) as chunks of the push.
pub async fn chunk_bytes(uploader: &Uploader, bytes: Vec<u8>) -> Result<Vec<Extent>> {
    Ok(uploader
        .chunk_stream(std::io::Cursor::new(bytes), false)
        .await?)
}
