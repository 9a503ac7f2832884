//! `snapreg-bench cost [--chunks 100000,1000000] [--json]`: what a registry costs as
//! it grows, for the operator guide's sizing (docs/OPERATIONS.md).
//!
//! For each size N, a fresh `snapreg serve` (real RocksDB index on disk; the object
//! store on /dev/shm, because the store is S3 in production and a million fsyncs on
//! this VM's disk would measure the disk, not the registry) takes N distinct 1 KiB
//! chunks through the real gRPC push path (BeginPush, PutChunks; 20 000 a lease).
//! Then: the index directory's bytes and the registry's RSS (VmRSS now, VmHWM peak);
//! the planning step of a push of a 64 GiB image (FindMissingChunks over its 131 072
//! digests at the default 512 KiB average chunk, against a registry holding none of
//! them and one holding all); and one GC that sweeps all N (nothing references them
//! once their leases expire: the sweep is GC's cost that grows with the store).
//! Finally a real 256 MiB push measures manifest bytes per chunk entry, and so the
//! manifest of a 64 GiB image.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use snapreg_client::remote::Remote;
use snapreg_proto::{codec, Digest};

use super::{dir_bytes, save_run, scratch, walk, Registry};

const CHUNK: usize = 1024;
const PER_LEASE: u64 = 20_000;
/// 64 GiB at FastCDC's 512 KiB average.
const CHUNKS_64_GIB: u64 = 64 << 11;
const FIND_BATCH: usize = 65_536;

/// Chunk `i`'s bytes: distinct for every `i`, cheap to make.
fn chunk(i: u64) -> Vec<u8> {
    let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..CHUNK / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .chain(i.to_le_bytes())
        .take(CHUNK)
        .collect()
}

fn vm_rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            let v = s.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
            v.trim().trim_end_matches("kB").trim().parse::<u64>().ok()
        })
        .map_or(0, |kb| kb * 1024)
}

/// Pushes chunks `from..to` through leases of [`PER_LEASE`].
async fn push_range(remote: &Remote, from: u64, to: u64) -> Result<()> {
    let mut start = from;
    while start < to {
        let end = (start + PER_LEASE).min(to);
        let lease = remote.begin_push("cost/chunks").await?;
        let objects: Vec<(Digest, Bytes)> = (start..end)
            .map(|i| {
                let raw = chunk(i);
                (Digest::of(&raw), codec::encode(&raw))
            })
            .collect();
        remote
            .put_chunks(&lease, futures::stream::iter(objects))
            .await?;
        start = end;
    }
    Ok(())
}

/// Seconds for FindMissingChunks over `digests` on one lease.
async fn plan_seconds(remote: &Remote, digests: &[Digest]) -> Result<(f64, usize)> {
    let lease = remote.begin_push("cost/plan").await?;
    let t = Instant::now();
    let mut missing = 0;
    for batch in digests.chunks(FIND_BATCH) {
        missing += remote.find_missing(&lease, batch).await?.len();
    }
    Ok((t.elapsed().as_secs_f64(), missing))
}

async fn one_size(n: u64) -> Result<serde_json::Value> {
    let dir = scratch("snapreg-cost-")?;
    let store = tempfile::Builder::new()
        .prefix("snapreg-cost-store-")
        .tempdir_in("/dev/shm")?;
    let store_url = format!("file://{}", store.path().display());
    let reg = Registry::start_with(
        dir.path(),
        &[
            "--store",
            &store_url,
            "--lease-ttl",
            "2s",
            "--gc-grace",
            "0s",
        ],
    )?;
    let remote = Remote::connect(&reg.url).await?;
    let t = Instant::now();
    push_range(&remote, 0, n).await?;
    let push_seconds = t.elapsed().as_secs_f64();
    let pid = reg.child.id();
    let index_bytes = dir_bytes(&dir.path().join("index"));
    let (rss, hwm) = (vm_rss(pid), super::load::vm_hwm(pid));
    let all: Vec<Digest> = (0..CHUNKS_64_GIB.min(n))
        .map(|i| Digest::of(&chunk(i)))
        .collect();
    let fresh: Vec<Digest> = (0..CHUNKS_64_GIB)
        .map(|i| Digest::of(&chunk(u64::MAX - i)))
        .collect();
    let (plan_none, missing_none) = plan_seconds(&remote, &fresh).await?;
    let (plan_all, missing_all) = plan_seconds(&remote, &all).await?;
    tokio::time::sleep(Duration::from_secs(16)).await; // every lease expired
    let t = Instant::now();
    let gc = remote.collect_garbage(Some(Duration::ZERO), false).await?;
    let gc_seconds = t.elapsed().as_secs_f64();
    Ok(serde_json::json!({
        "chunks": n, "push_seconds": push_seconds, "chunks_per_second": n as f64 / push_seconds,
        "index_bytes": index_bytes, "index_bytes_per_chunk": index_bytes as f64 / n as f64,
        "rss_bytes": rss, "peak_rss_bytes": hwm,
        "plan_64gib_none_present_seconds": plan_none, "plan_none_missing": missing_none,
        "plan_64gib_all_present_seconds": plan_all, "plan_all_digests": all.len(), "plan_all_missing": missing_all,
        "gc_seconds": gc_seconds, "gc_chunks_swept": gc.chunks_swept,
        "gc_chunks_per_second": gc.chunks_swept as f64 / gc_seconds,
    }))
}

/// Manifest bytes per chunk entry, from a real push of 256 MiB of random data.
fn manifest_per_chunk() -> Result<serde_json::Value> {
    let dir = scratch("snapreg-cost-manifest-")?;
    let src = dir.path().join("src");
    super::make_input(&src, 256)?;
    let reg = Registry::start(&dir.path().join("reg"))?;
    let pushed = super::snapctl(
        &reg.url,
        &["push", src.to_str().unwrap_or_default(), "cost/m:v1"],
    )?;
    let chunks = pushed["chunks_total"]
        .as_u64()
        .context("push reported no chunks_total")?;
    let manifests = walk(&dir.path().join("reg/store/manifests"));
    let bytes: u64 = manifests.iter().map(|m| m.len()).sum();
    let per_chunk = bytes as f64 / chunks as f64;
    Ok(serde_json::json!({
        "image_mib": 256, "chunks": chunks, "manifest_bytes": bytes,
        "manifest_bytes_per_chunk": per_chunk,
        "manifest_64gib_bytes_estimate": (per_chunk * CHUNKS_64_GIB as f64) as u64,
    }))
}

pub fn run(sizes: &[u64], json: bool) -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let mut rows = Vec::new();
    for &n in sizes {
        let row = rt.block_on(one_size(n))?;
        if !json {
            println!("{row}");
        }
        rows.push(row);
    }
    let manifest = manifest_per_chunk()?;
    let raw = serde_json::json!({ "sizes": rows, "manifest": manifest, "chunk_bytes": CHUNK });
    save_run("cost", &raw)?;
    println!("{raw}");
    Ok(())
}
