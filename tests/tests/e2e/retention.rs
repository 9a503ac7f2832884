//! Retention policies and manifest deletion: `snapctl retention set|show|apply`, GC
//! applying policies, `snapctl rm repo@digest`. What a policy keeps stays pullable;
//! what it drops is reclaimed by GC; a policy survives the loss of the index.

use crate::support::*;

fn tags(url: &str, repo: &str) -> Vec<String> {
    let mut v: Vec<String> = list_tags(url, repo).into_iter().map(|t| t.0).collect();
    v.sort();
    v
}

#[test]
fn keep_last_deletes_the_oldest_tags_and_gc_reclaims_their_chunks() {
    let t = tempfile::tempdir().unwrap();
    let mut reg = Registry::start(&t.path().join("reg"));
    let mut dirs = Vec::new();
    for i in 1..=4u64 {
        let d = t.path().join(format!("v{i}"));
        write(&d, "pages-1.img", &noise(200 + i, 2 << 20));
        push(&reg.url, &d, &format!("t/ret:v{i}"));
        dirs.push(d);
    }
    // Another repository without a policy is never touched.
    push(&reg.url, &dirs[0], "t/other:v1");

    let set = snapctl(&reg.url, &["retention", "set", "t/ret", "--keep-last", "2"])
        .ok()
        .json();
    assert_eq!(set["policy"]["keep_last"], 2, "{set}");
    assert!(reg.store().join("retention/t/ret/_policy.json").exists());

    // A young-enough keep-for keeps everything.
    snapctl(
        &reg.url,
        &[
            "retention",
            "set",
            "t/ret",
            "--keep-last",
            "2",
            "--keep-for",
            "1h",
        ],
    )
    .ok();
    let dry = snapctl(&reg.url, &["retention", "apply", "--dry-run"])
        .ok()
        .json();
    assert_eq!(
        dry["repositories"][0]["deleted"],
        serde_json::json!([]),
        "{dry}"
    );
    snapctl(&reg.url, &["retention", "set", "t/ret", "--keep-last", "2"]).ok();

    let dry = snapctl(&reg.url, &["retention", "apply", "t/ret", "--dry-run"])
        .ok()
        .json();
    assert_eq!(
        dry["repositories"][0]["deleted"],
        serde_json::json!(["v2", "v1"]),
        "{dry}"
    );
    assert_eq!(
        tags(&reg.url, "t/ret"),
        ["v1", "v2", "v3", "v4"],
        "dry run deleted"
    );

    // The policy lives in the store: losing the index loses nothing.
    reg.kill9();
    std::fs::remove_dir_all(reg.data.join("index")).unwrap();
    reg.restart();
    let shown = snapctl(&reg.url, &["retention", "show", "t/ret"])
        .ok()
        .json();
    assert_eq!(shown["policy"]["keep_last"], 2, "{shown}");

    let before = stored_chunk_bytes(&reg.store());
    let gc = snapctl(&reg.url, &["gc", "--grace", "0s"]).ok().json();
    assert!(gc["manifests_swept"].as_u64().unwrap() >= 1, "{gc}");
    assert_eq!(tags(&reg.url, "t/ret"), ["v3", "v4"]);
    assert_eq!(tags(&reg.url, "t/other"), ["v1"]);
    assert!(
        before - stored_chunk_bytes(&reg.store()) >= 2 << 20,
        "v2's chunks were not reclaimed"
    );
    for (i, d) in [(3, &dirs[2]), (4, &dirs[3])] {
        let dst = t.path().join(format!("dst{i}"));
        snapctl(
            &reg.url,
            &["pull", &format!("t/ret:v{i}"), dst.to_str().unwrap()],
        )
        .ok();
        assert_trees_equal(d, &dst);
    }
    assert_eq!(snapctl(&reg.url, &["inspect", "t/ret:v1"]).code, 3);
    // v1's chunks are still t/other's.
    let dst = t.path().join("dst-other");
    snapctl(&reg.url, &["pull", "t/other:v1", dst.to_str().unwrap()]).ok();
    assert_trees_equal(&dirs[0], &dst);

    // An empty policy removes it.
    snapctl(&reg.url, &["retention", "set", "t/ret"]).ok();
    let shown = snapctl(&reg.url, &["retention", "show", "t/ret"])
        .ok()
        .json();
    assert!(shown["policy"].is_null(), "{shown}");
}

#[test]
fn rm_of_a_digest_deletes_only_an_untagged_manifest() {
    let t = tempfile::tempdir().unwrap();
    let reg = Registry::start(&t.path().join("reg"));
    let src = t.path().join("src");
    write(&src, "f.img", &noise(210, 1 << 20));
    let digest = push(&reg.url, &src, "t/rmd:v1");
    let by_digest = format!("t/rmd@{digest}");

    let out = snapctl(&reg.url, &["rm", &by_digest]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(
        out.stderr.contains("t/rmd:v1") && out.stderr.contains("still tagged"),
        "{}",
        out.stderr
    );
    snapctl(&reg.url, &["inspect", &by_digest]).ok();

    snapctl(&reg.url, &["rm", "t/rmd:v1"]).ok();
    let out = snapctl(&reg.url, &["rm", &by_digest]).ok().json();
    assert_eq!(out["digest"], digest.as_str());
    assert_eq!(snapctl(&reg.url, &["inspect", &by_digest]).code, 3);
    assert_eq!(snapctl(&reg.url, &["rm", &by_digest]).code, 3);
    let gc = snapctl(&reg.url, &["gc", "--grace", "0s"]).ok().json();
    assert!(gc["chunks_swept"].as_u64().unwrap() >= 1, "{gc}");
    assert_eq!(stored_chunk_bytes(&reg.store()), 0);
}
