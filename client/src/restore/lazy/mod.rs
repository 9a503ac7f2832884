//! `pull-restore --lazy`: the tree resumes before its memory is all back, with snapctl
//! as CRIU's lazy-pages daemon ([`crate::lazy_pages`] has the protocol). Around the
//! usual stages:
//!
//! ```text
//! plan ─▶ small files fetched; pagemaps rewritten (lazy runs PE_LAZY only); each
//!         task's missing pieces planned (lazy runs cut at its VMAs and chunks)
//!      ─▶ the daemon binds <dir>/lazy-pages.socket (daemon.rs)
//!      ─▶ criu restore --stream --lazy-pages: every eager byte streamed and verified;
//!         each task's userfaultfd reaches the daemon, which serves faults from here
//!      ─▶ "restore finished": the tree resumes          ◀── first answer possible here
//!      ─▶ the fill: many workers copy every missing piece in, from verified chunks
//!         (through the restore's scheduler), device memory first, while faults jump
//!         the queue; a CUDA image's CUDA restore starts once its device memory is in
//!      ─▶ each task's userfaultfd closed once it has every page ◀── all pages present
//! ```
//!
//! `pull-restore --fill-first` runs the same stages but holds CRIU's pre-resume
//! action script (after "restore finished", before the tasks run) until every task's
//! userfaultfd is closed: the tree resumes with all its memory, as a streamed restore
//! does, filled by many workers through `UFFDIO_COPY` instead of CRIU's one reader
//! (`read(2)` from a pipe into fresh pages), and snapctl is not needed once it runs.
//! No page faults are served: the tasks stay stopped until the last page is in.
//!
//! A page that cannot be served whole and verified would leave the tree reading
//! zeros: the tree is killed instead and the restore fails, naming why.

mod daemon;

use std::collections::HashMap;
use std::path::Path;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use prost::Message;

use super::plan::{file_bytes, Plan};
use crate::criu::Criu;
use crate::criu_image::{entries, MmEntry};
use crate::error::{ClientError, Result};
use crate::fetch::Chunks;
use crate::lazy_pages::missing::Missing;
use crate::lazy_pages::{self, LazyPlan};
use crate::progress::Progress;
use crate::zero_pages::{self, ZeroPagePlan};

pub(super) use daemon::{AllIn, LazyDaemon};

/// Small image files fetched at once before the daemon starts.
const SMALL_FILES_AT_ONCE: usize = 16;

/// What the lazy part of a restore did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct LazyReport {
    /// Bytes of pages left to the daemon instead of CRIU's pipe.
    pub lazy_bytes: u64,
    /// Of those, device memory of a CUDA image: filled first.
    pub device_memory_bytes: u64,
    /// From the command's start until the device memory was in (the CUDA restore
    /// waited for it); none without device memory.
    pub device_memory_seconds: Option<f64>,
    /// Bytes copied into the tree: by the fill, and for the tree's page faults.
    pub bytes_filled: u64,
    pub bytes_on_fault: u64,
    /// Page faults answered: with a page from the chunk stack, with a zero page (a
    /// page never dumped, or dropped since), or already in (only woken).
    pub faults: u64,
    pub zero_faults: u64,
    /// The tree's userfaultfd events while pages were missing.
    pub forks: u64,
    pub remaps: u64,
    pub removes: u64,
    pub unmaps: u64,
    /// Workers filling at once.
    pub fillers: usize,
    /// From the command's start until CRIU said "restore finished" and the fill began.
    pub fill_started_seconds: Option<f64>,
    /// From the command's start until the fill's last worker ended (every piece in,
    /// unless a fault put the last ones in).
    pub fill_ended_seconds: Option<f64>,
    /// The fill's workers together: seconds waiting for chunks (the fetch stack:
    /// node cache, registry, verification), and seconds copying them in. Which one
    /// dominates says what limits the fill.
    pub fill_fetch_seconds: f64,
    pub fill_copy_seconds: f64,
    /// The page faults together: seconds waiting for their chunks (the tree's
    /// thread waits that long; zero-page faults fetch nothing).
    pub fault_fetch_seconds: f64,
    /// The fill's claims of chunk data (each one chunk asked for once, its pieces
    /// copied from it), and the pieces they held.
    pub fill_claims: u64,
    pub fill_pieces: u64,
    /// From the command's start until every lazy page was in the tree.
    pub all_present_seconds: f64,
}

/// A lazy restore under way: its plan and its daemon.
pub(super) struct Lazy {
    pub plan: LazyPlan,
    pub daemon: LazyDaemon,
}

impl Lazy {
    /// Before the CUDA restore, which reads the device memory all at once: waits
    /// until the fill has put every device-memory piece in. If the daemon failed
    /// meanwhile, its error (the tree killed).
    pub async fn device_memory_in(mut self, started: std::time::Instant) -> Result<Lazy> {
        if self.daemon.first_in(started).await {
            return Ok(self);
        }
        match self.daemon.finish(&self.plan, started).await {
            Err(e) => Err(e),
            Ok(_) => Err(ClientError::Criu(
                "lazy restore: the device memory did not come back; restore again, or without --lazy and --fill-first".into(),
            )),
        }
    }
}

/// What the daemon serves: each task's missing pieces by its pid in the image, and
/// how many tasks the pstree holds (CRIU sends a word for each).
pub(super) struct Tree {
    pub missing: HashMap<u64, Missing>,
    pub tasks: usize,
}

/// Checks the kernel, plans, and starts the daemon on its socket: call before
/// `criu restore`, whose arguments then take `--lazy-pages`.
pub(super) async fn begin(
    criu: &Criu,
    plan: &Plan,
    zero_plan: &ZeroPagePlan,
    chunks: &Chunks,
    dir: &Path,
    progress: &Progress,
) -> Result<Lazy> {
    check_kernel(criu).await?;
    let (lazy, tree) = prepare(plan, zero_plan, chunks).await?;
    tracing::info!(
        bytes = lazy.lazy_bytes,
        "pages left to the lazy-pages daemon"
    );
    let daemon = LazyDaemon::start(dir, tree, chunks, progress)?;
    Ok(Lazy { plan: lazy, daemon })
}

/// Refuses a kernel without the userfaultfd features a lazy restore needs (without
/// them a child forked after the restore would read zeros where pages are missing).
async fn check_kernel(criu: &Criu) -> Result<()> {
    let out = tokio::process::Command::new(&criu.path)
        .args(["check", "--feature", "uffd-noncoop"])
        .output()
        .await
        .map_err(|e| ClientError::io("running criu check", e))?;
    if out.status.success() {
        return Ok(());
    }
    Err(ClientError::Usage(format!(
        "--lazy and --fill-first need userfaultfd with non-cooperative events, which this kernel or CRIU lacks ({}); restore without them",
        String::from_utf8_lossy(&out.stdout).trim()
    )))
}

/// Fetches the small files, plans which pages are lazy (over the zero-page plan's
/// pagemaps, when it rewrote them) and what each task will miss.
async fn prepare(
    plan: &Plan,
    zero_plan: &ZeroPagePlan,
    chunks: &Chunks,
) -> Result<(LazyPlan, Tree)> {
    // The small files, fetched together (CRIU waits on them).
    let small: Vec<(String, Bytes)> = futures::stream::iter(
        plan.files
            .iter()
            .filter(|(name, _)| !name.starts_with("pages-")),
    )
    .map(|(name, extents)| async move {
        Ok::<_, ClientError>((name.clone(), file_bytes(chunks, name, extents).await?))
    })
    .buffer_unordered(SMALL_FILES_AT_ONCE)
    .try_collect()
    .await?;
    let (mut pagemaps, mut device) = (HashMap::new(), lazy_pages::First::new());
    let (mut vmas, mut tasks) = (HashMap::new(), 0);
    for (name, bytes) in small {
        if lazy_pages::task_pagemap_pid(&name).is_some() {
            device_memory_addresses(plan, &bytes, &mut device);
            let served = zero_plan.pagemaps.get(&name).cloned().unwrap_or(bytes);
            pagemaps.insert(name, served);
        } else if let Some(pid) = mm_pid(&name) {
            vmas.insert(pid, vmas_of(&name, &bytes)?);
        } else if name == "pstree.img" {
            tasks = entries(&bytes).map_or(0, |(_, records)| records.len());
        }
    }
    let unfit = |why: String| {
        ClientError::Usage(format!(
            "this snapshot cannot be restored through userfaultfd: {why}; restore without --lazy and --fill-first"
        ))
    };
    let lazy = lazy_pages::plan(&plan.files, &pagemaps, &device).map_err(unfit)?;
    if tasks == 0 {
        return Err(unfit("its pstree.img lists no task".into()));
    }
    let missing = lazy
        .tasks
        .iter()
        .map(|(&pid, task)| {
            let extents = plan
                .files
                .get(&*task.pages_file)
                .map_or(&[][..], Vec::as_slice);
            let vmas = vmas.get(&pid).map_or(&[][..], Vec::as_slice);
            (pid, Missing::new(task, vmas, extents))
        })
        .collect();
    Ok((lazy, Tree { missing, tasks }))
}

/// The pid of a task's `mm-<pid>.img`.
fn mm_pid(name: &str) -> Option<u64> {
    name.strip_prefix("mm-")?.strip_suffix(".img")?.parse().ok()
}

/// The VMAs ([start, end)) an `mm-<pid>.img` lists.
fn vmas_of(name: &str, image: &[u8]) -> Result<Vec<(u64, u64)>> {
    let bad = |why: String| {
        ClientError::Criu(format!(
            "{name}: {why}; the snapshot is damaged, push it again"
        ))
    };
    let (_, records) = entries(image).ok_or_else(|| bad("not a CRIU image".into()))?;
    let mm = MmEntry::decode(*records.first().ok_or_else(|| bad("empty".into()))?)
        .map_err(|e| bad(e.to_string()))?;
    Ok(mm.vmas.iter().map(|v| (v.start, v.end)).collect())
}

/// The device memory of a CUDA image in the task whose original pagemap is
/// `pagemap`, as dump-time addresses by pages file: filled first. (Addresses, not
/// file offsets: the zero-page plan may have cut the pages file since.)
fn device_memory_addresses(plan: &Plan, pagemap: &[u8], device: &mut lazy_pages::First) {
    let Some((pages_id, runs)) = zero_pages::page_runs(pagemap) else {
        return;
    };
    let file = format!("pages-{pages_id}.img");
    for seg in plan
        .manifest
        .device_memory
        .iter()
        .filter(|s| s.file == file)
    {
        let (s, t) = (seg.offset, seg.offset + seg.len);
        for &(vaddr, len, off) in &runs {
            let (a, b) = (s.max(off), t.min(off + len));
            if a < b {
                device
                    .entry(file.clone())
                    .or_default()
                    .push((vaddr + (a - off), vaddr + (b - off)));
            }
        }
    }
}
