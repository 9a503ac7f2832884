//! Real processes, dumped by a real CRIU into a directory, pushed and pulled.

use crate::support::*;

#[test]
fn criu_dump_round_trips_byte_identical() {
    let _lock = criu_lock();
    let t = tempfile::tempdir().unwrap();
    let reg = Registry::start(&t.path().join("reg"));
    let mut p = TestProc::hold(&t.path().join("proc"), 64, 7, 1, 8);
    let images = t.path().join("images");
    criu_dump(&mut p, &images);

    let push = snapctl(&reg.url, &["push", images.to_str().unwrap(), "t/dump:v1"])
        .ok()
        .json();
    assert!(push["bytes_total"].as_u64().unwrap() > 64 << 20);
    assert!(
        push["zero_bytes"].as_u64().unwrap() >= 7 << 20,
        "touched zero pages should be elided: {push}"
    );
    let dst = t.path().join("pulled");
    snapctl(&reg.url, &["pull", "t/dump:v1", dst.to_str().unwrap()]).ok();
    assert_trees_equal(&images, &dst);

    let inspect = snapctl(&reg.url, &["inspect", "t/dump:v1"]).ok().json();
    assert_eq!(inspect["layers"][0]["kind"], "process");
    assert!(
        inspect["criu"]["version"]
            .as_str()
            .unwrap()
            .starts_with('4'),
        "{inspect}"
    );
    assert_eq!(
        snapctl(&reg.url, &["push", images.to_str().unwrap(), "t/dump:v2"])
            .ok()
            .json()["chunks_transferred"],
        0
    );
}

/// Two runs of the same program holding the same 1 GiB, at different addresses and
/// page-file offsets: the second push sends at most 10% of its bytes.
#[test]
fn dumps_of_two_runs_dedup() {
    let _lock = criu_lock();
    let t = tempfile::tempdir().unwrap();
    let reg = Registry::start(&t.path().join("reg"));
    let mut first = TestProc::hold(&t.path().join("p1"), 1024, 42, 3, 0);
    criu_dump(&mut first, &t.path().join("img1"));
    drop(first);
    let mut second = TestProc::hold(&t.path().join("p2"), 1024, 42, 11, 0);
    criu_dump(&mut second, &t.path().join("img2"));

    snapctl(
        &reg.url,
        &[
            "push",
            t.path().join("img1").to_str().unwrap(),
            "t/dedup:run1",
        ],
    )
    .ok();
    let out = snapctl(
        &reg.url,
        &[
            "push",
            t.path().join("img2").to_str().unwrap(),
            "t/dedup:run2",
        ],
    )
    .ok()
    .json();
    let (sent, total) = (
        out["bytes_transferred"].as_u64().unwrap(),
        out["bytes_total"].as_u64().unwrap(),
    );
    assert!(total > 1 << 30);
    assert!(
        sent * 10 <= total,
        "second push sent {sent} of {total} bytes"
    );
    eprintln!(
        "dedup across runs: sent {sent} of {total} bytes ({:.2}%)",
        sent as f64 * 100.0 / total as f64
    );
}
