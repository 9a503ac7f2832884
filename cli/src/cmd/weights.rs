use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::json;
use snapreg_weights::{BackendKind, Service, ServiceConfig, WeightsClient};

use super::{announce, shutdown_signal, Output};

const DEFAULT_SOCKET: &str = "/run/snapreg/weights.sock";

#[derive(clap::Subcommand)]
pub enum Command {
    /// Run the node's weights service: own named weight buffers and share them with
    /// workers over a UNIX socket. Prints {"socket":..,"backend":..} once bound;
    /// stops on SIGTERM/SIGINT (the buffers go with it).
    Serve {
        #[arg(long, env = "SNAPCTL_WEIGHTS_SOCKET", default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
        /// cuda: CUDA virtual-memory allocations (GPU nodes); memfd: shared memory.
        #[arg(long)]
        backend: BackendKind,
        /// CUDA device the buffers live on.
        #[arg(long, default_value_t = 0)]
        device: i32,
    },
    /// List the service's buffers, who holds them, and the quiesced workers.
    Ls {
        #[arg(long, env = "SNAPCTL_WEIGHTS_SOCKET", default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
    },
}

pub async fn run(command: &Command) -> anyhow::Result<Output> {
    match command {
        Command::Serve {
            socket,
            backend,
            device,
        } => serve(socket, *backend, *device).await,
        Command::Ls { socket } => ls(socket),
    }
}

async fn serve(socket: &Path, backend: BackendKind, device: i32) -> anyhow::Result<Output> {
    let service = Service::new(ServiceConfig {
        socket: socket.to_path_buf(),
        backend,
        device,
    })
    .with_context(|| format!("starting the {backend} weights service"))?;
    let listener = service.bind()?;
    announce(&json!({ "socket": socket, "backend": backend }))?;
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

fn ls(socket: &Path) -> anyhow::Result<Output> {
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
