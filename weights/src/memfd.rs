//! The memfd backend: weight buffers in shared memory, for CPU-only nodes (and CI).
//!
//! Each buffer is a memfd named `snapreg-weights:NAME`, so a mapping of it shows in
//! /proc/PID/maps under that name: unlike CUDA memory, a memfd left mapped by a worker
//! can be seen from outside ([`mapped_by`]).

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::{Error, Result};

/// The prefix every buffer's memfd name carries.
pub const NAME_PREFIX: &str = "snapreg-weights:";

pub struct MemfdAllocation {
    fd: OwnedFd,
    size: u64,
}

impl MemfdAllocation {
    pub fn new(name: &str, size: u64) -> Result<Self> {
        let cname = CString::new(format!("{NAME_PREFIX}{name}"))
            .map_err(|_| Error::Invalid(format!("buffer name {name:?} contains a NUL byte")))?;
        // SAFETY: a valid C string; the returned descriptor is owned below.
        let raw = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(Error::io("memfd_create", std::io::Error::last_os_error()));
        }
        // SAFETY: memfd_create just returned this descriptor; nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: ftruncate on our open descriptor; no memory involved.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) } != 0 {
            return Err(Error::io(
                format!("sizing a {size}-byte memfd (is /dev/shm or memory full?)"),
                std::io::Error::last_os_error(),
            ));
        }
        Ok(MemfdAllocation { fd, size })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// A descriptor for a client. Read-only descriptors are a new open file
    /// description (through /proc), so a reader cannot map the buffer writable.
    pub fn export(&self, writable: bool) -> Result<OwnedFd> {
        if writable {
            return self
                .fd
                .try_clone()
                .map_err(|e| Error::io("duplicating a memfd", e));
        }
        let path = format!("/proc/self/fd/{}", self.fd.as_raw_fd());
        std::fs::OpenOptions::new()
            .read(true)
            .open(&path)
            .map(OwnedFd::from)
            .map_err(|e| Error::io(format!("reopening {path} read-only"), e))
    }
}

/// Reserves `len` bytes of address space, mapping nothing.
pub fn reserve(len: u64) -> Result<u64> {
    map_anon(0, len, 0)
}

fn map_anon(addr: u64, len: u64, fixed: libc::c_int) -> Result<u64> {
    // SAFETY: an anonymous PROT_NONE mapping; with MAP_FIXED it replaces only the
    // range this crate mapped itself.
    let p = unsafe {
        libc::mmap(
            addr as *mut libc::c_void,
            len as usize,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | fixed,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(Error::io(
            "reserving address space",
            std::io::Error::last_os_error(),
        ));
    }
    Ok(p as u64)
}

/// Maps the buffer over the reserved range at `addr`.
pub fn map_at(fd: &OwnedFd, addr: u64, len: u64, writable: bool) -> Result<()> {
    let prot = if writable {
        libc::PROT_READ | libc::PROT_WRITE
    } else {
        libc::PROT_READ
    };
    // SAFETY: `addr..addr+len` is a reservation owned by the caller's mapping.
    let p = unsafe {
        libc::mmap(
            addr as *mut libc::c_void,
            len as usize,
            prot,
            libc::MAP_SHARED | libc::MAP_FIXED,
            fd.as_raw_fd(),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(Error::io(
            "mapping a weight buffer",
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Replaces the mapping with an empty reservation: the range stays ours, the buffer
/// is no longer referenced by this process.
pub fn unmap_keep_reservation(addr: u64, len: u64) -> Result<()> {
    map_anon(addr, len, libc::MAP_FIXED).map(|_| ())
}

pub fn free(addr: u64, len: u64) {
    // SAFETY: the range was mapped by this crate and nothing points into it any more.
    unsafe { libc::munmap(addr as *mut libc::c_void, len as usize) };
}

/// Weight buffers `pid` still has mapped or open, by memfd name.
pub fn mapped_by(pid: u32) -> Vec<String> {
    let mut out = Vec::new();
    let marker = format!("/memfd:{NAME_PREFIX}");
    if let Ok(maps) = std::fs::read_to_string(format!("/proc/{pid}/maps")) {
        for line in maps.lines() {
            if let Some(i) = line.find(&marker) {
                out.push(buffer_name(&line[i + marker.len()..]));
            }
        }
    }
    if let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                if let Some(rest) = target.to_string_lossy().strip_prefix(&marker) {
                    out.push(buffer_name(rest));
                }
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

fn buffer_name(rest: &str) -> String {
    rest.trim_end_matches(" (deleted)").to_string()
}
