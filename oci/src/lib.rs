//! The OCI distribution API (`/v2/`) of a snapreg registry, served on its own
//! listener (`snapreg serve --oci-listen ADDR`), so that skopeo, podman, crane, oras
//! and CRI-O's image pulls work against snapreg unchanged.
//!
//! ```text
//! GET    /v2/                                   ping (401 + challenge without access)
//! GET    /v2/token                              the token flow (auth.rs)
//! GET    /v2/_catalog?n=&last=                  repositories
//! GET    /v2/<name>/tags/list?n=&last=          tags, paged with Link
//! GET    /v2/<name>/manifests/<tag|digest>      HEAD too; a native snapshot as an
//!                                               OCI checkpoint image (view.rs)
//! PUT    /v2/<name>/manifests/<tag|digest>      image manifest or index (manifests.rs)
//! DELETE /v2/<name>/manifests/<tag|digest>
//! GET    /v2/<name>/blobs/<digest>              HEAD too; streamed from chunks
//! DELETE /v2/<name>/blobs/<digest>
//! POST   /v2/<name>/blobs/uploads/[?digest=|?mount=&from=]   (uploads.rs)
//! PATCH  /v2/<name>/blobs/uploads/<id>          chunked upload (Content-Range)
//! PUT    /v2/<name>/blobs/uploads/<id>?digest=  close: verify sha256, store
//! GET    /v2/<name>/blobs/uploads/<id>          where the upload stands
//! DELETE /v2/<name>/blobs/uploads/<id>          cancel
//! ```
//!
//! Not served: the referrers API (404 `UNSUPPORTED`, so clients use the
//! `sha256-<hex>` tag scheme instead) and range requests on blobs.
//!
//! The gateway holds no content of its own: every request becomes calls to the
//! registry's gRPC service with the caller's token (over an in-process link), and
//! OCI content is stored as snapshots (store.rs). Modules: `routes` (HTTP),
//! `names` (paths), `auth` (credentials), `manifests`, `view` (native → OCI),
//! `uploads` and `ingest` (OCI → native), `content` (streaming files out),
//! `tar_layout` (tar framing), `store` (the mapping), `media`, `digest`, `error`,
//! `metrics` (`snapreg_oci_*` on the registry's `--metrics-listen`), `tls`.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use snapreg_client::remote::Remote;
use tonic::transport::Channel;

mod auth;
mod content;
mod digest;
mod error;
mod ingest;
mod manifests;
mod media;
mod metrics;
mod names;
mod routes;
mod store;
mod tar_layout;
mod tls;
mod uploads;
mod view;

pub use digest::OciDigest;
pub use error::OciError;
pub use metrics::Metrics;
pub use tls::TlsFiles;

/// How often idle upload sessions are looked for.
const EXPIRE_EVERY: Duration = Duration::from_secs(60);

#[derive(Clone, Debug)]
pub struct GatewayConfig {
    /// Where upload sessions spool their bytes (emptied at start).
    pub spool_dir: PathBuf,
    /// Serve TLS with these files (the registry's own), else plain HTTP.
    pub tls: Option<TlsFiles>,
}

/// The OCI gateway of one registry.
pub struct Gateway {
    channel: Channel,
    /// The registry's in-process token: records OCI views (view.rs) for callers
    /// whose own token may only read.
    recorder: String,
    uploads: uploads::Uploads,
    tls: Option<tokio_rustls::TlsAcceptor>,
    scheme: &'static str,
    metrics: Metrics,
}

impl Gateway {
    /// A gateway calling the registry over `channel` (its in-process link), recording
    /// views with `recorder` (the link's in-process token).
    pub fn new(
        channel: Channel,
        recorder: &str,
        config: &GatewayConfig,
        metrics: Metrics,
    ) -> std::io::Result<Arc<Gateway>> {
        let tls = config.tls.as_ref().map(tls::acceptor).transpose()?;
        Ok(Arc::new(Gateway {
            channel,
            recorder: recorder.to_string(),
            uploads: uploads::Uploads::new(&config.spool_dir, metrics.upload_bytes.clone())?,
            scheme: if tls.is_some() { "https" } else { "http" },
            tls,
            metrics,
        }))
    }

    /// The registry, as the caller with `token`.
    fn remote(&self, token: Option<&str>) -> error::Result<Remote> {
        Ok(Remote::over_channel(
            "this registry",
            self.channel.clone(),
            auth::bearer(token)?,
        ))
    }

    /// The registry as the view recorder.
    fn recorder(&self) -> error::Result<Remote> {
        self.remote(Some(&self.recorder))
    }

    pub fn router(self: Arc<Self>) -> axum::Router {
        axum::Router::new()
            .fallback(routes::dispatch)
            .with_state(self)
    }
}

/// Serves the gateway on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    gateway: Arc<Gateway>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let reaper = {
        let gw = gateway.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(EXPIRE_EVERY);
            loop {
                tick.tick().await;
                let n = gw.uploads.expire().await;
                if n > 0 {
                    tracing::info!(sessions = n, "idle OCI uploads dropped");
                }
            }
        })
    };
    let served = match gateway.tls.clone() {
        Some(acceptor) => {
            let listener = tls::TlsListener::new(listener, acceptor)?;
            axum::serve(listener, gateway.router())
                .with_graceful_shutdown(shutdown)
                .await
        }
        None => {
            axum::serve(listener, gateway.router())
                .with_graceful_shutdown(shutdown)
                .await
        }
    };
    reaper.abort();
    served
}
