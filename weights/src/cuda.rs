//! The CUDA backend: weight buffers as CUDA virtual-memory allocations (cuMemCreate)
//! exported as POSIX file descriptors, mapped by each client into an address range it
//! reserved itself (the pattern of NVIDIA Dynamo's GPU Memory Service).
//!
//! libcuda is loaded at run time through [`crate::libcuda`]: nothing CUDA is needed to
//! build, and a host without a driver gets a clear error. Host↔device copies go through pinned staging buffers
//! (55 GB/s against 7.6 GB/s from pageable memory, measured on an H100).

use std::ffi::{c_int, c_uint, c_void, CStr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Condvar, Mutex, OnceLock};

use crate::{Error, Result};

type CuResult = c_int;
const POSIX_FD: c_int = 1; // CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
const ALLOCATION_PINNED: c_int = 1; // CU_MEM_ALLOCATION_TYPE_PINNED
const LOCATION_DEVICE: c_int = 1; // CU_MEM_LOCATION_TYPE_DEVICE
const ACCESS_READ: c_int = 1; // CU_MEM_ACCESS_FLAGS_PROT_READ
const ACCESS_READWRITE: c_int = 3;
/// One staging buffer: the default chunker's largest chunk, so a chunk write fills
/// one. Pinned memory is resident whole, and 8 MiB buffers for chunks of ~0.5 MiB
/// kept 64 MiB of snapctl's RSS pinned during a fill (separated `--lazy` peaked at
/// 274 MiB on an H100, bench/RESULTS.md); larger writes go through in pieces.
const STAGING_BYTES: usize = 2 << 20;
/// At most this many staging buffers (16 MiB pinned): `cuMemcpyHtoD` and
/// `cuMemcpyDtoH` on the default stream run one at a time anyway, so more only grew
/// the process (32 concurrent chunk writes held 256 MiB of pinned memory).
const STAGING_BUFFERS: usize = 8;

#[repr(C)]
#[derive(Default)]
struct Location {
    kind: c_int,
    id: c_int,
}

/// CUmemAllocationProp (32 bytes).
#[repr(C)]
#[derive(Default)]
struct AllocationProp {
    kind: c_int,
    requested_handle_types: c_int,
    location: Location,
    win32_handle_meta_data: usize,
    alloc_flags: [u8; 8],
}

#[repr(C)]
struct AccessDesc {
    location: Location,
    flags: c_int,
}

struct Driver {
    device_primary_ctx_retain: unsafe extern "C" fn(*mut *mut c_void, c_int) -> CuResult,
    ctx_set_current: unsafe extern "C" fn(*mut c_void) -> CuResult,
    granularity: unsafe extern "C" fn(*mut usize, *const AllocationProp, c_int) -> CuResult,
    create: unsafe extern "C" fn(*mut u64, usize, *const AllocationProp, u64) -> CuResult,
    export: unsafe extern "C" fn(*mut c_void, u64, c_int, u64) -> CuResult,
    import: unsafe extern "C" fn(*mut u64, *mut c_void, c_int) -> CuResult,
    release: unsafe extern "C" fn(u64) -> CuResult,
    address_reserve: unsafe extern "C" fn(*mut u64, usize, usize, u64, u64) -> CuResult,
    address_free: unsafe extern "C" fn(u64, usize) -> CuResult,
    map: unsafe extern "C" fn(u64, usize, usize, u64, u64) -> CuResult,
    unmap: unsafe extern "C" fn(u64, usize) -> CuResult,
    set_access: unsafe extern "C" fn(u64, usize, *const AccessDesc, usize) -> CuResult,
    htod: unsafe extern "C" fn(u64, *const c_void, usize) -> CuResult,
    dtoh: unsafe extern "C" fn(*mut c_void, u64, usize) -> CuResult,
    memset: unsafe extern "C" fn(u64, u8, usize) -> CuResult,
    host_alloc: unsafe extern "C" fn(*mut *mut c_void, usize, c_uint) -> CuResult,
    device_get: unsafe extern "C" fn(*mut c_int, c_int) -> CuResult,
}

/// The loaded driver, bound to one device's primary context.
pub struct Cuda {
    d: Driver,
    ctx: usize,
    pub device: i32,
    granularity: u64,
    /// Pinned host buffers, reused across copies (never freed: they live as long as
    /// the process, like the context); a copy waits on `staging_freed` for one when
    /// all STAGING_BUFFERS are in use.
    staging: Mutex<Staging>,
    staging_freed: Condvar,
}

#[derive(Default)]
struct Staging {
    free: Vec<usize>,
    allocated: usize,
}

fn check(what: &str, rc: CuResult) -> Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(Error::Cuda(format!("{what} failed with CUDA error {rc}")))
    }
}

static LOADED: OnceLock<std::result::Result<Cuda, String>> = OnceLock::new();

/// The driver for device `device` (the first call decides the device).
pub fn get(device: i32) -> Result<&'static Cuda> {
    let loaded = LOADED.get_or_init(|| Cuda::load(device).map_err(|e| e.to_string()));
    match loaded {
        Ok(c) if c.device == device => Ok(c),
        Ok(c) => Err(Error::Cuda(format!(
            "this process already drives CUDA device {}, not {device}",
            c.device
        ))),
        Err(e) => Err(Error::Cuda(e.clone())),
    }
}

impl Cuda {
    fn load(device: i32) -> Result<Cuda> {
        let lib = crate::libcuda::open().ok_or_else(|| {
            Error::Cuda(
                "no NVIDIA driver: libcuda.so.1 cannot be loaded on this host (use --backend memfd on CPU-only nodes)".into(),
            )
        })?;
        let missing = |name: &CStr| {
            Error::Cuda(format!(
                "the NVIDIA driver lacks {} (virtual memory management needs CUDA 10.2 or newer)",
                name.to_string_lossy()
            ))
        };
        macro_rules! f {
            ($name:literal) => {
                // SAFETY: each field's type is the cuda.h signature of the entry point
                // named beside it.
                unsafe { lib.function($name) }.ok_or_else(|| missing($name))?
            };
        }
        let init: unsafe extern "C" fn(c_uint) -> CuResult = f!(c"cuInit");
        let d = Driver {
            device_primary_ctx_retain: f!(c"cuDevicePrimaryCtxRetain"),
            ctx_set_current: f!(c"cuCtxSetCurrent"),
            granularity: f!(c"cuMemGetAllocationGranularity"),
            create: f!(c"cuMemCreate"),
            export: f!(c"cuMemExportToShareableHandle"),
            import: f!(c"cuMemImportFromShareableHandle"),
            release: f!(c"cuMemRelease"),
            address_reserve: f!(c"cuMemAddressReserve"),
            address_free: f!(c"cuMemAddressFree"),
            map: f!(c"cuMemMap"),
            unmap: f!(c"cuMemUnmap"),
            set_access: f!(c"cuMemSetAccess"),
            htod: f!(c"cuMemcpyHtoD_v2"),
            dtoh: f!(c"cuMemcpyDtoH_v2"),
            memset: f!(c"cuMemsetD8_v2"),
            host_alloc: f!(c"cuMemHostAlloc"),
            device_get: f!(c"cuDeviceGet"),
        };
        // SAFETY (every driver call below): the pointer fields hold the cuda.h entry
        // points of their signatures (see `f!`), and each pointer argument points to a
        // live local or field of the right type for the duration of the call.
        check("cuInit (no usable GPU on this host?)", unsafe { init(0) })?;
        let mut dev = 0;
        // SAFETY: as above; `dev` outlives the call.
        check(&format!("cuDeviceGet({device})"), unsafe {
            (d.device_get)(&mut dev, device)
        })?;
        let mut ctx = std::ptr::null_mut();
        // SAFETY: `ctx` is a live out-pointer; `dev` came from cuDeviceGet.
        check("cuDevicePrimaryCtxRetain", unsafe {
            (d.device_primary_ctx_retain)(&mut ctx, dev)
        })?;
        let mut cuda = Cuda {
            d,
            ctx: ctx as usize,
            device,
            granularity: 0,
            staging: Mutex::default(),
            staging_freed: Condvar::new(),
        };
        cuda.current()?;
        let mut g = 0usize;
        // SAFETY: `g` and the property struct (repr(C), cuda.h layout) outlive the call.
        check("cuMemGetAllocationGranularity", unsafe {
            (cuda.d.granularity)(&mut g, &cuda.prop(), 0)
        })?;
        cuda.granularity = g.max(1) as u64;
        Ok(cuda)
    }

    fn prop(&self) -> AllocationProp {
        AllocationProp {
            kind: ALLOCATION_PINNED,
            requested_handle_types: POSIX_FD,
            location: Location {
                kind: LOCATION_DEVICE,
                id: self.device,
            },
            ..AllocationProp::default()
        }
    }

    /// Makes the context current on the calling thread (a cheap call; every entry
    /// point does it, since blocking-pool threads come and go).
    fn current(&self) -> Result<()> {
        // SAFETY: `ctx` is the primary context retained in `load`, never released.
        check("cuCtxSetCurrent", unsafe {
            (self.d.ctx_set_current)(self.ctx as *mut c_void)
        })
    }

    pub fn round_up(&self, size: u64) -> u64 {
        size.div_ceil(self.granularity).max(1) * self.granularity
    }

    /// A new device allocation of at least `size` bytes: (handle, allocated size).
    pub fn create(&self, size: u64) -> Result<(u64, u64)> {
        self.current()?;
        let alloc = self.round_up(size);
        let mut h = 0u64;
        check(
            &format!("cuMemCreate of {alloc} bytes (GPU memory full?)"),
            // SAFETY: `h` and the property struct outlive the call.
            unsafe { (self.d.create)(&mut h, alloc as usize, &self.prop(), 0) },
        )?;
        Ok((h, alloc))
    }

    pub fn export(&self, handle: u64) -> Result<OwnedFd> {
        self.current()?;
        let mut fd: c_int = -1;
        // SAFETY: for POSIX_FD handles the driver writes one int through the pointer.
        check("cuMemExportToShareableHandle", unsafe {
            (self.d.export)(&mut fd as *mut c_int as *mut c_void, handle, POSIX_FD, 0)
        })?;
        // SAFETY: on success the driver created this descriptor for the caller, who
        // owns it from now on.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    pub fn release(&self, handle: u64) {
        if self.current().is_ok() {
            // SAFETY: plain values; a stale handle is reported by the driver, not UB.
            unsafe { (self.d.release)(handle) };
        }
    }

    pub fn reserve(&self, len: u64) -> Result<u64> {
        self.current()?;
        let mut va = 0u64;
        // SAFETY: `va` is a live out-pointer; the rest are plain values.
        check("cuMemAddressReserve", unsafe {
            (self.d.address_reserve)(&mut va, len as usize, self.granularity as usize, 0, 0)
        })?;
        Ok(va)
    }

    pub fn free_reservation(&self, va: u64, len: u64) {
        if self.current().is_ok() {
            // SAFETY: plain values; the driver checks the range is a reservation.
            unsafe { (self.d.address_free)(va, len as usize) };
        }
    }

    /// Imports `fd` and maps it at `va` (a reservation of ours): returns the imported
    /// handle, which must be released after unmapping.
    pub fn map(&self, fd: OwnedFd, va: u64, len: u64, writable: bool) -> Result<u64> {
        self.current()?;
        let mut h = 0u64;
        // SAFETY: for POSIX_FD the handle argument is the descriptor itself, open for
        // the whole call; the driver does not take it over (it is closed below).
        let rc =
            unsafe { (self.d.import)(&mut h, fd.as_raw_fd() as usize as *mut c_void, POSIX_FD) };
        drop(fd);
        check("cuMemImportFromShareableHandle", rc)?;
        // SAFETY: plain values; `va..va+len` is a reservation of ours (the caller's
        // contract), so the mapping cannot land on memory Rust owns.
        if let Err(e) = check("cuMemMap", unsafe {
            (self.d.map)(va, len as usize, 0, h, 0)
        }) {
            self.release(h);
            return Err(e);
        }
        let access = AccessDesc {
            location: Location {
                kind: LOCATION_DEVICE,
                id: self.device,
            },
            flags: if writable {
                ACCESS_READWRITE
            } else {
                ACCESS_READ
            },
        };
        // SAFETY: `access` (repr(C), cuda.h layout) outlives the call; count 1.
        if let Err(e) = check("cuMemSetAccess", unsafe {
            (self.d.set_access)(va, len as usize, &access, 1)
        }) {
            self.unmap(va, len, h);
            return Err(e);
        }
        Ok(h)
    }

    /// Unmaps and releases the imported handle; the reservation stays.
    pub fn unmap(&self, va: u64, len: u64, handle: u64) {
        if self.current().is_ok() {
            // SAFETY: plain values; the range is one this process mapped.
            unsafe {
                (self.d.unmap)(va, len as usize);
                (self.d.release)(handle);
            }
        }
    }

    fn with_staging<T>(&self, f: impl FnOnce(*mut u8) -> Result<T>) -> Result<T> {
        let buf = self.take_staging()?;
        let out = f(buf as *mut u8);
        self.staging.lock().unwrap().free.push(buf);
        self.staging_freed.notify_one();
        out
    }

    /// A free staging buffer, a new one while fewer than STAGING_BUFFERS exist, or
    /// the next one freed.
    fn take_staging(&self) -> Result<usize> {
        let mut pool = self.staging.lock().unwrap();
        loop {
            if let Some(b) = pool.free.pop() {
                return Ok(b);
            }
            if pool.allocated < STAGING_BUFFERS {
                let mut p = std::ptr::null_mut();
                // SAFETY: `p` is a live out-pointer.
                check("cuMemHostAlloc (pinned staging)", unsafe {
                    (self.d.host_alloc)(&mut p, STAGING_BYTES, 0)
                })?;
                pool.allocated += 1;
                return Ok(p as usize);
            }
            pool = self.staging_freed.wait(pool).unwrap();
        }
    }

    pub fn write(&self, va: u64, data: &[u8]) -> Result<()> {
        self.current()?;
        for (i, piece) in data.chunks(STAGING_BYTES).enumerate() {
            let dst = va + (i * STAGING_BYTES) as u64;
            self.with_staging(|buf| {
                // SAFETY: `buf` is a pinned allocation of STAGING_BYTES, not aliased
                // (taken off the pool), and a piece is at most STAGING_BYTES long.
                unsafe { std::ptr::copy_nonoverlapping(piece.as_ptr(), buf, piece.len()) };
                // SAFETY: the driver reads `piece.len()` bytes of that buffer.
                check("cuMemcpyHtoD", unsafe {
                    (self.d.htod)(dst, buf as *const c_void, piece.len())
                })
            })?;
        }
        Ok(())
    }

    pub fn read(&self, va: u64, out: &mut [u8]) -> Result<()> {
        self.current()?;
        for (i, piece) in out.chunks_mut(STAGING_BYTES).enumerate() {
            let src = va + (i * STAGING_BYTES) as u64;
            self.with_staging(|buf| {
                // SAFETY: the driver writes `piece.len()` (≤ STAGING_BYTES) bytes into
                // the pinned buffer, which nothing else uses meanwhile.
                check("cuMemcpyDtoH", unsafe {
                    (self.d.dtoh)(buf as *mut c_void, src, piece.len())
                })?;
                // SAFETY: as in `write`, in the other direction.
                unsafe { std::ptr::copy_nonoverlapping(buf, piece.as_mut_ptr(), piece.len()) };
                Ok(())
            })?;
        }
        Ok(())
    }

    pub fn zero(&self, va: u64, len: u64) -> Result<()> {
        self.current()?;
        // SAFETY: plain values; the driver checks the device range.
        check("cuMemsetD8", unsafe {
            (self.d.memset)(va, 0, len as usize)
        })
    }
}
