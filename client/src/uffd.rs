//! userfaultfd, as the lazy restore's daemon (restore/lazy) and the fill benches use
//! it: copy pages in, map zero pages, wake waiters, read faults and events; `open`
//! registers a range of the caller's own memory (benches and tests).
//!
//! Driven through libc with the kernel's uapi written out below
//! (linux/userfaultfd.h): the `userfaultfd` crate generates its bindings with bindgen
//! at build time, a second bindgen (and libclang on every build machine) for a
//! handful of ioctls.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

pub const UFFD_FEATURE_EVENT_REMOVE: u64 = 1 << 3;
pub const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
pub const UFFD_EVENT_FORK: u8 = 0x13;
pub const UFFD_EVENT_REMAP: u8 = 0x14;
pub const UFFD_EVENT_REMOVE: u8 = 0x15;
pub const UFFD_EVENT_UNMAP: u8 = 0x16;
/// `struct uffd_msg`: the event byte, 7 bytes of padding, then the event's union of
/// three u64 words: a page fault's flags and address; a fork's new descriptor (u32);
/// a remap's from, to and len; a remove's or unmap's start and end.
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
pub fn open(addr: u64, len: u64, features: u64) -> std::io::Result<OwnedFd> {
    // SAFETY: userfaultfd(2) takes flags only; it returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) }
        as libc::c_int;
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        return Err(std::io::Error::new(
            e.kind(),
            format!("userfaultfd(2): {e}; run as root, or set vm.unprivileged_userfaultfd=1"),
        ));
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
            let e = std::io::Error::last_os_error();
            return Err(std::io::Error::new(
                e.kind(),
                format!("UFFDIO_API / UFFDIO_REGISTER: {e}"),
            ));
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
    past_existing(len, |at| {
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
        (rc, c.copy)
    })
}

/// UFFDIO_ZEROPAGE: maps the zero page over [dst, dst + len) and wakes its waiters,
/// continuing past pages already there (EEXIST). Returns the bytes this call mapped;
/// EAGAIN as [`copy`].
pub fn zeropage(uffd: &OwnedFd, dst: u64, len: u64) -> std::io::Result<u64> {
    past_existing(len, |at| {
        let mut z = UffdioZeropage {
            start: dst + at,
            len: len - at,
            mode: 0,
            zeropage: 0,
        };
        // SAFETY: the ioctl takes a pointer to this struct, alive for the call; the
        // kernel writes only `z.zeropage`.
        let rc = unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_ZEROPAGE as _, &mut z) };
        (rc, z.zeropage)
    })
}

/// Runs `fill` (one ioctl from offset `at` on, returning its result and the bytes it
/// did, or a negative errno) until `len` bytes are done, stepping over a page already
/// there (EEXIST); any other error ends it. Returns the bytes the ioctls did.
fn past_existing(
    len: u64,
    mut fill: impl FnMut(u64) -> (libc::c_int, i64),
) -> std::io::Result<u64> {
    let (mut at, mut done) = (0u64, 0u64);
    while at < len {
        let (rc, n) = fill(at);
        if n > 0 {
            at += n as u64;
            done += n as u64;
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
    Ok(done)
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

/// One `struct uffd_msg`. Not `Copy`: a fork's message carries a descriptor that
/// [`Msg::into_event`] takes ownership of once.
#[derive(Debug)]
pub struct Msg {
    pub event: u8,
    pub arg: [u64; 3],
}

/// A message, typed.
#[derive(Debug)]
pub enum Event {
    /// A thread waits on the missing page at this (page-aligned) address.
    PageFault(u64),
    /// The task forked; the child's memory is registered with this new descriptor.
    Fork(OwnedFd),
    /// `mremap` moved `len` bytes from `from` to `to`.
    Remap {
        from: u64,
        to: u64,
        len: u64,
    },
    /// `madvise(MADV_DONTNEED/REMOVE)` dropped [start, end): it reads zeros now.
    Remove {
        start: u64,
        end: u64,
    },
    /// `munmap` (or a mapping over it) took [start, end) away.
    Unmap {
        start: u64,
        end: u64,
    },
    Unknown(u8),
}

impl Msg {
    /// A page fault's address, down to its page.
    pub fn fault_page(&self) -> u64 {
        self.arg[1] & !(PAGE - 1)
    }

    pub fn into_event(self) -> Event {
        match self.event {
            UFFD_EVENT_PAGEFAULT => Event::PageFault(self.fault_page()),
            UFFD_EVENT_FORK => {
                // SAFETY: read(2) of a fork message installed this descriptor in our
                // table; `self` is consumed, so it is owned exactly once.
                Event::Fork(unsafe { OwnedFd::from_raw_fd(self.arg[0] as u32 as RawFd) })
            }
            UFFD_EVENT_REMAP => Event::Remap {
                from: self.arg[0],
                to: self.arg[1],
                len: self.arg[2],
            },
            UFFD_EVENT_REMOVE => Event::Remove {
                start: self.arg[0],
                end: self.arg[1],
            },
            UFFD_EVENT_UNMAP => Event::Unmap {
                start: self.arg[0],
                end: self.arg[1],
            },
            other => Event::Unknown(other),
        }
    }
}

/// Whether `uffd` has something to read, waiting up to `timeout_ms`.
pub fn readable(uffd: &OwnedFd, timeout_ms: i32) -> bool {
    !ready(&[uffd.as_fd()], timeout_ms).is_empty()
}

/// The indices of `fds` with something to read (or hung up), waiting up to
/// `timeout_ms` for any.
pub fn ready(fds: &[BorrowedFd<'_>], timeout_ms: i32) -> Vec<usize> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|fd| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: `pfds` is a valid array of pollfd for the call.
    let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, timeout_ms) };
    if n <= 0 {
        return Vec::new();
    }
    (0..pfds.len()).filter(|&i| pfds[i].revents != 0).collect()
}

/// The messages waiting on `uffd` (a non-blocking one), up to 16; none when there
/// was nothing left to read.
pub fn read(uffd: &OwnedFd) -> std::io::Result<Vec<Msg>> {
    let mut buf = [0u8; MSG_LEN * 16];
    // SAFETY: reads into `buf`, which outlives the call.
    let n = unsafe { libc::read(uffd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EAGAIN) => Ok(Vec::new()),
            _ => Err(e),
        };
    }
    let word = |m: &[u8], i: usize| u64::from_ne_bytes(m[i..i + 8].try_into().expect("8 bytes"));
    Ok(buf[..n as usize]
        .chunks_exact(MSG_LEN)
        .map(|m| Msg {
            event: m[0],
            arg: [word(m, 8), word(m, 16), word(m, 24)],
        })
        .collect())
}
