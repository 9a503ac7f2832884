//! The node client of snapreg as a library; the `snapctl` crate (cli/) is its command
//! line and the one place that prints, exits or draws.
//!
//! - [`chunker`]: FastCDC with page-aligned cuts and zero runs, streaming.
//! - [`push`]: chunk, hash and upload in parallel; commit a manifest ([`push::Uploader`]
//!   is the engine every producer of bytes uses).
//! - [`pull`]: fetch, verify and write files under temporary names; rename when whole.
//! - [`remote`]: one registry connection, errors naming its address (gRPC statuses
//!   become [`ClientError`]s there).
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
//! - [`cuda`]: NVIDIA's CUDA checkpoint API, loaded at run time, one process for every PID;
//!   [`device_memory`]: which parts of the image hold GPU memory.
//! - [`weights`]: separated mode: the weights layer read from and filled into the node's
//!   weights service (the service itself is the `snapreg-weights` crate).
//! - [`process`]: facts about a live process tree (PIDs, huge pages, files it reopens).
//! - [`cache`]: the node chunk cache shared by every snapctl on the node.
//! - [`criu_stream`]: CRIU's image-streamer protocol (sockets, fd passing, replies).
//! - [`criu`]: finding a CRIU ≥ 4.2; [`host`]: this host's compatibility facts.
//! - [`progress`]: the transfer counters of DESIGN's JSON contract, and progress events
//!   for the caller's [`progress::ProgressObserver`] (warnings the user must see too).
//! - [`agent`]: `snapctl agent`, the node agent (NodeAgent gRPC service, cache
//!   management, node registration).
//! - [`error`]: [`ClientError`], and [`error::ErrorKind`], the cases callers treat alike
//!   (snapctl's exit codes, the agent's gRPC codes).
//!
//! Nothing here exits the process or draws: errors are returned (also [`action`]'s
//! verdict), and what the user must see goes to the caller's observer
//! ([`progress::Progress::warn`]).

pub mod action;
pub mod agent;
pub mod cache;
pub mod checkpoint;
pub mod chunker;
pub mod copy;
pub mod criu;
pub mod criu_stream;
pub mod cuda;
pub mod device_memory;
pub mod direct;
pub mod encryption;
pub mod error;
pub mod host;
pub mod inspect;
pub mod podman;
pub mod process;
pub mod progress;
pub mod pull;
pub mod push;
pub mod remote;
pub mod restore;
pub mod verify;
pub mod weights;
pub mod zero_pages;

pub use error::ClientError;
