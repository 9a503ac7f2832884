//! Separated mode: the weights layer of a snapshot, read from and filled into the
//! node's weights service (`snapreg-weights`).
//!
//! Checkpoint: [`WeightsPlan::prepare`] refuses a tree that still holds a buffer, and
//! names the buffers its processes released; [`upload_layer`] turns them into the
//! `weights` layer, through the same uploader as the CRIU images and concurrently
//! with the dump. A buffer the service knows to hold a layer file the registry
//! already has (it was filled from the registry, or uploaded before) costs neither a
//! read nor an upload.
//!
//! Restore: [`fill_layer`] fills each buffer from the node cache and the registry
//! while CRIU restores the much smaller process image, then seals it (workers waiting
//! to re-attach get it then); [`resume`] signals the quiesced processes.

use std::io::Read;
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use snapreg_proto::manifest::{Extent, File, Layer, LayerKind};
use snapreg_weights::{BackendKind, Mapping, WeightsClient};

use crate::error::{ClientError, Result};
use crate::fetch::Chunks;
use crate::push::Uploader;

/// Layer name, so `snapctl pull` puts the buffers under `weights/`.
pub const LAYER_NAME: &str = "weights";
/// Chunk fetches in flight while filling one buffer.
const FILL_WINDOW: usize = 32;

fn service_error(e: snapreg_weights::Error) -> ClientError {
    ClientError::Weights(e.to_string())
}

/// A blocking call to the weights service (or a mapping) off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> snapreg_weights::Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ClientError::Weights(e.to_string()))?
        .map_err(service_error)
}

/// What a checkpoint takes from the weights service.
pub struct WeightsPlan {
    client: WeightsClient,
    buffers: Vec<snapreg_weights::BufferInfo>,
    /// (pid, signal) of each quiesced process of the tree.
    pub resume: Vec<(u32, i32)>,
}

impl WeightsPlan {
    /// Refuses a tree that holds a buffer (a lease, or a memfd still mapped or
    /// open): its CUDA restore would fail, or its image would carry the weights.
    pub fn prepare(socket: &Path, pids: &[u32]) -> Result<Self> {
        let client = WeightsClient::new(socket);
        let listing = client.list().map_err(service_error)?;
        let mut held = Vec::new();
        for b in &listing.buffers {
            for p in b.leases.iter().filter(|p| pids.contains(p)) {
                held.push(format!("PID {p} holds {}", b.name));
            }
        }
        if listing.backend == Some(BackendKind::Memfd) {
            for p in pids {
                for name in snapreg_weights::memfd_buffers_held_by(*p) {
                    held.push(format!("PID {p} still maps or holds {name}"));
                }
            }
        }
        held.sort();
        held.dedup();
        if !held.is_empty() {
            return Err(ClientError::Usage(format!(
                "the worker has not quiesced: {}. Call quiesce() in the worker (it unmaps the weights and releases them) before checkpointing; nothing was dumped",
                held.join("; ")
            )));
        }
        let quiesced: Vec<_> = listing
            .quiesced
            .iter()
            .filter(|q| pids.contains(&q.pid))
            .collect();
        if quiesced.is_empty() {
            return Err(ClientError::Usage(format!(
                "no process of the tree released weights to {}: quiesce the worker first, or drop --weights-service",
                socket.display()
            )));
        }
        let mut names: Vec<&String> = quiesced.iter().flat_map(|q| &q.names).collect();
        names.sort();
        names.dedup();
        let buffers = names
            .iter()
            .map(|n| {
                listing
                    .buffers
                    .iter()
                    .find(|b| &&b.name == n)
                    .cloned()
                    .ok_or_else(|| {
                        ClientError::Weights(format!(
                            "the worker released {n}, but the service no longer has it"
                        ))
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(WeightsPlan {
            client,
            buffers,
            resume: quiesced.iter().map(|q| (q.pid, q.signal)).collect(),
        })
    }

    pub fn resume_annotation(&self) -> String {
        self.resume
            .iter()
            .map(|(p, s)| format!("{p}:{s}"))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Reads a mapping front to back, for the chunker.
struct MappingReader {
    mapping: Mapping,
    pos: u64,
    end: u64,
}

impl Read for MappingReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (self.end - self.pos).min(buf.len() as u64) as usize;
        self.mapping
            .read_at(self.pos, &mut buf[..n])
            .map_err(std::io::Error::other)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// The weights layer: each released buffer as a file of the layer.
pub async fn upload_layer(plan: Arc<WeightsPlan>, uploader: Arc<Uploader>) -> Result<Layer> {
    let mut files = Vec::new();
    for b in &plan.buffers {
        if let Some(known) = known_file(b, uploader.key_id().as_deref()) {
            let digests: Vec<_> = known
                .extents
                .iter()
                .filter_map(|e| match e {
                    Extent::Chunk { chunk, .. } => Some(*chunk),
                    Extent::Zero { .. } => None,
                })
                .collect();
            if uploader.all_present(&digests).await? {
                tracing::info!(name = b.name, "weights already in the registry: not read");
                uploader.progress().add_total(known.size);
                uploader
                    .progress()
                    .counters
                    .bytes_total
                    .fetch_add(known.size, Relaxed);
                files.push(known);
                continue;
            }
        }
        let client = plan.client.clone();
        let name = b.name.clone();
        let (info, mapping) = blocking(move || client.read_buffer(&name)).await?;
        uploader.progress().add_total(info.size);
        let reader = MappingReader {
            mapping,
            pos: 0,
            end: info.size,
        };
        let extents = uploader.chunk_stream(reader, true).await?;
        let file = File {
            path: info.name.clone(),
            size: info.size,
            mode: 0o600,
            extents,
        };
        // Remember what the buffer holds, so the next checkpoint needs not read it.
        let client = plan.client.clone();
        let content = content_record(&file, uploader.key_id());
        let name = info.name.clone();
        let _ = blocking(move || client.seal(&name, content)).await;
        files.push(file);
    }
    Ok(Layer {
        kind: LayerKind::Weights,
        name: Some(LAYER_NAME.into()),
        rank: None,
        files,
    })
}

/// What the service records about a buffer's content: the layer file (its chunk
/// digests) and the tenant key those chunks are encrypted with, if any.
fn content_record(file: &File, key_id: Option<String>) -> Option<serde_json::Value> {
    let mut v = serde_json::to_value(file).ok()?;
    if let Some(id) = key_id {
        v["key_id"] = id.into();
    }
    Some(v)
}

/// The layer file a buffer is known to hold, when the service recorded one with
/// chunks under `key_id` (digests under another key name other bytes).
fn known_file(b: &snapreg_weights::BufferInfo, key_id: Option<&str>) -> Option<File> {
    let content = b.content.clone()?;
    if content.get("key_id").and_then(|v| v.as_str()) != key_id {
        return None;
    }
    let f: File = serde_json::from_value(content).ok()?;
    (f.path == b.name && f.size == b.size).then_some(f)
}

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct FillReport {
    pub buffers: usize,
    /// Buffers the service already held with exactly this content.
    pub buffers_reused: usize,
    pub bytes_filled: u64,
    pub seconds: f64,
    /// From the restore's start until every buffer was filled and sealed.
    pub in_at_seconds: Option<f64>,
}

/// Fills the service's buffers with the weights layer (its chunks encrypted under
/// `key_id`, if any); each is sealed when complete.
pub async fn fill_layer(
    socket: &Path,
    layer: &Layer,
    key_id: Option<String>,
    source: Chunks,
) -> Result<FillReport> {
    let started = Instant::now();
    let client = WeightsClient::new(socket);
    let c = client.clone();
    let listing = blocking(move || c.list()).await?;
    let mut report = FillReport {
        buffers: layer.files.len(),
        ..FillReport::default()
    };
    for file in &layer.files {
        let reusable = listing.buffers.iter().any(|b| {
            b.name == file.path
                && b.sealed
                && known_file(b, key_id.as_deref()).as_ref() == Some(file)
        });
        if reusable {
            report.buffers_reused += 1;
            continue;
        }
        let c = client.clone();
        let (name, size) = (file.path.clone(), file.size);
        let (_, backend, mapping) = blocking(move || c.fill_buffer(&name, size)).await?;
        let mapping = Arc::new(mapping);
        let mut offset = 0u64;
        let mut work = Vec::new();
        for e in &file.extents {
            match *e {
                Extent::Chunk { chunk, len } => work.push((offset, chunk, len)),
                // A fresh memfd reads as zeros; device memory does not.
                Extent::Zero { zero } if backend == BackendKind::Cuda => {
                    let m = mapping.clone();
                    let at = offset;
                    blocking(move || m.zero(at, zero)).await?;
                }
                Extent::Zero { .. } => {}
            }
            offset += e.len();
        }
        let mut writes = futures::stream::iter(work)
            .map(|(at, digest, len)| {
                let source = source.clone();
                let mapping = mapping.clone();
                let path = file.path.clone();
                async move {
                    let data = source.get(digest, &path).await?;
                    if data.len() as u64 != len {
                        return Err(ClientError::ChunkCorrupt {
                            digest,
                            file: path,
                            reason: format!("{} bytes where the manifest says {len}", data.len()),
                        });
                    }
                    blocking(move || mapping.write_at(at, &data)).await?;
                    Ok::<u64, ClientError>(len)
                }
            })
            .buffer_unordered(FILL_WINDOW);
        while let Some(n) = writes.next().await {
            report.bytes_filled += n?;
        }
        drop(writes);
        drop(mapping);
        let c = client.clone();
        let (name, content) = (file.path.clone(), content_record(file, key_id.clone()));
        blocking(move || c.seal(&name, content)).await?;
    }
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// `pid:signal` pairs from the manifest annotation.
pub fn resume_list(annotation: Option<&String>) -> Vec<(u32, i32)> {
    annotation
        .map(|v| {
            v.split(',')
                .filter_map(|p| {
                    let (pid, sig) = p.split_once(':')?;
                    Some((pid.parse().ok()?, sig.parse().ok()?))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Tells each restored worker its weights are back.
pub fn resume(list: &[(u32, i32)]) -> Result<()> {
    for &(pid, sig) in list {
        let signal = nix::sys::signal::Signal::try_from(sig)
            .map_err(|e| ClientError::Weights(format!("restored PID {pid}: signal {sig}: {e}")))?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal).map_err(|e| {
            ClientError::Weights(format!("signalling restored PID {pid} to resume: {e}"))
        })?;
    }
    Ok(())
}
