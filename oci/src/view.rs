//! A native snapshot seen as an OCI checkpoint image (composed by
//! `snapreg_client::oci_image`, the same code `snapctl export` uses).
//!
//! Headers become small chunks; file data stays the snapshot's own extents. The
//! layer's sha256 is computed once, by reading it through, and the view is recorded
//! as a snapshot in the digest repository (`blake3-<hex>` of the native snapshot, and
//! `sha256-<hex>` of its manifest, config and layer): later requests only look it up.
//! The view is the native snapshot's layers plus the `oci` layer, so a mount of its
//! layer blob into another repository brings the native layers along.

use snapreg_client::chunker::ChunkerConfig;
use snapreg_client::oci_image::{self, Piece};
use snapreg_client::podman::{ArchiveIndex, INDEX_FILE, INDEX_LAYER};
use snapreg_client::progress::Progress;
use snapreg_client::push::Uploader;
use snapreg_client::remote::Remote;
use snapreg_proto::manifest::{Extent, File, Manifest};

use crate::content;
use crate::digest::{OciDigest, Sha256};
use crate::error::{OciError, Result};
use crate::media;
use crate::store::{self, annotations, digest_repo, digest_tag, view_tag, Holder};

/// The Podman archive skeleton is read whole: bound it.
const MAX_INDEX_BYTES: u64 = 256 << 20;

/// The view of `native` (a snapshot of `repo` the caller has read through `remote`),
/// built and recorded on first use. `recorder` writes it: a caller that may only
/// pull still gets the view recorded, once.
pub async fn view_of(
    remote: &Remote,
    recorder: &Remote,
    repo: &str,
    native: &Holder,
    native_bytes: &[u8],
) -> Result<Holder> {
    if let Some(v) = store::tagged(remote, &digest_repo(repo), &view_tag(&native.digest)).await? {
        return Ok(v);
    }
    if native.manifest.encryption.is_some() {
        return Err(OciError::unsupported(format!(
            "snapshot {} is encrypted with a tenant key, which the registry does not hold: \
             it cannot be served as an OCI image; pull it with snapctl and --key-file",
            native.digest
        )));
    }
    let index = podman_index(remote, &native.manifest).await?;
    let pieces = oci_image::layer_pieces(&native.manifest, native_bytes, index.as_ref())?;
    let (layer_digest, layer_size) = hash_pieces(remote, &pieces).await?;
    let config = oci_image::config_json(&native.manifest, &layer_digest.to_string());
    let config_digest = OciDigest::of(&config);
    let blob = |d: &OciDigest, size: u64| oci_image::Blob {
        digest: d.to_string(),
        size,
    };
    let manifest_json = oci_image::manifest_json(
        repo,
        &native.digest,
        &native.manifest,
        &blob(&config_digest, config.len() as u64),
        &blob(&layer_digest, layer_size),
    );
    let manifest_digest = OciDigest::of(&manifest_json);

    let target = digest_repo(repo);
    let cfg = ChunkerConfig::from_params(&native.manifest.chunker);
    let uploader = Uploader::begin(recorder, &target, cfg, Progress::hidden()).await?;
    let recorded = record(
        &uploader,
        pieces,
        layer_size,
        &layer_digest,
        config,
        &config_digest,
        manifest_json,
    )
    .await;
    let files = match recorded {
        Ok(f) => f,
        Err(e) => {
            let upload = uploader.abort().await;
            return Err(upload.map(OciError::from).unwrap_or(e));
        }
    };
    // The view is the native snapshot with its OCI face: a mount of its layer blob
    // into another repository brings the native layers along (manifests.rs).
    let mut layers = native.manifest.layers.clone();
    layers.push(store::new_oci_layer(files));
    let mut manifest = uploader.new_manifest(layers, false);
    let n = &native.manifest;
    manifest.criu = n.criu.clone();
    manifest.compat = n.compat.clone();
    manifest.device_memory = n.device_memory.clone();
    manifest.ranks = n.ranks.clone();
    manifest.annotations = n.annotations.clone();
    let a = &mut manifest.annotations;
    a.insert(
        annotations::MANIFEST_DIGEST.into(),
        manifest_digest.to_string(),
    );
    a.insert(annotations::MEDIA_TYPE.into(), media::OCI_MANIFEST.into());
    a.insert(
        oci_image::SNAPSHOT_ANNOTATION.into(),
        native.digest.to_string(),
    );
    let tags = vec![
        view_tag(&native.digest),
        digest_tag(&manifest_digest),
        digest_tag(&config_digest),
        digest_tag(&layer_digest),
    ];
    let digest = uploader.commit(&target, &manifest, tags).await?;
    tracing::info!(repository = %repo, snapshot = %native.digest, manifest = %manifest_digest, layer = %layer_digest, "OCI view recorded");
    Ok(Holder { digest, manifest })
}

/// The Podman archive skeleton of a snapshot imported from one.
async fn podman_index(remote: &Remote, m: &Manifest) -> Result<Option<ArchiveIndex>> {
    let Some(file) = oci_image::podman_index_file(m) else {
        return Ok(None);
    };
    let bytes = content::read_small(remote, file, MAX_INDEX_BYTES).await?;
    let index = serde_json::from_slice(&bytes)
        .map_err(|e| OciError::internal(format!("{INDEX_LAYER}/{INDEX_FILE}: {e}")))?;
    Ok(Some(index))
}

/// The layer's sha256 and size, reading the snapshot's chunks once.
async fn hash_pieces(remote: &Remote, pieces: &[Piece]) -> Result<(OciDigest, u64)> {
    let mut h = Sha256::default();
    let mut size = 0u64;
    for p in pieces {
        match p {
            Piece::Framing(b) => {
                h.update(b);
                size += b.len() as u64;
            }
            Piece::Data(extents) => {
                let len = extents.iter().map(Extent::len).sum();
                let file = store::oci_file("layer data".into(), len, extents.clone());
                let mut s = std::pin::pin!(content::stream(remote.clone(), file));
                let mut got = 0u64;
                while let Some(piece) = futures::StreamExt::next(&mut s).await {
                    let piece = piece.map_err(|e| OciError::internal(e.to_string()))?;
                    got += piece.len() as u64;
                    h.update(&piece);
                }
                if got != len {
                    return Err(OciError::internal(format!(
                        "read {got} of {len} bytes of a layer file"
                    )));
                }
                size += len;
            }
        }
    }
    Ok((h.finish(), size))
}

/// Uploads the framing and the small blobs; the files of the view's `oci` layer.
async fn record(
    uploader: &Uploader,
    pieces: Vec<Piece>,
    layer_size: u64,
    layer_digest: &OciDigest,
    config: Vec<u8>,
    config_digest: &OciDigest,
    manifest_json: Vec<u8>,
) -> Result<Vec<File>> {
    let mut layer = Vec::new();
    for p in pieces {
        let extents = match p {
            Piece::Framing(b) => store::chunk_bytes(uploader, b).await?,
            Piece::Data(x) => x,
        };
        for e in extents {
            store::push_extent(&mut layer, e);
        }
    }
    let config_len = config.len() as u64;
    let manifest_len = manifest_json.len() as u64;
    Ok(vec![
        store::oci_file(
            store::MANIFEST_FILE.into(),
            manifest_len,
            store::chunk_bytes(uploader, manifest_json).await?,
        ),
        store::oci_file(
            store::blob_path(config_digest),
            config_len,
            store::chunk_bytes(uploader, config).await?,
        ),
        store::oci_file(store::blob_path(layer_digest), layer_size, layer),
    ])
}
