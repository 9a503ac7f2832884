//! userfaultfd for the fill benches (fill.rs, lazy_fill.rs, fill_events.rs): open and
//! register a range, copy pages in, map zero pages, wake waiters, read events.
//!
//! Driven through libc with the kernel's uapi written out below
//! (linux/userfaultfd.h): the `userfaultfd` crate generates its bindings with bindgen
//! at build time, a second bindgen for a handful of ioctls in a bench.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use anyhow::{Context, Result};

pub const UFFD_FEATURE_EVENT_REMOVE: u64 = 1 << 3;
pub const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
pub const UFFD_EVENT_REMOVE: u8 = 0x15;
/// `struct uffd_msg`: the event byte, then (after 7 bytes of padding) two u64 words:
/// a page fault's flags and address, a remove's start and end.
const MSG_LEN: usize = 32;

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

/// A non-blocking userfaultfd asking for `features` (UFFD_FEATURE_*), with
/// [addr, addr + len) registered for missing pages.
pub fn open(addr: u64, len: u64, features: u64) -> Result<OwnedFd> {
    // SAFETY: userfaultfd(2) takes flags only; it returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) }
        as libc::c_int;
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
        start: addr,
        len,
        mode: UFFDIO_REGISTER_MODE_MISSING,
        ioctls: 0,
    };
    // SAFETY: both ioctls take a pointer to the struct named in their number, alive
    // for the call; the caller owns the range REGISTER covers.
    unsafe {
        if libc::ioctl(fd.as_raw_fd(), UFFDIO_API as _, &mut api) != 0
            || libc::ioctl(fd.as_raw_fd(), UFFDIO_REGISTER as _, &mut reg) != 0
        {
            return Err(std::io::Error::last_os_error()).context("UFFDIO_API / UFFDIO_REGISTER");
        }
    }
    Ok(fd)
}

/// UFFDIO_COPY of `len` bytes from `src` to `dst` (an address registered with
/// `uffd`), continuing after a partial copy. A page already there (EEXIST: someone
/// else filled it) is skipped. Returns the bytes this call copied. EAGAIN (an event
/// such as a remove is waiting to be read) is returned at once: the caller must let
/// the event be read before it tries again.
pub fn copy(uffd: &OwnedFd, dst: u64, src: *const u8, len: u64) -> std::io::Result<u64> {
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
pub fn zeropage(uffd: &OwnedFd, dst: u64, len: u64) -> std::io::Result<()> {
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
pub fn wake(uffd: &OwnedFd, dst: u64, len: u64) -> std::io::Result<()> {
    let mut r = UffdioRange { start: dst, len };
    // SAFETY: the ioctl takes a pointer to this struct, alive for the call.
    match unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_WAKE as _, &mut r) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// One `struct uffd_msg`, as far as these benches read it.
#[derive(Clone, Copy, Debug)]
pub struct Msg {
    pub event: u8,
    pub arg: [u64; 2],
}

impl Msg {
    /// A page fault's address, down to its page.
    pub fn fault_page(&self) -> u64 {
        self.arg[1] & !(PAGE - 1)
    }
}

/// Whether `uffd` has something to read, waiting up to `timeout_ms`.
pub fn readable(uffd: &OwnedFd, timeout_ms: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd: uffd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the call.
    unsafe { libc::poll(&mut pfd, 1, timeout_ms) > 0 }
}

/// The messages waiting on `uffd` (a non-blocking one), up to 16; none when poll said
/// readable with nothing left.
pub fn read(uffd: &OwnedFd) -> Vec<Msg> {
    let mut buf = [0u8; MSG_LEN * 16];
    // SAFETY: reads into `buf`, which outlives the call.
    let n = unsafe { libc::read(uffd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    let word = |m: &[u8], i: usize| u64::from_ne_bytes(m[i..i + 8].try_into().unwrap());
    buf[..n.max(0) as usize]
        .chunks_exact(MSG_LEN)
        .map(|m| Msg {
            event: m[0],
            arg: [word(m, 8), word(m, 16)],
        })
        .collect()
}
