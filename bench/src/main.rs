//! Side-by-side benchmarks. Each runs snapreg and its baselines back to back on the
//! same input, interleaved, and prints one markdown table (median, min–max, ratio to
//! the baseline, a correctness column); raw timings go to bench/runs/.
//!
//! `snapreg-bench core [--mib N] [--reps R]`
//!   1. chunking, hashing and compression throughput per core (in memory);
//!   2. push and pull over loopback vs `cp -r` and `tar | zstd` (pack) / `zstd -d | tar`
//!      (unpack) of the same directory, page cache dropped before each run.
//!
//! The binaries come from the cargo target dir (`SNAPREG_BIN`, default
//! ~/.cache/snapreg-target/debug; dependencies are built at opt-level 3 there).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use snapreg_client::chunker::{Chunker, ChunkerConfig};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let opt = |name: &str, default: usize| -> usize {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    match args.get(1).map(String::as_str) {
        Some("core") => core(opt("--mib", 1024), opt("--reps", 3)),
        _ => bail!("usage: snapreg-bench core [--mib N] [--reps R]"),
    }
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

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
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
}

impl Registry {
    fn start(data: &Path) -> Result<Self> {
        let mut child = Command::new(bin("snapreg"))
            .args(["serve", "--listen", "127.0.0.1:0", "--data"])
            .arg(data)
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
    let work = tempfile::Builder::new()
        .prefix("snapreg-bench-")
        .tempdir_in("/var/tmp")?;
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
        "tar | zstd -T0 (pack)",
        "snapctl pull",
        "zstd -d | tar (unpack)",
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
    let runs = Path::new(env!("CARGO_MANIFEST_DIR")).join("runs");
    std::fs::create_dir_all(&runs)?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    std::fs::write(
        runs.join(format!("core-{stamp}.json")),
        serde_json::to_string_pretty(
            &serde_json::json!({ "bytes": bytes, "reps": reps, "names": names, "seconds": times }),
        )?,
    )?;
    Ok(())
}
