//! `snapctl`: parse arguments, call the `snapreg-client` library, print one result, map
//! errors to the documented exit codes (exit.rs). With `--json`, stdout's last line is
//! one JSON object. Each subcommand is a file under cmd/.

use clap::{Parser, Subcommand};
use serde_json::json;

mod allocator;
mod cmd;
mod exit;
mod global;
mod operation_report;
mod progress_bar;

use cmd::Output;
use global::Global;

#[derive(Parser)]
#[command(
    name = "snapctl",
    version,
    about = "Push, pull and restore process snapshots with a snapreg registry"
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Push a directory (e.g. a CRIU images dir) as a snapshot: `push DIR REF`, or a
    /// Podman checkpoint archive: `push --podman-archive FILE.tar[.gz|.zst] REF`.
    Push(cmd::push::Args),
    /// Pull a snapshot into a directory: `pull REF DIR`, or back into a Podman archive:
    /// `pull --podman-archive OUT.tar REF`.
    Pull(cmd::pull::Args),
    /// Import a container checkpoint archive (the kubelet's, written by CRI-O, or
    /// Podman's) as a snapshot: `import FILE.tar REF`; the CRIU images, the container
    /// spec and config, and the rootfs diff each keep their place.
    Import(cmd::import::Args),
    /// Write a snapshot as an OCI checkpoint image: `export REF oci:DIR[:NAME]` or
    /// `export REF oci-archive:FILE[:NAME]` (what skopeo, podman and CRI-O read).
    Export(cmd::export::Args),
    /// Checkpoint a running process tree with CRIU, streamed straight into the registry.
    Checkpoint(cmd::checkpoint::Args),
    /// Restore a snapshot straight from the registry (through the node cache) with CRIU.
    PullRestore(cmd::pull_restore::Args),
    /// Weights kept apart from process snapshots (separated mode).
    Weights {
        #[command(subcommand)]
        command: cmd::weights::Command,
    },
    /// Warm this node's chunk cache with a snapshot, so that pull-restore fetches nothing.
    Prefetch(cmd::prefetch::Args),
    /// Show how far each peer of the registry is behind.
    Replication {
        #[command(subcommand)]
        command: cmd::replication::Command,
    },
    /// Show or trim the node chunk cache.
    Cache {
        #[command(subcommand)]
        command: cmd::cache::Command,
    },
    /// Tenant keys for encryption at rest.
    Key {
        #[command(subcommand)]
        command: cmd::key::Command,
    },
    /// Show a snapshot's layers, sizes and compatibility record.
    Inspect(cmd::inspect::Args),
    /// List repositories, or the tags of one.
    Ls(cmd::ls::Args),
    /// Point DST (repo:tag) at the snapshot SRC names.
    Tag(cmd::tag::Args),
    /// Write the snapshot SRC again as DST (repo:tag), re-encrypting its chunks:
    /// `--to-key-file NEW` rotates a tenant key or encrypts a plaintext snapshot,
    /// `--to-plaintext` decrypts one; neither keeps SRC's encryption. SRC's own key
    /// is the global --key-file.
    Copy(cmd::copy::Args),
    /// Delete a tag (its data goes at the next gc), or with repo@blake3:<hex> an
    /// untagged manifest.
    Rm(cmd::rm::Args),
    /// Fetch and check every chunk of a snapshot; exits 5 naming each damaged chunk
    /// and its files.
    Verify(cmd::verify::Args),
    /// Retention policies per repository: keep-last N / keep-for D.
    Retention {
        #[command(subcommand)]
        command: cmd::retention::Command,
    },
    /// Collect garbage on the registry now (retention policies are applied first).
    Gc(cmd::gc::Args),
    /// Show this host's compatibility facts and the CRIU snapctl would use.
    Host,
    /// Run the node agent: serve Prefetch and CacheStatus (gRPC `NodeAgent`) for
    /// schedulers, manage the node cache and register this node with the registries.
    /// Prints {"listen":"ADDR"} once bound; stops on SIGTERM/SIGINT. Talks to the
    /// registries with the global --token / --ca-cert / --client-cert.
    Agent(cmd::agent::Args),
}

fn main() {
    // CRIU runs snapctl as its action script: answer before parsing arguments.
    if let Some(verdict) = snapreg_client::action::run_if_action_script() {
        std::process::exit(match verdict {
            Ok(()) => exit::OK,
            Err(e) => {
                eprintln!("snapctl {e}");
                exit::FAILURE
            }
        });
    }
    allocator::cap_arenas();
    let cli = Cli::parse();
    snapreg_telemetry::log::init(cli.global.log_format, "SNAPCTL_LOG", "warn");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let json = cli.global.json;
    match runtime.block_on(run(cli)) {
        Ok(Some(out)) if json => println!("{}", out.json),
        Ok(Some(out)) => println!("{}", out.human),
        // The agent: its stdout may be closed by now, and its runtime's blocking
        // tasks are not waited for.
        Ok(None) => std::process::exit(exit::OK),
        Err(e) => {
            let failure = exit::Failure::from(&e);
            eprintln!("snapctl: error: {}", failure.message);
            if json {
                println!(
                    "{}",
                    json!({ "error": failure.message, "exit_code": failure.code })
                );
            }
            std::process::exit(failure.code);
        }
    }
}

/// The command's report; `None` when it has printed all it will.
/// Runs the command; operations that move snapshots on this node also leave their
/// report for the node agent's metrics (operation_report.rs).
async fn run(cli: Cli) -> anyhow::Result<Option<Output>> {
    let started = std::time::Instant::now();
    let result = run_command(&cli).await;
    if let Some(operation) = cli.command.reported_operation() {
        operation_report::record(&cli.global, operation, started, &result);
    }
    result
}

impl Command {
    /// The operation name a node report carries, for the commands that move
    /// snapshots on this node.
    fn reported_operation(&self) -> Option<&'static str> {
        Some(match self {
            Command::Push(_) => "push",
            Command::Pull(_) => "pull",
            Command::Import(_) => "import",
            Command::Export(_) => "export",
            Command::Checkpoint(_) => "checkpoint",
            Command::PullRestore(_) => "pull-restore",
            Command::Prefetch(_) => "prefetch",
            _ => return None,
        })
    }
}

async fn run_command(cli: &Cli) -> anyhow::Result<Option<Output>> {
    let g = &cli.global;
    let out = match &cli.command {
        Command::Agent(a) => return cmd::agent::run(g, a).await.map(|()| None),
        Command::Push(a) => cmd::push::run(g, a).await?,
        Command::Pull(a) => cmd::pull::run(g, a).await?,
        Command::Import(a) => cmd::import::run(g, a).await?,
        Command::Export(a) => cmd::export::run(g, a).await?,
        Command::Checkpoint(a) => cmd::checkpoint::run(g, a).await?,
        Command::PullRestore(a) => cmd::pull_restore::run(g, a).await?,
        Command::Prefetch(a) => cmd::prefetch::run(g, a).await?,
        Command::Replication { command } => cmd::replication::run(g, command).await?,
        Command::Copy(a) => cmd::copy::run(g, a).await?,
        Command::Weights { command } => cmd::weights::run(command).await?,
        Command::Key { command } => cmd::key::run(command)?,
        Command::Cache { command } => cmd::cache::run(g, command)?,
        Command::Inspect(a) => cmd::inspect::run(g, a).await?,
        Command::Ls(a) => cmd::ls::run(g, a).await?,
        Command::Tag(a) => cmd::tag::run(g, a).await?,
        Command::Rm(a) => cmd::rm::run(g, a).await?,
        Command::Verify(a) => cmd::verify::run(g, a).await?,
        Command::Retention { command } => cmd::retention::run(g, command).await?,
        Command::Gc(a) => cmd::gc::run(g, a).await?,
        Command::Host => cmd::host::run(g),
    };
    Ok(Some(out))
}
