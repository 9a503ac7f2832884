//! NVIDIA's CUDA checkpoint API, driven from snapctl.
//!
//! `cuCheckpointProcessLock / Checkpoint / Restore / Unlock / GetState` move another
//! process's device state into its host memory and back, so CRIU can dump it as
//! ordinary pages. libcuda is loaded at run time by [`snapreg_weights::libcuda`] (no
//! CUDA toolkit to build), and one
//! process drives every PID of a tree: each separate checkpoint tool pays `cuInit`
//! (≈2.7 s measured by NVIDIA's NVCF team) again.
//!
//! States (CUprocessState): 0 running, 1 locked, 2 checkpointed, 3 failed.

use std::ffi::{c_int, c_uint, c_void, CStr};

use snapreg_proto::compat::{GpuDevice, GpuRecord};
use snapreg_weights::libcuda;

use crate::error::{ClientError, Result};

pub const STATE_RUNNING: c_int = 0;
pub const STATE_LOCKED: c_int = 1;
pub const STATE_CHECKPOINTED: c_int = 2;
/// How long a lock waits for in-flight work (kernels, copies) to finish.
const LOCK_TIMEOUT_MS: u32 = 30_000;

type PidFn = unsafe extern "C" fn(c_int, *mut c_void) -> c_int;
type StateFn = unsafe extern "C" fn(c_int, *mut c_int) -> c_int;

/// CUcheckpointGpuPair: a GPU of the snapshot and the GPU to restore it on, by UUID.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GpuPair {
    pub old_uuid: [u8; 16],
    pub new_uuid: [u8; 16],
}

/// CUcheckpointRestoreArgs (CUDA 12.8+).
#[repr(C)]
struct RestoreArgs {
    gpu_pairs: *const GpuPair,
    gpu_pairs_count: c_uint,
    reserved: [u8; 52],
    reserved1: u64,
}

/// "GPU-6d1f3e2a-…" (as /proc/driver/nvidia and nvidia-smi print it) as 16 bytes.
pub fn parse_uuid(text: &str) -> Option<[u8; 16]> {
    let hex: String = text
        .trim()
        .trim_start_matches("GPU-")
        .chars()
        .filter(|c| *c != '-')
        .collect();
    let bytes = hex::decode(hex).ok()?;
    bytes.try_into().ok()
}

/// `--gpu-map OLD=NEW,…`: each side a device index (the snapshot's order, this host's
/// order) or a GPU UUID. Every GPU of the snapshot must be mapped.
pub fn gpu_pairs(map: &str, snapshot: &GpuRecord, host: &GpuRecord) -> Result<Vec<GpuPair>> {
    let pick = |side: &str, devices: &[GpuDevice], which: &str| -> Result<[u8; 16]> {
        let uuid = match side.parse::<usize>() {
            Ok(i) => devices
                .get(i)
                .ok_or_else(|| {
                    ClientError::Usage(format!(
                        "--gpu-map: {which} has no GPU {i} ({} GPUs)",
                        devices.len()
                    ))
                })?
                .uuid
                .clone()
                .ok_or_else(|| {
                    ClientError::Usage(format!(
                        "--gpu-map: {which} recorded no GPU UUIDs (a snapshot taken before snapreg recorded them): map by UUID"
                    ))
                })?,
            Err(_) => side.to_string(),
        };
        parse_uuid(&uuid)
            .ok_or_else(|| ClientError::Usage(format!("--gpu-map: {uuid:?} is not a GPU UUID")))
    };
    let mut pairs = Vec::new();
    for item in map.split(',').filter(|s| !s.trim().is_empty()) {
        let (old, new) = item
            .split_once('=')
            .ok_or_else(|| ClientError::Usage(format!("--gpu-map: {item:?} is not OLD=NEW")))?;
        pairs.push(GpuPair {
            old_uuid: pick(old.trim(), &snapshot.devices, "the snapshot")?,
            new_uuid: pick(new.trim(), &host.devices, "this host")?,
        });
    }
    if pairs.len() != snapshot.devices.len() {
        return Err(ClientError::Usage(format!(
            "--gpu-map names {} GPU(s); the snapshot used {}: map every one",
            pairs.len(),
            snapshot.devices.len()
        )));
    }
    Ok(pairs)
}

#[repr(C)]
struct LockArgs {
    timeout_ms: c_uint,
    reserved0: c_uint,
    reserved1: [u64; 7],
}

/// The checkpoint API of the loaded driver (libcuda through
/// [`snapreg_weights::libcuda`], the one loader both crates share). The library stays
/// loaded for the life of the process.
pub struct Cuda {
    lock: PidFn,
    checkpoint: PidFn,
    restore: PidFn,
    unlock: PidFn,
    get_state: StateFn,
    pub driver_api: i32,
}

impl Cuda {
    /// Loads libcuda and initialises it. Errors say which of "no driver", "driver too
    /// old for the checkpoint API" it is.
    pub fn load() -> Result<Cuda> {
        let lib = libcuda::open().ok_or_else(|| {
            ClientError::Cuda(
                "no NVIDIA driver: libcuda.so.1 cannot be loaded on this host (install the driver, or drop --cuda)".into(),
            )
        })?;
        type InitFn = unsafe extern "C" fn(c_uint) -> c_int;
        // SAFETY: cuInit is `CUresult cuInit(unsigned int)`.
        let init: InitFn = unsafe { lib.function(c"cuInit") }
            .ok_or_else(|| ClientError::Cuda("libcuda has no cuInit".into()))?;
        let driver_api = lib.driver_version().unwrap_or(0);
        let missing = |name: &CStr| {
            ClientError::Cuda(format!(
                "the NVIDIA driver (CUDA driver API {driver_api}) is too old for the checkpoint API ({} missing): use driver 570 or newer",
                name.to_string_lossy()
            ))
        };
        // SAFETY: the four cuCheckpointProcess{Lock,Checkpoint,Restore,Unlock} entry
        // points are `CUresult f(int pid, <args> *)`, which is PidFn.
        let pid_fn =
            |name: &CStr| unsafe { lib.function::<PidFn>(name) }.ok_or_else(|| missing(name));
        let cuda = Cuda {
            lock: pid_fn(c"cuCheckpointProcessLock")?,
            checkpoint: pid_fn(c"cuCheckpointProcessCheckpoint")?,
            restore: pid_fn(c"cuCheckpointProcessRestore")?,
            unlock: pid_fn(c"cuCheckpointProcessUnlock")?,
            // SAFETY: `CUresult cuCheckpointProcessGetState(int pid, CUprocessState *)`,
            // an enum of C int size.
            get_state: unsafe { lib.function(c"cuCheckpointProcessGetState") }
                .ok_or_else(|| missing(c"cuCheckpointProcessGetState"))?,
            driver_api,
        };
        // SAFETY: cuInit takes flags by value; 0 is the only defined value.
        let rc = unsafe { init(0) };
        if rc != 0 {
            return Err(ClientError::Cuda(format!(
                "cuInit failed with CUDA error {rc}: no usable GPU on this host?"
            )));
        }
        Ok(cuda)
    }

    fn call(&self, what: &str, f: PidFn, pid: u32, args: *mut c_void) -> Result<()> {
        // SAFETY: `f` is one of the PidFn entry points, and `args` is null or points
        // to the repr(C) argument struct that entry point documents, alive for the call.
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
        // SAFETY: the driver writes one CUprocessState (a C int) through the pointer.
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

    /// Puts `pid`'s device state back; with `gpu_pairs` (old UUID, new UUID), on the
    /// GPUs they name instead of the ones it was checkpointed on.
    pub fn restore(&self, pid: u32, gpu_pairs: &[GpuPair]) -> Result<()> {
        if gpu_pairs.is_empty() {
            return self.call(
                "cuCheckpointProcessRestore",
                self.restore,
                pid,
                std::ptr::null_mut(),
            );
        }
        let mut args = RestoreArgs {
            gpu_pairs: gpu_pairs.as_ptr(),
            gpu_pairs_count: gpu_pairs.len() as c_uint,
            reserved: [0; 52],
            reserved1: 0,
        };
        self.call(
            "cuCheckpointProcessRestore (with --gpu-map)",
            self.restore,
            pid,
            &mut args as *mut RestoreArgs as *mut c_void,
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
            let field = |name: &str| {
                info.lines()
                    .find_map(|l| l.strip_prefix(name))
                    .map(|v| v.trim().to_string())
            };
            Some(GpuDevice {
                model: field("Model:")?,
                uuid: field("GPU UUID:"),
            })
        })
        .collect();
    let cuda_driver_api = libcuda::open()
        .and_then(|lib| lib.driver_version())
        .unwrap_or(0);
    Some(GpuRecord {
        devices,
        driver_version,
        cuda_driver_api: cuda_driver_api as u32,
        mig_profile: mig_profile(),
    })
}

/// The MIG instances' profiles ("1g.10gb,1g.10gb"), when MIG instances exist. Their
/// presence shows in /proc (no process spawned on the usual, MIG-less host); their
/// profile names only through nvidia-smi.
fn mig_profile() -> Option<String> {
    let caps = std::fs::read_dir("/proc/driver/nvidia/capabilities").ok()?;
    let has_instances = caps.flatten().any(|gpu| {
        std::fs::read_dir(gpu.path().join("mig")).is_ok_and(|mut d| {
            d.any(|e| e.is_ok_and(|e| e.file_name().to_string_lossy().starts_with("gi")))
        })
    });
    if !has_instances {
        return None;
    }
    let out = std::process::Command::new("nvidia-smi")
        .arg("-L")
        .output()
        .ok()?;
    let profiles: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let rest = l.trim().strip_prefix("MIG ")?;
            Some(rest.split_whitespace().next()?.to_string())
        })
        .collect();
    (!profiles.is_empty()).then(|| profiles.join(","))
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
            if let Err(e) = self.cuda.restore(p, &[]).and_then(|()| self.cuda.unlock(p)) {
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
pub fn restore_pids(cuda: &Cuda, pids: &[u32], gpu_pairs: &[GpuPair]) -> Result<()> {
    for &p in pids {
        cuda.restore(p, gpu_pairs)?;
        cuda.unlock(p)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(uuids: &[&str]) -> GpuRecord {
        GpuRecord {
            devices: uuids
                .iter()
                .map(|u| GpuDevice {
                    model: "NVIDIA H100 80GB HBM3".into(),
                    uuid: Some(u.to_string()),
                })
                .collect(),
            driver_version: "580.159.04".into(),
            cuda_driver_api: 13000,
            mig_profile: None,
        }
    }

    #[test]
    fn gpu_map_pairs_snapshot_gpus_with_host_gpus_by_index_or_uuid() {
        let a = "GPU-00000000-0000-0000-0000-00000000000a";
        let b = "GPU-00000000-0000-0000-0000-00000000000b";
        let c = "GPU-00000000-0000-0000-0000-00000000000c";
        let snap = record(&[a, b]);
        let host = record(&[c, a]);
        let pairs = gpu_pairs(&format!("0=1,{b}=0"), &snap, &host).unwrap();
        assert_eq!(pairs[0].old_uuid, parse_uuid(a).unwrap());
        assert_eq!(pairs[0].new_uuid, parse_uuid(a).unwrap());
        assert_eq!(pairs[1].old_uuid, parse_uuid(b).unwrap());
        assert_eq!(pairs[1].new_uuid, parse_uuid(c).unwrap());
        assert_eq!(parse_uuid(a).unwrap()[15], 0x0a);
        for bad in ["0=1", "0=5,1=0", "0=1,1=nope", "0"] {
            let e = gpu_pairs(bad, &snap, &host).unwrap_err();
            assert_eq!(e.kind(), crate::error::ErrorKind::Usage, "{bad}: {e}");
        }
        assert_eq!(std::mem::size_of::<RestoreArgs>(), 72);
    }

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
