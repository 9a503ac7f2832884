//! `snapctl verify REF`: fetch every chunk of a snapshot from the registry, check it
//! against its digest and the length its extents give it, and name the file of each
//! one that fails. Nothing is written to disk and the node cache is bypassed: the
//! point is the registry's copy.
//!
//! Every chunk is checked even after a failure, so one run lists all the damage. A
//! chunk the registry no longer holds (e.g. quarantined by `snapreg scrub`) counts as
//! damaged too: the snapshot cannot be restored without it.
//!
//! An encrypted snapshot is decrypted too when its tenant key is given. Without the
//! key (a registry operator's check) the stored bytes are verified, and each must be
//! an encrypted chunk under the manifest's key id; `content_checked` is then false.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use snapreg_proto::encryption::{self, KeyId, TenantKey};
use snapreg_proto::manifest::Extent;
use snapreg_proto::reference::Reference;
use snapreg_proto::{codec, Digest};

use crate::encryption::key_for;
use crate::error::{ClientError, Result};
use crate::fetch::Chunks;
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
    /// Whether the chunks' content was checked (false: an encrypted snapshot verified
    /// without its key, as stored bytes only).
    pub content_checked: bool,
    pub damaged: Vec<DamagedChunk>,
    pub seconds: f64,
}

/// How a chunk's content is checked beyond its digest.
#[derive(Clone)]
enum Opening {
    Plain,
    Decrypt(Arc<TenantKey>),
    /// Encrypted and no key: the stored bytes must at least be a chunk under this key.
    StoredOnly(KeyId),
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
    let opening = match (&manifest.encryption, remote.tenant_key()) {
        (None, _) => Opening::Plain,
        (Some(e), None) => Opening::StoredOnly(KeyId::parse(&e.key_id).ok_or_else(|| {
            ClientError::Format(snapreg_proto::Error::ManifestInvalid("bad key_id".into()))
        })?),
        (Some(_), have) => Opening::Decrypt(
            key_for(&manifest, have, &reference.to_string())?.expect("the snapshot is encrypted"),
        ),
    };
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

    // The registry's copy only: no node cache, no presigned URLs.
    let chunks = Chunks::builder(vec![remote.clone()])
        .build(progress.clone())
        .await?;
    let checks = futures::stream::iter(order.iter().copied())
        .map(|d| {
            let (expected_len, files) = &uses[&d];
            let file = files.first().map_or("", String::as_str);
            let (opening, chunks) = (opening.clone(), &chunks);
            async move {
                (
                    d,
                    check_chunk(chunks, d, file, *expected_len, opening).await,
                )
            }
        })
        .buffer_unordered(window.max(1));
    let mut checks = std::pin::pin!(checks);
    let mut damaged = Vec::new();
    let mut chunks_ok = 0;
    while let Some((d, outcome)) = checks.next().await {
        match outcome? {
            Ok(data_len) => {
                chunks_ok += 1;
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
        content_checked: !matches!(opening, Opening::StoredOnly(_)),
        damaged,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Ok(Ok(chunk bytes)) when the chunk verifies, Ok(Err(reason)) when it is damaged
/// or missing, Err when the registry cannot be asked at all.
async fn check_chunk(
    chunks: &Chunks,
    d: Digest,
    file: &str,
    expected_len: u64,
    opening: Opening,
) -> Result<std::result::Result<u64, String>> {
    let content = match chunks.stored(d, file).await {
        Ok(c) => c,
        Err(ClientError::NotFound(m)) => {
            return Ok(Err(format!("missing from the registry ({m})")))
        }
        Err(ClientError::Registry(m)) => return Ok(Err(m)),
        Err(ClientError::ChunkCorrupt { reason, .. }) => return Ok(Err(reason)),
        Err(e) => return Err(e),
    };
    let opened = tokio::task::spawn_blocking(move || match opening {
        Opening::Plain => Ok((content, true)),
        Opening::Decrypt(key) => key
            .decrypt_chunk(&d, &content)
            .map(|data| (data, true))
            .map_err(|e| match e {
                snapreg_proto::Error::Undecryptable { reason, .. } => reason,
                other => other.to_string(),
            }),
        Opening::StoredOnly(id) => match encryption::key_id_of(&content) {
            Some(found) if found == id => Ok((content, false)),
            Some(found) => Err(format!("encrypted with key {found}, not {id}")),
            None => Err("not an encrypted chunk, but the manifest says it is".into()),
        },
    })
    .await
    .map_err(|e| ClientError::io("verifying a chunk", std::io::Error::other(e)))?;
    // The length its extents give it, when the content can be compared to it.
    Ok(match opened {
        Err(reason) => Err(reason),
        Ok((data, true)) if data.len() as u64 != expected_len => Err(format!(
            "{} bytes, but the manifest's extents say {}",
            data.len(),
            if expected_len == u64::MAX {
                "different lengths".to_string()
            } else {
                expected_len.to_string()
            }
        )),
        Ok((data, _)) => Ok(data.len() as u64),
    })
}
