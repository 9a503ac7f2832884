//! CRIU's lazy restore with snapctl as the lazy-pages daemon: the restored tree runs
//! before its memory is all back; each missing page comes from the chunk stack when
//! the tree touches it, and the rest is filled by many workers at once (restore/lazy).
//!
//! Validated here with CRIU 4.2.1 (source read at tag v4.2: criu/uffd.c, cr-restore.c,
//! pagemap.c, mem.c), in CRIU-STREAM.md's manner. CRIU's own `criu lazy-pages` daemon
//! is not used: it copies pages in from one thread, at a third of what copies from two
//! threads reach (`snapreg-bench lazy-fill`, bench/RESULTS.md).
//!
//! ```text
//! snapctl (the daemon)                                  criu restore --stream --lazy-pages -W <dir>
//!  │ binds <dir>/lazy-pages.socket before CRIU starts     │
//!  │◀── connect, once, no retry ──────────────────────────│ at the restore's start
//!  │◀── per task of the pstree: i32 pid (as in the image),│ a zombie sends -pid and no descriptor
//!  │    then its userfaultfd by SCM_RIGHTS with one byte  │
//!  │  faults come from here on and are served at once:    │ each restorer registers the task's private
//!  │  CRIU's last steps touch the tree's memory before    │ anonymous VMAs for missing pages
//!  │  it says it is done                                  │
//!  │◀── u32 0x52535446 "restore finished" ────────────────│ the tree resumes; criu exits
//!  │  fills every lazy page (UFFDIO_COPY, many workers);  │
//!  │  closes each task's userfaultfd once it has them all │
//! ```
//!
//! The descriptors ask for `UFFD_FEATURE_EVENT_FORK | REMAP | REMOVE | UNMAP` (checked
//! with `criu check --feature uffd-noncoop` before a lazy restore): a task that forks,
//! moves, drops or unmaps memory waits until the daemon reads the event, and a copy
//! fails with EAGAIN while one is unread. [`missing`] keeps what is still missing
//! under those events; restore/lazy has the locking that keeps a copy from putting
//! back a page the tree has just dropped.
//!
//! Which pages are lazy: an ordinary `criu dump` marks the pages of private anonymous
//! VMAs `PE_LAZY|PE_PRESENT` (not mlocked memory, vdso, hugetlb, shared or file-backed
//! memory, nor the page under each thread's stack pointer). The restore skips
//! `PE_LAZY` entries **without reading their bytes from the pipe** (mem.c: it only
//! advances a counter), so under `--stream` their bytes must not be in the served
//! `pages-<id>.img`: [`plan`] rewrites each pagemap with lazy entries `PE_LAZY` only
//! (as `criu dump --lazy-pages` writes them) and names the byte ranges to leave out of
//! the pages file. The same rewritten pagemap goes to the daemon.
//!
//! Device memory of a CUDA image is lazy too, and *first*: NVIDIA's checkpoint keeps
//! it in private anonymous mappings of the process, which the CUDA restore (after
//! CRIU, by snapctl) reads all at once. Served through CRIU's pipe it went through
//! one reader at ~1 GB/s; served on fault it went 4 KiB at a time (CRIU's own daemon:
//! 13 s against 8.5 s eager). So the fill puts the device-memory pieces in before any
//! other, from every worker, and the CUDA restore waits until they are all in. It
//! reads the holes of those mappings too (pages the checkpoint never touched: the
//! medium preset's restore faulted on 5.8 GB of them, beside 1.0 GB of data), so the
//! fill maps the zero page over them first as well ([`missing`]); each was otherwise
//! a fault through the daemon. On the
//! H200 that fill ran at 0.9-1.2 GB/s from a cold node cache, no faster than CRIU's
//! reader; what limits it is not yet established (bench/RESULTS.md).
//!
//! If a lazy page cannot be served (a chunk that does not verify, a registry gone),
//! closing the descriptors would have the kernel hand the tree zero pages: the restore
//! kills the tree instead (restore/lazy).

use std::collections::HashMap;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;
use snapreg_proto::manifest::Extent;

use crate::criu_image::{entries, page_count, put_entry, PagemapEntry, PagemapHead};

pub mod missing;
pub mod socket;

pub const PAGE: u64 = 4096;
/// Pagemap entry flags (criu/include/pagemap.h).
const PE_PARENT: u32 = 1 << 0;
const PE_LAZY: u32 = 1 << 1;
const PE_PRESENT: u32 = 1 << 2;

/// One lazy pagemap entry: its pages at dump-time `vaddr`, at `offset` in the task's
/// pages file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LazyRun {
    pub vaddr: u64,
    pub pages: u64,
    pub offset: u64,
}

/// The lazy runs of one task (by address) and its pages file.
#[derive(Clone, Debug)]
pub struct LazyTask {
    pub pages_file: Arc<str>,
    pub runs: Vec<LazyRun>,
    /// Address ranges of the runs the fill puts in first (device memory).
    pub first: Vec<(u64, u64)>,
}

/// What a lazy restore serves differently.
#[derive(Debug, Default)]
pub struct LazyPlan {
    /// Rewritten `pagemap-<pid>.img` images, for CRIU's restore and for the daemon.
    pub pagemaps: HashMap<String, Bytes>,
    /// Byte ranges of each pages file left out of the stream (the lazy runs), sorted.
    pub left_out: HashMap<String, Vec<(u64, u64)>>,
    /// Lazy runs by the task's pid in the image.
    pub tasks: HashMap<u64, LazyTask>,
    /// Bytes the lazy-pages daemon puts in instead of the pipe.
    pub lazy_bytes: u64,
    /// Of those, bytes of device memory (filled first).
    pub first_bytes: u64,
    /// Bytes of zero pages in lazy runs left out of the pagemap: never served, the
    /// daemon maps a zero page where the tree touches one.
    pub zero_bytes_left_out: u64,
}

impl LazyPlan {
    /// The chunks whose every byte lies in a lazy run: the daemon fetches them (and so
    /// puts them in the node cache), nothing else needs to read them ahead.
    pub fn lazy_only_chunks(
        &self,
        files: &HashMap<String, Vec<Extent>>,
    ) -> std::collections::HashSet<snapreg_proto::Digest> {
        let mut out = std::collections::HashSet::new();
        for (file, ranges) in &self.left_out {
            let mut at = 0;
            for e in files.get(file).map_or(&[][..], Vec::as_slice) {
                let (s, t) = (at, at + e.len());
                at = t;
                if let Extent::Chunk { chunk, .. } = e {
                    let i = ranges.partition_point(|&(_, end)| end <= s);
                    if ranges.get(i).is_some_and(|&(a, b)| a <= s && t <= b) {
                        out.insert(*chunk);
                    }
                }
            }
        }
        out
    }
}

/// Address ranges (at dump time) of each pages file's task that the fill puts in
/// first (device memory).
pub type First = HashMap<String, Vec<(u64, u64)>>;

/// Plans the lazy restore of an image whose files are `files`, given the bytes of its
/// `pagemap-<pid>.img` files (`pagemaps`). Refuses, saying why, an image it cannot
/// serve lazily (parent pages, a pagemap that disagrees with its pages file).
pub fn plan(
    files: &HashMap<String, Vec<Extent>>,
    pagemaps: &HashMap<String, Bytes>,
    first: &First,
) -> Result<LazyPlan, String> {
    let mut out = LazyPlan::default();
    // A child's private memory may be restored copy-on-write from its parent's, where
    // a page left absent would show the parent's bytes (zero_pages.rs): zero runs
    // stay in the pagemap of trees of more than one task.
    let tasks = pagemaps
        .keys()
        .filter(|n| task_pagemap_pid(n).is_some())
        .count();
    for (name, image) in pagemaps {
        let Some(pid) = task_pagemap_pid(name) else {
            continue;
        };
        let task = plan_task(name, image, files, first, tasks == 1)?;
        out.lazy_bytes += task.runs.iter().map(|r| r.pages * PAGE).sum::<u64>();
        out.first_bytes += task.first.iter().map(|(s, t)| t - s).sum::<u64>();
        out.zero_bytes_left_out += task.zero_bytes;
        out.left_out
            .insert(task.runs_file.to_string(), task.left_out);
        out.pagemaps.insert(name.clone(), task.pagemap);
        out.tasks.insert(
            pid,
            LazyTask {
                pages_file: task.runs_file,
                runs: task.runs,
                first: task.first,
            },
        );
    }
    Ok(out)
}

/// The pid of a task's `pagemap-<pid>.img` (not `pagemap-shmem-*`, never lazy).
pub fn task_pagemap_pid(name: &str) -> Option<u64> {
    name.strip_prefix("pagemap-")?
        .strip_suffix(".img")?
        .parse()
        .ok()
}

struct TaskPlan {
    pagemap: Bytes,
    runs_file: Arc<str>,
    runs: Vec<LazyRun>,
    first: Vec<(u64, u64)>,
    /// Byte ranges of the pages file CRIU's restore does not read (lazy entries).
    left_out: Vec<(u64, u64)>,
    zero_bytes: u64,
}

/// Page-aligned zero extents of a pages file, as byte ranges.
fn zero_ranges(extents: &[Extent]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut off = 0;
    for e in extents {
        if let Extent::Zero { zero } = *e {
            if off % PAGE == 0 && zero % PAGE == 0 {
                out.push((off, off + zero));
            }
        }
        off += e.len();
    }
    out
}

fn plan_task(
    name: &str,
    image: &[u8],
    files: &HashMap<String, Vec<Extent>>,
    first: &First,
    drop_zeros: bool,
) -> Result<TaskPlan, String> {
    let (magics, records) = entries(image).ok_or(format!("{name}: not a CRIU image"))?;
    let head_bytes = *records.first().ok_or(format!("{name}: empty"))?;
    let head = PagemapHead::decode(head_bytes).map_err(|e| format!("{name}: head: {e}"))?;
    let pages_file = format!("pages-{}.img", head.pages_id);
    let extents = files.get(&pages_file).map(Vec::as_slice).unwrap_or(&[]);
    let file_len: u64 = extents.iter().map(Extent::len).sum();
    let zeros = if drop_zeros {
        zero_ranges(extents)
    } else {
        Vec::new()
    };
    let device = first.get(&pages_file).map(Vec::as_slice).unwrap_or(&[]);
    let mut pagemap = BytesMut::new();
    pagemap.put_slice(magics);
    pagemap.put_u32_le(head_bytes.len() as u32);
    pagemap.put_slice(head_bytes);
    let (mut runs, mut first_runs, mut offset) = (Vec::new(), Vec::new(), 0u64);
    let (mut left_out, mut zero_bytes) = (Vec::new(), 0u64);
    for raw in &records[1..] {
        let mut e = PagemapEntry::decode(*raw).map_err(|e| format!("{name}: entry: {e}"))?;
        let flags = e.flags.unwrap_or(PE_PRESENT);
        if e.in_parent == Some(true) || flags & PE_PARENT != 0 {
            return Err(format!("{name}: pages in a parent image"));
        }
        let pages = page_count(&e);
        let len = pages
            .checked_mul(PAGE)
            .ok_or(format!("{name}: entry of {pages} pages"))?;
        if flags & PE_PRESENT == 0 {
            put_entry(&mut pagemap, &e, e.vaddr, pages);
            continue;
        }
        let (start, end) = (offset, offset + len);
        offset = end;
        if flags & PE_LAZY == 0 {
            e.flags = Some(flags & !PE_LAZY);
            put_entry(&mut pagemap, &e, e.vaddr, pages);
            continue;
        }
        // Lazy: out of CRIU's stream, PE_LAZY only, zero runs (if dropped) absent.
        left_out.push((start, end));
        e.flags = Some(PE_LAZY);
        let kept = crate::device_memory::new_ranges(&zeros, &[(start, end)]);
        zero_bytes += len - kept.iter().map(|(s, t)| t - s).sum::<u64>();
        let is_device = device
            .iter()
            .any(|&(s, t)| s < e.vaddr + len && e.vaddr < t);
        for (s, t) in kept {
            let (vaddr, pages) = (e.vaddr + (s - start), (t - s) / PAGE);
            put_entry(&mut pagemap, &e, vaddr, pages);
            if is_device {
                first_runs.push((vaddr, vaddr + pages * PAGE));
            }
            runs.push(LazyRun {
                vaddr,
                pages,
                offset: s,
            });
        }
    }
    if offset != file_len {
        return Err(format!(
            "{name} describes {offset} bytes of pages, {pages_file} holds {file_len}"
        ));
    }
    runs.sort_by_key(|r| r.vaddr);
    first_runs.sort_unstable();
    Ok(TaskPlan {
        pagemap: pagemap.freeze(),
        runs_file: pages_file.into(),
        runs,
        first: first_runs,
        left_out,
        zero_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::criu_image::entries;
    use snapreg_proto::Digest;

    fn pagemap(pages_id: u32, list: &[(u64, u64, u32)]) -> Bytes {
        crate::zero_pages::test_pagemap_with_flags(pages_id, list)
    }

    fn flags_of(image: &[u8]) -> Vec<u32> {
        let (_, recs) = entries(image).unwrap();
        recs[1..]
            .iter()
            .map(|r| PagemapEntry::decode(*r).unwrap().flags.unwrap())
            .collect()
    }

    #[test]
    fn lazy_entries_lose_present_and_their_bytes_leave_the_stream() {
        // Three entries: 2 pages eager (stack), 4 lazy, 3 lazy holding device memory
        // (lazy too, and first).
        let pm = pagemap(
            1,
            &[
                (0x7000_0000, 2, PE_PRESENT),
                (0x1000_0000, 4, PE_PRESENT | PE_LAZY),
                (0x2000_0000, 3, PE_PRESENT | PE_LAZY),
            ],
        );
        let files = HashMap::from([(
            "pages-1.img".to_string(),
            vec![Extent::Chunk {
                chunk: Digest::of(b"x"),
                len: 9 * PAGE,
            }],
        )]);
        let device = HashMap::from([(
            "pages-1.img".to_string(),
            vec![(0x2000_0000 + PAGE, 0x2000_0000 + PAGE + 1)],
        )]);
        let plan = plan(
            &files,
            &HashMap::from([("pagemap-42.img".to_string(), pm)]),
            &device,
        )
        .unwrap();
        assert_eq!(
            flags_of(&plan.pagemaps["pagemap-42.img"]),
            vec![PE_PRESENT, PE_LAZY, PE_LAZY]
        );
        assert_eq!(
            plan.left_out["pages-1.img"],
            vec![(2 * PAGE, 6 * PAGE), (6 * PAGE, 9 * PAGE)]
        );
        assert_eq!((plan.lazy_bytes, plan.first_bytes), (7 * PAGE, 3 * PAGE));
        let task = &plan.tasks[&42];
        assert_eq!(
            task.runs,
            vec![
                LazyRun {
                    vaddr: 0x1000_0000,
                    pages: 4,
                    offset: 2 * PAGE
                },
                LazyRun {
                    vaddr: 0x2000_0000,
                    pages: 3,
                    offset: 6 * PAGE
                }
            ]
        );
        // The whole device-memory entry is filled first.
        assert_eq!(task.first, vec![(0x2000_0000, 0x2000_0000 + 3 * PAGE)]);
    }

    #[test]
    fn only_chunks_wholly_inside_lazy_runs_are_lazy_only() {
        let c = |i: u8| Extent::Chunk {
            chunk: Digest::of(&[i]),
            len: 2 * PAGE,
        };
        let files = HashMap::from([("pages-1.img".to_string(), vec![c(1), c(2), c(3)])]);
        let plan = LazyPlan {
            left_out: HashMap::from([("pages-1.img".to_string(), vec![(PAGE, 4 * PAGE)])]),
            ..LazyPlan::default()
        };
        // Chunk 1 straddles the run's start, chunk 3 lies past its end.
        assert_eq!(
            plan.lazy_only_chunks(&files),
            std::collections::HashSet::from([Digest::of(&[2])])
        );
    }

    #[test]
    fn zero_runs_of_a_lone_task_leave_the_lazy_pagemap() {
        // One lazy entry of 6 pages whose pages 2..4 are a zero extent.
        let pm = pagemap(3, &[(0x4000_0000, 6, PE_PRESENT | PE_LAZY)]);
        let c = |i: u8, pages| Extent::Chunk {
            chunk: Digest::of(&[i]),
            len: pages * PAGE,
        };
        let files = HashMap::from([(
            "pages-3.img".to_string(),
            vec![c(1, 2), Extent::Zero { zero: 2 * PAGE }, c(2, 2)],
        )]);
        let pagemaps = HashMap::from([("pagemap-9.img".to_string(), pm)]);
        let planned = plan(&files, &pagemaps, &HashMap::new()).unwrap();
        let runs = &planned.tasks[&9].runs;
        assert_eq!(
            runs,
            &vec![
                LazyRun {
                    vaddr: 0x4000_0000,
                    pages: 2,
                    offset: 0
                },
                LazyRun {
                    vaddr: 0x4000_0000 + 4 * PAGE,
                    pages: 2,
                    offset: 4 * PAGE
                },
            ]
        );
        assert_eq!(planned.left_out["pages-3.img"], vec![(0, 6 * PAGE)]);
        assert_eq!(
            (planned.lazy_bytes, planned.zero_bytes_left_out),
            (4 * PAGE, 2 * PAGE)
        );
        assert_eq!(
            flags_of(&planned.pagemaps["pagemap-9.img"]),
            vec![PE_LAZY, PE_LAZY]
        );
        // A second task: the zeros stay (served), as one run.
        let mut two = pagemaps.clone();
        two.insert(
            "pagemap-10.img".into(),
            pagemap(3, &[(0x4000_0000, 6, PE_PRESENT | PE_LAZY)]),
        );
        let planned = plan(&files, &two, &HashMap::new()).unwrap();
        assert_eq!(planned.tasks[&9].runs.len(), 1);
        assert_eq!(planned.zero_bytes_left_out, 0);
    }

    #[test]
    fn a_pagemap_that_disagrees_with_its_pages_file_is_refused() {
        let pm = pagemap(1, &[(0x1000, 4, PE_PRESENT | PE_LAZY)]);
        let files = HashMap::from([(
            "pages-1.img".to_string(),
            vec![Extent::Zero { zero: 3 * PAGE }],
        )]);
        let e = plan(
            &files,
            &HashMap::from([("pagemap-7.img".to_string(), pm)]),
            &HashMap::new(),
        )
        .unwrap_err();
        assert!(
            e.contains("pagemap-7.img") && e.contains("pages-1.img"),
            "{e}"
        );
    }
}
