//! `pull-restore --lazy`: CRIU's lazy restore with snapctl as the page server
//! (client/src/lazy_pages.rs), against a real CRIU, real userfaultfd and a real
//! process that must keep counting with every byte of its memory intact.

use std::time::Duration;

use crate::support::*;

#[test]
fn a_lazy_restore_resumes_before_its_pages_and_keeps_its_memory() {
    let _lock = criu_lock();
    let t = tempfile::tempdir().unwrap();
    let reg = Registry::start(&t.path().join("reg"));
    // 64 MiB of seeded pattern, 16 MiB of zeros.
    let mut p = TestProc::hold(&t.path().join("proc"), 64, 21, 0, 16);
    let pid = p.pid();
    snapctl(
        &reg.url,
        &["checkpoint", "--pid", &pid.to_string(), "t/lazy:v1"],
    )
    .ok();
    let _ = p.child.wait(); // CRIU killed it after the commit; free the PID
    let at_checkpoint = p.counter();

    let r = snapctl_cached(
        &reg.url,
        &t.path().join("cache"),
        &["pull-restore", "--detach", "--lazy", "t/lazy:v1"],
    )
    .ok()
    .json();
    let _restored = Restored(pid);
    assert_eq!(r["pid"], pid);
    let lazy = &r["lazy"];
    // The pattern went through the page server, not CRIU's pipe; the zero pages of
    // this one-task tree were never served at all.
    assert!(lazy["lazy_bytes"].as_u64().unwrap() >= 60 << 20, "{r}");
    assert_eq!(lazy["bytes_served"], lazy["lazy_bytes"], "{r}");
    assert!(lazy["requests"].as_u64().unwrap() > 0, "{r}");
    assert!(
        r["zero_bytes_left_out"].as_u64().unwrap() >= 15 << 20,
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
    let ck = snapctl(
        &reg.url,
        &["checkpoint", "--pid", &pid.to_string(), "t/lazybad:v1"],
    )
    .ok()
    .json();
    let _ = p.child.wait();
    // A chunk from the middle of the pages file: inside the pattern, a lazy run.
    let chunks = reg.pages_chunks(ck["digest"].as_str().unwrap());
    let chunk = chunks[chunks.len() / 2].clone();
    reg.flip_a_bit_of_chunk(&chunk);

    let out = snapctl_cached(
        &reg.url,
        &t.path().join("cache"),
        &["pull-restore", "--detach", "--lazy", "t/lazybad:v1"],
    );
    let _guard = Restored(pid);
    assert_ne!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stderr.contains(&chunk) && out.stderr.contains("killed"),
        "{}",
        out.stderr
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !pid_alive(pid),
        "a tree with missing pages was left running"
    );
    let before = p.counter();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(p.counter(), before, "something is still counting");
}
