//! The fan-out tracker behind `Swarm`: which registered nodes are fetching or hold
//! which snapshot, so a node fetches chunks from its siblings instead of all of them
//! fetching everything from here (the whole protocol: client/src/peer/mod.rs).
//!
//! Membership is a hint kept in this instance's memory, like a BitTorrent tracker's:
//! a member lapses [`MEMBER_TTL`] after its last announcement ([`SEED_TTL`] once it
//! announced itself complete), a registry restart
//! forgets every swarm (nodes re-announce about every second while they fetch), and
//! instances serving one bucket each track the nodes that talk to them. Nothing here
//! is a source of bytes: peers' chunks are verified by digest on arrival.
//!
//! Peer choice for an asking node: the members registered with an agent URL (the
//! asking node itself left out), same zone first, then same region, then the rest;
//! within each, complete members (seeds) before fetching ones; then an order of the
//! asking node's own (BLAKE3 of both names), so that siblings spread over different
//! parents instead of all asking the first seed.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use snapreg_proto::Digest;

use crate::scheduler::RegisteredNode;

/// How long a fetching member stays listed after its last announcement (fetching
/// nodes announce about every second).
pub const MEMBER_TTL: Duration = Duration::from_secs(120);
/// How long a complete member (a seed) stays listed: its agent serves the chunks
/// from the node cache long after the fetching process is gone.
pub const SEED_TTL: Duration = Duration::from_secs(30 * 60);
/// Peers returned when the node asks for none in particular, and at most.
pub const DEFAULT_PEERS: usize = 8;
pub const MAX_PEERS: usize = 64;
/// Node labels that place a node (Kubernetes' well-known topology labels).
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
pub const REGION_LABEL: &str = "topology.kubernetes.io/region";
/// Swarms this instance tracks at once; the least recently announced goes first.
const MAX_SWARMS: usize = 4096;

struct Member {
    seat: u32,
    complete: bool,
    seen: Instant,
}

#[derive(Default)]
struct SwarmState {
    members: HashMap<String, Member>,
    next_seat: u32,
    touched: Option<Instant>,
}

impl SwarmState {
    fn expire(&mut self, now: Instant) {
        self.members.retain(|_, m| {
            let ttl = if m.complete { SEED_TTL } else { MEMBER_TTL };
            now.duration_since(m.seen) < ttl
        });
    }
}

/// One announcement.
pub struct Announce<'a> {
    pub snapshot: Digest,
    /// Empty: only asking.
    pub node: &'a str,
    pub complete: bool,
    pub max_peers: usize,
}

/// A peer as the tracker hands it out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub node_name: String,
    pub agent_url: String,
    pub complete: bool,
    pub zone: String,
    pub region: String,
}

#[derive(Debug)]
pub struct Answer {
    pub peers: Vec<Peer>,
    pub seat: u32,
    pub members: u32,
}

#[derive(Default)]
pub struct Tracker {
    swarms: Mutex<HashMap<Digest, SwarmState>>,
}

impl Tracker {
    /// Records the announcement and answers with peers chosen from `nodes` (every
    /// registered node).
    pub fn announce(&self, a: &Announce, nodes: &[RegisteredNode]) -> Answer {
        let now = Instant::now();
        let mut swarms = self.swarms.lock().unwrap();
        if !swarms.contains_key(&a.snapshot) && swarms.len() >= MAX_SWARMS {
            swarms.retain(|_, s| s.touched.is_some_and(|t| now.duration_since(t) < SEED_TTL));
            if swarms.len() >= MAX_SWARMS {
                let oldest = swarms
                    .iter()
                    .min_by_key(|(_, s)| s.touched)
                    .map(|(d, _)| *d);
                swarms.remove(&oldest.expect("a full map has a member"));
            }
        }
        let swarm = swarms.entry(a.snapshot).or_default();
        swarm.expire(now);
        swarm.touched = Some(now);
        let seat = if a.node.is_empty() {
            swarm.next_seat
        } else {
            let next = swarm.next_seat;
            let m = swarm
                .members
                .entry(a.node.to_string())
                .or_insert_with(|| Member {
                    seat: next,
                    complete: false,
                    seen: now,
                });
            if m.seat == next {
                swarm.next_seat += 1;
            }
            m.complete = a.complete;
            m.seen = now;
            m.seat
        };
        let members = swarm.members.len() as u32;
        let wanted = match a.max_peers {
            0 => DEFAULT_PEERS,
            n => n.min(MAX_PEERS),
        };
        let peers = choose(a.node, &swarm.members, nodes, wanted);
        Answer {
            peers,
            seat,
            members,
        }
    }

    /// Swarms with members and members over all of them.
    pub fn size(&self) -> (u64, u64) {
        let now = Instant::now();
        let mut swarms = self.swarms.lock().unwrap();
        swarms.values_mut().for_each(|s| s.expire(now));
        swarms.retain(|_, s| !s.members.is_empty());
        let members = swarms.values().map(|s| s.members.len() as u64).sum();
        (swarms.len() as u64, members)
    }
}

fn label(node: &RegisteredNode, key: &str) -> String {
    node.node.facts.labels.get(key).cloned().unwrap_or_default()
}

/// The peers for `asking`, best first (the module docs give the order).
fn choose(
    asking: &str,
    members: &HashMap<String, Member>,
    nodes: &[RegisteredNode],
    wanted: usize,
) -> Vec<Peer> {
    let by_name: BTreeMap<&str, &RegisteredNode> =
        nodes.iter().map(|n| (n.name.as_str(), n)).collect();
    let me = by_name.get(asking);
    let (my_zone, my_region) = me.map_or_else(Default::default, |n| {
        (label(n, ZONE_LABEL), label(n, REGION_LABEL))
    });
    let mut peers: Vec<(u8, bool, [u8; 32], Peer)> = members
        .iter()
        .filter(|(name, _)| name.as_str() != asking)
        .filter_map(|(name, m)| {
            let node = by_name.get(name.as_str())?;
            if node.node.agent_url.is_empty() {
                return None;
            }
            let (zone, region) = (label(node, ZONE_LABEL), label(node, REGION_LABEL));
            let distance = if !zone.is_empty() && zone == my_zone {
                0
            } else if !region.is_empty() && region == my_region {
                1
            } else {
                2
            };
            let spread = *blake3::hash(format!("{asking}\n{name}").as_bytes()).as_bytes();
            let peer = Peer {
                node_name: name.clone(),
                agent_url: node.node.agent_url.clone(),
                complete: m.complete,
                zone,
                region,
            };
            Some((distance, !m.complete, spread, peer))
        })
        .collect();
    peers.sort_by_key(|a| (a.0, a.1, a.2));
    peers.into_iter().take(wanted).map(|p| p.3).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::{NodeFacts, NodeRegistration};

    fn node(name: &str, zone: &str, region: &str) -> RegisteredNode {
        let mut labels = BTreeMap::new();
        if !zone.is_empty() {
            labels.insert(ZONE_LABEL.to_string(), zone.to_string());
        }
        if !region.is_empty() {
            labels.insert(REGION_LABEL.to_string(), region.to_string());
        }
        RegisteredNode {
            name: name.to_string(),
            node: NodeRegistration {
                agent_url: format!("http://{name}:5001"),
                facts: NodeFacts {
                    arch: "x86_64".into(),
                    cpu_features: vec![],
                    kernel: "6.1".into(),
                    criu_version: None,
                    container_image: None,
                    gpu: None,
                    labels,
                },
                cache_bytes: 0,
                cache_chunks: 0,
                cache_limit_bytes: 0,
            },
            registered_unix_ms: 0,
        }
    }

    fn announce(t: &Tracker, node: &str, complete: bool, nodes: &[RegisteredNode]) -> Answer {
        let a = Announce {
            snapshot: Digest::of(b"manifest"),
            node,
            complete,
            max_peers: 3,
        };
        t.announce(&a, nodes)
    }

    #[test]
    fn seats_are_stable_and_peers_exclude_the_asker() {
        let nodes: Vec<_> = ["a", "b", "c"].iter().map(|n| node(n, "", "")).collect();
        let t = Tracker::default();
        assert_eq!(announce(&t, "a", false, &nodes).seat, 0);
        assert_eq!(announce(&t, "b", false, &nodes).seat, 1);
        let again = announce(&t, "a", false, &nodes);
        assert_eq!(again.seat, 0);
        assert_eq!(again.members, 2);
        let names: Vec<_> = again.peers.iter().map(|p| p.node_name.as_str()).collect();
        assert_eq!(names, ["b"]);
        // An unregistered or asking-only caller is never listed.
        let only = announce(&t, "", false, &nodes);
        assert_eq!(only.members, 2);
        assert_eq!(only.peers.len(), 2);
        assert_eq!(announce(&t, "ghost", false, &nodes).peers.len(), 2);
        assert_eq!(
            announce(&t, "a", false, &nodes).peers.len(),
            1,
            "ghost has no agent"
        );
    }

    #[test]
    fn same_zone_then_region_then_seeds_first_and_bounded() {
        let nodes = vec![
            node("me", "z1", "r1"),
            node("far-seed", "z9", "r9"),
            node("region", "z2", "r1"),
            node("zone", "z1", "r1"),
            node("far", "z8", "r8"),
        ];
        let t = Tracker::default();
        announce(&t, "far", false, &nodes);
        announce(&t, "far-seed", true, &nodes);
        announce(&t, "region", false, &nodes);
        announce(&t, "zone", false, &nodes);
        let got = announce(&t, "me", false, &nodes);
        let names: Vec<_> = got.peers.iter().map(|p| p.node_name.as_str()).collect();
        assert_eq!(names, ["zone", "region", "far-seed"]);
        assert_eq!(got.members, 5);
    }

    #[test]
    fn different_askers_get_different_orders() {
        let nodes: Vec<_> = (0..20).map(|i| node(&format!("n{i}"), "", "")).collect();
        let t = Tracker::default();
        for n in &nodes {
            announce(&t, &n.name, false, &nodes);
        }
        let firsts: std::collections::HashSet<String> = nodes
            .iter()
            .map(|n| {
                announce(&t, &n.name, false, &nodes).peers[0]
                    .node_name
                    .clone()
            })
            .collect();
        assert!(firsts.len() > 5, "{firsts:?}");
    }
}
