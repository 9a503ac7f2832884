//! Opening a data directory and serving the registry on a listener.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use snapreg_proto::pb::registry_server::RegistryServer;
use snapreg_proto::tags::HlcClock;
use snapreg_proto::Digest;
use tokio::net::TcpListener;
use tokio::sync::{Mutex, MutexGuard};
use tokio_stream::StreamExt;

use crate::auth::{Authenticator, AuthorizedRegistry, Scope, TokenStore};
use crate::chunk_store::ChunkStore;
use crate::error::{RegistryError, Result};
use crate::index::Index;
use crate::replication::{PeerConfig, Replication};
use crate::service::RegistryService;
use crate::shared_store::SharedStore;

/// Largest gRPC message either side accepts: a 16 MiB chunk object, or a manifest.
pub const MAX_MESSAGE_BYTES: usize = snapreg_proto::manifest::MAX_MANIFEST_BYTES + (1 << 20);

#[derive(Clone, Debug)]
pub struct RegistryConfig {
    /// Holds the RocksDB index (`index/`) and, by default, the object store (`store/`).
    pub data_dir: PathBuf,
    /// `file:///path` or `s3://bucket/prefix`; `None` means `<data_dir>/store`.
    pub store_url: Option<String>,
    /// Unreferenced chunks younger than this survive GC.
    pub gc_grace: Duration,
    /// How long a push lease lives without activity, and after its commit.
    pub lease_ttl: Duration,
    /// Registries this one replicates its commits to (see replication.rs).
    pub peers: Vec<PeerConfig>,
    /// Longest wait between two attempts at a failing peer.
    pub replication_backoff_max: Duration,
    /// What callers without a token may do (auth.rs); `None`: nothing.
    pub anonymous: Option<Scope>,
    /// How long a looked-up token is trusted before the store is read again (so how
    /// long a revocation takes to reach this registry).
    pub auth_cache_ttl: Duration,
    /// Serve TLS instead of plain HTTP/2.
    pub tls: Option<TlsFiles>,
    /// Repositories that take only snapshots encrypted with a given tenant key.
    pub tenant_keys: Vec<crate::tenant_keys::TenantKeyRule>,
}

/// PEM files for the listener: certificate chain, key and, for mutual TLS, the CA
/// that must have signed every client's certificate.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

impl RegistryConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        RegistryConfig {
            data_dir: data_dir.into(),
            store_url: None,
            gc_grace: Duration::from_secs(3600),
            lease_ttl: Duration::from_secs(3600),
            peers: Vec::new(),
            replication_backoff_max: Duration::from_secs(5),
            anonymous: None,
            auth_cache_ttl: Duration::from_secs(5),
            tls: None,
            tenant_keys: Vec::new(),
        }
    }
}

/// Shared state of one registry instance.
pub struct Registry {
    pub(crate) store: ChunkStore,
    pub(crate) index: Index,
    pub(crate) clock: HlcClock,
    pub(crate) config: RegistryConfig,
    /// Per-digest critical sections (see lib.rs invariants), striped by first byte.
    stripes: Vec<Mutex<()>>,
    pub(crate) gc_running: Mutex<()>,
    /// While a GC runs: digests committed (manifests, their chunks) since its mark
    /// began, which it must treat as live. `None` when no GC runs.
    pub(crate) gc_committed: std::sync::Mutex<Option<std::collections::HashSet<Digest>>>,
    /// The replication log's head and the peers' counters.
    pub(crate) replication: Replication,
    /// Bumped after every append to the replication log: wakes Watch streams.
    pub(crate) log_appended: tokio::sync::watch::Sender<u64>,
    /// Turns true when the server shuts down: ends Watch streams, which would
    /// otherwise hold a graceful shutdown open forever.
    pub(crate) shutting_down: tokio::sync::watch::Sender<bool>,
    /// Store leases and sweep logs shared with other instances on the same store.
    pub(crate) shared: SharedStore,
    auth: Arc<Authenticator>,
    tls: Option<tonic::transport::ServerTlsConfig>,
}

impl Registry {
    pub(crate) async fn lock_digest(&self, d: &Digest) -> MutexGuard<'_, ()> {
        self.stripes[d.0[0] as usize].lock().await
    }

    /// Called by every commit (manifest, tag) before its lease is released, so a GC
    /// whose mark began earlier still sees these digests as live.
    pub(crate) fn note_committed(&self, digests: impl IntoIterator<Item = Digest>) {
        if let Some(set) = self.gc_committed.lock().unwrap().as_mut() {
            set.extend(digests);
        }
    }

    pub fn store(&self) -> &ChunkStore {
        &self.store
    }

    pub fn index(&self) -> &Index {
        &self.index
    }
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

/// Opens (creating when new) the store and index; rebuilds the index when it is new.
pub async fn open(config: RegistryConfig) -> Result<Arc<Registry>> {
    std::fs::create_dir_all(&config.data_dir)?;
    let store = ChunkStore::open(config.store_url.as_deref(), config.data_dir.join("store"))?;
    let objects = store.object_store();
    store.check_layout().await?;
    // TLS material is read now, so a bad file fails the start, not the first client.
    let tls = match &config.tls {
        None => None,
        Some(f) => {
            let tls =
                snapreg_proto::credentials::server_tls(&f.cert, &f.key, f.client_ca.as_deref())
                    .map_err(|e| RegistryError::invalid("--tls-cert", e.to_string()))?;
            tonic::transport::Server::builder()
                .tls_config(tls.clone())
                .map_err(|e| {
                    let mut why = e.to_string();
                    let mut cur = std::error::Error::source(&e);
                    while let Some(c) = cur {
                        why = format!("{why}: {c}");
                        cur = c.source();
                    }
                    RegistryError::invalid(
                        "--tls-cert",
                        format!(
                            "{} / {} are not a PEM certificate chain and its private key ({why})",
                            f.cert.display(),
                            f.key.display()
                        ),
                    )
                })?;
            Some(tls)
        }
    };
    let auth = Arc::new(Authenticator::new(
        TokenStore::new(objects),
        config.anonymous,
        config.auth_cache_ttl,
    ));
    let index = Index::open(&config.data_dir.join("index"))?;
    if !index.is_built()? {
        let stats = index.rebuild(&store).await?;
        tracing::info!(?stats, "index built from the store");
    }
    let clock = HlcClock::default();
    clock.observe(index.max_hlc()?);
    let replication = Replication::new(&index, &config.peers, config.replication_backoff_max)?;
    let shared = SharedStore::for_data_dir(&config.data_dir)?;
    shared.clear_stale_gc_lock(&store).await?;
    Ok(Arc::new(Registry {
        store,
        index,
        clock,
        config,
        stripes: (0..256).map(|_| Mutex::new(())).collect(),
        gc_running: Mutex::new(()),
        gc_committed: std::sync::Mutex::new(None),
        replication,
        log_appended: tokio::sync::watch::Sender::new(0),
        shutting_down: tokio::sync::watch::Sender::new(false),
        shared,
        auth,
        tls,
    }))
}

/// The tokens of the store `config` names, without opening the index: token commands
/// run beside a serving registry, which holds the RocksDB lock.
pub async fn open_tokens(config: &RegistryConfig) -> Result<TokenStore> {
    let store = ChunkStore::open(config.store_url.as_deref(), config.data_dir.join("store"))?;
    store.check_layout().await?;
    Ok(TokenStore::new(store.object_store()))
}

/// Serves the registry on `listener` until `shutdown` completes, replicating to its
/// peers meanwhile (one task per peer, stopped with the server).
pub async fn run(
    listener: TcpListener,
    registry: Arc<Registry>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let replicators = crate::replication::spawn(&registry, stop_rx);
    let reg = registry.clone();
    // The sender lives in the shutdown future: it signals on shutdown, and is dropped
    // (which stops the replicators too) whenever serving ends.
    let shutdown = async move {
        shutdown.await;
        let _ = stop_tx.send(true);
        reg.shutting_down.send_replace(true);
    };
    let served = serve(listener, registry, shutdown).await;
    for r in replicators {
        let _ = r.await;
    }
    served
}

async fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    let auth = registry.auth.clone();
    let tls = registry.tls.clone();
    let service = RegistryServer::new(AuthorizedRegistry::new(
        RegistryService::new(registry),
        auth,
    ))
    .max_decoding_message_size(MAX_MESSAGE_BYTES)
    .max_encoding_message_size(MAX_MESSAGE_BYTES);
    // Nagle's algorithm plus delayed ACKs cost 40 ms per small response (measured: each
    // small image file of a restore took 43 ms to serve before this).
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(|conn| {
        if let Ok(c) = &conn {
            let _ = c.set_nodelay(true);
        }
        conn
    });
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder
            .tls_config(tls)
            .map_err(|e| RegistryError::invalid("--tls-cert", e.to_string()))?;
    }
    builder
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(|e| RegistryError::Io(std::io::Error::other(e)))
}
