//! The snapreg registry: a gRPC server over an object store.
//!
//! Modules, in layers; each uses only modules in the layers above it (so no import
//! cycle; `scripts/check-imports.py registry/src` checks it in CI):
//!
//! 1. Foundations
//!    - [`error`]: [`RegistryError`], the crate's one error enum.
//!    - [`clock`]: wall-clock milliseconds for lease expiries and stamps.
//!    - [`chunk_store`]: chunk, manifest and tag-record objects in `object_store` (the
//!      source of truth), written once, fsync'd on the local backend.
//!    - [`index`]: RocksDB under the data dir: chunk and manifest presence, current
//!      tag values, push leases, the commit log. Rebuildable from the store, except
//!      what it documents as node-local.
//!    - [`shared_store`]: several instances on one store: store leases that keep GC on
//!      one instance from racing a push on another, sweep logs, and the index rebuild.
//!    - [`auth`]: bearer tokens (stored hashed in the object store under `auth/`),
//!      scopes and repository patterns, and who a request's metadata names.
//!    - [`tenant_keys`]: repositories that take only snapshots encrypted with their
//!      tenant's key (the registry holds no keys; clients encrypt).
//! 2. The domain
//!    - [`registry`]: [`Registry`], which owns the store, the index, the tag clock and
//!      the commit log, and every push, pull, tag and delete operation, in domain types.
//! 3. Domain operations over a [`Registry`]
//!    - [`retention`]: per-repository keep-N / keep-for-D policies (in the object
//!      store), applied by `ApplyRetention` and before every GC.
//!    - [`gc`]: mark from tags and leases, sweep what is unreferenced and old.
//!    - [`scrub`]: re-reading and verifying every stored object; damaged ones move to
//!      `quarantine/` and out of the index, so the next push re-uploads them.
//!    - [`restore_outcomes`]: how each restore of a snapshot went (in the object
//!      store); Resolve withholds a snapshot whose recent restores on alike nodes
//!      failed.
//!    - [`scheduler`]: `Resolve` (compatible snapshots for a node, newest first, with
//!      sizes and cached bytes), `Watch` (the commit log as a resumable event stream)
//!      and node registrations for `snapctl agent`.
//!    - [`tracker`]: `Swarm`, the fan-out tracker: which registered nodes fetch or
//!      hold which snapshot, so nodes fetch from their siblings (in memory, a hint).
//!    - [`replication`]: pushing this registry's commits (tag records, their manifests
//!      and missing chunks) to its peers, with a durable per-peer cursor.
//! 4. gRPC
//!    - [`service`]: the `snapreg.v1.Registry` handlers: protobuf to domain and back,
//!      and the one mapping of [`RegistryError`] to `tonic::Status`.
//!    - [`access`]: what each RPC needs, checked before its handler runs.
//!    - [`metrics`]: the registry's Prometheus metrics (transfers, dedup, GC, scrub,
//!      replication lag); `snapreg_rpc_*` come from snapreg-telemetry's layer.
//!    - [`drain`]: shutdown without losing pushes: none admitted, open ones finish.
//!    - [`server`]: [`Server::open`] and [`Server::run`]: serving on a listener (with
//!      gRPC health and a store probe) until a shutdown future completes and the
//!      server has drained.
//!
//! Invariants:
//! - A chunk is in the index only after its object is durable; a manifest is stored
//!   only after every chunk it names is in the index; a tag record is written only
//!   after its manifest is stored. A crash at any point leaves at worst unreferenced
//!   objects, which GC removes; never a visible tag with missing data.
//! - Every change to a chunk's presence (upload, sweep) and every lease taken on it by
//!   a "which are missing" answer happen under that chunk's stripe lock, so GC never
//!   sweeps a chunk a push was just told exists.
//! - Only this registry's own tag commits enter the commit log, after their record is
//!   durable; replication and Watch read nothing else.
//! - Background tasks (replication, Watch streams, probes) live no longer than
//!   [`Server::run`].
//!
//! Embedding: open a server on a data directory, bind a listener (port 0 picks a free
//! one) and run until a shutdown future completes:
//!
//! ```no_run
//! use snapreg_registry::{auth::Scope, Server, ServerConfig};
//!
//! # async fn embed() -> Result<(), Box<dyn std::error::Error>> {
//! let mut config = ServerConfig::new("/var/lib/snapreg");
//! config.anonymous = Some(Scope::Push);
//! let server = Server::open(config).await?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! println!("serving on {}", listener.local_addr()?);
//! let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
//! let serving = tokio::spawn(server.run(listener, async move {
//!     let _ = stopped.await;
//! }));
//! // ... talk to it with a `RegistryClient` ...
//! let _ = stop.send(());
//! serving.await??;
//! # Ok(())
//! # }
//! ```

pub mod access;
pub mod auth;
pub mod chunk_store;
pub mod clock;
pub mod drain;
pub mod error;
pub mod gc;
pub mod index;
pub mod metrics;
pub mod registry;
pub mod replication;
pub mod restore_outcomes;
pub mod retention;
pub mod scheduler;
pub mod scrub;
pub mod server;
pub mod service;
pub mod shared_store;
pub mod tenant_keys;
#[cfg(test)]
mod testutil;
pub mod tracker;

pub use error::RegistryError;
pub use registry::{Registry, RegistryConfig};
pub use replication::PeerConfig;
pub use server::{open_tokens, Server, ServerConfig, Telemetry, TlsFiles};
