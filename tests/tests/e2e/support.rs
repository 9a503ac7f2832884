//! What every end-to-end test needs: real `snapreg` processes on loopback, `snapctl`
//! runs with their exit codes and JSON, test processes started (and killed) by PID,
//! and a real CRIU.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// target/debug, found from this test binary (target/debug/deps/e2e-*).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_path_buf()
}

pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} missing: run `cargo build --workspace --all-targets` first (scripts/test.sh does)",
        p.display()
    );
    p
}

pub fn testproc_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_snapreg-testproc"))
}

/// A CRIU ≥ 4.2 installed by deploy/install-criu.sh (scripts/test.sh runs it).
pub fn criu() -> PathBuf {
    if let Some(p) = std::env::var_os("SNAPCTL_CRIU") {
        return PathBuf::from(p);
    }
    let p = PathBuf::from("/opt/snapreg-criu/bin/criu");
    assert!(
        p.exists(),
        "no CRIU at {}: run `sudo deploy/install-criu.sh` (scripts/test.sh does)",
        p.display()
    );
    p
}

/// Serialises tests that checkpoint (CRIU restores original PIDs), across threads
/// and processes alike.
pub struct CriuLock {
    _held: std::fs::File,
}

pub fn criu_lock() -> CriuLock {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open("/tmp/snapreg-tests-criu.lock")
        .unwrap();
    use std::os::fd::AsRawFd;
    // SAFETY: the lock file is open for the call.
    assert_eq!(unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) }, 0);
    CriuLock { _held: f }
}

pub struct Registry {
    pub data: PathBuf,
    pub url: String,
    pub addr: String,
    /// The `--metrics-listen` address it printed, if given one.
    pub metrics: Option<String>,
    /// The `--oci-listen` address it printed, if given one.
    pub oci: Option<String>,
    extra: Vec<String>,
    /// Extra environment (an S3 store's AWS_* variables).
    env: Vec<(String, String)>,
    child: Option<Child>,
}

impl Registry {
    /// A registry open to anonymous callers (`--anonymous admin`), so every test that
    /// is not about access control runs as before; auth.rs passes its own
    /// `--anonymous` to start one that needs tokens.
    pub fn start(data: &Path) -> Registry {
        Registry::start_with(data, &[])
    }

    pub fn start_with(data: &Path, extra: &[&str]) -> Registry {
        let mut r = Registry {
            data: data.to_path_buf(),
            url: String::new(),
            addr: "127.0.0.1:0".into(),
            metrics: None,
            oci: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            env: Vec::new(),
            child: None,
        };
        r.spawn();
        r
    }

    fn spawn(&mut self) {
        let has = |flag: &str| self.extra.iter().any(|a| a == flag);
        let anonymous: &[&str] = if has("--anonymous") {
            &[]
        } else {
            &["--anonymous", "admin"]
        };
        let scheme = if has("--tls-cert") { "https" } else { "http" };
        let mut child = Command::new(bin("snapreg"))
            .args(["serve", "--listen", &self.addr, "--data"])
            .arg(&self.data)
            .args(anonymous)
            .args(&self.extra)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("snapreg printed {line:?}: {e}"));
        self.addr = v["listen"].as_str().unwrap().to_string();
        self.metrics = v["metrics"].as_str().map(str::to_string);
        self.oci = v["oci"].as_str().map(str::to_string);
        self.url = format!("{scheme}://{}", self.addr);
        self.child = Some(child);
    }

    /// Sends SIGTERM and returns at once (the caller waits with [`Registry::wait_exit`]).
    pub fn signal_term(&self) {
        let pid = self.pid();
        // SAFETY: kill takes plain integers; the PID is a process this test started.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    }

    /// The exit status once the process has stopped (None if it runs on past `within`).
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut()?;
        let status = wait_for(within, || child.try_wait().ok().flatten());
        if status.is_some() {
            self.child = None;
        }
        status
    }

    /// SIGKILL, as a crash would.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Restarts on the same address and data directory.
    pub fn restart(&mut self) {
        self.kill9();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            // The port may linger for a moment after the kill.
            if std::net::TcpListener::bind(&self.addr).is_ok() || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.spawn();
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn store(&self) -> PathBuf {
        self.data.join("store")
    }

    /// `snapreg token issue ARGS` on this registry's store: (id, token).
    pub fn issue_token(&self, args: &[&str]) -> (String, String) {
        let out = Command::new(bin("snapreg"))
            .args(["token", "issue", "--data"])
            .arg(&self.data)
            .args(args)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "token issue failed: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
        (
            v["id"].as_str().unwrap().to_string(),
            v["token"].as_str().unwrap().to_string(),
        )
    }

    /// `snapreg token ARGS` (revoke, ls) on this registry's store.
    pub fn token_command(&self, args: &[&str]) -> Out {
        let out = Command::new(bin("snapreg"))
            .arg("token")
            .args(args)
            .arg("--data")
            .arg(&self.data)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        Out::from(out)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl From<std::process::Output> for Out {
    fn from(out: std::process::Output) -> Out {
        Out {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

impl Out {
    /// The JSON object on stdout's last line.
    pub fn json(&self) -> serde_json::Value {
        let last = self
            .stdout
            .lines()
            .last()
            .unwrap_or_else(|| panic!("no stdout; stderr: {}", self.stderr));
        serde_json::from_str(last).unwrap_or_else(|e| panic!("last line {last:?} is not JSON: {e}"))
    }

    pub fn ok(self) -> Self {
        assert_eq!(
            self.code, 0,
            "snapctl failed\nstdout: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        self
    }
}

pub fn snapctl(registry: &str, args: &[&str]) -> Out {
    let out = Command::new(bin("snapctl"))
        .arg("--registry")
        .arg(registry)
        .arg("--json")
        .args(args)
        .env_remove("SNAPCTL_REGISTRY")
        .env_remove("SNAPCTL_TOKEN")
        .env_remove("SNAPCTL_TOKEN_FILE")
        .env_remove("SNAPCTL_CA_CERT")
        .env_remove("SNAPCTL_CLIENT_CERT")
        .env_remove("SNAPCTL_CLIENT_KEY")
        .env_remove("SNAPCTL_KEY_FILE")
        .output()
        .unwrap();
    Out::from(out)
}

/// A new tenant key file `dir/<tenant>.key`: (its path, its key id).
pub fn new_tenant_key(dir: &Path, tenant: &str) -> (String, String) {
    let path = dir.join(format!("{tenant}.key"));
    let out = snapctl(
        "http://unused",
        &["key", "new", "--tenant", tenant, path.to_str().unwrap()],
    )
    .ok()
    .json();
    (
        path.to_str().unwrap().to_string(),
        out["key_id"].as_str().unwrap().to_string(),
    )
}

/// Whether any file under `dir` contains `needle`.
pub fn tree_contains(dir: &Path, needle: &[u8]) -> bool {
    read_tree(dir)
        .values()
        .any(|v| v.windows(needle.len()).any(|w| w == needle))
}

/// Spawns `cmd` in its own session (so CRIU dumps it without --shell-job), with no
/// standard streams.
pub fn spawn_detached(cmd: &mut Command) -> Child {
    use std::os::unix::process::CommandExt;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: setsid is async-signal-safe, as a pre_exec closure requires.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    cmd.spawn().unwrap()
}

/// A test process, killed (by PID) and reaped on drop.
pub struct TestProc {
    pub child: Child,
    pub dir: PathBuf,
}

impl TestProc {
    pub fn hold(dir: &Path, mib: usize, seed: u64, pad_mib: usize, zero_mib: usize) -> TestProc {
        let p = TestProc::spawn(
            dir,
            &[
                "hold",
                "--mib",
                &mib.to_string(),
                "--seed",
                &seed.to_string(),
                "--pad-mib",
                &pad_mib.to_string(),
                "--zero-mib",
                &zero_mib.to_string(),
            ],
        );
        p.wait_counter_above(2);
        p
    }

    /// The TCP server mode; returns once its port is known.
    pub fn serve(dir: &Path) -> TestProc {
        let p = TestProc::spawn(dir, &["serve"]);
        wait_for(Duration::from_secs(10), || {
            p.dir.join("port").exists().then_some(())
        })
        .expect("server port");
        p
    }

    /// A test process started some other way, whose `--out` is `dir`.
    pub fn adopt(child: Child, dir: &Path) -> TestProc {
        TestProc {
            child,
            dir: dir.to_path_buf(),
        }
    }

    pub fn spawn(dir: &Path, args: &[&str]) -> TestProc {
        std::fs::create_dir_all(dir).unwrap();
        let mut cmd = Command::new(testproc_bin());
        cmd.arg(args[0]).arg("--out").arg(dir).args(&args[1..]);
        TestProc {
            child: spawn_detached(&mut cmd),
            dir: dir.to_path_buf(),
        }
    }

    pub fn port(&self) -> u16 {
        std::fs::read_to_string(self.dir.join("port"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    /// Asks the process to check its memory pattern; returns its verdict line.
    pub fn verify(&self, pid: u32) -> String {
        let _ = std::fs::remove_file(self.dir.join("verify"));
        assert_eq!(
            // SAFETY: kill takes plain integers; the PID is a process this test started.
            unsafe { libc::kill(pid as i32, libc::SIGUSR1) },
            0,
            "pid {pid} is gone"
        );
        wait_for(Duration::from_secs(30), || {
            std::fs::read_to_string(self.dir.join("verify")).ok()
        })
        .expect("verify answer")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn counter(&self) -> u64 {
        std::fs::read_to_string(self.dir.join("state"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }

    pub fn wait_counter_above(&self, n: u64) -> u64 {
        wait_for(Duration::from_secs(30), || {
            (self.counter() > n).then(|| self.counter())
        })
        .unwrap_or_else(|| panic!("counter of pid {} stuck at {}", self.pid(), self.counter()))
    }
}

impl Drop for TestProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `criu dump` of a test process into `images` (the process dies; it is reaped).
pub fn criu_dump(proc_: &mut TestProc, images: &Path) {
    std::fs::create_dir_all(images).unwrap();
    let out = Command::new(criu())
        .args(["dump", "-t", &proc_.pid().to_string(), "-D"])
        .arg(images)
        .args(["-o", "dump.log", "-v2"])
        .output()
        .unwrap();
    let log = std::fs::read_to_string(images.join("dump.log")).unwrap_or_default();
    assert!(
        out.status.success(),
        "criu dump failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        tail(&log, 20)
    );
    let _ = proc_.child.wait();
}

pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Every regular file under `dir`, relative path -> bytes.
pub fn read_tree(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() {
                out.insert(
                    e.path()
                        .strip_prefix(dir)
                        .unwrap()
                        .to_string_lossy()
                        .into_owned(),
                    std::fs::read(e.path()).unwrap(),
                );
            }
        }
    }
    out
}

pub fn assert_trees_equal(a: &Path, b: &Path) {
    let (ta, tb) = (read_tree(a), read_tree(b));
    assert_eq!(
        ta.keys().collect::<Vec<_>>(),
        tb.keys().collect::<Vec<_>>(),
        "file lists differ"
    );
    for (name, bytes) in &ta {
        assert!(
            bytes == &tb[name],
            "{name} differs ({} vs {} bytes)",
            bytes.len(),
            tb[name].len()
        );
    }
}

pub fn noise(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1; // distinct seeds, distinct streams
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(n);
    out
}

/// Bytes under the store's chunks/ prefix.
pub fn stored_chunk_bytes(store: &Path) -> u64 {
    read_tree(&store.join("chunks"))
        .values()
        .map(|v| v.len() as u64)
        .sum()
}

/// A process this test restored (not our child): SIGKILLed by PID on drop.
pub struct Restored(pub u32);

impl Drop for Restored {
    fn drop(&mut self) {
        kill_and_wait(self.0);
    }
}

pub fn pid_alive(pid: u32) -> bool {
    // A zombie counts as gone.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

pub fn kill_and_wait(pid: u32) {
    // SAFETY: kill takes plain integers; the PID is a process this test started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    // Reap it if it is ours; otherwise wait for init to.
    // SAFETY: waitpid accepts a null status pointer.
    unsafe { libc::waitpid(pid as i32, std::ptr::null_mut(), libc::WNOHANG) };
    wait_for(Duration::from_secs(10), || {
        (!std::path::Path::new(&format!("/proc/{pid}")).exists()).then_some(())
    });
}

/// `snapctl --json ARGS` started in the background; [`finish`] waits for it.
pub fn snapctl_bg(url: &str, args: &[&str]) -> Child {
    Command::new(bin("snapctl"))
        .arg("--registry")
        .arg(url)
        .arg("--json")
        .args(args)
        .env_remove("SNAPCTL_REGISTRY")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

pub fn finish(child: Child) -> Out {
    Out::from(child.wait_with_output().unwrap())
}

/// `snapctl` with a node cache directory.
pub fn snapctl_cached(registry: &str, cache: &Path, args: &[&str]) -> Out {
    let mut all = vec!["--cache", cache.to_str().unwrap()];
    all.extend_from_slice(args);
    snapctl(registry, &all)
}

/// A loopback port free right now (for a registry started later on a known address).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Registry {
    /// The chunks (hex digests) of the first `pages-*.img` of the snapshot `digest`,
    /// in file order, read from this registry's store.
    pub fn pages_chunks(&self, digest: &str) -> Vec<String> {
        let hex = digest.trim_start_matches("blake3:");
        let m: serde_json::Value = serde_json::from_slice(
            &std::fs::read(self.store().join("manifests").join(hex)).unwrap(),
        )
        .unwrap();
        let pages = m["layers"][0]["files"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["path"].as_str().unwrap().starts_with("pages-"))
            .unwrap()
            .clone();
        pages["extents"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|e| e["chunk"].as_str())
            .map(|c| c.trim_start_matches("blake3:").to_string())
            .collect()
    }

    /// Flips one bit near the end of the stored object of chunk `hex`.
    pub fn flip_a_bit_of_chunk(&self, hex: &str) {
        let obj = self.store().join("chunks").join(&hex[..2]).join(hex);
        let mut bytes = std::fs::read(&obj).unwrap();
        let n = bytes.len();
        bytes[n - 100] ^= 1;
        std::fs::write(&obj, bytes).unwrap();
    }

    /// Starts on a given address (`127.0.0.1:PORT`), e.g. one a peer already names.
    pub fn start_on(data: &Path, addr: &str, extra: &[&str]) -> Registry {
        let mut r = Registry {
            data: data.to_path_buf(),
            url: String::new(),
            addr: addr.to_string(),
            metrics: None,
            oci: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            env: Vec::new(),
            child: None,
        };
        r.spawn();
        r
    }
}

/// Runs a future to completion on a fresh single-threaded runtime.
pub fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// `ReplicationStatus` of a registry.
pub fn replication_status(url: &str) -> snapreg_proto::pb::ReplicationStatusResponse {
    block_on(async {
        let mut c = snapreg_proto::pb::registry_client::RegistryClient::connect(url.to_string())
            .await
            .unwrap_or_else(|e| panic!("connecting to {url}: {e}"));
        c.replication_status(snapreg_proto::pb::ReplicationStatusRequest {})
            .await
            .unwrap()
            .into_inner()
    })
}

/// Waits until every peer of the registry at `url` has acknowledged its whole log.
pub fn wait_replicated(
    url: &str,
    timeout: Duration,
) -> snapreg_proto::pb::ReplicationStatusResponse {
    let mut last = None;
    wait_for(timeout, || {
        let s = replication_status(url);
        let done = s.log_head > 0 && s.peers.iter().all(|p| p.entries_behind == 0);
        last = Some(s.clone());
        done.then_some(s)
    })
    .unwrap_or_else(|| panic!("replication from {url} did not catch up: {last:?}"))
}

/// (tag, digest, hlc) of every tag of a repository, through `ListTags`.
pub fn list_tags(url: &str, repository: &str) -> Vec<(String, String, u64)> {
    let repository = repository.to_string();
    block_on(async {
        let mut c = snapreg_proto::pb::registry_client::RegistryClient::connect(url.to_string())
            .await
            .unwrap_or_else(|e| panic!("connecting to {url}: {e}"));
        match c
            .list_tags(snapreg_proto::pb::ListTagsRequest { repository })
            .await
        {
            Ok(r) => r
                .into_inner()
                .tags
                .into_iter()
                .map(|t| (t.tag, t.digest, t.hlc))
                .collect(),
            // 5: NOT_FOUND (a repository without tags).
            Err(s) if i32::from(s.code()) == 5 => Vec::new(),
            Err(s) => panic!("ListTags on {url}: {s}"),
        }
    })
}

/// Writes `bytes` to `dir/name`, creating parent directories.
pub fn write(dir: &Path, name: &str, bytes: &[u8]) {
    let p = dir.join(name);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, bytes).unwrap();
}

/// `snapctl push DIR REF`; returns the manifest digest.
pub fn push(url: &str, src: &Path, reference: &str) -> String {
    snapctl(url, &["push", src.to_str().unwrap(), reference])
        .ok()
        .json()["digest"]
        .as_str()
        .unwrap()
        .to_string()
}

/// A real S3-compatible server: s3s-fs (installed by scripts/test.sh) started on a
/// free loopback port with authentication on and killed by PID on drop, or, when
/// `SNAPREG_TEST_S3_ENDPOINT` is set, a server already running (bench/s3/garage.sh
/// runs the suite on a Garage cluster that way: `SNAPREG_TEST_S3_ACCESS_KEY`,
/// `_SECRET_KEY`, `_BUCKET`, `_REGION`). Tests inspect and damage objects through the
/// S3 API only, so they run the same against either.
pub struct S3Server {
    child: Option<Child>,
    pub endpoint: String,
    access_key: String,
    secret_key: String,
    region: String,
    pub bucket: String,
    /// Prefixes are unique per server instance: reruns against a long-lived server
    /// never see each other's objects.
    run: String,
}

impl S3Server {
    pub fn start(root: &Path) -> S3Server {
        let run = format!("{:x}-{}", std::process::id(), rand_suffix());
        if let Ok(endpoint) = std::env::var("SNAPREG_TEST_S3_ENDPOINT") {
            let var = |k: &str| {
                std::env::var(format!("SNAPREG_TEST_S3_{k}")).unwrap_or_else(|_| {
                    panic!("SNAPREG_TEST_S3_{k} must be set with SNAPREG_TEST_S3_ENDPOINT")
                })
            };
            return S3Server {
                child: None,
                endpoint,
                access_key: var("ACCESS_KEY"),
                secret_key: var("SECRET_KEY"),
                region: std::env::var("SNAPREG_TEST_S3_REGION")
                    .unwrap_or_else(|_| "us-east-1".into()),
                bucket: var("BUCKET"),
                run,
            };
        }
        let exe = std::env::var_os("SNAPREG_S3S_FS")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into()))
                    .join(".cache/snapreg/tools/bin/s3s-fs")
            });
        assert!(
            exe.exists(),
            "no s3s-fs at {}: scripts/test.sh installs it (cargo install --locked s3s-fs --features binary)",
            exe.display()
        );
        let bucket = "snaps".to_string();
        // s3s-fs keeps a bucket as a directory under its root.
        std::fs::create_dir_all(root.join(&bucket)).unwrap();
        let port = free_port();
        let (access_key, secret_key) = (
            "snapreg-test".to_string(),
            "snapreg-test-secret".to_string(),
        );
        let child = Command::new(exe)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", &access_key, "--secret-key", &secret_key])
            .arg(root)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        wait_for(Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        })
        .expect("s3s-fs did not start listening");
        S3Server {
            child: Some(child),
            endpoint: format!("http://127.0.0.1:{port}"),
            access_key,
            secret_key,
            region: "us-east-1".into(),
            bucket,
            run,
        }
    }

    /// `s3://<bucket>/<prefix>` for a store named `name`, unique to this instance.
    pub fn store_url(&self, name: &str) -> String {
        format!("s3://{}/{}-{name}", self.bucket, self.run)
    }

    /// The AWS_* variables a registry needs to reach this server.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT_URL", self.endpoint.as_str()),
            ("AWS_ALLOW_HTTP", "true"),
            ("AWS_ACCESS_KEY_ID", &self.access_key),
            ("AWS_SECRET_ACCESS_KEY", &self.secret_key),
            ("AWS_REGION", &self.region),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    /// Starts a registry on `store` (a [`S3Server::store_url`]).
    pub fn registry(&self, data: &Path, store: &str, extra: &[&str]) -> Registry {
        let mut args = vec!["--store", store];
        args.extend_from_slice(extra);
        let mut r = Registry {
            data: data.to_path_buf(),
            url: String::new(),
            addr: "127.0.0.1:0".into(),
            metrics: None,
            oci: None,
            extra: args.iter().map(|s| s.to_string()).collect(),
            env: self.env(),
            child: None,
        };
        r.spawn();
        r
    }

    fn client(&self) -> object_store::aws::AmazonS3 {
        object_store::aws::AmazonS3Builder::new()
            .with_endpoint(&self.endpoint)
            .with_allow_http(true)
            .with_access_key_id(&self.access_key)
            .with_secret_access_key(&self.secret_key)
            .with_region(&self.region)
            .with_bucket_name(&self.bucket)
            .build()
            .unwrap()
    }

    fn key_prefix(store: &str) -> String {
        store.splitn(4, '/').nth(3).unwrap_or_default().to_string()
    }

    /// Keys of the chunk objects of `store`, through the S3 API.
    pub fn chunk_keys(&self, store: &str) -> Vec<String> {
        use futures::TryStreamExt;
        use object_store::ObjectStore;
        let prefix = object_store::path::Path::from(format!("{}/chunks", Self::key_prefix(store)));
        let client = self.client();
        block_on(async {
            client
                .list(Some(&prefix))
                .map_ok(|m| m.location.to_string())
                .try_collect()
                .await
                .unwrap()
        })
    }

    /// Whether `key` (relative to `store`'s prefix) exists.
    pub fn exists(&self, store: &str, key: &str) -> bool {
        use object_store::ObjectStoreExt;
        let path = object_store::path::Path::from(format!("{}/{key}", Self::key_prefix(store)));
        let client = self.client();
        block_on(async { client.head(&path).await.is_ok() })
    }

    /// Rewrites an object (a full key, as [`S3Server::chunk_keys`] gives) with its
    /// last byte flipped: storage corruption behind the registry's back.
    pub fn corrupt(&self, key: &str) {
        use object_store::ObjectStoreExt;
        let path = object_store::path::Path::from(key);
        let client = self.client();
        block_on(async {
            let mut bytes = client
                .get(&path)
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap()
                .to_vec();
            let last = bytes.len() - 1;
            bytes[last] ^= 0xff;
            client.put(&path, bytes.into()).await.unwrap();
        });
    }
}

fn rand_suffix() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    format!("{:x}", t.as_nanos() & 0xffff_ffff)
}

impl Drop for S3Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The JSON object a server prints on its first stdout line once it is ready
/// (`stdout` must be piped).
pub fn first_json_line(child: &mut Child, what: &str) -> serde_json::Value {
    use std::io::BufRead;
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{what} printed {line:?}: {e}"))
}

/// A tmpfs of `size` (e.g. "16m") mounted at `at` (created), unmounted on drop: a full
/// disk or a small memory directory on demand. Needs root.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    pub fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "snapreg-test"])
            .arg(at)
            .status()
            .unwrap();
        assert!(mounted.success(), "mounting a tmpfs needs root");
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// `snapctl export REF TARGET` (must succeed); the manifest digest it reports.
pub fn export_manifest_digest(registry: &str, reference: &str, target: &str) -> String {
    let report = snapctl(registry, &["export", reference, target])
        .ok()
        .json();
    report["manifest_digest"]
        .as_str()
        .unwrap_or_else(|| panic!("no manifest_digest: {report}"))
        .to_string()
}
