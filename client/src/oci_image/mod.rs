//! A snapshot as an OCI checkpoint image: the layout CRI-O restores from and
//! Podman's `--create-image` writes (one uncompressed tar layer holding the
//! checkpoint directory; CRI-O's and Podman's checkpoint-name annotations on the
//! manifest). The registry's OCI listener serves it (oci/src/view.rs) and
//! `snapctl export` writes it ([`export`]); both compose it here, so both give the
//! same bytes and digests.
//!
//! The layer is
//! - for a snapshot imported from a Podman checkpoint archive: that archive, byte for
//!   byte, rebuilt from its skeleton ([`crate::podman::ArchiveIndex`]);
//! - otherwise a tar generated from the manifest: every file at [`member_path`]
//!   (CRIU images under `checkpoint/`), then [`MANIFEST_MEMBER`], the native manifest
//!   itself, so that pushing the layer back gives back the snapshot with its CRIU
//!   options and compatibility record. Headers are deterministic (GNU format, owner 0,
//!   mtime 0, long names as `L` members), so one snapshot has one layer digest.
//!
//! A layer is a list of [`Piece`]s: bytes made here (headers, the skeleton's raw
//! blocks) and runs of the snapshot's own extents (file data, zero padding).

use std::collections::{BTreeSet, HashMap};
use std::io;

use snapreg_proto::manifest::{Extent, File, Layer, LayerKind, Manifest};
use snapreg_proto::Digest;

use crate::error::{ClientError, Result};
use crate::podman::tar::{padding_of, BLOCK};
use crate::podman::{ArchiveIndex, INDEX_FILE, INDEX_LAYER};

pub mod export;

pub use export::{export, ExportReport, ExportTarget};

/// The member of a generated layer that holds the native manifest.
pub const MANIFEST_MEMBER: &str = "snapreg-manifest.json";
/// The manifest annotation CRI-O recognises a checkpoint image by.
pub const CRIO_CHECKPOINT_NAME: &str = "io.kubernetes.cri-o.annotations.checkpoint.name";
/// The one Podman writes (and shows) for the same thing.
pub const PODMAN_CHECKPOINT_NAME: &str = "io.podman.annotations.checkpoint.name";
/// The native snapshot an OCI manifest was generated from.
pub const SNAPSHOT_ANNOTATION: &str = "org.snapreg.snapshot";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
/// The layer of a snapshot that holds OCI content (written by the registry's OCI
/// listener, oci/src/store.rs): its manifest, byte for byte, and each blob's extents.
pub const OCI_LAYER: &str = "oci";
/// The file of [`OCI_LAYER`] holding the OCI manifest.
pub const OCI_MANIFEST_FILE: &str = "manifest.json";
/// The annotation giving the media type that manifest is served with.
pub const MEDIA_TYPE_ANNOTATION: &str = "org.snapreg.oci.media-type";
/// The end-of-archive marker: two zero blocks.
pub const END_OF_ARCHIVE: u64 = 2 * BLOCK as u64;

/// One run of a layer: bytes made here, or extents of the snapshot.
#[derive(Clone, Debug, PartialEq)]
pub enum Piece {
    Framing(Vec<u8>),
    Data(Vec<Extent>),
}

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

/// The Podman archive skeleton's file, for a snapshot imported from an archive.
pub fn podman_index_file(m: &Manifest) -> Option<&File> {
    m.layers
        .iter()
        .find(|l| l.kind == LayerKind::Extra && l.name.as_deref() == Some(INDEX_LAYER))
        .and_then(|l| l.files.iter().find(|f| f.path == INDEX_FILE))
}

/// The layer of snapshot `m` (whose exact bytes are `native_bytes`): the imported
/// archive when there is a skeleton, else the generated tar.
pub fn layer_pieces(
    m: &Manifest,
    native_bytes: &[u8],
    podman_index: Option<&ArchiveIndex>,
) -> Result<Vec<Piece>> {
    match podman_index {
        Some(index) => archive_pieces(m, index),
        None => generated_pieces(m, native_bytes),
    }
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
    let unhex = |what: &str, h: &str| hex::decode(h).map_err(|e| skeleton(format!("{what}: {e}")));
    let mut pieces = vec![];
    for member in &index.members {
        pieces.push(Piece::Framing(unhex(&member.name, &member.header_hex)?));
        if member.kind != "file" {
            continue;
        }
        let dest = member.file.as_deref().unwrap_or_default();
        let file = by_dest
            .get(dest)
            .ok_or_else(|| skeleton(format!("it names {dest:?}, which the snapshot lacks")))?;
        pieces.push(Piece::Data(file.extents.clone()));
        match &member.padding_hex {
            Some(h) => pieces.push(Piece::Framing(unhex(&member.name, h)?)),
            None => pieces.push(zeros(padding_of(member.size) as u64)),
        }
    }
    match &index.trailer_hex {
        Some(h) => pieces.push(Piece::Framing(unhex("trailer", h)?)),
        None => pieces.push(zeros(index.trailer_len)),
    }
    Ok(pieces)
}

fn skeleton(reason: String) -> ClientError {
    ClientError::Format(snapreg_proto::Error::ManifestInvalid(format!(
        "the Podman archive skeleton ({INDEX_LAYER}/{INDEX_FILE}) does not fit the snapshot: {reason}"
    )))
}

fn zeros(n: u64) -> Piece {
    Piece::Data(vec![Extent::Zero { zero: n }])
}

/// A tar of the snapshot's files and its manifest.
fn generated_pieces(m: &Manifest, native_bytes: &[u8]) -> Result<Vec<Piece>> {
    let mut seen = BTreeSet::new();
    let mut pieces = vec![];
    let mut member = |path: String, size: u64, mode: u32, data: Piece| -> Result<()> {
        if !seen.insert(path.clone()) {
            return Err(ClientError::Usage(format!(
                "two files of the snapshot would both be {path:?} in its checkpoint layer"
            )));
        }
        let header = tar_header(&path, size, mode)
            .map_err(|e| ClientError::io(format!("tar header for {path:?}"), e))?;
        pieces.push(Piece::Framing(header));
        pieces.push(data);
        pieces.push(zeros(padding_of(size) as u64));
        Ok(())
    };
    for l in &m.layers {
        for f in &l.files {
            let data = Piece::Data(f.extents.clone());
            member(member_path(l, f), f.size, f.mode, data)?;
        }
    }
    let own = Piece::Framing(native_bytes.to_vec());
    member(
        MANIFEST_MEMBER.into(),
        native_bytes.len() as u64,
        0o644,
        own,
    )?;
    pieces.push(zeros(END_OF_ARCHIVE));
    Ok(pieces)
}

/// The header blocks of a regular member (a GNU long-name member first when the
/// name needs one), deterministic: owner 0, mtime 0, the given mode.
pub fn tar_header(path: &str, size: u64, mode: u32) -> io::Result<Vec<u8>> {
    let mut h = tar::Header::new_gnu();
    h.set_size(size);
    h.set_mode(mode & 0o7777);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    h.set_entry_type(tar::EntryType::Regular);
    let mut out = Vec::new();
    {
        // append_data writes the long-name member when needed, then the header;
        // it copies no data from an empty reader and so adds no padding.
        let mut b = tar::Builder::new(&mut out);
        b.append_data(&mut h, path, io::empty())?;
        b.into_inner()?;
    }
    // into_inner wrote the two end-of-archive blocks: keep only the headers.
    out.truncate(out.len() - END_OF_ARCHIVE as usize);
    Ok(out)
}

/// The image config: what OCI tools show for the image; the layer as its one diff.
pub fn config_json(m: &Manifest, layer_digest: &str) -> Vec<u8> {
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
        "rootfs": { "type": "layers", "diff_ids": [layer_digest] },
    });
    serde_json::to_vec(&config).expect("config serializes")
}

fn created(m: &Manifest) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(m.created.unix_seconds);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// A blob as a manifest names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blob {
    /// `sha256:<hex>`.
    pub digest: String,
    pub size: u64,
}

/// The OCI manifest of snapshot `m` (digest `native`) of repository `repo`.
pub fn manifest_json(
    repo: &str,
    native: &Digest,
    m: &Manifest,
    config: &Blob,
    layer: &Blob,
) -> Vec<u8> {
    let name = repo.rsplit('/').next().unwrap_or(repo);
    let json = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": { "mediaType": OCI_CONFIG, "digest": config.digest, "size": config.size },
        "layers": [{ "mediaType": OCI_LAYER_TAR, "digest": layer.digest, "size": layer.size }],
        "annotations": {
            CRIO_CHECKPOINT_NAME: name,
            PODMAN_CHECKPOINT_NAME: name,
            "org.opencontainers.image.created": created(m),
            SNAPSHOT_ANNOTATION: native.to_string(),
        },
    });
    serde_json::to_vec(&json).expect("manifest serializes")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn generated_headers_read_back_as_the_member() {
        let long = format!("weights/{}", "w".repeat(200));
        let mut t = tar_header(&long, 3, 0o640).unwrap();
        t.extend_from_slice(b"abc");
        t.resize(t.len() + padding_of(3) + END_OF_ARCHIVE as usize, 0);
        let mut a = tar::Archive::new(&t[..]);
        let mut e = a.entries().unwrap().next().unwrap().unwrap();
        assert_eq!(e.path().unwrap().to_str().unwrap(), long);
        assert_eq!(e.header().mode().unwrap(), 0o640);
        let mut s = String::new();
        e.read_to_string(&mut s).unwrap();
        assert_eq!(s, "abc");
    }

    #[test]
    fn unnamed_process_layers_go_under_checkpoint() {
        let f = File {
            path: "pages-1.img".into(),
            size: 0,
            mode: 0o600,
            extents: vec![],
        };
        let layer = |kind, name: Option<&str>| Layer {
            kind,
            name: name.map(str::to_string),
            rank: None,
            files: vec![],
        };
        assert_eq!(
            member_path(&layer(LayerKind::Process, None), &f),
            "checkpoint/pages-1.img"
        );
        assert_eq!(
            member_path(&layer(LayerKind::Extra, Some("files")), &f),
            "files/pages-1.img"
        );
        assert_eq!(
            member_path(&layer(LayerKind::Rootfs, None), &f),
            "pages-1.img"
        );
    }
}
