//! The RocksDB index under `<data>/index`.
//!
//! ```text
//! key                                value
//! c/<32-byte digest>                 u64 LE stored object size        chunk is durable in the store
//! m/<32-byte digest>                 u64 LE manifest size             manifest is in the store
//! t/<repository>\0<tag>              tag record object name           current record (may be a tombstone)
//! l/<lease id>                       u64 LE expiry, unix ms           push lease (node-local)
//! L/<32-byte digest><lease id>       (empty)                          digest protected by a lease (node-local)
//! meta/built                         (empty)                          the index mirrors the store
//! r/<u64 BE seq>                     repo\0tag\0record object name     replication log: a local tag commit (node-local)
//! p/<peer name>                      u64 LE seq                       last log entry the peer acknowledged (node-local)
//! n/<node name>                      JSON NodeEntry (scheduler.rs)    a node agent's last registration (node-local)
//! g/<sweep log object name>          (empty)                          another instance's GC sweep log, applied (node-local)
//! ```
//!
//! Everything but `l/`, `L/`, `r/`, `p/`, `n/` and `g/` is derived from the store and
//! rebuilt by [`Index::rebuild`] (run through shared_store.rs `rebuild_index`);
//! `snapreg dump-index` prints the derived part for
//! comparison. With several instances on one store the derived part is a cache that
//! may lag the store: shared_store.rs says how each gap is closed. Leases are node-local: after a crash a push whose lease is gone
//! fails its commit with "chunks missing" if GC swept something, and retries — the
//! commit re-checks every chunk, so nothing half-made becomes visible.
//! The replication log and the peer cursors are node-local too (see replication.rs):
//! a rebuild on an empty log seeds it with every current tag record, so peers
//! converge after an index loss (re-sending what they have is harmless).
//! The log records only this registry's own commits, never replicated ones.
//! Writes on the commit path use a synced WAL.

use std::path::Path;

use rocksdb::{Direction, IteratorMode, Options, WriteBatch, WriteOptions, DB};
use snapreg_proto::layout;
use snapreg_proto::tags::{Hlc, TagRecord};
use snapreg_proto::Digest;

use crate::chunk_store::ChunkStore;
use crate::error::Result;

pub struct Index {
    db: DB,
    /// Serialises [`Index::apply_tag_record`]'s read-compare-write: a local commit and
    /// a replicated record for the same tag must not both read the old value.
    tag_apply: std::sync::Mutex<()>,
}

const BUILT: &[u8] = b"meta/built";

fn key(prefix: &[u8], rest: &[u8]) -> Vec<u8> {
    [prefix, rest].concat()
}

fn tag_key(repository: &str, tag: &str) -> Vec<u8> {
    key(b"t/", format!("{repository}\0{tag}").as_bytes())
}

/// Iterating keys under `prefix` with an upper bound, so RocksDB stops at the
/// prefix's end instead of stepping over every deleted key after it (an unbounded
/// seek into a range of tombstones, as expired lease entries leave, costs time in
/// proportion to the tombstones: GC checking each digest's leases that way was
/// quadratic, measured at ~35 objects swept a second for 20 000).
fn bounded(prefix: &[u8]) -> rocksdb::ReadOptions {
    let mut upper = prefix.to_vec();
    upper.push(0xFF);
    let mut r = rocksdb::ReadOptions::default();
    r.set_iterate_upper_bound(upper);
    r
}

/// One entry as RocksDB's iterators return it.
type KeyValue = (Box<[u8]>, Box<[u8]>);

fn synced() -> WriteOptions {
    let mut w = WriteOptions::default();
    w.set_sync(true);
    w
}

impl Index {
    /// Keys (with values) under `prefix`, in order (see [`bounded`]).
    fn keys_under<'a>(
        &'a self,
        prefix: &[u8],
    ) -> impl Iterator<Item = std::result::Result<KeyValue, rocksdb::Error>> + 'a {
        self.db.iterator_opt(
            IteratorMode::From(prefix, Direction::Forward),
            bounded(prefix),
        )
    }

    pub fn open(path: &Path) -> Result<Self> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.set_compression_type(rocksdb::DBCompressionType::None);
        Ok(Index {
            db: DB::open(&opts, path)?,
            tag_apply: std::sync::Mutex::new(()),
        })
    }

    pub fn is_built(&self) -> Result<bool> {
        Ok(self.db.get_pinned(BUILT)?.is_some())
    }

    pub fn has_chunk(&self, d: &Digest) -> Result<bool> {
        Ok(self.db.get_pinned(key(b"c/", &d.0))?.is_some())
    }

    /// Records a chunk whose object is already durable.
    pub fn add_chunk(&self, d: &Digest, stored_len: u64) -> Result<()> {
        Ok(self
            .db
            .put_opt(key(b"c/", &d.0), stored_len.to_le_bytes(), &synced())?)
    }

    pub fn remove_chunk(&self, d: &Digest) -> Result<()> {
        Ok(self.db.delete_opt(key(b"c/", &d.0), &synced())?)
    }

    /// Removes a chunk's (`is_chunk`) or manifest's entry without waiting for the
    /// disk: GC removes a batch this way, then makes them durable at once with
    /// [`Index::sync`] before deleting any object.
    pub fn remove_unsynced(&self, d: &Digest, is_chunk: bool) -> Result<()> {
        let prefix: &[u8] = if is_chunk { b"c/" } else { b"m/" };
        Ok(self.db.delete(key(prefix, &d.0))?)
    }

    /// Whether the index holds a chunk's (`is_chunk`) or manifest's entry.
    pub fn has(&self, d: &Digest, is_chunk: bool) -> Result<bool> {
        if is_chunk {
            self.has_chunk(d)
        } else {
            self.has_manifest(d)
        }
    }

    /// Makes every write so far durable (one fsync of the write-ahead log).
    pub fn sync(&self) -> Result<()> {
        Ok(self.db.flush_wal(true)?)
    }

    pub fn has_manifest(&self, d: &Digest) -> Result<bool> {
        Ok(self.db.get_pinned(key(b"m/", &d.0))?.is_some())
    }

    pub fn add_manifest(&self, d: &Digest, len: u64) -> Result<()> {
        Ok(self
            .db
            .put_opt(key(b"m/", &d.0), len.to_le_bytes(), &synced())?)
    }

    pub fn remove_manifest(&self, d: &Digest) -> Result<()> {
        Ok(self.db.delete_opt(key(b"m/", &d.0), &synced())?)
    }

    /// The current record of a tag, tombstones included.
    pub fn tag_record(&self, repository: &str, tag: &str) -> Result<Option<TagRecord>> {
        match self.db.get_pinned(tag_key(repository, tag))? {
            Some(v) => Ok(TagRecord::parse(std::str::from_utf8(&v).unwrap_or_default()).ok()),
            None => Ok(None),
        }
    }

    /// Folds a record into the index; returns whether it is now the current one.
    pub fn apply_tag_record(
        &self,
        repository: &str,
        tag: &str,
        record: &TagRecord,
    ) -> Result<bool> {
        let _serial = self.tag_apply.lock().unwrap_or_else(|e| e.into_inner());
        if self
            .tag_record(repository, tag)?
            .is_some_and(|cur| cur >= *record)
        {
            return Ok(false);
        }
        self.db
            .put_opt(tag_key(repository, tag), record.object_name(), &synced())?;
        Ok(true)
    }

    /// Every (repository, tag, current record), tombstones included.
    pub fn all_tags(&self) -> Result<Vec<(String, String, TagRecord)>> {
        let mut out = Vec::new();
        for item in self
            .db
            .iterator(IteratorMode::From(b"t/", Direction::Forward))
        {
            let (k, v) = item?;
            let Some(rest) = k.strip_prefix(b"t/") else {
                break;
            };
            let rest = String::from_utf8_lossy(rest);
            let Some((repo, tag)) = rest.split_once('\0') else {
                continue;
            };
            if let Ok(rec) = TagRecord::parse(&String::from_utf8_lossy(&v)) {
                out.push((repo.to_string(), tag.to_string(), rec));
            }
        }
        Ok(out)
    }

    pub fn max_hlc(&self) -> Result<Hlc> {
        Ok(self
            .all_tags()?
            .iter()
            .map(|(_, _, r)| r.hlc)
            .max()
            .unwrap_or_default())
    }

    pub fn put_lease(&self, id: &str, expiry_ms: u64) -> Result<()> {
        Ok(self
            .db
            .put(key(b"l/", id.as_bytes()), expiry_ms.to_le_bytes())?)
    }

    pub fn lease_expiry(&self, id: &str) -> Result<Option<u64>> {
        Ok(self
            .db
            .get_pinned(key(b"l/", id.as_bytes()))?
            .map(|v| u64::from_le_bytes(v[..8].try_into().unwrap_or_default())))
    }

    /// Ends a lease: its digest entries become inert (they name no live lease) and go
    /// at the next GC.
    pub fn drop_lease(&self, id: &str) -> Result<()> {
        Ok(self.db.delete(key(b"l/", id.as_bytes()))?)
    }

    pub fn lease_digests(&self, id: &str, digests: &[Digest]) -> Result<()> {
        let mut batch = WriteBatch::default();
        for d in digests {
            batch.put(key(b"L/", &[&d.0[..], id.as_bytes()].concat()), b"");
        }
        Ok(self.db.write(batch)?)
    }

    /// Whether a live lease protects `d`.
    pub fn is_leased(&self, d: &Digest, now_ms: u64) -> Result<bool> {
        let prefix = key(b"L/", &d.0);
        for item in self.keys_under(&prefix) {
            let (k, _) = item?;
            if !k.starts_with(&prefix) {
                break;
            }
            let id = String::from_utf8_lossy(&k[prefix.len()..]);
            if self.lease_expiry(&id)?.is_some_and(|exp| exp > now_ms) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Drops expired leases and the digest entries of every ended lease; returns how
    /// many leases expired.
    pub fn drop_expired_leases(&self, now_ms: u64) -> Result<usize> {
        let mut expired = std::collections::HashSet::new();
        let mut batch = WriteBatch::default();
        for item in self.db.prefix_iterator(b"l/") {
            let (k, v) = item?;
            if !k.starts_with(b"l/") {
                break;
            }
            if u64::from_le_bytes(v[..8].try_into().unwrap_or_default()) <= now_ms {
                batch.delete(&k);
                expired.insert(k[2..].to_vec());
            }
        }
        // Digest entries of leases that expired now or were dropped at commit.
        for item in self.db.prefix_iterator(b"L/") {
            let (k, _) = item?;
            if !k.starts_with(b"L/") {
                break;
            }
            let id = &k[34.min(k.len())..];
            if expired.contains(id) || self.db.get_pinned(key(b"l/", id))?.is_none() {
                batch.delete(&k);
            }
        }
        self.db.write(batch)?;
        Ok(expired.len())
    }

    /// Appends a local tag commit to the replication log under `seq` (synced).
    pub fn put_log_entry(&self, seq: u64, entry: &LogEntry) -> Result<()> {
        let value = format!("{}\0{}\0{}", entry.repository, entry.tag, entry.record_name);
        Ok(self
            .db
            .put_opt(key(b"r/", &seq.to_be_bytes()), value, &synced())?)
    }

    /// The highest sequence in the replication log (0: empty).
    pub fn log_head(&self) -> Result<u64> {
        let mut it = self.db.iterator(IteratorMode::From(
            &key(b"r/", &u64::MAX.to_be_bytes()),
            Direction::Reverse,
        ));
        match it.next() {
            Some(item) => {
                let (k, _) = item?;
                Ok(parse_log_key(&k).unwrap_or(0))
            }
            None => Ok(0),
        }
    }

    /// Up to `limit` log entries with a sequence above `after`, in order.
    pub fn log_entries_after(&self, after: u64, limit: usize) -> Result<Vec<(u64, LogEntry)>> {
        let start = key(b"r/", &(after.saturating_add(1)).to_be_bytes());
        let mut out = Vec::new();
        for item in self
            .db
            .iterator(IteratorMode::From(&start, Direction::Forward))
        {
            let (k, v) = item?;
            let Some(seq) = parse_log_key(&k) else { break };
            let v = String::from_utf8_lossy(&v);
            let mut parts = v.splitn(3, '\0');
            if let (Some(repository), Some(tag), Some(record_name)) =
                (parts.next(), parts.next(), parts.next())
            {
                out.push((
                    seq,
                    LogEntry {
                        repository: repository.into(),
                        tag: tag.into(),
                        record_name: record_name.into(),
                    },
                ));
            }
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// The last log sequence `peer` acknowledged (0: none).
    pub fn peer_cursor(&self, peer: &str) -> Result<u64> {
        Ok(self
            .db
            .get_pinned(key(b"p/", peer.as_bytes()))?
            .map(|v| u64::from_le_bytes(v[..8].try_into().unwrap_or_default()))
            .unwrap_or(0))
    }

    /// Durably moves `peer`'s cursor.
    pub fn set_peer_cursor(&self, peer: &str, seq: u64) -> Result<()> {
        Ok(self
            .db
            .put_opt(key(b"p/", peer.as_bytes()), seq.to_le_bytes(), &synced())?)
    }

    /// Stores a node agent's registration (replacing the previous one).
    pub fn put_node(&self, name: &str, value: &[u8]) -> Result<()> {
        Ok(self.db.put(key(b"n/", name.as_bytes()), value)?)
    }

    /// Every registered node: (name, stored value), by name.
    pub fn nodes(&self) -> Result<Vec<(String, Vec<u8>)>> {
        let mut out = Vec::new();
        for item in self
            .db
            .iterator(IteratorMode::From(b"n/", Direction::Forward))
        {
            let (k, v) = item?;
            let Some(name) = k.strip_prefix(b"n/") else {
                break;
            };
            out.push((String::from_utf8_lossy(name).into_owned(), v.to_vec()));
        }
        Ok(out)
    }

    /// Whether another instance's sweep log `name` has been applied to this index.
    pub fn sweep_applied(&self, name: &str) -> Result<bool> {
        Ok(self.db.get_pinned(key(b"g/", name.as_bytes()))?.is_some())
    }

    pub fn mark_sweep_applied(&self, name: &str) -> Result<()> {
        Ok(self
            .db
            .put_opt(key(b"g/", name.as_bytes()), b"", &synced())?)
    }

    /// Rebuilds everything derivable from the store (chunks, manifests, tags); leases
    /// are kept. The caller holds a push lease in the store meanwhile, so no other
    /// instance's GC deletes what this lists (shared_store.rs `rebuild_index`).
    pub async fn rebuild(&self, store: &ChunkStore) -> Result<RebuildStats> {
        let mut stats = RebuildStats::default();
        let mut batch = WriteBatch::default();
        for prefix in [&b"c/"[..], b"m/", b"t/", BUILT] {
            let end = key(&prefix[..prefix.len() - 1], &[prefix[prefix.len() - 1] + 1]);
            batch.delete_range(prefix, &end[..]);
        }
        self.db.write_opt(batch, &synced())?;

        let mut batch = WriteBatch::default();
        for meta in store.list(layout::CHUNKS).await? {
            if let Ok(d) = layout::parse_chunk_path(meta.location.as_ref()) {
                batch.put(key(b"c/", &d.0), meta.size.to_le_bytes());
                stats.chunks += 1;
            }
        }
        for meta in store.list(layout::MANIFESTS).await? {
            if let Ok(d) = layout::parse_manifest_path(meta.location.as_ref()) {
                batch.put(key(b"m/", &d.0), meta.size.to_le_bytes());
                stats.manifests += 1;
            }
        }
        self.db.write_opt(batch, &synced())?;
        for meta in store.list(layout::TAGS).await? {
            if let Ok((repo, tag, rec)) = layout::parse_tag_record_path(meta.location.as_ref()) {
                self.apply_tag_record(&repo, &tag, &rec)?;
                stats.tag_records += 1;
            }
        }
        // A fresh index has lost its replication log (or never had one): seed it with
        // every current record so that peers converge on this store's state.
        if self.log_head()? == 0 {
            for (seq, (repository, tag, rec)) in (1u64..).zip(self.all_tags()?) {
                self.put_log_entry(
                    seq,
                    &LogEntry {
                        repository,
                        tag,
                        record_name: rec.object_name(),
                    },
                )?;
            }
        }
        self.db.put_opt(BUILT, b"", &synced())?;
        Ok(stats)
    }

    /// Every entry derived from the store (chunks, manifests, current tags) as text
    /// lines, in key order: two indexes of one store compare equal line by line.
    pub fn dump_derived(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for item in self.db.iterator(IteratorMode::Start) {
            let (k, v) = item?;
            if k.starts_with(b"c/") || k.starts_with(b"m/") || k.starts_with(b"t/") {
                out.push(format!("{}={}", hex_or_text(&k), hex_or_text(&v)));
            }
        }
        Ok(out)
    }
}

fn parse_log_key(k: &[u8]) -> Option<u64> {
    let seq = k.strip_prefix(b"r/")?;
    Some(u64::from_be_bytes(seq.try_into().ok()?))
}

/// One replication-log entry: a tag record this registry wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogEntry {
    pub repository: String,
    pub tag: String,
    pub record_name: String,
}

fn hex_or_text(b: &[u8]) -> String {
    match std::str::from_utf8(b) {
        Ok(s) if s.chars().all(|c| !c.is_control() || c == '\0') => s.replace('\0', "/"),
        _ => b.iter().map(|x| format!("{x:02x}")).collect(),
    }
}

#[derive(Debug, Default, serde::Serialize)]
pub struct RebuildStats {
    pub chunks: u64,
    pub manifests: u64,
    pub tag_records: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use snapreg_proto::tags::TagTarget;

    fn index() -> (tempfile::TempDir, Index) {
        let dir = tempfile::tempdir().unwrap();
        let index = Index::open(&dir.path().join("index")).unwrap();
        (dir, index)
    }

    fn record(hlc: u64, target: TagTarget) -> TagRecord {
        TagRecord {
            hlc: Hlc(hlc),
            target,
        }
    }

    #[test]
    fn chunks_and_manifests_come_and_go() {
        let (_dir, ix) = index();
        let d = Digest::of(b"x");
        assert!(!ix.has_chunk(&d).unwrap());
        ix.add_chunk(&d, 10).unwrap();
        assert!(ix.has_chunk(&d).unwrap());
        assert!(
            !ix.has_manifest(&d).unwrap(),
            "chunks and manifests are apart"
        );
        ix.remove_chunk(&d).unwrap();
        assert!(!ix.has_chunk(&d).unwrap());
        ix.add_manifest(&d, 5).unwrap();
        assert!(ix.has_manifest(&d).unwrap());
        ix.remove_manifest(&d).unwrap();
        assert!(!ix.has_manifest(&d).unwrap());
    }

    #[test]
    fn the_highest_tag_record_wins_whatever_the_arrival_order() {
        let (_dir, ix) = index();
        let (a, b) = (Digest::of(b"a"), Digest::of(b"b"));
        assert!(ix
            .apply_tag_record("r", "t", &record(2, TagTarget::Manifest(b)))
            .unwrap());
        // An older record arriving late changes nothing.
        assert!(!ix
            .apply_tag_record("r", "t", &record(1, TagTarget::Manifest(a)))
            .unwrap());
        assert_eq!(
            ix.tag_record("r", "t").unwrap(),
            Some(record(2, TagTarget::Manifest(b)))
        );
        // A newer tombstone wins and is listed as such.
        assert!(ix
            .apply_tag_record("r", "t", &record(3, TagTarget::Deleted))
            .unwrap());
        assert_eq!(
            ix.all_tags().unwrap(),
            vec![("r".into(), "t".into(), record(3, TagTarget::Deleted))]
        );
        assert_eq!(ix.max_hlc().unwrap(), Hlc(3));
    }

    #[test]
    fn leases_protect_digests_until_they_expire_or_end() {
        let (_dir, ix) = index();
        let (d, e) = (Digest::of(b"d"), Digest::of(b"e"));
        ix.put_lease("live", 1000).unwrap();
        ix.put_lease("ending", 1000).unwrap();
        ix.lease_digests("live", &[d]).unwrap();
        ix.lease_digests("ending", &[e]).unwrap();
        assert!(ix.is_leased(&d, 999).unwrap());
        assert!(!ix.is_leased(&d, 1000).unwrap(), "expired at its expiry");
        ix.drop_lease("ending").unwrap();
        assert!(
            !ix.is_leased(&e, 0).unwrap(),
            "an ended lease protects nothing"
        );
        assert_eq!(ix.lease_expiry("live").unwrap(), Some(1000));
        assert_eq!(ix.drop_expired_leases(999).unwrap(), 0);
        assert!(ix.is_leased(&d, 999).unwrap());
        assert_eq!(ix.drop_expired_leases(1000).unwrap(), 1);
        assert_eq!(ix.lease_expiry("live").unwrap(), None);
    }

    #[test]
    fn the_log_reads_back_in_sequence_and_cursors_persist() {
        let (_dir, ix) = index();
        assert_eq!(ix.log_head().unwrap(), 0);
        let entry = |tag: &str| LogEntry {
            repository: "r".into(),
            tag: tag.into(),
            record_name: format!("{tag}-name"),
        };
        for (seq, tag) in [(1, "a"), (2, "b"), (3, "c")] {
            ix.put_log_entry(seq, &entry(tag)).unwrap();
        }
        assert_eq!(ix.log_head().unwrap(), 3);
        assert_eq!(
            ix.log_entries_after(1, 10).unwrap(),
            vec![(2, entry("b")), (3, entry("c"))]
        );
        assert_eq!(ix.log_entries_after(0, 1).unwrap(), vec![(1, entry("a"))]);
        assert_eq!(ix.peer_cursor("eu").unwrap(), 0);
        ix.set_peer_cursor("eu", 2).unwrap();
        assert_eq!(ix.peer_cursor("eu").unwrap(), 2);
    }

    #[tokio::test]
    async fn a_rebuild_matches_the_index_it_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(None, dir.path().join("store")).unwrap();
        let ix = Index::open(&dir.path().join("a")).unwrap();
        let (chunk, manifest) = (Digest::of(b"chunk"), Digest::of(b"manifest"));
        store
            .put_chunk(&chunk, bytes::Bytes::from_static(b"c"))
            .await
            .unwrap();
        ix.add_chunk(&chunk, 1).unwrap();
        store
            .put_manifest(&manifest, bytes::Bytes::from_static(b"mm"))
            .await
            .unwrap();
        ix.add_manifest(&manifest, 2).unwrap();
        let rec = record(7 << 16, TagTarget::Manifest(manifest));
        store.put_tag_record("r", "t", &rec).await.unwrap();
        ix.apply_tag_record("r", "t", &rec).unwrap();

        let rebuilt = Index::open(&dir.path().join("b")).unwrap();
        assert!(!rebuilt.is_built().unwrap());
        let stats = rebuilt.rebuild(&store).await.unwrap();
        assert_eq!(
            (stats.chunks, stats.manifests, stats.tag_records),
            (1, 1, 1)
        );
        assert!(rebuilt.is_built().unwrap());
        assert_eq!(rebuilt.dump_derived().unwrap(), ix.dump_derived().unwrap());
        // An empty log is seeded with the current records, so peers converge.
        assert_eq!(rebuilt.log_head().unwrap(), 1);
        assert_eq!(
            rebuilt.log_entries_after(0, 10).unwrap()[0].1.record_name,
            rec.object_name()
        );
    }
}
