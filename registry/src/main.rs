//! `snapreg`: parse arguments, open the registry, serve. Nothing else lives here.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use prometheus_client::registry::Registry as MetricsRegistry;
use snapreg_proto::pb::{self, registry_client::RegistryClient};
use snapreg_registry::auth::{parse_anonymous, RepoPattern, Scope, TokenStore};
use snapreg_registry::tenant_keys::TenantKeyRule;
use snapreg_registry::{PeerConfig, RegistryConfig, Server, ServerConfig, Telemetry, TlsFiles};
use snapreg_telemetry::log::LogFormat;

#[derive(Parser)]
#[command(name = "snapreg", version, about = "Registry for process snapshots")]
struct Cli {
    /// Log lines on stderr as text, or as one JSON object per line.
    #[arg(
        long,
        global = true,
        env = "SNAPREG_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct StoreArgs {
    /// Directory for the RocksDB index (and the object store unless --store is given).
    #[arg(long, env = "SNAPREG_DATA")]
    data: PathBuf,
    /// Object store URL: file:///path or s3://bucket/prefix (AWS_* variables for S3).
    #[arg(long, env = "SNAPREG_STORE")]
    store: Option<String>,
}

#[derive(clap::Args)]
struct TlsArgs {
    /// Serve TLS with this certificate chain (PEM); clients then use https:// URLs.
    #[arg(
        long,
        env = "SNAPREG_TLS_CERT",
        requires = "tls_key",
        value_name = "PEM"
    )]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(
        long,
        env = "SNAPREG_TLS_KEY",
        requires = "tls_cert",
        value_name = "PEM"
    )]
    tls_key: Option<PathBuf>,
    /// Mutual TLS: refuse clients without a certificate signed by this CA (PEM).
    #[arg(
        long,
        env = "SNAPREG_TLS_CLIENT_CA",
        requires = "tls_cert",
        value_name = "PEM"
    )]
    tls_client_ca: Option<PathBuf>,
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a token and print it, once (only its BLAKE3 is stored).
    Issue {
        /// Repositories it covers: `*`, `team/*` or an exact repository.
        #[arg(long = "repo", value_name = "PATTERN")]
        repository: RepoPattern,
        /// pull (read), push (read and write), admin (push plus gc, on `*`).
        #[arg(long)]
        scope: Scope,
        /// Lifetime, e.g. 30d or 12h (default: until revoked).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        /// A name shown in listings and refusals (default: <scope>-<id>).
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Revoke a token by its id (the 16 hex digits after `snapreg_`).
    Revoke {
        id: String,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// List tokens (never their secrets).
    Ls {
        #[command(flatten)]
        store: StoreArgs,
    },
}

impl TokenCommand {
    fn store(&self) -> &StoreArgs {
        match self {
            TokenCommand::Issue { store, .. }
            | TokenCommand::Revoke { store, .. }
            | TokenCommand::Ls { store } => store,
        }
    }
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Address to listen on; port 0 picks a free one (printed on stdout as JSON).
    #[arg(long, env = "SNAPREG_LISTEN", default_value = "127.0.0.1:5000")]
    listen: String,
    /// Serve Prometheus metrics (/metrics), /livez and /readyz over HTTP here.
    #[arg(long, env = "SNAPREG_METRICS_LISTEN", value_name = "ADDR")]
    metrics_listen: Option<String>,
    /// Also serve the OCI distribution API (/v2/, for skopeo, podman, CRI-O) here,
    /// with the same tokens and TLS as --listen. Off by default.
    #[arg(long, env = "SNAPREG_OCI_LISTEN", value_name = "ADDR")]
    oci_listen: Option<String>,
    /// On SIGTERM, how long pushes already begun may take to commit (new ones are
    /// refused at once); then the registry exits 0.
    #[arg(long, env = "SNAPREG_DRAIN_GRACE", default_value = "30s", value_parser = humantime::parse_duration)]
    drain_grace: Duration,
    #[command(flatten)]
    store: StoreArgs,
    /// Unreferenced chunks younger than this survive GC.
    #[arg(long, env = "SNAPREG_GC_GRACE", default_value = "1h", value_parser = humantime::parse_duration)]
    gc_grace: Duration,
    /// How long a push lease lives without activity, and after its commit.
    #[arg(long, env = "SNAPREG_LEASE_TTL", default_value = "1h", value_parser = humantime::parse_duration)]
    lease_ttl: Duration,
    /// Replicate this registry's commits to a peer: NAME=URL[,repos=PREFIX1|PREFIX2]
    /// [,token-file=PATH][,ca-cert=PATH][,client-cert=PATH,client-key=PATH]
    /// (repeatable; every registry of a region set lists all the others). In the
    /// environment, SNAPREG_PEERS holds several, separated by spaces.
    #[arg(
        long = "peer",
        env = "SNAPREG_PEERS",
        value_delimiter = ' ',
        value_name = "NAME=URL[,OPTIONS]"
    )]
    peers: Vec<PeerConfig>,
    /// Longest wait between two attempts at an unreachable or failing peer.
    #[arg(long, env = "SNAPREG_REPLICATION_BACKOFF_MAX", default_value = "5s", value_parser = humantime::parse_duration)]
    replication_backoff_max: Duration,
    /// What callers without a token may do: none, pull, push or admin (on every
    /// repository). Default none: every call needs a token (`snapreg token issue`).
    #[arg(long, env = "SNAPREG_ANONYMOUS", default_value = "none", value_parser = ["none", "pull", "push", "admin"])]
    anonymous: String,
    /// How long a checked token is trusted before the store is read again; a
    /// revocation reaches this registry within this time.
    #[arg(long, env = "SNAPREG_AUTH_CACHE_TTL", default_value = "5s", value_parser = humantime::parse_duration)]
    auth_cache_ttl: Duration,
    /// Resolve stops offering a snapshot after this many failed restores in a row
    /// on nodes with the same GPUs as the asking node (0: never).
    #[arg(long, env = "SNAPREG_RESTORE_FAILURE_THRESHOLD", default_value_t = 2)]
    restore_failure_threshold: u32,
    #[command(flatten)]
    tls: TlsArgs,
    /// PATTERN=KEYID: repositories matching PATTERN (`acme/*`, exact) take only
    /// snapshots encrypted with that tenant key (`snapctl key show FILE` prints
    /// its id). Repeatable; the first matching rule decides. In the environment,
    /// SNAPREG_TENANT_KEYS holds several, separated by spaces.
    #[arg(
        long = "tenant-key",
        env = "SNAPREG_TENANT_KEYS",
        value_delimiter = ' ',
        value_name = "PATTERN=KEYID"
    )]
    tenant_keys: Vec<TenantKeyRule>,
}

#[derive(clap::Args)]
struct ScrubArgs {
    /// Data directory of a stopped registry.
    #[arg(long, env = "SNAPREG_DATA", required_unless_present = "registry")]
    data: Option<PathBuf>,
    /// Object store URL of that registry (as for serve).
    #[arg(long, env = "SNAPREG_STORE")]
    store: Option<String>,
    /// Ask the registry serving at this URL to scrub itself instead.
    #[arg(long, env = "SNAPREG_REGISTRY", conflicts_with = "data")]
    registry: Option<String>,
    /// Admin token for --registry (`snapreg token issue --scope admin --repo '*'`).
    #[arg(long, env = "SNAPREG_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Report only; quarantine nothing.
    #[arg(long, env = "SNAPREG_DRY_RUN", value_parser = clap::builder::FalseyValueParser::new())]
    dry_run: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the gRPC API.
    Serve(Box<ServeArgs>),
    /// Issue, revoke and list access tokens (in the object store, shared by every
    /// registry serving it; works while the registry runs).
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Rebuild the RocksDB index from the object store (the registry must be stopped).
    Reindex {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Print the index entries derived from the store, one per line, in key order
    /// (the registry must be stopped): an index and its rebuild compare equal.
    DumpIndex {
        /// Directory holding the RocksDB index.
        #[arg(long, env = "SNAPREG_DATA")]
        data: PathBuf,
    },
    /// Re-read and verify every chunk and manifest; move damaged ones to quarantine/
    /// so the next push re-uploads them. Offline with --data (the registry stopped),
    /// or online with --registry URL. Prints a JSON report; exits 5 when anything was
    /// damaged.
    Scrub(ScrubArgs),
}

/// Exit code of a scrub that found damage (DESIGN.md: 5, integrity failure).
const EXIT_DAMAGED: u8 = 5;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    snapreg_telemetry::log::init(cli.log_format, "RUST_LOG", "info");
    match run(cli.command).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("snapreg: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Serve(args) => serve(*args).await?,
        Command::Token { command } => token(command).await?,
        Command::Reindex { store } => reindex(store).await?,
        Command::DumpIndex { data } => dump_index(&data)?,
        Command::Scrub(args) => return scrub(args).await,
    }
    Ok(ExitCode::SUCCESS)
}

impl StoreArgs {
    fn registry_config(&self) -> RegistryConfig {
        let mut config = RegistryConfig::new(&self.data);
        config.store_url = self.store.clone();
        config
    }
}

impl ServeArgs {
    fn server_config(self) -> anyhow::Result<ServerConfig> {
        let mut config = ServerConfig::new(&self.store.data);
        config.registry.store_url = self.store.store;
        config.registry.gc_grace = self.gc_grace;
        config.registry.lease_ttl = self.lease_ttl;
        config.registry.tenant_keys = self.tenant_keys;
        config.registry.restore_failure_threshold = self.restore_failure_threshold;
        config.peers = self.peers;
        config.replication_backoff_max = self.replication_backoff_max;
        config.anonymous = parse_anonymous(&self.anonymous).map_err(anyhow::Error::msg)?;
        config.auth_cache_ttl = self.auth_cache_ttl;
        config.drain_grace = self.drain_grace;
        config.tls = match (self.tls.tls_cert, self.tls.tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert,
                key,
                client_ca: self.tls.tls_client_ca,
            }),
            _ => None,
        };
        Ok(config)
    }
}

/// Serves until SIGTERM/SIGINT, then drains and returns. The metrics endpoint
/// comes up first, so `/readyz` answers "not ready" while the index opens.
async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let listen = args.listen.clone();
    let data = args.store.data.clone();
    let mut metrics = MetricsRegistry::default();
    let telemetry = Telemetry::new(&mut metrics).await;
    let oci_metrics = snapreg_oci::Metrics::new(&mut metrics);
    let (endpoint, metrics_addr) = match &args.metrics_listen {
        Some(addr) => {
            let (task, bound) = serve_metrics(addr, metrics, &telemetry).await?;
            (Some(task), Some(bound.to_string()))
        }
        None => (None, None),
    };
    let tls = match (&args.tls.tls_cert, &args.tls.tls_key) {
        (Some(cert), Some(key)) => Some(snapreg_oci::TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: args.tls.tls_client_ca.clone(),
        }),
        _ => None,
    };
    let oci_listen = args.oci_listen.clone();
    let mut server = Server::open_with(args.server_config()?, telemetry)
        .await
        .with_context(|| format!("opening the registry in {}", data.display()))?;
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .with_context(|| format!("binding {listen} (is another snapreg running there?)"))?;
    let addr = listener.local_addr()?;
    let oci = match &oci_listen {
        Some(at) => Some(start_oci(at, &mut server, &data, tls, oci_metrics).await?),
        None => None,
    };
    println!(
        "{}",
        serde_json::json!({
            "listen": addr.to_string(),
            "metrics": metrics_addr,
            "oci": oci.as_ref().map(|(a, _, _)| a.to_string()),
        })
    );
    tracing::info!(%addr, "snapreg serving");
    server.run(listener, shutdown_signal()).await?;
    if let Some((_, task, stop)) = oci {
        let _ = stop.send(());
        let _ = task.await;
    }
    if let Some((task, stop)) = endpoint {
        let _ = stop.send(());
        let _ = task.await;
    }
    tracing::info!("snapreg stopped");
    Ok(())
}

/// Starts the OCI distribution API on `at`, over the server's in-process link; it
/// stops when the returned sender fires.
async fn start_oci(
    at: &str,
    server: &mut Server,
    data: &std::path::Path,
    tls: Option<snapreg_oci::TlsFiles>,
    metrics: snapreg_oci::Metrics,
) -> anyhow::Result<(
    std::net::SocketAddr,
    tokio::task::JoinHandle<std::io::Result<()>>,
    tokio::sync::oneshot::Sender<()>,
)> {
    let listener = tokio::net::TcpListener::bind(at)
        .await
        .with_context(|| format!("binding --oci-listen {at} (is something else there?)"))?;
    let bound = listener.local_addr()?;
    let config = snapreg_oci::GatewayConfig {
        spool_dir: data.join("oci-uploads"),
        tls,
    };
    let link = server.local_link();
    let gateway =
        snapreg_oci::Gateway::new(link.channel(), link.in_process_token(), &config, metrics)
            .with_context(|| format!("preparing {} for OCI uploads", config.spool_dir.display()))?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(snapreg_oci::serve(listener, gateway, async move {
        let _ = stopped.await;
    }));
    tracing::info!(addr = %bound, "OCI distribution API serving");
    Ok((bound, task, stop))
}

type Endpoint = (
    tokio::task::JoinHandle<std::io::Result<()>>,
    tokio::sync::oneshot::Sender<()>,
);

/// Starts the `--metrics-listen` endpoint; it stops when the returned sender fires.
async fn serve_metrics(
    addr: &str,
    metrics: MetricsRegistry,
    telemetry: &Telemetry,
) -> anyhow::Result<(Endpoint, std::net::SocketAddr)> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding --metrics-listen {addr} (is something else there?)"))?;
    let bound = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(snapreg_telemetry::endpoint::serve(
        listener,
        std::sync::Arc::new(metrics),
        telemetry.health.clone(),
        None,
        async move {
            let _ = stopped.await;
        },
    ));
    Ok(((task, stop), bound))
}

async fn token(command: TokenCommand) -> anyhow::Result<()> {
    let tokens = snapreg_registry::open_tokens(&command.store().registry_config())
        .await
        .context("opening the registry's object store")?;
    match command {
        TokenCommand::Issue {
            repository,
            scope,
            ttl,
            name,
            store: _,
        } => issue_token(&tokens, repository, scope, ttl, name).await?,
        TokenCommand::Revoke { id, store: _ } => {
            let record = tokens.revoke(&id).await?;
            println!(
                "{}",
                serde_json::json!({ "revoked": record.id, "name": record.name })
            );
        }
        TokenCommand::Ls { store: _ } => {
            for t in tokens.list().await? {
                println!("{}", serde_json::to_string(&t)?);
            }
        }
    }
    Ok(())
}

async fn issue_token(
    tokens: &TokenStore,
    repository: RepoPattern,
    scope: Scope,
    ttl: Option<Duration>,
    name: Option<String>,
) -> anyhow::Result<()> {
    let (record, token) = tokens.issue(repository, scope, ttl, name).await?;
    eprintln!(
        "issued token {} ({}): {} on {}; it is shown only now",
        record.id, record.name, record.scope, record.repository
    );
    let mut out = serde_json::to_value(&record)?;
    out["token"] = token.into();
    println!("{out}");
    Ok(())
}

async fn reindex(store: StoreArgs) -> anyhow::Result<()> {
    let registry = snapreg_registry::Registry::open(store.registry_config())
        .await
        .context("opening the registry")?;
    let stats = registry
        .rebuild_index()
        .await
        .context("rebuilding the index")?;
    println!("{}", serde_json::to_string(&stats)?);
    Ok(())
}

fn dump_index(data: &std::path::Path) -> anyhow::Result<()> {
    let index = snapreg_registry::index::Index::open(&data.join("index"))
        .with_context(|| format!("opening the index in {}", data.display()))?;
    for line in index.dump_derived()? {
        println!("{line}");
    }
    Ok(())
}

/// Prints the report; exits [`EXIT_DAMAGED`] when anything was damaged.
async fn scrub(args: ScrubArgs) -> anyhow::Result<ExitCode> {
    let dry_run = args.dry_run;
    let report = match (args.registry, args.data) {
        (Some(url), _) => scrub_online(&url, args.token.as_deref(), dry_run).await?,
        (None, Some(data)) => scrub_offline(data, args.store, dry_run).await?,
        (None, None) => unreachable!("clap requires --data or --registry"),
    };
    println!("{}", scrub_json(&report));
    if !report.damaged.is_empty() {
        eprintln!(
            "snapreg: {} damaged object(s){}; push the affected snapshots again from their source",
            report.damaged.len(),
            if dry_run { "" } else { " moved to quarantine/" }
        );
        return Ok(ExitCode::from(EXIT_DAMAGED));
    }
    Ok(ExitCode::SUCCESS)
}

/// Asks the registry serving at `url` to scrub itself.
async fn scrub_online(
    url: &str,
    token: Option<&str>,
    dry_run: bool,
) -> anyhow::Result<pb::ScrubResponse> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_string())
        .with_context(|| format!("{url} is not a registry URL"))?
        .connect()
        .await
        .with_context(|| format!("connecting to {url}"))?;
    let mut client = RegistryClient::with_interceptor(
        channel,
        snapreg_proto::credentials::BearerToken::new(token)?,
    );
    Ok(client
        .scrub(pb::ScrubRequest { dry_run })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))
        .with_context(|| format!("scrubbing the registry at {url}"))?
        .into_inner())
}

/// Scrubs the data directory of a stopped registry.
async fn scrub_offline(
    data: PathBuf,
    store: Option<String>,
    dry_run: bool,
) -> anyhow::Result<pb::ScrubResponse> {
    let mut config = RegistryConfig::new(&data);
    config.store_url = store;
    let registry = snapreg_registry::Registry::open(config)
        .await
        .with_context(|| {
            format!(
                "opening the registry in {} (still serving? stop it, or pass --registry URL)",
                data.display()
            )
        })?;
    Ok(snapreg_registry::scrub::scrub(&registry, dry_run)
        .await
        .context("scrubbing the store")?
        .into())
}

fn scrub_json(r: &pb::ScrubResponse) -> serde_json::Value {
    let damaged: Vec<_> = r
        .damaged
        .iter()
        .map(|d| {
            serde_json::json!({ "kind": d.kind, "digest": d.digest, "path": d.path, "reason": d.reason,
                "quarantined_to": (!d.quarantined_to.is_empty()).then_some(&d.quarantined_to) })
        })
        .collect();
    serde_json::json!({
        "chunks_checked": r.chunks_checked, "manifests_checked": r.manifests_checked,
        "bytes_read": r.bytes_read, "damaged": damaged, "quarantined": r.quarantined,
        "seconds": r.seconds,
    })
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
}
