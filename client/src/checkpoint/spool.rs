//! `--spool DIR` (or `auto`, a directory in memory: route.rs): CRIU dumps to a local
//! directory first (the tasks are released at CRIU's speed), then the images are
//! pushed; they stay in DIR if the push fails. A failed dump leaves only CRIU's log.

use std::collections::HashMap;
use std::path::Path;
use std::process::Stdio;
use std::time::Instant;

use snapreg_proto::manifest::{Extent, File, Layer, LayerKind};

use super::plan::{build_manifest, dump_args};
use super::{DumpJob, Dumped};
use crate::chunker::ChunkerConfig;
use crate::criu;
use crate::error::{ClientError, Result};
use crate::push::Uploader;
use crate::written_files;

pub(super) async fn dump_then_push(job: &DumpJob<'_>, spool: &Path) -> Result<Dumped> {
    let DumpJob {
        remote,
        criu,
        reference,
        opts,
        ..
    } = *job;
    let dir = crate::work_dir::create_in(spool, &format!("ck-{}", opts.pid))?;
    let t = Instant::now();
    let status = tokio::process::Command::new(&criu.path)
        .args(dump_args(opts, &dir))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .await
        .map_err(|e| ClientError::Criu(format!("cannot run {}: {e}", criu.path.display())))?;
    let dump_seconds = t.elapsed().as_secs_f64();
    if !status.status.success() {
        // CRIU resumed the tasks: a partial image is of no use, and in memory it
        // costs memory. The log stays for the error.
        remove_images(&dir);
        return Err(criu::failure(
            "dump",
            &dir.join("dump.log"),
            &String::from_utf8_lossy(&status.stderr),
        ));
    }
    // The tasks are released; the push can take its time.
    let uploader = Uploader::begin(
        remote,
        &reference.repository,
        ChunkerConfig::default(),
        job.progress.clone(),
    )
    .await
    .map_err(|e| kept_note(e, &dir))?;
    let mut layer = Layer {
        kind: LayerKind::Process,
        name: None,
        rank: None,
        files: Vec::new(),
    };
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .map_err(|e| ClientError::io(format!("listing {}", dir.display()), e))?
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".img"))
        .collect();
    names.sort();
    for name in &names {
        let path = dir.join(name);
        let f = std::fs::File::open(&path)
            .map_err(|e| ClientError::io(format!("opening {}", path.display()), e))?;
        let aligned = uploader.config().is_page_aligned(name);
        let extents = match uploader.chunk_stream(f, aligned).await {
            Ok(x) => x,
            Err(e) => return Err(kept_note(uploader.abort().await.unwrap_or(e), &dir)),
        };
        layer.files.push(File {
            path: name.clone(),
            size: extents.iter().map(Extent::len).sum(),
            mode: 0o600,
            extents,
        });
    }
    let process_bytes = layer.files.iter().map(|f| f.size).sum();
    // CRIU killed the tasks: the files hold what they held at the freeze. Tasks that
    // kept running may have written since, past the sizes CRIU recorded.
    let kept_running = opts
        .leave_running
        .then_some("the tree kept running after a spooled dump, writing past the freeze");
    let written = written_files::capture(
        &uploader,
        &job.facts.written,
        &opts.capture_files,
        kept_running,
    )
    .await
    .map_err(|e| kept_note(e, &dir))?;
    let mut manifest = build_manifest(&uploader, vec![layer.clone()], opts, &job.facts);
    written.record(&mut manifest);
    // Where the CUDA checkpoint put device memory in the pages files, as a streamed
    // dump records it: a restore fetches those chunks first.
    if !job.facts.device_ranges.is_empty() {
        manifest.device_memory = crate::device_memory::manifest_segments(
            &job.facts.device_ranges,
            &read_pagemaps(&dir, &names).map_err(|e| kept_note(e, &dir))?,
        );
    }
    let digest = uploader
        .commit(&reference.repository, &manifest, vec![job.tag.clone()])
        .await
        .map_err(|e| kept_note(e, &dir))?;
    // Uploaded: the images go, the log and stats stay for the report.
    remove_images(&dir);
    Ok(Dumped {
        files: layer.files.len(),
        dir,
        dump_seconds,
        digest,
        process_bytes,
        weights_bytes: 0,
        written_files: written.report,
    })
}

/// The `pagemap-*.img` files among `names`, by name.
fn read_pagemaps(dir: &Path, names: &[String]) -> Result<HashMap<String, Vec<u8>>> {
    names
        .iter()
        .filter(|n| n.starts_with("pagemap-") && n.ends_with(".img"))
        .map(|n| {
            let path = dir.join(n);
            std::fs::read(&path)
                .map(|b| (n.clone(), b))
                .map_err(|e| ClientError::io(format!("reading {}", path.display()), e))
        })
        .collect()
}

/// Removes CRIU's `*.img` files from `dir`, leaving its log and stats.
fn remove_images(dir: &Path) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_name().to_string_lossy().ends_with(".img") {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

fn kept_note(e: ClientError, dir: &Path) -> ClientError {
    ClientError::Registry(format!(
        "{e}; the images are kept in {} — push them with `snapctl push {} REF`, then remove the directory (in /dev/shm it holds memory)",
        dir.display(),
        dir.display()
    ))
}
