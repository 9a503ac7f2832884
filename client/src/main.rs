//! `snapctl`: parse arguments, call the library, print one result, map errors to the
//! documented exit codes (0 ok, 1 failure, 2 usage, 3 not found, 4 incompatible
//! host, 5 integrity failure, 6 access refused). With `--json`, stdout's last line is one JSON object.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use serde_json::json;
use snapreg_client::cache::{self, ChunkCache};
use snapreg_client::copy::{self, CopyEncryption};
use snapreg_client::progress::Progress;
use snapreg_client::remote::{Credentials, Remote};
use snapreg_client::{
    agent, checkpoint, criu, host, inspect, podman, pull, push, restore, verify, ClientError,
};
use snapreg_proto::encryption::TenantKey;
use snapreg_proto::reference::{Reference, Target};

#[derive(Parser)]
#[command(
    name = "snapctl",
    version,
    about = "Push, pull and restore process snapshots with a snapreg registry"
)]
struct Cli {
    /// Registry URL, e.g. http://registry:5000. pull-restore takes several,
    /// comma-separated, nearest first: each chunk comes from the first that has it.
    #[arg(long, global = true, env = "SNAPCTL_REGISTRY")]
    registry: Option<String>,
    /// Print one JSON object on stdout's last line.
    #[arg(long, global = true)]
    json: bool,
    /// CRIU executable (default: SNAPCTL_CRIU, then /opt/snapreg-criu/bin/criu, then PATH).
    #[arg(long, global = true, env = "SNAPCTL_CRIU")]
    criu: Option<PathBuf>,
    /// Node chunk cache directory (default /var/cache/snapctl as root, else $XDG_CACHE_HOME/snapctl).
    #[arg(long, global = true, env = "SNAPCTL_CACHE")]
    cache: Option<PathBuf>,
    /// Node chunk cache size limit, e.g. 20G, 512M.
    #[arg(long, global = true, env = "SNAPCTL_CACHE_SIZE", default_value = "20G", value_parser = parse_size)]
    cache_size: u64,
    /// Fetch chunks through the registry even when it offers presigned object-store URLs.
    #[arg(long, global = true, env = "SNAPCTL_NO_DIRECT",
          value_parser = clap::builder::FalseyValueParser::new())]
    no_direct: bool,
    /// Access token for the registries (`snapreg token issue` prints one).
    #[arg(long, global = true, env = "SNAPCTL_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Read the token from this file's first line (used when --token is not given).
    #[arg(long, global = true, env = "SNAPCTL_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// CA certificate (PEM) to trust for https:// registries (default: the system's roots).
    #[arg(long, global = true, env = "SNAPCTL_CA_CERT")]
    ca_cert: Option<PathBuf>,
    /// Client certificate (PEM) for registries that require mutual TLS.
    #[arg(long, global = true, env = "SNAPCTL_CLIENT_CERT")]
    client_cert: Option<PathBuf>,
    /// The private key of --client-cert (PEM).
    #[arg(long, global = true, env = "SNAPCTL_CLIENT_KEY")]
    client_key: Option<PathBuf>,
    /// Tenant key file (`snapctl key new`): pushes and checkpoints encrypt every chunk
    /// with it; snapshots encrypted with it can be pulled and restored.
    #[arg(long, global = true, env = "SNAPCTL_KEY_FILE")]
    key_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum ReplicationCommand {
    /// Per peer: entries behind, last success, last error, what was sent.
    Status,
}

#[derive(Subcommand)]
enum WeightsCommand {
    /// Run the node's weights service: own named weight buffers and share them with
    /// workers over a UNIX socket. Prints {"socket":..,"backend":..} once bound;
    /// stops on SIGTERM/SIGINT (the buffers go with it).
    Serve {
        #[arg(long, env = "SNAPCTL_WEIGHTS_SOCKET", default_value = DEFAULT_WEIGHTS_SOCKET)]
        socket: PathBuf,
        /// cuda: CUDA virtual-memory allocations (GPU nodes); memfd: shared memory.
        #[arg(long)]
        backend: snapreg_weights::BackendKind,
        /// CUDA device the buffers live on.
        #[arg(long, default_value_t = 0)]
        device: i32,
    },
    /// List the service's buffers, who holds them, and the quiesced workers.
    Ls {
        #[arg(long, env = "SNAPCTL_WEIGHTS_SOCKET", default_value = DEFAULT_WEIGHTS_SOCKET)]
        socket: PathBuf,
    },
}

const DEFAULT_WEIGHTS_SOCKET: &str = "/run/snapreg/weights.sock";

#[derive(Subcommand)]
enum RetentionCommand {
    /// Keep the N newest tags of REPO and every tag younger than the age; GC (or
    /// `retention apply`) deletes the rest. Both zero removes the policy.
    Set {
        repository: String,
        #[arg(long, default_value_t = 0)]
        keep_last: u32,
        /// e.g. 7d, 12h.
        #[arg(long, value_parser = humantime::parse_duration)]
        keep_for: Option<Duration>,
    },
    /// Show REPO's policy.
    Show { repository: String },
    /// Delete the tags policies do not keep (REPO's, or every repository's) now.
    Apply {
        repository: Option<String>,
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Create a tenant key file (mode 0600; refuses to overwrite). Keep it like a
    /// password: whoever holds it reads every snapshot encrypted with it, and a lost
    /// key cannot be recovered.
    New {
        /// The tenant's name (recorded in the key file and in manifests).
        #[arg(long)]
        tenant: String,
        /// Where to write the key file.
        out: PathBuf,
    },
    /// Show a key file's tenant and key id (never the secret).
    Show { file: PathBuf },
}

#[derive(Subcommand)]
enum CacheCommand {
    /// List cached chunks (least recently used first) and the total.
    Ls,
    /// Evict least-recently-used chunks down to --to (default: the cache size limit).
    Prune {
        #[arg(long, value_parser = parse_size)]
        to: Option<u64>,
    },
}

/// Sizes like 20G, 512M, 4096 (bytes).
fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("unknown size suffix in {s:?}: use K, M, G or T")),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    num.parse::<u64>()
        .map(|n| n * mult)
        .map_err(|_| format!("{s:?} is not a size like 20G"))
}

#[derive(Subcommand)]
enum Command {
    /// Push a directory (e.g. a CRIU images dir) as a snapshot: `push DIR REF`, or a
    /// Podman checkpoint archive: `push --podman-archive FILE.tar[.gz|.zst] REF`.
    Push {
        #[arg(long, value_name = "FILE")]
        podman_archive: Option<PathBuf>,
        /// DIR REF (or REF alone with --podman-archive).
        #[arg(required = true, num_args = 1..=2, value_name = "DIR REF")]
        args: Vec<String>,
    },
    /// Pull a snapshot into a directory: `pull REF DIR`, or back into a Podman archive:
    /// `pull --podman-archive OUT.tar REF`.
    Pull {
        #[arg(long, value_name = "OUT.tar")]
        podman_archive: Option<PathBuf>,
        /// REF DIR (or REF alone with --podman-archive).
        #[arg(required = true, num_args = 1..=2, value_name = "REF DIR")]
        args: Vec<String>,
    },
    /// Checkpoint a running process tree with CRIU, streamed straight into the registry.
    Checkpoint {
        /// Root of the process tree.
        #[arg(long)]
        pid: u32,
        reference: String,
        /// Keep the process running after the dump.
        #[arg(long)]
        leave_running: bool,
        /// Dump established TCP connections (uses nftables for the network lock).
        #[arg(long)]
        tcp_established: bool,
        /// The process is attached to a terminal / session it does not lead.
        #[arg(long)]
        shell_job: bool,
        /// Dump into DIR (e.g. a tmpfs) first and upload after the process is released.
        #[arg(long, value_name = "DIR")]
        spool: Option<PathBuf>,
        /// Abort the dump (and release the process) after this long without progress.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        stall_timeout: Duration,
        /// Checkpoint every CUDA process of the tree into host memory first (NVIDIA's
        /// checkpoint API; put back if anything fails or with --leave-running).
        #[arg(long)]
        cuda: bool,
        /// Separated mode: store the buffers the worker released to this weights
        /// service as the snapshot's weights layer (refused while it holds any).
        #[arg(long, value_name = "SOCKET")]
        weights_service: Option<PathBuf>,
        /// Extra CRIU arguments, after `--`.
        #[arg(last = true)]
        criu_args: Vec<String>,
    },
    /// Restore a snapshot straight from the registry (through the node cache) with CRIU.
    PullRestore {
        reference: String,
        /// Return once the process runs (CRIU's -d); otherwise wait for it to exit.
        #[arg(long)]
        detach: bool,
        /// Restore despite compatibility refusals (each is printed).
        #[arg(long)]
        force: bool,
        /// Chunk fetches in flight ahead of CRIU, per file.
        #[arg(long, default_value_t = restore::DEFAULT_WINDOW)]
        window: usize,
        /// Separated mode: fill the weights layer into this weights service while
        /// CRIU restores the process, then signal the worker to re-attach.
        #[arg(long, value_name = "SOCKET")]
        weights_service: Option<PathBuf>,
        /// Serve every zero page to CRIU (by default zero pages of private anonymous
        /// memory are left out of the pagemap: they read as zero anyway).
        #[arg(long)]
        keep_zero_pages: bool,
        /// Restore the snapshot's GPUs onto others of this host: OLD=NEW,… where each
        /// side is a device index (snapshot order / this host's order) or a GPU UUID.
        #[arg(long, value_name = "OLD=NEW,...")]
        gpu_map: Option<String>,
        /// Extra CRIU arguments, after `--`.
        #[arg(last = true)]
        criu_args: Vec<String>,
    },
    /// Weights kept apart from process snapshots (separated mode).
    Weights {
        #[command(subcommand)]
        command: WeightsCommand,
    },
    /// Warm this node's chunk cache with a snapshot, so that pull-restore fetches nothing.
    Prefetch {
        reference: String,
        /// Chunk fetches in flight.
        #[arg(long, default_value_t = restore::DEFAULT_WINDOW)]
        window: usize,
    },
    /// Show how far each peer of the registry is behind.
    Replication {
        #[command(subcommand)]
        command: ReplicationCommand,
    },
    /// Show or trim the node chunk cache.
    Cache {
        #[command(subcommand)]
        command: CacheCommand,
    },
    /// Tenant keys for encryption at rest.
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
    /// Show a snapshot's layers, sizes and compatibility record.
    Inspect { reference: String },
    /// List repositories, or the tags of one.
    Ls { repository: Option<String> },
    /// Point DST (repo:tag) at the snapshot SRC names.
    Tag { source: String, destination: String },
    /// Write the snapshot SRC again as DST (repo:tag), re-encrypting its chunks:
    /// `--to-key-file NEW` rotates a tenant key or encrypts a plaintext snapshot,
    /// `--to-plaintext` decrypts one; neither keeps SRC's encryption. SRC's own key
    /// is the global --key-file.
    Copy {
        source: String,
        destination: String,
        /// Encrypt the copy with this tenant key file.
        #[arg(long, value_name = "FILE", conflicts_with = "to_plaintext")]
        to_key_file: Option<PathBuf>,
        /// Store the copy unencrypted.
        #[arg(long)]
        to_plaintext: bool,
    },
    /// Delete a tag (its data goes at the next gc), or with repo@blake3:<hex> an
    /// untagged manifest.
    Rm { reference: String },
    /// Fetch and check every chunk of a snapshot; exits 5 naming each damaged chunk
    /// and its files.
    Verify {
        reference: String,
        /// Chunk fetches in flight.
        #[arg(long, default_value_t = restore::DEFAULT_WINDOW)]
        window: usize,
    },
    /// Retention policies per repository: keep-last N / keep-for D.
    Retention {
        #[command(subcommand)]
        command: RetentionCommand,
    },
    /// Collect garbage on the registry now (retention policies are applied first).
    Gc {
        /// Keep unreferenced chunks younger than this (default: the registry's --gc-grace).
        #[arg(long, value_parser = humantime::parse_duration)]
        grace: Option<Duration>,
        /// Report what would be swept; retention policies are not applied (see
        /// `retention apply --dry-run` for those).
        #[arg(long)]
        dry_run: bool,
    },
    /// Show this host's compatibility facts and the CRIU snapctl would use.
    Host,
    /// Run the node agent: serve Prefetch and CacheStatus (gRPC `NodeAgent`) for
    /// schedulers, manage the node cache and register this node with the registries.
    /// Prints {"listen":"ADDR"} once bound; stops on SIGTERM/SIGINT. Talks to the
    /// registries with the global --token / --ca-cert / --client-cert.
    Agent {
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
        /// Mutual TLS: refuse callers without a certificate signed by this CA (PEM).
        #[arg(long, requires = "tls_cert", value_name = "PEM")]
        tls_client_ca: Option<PathBuf>,
    },
}

fn main() {
    // CRIU runs snapctl as its action script: answer and exit before parsing arguments.
    snapreg_client::action::run_if_action_script();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SNAPCTL_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let json = cli.json;
    match runtime.block_on(run(cli)) {
        Ok(out) => {
            if json {
                println!("{}", serde_json::to_string(&out.json).expect("json"));
            } else {
                println!("{}", out.human);
            }
        }
        Err(e) => {
            let code = exit_code(&e);
            eprintln!("snapctl: error: {e:#}");
            if json {
                println!(
                    "{}",
                    json!({ "error": format!("{e:#}"), "exit_code": code })
                );
            }
            std::process::exit(code);
        }
    }
}

/// The documented code of the first [`ClientError`] in the chain; 1 otherwise.
fn exit_code(e: &anyhow::Error) -> i32 {
    e.chain()
        .find_map(|c| c.downcast_ref::<ClientError>())
        .map_or(1, ClientError::exit_code)
}

struct Output {
    human: String,
    json: serde_json::Value,
}

fn parse_ref(text: &str) -> anyhow::Result<Reference> {
    Ok(text.parse::<Reference>().map_err(ClientError::from)?)
}

fn open_cache(cli: &Cli) -> anyhow::Result<ChunkCache> {
    let dir = cli.cache.clone().unwrap_or_else(cache::default_dir);
    Ok(ChunkCache::open(&dir, cli.cache_size)
        .map_err(|e| ClientError::io(format!("opening the node cache {}", dir.display()), e))?)
}

/// The registries named by --registry, nearest first.
fn registry_urls(cli: &Cli) -> anyhow::Result<Vec<&str>> {
    let list = cli.registry.as_deref().ok_or(ClientError::NoRegistry)?;
    Ok(list
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect())
}

/// The token and TLS settings of the global flags.
fn credentials(cli: &Cli) -> anyhow::Result<Credentials> {
    Ok(Credentials::new(
        cli.token.as_deref(),
        cli.token_file.as_deref(),
        cli.ca_cert.as_deref(),
        cli.client_cert.as_deref(),
        cli.client_key.as_deref(),
    )?)
}

/// The tenant key of --key-file, if given.
fn tenant_key(cli: &Cli) -> anyhow::Result<Option<Arc<TenantKey>>> {
    let Some(path) = &cli.key_file else {
        return Ok(None);
    };
    let key = TenantKey::load(path).map_err(ClientError::from)?;
    if let Ok(meta) = std::fs::metadata(path) {
        use std::os::unix::fs::PermissionsExt;
        if meta.permissions().mode() & 0o077 != 0 {
            eprintln!(
                "snapctl: warning: tenant key file {} is readable by other users: chmod 600 it",
                path.display()
            );
        }
    }
    Ok(Some(Arc::new(key)))
}

/// The first (nearest) registry: pushes, tags and listings go there.
async fn connect(cli: &Cli) -> anyhow::Result<Remote> {
    let urls = registry_urls(cli)?;
    let url = urls.first().ok_or(ClientError::NoRegistry)?;
    Ok(Remote::connect_with(url, &credentials(cli)?)
        .await?
        .with_direct(!cli.no_direct)
        .with_tenant_key(tenant_key(cli)?))
}

/// Every reachable registry, nearest first; unreachable ones are skipped with a
/// warning as long as one answers.
async fn connect_all(cli: &Cli) -> anyhow::Result<Vec<Remote>> {
    let mut out = Vec::new();
    let mut last = None;
    let creds = credentials(cli)?;
    let key = tenant_key(cli)?;
    for url in registry_urls(cli)? {
        match Remote::connect_with(url, &creds).await {
            Ok(r) => out.push(r.with_direct(!cli.no_direct).with_tenant_key(key.clone())),
            Err(e) => {
                eprintln!("snapctl: warning: skipping {url}: {e}");
                last = Some(e);
            }
        }
    }
    match (out.is_empty(), last) {
        (true, Some(e)) => Err(e.into()),
        (true, None) => Err(ClientError::NoRegistry.into()),
        _ => Ok(out),
    }
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

async fn run(cli: Cli) -> anyhow::Result<Output> {
    let show_progress = !cli.json;
    match &cli.command {
        Command::Agent {
            listen,
            name,
            advertise,
            register_every,
            window,
            tls_cert,
            tls_key,
            tls_client_ca,
        } => {
            let registries: Vec<String> = registry_urls(&cli)?
                .into_iter()
                .map(str::to_string)
                .collect();
            let config = agent::AgentConfig {
                node_name: name.clone().unwrap_or_else(host::hostname),
                advertise_url: advertise.clone(),
                registries,
                cache: open_cache(&cli)?,
                register_every: *register_every,
                window: *window,
                credentials: credentials(&cli)?,
                tls: match (tls_cert, tls_key) {
                    (Some(cert), Some(key)) => Some(
                        snapreg_proto::credentials::server_tls(cert, key, tls_client_ca.as_deref())
                            .map_err(|e| ClientError::Usage(e.to_string()))?,
                    ),
                    _ => None,
                },
            };
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .map_err(|e| ClientError::io(format!("binding {listen}"), e))?;
            let addr = listener
                .local_addr()
                .map_err(|e| ClientError::io("agent listener", e))?;
            {
                use std::io::Write;
                let mut out = std::io::stdout().lock();
                writeln!(out, "{}", json!({ "listen": addr.to_string() }))?;
                out.flush()?;
            }
            agent::run(listener, config, shutdown_signal()).await?;
            // Whoever read the {"listen"} line may have closed stdout by now: say
            // nothing more there.
            eprintln!("snapctl: agent stopped");
            std::process::exit(0)
        }
        Command::Push {
            podman_archive,
            args,
        } => {
            let (dir, reference) = match (podman_archive, args.as_slice()) {
                (Some(_), [r]) => (None, r),
                (None, [d, r]) => (Some(PathBuf::from(d)), r),
                _ => {
                    return Err(ClientError::Usage(
                        "usage: push DIR REF, or push --podman-archive FILE REF".into(),
                    )
                    .into())
                }
            };
            let reference = parse_ref(reference)?;
            let remote = connect(&cli).await?;
            let progress = Progress::new("push", show_progress);
            let report = match (&dir, podman_archive) {
                (Some(dir), _) => push::push_dir(&remote, dir, &reference, progress)
                    .await
                    .with_context(|| {
                        format!(
                            "pushing {} to {} as {reference}",
                            dir.display(),
                            remote.url()
                        )
                    })?,
                (None, Some(archive)) => {
                    podman::push_archive(&remote, archive, &reference, progress)
                        .await
                        .with_context(|| {
                            format!(
                                "pushing {} to {} as {reference}",
                                archive.display(),
                                remote.url()
                            )
                        })?
                }
                (None, None) => unreachable!("matched above"),
            };
            let c = &report.counters;
            Ok(Output {
                human: format!(
                    "pushed {} ({}): {} files, {} bytes, {} of {} chunks sent ({} bytes), {} zero bytes skipped, {:.2}s",
                    report.reference, report.digest, report.files, c.bytes_total, c.chunks_transferred, c.chunks_total,
                    c.bytes_transferred, c.zero_bytes, report.seconds
                ),
                json: serde_json::to_value(&report)?,
            })
        }
        Command::Pull {
            podman_archive,
            args,
        } => {
            let (reference, dir) = match (podman_archive, args.as_slice()) {
                (Some(_), [r]) => (r, None),
                (None, [r, d]) => (r, Some(PathBuf::from(d))),
                _ => {
                    return Err(ClientError::Usage(
                        "usage: pull REF DIR, or pull --podman-archive OUT.tar REF".into(),
                    )
                    .into())
                }
            };
            let reference = parse_ref(reference)?;
            let remote = connect(&cli).await?;
            let progress = Progress::new("pull", show_progress);
            let (report, into) = match (&dir, podman_archive) {
                (Some(dir), _) => (
                    pull::pull_dir(&remote, &reference, dir, progress).await,
                    dir.clone(),
                ),
                (None, Some(out)) => (
                    podman::pull_archive(&remote, &reference, out, progress).await,
                    out.clone(),
                ),
                (None, None) => unreachable!("matched above"),
            };
            let report = report.with_context(|| {
                format!(
                    "pulling {reference} from {} into {}",
                    remote.url(),
                    into.display()
                )
            })?;
            let c = &report.counters;
            Ok(Output {
                human: format!(
                    "pulled {} ({}): {} files, {} bytes, {} chunks fetched ({} bytes), {:.2}s",
                    report.reference,
                    report.digest,
                    report.files,
                    c.bytes_total,
                    c.chunks_transferred,
                    c.bytes_transferred,
                    report.seconds
                ),
                json: serde_json::to_value(&report)?,
            })
        }
        Command::Checkpoint {
            pid,
            reference,
            leave_running,
            tcp_established,
            shell_job,
            spool,
            stall_timeout,
            cuda,
            weights_service,
            criu_args,
        } => {
            let reference = parse_ref(reference)?;
            let criu = criu::locate(cli.criu.as_deref())?;
            let remote = connect(&cli).await?;
            let opts = checkpoint::CheckpointOptions {
                pid: *pid,
                leave_running: *leave_running,
                tcp_established: *tcp_established,
                shell_job: *shell_job,
                extra_args: criu_args.clone(),
                spool: spool.clone(),
                stall_timeout: *stall_timeout,
                cuda: *cuda,
                weights_service: weights_service.clone(),
            };
            let r = checkpoint::checkpoint(
                &remote,
                &criu,
                &reference,
                &opts,
                Progress::new("dump", show_progress),
            )
            .await
            .with_context(|| {
                format!(
                    "checkpointing PID {pid} into {} as {reference}",
                    remote.url()
                )
            })?;
            Ok(Output {
                human: format!(
                    "checkpointed PID {} as {} ({}): {} files, {} bytes, {} chunks sent, frozen {} ms, {:.2}s",
                    r.pid,
                    r.reference,
                    r.digest,
                    r.files,
                    r.counters.bytes_total,
                    r.counters.chunks_transferred,
                    r.freeze_ms.map_or("?".into(), |f| format!("{f:.0}")),
                    r.seconds
                ),
                json: serde_json::to_value(&r)?,
            })
        }
        Command::PullRestore {
            reference,
            detach,
            force,
            window,
            weights_service,
            keep_zero_pages,
            gpu_map,
            criu_args,
        } => {
            let reference = parse_ref(reference)?;
            let criu = criu::locate(cli.criu.as_deref())?;
            let mut remotes = connect_all(&cli).await?;
            let remote = remotes.remove(0);
            let opts = restore::RestoreOptions {
                detach: *detach,
                extra_args: criu_args.clone(),
                force: *force,
                cache: open_cache(&cli)?,
                window: *window,
                fallbacks: remotes,
                weights_service: weights_service.clone(),
                keep_zero_pages: *keep_zero_pages,
                gpu_map: gpu_map.clone(),
            };
            let r = restore::pull_restore(
                &remote,
                &criu,
                &reference,
                &opts,
                Progress::new("restore", show_progress),
            )
            .await
            .with_context(|| format!("restoring {reference} from {}", remote.url()))?;
            Ok(Output {
                human: format!(
                    "restored {} ({}){}: {} chunks fetched, {} from the node cache, {:.2}s",
                    r.reference,
                    r.digest,
                    r.pid.map(|p| format!(" as PID {p}")).unwrap_or_default(),
                    r.counters.chunks_transferred,
                    r.counters.chunks_cached,
                    r.seconds
                ),
                json: serde_json::to_value(&r)?,
            })
        }
        Command::Prefetch { reference, window } => {
            let reference = parse_ref(reference)?;
            let remotes = connect_all(&cli).await?;
            let r = snapreg_client::prefetch::prefetch(
                remotes,
                &reference,
                open_cache(&cli)?,
                *window,
                Progress::new("prefetch", show_progress),
            )
            .await
            .with_context(|| format!("prefetching {reference}"))?;
            Ok(Output {
                human: format!(
                    "prefetched {} ({}): {} chunks fetched, {} already cached, {:.2}s",
                    r.reference,
                    r.digest,
                    r.counters.chunks_transferred,
                    r.counters.chunks_cached,
                    r.seconds
                ),
                json: serde_json::to_value(&r)?,
            })
        }
        Command::Replication {
            command: ReplicationCommand::Status,
        } => {
            let remote = connect(&cli).await?;
            let s = remote.replication_status().await?;
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            let mut human = vec![format!("replication log head: {}", s.log_head)];
            let mut peers = Vec::new();
            for p in &s.peers {
                let since = match p.last_success_unix_ms {
                    0 => "never".to_string(),
                    t => format!("{:.1}s ago", now_ms.saturating_sub(t) as f64 / 1000.0),
                };
                human.push(format!(
                    "{}\t{}\t{} behind\tlast success {since}\t{}",
                    p.name,
                    p.url,
                    p.entries_behind,
                    if p.last_error.is_empty() {
                        "ok".to_string()
                    } else {
                        format!("last error: {}", p.last_error)
                    }
                ));
                peers.push(json!({
                    "name": p.name, "url": p.url, "repository_prefixes": p.repository_prefixes, "acked_seq": p.acked_seq,
                    "entries_behind": p.entries_behind, "last_success_unix_ms": p.last_success_unix_ms, "last_error": p.last_error,
                    "chunks_sent": p.chunks_sent, "bytes_sent": p.bytes_sent, "manifests_sent": p.manifests_sent,
                    "records_sent": p.records_sent, "failures": p.failures,
                }));
            }
            Ok(Output {
                human: human.join("\n"),
                json: json!({ "log_head": s.log_head, "peers": peers }),
            })
        }
        Command::Copy {
            source,
            destination,
            to_key_file,
            to_plaintext,
        } => {
            let (src, dst) = (parse_ref(source)?, parse_ref(destination)?);
            let to = match (to_key_file, to_plaintext) {
                (Some(path), _) => {
                    CopyEncryption::Key(Arc::new(TenantKey::load(path).map_err(ClientError::from)?))
                }
                (None, true) => CopyEncryption::Plaintext,
                (None, false) => CopyEncryption::Same,
            };
            let remote = connect(&cli).await?;
            let r = copy::copy(
                &remote,
                &src,
                &dst,
                to,
                open_cache(&cli)?,
                Progress::new("copy", show_progress),
            )
            .await
            .with_context(|| format!("copying {src} to {dst} on {}", remote.url()))?;
            Ok(Output {
                human: format!(
                    "copied {} ({}) to {} ({}){}: {} files, {} of {} chunks sent, {:.2}s",
                    r.source,
                    r.source_digest,
                    r.reference,
                    r.digest,
                    r.key_id
                        .as_deref()
                        .map(|k| format!(", encrypted with key {k}"))
                        .unwrap_or_default(),
                    r.files,
                    r.counters.chunks_transferred,
                    r.counters.chunks_total,
                    r.seconds
                ),
                json: serde_json::to_value(&r)?,
            })
        }
        Command::Weights { command } => weights_command(command).await,
        Command::Key { command } => key_command(command),
        Command::Cache { command } => {
            let cache = open_cache(&cli)?;
            match command {
                CacheCommand::Ls => {
                    let mut entries = cache.entries().map_err(|e| {
                        ClientError::io(format!("reading {}", cache.dir().display()), e)
                    })?;
                    entries.sort_by_key(|e| e.last_used_unix);
                    let usage = cache
                        .usage()
                        .map_err(|e| ClientError::io("reading the cache", e))?;
                    let mut human: Vec<String> = entries
                        .iter()
                        .map(|e| format!("{}\t{}\t{}", e.digest, e.bytes, e.last_used_unix))
                        .collect();
                    human.push(format!(
                        "{} chunks, {} bytes of {} allowed, in {}",
                        usage.chunks,
                        usage.bytes,
                        usage.limit_bytes,
                        cache.dir().display()
                    ));
                    Ok(Output {
                        human: human.join("\n"),
                        json: json!({ "dir": cache.dir(), "usage": usage, "entries": entries }),
                    })
                }
                CacheCommand::Prune { to } => {
                    let s = cache
                        .prune_to(to.unwrap_or(cli.cache_size))
                        .map_err(|e| ClientError::io("pruning the cache", e))?;
                    Ok(Output {
                        human: format!(
                            "removed {} chunks ({} bytes); {} chunks ({} bytes) left",
                            s.chunks_removed, s.bytes_removed, s.chunks_left, s.bytes_left
                        ),
                        json: serde_json::to_value(&s)?,
                    })
                }
            }
        }
        Command::Inspect { reference } => {
            let reference = parse_ref(reference)?;
            let remote = connect(&cli).await?;
            let (digest, manifest) = pull::fetch_manifest(&remote, &reference)
                .await
                .with_context(|| format!("inspecting {reference}"))?;
            let s = inspect::summarize(&reference.to_string(), &digest, &manifest);
            let mut human = format!(
                "{} {}\ncreated by {} on {:?}\n",
                s.reference, s.digest, s.created_by, s.hostname
            );
            for l in &s.layers {
                human += &format!(
                    "layer {:<8} {:>4} files {:>14} bytes {:>14} zero {:>7} chunks{}\n",
                    l.kind,
                    l.files,
                    l.bytes,
                    l.zero_bytes,
                    l.chunks,
                    l.name
                        .as_deref()
                        .map(|n| format!("  ({n})"))
                        .unwrap_or_default()
                );
            }
            human += &format!(
                "compat: arch {} kernel {} criu {:?}",
                s.compat.arch, s.compat.kernel, s.compat.criu_version
            );
            if let Some(e) = &s.encryption {
                human += &format!(
                    "\nencrypted: tenant key {} ({}), {}",
                    e.key_id, e.tenant, e.scheme
                );
            }
            Ok(Output {
                human,
                json: serde_json::to_value(&s)?,
            })
        }
        Command::Ls { repository } => {
            let remote = connect(&cli).await?;
            match repository {
                None => {
                    let repos = remote.list_repositories().await?;
                    Ok(Output {
                        human: repos.join("\n"),
                        json: json!({ "repositories": repos }),
                    })
                }
                Some(repo) => {
                    let tags = remote.list_tags(repo).await?;
                    let human = tags
                        .iter()
                        .map(|t| format!("{}:{}\t{}", repo, t.tag, t.digest))
                        .collect::<Vec<_>>()
                        .join("\n");
                    let list: Vec<_> = tags
                        .iter()
                        .map(|t| json!({ "tag": t.tag, "digest": t.digest }))
                        .collect();
                    Ok(Output {
                        human,
                        json: json!({ "repository": repo, "tags": list }),
                    })
                }
            }
        }
        Command::Tag {
            source,
            destination,
        } => {
            let src = parse_ref(source)?;
            let dst = parse_ref(destination)?;
            let Target::Tag(dst_tag) = &dst.target else {
                return Err(ClientError::Usage(format!(
                    "tag destination must be repo:tag, got {dst}"
                ))
                .into());
            };
            let remote = connect(&cli).await?;
            let (digest, _) = remote
                .get_manifest(&src.repository, &src.target_string())
                .await?;
            remote.set_tag(&dst.repository, dst_tag, &digest).await?;
            Ok(Output {
                human: format!("{dst} -> {digest}"),
                json: json!({ "reference": dst.to_string(), "digest": digest.to_string() }),
            })
        }
        Command::Rm { reference } => {
            let r = parse_ref(reference)?;
            let remote = connect(&cli).await?;
            let tag = match &r.target {
                Target::Tag(tag) => tag,
                Target::Digest(d) => {
                    let digest = remote
                        .delete_manifest(&r.repository, d)
                        .await
                        .with_context(|| format!("deleting manifest {r}"))?;
                    return Ok(Output {
                        human: format!("deleted manifest {digest}; its chunks go at the next gc"),
                        json: json!({ "deleted": r.to_string(), "digest": digest.to_string() }),
                    });
                }
            };
            let digest = remote.delete_tag(&r.repository, tag).await?;
            Ok(Output {
                human: format!("deleted {r} (was {digest})"),
                json: json!({ "deleted": r.to_string(), "digest": digest.to_string() }),
            })
        }
        Command::Verify { reference, window } => {
            let reference = parse_ref(reference)?;
            let remote = connect(&cli).await?;
            let r = verify::verify(
                &remote,
                &reference,
                *window,
                Progress::new("verify", show_progress),
            )
            .await
            .with_context(|| format!("verifying {reference} on {}", remote.url()))?;
            if let Some(e) = r.failure() {
                return Err(anyhow::Error::new(e)
                    .context(format!("verifying {reference} on {}", remote.url())));
            }
            Ok(Output {
                human: format!(
                    "verified {} ({}): {} files, {} chunks ({} bytes) all intact{}, {:.2}s",
                    r.reference,
                    r.digest,
                    r.files,
                    r.chunks_ok,
                    r.counters.bytes_transferred,
                    if r.content_checked {
                        ""
                    } else {
                        " as stored (encrypted; pass its --key-file to check the content too)"
                    },
                    r.seconds
                ),
                json: serde_json::to_value(&r)?,
            })
        }
        Command::Retention { command } => {
            let remote = connect(&cli).await?;
            let show = |p: &snapreg_proto::pb::RetentionPolicy| json!({ "keep_last": p.keep_last, "keep_for_seconds": p.keep_for_seconds });
            match command {
                RetentionCommand::Set {
                    repository,
                    keep_last,
                    keep_for,
                } => {
                    let policy = snapreg_proto::pb::RetentionPolicy {
                        keep_last: *keep_last,
                        keep_for_seconds: keep_for.map_or(0, |d| d.as_secs()),
                    };
                    remote.set_retention(repository, policy).await?;
                    Ok(Output {
                        human: format!(
                            "{repository}: keep the last {} tags and those younger than {}s (0: no such rule)",
                            policy.keep_last, policy.keep_for_seconds
                        ),
                        json: json!({ "repository": repository, "policy": show(&policy) }),
                    })
                }
                RetentionCommand::Show { repository } => {
                    let p = remote.get_retention(repository).await?;
                    Ok(Output {
                        human: match &p {
                            Some(p) => format!(
                                "{repository}: keep last {}, keep for {}s",
                                p.keep_last, p.keep_for_seconds
                            ),
                            None => format!("{repository}: no retention policy"),
                        },
                        json: json!({ "repository": repository, "policy": p.as_ref().map(show) }),
                    })
                }
                RetentionCommand::Apply {
                    repository,
                    dry_run,
                } => {
                    let outcomes = remote
                        .apply_retention(repository.as_deref(), *dry_run)
                        .await?;
                    let human = outcomes
                        .iter()
                        .map(|o| {
                            format!(
                                "{}: {} {} tags ({}), kept {}",
                                o.repository,
                                if *dry_run { "would delete" } else { "deleted" },
                                o.deleted.len(),
                                o.deleted.join(", "),
                                o.kept.len()
                            )
                        })
                        .collect::<Vec<_>>()
                        .join("\n");
                    let list: Vec<_> = outcomes
                        .iter()
                        .map(|o| {
                            json!({ "repository": o.repository, "policy": o.policy.as_ref().map(show),
                                    "deleted": o.deleted, "kept": o.kept })
                        })
                        .collect();
                    Ok(Output {
                        human,
                        json: json!({ "dry_run": dry_run, "repositories": list }),
                    })
                }
            }
        }
        Command::Gc { grace, dry_run } => {
            let remote = connect(&cli).await?;
            let s = remote.collect_garbage(*grace, *dry_run).await?;
            let j = json!({
                "dry_run": dry_run, "manifests_live": s.manifests_live, "chunks_live": s.chunks_live,
                "chunks_swept": s.chunks_swept, "bytes_swept": s.bytes_swept, "manifests_swept": s.manifests_swept,
                "chunks_kept_young": s.chunks_kept_young, "chunks_kept_leased": s.chunks_kept_leased,
            });
            Ok(Output {
                human: format!(
                    "gc{}: swept {} chunks ({} bytes) and {} manifests; live {} chunks; kept {} young, {} leased",
                    if *dry_run { " (dry run)" } else { "" },
                    s.chunks_swept, s.bytes_swept, s.manifests_swept, s.chunks_live, s.chunks_kept_young, s.chunks_kept_leased
                ),
                json: j,
            })
        }
        Command::Host => {
            let facts = host::facts();
            let criu = criu::locate(cli.criu.as_deref());
            let (criu_json, criu_line) = match &criu {
                Ok(c) => (
                    json!({ "path": c.path, "version": c.version }),
                    format!("criu {} at {}", c.version, c.path.display()),
                ),
                Err(e) => (json!({ "error": e.to_string() }), format!("criu: {e}")),
            };
            Ok(Output {
                human: format!(
                    "arch {} kernel {}\ncpu features: {}\n{criu_line}",
                    facts.arch,
                    facts.kernel,
                    facts.cpu_features.join(" ")
                ),
                json: json!({ "compat": facts, "criu": criu_json }),
            })
        }
    }
}

fn key_command(command: &KeyCommand) -> anyhow::Result<Output> {
    let key = match command {
        KeyCommand::New { tenant, out } => {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let key = TenantKey::generate(tenant);
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(out)
                .map_err(|e| ClientError::io(format!("creating key file {}", out.display()), e))?;
            f.write_all(key.to_file_contents().as_bytes())
                .and_then(|_| f.sync_all())
                .map_err(|e| ClientError::io(format!("writing key file {}", out.display()), e))?;
            key
        }
        KeyCommand::Show { file } => TenantKey::load(file).map_err(ClientError::from)?,
    };
    Ok(Output {
        human: format!("tenant {} key {}", key.tenant(), key.id()),
        json: json!({ "tenant": key.tenant(), "key_id": key.id().to_string() }),
    })
}

async fn weights_command(command: &WeightsCommand) -> anyhow::Result<Output> {
    use snapreg_weights::{Service, ServiceConfig, WeightsClient};
    match command {
        WeightsCommand::Serve {
            socket,
            backend,
            device,
        } => {
            let service = Service::new(ServiceConfig {
                socket: socket.clone(),
                backend: *backend,
                device: *device,
            })
            .with_context(|| format!("starting the {backend} weights service"))?;
            let listener = service.bind()?;
            {
                use std::io::Write;
                let mut out = std::io::stdout().lock();
                writeln!(out, "{}", json!({ "socket": socket, "backend": backend }))?;
                out.flush()?;
            }
            // A thread of its own, not the runtime's blocking pool: shutting the runtime
            // down must not wait for an accept loop that never returns.
            let (failed_tx, failed_rx) = tokio::sync::oneshot::channel();
            std::thread::spawn(move || {
                let _ = failed_tx.send(service.serve(listener));
            });
            tokio::select! {
                r = failed_rx => { r?? }
                () = shutdown_signal() => {}
            }
            let _ = std::fs::remove_file(socket);
            Ok(Output {
                human: "weights service stopped".into(),
                json: json!({ "stopped": true }),
            })
        }
        WeightsCommand::Ls { socket } => {
            let reply = WeightsClient::new(socket).list()?;
            let mut human: Vec<String> = reply
                .buffers
                .iter()
                .map(|b| {
                    format!(
                        "{}\t{} bytes\t{}\tleases {:?}",
                        b.name,
                        b.size,
                        if b.sealed { "sealed" } else { "filling" },
                        b.leases
                    )
                })
                .collect();
            for q in &reply.quiesced {
                human.push(format!(
                    "quiesced PID {} (resume signal {}): {}",
                    q.pid,
                    q.signal,
                    q.names.join(", ")
                ));
            }
            Ok(Output {
                human: human.join("\n"),
                json: serde_json::to_value(&reply)?,
            })
        }
    }
}
