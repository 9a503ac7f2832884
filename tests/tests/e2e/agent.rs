//! The node agent (`snapctl agent`) as real processes on loopback: its facts reach
//! the registry (`ListNodes`), and a `Prefetch` through it fills the node cache, so
//! that `CacheStatus` reports the snapshot whole and a later prefetch fetches nothing.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use snapreg_proto::pb::{
    self, node_agent_client::NodeAgentClient, registry_client::RegistryClient,
};

use crate::support::*;

/// A running `snapctl agent`, killed by PID and reaped on drop.
struct Agent {
    child: Child,
    url: String,
}

impl Agent {
    fn start(registry: &str, cache: &Path, name: &str) -> Agent {
        let mut child = Command::new(bin("snapctl"))
            .arg("--registry")
            .arg(registry)
            .arg("--cache")
            .arg(cache)
            .args(["agent", "--listen", "127.0.0.1:0", "--name", name])
            .args(["--register-every", "1s"])
            .env_remove("SNAPCTL_REGISTRY")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let v = first_json_line(&mut child, "snapctl agent");
        let url = format!("http://{}", v["listen"].as_str().unwrap());
        Agent { child, url }
    }
}

impl Agent {
    /// SIGTERM by PID; the exit status if it stopped within 5 s (else SIGKILL, None).
    fn stop(&mut self) -> Option<std::process::ExitStatus> {
        if let Ok(Some(s)) = self.child.try_wait() {
            return Some(s);
        }
        // SAFETY: kill takes plain integers; the PID is a process this test started.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let stopped = wait_for(Duration::from_secs(5), || {
            self.child.try_wait().ok().flatten()
        });
        if stopped.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        stopped
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
    }
}

fn list_nodes(url: &str) -> Vec<pb::NodeInfo> {
    block_on(async {
        RegistryClient::connect(url.to_string())
            .await
            .unwrap_or_else(|e| panic!("connecting to {url}: {e}"))
            .list_nodes(pb::ListNodesRequest {})
            .await
            .unwrap()
            .into_inner()
            .nodes
    })
}

fn cache_status(url: &str, reference: &str) -> pb::CacheStatusResponse {
    block_on(async {
        NodeAgentClient::connect(url.to_string())
            .await
            .unwrap_or_else(|e| panic!("connecting to agent {url}: {e}"))
            .cache_status(pb::CacheStatusRequest {
                reference: Some(reference.into()),
            })
            .await
            .unwrap()
            .into_inner()
    })
}

/// `Prefetch` through the agent, or the failure's (code, message).
fn prefetch(url: &str, reference: &str) -> Result<pb::PrefetchResponse, (i32, String)> {
    block_on(async {
        NodeAgentClient::connect(url.to_string())
            .await
            .unwrap_or_else(|e| panic!("connecting to agent {url}: {e}"))
            .prefetch(pb::PrefetchRequest {
                reference: reference.into(),
            })
            .await
            .map(|r| r.into_inner())
            .map_err(|s| (i32::from(s.code()), s.to_string()))
    })
}

#[test]
fn agent_facts_reach_the_registry() {
    let t = tempfile::tempdir().unwrap();
    let reg = Registry::start(&t.path().join("reg"));
    let agent = Agent::start(&reg.url, &t.path().join("cache"), "node-a");
    let node = wait_for(Duration::from_secs(20), || {
        list_nodes(&reg.url)
            .into_iter()
            .find(|n| n.node_name == "node-a")
    })
    .expect("node-a never registered");
    let facts = node.facts.expect("facts");
    assert_eq!(facts.arch, std::env::consts::ARCH);
    assert_eq!(facts.kernel, snapreg_client::host::facts().kernel);
    assert_eq!(node.agent_url, agent.url);
    assert_eq!(node.cache_limit_bytes, 20 << 30);
    assert!(node.registered_unix_ms > 0);

    let mut agent = agent;
    let status = agent.stop().expect("the agent ignored SIGTERM");
    assert!(status.success(), "agent exited with {status}");
}

#[test]
fn prefetch_through_the_agent_fills_the_node_cache() {
    let t = tempfile::tempdir().unwrap();
    let reg = Registry::start(&t.path().join("reg"));
    let src = t.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("pages-1.img"), noise(61, 3 << 20)).unwrap();
    std::fs::write(src.join("core.img"), b"core\n").unwrap();
    snapctl(&reg.url, &["push", src.to_str().unwrap(), "ag/app:v1"]).ok();

    let cache = t.path().join("cache");
    let agent = Agent::start(&reg.url, &cache, "node-b");

    let before = cache_status(&agent.url, "ag/app:v1");
    let snap = before.snapshot.expect("snapshot status");
    assert!(snap.chunks_total > 0);
    assert_eq!(snap.chunks_cached, 0);

    let p = prefetch(&agent.url, "ag/app:v1").unwrap_or_else(|e| panic!("Prefetch: {e:?}"));
    assert_eq!(p.chunks_total, snap.chunks_total);
    assert_eq!(p.chunks_fetched, snap.chunks_total);
    assert!(p.digest.starts_with("blake3:"));

    let after = cache_status(&agent.url, "ag/app:v1");
    let snap = after.snapshot.expect("snapshot status");
    assert_eq!(snap.chunks_cached, snap.chunks_total);
    assert_eq!(snap.bytes_cached, snap.bytes_total);
    assert_eq!(snap.digest, p.digest);
    assert!(after.chunks >= snap.chunks_total);

    // Every snapctl on the node shares the cache: a prefetch now fetches nothing.
    let again = snapctl_cached(&reg.url, &cache, &["prefetch", "ag/app:v1"])
        .ok()
        .json();
    assert_eq!(again["chunks_transferred"], 0, "{again}");

    // Unknown snapshot: NOT_FOUND (5).
    let err = prefetch(&agent.url, "ag/app:nope").unwrap_err();
    assert_eq!(err.0, 5, "{err:?}");

    // The registration carries the cache usage.
    let node = wait_for(Duration::from_secs(20), || {
        list_nodes(&reg.url)
            .into_iter()
            .find(|n| n.node_name == "node-b" && n.cache_chunks >= snap.chunks_total)
    })
    .expect("node-b's cache usage never reached the registry");
    assert!(node.cache_bytes > 0);
}
