//! The peer layer: chunks from sibling nodes' caches ([`crate::peer`]), ahead of the
//! registry. A chunk a parent holds is asked of it, waiting at most
//! [`PEER_WAIT`] ([`BULK_PEER_WAIT`] in bulk) before the layer below is asked instead; everything a parent sends
//! is verified here, and a parent that sends bad bytes is dropped.
//!
//! - [`ChunkFetch::fetch`] (readers in a given order, such as CRIU's page stream):
//!   a parent if one holds the chunk now, else the layer below at once: a restore
//!   never waits for a chunk to reach the swarm.
//! - [`ChunkFetch::fetch_many`] (bulk readers: prefetch, pull): a scheduler that
//!   takes from parents whatever they hold, and from the registry only chunks no
//!   parent holds. While parents are delivering, it takes from the registry only its
//!   stripe of the chunk list (chunk i where i ≡ seat mod members, in
//!   [`RegistryOrder`]) with its share of the window (window / members): every chunk
//!   has one owner that brings it into the swarm, and the others get it from there.
//!   When nothing is in flight and nothing has arrived for [`PATIENCE`] (its stripe
//!   is done and the chunks it waits for are not coming: their owners are slow or
//!   gone), it takes any chunk no parent holds, still with its share of the window.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::{BoxStream, FuturesUnordered};
use futures::{FutureExt, StreamExt};
use snapreg_proto::Digest;
use tokio::sync::mpsc;

use super::{verify_object, ChunkFetch, Fetched, Lane, Origin, Want};
use crate::error::{ClientError, Result};
use crate::peer::order::RegistryOrder;
use crate::peer::swarm::{Lease, Outcome, Swarm, PER_PARENT, PER_PARENT_IN_ORDER};
use crate::peer::{BULK_PEER_WAIT, PEER_WAIT};

/// How often a waiting scheduler looks again without being told of a change.
const IDLE_TICK: Duration = Duration::from_millis(100);
/// Idle this long (nothing in flight, nothing arrived), a bulk reader stops waiting
/// for its siblings' stripes and takes any chunk no parent holds from the registry.
pub const PATIENCE: Duration = Duration::from_secs(1);

pub struct Peers {
    swarm: Arc<Swarm>,
    inner: Arc<dyn ChunkFetch>,
}

impl Peers {
    pub fn over(swarm: Arc<Swarm>, inner: Arc<dyn ChunkFetch>) -> Arc<dyn ChunkFetch> {
        Arc::new(Peers { swarm, inner })
    }

    async fn fetch_one(&self, digest: Digest, file: &str, lane: Lane) -> Result<Fetched> {
        let Some(i) = self.swarm.index_of(&digest) else {
            return self.inner.fetch(digest, file, lane).await;
        };
        // Two parents at most, then the layer below.
        for _ in 0..2 {
            let Some(lease) = self.swarm.lease(i, PER_PARENT_IN_ORDER) else {
                break;
            };
            if let Ok((content, object_bytes)) =
                fetch_from_parent(&self.swarm, &lease, i, PEER_WAIT, file).await
            {
                self.swarm.got_one();
                return Ok(Fetched {
                    content,
                    origin: Origin::Peer {
                        node: lease.name,
                        object_bytes,
                    },
                });
            }
        }
        let fetched = self.inner.fetch(digest, file, lane).await?;
        self.swarm.got_one();
        Ok(fetched)
    }
}

impl ChunkFetch for Peers {
    fn fetch<'a>(
        &'a self,
        digest: Digest,
        file: &'a str,
        lane: Lane,
    ) -> BoxFuture<'a, Result<Fetched>> {
        self.fetch_one(digest, file, lane).boxed()
    }

    fn fetch_many(
        &self,
        wants: Vec<Want>,
        window: usize,
    ) -> BoxStream<'_, Result<(Digest, Fetched)>> {
        let window = window.max(1);
        let (tx, rx) = mpsc::channel(window);
        let scheduler = Scheduler::new(self.swarm.clone(), self.inner.clone(), wants, window);
        let task = AbortOnDrop(tokio::spawn(scheduler.run(tx)));
        tokio_stream::wrappers::ReceiverStream::new(rx)
            .map(move |item| {
                let _running = &task;
                item
            })
            .boxed()
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Pending,
    Running,
    Done,
}

/// A finished request: the want's position and where it went.
enum Finished {
    Peer(usize, Arc<str>, Result<(Bytes, u64)>),
    Below(usize, Result<Fetched>),
}

/// The bulk scheduler of one `fetch_many` call.
struct Scheduler {
    swarm: Arc<Swarm>,
    inner: Arc<dyn ChunkFetch>,
    wants: Vec<Want>,
    /// Each want's index in the swarm's chunk list.
    in_swarm: Vec<Option<usize>>,
    state: Vec<State>,
    window: usize,
    /// Wants some parent may hold, to try on parents first.
    candidates: VecDeque<usize>,
    arrivals_seen: usize,
    by_swarm_index: HashMap<usize, usize>,
    peers_running: usize,
    below_running: usize,
    /// When a request last started or finished.
    last_progress: Instant,
}

impl Scheduler {
    fn new(swarm: Arc<Swarm>, inner: Arc<dyn ChunkFetch>, wants: Vec<Want>, window: usize) -> Self {
        let in_swarm: Vec<Option<usize>> = wants.iter().map(|(d, _)| swarm.index_of(d)).collect();
        let by_swarm_index = in_swarm
            .iter()
            .enumerate()
            .filter_map(|(w, i)| Some(((*i)?, w)))
            .collect();
        Scheduler {
            state: vec![State::Pending; wants.len()],
            swarm,
            inner,
            wants,
            in_swarm,
            window,
            candidates: VecDeque::new(),
            arrivals_seen: 0,
            by_swarm_index,
            peers_running: 0,
            below_running: 0,
            last_progress: Instant::now(),
        }
    }

    async fn run(mut self, tx: mpsc::Sender<Result<(Digest, Fetched)>>) {
        let mut order = RegistryOrder::new(self.wants.len(), self.swarm.seat());
        let mut remaining = self.wants.len();
        let mut running: FuturesUnordered<BoxFuture<'static, Finished>> = FuturesUnordered::new();
        while remaining > 0 {
            self.learn_arrivals();
            self.start_on_parents(&mut running);
            self.start_below(&mut order, &mut running);
            let finished = if running.is_empty() {
                // Every pending chunk is held by a busy or paused parent.
                tokio::select! {
                    _ = self.swarm.changed() => None,
                    _ = tokio::time::sleep(IDLE_TICK) => None,
                }
            } else {
                tokio::select! {
                    f = running.next() => f,
                    _ = self.swarm.changed() => None,
                    _ = tokio::time::sleep(IDLE_TICK) => None,
                }
            };
            let Some(finished) = finished else { continue };
            match self.settle(finished) {
                Some(Ok(item)) => {
                    remaining -= 1;
                    if tx.send(Ok(item)).await.is_err() {
                        return;
                    }
                }
                Some(Err(e)) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
                None => {}
            }
        }
    }

    fn learn_arrivals(&mut self) {
        let (new, seen) = self.swarm.arrivals_since(self.arrivals_seen);
        self.arrivals_seen = seen;
        for i in new {
            if let Some(&w) = self.by_swarm_index.get(&(i as usize)) {
                if self.state[w] == State::Pending {
                    self.candidates.push_back(w);
                }
            }
        }
    }

    fn start_on_parents(&mut self, running: &mut FuturesUnordered<BoxFuture<'static, Finished>>) {
        let limit = self.window.max(PER_PARENT);
        let mut busy = Vec::new();
        while self.peers_running < limit {
            let Some(w) = self.candidates.pop_front() else {
                break;
            };
            let Some(i) = self.in_swarm[w].filter(|_| self.state[w] == State::Pending) else {
                continue;
            };
            let Some(lease) = self.swarm.lease(i, PER_PARENT) else {
                if self.swarm.held_by_a_parent(i) {
                    busy.push(w);
                }
                continue;
            };
            self.state[w] = State::Running;
            self.peers_running += 1;
            self.last_progress = Instant::now();
            let (swarm, file) = (self.swarm.clone(), self.wants[w].1.clone());
            running.push(
                async move {
                    let got = fetch_from_parent(&swarm, &lease, i, BULK_PEER_WAIT, &file).await;
                    Finished::Peer(w, lease.name, got)
                }
                .boxed(),
            );
        }
        self.candidates.extend(busy);
    }

    /// Registry (and direct URL) fetches, for chunks no parent holds, with this
    /// node's share of the window: its stripe, or any such chunk once it has been
    /// idle for [`PATIENCE`].
    fn start_below(
        &mut self,
        order: &mut RegistryOrder,
        running: &mut FuturesUnordered<BoxFuture<'static, Finished>>,
    ) {
        let members = self.swarm.members().max(1);
        let seat = self.swarm.seat() as usize % members;
        let patient =
            self.peers_running + self.below_running > 0 || self.last_progress.elapsed() < PATIENCE;
        let share = (self.window / members).clamp(1, self.window);
        let held = self.swarm.held_by_parents();
        while self.below_running < share {
            let may = |w: usize| {
                self.state[w] == State::Pending
                    && self.in_swarm[w].is_none_or(|i| {
                        held[i / 64] & (1 << (i % 64)) == 0 && (!patient || i % members == seat)
                    })
            };
            let Some(w) = order.next(may) else {
                break;
            };
            self.state[w] = State::Running;
            self.below_running += 1;
            let (inner, (digest, file)) = (self.inner.clone(), self.wants[w].clone());
            running.push(
                async move { Finished::Below(w, inner.fetch(digest, &file, Lane::Bulk).await) }
                    .boxed(),
            );
        }
    }

    /// Books a finished request: the chunk to hand on, an error that ends the
    /// call, or `None` (a parent failed: the chunk is pending again).
    fn settle(&mut self, finished: Finished) -> Option<Result<(Digest, Fetched)>> {
        self.last_progress = Instant::now();
        let (w, result) = match finished {
            Finished::Peer(w, node, got) => {
                self.peers_running -= 1;
                let fetched = got.ok().map(|(content, object_bytes)| Fetched {
                    content,
                    origin: Origin::Peer { node, object_bytes },
                });
                let Some(fetched) = fetched else {
                    self.state[w] = State::Pending;
                    self.candidates.push_back(w);
                    return None;
                };
                (w, Ok(fetched))
            }
            Finished::Below(w, got) => {
                self.below_running -= 1;
                (w, got)
            }
        };
        self.state[w] = State::Done;
        if self.in_swarm[w].is_some() {
            self.swarm.got_one();
        }
        Some(result.map(|f| (self.wants[w].0, f)))
    }
}

/// Asks a parent for chunk `i` (a lease from [`Swarm::lease`]), waiting at most
/// `wait`, and verifies what it sends; gives the lease back with the outcome.
async fn fetch_from_parent(
    swarm: &Swarm,
    lease: &Lease,
    i: usize,
    wait: Duration,
    file: &str,
) -> Result<(Bytes, u64)> {
    let digest = swarm.digest(i);
    let asked = tokio::time::timeout(wait, lease.client.get_chunk(digest)).await;
    let object = match asked {
        Ok(Ok(object)) => object,
        Ok(Err(e)) => {
            let outcome = match &e {
                ClientError::NotFound(_) => Outcome::Missing,
                e => Outcome::Failed(e.to_string()),
            };
            swarm.finished(lease, i, outcome);
            return Err(e);
        }
        Err(_) => {
            let why = format!("no answer within {wait:?}");
            swarm.finished(lease, i, Outcome::Failed(why.clone()));
            return Err(ClientError::Unreachable {
                url: lease.client.url().to_string(),
                reason: why,
            });
        }
    };
    let object_bytes = object.len() as u64;
    match verify_object(digest, object, file).await {
        Ok(content) => {
            swarm.finished(lease, i, Outcome::Ok);
            Ok((content, object_bytes))
        }
        Err(e) => {
            swarm.finished(
                lease,
                i,
                Outcome::Corrupt(format!("sent chunk {digest} that does not verify ({e})")),
            );
            Err(e)
        }
    }
}
