//! Encrypted snapshots on the client: the tenant key a snapshot needs, and decrypting
//! its chunks once they have been verified against their addresses.
//!
//! Pushes encrypt when the remote carries a tenant key (`--key-file`); every reader
//! asks [`key_for`] first, so a snapshot without its key fails before anything is
//! fetched, and one with it is decrypted wherever chunks become bytes (pull, the CRIU
//! image server, the weights fill, verify). The node cache and prefetch hold the
//! encrypted bytes: they need no key.

use std::sync::Arc;

use bytes::Bytes;
use snapreg_proto::encryption::TenantKey;
use snapreg_proto::manifest::Manifest;
use snapreg_proto::Digest;

use crate::error::{ClientError, Result};

/// The key that opens `manifest`'s chunks: `None` for a plaintext snapshot; an error
/// naming the key it needs when `have` is missing or another tenant's.
pub fn key_for(
    manifest: &Manifest,
    have: Option<&Arc<TenantKey>>,
    reference: &str,
) -> Result<Option<Arc<TenantKey>>> {
    let Some(needed) = &manifest.encryption else {
        return Ok(None);
    };
    let tenant = if needed.tenant.is_empty() {
        String::new()
    } else {
        format!(" (tenant {})", needed.tenant)
    };
    match have {
        None => Err(ClientError::KeyRequired(format!(
            "{reference} is encrypted with tenant key {}{tenant}: pass that key with \
             --key-file or SNAPCTL_KEY_FILE",
            needed.key_id
        ))),
        Some(k) if k.id().to_string() != needed.key_id => Err(ClientError::KeyRequired(format!(
            "{reference} is encrypted with tenant key {}{tenant}, but --key-file holds key {} \
             (tenant {}): pass the snapshot's own tenant key",
            needed.key_id,
            k.id(),
            k.tenant()
        ))),
        Some(k) => Ok(Some(k.clone())),
    }
}

/// A verified chunk's content as the snapshot's files hold it: decrypted when `key`
/// is given (the snapshot is encrypted), as is otherwise.
pub fn decrypt(
    key: Option<&TenantKey>,
    digest: &Digest,
    content: Bytes,
) -> std::result::Result<Bytes, snapreg_proto::Error> {
    match key {
        Some(k) => k.decrypt_chunk(digest, &content),
        None => Ok(content),
    }
}

/// A chunk that failed to verify or decrypt, as the error naming the file it is in.
pub fn chunk_error(e: snapreg_proto::Error, file: &str) -> ClientError {
    match e {
        snapreg_proto::Error::ChunkCorrupt { digest, reason } => ClientError::ChunkCorrupt {
            digest,
            file: file.to_string(),
            reason,
        },
        snapreg_proto::Error::Undecryptable { digest, reason } => ClientError::Undecryptable {
            digest,
            file: file.to_string(),
            reason,
        },
        other => other.into(),
    }
}
