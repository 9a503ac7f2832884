//! Running it in production: the Prometheus metrics of a real registry and a real
//! node agent move by exactly what a push and a pull moved; both answer the
//! standard gRPC health check; and a SIGTERM drains the registry: a push that began
//! before the signal commits (its tag is there after a restart, exit status 0),
//! while a push begun after it is refused with an error that says what to do.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::support::*;

/// `GET path` on a plain HTTP/1.1 endpoint: (status code, body).
fn http_get(addr: &str, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let code = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (code, body.to_string())
}

/// Every sample of a scrape: `name{labels}` → value (labels as the text shows them).
fn scrape(addr: &str) -> BTreeMap<String, f64> {
    let (code, body) = http_get(addr, "/metrics");
    assert_eq!(code, 200, "{body}");
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').unwrap();
            (k.to_string(), v.parse().unwrap())
        })
        .collect()
}

fn sample(m: &BTreeMap<String, f64>, key: &str) -> u64 {
    m.get(key).copied().unwrap_or(0.0) as u64
}

fn grpc_health(url: &str, service: &str) -> i32 {
    block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(url.to_string())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut c = tonic_health::pb::health_client::HealthClient::new(channel);
        c.check(tonic_health::pb::HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
    })
}

const SERVING: i32 = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;

fn source_tree(dir: &Path, seed: u64, mib: usize) {
    write(dir, "pages.img", &noise(seed, mib << 20));
    write(dir, "core.img", &noise(seed + 1, 64 << 10));
}

#[test]
fn metrics_move_by_exactly_what_was_transferred() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start_with(
        &tmp.path().join("reg"),
        &["--metrics-listen", "127.0.0.1:0"],
    );
    let metrics = reg
        .metrics
        .clone()
        .expect("the registry printed its metrics address");
    // 503 until the index is open and the first store probe answered (seen on a busy
    // CI machine right after start): ready within a bound.
    assert!(
        wait_for(Duration::from_secs(20), || {
            (http_get(&metrics, "/readyz").0 == 200).then_some(())
        })
        .is_some(),
        "/readyz never answered 200"
    );
    assert_eq!(grpc_health(&reg.url, ""), SERVING);
    assert_eq!(grpc_health(&reg.url, "snapreg.v1.Registry"), SERVING);
    let src = tmp.path().join("src");
    source_tree(&src, 7, 8);

    let pushed = snapctl(&reg.url, &["push", src.to_str().unwrap(), "ops/app:v1"])
        .ok()
        .json();
    let m = scrape(&metrics);
    let (chunks, bytes) = (
        pushed["chunks_transferred"].as_u64().unwrap(),
        pushed["bytes_transferred"].as_u64().unwrap(),
    );
    assert!(chunks > 0);
    assert_eq!(
        sample(&m, "snapreg_chunks_received_total"),
        chunks,
        "{pushed}"
    );
    assert_eq!(
        sample(&m, "snapreg_chunks_received_bytes_total"),
        bytes,
        "{pushed}"
    );
    assert_eq!(
        sample(&m, r#"snapreg_push_chunks_total{result="stored"}"#),
        chunks
    );
    let put_manifest_ok = r#"snapreg_rpc_requests_total{service="snapreg.v1.Registry",method="PutManifest",code="OK"}"#;
    assert_eq!(sample(&m, put_manifest_ok), 1);

    // The same bytes again: every chunk deduplicated, nothing received.
    let again = snapctl(&reg.url, &["push", src.to_str().unwrap(), "ops/app:v2"])
        .ok()
        .json();
    let m = scrape(&metrics);
    assert_eq!(again["chunks_transferred"], 0, "{again}");
    assert_eq!(sample(&m, "snapreg_chunks_received_total"), chunks);
    let distinct = again["chunks_total"].as_u64().unwrap();
    assert_eq!(
        sample(&m, r#"snapreg_push_chunks_total{result="deduplicated"}"#),
        distinct
    );

    // A node agent on the cache the pull uses counts what the pull fetched.
    let cache = tmp.path().join("cache");
    let mut agent = MetricsAgent::start(&reg.url, &cache);
    let pulled = snapctl_cached(
        &reg.url,
        &cache,
        &[
            "pull",
            "ops/app:v1",
            tmp.path().join("out").to_str().unwrap(),
        ],
    )
    .ok()
    .json();
    assert_trees_equal(&src, &tmp.path().join("out"));
    let m = scrape(&metrics);
    let (fetched, fetched_bytes) = (
        pulled["chunks_transferred"].as_u64().unwrap(),
        pulled["bytes_transferred"].as_u64().unwrap(),
    );
    assert_eq!(sample(&m, "snapreg_chunks_sent_total"), fetched, "{pulled}");
    assert_eq!(
        sample(&m, "snapreg_chunks_sent_bytes_total"),
        fetched_bytes,
        "{pulled}"
    );

    let n = scrape(&agent.metrics);
    assert_eq!(
        sample(&n, r#"snapreg_node_fetched_bytes_total{path="registry"}"#),
        fetched_bytes
    );
    assert_eq!(
        sample(&n, r#"snapreg_node_fetched_chunks_total{path="registry"}"#),
        fetched
    );
    assert_eq!(
        sample(
            &n,
            r#"snapreg_node_operations_total{operation="pull",outcome="ok"}"#
        ),
        1
    );
    assert_eq!(grpc_health(&agent.url, "snapreg.v1.NodeAgent"), SERVING);

    // Prefetch reads through the node cache: all misses, then all hits.
    let cached = |args: &[&str]| snapctl_cached(&reg.url, &cache, args).ok().json();
    let warmed = cached(&["prefetch", "ops/app:v1"]);
    let n = scrape(&agent.metrics);
    assert_eq!(
        sample(&n, "snapreg_node_cache_misses_total"),
        distinct,
        "{warmed}"
    );
    assert_eq!(sample(&n, "snapreg_node_cache_hits_total"), 0);
    let sent = sample(&scrape(&metrics), "snapreg_chunks_sent_total");
    assert_eq!(sent, fetched + distinct);
    cached(&["prefetch", "ops/app:v1"]);
    let n = scrape(&agent.metrics);
    assert_eq!(sample(&n, "snapreg_node_cache_hits_total"), distinct);
    assert_eq!(sample(&n, "snapreg_node_cache_misses_total"), distinct);
    let prefetches = r#"snapreg_node_operations_total{operation="prefetch",outcome="ok"}"#;
    assert_eq!(sample(&n, prefetches), 2);
    let sent_after = sample(&scrape(&metrics), "snapreg_chunks_sent_total");
    assert_eq!(sent_after, sent, "the second prefetch fetched nothing");
    agent.stop();
}

#[test]
fn sigterm_lets_an_open_push_commit_and_refuses_new_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("reg");
    let mut reg = Registry::start_with(
        &data,
        &["--metrics-listen", "127.0.0.1:0", "--drain-grace", "60s"],
    );
    let metrics = reg.metrics.clone().unwrap();
    let big = tmp.path().join("big");
    source_tree(&big, 11, 160);

    // A push that has begun (its lease taken) and is held still by SIGSTOP.
    let first = spawn_push(&reg.url, &big, "ops/drain:first");
    let begun =
        r#"snapreg_rpc_requests_total{service="snapreg.v1.Registry",method="BeginPush",code="OK"}"#;
    wait_for(Duration::from_secs(60), || {
        (sample(&scrape(&metrics), begun) == 1).then_some(())
    })
    .expect("the push began");
    signal(first.id(), libc::SIGSTOP);
    let committed = r#"snapreg_rpc_requests_total{service="snapreg.v1.Registry",method="PutManifest",code="OK"}"#;
    assert_eq!(
        sample(&scrape(&metrics), committed),
        0,
        "the push finished before it could be held; use a bigger tree"
    );

    reg.signal_term();
    wait_for(Duration::from_secs(10), || {
        (http_get(&metrics, "/readyz").0 == 503).then_some(())
    })
    .expect("draining: not ready");
    let small = tmp.path().join("small");
    source_tree(&small, 12, 1);
    let refused = snapctl(
        &reg.url,
        &["push", small.to_str().unwrap(), "ops/drain:late"],
    );
    assert_ne!(refused.code, 0, "a push begun while draining was accepted");
    assert!(
        refused.stderr.contains("shutting down") && refused.stderr.contains("push again"),
        "{}",
        refused.stderr
    );
    assert!(
        reg.wait_exit(Duration::from_millis(500)).is_none(),
        "stopped with a push open"
    );

    signal(first.id(), libc::SIGCONT);
    let out = first.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = reg
        .wait_exit(Duration::from_secs(30))
        .expect("the registry stopped once the push committed");
    assert!(status.success(), "exit status {status}");

    let reg = Registry::start(&data);
    let tags = list_tags(&reg.url, "ops/drain");
    let names: Vec<_> = tags.iter().map(|t| t.0.as_str()).collect();
    assert_eq!(
        names,
        ["first"],
        "the open push committed; the late one did not"
    );
}

fn spawn_push(url: &str, src: &Path, reference: &str) -> Child {
    Command::new(bin("snapctl"))
        .args(["--registry", url, "--json", "push"])
        .arg(src)
        .arg(reference)
        .env_remove("SNAPCTL_REGISTRY")
        .env_remove("SNAPCTL_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill takes plain integers; the PID is a process this test started.
    unsafe { libc::kill(pid as i32, sig) };
}

/// A `snapctl agent` with `--metrics-listen`, killed by PID and reaped on drop.
struct MetricsAgent {
    child: Child,
    url: String,
    metrics: String,
}

impl MetricsAgent {
    fn start(registry: &str, cache: &Path) -> MetricsAgent {
        let mut child = Command::new(bin("snapctl"))
            .args(["--registry", registry, "--cache"])
            .arg(cache)
            .args(["agent", "--listen", "127.0.0.1:0", "--name", "metrics-node"])
            .args(["--metrics-listen", "127.0.0.1:0"])
            .env_remove("SNAPCTL_REGISTRY")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let v = first_json_line(&mut child, "snapctl agent");
        MetricsAgent {
            url: format!("http://{}", v["listen"].as_str().unwrap()),
            metrics: v["metrics"].as_str().expect("metrics address").to_string(),
            child,
        }
    }

    fn stop(&mut self) {
        signal(self.child.id(), libc::SIGTERM);
        let stopped = wait_for(Duration::from_secs(10), || {
            self.child.try_wait().ok().flatten()
        });
        assert!(
            stopped.is_some_and(|s| s.success()),
            "agent exit: {stopped:?}"
        );
    }
}

impl Drop for MetricsAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
