//! The scheduler API against a real registry: `Resolve` filters out snapshots a node
//! cannot restore (the rules pull-restore applies) and ranks the rest newest first with
//! their sizes and cached bytes; `Watch` streams commits in order and resumes from a
//! sequence after the registry restarts.

use std::time::Duration;

use futures::{Stream, StreamExt};
use snapreg_proto::manifest::Manifest;
use snapreg_proto::pb::{self, registry_client::RegistryClient, watch_event::Kind};

use crate::support::*;

/// gRPC status codes (the tests crate does not depend on tonic directly).
const NOT_FOUND: i32 = 5;
const INVALID_ARGUMENT: i32 = 3;

/// `Resolve`, or the failure's (code, message).
fn try_resolve(url: &str, req: pb::ResolveRequest) -> Result<pb::ResolveResponse, (i32, String)> {
    block_on(async {
        RegistryClient::connect(url.to_string())
            .await
            .unwrap_or_else(|e| panic!("connecting to {url}: {e}"))
            .resolve(req)
            .await
            .map(|r| r.into_inner())
            .map_err(|s| (i32::from(s.code()), s.to_string()))
    })
}

/// This host's facts, as `snapctl host` (and every push's manifest) records them.
fn host_facts() -> pb::NodeFacts {
    let f = snapreg_client::host::facts();
    pb::NodeFacts {
        arch: f.arch,
        cpu_features: f.cpu_features,
        kernel: f.kernel,
        criu_version: f.criu_version,
        container_image: f.container_image,
        gpu: None,
        labels: f.labels.into_iter().collect(),
    }
}

fn resolve(url: &str, req: pb::ResolveRequest) -> pb::ResolveResponse {
    try_resolve(url, req).unwrap_or_else(|e| panic!("Resolve: {e:?}"))
}

#[test]
fn resolve_filters_incompatible_snapshots_and_ranks_the_rest() {
    let t = tempfile::tempdir().unwrap();
    let reg = Registry::start(&t.path().join("reg"));
    let src = t.path().join("src");
    write(&src, "pages-1.img", &noise(21, 3 << 20));
    write(&src, "core.img", b"core\n");
    write(&src, "zeros", &vec![0u8; 1 << 20]);
    let d1 = push(&reg.url, &src, "s/app:v1");
    write(&src, "extra", &noise(22, 2 << 20));
    let d2 = push(&reg.url, &src, "s/app:v2");
    assert_ne!(d1, d2);

    let base = pb::ResolveRequest {
        repository: "s/app".into(),
        node: Some(host_facts()),
        ..Default::default()
    };

    // This host: both, newest first, with their sizes.
    let r = resolve(&reg.url, base.clone());
    assert!(r.incompatible.is_empty(), "{r:?}");
    let tags: Vec<&str> = r.compatible.iter().map(|s| s.tag.as_str()).collect();
    assert_eq!(tags, ["v2", "v1"]);
    let (v2, v1) = (&r.compatible[0], &r.compatible[1]);
    assert_eq!(
        (v1.digest.as_str(), v2.digest.as_str()),
        (d1.as_str(), d2.as_str())
    );
    assert_eq!(v1.bytes_total, (3 << 20) + 5 + (1 << 20));
    assert_eq!(v2.bytes_total, v1.bytes_total + (2 << 20));
    // Zero runs are not stored.
    assert!(
        v1.bytes_stored >= 3 << 20 && v1.bytes_stored < v1.bytes_total,
        "{v1:?}"
    );
    assert!(v2.bytes_stored > v1.bytes_stored, "{v2:?}");
    assert_eq!((v1.cached_bytes, v2.cached_bytes), (0, 0));
    assert!(v1.created_unix > 0 && v2.hlc > v1.hlc);

    // Another architecture: nothing compatible, two refusals naming "arch".
    let mut arm = base.clone();
    arm.node.as_mut().unwrap().arch = "aarch64".into();
    if std::env::consts::ARCH == "aarch64" {
        arm.node.as_mut().unwrap().arch = "x86_64".into();
    }
    let r = resolve(&reg.url, arm);
    assert!(r.compatible.is_empty(), "{r:?}");
    assert_eq!(r.incompatible.len(), 2, "{r:?}");
    for i in &r.incompatible {
        assert_eq!(i.fields, ["arch"], "{i:?}");
        assert!(i.mismatches[0].starts_with("arch: "), "{i:?}");
    }

    // A label no snapshot carries: none.
    let mut labelled = base.clone();
    labelled
        .required_labels
        .insert("model".into(), "llama".into());
    let r = resolve(&reg.url, labelled);
    assert!(r.compatible.is_empty(), "{r:?}");
    assert_eq!(r.incompatible.len(), 2);
    assert!(
        r.incompatible.iter().all(|i| i.fields == ["labels"]),
        "{r:?}"
    );

    // A node caching every chunk of v1: all of v1, part of v2.
    let m1 = block_on(async {
        let resp = RegistryClient::connect(reg.url.clone())
            .await
            .unwrap()
            .get_manifest(pb::GetManifestRequest {
                repository: "s/app".into(),
                reference: "v1".into(),
            })
            .await
            .unwrap()
            .into_inner();
        Manifest::decode(&resp.manifest).unwrap()
    });
    let mut cached = base.clone();
    cached.cached_digests = m1
        .chunk_digests()
        .iter()
        .map(|d| bytes::Bytes::copy_from_slice(&d.0))
        .collect();
    let r = resolve(&reg.url, cached);
    let (v2, v1) = (&r.compatible[0], &r.compatible[1]);
    assert_eq!(v1.tag, "v1");
    assert_eq!(v1.cached_bytes, v1.bytes_stored, "{v1:?}");
    assert_eq!(v1.chunks_cached, v1.chunks);
    assert!(
        v2.cached_bytes > 0 && v2.cached_bytes < v2.bytes_stored,
        "{v2:?}"
    );

    // A repository without tags, and a malformed digest.
    let err = try_resolve(
        &reg.url,
        pb::ResolveRequest {
            repository: "s/none".into(),
            node: Some(host_facts()),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert_eq!(err.0, NOT_FOUND, "{err:?}");
    let mut bad = base;
    bad.cached_digests = vec![bytes::Bytes::from_static(b"short")];
    let err = try_resolve(&reg.url, bad).unwrap_err();
    assert_eq!(err.0, INVALID_ARGUMENT, "{err:?}");
}

/// The next event of a Watch stream, or `None` if none comes within `wait`.
fn next_event<E: std::fmt::Debug>(
    rt: &tokio::runtime::Runtime,
    s: &mut (impl Stream<Item = Result<pb::WatchEvent, E>> + Unpin),
    wait: Duration,
) -> Option<pb::WatchEvent> {
    rt.block_on(async { tokio::time::timeout(wait, s.next()).await.ok() })
        .map(|r| r.expect("watch stream ended").expect("watch stream failed"))
}

fn open_watch(
    rt: &tokio::runtime::Runtime,
    url: &str,
    from_sequence: u64,
) -> impl Stream<Item = Result<pb::WatchEvent, impl std::fmt::Debug>> + Unpin {
    rt.block_on(async {
        RegistryClient::connect(url.to_string())
            .await
            .unwrap_or_else(|e| panic!("connecting to {url}: {e}"))
            .watch(pb::WatchRequest { from_sequence })
            .await
            .unwrap()
            .into_inner()
    })
}

#[test]
fn watch_delivers_events_in_order_and_resumes_after_a_restart() {
    const WAIT: Duration = Duration::from_secs(20);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let t = tempfile::tempdir().unwrap();
    let mut reg = Registry::start(&t.path().join("reg"));
    let src = t.path().join("src");
    let mut s = open_watch(&rt, &reg.url, 0);

    let mut digests = Vec::new();
    for (i, tag) in ["a", "b", "c"].iter().enumerate() {
        write(&src, &format!("f{i}"), &noise(30 + i as u64, 100_000));
        digests.push(push(&reg.url, &src, &format!("w/app:{tag}")));
    }
    let mut last = 0;
    for (i, tag) in ["a", "b", "c"].iter().enumerate() {
        let ev = next_event(&rt, &mut s, WAIT).expect("a push event");
        assert!(ev.sequence > last, "{ev:?} after {last}");
        last = ev.sequence;
        assert_eq!(ev.kind(), Kind::TagMoved, "{ev:?}");
        assert_eq!((ev.repository.as_str(), ev.tag.as_str()), ("w/app", *tag));
        assert_eq!(ev.digest, digests[i]);
        assert!(ev.hlc > 0);
    }

    snapctl(&reg.url, &["rm", "w/app:a"]).ok();
    let ev = next_event(&rt, &mut s, WAIT).expect("the delete event");
    assert_eq!(ev.kind(), Kind::TagDeleted, "{ev:?}");
    assert_eq!((ev.tag.as_str(), ev.digest.as_str()), ("a", ""));
    assert!(ev.sequence > last);
    last = ev.sequence;
    assert!(next_event(&rt, &mut s, Duration::from_millis(300)).is_none());

    // The registry restarts: the stream breaks, a new one resumes after `last`.
    reg.restart();
    drop(s);
    let mut s = open_watch(&rt, &reg.url, last);
    assert!(
        next_event(&rt, &mut s, Duration::from_millis(500)).is_none(),
        "nothing newer than {last} yet"
    );
    write(&src, "f9", &noise(39, 100_000));
    let d = push(&reg.url, &src, "w/app:d");
    let ev = next_event(&rt, &mut s, WAIT).expect("the push after the restart");
    assert_eq!(ev.sequence, last + 1, "{ev:?}");
    assert_eq!(
        (ev.kind(), ev.tag.as_str(), ev.digest.as_str()),
        (Kind::TagMoved, "d", d.as_str())
    );
    assert!(next_event(&rt, &mut s, Duration::from_millis(500)).is_none());

    // From 0, the whole durable history, in order.
    let mut s = open_watch(&rt, &reg.url, 0);
    let all: Vec<(u64, String)> = (0..5)
        .map(|_| next_event(&rt, &mut s, WAIT).expect("a logged event"))
        .map(|e| (e.sequence, e.tag))
        .collect();
    let seqs: Vec<u64> = all.iter().map(|(q, _)| *q).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{all:?}");
    let tags: Vec<&str> = all.iter().map(|(_, t)| t.as_str()).collect();
    assert_eq!(tags, ["a", "b", "c", "a", "d"]);
}
