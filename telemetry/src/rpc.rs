//! Counting and timing gRPC calls: a tower layer for a tonic server.
//!
//! Every call adds one to `snapreg_rpc_requests_total{service,method,code}` and its
//! duration (request received to last response byte, streams included) to
//! `snapreg_rpc_duration_seconds{service,method}`. The status code is read where
//! gRPC puts it: the response headers for an immediate error ("trailers-only"), else
//! the trailers at the end of the body. A call whose body is dropped before the
//! trailers (the client went away) counts as `Cancelled`.
//!
//! Only the services named at construction get their own labels; any other path
//! counts as service `unknown`, so a client probing random paths cannot grow the
//! number of series.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use http_body::{Body, Frame};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    service: String,
    method: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    service: String,
    method: String,
}

struct RpcMetrics {
    known_services: Vec<String>,
    requests: Family<CallLabels, Counter>,
    durations: Family<MethodLabels, Histogram, fn() -> Histogram>,
}

/// The layer; clones share the counters.
#[derive(Clone)]
pub struct RpcMetricsLayer {
    metrics: Arc<RpcMetrics>,
}

impl RpcMetricsLayer {
    /// Registers the two families in `registry`; `services` are the fully qualified
    /// gRPC service names to label (e.g. `snapreg.v1.Registry`).
    pub fn new(registry: &mut Registry, services: &[&str]) -> Self {
        let requests = Family::<CallLabels, Counter>::default();
        let durations: Family<MethodLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(|| Histogram::new(crate::duration_buckets()));
        registry.register(
            "snapreg_rpc_requests",
            "gRPC calls served, by service, method and status code",
            requests.clone(),
        );
        registry.register(
            "snapreg_rpc_duration_seconds",
            "Time from a gRPC call's arrival to its last response byte",
            durations.clone(),
        );
        RpcMetricsLayer {
            metrics: Arc::new(RpcMetrics {
                known_services: services.iter().map(|s| s.to_string()).collect(),
                requests,
                durations,
            }),
        }
    }
}

impl<S> tower::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetricsService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RpcMetricsService {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RpcMetricsService<S> {
    inner: S,
    metrics: Arc<RpcMetrics>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for RpcMetricsService<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<CountedBody<ResBody>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let call = Call {
            labels: self.metrics.labels(req.uri().path()),
            started: Instant::now(),
            metrics: self.metrics.clone(),
        };
        let response = self.inner.call(req);
        Box::pin(async move {
            let response = response.await?;
            let code = response.headers().get("grpc-status").and_then(parse_code);
            let mut call = Some(call);
            if let Some(code) = code {
                // Trailers-only: the call ended here.
                if let Some(c) = call.take() {
                    c.finish(code)
                }
            }
            Ok(response.map(|inner| CountedBody { inner, call }))
        })
    }
}

impl RpcMetrics {
    fn labels(&self, path: &str) -> MethodLabels {
        let (service, method) = path
            .trim_start_matches('/')
            .split_once('/')
            .unwrap_or(("", ""));
        if self.known_services.iter().any(|s| s == service) {
            MethodLabels {
                service: service.to_string(),
                method: method.to_string(),
            }
        } else {
            MethodLabels {
                service: "unknown".into(),
                method: "unknown".into(),
            }
        }
    }
}

/// One call being counted; recorded exactly once (status seen, or dropped).
struct Call {
    labels: MethodLabels,
    started: Instant,
    metrics: Arc<RpcMetrics>,
}

impl Call {
    fn finish(self, code: tonic::Code) {
        let code = match code {
            tonic::Code::Ok => "OK".to_string(),
            other => format!("{other:?}"),
        };
        self.metrics
            .durations
            .get_or_create(&self.labels)
            .observe(self.started.elapsed().as_secs_f64());
        self.metrics
            .requests
            .get_or_create(&CallLabels {
                service: self.labels.service,
                method: self.labels.method,
                code,
            })
            .inc();
    }
}

fn parse_code(v: &http::HeaderValue) -> Option<tonic::Code> {
    let n: i32 = v.to_str().ok()?.parse().ok()?;
    Some(tonic::Code::from_i32(n))
}

pin_project_lite::pin_project! {
    /// A response body that records its call when the trailers pass (or when it is
    /// dropped first).
    pub struct CountedBody<B> {
        #[pin]
        inner: B,
        call: Option<Call>,
    }

    impl<B> PinnedDrop for CountedBody<B> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(call) = this.project().call.take() {
                call.finish(tonic::Code::Cancelled);
            }
        }
    }
}

impl<B: Body> Body for CountedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame
                    .trailers_ref()
                    .and_then(|t| t.get("grpc-status"))
                    .and_then(parse_code)
                {
                    if let Some(call) = this.call.take() {
                        call.finish(code);
                    }
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(call) = this.call.take() {
                    call.finish(tonic::Code::Internal);
                }
            }
            Poll::Ready(None) => {
                if let Some(call) = this.call.take() {
                    call.finish(tonic::Code::Unknown);
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
