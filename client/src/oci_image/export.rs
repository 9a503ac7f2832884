//! `snapctl export REF oci:DIR[:NAME] | oci-archive:FILE[:NAME]`: a snapshot written
//! as an OCI image layout (the `oci:` and `oci-archive:` transports of skopeo and
//! podman), every byte read through the chunk-fetch stack and verified.
//!
//! - A snapshot pushed through the registry's OCI listener is written as it was
//!   pushed: its manifest and blobs byte for byte (the `oci` layer, oci/src/store.rs).
//! - Any other snapshot is written as its checkpoint image ([`super::layer_pieces`]),
//!   the very image the registry's OCI listener serves for it.
//!
//! ```text
//! DIR/oci-layout            {"imageLayoutVersion":"1.0.0"}
//! DIR/index.json            one manifest, annotated org.opencontainers.image.ref.name
//! DIR/blobs/sha256/<hex>    manifest, config, layer(s)
//! ```
//!
//! The layout is assembled under a temporary name beside the target and renamed into
//! place when whole (an archive: tarred into `.NAME.snapreg-partial`, then renamed), so
//! nothing half-written ever carries the target's name.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Instant;

use aws_lc_rs::digest::{Context, SHA256};
use futures::StreamExt;
use serde::Serialize;
use snapreg_proto::manifest::{File, LayerKind, Manifest};
use snapreg_proto::reference::Reference;

use super::{
    config_json, layer_pieces, manifest_json, podman_index_file, Blob, Piece,
    MEDIA_TYPE_ANNOTATION, OCI_LAYER, OCI_MANIFEST, OCI_MANIFEST_FILE,
};
use crate::error::{shown, ClientError, Result};
use crate::fetch::Chunks;
use crate::progress::{CountersSnapshot, Progress};
use crate::remote::Remote;
use crate::work_dir::RemoveOnDrop;

/// Chunks fetched ahead while writing a blob.
const WINDOW: usize = 16;

/// Where an export goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExportTarget {
    /// `oci:DIR[:NAME]`
    Dir { path: PathBuf, name: Option<String> },
    /// `oci-archive:FILE[:NAME]`
    Archive { path: PathBuf, name: Option<String> },
}

impl FromStr for ExportTarget {
    type Err = ClientError;

    fn from_str(s: &str) -> Result<Self> {
        let split = |rest: &str| match rest.split_once(':') {
            Some((p, n)) if !n.is_empty() => (PathBuf::from(p), Some(n.to_string())),
            _ => (PathBuf::from(rest.trim_end_matches(':')), None),
        };
        if let Some(rest) = s.strip_prefix("oci:") {
            let (path, name) = split(rest);
            return Ok(ExportTarget::Dir { path, name });
        }
        if let Some(rest) = s.strip_prefix("oci-archive:") {
            let (path, name) = split(rest);
            return Ok(ExportTarget::Archive { path, name });
        }
        Err(ClientError::Usage(format!(
            "{s:?}: export to oci:DIR[:NAME] (an OCI image layout) or oci-archive:FILE[:NAME] (the same, tarred)"
        )))
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct ExportReport {
    pub reference: String,
    /// The snapshot's digest (BLAKE3).
    pub digest: String,
    /// The OCI manifest's digest (sha256), the one a registry would serve it under.
    pub manifest_digest: String,
    pub media_type: String,
    pub blobs: usize,
    pub bytes: u64,
    #[serde(flatten)]
    pub counters: CountersSnapshot,
    pub seconds: f64,
}

/// Writes snapshot `reference` to `target`.
pub async fn export(
    remote: &Remote,
    reference: &Reference,
    target: &ExportTarget,
    progress: Progress,
) -> Result<ExportReport> {
    let started = Instant::now();
    let (final_path, name) = match target {
        ExportTarget::Dir { path, name } | ExportTarget::Archive { path, name } => (path, name),
    };
    if final_path.exists() {
        return Err(ClientError::Usage(format!(
            "{} exists: export into a new name (nothing is merged into an existing layout)",
            shown(final_path)
        )));
    }
    let (digest, bytes) = remote
        .get_manifest(&reference.repository, &reference.target_string())
        .await?;
    let manifest = Manifest::decode(&bytes)?;
    let chunks = Chunks::builder(vec![remote.clone()])
        .decrypting(remote.tenant_key().cloned())
        .build(progress.clone())
        .await?;
    let work = RemoveOnDrop::fresh_dir(partial_name(final_path, "layout"))?;
    let blobs_dir = work.path.join("blobs/sha256");
    std::fs::create_dir_all(&blobs_dir)
        .map_err(|e| ClientError::io(format!("creating {}", shown(&blobs_dir)), e))?;
    let layout = Layout {
        chunks: &chunks,
        blobs: &blobs_dir,
    };
    let written = match pushed_image(&manifest) {
        Some(oci) => layout.as_pushed(&manifest, oci).await?,
        None => {
            layout
                .as_checkpoint_image(reference, &digest, &manifest, &bytes)
                .await?
        }
    };
    let ref_name = name
        .clone()
        .or_else(|| reference.tag().map(str::to_string))
        .unwrap_or_else(|| "latest".into());
    write_index(&work.path, &written, &ref_name)?;
    match target {
        ExportTarget::Dir { path, .. } => rename(&work.path, path)?,
        ExportTarget::Archive { path, .. } => tar_into(&work.path, path)?,
    }
    drop(work);
    progress.finish();
    Ok(ExportReport {
        reference: reference.to_string(),
        digest: digest.to_string(),
        manifest_digest: written.manifest.digest,
        media_type: written.media_type,
        blobs: written.blobs,
        bytes: written.bytes,
        counters: progress.counters.snapshot(),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// What was written into the layout's blobs.
struct Written {
    manifest: Blob,
    media_type: String,
    blobs: usize,
    bytes: u64,
}

/// The `oci` layer of a snapshot pushed as an OCI image, if it is one.
fn pushed_image(m: &Manifest) -> Option<&[File]> {
    let layer = m
        .layers
        .iter()
        .find(|l| l.kind == LayerKind::Extra && l.name.as_deref() == Some(OCI_LAYER))?;
    layer
        .files
        .iter()
        .any(|f| f.path == OCI_MANIFEST_FILE)
        .then_some(layer.files.as_slice())
}

struct Layout<'a> {
    chunks: &'a Chunks,
    blobs: &'a Path,
}

impl Layout<'_> {
    /// The manifest and blobs exactly as they were pushed.
    async fn as_pushed(&self, m: &Manifest, files: &[File]) -> Result<Written> {
        let mut out = Written {
            manifest: Blob {
                digest: String::new(),
                size: 0,
            },
            media_type: m
                .annotations
                .get(MEDIA_TYPE_ANNOTATION)
                .cloned()
                .unwrap_or_else(|| OCI_MANIFEST.into()),
            blobs: 0,
            bytes: 0,
        };
        for f in files {
            let blob = self
                .write(&[Piece::Data(f.extents.clone())], &f.path)
                .await?;
            if let Some(hex) = f.path.strip_prefix("blobs/sha256/") {
                if blob.digest != format!("sha256:{hex}") {
                    return Err(ClientError::Format(snapreg_proto::Error::ManifestInvalid(
                        format!("{} holds bytes that hash to {}", f.path, blob.digest),
                    )));
                }
            }
            if f.path == OCI_MANIFEST_FILE {
                out.manifest = blob.clone();
            }
            out.blobs += 1;
            out.bytes += blob.size;
        }
        Ok(out)
    }

    /// The snapshot's checkpoint image: layer, config, manifest.
    async fn as_checkpoint_image(
        &self,
        reference: &Reference,
        digest: &snapreg_proto::Digest,
        m: &Manifest,
        bytes: &[u8],
    ) -> Result<Written> {
        let index = match podman_index_file(m) {
            Some(f) => {
                let raw = self.read_small(f).await?;
                Some(serde_json::from_slice(&raw).map_err(|e| {
                    ClientError::Format(snapreg_proto::Error::ManifestInvalid(format!(
                        "the Podman archive skeleton does not parse: {e}"
                    )))
                })?)
            }
            None => None,
        };
        let pieces = layer_pieces(m, bytes, index.as_ref())?;
        let layer = self.write(&pieces, "checkpoint layer").await?;
        let config_bytes = config_json(m, &layer.digest);
        let config = self
            .write(&[Piece::Framing(config_bytes)], "config")
            .await?;
        let manifest_bytes = manifest_json(&reference.repository, digest, m, &config, &layer);
        let manifest = self
            .write(&[Piece::Framing(manifest_bytes)], "manifest")
            .await?;
        Ok(Written {
            bytes: layer.size + config.size + manifest.size,
            manifest,
            media_type: OCI_MANIFEST.into(),
            blobs: 3,
        })
    }

    async fn read_small(&self, f: &File) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(f.size as usize);
        let mut pieces = self.chunks.extents(&f.extents, &f.path, WINDOW);
        while let Some(b) = pieces.next().await {
            out.extend_from_slice(&b?);
        }
        Ok(out)
    }

    /// Writes `pieces` as one blob, named by its sha256 once whole.
    async fn write(&self, pieces: &[Piece], what: &str) -> Result<Blob> {
        let partial = self.blobs.join(format!(".{}.partial", std::process::id()));
        let mut f = std::fs::File::create(&partial)
            .map_err(|e| ClientError::io(format!("creating {}", shown(&partial)), e))?;
        let mut hash = Context::new(&SHA256);
        let mut size = 0u64;
        let mut put = |b: &[u8]| -> Result<()> {
            hash.update(b);
            size += b.len() as u64;
            f.write_all(b)
                .map_err(|e| ClientError::io(format!("writing {}", shown(&partial)), e))
        };
        for p in pieces {
            match p {
                Piece::Framing(b) => put(b)?,
                Piece::Data(extents) => {
                    let mut fetched = self.chunks.extents(extents, what, WINDOW);
                    while let Some(b) = fetched.next().await {
                        put(&b?)?;
                    }
                }
            }
        }
        let d = hash.finish();
        let hex = hex::encode(d.as_ref());
        let dest = self.blobs.join(&hex);
        std::fs::rename(&partial, &dest)
            .map_err(|e| ClientError::io(format!("renaming into {}", shown(&dest)), e))?;
        Ok(Blob {
            digest: format!("sha256:{hex}"),
            size,
        })
    }
}

fn write_index(dir: &Path, w: &Written, ref_name: &str) -> Result<()> {
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": w.media_type,
            "digest": w.manifest.digest,
            "size": w.manifest.size,
            "annotations": { "org.opencontainers.image.ref.name": ref_name },
        }],
    });
    for (name, body) in [
        ("index.json", index.to_string()),
        (
            "oci-layout",
            r#"{"imageLayoutVersion":"1.0.0"}"#.to_string(),
        ),
    ] {
        let p = dir.join(name);
        std::fs::write(&p, body)
            .map_err(|e| ClientError::io(format!("writing {}", shown(&p)), e))?;
    }
    Ok(())
}

fn partial_name(target: &Path, what: &str) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    target.with_file_name(format!(".{name}.snapreg-{what}-{}", std::process::id()))
}

fn rename(from: &Path, to: &Path) -> Result<()> {
    std::fs::rename(from, to)
        .map_err(|e| ClientError::io(format!("renaming into {}", shown(to)), e))
}

/// Tars the layout (its entries at the archive's top, as `oci-archive:` expects).
fn tar_into(layout: &Path, archive: &Path) -> Result<()> {
    let partial = RemoveOnDrop::file(partial_name(archive, "partial"));
    let write = || -> std::io::Result<()> {
        let f = std::fs::File::create(&partial.path)?;
        let mut b = tar::Builder::new(std::io::BufWriter::new(f));
        b.mode(tar::HeaderMode::Deterministic);
        b.append_dir_all(".", layout)?;
        let mut w = b.into_inner()?;
        w.flush()?;
        w.get_ref().sync_all()
    };
    write().map_err(|e| ClientError::io(format!("writing {}", shown(archive)), e))?;
    rename(&partial.path, archive)?;
    partial.disarm();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_with_and_without_a_name() {
        assert_eq!(
            "oci:/tmp/x:v1".parse::<ExportTarget>().unwrap(),
            ExportTarget::Dir {
                path: "/tmp/x".into(),
                name: Some("v1".into())
            }
        );
        assert_eq!(
            "oci-archive:img.tar".parse::<ExportTarget>().unwrap(),
            ExportTarget::Archive {
                path: "img.tar".into(),
                name: None
            }
        );
        assert!("docker://x".parse::<ExportTarget>().is_err());
    }
}
