//! Several `snapreg` instances serving one region from one store.
//!
//! The store is the source of truth; each instance's RocksDB index is a cache of it
//! that may lag (what another instance wrote) or run ahead (what another instance's
//! GC deleted). How each is closed:
//!
//! | the index of instance A lacks or misstates | closed by |
//! |---|---|
//! | a chunk or manifest B stored | FindMissingChunks, PutManifest and GetManifest look in the store (HEAD) before calling it missing, and index what they find |
//! | a tag B moved | tag reads list the tag's records newer than A's current one (`list` from an offset: one request) and fold them in; `ls` lists the repository's or all records |
//! | objects B's GC deleted | B writes a sweep log (`sweeps/<ms>-<instance>`, the digests it may delete) before deleting; A applies unseen logs at every BeginPush, before it answers which chunks exist |
//! | B's GC racing A's push | store leases: a push lease is an object (`leases/<instance>/push-<id>`) written at BeginPush, removed at commit; GC writes `leases/<instance>/gc` first and then lists: a live lease of another instance makes it give up ("retry"); BeginPush lists after writing: a live GC lock of another instance makes it wait (up to `GC_WAIT`). Write-then-list on both sides means at least one sees the other (S3 lists are read-after-write consistent) |
//!
//! Within one instance the finer-grained machinery of gc.rs (per-digest leases under
//! stripe locks, `gc_committed`) still applies, so GC on an instance never waits for
//! its own pushes. Node-local (never in the store, lost with the data dir, harmless):
//! the per-digest lease entries, the replication log and peer cursors, node agent
//! registrations, and which sweep logs were applied.
//!
//! Leases of an instance that crashed stay live until they expire (`--lease-ttl`)
//! and hold off other instances' GC until then. An instance's name is kept in its data
//! directory (`instance-id`), which RocksDB's lock gives to one process at a time: a
//! restarted instance drops the GC lock its previous run left (that GC is dead), so a
//! crash mid-GC does not hold off the next GC for a whole `--lease-ttl`.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use snapreg_proto::Digest;

use crate::chunk_store::ChunkStore;
use crate::clock::now_ms;
use crate::error::{RegistryError, Result};
use crate::index::{Index, RebuildStats};

pub const LEASES: &str = "leases";
pub const SWEEPS: &str = "sweeps";

/// How long BeginPush waits for another instance's GC to finish before refusing.
const GC_WAIT: Duration = Duration::from_secs(300);
const GC_POLL: Duration = Duration::from_millis(200);

pub struct SharedStore {
    /// This process's name in lease and sweep-log objects.
    instance: String,
    /// Expiry last written to each store lease of this instance: a lease object is
    /// rewritten only when half of its lifetime is spent, not on every call.
    written: std::sync::Mutex<HashMap<String, u64>>,
}

impl SharedStore {
    /// The instance whose data directory is `dir`: its name is read from
    /// `dir/instance-id`, created on first start.
    pub fn for_data_dir(dir: &std::path::Path) -> std::io::Result<Self> {
        let path = dir.join("instance-id");
        let instance = match std::fs::read_to_string(&path) {
            Ok(s) if !s.trim().is_empty() => s.trim().to_string(),
            _ => {
                let fresh = format!("{:016x}", rand::random::<u64>());
                std::fs::create_dir_all(dir)?;
                std::fs::write(&path, &fresh)?;
                fresh
            }
        };
        Ok(SharedStore {
            instance,
            written: Default::default(),
        })
    }

    /// Drops the GC lock a previous run of this instance left behind.
    pub async fn clear_stale_gc_lock(&self, store: &ChunkStore) -> Result<()> {
        store.delete_raw(&self.lease_path("gc")).await
    }
}

impl Default for SharedStore {
    fn default() -> Self {
        SharedStore {
            instance: format!("{:016x}", rand::random::<u64>()),
            written: Default::default(),
        }
    }
}

/// A live lease of some instance, as listed from the store.
struct Listed {
    instance: String,
    name: String,
    expires_ms: u64,
}

impl SharedStore {
    fn lease_path(&self, name: &str) -> String {
        format!("{LEASES}/{}/{name}", self.instance)
    }

    async fn write_lease(&self, store: &ChunkStore, name: &str, ttl: Duration) -> Result<()> {
        let expires = now_ms() + ttl.as_millis() as u64;
        store
            .put_raw(&self.lease_path(name), Bytes::from(expires.to_string()))
            .await?;
        self.written
            .lock()
            .unwrap()
            .insert(name.to_string(), expires);
        Ok(())
    }

    /// Live leases of other instances.
    async fn foreign_leases(&self, store: &ChunkStore) -> Result<Vec<Listed>> {
        let now = now_ms();
        let mut out = Vec::new();
        for meta in store.list(LEASES).await? {
            let path = meta.location.as_ref();
            let mut parts = path.split('/').skip(1);
            let (Some(instance), Some(name)) = (parts.next(), parts.next()) else {
                continue;
            };
            if instance == self.instance {
                continue;
            }
            let Some(body) = store.get_raw(path).await? else {
                continue; // ended meanwhile
            };
            let expires_ms = String::from_utf8_lossy(&body).trim().parse().unwrap_or(0);
            if expires_ms > now {
                out.push(Listed {
                    instance: instance.to_string(),
                    name: name.to_string(),
                    expires_ms,
                });
            } else {
                // Expired (its instance died): tidy up; nothing relies on it.
                store.delete_raw(path).await?;
            }
        }
        Ok(out)
    }

    /// Publishes push lease `id` (BeginPush, SetTag), waiting out another instance's
    /// GC first, then applies the sweep logs that GC left.
    pub async fn begin_push(
        &self,
        store: &ChunkStore,
        index: &Index,
        id: &str,
        ttl: Duration,
    ) -> Result<()> {
        let name = format!("push-{id}");
        self.write_lease(store, &name, ttl).await?;
        let started = std::time::Instant::now();
        loop {
            let gcs: Vec<Listed> = self
                .foreign_leases(store)
                .await?
                .into_iter()
                .filter(|l| l.name == "gc")
                .collect();
            let Some(gc) = gcs.first() else { break };
            if started.elapsed() > GC_WAIT {
                self.end(store, id).await?;
                return Err(RegistryError::Busy(format!(
                    "garbage collection on instance {} has held the store for over {GC_WAIT:?} (its lock expires at unix ms {}); retry the push later",
                    gc.instance, gc.expires_ms
                )));
            }
            tokio::time::sleep(GC_POLL).await;
        }
        self.catch_up(store, index).await?;
        Ok(())
    }

    /// Keeps push lease `id` alive in the store while the push is active.
    pub async fn refresh(&self, store: &ChunkStore, id: &str, ttl: Duration) -> Result<()> {
        self.refresh_named(store, &format!("push-{id}"), ttl).await
    }

    /// Keeps the GC lock alive while a long sweep runs.
    pub async fn refresh_gc(&self, store: &ChunkStore, ttl: Duration) -> Result<()> {
        self.refresh_named(store, "gc", ttl).await
    }

    async fn refresh_named(&self, store: &ChunkStore, name: &str, ttl: Duration) -> Result<()> {
        let due = self
            .written
            .lock()
            .unwrap()
            .get(name)
            .is_none_or(|exp| exp.saturating_sub(now_ms()) < ttl.as_millis() as u64 / 2);
        if due {
            self.write_lease(store, name, ttl).await?;
        }
        Ok(())
    }

    /// Ends push lease `id` (commit, or a refused begin).
    pub async fn end(&self, store: &ChunkStore, id: &str) -> Result<()> {
        let name = format!("push-{id}");
        self.written.lock().unwrap().remove(&name);
        store.delete_raw(&self.lease_path(&name)).await
    }

    /// Takes the store-wide GC lock; refuses while another instance holds a push
    /// lease or the GC lock. Release with [`SharedStore::unlock_gc`].
    pub async fn lock_gc(&self, store: &ChunkStore, ttl: Duration) -> Result<()> {
        self.write_lease(store, "gc", ttl).await?;
        let others = self.foreign_leases(store).await?;
        if let Some(l) = others.first() {
            self.unlock_gc(store).await?;
            let what = if l.name == "gc" {
                "is collecting garbage".to_string()
            } else {
                format!("holds a push lease ({})", l.name)
            };
            return Err(RegistryError::Busy(format!(
                "instance {} {what} on this store until unix ms {} at the latest ({} other lease(s) live); retry GC when pushes on other instances have committed",
                l.instance,
                l.expires_ms,
                others.len()
            )));
        }
        Ok(())
    }

    pub async fn unlock_gc(&self, store: &ChunkStore) -> Result<()> {
        self.written.lock().unwrap().remove("gc");
        store.delete_raw(&self.lease_path("gc")).await
    }

    /// Records, before GC deletes them, chunks and manifests it may delete, so other
    /// instances drop them from their indexes. Marked applied here.
    pub async fn log_sweep(
        &self,
        store: &ChunkStore,
        index: &Index,
        chunks: &[Digest],
        manifests: &[Digest],
    ) -> Result<()> {
        if chunks.is_empty() && manifests.is_empty() {
            return Ok(());
        }
        let name = format!("{SWEEPS}/{:016x}-{}", now_ms(), self.instance);
        let mut body = String::new();
        for (kind, ds) in [("c", chunks), ("m", manifests)] {
            for d in ds {
                body.push_str(&format!("{kind} {}\n", d.to_hex()));
            }
        }
        store.put_raw(&name, Bytes::from(body)).await?;
        index.mark_sweep_applied(&name)?;
        Ok(())
    }

    /// Applies every sweep log this index has not seen: its digests leave the index
    /// (a digest that is in fact still stored is found again by a store lookup).
    pub async fn catch_up(&self, store: &ChunkStore, index: &Index) -> Result<usize> {
        let mut applied = 0;
        for meta in store.list(SWEEPS).await? {
            let name = meta.location.as_ref();
            if index.sweep_applied(name)? {
                continue;
            }
            let body = store.get_raw(name).await?.unwrap_or_default();
            for line in String::from_utf8_lossy(&body).lines() {
                let Some((kind, hex)) = line.split_once(' ') else {
                    continue;
                };
                let Ok(d) = Digest::from_hex(hex) else {
                    continue;
                };
                match kind {
                    "c" => index.remove_chunk(&d)?,
                    "m" => index.remove_manifest(&d)?,
                    _ => {}
                }
            }
            index.mark_sweep_applied(name)?;
            applied += 1;
        }
        if applied > 0 {
            tracing::info!(applied, "applied sweep logs of other instances' GC");
        }
        Ok(applied)
    }

    /// Marks every sweep log in the store as applied (a rebuilt index lists the store
    /// after them). Called by a rebuild that holds a push lease, so no GC runs meanwhile.
    async fn mark_all_applied(&self, store: &ChunkStore, index: &Index) -> Result<()> {
        for meta in store.list(SWEEPS).await? {
            index.mark_sweep_applied(meta.location.as_ref())?;
        }
        Ok(())
    }
}

/// Rebuilds `index` from `store` ([`Index::rebuild`]) under a push lease of a one-off
/// instance name, so no other instance's GC deletes what the rebuild is listing; the
/// sweep logs already in the store count as applied, since the listing comes after them.
pub async fn rebuild_index(store: &ChunkStore, index: &Index) -> Result<RebuildStats> {
    let shared = SharedStore::default();
    let lease = "reindex";
    shared
        .begin_push(store, index, lease, Duration::from_secs(3600))
        .await?;
    let result = async {
        shared.mark_all_applied(store, index).await?;
        index.rebuild(store).await
    }
    .await;
    shared.end(store, lease).await?;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, ChunkStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(None, dir.path().join("store")).unwrap();
        (dir, store)
    }

    fn index(dir: &tempfile::TempDir, name: &str) -> Index {
        Index::open(&dir.path().join(name)).unwrap()
    }

    const TTL: Duration = Duration::from_secs(60);

    #[tokio::test]
    async fn gc_waits_for_another_instances_push() {
        let (dir, store) = store();
        let (a, b) = (SharedStore::default(), SharedStore::default());
        a.begin_push(&store, &index(&dir, "a"), "p1", TTL)
            .await
            .unwrap();
        match b.lock_gc(&store, TTL).await {
            Err(RegistryError::Busy(why)) => assert!(why.contains("push-p1"), "{why}"),
            other => panic!("expected Busy, got {other:?}"),
        }
        // Refused GC leaves no lock behind; once the push ends, GC may run.
        a.end(&store, "p1").await.unwrap();
        b.lock_gc(&store, TTL).await.unwrap();
        // ...and a GC of this very instance never blocks its own pushes.
        b.begin_push(&store, &index(&dir, "b"), "p2", TTL)
            .await
            .unwrap();
        b.unlock_gc(&store).await.unwrap();
        a.lock_gc(&store, TTL).await.unwrap_err();
    }

    #[tokio::test]
    async fn sweep_logs_reach_other_instances_once() {
        let (dir, store) = store();
        let (a, b) = (SharedStore::default(), SharedStore::default());
        let (ia, ib) = (index(&dir, "a"), index(&dir, "b"));
        let (c, m) = (Digest::of(b"c"), Digest::of(b"m"));
        for ix in [&ia, &ib] {
            ix.add_chunk(&c, 1).unwrap();
            ix.add_manifest(&m, 1).unwrap();
        }
        a.log_sweep(&store, &ia, &[c], &[m]).await.unwrap();
        // The writer has applied its own log; the other instance applies it once.
        assert_eq!(a.catch_up(&store, &ia).await.unwrap(), 0);
        assert_eq!(b.catch_up(&store, &ib).await.unwrap(), 1);
        assert!(!ib.has_chunk(&c).unwrap() && !ib.has_manifest(&m).unwrap());
        assert_eq!(b.catch_up(&store, &ib).await.unwrap(), 0);
        // Nothing to log, nothing written.
        a.log_sweep(&store, &ia, &[], &[]).await.unwrap();
        assert_eq!(store.list(SWEEPS).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_rebuilt_index_counts_old_sweep_logs_as_applied() {
        let (dir, store) = store();
        let writer = SharedStore::default();
        writer
            .log_sweep(&store, &index(&dir, "w"), &[Digest::of(b"gone")], &[])
            .await
            .unwrap();
        let kept = Digest::of(b"kept");
        store
            .put_chunk(&kept, Bytes::from_static(b"k"))
            .await
            .unwrap();
        let fresh = index(&dir, "fresh");
        let stats = rebuild_index(&store, &fresh).await.unwrap();
        assert_eq!(stats.chunks, 1);
        assert!(fresh.has_chunk(&kept).unwrap());
        assert_eq!(
            SharedStore::default()
                .catch_up(&store, &fresh)
                .await
                .unwrap(),
            0
        );
        // The rebuild's own lease is gone: GC may run.
        writer.lock_gc(&store, TTL).await.unwrap();
    }

    #[test]
    fn an_instance_keeps_its_name_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let first = SharedStore::for_data_dir(dir.path()).unwrap();
        let again = SharedStore::for_data_dir(dir.path()).unwrap();
        assert_eq!(first.instance, again.instance);
        assert_eq!(
            first.lease_path("gc"),
            format!("{LEASES}/{}/gc", first.instance)
        );
    }
}
