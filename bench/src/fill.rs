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
//! userfaultfd is driven through libc with the kernel's uapi structs written out below
//! (linux/userfaultfd.h): the `userfaultfd` crate generates its bindings with bindgen
//! at build time, a second bindgen for three ioctls of one bench.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use super::{median, save_run};

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

// linux/userfaultfd.h
const UFFD_API: u64 = 0xAA;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}
#[repr(C)]
struct UffdioRegister {
    start: u64,
    len: u64,
    mode: u64,
    ioctls: u64,
}
#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}
#[repr(C)]
struct UffdioZeropage {
    start: u64,
    len: u64,
    mode: u64,
    zeropage: i64,
}
#[repr(C)]
struct UffdioRange {
    start: u64,
    len: u64,
}
/// _IOC(dir, 0xAA, nr, T): the userfaultfd ioctl numbers (dir 3: read-write, 2: read).
const fn uffd_ioc<T>(dir: u64, nr: u64) -> u64 {
    (dir << 30) | ((std::mem::size_of::<T>() as u64) << 16) | (0xAA << 8) | nr
}
const UFFDIO_API: u64 = uffd_ioc::<UffdioApi>(3, 0x3F);
const UFFDIO_REGISTER: u64 = uffd_ioc::<UffdioRegister>(3, 0x00);
const UFFDIO_WAKE: u64 = uffd_ioc::<UffdioRange>(2, 0x02);
const UFFDIO_COPY: u64 = uffd_ioc::<UffdioCopy>(3, 0x03);
const UFFDIO_ZEROPAGE: u64 = uffd_ioc::<UffdioZeropage>(3, 0x04);
const PAGE: u64 = 4096;

/// A userfaultfd asking for `features` (UFFD_FEATURE_*), with `dest` registered for
/// missing pages.
pub fn uffd_for(dest: &Mapping, features: u64) -> Result<OwnedFd> {
    // SAFETY: userfaultfd(2) takes flags only; it returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC) } as libc::c_int;
    if fd < 0 {
        return Err(std::io::Error::last_os_error())
            .context("userfaultfd(2): run as root, or set vm.unprivileged_userfaultfd=1");
    }
    // SAFETY: a descriptor just returned, owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut api = UffdioApi {
        api: UFFD_API,
        features,
        ioctls: 0,
    };
    let mut reg = UffdioRegister {
        start: dest.addr as u64,
        len: dest.len as u64,
        mode: UFFDIO_REGISTER_MODE_MISSING,
        ioctls: 0,
    };
    // SAFETY: both ioctls take a pointer to the struct named in their number, alive
    // for the call; REGISTER covers exactly the mapping.
    unsafe {
        if libc::ioctl(fd.as_raw_fd(), UFFDIO_API as _, &mut api) != 0
            || libc::ioctl(fd.as_raw_fd(), UFFDIO_REGISTER as _, &mut reg) != 0
        {
            return Err(std::io::Error::last_os_error()).context("UFFDIO_API / UFFDIO_REGISTER");
        }
    }
    Ok(fd)
}

fn fill_by_uffd(source: &[u8], dest: &Mapping, t: usize) -> Result<f64> {
    let uffd = uffd_for(dest, 0)?;
    let t0 = Instant::now();
    std::thread::scope(|s| -> Result<()> {
        let workers: Vec<_> = parts(dest.len, t)
            .into_iter()
            .map(|(off, n)| {
                let uffd = &uffd;
                s.spawn(move || -> Result<()> {
                    for at in (off..off + n).step_by(STEP) {
                        let len = STEP.min(off + n - at);
                        uffd_copy(
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

/// UFFDIO_COPY of `len` bytes from `src` to `dst` (an address registered with
/// `uffd`), continuing after a partial copy. A page already there (EEXIST: someone
/// else filled it) is skipped. Returns the bytes this call copied. EAGAIN (an event
/// such as a remove is waiting to be read) is returned at once: the caller must let
/// the event be read before it tries again.
pub fn uffd_copy(uffd: &OwnedFd, dst: u64, src: *const u8, len: u64) -> std::io::Result<u64> {
    let (mut at, mut copied) = (0u64, 0u64);
    while at < len {
        let mut c = UffdioCopy {
            dst: dst + at,
            src: src as u64 + at,
            len: len - at,
            mode: 0,
            copy: 0,
        };
        // SAFETY: the caller passes dst inside a registered range and src readable for
        // `len` bytes, both alive for the call; the kernel writes only `c.copy`.
        let rc = unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_COPY as _, &mut c) };
        if c.copy > 0 {
            at += c.copy as u64;
            copied += c.copy as u64;
            continue;
        }
        if rc == 0 {
            break;
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EEXIST) => at += PAGE,
            _ => return Err(e),
        }
    }
    Ok(copied)
}

/// UFFDIO_ZEROPAGE: maps the zero page over [dst, dst + len) and wakes its waiters.
pub fn uffd_zeropage(uffd: &OwnedFd, dst: u64, len: u64) -> std::io::Result<()> {
    let mut z = UffdioZeropage {
        start: dst,
        len,
        mode: 0,
        zeropage: 0,
    };
    // SAFETY: the ioctl takes a pointer to this struct, alive for the call.
    match unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_ZEROPAGE as _, &mut z) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// UFFDIO_WAKE: wakes threads waiting on faults in [dst, dst + len).
pub fn uffd_wake(uffd: &OwnedFd, dst: u64, len: u64) -> std::io::Result<()> {
    let mut r = UffdioRange { start: dst, len };
    // SAFETY: the ioctl takes a pointer to this struct, alive for the call.
    match unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_WAKE as _, &mut r) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
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
