//! What the unit tests share: a registry on a temporary directory, chunk objects and
//! manifests that name them, and a push through the domain API.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use snapreg_proto::manifest::{Extent, File, Layer, LayerKind, Manifest};
use snapreg_proto::{codec, Digest};

use crate::registry::{Registry, RegistryConfig};

pub(crate) struct TestRegistry {
    /// Kept so the data directory outlives the registry.
    pub _dir: tempfile::TempDir,
    pub reg: Arc<Registry>,
}

pub(crate) async fn registry() -> TestRegistry {
    let dir = tempfile::tempdir().unwrap();
    let mut config = RegistryConfig::new(dir.path().join("data"));
    config.lease_ttl = Duration::from_secs(60);
    let reg = Registry::open(config).await.unwrap();
    TestRegistry { _dir: dir, reg }
}

/// A chunk's digest, its encoded object and its length.
pub(crate) fn chunk(seed: u8, len: usize) -> (Digest, Bytes, u64) {
    let data: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect();
    (Digest::of(&data), codec::encode(&data), len as u64)
}

/// The bytes of a manifest with one file made of `chunks`.
pub(crate) fn manifest(chunks: &[(Digest, Bytes, u64)]) -> Bytes {
    let golden = include_bytes!("../../proto/tests/golden/manifest-v1.json");
    let mut m = Manifest::decode(golden).unwrap();
    let extents: Vec<Extent> = chunks
        .iter()
        .map(|(d, _, len)| Extent::Chunk {
            chunk: *d,
            len: *len,
        })
        .collect();
    m.layers = vec![Layer {
        kind: LayerKind::Extra,
        name: None,
        rank: None,
        files: vec![File {
            path: "f".into(),
            size: chunks.iter().map(|c| c.2).sum(),
            mode: 0o644,
            extents,
        }],
    }];
    m.encryption = None;
    Bytes::from(m.encode())
}

/// Pushes `chunks` and a manifest naming them, tagged `repository:tag`.
pub(crate) async fn push(
    reg: &Registry,
    repository: &str,
    tag: &str,
    chunks: &[(Digest, Bytes, u64)],
) -> Digest {
    let lease = reg.begin_push(repository).await.unwrap();
    let digests = chunks.iter().map(|c| c.0).collect();
    for d in reg.find_missing(&lease.id, digests).await.unwrap() {
        let (_, object, _) = chunks.iter().find(|c| c.0 == d).unwrap();
        reg.put_chunk(&lease.id, d, object.clone()).await.unwrap();
    }
    reg.put_manifest(repository, &lease.id, manifest(chunks), &[tag.to_string()])
        .await
        .unwrap()
}
