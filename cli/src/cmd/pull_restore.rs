use std::path::PathBuf;

use anyhow::Context;
use snapreg_client::written_files::{Action, PutBack};
use snapreg_client::{criu, restore};

use super::{parse_ref, Output};
use crate::global::Global;

#[derive(clap::Args)]
pub struct Args {
    reference: String,
    /// Return once the process runs (CRIU's -d); otherwise wait for it to exit.
    #[arg(long)]
    detach: bool,
    /// Restore despite compatibility refusals (each is printed).
    #[arg(long)]
    force: bool,
    /// Chunk fetches in flight ahead of CRIU, per file.
    #[arg(long, default_value_t = restore::DEFAULT_WINDOW)]
    window: usize,
    /// Memory the restore's chunk fetches may hold in flight, all together (default
    /// 64M: 32 fetches of the largest chunks): more lets more fetches run at once,
    /// which helps where each takes long (a distant or busy registry) and the link
    /// is not yet full.
    #[arg(long, env = "SNAPCTL_FETCH_MEMORY", value_name = "SIZE", value_parser = parse_fetch_memory)]
    fetch_memory: Option<u64>,
    /// Separated mode: fill the weights layer into this weights service while
    /// CRIU restores the process, then signal the worker to re-attach.
    #[arg(long, value_name = "SOCKET")]
    weights_service: Option<PathBuf>,
    /// Serve every zero page to CRIU (by default zero pages of private anonymous
    /// memory are left out of the pagemap: they read as zero anyway).
    #[arg(long)]
    keep_zero_pages: bool,
    /// Restore the snapshot's GPUs onto others of this host: OLD=NEW,… where each
    /// side is a device index (snapshot order / this host's order) or a GPU UUID.
    #[arg(long, value_name = "OLD=NEW,...")]
    gpu_map: Option<String>,
    /// Resume the process before all its memory is back: CRIU's lazy restore, with
    /// each page it touches (then the rest, in the background) served by snapctl
    /// from the registry and the node cache. snapctl returns once every page is in.
    /// Needs userfaultfd (`criu check --feature uffd-noncoop`).
    #[arg(long, conflicts_with = "fill_first")]
    lazy: bool,
    /// Put every page back before the process resumes, as the default does, but
    /// from many workers through userfaultfd (as --lazy fills) instead of CRIU's
    /// one reader; CRIU holds the tree until the last page is in. Needs what
    /// --lazy needs.
    #[arg(long)]
    fill_first: bool,
    /// Extra CRIU arguments, after `--`.
    #[arg(last = true)]
    criu_args: Vec<String>,
}

pub async fn run(g: &Global, a: &Args) -> anyhow::Result<Output> {
    let reference = parse_ref(&a.reference)?;
    let criu = criu::locate(g.criu.as_deref())?;
    let mut remotes = g.connect_all().await?;
    let remote = remotes.remove(0);
    let opts = restore::RestoreOptions {
        detach: a.detach,
        extra_args: a.criu_args.clone(),
        force: a.force,
        cache: g.open_cache()?,
        window: a.window,
        fetch_memory: a.fetch_memory.unwrap_or(restore::DEFAULT_FETCH_MEMORY),
        fallbacks: remotes,
        weights_service: a.weights_service.clone(),
        keep_zero_pages: a.keep_zero_pages,
        gpu_map: a.gpu_map.clone(),
        peers: g.peers()?,
        memory: match (a.lazy, a.fill_first) {
            (true, _) => restore::MemoryIn::Lazy,
            (_, true) => restore::MemoryIn::FillFirst,
            _ => restore::MemoryIn::Streamed,
        },
    };
    // A detached tree is orphaned when CRIU exits: snapctl reaps it meanwhile.
    restore::become_subreaper();
    let r = restore::pull_restore(&remote, &criu, &reference, &opts, g.progress("restore"))
        .await
        .with_context(|| format!("restoring {reference} from {}", remote.url()))?;
    Ok(Output {
        human: format!(
            "restored {} ({}){}: {} chunks fetched ({} from peers), {} from the node cache, {:.2}s{}{}",
            r.reference,
            r.digest,
            r.pid.map(|p| format!(" as PID {p}")).unwrap_or_default(),
            r.counters.chunks_transferred,
            r.counters.chunks_from_peers,
            r.counters.chunks_cached,
            r.seconds,
            r.lazy
                .as_ref()
                .map(|l| lazy_line(r.memory, r.restore_seconds, l))
                .unwrap_or_default(),
            put_back_lines(&r.written_files)
        ),
        json: serde_json::to_value(&r)?,
    })
}

/// What the lazy-pages daemon did, for `--lazy` and `--fill-first`.
fn lazy_line(memory: restore::MemoryIn, restore_seconds: f64, l: &restore::LazyReport) -> String {
    let device = l
        .device_memory_seconds
        .map(|s| {
            format!(
                "; device memory ({} MiB) first, in at {s:.2}s",
                l.device_memory_bytes >> 20
            )
        })
        .unwrap_or_default();
    if memory == restore::MemoryIn::FillFirst {
        return format!(
            "\nfill-first: {} MiB of pages filled by {} workers, all in at {:.2}s before the resume{device}",
            l.bytes_filled >> 20,
            l.fillers,
            l.fill_ended_seconds.unwrap_or(l.all_present_seconds),
        );
    }
    format!(
        "\nlazy: running after {restore_seconds:.2}s; {} MiB of pages filled by {} workers and {} MiB on {} page faults, the last at {:.2}s{device}",
        l.bytes_filled >> 20,
        l.fillers,
        l.bytes_on_fault >> 20,
        l.faults,
        l.all_present_seconds,
    )
}

/// One line per written file put back; a moved-aside file names where it went.
fn put_back_lines(files: &[PutBack]) -> String {
    files
        .iter()
        .map(|f| match (&f.action, &f.moved_aside_to) {
            (Action::MovedAside, Some(aside)) => format!(
                "\n  written file {}: the one in the way differed, moved aside to {aside}",
                f.path
            ),
            (Action::Created, _) => format!("\n  written file {}: created", f.path),
            _ => format!("\n  written file {}: already identical, kept", f.path),
        })
        .collect()
}

/// A size of at least one largest chunk (2M by default) and at most 4G.
fn parse_fetch_memory(s: &str) -> Result<u64, String> {
    let n = crate::global::parse_size(s)?;
    if !(2 << 20..=4 << 30).contains(&n) {
        return Err(format!("{s}: give between 2M and 4G"));
    }
    Ok(n)
}
