//! One reader's view of its snapshot's swarm: the parents the tracker named, what
//! each holds (kept current by a WatchChunks stream per parent), and who failed. A
//! background task re-announces the node and adds parents as siblings join; it and
//! the watch streams end when the [`Swarm`] is dropped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use snapreg_proto::pb;
use snapreg_proto::Digest;
use tokio::sync::Notify;
use tokio::task::AbortHandle;

use super::client::PeerClient;
use super::{PeerConfig, ANNOUNCE_EVERY, SLOW_PEER_PAUSE};
use crate::error::Result;
use crate::remote::Remote;

/// The tracker's first answer is awaited this long; later ones arrive in the
/// background.
const FIRST_ANSWER_WAIT: Duration = Duration::from_secs(2);
/// Chunk requests in flight to one parent from a bulk reader (spreading the load
/// over parents), and from an in-order reader (a restore: it would rather queue at
/// a parent that holds the chunk than go to the registry). A parent's uplink is
/// shared by all its children's requests at once, so more than two per child only
/// makes every chunk slower (measured: with 8, 32 nodes on 50 Mbit/s links ran into
/// the wait and threw transfers away; bench/RESULTS.md, fan-out).
pub const PER_PARENT: usize = 2;
pub const PER_PARENT_IN_ORDER: usize = 32;

/// A parent as the swarm knows it.
struct Parent {
    name: Arc<str>,
    client: PeerClient,
    /// One bit per chunk of the swarm's list.
    held: Vec<u64>,
    /// Its first WatchChunks answer arrived.
    heard: bool,
    /// Gone (its watch stream broke) or dropped (it sent bad bytes): never asked again.
    out: bool,
    /// Failed or stalled: not asked before this instant.
    paused_until: Option<Instant>,
    in_flight: usize,
}

impl Parent {
    fn holds(&self, i: usize) -> bool {
        self.held[i / 64] & (1 << (i % 64)) != 0
    }

    fn available(&self, now: Instant, cap: usize) -> bool {
        !self.out && self.in_flight < cap && self.paused_until.is_none_or(|t| now >= t)
    }
}

#[derive(Default)]
struct State {
    parents: Vec<Parent>,
    /// Swarm indices as some parent first came to hold them, in order (drivers keep
    /// a position in it to learn what became available).
    arrivals: Vec<u32>,
    /// "node: reason" for every parent dropped for bad bytes or lost.
    problems: Vec<String>,
}

/// A chunk taken from a parent, and which one (for [`Swarm::finished`]).
pub struct Lease {
    pub parent: usize,
    pub name: Arc<str>,
    pub client: PeerClient,
}

/// How a request to a parent ended, for [`Swarm::finished`].
pub enum Outcome {
    Ok,
    /// The parent answered it does not hold the chunk (evicted since it said so).
    Missing,
    /// It failed or stalled: pause it.
    Failed(String),
    /// It sent bytes that do not verify: drop it.
    Corrupt(String),
}

pub struct Swarm {
    chunks: Arc<[Digest]>,
    index: HashMap<Digest, u32>,
    state: Mutex<State>,
    changed: Notify,
    seat: AtomicU32,
    members: AtomicU32,
    /// Chunks this node now holds (for announcing itself complete).
    done: AtomicUsize,
    tasks: Mutex<Vec<AbortHandle>>,
    farewell: Mutex<Option<Announcer>>,
}

/// What the announcements need.
#[derive(Clone)]
struct Announcer {
    tracker: Remote,
    repository: String,
    snapshot: Digest,
    config: PeerConfig,
}

impl Announcer {
    async fn announce(&self, complete: bool) -> Result<pb::SwarmResponse> {
        self.tracker
            .swarm(pb::SwarmRequest {
                repository: self.repository.clone(),
                digest: self.snapshot.to_string(),
                node_name: self.config.node_name.clone().unwrap_or_default(),
                complete,
                max_peers: self.config.max_parents as u32,
            })
            .await
    }
}

impl Swarm {
    /// Joins the swarm of `snapshot` (in `repository`) through `tracker` for the
    /// distinct chunks `chunks`, of which the node already holds `already`; waits
    /// briefly for the tracker's first answer.
    pub async fn join(
        tracker: Remote,
        repository: &str,
        snapshot: Digest,
        chunks: Vec<Digest>,
        already: usize,
        config: PeerConfig,
    ) -> Arc<Swarm> {
        let index = chunks
            .iter()
            .enumerate()
            .map(|(i, d)| (*d, i as u32))
            .collect();
        let announcer = Announcer {
            tracker,
            repository: repository.to_string(),
            snapshot,
            config,
        };
        let swarm = Arc::new(Swarm {
            chunks: chunks.into(),
            index,
            state: Mutex::default(),
            changed: Notify::new(),
            seat: AtomicU32::new(0),
            members: AtomicU32::new(1),
            done: AtomicUsize::new(already),
            tasks: Mutex::default(),
            farewell: Mutex::new(Some(announcer.clone())),
        });
        let first = tokio::time::timeout(FIRST_ANSWER_WAIT, announcer.announce(false)).await;
        match first {
            Ok(Ok(answer)) => {
                Swarm::take_answer(&swarm, answer).await;
                swarm.hear_parents(FIRST_ANSWER_WAIT).await;
            }
            Ok(Err(e)) => tracing::info!(
                "peers: the tracker did not answer ({e}); fetching without peers for now"
            ),
            Err(_) => tracing::info!("peers: the tracker is slow; fetching without peers for now"),
        }
        let weak = Arc::downgrade(&swarm);
        let task = tokio::spawn(Swarm::keep_announcing(weak, announcer));
        swarm.tasks.lock().unwrap().push(task.abort_handle());
        swarm
    }

    /// Waits (at most `wait`) until every parent has said what it holds, so the
    /// first chunks asked go to parents that hold them.
    async fn hear_parents(&self, wait: Duration) {
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            let unheard = {
                let st = self.state.lock().unwrap();
                st.parents.iter().any(|p| !p.heard && !p.out)
            };
            if !unheard {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn keep_announcing(swarm: Weak<Swarm>, announcer: Announcer) {
        loop {
            tokio::time::sleep(ANNOUNCE_EVERY).await;
            let Some(s) = swarm.upgrade() else { return };
            let complete = s.done.load(Relaxed) >= s.chunks.len();
            match announcer.announce(complete).await {
                Ok(answer) => Swarm::take_answer(&s, answer).await,
                Err(e) => tracing::debug!("peers: announcing: {e}"),
            }
        }
    }

    /// Takes the tracker's answer: the seat, and parents not known yet (up to the
    /// bound), connected and watched.
    async fn take_answer(swarm: &Arc<Swarm>, answer: pb::SwarmResponse) {
        swarm.seat.store(answer.seat, Relaxed);
        swarm.members.store(answer.members.max(1), Relaxed);
        let farewell = swarm.farewell.lock().unwrap().clone();
        let Some(announcer) = farewell else { return };
        let new: Vec<pb::SwarmPeer> = {
            let st = swarm.state.lock().unwrap();
            let room = announcer
                .config
                .max_parents
                .saturating_sub(st.parents.len());
            answer
                .peers
                .into_iter()
                .filter(|peer| !st.parents.iter().any(|p| *p.name == *peer.node_name))
                .take(room)
                .collect()
        };
        let creds = &announcer.config.credentials;
        let connected = futures::future::join_all(
            new.iter()
                .map(|peer| PeerClient::connect(&peer.agent_url, creds)),
        )
        .await;
        for (peer, client) in new.into_iter().zip(connected) {
            match client {
                Ok(client) => swarm.add_parent(peer.node_name, client),
                Err(e) => tracing::info!(
                    "peers: {} ({}) unreachable: {e}",
                    peer.node_name,
                    peer.agent_url
                ),
            }
        }
    }

    fn add_parent(self: &Arc<Self>, name: String, client: PeerClient) {
        let at = {
            let mut st = self.state.lock().unwrap();
            st.parents.push(Parent {
                name: name.into(),
                client: client.clone(),
                held: vec![0; self.chunks.len().div_ceil(64)],
                heard: false,
                out: false,
                paused_until: None,
                in_flight: 0,
            });
            st.parents.len() - 1
        };
        let weak = Arc::downgrade(self);
        let chunks = self.chunks.clone();
        let task = tokio::spawn(async move {
            let result = Swarm::watch(&weak, at, &client, &chunks).await;
            if let (Err(e), Some(s)) = (result, weak.upgrade()) {
                s.lose(at, format!("its chunk list broke off: {e}"));
            }
        });
        self.tasks.lock().unwrap().push(task.abort_handle());
    }

    /// Follows one parent's WatchChunks stream into its bitmap.
    async fn watch(
        swarm: &Weak<Swarm>,
        at: usize,
        client: &PeerClient,
        chunks: &[Digest],
    ) -> Result<()> {
        let mut stream = client.watch(chunks).await?;
        while let Some(msg) = stream
            .message()
            .await
            .map_err(|s| client.map_stream_error(s))?
        {
            let Some(s) = swarm.upgrade() else {
                return Ok(());
            };
            s.mark_held(at, &msg.indices);
        }
        Ok(())
    }

    fn mark_held(&self, at: usize, indices: &[u32]) {
        let mut guard = self.state.lock().unwrap();
        let st = &mut *guard;
        let parent = &mut st.parents[at];
        parent.heard = true;
        for &i in indices {
            let i = i as usize;
            if i < self.chunks.len() && !parent.holds(i) {
                parent.held[i / 64] |= 1 << (i % 64);
                st.arrivals.push(i as u32);
            }
        }
        drop(guard);
        self.changed.notify_waiters();
    }

    fn lose(&self, at: usize, reason: String) {
        let mut st = self.state.lock().unwrap();
        let p = &mut st.parents[at];
        if !p.out {
            p.out = true;
            let line = format!("{}: {reason}", p.name);
            tracing::warn!("peers: leaving {line}");
            st.problems.push(line);
        }
        drop(st);
        self.changed.notify_waiters();
    }

    /// Chunk `i` of the swarm's list.
    pub fn digest(&self, i: usize) -> Digest {
        self.chunks[i]
    }

    /// The swarm index of a chunk, if it is one of the snapshot's.
    pub fn index_of(&self, digest: &Digest) -> Option<usize> {
        self.index.get(digest).map(|&i| i as usize)
    }

    pub fn len(&self) -> usize {
        self.chunks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    pub fn seat(&self) -> u32 {
        self.seat.load(Relaxed)
    }

    /// Members of the swarm, this node included (at least 1).
    pub fn members(&self) -> usize {
        self.members.load(Relaxed) as usize
    }

    /// Whether some parent still in the swarm holds chunk `i` (paused ones count:
    /// they are back soon).
    pub fn held_by_a_parent(&self, i: usize) -> bool {
        let st = self.state.lock().unwrap();
        st.parents.iter().any(|p| !p.out && p.holds(i))
    }

    /// One bit per chunk: held by some parent still in the swarm.
    pub fn held_by_parents(&self) -> Vec<u64> {
        let st = self.state.lock().unwrap();
        let mut out = vec![0u64; self.chunks.len().div_ceil(64)];
        for p in st.parents.iter().filter(|p| !p.out) {
            for (o, h) in out.iter_mut().zip(&p.held) {
                *o |= h;
            }
        }
        out
    }

    /// Takes a request slot on the least busy available parent holding chunk `i`
    /// that has fewer than `cap` requests in flight.
    pub fn lease(&self, i: usize, cap: usize) -> Option<Lease> {
        let now = Instant::now();
        let mut st = self.state.lock().unwrap();
        let (at, p) = st
            .parents
            .iter_mut()
            .enumerate()
            .filter(|(_, p)| p.available(now, cap) && p.holds(i))
            .min_by_key(|(_, p)| p.in_flight)?;
        p.in_flight += 1;
        Some(Lease {
            parent: at,
            name: p.name.clone(),
            client: p.client.clone(),
        })
    }

    /// Gives back a lease taken for chunk `i`, with how the request ended.
    pub fn finished(&self, lease: &Lease, i: usize, outcome: Outcome) {
        let mut st = self.state.lock().unwrap();
        let p = &mut st.parents[lease.parent];
        p.in_flight -= 1;
        match outcome {
            Outcome::Ok => {}
            Outcome::Missing => p.held[i / 64] &= !(1 << (i % 64)),
            Outcome::Failed(why) => {
                tracing::info!(
                    "peers: {} failed chunk {}: {why}; pausing it",
                    p.name,
                    self.chunks[i]
                );
                p.paused_until = Some(Instant::now() + SLOW_PEER_PAUSE);
            }
            Outcome::Corrupt(why) => {
                drop(st);
                self.lose(lease.parent, format!("dropped: {why}"));
                return;
            }
        }
        drop(st);
        self.changed.notify_waiters();
    }

    /// Swarm indices that parents came to hold since position `from` of the
    /// arrival log, and the new position.
    pub fn arrivals_since(&self, from: usize) -> (Vec<u32>, usize) {
        let st = self.state.lock().unwrap();
        let from = from.min(st.arrivals.len());
        (st.arrivals[from..].to_vec(), st.arrivals.len())
    }

    /// Resolves when parents' holdings or availability change.
    pub async fn changed(&self) {
        self.changed.notified().await
    }

    /// This node holds one more of the snapshot's chunks.
    pub fn got_one(&self) {
        self.done.fetch_add(1, Relaxed);
    }

    /// "node: reason" for every parent lost or dropped.
    pub fn problems(&self) -> Vec<String> {
        self.state.lock().unwrap().problems.clone()
    }

    pub fn parent_count(&self) -> usize {
        self.state.lock().unwrap().parents.len()
    }
}

impl Drop for Swarm {
    fn drop(&mut self) {
        for t in self.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
        // Listed as a seed from now on if this node got everything (its agent serves
        // the chunks from the node cache after this process is gone).
        let announcer = self.farewell.lock().unwrap().take();
        let complete = self.done.load(Relaxed) >= self.chunks.len();
        if let (Some(a), Ok(rt)) = (announcer, tokio::runtime::Handle::try_current()) {
            if complete && a.config.node_name.is_some() {
                rt.spawn(async move {
                    let _ = tokio::time::timeout(FIRST_ANSWER_WAIT, a.announce(true)).await;
                });
            }
        }
    }
}
