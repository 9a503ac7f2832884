//! Transfer counters, and progress events for whoever shows them.
//!
//! The library draws nothing: a [`Progress`] forwards its events to the
//! [`ProgressObserver`] its caller set (snapctl's draws a bar on a terminal), so an
//! embedding program decides what the user sees. A hidden one only counts.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

/// Counters every transfer reports (DESIGN's JSON contract).
#[derive(Debug, Default)]
pub struct Counters {
    /// Logical bytes of every file (zero runs included).
    pub bytes_total: AtomicU64,
    /// Bytes that crossed the network (chunk objects as stored, i.e. compressed).
    pub bytes_transferred: AtomicU64,
    /// Distinct chunks the snapshot references.
    pub chunks_total: AtomicU64,
    /// Chunks sent to (push) or fetched from (pull) a registry.
    pub chunks_transferred: AtomicU64,
    /// Chunks served by the node cache.
    pub chunks_cached: AtomicU64,
    /// Logical bytes in zero runs (never stored, never sent).
    pub zero_bytes: AtomicU64,
    /// Of the chunks and bytes transferred, those that came from sibling nodes.
    pub chunks_from_peers: AtomicU64,
    pub bytes_from_peers: AtomicU64,
    /// Of the chunks and bytes transferred, those read from the object store by
    /// presigned URL (the rest came through a registry).
    pub chunks_direct: AtomicU64,
    pub bytes_direct: AtomicU64,
}

/// The counters' values at one moment. Every field defaults to 0 when read back (an
/// operation report from an older snapctl lacks the newer ones).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct CountersSnapshot {
    pub bytes_total: u64,
    pub bytes_transferred: u64,
    pub chunks_total: u64,
    pub chunks_transferred: u64,
    pub chunks_cached: u64,
    pub zero_bytes: u64,
    pub chunks_from_peers: u64,
    pub bytes_from_peers: u64,
    pub chunks_direct: u64,
    pub bytes_direct: u64,
}

impl Counters {
    pub fn snapshot(&self) -> CountersSnapshot {
        CountersSnapshot {
            bytes_total: self.bytes_total.load(Relaxed),
            bytes_transferred: self.bytes_transferred.load(Relaxed),
            chunks_total: self.chunks_total.load(Relaxed),
            chunks_transferred: self.chunks_transferred.load(Relaxed),
            chunks_cached: self.chunks_cached.load(Relaxed),
            zero_bytes: self.zero_bytes.load(Relaxed),
            chunks_from_peers: self.chunks_from_peers.load(Relaxed),
            bytes_from_peers: self.bytes_from_peers.load(Relaxed),
            chunks_direct: self.chunks_direct.load(Relaxed),
            bytes_direct: self.bytes_direct.load(Relaxed),
        }
    }
}

/// Receives the events of one operation's [`Progress`], from any of its tasks.
pub trait ProgressObserver: Send + Sync {
    /// The operation began; `verb` names it (`push`, `restore`, …).
    fn started(&self, verb: &str);
    /// `bytes` more logical bytes are known to be coming.
    fn total_grew(&self, bytes: u64);
    /// `bytes` more logical bytes are done.
    fn advanced(&self, bytes: u64);
    /// What is being worked on now (a file name).
    fn working_on(&self, item: &str);
    /// The operation ended (successfully or not).
    fn finished(&self);
    /// Something the user must see although the operation goes on (e.g. a
    /// compatibility check that `--force` overrode).
    fn warning(&self, message: &str);
}

/// One operation's counters and progress events. Clones share both.
#[derive(Clone, Default)]
pub struct Progress {
    observer: Option<Arc<dyn ProgressObserver>>,
    pub counters: Arc<Counters>,
}

impl Progress {
    /// Reports the operation `verb` to `observer`.
    pub fn new(verb: &str, observer: Arc<dyn ProgressObserver>) -> Self {
        observer.started(verb);
        Progress {
            observer: Some(observer),
            counters: Arc::default(),
        }
    }

    /// Counts without reporting; warnings go to the log.
    pub fn hidden() -> Self {
        Progress::default()
    }

    pub fn add_total(&self, n: u64) {
        if let Some(o) = &self.observer {
            o.total_grew(n);
        }
    }

    pub fn advance(&self, n: u64) {
        if let Some(o) = &self.observer {
            o.advanced(n);
        }
    }

    /// `n` bytes of an image are in place without passing the counted fetches (a lazy
    /// restore's fill, zero pages never sent): on the bar and in `bytes_total`.
    pub fn placed(&self, n: u64) {
        self.advance(n);
        self.counters.bytes_total.fetch_add(n, Relaxed);
    }

    pub fn message(&self, m: impl Into<String>) {
        if let Some(o) = &self.observer {
            o.working_on(&m.into());
        }
    }

    pub fn finish(&self) {
        if let Some(o) = &self.observer {
            o.finished();
        }
    }

    /// A message the user must see; without an observer it is logged, not lost.
    pub fn warn(&self, msg: impl Into<String>) {
        let msg = msg.into();
        match &self.observer {
            Some(o) => o.warning(&msg),
            None => tracing::warn!("{msg}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<String>>);

    impl ProgressObserver for Recorder {
        fn started(&self, verb: &str) {
            self.0.lock().unwrap().push(format!("started {verb}"));
        }
        fn total_grew(&self, bytes: u64) {
            self.0.lock().unwrap().push(format!("total +{bytes}"));
        }
        fn advanced(&self, bytes: u64) {
            self.0.lock().unwrap().push(format!("advanced {bytes}"));
        }
        fn working_on(&self, item: &str) {
            self.0.lock().unwrap().push(format!("on {item}"));
        }
        fn finished(&self) {
            self.0.lock().unwrap().push("finished".into());
        }
        fn warning(&self, message: &str) {
            self.0.lock().unwrap().push(format!("warning {message}"));
        }
    }

    #[test]
    fn clones_report_to_the_one_observer_in_order() {
        let rec = Arc::new(Recorder::default());
        let p = Progress::new("push", rec.clone());
        let q = p.clone();
        p.add_total(10);
        q.message("a.img");
        q.advance(4);
        p.warn("careful");
        p.finish();
        assert_eq!(
            *rec.0.lock().unwrap(),
            [
                "started push",
                "total +10",
                "on a.img",
                "advanced 4",
                "warning careful",
                "finished"
            ]
        );
    }
}
