//! Tags as append-only records, and the hybrid logical clock that orders them.
//!
//! A tag move writes a new object `tags/<repo>/<tag>/<hlc>-<target>`; nothing is
//! overwritten or deleted in place. The tag's current value is the record with the
//! highest `(hlc, target)`: the same rule on every registry instance on one bucket and
//! on every replica, with no conditional writes (Garage ignores `If-None-Match`).
//! Deleting a tag writes a record whose target is `deleted`.
//!
//! HLC encoding: `physical_ms << 16 | logical`, printed as 16 lowercase hex digits so
//! that object names sort in clock order.

use std::cmp::Ordering;
use std::fmt;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::{Digest, Error};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Hlc(pub u64);

impl Hlc {
    pub fn physical_ms(self) -> u64 {
        self.0 >> 16
    }
}

impl fmt::Display for Hlc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// A hybrid logical clock: never goes backwards, never repeats, and stays close to
/// wall time so that "newest" means what an operator expects across regions.
#[derive(Debug, Default)]
pub struct HlcClock {
    last: Mutex<u64>,
}

impl HlcClock {
    pub fn tick(&self) -> Hlc {
        let wall = (SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64)
            << 16;
        let mut last = self.last.lock().unwrap();
        *last = wall.max(*last + 1);
        Hlc(*last)
    }

    /// Folds in a clock seen elsewhere (a record read from the store or a peer), so
    /// the next tick orders after it.
    pub fn observe(&self, seen: Hlc) {
        let mut last = self.last.lock().unwrap();
        *last = (*last).max(seen.0);
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum TagTarget {
    Manifest(Digest),
    Deleted,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TagRecord {
    pub hlc: Hlc,
    pub target: TagTarget,
}

const DELETED: &str = "deleted";

impl TagRecord {
    /// The record's object name (last path component).
    pub fn object_name(&self) -> String {
        match &self.target {
            TagTarget::Manifest(d) => format!("{}-{}", self.hlc, d.to_hex()),
            TagTarget::Deleted => format!("{}-{DELETED}", self.hlc),
        }
    }

    pub fn parse(name: &str) -> Result<Self, Error> {
        let bad = |reason: &str| Error::InvalidPath {
            path: name.into(),
            reason: reason.into(),
        };
        let (hlc, target) = name
            .split_once('-')
            .ok_or_else(|| bad("tag record name is <hlc>-<target>"))?;
        if hlc.len() != 16 {
            return Err(bad("hlc must be 16 hex digits"));
        }
        let hlc = Hlc(u64::from_str_radix(hlc, 16).map_err(|_| bad("hlc is not hex"))?);
        let target = if target == DELETED {
            TagTarget::Deleted
        } else {
            TagTarget::Manifest(
                Digest::from_hex(target).map_err(|_| bad("target is not a digest"))?,
            )
        };
        Ok(TagRecord { hlc, target })
    }

    pub fn digest(&self) -> Option<Digest> {
        match self.target {
            TagTarget::Manifest(d) => Some(d),
            TagTarget::Deleted => None,
        }
    }

    fn target_key(&self) -> String {
        match &self.target {
            TagTarget::Manifest(d) => d.to_hex(),
            TagTarget::Deleted => DELETED.into(),
        }
    }
}

/// The winning order: higher HLC wins; on a tie (two regions, same millisecond and
/// counter), the lexically higher target wins, so every registry picks the same one.
impl Ord for TagRecord {
    fn cmp(&self, other: &Self) -> Ordering {
        self.hlc
            .cmp(&other.hlc)
            .then_with(|| self.target_key().cmp(&other.target_key()))
    }
}

impl PartialOrd for TagRecord {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_is_monotonic_and_observes() {
        let c = HlcClock::default();
        let a = c.tick();
        let b = c.tick();
        assert!(b > a);
        c.observe(Hlc(b.0 + 1_000_000));
        assert!(c.tick().0 > b.0 + 1_000_000);
    }

    #[test]
    fn record_names_round_trip_and_sort_by_clock() {
        let d = Digest::of(b"m");
        let r = TagRecord {
            hlc: Hlc(0x1234),
            target: TagTarget::Manifest(d),
        };
        assert_eq!(TagRecord::parse(&r.object_name()).unwrap(), r);
        let del = TagRecord {
            hlc: Hlc(0x1235),
            target: TagTarget::Deleted,
        };
        assert_eq!(TagRecord::parse(&del.object_name()).unwrap(), del);
        assert!(del > r);
        assert!(r.object_name() < del.object_name());
    }

    #[test]
    fn ties_break_by_target_the_same_everywhere() {
        let a = TagRecord {
            hlc: Hlc(7),
            target: TagTarget::Manifest(Digest([1; 32])),
        };
        let b = TagRecord {
            hlc: Hlc(7),
            target: TagTarget::Manifest(Digest([2; 32])),
        };
        assert_eq!([a.clone(), b.clone()].iter().max(), Some(&b));
        assert_eq!([b.clone(), a].iter().max(), Some(&b));
    }

    #[test]
    fn malformed_names_are_refused() {
        for bad in [
            "",
            "zz-deleted",
            "0000000000000001",
            "0000000000000001-nothex",
        ] {
            assert!(TagRecord::parse(bad).is_err(), "{bad}");
        }
    }
}
