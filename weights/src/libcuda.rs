//! The one loader of NVIDIA's driver library, shared by everything that calls CUDA:
//! the weights service's CUDA backend (cuda.rs beside this file) and snapctl's
//! checkpoint API driver and GPU facts (client/src/cuda.rs).
//!
//! libcuda is loaded at run time with `dlopen("libcuda.so.1")`: nothing CUDA is needed
//! to build, and a host without the driver gets `None` (each caller turns that into
//! the advice that fits its command). The library is opened once per process and
//! never closed, so every symbol taken from it stays valid for the life of the
//! process. Callers that need the driver initialised call `cuInit` themselves: reading
//! the driver's version must not pay for it (≈2.7 s on a GPU host).

use std::ffi::{c_int, c_void, CStr};
use std::sync::OnceLock;

/// The soname the driver installs (the unversioned `libcuda.so` comes only with the
/// toolkit).
pub const SONAME: &CStr = c"libcuda.so.1";

/// The loaded driver library.
pub struct LibCuda {
    handle: *mut c_void,
}

// SAFETY: the handle is only passed to dlsym, which is thread-safe, and the library
// is never unloaded, so sharing the handle between threads cannot dangle.
unsafe impl Send for LibCuda {}
// SAFETY: as for Send: LibCuda has no interior mutability.
unsafe impl Sync for LibCuda {}

static LOADED: OnceLock<Option<LibCuda>> = OnceLock::new();

/// The driver library, or `None` on a host without the NVIDIA driver.
pub fn open() -> Option<&'static LibCuda> {
    LOADED
        .get_or_init(|| {
            // SAFETY: dlopen with a constant NUL-terminated name; loading libcuda runs
            // only its own initialisers, which NVIDIA documents as safe at any time.
            let handle =
                unsafe { libc::dlopen(SONAME.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
            (!handle.is_null()).then_some(LibCuda { handle })
        })
        .as_ref()
}

impl LibCuda {
    /// The entry point `name` as the function pointer type `F`, or `None` when this
    /// driver lacks it (an older driver than the API needs).
    ///
    /// # Safety
    /// `F` must be an `unsafe extern "C" fn` type matching the C signature of `name`
    /// in the CUDA driver API (cuda.h).
    pub unsafe fn function<F: Copy>(&self, name: &CStr) -> Option<F> {
        assert_eq!(
            std::mem::size_of::<F>(),
            std::mem::size_of::<*mut c_void>(),
            "a function pointer type"
        );
        // SAFETY: the handle came from dlopen and is never closed; the name is a
        // NUL-terminated C string.
        let p = unsafe { libc::dlsym(self.handle, name.as_ptr()) };
        // SAFETY: `p` is the address of the driver function `name`, and the caller
        // guarantees `F` is that function's pointer type (same size, checked above).
        (!p.is_null()).then(|| unsafe { std::mem::transmute_copy::<*mut c_void, F>(&p) })
    }

    /// The CUDA driver API version (`cuDriverGetVersion`, e.g. 12080), which needs no
    /// `cuInit`; `None` when the driver does not answer.
    pub fn driver_version(&self) -> Option<i32> {
        type VersionFn = unsafe extern "C" fn(*mut c_int) -> c_int;
        // SAFETY: cuDriverGetVersion is `CUresult cuDriverGetVersion(int *)`.
        let f: VersionFn = unsafe { self.function(c"cuDriverGetVersion") }?;
        let mut version = 0;
        // SAFETY: the function writes one int through a pointer to a live local.
        (unsafe { f(&mut version) } == 0).then_some(version)
    }
}
