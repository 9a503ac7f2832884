//! What of one restored task's memory is still missing, at the addresses it has now,
//! and where each piece's bytes come from; kept true under the task's userfaultfd
//! events (fork, remap, remove, unmap).
//!
//! A piece lies inside one VMA (a copy cannot cross one) and inside one extent of the
//! pages file, so its bytes are one slice of one chunk, or zeros. The fill claims
//! pieces in address order, those inside the task's *first* ranges (device memory,
//! which the CUDA restore reads all at once) before the rest; a claim is (address,
//! claim id), and any event that touches a claimed piece releases the claim, so the
//! worker holding it finds nothing to copy and the moved or cut remainder is claimed
//! again. Events are rare, claims many.
//!
//! **One claim, one chunk.** Zero runs cut an image's memory into pieces smaller than
//! a chunk (the medium GPU preset: ~10^4 device-memory runs, several pieces per 2 MiB
//! chunk). Claimed one piece at a time, 32 workers in address order asked for the same
//! few chunks, and most of them waited on a fetch another had begun (7,866-14,359
//! joined requests per H200 restore). So a claim takes the lowest unclaimed piece and
//! every unclaimed piece after it from the same chunk: each worker fetches a chunk of
//! its own.

use std::collections::BTreeMap;
use std::sync::Arc;

use snapreg_proto::manifest::Extent;
use snapreg_proto::Digest;

use super::{LazyTask, PAGE};

/// Where a piece's bytes come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// `chunk`'s bytes from `skip` on.
    Chunk {
        chunk: Digest,
        skip: u64,
    },
    Zero,
    /// Never dumped (a page of a device-memory mapping the checkpoint left
    /// untouched): the zero page, as the kernel would map it; no bytes of the image.
    Hole,
}

impl Source {
    /// The same source `by` bytes further on.
    fn advanced(self, by: u64) -> Source {
        match self {
            Source::Chunk { chunk, skip } => Source::Chunk {
                chunk,
                skip: skip + by,
            },
            Source::Zero => Source::Zero,
            Source::Hole => Source::Hole,
        }
    }
}

/// `len` bytes at `vaddr` in the task, from `source`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    pub vaddr: u64,
    pub len: u64,
    pub source: Source,
}

/// The most one zero or hole piece spans: device memory's holes reach gigabytes, and
/// a piece is one worker's ioctl (retried whole after EAGAIN).
const ZERO_PIECE: u64 = 32 << 20;

#[derive(Clone, Copy, Debug)]
struct Entry {
    len: u64,
    source: Source,
    claim: Option<u64>,
}

/// One task's missing memory.
#[derive(Clone, Debug)]
pub struct Missing {
    /// The pages file the chunks belong to (named in errors and fetches).
    pub pages_file: Arc<str>,
    /// Pieces by address; none overlap.
    entries: BTreeMap<u64, Entry>,
    /// Where the next claim starts looking.
    cursor: u64,
    /// Address ranges whose pieces are claimed before any other, sorted. (Pieces an
    /// `mremap` moves out of one lose the priority, not their bytes.)
    first: Vec<(u64, u64)>,
    /// Every first range before this index misses nothing. A device-memory image has
    /// ~10^4 ranges: with every claim looking at all of them (under the daemon's lock)
    /// device memory went in at 0.17 GB/s on the H200, against 0.9-1.2 GB/s since
    /// (bench/RESULTS.md).
    first_from: usize,
}

/// The first ranges (device memory) widened to the VMAs they lie in, whose holes
/// become [`Source::Hole`] pieces, filled first too. The CUDA restore reads every page
/// of those mappings at once, holes included; a hole it found missing was a fault
/// through the daemon, one 4 KiB page at a time (1.4 million, 40 s on the medium GPU
/// preset while the rest of the fill was held; bench/RESULTS.md). Sorted, disjoint.
fn first_with_holes(
    entries: &mut BTreeMap<u64, Entry>,
    first: &[(u64, u64)],
    vmas: &[(u64, u64)],
) -> Vec<(u64, u64)> {
    let device_vmas: Vec<(u64, u64)> = vmas
        .iter()
        .copied()
        .filter(|&(vs, ve)| first.iter().any(|&(s, t)| vs < t && s < ve))
        .collect();
    // A piece lies inside one VMA (a zero-page ioctl cannot cross one): holes per VMA.
    for &(vs, ve) in &device_vmas {
        let mut holes = Vec::new();
        let mut at = vs;
        for (&vaddr, e) in entries.range(vs..ve) {
            if vaddr > at {
                holes.push((at, vaddr));
            }
            at = at.max(vaddr + e.len);
        }
        if at < ve {
            holes.push((at, ve));
        }
        for (mut a, b) in holes {
            while a < b {
                let len = (b - a).min(ZERO_PIECE);
                let hole = Entry {
                    len,
                    source: Source::Hole,
                    claim: None,
                };
                entries.insert(a, hole);
                a += len;
            }
        }
    }
    let mut wide: Vec<(u64, u64)> = first.iter().copied().chain(device_vmas).collect();
    wide.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(wide.len());
    for (s, t) in wide {
        match merged.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(t),
            _ => merged.push((s, t)),
        }
    }
    merged
}

impl Missing {
    /// `task`'s lazy runs, cut at the VMAs `vmas` ([start, end), at dump time, where
    /// CRIU restores them) and at the extents of its pages file.
    pub fn new(task: &LazyTask, vmas: &[(u64, u64)], extents: &[Extent]) -> Missing {
        let mut placed = Vec::with_capacity(extents.len());
        let mut at = 0;
        for e in extents {
            placed.push((at, *e));
            at += e.len();
        }
        let mut entries = BTreeMap::new();
        for run in &task.runs {
            let (mut vaddr, end) = (run.vaddr, run.vaddr + run.pages * PAGE);
            let mut offset = run.offset;
            while vaddr < end {
                let vma_end = vmas
                    .iter()
                    .find(|&&(s, e)| s <= vaddr && vaddr < e)
                    .map_or(end, |&(_, e)| e);
                // The plan checked that every run lies inside the pages file.
                let Some(i) = placed
                    .partition_point(|(at, _)| *at <= offset)
                    .checked_sub(1)
                else {
                    break;
                };
                let (at, extent) = placed[i];
                let in_extent = (at + extent.len()).saturating_sub(offset);
                let mut len = (end.min(vma_end) - vaddr).min(in_extent);
                if matches!(extent, Extent::Zero { .. }) {
                    len = len.min(ZERO_PIECE);
                }
                if len == 0 {
                    break;
                }
                let source = match extent {
                    Extent::Chunk { chunk, .. } => Source::Chunk {
                        chunk,
                        skip: offset - at,
                    },
                    Extent::Zero { .. } => Source::Zero,
                };
                entries.insert(
                    vaddr,
                    Entry {
                        len,
                        source,
                        claim: None,
                    },
                );
                vaddr += len;
                offset += len;
            }
        }
        let first = first_with_holes(&mut entries, &task.first, vmas);
        Missing {
            pages_file: task.pages_file.clone(),
            entries,
            cursor: 0,
            first,
            first_from: 0,
        }
    }

    /// Nothing missing (a task with no lazy pages, or one that is gone).
    pub fn none() -> Missing {
        Missing {
            pages_file: "".into(),
            entries: BTreeMap::new(),
            cursor: 0,
            first: Vec::new(),
            first_from: 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes still missing.
    pub fn bytes(&self) -> u64 {
        self.entries.values().map(|e| e.len).sum()
    }

    /// The lowest unclaimed piece from the cursor on (then from the start) and those
    /// after it from its chunk, in address order, now claimed as `id`.
    pub fn claim(&mut self, id: u64) -> Option<Vec<Piece>> {
        let found = self
            .entries
            .range(self.cursor..)
            .chain(self.entries.range(..self.cursor))
            .find(|(_, e)| e.claim.is_none())
            .map(|(&vaddr, _)| vaddr)?;
        let pieces = self.take_claim(found, id);
        let last = pieces.last().expect("a claim holds its first piece");
        self.cursor = last.vaddr + last.len;
        Some(pieces)
    }

    /// The lowest unclaimed piece inside the first ranges and those after it from its
    /// chunk, now claimed as `id`.
    pub fn claim_first(&mut self, id: u64) -> Option<Vec<Piece>> {
        self.skip_done_first();
        let entries = &self.entries;
        // Claims go in address order, so what lies between the done prefix and the
        // next unclaimed piece is mostly pieces in flight: a claim costs about the
        // claims in flight.
        let found = self.first[self.first_from..].iter().find_map(|&(s, t)| {
            entries
                .range(s..t)
                .find(|(_, e)| e.claim.is_none())
                .map(|(&vaddr, _)| vaddr)
        })?;
        Some(self.take_claim(found, id))
    }

    /// Whether anything inside the first ranges is still missing.
    pub fn first_missing(&mut self) -> bool {
        self.skip_done_first();
        self.first_from < self.first.len()
    }

    /// Moves `first_from` past the first ranges that miss nothing.
    fn skip_done_first(&mut self) {
        while let Some(&(s, t)) = self.first.get(self.first_from) {
            if self.entries.range(s..t).next().is_some() {
                return;
            }
            self.first_from += 1;
        }
    }

    /// Claims the piece at `vaddr` and the unclaimed pieces right after it that come
    /// from the same chunk (a zero piece goes alone).
    fn take_claim(&mut self, vaddr: u64, id: u64) -> Vec<Piece> {
        let first = self.claim_piece(vaddr, id);
        let Source::Chunk { chunk, .. } = first.source else {
            return vec![first];
        };
        let same_chunk: Vec<u64> = self
            .entries
            .range(vaddr + 1..)
            .take_while(|(_, e)| {
                e.claim.is_none()
                    && matches!(e.source, Source::Chunk { chunk: c, .. } if c == chunk)
            })
            .map(|(&a, _)| a)
            .collect();
        let mut pieces = vec![first];
        pieces.extend(same_chunk.into_iter().map(|a| self.claim_piece(a, id)));
        pieces
    }

    fn claim_piece(&mut self, vaddr: u64, id: u64) -> Piece {
        let e = self.entries.get_mut(&vaddr).expect("a missing piece");
        e.claim = Some(id);
        Piece {
            vaddr,
            len: e.len,
            source: e.source,
        }
    }

    /// The piece claimed as `id` at `vaddr`, unless an event released it.
    pub fn claimed(&self, vaddr: u64, id: u64) -> Option<Piece> {
        self.entries
            .get(&vaddr)
            .filter(|e| e.claim == Some(id))
            .map(|e| Piece {
                vaddr,
                len: e.len,
                source: e.source,
            })
    }

    /// The piece claimed as `id` at `vaddr` is in the task.
    pub fn done(&mut self, vaddr: u64, id: u64) {
        if self.claimed(vaddr, id).is_some() {
            self.entries.remove(&vaddr);
        }
    }

    /// The missing piece that holds `addr`, if any.
    pub fn piece_at(&self, addr: u64) -> Option<Piece> {
        let (&vaddr, e) = self.entries.range(..=addr).next_back()?;
        (addr < vaddr + e.len).then_some(Piece {
            vaddr,
            len: e.len,
            source: e.source,
        })
    }

    /// `piece` went in for a fault: no worker need fill it, unless one has claimed it.
    pub fn served(&mut self, piece: Piece) {
        if let Some(e) = self.entries.get(&piece.vaddr) {
            if e.claim.is_none() && e.len == piece.len && e.source == piece.source {
                self.entries.remove(&piece.vaddr);
            }
        }
    }

    /// [start, end) is gone or reads zeros now (a remove or an unmap): nothing there
    /// is missing any more.
    pub fn forget(&mut self, start: u64, end: u64) {
        self.split_at(start);
        self.split_at(end);
        let gone: Vec<u64> = self.entries.range(start..end).map(|(&a, _)| a).collect();
        for a in gone {
            self.entries.remove(&a);
        }
    }

    /// `mremap` moved [from, from + len) to `to` (whatever was at `to` is gone).
    pub fn remap(&mut self, from: u64, to: u64, len: u64) {
        self.split_at(from);
        self.split_at(from + len);
        let moved: Vec<(u64, Entry)> = self
            .entries
            .range(from..from + len)
            .map(|(&a, e)| (a, *e))
            .collect();
        for (a, _) in &moved {
            self.entries.remove(a);
        }
        self.forget(to, to + len);
        for (a, e) in moved {
            self.entries
                .insert(a - from + to, Entry { claim: None, ..e });
        }
    }

    /// What a child forked now misses: the same, unclaimed.
    pub fn forked(&self) -> Missing {
        let mut child = self.clone();
        for e in child.entries.values_mut() {
            e.claim = None;
        }
        child.cursor = 0;
        child
    }

    /// Cuts the piece holding `addr` (if any, and not at its start) in two; both
    /// halves lose any claim.
    fn split_at(&mut self, addr: u64) {
        let Some((&vaddr, &e)) = self.entries.range(..addr).next_back() else {
            return;
        };
        if addr >= vaddr + e.len {
            return;
        }
        let head = addr - vaddr;
        self.entries.insert(
            vaddr,
            Entry {
                len: head,
                claim: None,
                ..e
            },
        );
        self.entries.insert(
            addr,
            Entry {
                len: e.len - head,
                source: e.source.advanced(head),
                claim: None,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lazy_pages::LazyRun;

    const A: u64 = 0x1000_0000;

    /// One run of 8 pages at A (file offset 0) over two chunks of 4 pages; a VMA
    /// boundary after page 6.
    fn missing() -> (Missing, Digest, Digest) {
        let (c1, c2) = (Digest::of(b"one"), Digest::of(b"two"));
        let task = LazyTask {
            pages_file: "pages-1.img".into(),
            runs: vec![LazyRun {
                vaddr: A,
                pages: 8,
                offset: 0,
            }],
            first: Vec::new(),
        };
        let extents = [
            Extent::Chunk {
                chunk: c1,
                len: 4 * PAGE,
            },
            Extent::Chunk {
                chunk: c2,
                len: 4 * PAGE,
            },
        ];
        let vmas = [(A, A + 6 * PAGE), (A + 6 * PAGE, A + 16 * PAGE)];
        (Missing::new(&task, &vmas, &extents), c1, c2)
    }

    fn claim_all(m: &mut Missing) -> Vec<Piece> {
        std::iter::from_fn(|| m.claim(1)).flatten().collect()
    }

    #[test]
    fn pieces_are_cut_at_extents_and_vmas_and_claimed_in_order() {
        let (mut m, c1, c2) = missing();
        let claims: Vec<Vec<Piece>> = std::iter::from_fn(|| m.claim(1)).collect();
        assert_eq!(
            claims.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![1, 2],
            "one claim per chunk, across the VMA boundary"
        );
        let pieces = claims.concat();
        let at = |vaddr, len, chunk, skip| Piece {
            vaddr,
            len: len * PAGE,
            source: Source::Chunk { chunk, skip },
        };
        assert_eq!(
            pieces,
            vec![
                at(A, 4, c1, 0),
                at(A + 4 * PAGE, 2, c2, 0),
                at(A + 6 * PAGE, 2, c2, 2 * PAGE),
            ]
        );
        assert!(m.claim(2).is_none(), "every piece is claimed");
        assert_eq!(m.piece_at(A + 5 * PAGE), Some(pieces[1]));
        m.served(pieces[1]);
        assert!(
            m.piece_at(A + 5 * PAGE).is_some(),
            "claimed: the fill finishes it"
        );
        m.done(A, 1);
        assert!(m.piece_at(A).is_none(), "done: no longer missing");
        assert_eq!(m.bytes(), 4 * PAGE);
    }

    #[test]
    fn a_remove_inside_a_claimed_piece_releases_it_and_keeps_the_rest() {
        let (mut m, c1, _) = missing();
        let first = m.claim(7).unwrap()[0];
        m.forget(A + PAGE, A + 2 * PAGE);
        assert!(m.claimed(A, 7).is_none(), "the claim is released");
        assert!(
            m.piece_at(A + PAGE).is_none(),
            "the removed page reads zeros"
        );
        let mut again: Vec<Piece> = claim_all(&mut m);
        // Claims go on from the cursor, then come back for what was released.
        assert_eq!(again[0].vaddr, A + 4 * PAGE);
        again.sort_by_key(|p| p.vaddr);
        assert_eq!(again[0].vaddr, A);
        assert_eq!(again[0].len, PAGE);
        assert_eq!(
            again[1],
            Piece {
                vaddr: A + 2 * PAGE,
                len: 2 * PAGE,
                source: Source::Chunk {
                    chunk: c1,
                    skip: 2 * PAGE
                }
            }
        );
        m.done(first.vaddr, 7);
        assert_eq!(m.bytes(), 7 * PAGE, "a released claim completes nothing");
    }

    #[test]
    fn a_remap_moves_the_missing_pages_with_their_sources() {
        let (mut m, _, c2) = missing();
        let to = 0x7000_0000;
        // Pages 3..7 move; whatever was missing at the target is gone.
        m.remap(A + 3 * PAGE, to, 4 * PAGE);
        assert!(m.piece_at(A + 4 * PAGE).is_none());
        assert_eq!(
            m.piece_at(to + 2 * PAGE),
            Some(Piece {
                vaddr: to + PAGE,
                len: 2 * PAGE,
                source: Source::Chunk { chunk: c2, skip: 0 }
            })
        );
        assert!(m.piece_at(A + 2 * PAGE).is_some() && m.piece_at(A + 7 * PAGE).is_some());
        assert_eq!(m.bytes(), 8 * PAGE);
        // Served for a fault while unclaimed: gone from the fill's work.
        let moved = m.piece_at(to).unwrap();
        m.served(moved);
        assert!(m.piece_at(to).is_none());
    }

    #[test]
    fn a_forked_child_misses_what_its_parent_misses_unclaimed() {
        let (mut m, _, _) = missing();
        let p = m.claim(3).unwrap()[0];
        m.done(p.vaddr, 3);
        m.claim(4).unwrap();
        let mut child = m.forked();
        assert_eq!(child.bytes(), m.bytes());
        assert_eq!(
            claim_all(&mut child).len(),
            2,
            "the parent's claim is not the child's"
        );
    }

    #[test]
    fn pieces_in_the_first_ranges_are_claimed_before_the_rest() {
        let (m, _, _) = missing();
        // Pages 4..8 (device memory, say) first.
        let mut m = Missing {
            first: vec![(A + 4 * PAGE, A + 8 * PAGE)],
            ..m
        };
        assert!(m.first_missing());
        let a = m.claim_first(1).unwrap();
        assert_eq!(
            a.iter().map(|p| p.vaddr).collect::<Vec<_>>(),
            vec![A + 4 * PAGE, A + 6 * PAGE],
            "both pieces of the chunk in one claim"
        );
        assert!(m.claim_first(3).is_none(), "both are in flight");
        assert!(m.first_missing(), "claimed is not in");
        m.done(a[0].vaddr, 1);
        // A released claim is claimed first again.
        m.forget(A + 7 * PAGE, A + 8 * PAGE);
        assert_eq!(
            m.claim_first(4).map(|c| (c[0].vaddr, c[0].len, c.len())),
            Some((A + 6 * PAGE, PAGE, 1))
        );
        m.done(A + 6 * PAGE, 4);
        assert!(!m.first_missing(), "every first piece is in");
        assert!(m.claim_first(5).is_none());
        assert_eq!(m.claim(6).map(|c| c[0].vaddr), Some(A), "then the rest");
    }

    #[test]
    fn the_holes_of_device_memory_mappings_are_filled_first_as_zero_pages() {
        // Device memory at pages 2..4 and 8..10 of a 16-page VMA; a plain run elsewhere.
        let c = Digest::of(b"dev");
        let run = |vaddr, pages, offset| LazyRun {
            vaddr,
            pages,
            offset,
        };
        let task = LazyTask {
            pages_file: "pages-1.img".into(),
            runs: vec![
                run(A + 2 * PAGE, 2, 0),
                run(A + 8 * PAGE, 2, 2 * PAGE),
                run(A + 32 * PAGE, 1, 4 * PAGE),
            ],
            first: vec![(A + 2 * PAGE, A + 4 * PAGE), (A + 8 * PAGE, A + 10 * PAGE)],
        };
        let extents = [Extent::Chunk {
            chunk: c,
            len: 5 * PAGE,
        }];
        let vmas = [(A, A + 16 * PAGE), (A + 32 * PAGE, A + 33 * PAGE)];
        let mut m = Missing::new(&task, &vmas, &extents);
        assert_eq!(
            m.first,
            vec![(A, A + 16 * PAGE)],
            "the whole mapping comes first"
        );
        let mut first = Vec::new();
        while let Some(claimed) = m.claim_first(1) {
            first.extend(
                claimed
                    .iter()
                    .map(|p| (p.vaddr - A, p.len / PAGE, p.source == Source::Hole)),
            );
        }
        assert_eq!(
            first
                .iter()
                .map(|&(a, n, h)| (a / PAGE, n, h))
                .collect::<Vec<_>>(),
            vec![
                (0, 2, true),
                (2, 2, false),
                (4, 4, true),
                (8, 2, false),
                (10, 6, true)
            ]
        );
        // The plain run's VMA gets no holes: the kernel's own zero page serves those.
        assert_eq!(
            m.claim(2).map(|c| (c[0].vaddr, c[0].source)),
            Some((
                A + 32 * PAGE,
                Source::Chunk {
                    chunk: c,
                    skip: 4 * PAGE
                }
            ))
        );
        assert_eq!(m.claim(3), None);
    }

    #[test]
    fn a_claim_stops_at_a_piece_another_worker_holds() {
        let (mut m, _, c2) = missing();
        // c2's last page is a piece of its own (an event cut it), claimed alone.
        m.split_at(A + 7 * PAGE);
        assert_eq!(m.claim_piece(A + 7 * PAGE, 9).len, PAGE);
        let claims: Vec<Vec<Piece>> = std::iter::from_fn(|| m.claim(1)).collect();
        assert_eq!(claims.len(), 2);
        assert_eq!(
            claims[1],
            vec![
                Piece {
                    vaddr: A + 4 * PAGE,
                    len: 2 * PAGE,
                    source: Source::Chunk { chunk: c2, skip: 0 }
                },
                Piece {
                    vaddr: A + 6 * PAGE,
                    len: PAGE,
                    source: Source::Chunk {
                        chunk: c2,
                        skip: 2 * PAGE
                    }
                },
            ],
            "c2's pieces up to the one claimed as 9"
        );
    }
}
