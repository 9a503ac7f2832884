//! Side-by-side benchmarks. Each runs snapreg and its baselines back to back on the
//! same input, interleaved, and prints one markdown table (median, min–max, ratio to
//! the baseline, a correctness column); raw timings go to bench/runs/.
//!
//! `snapreg-bench core [--mib N] [--reps R]`
//!   1. chunking, hashing and compression throughput per core (in memory);
//!   2. push and pull over loopback vs `cp -r` and `tar | zstd` (pack) / `zstd -d | tar`
//!      (unpack) of the same directory, page cache dropped before each run.
//!
//! `snapreg-bench restore [--gib G] [--reps R] [--rss-gib 0.5,1,2,4] [--paths 0,1,4] [--holes-kib K]`
//!   the image of a G GiB process (1/3 random, 1/3 repeated pattern, 1/3 zeros):
//!   `snapctl pull-restore` from a loopback registry (node cache empty) vs `criu restore`
//!   from a local directory vs the archive path (HTTP download of a tar.zst, extract,
//!   `criu restore`), then pull-restore with a warm node cache, then `--lazy` and
//!   `--fill-first` each cold and warm (paths 0–7 in that order); page cache dropped
//!   before each, interleaved; then snapctl's peak RSS against image size. With K,
//!   every other K KiB of the random third is zeros: zero runs cut the image into
//!   pieces smaller than a chunk, as in a GPU worker's device memory.
//!
//! `snapreg-bench checkpoint [--gib G] [--reps R]`
//!   how long a checkpoint of a G GiB process keeps it frozen, and until the snapshot
//!   is committed: `criu dump` to local disk vs `snapctl checkpoint` streamed, spooled
//!   to memory (`--spool auto`) and spooled to disk (checkpoint.rs).
//!
//! `snapreg-bench replication [--pushes N] [--mib M] [--interval-ms I]`
//!   registry A replicating to B over loopback; a steady stream of N pushes of M MiB
//!   (fresh random data each) to A, one every I ms; per push: the push time and the lag
//!   until B serves the tag (polled through B's API), and replication throughput.
//!
//! `snapreg-bench fill [--gib G] [--reps R] [--threads 1,2]`
//!   G GiB of fresh anonymous memory filled from memory three ways: read(2) from a pipe
//!   (CRIU's streamed restore), UFFDIO_COPY and memcpy from T threads (fill.rs).
//!
//! `snapreg-bench fill-events [--rounds N]`
//!   many threads filling memory by UFFDIO_COPY while the process drops ranges of it:
//!   which scheme never puts a dropped page back (fill_events.rs).
//!
//! `snapreg-bench lazy-fill [--gib G] [--reps R] [--threads T]`
//!   a process restored eager, lazy with CRIU's daemon, and lazy with its pages filled
//!   by UFFDIO_COPY from T threads (a prototype daemon, lazy_fill.rs).
//!
//! `snapreg-bench s3 [--mib N] [--reps R] [--requests K]`
//!   the registry on s3s-fs: objects per GiB, request latency, and pull through the
//!   registry vs straight from the store by presigned URL (s3.rs).
//!
//! `snapreg-bench encryption [--mib N] [--reps R]`
//!   what encryption at rest costs: per core (codec vs encrypt, decode vs decrypt) and
//!   push / re-push / pull over loopback, plaintext vs encrypted (encryption.rs).
//!
//! `snapreg-bench fanout --nodes N [--mib M] [--mbit B] [--peers-only] [--json]`
//!   one registry and N node agents in network namespaces with `tc`-limited links:
//!   all nodes prefetch one snapshot at once, peers off then on; registry egress and
//!   each node's time against one node alone (fanout.rs).
//!
//! `snapreg-bench load [--seconds S] [--pulls P] [--pushes Q] [--mib M] [--json]`
//!   one registry under P concurrent pulls and Q concurrent pushes of overlapping
//!   snapshots: requests served, errors, GetChunks p50/p99, the registry's CPU time
//!   and peak RSS (load.rs).
//!
//! `snapreg-bench cost [--chunks 100000,1000000] [--json]`
//!   index bytes and registry RSS against chunk count, a 64 GiB push's planning time,
//!   GC sweep time, manifest bytes per chunk (cost.rs; docs/OPERATIONS.md sizing).
//!
//! `snapreg-bench oci-dedup [--mib M]`
//!   what two sibling CRIU checkpoints store pushed natively (`snapctl push`) against
//!   pushed as OCI checkpoint images through /v2/ by skopeo, with the layer
//!   uncompressed and gzipped (oci.rs).
//!
//! The binaries come from the cargo target dir (`SNAPREG_BIN`, default
//! ~/.cache/snapreg-target/debug; dependencies are built at opt-level 3 there).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use snapreg_client::chunker::{Chunker, ChunkerConfig};

mod checkpoint;
mod cost;
mod encryption;
mod fanout;
mod fill;
mod fill_events;
mod lazy_fill;
mod load;
mod oci;
mod s3;
use snapreg_client::uffd;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let opt = |name: &str, default: usize| -> usize { arg(&args, name, default) };
    match args.get(1).map(String::as_str) {
        Some("core") => core(opt("--mib", 1024), opt("--reps", 3)),
        Some("restore") => {
            let gib: f64 = arg(&args, "--gib", 2.0);
            let rss: Vec<f64> = arg_list(&args, "--rss-gib", vec![0.5, 1.0, 2.0, 4.0]);
            // Which restore paths to run (indexes into the table; the local baseline,
            // 0, always runs): all by default.
            let paths: Vec<usize> = arg_list(&args, "--paths", (0..8).collect());
            let shape = Shape {
                holes_kib: opt("--holes-kib", 0),
                ..Shape::of(gib)
            };
            restore(shape, opt("--reps", 3), &rss, &paths)
        }
        Some("checkpoint") => {
            let gib: f64 = arg(&args, "--gib", 2.0);
            checkpoint::run(gib, opt("--reps", 3))
        }
        Some("replication") => replication(opt("--pushes", 20), opt("--mib", 64), opt("--interval-ms", 500)),
        Some("s3") => s3::run(opt("--mib", 1024), opt("--reps", 3), opt("--requests", 200)),
        Some("encryption") => encryption::run(opt("--mib", 1024), opt("--reps", 3)),
        Some("fanout") => fanout::run(
            opt("--nodes", 8),
            opt("--mib", 256),
            opt("--mbit", 1000),
            args.iter().any(|a| a == "--peers-only"),
            args.iter().any(|a| a == "--json"),
        ),
        Some("load") => load::run(
            opt("--seconds", 60) as u64,
            opt("--pulls", 64),
            opt("--pushes", 8),
            opt("--mib", 32),
            args.iter().any(|a| a == "--json"),
        ),
        Some("cost") => {
            let sizes: Vec<u64> = arg_list(&args, "--chunks", vec![100_000, 1_000_000]);
            cost::run(&sizes, args.iter().any(|a| a == "--json"))
        }
        Some("oci-dedup") => oci::run(opt("--mib", 256)),
        Some("fill") => {
            let gib: f64 = arg(&args, "--gib", 2.0);
            let mut threads: Vec<usize> = arg_list(&args, "--threads", vec![1, 2]);
            threads.retain(|&t| t > 0);
            fill::run(gib, opt("--reps", 3), &threads)
        }
        Some("fill-events") => fill_events::run(opt("--rounds", 20)),
        Some("lazy-fill") => {
            let gib: f64 = arg(&args, "--gib", 2.0);
            lazy_fill::run(gib, opt("--reps", 3), opt("--threads", 2).max(1))
        }
        Some("registry-stats") => fanout::print_registry_stats(args.get(2).map_or("", String::as_str)),
        _ => bail!(
            "usage: snapreg-bench core [--mib N] [--reps R] | restore [--gib G] [--reps R] [--rss-gib 0.5,1,2,4] [--paths 0,1,4] [--holes-kib K] | checkpoint [--gib G] [--reps R] | replication [--pushes N] [--mib M] [--interval-ms I] | s3 [--mib N] [--reps R] [--requests K] | encryption [--mib N] [--reps R] | fanout --nodes N [--mib M] [--mbit B] [--peers-only] [--json] | load [--seconds S] [--pulls P] [--pushes Q] [--mib M] [--json] | cost [--chunks N1,N2] [--json] | oci-dedup [--mib M] | fill [--gib G] [--reps R] [--threads 1,2] | lazy-fill [--gib G] [--reps R] [--threads T] | fill-events [--rounds N]"
        ),
    }
}

/// The value after `name` in `args`, parsed; `default` when absent or unparsable.
fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The comma-separated list after `name` in `args` (unparsable items left out);
/// `default` when absent.
fn arg_list<T: std::str::FromStr>(args: &[String], name: &str, default: Vec<T>) -> Vec<T> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map_or(default, |v| {
            v.split(',').filter_map(|x| x.parse().ok()).collect()
        })
}

fn bin(name: &str) -> PathBuf {
    let dir = std::env::var_os("SNAPREG_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into()))
                .join(".cache/snapreg-target/debug")
        });
    dir.join(name)
}

fn noise(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1; // distinct seeds, distinct streams
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(n);
    out
}

/// A memory-image-like input: a third random, a third a repeated text pattern, a third
/// zeros, as a CRIU pages file plus a few small metadata files.
fn make_input(dir: &Path, mib: usize) -> Result<u64> {
    std::fs::create_dir_all(dir)?;
    let third = (mib << 20) / 3 / 4096 * 4096;
    let mut pages = noise(1, third);
    let pattern = b"model.layers.17.mlp.down_proj.weight: fp16[8192, 8192]\n";
    pages.extend(pattern.iter().cycle().take(third));
    pages.resize(pages.len() + third, 0);
    std::fs::write(dir.join("pages-1.img"), &pages)?;
    for (name, n) in [
        ("core-1.img", 2000),
        ("mm-1.img", 4400),
        ("pagemap-1.img", 1500),
        ("inventory.img", 86),
    ] {
        std::fs::write(dir.join(name), noise(n as u64, n))?;
    }
    Ok(pages.len() as u64 + 7986)
}

fn drop_caches() {
    let _ = Command::new("sync").status();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

fn sh(cmd: &str) -> Result<()> {
    let st = Command::new("bash").arg("-c").arg(cmd).status()?;
    if !st.success() {
        bail!("`{cmd}` failed");
    }
    Ok(())
}

fn time(f: impl FnOnce() -> Result<()>) -> Result<f64> {
    let t = Instant::now();
    f()?;
    Ok(t.elapsed().as_secs_f64())
}

/// A scratch directory under /var/tmp (local disk, not tmpfs), removed on drop.
fn scratch(prefix: &str) -> Result<tempfile::TempDir> {
    Ok(tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/var/tmp")?)
}

/// Writes a run's raw timings to bench/runs/<name>-<unix seconds>.json, or under
/// `SNAPREG_BENCH_RUNS` (a bench run away from its checkout, as on the device machine).
fn save_run(name: &str, raw: &serde_json::Value) -> Result<()> {
    let runs = std::env::var_os("SNAPREG_BENCH_RUNS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("runs"));
    std::fs::create_dir_all(&runs)?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    std::fs::write(
        runs.join(format!("{name}-{stamp}.json")),
        serde_json::to_string_pretty(raw)?,
    )?;
    Ok(())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Bytes of the files under `dir`, recursively.
fn dir_bytes(dir: &Path) -> u64 {
    walk(dir).iter().map(|m| m.len()).sum()
}

/// The metadata of every file under `dir`, recursively.
fn walk(dir: &Path) -> Vec<std::fs::Metadata> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        match e.metadata() {
            Ok(m) if m.is_dir() => out.extend(walk(&e.path())),
            Ok(m) => out.push(m),
            Err(_) => {}
        }
    }
    out
}

fn dirs_equal(a: &Path, b: &Path) -> bool {
    Command::new("diff")
        .arg("-rq")
        .arg(a)
        .arg(b)
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

struct Registry {
    child: std::process::Child,
    url: String,
    /// The `--oci-listen` address, when started with one.
    oci: Option<String>,
}

impl Registry {
    fn start(data: &Path) -> Result<Self> {
        Registry::start_with(data, &[])
    }

    fn start_with(data: &Path, extra: &[&str]) -> Result<Self> {
        let mut child = Command::new(bin("snapreg"))
            // Benchmarks measure data paths, not access control.
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--anonymous",
                "admin",
                "--data",
            ])
            .arg(data)
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .context("starting snapreg (build it first: cargo build --workspace --bins)")?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line)?;
        let v: serde_json::Value = serde_json::from_str(&line)?;
        Ok(Registry {
            child,
            url: format!("http://{}", v["listen"].as_str().unwrap_or_default()),
            oci: v["oci"].as_str().map(str::to_string),
        })
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn snapctl(url: &str, args: &[&str]) -> Result<serde_json::Value> {
    let out = Command::new(bin("snapctl"))
        .args(["--json", "--registry", url])
        .args(args)
        .output()?;
    if !out.status.success() {
        bail!("snapctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(serde_json::from_str(text.lines().last().unwrap_or("{}"))?)
}

fn core(mib: usize, reps: usize) -> Result<()> {
    let work = scratch("snapreg-bench-")?;
    let input = work.path().join("input");
    let bytes = make_input(&input, mib)?;
    let gib = bytes as f64 / (1u64 << 30) as f64;
    let mut report = String::new();

    // 1. In-memory throughput per core.
    let data = std::fs::read(input.join("pages-1.img"))?;
    let random = &data[..data.len() / 3];
    let cfg = ChunkerConfig::default();
    let t_chunk = time(|| {
        let n = Chunker::new(&data[..], cfg.clone(), true).count();
        std::hint::black_box(n);
        Ok(())
    })?;
    let t_hash = time(|| {
        std::hint::black_box(blake3::hash(&data));
        Ok(())
    })?;
    let t_zstd = time(|| {
        for c in data[data.len() / 3..2 * data.len() / 3].chunks(512 << 10) {
            std::hint::black_box(snapreg_proto::codec::encode(c));
        }
        Ok(())
    })?;
    let t_zstd_random = time(|| {
        for c in random.chunks(512 << 10) {
            std::hint::black_box(snapreg_proto::codec::encode(c));
        }
        Ok(())
    })?;
    let gbs = |n: usize, t: f64| n as f64 / t / 1e9;
    report += &format!(
        "### Per-core throughput (one thread, in memory, {:.2} GiB input)\n\n| stage | GB/s |\n|---|---|\n\
         | FastCDC, page-aligned, zero-run detection | {:.2} |\n| BLAKE3 (single-threaded) | {:.2} |\n\
         | codec: zstd-1 on the pattern third | {:.2} |\n| codec: zstd-1 tried and dropped on the random third | {:.2} |\n\n",
        gib,
        gbs(data.len(), t_chunk),
        gbs(data.len(), t_hash),
        gbs(data.len() / 3, t_zstd),
        gbs(random.len(), t_zstd_random)
    );
    drop(data);

    // 2. Push / pull over loopback vs cp -r and tar|zstd, interleaved.
    let names = [
        "snapctl push (cold registry)",
        "snapctl push (same image again)",
        "cp -r",
        "tar \\| zstd -T0 (pack)",
        "snapctl pull",
        "zstd -d \\| tar (unpack)",
    ];
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    let mut correct = vec![true; names.len()];
    let mut sent = 0u64;
    for rep in 0..reps {
        let run = work.path().join(format!("rep{rep}"));
        std::fs::create_dir_all(&run)?;
        let reg = Registry::start(&run.join("registry"))?;
        let inp = input.to_str().unwrap().to_string();
        drop_caches();
        times[0].push(time(|| {
            snapctl(&reg.url, &["push", &inp, "bench/img:a"]).map(drop)
        })?);
        drop_caches();
        times[1].push(time(|| {
            sent = snapctl(&reg.url, &["push", &inp, "bench/img:b"])?["bytes_transferred"]
                .as_u64()
                .unwrap_or(0);
            Ok(())
        })?);
        correct[1] &= sent == 0;
        drop_caches();
        let copy = run.join("copy");
        times[2].push(time(|| sh(&format!("cp -r {inp} {}", copy.display())))?);
        correct[2] &= dirs_equal(&input, &copy);
        drop_caches();
        let tarball = run.join("img.tar.zst");
        times[3].push(time(|| {
            sh(&format!(
                "tar -C {inp} -cf - . | zstd -q -1 -T0 -o {}",
                tarball.display()
            ))
        })?);
        drop_caches();
        let pulled = run.join("pulled");
        times[4].push(time(|| {
            snapctl(&reg.url, &["pull", "bench/img:a", pulled.to_str().unwrap()]).map(drop)
        })?);
        correct[4] &= dirs_equal(&input, &pulled);
        drop_caches();
        let untar = run.join("untar");
        std::fs::create_dir_all(&untar)?;
        times[5].push(time(|| {
            sh(&format!(
                "zstd -q -d -c {} | tar -C {} -xf -",
                tarball.display(),
                untar.display()
            ))
        })?);
        correct[5] &= dirs_equal(&input, &untar);
        drop(reg);
        std::fs::remove_dir_all(&run)?;
    }
    let cp = median(&mut times[2].clone());
    report += &format!(
        "### Push and pull over loopback vs copies of the same directory ({:.2} GiB: 1/3 random, 1/3 pattern, 1/3 zeros; {reps} reps, page cache dropped before each)\n\n\
         | operation | median s | min–max s | GB/s | ratio to cp -r | output correct |\n|---|---|---|---|---|---|\n",
        gib
    );
    for (i, name) in names.iter().enumerate() {
        let mut v = times[i].clone();
        let m = median(&mut v);
        let (lo, hi) = (
            v.first().copied().unwrap_or(0.0),
            v.last().copied().unwrap_or(0.0),
        );
        report += &format!(
            "| {name} | {m:.2} | {lo:.2}–{hi:.2} | {:.2} | {:.2} | {} |\n",
            bytes as f64 / m / 1e9,
            m / cp,
            if correct[i] { "yes" } else { "NO" }
        );
    }
    println!("{report}");
    save_run(
        "core",
        &serde_json::json!({ "bytes": bytes, "reps": reps, "names": names, "seconds": times }),
    )?;
    Ok(())
}

fn criu_path() -> String {
    std::env::var("SNAPCTL_CRIU").unwrap_or_else(|_| "/opt/snapreg-criu/bin/criu".into())
}

fn wait_gone(pid: u32) {
    let _ = Command::new("kill")
        .args(["-9", &pid.to_string()])
        .stderr(Stdio::null())
        .status();
    for _ in 0..500 {
        if !Path::new(&format!("/proc/{pid}")).exists() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// The counter in a test process's `state` file ("<counter> <pid>").
fn counter(state_dir: &Path) -> Option<u64> {
    std::fs::read_to_string(state_dir.join("state"))
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Runs a restore on a thread of its own and times, from its start, the restored
/// process's first answer (its counter moving past the checkpointed value, written
/// every 20 ms; `dumped` is the value at the checkpoint) and the command's end. Returns (first answer, (end, command's value)).
fn timed_restore<T: Send>(
    state_dir: &Path,
    dumped: u64,
    restore: impl FnOnce() -> Result<T> + Send,
) -> Result<(f64, (f64, T))> {
    // The last restored process counted on past the checkpoint: start from its value.
    std::fs::write(state_dir.join("state"), format!("{dumped} 0\n"))?;
    let t = Instant::now();
    std::thread::scope(|s| {
        let cmd = s.spawn(|| restore().map(|v| (t.elapsed().as_secs_f64(), v)));
        let (mut first, mut ended) = (None, None);
        // Bounded: 10 minutes, or 5 s after the command ended.
        while first.is_none() && t.elapsed().as_secs() < 600 {
            if counter(state_dir).is_some_and(|c| c > dumped) {
                first = Some(t.elapsed().as_secs_f64());
            } else if cmd.is_finished()
                && ended.get_or_insert_with(Instant::now).elapsed().as_secs() >= 5
            {
                break;
            } else {
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        }
        let end = cmd
            .join()
            .map_err(|_| anyhow::anyhow!("restore thread panicked"))??;
        let first = first.context("the restored process never answered")?;
        Ok((first, end))
    })
}

/// Asks the restored process to check its whole memory (SIGUSR1) and waits for "ok",
/// at most `seconds`.
fn verify_restored(state_dir: &Path, pid: u32, seconds: u64) -> Result<()> {
    let verdict = state_dir.join("verify");
    let _ = std::fs::remove_file(&verdict);
    sh(&format!("kill -USR1 {pid}"))?;
    for _ in 0..seconds * 100 {
        if let Ok(v) = std::fs::read_to_string(&verdict) {
            if v.starts_with("ok") {
                return Ok(());
            }
            bail!("the restored process found its memory changed: {v}");
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    bail!("the restored process did not verify its memory within {seconds} s")
}

/// What a test process holds: `gib` GiB in thirds (random, pattern, zeros), after
/// `pad_mib` MiB of per-process content (two runs with different pads hold the same
/// data at different offsets: siblings); with `holes_kib`, every other `holes_kib`
/// KiB of the random third is zeros (memory cut into pieces smaller than a chunk).
#[derive(Clone, Copy, Debug)]
struct Shape {
    gib: f64,
    pad_mib: usize,
    holes_kib: usize,
}

impl Shape {
    fn of(gib: f64) -> Shape {
        Shape {
            gib,
            pad_mib: 0,
            holes_kib: 0,
        }
    }
}

/// Starts a process of `gib` GiB (thirds: random, pattern, zeros), dumps it with CRIU
/// into `images` (which kills it) and returns its PID.
fn dump_process(work: &Path, images: &Path, gib: f64) -> Result<u32> {
    dump_shaped(work, images, Shape::of(gib))
}

/// [`dump_process`] of a process of `shape`.
fn dump_shaped(work: &Path, images: &Path, shape: Shape) -> Result<u32> {
    let name = images.file_name().unwrap().to_string_lossy();
    let (mut child, _) = hold_process(work, &name, shape)?;
    let pid = child.id();
    std::fs::create_dir_all(images)?;
    let st = Command::new(criu_path())
        .args(["dump", "-t", &pid.to_string(), "-D"])
        .arg(images)
        .args(["-o", "dump.log"])
        .status()?;
    if !st.success() {
        bail!("criu dump failed; see {}/dump.log", images.display());
    }
    child.wait()?;
    Ok(pid)
}

/// Starts a test process of `shape` writing its state under `work/proc-<name>`;
/// returns it once it counts, and that directory.
fn hold_process(work: &Path, name: &str, shape: Shape) -> Result<(std::process::Child, PathBuf)> {
    let Shape {
        gib,
        pad_mib,
        holes_kib,
    } = shape;
    let third = ((gib * 1024.0) / 3.0).round() as usize;
    let out = work.join(format!("proc-{name}"));
    std::fs::create_dir_all(&out)?;
    let _ = std::fs::remove_file(out.join("state"));
    // setsid(1) execs in place (the child is no group leader): its own session, so
    // CRIU needs no --shell-job.
    let child = Command::new("setsid")
        .arg(bin("snapreg-testproc"))
        .args(["hold", "--out"])
        .arg(&out)
        .args([
            "--mib",
            &third.to_string(),
            "--pattern-mib",
            &third.to_string(),
            "--zero-mib",
            &third.to_string(),
            "--seed",
            "9",
            "--pad-mib",
            &pad_mib.to_string(),
            "--holes-kib",
            &holes_kib.to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    while !out.join("state").exists() {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Ok((child, out))
}

/// `images` as a tar.zst served by `python3 -m http.server` on loopback: the server
/// and the archive's URL.
fn serve_archive(w: &Path, images: &Path) -> Result<(Option<std::process::Child>, String)> {
    let www = w.join("www");
    std::fs::create_dir_all(&www)?;
    sh(&format!(
        "tar -C {} -cf - . | zstd -q -1 -T0 -o {}/img.tar.zst",
        images.display(),
        www.display()
    ))?;
    let mut http = Command::new("python3")
        .args([
            "-m",
            "http.server",
            "--bind",
            "127.0.0.1",
            "0",
            "--directory",
        ])
        .arg(&www)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut line = String::new();
    BufReader::new(http.stdout.take().unwrap()).read_line(&mut line)?;
    let port = line
        .split("port ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or("8000")
        .to_string();
    let url = format!("http://127.0.0.1:{port}/img.tar.zst");
    Ok((Some(http), url))
}

fn restore(shape: Shape, reps: usize, rss_sizes: &[f64], paths: &[usize]) -> Result<()> {
    let gib = shape.gib;
    let work = scratch("snapreg-bench-")?;
    let w = work.path();
    let reg = Registry::start(&w.join("registry"))?;
    let images = w.join("images");
    let pid = dump_shaped(w, &images, shape)?;
    let image_bytes = dir_bytes(&images);
    snapctl(
        &reg.url,
        &["push", images.to_str().unwrap(), "bench/restore:a"],
    )?;
    // The archive path: a tar.zst served over HTTP on loopback (only when measured).
    let (mut http, url) = match paths.contains(&2) {
        true => serve_archive(w, &images)?,
        false => (None, String::new()),
    };
    let cache = w.join("node-cache");
    let criu = criu_path();
    let state = w.join("proc-images");
    let at_checkpoint = counter(&state).context("the dumped process left no state")?;
    // The process rewrites its state every 20 ms (state.tmp, then a rename). A dump that
    // caught it in between holds state.tmp open, so every restore needs that file as
    // it was; the first restored process renames it away.
    let caught_mid_write = std::fs::read(state.join("state.tmp")).ok();

    let names = [
        "criu restore, local directory",
        "snapctl pull-restore, node cache empty",
        "archive: download tar.zst + extract + criu restore",
        "snapctl pull-restore, node cache warm",
        "snapctl pull-restore --lazy, node cache empty",
        "snapctl pull-restore --lazy, node cache warm",
        "snapctl pull-restore --fill-first, node cache empty",
        "snapctl pull-restore --fill-first, node cache warm",
    ];
    // Per path: seconds to the first answer, to the command's end; chunks fetched.
    let mut first: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    let mut done: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    // Per path: chunks fetched from the registry, snapctl's peak RSS (MiB), last rep.
    let mut fetched = vec![(0u64, 0u64); names.len()];
    // Per path: the fetch scheduler's and the lazy daemon's account, last rep.
    let mut accounts = vec![serde_json::Value::Null; names.len()];
    for rep in 0..reps {
        for (i, _) in names.iter().enumerate() {
            if i != 0 && !paths.contains(&i) {
                continue;
            }
            if i == 1 || i == 4 || i == 6 {
                let _ = std::fs::remove_dir_all(&cache);
            }
            if let Some(t) = &caught_mid_write {
                std::fs::write(state.join("state.tmp"), t)?;
            }
            drop_caches();
            let scratch = w.join(format!("x{rep}-{i}"));
            let mut account = serde_json::Value::Null;
            let mut pull = |memory: Option<&'static str>| -> Result<(u64, u64)> {
                let mut args = vec![
                    "--cache",
                    cache.to_str().unwrap(),
                    "pull-restore",
                    "--detach",
                ];
                args.extend(memory);
                args.push("bench/restore:a");
                let j = snapctl(&reg.url, &args)?;
                account = serde_json::json!({ "scheduler": j["scheduler"], "lazy": j["lazy"] });
                Ok((
                    j["chunks_transferred"].as_u64().unwrap_or(0),
                    j["peak_rss_bytes"].as_u64().unwrap_or(0) >> 20,
                ))
            };
            let (f, d) = timed_restore(&state, at_checkpoint, || match i {
                0 => sh(&format!(
                    "{criu} restore -D {} -d -o /tmp/bench-restore.log",
                    images.display()
                ))
                .map(|_| (0, 0)),
                1 | 3 => pull(None),
                4 | 5 => pull(Some("--lazy")),
                6 | 7 => pull(Some("--fill-first")),
                _ => {
                    std::fs::create_dir_all(&scratch)?;
                    sh(&format!(
                        "curl -sf {url} -o {s}/img.tar.zst && mkdir {s}/d && zstd -q -d -c {s}/img.tar.zst | tar -C {s}/d -xf - && {criu} restore -D {s}/d -d -o /tmp/bench-restore.log",
                        s = scratch.display()
                    ))
                    .map(|_| (0, 0))
                }
            })
            .with_context(|| names[i])?;
            fetched[i] = d.1;
            accounts[i] = account;
            first[i].push(f);
            done[i].push(d.0);
            // Checking 1 GiB takes seconds on this machine.
            let verify_s = 30 + 15 * gib.ceil() as u64;
            verify_restored(&state, pid, verify_s).with_context(|| names[i])?;
            wait_gone(pid);
            let _ = std::fs::remove_dir_all(&scratch);
        }
    }
    if let Some(h) = http.as_mut() {
        let _ = h.kill();
    }
    let local = median(&mut first[0].clone());
    let holes = match shape.holes_kib {
        0 => String::new(),
        k => format!(" with every other {k} KiB zeros"),
    };
    let mut report = format!(
        "### Restore of a {gib} GiB process ({:.2} GiB image: 1/3 random{holes}, 1/3 pattern, 1/3 zeros; {reps} reps interleaved, page cache dropped before each; every restored process verified its whole memory)\n\n\
         | restore path | first answer, median s | min–max s | ratio to local criu restore | all pages present, median s | ratio | chunks fetched from the registry | snapctl peak RSS MiB |\n|---|---|---|---|---|---|---|---|\n",
        image_bytes as f64 / (1u64 << 30) as f64
    );
    for (i, name) in names.iter().enumerate() {
        if first[i].is_empty() {
            continue;
        }
        let mut v = first[i].clone();
        let m = median(&mut v);
        let all = median(&mut done[i].clone()).max(m);
        let (fetched, rss) = if [1, 3, 4, 5, 6, 7].contains(&i) {
            (fetched[i].0.to_string(), fetched[i].1.to_string())
        } else {
            ("–".into(), "–".into())
        };
        report += &format!(
            "| {name} | {m:.2} | {:.2}–{:.2} | {:.2} | {all:.2} | {:.2} | {fetched} | {rss} |\n",
            v[0],
            v[v.len() - 1],
            m / local,
            all / local
        );
    }

    // Peak RSS of snapctl against image size (node cache empty each time).
    report += "\n| image (process GiB) | image bytes | snapctl peak RSS MiB | restore s |\n|---|---|---|---|\n";
    for &size in rss_sizes {
        let imgs = w.join(format!("rss-{size}"));
        let pid = dump_process(w, &imgs, size)?;
        let bytes = dir_bytes(&imgs);
        let tag = format!("bench/rss:{}", (size * 10.0) as u64);
        snapctl(&reg.url, &["push", imgs.to_str().unwrap(), &tag])?;
        let _ = std::fs::remove_dir_all(&cache);
        drop_caches();
        let j = snapctl(
            &reg.url,
            &[
                "--cache",
                cache.to_str().unwrap(),
                "pull-restore",
                "--detach",
                &tag,
            ],
        )?;
        wait_gone(pid);
        report += &format!(
            "| {size} | {bytes} | {:.0} | {:.2} |\n",
            j["peak_rss_bytes"].as_u64().unwrap_or(0) as f64 / (1u64 << 20) as f64,
            j["seconds"].as_f64().unwrap_or(0.0)
        );
        let _ = std::fs::remove_dir_all(&imgs);
    }
    println!("{report}");
    save_run(
        "restore",
        &serde_json::json!({ "gib": gib, "holes_kib": shape.holes_kib, "image_bytes": image_bytes, "reps": reps, "names": names, "first_answer_seconds": first, "command_seconds": done, "accounts": accounts }),
    )?;
    drop(reg);
    Ok(())
}

fn replication(pushes: usize, mib: usize, interval_ms: usize) -> Result<()> {
    let work = scratch("snapreg-bench-")?;
    let w = work.path();
    let b = Registry::start(&w.join("b"))?;
    let a = Registry::start_with(&w.join("a"), &["--peer", &format!("b={}", b.url)])?;
    let mut push_s = Vec::new();
    let mut lag_s = Vec::new();
    let started = Instant::now();
    for i in 0..pushes {
        let dir = w.join(format!("src{i}"));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("pages-1.img"), noise(1000 + i as u64, mib << 20))?;
        let tag = format!("bench/repl:p{i}");
        let t = Instant::now();
        snapctl(&a.url, &["push", dir.to_str().unwrap(), &tag])?;
        push_s.push(t.elapsed().as_secs_f64());
        let committed = Instant::now();
        // Lag: until B answers for the tag (its manifest and every chunk are there).
        loop {
            if snapctl(&b.url, &["inspect", &tag]).is_ok() {
                break;
            }
            if committed.elapsed().as_secs() > 120 {
                bail!("{tag} never reached B");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        lag_s.push(committed.elapsed().as_secs_f64());
        std::fs::remove_dir_all(&dir)?;
        let next = std::time::Duration::from_millis(interval_ms as u64 * (i as u64 + 1));
        if let Some(wait) = next.checked_sub(started.elapsed()) {
            std::thread::sleep(wait);
        }
    }
    let total = started.elapsed().as_secs_f64();
    let bytes = (pushes * (mib << 20)) as f64;
    let stats = |v: &mut Vec<f64>| {
        let m = median(v);
        (
            m,
            v[0],
            v[v.len() - 1],
            v[(v.len() * 9 / 10).min(v.len() - 1)],
        )
    };
    let (pm, plo, phi, _) = stats(&mut push_s.clone());
    let (lm, llo, lhi, l90) = stats(&mut lag_s.clone());
    let report = format!(
        "### Replication A -> B on loopback: {pushes} pushes of {mib} MiB of fresh random data, one every {interval_ms} ms\n\n\
         | measure | median | min–max | p90 |\n|---|---|---|---|\n\
         | push to A, s | {pm:.2} | {plo:.2}–{phi:.2} | – |\n\
         | lag until B serves the tag, s | {lm:.2} | {llo:.2}–{lhi:.2} | {l90:.2} |\n\n\
         Replication throughput per snapshot (size / median lag): {:.0} MB/s. Offered load {:.1} MB/s ({:.0} MiB in {total:.1} s), each snapshot served by B before the next push.\n",
        (mib << 20) as f64 / lm / 1e6,
        bytes / total / 1e6,
        bytes / (1u64 << 20) as f64
    );
    println!("{report}");
    save_run(
        "replication",
        &serde_json::json!({ "pushes": pushes, "mib": mib, "interval_ms": interval_ms, "push_seconds": push_s, "lag_seconds": lag_s }),
    )?;
    drop(a);
    drop(b);
    Ok(())
}
