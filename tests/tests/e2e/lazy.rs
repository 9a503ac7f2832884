//! `pull-restore --lazy` and `--fill-first`: CRIU's lazy restore with snapctl as the
//! lazy-pages daemon (client/src/lazy_pages, client/src/restore/lazy), against a real
//! CRIU, real userfaultfd and a real process that must keep counting with every byte
//! of its memory intact.

use std::time::Duration;

use crate::support::*;

/// Checkpoints the counting process `p` as `reference` and frees its PID (CRIU kills
/// it after the commit); the checkpoint's report and the counter it stopped at.
fn checkpoint(reg: &Registry, p: &mut TestProc, reference: &str) -> (serde_json::Value, u64) {
    p.wait_counter_above(2);
    let pid = p.pid().to_string();
    let ck = snapctl(&reg.url, &["checkpoint", "--pid", &pid, reference])
        .ok()
        .json();
    let _ = p.child.wait();
    (ck, p.counter())
}

#[test]
fn a_lazy_restore_resumes_before_its_pages_and_keeps_its_memory() {
    let _lock = criu_lock();
    let t = tempfile::tempdir().unwrap();
    let reg = Registry::start(&t.path().join("reg"));
    // 64 MiB of seeded pattern with every other 64 KiB zeros (zero extents cut it into
    // pieces smaller than a chunk, as in a GPU worker's device memory), 16 MiB of zeros.
    let dir = t.path().join("proc");
    let args = ["hold", "--mib", "64", "--seed", "21", "--zero-mib", "16"];
    let mut p = TestProc::spawn(&dir, &[&args[..], &["--holes-kib", "64"]].concat());
    let pid = p.pid();
    let (_, at_checkpoint) = checkpoint(&reg, &mut p, "t/lazy:v1");

    // A fetch budget smaller than one largest chunk is refused before anything runs.
    let small = snapctl(
        &reg.url,
        &["pull-restore", "--fetch-memory", "1M", "t/lazy:v1"],
    );
    assert_eq!(small.code, 2, "{}", small.stderr);
    assert!(
        small.stderr.contains("between 2M and 4G"),
        "{}",
        small.stderr
    );

    // 256 MiB of fetch budget: 128 fetches of 2 MiB chunks, and a fill worker for each.
    let r = snapctl_cached(
        &reg.url,
        &t.path().join("cache"),
        &[
            "pull-restore",
            "--detach",
            "--lazy",
            "--fetch-memory",
            "256M",
            "t/lazy:v1",
        ],
    )
    .ok()
    .json();
    let _restored = Restored(pid);
    assert_eq!(r["pid"], pid);
    assert_eq!(r["lazy"]["fillers"], 128, "{r}");
    let peak = r["scheduler"]["peak_in_flight"].as_u64().unwrap();
    assert!(peak > 0 && peak <= 128, "{r}");
    let lazy = &r["lazy"];
    // The pattern went through the daemon, not CRIU's pipe, each page exactly once
    // (by the fill or for a fault); the zero pages of this one-task tree were never
    // served at all.
    let lazy_bytes = lazy["lazy_bytes"].as_u64().unwrap();
    assert!(lazy_bytes >= 60 << 20, "{r}");
    let copied = lazy["bytes_filled"].as_u64().unwrap() + lazy["bytes_on_fault"].as_u64().unwrap();
    assert_eq!(copied, lazy_bytes, "{r}");
    assert!(
        r["zero_bytes_left_out"].as_u64().unwrap() >= 15 << 20,
        "{r}"
    );
    // A claim took every piece of its chunk: each fill worker fetched a chunk of its
    // own instead of waiting on another's.
    let (claims, pieces) = (lazy["fill_claims"].as_u64(), lazy["fill_pieces"].as_u64());
    assert!(
        claims.unwrap() > 0 && pieces.unwrap() > claims.unwrap(),
        "{r}"
    );
    let resumed = r["restore_seconds"].as_f64().unwrap();
    let all_in = lazy["all_present_seconds"].as_f64().unwrap();
    assert!(resumed <= all_in, "{r}");
    p.wait_counter_above(at_checkpoint + 3);
    assert!(
        p.verify(pid).starts_with("ok"),
        "memory differs after a lazy restore"
    );
}

#[test]
fn a_lazy_page_that_does_not_verify_kills_the_tree_instead_of_serving_zeros() {
    let _lock = criu_lock();
    let t = tempfile::tempdir().unwrap();
    let reg = Registry::start(&t.path().join("reg"));
    let mut p = TestProc::hold(&t.path().join("proc"), 32, 23, 0, 0);
    let pid = p.pid();
    let (ck, _) = checkpoint(&reg, &mut p, "t/lazybad:v1");
    // A chunk from the middle of the pages file: inside the pattern, a lazy run.
    let chunks = reg.pages_chunks(ck["digest"].as_str().unwrap());
    let chunk = chunks[chunks.len() / 2].clone();
    reg.flip_a_bit_of_chunk(&chunk);

    // Resumed first (--lazy) or held until every page is in (--fill-first): either
    // way the tree is killed, not left reading zeros.
    for mode in ["--lazy", "--fill-first"] {
        let out = snapctl_cached(
            &reg.url,
            &t.path().join("cache"),
            &["pull-restore", "--detach", mode, "t/lazybad:v1"],
        );
        let _guard = Restored(pid);
        // An integrity failure, as in a streamed restore: exit 5.
        assert_eq!(out.code, 5, "{mode}: {}", out.stderr);
        assert!(
            out.stderr.contains(&chunk) && out.stderr.contains("killed"),
            "{mode}: {}",
            out.stderr
        );
        wait_for(Duration::from_secs(10), || (!pid_alive(pid)).then_some(()))
            .unwrap_or_else(|| panic!("{mode}: a tree with missing pages was left running"));
        let before = p.counter();
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(p.counter(), before, "{mode}: something is still counting");
    }
}

#[test]
fn a_fill_first_restore_resumes_only_once_every_page_is_in() {
    let _lock = criu_lock();
    let t = tempfile::tempdir().unwrap();
    let reg = Registry::start(&t.path().join("reg"));
    let dir = t.path().join("proc");
    let args = ["hold", "--mib", "192", "--seed", "27", "--zero-mib", "8"];
    let mut p = TestProc::spawn(&dir, &[&args[..], &["--holes-kib", "64"]].concat());
    let pid = p.pid();
    let (_, at_checkpoint) = checkpoint(&reg, &mut p, "t/fill:v1");

    // When the restored process first counts, seen from here: it writes its counter
    // every 20 ms once it runs. Polled from before snapctl starts, so this clock is
    // ahead of snapctl's by the time it takes to start.
    let started = std::time::Instant::now();
    let state = dir.join("state");
    let watcher = std::thread::spawn(move || {
        wait_for(Duration::from_secs(60), || {
            let now = std::fs::read_to_string(&state).ok()?;
            let n: u64 = now.split_whitespace().next()?.parse().ok()?;
            (n > at_checkpoint).then(|| started.elapsed().as_secs_f64())
        })
    });
    // One fetch at a time: a fill of about a second, against a process that would
    // count every 20 ms if it ran.
    let r = snapctl_cached(
        &reg.url,
        &t.path().join("cache"),
        &[
            "pull-restore",
            "--detach",
            "--fill-first",
            "--fetch-memory",
            "2M",
            "t/fill:v1",
        ],
    )
    .ok()
    .json();
    let _restored = Restored(pid);
    assert_eq!(r["pid"], pid);
    assert_eq!(r["memory"], "fill-first", "{r}");
    let first_count = watcher
        .join()
        .unwrap()
        .expect("the restored process never counted");
    let lazy = &r["lazy"];
    let (fill_started, fill_ended) = (
        lazy["fill_started_seconds"].as_f64().unwrap(),
        lazy["fill_ended_seconds"].as_f64().unwrap(),
    );
    assert!(
        fill_ended - fill_started > 0.1,
        "too short a fill to tell: {r}"
    );
    assert!(
        first_count >= fill_ended,
        "the process counted at {first_count:.3}s, before the fill ended at {fill_ended:.3}s: {r}"
    );
    // Every page came through the daemon: by the fill, and for the few pages CRIU's
    // own last steps on the held tree touched.
    let lazy_bytes = lazy["lazy_bytes"].as_u64().unwrap();
    assert!(lazy_bytes >= 190 << 20, "{r}");
    let copied = lazy["bytes_filled"].as_u64().unwrap() + lazy["bytes_on_fault"].as_u64().unwrap();
    assert_eq!(copied, lazy_bytes, "{r}");
    p.wait_counter_above(at_checkpoint + 3);
    assert!(
        p.verify(pid).starts_with("ok"),
        "memory differs after a fill-first restore"
    );
}

#[test]
fn a_registry_killed_during_a_fill_first_restore_leaves_no_tree_that_ever_ran() {
    let _lock = criu_lock();
    let t = tempfile::tempdir().unwrap();
    let mut reg = Registry::start(&t.path().join("reg"));
    let mut p = TestProc::hold(&t.path().join("proc"), 512, 31, 0, 0);
    let pid = p.pid();
    let (_, at_checkpoint) = checkpoint(&reg, &mut p, "t/fillkill:v1");

    // One fetch at a time, so the fill of 512 MiB outlasts the wait below; the
    // registry dies once the node cache shows the fill under way.
    let cache = t.path().join("cache");
    let restoring = snapctl_bg(
        &reg.url,
        &[
            "--cache",
            cache.to_str().unwrap(),
            "pull-restore",
            "--detach",
            "--fill-first",
            "--fetch-memory",
            "2M",
            "t/fillkill:v1",
        ],
    );
    let cached = || {
        std::fs::read_dir(cache.join("chunks"))
            .into_iter()
            .flatten()
            .flat_map(|fan| std::fs::read_dir(fan.unwrap().path()).into_iter().flatten())
            .count()
    };
    wait_for(Duration::from_secs(60), || (cached() >= 24).then_some(())).expect("the fill started");
    reg.kill9();
    let out = finish(restoring);
    let killed = Restored(pid);
    assert_ne!(out.code, 0, "the restore succeeded without its registry");
    assert!(
        out.stderr.contains("killed")
            && out.stderr.contains("not every page came back")
            && out.stderr.contains(&reg.addr)
            && out.stderr.contains("that snapreg is running there"),
        "{}",
        out.stderr
    );
    wait_for(Duration::from_secs(10), || (!pid_alive(pid)).then_some(()))
        .expect("a tree with missing pages was left alive");
    // The held tree never ran: its counter is where the checkpoint left it.
    assert_eq!(
        p.counter(),
        at_checkpoint,
        "the tree ran before its pages were in"
    );

    // The node cache kept what it verified: the next restore, registry back, completes
    // (once the killed tree's PID is free again).
    drop(killed);
    reg.restart();
    let r = snapctl_cached(
        &reg.url,
        &cache,
        &["pull-restore", "--detach", "--fill-first", "t/fillkill:v1"],
    )
    .ok()
    .json();
    let _restored = Restored(pid);
    assert!(r["chunks_cached"].as_u64().unwrap() >= 24, "{r}");
    p.wait_counter_above(at_checkpoint + 2);
    assert!(
        p.verify(pid).starts_with("ok"),
        "memory differs after the second restore"
    );
}

#[test]
fn a_tree_that_forks_drops_and_moves_memory_while_pages_are_missing_keeps_every_byte() {
    let _lock = criu_lock();
    let t = tempfile::tempdir().unwrap();
    let reg = Registry::start(&t.path().join("reg"));
    // 256 MiB of pattern: a fill long enough for several rounds of the churn, each
    // a fork whose child reads pages still missing, a drop, a move (testproc churn).
    let p = TestProc::spawn(
        &t.path().join("proc"),
        &["churn", "--mib", "256", "--seed", "29"],
    );
    p.wait_counter_above(2);
    // Checkpointed between rounds (no child alive); it churns again once restored.
    let mut p = p;
    let pid = p.pid();
    // SAFETY: kill takes plain integers; the PID is a process this test started.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGUSR2) }, 0);
    wait_for(Duration::from_secs(30), || {
        p.dir.join("quiet").exists().then_some(())
    })
    .expect("the churn went quiet");
    snapctl(
        &reg.url,
        &["checkpoint", "--pid", &pid.to_string(), "t/churn:v1"],
    )
    .ok();
    let _ = p.child.wait();
    let at_checkpoint = p.counter();

    let r = snapctl_cached(
        &reg.url,
        &t.path().join("cache"),
        // One fetch at a time: the fill must last for several rounds of the churn
        // (with the default budget it is in before the first fork, on 2 cores).
        &[
            "pull-restore",
            "--detach",
            "--lazy",
            "--fetch-memory",
            "2M",
            "t/churn:v1",
        ],
    )
    .ok()
    .json();
    let _restored = Restored(pid);
    let lazy = &r["lazy"];
    p.wait_counter_above(at_checkpoint + 5);
    let verdict = p.verify(pid);
    assert!(
        verdict.starts_with("ok"),
        "after a lazy restore under churn: {verdict}"
    );
    // The events came while pages were missing, and the daemon followed them.
    for event in ["forks", "removes", "remaps"] {
        assert!(lazy[event].as_u64().unwrap() > 0, "no {event}: {r}");
    }
}
