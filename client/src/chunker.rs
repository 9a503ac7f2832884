//! Content-defined chunking of one byte stream into chunks and zero runs.
//!
//! FastCDC (v2020, normalization level 1) finds cut points from content, so an insert
//! near the start of a file moves only the chunks around it. Two refinements for
//! memory images:
//!
//! - **Page alignment.** In CRIU `pages-*.img` a cut point is rounded down to a 4 KiB
//!   boundary of the file (up, if that would make an empty chunk). The same pages at
//!   another page-file offset — another run of the program, another address — then cut
//!   the same way once the chunker has resynchronised, because every shift is a
//!   multiple of 4 KiB.
//! - **Zero runs.** A run of all-zero 4 KiB blocks (aligned to the file) at least
//!   [`ChunkerConfig::zero_run_min`] long becomes a [`Piece::Zero`] and is never
//!   hashed, stored or sent; pre-allocated KV caches are gigabytes of them. Once a
//!   run has started, every following zero block extends it.
//!
//! The chunker reads through a buffer of `max_size + zero_run_min` bytes plus slack:
//! a file is never held in memory whole.

use std::io::{self, Read};

use snapreg_proto::manifest::ChunkerParams;

pub const BLOCK: usize = 4096;

#[derive(Clone, Debug)]
pub struct ChunkerConfig {
    pub min_size: usize,
    pub avg_size: usize,
    pub max_size: usize,
    pub zero_run_min: usize,
    /// Glob-like patterns (`prefix*suffix`) of file names chunked page-aligned.
    pub page_aligned: Vec<String>,
}

impl Default for ChunkerConfig {
    /// 512 KiB average: see bench/RESULTS.md (chunk size vs dedup vs object count).
    fn default() -> Self {
        ChunkerConfig {
            min_size: 128 << 10,
            avg_size: 512 << 10,
            max_size: 2 << 20,
            zero_run_min: 64 << 10,
            page_aligned: vec!["pages-*.img".into()],
        }
    }
}

impl ChunkerConfig {
    /// The configuration a manifest was chunked with (so a re-chunk cuts the same).
    pub fn from_params(p: &ChunkerParams) -> Self {
        ChunkerConfig {
            min_size: p.min_size as usize,
            avg_size: p.avg_size as usize,
            max_size: p.max_size as usize,
            zero_run_min: p.zero_run_min as usize,
            page_aligned: p.page_aligned.clone(),
        }
    }

    pub fn params(&self) -> ChunkerParams {
        ChunkerParams {
            algorithm: "fastcdc-v2020".into(),
            min_size: self.min_size as u32,
            avg_size: self.avg_size as u32,
            max_size: self.max_size as u32,
            page_aligned: self.page_aligned.clone(),
            zero_run_min: self.zero_run_min as u32,
        }
    }

    /// Whether a file (by its base name) is chunked on page boundaries.
    pub fn is_page_aligned(&self, path: &str) -> bool {
        let name = path.rsplit('/').next().unwrap_or(path);
        self.page_aligned
            .iter()
            .any(|pat| match pat.split_once('*') {
                Some((pre, suf)) => {
                    name.len() >= pre.len() + suf.len()
                        && name.starts_with(pre)
                        && name.ends_with(suf)
                }
                None => name == pat,
            })
    }
}

/// One piece of a stream, in order.
#[derive(Debug, PartialEq, Eq)]
pub enum Piece {
    Zero(u64),
    Data(Vec<u8>),
}

pub struct Chunker<R> {
    reader: R,
    cfg: ChunkerConfig,
    aligned: bool,
    mask_s: u64,
    mask_l: u64,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    eof: bool,
    /// File offset of `buf[start]`.
    offset: u64,
    in_zero_run: bool,
}

impl<R: Read> Chunker<R> {
    pub fn new(reader: R, cfg: ChunkerConfig, aligned: bool) -> Self {
        let (mask_s, mask_l) =
            fastcdc::v2020::select_masks(cfg.avg_size, fastcdc::v2020::Normalization::Level1);
        let cap = cfg.max_size + cfg.zero_run_min + 2 * BLOCK;
        Chunker {
            reader,
            aligned,
            mask_s,
            mask_l,
            buf: vec![0; 2 * cap],
            cfg,
            start: 0,
            end: 0,
            eof: false,
            offset: 0,
            in_zero_run: false,
        }
    }

    /// Bytes the chunker wants buffered before deciding (unless at EOF).
    fn want(&self) -> usize {
        self.cfg.max_size + self.cfg.zero_run_min + BLOCK
    }

    fn fill(&mut self) -> io::Result<()> {
        while !self.eof && self.end - self.start < self.want() {
            if self.end == self.buf.len() {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            match self.reader.read(&mut self.buf[self.end..]) {
                Ok(0) => self.eof = true,
                Ok(n) => self.end += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Length of the all-zero run of whole blocks at the start of `data`, which
    /// begins at file offset `off`. A trailing partial block counts at EOF.
    fn zero_prefix(&self, data: &[u8], off: u64) -> usize {
        let mut pos = 0;
        let first = (BLOCK - (off as usize % BLOCK)) % BLOCK;
        if first != 0 {
            return 0; // runs start on block boundaries only
        }
        while pos < data.len() {
            let end = (pos + BLOCK).min(data.len());
            if end - pos < BLOCK && !self.eof {
                break;
            }
            if !is_zero(&data[pos..end]) {
                break;
            }
            pos = end;
        }
        pos
    }

    /// Offset in `data` (which starts at file offset `off`) of the first block that
    /// begins a zero run of at least `zero_run_min`, searching starts below `limit`.
    fn next_zero_run(&self, data: &[u8], off: u64, limit: usize) -> Option<usize> {
        let mut pos = (BLOCK - (off as usize % BLOCK)) % BLOCK;
        while pos < limit && pos < data.len() {
            let run = self.zero_prefix(&data[pos..], off + pos as u64);
            if run >= self.cfg.zero_run_min || (run > 0 && self.eof && pos + run == data.len()) {
                return Some(pos);
            }
            pos += run.max(BLOCK);
        }
        None
    }

    fn next_piece(&mut self) -> io::Result<Option<Piece>> {
        self.fill()?;
        if self.start == self.end {
            return Ok(None);
        }
        let data = &self.buf[self.start..self.end];
        let zeros = self.zero_prefix(data, self.offset);
        let starts_run = zeros >= self.cfg.zero_run_min || (self.eof && zeros == data.len());
        if zeros > 0 && (self.in_zero_run || starts_run) {
            self.in_zero_run = true;
            self.advance(zeros);
            return Ok(Some(Piece::Zero(zeros as u64)));
        }
        self.in_zero_run = false;
        let window = data.len().min(self.cfg.max_size);
        let region = self
            .next_zero_run(data, self.offset, window)
            .unwrap_or(window);
        let (_, mut cut) = fastcdc::v2020::cut(
            &data[..region],
            self.cfg.min_size,
            self.cfg.avg_size,
            self.cfg.max_size,
            self.mask_s,
            self.mask_l,
            self.mask_s << 1,
            self.mask_l << 1,
        );
        if self.aligned && cut < region {
            let off = self.offset as usize % BLOCK;
            let down = (off + cut) / BLOCK * BLOCK - off;
            cut = if down > 0 {
                down
            } else {
                ((off + cut).div_ceil(BLOCK) * BLOCK - off).min(region)
            };
        }
        let piece = data[..cut].to_vec();
        self.advance(cut);
        Ok(Some(Piece::Data(piece)))
    }

    fn advance(&mut self, n: usize) {
        self.start += n;
        self.offset += n as u64;
    }
}

impl<R: Read> Iterator for Chunker<R> {
    type Item = io::Result<Piece>;
    fn next(&mut self) -> Option<Self::Item> {
        self.next_piece().transpose()
    }
}

fn is_zero(b: &[u8]) -> bool {
    // Word-wise: ~10x faster than a byte loop, and zero pages dominate KV-heavy images.
    // SAFETY: every bit pattern is a valid u128, and align_to only reinterprets the
    // aligned middle of the slice.
    let (head, words, tail) = unsafe { b.align_to::<u128>() };
    head.iter().all(|&x| x == 0) && words.iter().all(|&x| x == 0) && tail.iter().all(|&x| x == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(seed: u64, n: usize) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1; // distinct seeds, distinct streams
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    fn pieces(data: &[u8], aligned: bool) -> Vec<Piece> {
        Chunker::new(data, ChunkerConfig::default(), aligned)
            .collect::<io::Result<_>>()
            .unwrap()
    }

    fn reassemble(ps: &[Piece]) -> Vec<u8> {
        let mut out = Vec::new();
        for p in ps {
            match p {
                Piece::Zero(n) => out.resize(out.len() + *n as usize, 0),
                Piece::Data(d) => out.extend_from_slice(d),
            }
        }
        out
    }

    fn data_chunks(ps: &[Piece]) -> Vec<blake3::Hash> {
        ps.iter()
            .filter_map(|p| {
                if let Piece::Data(d) = p {
                    Some(blake3::hash(d))
                } else {
                    None
                }
            })
            .collect()
    }

    /// A reader that returns short, odd-sized reads: chunking must not depend on them.
    struct Dribble<'a>(&'a [u8], usize);
    impl Read for Dribble<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.1 = self.1 * 7 % 65_521 + 1;
            let n = self.1.min(buf.len()).min(self.0.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    #[test]
    fn deterministic_and_lossless_whatever_the_read_sizes() {
        let data = noise(1, 9 << 20);
        for aligned in [false, true] {
            let a = pieces(&data, aligned);
            let b: Vec<Piece> = Chunker::new(Dribble(&data, 3), ChunkerConfig::default(), aligned)
                .map(Result::unwrap)
                .collect();
            assert_eq!(a, b);
            assert_eq!(reassemble(&a), data);
            assert!(a.len() > 4, "expected several chunks, got {}", a.len());
            for p in &a[..a.len() - 1] {
                if let Piece::Data(d) = p {
                    assert!(d.len() <= ChunkerConfig::default().max_size);
                }
            }
        }
    }

    #[test]
    fn page_aligned_cuts_fall_on_4k_boundaries() {
        let data = noise(2, 8 << 20);
        let ps = pieces(&data, true);
        let mut off = 0;
        for p in &ps[..ps.len() - 1] {
            if let Piece::Data(d) = p {
                off += d.len();
                assert_eq!(off % BLOCK, 0, "cut at {off}");
            }
        }
        assert!(!pieces(&data, false)
            .iter()
            .all(|p| matches!(p, Piece::Data(d) if d.len() % BLOCK == 0)));
    }

    #[test]
    fn pages_shifted_by_whole_pages_dedup() {
        let body = noise(3, 16 << 20);
        let mut shifted = noise(4, 37 * BLOCK);
        shifted.extend_from_slice(&body);
        let a: std::collections::HashSet<_> =
            data_chunks(&pieces(&body, true)).into_iter().collect();
        let b = data_chunks(&pieces(&shifted, true));
        let shared = b.iter().filter(|h| a.contains(h)).count();
        assert!(
            shared + 3 >= b.len(),
            "only {shared} of {} chunks shared",
            b.len()
        );
    }

    #[test]
    fn insert_near_start_changes_only_nearby_chunks() {
        let data = noise(5, 16 << 20);
        let mut edited = data.clone();
        edited.splice(1000..1000, b"hello".iter().copied());
        let a: std::collections::HashSet<_> =
            data_chunks(&pieces(&data, false)).into_iter().collect();
        let b = data_chunks(&pieces(&edited, false));
        let changed = b.iter().filter(|h| !a.contains(h)).count();
        assert!(changed <= 2, "{changed} of {} chunks changed", b.len());
    }

    #[test]
    fn zero_runs_become_zero_pieces() {
        let mut data = noise(6, 300_000);
        data.resize(data.len() + (5 << 20), 0); // a 5 MiB hole, not block-aligned start
        data.extend(noise(7, 100_000));
        data.resize(data.len() + 8192, 0); // too short to be a run in the middle...
        data.extend(noise(8, 10));
        data.resize(data.len() + 3 * BLOCK, 0); // ...but a trailing run at EOF counts
        let ps = pieces(&data, false);
        assert_eq!(reassemble(&ps), data);
        let zero: u64 = ps
            .iter()
            .map(|p| if let Piece::Zero(n) = p { *n } else { 0 })
            .sum();
        assert!(
            zero >= (5 << 20) - BLOCK as u64,
            "only {zero} zero bytes elided"
        );
        for p in &ps {
            if let Piece::Data(d) = p {
                assert!(
                    !d.chunks(BLOCK)
                        .filter(|c| c.len() == BLOCK)
                        .collect::<Vec<_>>()
                        .windows(16)
                        .any(|w| w.iter().all(|c| is_zero(c))),
                    "zero run left in data"
                );
            }
        }
        let all_zero = vec![0u8; 3 << 20];
        assert_eq!(pieces(&all_zero, true), vec![Piece::Zero(3 << 20)]);
        assert_eq!(pieces(&[], true), vec![]);
    }

    #[test]
    fn page_alignment_patterns() {
        let c = ChunkerConfig::default();
        assert!(c.is_page_aligned("pages-1.img"));
        assert!(c.is_page_aligned("rank0/pages-12.img"));
        assert!(!c.is_page_aligned("pagemap-1.img"));
        assert!(!c.is_page_aligned("core-1.img"));
    }
}
