//! Podman checkpoint archives: import (`podman container checkpoint --export FILE`)
//! as a snapshot, and export a snapshot back into a byte-identical tar.
//!
//! ```text
//! FILE (.tar | gzip | zstd, by magic bytes)
//!   ─▶ tar::Archive (1 blocking thread) over a Tap that keeps every byte but member data
//!        ─▶ member data in 1 MiB blocks (bounded channel) ─▶ Uploader::chunk_stream
//!   layers: process  "checkpoint"      CRIU images under checkpoint/, paths relative to it
//!           rootfs   (no name)         rootfs-diff.tar
//!           extra    (no name)         every other regular member (config.dump, spec.dump, ...)
//!           extra    "podman-archive"  archive-index.json: the archive's skeleton
//! ```
//!
//! A `snapctl pull` of such a snapshot into DIR lays the files out as Podman extracts
//! the archive (DIR/checkpoint/inventory.img, DIR/config.dump, ...), plus
//! DIR/podman-archive/archive-index.json.
//!
//! The skeleton keeps, per member in archive order, the raw header blocks (PAX `x`/`g`
//! and GNU `L`/`K` extension members with their data included), which pulled file holds
//! its data, and the padding after it when that was not zeros; plus the bytes after the
//! end-of-archive marker (tar writers pad to a 10240-byte record). [`pull_archive`]
//! writes headers + data + padding + trailer back: the uncompressed original, byte for
//! byte. Directories, symlinks, hard links, devices and FIFOs are headers only.
//!
//! Memory stays bounded whatever the archive size: member data flows through a few
//! 1 MiB blocks; only headers (and extension members up to 1 MiB per member) are held.
//!
//! Modules: `import` (push: decompress, scan with the `tar` crate, upload), `export`
//! (pull: assemble the original bytes), `tar` (what the crate does not do: keeping
//! the raw bytes between members, PAX records holding newlines, offsets for errors).

use serde::{Deserialize, Serialize};

mod export;
mod import;
pub mod tar;
#[cfg(test)]
mod tests;

pub use export::pull_archive;
pub use import::{push_archive, read_archive};

/// Name of the process layer, and the archive directory holding the CRIU images.
pub const CHECKPOINT_DIR: &str = "checkpoint";
/// Name of the extra layer that holds the archive's skeleton.
pub const INDEX_LAYER: &str = "podman-archive";
/// The skeleton's file in [`INDEX_LAYER`].
pub const INDEX_FILE: &str = "archive-index.json";
/// `format` of [`ArchiveIndex`].
pub const INDEX_FORMAT: &str = "snapreg-podman-archive";
pub const INDEX_VERSION: u32 = 1;

/// The skeleton of an archive: everything but the member data.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ArchiveIndex {
    pub format: String,
    pub version: u32,
    /// Compression of the imported file (`none`, `gzip`, `zstd`); exports are plain tar.
    pub compression: String,
    pub members: Vec<Member>,
    /// Bytes from the first all-zero header block to the end of the tar stream.
    pub trailer_len: u64,
    /// Those bytes, hex, only when they are not all zeros.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trailer_hex: Option<String>,
}

/// One archive member, with the extension members that precede it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Member {
    /// The member's name as readers see it (PAX or GNU long name applied), for messages.
    pub name: String,
    /// `file`, `dir`, `symlink`, `hardlink`, `char`, `block`, `fifo`, or `extension`
    /// (extension headers at the end of the archive that no member follows).
    pub kind: String,
    /// Raw header blocks, hex: extension members (header + data + padding), then the
    /// member's own 512-byte header.
    pub header_hex: String,
    /// For `file`: where a pull of the snapshot puts its data (relative to the pull
    /// directory; see [`crate::pull::file_dest`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    #[serde(default)]
    pub size: u64,
    /// The padding after the data, hex, only when it is not all zeros.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub padding_hex: Option<String>,
}
