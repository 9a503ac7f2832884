//! Draining for shutdown (SIGTERM): finish the pushes in flight, take no new ones.
//!
//! A push is several calls (`BeginPush`, `FindMissingChunks`, `PutChunks`,
//! `PutManifest`) on one lease. While draining, `BeginPush` is refused with
//! UNAVAILABLE (the client's error says to retry; behind a Service another instance
//! takes it), and every other call keeps working, so a push that began before the
//! signal commits. The server stops once no push that began here is open, or when
//! the grace period ends, whichever is first; a push still open then is abandoned
//! like any interrupted push (its lease expires; nothing half-written is visible).

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;

use crate::error::{RegistryError, Result};

/// The pushes open on this instance, and whether it is draining.
#[derive(Default)]
pub struct Drain {
    draining: AtomicBool,
    open: Mutex<HashSet<String>>,
    changed: Notify,
}

impl Drain {
    /// Refuses a new push while draining.
    pub fn admit_push(&self) -> Result<()> {
        if self.draining.load(Ordering::SeqCst) {
            return Err(RegistryError::Draining);
        }
        Ok(())
    }

    /// A push began on `lease`.
    pub fn opened(&self, lease: &str) {
        self.open.lock().unwrap().insert(lease.to_string());
    }

    /// The push on `lease` committed (or can no longer commit).
    pub fn closed(&self, lease: &str) {
        if self.open.lock().unwrap().remove(lease) {
            self.changed.notify_waiters();
        }
    }

    pub fn open_pushes(&self) -> usize {
        self.open.lock().unwrap().len()
    }

    /// Stops admitting pushes, then waits until none is open or `grace` has passed;
    /// returns how many were still open.
    pub async fn drain(&self, grace: Duration) -> usize {
        self.draining.store(true, Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            let changed = self.changed.notified();
            let open = self.open_pushes();
            if open == 0 {
                return 0;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return self.open_pushes();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn waits_for_open_pushes_and_refuses_new_ones() {
        let drain = Arc::new(Drain::default());
        drain.admit_push().unwrap();
        drain.opened("a");
        let d = drain.clone();
        let waiting = tokio::spawn(async move { d.drain(Duration::from_secs(30)).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(matches!(drain.admit_push(), Err(RegistryError::Draining)));
        assert!(!waiting.is_finished(), "drain returned with a push open");
        drain.closed("a");
        assert_eq!(waiting.await.unwrap(), 0);
    }

    #[tokio::test]
    async fn gives_up_after_the_grace_period() {
        let drain = Drain::default();
        drain.opened("stuck");
        let left = drain.drain(Duration::from_millis(100)).await;
        assert_eq!(left, 1);
    }
}
