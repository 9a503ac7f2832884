//! `snapctl copy SRC DST`: a snapshot written again under another reference, with its
//! chunks decrypted and re-encrypted on the way. What it is for: rotating a tenant key
//! (`--to-key-file NEW`), encrypting a snapshot pushed before the tenant had a key,
//! and decrypting one for export (`--to-plaintext`). Without either flag the copy keeps
//! the source's encryption, and every chunk dedups.
//!
//! The files are streamed, not staged: each one's chunks are fetched in order (through
//! the node cache, verified, decrypted with the source's key) into the chunker of an
//! ordinary push, which re-encrypts and uploads what the registry lacks. The chunker
//! runs with the source manifest's parameters, so the same bytes cut at the same
//! places. Everything else of the manifest — CRIU options, the compatibility record,
//! device-memory segments, ranks, annotations — is kept as it was; the copy gets an
//! `org.snapreg.copied-from` annotation naming its source.

use std::io::Read;
use std::sync::mpsc as sync_mpsc;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures::StreamExt;
use snapreg_proto::encryption::TenantKey;
use snapreg_proto::manifest::{annotations, Extent, File, Layer};
use snapreg_proto::reference::Reference;

use crate::cache::ChunkCache;
use crate::chunker::ChunkerConfig;
use crate::encryption;
use crate::error::{ClientError, Result};
use crate::fetch::Chunks;
use crate::progress::{CountersSnapshot, Progress};
use crate::pull;
use crate::push::{self, Uploader};
use crate::remote::Remote;

/// Chunk fetches in flight ahead of the chunker, per file.
const WINDOW: usize = 16;
/// Zeros handed to the chunker at a time.
const ZERO_PIECE: u64 = 1 << 20;
static ZEROS: [u8; ZERO_PIECE as usize] = [0; ZERO_PIECE as usize];

/// How the copy's chunks are encrypted.
#[derive(Clone, Debug)]
pub enum CopyEncryption {
    /// As the source's (the same key, or none).
    Same,
    Key(Arc<TenantKey>),
    Plaintext,
}

#[derive(Debug, serde::Serialize)]
pub struct CopyReport {
    pub source: String,
    pub source_digest: String,
    pub reference: String,
    pub digest: String,
    /// The copy's tenant key id; absent when the copy is plaintext.
    pub key_id: Option<String>,
    pub files: usize,
    #[serde(flatten)]
    pub counters: CountersSnapshot,
    pub seconds: f64,
}

pub async fn copy(
    remote: &Remote,
    source: &Reference,
    dest: &Reference,
    to: CopyEncryption,
    cache: ChunkCache,
    progress: Progress,
) -> Result<CopyReport> {
    let started = Instant::now();
    let tag = push::required_tag(dest, "copy")?;
    let (source_digest, manifest) = pull::fetch_manifest(remote, source).await?;
    let source_key = encryption::key_for(&manifest, remote.tenant_key(), &source.to_string())?;
    let dest_key = match to {
        CopyEncryption::Same => source_key.clone(),
        CopyEncryption::Key(k) => Some(k),
        CopyEncryption::Plaintext => None,
    };
    // Reads count as fetches of their own; the report's counters are the upload's.
    let chunks = Chunks::builder(vec![remote.clone()])
        .node_cache(cache)
        .decrypting(source_key)
        .direct_urls(manifest.chunk_digests())
        .build(Progress::hidden())
        .await?;
    progress.add_total(manifest.total_size());
    let uploader = Uploader::begin(
        &remote.clone().with_tenant_key(dest_key.clone()),
        &dest.repository,
        ChunkerConfig::from_params(&manifest.chunker),
        progress.clone(),
    )
    .await?;
    let mut layers = Vec::new();
    let mut files = 0;
    for layer in &manifest.layers {
        let mut copied = Vec::new();
        for f in &layer.files {
            progress.message(f.path.clone());
            let extents = copy_file(&uploader, &chunks, f).await?;
            copied.push(File {
                extents,
                ..f.clone()
            });
            files += 1;
        }
        layers.push(Layer {
            files: copied,
            ..layer.clone()
        });
    }
    let mut m = manifest.clone();
    m.layers = layers;
    uploader.mark_encryption(&mut m);
    m.annotations.insert(
        annotations::COPIED_FROM.into(),
        format!("{}@{source_digest}", source.repository),
    );
    let digest = uploader.commit(&dest.repository, &m, vec![tag]).await?;
    progress.finish();
    Ok(CopyReport {
        source: source.to_string(),
        source_digest: source_digest.to_string(),
        reference: dest.to_string(),
        digest: digest.to_string(),
        key_id: dest_key.map(|k| k.id().to_string()),
        files,
        counters: progress.counters.snapshot(),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// One file: its plaintext streamed from `chunks` into the uploader's chunker.
async fn copy_file(uploader: &Uploader, chunks: &Chunks, f: &File) -> Result<Vec<Extent>> {
    // Bounded: the chunker thread reads at its pace, fetches stay WINDOW ahead.
    let (tx, rx) = sync_mpsc::sync_channel::<Bytes>(WINDOW);
    let pieces: Vec<Extent> = f.extents.clone();
    let (source, path) = (chunks.clone(), f.path.clone());
    let feeder = tokio::spawn(async move {
        let mut fetched = futures::stream::iter(pieces)
            .map(|e| {
                let (source, path) = (source.clone(), path.clone());
                async move {
                    match e {
                        Extent::Chunk { chunk, len } => {
                            let data = source.get(chunk, &path).await?;
                            if data.len() as u64 != len {
                                return Err(ClientError::ChunkCorrupt {
                                    digest: chunk,
                                    file: path,
                                    reason: format!(
                                        "{} bytes where the manifest says {len}",
                                        data.len()
                                    ),
                                });
                            }
                            Ok(vec![data])
                        }
                        Extent::Zero { zero } => Ok((0..zero.div_ceil(ZERO_PIECE))
                            .map(|i| {
                                let n = ZERO_PIECE.min(zero - i * ZERO_PIECE);
                                Bytes::from_static(&ZEROS[..n as usize])
                            })
                            .collect()),
                    }
                }
            })
            .buffered(WINDOW);
        while let Some(pieces) = fetched.next().await {
            for p in pieces? {
                let tx = tx.clone();
                // The chunker stopped (its own error follows): stop fetching.
                if tokio::task::spawn_blocking(move || tx.send(p))
                    .await
                    .map_or(true, |r| r.is_err())
                {
                    return Ok(());
                }
            }
        }
        Ok::<_, ClientError>(())
    });
    let chunked = uploader
        .chunk_stream(
            ChannelReader {
                rx,
                current: Bytes::new(),
            },
            uploader.config().is_page_aligned(&f.path),
        )
        .await;
    // A fetch that failed ended the stream early: its error is the one to report.
    match feeder.await {
        Ok(Err(e)) => return Err(e),
        Err(e) => return Err(ClientError::io("copy feeder", std::io::Error::other(e))),
        Ok(Ok(())) => {}
    }
    let extents = chunked?;
    let size: u64 = extents.iter().map(Extent::len).sum();
    if size != f.size {
        return Err(ClientError::Aborted(format!(
            "{}: copied {size} bytes of {}",
            f.path, f.size
        )));
    }
    Ok(extents)
}

/// The plaintext of one file as the chunker reads it: end of file when the feeder is done.
struct ChannelReader {
    rx: sync_mpsc::Receiver<Bytes>,
    current: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.recv() {
                Ok(next) => self.current = next,
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        self.current = self.current.slice(n..);
        Ok(n)
    }
}
