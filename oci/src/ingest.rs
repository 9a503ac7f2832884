//! An uploaded blob, whole and verified on the registry's disk, into the snapshot
//! that holds it (`R/by-digest:sha256-<hex>`).
//!
//! A tar is chunked member by member ([`crate::tar_layout::segments`]), so a
//! checkpoint layer's CRIU images land as the chunks a native push of the same
//! dumps stores; anything else (a gzip layer, a config) is chunked as one stream.
//! A tar holding `checkpoint/inventory.img` is a checkpoint archive: its members also
//! become the snapshot's native layers, so the image restores with `pull-restore`
//! and exports as a Podman archive:
//!
//! - with `snapreg-manifest.json` (a layer snapreg generated, view.rs), the native
//!   snapshot it came from, when every file of that manifest is a member with the
//!   very same extents (the CRIU options, compatibility record and annotations come
//!   back with it);
//! - otherwise Podman's layout: `checkpoint/*` → process layer "checkpoint",
//!   `rootfs-diff.tar` → rootfs, the other members → extra.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use snapreg_client::chunker::ChunkerConfig;
use snapreg_client::oci_image;
use snapreg_client::progress::Progress;
use snapreg_client::push::Uploader;
use snapreg_client::remote::Remote;
use snapreg_proto::manifest::{Extent, File, Layer, LayerKind, Manifest};

use crate::error::{OciError, Result};
use crate::store::{self, digest_repo, digest_tag, Holder};
use crate::tar_layout::{self, Segment};
use crate::uploads::{RemoveOnDrop, Spooled};

/// The member of a checkpoint archive that marks it as one (Podman and CRI-O).
pub const INVENTORY: &str = "checkpoint/inventory.img";

/// A member's data as chunked.
struct Chunked {
    mode: u32,
    size: u64,
    extents: Vec<Extent>,
}

/// Stores `blob` in `repo`'s digest repository and returns the snapshot holding it.
pub async fn ingest(remote: &Remote, repo: &str, blob: &Spooled) -> Result<Holder> {
    let (plain, compression) = decompressed(blob).await?;
    let tar_path = plain
        .as_ref()
        .map_or(blob.path.as_path(), |p| p.0.as_path());
    let tar_len = match &plain {
        Some(p) => p.1,
        None => blob.size,
    };
    let (segments, not_tar) = split(tar_path, tar_len).await?;
    let is_checkpoint = members_of(&segments).contains_key(INVENTORY);
    // Why the blob is not a checkpoint archive, for a manifest that says it is one.
    let not_checkpoint = match (compression, not_tar, is_checkpoint) {
        (_, _, true) => None,
        (Err(why), _, _) => Some(why),
        (Ok(c), Some(why), _) => Some(format!("{c}{why}")),
        (Ok(c), None, false) => Some(format!("{c}a tar without {INVENTORY}")),
    };
    let embedded = match is_checkpoint {
        true => embedded_manifest(tar_path, &segments).await?,
        false => None,
    };
    let cfg = embedded.as_ref().map_or_else(ChunkerConfig::default, |m| {
        ChunkerConfig::from_params(&m.chunker)
    });
    let target = digest_repo(repo);
    let uploader = Uploader::begin(remote, &target, cfg, Progress::hidden()).await?;
    let chunked = chunk_blob(
        &uploader,
        blob,
        plain.is_some(),
        tar_path,
        &segments,
        is_checkpoint,
    )
    .await;
    let (blob_extents, members) = match chunked {
        Ok(c) => c,
        Err(e) => {
            let upload = uploader.abort().await;
            return Err(upload.map(OciError::from).unwrap_or(e));
        }
    };
    let blob_file = store::oci_file(store::blob_path(&blob.digest), blob.size, blob_extents);
    let mut layers = Vec::new();
    let mut adopted = None;
    if is_checkpoint {
        match embedded
            .filter(|m| oci_image::matches_members(m, &|p| members.get(p).map(|c| &c.extents)))
        {
            Some(m) => {
                layers = m.layers.clone();
                adopted = Some(m);
            }
            None => layers = podman_layers(&members),
        }
    }
    layers.push(store::new_oci_layer(vec![blob_file]));
    let mut manifest = uploader.new_manifest(layers, is_checkpoint);
    if let Some(why) = not_checkpoint {
        manifest
            .annotations
            .insert(store::annotations::NOT_CHECKPOINT.into(), why);
    }
    if let Some(m) = adopted {
        manifest.criu = m.criu;
        manifest.compat = m.compat;
        manifest.device_memory = m.device_memory;
        manifest.ranks = m.ranks;
        manifest.annotations = m.annotations;
    }
    let digest = uploader
        .commit(&target, &manifest, vec![digest_tag(&blob.digest)])
        .await?;
    tracing::info!(repository = %repo, blob = %blob.digest, snapshot = %digest, checkpoint = is_checkpoint, "blob stored");
    Ok(Holder { digest, manifest })
}

/// The blob's extents and, for a checkpoint archive, each member's. An uncompressed
/// tar is chunked segment by segment (its members are the blob's own chunks); a
/// compressed one is chunked as it is, and its members from the decompressed copy.
async fn chunk_blob(
    uploader: &Uploader,
    blob: &Spooled,
    compressed: bool,
    tar_path: &Path,
    segments: &[Segment],
    is_checkpoint: bool,
) -> Result<(Vec<Extent>, BTreeMap<String, Chunked>)> {
    if !compressed {
        return chunk_segments(uploader, tar_path, segments).await;
    }
    let whole = [Segment {
        offset: 0,
        len: blob.size,
        member: None,
    }];
    let (extents, _) = chunk_segments(uploader, &blob.path, &whole).await?;
    let members = match is_checkpoint {
        true => {
            let data: Vec<Segment> = segments
                .iter()
                .filter(|s| s.member.is_some())
                .cloned()
                .collect();
            chunk_segments(uploader, tar_path, &data).await?.1
        }
        false => BTreeMap::new(),
    };
    Ok((extents, members))
}

/// A gzip or zstd blob decompressed next to its spool file (removed when dropped),
/// with its length; `None` for anything else. A stream that does not decompress,
/// or would grow past [`MAX_EXPANSION`] times its size, is treated as opaque. The
/// second value prefixes what is said of the tar inside ("gzip: "), or says why there
/// is none to look at.
async fn decompressed(
    blob: &Spooled,
) -> Result<(
    Option<(PathBuf, u64, RemoveOnDrop)>,
    Result<&'static str, String>,
)> {
    let src = blob.path.clone();
    let dst = blob.path.with_extension("tar");
    let limit = blob.size.saturating_mul(MAX_EXPANSION).max(64 << 20);
    let guard = RemoveOnDrop(dst.clone());
    type Looked = (Option<u64>, Result<&'static str, String>);
    let out = tokio::task::spawn_blocking(move || -> std::io::Result<Looked> {
        let mut f = std::fs::File::open(&src)?;
        let mut magic = [0u8; 4];
        let n = f.read(&mut magic)?;
        f.seek(SeekFrom::Start(0))?;
        let input = std::io::BufReader::new(f);
        let (mut reader, kind): (Box<dyn Read>, &'static str) = match &magic[..n] {
            [0x1f, 0x8b, ..] => (Box::new(flate2::read::MultiGzDecoder::new(input)), "gzip: "),
            [0x28, 0xb5, 0x2f, 0xfd] => {
                (Box::new(zstd::stream::read::Decoder::new(input)?), "zstd: ")
            }
            _ => return Ok((None, Ok(""))),
        };
        let mut out = CountingWriter(std::fs::File::create(&dst)?, 0);
        let copied = std::io::copy(&mut (&mut reader).take(limit + 1), &mut out);
        let at = out.1;
        match copied {
            Ok(n) if n <= limit => Ok((Some(n), Ok(kind))),
            Ok(_) => Ok((
                None,
                Err(format!("{kind}expands past {limit} bytes; not looked into")),
            )),
            Err(e) if e.kind() == std::io::ErrorKind::StorageFull => Err(e),
            Err(e) => Ok((
                None,
                Err(format!("{kind}does not decompress after {at} bytes: {e}")),
            )),
        }
    })
    .await
    .map_err(|e| OciError::internal(e.to_string()))?
    .map_err(|e| OciError::internal(format!("decompressing the upload: {e}")))?;
    Ok(match out {
        (Some(n), kind) => (Some((guard.0.clone(), n, guard)), kind),
        (None, kind) => (None, kind),
    })
}

/// Counts what passes through, for messages.
struct CountingWriter(std::fs::File, u64);

impl std::io::Write for CountingWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.0.write(buf)?;
        self.1 += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// How far a compressed blob may expand when looked into.
const MAX_EXPANSION: u64 = 32;

/// The tar segments of the blob, or the whole blob as one segment when it is not a tar.
/// Also says why it is not a tar, when it is not.
async fn split(path: &Path, size: u64) -> Result<(Vec<Segment>, Option<String>)> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let mut f = std::fs::File::open(&path)
            .map_err(|e| OciError::internal(format!("reopening the upload: {e}")))?;
        Ok(match tar_layout::segments(&mut f, size) {
            Ok(s) => (s, None),
            Err(not_tar) => {
                tracing::debug!(%not_tar, "blob stored as one stream");
                let whole = Segment {
                    offset: 0,
                    len: size,
                    member: None,
                };
                (vec![whole], Some(not_tar.to_string()))
            }
        })
    })
    .await
    .map_err(|e| OciError::internal(e.to_string()))?
}

fn members_of(segments: &[Segment]) -> BTreeMap<&str, &Segment> {
    segments
        .iter()
        .filter_map(|s| s.member.as_ref().map(|m| (m.path.as_str(), s)))
        .collect()
}

/// The native manifest a generated checkpoint layer carries, if it carries one
/// that decodes.
async fn embedded_manifest(path: &Path, segments: &[Segment]) -> Result<Option<Manifest>> {
    let Some(seg) = members_of(segments)
        .get(oci_image::MANIFEST_MEMBER)
        .copied()
    else {
        return Ok(None);
    };
    if seg.len > snapreg_proto::manifest::MAX_MANIFEST_BYTES as u64 {
        return Ok(None);
    }
    let bytes = read_range(path, seg.offset, seg.len).await?;
    match Manifest::decode(&bytes) {
        Ok(m) => Ok(Some(m)),
        Err(e) => {
            tracing::warn!(error = %e, "a checkpoint layer's {} does not decode; ignored", oci_image::MANIFEST_MEMBER);
            Ok(None)
        }
    }
}

async fn read_range(path: &Path, offset: u64, len: u64) -> Result<Vec<u8>> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let mut f = std::fs::File::open(&path)?;
        f.seek(SeekFrom::Start(offset))?;
        let mut buf = vec![0u8; len as usize];
        f.read_exact(&mut buf)?;
        Ok::<_, std::io::Error>(buf)
    })
    .await
    .map_err(|e| OciError::internal(e.to_string()))?
    .map_err(|e| OciError::internal(format!("reading the upload: {e}")))
}

/// Chunks every segment in order: the blob's extents, and each member's own.
async fn chunk_segments(
    uploader: &Uploader,
    path: &Path,
    segments: &[Segment],
) -> Result<(Vec<Extent>, BTreeMap<String, Chunked>)> {
    let mut blob = Vec::new();
    let mut members = BTreeMap::new();
    for seg in segments {
        let mut f = std::fs::File::open(path)
            .map_err(|e| OciError::internal(format!("reopening the upload: {e}")))?;
        f.seek(SeekFrom::Start(seg.offset))
            .map_err(|e| OciError::internal(format!("reading the upload: {e}")))?;
        let aligned = seg
            .member
            .as_ref()
            .is_some_and(|m| uploader.config().is_page_aligned(&m.path));
        let extents = uploader.chunk_stream(f.take(seg.len), aligned).await?;
        let got: u64 = extents.iter().map(Extent::len).sum();
        if got != seg.len {
            return Err(OciError::internal(format!(
                "the upload changed under the registry: read {got} of {} bytes at offset {}",
                seg.len, seg.offset
            )));
        }
        for e in &extents {
            store::push_extent(&mut blob, *e);
        }
        if let Some(m) = &seg.member {
            members.insert(
                m.path.clone(),
                Chunked {
                    mode: m.mode,
                    size: seg.len,
                    extents,
                },
            );
        }
    }
    Ok((blob, members))
}

/// Podman's layout of a checkpoint archive.
fn podman_layers(members: &BTreeMap<String, Chunked>) -> Vec<Layer> {
    let mut process = Vec::new();
    let mut rootfs = Vec::new();
    let mut extra = Vec::new();
    for (path, c) in members {
        let file = |path: &str| File {
            path: path.to_string(),
            size: c.size,
            mode: c.mode,
            extents: c.extents.clone(),
        };
        if let Some(rel) = path.strip_prefix("checkpoint/") {
            process.push(file(rel));
        } else if path == "rootfs-diff.tar" {
            rootfs.push(file(path));
        } else {
            extra.push(file(path));
        }
    }
    let layer = |kind, name: Option<&str>, files| Layer {
        kind,
        name: name.map(str::to_string),
        rank: None,
        files,
    };
    let mut layers = vec![layer(LayerKind::Process, Some("checkpoint"), process)];
    if !rootfs.is_empty() {
        layers.push(layer(LayerKind::Rootfs, None, rootfs));
    }
    if !extra.is_empty() {
        layers.push(layer(LayerKind::Extra, None, extra));
    }
    layers
}
