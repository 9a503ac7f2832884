//! `snapctl`: parse arguments, call the library, print one result, map errors to the
//! documented exit codes (0 ok, 1 failure, 2 usage, 3 not found, 4 incompatible
//! host, 5 integrity failure). With `--json`, stdout's last line is one JSON object.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use serde_json::json;
use snapreg_client::progress::Progress;
use snapreg_client::remote::Remote;
use snapreg_client::{criu, host, inspect, pull, push, ClientError};
use snapreg_proto::reference::{Reference, Target};

#[derive(Parser)]
#[command(
    name = "snapctl",
    version,
    about = "Push, pull and restore process snapshots with a snapreg registry"
)]
struct Cli {
    /// Registry URL, e.g. http://registry:5000.
    #[arg(long, global = true, env = "SNAPCTL_REGISTRY")]
    registry: Option<String>,
    /// Print one JSON object on stdout's last line.
    #[arg(long, global = true)]
    json: bool,
    /// CRIU executable (default: SNAPCTL_CRIU, then /opt/snapreg-criu/bin/criu, then PATH).
    #[arg(long, global = true, env = "SNAPCTL_CRIU")]
    criu: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Push a directory (e.g. a CRIU images dir) as a snapshot: push DIR REF.
    Push { dir: PathBuf, reference: String },
    /// Pull a snapshot into a directory: pull REF DIR.
    Pull { reference: String, dir: PathBuf },
    /// Show a snapshot's layers, sizes and compatibility record.
    Inspect { reference: String },
    /// List repositories, or the tags of one.
    Ls { repository: Option<String> },
    /// Point DST (repo:tag) at the snapshot SRC names.
    Tag { source: String, destination: String },
    /// Delete a tag (its data goes at the next gc).
    Rm { reference: String },
    /// Collect garbage on the registry now.
    Gc {
        /// Keep unreferenced chunks younger than this (default: the registry's --gc-grace).
        #[arg(long, value_parser = humantime::parse_duration)]
        grace: Option<Duration>,
        #[arg(long)]
        dry_run: bool,
    },
    /// Show this host's compatibility facts and the CRIU snapctl would use.
    Host,
}

fn main() {
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

async fn connect(cli: &Cli) -> anyhow::Result<Remote> {
    let url = cli.registry.as_deref().ok_or(ClientError::NoRegistry)?;
    Ok(Remote::connect(url).await?)
}

async fn run(cli: Cli) -> anyhow::Result<Output> {
    let show_progress = !cli.json;
    match &cli.command {
        Command::Push { dir, reference } => {
            let reference = parse_ref(reference)?;
            let remote = connect(&cli).await?;
            let report = push::push_dir(
                &remote,
                dir,
                &reference,
                Progress::new("push", show_progress),
            )
            .await
            .with_context(|| {
                format!(
                    "pushing {} to {} as {reference}",
                    dir.display(),
                    remote.url()
                )
            })?;
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
        Command::Pull { reference, dir } => {
            let reference = parse_ref(reference)?;
            let remote = connect(&cli).await?;
            let report = pull::pull_dir(
                &remote,
                &reference,
                dir,
                Progress::new("pull", show_progress),
            )
            .await
            .with_context(|| {
                format!(
                    "pulling {reference} from {} into {}",
                    remote.url(),
                    dir.display()
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
            let Target::Tag(tag) = &r.target else {
                return Err(ClientError::Usage(format!(
                    "rm takes repo:tag (manifests go when no tag names them), got {r}"
                ))
                .into());
            };
            let remote = connect(&cli).await?;
            let digest = remote.delete_tag(&r.repository, tag).await?;
            Ok(Output {
                human: format!("deleted {r} (was {digest})"),
                json: json!({ "deleted": r.to_string(), "digest": digest.to_string() }),
            })
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
