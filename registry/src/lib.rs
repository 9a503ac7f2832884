//! The snapreg registry: a gRPC server over an object store.
//!
//! - [`chunk_store`]: chunk, manifest and tag-record objects in `object_store` (the
//!   source of truth), written once, fsync'd on the local backend.
//! - [`index`]: RocksDB under the data dir: chunk and manifest presence, current tag
//!   values, push leases. Rebuildable from the store ([`index::Index::rebuild`]),
//!   except leases, which are node-local and short-lived by design.
//! - [`service`]: the `snapreg.v1.Registry` RPC handlers.
//! - [`auth`]: bearer tokens (stored hashed in the object store under `auth/`) and
//!   what each RPC needs; every RPC passes through it before its handler.
//! - [`gc`]: mark from tags and leases, sweep what is unreferenced and old.
//! - [`server`]: opening a data dir and serving on a listener until shutdown.
//! - [`scheduler`]: the scheduler API: `Resolve` (compatible snapshots for a node,
//!   newest first, with sizes and cached bytes) and `Watch` (the commit log as a
//!   resumable event stream), plus node registration (`RegisterNode`, `ListNodes`)
//!   for `snapctl agent`.
//! - [`shared_store`]: several instances on one store: store leases that keep GC on
//!   one instance from racing a push on another, sweep logs, and the rule that the
//!   index is a cache that looks in the store before calling anything missing.
//! - [`retention`]: per-repository keep-N / keep-for-D policies (stored in the object
//!   store), applied by `ApplyRetention` and before every GC.
//! - [`scrub`]: re-reading and verifying every stored object; damaged ones move to
//!   `quarantine/` and out of the index, so the next push re-uploads them.
//! - [`tenant_keys`]: repositories that take only snapshots encrypted with their
//!   tenant's key (the registry holds no keys; clients encrypt).
//! - [`replication`]: pushing this registry's commits (tag records, their manifests
//!   and missing chunks) to its peers, with a durable per-peer cursor.
//!
//! Invariants:
//! - A chunk is in the index only after its object is durable; a manifest is stored
//!   only after every chunk it names is in the index; a tag record is written only
//!   after its manifest is stored. A crash at any point leaves at worst unreferenced
//!   objects, which GC removes; never a visible tag with missing data.
//! - Every change to a chunk's presence (upload, sweep) and every lease taken on it by
//!   a "which are missing" answer happen under that chunk's stripe lock, so GC never
//!   sweeps a chunk a push was just told exists.

pub mod auth;
pub mod chunk_store;
pub mod error;
pub mod gc;
pub mod index;
pub mod replication;
pub mod retention;
pub mod scheduler;
pub mod scrub;
pub mod server;
pub mod service;
pub mod shared_store;
pub mod tenant_keys;

pub use error::RegistryError;
pub use replication::PeerConfig;
pub use server::{open, open_tokens, run, Registry, RegistryConfig, TlsFiles};
