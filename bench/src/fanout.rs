//! `snapreg-bench fanout --nodes N [--mib M] [--mbit B] [--peers-only] [--json]`: one registry and N
//! node agents, each in its own network namespace, joined by veth pairs to a bridge
//! in a switch namespace, every link limited to B Mbit/s each way by `tc` (tbf on
//! both ends of each veth). One snapshot of M MiB of non-zero data; then, in one run:
//!
//! 1. one node prefetches it alone (the baseline time);
//! 2. all N nodes prefetch it at once with peers off (`--no-peers`): today's fleet;
//! 3. all N nodes prefetch it at once with peers on.
//!
//! `--peers-only` skips phase 2 (for tuning; its numbers are then absent). The
//! machine's CPU use during phase 3 (from /proc/stat) is reported beside the times:
//! every byte crosses the kernel, gRPC and BLAKE3 on one host, so with many nodes
//! the cores, not the links, can set the pace.
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
        // tbf's bucket must hold at least a timer tick of traffic at the rate, and a
        // whole GSO segment (64 KiB): smaller, tbf splits every segment in software,
        // which on one host costs more CPU than the traffic itself. 256 KiB at the
        // least (40 ms at 50 Mbit/s): short bursts, the same average rate.
        let burst = (mbit * 1000 / 8 / 100).max(256);
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

/// One phase's outcome: each node's seconds, the registry's egress, each node's
/// `--json` report, and the fraction of the machine's CPU time that was busy.
struct Phase {
    seconds: Vec<f64>,
    egress: u64,
    reports: Vec<serde_json::Value>,
    cpu_busy: f64,
}

/// The first line of /proc/stat: CPU time of all cores, busy and idle (in ticks).
struct CpuTicks {
    busy: u64,
    idle: u64,
}

fn cpu_ticks() -> Result<CpuTicks> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    let busy = fields.iter().take(8).sum::<u64>() - idle;
    Ok(CpuTicks { busy, idle })
}

impl CpuTicks {
    fn busy_since(&self, before: &CpuTicks) -> f64 {
        let busy = self.busy.saturating_sub(before.busy) as f64;
        let idle = self.idle.saturating_sub(before.idle) as f64;
        busy / (busy + idle).max(1.0)
    }
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
    fn prefetch_all(&self, nodes: &[usize], peers: bool) -> Result<Phase> {
        self.clear_caches()?;
        let before = registry_bytes_sent(&self.url)?;
        let cpu_before = cpu_ticks()?;
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
        let cpu_busy = cpu_ticks()?.busy_since(&cpu_before);
        let egress = registry_bytes_sent(&self.url)? - before;
        Ok(Phase {
            seconds,
            egress,
            reports,
            cpu_busy,
        })
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

pub fn run(nodes: usize, mib: usize, mbit: usize, peers_only: bool, json: bool) -> Result<()> {
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

    let single = fleet.prefetch_all(&[0], false)?;
    let chunks = single.reports[0]["chunks_total"]
        .as_u64()
        .unwrap_or_default();
    let stored = single.reports[0]["bytes_transferred"]
        .as_u64()
        .unwrap_or_default();
    let all: Vec<usize> = (0..nodes).collect();
    let off = if peers_only {
        None
    } else {
        let phase = fleet.prefetch_all(&all, false)?;
        Some((fleet.caches_complete(&all, chunks), phase))
    };
    let on = fleet.prefetch_all(&all, true)?;
    let on_complete = fleet.caches_complete(&all, chunks);
    drop(agents);
    drop(net);

    let setup = Setup {
        nodes,
        mib,
        mbit,
        chunks,
        stored,
    };
    print_table(&setup, &single, off.as_ref(), (on_complete, &on));
    let result = result_json(&setup, &single, off.as_ref(), (on_complete, &on));
    save_run(&format!("fanout-{nodes}"), &result)?;
    if json {
        println!("{result}");
    }
    Ok(())
}

/// What was measured on: nodes, snapshot size and chunks, link rate.
struct Setup {
    nodes: usize,
    mib: usize,
    mbit: usize,
    chunks: u64,
    stored: u64,
}

fn print_table(
    setup: &Setup,
    single: &Phase,
    off: Option<&(bool, Phase)>,
    (on_complete, on): (bool, &Phase),
) {
    let Setup {
        nodes,
        mib,
        mbit,
        chunks,
        stored,
    } = *setup;
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let alone = single.seconds[0];
    println!("\nfanout: {nodes} nodes, {mib} MiB snapshot ({chunks} chunks, {stored} bytes stored), every link {mbit} Mbit/s each way\n");
    println!("| run | registry egress | × snapshot | node time min / median / max (s) | × one node alone | caches complete | CPU busy |");
    println!("|---|---|---|---|---|---|---|");
    let row = |name: &str, phase: &Phase, complete: &str| {
        let (min, med, max) = stats(&phase.seconds);
        println!(
            "| {name} | {:.2} GiB | {:.2} | {min:.1} / {med:.1} / {max:.1} | {:.2} | {complete} | {:.0} % |",
            gib(phase.egress),
            phase.egress as f64 / stored as f64,
            max / alone,
            phase.cpu_busy * 100.0
        );
    };
    row("one node alone", single, "—");
    if let Some((complete, phase)) = off {
        row(
            &format!("{nodes} nodes, peers off"),
            phase,
            &complete.to_string(),
        );
    }
    row(
        &format!("{nodes} nodes, peers on"),
        on,
        &on_complete.to_string(),
    );
}

fn result_json(
    setup: &Setup,
    single: &Phase,
    off: Option<&(bool, Phase)>,
    (on_complete, on): (bool, &Phase),
) -> serde_json::Value {
    let from_peers: u64 = on
        .reports
        .iter()
        .map(|r| r["bytes_from_peers"].as_u64().unwrap_or(0))
        .sum();
    let slowest = |p: &Phase| stats(&p.seconds).2;
    serde_json::json!({
        "nodes": setup.nodes,
        "mib": setup.mib,
        "link_mbit": setup.mbit,
        "snapshot_chunks": setup.chunks,
        "snapshot_stored_bytes": setup.stored,
        "registry_egress_bytes": on.egress,
        "registry_egress_bytes_no_peers": off.map(|(_, p)| p.egress),
        "registry_egress_bytes_single": single.egress,
        "bytes_from_peers": from_peers,
        "slowest_node_s": slowest(on),
        "slowest_node_s_no_peers": off.map(|(_, p)| slowest(p)),
        "single_node_s": single.seconds[0],
        "node_seconds": on.seconds,
        "node_seconds_no_peers": off.map(|(_, p)| p.seconds.clone()),
        "cpu_busy_peers_on": on.cpu_busy,
        "cpu_busy_no_peers": off.map(|(_, p)| p.cpu_busy),
        "all_caches_verified": on_complete && off.is_none_or(|(c, _)| *c),
    })
}
