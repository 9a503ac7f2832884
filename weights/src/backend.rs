//! The two places a weight buffer can live, behind one surface: the service allocates
//! and exports ([`Allocation`]); a client maps what it receives ([`Mapping`]).

use std::os::fd::OwnedFd;

use serde::{Deserialize, Serialize};

use crate::{cuda, memfd, Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Hash)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// CUDA virtual-memory allocations exported as POSIX descriptors (GPU nodes).
    Cuda,
    /// Shared-memory files (CPU-only nodes, CI).
    Memfd,
}

impl std::str::FromStr for BackendKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "cuda" => Ok(BackendKind::Cuda),
            "memfd" => Ok(BackendKind::Memfd),
            other => Err(format!("unknown backend {other:?}: use cuda or memfd")),
        }
    }
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BackendKind::Cuda => "cuda",
            BackendKind::Memfd => "memfd",
        })
    }
}

/// A buffer the service owns.
pub(crate) enum Allocation {
    Memfd(memfd::MemfdAllocation),
    Cuda {
        cuda: &'static cuda::Cuda,
        handle: u64,
        size: u64,
    },
}

impl Allocation {
    pub fn new(kind: BackendKind, device: i32, name: &str, size: u64) -> Result<Self> {
        match kind {
            BackendKind::Memfd => Ok(Allocation::Memfd(memfd::MemfdAllocation::new(name, size)?)),
            BackendKind::Cuda => {
                let cuda = cuda::get(device)?;
                let (handle, size) = cuda.create(size)?;
                Ok(Allocation::Cuda { cuda, handle, size })
            }
        }
    }

    pub fn alloc_size(&self) -> u64 {
        match self {
            Allocation::Memfd(m) => m.size(),
            Allocation::Cuda { size, .. } => *size,
        }
    }

    /// A descriptor for one client; read-only where the backend can enforce it (a
    /// CUDA importer chooses its own access flags).
    pub fn export(&self, writable: bool) -> Result<OwnedFd> {
        match self {
            Allocation::Memfd(m) => m.export(writable),
            Allocation::Cuda { cuda, handle, .. } => cuda.export(*handle),
        }
    }
}

impl Drop for Allocation {
    fn drop(&mut self) {
        if let Allocation::Cuda { cuda, handle, .. } = self {
            cuda.release(*handle);
        }
    }
}

/// A weight buffer mapped into this process at an address range it reserved. The
/// range survives [`Mapping::unmap`] (a quiesced worker keeps its pointers valid) and
/// is freed on drop.
pub struct Mapping {
    kind: BackendKind,
    device: i32,
    addr: u64,
    len: u64,
    writable: bool,
    /// The imported CUDA handle while mapped; memfd mappings need none.
    cuda_handle: Option<u64>,
    mapped: bool,
}

/// Maps `fd` (as received from the service) into a fresh reservation of `len` bytes.
pub fn open_mapping(
    kind: BackendKind,
    device: i32,
    fd: OwnedFd,
    len: u64,
    writable: bool,
) -> Result<Mapping> {
    let addr = match kind {
        BackendKind::Memfd => memfd::reserve(len)?,
        BackendKind::Cuda => cuda::get(device)?.reserve(len)?,
    };
    let mut m = Mapping {
        kind,
        device,
        addr,
        len,
        writable,
        cuda_handle: None,
        mapped: false,
    };
    m.map(fd)?;
    Ok(m)
}

impl Mapping {
    /// Host address (memfd) or device address (CUDA) of the first byte.
    pub fn addr(&self) -> u64 {
        self.addr
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn is_writable(&self) -> bool {
        self.writable
    }

    pub fn is_mapped(&self) -> bool {
        self.mapped
    }

    /// Maps `fd` at this mapping's address again (after [`Mapping::unmap`]).
    pub fn map(&mut self, fd: OwnedFd) -> Result<()> {
        if self.mapped {
            return Err(Error::Invalid("the buffer is already mapped".into()));
        }
        match self.kind {
            BackendKind::Memfd => memfd::map_at(&fd, self.addr, self.len, self.writable)?,
            BackendKind::Cuda => {
                let h = cuda::get(self.device)?.map(fd, self.addr, self.len, self.writable)?;
                self.cuda_handle = Some(h);
            }
        }
        self.mapped = true;
        Ok(())
    }

    /// Drops every reference to the buffer; the address range stays reserved.
    pub fn unmap(&mut self) -> Result<()> {
        if !self.mapped {
            return Ok(());
        }
        match self.kind {
            BackendKind::Memfd => memfd::unmap_keep_reservation(self.addr, self.len)?,
            BackendKind::Cuda => {
                if let Some(h) = self.cuda_handle.take() {
                    cuda::get(self.device)?.unmap(self.addr, self.len, h);
                }
            }
        }
        self.mapped = false;
        Ok(())
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        if !self.mapped {
            return Err(Error::Invalid("the buffer is not mapped".into()));
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(Error::Invalid(format!(
                "{len} bytes at offset {offset} do not fit a {}-byte buffer",
                self.len
            ))),
        }
    }

    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.check_range(offset, data.len() as u64)?;
        if !self.writable {
            return Err(Error::Invalid("the buffer is mapped read-only".into()));
        }
        match self.kind {
            // SAFETY: in range (checked) of a writable shared mapping we own.
            BackendKind::Memfd => unsafe {
                std::ptr::copy_nonoverlapping(
                    data.as_ptr(),
                    (self.addr + offset) as *mut u8,
                    data.len(),
                );
                Ok(())
            },
            BackendKind::Cuda => cuda::get(self.device)?.write(self.addr + offset, data),
        }
    }

    pub fn read_at(&self, offset: u64, out: &mut [u8]) -> Result<()> {
        self.check_range(offset, out.len() as u64)?;
        match self.kind {
            // SAFETY: in range (checked) of a readable mapping we own.
            BackendKind::Memfd => unsafe {
                std::ptr::copy_nonoverlapping(
                    (self.addr + offset) as *const u8,
                    out.as_mut_ptr(),
                    out.len(),
                );
                Ok(())
            },
            BackendKind::Cuda => cuda::get(self.device)?.read(self.addr + offset, out),
        }
    }

    pub fn zero(&self, offset: u64, len: u64) -> Result<()> {
        self.check_range(offset, len)?;
        match self.kind {
            // SAFETY: as in write_at.
            BackendKind::Memfd => unsafe {
                std::ptr::write_bytes((self.addr + offset) as *mut u8, 0, len as usize);
                Ok(())
            },
            BackendKind::Cuda => cuda::get(self.device)?.zero(self.addr + offset, len),
        }
    }

    /// The bytes of a memfd mapping, for callers that hash or compute on them in
    /// place. `None` on CUDA (device memory).
    pub fn host_slice(&self) -> Option<&[u8]> {
        (self.kind == BackendKind::Memfd && self.mapped).then(|| {
            // SAFETY: a readable mapping of `len` bytes that lives as long as `self`.
            unsafe { std::slice::from_raw_parts(self.addr as *const u8, self.len as usize) }
        })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        let _ = self.unmap();
        match self.kind {
            BackendKind::Memfd => memfd::free(self.addr, self.len),
            BackendKind::Cuda => {
                if let Ok(c) = cuda::get(self.device) {
                    c.free_reservation(self.addr, self.len)
                }
            }
        }
    }
}

// SAFETY: the mapping is plain memory (or device memory driven through a thread-safe
// driver); writes to disjoint ranges from several threads are the intended use.
unsafe impl Send for Mapping {}
// SAFETY: as for Send: shared access only reads or writes through checked ranges.
unsafe impl Sync for Mapping {}
