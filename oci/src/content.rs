//! Reading a file of a snapshot (a blob's recipe, a manifest) out of the registry:
//! chunks fetched a window at a time, each verified against its BLAKE3 address, zero
//! extents as zeros, in order. What streams out is never held whole.

use bytes::Bytes;
use futures::Stream;
use snapreg_client::error::ClientError;
use snapreg_client::remote::Remote;
use snapreg_proto::codec;
use snapreg_proto::manifest::{Extent, File};
use tokio::sync::mpsc;

use crate::error::{OciError, Result};

/// Chunks asked for in one GetChunks call while streaming (0.5-2 MiB each).
const WINDOW: usize = 16;
/// Zero extents stream out in pieces of at most this size.
static ZEROS: [u8; 1 << 20] = [0; 1 << 20];

/// The bytes of `file`, in order, as a stream of pieces. An error ends the stream
/// (the HTTP client sees a short body and its digest check fails).
pub fn stream(remote: Remote, file: File) -> impl Stream<Item = std::io::Result<Bytes>> {
    let (tx, rx) = mpsc::channel::<std::io::Result<Bytes>>(4);
    tokio::spawn(async move {
        if let Err(e) = send_file(&remote, &file, &tx).await {
            tracing::warn!(file = %file.path, error = %e, "streaming a blob failed");
            let _ = tx.send(Err(std::io::Error::other(e.to_string()))).await;
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Sends every piece of `file`; stops quietly when the receiver is gone.
async fn send_file(
    remote: &Remote,
    file: &File,
    tx: &mpsc::Sender<std::io::Result<Bytes>>,
) -> std::result::Result<(), ClientError> {
    let mut at = 0;
    while at < file.extents.len() {
        match file.extents[at] {
            Extent::Zero { zero } => {
                let mut left = zero;
                while left > 0 {
                    let n = left.min(ZEROS.len() as u64) as usize;
                    if tx.send(Ok(Bytes::from_static(&ZEROS[..n]))).await.is_err() {
                        return Ok(());
                    }
                    left -= n as u64;
                }
                at += 1;
            }
            Extent::Chunk { .. } => {
                let window: Vec<_> = file.extents[at..]
                    .iter()
                    .take(WINDOW)
                    .map_while(|e| match e {
                        Extent::Chunk { chunk, .. } => Some(*chunk),
                        Extent::Zero { .. } => None,
                    })
                    .collect();
                let mut objects = remote.get_chunks(&window).await?;
                for digest in &window {
                    let msg = objects
                        .message()
                        .await
                        .map_err(|s| remote.map_stream_error(s))?
                        .ok_or_else(|| {
                            ClientError::NotFound(format!("the registry sent no chunk {digest}"))
                        })?;
                    let data = codec::decode(digest, &msg.data).map_err(|e| {
                        ClientError::ChunkCorrupt {
                            digest: *digest,
                            file: file.path.clone(),
                            reason: e.to_string(),
                        }
                    })?;
                    if tx.send(Ok(data)).await.is_err() {
                        return Ok(());
                    }
                }
                at += window.len();
            }
        }
    }
    Ok(())
}

/// The whole of a small file (a manifest, a config), refused over `limit` bytes.
pub async fn read_small(remote: &Remote, file: &File, limit: u64) -> Result<Vec<u8>> {
    if file.size > limit {
        return Err(OciError::internal(format!(
            "{} is {} bytes, over the {limit}-byte limit for what is read whole",
            file.path, file.size
        )));
    }
    let mut out = Vec::with_capacity(file.size as usize);
    let mut pieces = std::pin::pin!(stream(remote.clone(), file.clone()));
    while let Some(piece) = futures::StreamExt::next(&mut pieces).await {
        out.extend_from_slice(&piece.map_err(|e| OciError::internal(e.to_string()))?);
    }
    check_len(file, out.len() as u64)?;
    Ok(out)
}

fn check_len(file: &File, got: u64) -> Result<()> {
    if got != file.size {
        return Err(OciError::internal(format!(
            "{}: read {got} of its {} bytes from the registry",
            file.path, file.size
        )));
    }
    Ok(())
}
