use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use snapreg_client::written_files::{CaptureLimits, CaptureReport};
use snapreg_client::{checkpoint, criu};

use super::{parse_ref, Output};
use crate::global::{parse_size, Global};

#[derive(clap::Args)]
pub struct Args {
    /// Root of the process tree.
    #[arg(long)]
    pid: u32,
    reference: String,
    /// Keep the process running after the dump.
    #[arg(long)]
    leave_running: bool,
    /// Dump established TCP connections (uses nftables for the network lock).
    #[arg(long)]
    tcp_established: bool,
    /// The process is attached to a terminal / session it does not lead.
    #[arg(long)]
    shell_job: bool,
    /// Dump into DIR (e.g. a tmpfs) first and upload after the process is released;
    /// `auto`: into --memory-spool-dir when the tree fits there and in free memory,
    /// else stream; `off`: stream (the tree stays frozen until the registry has every
    /// chunk). Default: `auto` with --cuda, `off` without.
    #[arg(long, value_name = "DIR|auto|off")]
    spool: Option<checkpoint::Spool>,
    /// The tmpfs `--spool auto` dumps into (in its `snapctl-spool` directory).
    #[arg(long, value_name = "DIR", env = "SNAPCTL_MEMORY_SPOOL_DIR", default_value = checkpoint::MEMORY_DIR)]
    memory_spool_dir: PathBuf,
    /// `--spool auto` dumps into a tmpfs of huge pages that snapctl mounts at
    /// `snapctl-spool-huge` in --memory-spool-dir. Faster on the H200 machine, slower
    /// on the 2-core test VM: measure a node with bench/spool/huge_tmpfs_ab.sh.
    #[arg(long, env = "SNAPCTL_SPOOL_HUGE_PAGES",
          value_parser = clap::builder::FalseyValueParser::new())]
    spool_huge_pages: bool,
    /// Abort the dump (and release the process) after this long without progress.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    stall_timeout: Duration,
    /// Checkpoint every CUDA process of the tree into host memory first (NVIDIA's
    /// checkpoint API; put back if anything fails or with --leave-running).
    #[arg(long)]
    cuda: bool,
    /// Separated mode: store the buffers the worker released to this weights
    /// service as the snapshot's weights layer (refused while it holds any).
    #[arg(long, value_name = "SOCKET")]
    weights_service: Option<PathBuf>,
    /// Leave the files the tree holds open for writing (logs, scratch files) out of
    /// the snapshot; a restore then refuses them where they differ.
    #[arg(long)]
    no_capture_files: bool,
    /// A file the tree writes that is bigger than this is left out (and named).
    #[arg(long, value_name = "BYTES", default_value = "16M", value_parser = parse_size)]
    capture_files_limit: u64,
    /// Files the tree writes past this many bytes in all are left out (and named).
    #[arg(long, value_name = "BYTES", default_value = "64M", value_parser = parse_size)]
    capture_files_total: u64,
    /// Extra CRIU arguments, after `--`.
    #[arg(last = true)]
    criu_args: Vec<String>,
}

pub async fn run(g: &Global, a: &Args) -> anyhow::Result<Output> {
    let reference = parse_ref(&a.reference)?;
    let criu = criu::locate(g.criu.as_deref())?;
    let remote = g.connect().await?;
    let opts = checkpoint::CheckpointOptions {
        pid: a.pid,
        leave_running: a.leave_running,
        tcp_established: a.tcp_established,
        shell_job: a.shell_job,
        extra_args: a.criu_args.clone(),
        spool: a.spool.clone().unwrap_or(if a.cuda {
            checkpoint::Spool::Auto
        } else {
            checkpoint::Spool::Off
        }),
        memory_spool_dir: a.memory_spool_dir.clone(),
        spool_huge_pages: a.spool_huge_pages,
        stall_timeout: a.stall_timeout,
        cuda: a.cuda,
        weights_service: a.weights_service.clone(),
        capture_files: CaptureLimits {
            enabled: !a.no_capture_files,
            per_file: a.capture_files_limit,
            total: a.capture_files_total,
        },
    };
    let r = checkpoint::checkpoint(&remote, &criu, &reference, &opts, g.progress("dump"))
        .await
        .with_context(|| {
            format!(
                "checkpointing PID {} into {} as {reference}",
                a.pid,
                remote.url()
            )
        })?;
    Ok(Output {
        human: format!(
            "checkpointed PID {} as {} ({}): {} files, {} bytes, {} chunks sent, frozen {} ms, {:.2}s\n  {}{}",
            r.pid,
            r.reference,
            r.digest,
            r.files,
            r.counters.bytes_total,
            r.counters.chunks_transferred,
            r.freeze_ms.map_or("?".into(), |f| format!("{f:.0}")),
            r.seconds,
            r.route.reason,
            written_lines(&r.written_files)
        ),
        json: serde_json::to_value(&r)?,
    })
}

/// One line per file the tree writes: captured, or left out and why.
fn written_lines(w: &CaptureReport) -> String {
    let captured = w
        .captured
        .iter()
        .map(|c| format!("\n  written file captured: {} ({} bytes)", c.path, c.size));
    let left_out = w.left_out.iter().map(|l| {
        format!(
            "\n  written file left out: {} ({}); a restore refuses it where it differs",
            l.path, l.reason
        )
    });
    captured.chain(left_out).collect()
}
