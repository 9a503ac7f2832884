//! A native snapshot seen as an OCI checkpoint image, the layout CRI-O restores from
//! and Podman's `--create-image` writes: one uncompressed tar layer holding the
//! checkpoint directory, the checkpoint annotations on the manifest.
//!
//! The layer is
//! - for a snapshot imported from a Podman checkpoint archive: that archive, byte for
//!   byte, rebuilt from its skeleton (`podman-archive/archive-index.json`);
//! - otherwise a tar generated from the manifest: every file at [`member_path`]
//!   (CRIU images under `checkpoint/`), then [`MANIFEST_MEMBER`], the native manifest
//!   itself, so that pushing the layer back (ingest.rs) gives back the snapshot with
//!   its CRIU options and compatibility record. Headers are deterministic (owner 0,
//!   mtime 0), so the same snapshot always has the same layer digest.
//!
//! Headers become small chunks; file data stays the snapshot's own extents. The
//! layer's sha256 is computed once, by reading it through, and the view is recorded
//! as a snapshot in the digest repository (`blake3-<hex>` of the native snapshot, and
//! `sha256-<hex>` of its manifest, config and layer), so later requests only look it
//! up.

use std::collections::{BTreeMap, HashMap};

use snapreg_client::chunker::ChunkerConfig;
use snapreg_client::podman::{ArchiveIndex, INDEX_FILE, INDEX_LAYER};
use snapreg_client::progress::Progress;
use snapreg_client::push::Uploader;
use snapreg_client::remote::Remote;
use snapreg_proto::manifest::{Extent, File, Layer, LayerKind, Manifest};

use crate::content;
use crate::digest::{OciDigest, Sha256};
use crate::error::{OciError, Result};
use crate::media;
use crate::store::{self, annotations, digest_repo, digest_tag, view_tag, Holder};
use crate::tar_layout;

/// The member of a generated layer that holds the native manifest.
pub const MANIFEST_MEMBER: &str = "snapreg-manifest.json";
/// Annotations of the generated OCI manifest.
pub const CRIO_CHECKPOINT_NAME: &str = "io.kubernetes.cri-o.annotations.checkpoint.name";
pub const PODMAN_CHECKPOINT_NAME: &str = "io.podman.annotations.checkpoint.name";
/// The native snapshot an OCI manifest was generated from.
pub const SNAPSHOT_ANNOTATION: &str = "org.snapreg.snapshot";
/// The Podman archive skeleton is read whole: bound it.
const MAX_INDEX_BYTES: u64 = 256 << 20;

/// Where a snapshot file sits in a generated layer: a named layer's files under its
/// name (so Podman's process layer "checkpoint" gives `checkpoint/...`), an unnamed
/// process layer's under `checkpoint/`, other unnamed layers' at the top.
pub fn member_path(layer: &Layer, file: &File) -> String {
    match (&layer.name, layer.kind) {
        (Some(name), _) => format!("{name}/{}", file.path),
        (None, LayerKind::Process) => format!("checkpoint/{}", file.path),
        (None, _) => file.path.clone(),
    }
}

/// Whether every file of `m` is a member (by [`member_path`]) with exactly its
/// extents: same chunker, same bytes.
pub fn matches_members<'a>(m: &Manifest, member: &dyn Fn(&str) -> Option<&'a Vec<Extent>>) -> bool {
    m.layers.iter().all(|l| {
        l.files
            .iter()
            .all(|f| member(&member_path(l, f)).is_some_and(|x| *x == f.extents))
    })
}

/// One run of a layer being built: bytes made here, or a file's extents.
enum Piece {
    Framing(Vec<u8>),
    Data(Vec<Extent>),
}

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
    let pieces = match podman_index(remote, &native.manifest).await? {
        Some(index) => archive_pieces(&native.manifest, &index)?,
        None => generated_pieces(&native.manifest, native_bytes)?,
    };
    let (layer_digest, layer_size) = hash_pieces(remote, &pieces).await?;
    let config = config_json(&native.manifest, &layer_digest);
    let config_digest = OciDigest::of(&config);
    let manifest_json = manifest_json(
        repo,
        native,
        &config_digest,
        config.len(),
        &layer_digest,
        layer_size,
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
    a.insert(SNAPSHOT_ANNOTATION.into(), native.digest.to_string());
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
    let Some(file) = m
        .layers
        .iter()
        .find(|l| l.kind == LayerKind::Extra && l.name.as_deref() == Some(INDEX_LAYER))
        .and_then(|l| l.files.iter().find(|f| f.path == INDEX_FILE))
    else {
        return Ok(None);
    };
    let bytes = content::read_small(remote, file, MAX_INDEX_BYTES).await?;
    let index = serde_json::from_slice(&bytes)
        .map_err(|e| OciError::internal(format!("{INDEX_LAYER}/{INDEX_FILE}: {e}")))?;
    Ok(Some(index))
}

/// The imported archive: each member's raw headers, its data, its padding; the trailer.
fn archive_pieces(m: &Manifest, index: &ArchiveIndex) -> Result<Vec<Piece>> {
    let by_dest: HashMap<String, &File> = m
        .layers
        .iter()
        .flat_map(|l| {
            l.files.iter().map(move |f| {
                let dest = match &l.name {
                    Some(n) => format!("{n}/{}", f.path),
                    None => f.path.clone(),
                };
                (dest, f)
            })
        })
        .collect();
    let unhex = |what: &str, h: &str| {
        hex::decode(h).map_err(|e| OciError::internal(format!("archive skeleton, {what}: {e}")))
    };
    let mut pieces = vec![];
    for member in &index.members {
        pieces.push(Piece::Framing(unhex(&member.name, &member.header_hex)?));
        if member.kind != "file" {
            continue;
        }
        let dest = member.file.as_deref().unwrap_or_default();
        let file = by_dest.get(dest).ok_or_else(|| {
            OciError::internal(format!(
                "archive skeleton names {dest:?}, which the snapshot lacks"
            ))
        })?;
        pieces.push(Piece::Data(file.extents.clone()));
        match &member.padding_hex {
            Some(h) => pieces.push(Piece::Framing(unhex(&member.name, h)?)),
            None => pieces.push(Piece::Data(vec![Extent::Zero {
                zero: tar_layout::padding(member.size),
            }])),
        }
    }
    match &index.trailer_hex {
        Some(h) => pieces.push(Piece::Framing(unhex("trailer", h)?)),
        None => pieces.push(Piece::Data(vec![Extent::Zero {
            zero: index.trailer_len,
        }])),
    }
    Ok(pieces)
}

/// A tar of the snapshot's files and its manifest.
fn generated_pieces(m: &Manifest, native_bytes: &[u8]) -> Result<Vec<Piece>> {
    let mut seen = BTreeMap::new();
    let mut pieces = vec![];
    let mut member = |path: String, size: u64, mode: u32, data: Piece| -> Result<()> {
        if seen.insert(path.clone(), ()).is_some() {
            return Err(OciError::unsupported(format!(
                "two files of the snapshot would both be {path:?} in its checkpoint layer"
            )));
        }
        let header = tar_layout::header(&path, size, mode)
            .map_err(|e| OciError::internal(format!("tar header for {path:?}: {e}")))?;
        pieces.push(Piece::Framing(header));
        pieces.push(data);
        pieces.push(Piece::Data(vec![Extent::Zero {
            zero: tar_layout::padding(size),
        }]));
        Ok(())
    };
    for l in &m.layers {
        for f in &l.files {
            member(
                member_path(l, f),
                f.size,
                f.mode,
                Piece::Data(f.extents.clone()),
            )?;
        }
    }
    member(
        MANIFEST_MEMBER.into(),
        native_bytes.len() as u64,
        0o644,
        Piece::Framing(native_bytes.to_vec()),
    )?;
    pieces.push(Piece::Data(vec![Extent::Zero {
        zero: tar_layout::END_OF_ARCHIVE,
    }]));
    Ok(pieces)
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

/// The image config: what OCI tools show for the image; the layer as its one diff.
fn config_json(m: &Manifest, layer: &OciDigest) -> Vec<u8> {
    let arch = match m.compat.arch.as_str() {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    let config = serde_json::json!({
        "created": created(m),
        "architecture": arch,
        "os": "linux",
        "config": {},
        "rootfs": { "type": "layers", "diff_ids": [layer.to_string()] },
    });
    serde_json::to_vec(&config).expect("config serializes")
}

fn created(m: &Manifest) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(m.created.unix_seconds);
    humantime::format_rfc3339_seconds(t).to_string()
}

fn manifest_json(
    repo: &str,
    native: &Holder,
    config: &OciDigest,
    config_size: usize,
    layer: &OciDigest,
    layer_size: u64,
) -> Vec<u8> {
    let name = repo.rsplit('/').next().unwrap_or(repo);
    let m = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": media::OCI_MANIFEST,
        "config": { "mediaType": media::OCI_CONFIG, "digest": config.to_string(), "size": config_size },
        "layers": [{ "mediaType": media::OCI_LAYER_TAR, "digest": layer.to_string(), "size": layer_size }],
        "annotations": {
            CRIO_CHECKPOINT_NAME: name,
            PODMAN_CHECKPOINT_NAME: name,
            "org.opencontainers.image.created": created(&native.manifest),
            SNAPSHOT_ANNOTATION: native.digest.to_string(),
        },
    });
    serde_json::to_vec(&m).expect("manifest serializes")
}
