//! One behaviour suite for `ChunkStore`, a function per behaviour, run against every
//! backend: the local directory always, and S3 through s3s-fs when `SNAPREG_S3S_FS`
//! names its binary (scripts/test.sh installs it and exports the variable).
//!
//! ChunkStore stores objects as given: verification against the digest happens above
//! it (the registry decodes every upload, readers decode every download; see
//! registry.rs `put_chunk` and its tests). What the suite checks is what every backend
//! must agree on: round trips, idempotent re-puts, missing-object errors that name the
//! digest, listings, deletes that tolerate absence, tag-record ordering and the
//! layout-version check.

use std::future::Future;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::TryStreamExt;
use snapreg_proto::tags::{Hlc, TagRecord, TagTarget};
use snapreg_proto::{codec, layout, Digest};
use snapreg_registry::chunk_store::ChunkStore;
use snapreg_registry::RegistryError;

/// A chunk object (codec-encoded) and its digest.
fn chunk(seed: u8, len: usize) -> (Digest, Bytes) {
    let data: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect();
    (Digest::of(&data), codec::encode(&data))
}

fn record(hlc: u64, target: &[u8]) -> TagRecord {
    TagRecord {
        hlc: Hlc(hlc << 16),
        target: TagTarget::Manifest(Digest::of(target)),
    }
}

async fn chunk_round_trip(store: ChunkStore) {
    let (d, object) = chunk(1, 100_000);
    assert_eq!(store.chunk_size(&d).await.unwrap(), None);
    store.put_chunk(&d, object.clone()).await.unwrap();
    let got = store.get_chunk(&d).await.unwrap();
    assert_eq!(got, object, "get returns the stored object byte for byte");
    assert_eq!(
        codec::decode(&d, &got).unwrap().len(),
        100_000,
        "the object decodes to its digest"
    );
    assert_eq!(
        store.chunk_size(&d).await.unwrap(),
        Some(object.len() as u64)
    );
}

async fn chunk_put_is_idempotent(store: ChunkStore) {
    let (d, object) = chunk(2, 5000);
    store.put_chunk(&d, object.clone()).await.unwrap();
    // A second writer of the same digest writes the same bytes: harmless.
    store.put_chunk(&d, object.clone()).await.unwrap();
    assert_eq!(store.get_chunk(&d).await.unwrap(), object);
    assert_eq!(store.list(layout::CHUNKS).await.unwrap().len(), 1);
}

async fn missing_chunk_names_its_digest(store: ChunkStore) {
    let (d, _) = chunk(3, 10);
    match store.get_chunk(&d).await {
        Err(RegistryError::ChunkMissing { digest }) => assert_eq!(digest, d),
        other => panic!("expected ChunkMissing {{ {d} }}, got {other:?}"),
    }
}

async fn stored_bytes_are_verifiable(store: ChunkStore) {
    // What is read back is what was written, so a reader's decode catches a store
    // that returns other bytes under a digest.
    let (d, object) = chunk(4, 4096);
    let (_, other) = chunk(5, 4096);
    store.put_chunk(&d, other).await.unwrap();
    let got = store.get_chunk(&d).await.unwrap();
    assert_ne!(got, object);
    assert!(
        codec::decode(&d, &got).is_err(),
        "a wrong object must not verify"
    );
}

async fn chunk_delete_tolerates_absence(store: ChunkStore) {
    let (d, object) = chunk(6, 1000);
    store.put_chunk(&d, object).await.unwrap();
    store.delete_chunk(&d).await.unwrap();
    assert_eq!(store.chunk_size(&d).await.unwrap(), None);
    assert!(matches!(
        store.get_chunk(&d).await,
        Err(RegistryError::ChunkMissing { .. })
    ));
    store.delete_chunk(&d).await.unwrap();
}

async fn listing_finds_every_chunk(store: ChunkStore) {
    let mut want: Vec<Digest> = Vec::new();
    for seed in 10..15 {
        let (d, object) = chunk(seed, 300);
        store.put_chunk(&d, object).await.unwrap();
        want.push(d);
    }
    want.sort_by_key(|d| d.to_hex());
    let parse = |metas: Vec<object_store::ObjectMeta>| {
        let mut got: Vec<Digest> = metas
            .iter()
            .map(|m| layout::parse_chunk_path(m.location.as_ref()).unwrap())
            .collect();
        got.sort_by_key(|d| d.to_hex());
        got
    };
    assert_eq!(parse(store.list(layout::CHUNKS).await.unwrap()), want);
    let streamed: Vec<_> = store
        .list_stream(layout::CHUNKS)
        .try_collect()
        .await
        .unwrap();
    assert_eq!(parse(streamed), want);
    assert!(store.list(layout::MANIFESTS).await.unwrap().is_empty());
}

async fn manifest_round_trip_and_delete(store: ChunkStore) {
    let bytes = Bytes::from_static(b"{\"not\": \"parsed here\"}");
    let d = Digest::of(&bytes);
    assert!(matches!(
        store.get_manifest(&d).await,
        Err(RegistryError::ManifestNotFound { digest }) if digest == d
    ));
    store.put_manifest(&d, bytes.clone()).await.unwrap();
    assert_eq!(store.get_manifest(&d).await.unwrap(), bytes);
    assert_eq!(
        store.manifest_size(&d).await.unwrap(),
        Some(bytes.len() as u64)
    );
    store.delete_manifest(&d).await.unwrap();
    assert_eq!(store.manifest_size(&d).await.unwrap(), None);
    store.delete_manifest(&d).await.unwrap();
}

async fn tag_records_list_in_order(store: ChunkStore) {
    let (a1, a2, a3) = (record(1, b"a1"), record(2, b"a2"), record(3, b"a3"));
    for r in [&a2, &a1, &a3] {
        store.put_tag_record("team/app", "v1", r).await.unwrap();
    }
    store
        .put_tag_record("team/other", "v1", &record(4, b"o"))
        .await
        .unwrap();
    let all = store.tag_records("").await.unwrap();
    assert_eq!(all.len(), 4, "{all:?}");
    let team_app = store.tag_records("team/app").await.unwrap();
    assert_eq!(team_app.len(), 3, "{team_app:?}");
    // Listing order is the backend's; the records' own order is what counts.
    let mut after = store
        .tag_records_after("team/app", "v1", Some(&a1))
        .await
        .unwrap();
    after.sort();
    assert_eq!(after, vec![a2.clone(), a3.clone()]);
    let mut every = store
        .tag_records_after("team/app", "v1", None)
        .await
        .unwrap();
    every.sort();
    assert_eq!(every, vec![a1, a2, a3]);
}

async fn raw_objects_round_trip(store: ChunkStore) {
    assert_eq!(store.get_raw("leases/x/push-1").await.unwrap(), None);
    store
        .put_raw("leases/x/push-1", Bytes::from_static(b"123"))
        .await
        .unwrap();
    assert_eq!(
        store.get_raw("leases/x/push-1").await.unwrap().as_deref(),
        Some(&b"123"[..])
    );
    store.delete_raw("leases/x/push-1").await.unwrap();
    store.delete_raw("leases/x/push-1").await.unwrap();
    assert_eq!(store.get_raw("leases/x/push-1").await.unwrap(), None);
}

async fn layout_version_is_written_then_checked(store: ChunkStore) {
    store.check_layout().await.unwrap();
    store.check_layout().await.unwrap();
    store
        .put_raw(
            layout::LAYOUT_OBJECT,
            Bytes::from_static(b"{\"layout_version\": 999}"),
        )
        .await
        .unwrap();
    match store.check_layout().await {
        Err(RegistryError::LayoutVersion { found, .. }) => assert!(found.contains("999")),
        other => panic!("expected LayoutVersion, got {other:?}"),
    }
}

/// Runs every behaviour, each on a fresh store from `fresh(name)`.
async fn suite<F, Fut>(fresh: F)
where
    F: Fn(&'static str) -> Fut,
    Fut: Future<Output = ChunkStore>,
{
    chunk_round_trip(fresh("round-trip").await).await;
    chunk_put_is_idempotent(fresh("idempotent").await).await;
    missing_chunk_names_its_digest(fresh("missing").await).await;
    stored_bytes_are_verifiable(fresh("verifiable").await).await;
    chunk_delete_tolerates_absence(fresh("delete").await).await;
    listing_finds_every_chunk(fresh("listing").await).await;
    manifest_round_trip_and_delete(fresh("manifest").await).await;
    tag_records_list_in_order(fresh("tags").await).await;
    raw_objects_round_trip(fresh("raw").await).await;
    layout_version_is_written_then_checked(fresh("layout").await).await;
}

#[tokio::test]
async fn local_store_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    suite(|name| {
        let url = format!("file://{}", root.join(name).display());
        async move { ChunkStore::open(Some(&url), PathBuf::new()).unwrap() }
    })
    .await;
    // Only S3 presigns: the local store says so instead of failing.
    let store = ChunkStore::open(None, root.join("default")).unwrap();
    let (d, _) = chunk(1, 1);
    assert_eq!(
        store
            .chunk_urls(&[d], Duration::from_secs(60))
            .await
            .unwrap(),
        None
    );
}

/// s3s-fs on a free loopback port, killed on drop.
struct S3sFs {
    child: Child,
    endpoint: String,
}

const ACCESS_KEY: &str = "snapreg-test";
const SECRET_KEY: &str = "snapreg-test-secret";
const BUCKET: &str = "snaps";

impl S3sFs {
    fn start(exe: &Path, root: &Path) -> S3sFs {
        // s3s-fs keeps a bucket as a directory under its root.
        std::fs::create_dir_all(root.join(BUCKET)).unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(exe)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(root)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", exe.display()));
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "s3s-fs did not start listening on port {port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        S3sFs {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        }
    }

    fn store(&self, prefix: &str) -> ChunkStore {
        let s3 = object_store::aws::AmazonS3Builder::new()
            .with_endpoint(&self.endpoint)
            .with_allow_http(true)
            .with_access_key_id(ACCESS_KEY)
            .with_secret_access_key(SECRET_KEY)
            .with_region("us-east-1")
            .with_bucket_name(BUCKET);
        ChunkStore::s3(s3, prefix).unwrap()
    }
}

impl Drop for S3sFs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn s3_store_conforms() {
    let Some(exe) = std::env::var_os("SNAPREG_S3S_FS") else {
        println!(
            "skipping the S3 run of the ChunkStore suite: SNAPREG_S3S_FS is not set \
             (scripts/test.sh installs s3s-fs and exports it)"
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let server = S3sFs::start(Path::new(&exe), dir.path());
    suite(|name| std::future::ready(server.store(name))).await;
    // S3 presigns GET URLs for chunks, one per digest, in the order asked.
    let store = server.store("urls");
    let (a, b) = (chunk(1, 10).0, chunk(2, 10).0);
    let urls = store
        .chunk_urls(&[a, b], Duration::from_secs(60))
        .await
        .unwrap()
        .expect("S3 presigns");
    assert_eq!(urls.len(), 2);
    assert!(
        urls[0].contains(&a.to_hex()) && urls[1].contains(&b.to_hex()),
        "{urls:?}"
    );
}
