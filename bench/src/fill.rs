//! `snapreg-bench fill [--gib G] [--reps R] [--threads 1,2]`: how fast memory can be put
//! back into a process, the step that bounds a GPU restore once its feeder keeps up.
//!
//! Fed from memory, CRIU's streamed restore still reads its pages at about 1 GB/s on
//! the H200 machine, as fast as a local one (bench/RESULTS.md, "Is the pipe the
//! limit?"): one reader copying into fresh anonymous memory, a page fault and a zeroed
//! page per 4 KiB. This bench times three ways of filling G GiB of fresh anonymous
//! memory from a buffer that already holds the bytes (non-zero, as a snapshot's pages
//! are), interleaved, each rep into a new mapping:
//!
//! 1. `read(2)` from a 1 MiB pipe that a second thread fills with `write(2)`: what
//!    CRIU's eager `--stream` restore does with the pipe snapctl feeds (one reader);
//! 2. `UFFDIO_COPY` from T threads into a mapping registered with userfaultfd (missing
//!    pages), 4 MiB per call: what a lazy-pages daemon that fills in parallel would do
//!    (CRIU's own daemon fills from one thread);
//! 3. `memcpy` from T threads into the mapping: the page-fault path, parallel.
//!
//! Every fill is compared byte for byte with its source. Raw timings go to
//! bench/runs/fill-<unix seconds>.json.
//!
//! userfaultfd goes through uffd.rs.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use super::{median, save_run, uffd};

const PIPE_SIZE: libc::c_int = 1 << 20;
/// The largest request CRIU's lazy-pages daemon makes while filling (criu/uffd.c).
pub const STEP: usize = 4 << 20;

pub fn run(gib: f64, reps: usize, threads: &[usize]) -> Result<()> {
    let len = ((gib * (1u64 << 30) as f64) as usize) & !(STEP - 1);
    if len == 0 {
        bail!("--gib {gib} is less than 4 MiB: give at least 0.01");
    }
    let source = pattern(len);
    let mut routes: Vec<(String, usize)> = vec![("read(2) from a pipe (CRIU --stream)".into(), 1)];
    for &t in threads {
        routes.push(("UFFDIO_COPY".into(), t));
    }
    for &t in threads {
        routes.push(("memcpy into fresh pages".into(), t));
    }
    let mut secs: Vec<Vec<f64>> = vec![Vec::new(); routes.len()];
    for _ in 0..reps {
        for (i, (name, t)) in routes.iter().enumerate() {
            let dest = Mapping::new(len)?;
            let s = match (i, name.as_str()) {
                (0, _) => fill_from_pipe(&source, &dest)?,
                (_, "UFFDIO_COPY") => fill_by_uffd(&source, &dest, *t)?,
                _ => fill_by_memcpy(&source, &dest, *t)?,
            };
            if dest.bytes() != &source[..] {
                bail!("{name} with {t} thread(s) did not reproduce its source");
            }
            secs[i].push(s);
        }
    }
    print_table(len, &routes, &mut secs.clone());
    save_run(
        "fill",
        &serde_json::json!({
            "bytes": len, "reps": reps, "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
            "routes": routes.iter().map(|(n, t)| format!("{n}, {t} thread(s)")).collect::<Vec<_>>(),
            "seconds": secs,
        }),
    )
}

fn print_table(len: usize, routes: &[(String, usize)], secs: &mut [Vec<f64>]) {
    let base = median(&mut secs[0]);
    println!(
        "### Filling {:.2} GiB of fresh anonymous memory from memory\n\n\
         | route | threads | median GB/s | min–max GB/s | time ratio to read(2) from a pipe |\n|---|---|---|---|---|",
        len as f64 / (1u64 << 30) as f64
    );
    for ((name, t), s) in routes.iter().zip(secs.iter_mut()) {
        let m = median(s);
        let gbs = |x: f64| len as f64 / x / 1e9;
        let (lo, hi) = s.iter().fold((f64::MAX, 0f64), |(lo, hi), &x| {
            (lo.min(gbs(x)), hi.max(gbs(x)))
        });
        println!(
            "| {name} | {t} | {:.2} | {lo:.2}–{hi:.2} | {:.2} |",
            gbs(m),
            m / base
        );
    }
}

/// Non-zero bytes, cheap to make: a xorshift stream.
pub fn pattern(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for w in v.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w.copy_from_slice(&x.to_le_bytes());
    }
    v
}

/// A private anonymous mapping, never touched until a fill writes it; unmapped on drop.
pub struct Mapping {
    pub addr: *mut u8,
    pub len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; threads write disjoint
// ranges of it (fill_by_*), and it is read only after they are joined.
unsafe impl Sync for Mapping {}

impl Mapping {
    pub fn new(len: usize) -> Result<Self> {
        // SAFETY: a fresh anonymous mapping at an address the kernel picks; nothing
        // else refers to it.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).context("mmap of the destination");
        }
        Ok(Self {
            addr: addr.cast(),
            len,
        })
    }

    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `len` bytes mapped readable for the life of `self`; called only with
        // no fill running.
        unsafe { std::slice::from_raw_parts(self.addr, self.len) }
    }

    /// The range [off, off + n) to write, for one thread's part.
    #[allow(clippy::mut_from_ref)]
    fn part(&self, off: usize, n: usize) -> &mut [u8] {
        assert!(off + n <= self.len);
        // SAFETY: inside the mapping; each caller takes a range no other thread takes
        // (ranges come from `parts`).
        unsafe { std::slice::from_raw_parts_mut(self.addr.add(off), n) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `new` mapped; no slice of it outlives `self`.
        unsafe { libc::munmap(self.addr.cast(), self.len) };
    }
}

/// `t` contiguous ranges covering `len`, each a multiple of STEP (the last takes the rest).
fn parts(len: usize, t: usize) -> Vec<(usize, usize)> {
    let per = (len / STEP).div_ceil(t) * STEP;
    (0..t)
        .map(|i| (i * per, per.min(len.saturating_sub(i * per))))
        .filter(|&(_, n)| n > 0)
        .collect()
}

fn fill_from_pipe(source: &[u8], dest: &Mapping) -> Result<f64> {
    let mut fds = [0; 2];
    // SAFETY: pipe(2) writes two descriptors into the array, owned below.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error()).context("pipe2");
    }
    // SAFETY: both descriptors were just created and are owned by nothing else.
    let (mut rx, mut tx) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
    // SAFETY: fcntl on a descriptor we own; failure leaves the default size.
    unsafe { libc::fcntl(tx.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE) };
    let t0 = Instant::now();
    std::thread::scope(|s| -> Result<()> {
        let writer = s.spawn(move || -> std::io::Result<()> {
            for c in source.chunks(PIPE_SIZE as usize) {
                tx.write_all(c)?;
            }
            Ok(())
        });
        rx.read_exact(dest.part(0, dest.len))?;
        writer.join().expect("writer thread")?;
        Ok(())
    })?;
    Ok(t0.elapsed().as_secs_f64())
}

fn fill_by_memcpy(source: &[u8], dest: &Mapping, t: usize) -> Result<f64> {
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for (off, n) in parts(dest.len, t) {
            s.spawn(move || dest.part(off, n).copy_from_slice(&source[off..off + n]));
        }
    });
    Ok(t0.elapsed().as_secs_f64())
}

fn fill_by_uffd(source: &[u8], dest: &Mapping, t: usize) -> Result<f64> {
    let uffd = uffd::open(dest.addr as u64, dest.len as u64, 0)?;
    let t0 = Instant::now();
    std::thread::scope(|s| -> Result<()> {
        let workers: Vec<_> = parts(dest.len, t)
            .into_iter()
            .map(|(off, n)| {
                let uffd = &uffd;
                s.spawn(move || -> Result<()> {
                    for at in (off..off + n).step_by(STEP) {
                        let len = STEP.min(off + n - at);
                        uffd::copy(
                            uffd,
                            dest.addr as u64 + at as u64,
                            source[at..].as_ptr(),
                            len as u64,
                        )
                        .context("UFFDIO_COPY")?;
                    }
                    Ok(())
                })
            })
            .collect();
        workers
            .into_iter()
            .try_for_each(|w| w.join().expect("uffd thread"))
    })?;
    Ok(t0.elapsed().as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_cover_the_mapping_once_in_whole_steps() {
        for (len, t) in [
            (STEP, 1),
            (STEP, 4),
            (10 * STEP, 3),
            (64 * STEP, 16),
            (7 * STEP, 2),
        ] {
            let p = parts(len, t);
            assert!(p.len() <= t);
            let mut next = 0;
            for &(off, n) in &p {
                assert_eq!(off, next, "{len} over {t}: gap or overlap at {off}");
                assert!(n > 0 && n % STEP == 0);
                next = off + n;
            }
            assert_eq!(next, len, "{len} over {t}: not covered");
        }
    }

    #[test]
    fn every_route_reproduces_its_source() {
        let len = 2 * STEP;
        let source = pattern(len);
        for fill in [
            |s: &[u8], d: &Mapping| fill_from_pipe(s, d),
            |s: &[u8], d: &Mapping| fill_by_memcpy(s, d, 2),
            |s: &[u8], d: &Mapping| fill_by_uffd(s, d, 2),
        ] {
            let dest = Mapping::new(len).unwrap();
            fill(&source, &dest).unwrap();
            assert!(dest.bytes() == &source[..]);
        }
    }
}
