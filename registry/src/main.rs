//! `snapreg`: parse arguments, open the registry, serve. Nothing else lives here.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use snapreg_proto::pb::{self, registry_client::RegistryClient};
use snapreg_registry::auth::{parse_anonymous, RepoPattern, Scope};
use snapreg_registry::tenant_keys::TenantKeyRule;
use snapreg_registry::{PeerConfig, RegistryConfig, TlsFiles};

#[derive(Parser)]
#[command(name = "snapreg", version, about = "Registry for process snapshots")]
struct Cli {
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
    #[arg(long, requires = "tls_key", value_name = "PEM")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, requires = "tls_cert", value_name = "PEM")]
    tls_key: Option<PathBuf>,
    /// Mutual TLS: refuse clients without a certificate signed by this CA (PEM).
    #[arg(long, requires = "tls_cert", value_name = "PEM")]
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

#[derive(Subcommand)]
enum Command {
    /// Serve the gRPC API.
    Serve {
        /// Address to listen on; port 0 picks a free one (printed on stdout as JSON).
        #[arg(long, default_value = "127.0.0.1:5000")]
        listen: String,
        #[command(flatten)]
        store: StoreArgs,
        /// Unreferenced chunks younger than this survive GC.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        gc_grace: Duration,
        /// How long a push lease lives without activity, and after its commit.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        lease_ttl: Duration,
        /// Replicate this registry's commits to a peer: NAME=URL[,repos=PREFIX1|PREFIX2]
        /// [,token-file=PATH][,ca-cert=PATH][,client-cert=PATH,client-key=PATH]
        /// (repeatable; every registry of a region set lists all the others).
        #[arg(long = "peer", value_name = "NAME=URL[,OPTIONS]")]
        peers: Vec<PeerConfig>,
        /// Longest wait between two attempts at an unreachable or failing peer.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        replication_backoff_max: Duration,
        /// What callers without a token may do: none, pull, push or admin (on every
        /// repository). Default none: every call needs a token (`snapreg token issue`).
        #[arg(long, default_value = "none", value_parser = ["none", "pull", "push", "admin"])]
        anonymous: String,
        /// How long a checked token is trusted before the store is read again; a
        /// revocation reaches this registry within this time.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        auth_cache_ttl: Duration,
        #[command(flatten)]
        tls: TlsArgs,
        /// PATTERN=KEYID: repositories matching PATTERN (`acme/*`, exact) take only
        /// snapshots encrypted with that tenant key (`snapctl key show FILE` prints
        /// its id). Repeatable; the first matching rule decides.
        #[arg(long = "tenant-key", value_name = "PATTERN=KEYID")]
        tenant_keys: Vec<TenantKeyRule>,
    },
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
    Scrub {
        /// Data directory of a stopped registry.
        #[arg(long, env = "SNAPREG_DATA", required_unless_present = "registry")]
        data: Option<PathBuf>,
        /// Object store URL of that registry (as for serve).
        #[arg(long, env = "SNAPREG_STORE")]
        store: Option<String>,
        /// Ask the registry serving at this URL to scrub itself instead.
        #[arg(long, conflicts_with = "data")]
        registry: Option<String>,
        /// Admin token for --registry (`snapreg token issue --scope admin --repo '*'`).
        #[arg(long, env = "SNAPREG_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Report only; quarantine nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = real_main().await {
        eprintln!("snapreg: error: {e:#}");
        std::process::exit(1);
    }
}

async fn real_main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Serve {
            listen,
            store,
            gc_grace,
            lease_ttl,
            peers,
            replication_backoff_max,
            anonymous,
            auth_cache_ttl,
            tls,
            tenant_keys,
        } => {
            let mut config = RegistryConfig::new(&store.data);
            config.store_url = store.store;
            config.gc_grace = gc_grace;
            config.lease_ttl = lease_ttl;
            config.peers = peers;
            config.replication_backoff_max = replication_backoff_max;
            config.anonymous = parse_anonymous(&anonymous).map_err(anyhow::Error::msg)?;
            config.auth_cache_ttl = auth_cache_ttl;
            config.tenant_keys = tenant_keys;
            config.tls = match (tls.tls_cert, tls.tls_key) {
                (Some(cert), Some(key)) => Some(TlsFiles {
                    cert,
                    key,
                    client_ca: tls.tls_client_ca,
                }),
                _ => None,
            };
            let registry = snapreg_registry::open(config)
                .await
                .with_context(|| format!("opening the registry in {}", store.data.display()))?;
            let listener = tokio::net::TcpListener::bind(&listen)
                .await
                .with_context(|| format!("binding {listen} (is another snapreg running there?)"))?;
            let addr = listener.local_addr()?;
            println!("{}", serde_json::json!({ "listen": addr.to_string() }));
            tracing::info!(%addr, "snapreg serving");
            snapreg_registry::run(listener, registry, shutdown_signal()).await?;
            Ok(())
        }
        Command::Token { command } => {
            let store = command.store();
            let mut config = RegistryConfig::new(&store.data);
            config.store_url = store.store.clone();
            let tokens = snapreg_registry::open_tokens(&config)
                .await
                .context("opening the registry's object store")?;
            match command {
                TokenCommand::Issue {
                    repository,
                    scope,
                    ttl,
                    name,
                    store: _,
                } => {
                    let (record, token) = tokens.issue(repository, scope, ttl, name).await?;
                    eprintln!(
                        "issued token {} ({}): {} on {}; it is shown only now",
                        record.id, record.name, record.scope, record.repository
                    );
                    let mut out = serde_json::to_value(&record)?;
                    out["token"] = token.into();
                    println!("{out}");
                }
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
        Command::Reindex { store } => {
            let mut config = RegistryConfig::new(&store.data);
            config.store_url = store.store;
            let registry = snapreg_registry::open(config)
                .await
                .context("opening the registry")?;
            let stats = registry
                .index()
                .rebuild(registry.store())
                .await
                .context("rebuilding the index")?;
            println!("{}", serde_json::to_string(&stats)?);
            Ok(())
        }
        Command::DumpIndex { data } => {
            let index = snapreg_registry::index::Index::open(&data.join("index"))
                .with_context(|| format!("opening the index in {}", data.display()))?;
            for line in index.dump_derived()? {
                println!("{line}");
            }
            Ok(())
        }
        Command::Scrub {
            data,
            store,
            registry,
            token,
            dry_run,
        } => {
            let report = match (registry, data) {
                (Some(url), _) => {
                    let channel = tonic::transport::Endpoint::from_shared(url.clone())
                        .with_context(|| format!("{url} is not a registry URL"))?
                        .connect()
                        .await
                        .with_context(|| format!("connecting to {url}"))?;
                    let mut client = RegistryClient::with_interceptor(
                        channel,
                        snapreg_proto::credentials::BearerToken::new(token.as_deref())?,
                    );
                    client
                        .scrub(pb::ScrubRequest { dry_run })
                        .await
                        .map_err(|s| anyhow::anyhow!("{}", s.message()))
                        .with_context(|| format!("scrubbing the registry at {url}"))?
                        .into_inner()
                }
                (None, Some(data)) => {
                    let mut config = RegistryConfig::new(&data);
                    config.store_url = store;
                    let registry = snapreg_registry::open(config).await.with_context(|| {
                        format!(
                            "opening the registry in {} (still serving? stop it, or pass --registry URL)",
                            data.display()
                        )
                    })?;
                    snapreg_registry::scrub::scrub(&registry, dry_run)
                        .await
                        .context("scrubbing the store")?
                        .into()
                }
                (None, None) => unreachable!("clap requires --data or --registry"),
            };
            println!("{}", scrub_json(&report));
            if !report.damaged.is_empty() {
                eprintln!(
                    "snapreg: {} damaged object(s){}; push the affected snapshots again from their source",
                    report.damaged.len(),
                    if dry_run { "" } else { " moved to quarantine/" }
                );
                std::process::exit(5);
            }
            Ok(())
        }
    }
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
