//! Opening a registry with everything a serving instance adds (access tokens, TLS,
//! replication peers, metrics, health) and serving it on a listener until shutdown.
//!
//! Lifecycle of [`Server::run`]: health turns SERVING once the listener serves; a
//! store probe every [`STORE_PROBE_EVERY`] turns it NOT_SERVING while the object
//! store does not answer (and back); on shutdown it turns NOT_SERVING, the server
//! drains (drain.rs: no new pushes, open ones may finish for up to
//! [`ServerConfig::drain_grace`]), then stops.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry as MetricsRegistry;
use snapreg_proto::pb::registry_server::RegistryServer;
use snapreg_telemetry::rpc::RpcMetricsLayer;
use snapreg_telemetry::Health;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::StreamExt;

use crate::access::AuthorizedRegistry;
use crate::auth::{Authenticator, Scope, TokenStore};
use crate::drain::Drain;
use crate::error::{RegistryError, Result};
use crate::metrics::RegistryMetrics;
use crate::registry::{Registry, RegistryConfig};
use crate::replication::{PeerConfig, Replicator, MAX_MESSAGE_BYTES};
use crate::service::{Lifecycle, RegistryService};

/// The gRPC service this server serves (health and metrics label it).
pub const SERVICE_NAME: &str = "snapreg.v1.Registry";
/// How often a serving registry checks that its object store answers.
pub const STORE_PROBE_EVERY: Duration = Duration::from_secs(10);
/// How long one store probe may take before the store counts as not answering.
const STORE_PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the replication-lag gauges are refreshed.
const REPLICATION_GAUGES_EVERY: Duration = Duration::from_secs(2);

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
    /// On shutdown, how long pushes already begun may take to commit.
    pub drain_grace: Duration,
}

/// What a serving registry reports: its metrics and its health. Created before the
/// registry opens, so a `/readyz` can say "not ready" while the index opens.
#[derive(Clone)]
pub struct Telemetry {
    pub metrics: Arc<RegistryMetrics>,
    pub rpc: RpcMetricsLayer,
    pub health: Health,
}

impl Telemetry {
    /// Registers every registry metric (and the RPC counters) in `registry`.
    pub async fn new(registry: &mut MetricsRegistry) -> Telemetry {
        Telemetry {
            metrics: RegistryMetrics::new(registry),
            rpc: RpcMetricsLayer::new(registry, &[SERVICE_NAME, "grpc.health.v1.Health"]),
            health: Health::new(&[SERVICE_NAME]).await,
        }
    }
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
            drain_grace: Duration::from_secs(30),
        }
    }
}

/// An opened registry, ready to serve: [`Server::run`] serves it.
pub struct Server {
    registry: Arc<Registry>,
    replicator: Arc<Replicator>,
    auth: Arc<Authenticator>,
    tls: Option<tonic::transport::ServerTlsConfig>,
    telemetry: Telemetry,
    drain_grace: Duration,
    /// Connections from [`LocalLink`]s, served beside the listener.
    local: Option<mpsc::Receiver<LocalConn>>,
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
    /// Opens the registry ([`Registry::open`]) and checks the serving settings; its
    /// metrics are registered nowhere (see [`Server::open_with`]).
    pub async fn open(config: ServerConfig) -> Result<Server> {
        let telemetry = Telemetry::new(&mut MetricsRegistry::default()).await;
        Server::open_with(config, telemetry).await
    }

    /// [`Server::open`], reporting through `telemetry`.
    pub async fn open_with(config: ServerConfig, telemetry: Telemetry) -> Result<Server> {
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
            telemetry,
            drain_grace: config.drain_grace,
            local: None,
        })
    }

    /// A way for a gateway in this process (the OCI listener) to call this server's
    /// registry service: the same service and access checks as the listener, over
    /// in-memory pipes (no socket, no TLS). Served from [`Server::run`] on.
    pub fn local_link(&mut self) -> LocalLink {
        let (tx, rx) = mpsc::channel(16);
        self.local = Some(rx);
        LocalLink {
            tx,
            in_process_token: self.auth.in_process_token().to_string(),
        }
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Serves on `listener` until `shutdown` completes and the server has drained,
    /// replicating to the peers meanwhile (one task per peer). Every background task
    /// (replication, Watch streams, probes) stops with the server, and this returns
    /// once they have.
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<()> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut tasks = self.replicator.spawn(&self.registry, stop_rx.clone());
        tasks.push(tokio::spawn(probe_store(
            self.registry.clone(),
            self.telemetry.health.clone(),
            stop_rx.clone(),
        )));
        tasks.push(tokio::spawn(replication_gauges(
            self.registry.clone(),
            self.replicator.clone(),
            self.telemetry.metrics.clone(),
            stop_rx.clone(),
        )));
        let drain = Arc::new(Drain::default());
        let shutdown = drain_on(
            shutdown,
            drain.clone(),
            self.drain_grace,
            &self.telemetry,
            stop_tx,
        );
        let lifecycle = Lifecycle {
            metrics: self.telemetry.metrics.clone(),
            drain,
            stop: stop_rx,
        };
        let service = RegistryService::new(self.registry, self.replicator, lifecycle.clone());
        let service = RegistryServer::new(AuthorizedRegistry::new(service, self.auth))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        if let Some(local) = self.local {
            tasks.push(tokio::spawn(serve_local(
                local,
                service.clone(),
                self.telemetry.rpc.clone(),
                lifecycle.stop,
            )));
        }
        let served = serve(listener, service, self.tls, &self.telemetry, shutdown).await;
        for t in tasks {
            let _ = t.await;
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

/// The server's shutdown future: after `signal`, health turns NOT_SERVING and the
/// drain waits (up to `grace`) for open pushes; then the background tasks are told to
/// stop and tonic stops serving. The sender lives in the future, so dropping it (when
/// serving ends any other way) stops the tasks too.
fn drain_on(
    signal: impl Future<Output = ()> + Send,
    drain: Arc<Drain>,
    grace: Duration,
    telemetry: &Telemetry,
    stop: watch::Sender<bool>,
) -> impl Future<Output = ()> + Send {
    let health = telemetry.health.clone();
    async move {
        signal.await;
        health.set_ready(false).await;
        let open = drain.open_pushes();
        tracing::info!(open_pushes = open, grace = ?grace, "draining: no new pushes");
        let left = drain.drain(grace).await;
        if left > 0 {
            tracing::warn!(
                open_pushes = left,
                "drain grace period over; abandoning open pushes"
            );
        }
        let _ = stop.send(true);
    }
}

/// Turns health NOT_SERVING while the object store does not answer, and back.
async fn probe_store(reg: Arc<Registry>, health: Health, mut stop: watch::Receiver<bool>) {
    loop {
        let answered = tokio::time::timeout(STORE_PROBE_TIMEOUT, reg.store().check_layout()).await;
        let ok = matches!(answered, Ok(Ok(())));
        if !ok {
            tracing::warn!("object store does not answer: not ready");
        }
        if *stop.borrow() {
            return;
        }
        health.set_ready(ok).await;
        tokio::select! {
            _ = tokio::time::sleep(STORE_PROBE_EVERY) => {}
            _ = stop.changed() => return,
        }
    }
}

async fn replication_gauges(
    reg: Arc<Registry>,
    replicator: Arc<Replicator>,
    metrics: Arc<RegistryMetrics>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        if let Ok(status) = replicator.status(&reg) {
            metrics.update_replication(&status);
        }
        tokio::select! {
            _ = tokio::time::sleep(REPLICATION_GAUGES_EVERY) => {}
            _ = stop.changed() => return,
        }
    }
}

type Service = RegistryServer<AuthorizedRegistry>;

async fn serve(
    listener: TcpListener,
    service: Service,
    tls: Option<tonic::transport::ServerTlsConfig>,
    telemetry: &Telemetry,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
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
        .layer(telemetry.rpc.clone())
        .add_service(telemetry.health.grpc_service())
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(|e| RegistryError::Io(std::io::Error::other(e)))
}

/// In-process connections to a [`Server`]'s registry service ([`Server::local_link`]).
#[derive(Clone)]
pub struct LocalLink {
    tx: mpsc::Sender<LocalConn>,
    in_process_token: String,
}

impl std::fmt::Debug for LocalLink {
    // Never print the in-process token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalLink").finish_non_exhaustive()
    }
}

/// Bytes each way buffered in one in-process connection.
const LOCAL_PIPE_BYTES: usize = 4 << 20;

impl LocalLink {
    /// The registry's in-process token (auth.rs `Authenticator::in_process_token`):
    /// push on every repository, valid only over this link's channels.
    pub fn in_process_token(&self) -> &str {
        &self.in_process_token
    }

    /// A gRPC channel whose connections are in-memory pipes to the server; it
    /// connects on first use and fails once the server has stopped.
    pub fn channel(&self) -> tonic::transport::Channel {
        let tx = self.tx.clone();
        tonic::transport::Endpoint::from_static("http://snapreg.in-process")
            .initial_stream_window_size(Some(8 << 20))
            .initial_connection_window_size(Some(32 << 20))
            .connect_with_connector_lazy(tower::service_fn(move |_: http::Uri| {
                let tx = tx.clone();
                async move {
                    let (here, there) = tokio::io::duplex(LOCAL_PIPE_BYTES);
                    tx.send(LocalConn(there)).await.map_err(|_| {
                        std::io::Error::new(
                            std::io::ErrorKind::ConnectionRefused,
                            "the registry has stopped serving",
                        )
                    })?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(here))
                }
            }))
    }
}

/// The server's end of one in-process connection.
pub struct LocalConn(tokio::io::DuplexStream);

impl tonic::transport::server::Connected for LocalConn {
    type ConnectInfo = ();
    fn connect_info(&self) {}
}

impl tokio::io::AsyncRead for LocalConn {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for LocalConn {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Serves the in-process connections until the server stops, counted in the same
/// RPC metrics as the listener's.
async fn serve_local(
    conns: mpsc::Receiver<LocalConn>,
    service: Service,
    rpc: RpcMetricsLayer,
    mut stop: watch::Receiver<bool>,
) {
    let incoming = tokio_stream::wrappers::ReceiverStream::new(conns).map(Ok::<_, std::io::Error>);
    let stopped = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    if let Err(e) = tonic::transport::Server::builder()
        .layer(rpc)
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, stopped)
        .await
    {
        tracing::warn!(error = %e, "in-process registry connections stopped");
    }
}
