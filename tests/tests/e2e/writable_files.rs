//! Files a process holds open for writing (its log, a scratch file) travel in the
//! snapshot: a restore puts them back as they were at the freeze, moving a file that
//! differs aside, so a worker that logs restores again and again on the same node.
//! Files left out keep the clear refusal.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::support::*;

fn text(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

/// The counter of the log's last `tick N PID` line.
fn last_tick(log: &str) -> u64 {
    log.lines()
        .rev()
        .find_map(|l| {
            l.strip_prefix("tick ")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

fn paths(list: &serde_json::Value) -> Vec<String> {
    let mut out: Vec<String> = list
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {list}"))
        .iter()
        .map(|f| f["path"].as_str().unwrap().to_string())
        .collect();
    out.sort();
    out
}

/// The restore report's entry for `path`.
fn put_back_of<'a>(report: &'a serde_json::Value, path: &Path) -> &'a serde_json::Value {
    report["written_files"]
        .as_array()
        .unwrap_or_else(|| panic!("no written_files: {report}"))
        .iter()
        .find(|f| f["path"] == path.to_str().unwrap())
        .unwrap_or_else(|| panic!("{} not put back: {report}", path.display()))
}

/// After a restore: the log holds exactly what it held at the freeze, then the
/// restored worker's own lines, its counter going on from where it stopped.
fn assert_log_goes_on(log: &Path, at_freeze: &str, pid: u32) {
    let last = last_tick(at_freeze);
    wait_for(Duration::from_secs(30), || {
        (last_tick(&text(log)) > last + 5).then_some(())
    })
    .unwrap_or_else(|| panic!("the restored worker does not log: {}", tail(&text(log), 5)));
    let now = text(log);
    assert!(
        now.starts_with(at_freeze),
        "the log was not put back as captured"
    );
    let next: Vec<&str> = now[at_freeze.len()..].lines().take(3).collect();
    let expected: Vec<String> = (1..=3)
        .map(|i| format!("tick {} {pid}", last + i))
        .collect();
    assert_eq!(next, expected, "the restored worker lost its counter");
}

#[test]
fn a_worker_that_logs_restores_twice_on_one_node_moving_what_differs_aside() {
    let _lock = criu_lock();
    let t = tempfile::tempdir().unwrap();
    let reg = Registry::start(&t.path().join("reg"));
    let cache = t.path().join("cache");
    let logs = t.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let (log, scratch) = (logs.join("worker.log"), logs.join("scratch.bin"));
    let p = TestProc::spawn(
        &t.path().join("proc"),
        &[
            "log",
            "--log",
            log.to_str().unwrap(),
            "--scratch",
            scratch.to_str().unwrap(),
        ],
    );
    let mut p = p;
    p.wait_counter_above(5);
    let pid = p.pid();

    let ck = snapctl(
        &reg.url,
        &["checkpoint", "--pid", &pid.to_string(), "t/log:v1"],
    )
    .ok()
    .json();
    let _ = p.child.wait();
    let at_freeze = text(&log);
    let written = &ck["written_files"];
    let want = vec![scratch.display().to_string(), log.display().to_string()];
    assert_eq!(paths(&written["captured"]), want, "{ck}");
    assert_eq!(paths(&written["left_out"]), Vec::<String>::new(), "{ck}");
    let captured_log = written["captured"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["path"] == log.to_str().unwrap())
        .unwrap();
    assert_eq!(
        captured_log["size"],
        at_freeze.len(),
        "captured at the freeze"
    );
    let inspect = snapctl(&reg.url, &["inspect", "t/log:v1"]).ok().json();
    assert!(inspect.to_string().contains("\"files\""), "{inspect}");

    // Another run on this node goes on writing to the same files.
    std::fs::OpenOptions::new()
        .append(true)
        .open(&log)
        .unwrap()
        .write_all(b"tick 999999 1\n")
        .unwrap();
    std::fs::write(&scratch, b"someone else's scratch").unwrap();
    let grown = text(&log);

    let r = snapctl_cached(&reg.url, &cache, &["pull-restore", "--detach", "t/log:v1"])
        .ok()
        .json();
    let restored = Restored(pid);
    assert_eq!(r["pid"], pid);
    let entry = put_back_of(&r, &log);
    assert_eq!(entry["action"], "moved_aside", "{r}");
    let aside = PathBuf::from(entry["moved_aside_to"].as_str().unwrap());
    assert!(
        aside
            .to_str()
            .unwrap()
            .starts_with(&format!("{}.snapreg-moved-aside-", log.display())),
        "{r}"
    );
    assert_eq!(
        text(&aside),
        grown,
        "the grown log must be kept, not overwritten"
    );
    let entry = put_back_of(&r, &scratch);
    assert_eq!(entry["action"], "moved_aside", "{r}");
    assert_eq!(
        text(Path::new(entry["moved_aside_to"].as_str().unwrap())),
        "someone else's scratch"
    );
    assert_log_goes_on(&log, &at_freeze, pid);
    let scratch_counter: u64 = text(&scratch)
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        scratch_counter > last_tick(&at_freeze),
        "scratch file went back in time"
    );
    drop(restored);

    // Second restore on the same node: the log has grown with the first one's lines.
    let grown_again = text(&log);
    let r2 = snapctl_cached(&reg.url, &cache, &["pull-restore", "--detach", "t/log:v1"])
        .ok()
        .json();
    let _restored = Restored(pid);
    let entry = put_back_of(&r2, &log);
    assert_eq!(entry["action"], "moved_aside", "{r2}");
    let aside2 = PathBuf::from(entry["moved_aside_to"].as_str().unwrap());
    assert_ne!(
        aside2, aside,
        "a second moved-aside file must not replace the first"
    );
    assert_eq!(text(&aside2), grown_again);
    assert_eq!(
        text(&aside),
        grown,
        "the first moved-aside file is untouched"
    );
    assert_log_goes_on(&log, &at_freeze, pid);
}

#[test]
fn files_left_out_keep_the_clear_refusal() {
    let _lock = criu_lock();
    let t = tempfile::tempdir().unwrap();
    let reg = Registry::start(&t.path().join("reg"));
    let log = t.path().join("worker.log");
    let mut p = TestProc::spawn(
        &t.path().join("proc"),
        &["log", "--log", log.to_str().unwrap()],
    );
    p.wait_counter_above(10);
    let pid = p.pid().to_string();
    let off = snapctl(
        &reg.url,
        &[
            "checkpoint",
            "--leave-running",
            "--no-capture-files",
            "--pid",
            &pid,
            "t/log:off",
        ],
    )
    .ok()
    .json();
    assert_eq!(
        paths(&off["written_files"]["left_out"]),
        vec![log.display().to_string()],
        "{off}"
    );
    assert!(
        off["written_files"]["captured"]
            .as_array()
            .unwrap()
            .is_empty(),
        "{off}"
    );
    let small = snapctl(
        &reg.url,
        &[
            "checkpoint",
            "--capture-files-limit",
            "64",
            "--pid",
            &pid,
            "t/log:small",
        ],
    )
    .ok()
    .json();
    let reason = small["written_files"]["left_out"][0]["reason"]
        .as_str()
        .unwrap();
    assert!(reason.contains("over the per-file limit of 64"), "{small}");
    let _ = p.child.wait();
    std::fs::OpenOptions::new()
        .append(true)
        .open(&log)
        .unwrap()
        .write_all(b"grown\n")
        .unwrap();

    for tag in ["t/log:off", "t/log:small"] {
        let r = snapctl(&reg.url, &["pull-restore", "--detach", tag]);
        assert_eq!(r.code, 4, "{tag}: {}", r.stderr);
        for needle in [
            "bytes, the image expects",
            "left out of the snapshot",
            "--capture-files-limit",
        ] {
            assert!(
                r.stderr.contains(needle),
                "{tag}: no {needle:?} in {}",
                r.stderr
            );
        }
        assert!(!pid_alive(p.pid()), "{tag}: refused, yet PID {pid} runs");
    }
    assert!(
        text(&log).ends_with("grown\n"),
        "a refused restore must not touch the file"
    );
}

/// A stock nginx from Debian, master and one worker, its access log and error log in
/// a temporary directory.
struct Nginx {
    dir: PathBuf,
    port: u16,
    master: u32,
}

impl Nginx {
    fn start(dir: &Path) -> (Nginx, std::process::Child) {
        let nginx = ["/usr/sbin/nginx", "/usr/local/sbin/nginx"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("nginx is not installed: deploy/install-build-deps.sh installs it");
        std::fs::create_dir_all(dir.join("www")).unwrap();
        std::fs::create_dir_all(dir.join("tmp")).unwrap();
        std::fs::write(dir.join("www/index.html"), "hello from nginx\n").unwrap();
        let port = free_port();
        let d = dir.display();
        let conf = format!(
            "daemon off;\nmaster_process on;\nworker_processes 1;\nuser root root;\n\
             pid {d}/nginx.pid;\nerror_log {d}/error.log notice;\n\
             events {{ worker_connections 64; }}\n\
             http {{\n  access_log {d}/access.log;\n  client_body_temp_path {d}/tmp/body;\n\
               proxy_temp_path {d}/tmp/proxy;\n  fastcgi_temp_path {d}/tmp/fastcgi;\n\
               uwsgi_temp_path {d}/tmp/uwsgi;\n  scgi_temp_path {d}/tmp/scgi;\n\
               server {{ listen 127.0.0.1:{port}; root {d}/www; }}\n}}\n"
        );
        std::fs::write(dir.join("nginx.conf"), conf).unwrap();
        let mut cmd = Command::new(nginx);
        cmd.arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .arg("-e")
            .arg(dir.join("error.log"));
        let child = spawn_detached(&mut cmd);
        let n = Nginx {
            dir: dir.to_path_buf(),
            port,
            master: child.id(),
        };
        wait_for(Duration::from_secs(20), || n.get().ok())
            .unwrap_or_else(|| panic!("nginx does not answer: {}", text(&dir.join("error.log"))));
        (n, child)
    }

    /// GET / with HTTP/1.0 (the server closes the connection: none left established).
    fn get(&self) -> std::io::Result<String> {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(b"GET /index.html HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
        let mut reply = String::new();
        s.read_to_string(&mut reply)?;
        match reply.split_once("\r\n\r\n") {
            Some((head, body)) if head.starts_with("HTTP/1.1 200") => Ok(body.to_string()),
            _ => Err(std::io::Error::other(format!("bad reply: {reply:?}"))),
        }
    }

    fn access_log(&self) -> PathBuf {
        self.dir.join("access.log")
    }

    fn access_lines(&self) -> usize {
        text(&self.access_log()).lines().count()
    }

    /// The master's workers.
    fn workers(&self) -> Vec<u32> {
        let m = self.master;
        text(Path::new(&format!("/proc/{m}/task/{m}/children")))
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }

    /// Serves a request and logs it.
    fn serves_and_logs(&self) {
        let before = self.access_lines();
        assert_eq!(self.get().unwrap(), "hello from nginx\n");
        wait_for(Duration::from_secs(10), || {
            (self.access_lines() > before).then_some(())
        })
        .unwrap_or_else(|| panic!("nginx served but did not log: {}", text(&self.access_log())));
    }
}

/// Kills a restored nginx tree (not our children): the master first (so it cannot
/// start another worker), then its workers, each gone before the PIDs are restored
/// again.
struct RestoredTree(Vec<u32>);

impl Drop for RestoredTree {
    fn drop(&mut self) {
        let master = self.0[0];
        let mut workers: Vec<u32> =
            text(Path::new(&format!("/proc/{master}/task/{master}/children")))
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect();
        workers.extend(&self.0[1..]);
        kill_and_wait(master);
        for pid in workers {
            kill_and_wait(pid);
        }
    }
}

#[test]
fn nginx_from_debian_serves_after_restore_and_again_after_its_log_grew() {
    let _lock = criu_lock();
    let t = tempfile::tempdir().unwrap();
    let reg = Registry::start(&t.path().join("reg"));
    let cache = t.path().join("cache");
    let (n, mut child) = Nginx::start(&t.path().join("nginx"));
    n.serves_and_logs();
    let tree = [vec![n.master], n.workers()].concat();
    assert_eq!(tree.len(), 2, "master and one worker: {tree:?}");
    let ck = snapctl(
        &reg.url,
        &["checkpoint", "--pid", &n.master.to_string(), "t/nginx:v1"],
    );
    let ck = {
        if ck.code != 0 {
            let _ = child.kill();
        }
        ck.ok().json()
    };
    let _ = child.wait();
    // Gone, not only dead: a zombie worker (reparented, reaped by init) holds its PID.
    for pid in &tree {
        wait_for(Duration::from_secs(30), || {
            (!Path::new(&format!("/proc/{pid}")).exists()).then_some(())
        })
        .unwrap_or_else(|| panic!("PID {pid} of nginx is still there"));
    }
    let captured = paths(&ck["written_files"]["captured"]);
    for log in [n.access_log(), n.dir.join("error.log")] {
        assert!(captured.contains(&log.display().to_string()), "{ck}");
    }
    assert!(n.get().is_err(), "the checkpoint should have stopped nginx");
    let at_freeze = text(&n.access_log());

    let r = snapctl_cached(
        &reg.url,
        &cache,
        &["pull-restore", "--detach", "t/nginx:v1"],
    )
    .ok()
    .json();
    let restored = RestoredTree(tree.clone());
    assert_eq!(r["pid"], n.master);
    assert_eq!(put_back_of(&r, &n.access_log())["action"], "kept", "{r}");
    n.serves_and_logs();
    n.serves_and_logs();
    drop(restored);

    // The log grows elsewhere too; the second restore on this node moves it aside.
    std::fs::OpenOptions::new()
        .append(true)
        .open(n.access_log())
        .unwrap()
        .write_all(b"203.0.113.9 - - [01/Jan/2030:00:00:00 +0000] \"GET /elsewhere HTTP/1.1\" 404 0 \"-\" \"other\"\n")
        .unwrap();
    let grown = text(&n.access_log());
    let r = snapctl_cached(
        &reg.url,
        &cache,
        &["pull-restore", "--detach", "t/nginx:v1"],
    )
    .ok()
    .json();
    let _restored = RestoredTree(tree);
    let entry = put_back_of(&r, &n.access_log());
    assert_eq!(entry["action"], "moved_aside", "{r}");
    assert_eq!(
        text(Path::new(entry["moved_aside_to"].as_str().unwrap())),
        grown
    );
    assert_eq!(text(&n.access_log()), at_freeze, "put back as captured");
    n.serves_and_logs();
    assert!(text(&n.access_log()).starts_with(&at_freeze));
}

#[test]
fn spooled_checkpoints_capture_written_files_unless_the_tree_keeps_running() {
    let _lock = criu_lock();
    let t = tempfile::tempdir().unwrap();
    let reg = Registry::start(&t.path().join("reg"));
    let log = t.path().join("logs/worker.log");
    std::fs::create_dir_all(log.parent().unwrap()).unwrap();
    let mut p = TestProc::spawn(
        &t.path().join("proc"),
        &["log", "--log", log.to_str().unwrap()],
    );
    p.wait_counter_above(5);
    let pid = p.pid().to_string();
    let spool = t.path().join("spool");
    let args = |extra: &[&'static str], tag: &'static str| {
        let mut a = vec!["checkpoint", "--spool", spool.to_str().unwrap(), "--pid"];
        a.push(&pid);
        a.extend_from_slice(extra);
        a.push(tag);
        a.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let run = |a: Vec<String>| {
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        snapctl(&reg.url, &a).ok().json()
    };
    let running = run(args(&["--leave-running"], "t/log:running"));
    let reason = running["written_files"]["left_out"][0]["reason"]
        .as_str()
        .unwrap_or_else(|| panic!("{running}"));
    assert!(reason.contains("kept running"), "{running}");
    let ck = run(args(&[], "t/log:spooled"));
    let _ = p.child.wait();
    assert_eq!(
        paths(&ck["written_files"]["captured"]),
        vec![log.display().to_string()],
        "{ck}"
    );
    let at_freeze = text(&log);
    std::fs::remove_file(&log).unwrap();
    std::fs::remove_dir(log.parent().unwrap()).unwrap();
    let r = snapctl(&reg.url, &["pull-restore", "--detach", "t/log:spooled"])
        .ok()
        .json();
    let _restored = Restored(p.pid());
    assert_eq!(put_back_of(&r, &log)["action"], "created", "{r}");
    assert_log_goes_on(&log, &at_freeze, p.pid());
}

#[test]
fn a_restore_while_the_original_still_writes_moves_nothing_aside() {
    let _lock = criu_lock();
    let t = tempfile::tempdir().unwrap();
    let reg = Registry::start(&t.path().join("reg"));
    let logs = t.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let log = logs.join("worker.log");
    let mut p = TestProc::spawn(
        &t.path().join("proc"),
        &["log", "--log", log.to_str().unwrap()],
    );
    p.wait_counter_above(5);
    let pid = p.pid();
    let ck = snapctl(
        &reg.url,
        &[
            "checkpoint",
            "--leave-running",
            "--pid",
            &pid.to_string(),
            "t/log:v1",
        ],
    )
    .ok()
    .json();
    // The log, and possibly the test process's own state file when the freeze caught
    // it between writing `state.tmp` and renaming it (it writes one every 20 ms).
    let captured = paths(&ck["written_files"]["captured"]);
    assert!(captured.contains(&log.display().to_string()), "{ck}");
    assert!(
        captured
            .iter()
            .all(|c| *c == log.display().to_string() || c.ends_with("/state.tmp")),
        "{ck}"
    );
    let r = snapctl(&reg.url, &["pull-restore", "--detach", "t/log:v1"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("still runs here and writes"),
        "{}",
        r.stderr
    );
    let names: Vec<_> = std::fs::read_dir(&logs)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        names,
        vec![std::ffi::OsString::from("worker.log")],
        "nothing moved aside"
    );
    // Once it is stopped, the same snapshot restores.
    let _ = p.child.kill();
    let _ = p.child.wait();
    snapctl(&reg.url, &["pull-restore", "--detach", "t/log:v1"]).ok();
    let _restored = Restored(pid);
    let now = last_tick(&text(&log));
    wait_for(Duration::from_secs(30), || {
        (last_tick(&text(&log)) > now + 3).then_some(())
    })
    .expect("the restored worker logs");
}

/// The highest N of the `cycle/N.tmp` files there now.
fn last_cycle(dir: &Path) -> Option<u64> {
    std::fs::read_dir(dir.join("cycle"))
        .ok()?
        .filter_map(|e| {
            e.ok()?
                .file_name()
                .to_str()?
                .strip_suffix(".tmp")?
                .parse()
                .ok()
        })
        .max()
}

/// A tree that opens a file for writing and removes it every 20 ms restores, spooled
/// and streamed, twice each: the files it holds open are listed while CRIU holds it
/// frozen. Listed before the dump (as they were until this test), the file open then
/// was gone at the freeze, and the restore refused it as missing ("files the image
/// reopens by path: …/cycle/N.tmp is missing") in most rounds.
#[test]
fn files_opened_and_removed_until_the_freeze_do_not_stop_the_restore() {
    let _lock = criu_lock();
    let t = tempfile::tempdir().unwrap();
    let reg = Registry::start(&t.path().join("reg"));
    let spool = t.path().join("spool");
    for round in 0..4u64 {
        let route = if round % 2 == 0 {
            spool.to_str().unwrap()
        } else {
            "off"
        };
        let dir = t.path().join(format!("proc{round}"));
        let mut p = TestProc::spawn(
            &dir,
            &[
                "hold",
                "--mib",
                "16",
                "--seed",
                &(40 + round).to_string(),
                "--cycle-files",
            ],
        );
        p.wait_counter_above(5);
        let pid = p.pid();
        let tag = format!("t/cycle:r{round}");
        let ck = snapctl(
            &reg.url,
            &[
                "checkpoint",
                "--pid",
                &pid.to_string(),
                "--spool",
                route,
                &tag,
            ],
        )
        .ok()
        .json();
        let _ = p.child.wait();
        let r = snapctl(&reg.url, &["pull-restore", "--detach", &tag]);
        assert_eq!(
            r.code, 0,
            "round {round} (--spool {route}): {}\n{ck}",
            r.stderr
        );
        let _restored = Restored(pid);
        let at = p.counter();
        p.wait_counter_above(at + 3);
        assert!(p.verify(pid).starts_with("ok"), "round {round}");
        // The restored file thread goes on too: a later file than any there now.
        let last = last_cycle(&dir).unwrap_or(0);
        wait_for(Duration::from_secs(10), || {
            (last_cycle(&dir)? > last).then_some(())
        })
        .unwrap_or_else(|| panic!("round {round}: no new cycle file after {last}"));
    }
}
