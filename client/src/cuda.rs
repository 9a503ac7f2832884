//! NVIDIA's CUDA checkpoint API, driven from snapctl.
//!
//! `cuCheckpointProcessLock / Checkpoint / Restore / Unlock / GetState` move another
//! process's device state into its host memory and back, so CRIU can dump it as
//! ordinary pages. libcuda is loaded at run time (no CUDA toolkit to build), and one
//! process drives every PID of a tree: each separate checkpoint tool pays `cuInit`
//! (≈2.7 s measured by NVIDIA's NVCF team) again.
//!
//! States (CUprocessState): 0 running, 1 locked, 2 checkpointed, 3 failed.

use std::ffi::{c_int, c_uint, c_void, CStr};

use snapreg_proto::compat::{GpuDevice, GpuRecord};

use crate::error::{ClientError, Result};

pub const STATE_RUNNING: c_int = 0;
pub const STATE_LOCKED: c_int = 1;
pub const STATE_CHECKPOINTED: c_int = 2;
/// How long a lock waits for in-flight work (kernels, copies) to finish.
const LOCK_TIMEOUT_MS: u32 = 30_000;

type PidFn = unsafe extern "C" fn(c_int, *mut c_void) -> c_int;
type StateFn = unsafe extern "C" fn(c_int, *mut c_int) -> c_int;

#[repr(C)]
struct LockArgs {
    timeout_ms: c_uint,
    reserved0: c_uint,
    reserved1: [u64; 7],
}

/// The loaded driver. Every call goes through these pointers; the library stays
/// loaded for the life of the process.
pub struct Cuda {
    lock: PidFn,
    checkpoint: PidFn,
    restore: PidFn,
    unlock: PidFn,
    get_state: StateFn,
    pub driver_api: i32,
}

// SAFETY: the function pointers are thread-safe driver entry points.
unsafe impl Send for Cuda {}
unsafe impl Sync for Cuda {}

fn sym(lib: *mut c_void, name: &CStr) -> Option<*mut c_void> {
    let p = unsafe { libc::dlsym(lib, name.as_ptr()) };
    (!p.is_null()).then_some(p)
}

impl Cuda {
    /// Loads libcuda and initialises it. Errors say which of "no driver", "driver too
    /// old for the checkpoint API" it is.
    pub fn load() -> Result<Cuda> {
        let lib =
            unsafe { libc::dlopen(c"libcuda.so.1".as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if lib.is_null() {
            return Err(ClientError::Cuda(
                "no NVIDIA driver: libcuda.so.1 cannot be loaded on this host (install the driver, or drop --cuda)".into(),
            ));
        }
        let init: unsafe extern "C" fn(c_uint) -> c_int = unsafe {
            std::mem::transmute(
                sym(lib, c"cuInit")
                    .ok_or_else(|| ClientError::Cuda("libcuda has no cuInit".into()))?,
            )
        };
        let version: unsafe extern "C" fn(*mut c_int) -> c_int = unsafe {
            std::mem::transmute(
                sym(lib, c"cuDriverGetVersion")
                    .ok_or_else(|| ClientError::Cuda("libcuda has no cuDriverGetVersion".into()))?,
            )
        };
        let mut driver_api = 0;
        unsafe { version(&mut driver_api) };
        let pid_fn = |name: &CStr| -> Result<PidFn> {
            sym(lib, name).map(|p| unsafe { std::mem::transmute::<*mut c_void, PidFn>(p) }).ok_or_else(|| {
                ClientError::Cuda(format!(
                    "the NVIDIA driver (CUDA driver API {driver_api}) is too old for the checkpoint API ({} missing): use driver 570 or newer",
                    name.to_string_lossy()
                ))
            })
        };
        let cuda = Cuda {
            lock: pid_fn(c"cuCheckpointProcessLock")?,
            checkpoint: pid_fn(c"cuCheckpointProcessCheckpoint")?,
            restore: pid_fn(c"cuCheckpointProcessRestore")?,
            unlock: pid_fn(c"cuCheckpointProcessUnlock")?,
            get_state: unsafe {
                std::mem::transmute::<*mut c_void, StateFn>(
                    pid_fn(c"cuCheckpointProcessGetState")? as *mut c_void
                )
            },
            driver_api,
        };
        let rc = unsafe { init(0) };
        if rc != 0 {
            return Err(ClientError::Cuda(format!(
                "cuInit failed with CUDA error {rc}: no usable GPU on this host?"
            )));
        }
        Ok(cuda)
    }

    fn call(&self, what: &str, f: PidFn, pid: u32, args: *mut c_void) -> Result<()> {
        match unsafe { f(pid as c_int, args) } {
            0 => Ok(()),
            rc => Err(ClientError::Cuda(format!(
                "{what} of PID {pid} failed with CUDA error {rc}"
            ))),
        }
    }

    /// `None` when the process does not use CUDA (the driver knows nothing of it).
    pub fn state(&self, pid: u32) -> Option<c_int> {
        let mut st = -1;
        (unsafe { (self.get_state)(pid as c_int, &mut st) } == 0).then_some(st)
    }

    pub fn lock(&self, pid: u32) -> Result<()> {
        let mut args = LockArgs {
            timeout_ms: LOCK_TIMEOUT_MS,
            reserved0: 0,
            reserved1: [0; 7],
        };
        self.call(
            "cuCheckpointProcessLock",
            self.lock,
            pid,
            (&mut args as *mut LockArgs).cast(),
        )
    }

    pub fn checkpoint(&self, pid: u32) -> Result<()> {
        self.call(
            "cuCheckpointProcessCheckpoint",
            self.checkpoint,
            pid,
            std::ptr::null_mut(),
        )
    }

    pub fn restore(&self, pid: u32) -> Result<()> {
        self.call(
            "cuCheckpointProcessRestore",
            self.restore,
            pid,
            std::ptr::null_mut(),
        )
    }

    pub fn unlock(&self, pid: u32) -> Result<()> {
        self.call(
            "cuCheckpointProcessUnlock",
            self.unlock,
            pid,
            std::ptr::null_mut(),
        )
    }
}

/// This host's GPUs for a compatibility record, read without initialising CUDA (so a
/// restore checks compatibility before CRIU starts and runs `cuInit` beside it):
/// models from /proc/driver/nvidia/gpus/<bus id>/information in bus order, the driver
/// from /sys/module/nvidia/version, the CUDA driver API from cuDriverGetVersion.
/// `None` on a host without the NVIDIA driver.
pub fn host_gpu() -> Option<GpuRecord> {
    let driver_version = std::fs::read_to_string("/sys/module/nvidia/version")
        .ok()?
        .trim()
        .to_string();
    let mut buses: Vec<_> = std::fs::read_dir("/proc/driver/nvidia/gpus")
        .ok()?
        .flatten()
        .map(|e| e.path())
        .collect();
    buses.sort();
    let devices = buses
        .iter()
        .filter_map(|b| {
            let info = std::fs::read_to_string(b.join("information")).ok()?;
            let model = info
                .lines()
                .find_map(|l| l.strip_prefix("Model:"))?
                .trim()
                .to_string();
            Some(GpuDevice { model, uuid: None })
        })
        .collect();
    let mut cuda_driver_api = 0;
    let lib = unsafe { libc::dlopen(c"libcuda.so.1".as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if !lib.is_null() {
        if let Some(f) = sym(lib, c"cuDriverGetVersion") {
            let f: unsafe extern "C" fn(*mut c_int) -> c_int = unsafe { std::mem::transmute(f) };
            unsafe { f(&mut cuda_driver_api) };
        }
    }
    // MIG profiles are not read yet: a MIG-partitioned node records none.
    Some(GpuRecord {
        devices,
        driver_version,
        cuda_driver_api: cuda_driver_api as u32,
        mig_profile: None,
    })
}

/// The CUDA processes of a tree, checkpointed into host memory. Until `forget`, the
/// guard's `release` (restore + unlock) is what puts a worker back to serving.
pub struct Checkpointed<'a> {
    cuda: &'a Cuda,
    pub pids: Vec<u32>,
    /// Per PID, the address ranges the checkpoint added: device memory copied to host.
    pub device_ranges: std::collections::HashMap<u32, Vec<(u64, u64)>>,
}

/// Locks, then checkpoints, every CUDA process among `pids`, and checks each reports
/// CHECKPOINTED. Any failure restores and unlocks what was done, so the worker keeps
/// serving.
pub fn checkpoint_tree<'a>(cuda: &'a Cuda, pids: &[u32]) -> Result<Checkpointed<'a>> {
    let users: Vec<u32> = pids
        .iter()
        .copied()
        .filter(|p| cuda.state(*p) == Some(STATE_RUNNING))
        .collect();
    if users.is_empty() {
        return Err(ClientError::Cuda(format!(
            "no process of the tree ({}) uses CUDA (or is already locked): drop --cuda",
            pids.iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(" ")
        )));
    }
    let mut locked = Vec::new();
    for &p in &users {
        if let Err(e) = cuda.lock(p) {
            for &l in &locked {
                let _ = cuda.unlock(l);
            }
            return Err(e);
        }
        locked.push(p);
    }
    let mut guard = Checkpointed {
        cuda,
        pids: Vec::new(),
        device_ranges: Default::default(),
    };
    for &p in &users {
        let before = crate::device_memory::mappings(p);
        if let Err(e) = cuda.checkpoint(p).and_then(|()| match cuda.state(p) {
            Some(STATE_CHECKPOINTED) => Ok(()),
            other => Err(ClientError::Cuda(format!(
                "PID {p} is in CUDA state {other:?} after checkpoint, not CHECKPOINTED"
            ))),
        }) {
            guard.release();
            for &l in &users {
                if cuda.state(l) == Some(STATE_LOCKED) {
                    let _ = cuda.unlock(l);
                }
            }
            return Err(e);
        }
        guard.pids.push(p);
        let added = crate::device_memory::new_ranges(&before, &crate::device_memory::mappings(p));
        guard.device_ranges.insert(p, added);
    }
    Ok(guard)
}

impl Checkpointed<'_> {
    /// Restores device state and unlocks: the worker serves again.
    pub fn release(&mut self) {
        for p in self.pids.drain(..) {
            if let Err(e) = self.cuda.restore(p).and_then(|()| self.cuda.unlock(p)) {
                tracing::error!("putting PID {p} back on its GPU failed: {e}");
            }
        }
    }

    /// The processes are gone (CRIU killed them after the commit): nothing to undo.
    pub fn forget(mut self) {
        self.pids.clear();
    }
}

impl Drop for Checkpointed<'_> {
    fn drop(&mut self) {
        self.release();
    }
}

/// After CRIU restored the tree: device state back, then unlock, for each PID.
pub fn restore_pids(cuda: &Cuda, pids: &[u32]) -> Result<()> {
    for &p in pids {
        cuda.restore(p)?;
        cuda.unlock(p)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CI machines have no NVIDIA driver: the error must say so, not crash.
    #[test]
    fn no_driver_is_a_clear_error() {
        if std::path::Path::new("/proc/driver/nvidia").exists() {
            return; // a GPU host: the device-side tests cover it
        }
        let e = Cuda::load().err().expect("no driver here").to_string();
        assert!(
            e.contains("no NVIDIA driver") && e.contains("libcuda.so.1"),
            "{e}"
        );
    }
}
