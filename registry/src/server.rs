//! Opening a registry with everything a serving instance adds (access tokens, TLS,
//! replication peers) and serving it on a listener until shutdown.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use snapreg_proto::pb::registry_server::RegistryServer;
use tokio::net::TcpListener;
use tokio_stream::StreamExt;

use crate::access::AuthorizedRegistry;
use crate::auth::{Authenticator, Scope, TokenStore};
use crate::error::{RegistryError, Result};
use crate::registry::{Registry, RegistryConfig};
use crate::replication::{PeerConfig, Replicator, MAX_MESSAGE_BYTES};
use crate::service::RegistryService;

/// A serving instance's configuration: the registry's own, and what serving adds.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub registry: RegistryConfig,
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
}

/// PEM files for the listener: certificate chain, key and, for mutual TLS, the CA
/// that must have signed every client's certificate.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

impl ServerConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        ServerConfig {
            registry: RegistryConfig::new(data_dir),
            peers: Vec::new(),
            replication_backoff_max: Duration::from_secs(5),
            anonymous: None,
            auth_cache_ttl: Duration::from_secs(5),
            tls: None,
        }
    }
}

/// An opened registry, ready to serve: [`Server::run`] serves it.
pub struct Server {
    registry: Arc<Registry>,
    replicator: Arc<Replicator>,
    auth: Arc<Authenticator>,
    tls: Option<tonic::transport::ServerTlsConfig>,
}

/// Reads the TLS files now, so a bad file fails the start, not the first client.
fn load_tls(f: &TlsFiles) -> Result<tonic::transport::ServerTlsConfig> {
    let tls = snapreg_proto::credentials::server_tls(&f.cert, &f.key, f.client_ca.as_deref())
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
    Ok(tls)
}

impl Server {
    /// Opens the registry ([`Registry::open`]) and checks the serving settings.
    pub async fn open(config: ServerConfig) -> Result<Server> {
        let tls = config.tls.as_ref().map(load_tls).transpose()?;
        let replicator = Replicator::new(&config.peers, config.replication_backoff_max)?;
        let registry = Registry::open(config.registry).await?;
        let auth = Authenticator::new(
            TokenStore::new(registry.store().object_store()),
            config.anonymous,
            config.auth_cache_ttl,
        );
        Ok(Server {
            registry,
            replicator: Arc::new(replicator),
            auth: Arc::new(auth),
            tls,
        })
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Serves on `listener` until `shutdown` completes, replicating to the peers
    /// meanwhile (one task per peer). Every background task (replication, Watch
    /// streams) stops with the server, and this returns once they have.
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<()> {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let replicators = self.replicator.spawn(&self.registry, stop_rx.clone());
        // The sender lives in the shutdown future: it signals on shutdown, and is
        // dropped (which stops the tasks too) whenever serving ends.
        let shutdown = async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        };
        let service = RegistryService::new(self.registry, self.replicator, stop_rx);
        let served = serve(listener, service, self.auth, self.tls, shutdown).await;
        for r in replicators {
            let _ = r.await;
        }
        served
    }
}

/// The tokens of the store `config` names, without opening the index: token commands
/// run beside a serving registry, which holds the RocksDB lock.
pub async fn open_tokens(config: &RegistryConfig) -> Result<TokenStore> {
    let store = config.open_store()?;
    store.check_layout().await?;
    Ok(TokenStore::new(store.object_store()))
}

async fn serve(
    listener: TcpListener,
    service: RegistryService,
    auth: Arc<Authenticator>,
    tls: Option<tonic::transport::ServerTlsConfig>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    let service = RegistryServer::new(AuthorizedRegistry::new(service, auth))
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
