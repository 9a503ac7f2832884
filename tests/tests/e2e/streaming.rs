//! `snapctl checkpoint` and `snapctl pull-restore` with a real CRIU: the process
//! continues with its state, failures leave it running, bad bytes never resume.

use std::io::{BufRead, BufReader, Write};
use std::time::{Duration, Instant};

use crate::support::*;

fn counter_of(dir: &std::path::Path) -> u64 {
    std::fs::read_to_string(dir.join("state"))
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn wait_counting(dir: &std::path::Path, above: u64) -> u64 {
    wait_for(Duration::from_secs(30), || {
        (counter_of(dir) > above).then(|| counter_of(dir))
    })
    .unwrap_or_else(|| panic!("counter stuck at {} (wanted > {above})", counter_of(dir)))
}

#[test]
fn checkpoint_then_restore_continues_counting_and_second_restore_uses_the_cache() {
    let _lock = criu_lock();
    let t = tempfile::tempdir().unwrap();
    let reg = Registry::start(&t.path().join("reg"));
    let cache = t.path().join("cache");
    let mut p = TestProc::hold(&t.path().join("proc"), 96, 11, 2, 32);
    let pid = p.pid();
    let dir = p.dir.clone();

    let ck = snapctl(
        &reg.url,
        &["checkpoint", "--pid", &pid.to_string(), "t/ck:v1"],
    )
    .ok()
    .json();
    assert!(ck["freeze_ms"].as_f64().unwrap() > 0.0, "{ck}");
    assert!(ck["bytes_total"].as_u64().unwrap() > 96 << 20);
    assert!(ck["zero_bytes"].as_u64().unwrap() >= 31 << 20, "{ck}");
    let _ = p.child.wait(); // CRIU killed it after the commit; free the PID
    let at_checkpoint = counter_of(&dir);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        counter_of(&dir),
        at_checkpoint,
        "the original should be gone"
    );

    let inspect = snapctl(&reg.url, &["inspect", "t/ck:v1"]).ok().json();
    assert_eq!(inspect["layers"][0]["kind"], "process");

    let r = snapctl_cached(&reg.url, &cache, &["pull-restore", "--detach", "t/ck:v1"])
        .ok()
        .json();
    assert_eq!(r["pid"], pid);
    assert!(r["chunks_transferred"].as_u64().unwrap() > 0);
    // The 32 MiB of zero pages stay off the pipe; the verify below proves they still
    // read as zeros (and the pattern around them is intact).
    assert!(
        r["zero_bytes_left_out"].as_u64().unwrap() >= 31 << 20,
        "{r}"
    );
    // The serving profile names the pages file first (the most bytes, all of the
    // process's non-zero pages), and its waits fit inside its time.
    let pages = &r["serving"][0];
    assert!(pages["file"].as_str().unwrap().starts_with("pages-"), "{r}");
    assert!(pages["bytes"].as_u64().unwrap() >= 48 << 20, "{r}");
    let waits = pages["waiting_for_chunks_seconds"].as_f64().unwrap()
        + pages["writing_to_criu_seconds"].as_f64().unwrap();
    assert!(waits <= pages["seconds"].as_f64().unwrap() + 0.01, "{r}");
    let restored = Restored(pid);
    wait_counting(&dir, at_checkpoint + 5);
    assert!(
        p.verify(pid).starts_with("ok"),
        "memory differs after restore"
    );
    drop(restored);

    // Same node, same snapshot: every chunk comes from the node cache.
    let again = snapctl_cached(&reg.url, &cache, &["pull-restore", "--detach", "t/ck:v1"])
        .ok()
        .json();
    let _restored = Restored(pid);
    assert_eq!(again["chunks_transferred"], 0, "{again}");
    assert!(again["chunks_cached"].as_u64().unwrap() > 0);
    let now = counter_of(&dir);
    wait_counting(&dir, now + 3);
    assert!(p.verify(pid).starts_with("ok"));

    let ls = snapctl_cached(&reg.url, &cache, &["cache", "ls"])
        .ok()
        .json();
    assert!(ls["usage"]["chunks"].as_u64().unwrap() > 0);
    let pruned = snapctl_cached(&reg.url, &cache, &["cache", "prune", "--to", "0"])
        .ok()
        .json();
    assert_eq!(pruned["bytes_left"], 0);
}

#[test]
fn tcp_server_keeps_answering_with_its_state_after_restore() {
    let _lock = criu_lock();
    let t = tempfile::tempdir().unwrap();
    let reg = Registry::start(&t.path().join("reg"));
    let mut p = TestProc::serve(&t.path().join("srv"));
    let pid = p.pid();
    let port = p.port();
    let ask = |q: &str| {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.write_all(format!("{q}\n").as_bytes()).unwrap();
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).unwrap();
        line.trim().to_string()
    };
    assert_eq!(ask("a"), "1 a");
    assert_eq!(ask("b"), "2 b");
    snapctl(
        &reg.url,
        &["checkpoint", "--pid", &pid.to_string(), "t/srv:v1"],
    )
    .ok();
    let _ = p.child.wait();
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "the server should be gone"
    );
    let cache = t.path().join("cache");
    snapctl_cached(&reg.url, &cache, &["pull-restore", "--detach", "t/srv:v1"]).ok();
    let _restored = Restored(pid);
    assert_eq!(ask("c"), "3 c", "restored server lost its count");
}

#[test]
fn spooled_checkpoint_restores_too() {
    let _lock = criu_lock();
    let t = tempfile::tempdir().unwrap();
    let reg = Registry::start(&t.path().join("reg"));
    let mut p = TestProc::hold(&t.path().join("proc"), 16, 5, 0, 0);
    let pid = p.pid();
    let spool = t.path().join("spool");
    let ck = snapctl(
        &reg.url,
        &[
            "checkpoint",
            "--pid",
            &pid.to_string(),
            "--spool",
            spool.to_str().unwrap(),
            "t/sp:v1",
        ],
    )
    .ok()
    .json();
    assert!(ck["freeze_ms"].as_f64().is_some(), "{ck}");
    let _ = p.child.wait();
    let at = counter_of(&p.dir);
    snapctl_cached(
        &reg.url,
        &t.path().join("cache"),
        &["pull-restore", "--detach", "t/sp:v1"],
    )
    .ok();
    let _restored = Restored(pid);
    wait_counting(&p.dir, at + 3);
    assert!(p.verify(pid).starts_with("ok"));
}

/// A memory directory of its own on /dev/shm (a tmpfs), removed at the end.
fn memory_dir() -> MemoryDir {
    MemoryDir(
        tempfile::Builder::new()
            .prefix("snapreg-e2e-spool-")
            .tempdir_in("/dev/shm")
            .unwrap(),
    )
}

/// A memory directory in /dev/shm for `--memory-spool-dir`. On drop the huge-page
/// tmpfs that `--spool-huge-pages` mounts in it is unmounted, then the directory
/// removed.
struct MemoryDir(tempfile::TempDir);

impl MemoryDir {
    fn path(&self) -> &std::path::Path {
        self.0.path()
    }
}

impl Drop for MemoryDir {
    fn drop(&mut self) {
        let spool = self.0.path().join("snapctl-spool-huge");
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(spool)
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// The super options of the topmost mount at `path`, if one is there.
fn mount_options(path: &std::path::Path) -> Option<String> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let path = path.to_str().unwrap();
    mountinfo.lines().rev().find_map(|l| {
        let (fields, rest) = l.split_once(" - ")?;
        (fields.split(' ').nth(4)? == path).then(|| rest.split(' ').nth(2).unwrap_or("").into())
    })
}

/// `*.img` files in the checkpoint directories under `spool`.
fn spooled_images(spool: &std::path::Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(spool)
        .into_iter()
        .flatten()
        .flatten()
        .flat_map(|d| std::fs::read_dir(d.path()).into_iter().flatten().flatten())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "img"))
        .collect()
}

/// `snapctl checkpoint --spool auto --memory-spool-dir DIR [extra...]`; its JSON report.
fn checkpoint_auto(
    registry: &str,
    pid: u32,
    dir: &std::path::Path,
    tag: &str,
    extra: &[&str],
) -> serde_json::Value {
    let pid = pid.to_string();
    let dir = dir.to_str().unwrap();
    let args = ["checkpoint", "--pid", &pid, "--spool", "auto"];
    let args = [&args[..], extra, &["--memory-spool-dir", dir, tag]].concat();
    snapctl(registry, &args).ok().json()
}

/// The checkpoint report `ck` spooled into `spool`, its tree fitting there, with
/// `pages` in the route's reason.
fn assert_spooled_to(ck: &serde_json::Value, spool: &std::path::Path, pages: &str) {
    assert_eq!(ck["route"]["spooled_to"], spool.to_str().unwrap(), "{ck}");
    let reason = ck["route"]["reason"].as_str().unwrap();
    assert!(reason.contains("fits") && reason.contains(pages), "{ck}");
}

/// Once the checkpoint killed `p`: `pull-restore TAG`, then the restored process counts
/// on and verifies its memory.
fn restores_and_counts_on(registry: &str, p: &mut TestProc, tag: &str) {
    let pid = p.pid();
    let _ = p.child.wait();
    let at = counter_of(&p.dir);
    snapctl(registry, &["pull-restore", "--detach", tag]).ok();
    let _restored = Restored(pid);
    wait_counting(&p.dir, at + 3);
    assert!(p.verify(pid).starts_with("ok"));
}

#[test]
fn auto_spool_dumps_into_memory_when_the_tree_fits_and_keeps_nothing_there() {
    let _lock = criu_lock();
    let t = tempfile::tempdir().unwrap();
    let memory = memory_dir();
    let reg = Registry::start(&t.path().join("reg"));
    let mut p = TestProc::hold(&t.path().join("proc"), 64, 21, 0, 16);
    let pid = p.pid();
    let ck = checkpoint_auto(&reg.url, pid, memory.path(), "t/auto:v1", &[]);
    let spool = memory.path().join("snapctl-spool");
    assert_spooled_to(&ck, &spool, "small pages");
    // By default snapctl mounts nothing: the spool is a plain directory.
    assert_eq!(mount_options(&spool), None);
    let left = spooled_images(&spool);
    assert!(
        left.is_empty(),
        "images left in memory after the push: {left:?}"
    );
    restores_and_counts_on(&reg.url, &mut p, "t/auto:v1");
}

/// `--spool-huge-pages`: the dump goes into a tmpfs of huge pages that snapctl mounts
/// (huge_spool.rs), and the snapshot restores.
#[test]
fn auto_spool_with_huge_pages_dumps_into_a_huge_page_tmpfs_it_mounts() {
    let _lock = criu_lock();
    let t = tempfile::tempdir().unwrap();
    let memory = memory_dir();
    let reg = Registry::start(&t.path().join("reg"));
    let mut p = TestProc::hold(&t.path().join("proc"), 64, 26, 0, 16);
    let huge = ["--spool-huge-pages"];
    let ck = checkpoint_auto(&reg.url, p.pid(), memory.path(), "t/huge:v1", &huge);
    let spool = memory.path().join("snapctl-spool-huge");
    assert_spooled_to(&ck, &spool, "huge pages");
    let options = mount_options(&spool).unwrap_or_else(|| panic!("no mount at the spool: {ck}"));
    assert!(options.contains("huge=always"), "{options}");
    let left = spooled_images(&spool);
    assert!(left.is_empty(), "images left after the push: {left:?}");
    restores_and_counts_on(&reg.url, &mut p, "t/huge:v1");
}

/// An operator's own mount where the huge-page spool goes (here without huge pages)
/// is used as it is: snapctl mounts nothing over it, and says so. Huge pages asked for
/// with `SNAPCTL_SPOOL_HUGE_PAGES=1`.
#[test]
fn auto_spool_with_huge_pages_uses_a_mount_already_there_as_it_is() {
    let _lock = criu_lock();
    let t = tempfile::tempdir().unwrap();
    let memory = memory_dir();
    let spool = memory.path().join("snapctl-spool-huge");
    let _unmount = Tmpfs::mount(&spool, "512m");
    let reg = Registry::start(&t.path().join("reg"));
    let mut p = TestProc::hold(&t.path().join("proc"), 64, 25, 0, 0);
    // Asked for through the environment, as the chart asks (and with a 1, as people do).
    let pid = p.pid().to_string();
    let ck = std::process::Command::new(bin("snapctl"))
        .args([
            "--registry",
            &reg.url,
            "--json",
            "checkpoint",
            "--pid",
            &pid,
        ])
        .args(["--spool", "auto", "--memory-spool-dir"])
        .arg(memory.path())
        .arg("t/own:v1")
        .env("SNAPCTL_SPOOL_HUGE_PAGES", "1")
        .output()
        .unwrap();
    let ck = Out::from(ck).ok().json();
    assert_spooled_to(&ck, &spool, "the tmpfs mounted there, without huge pages");
    let options = mount_options(&spool).unwrap();
    assert!(!options.contains("huge="), "{options}");
    restores_and_counts_on(&reg.url, &mut p, "t/own:v1");
}

/// CRIU fails halfway (the spool directory fills up): the tasks resume with their
/// memory intact, no partial image is left in the directory, nothing is tagged.
#[test]
fn a_spooled_dump_that_fills_its_directory_fails_and_the_process_runs_on() {
    let _lock = criu_lock();
    let t = tempfile::tempdir().unwrap();
    let tiny = t.path().join("tiny");
    let _unmount = Tmpfs::mount(&tiny, "16m");
    let reg = Registry::start(&t.path().join("reg"));
    let p = TestProc::hold(&t.path().join("proc"), 64, 24, 0, 0);
    let pid = p.pid();
    let out = snapctl(
        &reg.url,
        &[
            "checkpoint",
            "--pid",
            &pid.to_string(),
            "--spool",
            tiny.to_str().unwrap(),
            "t/full:v1",
        ],
    );
    assert_ne!(out.code, 0, "the dump cannot fit: {}", out.stdout);
    assert!(out.stderr.contains("criu dump failed"), "{}", out.stderr);
    let left = spooled_images(&tiny);
    assert!(left.is_empty(), "partial images left: {left:?}");
    assert_eq!(snapctl(&reg.url, &["inspect", "t/full:v1"]).code, 3);
    let now = counter_of(&p.dir);
    wait_counting(&p.dir, now + 3);
    assert!(p.verify(pid).starts_with("ok"));
}

#[test]
fn auto_spool_streams_when_the_memory_directory_is_too_small() {
    let _lock = criu_lock();
    let t = tempfile::tempdir().unwrap();
    let tiny = t.path().join("tiny");
    let _unmount = Tmpfs::mount(&tiny, "16m");
    let reg = Registry::start(&t.path().join("reg"));
    let mut p = TestProc::hold(&t.path().join("proc"), 64, 22, 0, 0);
    let pid = p.pid();
    let ck = checkpoint_auto(&reg.url, pid, &tiny, "t/auto:v2", &[]);
    let route = &ck["route"];
    assert!(route["spooled_to"].is_null(), "{ck}");
    let reason = route["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("streamed") && reason.contains("free in the memory directory"),
        "{reason}"
    );
    restores_and_counts_on(&reg.url, &mut p, "t/auto:v2");
}

/// A spooled dump has killed the tasks before its push: when the registry dies then,
/// the images stay in memory, the error names them, and a later push restores.
#[test]
fn registry_killed_after_an_auto_spooled_dump_keeps_the_images_for_a_push() {
    let _lock = criu_lock();
    let t = tempfile::tempdir().unwrap();
    let memory = memory_dir();
    let mut reg = Registry::start(&t.path().join("reg"));
    let mut p = TestProc::hold(&t.path().join("proc"), 256, 23, 0, 0);
    let pid = p.pid();
    let ck = std::process::Command::new(bin("snapctl"))
        .args([
            "--registry",
            &reg.url,
            "checkpoint",
            "--pid",
            &pid.to_string(),
        ])
        .args(["--spool", "auto", "--memory-spool-dir"])
        .arg(memory.path())
        .arg("t/kept:v1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The spool directory appears just before CRIU starts: the registry dies then.
    let spool = memory.path().join("snapctl-spool");
    wait_for(Duration::from_secs(30), || {
        std::fs::read_dir(&spool).ok()?.next().map(|_| ())
    })
    .expect("no spool directory appeared");
    reg.kill9();
    let out = ck.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    let _ = p.child.wait();
    let kept = stderr
        .split("the images are kept in ")
        .nth(1)
        .and_then(|s| s.split(" — ").next())
        .unwrap_or_else(|| panic!("the error does not say where the images are: {stderr}"));
    assert!(stderr.contains("snapctl push"), "{stderr}");
    assert!(
        !spooled_images(&memory.path().join("snapctl-spool")).is_empty(),
        "{stderr}"
    );
    let at = counter_of(&p.dir);
    reg.restart();
    snapctl(&reg.url, &["push", kept, "t/kept:v1"]).ok();
    snapctl(&reg.url, &["pull-restore", "--detach", "t/kept:v1"]).ok();
    let _restored = Restored(pid);
    wait_counting(&p.dir, at + 3);
    assert!(p.verify(pid).starts_with("ok"));
}

#[test]
fn registry_killed_mid_checkpoint_leaves_process_running_and_nothing_visible() {
    let _lock = criu_lock();
    let t = tempfile::tempdir().unwrap();
    let mut reg = Registry::start(&t.path().join("reg"));
    let p = TestProc::hold(&t.path().join("proc"), 768, 12, 0, 0);
    let pid = p.pid();
    let ck = std::process::Command::new(bin("snapctl"))
        .args([
            "--registry",
            &reg.url,
            "--json",
            "checkpoint",
            "--pid",
            &pid.to_string(),
            "--stall-timeout",
            "5s",
            "t/kill:v1",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    reg.kill9();
    let out = ck.wait_with_output().unwrap();
    assert!(
        !out.status.success(),
        "checkpoint claimed success: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("criu dump failed") || stderr.contains("reach"),
        "{stderr}"
    );
    let now = counter_of(&p.dir);
    wait_counting(&p.dir, now + 3);
    assert!(p.verify(pid).starts_with("ok"));
    reg.restart();
    assert_eq!(
        snapctl(&reg.url, &["inspect", "t/kill:v1"]).code,
        3,
        "a snapshot became visible"
    );
}

#[test]
fn stalled_registry_fails_the_dump_in_bounded_time_and_releases_the_process() {
    let _lock = criu_lock();
    let t = tempfile::tempdir().unwrap();
    let reg = Registry::start(&t.path().join("reg"));
    let p = TestProc::hold(&t.path().join("proc"), 768, 13, 0, 0);
    let pid = p.pid();
    let reg_pid = reg.pid();
    let started = Instant::now();
    let ck = std::process::Command::new(bin("snapctl"))
        .args([
            "--registry",
            &reg.url,
            "--json",
            "checkpoint",
            "--pid",
            &pid.to_string(),
            "--stall-timeout",
            "3s",
            "t/stall:v1",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: kill takes plain integers; the PID is a process this test started.
    unsafe { libc::kill(reg_pid as i32, libc::SIGSTOP) };
    let out = ck.wait_with_output().unwrap();
    let elapsed = started.elapsed();
    // SAFETY: kill takes plain integers; the PID is a process this test started.
    unsafe { libc::kill(reg_pid as i32, libc::SIGCONT) };
    assert!(
        !out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(elapsed < Duration::from_secs(60), "took {elapsed:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no progress") || stderr.contains("criu dump failed"),
        "{stderr}"
    );
    let now = counter_of(&p.dir);
    wait_counting(&p.dir, now + 3);
    assert!(p.verify(pid).starts_with("ok"));
    assert_eq!(snapctl(&reg.url, &["inspect", "t/stall:v1"]).code, 3);
}

#[test]
fn corrupt_chunk_fails_restore_before_the_process_resumes() {
    let _lock = criu_lock();
    let t = tempfile::tempdir().unwrap();
    let reg = Registry::start(&t.path().join("reg"));
    let mut p = TestProc::hold(&t.path().join("proc"), 32, 14, 0, 0);
    let pid = p.pid();
    let ck = snapctl(
        &reg.url,
        &["checkpoint", "--pid", &pid.to_string(), "t/bad:v1"],
    )
    .ok()
    .json();
    let _ = p.child.wait();
    let chunk = reg
        .pages_chunks(ck["digest"].as_str().unwrap())
        .pop()
        .unwrap();
    reg.flip_a_bit_of_chunk(&chunk);

    let out = snapctl_cached(
        &reg.url,
        &t.path().join("cache"),
        &["pull-restore", "--detach", "t/bad:v1"],
    );
    let _guard = Restored(pid);
    assert_eq!(out.code, 5, "{}", out.stderr);
    assert!(out.stderr.contains(&chunk), "{}", out.stderr);
    std::thread::sleep(Duration::from_millis(300));
    assert!(!pid_alive(pid), "a restored process was left behind");
    let before = counter_of(&p.dir);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(counter_of(&p.dir), before, "something is still counting");
}

#[test]
fn huge_page_memory_is_refused_at_checkpoint() {
    let _lock = criu_lock();
    let t = tempfile::tempdir().unwrap();
    let reg = Registry::start(&t.path().join("reg"));
    let before = std::fs::read_to_string("/proc/sys/vm/nr_hugepages").unwrap();
    std::fs::write("/proc/sys/vm/nr_hugepages", "4").unwrap();
    struct Restore(String);
    impl Drop for Restore {
        fn drop(&mut self) {
            let _ = std::fs::write("/proc/sys/vm/nr_hugepages", self.0.trim());
        }
    }
    let _r = Restore(before);
    let p = TestProc::spawn(
        &t.path().join("proc"),
        &["hold", "--mib", "1", "--huge-mib", "2"],
    );
    p.wait_counter_above(1);
    let out = snapctl(
        &reg.url,
        &["checkpoint", "--pid", &p.pid().to_string(), "t/huge:v1"],
    );
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("huge-page"), "{}", out.stderr);
    let now = p.counter();
    p.wait_counter_above(now + 2);
}

#[test]
fn restore_of_a_sibling_snapshot_fetches_only_what_differs() {
    let _lock = criu_lock();
    let t = tempfile::tempdir().unwrap();
    let reg = Registry::start(&t.path().join("reg"));
    let cache = t.path().join("cache");
    // Two runs of one program holding the same 64 MiB at different offsets.
    let mut a = TestProc::hold(&t.path().join("a"), 64, 21, 1, 0);
    let mut b = TestProc::hold(&t.path().join("b"), 64, 21, 5, 0);
    let (pa, pb) = (a.pid(), b.pid());
    snapctl(
        &reg.url,
        &["checkpoint", "--pid", &pa.to_string(), "t/sib:a"],
    )
    .ok();
    let _ = a.child.wait();
    snapctl(
        &reg.url,
        &["checkpoint", "--pid", &pb.to_string(), "t/sib:b"],
    )
    .ok();
    let _ = b.child.wait();

    snapctl_cached(&reg.url, &cache, &["pull-restore", "--detach", "t/sib:a"]).ok();
    let _ra = Restored(pa);
    let r = snapctl_cached(&reg.url, &cache, &["pull-restore", "--detach", "t/sib:b"])
        .ok()
        .json();
    let _rb = Restored(pb);
    let (fetched, total) = (
        r["chunks_transferred"].as_u64().unwrap(),
        r["chunks_total"].as_u64().unwrap(),
    );
    assert!(
        fetched * 3 < total,
        "sibling restore fetched {fetched} of {total} chunks"
    );
    assert!(r["chunks_cached"].as_u64().unwrap() > 0);
    let now = counter_of(&b.dir);
    wait_counting(&b.dir, now + 3);
    assert!(b.verify(pb).starts_with("ok"));
}

/// Nearest region first: C holds the snapshot only partly (chunks lost there), A
/// holds all of it; a node asking [C, A] restores, taking from A only what C lacks.
#[test]
fn restore_from_nearest_registry_falls_back_per_chunk() {
    let _lock = criu_lock();
    let t = tempfile::tempdir().unwrap();
    let c = Registry::start(&t.path().join("c"));
    let a = Registry::start_with(&t.path().join("a"), &["--peer", &format!("c={}", c.url)]);
    let mut p = TestProc::hold(&t.path().join("proc"), 32, 31, 0, 0);
    let pid = p.pid();
    snapctl(
        &a.url,
        &["checkpoint", "--pid", &pid.to_string(), "t/near:v1"],
    )
    .ok();
    let _ = p.child.wait();
    let at = counter_of(&p.dir);
    wait_for(Duration::from_secs(30), || {
        (snapctl(&c.url, &["inspect", "t/near:v1"]).code == 0).then_some(())
    })
    .expect("the snapshot never reached C");
    // C loses every other chunk object.
    let mut objects: Vec<_> = read_tree(&c.store().join("chunks")).into_keys().collect();
    objects.sort();
    for o in objects.iter().step_by(2) {
        std::fs::remove_file(c.store().join("chunks").join(o)).unwrap();
    }

    let both = format!("{},{}", c.url, a.url);
    let r = snapctl_cached(
        &both,
        &t.path().join("cache"),
        &["pull-restore", "--detach", "t/near:v1"],
    )
    .ok()
    .json();
    let _restored = Restored(pid);
    let by = &r["chunks_by_registry"];
    assert!(
        by[&c.url].as_u64().unwrap_or(0) > 0 && by[&a.url].as_u64().unwrap_or(0) > 0,
        "{r}"
    );
    wait_counting(&p.dir, at + 3);
    assert!(p.verify(pid).starts_with("ok"));
}

#[test]
fn prefetch_then_restore_fetches_nothing() {
    let _lock = criu_lock();
    let t = tempfile::tempdir().unwrap();
    let reg = Registry::start(&t.path().join("reg"));
    let cache = t.path().join("cache");
    let mut p = TestProc::hold(&t.path().join("proc"), 24, 41, 0, 4);
    let pid = p.pid();
    snapctl(
        &reg.url,
        &["checkpoint", "--pid", &pid.to_string(), "t/pre:v1"],
    )
    .ok();
    let _ = p.child.wait();
    let pre = snapctl_cached(&reg.url, &cache, &["prefetch", "t/pre:v1"])
        .ok()
        .json();
    assert_eq!(pre["chunks_transferred"], pre["chunks_total"], "{pre}");
    let r = snapctl_cached(&reg.url, &cache, &["pull-restore", "--detach", "t/pre:v1"])
        .ok()
        .json();
    let _restored = Restored(pid);
    assert_eq!(r["chunks_transferred"], 0, "{r}");
    assert!(p.verify(pid).starts_with("ok"));
}

/// An established connection survives: the client's socket stays open across the
/// checkpoint and the restore (CRIU's TCP repair, nftables network lock).
#[test]
fn established_tcp_connection_survives_checkpoint_and_restore() {
    let _lock = criu_lock();
    let t = tempfile::tempdir().unwrap();
    let reg = Registry::start(&t.path().join("reg"));
    let mut p = TestProc::serve(&t.path().join("srv"));
    let pid = p.pid();
    let conn = std::net::TcpStream::connect(("127.0.0.1", p.port())).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut writer = conn;
    let mut ask = |q: &str| {
        writer.write_all(format!("{q}\n").as_bytes()).unwrap();
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        line.trim().to_string()
    };
    assert_eq!(ask("a"), "1 a");
    let ck = snapctl(
        &reg.url,
        &[
            "checkpoint",
            "--pid",
            &pid.to_string(),
            "--tcp-established",
            "t/tcp:v1",
        ],
    )
    .ok()
    .json();
    let _ = p.child.wait();
    let inspect = snapctl(&reg.url, &["inspect", "t/tcp:v1"]).ok().json();
    assert_eq!(
        inspect["criu"]["restore_options"],
        serde_json::json!(["--tcp-established"]),
        "{ck}"
    );
    snapctl_cached(
        &reg.url,
        &t.path().join("cache"),
        &["pull-restore", "--detach", "t/tcp:v1"],
    )
    .ok();
    let _restored = Restored(pid);
    assert_eq!(
        ask("b"),
        "2 b",
        "the established connection did not survive"
    );
}

/// CI hosts have no NVIDIA driver: `--cuda` says so and leaves the process alone.
#[test]
fn cuda_checkpoint_without_a_driver_is_a_clear_error() {
    if std::path::Path::new("/proc/driver/nvidia").exists() {
        return; // a GPU host: covered by the device run (bench/gpu)
    }
    let t = tempfile::tempdir().unwrap();
    let reg = Registry::start(&t.path().join("reg"));
    let p = TestProc::hold(&t.path().join("proc"), 1, 3, 0, 0);
    let out = snapctl(
        &reg.url,
        &[
            "checkpoint",
            "--cuda",
            "--pid",
            &p.pid().to_string(),
            "t/gpu:v1",
        ],
    );
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(out.stderr.contains("no NVIDIA driver"), "{}", out.stderr);
    let now = p.counter();
    p.wait_counter_above(now + 2);
    assert_eq!(snapctl(&reg.url, &["inspect", "t/gpu:v1"]).code, 3);
}
