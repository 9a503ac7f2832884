//! `snapreg-bench s3 [--mib N] [--reps R] [--requests K]`: the registry on a real
//! S3-compatible server (s3s-fs on loopback, `SNAPREG_S3S_FS` or the copy
//! scripts/test.sh installs under ~/.cache/snapreg/tools).
//!
//! 1. objects per GiB for the current chunking (FastCDC, 512 KiB average) of N MiB of
//!    incompressible data, and the push time;
//! 2. request latency on that server, one request at a time: PUT, GET and HEAD of a
//!    512 KiB object (a chunk) and PUT of a 1 KiB object (the fixed cost of a request);
//! 3. `snapctl pull` through the registry (`--no-direct`, GetChunks) vs straight from
//!    the store by presigned URL, R runs each, interleaved, page cache dropped first;
//!    correctness: the pulled tree equals the pushed one.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStoreExt, PutPayload};

use super::{dirs_equal, drop_caches, median, noise, save_run, scratch, snapctl, Registry};

const ACCESS_KEY: &str = "snapreg-bench";
const SECRET_KEY: &str = "snapreg-bench-secret";
const BUCKET: &str = "bench";

struct S3sFs {
    child: std::process::Child,
}

impl Drop for S3sFs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_s3s_fs(root: &Path) -> Result<(S3sFs, String)> {
    let exe = std::env::var_os("SNAPREG_S3S_FS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into()))
                .join(".cache/snapreg/tools/bin/s3s-fs")
        });
    std::fs::create_dir_all(root.join(BUCKET))?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let child = Command::new(&exe)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
        .arg(root)
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {} (scripts/test.sh installs it)", exe.display()))?;
    let server = S3sFs { child };
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("s3s-fs did not listen on port {port}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((server, format!("http://127.0.0.1:{port}")))
}

fn files_under(dir: &Path) -> (u64, u64) {
    let (mut n, mut bytes) = (0, 0);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let Ok(meta) = e.metadata() else { continue };
            if meta.is_dir() {
                stack.push(e.path());
            } else {
                n += 1;
                bytes += meta.len();
            }
        }
    }
    (n, bytes)
}

/// (median, p90) in milliseconds.
fn ms_stats(v: &mut [f64]) -> (f64, f64) {
    let m = median(v);
    (m * 1e3, v[(v.len() * 9 / 10).min(v.len() - 1)] * 1e3)
}

/// Sequential request latencies (seconds) against the server: PUT/GET/HEAD of a
/// chunk-sized object, PUT of a tiny one.
fn request_latency(requests: usize) -> Result<Vec<(&'static str, Vec<f64>)>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let store = object_store::aws::AmazonS3Builder::from_env()
            .with_bucket_name(BUCKET)
            .build()?;
        let chunk = bytes::Bytes::from(noise(9, 512 << 10));
        let tiny = bytes::Bytes::from(noise(10, 1 << 10));
        let path = |kind: &str, i: usize| ObjectPath::from(format!("latency/{kind}/{i}"));
        let mut out: Vec<(&'static str, Vec<f64>)> = Vec::new();
        let mut put = Vec::new();
        for i in 0..requests {
            let t = Instant::now();
            store
                .put(&path("chunk", i), PutPayload::from(chunk.clone()))
                .await?;
            put.push(t.elapsed().as_secs_f64());
        }
        let mut get = Vec::new();
        for i in 0..requests {
            let t = Instant::now();
            let got = store.get(&path("chunk", i)).await?.bytes().await?;
            get.push(t.elapsed().as_secs_f64());
            if got != chunk {
                bail!("GET returned different bytes");
            }
        }
        let mut head = Vec::new();
        for i in 0..requests {
            let t = Instant::now();
            store.head(&path("chunk", i)).await?;
            head.push(t.elapsed().as_secs_f64());
        }
        let mut put_tiny = Vec::new();
        for i in 0..requests {
            let t = Instant::now();
            store
                .put(&path("tiny", i), PutPayload::from(tiny.clone()))
                .await?;
            put_tiny.push(t.elapsed().as_secs_f64());
        }
        for i in 0..requests {
            store.delete(&path("chunk", i)).await?;
            store.delete(&path("tiny", i)).await?;
        }
        out.push(("PUT 512 KiB", put));
        out.push(("GET 512 KiB", get));
        out.push(("HEAD", head));
        out.push(("PUT 1 KiB", put_tiny));
        Ok(out)
    })
}

pub fn run(mib: usize, reps: usize, requests: usize) -> Result<()> {
    let work = scratch("snapreg-bench-s3-")?;
    let w = work.path();
    let (_server, endpoint) = start_s3s_fs(&w.join("s3"))?;
    // The registry (a child) and the latency client (here) read the same variables.
    for (k, v) in [
        ("AWS_ENDPOINT_URL", endpoint.as_str()),
        ("AWS_ALLOW_HTTP", "true"),
        ("AWS_ACCESS_KEY_ID", ACCESS_KEY),
        ("AWS_SECRET_ACCESS_KEY", SECRET_KEY),
        ("AWS_REGION", "us-east-1"),
    ] {
        std::env::set_var(k, v);
    }
    let reg = Registry::start_with(&w.join("reg"), &["--store", &format!("s3://{BUCKET}/r")])?;

    // 1. Objects per GiB.
    let src = w.join("src");
    std::fs::create_dir_all(&src)?;
    let per_file = 256usize.min(mib);
    for i in 0..mib.div_ceil(per_file) {
        let n = per_file.min(mib - i * per_file);
        std::fs::write(
            src.join(format!("pages-{i}.img")),
            noise(100 + i as u64, n << 20),
        )?;
    }
    let gib = mib as f64 / 1024.0;
    drop_caches();
    let t = Instant::now();
    let pushed = snapctl(&reg.url, &["push", src.to_str().unwrap(), "bench/s3:v1"])?;
    let push_s = t.elapsed().as_secs_f64();
    let (objects, stored) = files_under(&w.join("s3").join(BUCKET).join("r/chunks"));
    let per_gib = objects as f64 / gib;

    // 2. Request latency.
    let mut latency = request_latency(requests)?;

    // 3. Pull through the registry vs by URL, interleaved.
    let mut via = Vec::new();
    let mut direct = Vec::new();
    let mut correct = true;
    let mut direct_chunks = 0;
    for _ in 0..reps {
        for by_url in [false, true] {
            let dst = w.join("dst");
            let _ = std::fs::remove_dir_all(&dst);
            drop_caches();
            let mut args = vec!["pull", "bench/s3:v1", dst.to_str().unwrap()];
            if !by_url {
                args.insert(0, "--no-direct");
            }
            let t = Instant::now();
            let j = snapctl(&reg.url, &args)?;
            let s = t.elapsed().as_secs_f64();
            correct &= dirs_equal(&src, &dst);
            if by_url {
                direct_chunks = j["chunks_direct"].as_u64().unwrap_or(0);
                direct.push(s);
            } else {
                via.push(s);
            }
        }
    }
    let bytes = (mib << 20) as f64;
    let (vm, dm) = (median(&mut via.clone()), median(&mut direct.clone()));
    let range = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        format!("{:.2}–{:.2}", v[0], v[v.len() - 1])
    };
    let mut report = format!(
        "### S3 (s3s-fs on loopback): {mib} MiB of incompressible data, FastCDC 512 KiB average\n\n\
         | measure | value |\n|---|---|\n\
         | chunk objects | {objects} ({per_gib:.0} per GiB; mean {:.0} KiB stored) |\n\
         | push through the registry | {push_s:.2} s ({:.0} MB/s), {} chunks sent |\n\n\
         | request, one at a time ({requests} each) | median ms | p90 ms |\n|---|---|---|\n",
        stored as f64 / objects.max(1) as f64 / 1024.0,
        bytes / push_s / 1e6,
        pushed["chunks_transferred"],
    );
    for (name, v) in latency.iter_mut() {
        let (m, p90) = ms_stats(v);
        report.push_str(&format!("| {name} | {m:.2} | {p90:.2} |\n"));
    }
    let tiny_put = median(&mut latency[3].1.clone());
    report.push_str(&format!(
        "\nFixed request cost (PUT of 1 KiB) x objects per GiB = {:.2} s of serial request overhead per GiB.\n\n\
         | pull ({reps} runs each, interleaved, page cache dropped) | median s | min–max s | MB/s | ratio | identical |\n|---|---|---|---|---|---|\n\
         | through the registry (GetChunks) | {vm:.2} | {} | {:.0} | 1.00 | {correct} |\n\
         | direct by presigned URL ({direct_chunks} chunks by URL) | {dm:.2} | {} | {:.0} | {:.2} | {correct} |\n",
        tiny_put * per_gib,
        range(&via),
        bytes / vm / 1e6,
        range(&direct),
        bytes / dm / 1e6,
        dm / vm,
    ));
    println!("{report}");
    if !correct {
        bail!("a pulled tree differs from the pushed one");
    }
    let lat: serde_json::Map<String, serde_json::Value> = latency
        .iter()
        .map(|(k, v)| (k.to_string(), serde_json::json!(v)))
        .collect();
    save_run(
        "s3",
        &serde_json::json!({
            "mib": mib, "objects": objects, "stored_bytes": stored, "push_seconds": push_s,
            "latency_seconds": lat, "pull_registry_seconds": via, "pull_direct_seconds": direct,
        }),
    )?;
    Ok(())
}
