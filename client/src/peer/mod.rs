//! Fleet fan-out: nodes fetch the chunks of a snapshot from their siblings, so that
//! N nodes restoring (or prefetching) one snapshot take it from the registry about
//! once instead of N times.
//!
//! # Protocol
//!
//! ```text
//!  node A (snapctl)                 registry                  node B (snapctl agent)
//!   │ Swarm(repo, manifest, A) ────▶ tracker: members of the
//!   │ ◀──── peers [B, …], seat       snapshot's swarm (memory)
//!   │ WatchChunks(digests) ───────────────────────────────────▶ node cache
//!   │ ◀──── HeldChunks{indices} … (now, then every ~50 ms as chunks arrive)
//!   │ GetChunks([d]) ─────────────────────────────────────────▶ node cache
//!   │ ◀──── ChunkData (codec framing, as stored) — verified by BLAKE3 here
//!   │ Swarm(…) again about every second: new peers; `complete` when done
//! ```
//!
//! - **Tracker** (`Registry.Swarm`, registry/src/tracker.rs): the registry already
//!   knows the nodes (RegisterNode: agent URL, zone and region labels). A node
//!   announces the snapshot it is fetching (by manifest digest, with pull access to
//!   the repository) and gets at most `max_peers` parents: same zone, then region,
//!   seeds first, in an order of its own. It re-announces every [`ANNOUNCE_EVERY`]
//!   while it fetches (learning of siblings that joined later) and once more as
//!   complete when it is done. Its seat (join order) sets where in the chunk list its
//!   registry fetches start.
//! - **Agents** (`NodeAgent.WatchChunks`, `NodeAgent.GetChunks`, [`serve`]): every
//!   node's agent serves its node cache: which of a list of chunks it holds (a stream
//!   of indices, as they arrive), and the chunks themselves as stored, so an
//!   encrypted tenant's chunks travel as ciphertext. Admitted: callers holding the
//!   cluster's client certificate (mutual TLS) or a bearer token the registry
//!   accepts for pull (the agent asks the registry, `WhoAmI`, and remembers the
//!   answer for [`serve::VERDICT_TTL`]).
//! - **Fetching** (the fetch stack's peer layer, `fetch/peers.rs`, over [`swarm::Swarm`]): a chunk a
//!   parent holds is asked of the least busy such parent; a chunk no parent holds
//!   comes from the layer below (direct URLs, registries). Bulk readers (prefetch,
//!   pull) spread their registry fetches: each node starts at its own point of the
//!   chunk list ([`order`]) and, with M members, keeps about 1/M of the window on
//!   the registry, so siblings fetch different chunks from it and exchange them.
//!
//! # Trust
//!
//! A peer is trusted for nothing but access: every chunk it sends is decoded and
//! verified against its BLAKE3 address exactly as a registry's. A peer that sends
//! bytes that do not verify is dropped for the rest of the operation and reported;
//! one that fails or stalls past [`PEER_WAIT`] ([`BULK_PEER_WAIT`] for prefetch and
//! pull) loses that chunk to the layer below
//! and is left alone for [`SLOW_PEER_PAUSE`]. So a peer can slow a restore, never
//! corrupt one, and CRIU's next page never waits on a peer longer than [`PEER_WAIT`].
//!
//! Why our own protocol and not iroh-blobs or Dragonfly: chunks are already
//! BLAKE3-addressed, verified and cached by the fetch stack, and authorisation is the
//! registry's tokens and the cluster's mTLS; iroh-blobs brings its own transport,
//! identities and BAO-verified blob store (a second cache next to the node cache),
//! and Dragonfly works on whole blobs over HTTP through its own daemons and
//! scheduler, blind to the restore's page order. Two RPCs on the agent's gRPC server
//! and one on the registry carry what we need.

pub mod client;
pub mod order;
pub mod serve;
pub mod swarm;

use std::time::Duration;

use crate::remote::Credentials;

/// How long a chunk waits on a peer before the layer below is asked instead.
pub const PEER_WAIT: Duration = Duration::from_secs(2);
/// The same for a bulk reader (prefetch, pull): no one waits on a given chunk, and
/// a chunk abandoned mid-transfer is bandwidth thrown away on both links, so a slow
/// parent is given longer; a stalled one is still left after this.
pub const BULK_PEER_WAIT: Duration = Duration::from_secs(8);
/// A peer that failed or stalled is not asked again for this long.
pub const SLOW_PEER_PAUSE: Duration = Duration::from_secs(5);
/// How often a fetching node re-announces itself (and learns of new siblings).
pub const ANNOUNCE_EVERY: Duration = Duration::from_secs(1);
/// Parents a node fetches from, at most, unless configured. More parents, more
/// uplinks to draw on while chunks are still scarce (measured at 32 nodes: 16
/// parents and a 50 ms watch tick took the slowest node from 2.6x to 2.0x one node
/// alone; bench/RESULTS.md, fan-out).
pub const DEFAULT_PARENTS: usize = 16;

/// How a reader on this node takes part in its snapshot's swarm.
#[derive(Clone, Debug)]
pub struct PeerConfig {
    /// This node's name as its agent registers it (`snapctl agent --name`); `None`:
    /// fetch from peers without being listed (no agent serves this host's cache).
    pub node_name: Option<String>,
    /// What this side presents to peers' agents: the node's token, and its client
    /// certificate where agents require mutual TLS.
    pub credentials: Credentials,
    /// Parents at most.
    pub max_parents: usize,
}

impl PeerConfig {
    pub fn new(node_name: Option<String>, credentials: Credentials) -> Self {
        PeerConfig {
            node_name,
            credentials,
            max_parents: DEFAULT_PARENTS,
        }
    }
}
