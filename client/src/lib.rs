//! The node client of snapreg as a library; the `snapctl` crate (`cli/`) is its command
//! line and the one place that prints, exits or draws.
//!
//! Modules, by what a reader looks for:
//!
//! - Moving snapshots: [`push`] (chunk, hash, upload; [`push::Uploader`] is the engine
//!   every producer of bytes uses), [`pull`] (files written under temporary names,
//!   renamed when whole), [`prefetch`] (a snapshot into the node cache), [`verify`]
//!   (every chunk checked, bad ones named), [`copy`] (re-encrypted copies),
//!   [`inspect`] (manifest summaries), [`podman`] (Podman checkpoint archives),
//!   [`oci_image`] (a snapshot as an OCI checkpoint image; `export` to an OCI layout).
//! - Reading chunks: [`fetch`], the one stack every reader goes through — [`fetch::Chunks`]
//!   over the node cache, sibling nodes, presigned object-store URLs and the
//!   registries in order, each chunk verified by its address on arrival; [`cache`] is
//!   the node chunk cache; [`peer`] is fleet fan-out (the tracker, the peer calls of
//!   the agents, the swarm a reader joins).
//! - Restoring: [`restore`] (`pull-restore`: `plan` → `serve` + `files` → `finish`),
//!   [`zero_pages`] (zero pages left out of the served pagemap), [`device_memory`]
//!   (which parts of the image hold GPU memory).
//! - Checkpointing: [`checkpoint`] (`plan` → `capture`, or `spool`), [`action`] (snapctl
//!   as CRIU's action script: commit at post-dump, verify at post-restore).
//! - [`written_files`]: files the tree holds open for writing, captured at checkpoint
//!   into the layer "files" and put back (moving a different file aside) before CRIU
//!   reopens them at restore.
//! - CRIU: [`criu`] (finding a CRIU ≥ 4.2, running it), [`criu_stream`] (the
//!   image-streamer protocol and its request loops), [`criu_image`] (CRIU's image
//!   records, generated from its .proto files in client/proto/criu), [`process`]
//!   (facts about a live process tree), [`work_dir`] (short private directories).
//! - GPUs: [`cuda`] (NVIDIA's checkpoint API, one process for every PID), [`weights`]
//!   (separated mode: the weights layer read from and filled into the node's weights
//!   service, the `snapreg-weights` crate).
//! - The node: [`agent`] (the NodeAgent gRPC service, cache management, node
//!   registration, the node's Prometheus metrics), [`host`] (this host's
//!   compatibility facts), [`node_reports`] (each snapctl operation's outcome, left
//!   in the node cache for the agent's metrics).
//! - Plumbing: [`remote`] (one registry connection; gRPC statuses become
//!   [`ClientError`]s there), [`encryption`] (which tenant key opens a snapshot),
//!   [`chunker`] (FastCDC, page-aligned, zero runs), [`progress`] (the transfer
//!   counters of DESIGN's JSON contract, and events for the caller's
//!   [`progress::ProgressObserver`]), [`error`] ([`ClientError`] and its
//!   [`error::ErrorKind`]).
//!
//! Nothing here exits the process or draws: errors are returned (also [`action`]'s
//! verdict), and what the user must see goes to the caller's observer
//! ([`progress::Progress::warn`]).
//!
//! Embedding: a platform's own node agent restoring a snapshot from the registry,
//! through the node cache, without `snapctl`:
//!
//! ```no_run
//! use snapreg_client::cache::ChunkCache;
//! use snapreg_client::progress::Progress;
//! use snapreg_client::peer::PeerConfig;
//! use snapreg_client::remote::{Credentials, Remote};
//! use snapreg_client::{criu, restore};
//!
//! # async fn embed() -> Result<(), Box<dyn std::error::Error>> {
//! let remote = Remote::connect("http://registry.internal:5000").await?;
//! let criu = criu::locate(None)?; // a CRIU >= 4.2 on PATH
//! let opts = restore::RestoreOptions {
//!     detach: true,
//!     extra_args: Vec::new(),
//!     force: false,
//!     cache: ChunkCache::open("/var/cache/snapctl".as_ref(), 50 << 30)?,
//!     window: restore::DEFAULT_WINDOW,
//!     fetch_memory: restore::DEFAULT_FETCH_MEMORY,
//!     fallbacks: Vec::new(),
//!     weights_service: None,
//!     keep_zero_pages: false,
//!     gpu_map: None,
//!     // Fetch what sibling nodes hold from them (this node's agent is "gpu-node-7").
//!     peers: Some(PeerConfig::new(Some("gpu-node-7".into()), Credentials::default())),
//!     memory: restore::MemoryIn::Streamed,
//! };
//! // The detached tree is orphaned when CRIU exits: this process reaps it meanwhile.
//! restore::become_subreaper();
//! let reference = "team/llama:warm".parse()?;
//! let report = restore::pull_restore(&remote, &criu, &reference, &opts, Progress::hidden()).await?;
//! println!("PID {:?} back in {:.1} s", report.pid, report.seconds);
//! # Ok(())
//! # }
//! ```

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
pub mod lazy_pages;
pub mod node_reports;
pub mod oci_image;
pub mod peer;
pub mod podman;
pub mod prefetch;
pub mod process;
pub mod progress;
pub mod pull;
pub mod push;
pub mod remote;
pub mod restore;
pub mod uffd;
pub mod verify;
pub mod weights;
pub mod work_dir;
pub mod written_files;
pub mod zero_pages;

pub use error::ClientError;
