//! Export: a snapshot imported by [`super::push_archive`] written back as the
//! original (uncompressed) tar, from its skeleton ([`ArchiveIndex`]) and the pulled
//! files.

use std::collections::HashSet;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use snapreg_proto::manifest::{check_relative_path, LayerKind, Manifest};
use snapreg_proto::reference::{Reference, Target};

use super::tar::{padding_of, BLOCK};
use super::{ArchiveIndex, INDEX_FILE, INDEX_FORMAT, INDEX_LAYER, INDEX_VERSION};
use crate::error::{shown, ClientError, Result};
use crate::progress::Progress;
use crate::pull::{self, PullReport};
use crate::remote::Remote;
use crate::work_dir::RemoveOnDrop;

/// The skeleton is read back into memory on export.
const MAX_INDEX_BYTES: u64 = 256 << 20;

/// Writes the snapshot `reference` (pushed by [`super::push_archive`]) to `out` as an
/// uncompressed tar, byte-identical to the imported archive once decompressed.
///
/// The files are pulled (verified) into a temporary directory next to `out`, then
/// assembled into `.NAME.snapreg-partial`, which is renamed to `out` when whole: the
/// export needs about twice the archive's size free there while it runs.
pub async fn pull_archive(
    remote: &Remote,
    reference: &Reference,
    out: &Path,
    progress: Progress,
) -> Result<PullReport> {
    let started = Instant::now();
    let (name, parent) = output_name(out)?;
    let (digest, manifest) = pull::fetch_manifest(remote, reference).await?;
    let pulled = pulled_files(&manifest, reference)?;

    // Pin the digest: the tag may move while we pull.
    let pinned = Reference {
        repository: reference.repository.clone(),
        target: Target::Digest(digest),
    };
    let tmp = RemoveOnDrop::fresh_dir(
        parent.join(format!(".{name}.snapreg-export-{}", std::process::id())),
    )?;
    let report = pull::pull_dir(remote, &pinned, &tmp.path, None, progress.clone()).await?;

    let index_path = tmp.path.join(INDEX_LAYER).join(INDEX_FILE);
    let index = read_index(&index_path)?;
    let partial = RemoveOnDrop::file(parent.join(format!(".{name}.snapreg-partial")));
    let (tmp_dir, partial_path) = (tmp.path.clone(), partial.path.clone());
    let members = tokio::task::spawn_blocking(move || {
        let mut f = std::fs::File::create(&partial_path)
            .map_err(|e| ClientError::io(format!("creating {}", shown(&partial_path)), e))?;
        assemble(&index, &tmp_dir, &pulled, &mut f, &partial_path)?;
        f.sync_all()
            .map_err(|e| ClientError::io(format!("syncing {}", shown(&partial_path)), e))?;
        Ok::<_, ClientError>(index.members.len())
    })
    .await
    .map_err(|e| ClientError::io("archive writer thread", io::Error::other(e)))??;
    std::fs::rename(&partial.path, out)
        .map_err(|e| ClientError::io(format!("renaming into {}", shown(out)), e))?;
    partial.disarm();
    drop(tmp);
    Ok(PullReport {
        reference: reference.to_string(),
        digest: report.digest,
        files: members,
        counters: progress.counters.snapshot(),
        peers: report.peers,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The export's file name and the directory it goes in; refuses names that promise
/// compression and directories.
fn output_name(out: &Path) -> Result<(String, PathBuf)> {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| ClientError::Usage(format!("{} is not a file name", shown(out))))?;
    for ext in [".gz", ".tgz", ".zst", ".tzst", ".xz", ".bz2"] {
        if name.ends_with(ext) {
            return Err(ClientError::Usage(format!(
                "{} would hold an uncompressed tar: name it NAME.tar (Podman's restore --import \
                 reads plain tar; compress it afterwards if you need to)",
                shown(out)
            )));
        }
    }
    if out.is_dir() {
        return Err(ClientError::Usage(format!(
            "{} is a directory: give the archive's file name, e.g. {}",
            shown(out),
            shown(&out.join("checkpoint.tar"))
        )));
    }
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok((name, parent))
}

/// Every file a pull of `manifest` writes, relative to the pull directory; refuses a
/// snapshot that was not imported from an archive.
fn pulled_files(manifest: &Manifest, reference: &Reference) -> Result<HashSet<String>> {
    let index_layer = manifest
        .layers
        .iter()
        .find(|l| l.kind == LayerKind::Extra && l.name.as_deref() == Some(INDEX_LAYER));
    if !index_layer.is_some_and(|l| l.files.iter().any(|f| f.path == INDEX_FILE)) {
        return Err(ClientError::Usage(format!(
            "{reference} was not pushed from a Podman checkpoint archive (it has no \
             {INDEX_LAYER:?} layer): pull it as a directory with `snapctl pull {reference} DIR`"
        )));
    }
    Ok(manifest
        .layers
        .iter()
        .flat_map(|l| {
            l.files.iter().map(move |f| match &l.name {
                Some(n) => format!("{n}/{}", f.path),
                None => f.path.clone(),
            })
        })
        .collect())
}

fn read_index(path: &Path) -> Result<ArchiveIndex> {
    let bad = |why: String| {
        ClientError::Registry(format!(
            "the snapshot's archive index ({}) {why}; it cannot be exported — push the \
             archive again",
            shown(path)
        ))
    };
    let len = std::fs::metadata(path)
        .map_err(|e| ClientError::io(format!("reading {}", shown(path)), e))?
        .len();
    if len > MAX_INDEX_BYTES {
        return Err(bad(format!(
            "is {len} bytes, over the {MAX_INDEX_BYTES}-byte limit"
        )));
    }
    let bytes =
        std::fs::read(path).map_err(|e| ClientError::io(format!("reading {}", shown(path)), e))?;
    let index: ArchiveIndex =
        serde_json::from_slice(&bytes).map_err(|e| bad(format!("does not parse: {e}")))?;
    if index.format != INDEX_FORMAT || index.version != INDEX_VERSION {
        return Err(ClientError::Usage(format!(
            "the snapshot's archive index is {:?} version {}; this snapctl writes {INDEX_FORMAT:?} \
             version {INDEX_VERSION} only: use a newer snapctl",
            index.format, index.version
        )));
    }
    Ok(index)
}

/// Writes the archive described by `index`, taking member data from the files under
/// `dir` (a pull of the snapshot); `pulled` lists the files the pull wrote.
pub(super) fn assemble(
    index: &ArchiveIndex,
    dir: &Path,
    pulled: &HashSet<String>,
    out: &mut std::fs::File,
    out_path: &Path,
) -> Result<()> {
    let write_err = |e| ClientError::io(format!("writing {}", shown(out_path)), e);
    for m in &index.members {
        let header = unhex(&format!("header of {:?}", m.name), &m.header_hex)?;
        if header.is_empty() || header.len() % BLOCK != 0 {
            return Err(inconsistent(format!(
                "header of {:?} is {} bytes",
                m.name,
                header.len()
            )));
        }
        out.write_all(&header).map_err(write_err)?;
        let Some(rel) = &m.file else { continue };
        if check_relative_path(rel).is_err() || !pulled.contains(rel) {
            return Err(inconsistent(format!(
                "member {:?} names file {rel:?}, which the snapshot lacks",
                m.name
            )));
        }
        copy_member(m, &dir.join(rel), out, out_path)?;
        let pad = match &m.padding_hex {
            Some(h) => unhex(&format!("padding of {:?}", m.name), h)?,
            None => vec![0u8; padding_of(m.size)],
        };
        if pad.len() != padding_of(m.size) {
            return Err(inconsistent(format!(
                "padding of {:?} is {} bytes",
                m.name,
                pad.len()
            )));
        }
        out.write_all(&pad).map_err(write_err)?;
    }
    write_trailer(index, out, out_path)
}

fn inconsistent(why: String) -> ClientError {
    ClientError::Registry(format!(
        "the snapshot's archive index is inconsistent: {why}; push the archive again"
    ))
}

fn unhex(what: &str, h: &str) -> Result<Vec<u8>> {
    hex::decode(h).map_err(|e| inconsistent(format!("{what}: {e}")))
}

/// Appends the pulled file `path` holding member `m`'s data.
fn copy_member(
    m: &super::Member,
    path: &Path,
    out: &mut std::fs::File,
    out_path: &Path,
) -> Result<()> {
    // Our own copy: whatever mode the member had, we must read it.
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
    let mut f = std::fs::File::open(path)
        .map_err(|e| ClientError::io(format!("opening {}", shown(path)), e))?;
    let len = f
        .metadata()
        .map_err(|e| ClientError::io(format!("reading {}", shown(path)), e))?
        .len();
    if len != m.size {
        return Err(inconsistent(format!(
            "member {:?} has {} bytes, its file {len}",
            m.name, m.size
        )));
    }
    let copied = io::copy(&mut f, out).map_err(|e| {
        ClientError::io(
            format!("copying {} into {}", shown(path), shown(out_path)),
            e,
        )
    })?;
    if copied != m.size {
        return Err(inconsistent(format!(
            "{} changed while it was copied",
            shown(path)
        )));
    }
    Ok(())
}

/// The end-of-archive marker and whatever followed it: zeros, or the kept bytes.
fn write_trailer(index: &ArchiveIndex, out: &mut std::fs::File, out_path: &Path) -> Result<()> {
    let write_err = |e| ClientError::io(format!("writing {}", shown(out_path)), e);
    if let Some(h) = &index.trailer_hex {
        let t = unhex("trailer", h)?;
        if t.len() as u64 != index.trailer_len {
            return Err(inconsistent(format!(
                "trailer is {} bytes, not {}",
                t.len(),
                index.trailer_len
            )));
        }
        return out.write_all(&t).map_err(write_err);
    }
    let zeros = vec![0u8; 64 << 10];
    let mut left = index.trailer_len;
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        out.write_all(&zeros[..n]).map_err(write_err)?;
        left -= n as u64;
    }
    Ok(())
}
