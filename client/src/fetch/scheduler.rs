//! The fetch scheduler: one budget per restore, shared by every reader of its chunks.
//!
//! A restore has four readers that want chunks at once: CRIU's page stream (each file
//! a window ahead of CRIU), the device-memory segments of a CUDA image, the weights
//! fill of separated mode, and the read-ahead of the whole image in the order CRIU
//! asks for it. Left alone they each keep their own window in flight and slow each
//! other down. The scheduler sits on top of the stack (above the node cache) and
//! gives all of them one budget:
//!
//! ```text
//!   reader ─fetch(digest, priority)─▶ Scheduler
//!      already in flight? ─▶ wait for that fetch (a Demand never waits behind a
//!                            lower-priority fetch that has not started: it fetches too)
//!      else ─▶ a permit, highest priority first (FIFO within one) ─▶ layer below,
//!              a Demand on the urgent lane (its own connection), the rest on the bulk
//! ```
//!
//! Budget: `permits` fetches in flight. Chunks are at most the manifest's max chunk
//! size, so bytes in flight are at most `permits × max chunk`; [`Budget::for_chunks`]
//! sizes the permits from a byte budget. What a fetch returns is verified by the layers
//! below and stored in the node cache by [`super::node_cache`] on its way up, so a
//! read-ahead leaves the chunk where CRIU's file task finds it (and splices it).
//! Verification and decompression run on tokio's blocking pool, on every core.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use snapreg_proto::Digest;
use tokio::sync::{oneshot, watch};

use super::{ChunkFetch, Fetched, Lane, Origin};
use crate::error::Result;

/// Who wants a chunk, most urgent first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Priority {
    /// A reader is blocked on it now: CRIU's next bytes, a pagemap being planned.
    Demand,
    /// Device memory of a CUDA image: the CUDA restore copies it first.
    DeviceMemory,
    /// The weights fill of separated mode.
    Weights,
    /// The rest of the image, in the order CRIU will ask for it.
    ReadAhead,
}

/// How much one restore may have in flight.
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    /// Chunk fetches in flight, all readers together.
    pub requests: usize,
}

impl Budget {
    /// At most `requests` fetches and `bytes` in flight for chunks of at most
    /// `max_chunk` bytes.
    pub fn for_chunks(requests: usize, bytes: u64, max_chunk: u64) -> Budget {
        let by_bytes = (bytes / max_chunk.max(1)) as usize;
        Budget {
            requests: requests.min(by_bytes).max(1),
        }
    }
}

/// What the scheduler did, for the restore's report.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct SchedulerStats {
    /// Fetches that went below the scheduler.
    pub fetches: u64,
    /// Requests answered by a fetch already in flight for the same chunk.
    pub joined: u64,
    /// The most fetches in flight at once.
    pub peak_in_flight: u64,
}

pub struct Scheduler {
    inner: Arc<dyn ChunkFetch>,
    budget: Budget,
    permits: Arc<Permits>,
    in_flight: Mutex<HashMap<Digest, Arc<Slot>>>,
    fetches: AtomicU64,
    joined: AtomicU64,
}

/// One chunk being fetched: `started` once its fetch holds a permit; `done` carries
/// the result to the requests that joined it (`None`: failed or cancelled; a joiner
/// then fetches for itself and gets the error with its own context).
struct Slot {
    started: AtomicBool,
    done: watch::Sender<Option<Option<Fetched>>>,
}

impl Scheduler {
    pub fn over(inner: Arc<dyn ChunkFetch>, budget: Budget) -> Arc<Scheduler> {
        Arc::new(Scheduler {
            inner,
            budget,
            permits: Permits::new(budget.requests),
            in_flight: Mutex::default(),
            fetches: AtomicU64::new(0),
            joined: AtomicU64::new(0),
        })
    }

    pub fn budget(&self) -> Budget {
        self.budget
    }

    pub fn stats(&self) -> SchedulerStats {
        SchedulerStats {
            fetches: self.fetches.load(Relaxed),
            joined: self.joined.load(Relaxed),
            peak_in_flight: self.permits.peak.load(Relaxed),
        }
    }

    /// One chunk at `priority`, verified; shares a fetch already in flight for it.
    pub async fn fetch(&self, digest: Digest, file: &str, priority: Priority) -> Result<Fetched> {
        let (slot, owner) = self.slot(digest);
        if !owner && (priority != Priority::Demand || slot.started.load(Relaxed)) {
            let mut done = slot.done.subscribe();
            if let Ok(result) = done.wait_for(Option::is_some).await {
                if let Some(Some(fetched)) = result.clone() {
                    self.joined.fetch_add(1, Relaxed);
                    return Ok(Fetched {
                        origin: Origin::Joined,
                        ..fetched
                    });
                }
            }
            // The fetch we waited for failed: ask again, and own the error.
            return self.fetch_below(digest, file, priority, None).await;
        }
        self.fetch_below(digest, file, priority, Some(slot)).await
    }

    /// The slot of `digest`, and whether this request made it (and must fill it).
    fn slot(&self, digest: Digest) -> (Arc<Slot>, bool) {
        let mut in_flight = self.in_flight.lock().unwrap();
        if let Some(slot) = in_flight.get(&digest) {
            return (slot.clone(), false);
        }
        let slot = Arc::new(Slot {
            started: AtomicBool::new(false),
            done: watch::channel(None).0,
        });
        in_flight.insert(digest, slot.clone());
        (slot, true)
    }

    async fn fetch_below(
        &self,
        digest: Digest,
        file: &str,
        priority: Priority,
        slot: Option<Arc<Slot>>,
    ) -> Result<Fetched> {
        // Filled with "failed" if this future is dropped before it finishes, so that
        // no joiner waits forever on a cancelled read-ahead.
        let mut guard = slot.map(|slot| SlotGuard {
            scheduler: self,
            digest,
            slot,
            result: None,
        });
        let _permit = self.permits.acquire(priority).await;
        if let Some(g) = &guard {
            if let Some(Some(fetched)) = g.slot.done.borrow().clone() {
                // A Demand fetched it while this request waited for its permit.
                return Ok(fetched);
            }
            g.slot.started.store(true, Relaxed);
        }
        self.fetches.fetch_add(1, Relaxed);
        let lane = match priority {
            Priority::Demand => Lane::Urgent,
            _ => Lane::Bulk,
        };
        let result = self.inner.fetch(digest, file, lane).await;
        if let (Some(g), Ok(fetched)) = (&mut guard, &result) {
            g.result = Some(fetched.clone());
        }
        result
    }
}

struct SlotGuard<'a> {
    scheduler: &'a Scheduler,
    digest: Digest,
    slot: Arc<Slot>,
    result: Option<Fetched>,
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        let result = self.result.take();
        self.slot.done.send_if_modified(|done| {
            // Two owners (a Demand beside a waiting read-ahead): the first result stays.
            if matches!(done, Some(Some(_))) {
                return false;
            }
            *done = Some(result);
            true
        });
        let mut in_flight = self.scheduler.in_flight.lock().unwrap();
        if in_flight
            .get(&self.digest)
            .is_some_and(|s| Arc::ptr_eq(s, &self.slot))
        {
            in_flight.remove(&self.digest);
        }
    }
}

/// A counting semaphore that hands freed permits to the most urgent waiter first
/// (FIFO within one priority). tokio's Semaphore is FIFO only; no maintained crate
/// offers a priority semaphore, and this one is forty lines.
struct Permits {
    state: Mutex<PermitState>,
    peak: AtomicU64,
}

struct PermitState {
    free: usize,
    total: usize,
    waiting: BTreeMap<(Priority, u64), oneshot::Sender<Permit>>,
    next: u64,
}

/// One fetch's right to be in flight; handed to the next waiter when dropped.
struct Permit {
    permits: Option<Arc<Permits>>,
}

impl Permits {
    fn new(total: usize) -> Arc<Permits> {
        Arc::new(Permits {
            state: Mutex::new(PermitState {
                free: total,
                total,
                waiting: BTreeMap::new(),
                next: 0,
            }),
            peak: AtomicU64::new(0),
        })
    }

    async fn acquire(self: &Arc<Self>, priority: Priority) -> Permit {
        let waiting = {
            let mut state = self.state.lock().unwrap();
            if state.free > 0 {
                state.free -= 1;
                let in_use = (state.total - state.free) as u64;
                self.peak.fetch_max(in_use, Relaxed);
                return Permit {
                    permits: Some(self.clone()),
                };
            }
            let (tx, rx) = oneshot::channel();
            let key = (priority, state.next);
            state.next += 1;
            state.waiting.insert(key, tx);
            rx
        };
        // A waiter dropped after being handed a permit drops the permit with it, which
        // passes it on; one dropped before is skipped by `release`.
        match waiting.await {
            Ok(permit) => permit,
            Err(_) => unreachable!("the sender is only dropped after a failed send"),
        }
    }

    fn release(self: &Arc<Self>) {
        loop {
            let next = {
                let mut state = self.state.lock().unwrap();
                match state.waiting.pop_first() {
                    Some((_, tx)) => tx,
                    None => {
                        state.free += 1;
                        return;
                    }
                }
            };
            match next.send(Permit {
                permits: Some(self.clone()),
            }) {
                Ok(()) => return,
                // That waiter is gone: the permit goes to the next one.
                Err(mut unsent) => unsent.permits = None,
            }
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(permits) = self.permits.take() {
            permits.release();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;
    use futures::future::BoxFuture;
    use futures::FutureExt;

    use super::*;

    /// A bottom layer that records the order fetches reach it (and the lane each
    /// takes) and holds each one until the test lets it go.
    struct Gate {
        order: Mutex<Vec<Digest>>,
        lanes: Mutex<Vec<(Digest, Lane)>>,
        open: tokio::sync::Semaphore,
    }

    impl ChunkFetch for Gate {
        fn fetch<'a>(
            &'a self,
            digest: Digest,
            _: &'a str,
            lane: Lane,
        ) -> BoxFuture<'a, Result<Fetched>> {
            async move {
                self.order.lock().unwrap().push(digest);
                self.lanes.lock().unwrap().push((digest, lane));
                self.open.acquire().await.unwrap().forget();
                Ok(Fetched {
                    content: Bytes::from(digest.to_hex()),
                    origin: Origin::Registry {
                        url: "gate".into(),
                        object_bytes: 64,
                    },
                })
            }
            .boxed()
        }
    }

    fn gate() -> Arc<Gate> {
        Arc::new(Gate {
            order: Mutex::default(),
            lanes: Mutex::default(),
            open: tokio::sync::Semaphore::new(0),
        })
    }

    fn d(i: u8) -> Digest {
        Digest::of(&[i])
    }

    async fn settle() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    #[tokio::test]
    async fn freed_permits_go_to_the_most_urgent_waiter_and_only_demands_take_the_urgent_lane() {
        let below = gate();
        let s = Scheduler::over(below.clone(), Budget { requests: 1 });
        let mut tasks = tokio::task::JoinSet::new();
        // One read-ahead holds the only permit; more read-ahead, then a demand, wait.
        for (i, p) in [
            (1, Priority::ReadAhead),
            (2, Priority::ReadAhead),
            (3, Priority::Weights),
            (4, Priority::Demand),
        ] {
            let s = s.clone();
            tasks.spawn(async move { s.fetch(d(i), "f", p).await.map(|_| ()) });
            settle().await;
        }
        below.open.add_permits(4);
        while let Some(r) = tasks.join_next().await {
            r.unwrap().unwrap();
        }
        let order = below.order.lock().unwrap().clone();
        assert_eq!(order, vec![d(1), d(4), d(3), d(2)]);
        // Only the demand takes the urgent lane (a connection of its own below).
        let lanes = below.lanes.lock().unwrap().clone();
        assert_eq!(
            lanes,
            vec![
                (d(1), Lane::Bulk),
                (d(4), Lane::Urgent),
                (d(3), Lane::Bulk),
                (d(2), Lane::Bulk)
            ]
        );
        assert_eq!(s.stats().peak_in_flight, 1);
        assert_eq!(s.stats().fetches, 4);
    }

    #[tokio::test]
    async fn a_chunk_in_flight_is_fetched_once_for_every_reader() {
        let below = gate();
        let s = Scheduler::over(below.clone(), Budget { requests: 4 });
        let first = tokio::spawn({
            let s = s.clone();
            async move { s.fetch(d(7), "f", Priority::ReadAhead).await }
        });
        settle().await;
        let second = tokio::spawn({
            let s = s.clone();
            async move { s.fetch(d(7), "f", Priority::Demand).await }
        });
        settle().await;
        below.open.add_permits(1);
        let (a, b) = (
            first.await.unwrap().unwrap(),
            second.await.unwrap().unwrap(),
        );
        assert_eq!(a.content, b.content);
        assert_eq!(below.order.lock().unwrap().len(), 1);
        assert_eq!(s.stats().joined, 1);
        // Counted once: the joiner's copy says it came from another's fetch.
        assert!(matches!(a.origin, Origin::Registry { .. }), "{a:?}");
        assert!(matches!(b.origin, Origin::Joined), "{b:?}");
    }

    #[tokio::test]
    async fn a_demand_does_not_wait_behind_a_read_ahead_that_has_no_permit() {
        let below = gate();
        let s = Scheduler::over(below.clone(), Budget { requests: 1 });
        // d(1) holds the permit; a read-ahead of d(2) waits for it; then a demand of d(2).
        let holder = tokio::spawn({
            let s = s.clone();
            async move { s.fetch(d(1), "f", Priority::ReadAhead).await }
        });
        settle().await;
        let queued = tokio::spawn({
            let s = s.clone();
            async move { s.fetch(d(2), "f", Priority::ReadAhead).await }
        });
        settle().await;
        let demand = tokio::spawn({
            let s = s.clone();
            async move { s.fetch(d(2), "f", Priority::Demand).await }
        });
        settle().await;
        below.open.add_permits(1);
        holder.await.unwrap().unwrap();
        settle().await;
        // The demand got the permit; the queued read-ahead finds d(2) done and leaves.
        below.open.add_permits(1);
        demand.await.unwrap().unwrap();
        queued.await.unwrap().unwrap();
        assert_eq!(*below.order.lock().unwrap(), vec![d(1), d(2)]);
    }

    #[tokio::test]
    async fn a_cancelled_fetch_releases_its_permit_and_its_joiners() {
        let below = gate();
        let s = Scheduler::over(below.clone(), Budget { requests: 1 });
        let cancelled = tokio::spawn({
            let s = s.clone();
            async move { s.fetch(d(1), "f", Priority::ReadAhead).await }
        });
        settle().await;
        let joiner = tokio::spawn({
            let s = s.clone();
            async move { s.fetch(d(1), "f", Priority::Weights).await }
        });
        settle().await;
        cancelled.abort();
        let _ = cancelled.await;
        // The joiner fetches for itself with the permit the cancelled fetch gave back.
        below.open.add_permits(1);
        let got = tokio::time::timeout(Duration::from_secs(5), joiner)
            .await
            .expect("the joiner must not hang")
            .unwrap()
            .unwrap();
        assert_eq!(got.content, Bytes::from(d(1).to_hex()));
    }

    #[test]
    fn the_byte_budget_bounds_the_requests() {
        assert_eq!(Budget::for_chunks(64, 64 << 20, 2 << 20).requests, 32);
        assert_eq!(Budget::for_chunks(64, 1 << 30, 2 << 20).requests, 64);
        assert_eq!(Budget::for_chunks(64, 1, 2 << 20).requests, 1);
    }
}
