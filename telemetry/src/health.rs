//! Health: the gRPC health service and the HTTP readiness answer, as one switch.
//!
//! A process starts NOT_SERVING, turns SERVING once it can do its work (the registry:
//! index open and store answering), and turns NOT_SERVING again when it starts
//! draining for shutdown or its store stops answering. Liveness is simply "the
//! process answers HTTP".

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};
use tonic_health::ServingStatus;

/// One process's health; clones share it.
#[derive(Clone)]
pub struct Health {
    ready: Arc<AtomicBool>,
    reporter: HealthReporter,
    /// The gRPC service names reported besides "" (the whole server).
    services: Arc<Vec<String>>,
}

impl Health {
    /// Not ready yet (every name NOT_SERVING); `services` are the fully qualified gRPC service names the
    /// process serves (e.g. `snapreg.v1.Registry`), each reported like "".
    pub async fn new(services: &[&str]) -> Health {
        let reporter = HealthReporter::new();
        let health = Health {
            ready: Arc::new(AtomicBool::new(false)),
            reporter,
            services: Arc::new(services.iter().map(|s| s.to_string()).collect()),
        };
        // tonic-health starts "" as SERVING; nothing is until the owner says so.
        health.set_ready(false).await;
        health
    }

    /// The `grpc.health.v1.Health` service, to mount on the process's gRPC server.
    pub fn grpc_service(&self) -> HealthServer<HealthService> {
        HealthServer::new(HealthService::from_health_reporter(self.reporter.clone()))
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// Sets readiness, for the HTTP endpoint and for every gRPC service name.
    pub async fn set_ready(&self, ready: bool) {
        let was = self.ready.swap(ready, Ordering::Relaxed);
        let status = if ready {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        for name in std::iter::once("").chain(self.services.iter().map(String::as_str)) {
            self.reporter.set_service_status(name, status).await;
        }
        if was != ready {
            tracing::info!(ready, "readiness changed");
        }
    }
}
