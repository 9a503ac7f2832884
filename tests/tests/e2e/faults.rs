//! Fault injection against real registries: SIGKILL during a push, a pull, a GC and
//! replication; SIGSTOP of a peer; damaged chunk objects found by `snapctl verify`,
//! `snapreg scrub` and pull; concurrent overlapping pushes; GC while a push runs.
//! Each asserts that nothing acknowledged was lost, nothing half-written became
//! visible, and the error said what happened.
//!
//! Covered elsewhere (not repeated here): registry killed mid-checkpoint and a stalled
//! registry during a checkpoint (streaming.rs), corrupt chunk during pull-restore
//! (streaming.rs) and pull (push_pull.rs), a full store during a push (errors.rs),
//! GC racing a push at the API level (gc.rs), a peer killed mid-replication and an
//! unreachable peer (replication.rs), a registry killed after a push (push_pull.rs).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::support::*;

/// Chunk objects under a store's chunks/ prefix (staging files excluded).
fn chunk_objects(store: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for fan in std::fs::read_dir(store.join("chunks"))
        .into_iter()
        .flatten()
    {
        for f in std::fs::read_dir(fan.unwrap().path()).into_iter().flatten() {
            let p = f.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            if name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit()) {
                out.push(p);
            }
        }
    }
    out
}

/// The chunk digests (hex) of `file` in a stored manifest.
fn chunks_of(store: &Path, digest: &str, file: &str) -> Vec<String> {
    let bytes = std::fs::read(
        store
            .join("manifests")
            .join(digest.trim_start_matches("blake3:")),
    )
    .unwrap();
    let m: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    let files = m["layers"][0]["files"].as_array().unwrap();
    let f = files.iter().find(|f| f["path"] == file).unwrap();
    f["extents"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["chunk"].as_str())
        .map(|c| c.trim_start_matches("blake3:").to_string())
        .collect()
}

fn chunk_object(store: &Path, hex: &str) -> PathBuf {
    store.join("chunks").join(&hex[..2]).join(hex)
}

/// `snapreg scrub ARGS` (`--data DIR` offline, `--registry URL` online).
fn snapreg_scrub(args: &[&str]) -> Out {
    let out = Command::new(bin("snapreg"))
        .arg("scrub")
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    Out::from(out)
}

#[test]
fn registry_killed_mid_push_shows_nothing_and_the_next_push_completes() {
    let t = tempfile::tempdir().unwrap();
    let mut reg = Registry::start(&t.path().join("reg"));
    let src = t.path().join("src");
    write(&src, "pages-1.img", &noise(101, 160 << 20));
    write(&src, "core.img", b"core");
    let pushing = snapctl_bg(&reg.url, &["push", src.to_str().unwrap(), "t/kill:v1"]);
    let store = reg.store();
    wait_for(Duration::from_secs(30), || {
        (chunk_objects(&store).len() >= 4).then_some(())
    })
    .expect("the push stored chunks");
    reg.kill9();
    let out = finish(pushing);
    reg.restart();
    if out.code == 0 {
        // The commit won the race: what was acknowledged must be there, whole.
        eprintln!("push finished before the kill; checking it survived");
    } else {
        assert!(
            out.stderr.contains(&reg.addr) || out.stderr.contains("registry"),
            "the error should name the registry: {}",
            out.stderr
        );
        assert_eq!(
            snapctl(&reg.url, &["inspect", "t/kill:v1"]).code,
            3,
            "a half-pushed snapshot became visible"
        );
        snapctl(&reg.url, &["push", src.to_str().unwrap(), "t/kill:v1"]).ok();
    }
    let dst = t.path().join("dst");
    snapctl(&reg.url, &["pull", "t/kill:v1", dst.to_str().unwrap()]).ok();
    assert_trees_equal(&src, &dst);
    snapctl(&reg.url, &["verify", "t/kill:v1"]).ok();
}

#[test]
fn registry_killed_mid_pull_leaves_no_file_under_its_final_name() {
    let t = tempfile::tempdir().unwrap();
    let mut reg = Registry::start(&t.path().join("reg"));
    let src = t.path().join("src");
    write(&src, "big.img", &noise(102, 160 << 20));
    push(&reg.url, &src, "t/pullkill:v1");
    let dst = t.path().join("dst");
    let pulling = snapctl_bg(&reg.url, &["pull", "t/pullkill:v1", dst.to_str().unwrap()]);
    wait_for(Duration::from_secs(30), || {
        dst.join(".big.img.snapreg-partial").exists().then_some(())
    })
    .expect("the pull started writing");
    reg.kill9();
    let out = finish(pulling);
    if out.code != 0 {
        assert!(
            out.stderr.contains(&reg.addr) || out.stderr.contains("registry"),
            "{}",
            out.stderr
        );
        assert!(
            !dst.join("big.img").exists(),
            "a truncated file has its final name"
        );
        let left: Vec<_> = read_tree(&dst).into_keys().collect();
        assert!(left.is_empty(), "partial files left behind: {left:?}");
    }
    reg.restart();
    snapctl(&reg.url, &["pull", "t/pullkill:v1", dst.to_str().unwrap()]).ok();
    assert_trees_equal(&src, &dst);
}

#[test]
fn registry_killed_mid_gc_loses_no_tagged_snapshot() {
    let t = tempfile::tempdir().unwrap();
    let mut reg = Registry::start(&t.path().join("reg"));
    let (keep, drop_) = (t.path().join("keep"), t.path().join("drop"));
    write(&keep, "shared.img", &noise(110, 4 << 20));
    write(&keep, "keep.img", &noise(111, 8 << 20));
    write(&drop_, "shared.img", &noise(110, 4 << 20));
    write(&drop_, "drop.img", &noise(112, 96 << 20));
    push(&reg.url, &keep, "t/gck:keep");
    push(&reg.url, &drop_, "t/gck:drop");
    snapctl(&reg.url, &["rm", "t/gck:drop"]).ok();
    let before = chunk_objects(&reg.store()).len();

    let collecting = snapctl_bg(&reg.url, &["gc", "--grace", "0s"]);
    let store = reg.store();
    let swept_some = wait_for(Duration::from_secs(30), || {
        (chunk_objects(&store).len() < before).then_some(())
    });
    reg.kill9();
    let out = finish(collecting);
    eprintln!(
        "gc killed after sweeping: {}, gc exit {}",
        swept_some.is_some(),
        out.code
    );
    reg.restart();
    let dst = t.path().join("dst");
    snapctl(&reg.url, &["pull", "t/gck:keep", dst.to_str().unwrap()]).ok();
    assert_trees_equal(&keep, &dst);
    // The interrupted GC is finished by the next one; the dropped snapshot can be
    // pushed again whatever the index lost (chunks re-uploaded as needed).
    let again = snapctl(&reg.url, &["gc", "--grace", "0s"]).ok().json();
    assert_eq!(again["manifests_live"], 1, "{again}");
    snapctl(&reg.url, &["verify", "t/gck:keep"]).ok();
    push(&reg.url, &drop_, "t/gck:drop");
    let dst2 = t.path().join("dst2");
    snapctl(&reg.url, &["pull", "t/gck:drop", dst2.to_str().unwrap()]).ok();
    assert_trees_equal(&drop_, &dst2);
}

#[test]
fn origin_killed_mid_replication_resumes_after_restart() {
    let t = tempfile::tempdir().unwrap();
    let b = Registry::start(&t.path().join("b"));
    let peer = format!("b={}", b.url);
    let mut a = Registry::start_with(
        &t.path().join("a"),
        &["--peer", &peer, "--replication-backoff-max", "500ms"],
    );
    let src = t.path().join("src");
    write(&src, "pages-1.img", &noise(120, 128 << 20));
    push(&a.url, &src, "t/repkill:v1");
    let b_store = b.store();
    wait_for(Duration::from_secs(60), || {
        (!chunk_objects(&b_store).is_empty()).then_some(())
    })
    .expect("replication started");
    a.kill9();
    // Nothing half-replicated is visible on B: the tag comes last.
    let on_b = list_tags(&b.url, "t/repkill");
    let complete = !on_b.is_empty();
    if !complete {
        assert_eq!(snapctl(&b.url, &["inspect", "t/repkill:v1"]).code, 3);
    }
    a.restart();
    wait_replicated(&a.url, Duration::from_secs(60));
    let dst = t.path().join("dst");
    snapctl(&b.url, &["pull", "t/repkill:v1", dst.to_str().unwrap()]).ok();
    assert_trees_equal(&src, &dst);
}

#[test]
fn stopped_peer_is_retried_and_catches_up_when_continued() {
    let t = tempfile::tempdir().unwrap();
    let b = Registry::start(&t.path().join("b"));
    let peer = format!("b={}", b.url);
    let a = Registry::start_with(
        &t.path().join("a"),
        &["--peer", &peer, "--replication-backoff-max", "500ms"],
    );
    struct Continue(u32);
    impl Drop for Continue {
        fn drop(&mut self) {
            // SAFETY: kill takes plain integers; the PID is a process this test started.
            unsafe { libc::kill(self.0 as i32, libc::SIGCONT) };
        }
    }
    // SAFETY: kill takes plain integers; the PID is a process this test started.
    unsafe { libc::kill(b.pid() as i32, libc::SIGSTOP) };
    let stopped = Continue(b.pid());
    let src = t.path().join("src");
    write(&src, "pages-1.img", &noise(130, 8 << 20));
    push(&a.url, &src, "t/stop:v1");
    std::thread::sleep(Duration::from_secs(2));
    let s = replication_status(&a.url);
    assert_eq!(
        s.peers[0].entries_behind, 1,
        "a hung peer must not count as acknowledged: {s:?}"
    );
    drop(stopped);
    let s = wait_replicated(&a.url, Duration::from_secs(60));
    assert!(s.peers[0].last_error.is_empty(), "{s:?}");
    let dst = t.path().join("dst");
    snapctl(&b.url, &["pull", "t/stop:v1", dst.to_str().unwrap()]).ok();
    assert_trees_equal(&src, &dst);
}

#[test]
fn bit_flip_is_named_by_verify_quarantined_by_scrub_and_healed_by_the_next_push() {
    let t = tempfile::tempdir().unwrap();
    let mut reg = Registry::start(&t.path().join("reg"));
    let src = t.path().join("src");
    write(&src, "ok.img", b"fine\n");
    write(&src, "victim.img", &noise(140, 3 << 20));
    let digest = push(&reg.url, &src, "t/flip:v1");
    snapctl(&reg.url, &["verify", "t/flip:v1"]).ok();

    let victim = chunks_of(&reg.store(), &digest, "victim.img")[1].clone();
    let obj = chunk_object(&reg.store(), &victim);
    let mut bytes = std::fs::read(&obj).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x08;
    std::fs::write(&obj, bytes).unwrap();

    let out = snapctl(&reg.url, &["verify", "t/flip:v1"]);
    assert_eq!(out.code, 5, "{}", out.stderr);
    assert!(
        out.stderr.contains(&victim) && out.stderr.contains("victim.img"),
        "verify must name the chunk and its file: {}",
        out.stderr
    );
    assert_eq!(out.json()["exit_code"], 5);

    reg.kill9();
    let data = reg.data.to_str().unwrap().to_string();
    let scrub = snapreg_scrub(&["--data", &data]);
    assert_eq!(scrub.code, 5, "{}", scrub.stderr);
    let report = scrub.json();
    let damaged = report["damaged"].as_array().unwrap();
    assert_eq!(damaged.len(), 1, "{report}");
    assert_eq!(damaged[0]["digest"], format!("blake3:{victim}"));
    assert!(report["chunks_checked"].as_u64().unwrap() >= 2, "{report}");
    let quarantined = reg
        .store()
        .join(damaged[0]["quarantined_to"].as_str().unwrap());
    assert!(quarantined.exists(), "{}", quarantined.display());
    assert!(!obj.exists(), "the damaged object is still served");
    // A second scrub finds the store clean.
    assert_eq!(snapreg_scrub(&["--data", &data]).code, 0);

    reg.restart();
    let out = snapctl(&reg.url, &["verify", "t/flip:v1"]);
    assert_eq!(out.code, 5, "{}", out.stderr);
    assert!(
        out.stderr.contains("missing") && out.stderr.contains("victim.img"),
        "{}",
        out.stderr
    );
    // The registry reports the chunk missing, so the next push re-uploads it.
    let again = snapctl(&reg.url, &["push", src.to_str().unwrap(), "t/flip:v1"])
        .ok()
        .json();
    assert_eq!(again["chunks_transferred"], 1, "{again}");
    snapctl(&reg.url, &["verify", "t/flip:v1"]).ok();
    let dst = t.path().join("dst");
    snapctl(&reg.url, &["pull", "t/flip:v1", dst.to_str().unwrap()]).ok();
    assert_trees_equal(&src, &dst);
}

#[test]
fn truncated_chunk_object_fails_pull_and_verify_and_online_scrub_quarantines_it() {
    let t = tempfile::tempdir().unwrap();
    let reg = Registry::start(&t.path().join("reg"));
    let src = t.path().join("src");
    write(&src, "victim.img", &noise(150, 2 << 20));
    let digest = push(&reg.url, &src, "t/trunc:v1");
    let victim = chunks_of(&reg.store(), &digest, "victim.img")[0].clone();
    let obj = chunk_object(&reg.store(), &victim);
    let len = std::fs::metadata(&obj).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&obj)
        .unwrap()
        .set_len(len / 2)
        .unwrap();

    let dst = t.path().join("dst");
    let out = snapctl(&reg.url, &["pull", "t/trunc:v1", dst.to_str().unwrap()]);
    assert_eq!(out.code, 5, "{}", out.stderr);
    assert!(out.stderr.contains(&victim), "{}", out.stderr);
    assert!(read_tree(&dst).is_empty(), "pull left files behind");
    let out = snapctl(&reg.url, &["verify", "t/trunc:v1"]);
    assert_eq!(out.code, 5, "{}", out.stderr);
    assert!(out.stderr.contains("victim.img"), "{}", out.stderr);

    // Online this time: the registry keeps serving while it scrubs itself.
    let dry = snapreg_scrub(&["--registry", &reg.url, "--dry-run"]);
    assert_eq!(dry.code, 5, "{}", dry.stderr);
    assert!(obj.exists(), "a dry run quarantined");
    let scrub = snapreg_scrub(&["--registry", &reg.url]);
    assert_eq!(scrub.code, 5, "{}", scrub.stderr);
    let report = scrub.json();
    assert_eq!(report["damaged"][0]["digest"], format!("blake3:{victim}"));
    assert!(
        report["damaged"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("length"),
        "{report}"
    );
    assert!(!obj.exists());
    let out = snapctl(&reg.url, &["verify", "t/trunc:v1"]);
    assert!(
        out.code == 5 && out.stderr.contains("missing"),
        "{}",
        out.stderr
    );
    push(&reg.url, &src, "t/trunc:v1");
    snapctl(&reg.url, &["verify", "t/trunc:v1"]).ok();
    assert_eq!(snapreg_scrub(&["--registry", &reg.url]).code, 0);
}

#[test]
fn concurrent_overlapping_pushes_both_complete_and_pull_identical() {
    let t = tempfile::tempdir().unwrap();
    let reg = Registry::start(&t.path().join("reg"));
    let shared = noise(160, 48 << 20);
    let (a, b) = (t.path().join("a"), t.path().join("b"));
    write(&a, "pages-1.img", &shared);
    write(&b, "pages-1.img", &shared);
    write(&a, "own.img", &noise(161, 4 << 20));
    write(&b, "own.img", &noise(162, 4 << 20));
    let pa = snapctl_bg(&reg.url, &["push", a.to_str().unwrap(), "t/both:a"]);
    let pb = snapctl_bg(&reg.url, &["push", b.to_str().unwrap(), "t/both:b"]);
    let (oa, ob) = (finish(pa).ok(), finish(pb).ok());
    let (ja, jb) = (oa.json(), ob.json());
    // Every chunk was stored once: the two pushes together sent no more than the
    // distinct chunks (a chunk both uploaded counts once on the registry).
    let objects = chunk_objects(&reg.store()).len() as u64;
    let total = ja["chunks_total"].as_u64().unwrap() + jb["chunks_total"].as_u64().unwrap();
    assert!(
        objects < total,
        "{objects} objects for {total} chunk uses: no dedup"
    );
    for (dir, r) in [(&a, "t/both:a"), (&b, "t/both:b")] {
        let dst = t.path().join(format!("dst-{}", r.replace([':', '/'], "-")));
        snapctl(&reg.url, &["pull", r, dst.to_str().unwrap()]).ok();
        assert_trees_equal(dir, &dst);
    }
}

#[test]
fn gc_during_a_push_keeps_everything_the_push_commits() {
    let t = tempfile::tempdir().unwrap();
    let reg = Registry::start(&t.path().join("reg"));
    // Unreferenced chunks the push will need again: GC would take them if the
    // push's lease did not protect them.
    let src = t.path().join("src");
    write(&src, "pages-1.img", &noise(170, 64 << 20));
    push(&reg.url, &src, "t/gcpush:old");
    snapctl(&reg.url, &["rm", "t/gcpush:old"]).ok();
    write(&src, "more.img", &noise(171, 64 << 20));
    let pushing = snapctl_bg(&reg.url, &["push", src.to_str().unwrap(), "t/gcpush:v1"]);
    let mut gcs = 0;
    let mut pushing = Some(pushing);
    while let Some(mut p) = pushing.take() {
        if p.try_wait().unwrap().is_some() {
            let out = finish(p).ok();
            assert!(out.json()["digest"].is_string());
            break;
        }
        snapctl(&reg.url, &["gc", "--grace", "0s"]).ok();
        gcs += 1;
        pushing = Some(p);
    }
    eprintln!("{gcs} garbage collections ran during the push");
    snapctl(&reg.url, &["gc", "--grace", "0s"]).ok();
    snapctl(&reg.url, &["verify", "t/gcpush:v1"]).ok();
    let dst = t.path().join("dst");
    snapctl(&reg.url, &["pull", "t/gcpush:v1", dst.to_str().unwrap()]).ok();
    assert_trees_equal(&src, &dst);
}

#[test]
fn stopped_registry_fails_a_call_in_bounded_time_naming_it() {
    let t = tempfile::tempdir().unwrap();
    let reg = Registry::start(&t.path().join("reg"));
    struct Continue(u32);
    impl Drop for Continue {
        fn drop(&mut self) {
            // SAFETY: kill takes plain integers; the PID is a process this test started.
            unsafe { libc::kill(self.0 as i32, libc::SIGCONT) };
        }
    }
    // SAFETY: kill takes plain integers; the PID is a process this test started.
    unsafe { libc::kill(reg.pid() as i32, libc::SIGSTOP) };
    let _resume = Continue(reg.pid());
    let started = std::time::Instant::now();
    let out = snapctl(&reg.url, &["ls"]);
    let took = started.elapsed();
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(took < Duration::from_secs(60), "hung for {took:?}");
    assert!(
        out.stderr.contains("cannot reach") && out.stderr.contains(&reg.addr),
        "the error should say the registry at its address stopped answering: {}",
        out.stderr
    );
}
