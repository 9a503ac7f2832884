//! Bad input and broken environments: each gets a clear error, the documented exit
//! code, and loses nothing.

use crate::support::*;

#[test]
fn unknown_and_malformed_references_and_unreachable_registry() {
    let t = tempfile::tempdir().unwrap();
    let reg = Registry::start(&t.path().join("reg"));
    let out = snapctl(&reg.url, &["inspect", "t/nothing:here"]);
    assert_eq!(out.code, 3, "{}", out.stderr);
    assert!(
        out.stderr.contains("t/nothing") && out.stderr.contains("here"),
        "{}",
        out.stderr
    );
    assert_eq!(out.json()["exit_code"], 3);

    let out = snapctl(&reg.url, &["pull", "Bad Ref!", "/tmp/never"]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("invalid reference"), "{}", out.stderr);

    // A port nobody listens on.
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let url = format!("http://{free}");
    let out = snapctl(&url, &["ls"]);
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains(&free.to_string()) && out.stderr.contains("cannot reach"),
        "{}",
        out.stderr
    );

    let out = snapctl("127.0.0.1:1", &["ls"]);
    assert_eq!(
        out.code, 2,
        "a registry without scheme is a usage error: {}",
        out.stderr
    );
}

#[test]
fn unknown_manifest_version_is_refused_and_nothing_is_tagged() {
    let t = tempfile::tempdir().unwrap();
    let reg = Registry::start(&t.path().join("reg"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let remote = snapreg_client::remote::Remote::connect(&reg.url)
            .await
            .unwrap();
        let lease = remote.begin_push("t/v").await.unwrap();
        let golden = include_str!("../../../proto/tests/golden/manifest-v1.json").replacen(
            "\"schema_version\": 1",
            "\"schema_version\": 99",
            1,
        );
        let err = remote
            .put_manifest("t/v", &lease, golden.into(), vec!["v1".into()])
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("99") && err.contains("upgrade"), "{err}");
        // A v1 manifest whose chunks were never uploaded is refused too.
        let golden = include_str!("../../../proto/tests/golden/manifest-v1.json");
        let err = remote
            .put_manifest("t/v", &lease, golden.into(), vec!["v1".into()])
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not hold"), "{err}");
    });
    assert_eq!(snapctl(&reg.url, &["ls", "t/v"]).code, 3);
}

/// A full store (a 2 MiB tmpfs): the push fails saying so, and no tag appears.
#[test]
fn full_store_fails_push_cleanly() {
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("reg");
    let _store = Tmpfs::mount(&data.join("store"), "2m");
    let reg = Registry::start(&data);
    let src = t.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("big"), noise(11, 8 << 20)).unwrap();
    let out = snapctl(&reg.url, &["push", src.to_str().unwrap(), "t/full:v1"]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(
        out.stderr.contains("No space left") || out.stderr.contains("storage failed"),
        "{}",
        out.stderr
    );
    assert_eq!(
        snapctl(&reg.url, &["inspect", "t/full:v1"]).code,
        3,
        "a tag became visible after a failed push"
    );
    // The registry still serves: a small push fits.
    std::fs::remove_file(src.join("big")).unwrap();
    std::fs::write(src.join("small"), b"fits").unwrap();
    snapctl(&reg.url, &["push", src.to_str().unwrap(), "t/full:v2"]).ok();
}
