//! Manifests: served (a pushed one byte for byte; a native snapshot through its
//! view), pushed (checked against the blobs it names, stored as a snapshot of the
//! repository), deleted.
//!
//! A pushed image manifest becomes a snapshot whose `oci` layer holds the manifest
//! and a copy of every blob file it names (recipes, not bytes: the chunks are
//! shared), so GC and replication keep the image whole. When one of its layers is a
//! checkpoint archive, the snapshot also takes that layer's native layers and CRIU
//! metadata (ingest.rs): `snapctl pull-restore R:T` restores what `skopeo copy`
//! pushed to `R:T`.

use std::collections::BTreeSet;

use snapreg_client::chunker::ChunkerConfig;
use snapreg_client::progress::Progress;
use snapreg_client::push::Uploader;
use snapreg_client::remote::Remote;
use snapreg_proto::manifest::{File, LayerKind};

use crate::content;
use crate::digest::OciDigest;
use crate::error::{OciError, Result};
use crate::media::{self, Descriptor};
use crate::names::Reference;
use crate::store::{self, annotations, digest_repo, digest_tag, Holder};
use crate::view;

/// A manifest as served.
pub struct Served {
    pub bytes: Vec<u8>,
    pub digest: OciDigest,
    pub media_type: String,
}

/// The manifest `reference` names in `repo`, read as the caller (`remote`); a
/// native snapshot's view is recorded, the first time, by `recorder`.
pub async fn get(
    remote: &Remote,
    recorder: &Remote,
    repo: &str,
    reference: &Reference,
) -> Result<Served> {
    let unknown = || OciError::manifest_unknown(format!("{repo}:{reference}"));
    let holder = match reference {
        Reference::Digest(d) => store::holder(remote, repo, d)
            .await?
            .filter(|h| h.oci_manifest().is_some_and(|(_, md, _)| md == *d))
            .ok_or_else(unknown)?,
        Reference::Tag(t) => {
            let Some((digest, bytes)) = store::tagged_bytes(remote, repo, t).await? else {
                return Err(unknown());
            };
            let native = Holder {
                digest,
                manifest: snapreg_proto::manifest::Manifest::decode(&bytes)
                    .map_err(|e| OciError::internal(format!("snapshot {digest}: {e}")))?,
            };
            match native.oci_manifest() {
                Some(_) => native,
                None => view::view_of(remote, recorder, repo, &native, &bytes).await?,
            }
        }
    };
    read(remote, &holder).await
}

/// The OCI manifest a holder holds, checked against its recorded digest.
async fn read(remote: &Remote, holder: &Holder) -> Result<Served> {
    let (file, digest, media_type) = holder.oci_manifest().ok_or_else(|| {
        OciError::internal(format!("snapshot {} holds no OCI manifest", holder.digest))
    })?;
    let bytes = content::read_small(remote, file, media::MAX_MANIFEST_BYTES as u64).await?;
    if OciDigest::of(&bytes) != digest {
        return Err(OciError::internal(format!(
            "the manifest held by snapshot {} does not hash to {digest}",
            holder.digest
        )));
    }
    Ok(Served {
        bytes,
        digest,
        media_type,
    })
}

/// Stores a pushed manifest under `reference`; returns its digest.
pub async fn put(
    remote: &Remote,
    repo: &str,
    reference: &Reference,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> Result<OciDigest> {
    let digest = OciDigest::of(&body);
    if let Reference::Digest(d) = reference {
        if *d != digest {
            return Err(OciError::digest_invalid(format!(
                "the manifest hashes to {digest}, not {d} as the URL says"
            )));
        }
    }
    let parsed = media::parse(&body, content_type)?;
    let mut files = Vec::new();
    let mut checkpoint: Option<Holder> = None;
    let mut not_checkpoint = Vec::new();
    let mut seen = BTreeSet::new();
    for d in &parsed.blobs {
        let (holder, file) = referenced_blob(remote, repo, d).await?;
        if let Some(why) = holder.manifest.annotations.get(annotations::NOT_CHECKPOINT) {
            if d.field != "config" {
                not_checkpoint.push(format!("{} ({}): {why}", d.field, d.digest));
            }
        }
        if seen.insert(d.digest) {
            files.push(File {
                path: store::blob_path(&d.digest),
                ..file
            });
        }
        if checkpoint.is_none()
            && holder
                .manifest
                .layers
                .iter()
                .any(|l| l.kind == LayerKind::Process)
        {
            checkpoint = Some(holder);
        }
    }
    if let (Some(key), None) = (parsed.checkpoint_annotation, &checkpoint) {
        return Err(OciError::manifest_invalid(format!(
            "the manifest says it is a checkpoint image ({key}), but no layer is a checkpoint \
             archive: {}",
            not_checkpoint.join("; ")
        )));
    }
    for d in &parsed.manifests {
        let found = store::holder(remote, repo, &d.digest)
            .await?
            .is_some_and(|h| h.oci_manifest().is_some_and(|(_, md, _)| md == d.digest));
        if !found {
            return Err(OciError::new(
                axum::http::StatusCode::BAD_REQUEST,
                "MANIFEST_BLOB_UNKNOWN",
                format!(
                    "{}: manifest {} is not in {repo}; push it first",
                    d.field, d.digest
                ),
            ));
        }
    }
    let cfg = checkpoint
        .as_ref()
        .map_or_else(ChunkerConfig::default, |h| {
            ChunkerConfig::from_params(&h.manifest.chunker)
        });
    let target = match reference {
        Reference::Tag(_) => repo.to_string(),
        Reference::Digest(_) => digest_repo(repo),
    };
    let uploader = Uploader::begin(remote, &target, cfg, Progress::hidden()).await?;
    let body_len = body.len() as u64;
    let extents = match store::chunk_bytes(&uploader, body).await {
        Ok(x) => x,
        Err(e) => {
            let upload = uploader.abort().await;
            return Err(upload.map(OciError::from).unwrap_or(e));
        }
    };
    files.insert(
        0,
        store::oci_file(store::MANIFEST_FILE.into(), body_len, extents),
    );
    let mut layers = checkpoint
        .as_ref()
        .map(|h| {
            h.manifest
                .layers
                .iter()
                .filter(|l| store::oci_layer(&h.manifest).is_none_or(|o| !std::ptr::eq(o, *l)))
                .cloned()
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    layers.push(store::new_oci_layer(files));
    let mut manifest = uploader.new_manifest(layers, checkpoint.is_some());
    if let Some(h) = checkpoint {
        manifest.criu = h.manifest.criu;
        manifest.compat = h.manifest.compat;
        manifest.device_memory = h.manifest.device_memory;
        manifest.ranks = h.manifest.ranks;
        manifest.annotations = h.manifest.annotations;
    }
    let a = &mut manifest.annotations;
    a.insert(annotations::MANIFEST_DIGEST.into(), digest.to_string());
    a.insert(annotations::MEDIA_TYPE.into(), parsed.media_type.clone());
    let tags = match reference {
        Reference::Tag(t) => vec![t.clone()],
        Reference::Digest(d) => vec![digest_tag(d)],
    };
    let snapshot = uploader.commit(&target, &manifest, tags).await?;
    if let Reference::Tag(_) = reference {
        remote
            .set_tag(&digest_repo(repo), &digest_tag(&digest), &snapshot)
            .await?;
    }
    // The blobs' tags move to the image, which holds them all: the snapshots their
    // uploads made are left to GC, and deleting the image frees what only it used.
    for b in &seen {
        remote
            .set_tag(&digest_repo(repo), &digest_tag(b), &snapshot)
            .await?;
    }
    tracing::info!(repository = %repo, %reference, manifest = %digest, %snapshot, "OCI manifest stored");
    Ok(digest)
}

/// The blob a manifest descriptor names, checked against the descriptor's size.
async fn referenced_blob(remote: &Remote, repo: &str, d: &Descriptor) -> Result<(Holder, File)> {
    let unknown = || {
        OciError::new(
            axum::http::StatusCode::BAD_REQUEST,
            "MANIFEST_BLOB_UNKNOWN",
            format!(
                "{}: blob {} is not in {repo}; push it first",
                d.field, d.digest
            ),
        )
    };
    let holder = store::holder(remote, repo, &d.digest)
        .await?
        .ok_or_else(unknown)?;
    let file = holder.blob(&d.digest).cloned().ok_or_else(unknown)?;
    if file.size != d.size {
        return Err(OciError::manifest_invalid(format!(
            "{}.size says {} bytes, but blob {} has {}",
            d.field, d.size, d.digest, file.size
        )));
    }
    Ok((holder, file))
}

/// Deletes a tag, or a manifest by digest with every tag of `repo` that names it.
pub async fn delete(remote: &Remote, repo: &str, reference: &Reference) -> Result<()> {
    let unknown = || OciError::manifest_unknown(format!("{repo}:{reference}"));
    match reference {
        Reference::Tag(t) => {
            remote
                .delete_tag(repo, t)
                .await
                .map_err(|e| OciError::from_client(e, unknown))?;
        }
        Reference::Digest(d) => {
            let holder = store::holder(remote, repo, d)
                .await?
                .filter(|h| h.oci_manifest().is_some_and(|(_, md, _)| md == *d))
                .ok_or_else(unknown)?;
            // Every tag whose snapshot holds this manifest (the same manifest pushed
            // under several tags may sit in several snapshots), and a view's native
            // snapshot, whose manifest this is.
            let mut names: std::collections::HashMap<String, bool> = Default::default();
            names.insert(holder.digest.to_string(), true);
            if let Some(n) = holder
                .manifest
                .annotations
                .get(snapreg_client::oci_image::SNAPSHOT_ANNOTATION)
            {
                names.insert(n.clone(), true);
            }
            for t in remote.list_tags(repo).await? {
                let names_it = match names.get(&t.digest) {
                    Some(&known) => known,
                    None => {
                        let holds = store::tagged(remote, repo, &t.digest)
                            .await?
                            .is_some_and(|h| h.oci_manifest().is_some_and(|(_, md, _)| md == *d));
                        names.insert(t.digest.clone(), holds);
                        holds
                    }
                };
                if names_it {
                    remote.delete_tag(repo, &t.tag).await?;
                }
            }
            remote
                .delete_tag(&digest_repo(repo), &digest_tag(d))
                .await
                .map_err(|e| OciError::from_client(e, unknown))?;
            let gone: Vec<String> = names
                .into_iter()
                .filter_map(|(n, holds)| holds.then_some(n))
                .collect();
            release_blobs(remote, repo, &holder, &gone).await?;
        }
    }
    Ok(())
}

/// After the snapshots in `gone` lost their tags: each blob tag of `holder`'s that
/// names one of them moves to another snapshot of the repository that holds the
/// blob, or goes (and GC frees what nothing else uses).
async fn release_blobs(
    remote: &Remote,
    repo: &str,
    holder: &Holder,
    gone: &[String],
) -> Result<()> {
    let by_digest = digest_repo(repo);
    let tags = remote.list_tags(&by_digest).await?;
    let mut snapshots: std::collections::HashMap<String, Option<Holder>> = Default::default();
    let blobs = holder
        .oci_layer()
        .map(|l| {
            l.files
                .iter()
                .filter_map(|f| f.path.strip_prefix("blobs/sha256/"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    for hex in blobs {
        let Ok(d) = format!("sha256:{hex}").parse::<OciDigest>() else {
            continue;
        };
        let tag = digest_tag(&d);
        if !tags
            .iter()
            .any(|t| t.tag == tag && gone.contains(&t.digest))
        {
            continue;
        }
        let mut other = None;
        for t in tags.iter().filter(|t| !gone.contains(&t.digest)) {
            if !snapshots.contains_key(&t.digest) {
                let h = store::tagged(remote, &by_digest, &t.digest).await?;
                snapshots.insert(t.digest.clone(), h);
            }
            if snapshots[&t.digest]
                .as_ref()
                .is_some_and(|h| h.blob(&d).is_some())
            {
                other = snapshots[&t.digest].as_ref().map(|h| h.digest);
                break;
            }
        }
        match other {
            Some(s) => remote.set_tag(&by_digest, &tag, &s).await?,
            None => {
                remote.delete_tag(&by_digest, &tag).await?;
            }
        }
    }
    Ok(())
}
