//! The registry on a real S3-compatible server (s3s-fs on loopback, authentication
//! on; or an external one such as the Garage cluster of bench/s3/garage.sh, see
//! support.rs `S3Server`): the conformance behaviours (push, pull, pull-restore, GC), several instances
//! on one bucket, the index rebuilt from the bucket, and the direct data path
//! (presigned chunk URLs).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::*;

/// `snapreg ARGS` with the S3 server's variables; (exit code, stdout, stderr).
fn snapreg(s3: &S3Server, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin("snapreg"))
        .args(args)
        .envs(s3.env())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let out = Out::from(out);
    (out.code, out.stdout, out.stderr)
}

fn tree(dir: &Path, seed: u64, files: usize, mib: usize) {
    for i in 0..files {
        write(dir, &format!("f{i}"), &noise(seed + i as u64, mib << 20));
    }
    write(
        dir,
        "small/meta.json",
        format!("{{\"seed\":{seed}}}").as_bytes(),
    );
}

#[test]
fn s3_push_pull_direct_and_through_the_registry_then_gc() {
    let t = tempfile::tempdir().unwrap();
    let s3 = S3Server::start(&t.path().join("s3"));
    let store = s3.store_url("region1");
    let reg = s3.registry(&t.path().join("reg"), &store, &[]);
    let (a, b) = (t.path().join("a"), t.path().join("b"));
    tree(&a, 1, 2, 3);
    tree(&b, 1, 1, 3); // shares f0 with a
    write(&b, "only-b", &noise(50, 2 << 20));
    push(&reg.url, &a, "t/s3:a");
    push(&reg.url, &b, "t/s3:b");
    // Objects land under the URL's prefix, in the bucket.
    assert!(
        !s3.chunk_keys(&store).is_empty(),
        "no chunk objects under {store}"
    );
    assert!(s3.exists(&store, "snapreg-layout.json"));

    // Direct: every chunk from a presigned URL, verified, byte-identical.
    let direct = t.path().join("direct");
    let d = snapctl(&reg.url, &["pull", "t/s3:a", direct.to_str().unwrap()])
        .ok()
        .json();
    assert_trees_equal(&a, &direct);
    assert!(d["chunks_transferred"].as_u64().unwrap() > 0, "{d}");
    assert_eq!(d["chunks_direct"], d["chunks_transferred"], "{d}");
    // Through the registry: same bytes, no URLs.
    let via = t.path().join("via");
    let v = snapctl(
        &reg.url,
        &["--no-direct", "pull", "t/s3:a", via.to_str().unwrap()],
    )
    .ok()
    .json();
    assert_trees_equal(&a, &via);
    assert_eq!(v["chunks_direct"], 0, "{v}");
    assert_eq!(v["chunks_transferred"], d["chunks_transferred"]);

    // GC: within the grace period nothing goes; past it, what only a held.
    let before = s3.chunk_keys(&store).len();
    let kept = snapctl(&reg.url, &["gc"]).ok().json();
    assert_eq!(kept["chunks_swept"], 0, "{kept}");
    snapctl(&reg.url, &["rm", "t/s3:a"]).ok();
    let swept = snapctl(&reg.url, &["gc", "--grace", "0s"]).ok().json();
    // a's own f1 (3 MiB of noise) goes; f0, shared with b, stays.
    assert!(swept["bytes_swept"].as_u64().unwrap() >= 3 << 20, "{swept}");
    assert!(swept["bytes_swept"].as_u64().unwrap() < 4 << 20, "{swept}");
    assert_eq!(swept["manifests_swept"], 1, "{swept}");
    let n = swept["chunks_swept"].as_u64().unwrap() as usize;
    assert_eq!(s3.chunk_keys(&store).len(), before - n);
    let after = t.path().join("after");
    snapctl(&reg.url, &["pull", "t/s3:b", after.to_str().unwrap()]).ok();
    assert_trees_equal(&b, &after);
    let gone = snapctl(
        &reg.url,
        &["pull", "t/s3:a", t.path().join("x").to_str().unwrap()],
    );
    assert_eq!(gone.code, 3, "{}", gone.stderr);
}

#[test]
fn s3_checkpoint_and_pull_restore_fetch_chunks_by_url() {
    let _lock = criu_lock();
    let t = tempfile::tempdir().unwrap();
    let s3 = S3Server::start(&t.path().join("s3"));
    let reg = s3.registry(&t.path().join("reg"), &s3.store_url("ck"), &[]);
    let mut p = TestProc::hold(&t.path().join("proc"), 32, 17, 1, 8);
    let pid = p.pid();
    snapctl(
        &reg.url,
        &["checkpoint", "--pid", &pid.to_string(), "t/s3ck:v1"],
    )
    .ok();
    let _ = p.child.wait();
    let at_checkpoint = p.counter();
    let cache = t.path().join("cache");
    let r = snapctl_cached(&reg.url, &cache, &["pull-restore", "--detach", "t/s3ck:v1"])
        .ok()
        .json();
    let _restored = Restored(pid);
    assert_eq!(r["pid"], pid);
    let direct = format!("{} (direct)", reg.url);
    assert_eq!(
        r["chunks_by_registry"][&direct], r["chunks_transferred"],
        "every chunk should come by URL: {r}"
    );
    assert!(r["chunks_transferred"].as_u64().unwrap() > 0, "{r}");
    p.wait_counter_above(at_checkpoint + 3);
    assert!(
        p.verify(pid).starts_with("ok"),
        "memory differs after restore"
    );
}

#[test]
fn s3_corrupt_object_fetched_by_url_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let s3 = S3Server::start(&t.path().join("s3"));
    let store = s3.store_url("c");
    let reg = s3.registry(&t.path().join("reg"), &store, &[]);
    let src = t.path().join("src");
    write(&src, "f", &noise(7, 100_000)); // one chunk
    push(&reg.url, &src, "t/bad:v1");
    let objects = s3.chunk_keys(&store);
    assert_eq!(objects.len(), 1);
    s3.corrupt(&objects[0]);

    let dst = t.path().join("dst");
    let out = snapctl(&reg.url, &["pull", "t/bad:v1", dst.to_str().unwrap()]);
    assert_eq!(
        out.code, 5,
        "a corrupt chunk must be refused: {}",
        out.stderr
    );
    assert!(out.stderr.contains("corrupt"), "{}", out.stderr);
    assert!(
        !dst.join("f").exists(),
        "a file with bad bytes was put in place"
    );
}

#[test]
fn s3_two_instances_one_bucket_kill9_mid_push_reindex() {
    let t = tempfile::tempdir().unwrap();
    let s3 = S3Server::start(&t.path().join("s3"));
    let store = &s3.store_url("shared");
    // Short leases: the killed instance's push lease stops holding off GC soon.
    let ttl = ["--lease-ttl", "5s"];
    let mut a = s3.registry(&t.path().join("a"), store, &ttl);
    let mut b = s3.registry(&t.path().join("b"), store, &ttl);

    // A dies (SIGKILL) partway through a push.
    let big = t.path().join("big");
    tree(&big, 100, 8, 8);
    let mut pushing = Command::new(bin("snapctl"))
        .args([
            "--registry",
            &a.url,
            "--json",
            "push",
            big.to_str().unwrap(),
            "t/big:v1",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(Duration::from_secs(60), || {
        (s3.chunk_keys(store).len() >= 10).then_some(())
    })
    .expect("the push through A stored nothing");
    a.kill9();
    let status = pushing.wait().unwrap();
    assert!(
        !status.success(),
        "the push through a killed registry succeeded"
    );
    let stored_by_a = s3.chunk_keys(store).len();

    // The killed instance's push lease holds off GC on B until it expires.
    let refused = snapctl(&b.url, &["gc", "--grace", "0s"]);
    assert_ne!(
        refused.code, 0,
        "GC ran while another instance held a push lease"
    );
    assert!(refused.stderr.contains("push lease"), "{}", refused.stderr);
    assert!(
        stored_by_a < 120,
        "A stored (nearly) every chunk before the kill ({stored_by_a})"
    );

    // B never saw those chunks, but finds them in the bucket: only the rest is sent.
    let done = snapctl(&b.url, &["push", big.to_str().unwrap(), "t/big:v1"])
        .ok()
        .json();
    let total = done["chunks_total"].as_u64().unwrap();
    assert_eq!(
        done["chunks_transferred"].as_u64().unwrap(),
        total - stored_by_a as u64,
        "B re-sent chunks A had stored: {done}"
    );
    let got = t.path().join("got");
    snapctl(&b.url, &["pull", "t/big:v1", got.to_str().unwrap()]).ok();
    assert_trees_equal(&big, &got);

    // B has now seen everything in the bucket: its index equals one rebuilt from it.
    b.kill9();
    let (before, after) = reindexed(&s3, &b.data, store);
    assert!(before.len() > 100, "{before:?}");
    assert_eq!(before, after, "the rebuilt index differs");
    b.restart();

    // A comes back with an index that knows nothing of B's work, and serves it.
    a.restart();
    let small = t.path().join("small");
    tree(&small, 200, 1, 2);
    let small_digest = push(&b.url, &small, "t/small:v1");
    let via_a = t.path().join("via-a");
    snapctl(&a.url, &["pull", "t/small:v1", via_a.to_str().unwrap()]).ok();
    assert_trees_equal(&small, &via_a);
    let by_digest = t.path().join("by-digest");
    let pinned = format!("t/small@{small_digest}");
    snapctl(&a.url, &["pull", &pinned, by_digest.to_str().unwrap()]).ok();
    assert_trees_equal(&small, &by_digest);
    assert_eq!(list_tags(&a.url, "t/big").len(), 1);

    // GC on B, once A's old lease has expired, sweeps what A's index still lists;
    // A's next push re-sends it.
    snapctl(&b.url, &["rm", "t/small:v1"]).ok();
    let gone = snapctl(&a.url, &["inspect", "t/small:v1"]);
    assert_eq!(
        gone.code, 3,
        "A still serves a tag B deleted: {}",
        gone.stdout
    );
    let swept = wait_for(Duration::from_secs(30), || {
        let out = snapctl(&b.url, &["gc", "--grace", "0s"]);
        (out.code == 0).then(|| out.json())
    })
    .expect("GC on B never ran after A's lease expired");
    assert!(swept["chunks_swept"].as_u64().unwrap() >= 4, "{swept}");
    let again = snapctl(&a.url, &["push", small.to_str().unwrap(), "t/small:v2"])
        .ok()
        .json();
    assert_eq!(
        again["chunks_transferred"], again["chunks_total"],
        "{again}"
    );
    let v2 = t.path().join("v2");
    snapctl(&b.url, &["pull", "t/small:v2", v2.to_str().unwrap()]).ok();
    assert_trees_equal(&small, &v2);

    // Neither index claims a chunk or manifest the bucket lacks (no entry for a swept
    // chunk), though each may lack what only the other wrote. (Tag entries may lag:
    // every tag read lists the newer records first.)
    for r in [&mut a, &mut b] {
        r.kill9();
        let (before, after) = reindexed(&s3, &r.data, store);
        let stale: Vec<&String> = before
            .iter()
            .filter(|l| !l.starts_with("t/") && !after.contains(l))
            .collect();
        assert!(
            stale.is_empty(),
            "entries the store does not back: {stale:?}"
        );
    }
}

/// `snapreg dump-index` of a stopped registry's data dir, then again after
/// `snapreg reindex`: (before, after).
fn reindexed(s3: &S3Server, data: &Path, store: &str) -> (Vec<String>, Vec<String>) {
    let data = data.to_str().unwrap();
    let dump = || {
        let (code, out, err) = snapreg(s3, &["dump-index", "--data", data]);
        assert_eq!(code, 0, "{err}");
        out.lines().map(String::from).collect::<Vec<_>>()
    };
    let before = dump();
    let (code, _, err) = snapreg(s3, &["reindex", "--data", data, "--store", store]);
    assert_eq!(code, 0, "{err}");
    (before, dump())
}
