//! `snapreg-bench lazy-fill [--gib G] [--reps R] [--threads T]`: would a lazy restore
//! whose pages are filled from many threads beat CRIU's eager restore?
//!
//! A G GiB process (bench restore's thirds: random, pattern, zeros) is dumped by CRIU
//! into /dev/shm, then restored three ways, interleaved, each verified by the process
//! itself (SIGUSR1: it checks its whole pattern):
//!
//! 1. `criu restore -D` (eager: CRIU reads every page into the tree, one reader);
//! 2. `criu restore --lazy-pages` with CRIU's own `criu lazy-pages` daemon (faults
//!    first, then a background fill from one thread);
//! 3. `criu restore --lazy-pages` with this bench as the daemon: it takes the tree's
//!    userfaultfd over CRIU's lazy-pages socket (snapreg_client::lazy_pages::socket),
//!    and fills every lazy range by `UFFDIO_COPY` from T threads, 4 MiB per call,
//!    straight from the mapped pages file, while one more thread answers the tree's
//!    page faults.
//!
//! Timed per route: CRIU's exit (the tree runs), the first answer (its counter moves)
//! and every page in (the daemon done). Raw: bench/runs/lazy-fill-<unix seconds>.json.
//!
//! The prototype that decided to build this into `pull-restore --lazy` (which now
//! fills from verified chunks: client/src/restore/lazy/daemon.rs); kept as the
//! measurement against CRIU's own daemon. One task only, and any userfaultfd event other than a page fault (fork, remap,
//! madvise, munmap, which the held process never makes) stops the rep with an error.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use prost::Message;
use snapreg_client::criu_image::{entries, page_count, MmEntry, PagemapEntry, PagemapHead};

use super::fill::STEP;
use super::uffd;
use super::{
    counter, criu_path, dump_process, median, save_run, sh, timed_restore, verify_restored,
    wait_gone,
};

use snapreg_client::lazy_pages::{socket, PAGE};
const PE_LAZY: u32 = 1 << 1;
const PE_PRESENT: u32 = 1 << 2;

/// A piece of a lazy range: `len` bytes at `vaddr` in the tree, at `offset` in the
/// pages file; never crosses a VMA (UFFDIO_COPY works inside one).
#[derive(Clone, Copy, Debug)]
struct Piece {
    vaddr: u64,
    len: u64,
    offset: u64,
}

pub fn run(gib: f64, reps: usize, threads: usize) -> Result<()> {
    let work = tempfile::Builder::new()
        .prefix("snapreg-bench-lazyfill-")
        .tempdir_in("/dev/shm")?;
    let w = work.path();
    let images = w.join("images");
    let pid = dump_process(w, &images, gib)?;
    let state = w.join("proc-images");
    let at = counter(&state).context("the dumped process left no state")?;
    let (pages_file, pieces) = lazy_pieces(&images, pid)?;
    let lazy_bytes: u64 = pieces.iter().map(|p| p.len).sum();
    let names = [
        "criu restore -D (eager)".to_string(),
        "criu restore --lazy-pages + criu lazy-pages (one thread)".to_string(),
        format!("criu restore --lazy-pages + UFFDIO_COPY from {threads} threads"),
    ];
    // Per route: CRIU's exit, the first answer, every page in (seconds).
    let mut secs = vec![[Vec::new(), Vec::new(), Vec::new()]; names.len()];
    for _ in 0..reps {
        for (i, s) in secs.iter_mut().enumerate() {
            let wd = w.join(format!("w{i}"));
            let _ = std::fs::remove_dir_all(&wd);
            std::fs::create_dir_all(&wd)?;
            let (first, (_, (all_in, criu_exit))) = timed_restore(&state, at, || match i {
                0 => {
                    let t = Instant::now();
                    criu_restore(&images, &wd, false)?;
                    let e = t.elapsed().as_secs_f64();
                    Ok((e, e))
                }
                1 => with_criu_daemon(&images, &wd),
                _ => with_parallel_fill(&images, &wd, &pages_file, &pieces, threads),
            })
            .with_context(|| names[i].clone())?;
            verify_restored(&state, pid, 120).with_context(|| names[i].clone())?;
            wait_gone(pid);
            s[0].push(criu_exit);
            s[1].push(first);
            s[2].push(all_in);
        }
    }
    println!(
        "### Restoring a {gib} GiB process from /dev/shm: eager, lazy with CRIU's daemon, lazy with a parallel fill ({:.2} GB lazy)\n\n\
         | route | CRIU exits, median s | first answer, median s | every page in, median s (min–max) | ratio to eager |\n|---|---|---|---|---|",
        lazy_bytes as f64 / 1e9
    );
    let base = median(&mut secs[0][2].clone());
    for (name, s) in names.iter().zip(secs.iter_mut()) {
        let (lo, hi) = s[2]
            .iter()
            .fold((f64::MAX, 0f64), |(l, h), &x| (l.min(x), h.max(x)));
        let all = median(&mut s[2].clone());
        println!(
            "| {name} | {:.2} | {:.2} | {all:.2} ({lo:.2}–{hi:.2}) | {:.2} |",
            median(&mut s[0].clone()),
            median(&mut s[1].clone()),
            all / base
        );
    }
    save_run(
        "lazy-fill",
        &serde_json::json!({ "gib": gib, "reps": reps, "threads": threads, "lazy_bytes": lazy_bytes,
            "routes": names, "criu_exit_s": secs.iter().map(|s| &s[0]).collect::<Vec<_>>(),
            "first_answer_s": secs.iter().map(|s| &s[1]).collect::<Vec<_>>(),
            "all_in_s": secs.iter().map(|s| &s[2]).collect::<Vec<_>>() }),
    )
}

fn criu_restore(images: &Path, wd: &Path, lazy: bool) -> Result<()> {
    let lazy = if lazy { "--lazy-pages" } else { "" };
    sh(&format!(
        "{} restore -D {} -W {} -d {lazy} -o restore.log",
        criu_path(),
        images.display(),
        wd.display()
    ))
    .with_context(|| format!("criu restore failed; see {}/restore.log", wd.display()))
}

/// Route 2. Returns (every page in, CRIU's exit), seconds from the start.
fn with_criu_daemon(images: &Path, wd: &Path) -> Result<(f64, f64)> {
    let t = Instant::now();
    let mut daemon = Command::new(criu_path())
        .args(["lazy-pages", "-D"])
        .arg(images)
        .arg("-W")
        .arg(wd)
        .args(["-o", "lazy-pages.log"])
        .stdin(Stdio::null())
        .spawn()?;
    let sock = wd.join("lazy-pages.socket");
    for _ in 0..1000 {
        if sock.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let restored = criu_restore(images, wd, true);
    let criu_exit = t.elapsed().as_secs_f64();
    if let Err(e) = restored {
        let _ = daemon.kill();
        let _ = daemon.wait();
        return Err(e);
    }
    let st = daemon.wait()?;
    if !st.success() {
        bail!(
            "criu lazy-pages failed; see {}/lazy-pages.log",
            wd.display()
        );
    }
    Ok((t.elapsed().as_secs_f64(), criu_exit))
}

/// Route 3. Returns (every page in, CRIU's exit), seconds from the start.
fn with_parallel_fill(
    images: &Path,
    wd: &Path,
    pages_file: &Path,
    pieces: &[Piece],
    threads: usize,
) -> Result<(f64, f64)> {
    let t = Instant::now();
    let listener = socket::bind(wd)?;
    let mut criu = Command::new(criu_path())
        .args(["restore", "-D"])
        .arg(images)
        .arg("-W")
        .arg(wd)
        .args(["-d", "--lazy-pages", "-o", "restore.log"])
        .stdin(Stdio::null())
        .spawn()?;
    let (uffd, mut conn) = match take_uffd(&listener) {
        Ok(taken) => taken,
        Err(e) => {
            let _ = criu.kill();
            let _ = criu.wait();
            return Err(e.context(format!("see {}/restore.log", wd.display())));
        }
    };
    let source = MappedFile::open(pages_file)?;
    let next = AtomicUsize::new(0);
    let filled = AtomicBool::new(false);
    std::thread::scope(|s| -> Result<(f64, f64)> {
        let exit = s.spawn(|| {
            let st = criu.wait();
            (st, t.elapsed().as_secs_f64())
        });
        // Faults come before "restore finished" (CRIU's last steps touch the tree's
        // memory): served from the start; the fill waits for the message, as CRIU's
        // daemon does.
        let faults = s.spawn(|| serve_faults(&uffd, &source, pieces, &filled));
        let finished = restore_finished(&mut conn);
        if let Err(e) = finished {
            filled.store(true, Ordering::Relaxed);
            let _ = faults.join();
            let _ = exit.join();
            return Err(e.context(format!("see {}/restore.log", wd.display())));
        }
        let fillers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| -> Result<()> {
                    loop {
                        let Some(p) = pieces.get(next.fetch_add(1, Ordering::Relaxed)) else {
                            return Ok(());
                        };
                        let src = source.at(p.offset, p.len)?;
                        uffd::copy(&uffd, p.vaddr, src, p.len)?;
                    }
                })
            })
            .collect();
        let filling: Result<()> = fillers
            .into_iter()
            .try_for_each(|f| f.join().expect("filler"));
        let all_in = t.elapsed().as_secs_f64();
        filled.store(true, Ordering::Relaxed);
        let served = faults.join().expect("fault thread");
        let (st, criu_exit) = exit.join().expect("criu waiter");
        if !st?.success() {
            bail!(
                "criu restore --lazy-pages failed; see {}/restore.log",
                wd.display()
            );
        }
        filling?;
        served?;
        Ok((all_in, criu_exit))
    })
}

/// Accepts CRIU's connection and takes its one task's userfaultfd
/// (snapreg_client::lazy_pages::socket). Bounded: CRIU connects within 30 s and
/// sends within 60 s, or the rep fails.
fn take_uffd(listener: &UnixListener) -> Result<(OwnedFd, UnixStream)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut conn = socket::accept(listener, deadline, || true)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut tasks = socket::take_uffds(&mut conn, 1, || Instant::now() < deadline)?;
    let task = tasks
        .pop()
        .context("prototype: the tree's one task is a zombie")?;
    Ok((task.uffd, conn))
}

/// Waits (at most 60 s) for CRIU's "restore finished"; anything else means another
/// task, which the prototype does not take.
fn restore_finished(conn: &mut UnixStream) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    socket::restore_finished(conn, || Instant::now() < deadline)
        .context("prototype: waiting for CRIU's \"restore finished\" (one task only)")
}

/// Answers page faults until the fill is done: a lazy page from the pages file, any
/// other page of a registered VMA as zeros. A page a filler already copied only needs
/// its waiter woken.
fn serve_faults(
    uffd: &OwnedFd,
    source: &MappedFile,
    pieces: &[Piece],
    filled: &AtomicBool,
) -> Result<()> {
    while !filled.load(Ordering::Relaxed) {
        if !uffd::readable(uffd, 5) {
            continue;
        }
        for msg in uffd::read(uffd)? {
            if msg.event != uffd::UFFD_EVENT_PAGEFAULT {
                bail!(
                    "prototype: userfaultfd event {:#x} is not handled",
                    msg.event
                );
            }
            let addr = msg.fault_page();
            let i = pieces.partition_point(|p| p.vaddr <= addr);
            let hit = i
                .checked_sub(1)
                .map(|i| pieces[i])
                .filter(|p| addr < p.vaddr + p.len);
            // Nothing copied (a filler got there first) or EEXIST: the page is in,
            // and the faulting thread only needs waking.
            let woken = match hit {
                Some(p) => {
                    uffd::copy(
                        uffd,
                        addr,
                        source.at(p.offset + (addr - p.vaddr), PAGE)?,
                        PAGE,
                    )? > 0
                }
                None => uffd::zeropage(uffd, addr, PAGE).context("UFFDIO_ZEROPAGE")? > 0,
            };
            if !woken {
                uffd::wake(uffd, addr, PAGE).context("UFFDIO_WAKE")?;
            }
        }
    }
    Ok(())
}

/// The lazy ranges of the tree's one task, cut at VMA boundaries and into STEP-sized
/// pieces, sorted by address; and its pages file.
fn lazy_pieces(images: &Path, pid: u32) -> Result<(std::path::PathBuf, Vec<Piece>)> {
    let pagemap = std::fs::read(images.join(format!("pagemap-{pid}.img")))?;
    let mm = std::fs::read(images.join(format!("mm-{pid}.img")))?;
    let (_, records) = entries(&pagemap).context("pagemap: not a CRIU image")?;
    let head = PagemapHead::decode(*records.first().context("pagemap: empty")?)?;
    let (_, mm_records) = entries(&mm).context("mm: not a CRIU image")?;
    let vmas: Vec<(u64, u64)> = MmEntry::decode(*mm_records.first().context("mm: empty")?)?
        .vmas
        .iter()
        .map(|v| (v.start, v.end))
        .collect();
    let (mut pieces, mut offset) = (Vec::new(), 0u64);
    for raw in &records[1..] {
        let e = PagemapEntry::decode(*raw)?;
        let flags = e.flags.unwrap_or(PE_PRESENT);
        let len = page_count(&e) * PAGE;
        if flags & PE_LAZY != 0 && flags & PE_PRESENT != 0 {
            cut(e.vaddr, len, offset, &vmas, &mut pieces);
        }
        if flags & PE_PRESENT != 0 {
            offset += len;
        }
    }
    pieces.sort_by_key(|p| p.vaddr);
    Ok((images.join(format!("pages-{}.img", head.pages_id)), pieces))
}

fn cut(mut vaddr: u64, len: u64, mut offset: u64, vmas: &[(u64, u64)], out: &mut Vec<Piece>) {
    let end = vaddr + len;
    while vaddr < end {
        let vma_end = vmas
            .iter()
            .find(|&&(s, e)| s <= vaddr && vaddr < e)
            .map_or(end, |&(_, e)| e);
        let n = (end.min(vma_end) - vaddr).min(STEP as u64);
        out.push(Piece {
            vaddr,
            len: n,
            offset,
        });
        vaddr += n;
        offset += n;
    }
}

/// A file mapped read-only, unmapped on drop.
struct MappedFile {
    addr: *const u8,
    len: u64,
}

// SAFETY: a read-only mapping of a file nobody writes during the bench.
unsafe impl Sync for MappedFile {}

impl MappedFile {
    fn open(path: &Path) -> Result<Self> {
        let f = File::open(path)?;
        let len = f.metadata()?.len();
        // SAFETY: a fresh read-only shared mapping of the whole file; the fd may close
        // after (the mapping keeps the file).
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).context("mmap of the pages file");
        }
        Ok(Self {
            addr: addr.cast(),
            len,
        })
    }

    /// The address of [offset, offset + len), checked against the file's size.
    fn at(&self, offset: u64, len: u64) -> Result<*const u8> {
        if offset + len > self.len {
            bail!("pages file shorter than its pagemap says");
        }
        // SAFETY: inside the mapping (checked above).
        Ok(unsafe { self.addr.add(offset as usize) })
    }
}

impl Drop for MappedFile {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `open` mapped; no pointer from `at` outlives the
        // fill that used it.
        unsafe { libc::munmap(self.addr as *mut _, self.len as usize) };
    }
}
