//! `snapctl pull-restore --stage`: the image written into a memory directory first,
//! then a plain `criu restore` on it (client/src/restore/stage.rs), with a real CRIU.
//! The restored process continues with its state; bad bytes and a full directory stop
//! the restore before CRIU runs and leave nothing behind.

use std::path::Path;
use std::time::Duration;

use crate::support::*;

fn counter_of(dir: &Path) -> u64 {
    std::fs::read_to_string(dir.join("state"))
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn wait_counting(dir: &Path, above: u64) {
    wait_for(Duration::from_secs(30), || {
        (counter_of(dir) > above).then_some(())
    })
    .unwrap_or_else(|| panic!("counter stuck at {} (wanted > {above})", counter_of(dir)));
}

/// What is left in `dir` (a staging base).
fn left_in(dir: &Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect()
}

/// A process of 64 MiB (16 of them zero pages) checkpointed as `tag`; its PID is free.
fn checkpointed(reg: &Registry, t: &Path, seed: u64, tag: &str) -> (TestProc, serde_json::Value) {
    let mut p = TestProc::hold(&t.join("proc"), 64, seed, 0, 16);
    let ck = snapctl(
        &reg.url,
        &["checkpoint", "--pid", &p.pid().to_string(), tag],
    )
    .ok()
    .json();
    let _ = p.child.wait();
    (p, ck)
}

#[test]
fn a_staged_restore_continues_with_its_state_and_leaves_nothing_in_memory() {
    let _lock = criu_lock();
    let t = tempfile::tempdir().unwrap();
    let memory = tempfile::Builder::new()
        .prefix("snapreg-e2e-stage-")
        .tempdir_in("/dev/shm")
        .unwrap();
    let reg = Registry::start(&t.path().join("reg"));
    let (p, _) = checkpointed(&reg, t.path(), 31, "t/st:v1");
    let pid = p.pid();
    let at = counter_of(&p.dir);
    let r = snapctl_cached(
        &reg.url,
        &t.path().join("cache"),
        &[
            "pull-restore",
            "--detach",
            "--stage",
            "auto",
            "--memory-stage-dir",
            memory.path().to_str().unwrap(),
            "t/st:v1",
        ],
    )
    .ok()
    .json();
    let _restored = Restored(pid);
    let stage = &r["stage"];
    assert!(
        stage["staged_in"]
            .as_str()
            .is_some_and(|d| d.starts_with(memory.path().to_str().unwrap())),
        "{r}"
    );
    assert!(stage["reason"].as_str().unwrap().contains("auto"), "{r}");
    // The zero pages stayed out (holes, not written); the rest was written.
    assert!(
        r["zero_bytes_left_out"].as_u64().unwrap() >= 15 << 20,
        "{r}"
    );
    let staged = stage["bytes"].as_u64().unwrap();
    assert!((48 << 20..128 << 20).contains(&staged), "{r}");
    assert_eq!(r["pid"], pid);
    assert!(Path::new(r["criu_log"].as_str().unwrap()).is_file(), "{r}");
    assert!(
        left_in(memory.path()).is_empty(),
        "{:?}",
        left_in(memory.path())
    );
    wait_counting(&p.dir, at + 3);
    assert!(
        p.verify(pid).starts_with("ok"),
        "memory differs after restore"
    );
}

#[test]
fn a_corrupt_chunk_stops_a_staged_restore_before_criu_runs() {
    let _lock = criu_lock();
    let t = tempfile::tempdir().unwrap();
    let memory = tempfile::Builder::new()
        .prefix("snapreg-e2e-stage-")
        .tempdir_in("/dev/shm")
        .unwrap();
    let reg = Registry::start(&t.path().join("reg"));
    let (p, ck) = checkpointed(&reg, t.path(), 32, "t/st:bad");
    let pid = p.pid();
    let chunk = reg
        .pages_chunks(ck["digest"].as_str().unwrap())
        .pop()
        .unwrap();
    reg.flip_a_bit_of_chunk(&chunk);
    let out = snapctl_cached(
        &reg.url,
        &t.path().join("cache"),
        &[
            "pull-restore",
            "--detach",
            "--stage",
            memory.path().to_str().unwrap(),
            "t/st:bad",
        ],
    );
    let _guard = Restored(pid);
    assert_eq!(out.code, 5, "{}", out.stderr);
    assert!(out.stderr.contains(&chunk), "{}", out.stderr);
    assert!(!pid_alive(pid), "a restored process was left behind");
    assert!(
        left_in(memory.path()).is_empty(),
        "{:?}",
        left_in(memory.path())
    );
}

/// The staging directory fills up: a clear error naming it, no process, no files left.
#[test]
fn a_staging_directory_too_small_fails_cleanly_and_auto_streams_instead() {
    let _lock = criu_lock();
    let t = tempfile::tempdir().unwrap();
    let tiny = t.path().join("tiny");
    let _unmount = Tmpfs::mount(&tiny, "16m");
    let reg = Registry::start(&t.path().join("reg"));
    let (p, _) = checkpointed(&reg, t.path(), 33, "t/st:full");
    let pid = p.pid();
    let out = snapctl(
        &reg.url,
        &[
            "pull-restore",
            "--detach",
            "--stage",
            tiny.to_str().unwrap(),
            "t/st:full",
        ],
    );
    let _guard = Restored(pid);
    assert_ne!(out.code, 0, "the image cannot fit: {}", out.stdout);
    assert!(
        out.stderr.contains("staging") && out.stderr.contains("No space left"),
        "{}",
        out.stderr
    );
    assert!(!pid_alive(pid), "a restored process was left behind");
    assert!(left_in(&tiny).is_empty(), "{:?}", left_in(&tiny));

    // `auto` sees the directory is too small and streams.
    let at = counter_of(&p.dir);
    let r = snapctl(
        &reg.url,
        &[
            "pull-restore",
            "--detach",
            "--stage",
            "auto",
            "--memory-stage-dir",
            tiny.to_str().unwrap(),
            "t/st:full",
        ],
    )
    .ok()
    .json();
    let reason = r["stage"]["reason"].as_str().unwrap();
    assert!(r["stage"]["staged_in"].is_null(), "{r}");
    assert!(
        reason.starts_with("streamed") && reason.contains("free in the memory directory"),
        "{reason}"
    );
    wait_counting(&p.dir, at + 3);
    assert!(p.verify(pid).starts_with("ok"));
}
