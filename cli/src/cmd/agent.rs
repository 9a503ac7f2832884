use std::path::PathBuf;
use std::time::Duration;

use serde_json::json;
use snapreg_client::{agent, host, restore, ClientError};

use prometheus_client::registry::Registry as MetricsRegistry;

use super::{announce, shutdown_signal};
use crate::global::Global;

#[derive(clap::Args)]
pub struct Args {
    /// Address to listen on; port 0 picks a free one.
    #[arg(long)]
    listen: String,
    /// This node's name in the registry (default: the hostname).
    #[arg(long)]
    name: Option<String>,
    /// URL registered for this agent (default: http://<bound address>).
    #[arg(long)]
    advertise: Option<String>,
    /// How often to re-register the node (and trim the cache).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    register_every: Duration,
    /// Chunk fetches in flight per prefetch.
    #[arg(long, default_value_t = restore::DEFAULT_WINDOW)]
    window: usize,
    /// Serve TLS with this certificate chain (PEM).
    #[arg(long, requires = "tls_key", value_name = "PEM")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, requires = "tls_cert", value_name = "PEM")]
    tls_key: Option<PathBuf>,
    /// Mutual TLS: schedulers (Prefetch, CacheStatus) need a certificate signed by
    /// this CA (PEM); peers need one, or a token the registry accepts for pull.
    #[arg(long, requires = "tls_cert", value_name = "PEM")]
    tls_client_ca: Option<PathBuf>,
    /// The node's zone (label topology.kubernetes.io/zone): peers in the same zone
    /// are preferred.
    #[arg(long, env = "SNAPCTL_ZONE")]
    zone: Option<String>,
    /// The node's region (label topology.kubernetes.io/region).
    #[arg(long, env = "SNAPCTL_REGION")]
    region: Option<String>,
    /// Serve Prometheus metrics (/metrics), /livez and /readyz over HTTP here.
    #[arg(long, env = "SNAPCTL_METRICS_LISTEN", value_name = "ADDR")]
    metrics_listen: Option<String>,
}

/// Serves until SIGTERM/SIGINT. Prints nothing on stdout after the {"listen"} line:
/// whoever read it may have closed stdout by then.
pub async fn run(g: &Global, a: &Args) -> anyhow::Result<()> {
    let labels = [
        ("topology.kubernetes.io/zone", &a.zone),
        ("topology.kubernetes.io/region", &a.region),
    ]
    .into_iter()
    .filter_map(|(k, v)| Some((k.to_string(), v.clone()?)))
    .collect();
    let config = agent::AgentConfig {
        node_name: a
            .name
            .clone()
            .or_else(|| g.node.clone())
            .unwrap_or_else(host::hostname),
        advertise_url: a.advertise.clone(),
        registries: g.registry_urls()?.into_iter().map(str::to_string).collect(),
        cache: g.open_cache()?,
        register_every: a.register_every,
        window: a.window,
        credentials: g.credentials()?,
        tls: match (&a.tls_cert, &a.tls_key) {
            (Some(cert), Some(key)) => Some(
                snapreg_proto::credentials::server_tls(cert, key, a.tls_client_ca.as_deref())
                    .map_err(|e| ClientError::Usage(e.to_string()))?,
            ),
            _ => None,
        },
        client_ca: a.tls_client_ca.is_some(),
        labels,
    };
    let listener = tokio::net::TcpListener::bind(&a.listen)
        .await
        .map_err(|e| ClientError::io(format!("binding {}", a.listen), e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| ClientError::io("agent listener", e))?;
    let mut metrics = MetricsRegistry::default();
    let telemetry = agent::AgentTelemetry::new(&mut metrics).await;
    let metrics_addr = match &a.metrics_listen {
        Some(at) => Some(serve_metrics(at, metrics, &telemetry).await?),
        None => None,
    };
    announce(&json!({ "listen": addr.to_string(), "metrics": metrics_addr }))?;
    agent::run_with(listener, config, telemetry, shutdown_signal()).await?;
    eprintln!("snapctl: agent stopped");
    Ok(())
}

/// Starts the `--metrics-listen` endpoint (it lives as long as the process);
/// returns its address. Each scrape first takes the node's operation reports.
async fn serve_metrics(
    at: &str,
    metrics: MetricsRegistry,
    telemetry: &agent::AgentTelemetry,
) -> anyhow::Result<String> {
    let listener = tokio::net::TcpListener::bind(at)
        .await
        .map_err(|e| ClientError::io(format!("binding --metrics-listen {at}"), e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| ClientError::io("metrics listener", e))?;
    let node = telemetry.metrics.clone();
    let refresh: snapreg_telemetry::endpoint::Refresh = std::sync::Arc::new(move || node.refresh());
    tokio::spawn(snapreg_telemetry::endpoint::serve(
        listener,
        std::sync::Arc::new(metrics),
        telemetry.health.clone(),
        Some(refresh),
        std::future::pending(),
    ));
    Ok(addr.to_string())
}
