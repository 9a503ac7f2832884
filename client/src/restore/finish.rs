//! Stage 3 of a restore, after CRIU returned: the weights the workers wait for, their
//! GPU state, and the signal that lets them go on. A tree whose weights or GPU state
//! cannot come back is killed rather than left half-alive.

use std::path::Path;
use std::time::Instant;

use snapreg_proto::manifest::Layer;
use tokio::task::JoinHandle;

use super::plan::Plan;
use crate::cuda::Cuda;
use crate::error::{ClientError, Result};
use crate::fetch::Chunks;
use crate::progress::Progress;
use crate::weights::{self, FillReport};

/// Separated mode: fills the weights layer into the service at `socket` while CRIU
/// restores the process and the CUDA state comes back, so the restore takes
/// max(process, weights), not the sum. The workers need their weights only when they
/// are resumed: a worker quiesced before its checkpoint holds no mapping of a weights
/// buffer, so its CUDA restore reads nothing the fill writes.
pub(super) fn start_weights_fill(
    plan: &Plan,
    socket: Option<&Path>,
    chunks: &Chunks,
    progress: &Progress,
    started: Instant,
) -> Option<WeightsFill> {
    let (layer, socket): (Layer, _) = (plan.weights_layer.clone()?, socket?.to_path_buf());
    let key_id = plan.manifest.encryption.as_ref().map(|e| e.key_id.clone());
    progress.add_total(layer.files.iter().map(|f| f.size).sum());
    let chunks = chunks.clone();
    Some(WeightsFill(tokio::spawn(async move {
        let mut filled = weights::fill_layer(&socket, &layer, key_id, chunks).await;
        if let Ok(r) = &mut filled {
            r.in_at_seconds = Some(started.elapsed().as_secs_f64());
        }
        filled
    })))
}

/// The weights fill under way; stopped if the restore gives up before waiting for it.
pub(super) struct WeightsFill(JoinHandle<Result<FillReport>>);

impl Drop for WeightsFill {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Waits for the weights fill, after the CUDA restore; if it failed, the workers
/// waiting for those weights are killed (they would wait forever).
pub(super) async fn weights_filled(
    fill: Option<WeightsFill>,
    plan: &Plan,
) -> Result<Option<FillReport>> {
    let Some(mut fill) = fill else {
        return Ok(None);
    };
    let filled = (&mut fill.0)
        .await
        .map_err(|e| ClientError::Weights(e.to_string()))
        .and_then(|r| r);
    match filled {
        Ok(r) => Ok(Some(r)),
        Err(e) => {
            kill(plan.resume.iter().map(|(p, _)| *p));
            Err(e)
        }
    }
}

/// Starts loading libcuda for a CUDA snapshot (cuInit costs seconds): call before
/// CRIU starts so it overlaps the restore.
pub(super) fn start_cuda_init(plan: &Plan) -> Option<JoinHandle<Result<Cuda>>> {
    (!plan.cuda_pids.is_empty()).then(|| tokio::task::spawn_blocking(Cuda::load))
}

/// Puts each CUDA process's GPU state back (restore + unlock), returning the seconds
/// it took; kills the tree's CUDA processes if it fails.
pub(super) async fn restore_cuda(
    init: Option<JoinHandle<Result<Cuda>>>,
    plan: &Plan,
) -> Result<Option<f64>> {
    let Some(init) = init else {
        return Ok(None);
    };
    let started = Instant::now();
    let done = init
        .await
        .map_err(|e| ClientError::Cuda(e.to_string()))
        .and_then(|loaded| loaded)
        .and_then(|cuda| crate::cuda::restore_pids(&cuda, &plan.cuda_pids, &plan.gpu_pairs));
    if let Err(e) = done {
        // A process whose GPU state cannot come back must not linger half-alive.
        kill(plan.cuda_pids.iter().copied());
        return Err(e);
    }
    Ok(Some(started.elapsed().as_secs_f64()))
}

fn kill(pids: impl Iterator<Item = u32>) {
    for p in pids {
        let pid = nix::unistd::Pid::from_raw(p as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
    }
}
