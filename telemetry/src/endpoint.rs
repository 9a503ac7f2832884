//! The `--metrics-listen` HTTP endpoint (plain HTTP/1.1):
//!
//! | path       | answer                                                           |
//! |------------|------------------------------------------------------------------|
//! | `/metrics` | 200, the process's metrics in the Prometheus text format         |
//! | `/livez`   | 200 `ok` while the process answers                               |
//! | `/readyz`  | 200 `ready`, or 503 `not ready` (starting, draining, store down) |
//!
//! `/readyz` is what an HTTP readiness probe calls where the gRPC port speaks TLS
//! (Kubernetes' gRPC probes do not). It stays up while the process drains, so a
//! scrape during shutdown still sees the last counters.

use std::future::Future;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::Health;

/// Called before every scrape, to copy values that live elsewhere (queue depths,
/// another component's counters) into their metrics.
pub type Refresh = Arc<dyn Fn() + Send + Sync>;

#[derive(Clone)]
struct Endpoint {
    metrics: Arc<Registry>,
    health: Health,
    refresh: Option<Refresh>,
}

/// Serves the endpoint on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Registry>,
    health: Health,
    refresh: Option<Refresh>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(Endpoint {
            metrics,
            health,
            refresh,
        });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn metrics_text(State(e): State<Endpoint>) -> impl IntoResponse {
    if let Some(refresh) = &e.refresh {
        refresh();
    }
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &e.metrics) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "encoding metrics failed\n",
        )
            .into_response(),
    }
}

async fn readyz(State(e): State<Endpoint>) -> impl IntoResponse {
    if e.health.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}
