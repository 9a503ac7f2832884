//! `snapreg-bench load [--seconds S] [--pulls P] [--pushes Q] [--mib M] [--json]`: one
//! registry on loopback under P concurrent pullers and Q concurrent pushers of
//! overlapping snapshots for S seconds (defaults 60, 64, 8, 32).
//!
//! The snapshots share a base of M MiB of random data; each pusher pushes, again and
//! again, the base with one eighth replaced by fresh random bytes (so every push
//! uploads about M/8 MiB and finds the rest present). Pullers loop over the pushed
//! tags: manifest, then every chunk in GetChunks calls of 32 (as `pull` asks),
//! each call timed from request to its last chunk. The load generators run in this
//! process with the client library (pushes chunk, hash and compress here); pulled
//! bytes are received but not decoded, so the measured side is the registry.
//!
//! Reported: requests served, errors (any is a failure), p50/p99 of GetChunks, bytes
//! sent, the registry's CPU time over the clocked phase (and bytes sent per CPU second:
//! the serving cost, steadier than throughput on a shared machine), and its peak RSS
//! (VmHWM).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use snapreg_client::fetch::Lane;
use snapreg_client::progress::Progress;
use snapreg_client::remote::Remote;
use snapreg_proto::manifest::Manifest;
use snapreg_proto::Digest;

use super::{noise, save_run, scratch, Registry};

/// Digests per GetChunks call, as `pull` asks.
const BATCH: usize = 32;
/// Tags pushed before the clock starts, so pullers have something to pull.
const SEED_TAGS: usize = 4;

#[derive(Default)]
struct Tally {
    get_chunks: AtomicU64,
    manifests: AtomicU64,
    pushes: AtomicU64,
    bytes_pulled: AtomicU64,
    errors: AtomicU64,
    first_errors: Mutex<Vec<String>>,
    latencies: Mutex<Vec<f64>>,
    tags: Mutex<Vec<String>>,
}

impl Tally {
    fn error(&self, what: String) {
        self.errors.fetch_add(1, Relaxed);
        let mut first = self.first_errors.lock().unwrap();
        if first.len() < 5 {
            first.push(what);
        }
    }
}

/// A pusher's snapshot directory: the base with its own eighth replaced.
fn variant(dir: &Path, base: &[u8], slot: usize, seed: u64) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let eighth = base.len() / 8;
    let mut data = base.to_vec();
    let at = (slot % 8) * eighth;
    data[at..at + eighth].copy_from_slice(&noise(seed, eighth));
    std::fs::write(dir.join("weights.bin"), data)?;
    Ok(())
}

async fn push_one(url: &str, dir: &Path, tag: String, tally: &Tally) {
    let result = async {
        let remote = Remote::connect(url).await?;
        let reference = format!("load/snap:{tag}").parse()?;
        snapreg_client::push::push_dir(&remote, dir, &reference, Progress::hidden()).await?;
        anyhow::Ok(())
    }
    .await;
    match result {
        Ok(()) => {
            tally.pushes.fetch_add(1, Relaxed);
            tally.tags.lock().unwrap().push(tag);
        }
        Err(e) => tally.error(format!("push {tag}: {e:#}")),
    }
}

async fn pusher(
    url: String,
    work: PathBuf,
    base: Arc<Vec<u8>>,
    id: usize,
    until: Instant,
    tally: Arc<Tally>,
) {
    let dir = work.join(format!("push-{id}"));
    let mut n = 0u64;
    while Instant::now() < until {
        let seed = 1_000 + (id as u64) * 100_000 + n;
        if let Err(e) = variant(&dir, &base, id, seed) {
            tally.error(format!("writing a variant: {e}"));
            return;
        }
        push_one(&url, &dir, format!("p{id}-{n}"), &tally).await;
        n += 1;
    }
}

/// One pull of `tag`: its manifest, then every chunk in GetChunks calls.
async fn pull_one(remote: &Remote, tag: &str, tally: &Tally) -> Result<()> {
    let (_, bytes) = remote.get_manifest("load/snap", tag).await?;
    tally.manifests.fetch_add(1, Relaxed);
    let digests: Vec<Digest> = Manifest::decode(&bytes)?.chunk_digests();
    for batch in digests.chunks(BATCH) {
        let started = Instant::now();
        let mut stream = remote.get_chunks(batch, Lane::Bulk).await?;
        let mut got = 0;
        while let Some(msg) = stream.message().await? {
            tally.bytes_pulled.fetch_add(msg.data.len() as u64, Relaxed);
            got += 1;
        }
        if got != batch.len() {
            bail!("GetChunks answered {got} of {} chunks", batch.len());
        }
        tally.get_chunks.fetch_add(1, Relaxed);
        tally
            .latencies
            .lock()
            .unwrap()
            .push(started.elapsed().as_secs_f64());
    }
    Ok(())
}

async fn puller(url: String, id: usize, until: Instant, tally: Arc<Tally>) {
    let remote = match Remote::connect(&url).await {
        Ok(r) => r,
        Err(e) => return tally.error(format!("connecting: {e}")),
    };
    let mut n = id;
    while Instant::now() < until {
        let tag = {
            let tags = tally.tags.lock().unwrap();
            tags[n % tags.len()].clone()
        };
        if let Err(e) = pull_one(&remote, &tag, &tally).await {
            tally.error(format!("pull {tag}: {e:#}"));
        }
        n += 7;
    }
}

/// CPU time (user + system) a process has used so far, from /proc/PID/stat; 0 when gone.
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name, which ends at the last ')': utime and stime are
    // fields 14 and 15 of the line, 12 and 13 after it. Ticks are 100 per second on Linux.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let ticks: u64 = after
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|f| f.parse::<u64>().ok())
        .sum();
    ticks as f64 / 100.0
}

pub(crate) fn vm_hwm(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

pub fn run(seconds: u64, pulls: usize, pushes: usize, mib: usize, json: bool) -> Result<()> {
    let work = scratch("snapreg-load-")?;
    let reg = Registry::start(&work.path().join("registry"))?;
    let base = Arc::new(noise(5, mib << 20));
    let tally = Arc::new(Tally::default());
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        for k in 0..SEED_TAGS {
            let dir = work.path().join(format!("seed-{k}"));
            variant(&dir, &base, k, 10 + k as u64)?;
            push_one(&reg.url, &dir, format!("seed{k}"), &tally).await;
        }
        anyhow::Ok(())
    })?;
    if tally.errors.load(Relaxed) > 0 {
        bail!("seeding failed: {:?}", tally.first_errors.lock().unwrap());
    }
    let seeded_pushes = tally.pushes.swap(0, Relaxed);
    let cpu_before = cpu_seconds(reg.child.id());
    let started = Instant::now();
    let until = started + Duration::from_secs(seconds);
    rt.block_on(async {
        let mut tasks = Vec::new();
        for id in 0..pushes {
            let (url, work, base, tally) = (
                reg.url.clone(),
                work.path().to_path_buf(),
                base.clone(),
                tally.clone(),
            );
            tasks.push(tokio::spawn(pusher(url, work, base, id, until, tally)));
        }
        for id in 0..pulls {
            tasks.push(tokio::spawn(puller(
                reg.url.clone(),
                id,
                until,
                tally.clone(),
            )));
        }
        for t in tasks {
            let _ = t.await;
        }
    });
    let elapsed = started.elapsed().as_secs_f64();
    let registry_cpu = cpu_seconds(reg.child.id()) - cpu_before;
    let peak_rss = vm_hwm(reg.child.id());
    let mut lat = tally.latencies.lock().unwrap().clone();
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let (p50, p99) = (percentile(&lat, 0.5), percentile(&lat, 0.99));
    let errors = tally.errors.load(Relaxed);
    let get_chunks = tally.get_chunks.load(Relaxed);
    let manifests = tally.manifests.load(Relaxed);
    let pushed = tally.pushes.load(Relaxed);
    let pulled = tally.bytes_pulled.load(Relaxed);
    println!("\nload: {pulls} pullers and {pushes} pushers for {elapsed:.0} s, {mib} MiB snapshots sharing 7/8 of their chunks ({seeded_pushes} seeded first)\n");
    println!("| requests served | GetChunks calls | p50 / p99 GetChunks (32 chunks) | pushes | bytes sent | errors | registry CPU | registry peak RSS |");
    println!("|---|---|---|---|---|---|---|---|");
    println!(
        "| {} | {get_chunks} | {:.0} / {:.0} ms | {pushed} | {:.2} GiB ({:.0} MiB/s) | {errors} | {registry_cpu:.1} s ({:.0} MiB per CPU s) | {} MiB |",
        get_chunks + manifests + pushed,
        p50 * 1000.0,
        p99 * 1000.0,
        pulled as f64 / (1u64 << 30) as f64,
        pulled as f64 / (1 << 20) as f64 / elapsed,
        pulled as f64 / (1 << 20) as f64 / registry_cpu.max(0.01),
        peak_rss >> 20
    );
    let result = serde_json::json!({
        "seconds": elapsed,
        "pullers": pulls,
        "pushers": pushes,
        "mib": mib,
        "requests_served": get_chunks + manifests + pushed,
        "get_chunks_calls": get_chunks,
        "manifests": manifests,
        "pushes": pushed,
        "bytes_pulled": pulled,
        "get_chunks_p50_s": p50,
        "get_chunks_p99_s": p99,
        "errors": errors,
        "first_errors": *tally.first_errors.lock().unwrap(),
        "registry_cpu_s": registry_cpu,
        "registry_peak_rss_bytes": peak_rss,
    });
    save_run("load", &result)?;
    if json {
        println!("{result}");
    }
    if errors > 0 {
        bail!(
            "{errors} requests failed: {:?}",
            tally.first_errors.lock().unwrap()
        );
    }
    Ok(())
}
