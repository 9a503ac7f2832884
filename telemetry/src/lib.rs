//! What snapreg's long-running processes (the registry, the node agent) tell the
//! people and systems that run them.
//!
//! - [`log`]: `--log-format text|json`, one place that sets up `tracing`.
//! - [`health`]: [`Health`], the standard gRPC health service (`grpc.health.v1`,
//!   what Kubernetes' gRPC probes call) and the readiness the HTTP endpoint reports,
//!   flipped together.
//! - [`rpc`]: a tower layer that counts every gRPC call by method and status code
//!   and times it (`snapreg_rpc_requests_total`, `snapreg_rpc_duration_seconds`).
//! - [`endpoint`]: the HTTP listener of `--metrics-listen`: `/metrics` (Prometheus
//!   text), `/livez` and `/readyz`.
//!
//! Metrics use the Prometheus project's own Rust client (`prometheus-client`); each
//! process owns one [`prometheus_client::registry::Registry`] and registers its own
//! families into it. Names follow Prometheus' conventions: `snapreg_` prefix,
//! counters end in `_total`, units are spelled out (`_bytes`, `_seconds`).

pub mod endpoint;
pub mod health;
pub mod log;
pub mod rpc;

pub use health::Health;

/// Buckets for operation durations, 1 ms to about 9 minutes (factor 2 per bucket).
pub fn duration_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 20)
}
