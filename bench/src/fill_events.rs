//! `snapreg-bench fill-events [--rounds N]`: can many threads fill a process's memory
//! by `UFFDIO_COPY` while the process drops some of it (`MADV_DONTNEED`), without
//! putting back what it dropped?
//!
//! CRIU's lazy-pages daemon is one thread: it reads the userfaultfd's events only
//! between copies, so a range the process drops (a `UFFD_EVENT_REMOVE`, which the
//! process waits on until the daemon reads it, then zaps the range) is never filled
//! afterwards. A daemon with several fillers has two hazards: a filler that does not
//! know of the drop fills the range later, and a copy already in flight when the
//! event is read may land after the zap. Three schemes, each run for N rounds in this
//! process (a registered mapping, fillers, a thread that drops ranges just ahead of
//! the fillers, an event reader):
//!
//! 1. `untracked`: the reader reads events and forgets them;
//! 2. `tracked`: the reader records dropped ranges and fillers skip them, no lock;
//! 3. `locked`: as 2, and the reader reads events only while holding a lock that each
//!    filler holds across its check and its copy, so no copy is in flight when the
//!    process is let go.
//!
//! After each round the uffd is closed and every dropped page must read zero (what
//! `MADV_DONTNEED` promises) and every other page its source. Prints, per scheme, the
//! rounds and pages that broke that.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::RwLock;

use anyhow::{Context, Result};

use super::fill::{pattern, Mapping, STEP};
use super::save_run;
use super::uffd::{self, UFFD_EVENT_REMOVE, UFFD_FEATURE_EVENT_REMOVE};

const PAGE: usize = 4096;
/// The mapping each round fills: 32 pieces of STEP bytes.
const LEN: usize = 32 * STEP;
/// Bytes the dropping thread drops at a time, and how many drops per round.
const DROP_LEN: usize = 64 << 10;
const DROPS: usize = 16;
const FILLERS: usize = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    Untracked,
    Tracked,
    Locked,
}

/// Rounds in which some page broke the promise, pages that did, and ranges dropped,
/// over all rounds.
#[derive(Debug, Default)]
pub struct Broken {
    pub rounds: usize,
    pub pages: usize,
    pub drops: usize,
}

pub fn run(rounds: usize) -> Result<()> {
    println!("| scheme | rounds | rounds with a wrong page | wrong pages |\n|---|---|---|---|");
    let mut raw = serde_json::Map::new();
    for scheme in [Scheme::Untracked, Scheme::Tracked, Scheme::Locked] {
        let b = rounds_of(scheme, rounds)?;
        println!("| {scheme:?} | {rounds} | {} | {} |", b.rounds, b.pages);
        raw.insert(format!("{scheme:?}"), serde_json::json!({ "rounds": rounds, "broken_rounds": b.rounds, "wrong_pages": b.pages, "drops": b.drops }));
    }
    save_run("fill-events", &serde_json::Value::Object(raw))
}

pub fn rounds_of(scheme: Scheme, rounds: usize) -> Result<Broken> {
    let source = pattern(LEN);
    let mut broken = Broken::default();
    for _ in 0..rounds {
        let (wrong, drops) = round(scheme, &source)?;
        broken.rounds += usize::from(wrong > 0);
        broken.pages += wrong;
        broken.drops += drops;
    }
    Ok(broken)
}

/// State shared by one round's threads.
struct Round<'a> {
    uffd: OwnedFd,
    dest: &'a Mapping,
    source: &'a [u8],
    scheme: Scheme,
    /// Ranges the reader learnt were dropped (offsets into the mapping).
    dropped: RwLock<Vec<(usize, usize)>>,
    next_piece: AtomicUsize,
    /// The piece each filler is on, for the dropping thread to aim just ahead of.
    at: [AtomicUsize; FILLERS],
    fill_done: AtomicBool,
    drops_done: AtomicBool,
}

/// One round; returns the pages that broke the promise and the ranges dropped.
fn round(scheme: Scheme, source: &[u8]) -> Result<(usize, usize)> {
    let dest = Mapping::new(LEN)?;
    let uffd = uffd::open(dest.addr as u64, LEN as u64, UFFD_FEATURE_EVENT_REMOVE)?;
    let r = Round {
        uffd,
        dest: &dest,
        source,
        scheme,
        dropped: RwLock::new(Vec::new()),
        next_piece: AtomicUsize::new(0),
        at: std::array::from_fn(|_| AtomicUsize::new(0)),
        fill_done: AtomicBool::new(false),
        drops_done: AtomicBool::new(false),
    };
    let drops = std::thread::scope(|s| -> Result<Vec<(usize, usize)>> {
        let reader = s.spawn(|| read_events(&r));
        let dropper = s.spawn(|| drop_ahead(&r));
        let fillers: Vec<_> = (0..FILLERS)
            .map(|i| {
                let r = &r;
                s.spawn(move || fill(r, i))
            })
            .collect();
        let filled: Result<()> = fillers
            .into_iter()
            .try_for_each(|f| f.join().expect("filler"));
        r.fill_done.store(true, Ordering::SeqCst);
        let drops = dropper.join().expect("dropper");
        r.drops_done.store(true, Ordering::SeqCst);
        reader.join().expect("reader")?;
        filled?;
        Ok(drops)
    })?;
    // Closing the uffd unregisters the mapping: a page never filled reads zero.
    drop(r);
    Ok((wrong_pages(&dest, source, &drops), drops.len()))
}

fn fill(r: &Round, i: usize) -> Result<()> {
    loop {
        let piece = r.next_piece.fetch_add(1, Ordering::SeqCst);
        if piece * STEP >= LEN {
            return Ok(());
        }
        r.at[i].store(piece, Ordering::SeqCst);
        // EAGAIN: a remove waits to be read. Let go of the lock so the reader can
        // read it, then copy what is left of the piece (bounded: 1 s of tries).
        let mut tries = 0;
        while !fill_piece(r, piece)? {
            tries += 1;
            if tries > 20_000 {
                anyhow::bail!("UFFDIO_COPY kept answering EAGAIN");
            }
            std::thread::sleep(std::time::Duration::from_micros(50));
        }
    }
}

/// Copies the piece less what is known dropped; false on EAGAIN.
fn fill_piece(r: &Round, piece: usize) -> Result<bool> {
    let (start, end) = (piece * STEP, (piece + 1) * STEP);
    let guard = (r.scheme == Scheme::Locked).then(|| r.dropped.read().unwrap());
    let parts = match (r.scheme, &guard) {
        (Scheme::Untracked, _) => vec![(start, end)],
        (_, Some(g)) => subtract(start, end, g),
        (_, None) => subtract(start, end, &r.dropped.read().unwrap().clone()),
    };
    for (a, b) in parts {
        let dst = r.dest.addr as u64 + a as u64;
        match uffd::copy(&r.uffd, dst, r.source[a..].as_ptr(), (b - a) as u64) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => return Ok(false),
            Err(e) => return Err(e).context("UFFDIO_COPY"),
        }
    }
    Ok(true)
}

/// [start, end) less the dropped ranges.
fn subtract(start: usize, end: usize, dropped: &[(usize, usize)]) -> Vec<(usize, usize)> {
    let mut out = vec![(start, end)];
    for &(d0, d1) in dropped {
        out = out
            .into_iter()
            .flat_map(|(a, b)| {
                if d1 <= a || b <= d0 {
                    vec![(a, b)]
                } else {
                    [(a, d0.max(a)), (d1.min(b), b)]
                        .into_iter()
                        .filter(|(x, y)| x < y)
                        .collect()
                }
            })
            .collect();
    }
    out
}

/// Drops DROP_LEN bytes just ahead of a filler, DROPS times or until the fill ends;
/// returns what it dropped (offsets). Each madvise waits until the reader reads its
/// event.
fn drop_ahead(r: &Round) -> Vec<(usize, usize)> {
    let mut drops = Vec::new();
    for k in 0..DROPS {
        if r.fill_done.load(Ordering::SeqCst) {
            break;
        }
        let piece = r.at[k % FILLERS].load(Ordering::SeqCst);
        // Halfway into the piece the filler is copying now: the part it reaches last.
        let off = (piece * STEP + STEP / 2 + (k % 8) * DROP_LEN).min(LEN - DROP_LEN);
        // SAFETY: a range inside the mapping, which outlives the round; MADV_DONTNEED
        // on private anonymous memory only drops pages.
        let rc =
            unsafe { libc::madvise(r.dest.addr.add(off).cast(), DROP_LEN, libc::MADV_DONTNEED) };
        if rc == 0 {
            drops.push((off, off + DROP_LEN));
        }
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
    drops
}

/// Reads events until both the fill and the drops are done; records REMOVE ranges.
fn read_events(r: &Round) -> Result<()> {
    while !(r.fill_done.load(Ordering::SeqCst) && r.drops_done.load(Ordering::SeqCst)) {
        if !uffd::readable(&r.uffd, 1) {
            continue;
        }
        // Locked: no copy is in flight while the event is read (the read is what
        // lets the process go on and zap), and none starts before it is recorded.
        let mut held = (r.scheme == Scheme::Locked).then(|| r.dropped.write().unwrap());
        for msg in uffd::read(&r.uffd)? {
            if msg.event != UFFD_EVENT_REMOVE || r.scheme == Scheme::Untracked {
                continue;
            }
            let base = r.dest.addr as u64;
            let range = ((msg.arg[0] - base) as usize, (msg.arg[1] - base) as usize);
            match held.as_mut() {
                Some(d) => d.push(range),
                None => r.dropped.write().unwrap().push(range),
            }
        }
    }
    Ok(())
}

/// Pages that break the promise: dropped ones not zero, others not their source.
fn wrong_pages(dest: &Mapping, source: &[u8], drops: &[(usize, usize)]) -> usize {
    let bytes = dest.bytes();
    (0..LEN / PAGE)
        .filter(|&p| {
            let (a, b) = (p * PAGE, (p + 1) * PAGE);
            let dropped = drops.iter().any(|&(d0, d1)| d0 <= a && b <= d1);
            match dropped {
                true => bytes[a..b].iter().any(|&x| x != 0),
                false => bytes[a..b] != source[a..b],
            }
        })
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subtract_leaves_what_was_not_dropped() {
        assert_eq!(
            subtract(0, 100, &[(10, 20), (50, 200)]),
            vec![(0, 10), (20, 50)]
        );
        assert_eq!(subtract(0, 100, &[(0, 100)]), vec![]);
        assert_eq!(subtract(0, 100, &[(100, 200)]), vec![(0, 100)]);
    }

    /// The scheme a many-threaded lazy-pages daemon needs: no dropped page comes back.
    #[test]
    fn locked_fillers_never_refill_a_dropped_range() {
        let b = rounds_of(Scheme::Locked, 20).unwrap();
        assert!(b.drops > 0, "nothing was dropped during the fills: {b:?}");
        assert_eq!((b.rounds, b.pages), (0, 0), "{b:?}");
    }

    /// The hazard is real: fillers that do not know of drops put pages back (within
    /// 50 rounds: a round whose fill outruns every drop shows nothing).
    #[test]
    fn untracked_fillers_refill_dropped_ranges() {
        let found = (0..50).any(|_| rounds_of(Scheme::Untracked, 1).unwrap().pages > 0);
        assert!(found, "50 rounds and no dropped page came back");
    }
}
