//! CRIU's lazy restore with snapctl as the page server: the restored tree runs before
//! its memory is all back, and each missing page comes from the chunk stack when the
//! tree touches it, or sooner, from CRIU's background fill.
//!
//! Validated here with CRIU 4.2.1 (source read at tag v4.2: criu/uffd.c, page-xfer.c,
//! pagemap.c, mem.c), in CRIU-STREAM.md's manner:
//!
//! ```text
//! snapctl                       criu lazy-pages -D <dir>/lazy -W <dir>            criu restore --stream --lazy-pages -D <dir>
//!  │ writes inventory, pstree,   │ reads inventory + pstree; listens on            │
//!  │ ids, mm, pagemap (rewritten)│ <dir>/lazy-pages.socket; "ready" on --status-fd │
//!  │ into <dir>/lazy             │◀── per task: i32 pid + its userfaultfd (SCM) ───│ connects once, no retry:
//!  │                             │◀── u32 0x52535446 "restore finished" ───────────│ the daemon must listen first
//!  │◀─ PS_IOV_GET {pid, vaddr, n}│ (only after every uffd arrived)                 │ tree resumes, criu exits
//!  │── header + n × 4 KiB ──────▶│ UFFDIO_COPY at the run-time address             │
//!  │◀─ PS_IOV_FORCE_CLOSE ───────│ every lazy page copied                          │
//!  │── i32 0 ───────────────────▶│ exits 0
//! ```
//!
//! Page-server records (`struct page_server_iov`, host byte order, 32 bytes): `u32 cmd`,
//! 4 bytes of padding, `u64 nr_pages`, `u64 vaddr`, `u64 dst_id`. The daemon only sends
//! `PS_IOV_GET` (7) with `dst_id` = the task's pid in the image and `vaddr` its address
//! at dump time, always inside one lazy pagemap entry, then a close (`0x1023`, or
//! `0x1024` over `--ps-socket`) answered by an `i32` 0. Requests are pipelined on the one
//! socket and answers are matched strictly in order: each is the request's header echoed
//! (`vaddr` and `dst_id` exactly; the daemon silently drops a reply it cannot match and
//! the faulting thread then waits forever) with `1 ≤ nr_pages ≤ asked`, then that many
//! pages. A short answer is fine (the rest is asked again); 0 pages is fatal to it.
//! Faults ask for 1 page; after "restore finished" the daemon also fills the rest by
//! itself, lowest address first, 64 KiB growing to 4 MiB per request. A task forked
//! after the restore asks again with its parent's pid, so answers must be repeatable.
//!
//! Which pages are lazy: an ordinary `criu dump` marks the pages of private anonymous
//! VMAs `PE_LAZY|PE_PRESENT` (not mlocked memory, vdso, hugetlb, shared or file-backed
//! memory, nor the page under each thread's stack pointer). The restore skips
//! `PE_LAZY` entries **without reading their bytes from the pipe** (mem.c: it only
//! advances a counter), so under `--stream` their bytes must not be in the served
//! `pages-<id>.img`: [`plan`] rewrites each pagemap with lazy entries `PE_LAZY` only
//! (as `criu dump --lazy-pages` writes them) and names the byte ranges to leave out of
//! the pages file. The same rewritten pagemap goes to the daemon. Entries holding
//! device memory of a CUDA image are made eager (`PE_PRESENT` only): the CUDA restore
//! copies all of it at once, and page faults of 4 KiB would be far slower.
//!
//! If a lazy page cannot be served (a chunk that does not verify, a registry gone) the
//! daemon would exit and the kernel would hand the tree zero pages: the restore kills
//! the tree instead (restore/lazy.rs).

use std::collections::HashMap;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;
use snapreg_proto::manifest::Extent;

use crate::criu_image::{entries, page_count, put_entry, PagemapEntry, PagemapHead};

pub const PAGE: u64 = 4096;
pub const PS_IOV_GET: u32 = 7;
pub const PS_IOV_CLOSE: u32 = 0x1023;
pub const PS_IOV_FORCE_CLOSE: u32 = 0x1024;
/// CRIU's reply header command: `PS_IOV_ADD_F | PE_PRESENT << 16` (ignored by the
/// daemon; sent as CRIU's own page server does).
const PS_IOV_REPLY: u32 = 6 | (PE_PRESENT << 16);
pub const IOV_LEN: usize = 32;
/// Pagemap entry flags (criu/include/pagemap.h).
const PE_PARENT: u32 = 1 << 0;
const PE_LAZY: u32 = 1 << 1;
const PE_PRESENT: u32 = 1 << 2;

/// One page-server record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Iov {
    pub cmd: u32,
    pub nr_pages: u64,
    pub vaddr: u64,
    pub dst_id: u64,
}

impl Iov {
    pub fn decode(b: &[u8; IOV_LEN]) -> Iov {
        let u64_at = |o: usize| u64::from_ne_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        Iov {
            cmd: u32::from_ne_bytes(b[..4].try_into().expect("4 bytes")),
            nr_pages: u64_at(8),
            vaddr: u64_at(16),
            dst_id: u64_at(24),
        }
    }

    pub fn encode(&self) -> [u8; IOV_LEN] {
        let mut b = [0u8; IOV_LEN];
        b[..4].copy_from_slice(&self.cmd.to_ne_bytes());
        b[8..16].copy_from_slice(&self.nr_pages.to_ne_bytes());
        b[16..24].copy_from_slice(&self.vaddr.to_ne_bytes());
        b[24..32].copy_from_slice(&self.dst_id.to_ne_bytes());
        b
    }

    /// The answer's header for `pages` pages of this request.
    pub fn reply(&self, pages: u64) -> Iov {
        Iov {
            cmd: PS_IOV_REPLY,
            nr_pages: pages,
            ..*self
        }
    }
}

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
}

impl LazyTask {
    /// Where the pages from `vaddr` lie in the pages file, and how many of the `asked`
    /// are in the same run (a request never crosses a run; clamped if it would).
    pub fn locate(&self, vaddr: u64, asked: u64) -> Option<(u64, u64)> {
        let i = self
            .runs
            .partition_point(|r| r.vaddr <= vaddr)
            .checked_sub(1)?;
        let r = self.runs[i];
        let end = r.vaddr + r.pages * PAGE;
        if vaddr >= end || !(vaddr - r.vaddr).is_multiple_of(PAGE) || asked == 0 {
            return None;
        }
        let pages = asked.min((end - vaddr) / PAGE);
        Some((r.offset + (vaddr - r.vaddr), pages))
    }
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
    /// Bytes served by the page server instead of the pipe.
    pub lazy_bytes: u64,
    /// Bytes of zero pages in lazy runs left out of the pagemap: never served, the
    /// daemon maps a zero page where the tree touches one.
    pub zero_bytes_left_out: u64,
}

/// Address ranges (at dump time) of each pages file's task that must stay eager
/// (device memory).
pub type Eager = HashMap<String, Vec<(u64, u64)>>;

/// Plans the lazy restore of an image whose files are `files`, given the bytes of its
/// `pagemap-<pid>.img` files (`pagemaps`). Refuses, saying why, an image it cannot
/// serve lazily (parent pages, a pagemap that disagrees with its pages file).
pub fn plan(
    files: &HashMap<String, Vec<Extent>>,
    pagemaps: &HashMap<String, Bytes>,
    eager: &Eager,
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
        let task = plan_task(name, image, files, eager, tasks == 1)?;
        out.lazy_bytes += task.runs.iter().map(|r| r.pages * PAGE).sum::<u64>();
        out.zero_bytes_left_out += task.zero_bytes;
        out.left_out
            .insert(task.runs_file.to_string(), task.left_out);
        out.pagemaps.insert(name.clone(), task.pagemap);
        out.tasks.insert(
            pid,
            LazyTask {
                pages_file: task.runs_file,
                runs: task.runs,
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
    eager: &Eager,
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
    let eager = eager.get(&pages_file).map(Vec::as_slice).unwrap_or(&[]);
    let mut pagemap = BytesMut::new();
    pagemap.put_slice(magics);
    pagemap.put_u32_le(head_bytes.len() as u32);
    pagemap.put_slice(head_bytes);
    let (mut runs, mut offset) = (Vec::new(), 0u64);
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
        let holds_eager = eager.iter().any(|&(s, t)| s < e.vaddr + len && e.vaddr < t);
        if flags & PE_LAZY == 0 || holds_eager {
            e.flags = Some(flags & !PE_LAZY);
            put_entry(&mut pagemap, &e, e.vaddr, pages);
            continue;
        }
        // Lazy: out of CRIU's stream, PE_LAZY only, zero runs (if dropped) absent.
        left_out.push((start, end));
        e.flags = Some(PE_LAZY);
        let kept = crate::device_memory::new_ranges(&zeros, &[(start, end)]);
        zero_bytes += len - kept.iter().map(|(s, t)| t - s).sum::<u64>();
        for (s, t) in kept {
            let (vaddr, pages) = (e.vaddr + (s - start), (t - s) / PAGE);
            put_entry(&mut pagemap, &e, vaddr, pages);
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
    Ok(TaskPlan {
        pagemap: pagemap.freeze(),
        runs_file: pages_file.into(),
        runs,
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
        // Three entries: 2 pages eager (stack), 4 lazy, 3 lazy holding device memory.
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
        let eager = HashMap::from([(
            "pages-1.img".to_string(),
            vec![(0x2000_0000 + PAGE, 0x2000_0000 + PAGE + 1)],
        )]);
        let plan = plan(
            &files,
            &HashMap::from([("pagemap-42.img".to_string(), pm)]),
            &eager,
        )
        .unwrap();
        assert_eq!(
            flags_of(&plan.pagemaps["pagemap-42.img"]),
            vec![PE_PRESENT, PE_LAZY, PE_PRESENT]
        );
        assert_eq!(plan.left_out["pages-1.img"], vec![(2 * PAGE, 6 * PAGE)]);
        assert_eq!(plan.lazy_bytes, 4 * PAGE);
        let task = &plan.tasks[&42];
        assert_eq!(task.locate(0x1000_0000 + PAGE, 8), Some((3 * PAGE, 3)));
        assert_eq!(task.locate(0x1000_0000, 1), Some((2 * PAGE, 1)));
        assert_eq!(
            task.locate(0x2000_0000, 1),
            None,
            "eager: not served lazily"
        );
        assert_eq!(task.locate(0x1000_0001, 1), None, "unaligned");
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
        assert_eq!(
            planned.tasks[&9].locate(0x4000_0000 + 2 * PAGE, 1),
            None,
            "a hole"
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

    #[test]
    fn iov_round_trips_in_criu_layout() {
        let iov = Iov {
            cmd: PS_IOV_GET,
            nr_pages: 16,
            vaddr: 0x7f00_0000_1000,
            dst_id: 4242,
        };
        let b = iov.encode();
        assert_eq!(&b[..4], &7u32.to_ne_bytes());
        assert_eq!(&b[4..8], &[0; 4], "padding after cmd");
        assert_eq!(&b[16..24], &0x7f00_0000_1000u64.to_ne_bytes());
        assert_eq!(Iov::decode(&b), iov);
        assert_eq!(iov.reply(3).nr_pages, 3);
        assert_eq!(iov.reply(3).vaddr, iov.vaddr);
    }
}
