//! What the OCI listener tells operators (on the registry's `--metrics-listen`):
//! requests by method, route and status, and blob bytes in and out. The gRPC calls
//! it makes are counted with the registry's own (`snapreg_rpc_*`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::{Registry, Unit};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub method: String,
    /// `ping`, `token`, `catalog`, `tags`, `manifest`, `blob`, `upload`, `referrers`,
    /// `other`.
    pub route: &'static str,
    pub code: u16,
}

#[derive(Clone, Debug, Default)]
pub struct Metrics {
    pub requests: Family<RequestLabels, Counter>,
    /// Blob bytes received in uploads (spooled).
    pub upload_bytes: Counter,
}

impl Metrics {
    /// The metrics, registered in `registry`.
    pub fn new(registry: &mut Registry) -> Metrics {
        let m = Metrics::default();
        registry.register(
            "snapreg_oci_requests",
            "Requests to the OCI distribution API, by method, route and status",
            m.requests.clone(),
        );
        registry.register_with_unit(
            "snapreg_oci_upload",
            "Blob bytes received by the OCI distribution API",
            Unit::Bytes,
            m.upload_bytes.clone(),
        );
        m
    }

    pub fn request(&self, method: &str, route: &'static str, code: u16) {
        self.requests
            .get_or_create(&RequestLabels {
                method: method.to_string(),
                route,
                code,
            })
            .inc();
    }
}
