//! The weights service: model weights kept apart from a worker's process snapshot.
//!
//! A node-local service (`snapctl weights serve`) owns named weight buffers — CUDA
//! virtual-memory allocations exported as POSIX file descriptors on a GPU node, memfds on
//! a CPU-only node — and hands a descriptor to whoever asks over a UNIX socket. A worker
//! maps the buffers into address ranges it reserved itself, so:
//!
//! ```text
//! worker                              service                        snapctl
//! create/attach ──request──▶ lease(pid) + fd ──▶ map at reserved VA
//! quiesce(): unmap, keep the VA range ─release──▶ lease dropped, pid recorded as quiesced
//!                                                  checkpoint --weights-service:
//!                                                  refuse if the tree holds a lease;
//!                                                  process layer from CRIU, weights layer
//!                                                  read from the service (no upload when
//!                                                  the registry has it)
//!                                                  pull-restore --weights-service:
//!                                                  fill buffers from the registry while
//!                                                  CRIU restores; then signal each
//!                                                  quiesced pid
//! resume(): re-attach at the same VA ◀── fd
//! ```
//!
//! Every exchange is one connection: one JSON request line, one JSON reply line with at
//! most one descriptor attached (SCM_RIGHTS). A worker never holds a connection open,
//! because CRIU will not dump a socket connected to a process outside the tree.
//!
//! Why leases: memory of another process left mapped at checkpoint time is copied into
//! the image by the CUDA driver, and the CUDA restore then fails (NOT_SUPPORTED) and the
//! process hangs; nothing from outside the process can see that mapping. The service
//! records who holds what (by the peer's credentials, not by what it claims), and
//! `snapctl checkpoint` refuses a tree that still holds a lease.

mod backend;
pub mod client;
mod cuda;
pub mod libcuda;
mod memfd;
pub mod protocol;
pub mod service;

pub use backend::{open_mapping, BackendKind, Mapping};
pub use client::{Attached, WeightsClient};
pub use protocol::{BufferInfo, Quiesced};
pub use service::{Service, ServiceConfig};

/// Weight buffers (memfd backend) that `pid` still maps or holds open, by name: the
/// check a checkpoint makes besides the leases, for what a worker forgot to release.
pub fn memfd_buffers_held_by(pid: u32) -> Vec<String> {
    memfd::mapped_by(pid)
}

/// What can go wrong talking to, or inside, the weights service.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("weights service at {socket}: {message}")]
    Service { socket: String, message: String },
    #[error("malformed message from the weights service: {0}")]
    Protocol(String),
    #[error("CUDA: {0}")]
    Cuda(String),
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// Buffer names become file names in the weights layer: the same rules as manifest
/// paths, kept short.
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 200
        && name
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..")
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "invalid weight buffer name {name:?}: use letters, digits, '.', '_', '-' and '/' separated parts"
        )))
    }
}
