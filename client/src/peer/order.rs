//! Which chunk a node takes from the registry next, when siblings fetch the same
//! snapshot: each starts at its own point of the chunk list (its tracker seat times
//! the golden ratio, so any number of seats spread evenly) and goes on in order;
//! when it reaches a chunk it should not fetch (a parent holds it, or it is done or
//! in flight), it jumps to the middle of the longest run of chunks it still may, the
//! part of the list farthest from everyone else's work. Siblings therefore take
//! different chunks from the registry and exchange them, which is what keeps the
//! registry's egress near one copy of the snapshot.

/// The fractional part of the golden ratio.
const PHI_FRACTION: f64 = 0.618_033_988_749_895;

#[derive(Debug)]
pub struct RegistryOrder {
    len: usize,
    cursor: usize,
}

impl RegistryOrder {
    /// Over a list of `len` chunks, for the node in `seat` (its join order).
    pub fn new(len: usize, seat: u32) -> Self {
        let start = (f64::from(seat) * PHI_FRACTION).fract();
        let cursor = ((start * len as f64) as usize).min(len.saturating_sub(1));
        RegistryOrder { len, cursor }
    }

    /// The next index to fetch from the registry among those `may` allows, or
    /// `None` when it allows none.
    pub fn next(&mut self, may: impl Fn(usize) -> bool) -> Option<usize> {
        if self.len == 0 {
            return None;
        }
        let at = if may(self.cursor) {
            self.cursor
        } else {
            let (start, len) = longest_run(self.len, &may)?;
            (start + len / 2) % self.len
        };
        self.cursor = (at + 1) % self.len;
        Some(at)
    }
}

/// The longest run of indices `may` allows, as (start, length), the list read as a
/// ring; `None` if it allows none.
fn longest_run(len: usize, may: &impl Fn(usize) -> bool) -> Option<(usize, usize)> {
    let mut best: Option<(usize, usize)> = None;
    let mut run_start = None;
    let mut first_run_len = 0;
    for i in 0..=len {
        let ok = i < len && may(i);
        match (ok, run_start) {
            (true, None) => run_start = Some(i),
            (false, Some(s)) => {
                if s == 0 {
                    first_run_len = i;
                }
                let mut run = (s, i - s);
                // The run reaching the end goes on with the one at the start.
                if i == len && first_run_len > 0 && s > 0 {
                    run.1 += first_run_len;
                }
                if best.is_none_or(|b| run.1 > b.1) {
                    best = Some(run);
                }
                run_start = None;
            }
            _ => {}
        }
    }
    best.map(|(s, l)| (s, l.min(len)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lone_node_goes_in_order() {
        let mut o = RegistryOrder::new(10, 0);
        let taken: Vec<usize> = (0..10).map(|_| o.next(|_| true).unwrap()).collect();
        assert_eq!(taken, (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn seats_start_apart() {
        let starts: Vec<usize> = (0..4)
            .map(|seat| RegistryOrder::new(1000, seat).next(|_| true).unwrap())
            .collect();
        assert_eq!(starts[0], 0);
        for (i, a) in starts.iter().enumerate() {
            for b in &starts[i + 1..] {
                assert!(a.abs_diff(*b) >= 100, "{starts:?}");
            }
        }
    }

    #[test]
    fn a_held_chunk_sends_the_cursor_to_the_middle_of_the_longest_gap() {
        // Held (not allowed): 3..6 and 20..22 of 30; the longest allowed run is
        // 6..20, whose middle is 13.
        let may = |i: usize| !(3..6).contains(&i) && !(20..22).contains(&i);
        let mut o = RegistryOrder::new(30, 0);
        assert_eq!(o.next(may), Some(0));
        assert_eq!(o.next(may), Some(1));
        assert_eq!(o.next(may), Some(2));
        assert_eq!(o.next(may), Some(13));
        assert_eq!(o.next(may), Some(14));
    }

    #[test]
    fn runs_wrap_around_and_none_is_none() {
        // Allowed: 0..2 and 7..10 of 10: one run of 5 across the end, starting at 7.
        let may = |i: usize| !(2..7).contains(&i);
        assert_eq!(longest_run(10, &may), Some((7, 5)));
        assert_eq!(longest_run(10, &|_| true), Some((0, 10)));
        let mut o = RegistryOrder::new(10, 0);
        assert_eq!(o.next(|_| false), None);
    }
}
