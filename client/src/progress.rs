//! Transfer counters and the progress bar on stderr (only when it is a terminal).

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

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
}

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct CountersSnapshot {
    pub bytes_total: u64,
    pub bytes_transferred: u64,
    pub chunks_total: u64,
    pub chunks_transferred: u64,
    pub chunks_cached: u64,
    pub zero_bytes: u64,
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
        }
    }
}

/// A progress bar over logical bytes, hidden unless stderr is a terminal.
#[derive(Clone)]
pub struct Progress {
    bar: ProgressBar,
    pub counters: Arc<Counters>,
}

impl Progress {
    pub fn new(verb: &str, show: bool) -> Self {
        let bar = if show && std::io::stderr().is_terminal() {
            let b = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
            b.set_style(
                ProgressStyle::with_template(
                    "{prefix:>8} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} {msg}",
                )
                .expect("static template")
                .progress_chars("=> "),
            );
            b.set_prefix(verb.to_string());
            b
        } else {
            ProgressBar::hidden()
        };
        Progress {
            bar,
            counters: Arc::default(),
        }
    }

    pub fn hidden() -> Self {
        Progress::new("", false)
    }

    pub fn add_total(&self, n: u64) {
        self.bar.inc_length(n);
    }

    pub fn advance(&self, n: u64) {
        self.bar.inc(n);
    }

    pub fn message(&self, m: impl Into<String>) {
        self.bar.set_message(m.into());
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
