//! `snapreg-bench fanout --nodes N [--mib M] [--mbit B] [--json]`: one registry and N
//! node agents, each in its own network namespace, joined by veth pairs to a bridge
//! in a switch namespace, every link limited to B Mbit/s each way by `tc` (tbf on
//! both ends of each veth). One snapshot of M MiB of non-zero data; then, in one run:
//!
//! 1. one node prefetches it alone (the baseline time);
//! 2. all N nodes prefetch it at once with peers off (`--no-peers`): today's fleet;
//! 3. all N nodes prefetch it at once with peers on.
//!
//! Each phase starts from empty node caches. Reported: registry egress per phase
//! (the registry's own `Stats` counters), each node's completion time, and whether
//! every node cache ends complete (the snapshot's chunk count, each file hashing to
//! its name). The last line with `--json` is one JSON object.
//!
//! Traffic stays inside namespaces this bench creates (names `srfo-*`, 10.77.0.0/16);
//! they are deleted, and every process started in them killed, when it ends (and
//! stale ones from an interrupted run are deleted when it starts).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use super::{bin, noise, save_run, scratch, sh};

const PREFIX: &str = "srfo";
const SWITCH: &str = "srfo-sw";
const REGISTRY_NS: &str = "srfo-reg";
const REGISTRY_ADDR: &str = "10.77.0.1:5000";

/// The namespaces, bridge, veths and tc limits; deleted on drop.
struct Net {
    nodes: usize,
}

fn node_ns(i: usize) -> String {
    format!("{PREFIX}-n{i}")
}

fn node_ip(i: usize) -> String {
    format!("10.77.{}.{}", 1 + i / 250, 1 + i % 250)
}

impl Net {
    fn create(nodes: usize, mbit: usize) -> Result<Net> {
        remove_stale();
        let net = Net { nodes };
        sh(&format!(
            "ip netns add {SWITCH} && ip -n {SWITCH} link add br0 type bridge && \
             ip -n {SWITCH} link set br0 up && ip -n {SWITCH} link set lo up"
        ))?;
        net.attach(REGISTRY_NS, "vreg", "10.77.0.1", mbit)?;
        for i in 0..nodes {
            net.attach(&node_ns(i), &format!("v{i}"), &node_ip(i), mbit)?;
        }
        Ok(net)
    }

    /// A namespace with one veth to the switch, `ip`/16 on it, B Mbit/s each way.
    fn attach(&self, ns: &str, port: &str, ip: &str, mbit: usize) -> Result<()> {
        // tbf's burst must hold at least a timer tick of traffic at the rate.
        let burst = (mbit * 1000 / 8 / 100).max(32);
        let limit = |ns: &str, dev: &str| {
            format!(
                "ip netns exec {ns} tc qdisc add dev {dev} root tbf rate {mbit}mbit \
                 burst {burst}kb latency 50ms"
            )
        };
        sh(&format!(
            "ip netns add {ns} && ip -n {ns} link set lo up && \
             ip -n {SWITCH} link add {port} type veth peer name eth0 netns {ns} && \
             ip -n {SWITCH} link set {port} master br0 up && \
             ip -n {ns} addr add {ip}/16 dev eth0 && ip -n {ns} link set eth0 up && \
             {} && {}",
            limit(ns, "eth0"),
            limit(SWITCH, port)
        ))
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for i in 0..self.nodes {
            let _ = Command::new("ip")
                .args(["netns", "del", &node_ns(i)])
                .status();
        }
        for ns in [REGISTRY_NS, SWITCH] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Namespaces left by an interrupted run (ours by name), and their processes.
fn remove_stale() {
    let out = Command::new("ip").args(["netns", "list"]).output();
    let list = out.map(|o| String::from_utf8_lossy(&o.stdout).to_string());
    for line in list.unwrap_or_default().lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        if name.starts_with(&format!("{PREFIX}-")) {
            let _ = Command::new("ip")
                .args(["netns", "pids", name])
                .output()
                .map(|o| {
                    for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                        let _ = Command::new("kill").args(["-9", pid]).status();
                    }
                });
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

/// A process started in a namespace, killed and reaped on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts a server in `ns` and waits for its `{"listen": ..}` line.
fn serve_in(ns: &str, program: &Path, args: &[&str]) -> Result<Proc> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(program)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {} in {ns}", program.display()))?;
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().expect("piped")),
        &mut line,
    )?;
    if !line.contains("listen") {
        bail!("{} in {ns} did not start: {line:?}", program.display());
    }
    Ok(Proc(child))
}

/// `snapctl --json ARGS` in `ns`: its last stdout line.
fn snapctl_in(ns: &str, args: &[&str]) -> Result<serde_json::Value> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(bin("snapctl"))
        .arg("--json")
        .args(args)
        .env("RUST_LOG", "warn")
        .output()?;
    if !out.status.success() {
        bail!(
            "snapctl {args:?} in {ns}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(serde_json::from_str(text.lines().last().unwrap_or("{}"))?)
}

/// The registry's chunk bytes sent so far (its Stats, asked from inside its
/// namespace by this binary's `registry-stats`).
fn registry_bytes_sent(url: &str) -> Result<u64> {
    let me = std::env::current_exe()?;
    let out = Command::new("ip")
        .args(["netns", "exec", REGISTRY_NS])
        .arg(me)
        .args(["registry-stats", url])
        .output()?;
    if !out.status.success() {
        bail!("registry-stats: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok(v["chunk_bytes_sent"].as_u64().unwrap_or_default())
}

/// `snapreg-bench registry-stats URL`: prints the registry's Stats as JSON.
pub fn print_registry_stats(url: &str) -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let s = rt.block_on(async {
        snapreg_client::remote::Remote::connect(url)
            .await?
            .stats()
            .await
    })?;
    println!(
        "{}",
        serde_json::json!({
            "chunks_sent": s.chunks_sent,
            "chunk_bytes_sent": s.chunk_bytes_sent,
            "swarms": s.swarms,
            "swarm_members": s.swarm_members,
        })
    );
    Ok(())
}

struct Fleet {
    work: PathBuf,
    url: String,
    reference: String,
    nodes: usize,
}

impl Fleet {
    fn cache(&self, i: usize) -> PathBuf {
        self.work.join(format!("cache-{i}"))
    }

    /// Empties every node cache (the agents keep running over the same directory).
    fn clear_caches(&self) -> Result<()> {
        for i in 0..self.nodes {
            let chunks = self.cache(i).join("chunks");
            if chunks.exists() {
                std::fs::remove_dir_all(&chunks)?;
                std::fs::create_dir_all(&chunks)?;
            }
        }
        Ok(())
    }

    /// Prefetches on `nodes` at once; each node's seconds (spawn to exit) and the
    /// registry's egress meanwhile.
    fn prefetch_all(
        &self,
        nodes: &[usize],
        peers: bool,
    ) -> Result<(Vec<f64>, u64, Vec<serde_json::Value>)> {
        self.clear_caches()?;
        let before = registry_bytes_sent(&self.url)?;
        let started = Instant::now();
        let mut running = Vec::new();
        for &i in nodes {
            let cache = self.cache(i);
            let name = format!("n{i}");
            let mut args = vec![
                "--registry".to_string(),
                self.url.clone(),
                "--cache".into(),
                cache.display().to_string(),
                "--node".into(),
                name,
            ];
            if !peers {
                args.push("--no-peers".into());
            }
            args.extend(["prefetch".to_string(), self.reference.clone()]);
            let child = Command::new("ip")
                .args(["netns", "exec", &node_ns(i)])
                .arg(bin("snapctl"))
                .arg("--json")
                .args(&args)
                .env("RUST_LOG", "warn")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()?;
            running.push((i, child));
        }
        let (mut seconds, mut reports) = (vec![0.0; nodes.len()], Vec::new());
        let mut waiting: Vec<(usize, usize, Child)> = running
            .into_iter()
            .enumerate()
            .map(|(k, (i, c))| (k, i, c))
            .collect();
        // Poll for exits so each node's own completion time is taken when it ends.
        while !waiting.is_empty() {
            let mut still = Vec::new();
            for (k, i, mut child) in waiting {
                match child.try_wait()? {
                    Some(_) => {
                        seconds[k] = started.elapsed().as_secs_f64();
                        let out = child.wait_with_output()?;
                        if !out.status.success() {
                            bail!("prefetch on n{i}: {}", String::from_utf8_lossy(&out.stderr));
                        }
                        let text = String::from_utf8_lossy(&out.stdout).to_string();
                        reports.push(serde_json::from_str(text.lines().last().unwrap_or("{}"))?);
                    }
                    None => still.push((k, i, child)),
                }
            }
            waiting = still;
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let egress = registry_bytes_sent(&self.url)? - before;
        Ok((seconds, egress, reports))
    }

    /// Every node cache of `nodes` holds `chunks` files, each hashing to its name.
    fn caches_complete(&self, nodes: &[usize], chunks: u64) -> bool {
        nodes.iter().all(|&i| {
            let mut n = 0u64;
            let Ok(dirs) = std::fs::read_dir(self.cache(i).join("chunks")) else {
                return false;
            };
            for dir in dirs.flatten() {
                for f in std::fs::read_dir(dir.path())
                    .into_iter()
                    .flatten()
                    .flatten()
                {
                    let Ok(data) = std::fs::read(f.path()) else {
                        return false;
                    };
                    if blake3::hash(&data).to_hex().as_str() != f.file_name().to_string_lossy() {
                        return false;
                    }
                    n += 1;
                }
            }
            n == chunks
        })
    }
}

fn stats(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (s[0], s[s.len() / 2], s[s.len() - 1])
}

pub fn run(nodes: usize, mib: usize, mbit: usize, json: bool) -> Result<()> {
    if nodes == 0 || nodes > 250 {
        bail!("--nodes: 1 to 250");
    }
    let work = scratch("snapreg-fanout-")?;
    let net = Net::create(nodes, mbit)?;
    let url = format!("http://{REGISTRY_ADDR}");
    let data = work.path().join("registry");
    let _registry = serve_in(
        REGISTRY_NS,
        &bin("snapreg"),
        &[
            "serve",
            "--listen",
            REGISTRY_ADDR,
            "--anonymous",
            "admin",
            "--data",
            data.to_str().unwrap(),
        ],
    )?;
    let src = work.path().join("snapshot");
    std::fs::create_dir_all(&src)?;
    std::fs::write(src.join("weights.bin"), noise(77, mib << 20))?;
    let reference = "fleet/model:v1".to_string();
    snapctl_in(
        REGISTRY_NS,
        &[
            "--registry",
            &url,
            "push",
            src.to_str().unwrap(),
            &reference,
        ],
    )?;
    let fleet = Fleet {
        work: work.path().to_path_buf(),
        url: url.clone(),
        reference,
        nodes,
    };
    let mut agents = Vec::new();
    for i in 0..nodes {
        let listen = format!("{}:5001", node_ip(i));
        let cache = fleet.cache(i);
        let name = format!("n{i}");
        agents.push(serve_in(
            &node_ns(i),
            &bin("snapctl"),
            &[
                "--registry",
                &url,
                "--cache",
                cache.to_str().unwrap(),
                "agent",
                "--listen",
                &listen,
                "--name",
                &name,
                "--register-every",
                "2s",
            ],
        )?);
    }
    std::thread::sleep(std::time::Duration::from_secs(1));

    let (single, single_egress, single_reports) = fleet.prefetch_all(&[0], false)?;
    let chunks = single_reports[0]["chunks_total"]
        .as_u64()
        .unwrap_or_default();
    let stored = single_reports[0]["bytes_transferred"]
        .as_u64()
        .unwrap_or_default();
    let all: Vec<usize> = (0..nodes).collect();
    let (off, off_egress, _) = fleet.prefetch_all(&all, false)?;
    let off_complete = fleet.caches_complete(&all, chunks);
    let (on, on_egress, on_reports) = fleet.prefetch_all(&all, true)?;
    let on_complete = fleet.caches_complete(&all, chunks);
    let from_peers: u64 = on_reports
        .iter()
        .map(|r| r["bytes_from_peers"].as_u64().unwrap_or(0))
        .sum();
    drop(agents);
    drop(net);

    let (off_min, off_med, off_max) = stats(&off);
    let (on_min, on_med, on_max) = stats(&on);
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    println!("\nfanout: {nodes} nodes, {mib} MiB snapshot ({chunks} chunks, {} bytes stored), every link {mbit} Mbit/s each way\n", stored);
    println!("| run | registry egress | × snapshot | node time min / median / max (s) | × one node alone | caches complete |");
    println!("|---|---|---|---|---|---|");
    println!(
        "| one node alone | {:.2} GiB | {:.2} | {:.1} | 1.00 | — |",
        gib(single_egress),
        single_egress as f64 / stored as f64,
        single[0]
    );
    println!("| {nodes} nodes, peers off | {:.2} GiB | {:.2} | {off_min:.1} / {off_med:.1} / {off_max:.1} | {:.2} | {off_complete} |", gib(off_egress), off_egress as f64 / stored as f64, off_max / single[0]);
    println!("| {nodes} nodes, peers on | {:.2} GiB | {:.2} | {on_min:.1} / {on_med:.1} / {on_max:.1} | {:.2} | {on_complete} |", gib(on_egress), on_egress as f64 / stored as f64, on_max / single[0]);
    let result = serde_json::json!({
        "nodes": nodes,
        "mib": mib,
        "link_mbit": mbit,
        "snapshot_chunks": chunks,
        "snapshot_stored_bytes": stored,
        "registry_egress_bytes": on_egress,
        "registry_egress_bytes_no_peers": off_egress,
        "registry_egress_bytes_single": single_egress,
        "bytes_from_peers": from_peers,
        "slowest_node_s": on_max,
        "slowest_node_s_no_peers": off_max,
        "single_node_s": single[0],
        "node_seconds": on,
        "node_seconds_no_peers": off,
        "all_caches_verified": on_complete && off_complete,
    });
    save_run(&format!("fanout-{nodes}"), &result)?;
    if json {
        println!("{result}");
    }
    Ok(())
}
