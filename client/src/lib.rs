//! snapctl, the node client of snapreg.
//!
//! - [`chunker`]: FastCDC with page-aligned cuts and zero runs, streaming.
//! - [`push`]: chunk, hash and upload in parallel; commit a manifest ([`push::Uploader`]
//!   is the engine every producer of bytes uses).
//! - [`pull`]: fetch, verify and write files under temporary names; rename when whole.
//! - [`remote`]: one registry connection, errors naming its address.
//! - [`encryption`]: which tenant key a snapshot needs, and decrypting its chunks;
//!   [`copy`]: a snapshot re-encrypted under another key (or none) and reference.
//! - [`direct`]: chunk objects fetched from the object store by presigned URL.
//! - [`verify`]: fetch and check every chunk of a snapshot, naming the files of bad ones.
//! - [`inspect`]: manifest summaries.
//! - [`checkpoint`]: `criu dump --stream` straight into the registry; [`action`]: snapctl
//!   as CRIU's action script (commit at post-dump, verify at post-restore).
//! - [`restore`]: `pull-restore`, the registry streamed into `criu restore --stream`
//!   through the node cache; [`zero_pages`]: zero pages of private anonymous memory
//!   left out of the served pagemap.
//! - [`cuda`]: NVIDIA's CUDA checkpoint API, loaded at run time (through
//!   `snapreg_weights::libcuda`, the one libcuda loader), one process for every PID;
//!   [`device_memory`]: which parts of the image hold GPU memory.
//! - [`weights`]: separated mode: the weights layer read from and filled into the node's
//!   weights service (the service itself is the `snapreg-weights` crate).
//! - [`process`]: facts about a live process tree (PIDs, huge pages, files it reopens).
//! - [`cache`]: the node chunk cache shared by every snapctl on the node.
//! - [`criu_stream`]: CRIU's image-streamer protocol (sockets, fd passing, replies).
//! - [`criu`]: finding a CRIU ≥ 4.2; [`criu_image`]: CRIU's image records, generated
//!   from its .proto files (client/proto/criu); [`host`]: this host's compatibility facts.
//! - [`progress`]: the transfer counters of DESIGN's JSON contract and the progress bar.
//! - [`agent`]: `snapctl agent`, the node agent (NodeAgent gRPC service, cache
//!   management, node registration).
//! - [`error`]: [`ClientError`] and the documented exit codes.
//!
//! The binary `snapctl` (src/main.rs) parses arguments and calls these.

pub mod action;
pub mod agent;
pub mod cache;
pub mod checkpoint;
pub mod chunker;
pub mod copy;
pub mod criu;
pub mod criu_image;
pub mod criu_stream;
pub mod cuda;
pub mod device_memory;
pub mod encryption;
pub mod error;
pub mod fetch;
pub mod host;
pub mod inspect;
pub mod podman;
pub mod prefetch;
pub mod process;
pub mod progress;
pub mod pull;
pub mod push;
pub mod remote;
pub mod restore;
pub mod verify;
pub mod weights;
pub mod work_dir;
pub mod zero_pages;

pub use error::ClientError;
