//! Separated mode with the memfd backend and a real CRIU: a worker attached to 1 GiB of
//! weights from `snapctl weights serve` is checkpointed without them, restored while
//! a fresh service is filled from the registry, re-attaches at the same address and
//! computes the same result; a second snapshot of the same weights uploads none.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::support::*;

/// `snapctl weights serve`, killed on drop.
struct WeightsService {
    child: Child,
    socket: PathBuf,
}

impl WeightsService {
    fn start(socket: &Path) -> WeightsService {
        let mut child = Command::new(bin("snapctl"))
            .args([
                "--json",
                "weights",
                "serve",
                "--backend",
                "memfd",
                "--socket",
            ])
            .arg(socket)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let ready = first_json_line(&mut child, "snapctl weights serve");
        assert_eq!(ready["backend"], "memfd");
        WeightsService {
            child,
            socket: socket.to_path_buf(),
        }
    }

    fn ls(&self) -> serde_json::Value {
        snapctl(
            "http://unused",
            &["weights", "ls", "--socket", self.socket.to_str().unwrap()],
        )
        .ok()
        .json()
    }
}

impl Drop for WeightsService {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `global`: snapctl flags such as `--key-file K`.
fn checkpoint_separated(
    registry: &str,
    global: &[&str],
    pid: u32,
    sock: &str,
    reference: &str,
) -> Out {
    let pid = pid.to_string();
    let mut args = global.to_vec();
    args.extend([
        "checkpoint",
        "--pid",
        &pid,
        "--weights-service",
        sock,
        reference,
    ]);
    snapctl(registry, &args)
}

fn restore_separated(
    registry: &str,
    global: &[&str],
    cache: &Path,
    sock: &str,
    reference: &str,
) -> Out {
    let mut args = global.to_vec();
    args.extend([
        "pull-restore",
        "--detach",
        "--weights-service",
        sock,
        reference,
    ]);
    snapctl_cached(registry, cache, &args)
}

/// The test worker attached to `mib` MiB of weights named `name` in the service at
/// `sock`, with `state_mib` of its own state.
fn weights_worker(
    dir: &Path,
    sock: &str,
    name: &str,
    mib: u32,
    state_mib: u32,
    seed: u64,
) -> TestProc {
    let (mib, state_mib, seed) = (mib.to_string(), state_mib.to_string(), seed.to_string());
    TestProc::spawn(
        dir,
        &[
            "weights",
            "--socket",
            sock,
            "--name",
            name,
            "--mib",
            &mib,
            "--state-mib",
            &state_mib,
            "--seed",
            &seed,
        ],
    )
}

/// (weights address, result, counter) from the worker's result file.
fn result_of(dir: &Path) -> (String, String, u64) {
    let text = std::fs::read_to_string(dir.join("result")).unwrap();
    let f: Vec<&str> = text.split_whitespace().collect();
    (f[0].into(), f[1].into(), f[2].parse().unwrap())
}

fn quiesce(dir: &Path) -> u64 {
    let _ = std::fs::remove_file(dir.join("quiesced"));
    std::fs::write(dir.join("quiesce"), "").unwrap();
    wait_for(Duration::from_secs(30), || {
        std::fs::read_to_string(dir.join("quiesced"))
            .ok()?
            .trim()
            .parse()
            .ok()
    })
    .expect("the worker did not quiesce")
}

fn wait_resumed(dir: &Path) {
    wait_for(Duration::from_secs(60), || {
        dir.join("resumed").exists().then_some(())
    })
    .expect("the restored worker did not resume");
}

#[test]
fn separated_mode_restores_a_worker_with_1gib_of_weights_and_dedups_them() {
    let _lock = criu_lock();
    let t = tempfile::tempdir().unwrap();
    let reg = Registry::start(&t.path().join("reg"));
    let cache = t.path().join("cache");
    let socket = t.path().join("weights.sock");
    let service = WeightsService::start(&socket);
    let sock = socket.to_str().unwrap();
    let mut p = weights_worker(&t.path().join("worker"), sock, "llama/layers", 1024, 32, 7);
    let pid = p.pid();
    let dir = p.dir.clone();
    p.wait_counter_above(2);
    let (addr, before, _) = result_of(&dir);
    let ls = service.ls();
    assert_eq!(ls["buffers"][0]["name"], "llama/layers");
    assert_eq!(ls["buffers"][0]["leases"], serde_json::json!([pid]));

    // Still attached: refused, and the worker keeps running untouched.
    let refused = checkpoint_separated(&reg.url, &[], pid, sock, "t/w:v1");
    assert_eq!(refused.code, 2, "{}", refused.stderr);
    assert!(
        refused.stderr.contains("has not quiesced") && refused.stderr.contains("llama/layers"),
        "{}",
        refused.stderr
    );
    let c = p.counter();
    p.wait_counter_above(c + 2);

    let at_quiesce = quiesce(&dir);
    let ck = checkpoint_separated(&reg.url, &[], pid, sock, "t/w:v1")
        .ok()
        .json();
    let _ = p.child.wait(); // CRIU killed it after the commit
    assert_eq!(ck["weights_bytes"], 1u64 << 30, "{ck}");
    let process_bytes = ck["process_bytes"].as_u64().unwrap();
    assert!(
        process_bytes < 256 << 20,
        "the process layer should hold no weights: {ck}"
    );
    assert!(
        ck["bytes_transferred"].as_u64().unwrap() > 1 << 30,
        "first snapshot uploads the weights: {ck}"
    );
    let inspect = snapctl(&reg.url, &["inspect", "t/w:v1"]).ok().json();
    let kinds: Vec<&str> = inspect["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["process", "weights"], "{inspect}");
    assert_eq!(inspect["layers"][1]["bytes"], 1u64 << 30);

    // A new node's service: the weights must come from the registry.
    drop(service);
    let service = WeightsService::start(&socket);
    let r = restore_separated(&reg.url, &[], &cache, sock, "t/w:v1")
        .ok()
        .json();
    let restored = Restored(pid);
    assert_eq!(r["weights"]["bytes_filled"], 1u64 << 30, "{r}");
    assert_eq!(r["weights"]["buffers_reused"], 0, "{r}");
    // The fill runs beside the restore and ends before the workers are resumed.
    let in_at = r["weights"]["in_at_seconds"].as_f64().unwrap();
    assert!(
        in_at > 0.0 && in_at <= r["seconds"].as_f64().unwrap(),
        "{r}"
    );
    wait_resumed(&dir);
    let (addr_after, after, _) = result_of(&dir);
    assert_eq!(addr_after, addr, "re-attached at another address");
    assert_eq!(after, before, "a different result after restore");
    p.wait_counter_above(at_quiesce + 3);
    assert_eq!(
        service.ls()["buffers"][0]["leases"],
        serde_json::json!([pid])
    );

    // The same weights again: nothing of them is read or uploaded.
    let at_quiesce = quiesce(&dir);
    let ck2 = checkpoint_separated(&reg.url, &[], pid, sock, "t/w:v2")
        .ok()
        .json();
    std::mem::forget(restored); // CRIU killed it
    kill_and_wait(pid);
    assert_eq!(ck2["weights_bytes"], 1u64 << 30);
    assert!(
        ck2["bytes_transferred"].as_u64().unwrap() < ck2["process_bytes"].as_u64().unwrap(),
        "the second snapshot re-sent weight bytes: {ck2}"
    );

    // Restored where the service still holds them: no fill at all.
    let _ = std::fs::remove_file(dir.join("resumed"));
    let r2 = restore_separated(&reg.url, &[], &cache, sock, "t/w:v2")
        .ok()
        .json();
    let _restored = Restored(pid);
    assert_eq!(r2["weights"]["buffers_reused"], 1, "{r2}");
    assert_eq!(r2["weights"]["bytes_filled"], 0, "{r2}");
    wait_resumed(&dir);
    assert_eq!(result_of(&dir).1, before);
    p.wait_counter_above(at_quiesce + 3);
}

#[test]
fn a_snapshot_with_weights_needs_a_weights_service_and_cuda_needs_a_driver() {
    let t = tempfile::tempdir().unwrap();
    if !std::path::Path::new("/dev/nvidiactl").exists() {
        let out = snapctl(
            "http://unused",
            &[
                "weights",
                "serve",
                "--backend",
                "cuda",
                "--socket",
                t.path().join("w.sock").to_str().unwrap(),
            ],
        );
        assert_eq!(out.code, 1);
        assert!(out.stderr.contains("no NVIDIA driver"), "{}", out.stderr);
    }
    let out = snapctl(
        "http://unused",
        &[
            "weights",
            "ls",
            "--socket",
            t.path().join("none.sock").to_str().unwrap(),
        ],
    );
    assert_ne!(out.code, 0);
    assert!(
        out.stderr.contains("snapctl weights serve --socket"),
        "{}",
        out.stderr
    );
}

#[test]
fn the_python_client_quiesces_and_resumes_a_worker_across_checkpoint_and_restore() {
    let _lock = criu_lock();
    let t = tempfile::tempdir().unwrap();
    let reg = Registry::start(&t.path().join("reg"));
    let socket = t.path().join("weights.sock");
    let _service = WeightsService::start(&socket);
    let dir = t.path().join("py");
    std::fs::create_dir_all(&dir).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/weights_worker.py");
    let mut child = spawn_detached(
        Command::new("python3")
            .arg(&script)
            .arg(&socket)
            .arg(&dir)
            .args(["py/model", "64"]),
    );
    let pid = child.id();
    let _guard = Restored(pid);
    let counter = || -> u64 {
        std::fs::read_to_string(dir.join("state"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    wait_for(Duration::from_secs(30), || (counter() > 2).then_some(()))
        .expect("the Python worker did not start");
    let before = std::fs::read_to_string(dir.join("result")).unwrap();
    let at_quiesce = quiesce(&dir);
    let sock = socket.to_str().unwrap();
    let ck = checkpoint_separated(&reg.url, &[], pid, sock, "py/w:v1")
        .ok()
        .json();
    let _ = child.wait();
    assert_eq!(ck["weights_bytes"], 64u64 << 20, "{ck}");
    restore_separated(&reg.url, &[], &t.path().join("cache"), sock, "py/w:v1").ok();
    wait_resumed(&dir);
    assert_eq!(
        std::fs::read_to_string(dir.join("result")).unwrap(),
        before,
        "the Python worker sees other bytes, or at another address, after restore"
    );
    wait_for(Duration::from_secs(30), || {
        (counter() > at_quiesce + 3).then_some(())
    })
    .expect("the restored Python worker does not count");
}

/// Separated mode with tenant keys: the weights layer is encrypted like the process
/// layer, filled decrypted, reused only under the key that encrypted it.
#[test]
fn encrypted_weights_are_reused_only_under_their_own_tenant_key() {
    let _lock = criu_lock();
    let t = tempfile::tempdir().unwrap();
    let reg = Registry::start(&t.path().join("reg"));
    let cache = t.path().join("cache");
    let socket = t.path().join("weights.sock");
    let service = WeightsService::start(&socket);
    let sock = socket.to_str().unwrap();
    let (key_a, _) = new_tenant_key(t.path(), "acme");
    let (key_b, _) = new_tenant_key(t.path(), "beta");
    let (a, b) = (
        ["--key-file", key_a.as_str()],
        ["--key-file", key_b.as_str()],
    );
    let mut p = weights_worker(&t.path().join("worker"), sock, "enc/layers", 64, 8, 9);
    let pid = p.pid();
    let dir = p.dir.clone();
    p.wait_counter_above(2);
    let (addr, before, _) = result_of(&dir);

    let at_quiesce = quiesce(&dir);
    let ck = checkpoint_separated(&reg.url, &a, pid, sock, "acme/w:v1")
        .ok()
        .json();
    let _ = p.child.wait();
    assert!(ck["bytes_transferred"].as_u64().unwrap() > 64 << 20, "{ck}");
    let inspect = snapctl(&reg.url, &["inspect", "acme/w:v1"]).ok().json();
    assert_eq!(inspect["schema_version"], 2, "{inspect}");

    // A fresh service on the restoring node: filled from encrypted chunks.
    drop(service);
    let _service = WeightsService::start(&socket);
    let r = restore_separated(&reg.url, &a, &cache, sock, "acme/w:v1")
        .ok()
        .json();
    let restored = Restored(pid);
    assert_eq!(r["weights"]["bytes_filled"], 64u64 << 20, "{r}");
    wait_resumed(&dir);
    assert_eq!(result_of(&dir).0, addr, "re-attached at another address");
    assert_eq!(
        result_of(&dir).1,
        before,
        "a different result after restore"
    );
    p.wait_counter_above(at_quiesce + 3);

    // Same tenant: the service's record is reused, no weight bytes sent.
    quiesce(&dir);
    let same = checkpoint_separated(&reg.url, &a, pid, sock, "acme/w:v2")
        .ok()
        .json();
    std::mem::forget(restored);
    kill_and_wait(pid);
    assert!(
        same["bytes_transferred"].as_u64().unwrap() < 32 << 20,
        "weights re-sent under the same key: {same}"
    );

    // Another tenant's key: the digests recorded under acme's key are not reused;
    // the weights are read and encrypted under beta's, and restore with beta's key.
    let _ = std::fs::remove_file(dir.join("resumed"));
    restore_separated(&reg.url, &a, &cache, sock, "acme/w:v2").ok();
    let restored = Restored(pid);
    wait_resumed(&dir);
    quiesce(&dir);
    let other = checkpoint_separated(&reg.url, &b, pid, sock, "beta/w:v1")
        .ok()
        .json();
    std::mem::forget(restored);
    kill_and_wait(pid);
    assert!(
        other["bytes_transferred"].as_u64().unwrap() > 64 << 20,
        "beta's snapshot must carry its own encrypted weights: {other}"
    );
    let _ = std::fs::remove_file(dir.join("resumed"));
    let r = restore_separated(&reg.url, &b, &cache, sock, "beta/w:v1")
        .ok()
        .json();
    let _restored = Restored(pid);
    assert_eq!(r["weights"]["buffers_reused"], 1, "{r}");
    wait_resumed(&dir);
    assert_eq!(result_of(&dir).1, before);
}
