//! `snapctl agent`: the node agent. One per node, it
//!
//! - serves `snapreg.v1.NodeAgent` (`Prefetch`, `CacheStatus`) over gRPC, so a
//!   scheduler can warm this node's chunk cache before placing a pod and ask how much
//!   of a snapshot the node already holds;
//! - serves the node cache to sibling nodes (`WatchChunks`, `GetChunks`:
//!   [`crate::peer::serve`]), and prefetches through the snapshot's swarm;
//! - manages the node chunk cache every snapctl on the node shares (the size limit is
//!   enforced after each prefetch and on each registration tick);
//! - registers the node's facts ([`crate::host::facts`]), its URL and its cache usage
//!   with every configured registry at start and then every `register_every`.
//!
//! Registries are connected per call (nearest first, unreachable ones skipped), so an
//! agent outlives registry restarts. The agent presents [`AgentConfig::credentials`]
//! (the node's token; a client certificate where registries require mutual TLS) to
//! every registry. Its own listener serves TLS when given a certificate; with a
//! client CA, Prefetch and CacheStatus admit only callers (schedulers) holding a
//! certificate that CA signed, and the peer calls admit those or callers with a
//! token the registry accepts for pull.

pub mod metrics;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry as MetricsRegistry;
use snapreg_proto::pb::node_agent_server::{NodeAgent, NodeAgentServer};
use snapreg_proto::pb::{self};
use snapreg_proto::reference::Reference;
use snapreg_telemetry::rpc::RpcMetricsLayer;
use snapreg_telemetry::Health;
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

use self::metrics::NodeMetrics;

use crate::cache::ChunkCache;
use crate::error::{ClientError, ErrorKind, Result};
use crate::node_reports::{self, OperationReport, Outcome};
use crate::peer::serve::{ChunkStream, HeldStream, PeerService};
use crate::peer::PeerConfig;
use crate::progress::Progress;
use crate::remote::{Credentials, Remote};

#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// The node's name in the registry (default: the hostname).
    pub node_name: String,
    /// The URL registered for this agent (default: `http://<bound address>`).
    pub advertise_url: Option<String>,
    /// Registry URLs, nearest first.
    pub registries: Vec<String>,
    pub cache: ChunkCache,
    pub register_every: Duration,
    /// Chunk fetches in flight per prefetch.
    pub window: usize,
    /// What the agent presents to registries.
    pub credentials: Credentials,
    /// TLS for the agent's own listener.
    pub tls: Option<tonic::transport::ServerTlsConfig>,
    /// `tls` names a client CA: Prefetch and CacheStatus need a certificate it signed.
    pub client_ca: bool,
    /// Labels registered with the node's facts, e.g. `topology.kubernetes.io/zone`
    /// (the tracker prefers peers in the same zone, then region).
    pub labels: BTreeMap<String, String>,
}

/// The gRPC service the agent serves (health and metrics label it).
pub const SERVICE_NAME: &str = "snapreg.v1.NodeAgent";

/// What a running agent reports: its metrics and its health.
#[derive(Clone)]
pub struct AgentTelemetry {
    pub metrics: Arc<NodeMetrics>,
    pub rpc: RpcMetricsLayer,
    pub health: Health,
}

impl AgentTelemetry {
    /// Registers every node metric (and the RPC counters) in `registry`.
    pub async fn new(registry: &mut MetricsRegistry) -> AgentTelemetry {
        AgentTelemetry {
            metrics: NodeMetrics::new(registry),
            rpc: RpcMetricsLayer::new(registry, &[SERVICE_NAME, "grpc.health.v1.Health"]),
            health: Health::new(&[SERVICE_NAME]).await,
        }
    }
}

#[derive(Clone)]
struct Agent {
    config: AgentConfig,
    agent_url: String,
    peers: Arc<PeerService>,
    metrics: Arc<NodeMetrics>,
}

/// Every reachable registry, nearest first; an error only if none answers.
async fn connect_all(urls: &[String], creds: &Credentials) -> Result<Vec<Remote>> {
    let mut out = Vec::new();
    let mut last = None;
    for url in urls {
        match Remote::connect_with(url, creds).await {
            Ok(r) => out.push(r),
            Err(e) => {
                tracing::warn!("agent: skipping registry {url}: {e}");
                last = Some(e);
            }
        }
    }
    match (out.is_empty(), last) {
        (true, Some(e)) => Err(e),
        (true, None) => Err(ClientError::NoRegistry),
        _ => Ok(out),
    }
}

fn status(e: ClientError) -> Status {
    let msg = e.to_string();
    match e.kind() {
        ErrorKind::Usage => Status::invalid_argument(msg),
        ErrorKind::NotFound => Status::not_found(msg),
        ErrorKind::Integrity => Status::data_loss(msg),
        _ => match e {
            ClientError::Unreachable { .. } => Status::unavailable(msg),
            ClientError::Auth { .. } | ClientError::Tls { .. } => Status::permission_denied(msg),
            _ => Status::internal(msg),
        },
    }
}

fn parse_reference(text: &str) -> std::result::Result<Reference, Status> {
    text.parse::<Reference>()
        .map_err(|e| Status::invalid_argument(format!("reference {text:?}: {e}")))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ClientError::io("node cache", std::io::Error::other(e)))?
        .map_err(|e| ClientError::io("node cache", e))
}

impl Agent {
    /// The registration this node sends: facts, URL and cache usage.
    async fn registration(&self) -> Result<pb::RegisterNodeRequest> {
        let cache = self.config.cache.clone();
        let usage = blocking(move || cache.usage()).await?;
        self.metrics.cache_usage(&usage);
        let f = crate::host::facts();
        Ok(pb::RegisterNodeRequest {
            node_name: self.config.node_name.clone(),
            agent_url: self.agent_url.clone(),
            facts: Some(pb::NodeFacts {
                arch: f.arch,
                cpu_features: f.cpu_features,
                kernel: f.kernel,
                criu_version: f.criu_version,
                container_image: f.container_image,
                gpu: f.gpu.map(|g| pb::GpuFacts {
                    models: g.devices.into_iter().map(|d| d.model).collect(),
                    driver_version: g.driver_version,
                    cuda_driver_api: g.cuda_driver_api,
                    mig_profile: g.mig_profile,
                }),
                labels: f
                    .labels
                    .into_iter()
                    .chain(self.config.labels.clone())
                    .collect(),
            }),
            cache_bytes: usage.bytes,
            cache_chunks: usage.chunks,
            cache_limit_bytes: usage.limit_bytes,
        })
    }

    /// One registration tick: trim the cache, then register with every registry.
    async fn register_once(&self) {
        let metrics = self.metrics.clone();
        let _ = tokio::task::spawn_blocking(move || metrics.refresh()).await;
        let cache = self.config.cache.clone();
        if let Err(e) = blocking(move || cache.enforce_limit()).await {
            tracing::warn!("agent: trimming the node cache: {e}");
        }
        let req = match self.registration().await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("agent: reading the node cache: {e}");
                return;
            }
        };
        for url in &self.config.registries {
            let res = match Remote::connect_with(url, &self.config.credentials).await {
                Ok(r) => r.register_node(req.clone()).await.map(|_| ()),
                Err(e) => Err(e),
            };
            if let Err(e) = res {
                tracing::warn!("agent: registering with {url}: {e}");
            }
        }
    }
}

#[tonic::async_trait]
impl NodeAgent for Agent {
    async fn prefetch(
        &self,
        req: Request<pb::PrefetchRequest>,
    ) -> std::result::Result<Response<pb::PrefetchResponse>, Status> {
        self.require_certificate(&req)?;
        let reference = parse_reference(&req.into_inner().reference)?;
        let remotes = connect_all(&self.config.registries, &self.config.credentials)
            .await
            .map_err(status)?;
        let peers = PeerConfig::new(
            Some(self.config.node_name.clone()),
            self.config.credentials.clone(),
        );
        // prefetch enforces the cache limit when done.
        let started = std::time::Instant::now();
        let progress = Progress::hidden();
        let result = crate::prefetch::prefetch(
            remotes,
            &reference,
            self.config.cache.clone(),
            self.config.window,
            Some(peers),
            progress.clone(),
        )
        .await;
        self.metrics.fold(&OperationReport {
            version: node_reports::VERSION,
            operation: "prefetch".into(),
            outcome: if result.is_ok() {
                Outcome::Ok
            } else {
                Outcome::Error
            },
            seconds: started.elapsed().as_secs_f64(),
            phases: BTreeMap::new(),
            counters: progress.counters.snapshot(),
        });
        let r = result.map_err(status)?;
        Ok(Response::new(pb::PrefetchResponse {
            reference: r.reference,
            digest: r.digest,
            chunks_total: r.counters.chunks_total,
            chunks_fetched: r.counters.chunks_transferred,
            chunks_cached: r.counters.chunks_cached,
            bytes_fetched: r.counters.bytes_transferred,
            bytes_total: r.counters.bytes_total,
            seconds: r.seconds,
        }))
    }

    async fn cache_status(
        &self,
        req: Request<pb::CacheStatusRequest>,
    ) -> std::result::Result<Response<pb::CacheStatusResponse>, Status> {
        self.require_certificate(&req)?;
        let req = req.into_inner();
        let cache = self.config.cache.clone();
        let usage = blocking(move || cache.usage()).await.map_err(status)?;
        let snapshot = match req.reference {
            None => None,
            Some(text) => {
                let reference = parse_reference(&text)?;
                Some(self.snapshot_status(&reference).await.map_err(status)?)
            }
        };
        let served = &self.peers.served;
        Ok(Response::new(pb::CacheStatusResponse {
            chunks: usage.chunks,
            bytes: usage.bytes,
            limit_bytes: usage.limit_bytes,
            snapshot,
            peer_chunks_served: served.chunks.load(Relaxed),
            peer_bytes_served: served.bytes.load(Relaxed),
            peer_calls_refused: served.refused.load(Relaxed),
        }))
    }

    type GetChunksStream = ChunkStream;

    async fn get_chunks(
        &self,
        req: Request<pb::GetChunksRequest>,
    ) -> std::result::Result<Response<ChunkStream>, Status> {
        self.admit_peer(&req).await?;
        Ok(Response::new(
            self.peers.get_chunks(&req.get_ref().digests)?,
        ))
    }

    type WatchChunksStream = HeldStream;

    async fn watch_chunks(
        &self,
        req: Request<pb::WatchChunksRequest>,
    ) -> std::result::Result<Response<HeldStream>, Status> {
        self.admit_peer(&req).await?;
        Ok(Response::new(self.peers.watch(&req.get_ref().digests)?))
    }
}

fn has_certificate<T>(req: &Request<T>) -> bool {
    req.peer_certs().is_some_and(|c| !c.is_empty())
}

impl Agent {
    /// With a client CA, the scheduler calls need a certificate it signed (the TLS
    /// layer admits callers without one, for peers that present a token instead).
    fn require_certificate<T>(&self, req: &Request<T>) -> std::result::Result<(), Status> {
        if self.config.client_ca && !has_certificate(req) {
            return Err(Status::unauthenticated(
                "this agent admits schedulers only with a client certificate its client CA \
                 signed (--tls-client-ca): present one (--client-cert/--client-key)",
            ));
        }
        Ok(())
    }

    async fn admit_peer<T>(&self, req: &Request<T>) -> std::result::Result<(), Status> {
        self.peers.admit(req.metadata(), has_certificate(req)).await
    }
}

impl Agent {
    /// How much of a snapshot's distinct chunks the node cache holds.
    async fn snapshot_status(&self, reference: &Reference) -> Result<pb::SnapshotCacheStatus> {
        let remotes = connect_all(&self.config.registries, &self.config.credentials).await?;
        let mut found = None;
        let mut last = None;
        for r in &remotes {
            match crate::pull::fetch_manifest(r, reference).await {
                Ok(m) => {
                    found = Some(m);
                    break;
                }
                Err(e @ (ClientError::NotFound(_) | ClientError::Unreachable { .. })) => {
                    last = Some(e)
                }
                Err(e) => return Err(e),
            }
        }
        let Some((digest, manifest)) = found else {
            return Err(last.unwrap_or(ClientError::NoRegistry));
        };
        let mut seen = std::collections::HashSet::new();
        let mut out = pb::SnapshotCacheStatus {
            reference: reference.to_string(),
            digest: digest.to_string(),
            ..Default::default()
        };
        for e in manifest
            .layers
            .iter()
            .flat_map(|l| &l.files)
            .flat_map(|f| &f.extents)
        {
            if let snapreg_proto::manifest::Extent::Chunk { chunk, len } = e {
                if seen.insert(*chunk) {
                    out.chunks_total += 1;
                    out.bytes_total += len;
                    if self.config.cache.contains(chunk) {
                        out.chunks_cached += 1;
                        out.bytes_cached += len;
                    }
                }
            }
        }
        Ok(out)
    }
}

/// The URL a scheduler reaches this agent at, from the bound address.
fn default_url(addr: std::net::SocketAddr, tls: bool) -> String {
    let scheme = if tls { "https" } else { "http" };
    if addr.ip().is_unspecified() {
        let host = crate::host::hostname();
        if !host.is_empty() {
            return format!("{scheme}://{host}:{}", addr.port());
        }
    }
    format!("{scheme}://{addr}")
}

/// Serves the agent on `listener` and registers the node periodically, until
/// `shutdown` completes.
pub async fn run(
    listener: TcpListener,
    config: AgentConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    let telemetry = AgentTelemetry::new(&mut MetricsRegistry::default()).await;
    run_with(listener, config, telemetry, shutdown).await
}

/// [`run`], reporting through `telemetry`: the gRPC health service turns SERVING
/// once the listener serves, NOT_SERVING at shutdown.
pub async fn run_with(
    listener: TcpListener,
    config: AgentConfig,
    telemetry: AgentTelemetry,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    let addr = listener
        .local_addr()
        .map_err(|e| ClientError::io("agent listener", e))?;
    let agent_url = config
        .advertise_url
        .clone()
        .unwrap_or_else(|| default_url(addr, config.tls.is_some()));
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = config.tls.clone() {
        // Certificates are checked per call (require_certificate, admit_peer): peers
        // may come with a token instead.
        let tls = tls.client_auth_optional(config.client_ca);
        builder = builder
            .tls_config(tls)
            .map_err(|e| ClientError::Usage(format!("agent TLS (--tls-cert/--tls-key): {e}")))?;
    }
    let peers = Arc::new(PeerService::new(
        config.cache.clone(),
        config.registries.clone(),
        config.credentials.clone(),
    ));
    telemetry
        .metrics
        .attach(config.cache.dir().to_path_buf(), peers.served.clone());
    let agent = Agent {
        config,
        agent_url,
        peers,
        metrics: telemetry.metrics.clone(),
    };
    let ticker = {
        let agent = agent.clone();
        tokio::spawn(async move {
            let mut every =
                tokio::time::interval(agent.config.register_every.max(Duration::from_millis(100)));
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                agent.register_once().await;
            }
        })
    };
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let health = telemetry.health.clone();
    health.set_ready(true).await;
    let shutdown = async move {
        shutdown.await;
        health.set_ready(false).await;
    };
    let served = builder
        .layer(telemetry.rpc.clone())
        .add_service(telemetry.health.grpc_service())
        .add_service(NodeAgentServer::new(agent))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    ticker.abort();
    served.map_err(|e| ClientError::io("serving the node agent", std::io::Error::other(e)))
}
