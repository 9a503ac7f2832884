//! The node chunk cache: verified, uncompressed chunks in files named by digest,
//! shared by every snapctl process on the node (and the node agent).
//!
//! ```text
//! <cache>/chunks/<2 hex>/<64 hex>   raw chunk bytes; mtime = last use (LRU order)
//! <cache>/lock                      flock: shared while inserting, exclusive while evicting
//! <cache>/tmp/                      staging for inserts (same filesystem: rename is atomic)
//! ```
//!
//! Concurrency: an insert writes a staging file and renames it into place, so readers
//! never see a partial chunk; a reader that loses a race with eviction gets "absent"
//! and fetches from the registry. Every read re-hashes the chunk (a cache on local
//! disk can rot too); a chunk that does not verify is removed and reported absent.
//! Default location: `/var/cache/snapctl` as root, `$XDG_CACHE_HOME/snapctl` otherwise.

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::SystemTime;

use bytes::Bytes;
use snapreg_proto::Digest;

/// Default size limit: 20 GiB holds a few model snapshots' hot chunks.
pub const DEFAULT_LIMIT_BYTES: u64 = 20 << 30;

#[derive(Clone, Debug)]
pub struct ChunkCache {
    dir: PathBuf,
    limit: u64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Entry {
    pub digest: String,
    pub bytes: u64,
    pub last_used_unix: u64,
}

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Usage {
    pub chunks: u64,
    pub bytes: u64,
    pub limit_bytes: u64,
}

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct PruneStats {
    pub chunks_removed: u64,
    pub bytes_removed: u64,
    pub chunks_left: u64,
    pub bytes_left: u64,
}

pub fn default_dir() -> PathBuf {
    // SAFETY: geteuid takes nothing and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/var/cache/snapctl");
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into())).join(".cache")
        });
    base.join("snapctl")
}

struct Flock(File);

impl Flock {
    fn take(path: &Path, exclusive: bool) -> io::Result<Flock> {
        let f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        let op = if exclusive {
            libc::LOCK_EX
        } else {
            libc::LOCK_SH
        };
        // SAFETY: flock on a descriptor `f` keeps open for the call; no memory involved.
        if unsafe { libc::flock(f.as_raw_fd(), op) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Flock(f))
    }
}

impl Drop for Flock {
    fn drop(&mut self) {
        // SAFETY: the descriptor is ours and open until after this call.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

impl ChunkCache {
    pub fn open(dir: &Path, limit: u64) -> io::Result<Self> {
        fs::create_dir_all(dir.join("chunks"))?;
        fs::create_dir_all(dir.join("tmp"))?;
        Ok(ChunkCache {
            dir: dir.to_path_buf(),
            limit,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, d: &Digest) -> PathBuf {
        let hex = d.to_hex();
        self.dir.join("chunks").join(&hex[..2]).join(hex)
    }

    pub fn contains(&self, d: &Digest) -> bool {
        self.path(d).exists()
    }

    /// The chunk's bytes if cached and intact; marks it used.
    pub fn get(&self, d: &Digest) -> Option<Bytes> {
        let path = self.path(d);
        let data = fs::read(&path).ok()?;
        self.accept_read(d, &path, Digest::of(&data))
            .then(|| Bytes::from(data))
    }

    /// The chunk's file if cached and intact, for handing to the kernel (splice)
    /// instead of reading it: verified through a read-only mapping, so its bytes are
    /// hashed where they lie in the page cache. Cache files are never written in
    /// place (inserts rename a finished file over nothing, eviction unlinks), so what
    /// was verified is what a splice reads. Marks it used.
    pub fn open_verified(&self, d: &Digest) -> Option<(File, u64)> {
        let (file, len) = self.open_stored(d)?;
        let actual = if len == 0 {
            Digest::of(b"")
        } else {
            let map = Mapping::of(&file, len as usize).ok()?;
            Digest::of(map.bytes())
        };
        self.accept_read(d, &self.path(d), actual)
            .then_some((file, len))
    }

    /// The chunk's file without hashing it: only for a chunk this process verified
    /// in memory and stored moments ago (a restore splicing what its own read-ahead
    /// fetched). Inserts never write a file in place, so the file holds those bytes.
    pub fn open_stored(&self, d: &Digest) -> Option<(File, u64)> {
        let file = File::open(self.path(d)).ok()?;
        let len = file.metadata().ok()?.len();
        Some((file, len))
    }

    /// After a read of `d`'s file hashed to `actual`: a rotten file is removed (and
    /// reported absent), an intact one marked used.
    fn accept_read(&self, d: &Digest, path: &Path, actual: Digest) -> bool {
        if actual != *d {
            tracing::warn!(digest = %d, "cached chunk does not verify; removing it");
            let _ = fs::remove_file(path);
            return false;
        }
        let _ = File::options()
            .write(true)
            .open(path)
            .and_then(|f| f.set_modified(SystemTime::now()));
        true
    }

    /// Inserts verified bytes (the caller has checked them against `d`).
    pub fn put(&self, d: &Digest, data: &[u8]) -> io::Result<()> {
        let path = self.path(d);
        if path.exists() {
            return Ok(());
        }
        let _shared = Flock::take(&self.dir.join("lock"), false)?;
        fs::create_dir_all(path.parent().expect("fan-out dir"))?;
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let tmp = self.dir.join("tmp").join(format!(
            "{}.{}.{}",
            d.to_hex(),
            std::process::id(),
            SEQ.fetch_add(1, Relaxed)
        ));
        let mut f = File::create(&tmp)?;
        f.write_all(data)?;
        drop(f);
        fs::rename(&tmp, &path).inspect_err(|_| {
            let _ = fs::remove_file(&tmp);
        })
    }

    pub fn entries(&self) -> io::Result<Vec<Entry>> {
        let mut out = Vec::new();
        for fan in fs::read_dir(self.dir.join("chunks"))? {
            let fan = fan?;
            if !fan.file_type()?.is_dir() {
                continue;
            }
            for e in fs::read_dir(fan.path())? {
                let e = e?;
                let Ok(meta) = e.metadata() else { continue };
                let used = meta
                    .modified()
                    .ok()
                    .and_then(|m| m.duration_since(SystemTime::UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_secs());
                out.push(Entry {
                    digest: format!("blake3:{}", e.file_name().to_string_lossy()),
                    bytes: meta.len(),
                    last_used_unix: used,
                });
            }
        }
        Ok(out)
    }

    pub fn usage(&self) -> io::Result<Usage> {
        let e = self.entries()?;
        Ok(Usage {
            chunks: e.len() as u64,
            bytes: e.iter().map(|e| e.bytes).sum(),
            limit_bytes: self.limit,
        })
    }

    /// Evicts least-recently-used chunks until at most `target` bytes remain.
    pub fn prune_to(&self, target: u64) -> io::Result<PruneStats> {
        let _exclusive = Flock::take(&self.dir.join("lock"), true)?;
        let mut entries = self.entries()?;
        entries.sort_by_key(|e| e.last_used_unix);
        let mut total: u64 = entries.iter().map(|e| e.bytes).sum();
        let mut stats = PruneStats::default();
        for e in &entries {
            if total <= target {
                break;
            }
            let d: Digest = e.digest.parse().map_err(io::Error::other)?;
            if fs::remove_file(self.path(&d)).is_ok() {
                total -= e.bytes;
                stats.chunks_removed += 1;
                stats.bytes_removed += e.bytes;
            }
        }
        // Staging files of crashed writers.
        for t in fs::read_dir(self.dir.join("tmp"))?.flatten() {
            let old = t
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|m| m.elapsed().is_ok_and(|a| a.as_secs() > 3600));
            if old {
                let _ = fs::remove_file(t.path());
            }
        }
        stats.chunks_left = entries.len() as u64 - stats.chunks_removed;
        stats.bytes_left = total;
        Ok(stats)
    }

    /// Keeps the cache under its limit (called after a restore fills it).
    pub fn enforce_limit(&self) -> io::Result<PruneStats> {
        self.prune_to(self.limit)
    }
}

/// A read-only private mapping of a whole file, unmapped on drop.
struct Mapping {
    addr: *mut libc::c_void,
    len: usize,
}

impl Mapping {
    fn of(file: &File, len: usize) -> io::Result<Mapping> {
        // SAFETY: a fresh read-only private mapping of `len` bytes of an open file;
        // nothing else is placed at the address the kernel picks.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping { addr, len })
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: mapped readable for `len` bytes until drop. Cache files are never
        // truncated in place, so no access can fault past the end.
        unsafe { std::slice::from_raw_parts(self.addr as *const u8, self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: exactly the range mmap returned.
        unsafe { libc::munmap(self.addr, self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_get_verify_and_lru_prune() {
        let t = tempfile::tempdir().unwrap();
        let c = ChunkCache::open(t.path(), 1 << 20).unwrap();
        let chunks: Vec<Vec<u8>> = (0..4u8).map(|i| vec![i + 1; 300_000]).collect();
        for (i, data) in chunks.iter().enumerate() {
            c.put(&Digest::of(data), data).unwrap();
            let f = File::options()
                .write(true)
                .open(c.path(&Digest::of(data)))
                .unwrap();
            f.set_modified(
                SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1000 + i as u64),
            )
            .unwrap();
        }
        assert_eq!(c.usage().unwrap().chunks, 4);
        // Using chunk 0 makes it the most recent.
        assert_eq!(c.get(&Digest::of(&chunks[0])).unwrap(), chunks[0]);
        let s = c.enforce_limit().unwrap();
        assert_eq!(s.chunks_removed, 1);
        assert!(
            !c.contains(&Digest::of(&chunks[1])),
            "the least recently used chunk goes first"
        );
        assert!(c.contains(&Digest::of(&chunks[0])));

        // A rotten chunk is dropped, not served (nor handed out as a file).
        std::fs::write(c.path(&Digest::of(&chunks[2])), b"rot").unwrap();
        assert!(c.get(&Digest::of(&chunks[2])).is_none());
        assert!(!c.contains(&Digest::of(&chunks[2])));
        let (mut f, len) = c.open_verified(&Digest::of(&chunks[3])).unwrap();
        let mut back = Vec::new();
        std::io::Read::read_to_end(&mut f, &mut back).unwrap();
        assert_eq!((len, back), (300_000, chunks[3].clone()));
        std::fs::write(c.path(&Digest::of(&chunks[3])), vec![9u8; 300_000]).unwrap();
        assert!(c.open_verified(&Digest::of(&chunks[3])).is_none());
        assert!(!c.contains(&Digest::of(&chunks[3])));
    }
}
