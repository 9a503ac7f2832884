//! Reading a file of a snapshot (a blob's recipe, a manifest) out of the registry,
//! through the client's chunk-fetch stack (`Chunks::extents`: each chunk verified
//! against its BLAKE3 address, zero extents as zeros, in order). What streams out is
//! never held whole.

use bytes::Bytes;
use futures::{Stream, StreamExt};
use snapreg_client::error::ClientError;
use snapreg_client::fetch::Chunks;
use snapreg_client::progress::Progress;
use snapreg_client::remote::Remote;
use snapreg_proto::manifest::File;
use tokio::sync::mpsc;

use crate::error::{OciError, Result};

/// Chunks fetched ahead while streaming (0.5-2 MiB each).
const WINDOW: usize = 16;

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

/// Sends every piece of `file`, read through the client's chunk-fetch stack (each
/// chunk verified against its address); stops quietly when the receiver is gone.
async fn send_file(
    remote: &Remote,
    file: &File,
    tx: &mpsc::Sender<std::io::Result<Bytes>>,
) -> std::result::Result<(), ClientError> {
    let chunks = Chunks::builder(vec![remote.clone()])
        .build(Progress::hidden())
        .await?;
    let mut pieces = chunks.extents(&file.extents, &file.path, WINDOW);
    while let Some(piece) = pieces.next().await {
        if tx.send(Ok(piece?)).await.is_err() {
            return Ok(());
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
    while let Some(piece) = pieces.next().await {
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
