//! Fleet fan-out with real processes on loopback: node agents serve their caches to
//! each other, the registry's tracker introduces them, and a node takes from its
//! siblings what they hold (client/src/peer/).
//!
//! Two peers here are not `snapctl agent`s but small NodeAgent servers in this test
//! process: one that answers every chunk with bytes that do not verify and one that
//! dies after a few chunks. A real agent never sends a chunk it has not verified and
//! cannot be made to die on cue, so these stand in for a malicious or broken peer.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use snapreg_proto::pb::node_agent_server::{NodeAgent, NodeAgentServer};
use snapreg_proto::pb::{
    self, node_agent_client::NodeAgentClient, registry_client::RegistryClient,
};
use tonic::{Request, Response, Status};

use crate::support::*;

/// A running `snapctl agent` for one node, killed by PID and reaped on drop.
struct NodeAgentProc {
    child: Child,
    url: String,
}

impl NodeAgentProc {
    fn start(registry: &str, cache: &Path, name: &str, extra: &[&str]) -> NodeAgentProc {
        let mut child = Command::new(bin("snapctl"))
            .arg("--registry")
            .arg(registry)
            .arg("--cache")
            .arg(cache)
            .args(extra)
            .args(["agent", "--listen", "127.0.0.1:0", "--name", name])
            .args(["--register-every", "500ms"])
            .env_remove("SNAPCTL_REGISTRY")
            .env_remove("SNAPCTL_TOKEN")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("snapctl agent printed {line:?}: {e}"));
        let url = format!("http://{}", v["listen"].as_str().unwrap());
        wait_registered(registry, name);
        NodeAgentProc { child, url }
    }
}

impl Drop for NodeAgentProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_registered(registry: &str, name: &str) {
    wait_for(Duration::from_secs(20), || {
        let nodes = block_on(async {
            RegistryClient::connect(registry.to_string())
                .await
                .ok()?
                .list_nodes(pb::ListNodesRequest {})
                .await
                .ok()
        })?;
        nodes
            .into_inner()
            .nodes
            .iter()
            .any(|n| n.node_name == name)
            .then_some(())
    })
    .unwrap_or_else(|| panic!("{name} never registered"));
}

/// `snapctl --json` on node `node` with its cache.
fn on_node(registry: &str, cache: &Path, node: &str, args: &[&str]) -> Out {
    let mut all = vec!["--cache", cache.to_str().unwrap(), "--node", node];
    all.extend_from_slice(args);
    snapctl(registry, &all)
}

fn bytes_sent(registry: &str) -> u64 {
    block_on(async {
        RegistryClient::connect(registry.to_string())
            .await
            .unwrap()
            .stats(pb::StatsRequest {})
            .await
            .unwrap()
            .into_inner()
            .chunk_bytes_sent
    })
}

fn agent_status(url: &str) -> pb::CacheStatusResponse {
    block_on(async {
        NodeAgentClient::connect(url.to_string())
            .await
            .unwrap()
            .cache_status(pb::CacheStatusRequest { reference: None })
            .await
            .unwrap()
            .into_inner()
    })
}

/// Every file of a node cache holds what its name (the BLAKE3 hex) says; the count.
fn cache_verifies(cache: &Path) -> usize {
    let mut n = 0;
    for dir in std::fs::read_dir(cache.join("chunks")).unwrap().flatten() {
        for f in std::fs::read_dir(dir.path()).unwrap().flatten() {
            let data = std::fs::read(f.path()).unwrap();
            let name = f.file_name().to_string_lossy().to_string();
            assert_eq!(
                snapreg_proto::Digest::of(&data).to_hex(),
                name,
                "cache file {} does not verify",
                f.path().display()
            );
            n += 1;
        }
    }
    n
}

#[test]
fn siblings_hold_every_chunk_so_a_restore_fetches_nothing_from_the_registry() {
    let _lock = criu_lock();
    let t = tempfile::tempdir().unwrap();
    let reg = Registry::start(&t.path().join("reg"));
    let mut p = TestProc::hold(&t.path().join("proc"), 48, 31, 2, 8);
    let pid = p.pid();
    snapctl(
        &reg.url,
        &["checkpoint", "--pid", &pid.to_string(), "t/fan:v1"],
    )
    .ok();
    let _ = p.child.wait(); // CRIU killed it after the commit; free the PID
    let at_checkpoint = p.counter();

    let (cache_a, cache_b) = (t.path().join("cache-a"), t.path().join("cache-b"));
    let a = NodeAgentProc::start(&reg.url, &cache_a, "node-a", &[]);
    let _b = NodeAgentProc::start(&reg.url, &cache_b, "node-b", &[]);

    // node-a is alone in the swarm: everything from the registry.
    let pre = on_node(&reg.url, &cache_a, "node-a", &["prefetch", "t/fan:v1"])
        .ok()
        .json();
    assert_eq!(pre["bytes_from_peers"], 0, "{pre}");
    assert!(pre["chunks_transferred"].as_u64().unwrap() > 0, "{pre}");

    // node-b restores: every chunk from node-a, none from the registry.
    let before = bytes_sent(&reg.url);
    let r = on_node(
        &reg.url,
        &cache_b,
        "node-b",
        &["pull-restore", "--detach", "t/fan:v1"],
    )
    .ok()
    .json();
    let _restored = Restored(pid);
    assert_eq!(
        bytes_sent(&reg.url),
        before,
        "the registry sent chunks: {r}"
    );
    assert!(r["chunks_transferred"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(r["chunks_from_peers"], r["chunks_transferred"], "{r}");
    assert_eq!(r["bytes_from_peers"], r["bytes_transferred"], "{r}");
    assert_eq!(r["chunks_by_peer"]["node-a"], r["chunks_from_peers"], "{r}");
    assert_eq!(r["peer_problems"], serde_json::json!([]), "{r}");
    p.wait_counter_above(at_checkpoint + 3);
    assert!(
        p.verify(pid).starts_with("ok"),
        "memory differs after restore"
    );

    let served = agent_status(&a.url);
    assert_eq!(
        served.peer_chunks_served,
        r["chunks_from_peers"].as_u64().unwrap(),
        "{served:?}"
    );
    assert!(served.peer_bytes_served > 0);
    cache_verifies(&cache_b);
}

/// A NodeAgent that claims every chunk and answers in one of two bad ways.
#[derive(Clone)]
struct BadPeer {
    /// Where good bytes come from (another node's cache), for `dies_after`.
    cache: PathBuf,
    /// Answer garbage for every chunk.
    lies: bool,
    /// Serve this many good chunks, then stop serving altogether (process gone).
    dies_after: usize,
    /// Never answer a chunk request (a hung process), but stay connected.
    stalls: bool,
    served: Arc<AtomicUsize>,
    die: Arc<tokio::sync::Notify>,
}

type Held = Pin<Box<dyn Stream<Item = Result<pb::HeldChunks, Status>> + Send>>;
type Chunks = Pin<Box<dyn Stream<Item = Result<pb::ChunkData, Status>> + Send>>;

#[tonic::async_trait]
impl NodeAgent for BadPeer {
    async fn prefetch(
        &self,
        _: Request<pb::PrefetchRequest>,
    ) -> Result<Response<pb::PrefetchResponse>, Status> {
        Err(Status::unimplemented("test peer"))
    }

    async fn cache_status(
        &self,
        _: Request<pb::CacheStatusRequest>,
    ) -> Result<Response<pb::CacheStatusResponse>, Status> {
        Err(Status::unimplemented("test peer"))
    }

    type GetChunksStream = Chunks;

    async fn get_chunks(
        &self,
        req: Request<pb::GetChunksRequest>,
    ) -> Result<Response<Chunks>, Status> {
        let digest = req.into_inner().digests[0].clone();
        if self.stalls {
            std::future::pending::<()>().await;
        }
        let data = if self.lies {
            snapreg_proto::codec::encode_raw(b"not the chunk you asked for")
        } else {
            if self.served.fetch_add(1, SeqCst) >= self.dies_after {
                self.die.notify_one();
                std::future::pending::<()>().await;
            }
            let hex = hex(&digest);
            let content = std::fs::read(self.cache.join("chunks").join(&hex[..2]).join(&hex))
                .map_err(|e| Status::not_found(e.to_string()))?;
            snapreg_proto::codec::encode_raw(&content)
        };
        let msg = pb::ChunkData { digest, data };
        Ok(Response::new(Box::pin(futures::stream::iter([Ok(msg)]))))
    }

    type WatchChunksStream = Held;

    async fn watch_chunks(
        &self,
        req: Request<pb::WatchChunksRequest>,
    ) -> Result<Response<Held>, Status> {
        let n = req.into_inner().digests.len() as u32;
        let all = pb::HeldChunks {
            indices: (0..n).collect(),
        };
        // Claims everything, then stays open (as a real watch does while it waits).
        let stream = futures::stream::iter([Ok(all)]).chain(futures::stream::pending());
        Ok(Response::new(Box::pin(stream)))
    }
}

use futures::StreamExt;

fn hex(digest: &Bytes) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Serves `peer` on a loopback port in a thread of its own until it dies (or the
/// test ends); registers it with the registry as `name` and announces it as a seed
/// of `snapshot`.
fn start_bad_peer(
    registry: &str,
    name: &str,
    snapshot: &str,
    peer: BadPeer,
) -> std::thread::JoinHandle<()> {
    let port = free_port();
    let die = peer.die.clone();
    let server = std::thread::spawn(move || {
        // Returning drops this thread's runtime and with it every connection, the
        // way a killed process's sockets close.
        block_on(async move {
            let addr = format!("127.0.0.1:{port}").parse().unwrap();
            let serve = tonic::transport::Server::builder()
                .add_service(NodeAgentServer::new(peer))
                .serve(addr);
            tokio::select! {
                _ = serve => {}
                _ = die.notified() => {}
            }
        })
    });
    let facts = pb::NodeFacts {
        arch: std::env::consts::ARCH.into(),
        ..Default::default()
    };
    block_on(async {
        let mut c = RegistryClient::connect(registry.to_string()).await.unwrap();
        c.register_node(pb::RegisterNodeRequest {
            node_name: name.into(),
            agent_url: format!("http://127.0.0.1:{port}"),
            facts: Some(facts),
            ..Default::default()
        })
        .await
        .unwrap();
        c.swarm(pb::SwarmRequest {
            repository: "t/bad".into(),
            digest: snapshot.into(),
            node_name: name.into(),
            complete: true,
            max_peers: 0,
        })
        .await
        .unwrap();
    });
    server
}

#[test]
fn lying_and_dying_peers_are_left_and_every_chunk_still_verifies() {
    let t = tempfile::tempdir().unwrap();
    let reg = Registry::start(&t.path().join("reg"));
    let src = t.path().join("src");
    write(&src, "model.bin", &noise(41, 24 << 20));
    let digest = push(&reg.url, &src, "t/bad:v1");

    // A real seed, and two bad ones that claim everything.
    let cache_a = t.path().join("cache-a");
    let _a = NodeAgentProc::start(&reg.url, &cache_a, "seed", &[]);
    on_node(&reg.url, &cache_a, "seed", &["prefetch", "t/bad:v1"]).ok();
    let bad = |lies: bool, stalls: bool| BadPeer {
        cache: cache_a.clone(),
        lies,
        dies_after: 2,
        stalls,
        served: Arc::default(),
        die: Arc::default(),
    };
    let _liar = start_bad_peer(&reg.url, "liar", &digest, bad(true, false));
    let _quitter = start_bad_peer(&reg.url, "quitter", &digest, bad(false, false));
    let _staller = start_bad_peer(&reg.url, "staller", &digest, bad(false, true));

    let cache_c = t.path().join("cache-c");
    let r = on_node(&reg.url, &cache_c, "node-c", &["prefetch", "t/bad:v1"])
        .ok()
        .json();
    let problems = r["peer_problems"].to_string();
    assert!(
        problems.contains("liar: dropped: sent chunk") && problems.contains("does not verify"),
        "{r}"
    );
    assert!(
        problems.contains("quitter"),
        "the dead peer is reported: {r}"
    );
    assert_eq!(r["peers"], 4, "{r}");
    assert!(r["chunks_by_peer"]["seed"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(r["chunks_by_peer"].get("liar"), None, "{r}");
    // The hung peer lost its chunks to others after the bounded wait.
    assert_eq!(r["chunks_by_peer"].get("staller"), None, "{r}");
    assert_eq!(r["chunks_transferred"], r["chunks_total"], "{r}");
    assert_eq!(
        cache_verifies(&cache_c) as u64,
        r["chunks_total"].as_u64().unwrap(),
        "{r}"
    );
    // And what landed in the cache pulls back byte for byte (from that cache only).
    let out = t.path().join("out");
    snapctl(
        &reg.url,
        &["--no-peers", "pull", "t/bad:v1", out.to_str().unwrap()],
    )
    .ok();
    assert_trees_equal(&src, &out);
}

#[test]
fn peers_admit_only_callers_the_registry_accepts_for_pull() {
    let t = tempfile::tempdir().unwrap();
    let reg = Registry::start_with(&t.path().join("reg"), &["--anonymous", "none"]);
    let (_, node_token) = reg.issue_token(&["--repo", "*", "--scope", "pull", "--name", "nodes"]);
    let (_, other_token) =
        reg.issue_token(&["--repo", "team/*", "--scope", "pull", "--name", "team"]);
    let cache = t.path().join("cache");
    let agent = NodeAgentProc::start_token(&reg.url, &cache, "node-a", &node_token);
    let digests = vec![Bytes::copy_from_slice(&[7u8; 32])];
    let watch = |token: Option<&str>| {
        block_on(async {
            let mut req = tonic::Request::new(pb::WatchChunksRequest {
                digests: digests.clone(),
            });
            if let Some(t) = token {
                req.metadata_mut()
                    .insert("authorization", format!("Bearer {t}").parse().unwrap());
            }
            let mut c = NodeAgentClient::connect(agent.url.clone()).await.unwrap();
            match c.watch_chunks(req).await {
                Ok(mut s) => s.get_mut().message().await.map(|m| m.is_some()),
                Err(e) => Err(e),
            }
        })
    };
    let refused = watch(None).unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused}");
    assert!(
        refused.message().contains("client certificate"),
        "{refused}"
    );
    let bogus = watch(Some("snapreg_0123456789abcdef_00")).unwrap_err();
    assert_eq!(bogus.code(), tonic::Code::Unauthenticated, "{bogus}");
    // A pull token for any repository: chunks are addressed by content (as GetChunks
    // on the registry).
    assert!(watch(Some(&other_token)).unwrap());
    assert!(watch(Some(&node_token)).unwrap());
    block_on(async {
        let mut c = NodeAgentClient::connect(agent.url.clone()).await.unwrap();
        let s = c
            .cache_status(pb::CacheStatusRequest { reference: None })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(s.peer_calls_refused, 2, "{s:?}");
    });
}

impl NodeAgentProc {
    fn start_token(registry: &str, cache: &Path, name: &str, token: &str) -> NodeAgentProc {
        // wait_registered asks anonymously, which a closed registry refuses: the
        // agent's first registration is awaited through its token instead.
        let mut child = Command::new(bin("snapctl"))
            .arg("--registry")
            .arg(registry)
            .arg("--cache")
            .arg(cache)
            .args(["--token", token])
            .args(["agent", "--listen", "127.0.0.1:0", "--name", name])
            .env_remove("SNAPCTL_REGISTRY")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        let url = format!("http://{}", v["listen"].as_str().unwrap());
        NodeAgentProc { child, url }
    }
}
