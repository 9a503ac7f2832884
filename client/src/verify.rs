//! `snapctl verify REF`: fetch every chunk of a snapshot from the registry, check it
//! against its digest and the length its extents give it, and name the file of each
//! one that fails. Nothing is written to disk and the node cache is bypassed: the
//! point is the registry's copy.
//!
//! Every chunk is checked even after a failure, so one run lists all the damage. A
//! chunk the registry no longer holds (e.g. quarantined by `snapreg scrub`) counts as
//! damaged too: the snapshot cannot be restored without it.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use futures::StreamExt;
use snapreg_proto::manifest::Extent;
use snapreg_proto::reference::Reference;
use snapreg_proto::{codec, Digest};

use crate::error::{ClientError, Result};
use crate::progress::{CountersSnapshot, Progress};
use crate::pull;
use crate::remote::Remote;

#[derive(Debug, serde::Serialize)]
pub struct VerifyReport {
    pub reference: String,
    pub digest: String,
    pub files: usize,
    #[serde(flatten)]
    pub counters: CountersSnapshot,
    pub chunks_ok: u64,
    pub damaged: Vec<DamagedChunk>,
    pub seconds: f64,
}

#[derive(Debug, serde::Serialize)]
pub struct DamagedChunk {
    pub digest: String,
    /// Every file (`layer/path`) that uses the chunk.
    pub files: Vec<String>,
    pub reason: String,
}

impl VerifyReport {
    /// The integrity error for a report with damage (exit code 5), naming every
    /// damaged chunk and its files.
    pub fn failure(&self) -> Option<ClientError> {
        let first = self.damaged.first()?;
        let mut reason = first.reason.clone();
        if self.damaged.len() > 1 {
            let more: Vec<String> = self.damaged[1..]
                .iter()
                .map(|d| format!("{} of {} ({})", d.digest, d.files.join(", "), d.reason))
                .collect();
            reason += &format!("; also damaged: {}", more.join("; "));
        }
        Some(ClientError::ChunkCorrupt {
            digest: first.digest.parse().unwrap_or_else(|_| Digest::of(b"")),
            file: first.files.join(", "),
            reason,
        })
    }
}

pub async fn verify(
    remote: &Remote,
    reference: &Reference,
    window: usize,
    progress: Progress,
) -> Result<VerifyReport> {
    let started = Instant::now();
    let (digest, manifest) = pull::fetch_manifest(remote, reference).await?;
    // digest -> (length every extent gives it, files that use it), first use first.
    let mut order: Vec<Digest> = Vec::new();
    let mut uses: HashMap<Digest, (u64, Vec<String>)> = HashMap::new();
    let mut files = 0;
    let counters = progress.counters.clone();
    for layer in &manifest.layers {
        for f in &layer.files {
            files += 1;
            let shown = match &layer.name {
                Some(n) => format!("{n}/{}", f.path),
                None => f.path.clone(),
            };
            for e in &f.extents {
                match *e {
                    Extent::Chunk { chunk, len } => {
                        let u = uses.entry(chunk).or_insert_with(|| {
                            order.push(chunk);
                            (len, Vec::new())
                        });
                        if u.1.last() != Some(&shown) {
                            u.1.push(shown.clone());
                        }
                        // Two extents giving one chunk two lengths: one of them is wrong.
                        if u.0 != len {
                            u.0 = u64::MAX;
                        }
                    }
                    Extent::Zero { zero } => {
                        counters.zero_bytes.fetch_add(zero, Relaxed);
                    }
                }
            }
        }
    }
    let stored: u64 = order
        .iter()
        .map(|d| uses[d].0.min(codec::MAX_CHUNK_LEN as u64))
        .sum();
    counters.bytes_total.store(manifest.total_size(), Relaxed);
    counters.chunks_total.store(order.len() as u64, Relaxed);
    progress.add_total(stored);

    let checks = futures::stream::iter(order.iter().copied())
        .map(|d| {
            let expected_len = uses[&d].0;
            async move { (d, check_chunk(remote, d, expected_len).await) }
        })
        .buffer_unordered(window.max(1));
    let mut checks = std::pin::pin!(checks);
    let mut damaged = Vec::new();
    let mut chunks_ok = 0;
    while let Some((d, outcome)) = checks.next().await {
        match outcome? {
            Ok((object_len, data_len)) => {
                chunks_ok += 1;
                counters.chunks_transferred.fetch_add(1, Relaxed);
                counters.bytes_transferred.fetch_add(object_len, Relaxed);
                progress.advance(data_len);
            }
            Err(reason) => damaged.push(DamagedChunk {
                digest: d.to_string(),
                files: uses[&d].1.clone(),
                reason,
            }),
        }
    }
    progress.finish();
    // Report in manifest order whatever order the checks finished in.
    let rank: HashMap<Digest, usize> = order.iter().enumerate().map(|(i, d)| (*d, i)).collect();
    damaged.sort_by_key(|b| {
        b.digest
            .parse::<Digest>()
            .ok()
            .and_then(|d| rank.get(&d).copied())
    });
    Ok(VerifyReport {
        reference: reference.to_string(),
        digest: digest.to_string(),
        files,
        counters: counters.snapshot(),
        chunks_ok,
        damaged,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Ok(Ok((object bytes, chunk bytes))) when the chunk verifies, Ok(Err(reason)) when
/// it is damaged or missing, Err when the registry cannot be asked at all.
async fn check_chunk(
    remote: &Remote,
    d: Digest,
    expected_len: u64,
) -> Result<std::result::Result<(u64, u64), String>> {
    let mut stream = match remote.get_chunks(&[d]).await {
        Ok(s) => s,
        Err(ClientError::NotFound(m)) => {
            return Ok(Err(format!("missing from the registry ({m})")))
        }
        Err(e) => return Err(e),
    };
    let msg = match stream.next().await {
        Some(Ok(m)) => m,
        Some(Err(s)) => {
            return match remote.map_stream_error(s) {
                ClientError::NotFound(m) => Ok(Err(format!("missing from the registry ({m})"))),
                ClientError::Registry(m) => Ok(Err(m)),
                e => Err(e),
            }
        }
        None => return Ok(Err("the registry sent nothing for it".into())),
    };
    if msg.digest.as_ref() != d.0.as_slice() {
        return Ok(Err("the registry sent a different chunk".into()));
    }
    let object_len = msg.data.len() as u64;
    let decoded = tokio::task::spawn_blocking(move || codec::decode(&d, &msg.data))
        .await
        .map_err(|e| ClientError::io("verifying a chunk", std::io::Error::other(e)))?;
    Ok(match decoded {
        Err(e) => Err(match e {
            snapreg_proto::Error::ChunkCorrupt { reason, .. } => reason,
            other => other.to_string(),
        }),
        Ok(data) if data.len() as u64 != expected_len => Err(format!(
            "{} bytes, but the manifest's extents say {}",
            data.len(),
            if expected_len == u64::MAX {
                "different lengths".to_string()
            } else {
                expected_len.to_string()
            }
        )),
        Ok(data) => Ok((object_len, data.len() as u64)),
    })
}
