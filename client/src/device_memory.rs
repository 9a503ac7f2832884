//! Device-memory segments: the parts of a CRIU image that hold GPU memory.
//!
//! NVIDIA's checkpoint copies a process's device memory into new mappings of its
//! host address space. Those mappings are what appears in /proc/PID/maps between just
//! before and just after the CUDA checkpoint ([`new_ranges`]); through the process's
//! pagemap they become byte ranges of its `pages-*.img` ([`segments`]), recorded in
//! the manifest. They are the bulk of a GPU image and dedup across every snapshot of
//! the same model; `pull-restore` fetches their chunks ahead of CRIU with more
//! parallelism than the in-order serving window.

use std::collections::HashMap;

use snapreg_proto::manifest::{DeviceMemorySegment, Extent, Layer, Manifest};
use snapreg_proto::Digest;

use crate::zero_pages;

/// The address ranges (start, end) of `pid`'s mappings now.
pub fn mappings(pid: u32) -> Vec<(u64, u64)> {
    let Ok(maps) = std::fs::read_to_string(format!("/proc/{pid}/maps")) else {
        return Vec::new();
    };
    let mut out: Vec<(u64, u64)> = maps
        .lines()
        .filter_map(|l| {
            let (s, e) = l.split_whitespace().next()?.split_once('-')?;
            Some((
                u64::from_str_radix(s, 16).ok()?,
                u64::from_str_radix(e, 16).ok()?,
            ))
        })
        .collect();
    out.sort_unstable();
    out
}

/// What `after` maps that `before` did not (both sorted, non-overlapping).
pub fn new_ranges(before: &[(u64, u64)], after: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for &(s, e) in after {
        let mut at = s;
        let first = before.partition_point(|&(_, be)| be <= s);
        for &(bs, be) in &before[first..] {
            if bs >= e {
                break;
            }
            if bs > at {
                out.push((at, bs));
            }
            at = at.max(be);
        }
        if at < e {
            out.push((at, e));
        }
    }
    out
}

/// The byte ranges of `pages-<id>.img` that hold the pages of `ranges`, given the
/// process's pagemap image; adjacent ranges merged. Empty when the pagemap cannot be
/// read.
pub fn segments(pagemap: &[u8], ranges: &[(u64, u64)], layer: u32) -> Vec<DeviceMemorySegment> {
    let Some((pages_id, runs)) = zero_pages::page_runs(pagemap) else {
        return Vec::new();
    };
    let file = format!("pages-{pages_id}.img");
    let mut out: Vec<DeviceMemorySegment> = Vec::new();
    for (vaddr, len, file_off) in runs {
        let first = ranges.partition_point(|&(_, e)| e <= vaddr);
        for &(s, e) in &ranges[first..] {
            if s >= vaddr + len {
                break;
            }
            let (a, b) = (s.max(vaddr), e.min(vaddr + len));
            if a >= b {
                continue;
            }
            let offset = file_off + (a - vaddr);
            match out.last_mut() {
                Some(last) if last.offset + last.len == offset => last.len += b - a,
                _ => out.push(DeviceMemorySegment {
                    layer,
                    file: file.clone(),
                    offset,
                    len: b - a,
                }),
            }
        }
    }
    out
}

/// Device memory of a checkpointed tree: per PID, the ranges the CUDA checkpoint
/// added; with the pagemaps captured during the dump, the manifest's segments.
pub fn manifest_segments(
    added: &HashMap<u32, Vec<(u64, u64)>>,
    pagemaps: &HashMap<String, Vec<u8>>,
) -> Vec<DeviceMemorySegment> {
    let mut pids: Vec<_> = added.keys().copied().collect();
    pids.sort_unstable();
    pids.iter()
        .filter_map(|pid| {
            let pm = pagemaps.get(&format!("pagemap-{pid}.img"))?;
            Some(segments(pm, &added[pid], 0))
        })
        .flatten()
        .collect()
}

/// The chunks of `layer` (the process layer) that hold device memory, in image
/// order, each once.
pub fn chunks(manifest: &Manifest, layer: &Layer) -> Vec<Digest> {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for seg in &manifest.device_memory {
        let Some(file) = layer.files.iter().find(|f| f.path == seg.file) else {
            continue;
        };
        let mut off = 0;
        for e in &file.extents {
            let end = off + e.len();
            if let Extent::Chunk { chunk, .. } = e {
                if off < seg.offset + seg.len && seg.offset < end && seen.insert(*chunk) {
                    out.push(*chunk);
                }
            }
            off = end;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_ranges_are_what_the_checkpoint_added() {
        let before = [(0x1000, 0x3000), (0x8000, 0x9000)];
        let after = [(0x1000, 0x3000), (0x4000, 0x6000), (0x8000, 0xa000)];
        assert_eq!(
            new_ranges(&before, &after),
            vec![(0x4000, 0x6000), (0x9000, 0xa000)]
        );
        assert!(new_ranges(&after, &after).is_empty());
    }

    #[test]
    fn device_ranges_become_page_file_segments() {
        // Two runs: 4 pages at 0x10000 (file 0..16K), 4 pages at 0x40000 (16K..32K).
        let pm = zero_pages::test_pagemap(5, &[(0x10000, 4), (0x40000, 4)]);
        let segs = segments(&pm, &[(0x12000, 0x14000), (0x40000, 0x41000)], 0);
        let got: Vec<(&str, u64, u64)> = segs
            .iter()
            .map(|s| (s.file.as_str(), s.offset, s.len))
            .collect();
        // 0x12000..0x14000 is file 8K..16K; 0x40000..0x41000 is 16K..20K: merged.
        assert_eq!(got, vec![("pages-5.img", 0x2000, 0x3000)]);
    }
}
