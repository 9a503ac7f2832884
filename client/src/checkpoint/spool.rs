//! `--spool DIR` (or `auto`, a directory in memory: route.rs): CRIU dumps to a local
//! directory first (the tasks are released at CRIU's speed), then the images are
//! pushed; they stay in DIR if the push fails. A failed dump leaves only CRIU's log.
//! snapctl is CRIU's action script here too, but only to list the files the frozen
//! tree holds open at post-dump (the push comes after the tasks are gone).

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use snapreg_proto::manifest::{Extent, File, Layer, LayerKind};

use super::plan::{build_manifest, dump_args, OpenFiles};
use super::{DumpJob, Dumped};
use crate::action::ActionServer;
use crate::chunker::ChunkerConfig;
use crate::criu;
use crate::error::{ClientError, Result};
use crate::push::Uploader;
use crate::written_files;

pub(super) async fn dump_then_push(job: &DumpJob<'_>, spool: &Path) -> Result<Dumped> {
    let DumpJob {
        remote,
        reference,
        opts,
        ..
    } = *job;
    let dir = crate::work_dir::create_in(spool, &format!("ck-{}", opts.pid))?;
    let t = Instant::now();
    let (status, open) = dump_listing_open_files(job, &dir).await?;
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
    let open = open.ok_or_else(|| {
        let e = ClientError::Criu(
            "CRIU dumped without running its post-dump action, so the files the tree holds open were not listed".into(),
        );
        kept_note(e, &dir)
    })?;
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
    let written =
        written_files::capture(&uploader, &open.written, &opts.capture_files, kept_running)
            .await
            .map_err(|e| kept_note(e, &dir))?;
    let mut manifest = build_manifest(&uploader, vec![layer.clone()], opts, &job.facts, &open);
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

/// `criu dump` into `dir` with snapctl as its action script: at post-dump, with the
/// tasks frozen, the files they hold open are listed (none if CRIU failed before).
async fn dump_listing_open_files(
    job: &DumpJob<'_>,
    dir: &Path,
) -> Result<(std::process::Output, Option<OpenFiles>)> {
    // Not in the spool: DIR may be longer than a socket path may be (108 bytes).
    let socket_dir = crate::work_dir::create("ck-action")?;
    let dumped = dump_answering_actions(job, dir, &socket_dir.join("action.sock")).await;
    let _ = std::fs::remove_dir_all(&socket_dir);
    dumped
}

async fn dump_answering_actions(
    job: &DumpJob<'_>,
    dir: &Path,
    socket: &Path,
) -> Result<(std::process::Output, Option<OpenFiles>)> {
    let mut actions = ActionServer::bind(socket)
        .map_err(|e| ClientError::io(format!("binding {}", socket.display()), e))?;
    let criu = job.criu;
    let child = criu::with_action_script(criu, &dump_args(job.opts, dir), socket)?
        .spawn()
        .map_err(|e| ClientError::Criu(format!("cannot run {}: {e}", criu.path.display())))?;
    let exit = child.wait_with_output();
    tokio::pin!(exit);
    let mut open = None;
    // Bounded by CRIU's exit: it runs post-dump once, then kills the tasks and exits.
    loop {
        tokio::select! {
            out = &mut exit => {
                let out = out.map_err(|e| ClientError::io("waiting for CRIU", e))?;
                return Ok((out, open));
            }
            Some(req) = actions.next() => {
                if req.action == "post-dump" {
                    open = Some(OpenFiles::of_frozen_tree(&job.facts, job.opts.pid));
                }
                req.answer(Ok(())).await;
            }
        }
    }
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
