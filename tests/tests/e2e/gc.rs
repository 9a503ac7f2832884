//! Garbage collection: sweeps what no tag references, never what a push holds.

use bytes::Bytes;
use snapreg_client::chunker::ChunkerConfig;
use snapreg_client::push::new_manifest;
use snapreg_client::remote::Remote;
use snapreg_proto::manifest::{Extent, File, Layer, LayerKind};
use snapreg_proto::{codec, Digest};

use crate::support::*;

#[test]
fn gc_sweeps_unreferenced_and_keeps_shared_chunks() {
    let t = tempfile::tempdir().unwrap();
    let reg = Registry::start(&t.path().join("reg"));
    let (a, b) = (t.path().join("a"), t.path().join("b"));
    for d in [&a, &b] {
        std::fs::create_dir_all(d).unwrap();
        std::fs::write(d.join("shared"), noise(20, 3 << 20)).unwrap();
    }
    std::fs::write(a.join("only-a"), noise(21, 3 << 20)).unwrap();
    std::fs::write(b.join("only-b"), noise(22, 3 << 20)).unwrap();
    snapctl(&reg.url, &["push", a.to_str().unwrap(), "t/gc:a"]).ok();
    snapctl(&reg.url, &["push", b.to_str().unwrap(), "t/gc:b"]).ok();
    let before = stored_chunk_bytes(&reg.store());

    // Within the grace period nothing goes.
    let kept = snapctl(&reg.url, &["gc"]).ok().json();
    assert_eq!(kept["chunks_swept"], 0, "{kept}");

    snapctl(&reg.url, &["rm", "t/gc:a"]).ok();
    let swept = snapctl(&reg.url, &["gc", "--grace", "0s"]).ok().json();
    assert!(swept["chunks_swept"].as_u64().unwrap() >= 1, "{swept}");
    assert_eq!(swept["manifests_swept"], 1);
    let after = stored_chunk_bytes(&reg.store());
    assert!(
        before - after >= 3 << 20,
        "only {} bytes freed",
        before - after
    );
    let dst = t.path().join("dst");
    snapctl(&reg.url, &["pull", "t/gc:b", dst.to_str().unwrap()]).ok();
    assert_trees_equal(&b, &dst);
}

#[test]
fn gc_never_sweeps_what_an_in_flight_push_holds() {
    let t = tempfile::tempdir().unwrap();
    let reg = Registry::start(&t.path().join("reg"));
    let old = t.path().join("old");
    std::fs::create_dir_all(&old).unwrap();
    let old_bytes = noise(30, 100_000); // below the chunker's minimum: one chunk
    std::fs::write(old.join("f"), &old_bytes).unwrap();
    snapctl(&reg.url, &["push", old.to_str().unwrap(), "t/old:v1"]).ok();
    snapctl(&reg.url, &["rm", "t/old:v1"]).ok();
    // old's chunk is now unreferenced: GC would take it...

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let remote = Remote::connect(&reg.url).await.unwrap();
        let lease = remote.begin_push("t/new").await.unwrap();
        let new_bytes = noise(31, 100_000);
        let (old_d, new_d) = (Digest::of(&old_bytes), Digest::of(&new_bytes));
        // ...but this push is told it exists, and uploads a new one.
        let missing = remote.find_missing(&lease, &[old_d, new_d]).await.unwrap();
        assert_eq!(
            missing,
            vec![new_d],
            "the old chunk should be reported present"
        );
        remote
            .put_chunks(
                &lease,
                futures::stream::iter(vec![(new_d, codec::encode(&new_bytes))]),
            )
            .await
            .unwrap();

        let gc = remote
            .collect_garbage(Some(std::time::Duration::ZERO), false)
            .await
            .unwrap();
        assert_eq!(gc.chunks_swept, 0, "{gc:?}");
        assert!(gc.chunks_kept_leased >= 2, "{gc:?}");

        let file = |name: &str, d: Digest, n: usize| File {
            path: name.into(),
            size: n as u64,
            mode: 0o644,
            extents: vec![Extent::Chunk {
                chunk: d,
                len: n as u64,
            }],
        };
        let layer = Layer {
            kind: LayerKind::Extra,
            name: None,
            rank: None,
            files: vec![
                file("old", old_d, old_bytes.len()),
                file("new", new_d, new_bytes.len()),
            ],
        };
        let manifest = new_manifest(&ChunkerConfig::default(), vec![layer], false);
        remote
            .put_manifest(
                "t/new",
                &lease,
                Bytes::from(manifest.encode()),
                vec!["v1".into()],
            )
            .await
            .unwrap();
    });
    let dst = t.path().join("dst");
    snapctl(&reg.url, &["pull", "t/new:v1", dst.to_str().unwrap()]).ok();
    assert_eq!(std::fs::read(dst.join("old")).unwrap(), old_bytes);
}
