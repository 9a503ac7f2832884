//! The snapshot manifest, schema versions 1 (plaintext chunks) and 2 (encrypted chunks).
//!
//! Stored as JSON (UTF-8, written once by the client and never re-encoded): its
//! digest is the BLAKE3 of the exact stored bytes. JSON because operators read
//! manifests with `snapctl inspect` and `jq`, and a 10 GiB image's manifest (~10^4
//! extents) is a few hundred KB — nothing a binary format would save matters.
//!
//! ```text
//! {
//!   "schema_version": 1,
//!   "created": { "unix_seconds", "tool", "hostname" },
//!   "chunker": { "algorithm": "fastcdc-v2020", "min_size", "avg_size", "max_size",
//!                "page_aligned": ["pages-*.img"], "zero_run_min" },
//!   "layers": [ { "kind": "process"|"weights"|"gpu"|"rootfs"|"extra", "name"?, "rank"?,
//!                 "files": [ { "path", "size", "mode",
//!                              "extents": [ {"chunk": "blake3:..", "len": N} | {"zero": N} ] } ] } ],
//!   "criu"?:          { "version", "restore_options": [..],
//!                       "external_files": [ {path, size, mtime, written?, left_out?} ] },
//!   "compat":         { see compat::CompatRecord },
//!   "device_memory"?: [ { "layer", "file", "offset", "len" } ],
//!   "ranks"?:         [ { "rank", "layer" } ],
//!   "annotations"?:   { "k": "v" },
//!   "encryption"?:    { "scheme", "key_id", "tenant" }     (version 2 only)
//! }
//! ```
//!
//! Written files (added inside version 1, optional): an `external_files` entry with
//! `"written": true` is a file the tree held open for writing (a log, a scratch file).
//! Its content at the freeze is captured into the layer `{"kind": "extra", "name":
//! "files"}` ([`WRITTEN_FILES_LAYER`]) under its absolute path less the leading `/`
//! (`/var/log/w.log` → `var/log/w.log`), with the mode CRIU will check; a restore puts
//! it back before CRIU reopens it. A written entry with no file in that layer was left
//! out, and `left_out` says why (too big, `--no-capture-files`): a restore then checks
//! it like any other external file. An `extra` layer, not a new kind: older readers
//! decode the manifest and ignore the layer (they restore as before, refusing a file
//! that differs). Golden file: `tests/golden/manifest-v1-written-files.json`.
//!
//! Version 2 is version 1 plus a required `encryption` section: every chunk of the
//! snapshot is encrypted with that tenant key ([`crate::encryption`]) and its digest is
//! the BLAKE3 of the encrypted bytes. It is a new version, not an optional field,
//! because a reader that ignored the section would restore ciphertext as if it were
//! memory; older readers refuse it by its version instead. Plaintext snapshots are
//! still written as version 1, so older clients keep reading them.
//!
//! Compatibility: a reader accepts exactly the schema versions it knows and refuses
//! the rest with [`Error::ManifestVersion`]; fields added inside version 1 must be
//! optional (older readers ignore unknown fields). Golden files of every version live
//! in `tests/golden/manifest-v*.json` and must keep decoding.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::compat::CompatRecord;
use crate::{Digest, Error};

/// The annotation keys snapctl writes and reads, in one place: what each records and
/// who acts on it.
pub mod annotations {
    /// The checkpointed tree's root PID (CRIU restores the original PIDs): reported
    /// by `pull-restore`.
    pub const ROOT_PID: &str = "org.snapreg.root-pid";
    /// `pid,…` of the tree's CUDA processes: `pull-restore` puts their GPU state back
    /// after CRIU.
    pub const CUDA_PIDS: &str = "org.snapreg.cuda-pids";
    /// `pid:signal,…` of the processes to signal once their weights are back
    /// (separated mode).
    pub const WEIGHTS_RESUME: &str = "org.snapreg.weights-resume";
    /// `repository@digest` a `snapctl copy` was made from.
    pub const COPIED_FROM: &str = "org.snapreg.copied-from";
    /// Where the Podman archive's index lives in an imported Podman checkpoint.
    pub const PODMAN_ARCHIVE: &str = "org.snapreg.podman-archive";
}

/// The `extra` layer holding the content of files the tree held open for writing.
pub const WRITTEN_FILES_LAYER: &str = "files";

pub const SCHEMA_VERSION: u64 = 1;
/// The version of a manifest whose chunks are encrypted.
pub const ENCRYPTED_SCHEMA_VERSION: u64 = 2;
/// Upper bound on an accepted manifest: ~10^6 extents. Bounds what a hostile or
/// corrupt manifest can make either side allocate.
pub const MAX_MANIFEST_BYTES: usize = 64 << 20;
/// Linux's PATH_MAX: a longer file path could never be created by a pull.
pub const MAX_PATH_LEN: usize = 4096;
/// Components of a file path (CRIU images are flat; rootfs layers are not deep).
/// JSON nesting itself is bounded by serde_json's recursion limit (128).
pub const MAX_PATH_DEPTH: usize = 64;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub schema_version: u64,
    pub created: Created,
    pub chunker: ChunkerParams,
    pub layers: Vec<Layer>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub criu: Option<CriuInfo>,
    pub compat: CompatRecord,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub device_memory: Vec<DeviceMemorySegment>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ranks: Vec<Rank>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<Encryption>,
}

/// Which tenant key encrypted the snapshot's chunks. Names the key, never holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Encryption {
    /// [`crate::encryption::SCHEME`].
    pub scheme: String,
    pub key_id: String,
    /// The tenant the key was issued for, as written in its key file (informational).
    #[serde(default)]
    pub tenant: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Created {
    pub unix_seconds: u64,
    pub tool: String,
    #[serde(default)]
    pub hostname: String,
}

/// Two clients dedup against each other only when these match.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkerParams {
    pub algorithm: String,
    pub min_size: u32,
    pub avg_size: u32,
    pub max_size: u32,
    /// Glob patterns of file names whose cut points fall on 4 KiB boundaries.
    pub page_aligned: Vec<String>,
    /// All-zero runs at least this long (4 KiB-aligned) become zero extents.
    pub zero_run_min: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LayerKind {
    /// CRIU image files of one process tree.
    Process,
    /// Named raw weight buffers kept apart from the process image.
    Weights,
    /// Device-memory files written by the driver itself.
    Gpu,
    Rootfs,
    Extra,
}

impl LayerKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            LayerKind::Process => "process",
            LayerKind::Weights => "weights",
            LayerKind::Gpu => "gpu",
            LayerKind::Rootfs => "rootfs",
            LayerKind::Extra => "extra",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Layer {
    pub kind: LayerKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rank: Option<u32>,
    pub files: Vec<File>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct File {
    /// Relative, `/`-separated, no `..` (checked by [`Manifest::decode`]).
    pub path: String,
    pub size: u64,
    pub mode: u32,
    pub extents: Vec<Extent>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Extent {
    Chunk { chunk: Digest, len: u64 },
    Zero { zero: u64 },
}

impl Extent {
    pub fn len(&self) -> u64 {
        match *self {
            Extent::Chunk { len, .. } => len,
            Extent::Zero { zero } => zero,
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CriuInfo {
    pub version: String,
    /// Options the restore must repeat (`--tcp-established`, `--shell-job`, ...).
    #[serde(default)]
    pub restore_options: Vec<String>,
    /// Files the image reopens by path; a restore checks them before CRIU starts.
    #[serde(default)]
    pub external_files: Vec<ExternalFile>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ExternalFile {
    pub path: String,
    pub size: u64,
    pub mtime: i64,
    /// Held open for writing by the tree: captured into [`WRITTEN_FILES_LAYER`] unless
    /// `left_out` says why not.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub written: bool,
    /// Why a written file's content is not in the snapshot (for the restore's refusal).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub left_out: Option<String>,
}

impl ExternalFile {
    /// Where a written file's content sits in [`WRITTEN_FILES_LAYER`].
    pub fn layer_path(&self) -> &str {
        self.path.trim_start_matches('/')
    }
}

/// A page range of a CRIU image file that holds a copy of device memory.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceMemorySegment {
    pub layer: u32,
    pub file: String,
    pub offset: u64,
    pub len: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Rank {
    pub rank: u32,
    pub layer: u32,
}

#[derive(Deserialize)]
struct VersionProbe {
    schema_version: u64,
}

impl Manifest {
    /// Decodes and validates stored manifest bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, Error> {
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(Error::ManifestInvalid(format!(
                "{} bytes exceeds the {MAX_MANIFEST_BYTES}-byte limit",
                bytes.len()
            )));
        }
        let probe: VersionProbe = serde_json::from_slice(bytes)
            .map_err(|e| Error::ManifestInvalid(format!("no schema_version: {e}")))?;
        if ![SCHEMA_VERSION, ENCRYPTED_SCHEMA_VERSION].contains(&probe.schema_version) {
            return Err(Error::ManifestVersion {
                found: probe.schema_version,
                supported: ENCRYPTED_SCHEMA_VERSION,
            });
        }
        let m: Manifest =
            serde_json::from_slice(bytes).map_err(|e| Error::ManifestInvalid(e.to_string()))?;
        m.validate()?;
        Ok(m)
    }

    /// The bytes to store; encode once, then keep and hash these exact bytes.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("manifest serializes")
    }

    fn validate(&self) -> Result<(), Error> {
        let invalid = |s: String| Err(Error::ManifestInvalid(s));
        let mut max_len = crate::codec::MAX_CHUNK_LEN;
        match (self.schema_version, &self.encryption) {
            (SCHEMA_VERSION, None) => {}
            (ENCRYPTED_SCHEMA_VERSION, Some(e)) => {
                if e.scheme != crate::encryption::SCHEME {
                    return invalid(format!(
                        "encryption scheme {:?} is unknown (this build knows {:?}); upgrade snapctl",
                        e.scheme,
                        crate::encryption::SCHEME
                    ));
                }
                if crate::encryption::KeyId::parse(&e.key_id).is_none() {
                    return invalid(format!(
                        "encryption key_id {:?} is not 16 hex digits",
                        e.key_id
                    ));
                }
                max_len -= crate::encryption::OVERHEAD;
            }
            (v, e) => {
                return invalid(format!(
                    "schema version {v} {} an encryption section",
                    if e.is_some() { "with" } else { "without" }
                ))
            }
        }
        let max_chunk = self.chunker.max_size as u64;
        if max_chunk as usize > max_len {
            return invalid(format!(
                "chunker max_size {max_chunk} exceeds the codec's {max_len} bytes"
            ));
        }
        for layer in &self.layers {
            // A layer name becomes a directory of the pull: the same rules as a path.
            if let Some(name) = &layer.name {
                if let Err(reason) = check_relative_path(name) {
                    return invalid(format!("layer name {name:?}: {reason}"));
                }
            }
            let mut seen = std::collections::HashSet::new();
            for f in &layer.files {
                if let Err(reason) = check_relative_path(&f.path) {
                    return invalid(format!("file path {:?}: {reason}", f.path));
                }
                if !seen.insert(&f.path) {
                    return invalid(format!(
                        "file {:?} listed twice in a {} layer",
                        f.path,
                        layer.kind.as_str()
                    ));
                }
                // Checked: extents summing past 2^64 would wrap to a small "size" in
                // a release build and place later extents at bogus offsets.
                let sum = f
                    .extents
                    .iter()
                    .try_fold(0u64, |acc, e| acc.checked_add(e.len()));
                let Some(sum) = sum else {
                    return invalid(format!("file {:?}: extents overflow 64 bits", f.path));
                };
                if sum != f.size {
                    return invalid(format!(
                        "file {:?}: extents cover {sum} bytes, size is {}",
                        f.path, f.size
                    ));
                }
                if f.extents
                    .iter()
                    .any(|e| matches!(e, Extent::Chunk { len, .. } if *len > max_chunk))
                {
                    return invalid(format!(
                        "file {:?}: a chunk is larger than the chunker's max_size {max_chunk}",
                        f.path
                    ));
                }
            }
        }
        Ok(())
    }

    /// The layer holding the content of files the tree held open for writing.
    pub fn written_files_layer(&self) -> Option<&Layer> {
        self.layers
            .iter()
            .find(|l| l.kind == LayerKind::Extra && l.name.as_deref() == Some(WRITTEN_FILES_LAYER))
    }

    /// Every distinct chunk the manifest names, in first-use order.
    pub fn chunk_digests(&self) -> Vec<Digest> {
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        for layer in &self.layers {
            for f in &layer.files {
                for e in &f.extents {
                    if let Extent::Chunk { chunk, .. } = e {
                        if seen.insert(*chunk) {
                            out.push(*chunk);
                        }
                    }
                }
            }
        }
        out
    }

    /// Total logical bytes of every file.
    pub fn total_size(&self) -> u64 {
        self.layers
            .iter()
            .flat_map(|l| &l.files)
            .map(|f| f.size)
            .fold(0u64, u64::saturating_add)
    }
}

/// A manifest path must stay inside the directory it is restored into.
pub fn check_relative_path(path: &str) -> Result<(), &'static str> {
    if path.is_empty() {
        return Err("empty");
    }
    if path.len() > MAX_PATH_LEN {
        return Err("longer than PATH_MAX (4096)");
    }
    if path.split('/').count() > MAX_PATH_DEPTH {
        return Err("more than 64 components deep");
    }
    if path.starts_with('/') {
        return Err("absolute");
    }
    if path.contains('\0') || path.contains('\\') {
        return Err("contains NUL or backslash");
    }
    if path
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err("has an empty, '.' or '..' component");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOLDEN_V1: &[u8] = include_bytes!("../tests/golden/manifest-v1.json");

    #[test]
    fn golden_v1_decodes_with_every_optional_section() {
        let m = Manifest::decode(GOLDEN_V1).unwrap();
        assert_eq!(m.schema_version, 1);
        assert_eq!(m.layers.len(), 2);
        assert_eq!(m.layers[0].kind, LayerKind::Process);
        assert_eq!(m.layers[1].kind, LayerKind::Weights);
        let pages = &m.layers[0].files[1];
        assert_eq!(pages.path, "pages-1.img");
        assert!(matches!(pages.extents[1], Extent::Zero { zero: 65536 }));
        assert_eq!(
            m.criu.as_ref().unwrap().restore_options,
            vec!["--tcp-established"]
        );
        assert_eq!(
            m.compat.gpu.as_ref().unwrap().devices[0].model,
            "NVIDIA H100 80GB HBM3"
        );
        assert_eq!(m.device_memory.len(), 1);
        assert_eq!(m.ranks.len(), 1);
        assert_eq!(m.chunk_digests().len(), 3);
    }

    #[test]
    fn golden_v1_digest_is_of_exact_bytes() {
        // Re-encoding may change bytes; the digest is of what was stored.
        let d = Digest::of(GOLDEN_V1);
        let m = Manifest::decode(GOLDEN_V1).unwrap();
        assert_eq!(Manifest::decode(&m.encode()).unwrap(), m);
        assert_eq!(d, Digest::of(GOLDEN_V1));
    }

    #[test]
    fn unknown_version_is_refused_by_name() {
        let text = String::from_utf8(GOLDEN_V1.to_vec()).unwrap().replacen(
            "\"schema_version\": 1",
            "\"schema_version\": 7",
            1,
        );
        match Manifest::decode(text.as_bytes()) {
            Err(Error::ManifestVersion {
                found: 7,
                supported: ENCRYPTED_SCHEMA_VERSION,
            }) => {}
            other => panic!("expected ManifestVersion, got {other:?}"),
        }
    }

    const GOLDEN_V2: &[u8] = include_bytes!("../tests/golden/manifest-v2.json");

    #[test]
    fn golden_v2_decodes_and_names_its_key() {
        let m = Manifest::decode(GOLDEN_V2).unwrap();
        assert_eq!(m.schema_version, ENCRYPTED_SCHEMA_VERSION);
        let e = m.encryption.as_ref().unwrap();
        assert_eq!(
            (e.scheme.as_str(), e.key_id.as_str(), e.tenant.as_str()),
            (crate::encryption::SCHEME, "d1e8b9c2f0a34b57", "acme")
        );
        assert_eq!(m.chunk_digests().len(), 2);
    }

    #[test]
    fn encryption_and_version_must_agree() {
        let mut v1_with = Manifest::decode(GOLDEN_V2).unwrap();
        v1_with.schema_version = SCHEMA_VERSION;
        let mut v2_without = Manifest::decode(GOLDEN_V1).unwrap();
        v2_without.schema_version = ENCRYPTED_SCHEMA_VERSION;
        let mut unknown_scheme = Manifest::decode(GOLDEN_V2).unwrap();
        unknown_scheme.encryption.as_mut().unwrap().scheme = "rot13".into();
        for bad in [v1_with, v2_without, unknown_scheme] {
            let e = Manifest::decode(&bad.encode()).unwrap_err().to_string();
            assert!(e.contains("encryption"), "{e}");
        }
    }

    #[test]
    fn unknown_optional_fields_are_ignored() {
        let text = String::from_utf8(GOLDEN_V1.to_vec()).unwrap().replacen(
            "{",
            "{\"future_field\": [1,2],",
            1,
        );
        assert!(Manifest::decode(text.as_bytes()).is_ok());
    }

    #[test]
    fn escaping_paths_and_bad_sizes_are_refused() {
        let mut m = Manifest::decode(GOLDEN_V1).unwrap();
        for bad in ["../etc/passwd", "/abs", "a//b", "a/./b", ""] {
            m.layers[0].files[0].path = bad.into();
            assert!(Manifest::decode(&m.encode()).is_err(), "{bad} accepted");
        }
        let mut m = Manifest::decode(GOLDEN_V1).unwrap();
        m.layers[0].files[0].size += 1;
        assert!(Manifest::decode(&m.encode()).is_err());
        let deep = vec!["d"; MAX_PATH_DEPTH + 1].join("/");
        let long = "x".repeat(MAX_PATH_LEN + 1);
        for bad in ["../up", "/abs", deep.as_str(), long.as_str()] {
            let mut m = Manifest::decode(GOLDEN_V1).unwrap();
            m.layers[0].name = Some(bad.into());
            assert!(
                Manifest::decode(&m.encode()).is_err(),
                "layer {bad} accepted"
            );
        }
    }

    #[test]
    fn extents_that_overflow_are_refused() {
        let mut m = Manifest::decode(GOLDEN_V1).unwrap();
        let f = &mut m.layers[0].files[1];
        f.extents = vec![Extent::Zero { zero: u64::MAX }, Extent::Zero { zero: 2 }];
        f.size = 1;
        let e = Manifest::decode(&m.encode()).unwrap_err().to_string();
        assert!(e.contains("overflow"), "{e}");
    }

    #[test]
    fn chunks_above_the_chunkers_max_size_are_refused() {
        let mut m = Manifest::decode(GOLDEN_V1).unwrap();
        let pages = &mut m.layers[0].files[1];
        let Extent::Chunk { len, .. } = &mut pages.extents[0] else {
            panic!("golden pages-1.img starts with a chunk")
        };
        let grow = u64::from(m.chunker.max_size) + 1 - *len;
        *len += grow;
        pages.size += grow;
        let e = Manifest::decode(&m.encode()).unwrap_err().to_string();
        assert!(e.contains("max_size"), "{e}");
        let mut m = Manifest::decode(GOLDEN_V1).unwrap();
        m.chunker.max_size = 1 << 30;
        assert!(Manifest::decode(&m.encode()).is_err());
    }

    const GOLDEN_V1_WRITTEN: &[u8] =
        include_bytes!("../tests/golden/manifest-v1-written-files.json");

    #[test]
    fn golden_v1_written_files_decode_with_their_layer() {
        let m = Manifest::decode(GOLDEN_V1_WRITTEN).unwrap();
        let external = &m.criu.as_ref().unwrap().external_files;
        let written: Vec<_> = external.iter().filter(|f| f.written).collect();
        assert_eq!(written.len(), 2, "{external:?}");
        assert_eq!(written[0].path, "/srv/app/access.log");
        assert_eq!(written[0].left_out, None);
        assert_eq!(
            written[1].left_out.as_deref(),
            Some("33554432 bytes, over the per-file limit of 16777216")
        );
        assert!(!external[0].written, "a file only read stays unmarked");
        let layer = m.written_files_layer().expect("files layer");
        assert_eq!(layer.files.len(), 1);
        assert_eq!(layer.files[0].path, written[0].layer_path());
        assert_eq!((layer.files[0].size, layer.files[0].mode), (969, 0o640));
        // Without the section the manifest of before: nothing written, no layer.
        let old = Manifest::decode(GOLDEN_V1).unwrap();
        assert!(old.written_files_layer().is_none());
        assert!(old.criu.unwrap().external_files.iter().all(|f| !f.written));
    }

    #[test]
    fn garbage_is_refused() {
        assert!(matches!(
            Manifest::decode(b"\x00\x01garbage"),
            Err(Error::ManifestInvalid(_))
        ));
        assert!(matches!(
            Manifest::decode(b"{\"schema_version\": 1}"),
            Err(Error::ManifestInvalid(_))
        ));
    }
}
