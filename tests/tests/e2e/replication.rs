//! Multi-region replication between real registries on loopback: a push to A reaches
//! B and C complete and verified; a peer killed mid-replication or unreachable for a
//! while converges without anything it acknowledged being sent again; concurrent tag
//! updates resolve by the tag-record rule (highest (hlc, target)) on every registry.

use std::path::Path;
use std::time::Duration;

use crate::support::*;

const CONVERGE: Duration = Duration::from_secs(60);
/// Short backoff so that a peer coming back is retried within a second.
const FAST_RETRY: [&str; 2] = ["--replication-backoff-max", "500ms"];

fn peer_arg(name: &str, url: &str) -> String {
    format!("{name}={url}")
}

fn pull_and_compare(url: &str, reference: &str, src: &Path, dst: &Path) {
    let pulled = snapctl(url, &["pull", reference, dst.to_str().unwrap()])
        .ok()
        .json();
    assert!(pulled["digest"].is_string(), "{pulled}");
    assert_trees_equal(src, dst);
}

/// Chunk object names under a store's chunks/ prefix (not the staging files a
/// killed registry may leave behind).
fn chunk_names(store: &Path) -> std::collections::BTreeSet<String> {
    read_tree(&store.join("chunks"))
        .into_keys()
        .filter(|k| {
            let name = k.rsplit('/').next().unwrap_or("");
            name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit())
        })
        .collect()
}

/// Tag record object names of one tag in a store.
fn record_names(store: &Path, repo: &str, tag: &str) -> Vec<String> {
    let mut v: Vec<String> = read_tree(&store.join("tags").join(repo).join(tag))
        .into_keys()
        .collect();
    v.sort();
    v
}

#[test]
fn push_to_a_appears_on_b_and_c_and_a_restart_sends_nothing_again() {
    let t = tempfile::tempdir().unwrap();
    let b = Registry::start(&t.path().join("b"));
    let c = Registry::start(&t.path().join("c"));
    let (pb, pc) = (peer_arg("b", &b.url), peer_arg("c", &c.url));
    let mut a = Registry::start_with(
        &t.path().join("a"),
        &["--peer", &pb, "--peer", &pc, FAST_RETRY[0], FAST_RETRY[1]],
    );
    let src = t.path().join("src");
    write(&src, "pages-1.img", &noise(11, 6 << 20));
    write(&src, "core.img", b"core\n");
    write(&src, "zeros", &vec![0u8; 1 << 20]);
    let digest = push(&a.url, &src, "t/app:v1");

    let status = wait_replicated(&a.url, CONVERGE);
    assert_eq!(status.peers.len(), 2);
    let distinct = chunk_names(&a.store()).len() as u64;
    for p in &status.peers {
        assert!(p.last_error.is_empty(), "{p:?}");
        assert_eq!(p.chunks_sent, distinct, "{p:?}");
        assert_eq!(p.records_sent, 1, "{p:?}");
        assert!(p.last_success_unix_ms > 0);
    }
    // The same through the CLI.
    let cli = snapctl(&a.url, &["replication", "status"]).ok().json();
    assert_eq!(cli["peers"].as_array().unwrap().len(), 2);
    assert!(
        cli["peers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["entries_behind"] == 0 && p["last_error"] == ""),
        "{cli}"
    );
    for (name, reg) in [("b", &b), ("c", &c)] {
        pull_and_compare(
            &reg.url,
            "t/app:v1",
            &src,
            &t.path().join(format!("dst-{name}")),
        );
        // The same record object, original HLC and all.
        assert_eq!(
            record_names(&reg.store(), "t/app", "v1"),
            record_names(&a.store(), "t/app", "v1")
        );
        assert_eq!(list_tags(&reg.url, "t/app"), list_tags(&a.url, "t/app"));
        assert_eq!(list_tags(&reg.url, "t/app")[0].1, digest);
        // Replicated records are not re-logged on the peer.
        assert_eq!(replication_status(&reg.url).log_head, 0);
    }

    // A restarts: the durable cursors say everything was acknowledged.
    a.restart();
    std::thread::sleep(Duration::from_millis(1500));
    let after = replication_status(&a.url);
    for p in &after.peers {
        assert_eq!(p.entries_behind, 0, "{p:?}");
        assert_eq!(
            (p.records_sent, p.chunks_sent, p.manifests_sent),
            (0, 0, 0),
            "{p:?}"
        );
    }

    // A second push of mostly the same bytes sends only the new chunks.
    write(&src, "extra", &noise(12, 2 << 20));
    push(&a.url, &src, "t/app:v2");
    let status = wait_replicated(&a.url, CONVERGE);
    let new_chunks = chunk_names(&a.store()).len() as u64 - distinct;
    for p in &status.peers {
        assert_eq!(p.chunks_sent, new_chunks, "{p:?}");
    }
    pull_and_compare(&c.url, "t/app:v2", &src, &t.path().join("dst-c2"));
}

#[test]
fn peer_killed_mid_replication_converges_without_resending_acknowledged_chunks() {
    let t = tempfile::tempdir().unwrap();
    let mut c = Registry::start(&t.path().join("c"));
    let pc = peer_arg("c", &c.url);
    let a = Registry::start_with(
        &t.path().join("a"),
        &["--peer", &pc, FAST_RETRY[0], FAST_RETRY[1]],
    );
    let src = t.path().join("src");
    write(&src, "pages-1.img", &noise(21, 96 << 20));
    push(&a.url, &src, "t/big:v1");

    // Kill C once it acknowledged part of the snapshot, before the entry is done.
    let mid = wait_for(CONVERGE, || {
        let s = replication_status(&a.url);
        let p = &s.peers[0];
        (p.chunks_sent > 0 || p.entries_behind == 0).then(|| p.clone())
    })
    .expect("replication started");
    c.kill9();
    let acked_before_kill = mid.chunks_sent;
    let status = replication_status(&a.url);
    let killed_mid_entry = status.peers[0].entries_behind > 0;
    eprintln!(
        "killed C with {acked_before_kill} chunks acknowledged, mid entry: {killed_mid_entry}"
    );
    if killed_mid_entry {
        // A retries (and fails) while C is down, and says so.
        let failing = wait_for(Duration::from_secs(20), || {
            let s = replication_status(&a.url);
            (!s.peers[0].last_error.is_empty()).then(|| s.peers[0].clone())
        })
        .expect("A reports the failure");
        assert!(
            failing.failures > 0 && failing.entries_behind > 0,
            "{failing:?}"
        );
    }
    let stored_on_c_at_kill = chunk_names(&c.store()).len() as u64;
    assert!(stored_on_c_at_kill >= acked_before_kill);

    c.restart();
    let status = wait_replicated(&a.url, CONVERGE);
    let p = &status.peers[0];
    assert!(p.last_error.is_empty(), "{p:?}");
    let distinct = chunk_names(&a.store()).len() as u64;
    // Nothing C acknowledged (or stored before the kill) was sent again.
    assert!(
        p.chunks_sent <= distinct,
        "sent {} chunks for {distinct} distinct ones",
        p.chunks_sent
    );
    let (on_a, on_c) = (chunk_names(&a.store()), chunk_names(&c.store()));
    assert_eq!(
        on_a.symmetric_difference(&on_c).collect::<Vec<_>>(),
        Vec::<&String>::new()
    );
    pull_and_compare(&c.url, "t/big:v1", &src, &t.path().join("dst"));
}

#[test]
fn unreachable_peer_catches_up_including_tombstones() {
    let t = tempfile::tempdir().unwrap();
    let c_addr = format!("127.0.0.1:{}", free_port());
    let pc = peer_arg("c", &format!("http://{c_addr}"));
    let a = Registry::start_with(
        &t.path().join("a"),
        &["--peer", &pc, FAST_RETRY[0], FAST_RETRY[1]],
    );
    let src = t.path().join("src");
    write(&src, "f", &noise(31, 3 << 20));
    push(&a.url, &src, "t/late:v1");
    let old = t.path().join("old");
    write(&old, "g", &noise(32, 1 << 20));
    push(&a.url, &old, "t/late:old");
    snapctl(&a.url, &["rm", "t/late:old"]).ok();

    let down = wait_for(Duration::from_secs(20), || {
        let s = replication_status(&a.url);
        (s.peers[0].failures >= 2).then(|| s.peers[0].clone())
    })
    .expect("A retries the unreachable peer");
    assert_eq!(down.entries_behind, 3, "{down:?}");
    assert!(!down.last_error.is_empty(), "{down:?}");
    assert_eq!(down.acked_seq, 0);
    std::thread::sleep(Duration::from_secs(2));

    let c = Registry::start_on(&t.path().join("c"), &c_addr, &[]);
    let status = wait_replicated(&a.url, CONVERGE);
    assert!(status.peers[0].last_error.is_empty());
    assert_eq!(status.peers[0].records_sent, 3);
    pull_and_compare(&c.url, "t/late:v1", &src, &t.path().join("dst"));
    let gone = snapctl(&c.url, &["inspect", "t/late:old"]);
    assert_eq!(gone.code, 3, "the tombstone replicated: {}", gone.stdout);
    assert_eq!(list_tags(&c.url, "t/late"), list_tags(&a.url, "t/late"));
    assert_eq!(
        record_names(&c.store(), "t/late", "old"),
        record_names(&a.store(), "t/late", "old")
    );
}

#[test]
fn concurrent_tag_updates_resolve_to_the_highest_record_everywhere() {
    let t = tempfile::tempdir().unwrap();
    let b_addr = format!("127.0.0.1:{}", free_port());
    let pb = peer_arg("b", &format!("http://{b_addr}"));
    let a = Registry::start_with(
        &t.path().join("a"),
        &["--peer", &pb, FAST_RETRY[0], FAST_RETRY[1]],
    );
    let pa = peer_arg("a", &a.url);
    let b = Registry::start_on(
        &t.path().join("b"),
        &b_addr,
        &["--peer", &pa, FAST_RETRY[0], FAST_RETRY[1]],
    );
    let (src_a, src_b) = (t.path().join("src-a"), t.path().join("src-b"));
    write(&src_a, "f", &noise(41, 2 << 20));
    write(&src_b, "f", &noise(42, 2 << 20));

    for round in 0..3 {
        let tag = format!("t/race:r{round}");
        let (ua, ub) = (a.url.clone(), b.url.clone());
        let (sa, sb) = (src_a.clone(), src_b.clone());
        let (ta, tb) = (tag.clone(), tag.clone());
        let ha = std::thread::spawn(move || push(&ua, &sa, &ta));
        let hb = std::thread::spawn(move || push(&ub, &sb, &tb));
        let (da, db) = (ha.join().unwrap(), hb.join().unwrap());
        assert_ne!(da, db);

        wait_replicated(&a.url, CONVERGE);
        wait_replicated(&b.url, CONVERGE);
        let tag_name = format!("r{round}");
        // Both stores hold both records, under the same names.
        let records = record_names(&a.store(), "t/race", &tag_name);
        assert_eq!(records.len(), 2, "{records:?}");
        assert_eq!(records, record_names(&b.store(), "t/race", &tag_name));
        // Names are <16 hex hlc>-<target>: the lexically highest is the highest
        // (hlc, target), the record that must win.
        let winner = records.last().unwrap();
        let winner_digest = format!("blake3:{}", winner.split_once('-').unwrap().1);
        let on_a = list_tags(&a.url, "t/race");
        let on_b = list_tags(&b.url, "t/race");
        assert_eq!(on_a, on_b);
        let cur = on_a.iter().find(|(t, _, _)| *t == tag_name).unwrap();
        assert_eq!(cur.1, winner_digest, "{records:?}");
        assert_eq!(format!("{:016x}", cur.2), winner.split_once('-').unwrap().0);
        // Both registries serve the winner's bytes.
        let winner_src = if winner_digest == da { &src_a } else { &src_b };
        for (n, reg) in [("a", &a), ("b", &b)] {
            pull_and_compare(
                &reg.url,
                &tag,
                winner_src,
                &t.path().join(format!("dst-{round}-{n}")),
            );
        }
    }
    // A later move on B observed A's clock: it wins on both.
    snapctl(&b.url, &["tag", "t/race:r0", "t/race:r1"]).ok();
    wait_replicated(&b.url, CONVERGE);
    assert_eq!(list_tags(&a.url, "t/race"), list_tags(&b.url, "t/race"));
}
