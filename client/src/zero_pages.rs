//! Zero pages left out of what `pull-restore` serves to CRIU.
//!
//! A page absent from a pagemap is left unpopulated by CRIU's restore, and an
//! unpopulated page of a private anonymous mapping reads as zero. So every all-zero
//! run of `pages-*.img` (already a zero extent in the manifest: never stored, never
//! fetched) can also stay off the pipe, provided its pages belong to a private
//! anonymous VMA: this module rewrites the served `pagemap-<pid>.img` without those
//! pages and serves `pages-<id>.img` without their bytes. A KV-cache-heavy GPU image is
//! mostly such zeros.
//!
//! Where an absent page would *not* read as zero it is kept: file-backed mappings
//! (the file's bytes would show through) and shared memory. Trees of more than one
//! process are served whole, because a child's private mappings may be restored as
//! copy-on-write from its parent's, where an absent page would show the parent's
//! bytes. Anything unexpected in the images (parent or lazy pages, unaligned runs, an
//! unknown layout) also means "serve everything": the plan is an optimisation, never
//! a requirement.
//!
//! CRIU image files: two magics (u32 LE), then entries, each a u32 LE length and a
//! protobuf message: [`entries`] keeps that framing, prost decodes and encodes the
//! messages (`mm_entry`, `pagemap_head`, `pagemap_entry` from CRIU's images/mm.proto
//! and images/pagemap.proto, vendored in client/proto/criu, see [`crate::criu_image`]).

use std::collections::HashMap;

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;
use snapreg_proto::manifest::Extent;

use crate::criu_image::{entries, page_count, put_entry, MmEntry, PagemapEntry, PagemapHead};

const PAGE: u64 = 4096;
/// VMA status bits (criu/include/image.h).
const VMA_AREA_REGULAR: u32 = 1 << 0;
const VMA_ANON_PRIVATE: u32 = 1 << 9;
const VMA_FILE_PRIVATE: u32 = 1 << 6;
const VMA_FILE_SHARED: u32 = 1 << 7;
const VMA_ANON_SHARED: u32 = 1 << 8;
/// Pagemap entry flags (criu/include/pagemap.h).
const PE_PARENT: u32 = 1 << 0;
const PE_PRESENT: u32 = 1 << 2;

/// A run of present pages: (address, bytes, offset in the pages file).
pub type PageRun = (u64, u64, u64);

/// A pagemap image's page id and its runs of pages present in this image.
pub fn page_runs(pagemap: &[u8]) -> Option<(u32, Vec<PageRun>)> {
    let (_, pm) = entries(pagemap)?;
    let head = PagemapHead::decode(*pm.first()?).ok()?;
    let mut cursor = 0u64;
    let mut runs = Vec::new();
    for raw in &pm[1..] {
        let e = PagemapEntry::decode(*raw).ok()?;
        if e.in_parent == Some(true) || e.flags.unwrap_or(PE_PRESENT) & PE_PRESENT == 0 {
            continue;
        }
        // Counts come from the image: a hostile one must not overflow (fuzz/criu_image).
        let len = page_count(&e).checked_mul(PAGE)?;
        runs.push((e.vaddr, len, cursor));
        cursor = cursor.checked_add(len)?;
    }
    Some((head.pages_id, runs))
}

/// What to serve instead of the manifest's own bytes.
#[derive(Debug, Default)]
pub struct ZeroPagePlan {
    /// Rewritten pagemap images, by file name.
    pub pagemaps: HashMap<String, Bytes>,
    /// Page images without the left-out runs, by file name.
    pub pages: HashMap<String, Vec<Extent>>,
    /// Bytes of zero pages that will not cross the pipe.
    pub bytes_left_out: u64,
    /// Pagemap entries (runs of pages CRIU reads with one read each) in the image,
    /// and in the rewritten pagemap: cutting zero runs out splits entries.
    pub runs: PageRuns,
}

/// Runs of pages in a pagemap, before and after the zero runs were cut out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct PageRuns {
    pub in_image: u64,
    pub served: u64,
}

/// Plans the left-out zero pages of an image whose files are `files` (name →
/// extents), given the bytes of its `mm-*.img` and `pagemap-*.img` files
/// (`small`). Returns an empty plan whenever it cannot be sure.
pub fn plan(files: &HashMap<String, Vec<Extent>>, small: &HashMap<String, Bytes>) -> ZeroPagePlan {
    let pagemaps: Vec<&String> = files
        .keys()
        .filter(|n| n.starts_with("pagemap-") && !n.starts_with("pagemap-shmem-"))
        .collect();
    let [pagemap_name] = pagemaps.as_slice() else {
        return ZeroPagePlan::default();
    };
    let pid = &pagemap_name["pagemap-".len()..pagemap_name.len() - ".img".len()];
    match plan_one(files, small, pagemap_name, &format!("mm-{pid}.img")) {
        Ok(p) => p,
        Err(why) => {
            tracing::info!("serving every zero page: {why}");
            ZeroPagePlan::default()
        }
    }
}

/// The names [`plan`] needs the bytes of.
pub fn needed(files: &HashMap<String, Vec<Extent>>) -> Vec<String> {
    files
        .keys()
        .filter(|n| {
            (n.starts_with("pagemap-") && !n.starts_with("pagemap-shmem-"))
                || (n.starts_with("mm-") && n.ends_with(".img"))
        })
        .cloned()
        .collect()
}

fn plan_one(
    files: &HashMap<String, Vec<Extent>>,
    small: &HashMap<String, Bytes>,
    pagemap_name: &str,
    mm_name: &str,
) -> Result<ZeroPagePlan, String> {
    let (_, mm) = small
        .get(mm_name)
        .and_then(|b| entries(b))
        .ok_or("no mm image")?;
    let vmas = MmEntry::decode(*mm.first().ok_or("empty mm image")?)
        .map_err(|e| format!("mm image: {e}"))?
        .vmas;
    let (magics, pm) = small
        .get(pagemap_name)
        .and_then(|b| entries(b))
        .ok_or("no pagemap image")?;
    let head_bytes = *pm.first().ok_or("empty pagemap image")?;
    let head = PagemapHead::decode(head_bytes).map_err(|e| format!("pagemap head: {e}"))?;
    let pages_name = format!("pages-{}.img", head.pages_id);
    let extents = files.get(&pages_name).ok_or(format!("no {pages_name}"))?;
    let mut pm_entries = Vec::new();
    for raw in &pm[1..] {
        let e = PagemapEntry::decode(*raw).map_err(|e| format!("pagemap entry: {e}"))?;
        let flags = e.flags.unwrap_or(PE_PRESENT);
        // Pages held by a parent image, or not in this one: not ours to reshape.
        // (PE_LAZY only says the pages could be served lazily; they are present.)
        if e.in_parent == Some(true) || flags & PE_PARENT != 0 || flags & PE_PRESENT == 0 {
            return Err(format!("pagemap entry with flags {flags:#x}"));
        }
        pm_entries.push(e);
    }
    let anon_private = |start: u64, end: u64| {
        vmas.iter().any(|v| {
            v.start <= start
                && end <= v.end
                && v.status & (VMA_AREA_REGULAR | VMA_ANON_PRIVATE)
                    == VMA_AREA_REGULAR | VMA_ANON_PRIVATE
                && v.status & (VMA_FILE_PRIVATE | VMA_FILE_SHARED | VMA_ANON_SHARED) == 0
        })
    };

    // Entry i covers file bytes [file_start[i], file_start[i] + nr_pages * PAGE).
    let mut file_start = Vec::with_capacity(pm_entries.len());
    let mut cursor = 0u64;
    for e in &pm_entries {
        file_start.push(cursor);
        cursor += page_count(e) * PAGE;
    }
    let total: u64 = extents.iter().map(Extent::len).sum();
    if cursor != total {
        return Err(format!(
            "the pagemap describes {cursor} bytes, {pages_name} holds {total}"
        ));
    }

    // File ranges to leave out: zero extents ∩ entries whose pages are anon-private.
    let mut cut: Vec<(u64, u64)> = Vec::new();
    let mut off = 0u64;
    for ext in extents {
        if let Extent::Zero { zero } = *ext {
            if off.is_multiple_of(PAGE) && zero.is_multiple_of(PAGE) {
                let (zs, ze) = (off, off + zero);
                let first = file_start.partition_point(|&s| s <= zs).saturating_sub(1);
                for (i, e) in pm_entries.iter().enumerate().skip(first) {
                    let (fs, fe) = (file_start[i], file_start[i] + page_count(e) * PAGE);
                    if fs >= ze {
                        break;
                    }
                    let (s, t) = (zs.max(fs), ze.min(fe));
                    if s < t && anon_private(e.vaddr + (s - fs), e.vaddr + (t - fs)) {
                        cut.push((s, t));
                    }
                }
            }
        }
        off += ext.len();
    }
    if cut.is_empty() {
        return Err("no zero run in private anonymous memory".into());
    }

    // The pagemap without the cut pages: each entry split around them.
    let mut out = BytesMut::new();
    out.put_slice(magics);
    out.put_u32_le(head_bytes.len() as u32);
    out.put_slice(head_bytes);
    let mut c = 0;
    let mut runs = PageRuns {
        in_image: pm_entries.len() as u64,
        served: 0,
    };
    for (i, e) in pm_entries.iter().enumerate() {
        let (fs, fe) = (file_start[i], file_start[i] + page_count(e) * PAGE);
        let mut at = fs;
        while c < cut.len() && cut[c].0 < fe {
            let (s, t) = cut[c];
            if s > at {
                put_entry(&mut out, e, e.vaddr + (at - fs), (s - at) / PAGE);
                runs.served += 1;
            }
            at = t;
            c += 1;
        }
        if at < fe {
            put_entry(&mut out, e, e.vaddr + (at - fs), (fe - at) / PAGE);
            runs.served += 1;
        }
    }

    // The page file without the cut bytes: cuts lie inside zero extents.
    let mut served = Vec::with_capacity(extents.len());
    let mut off = 0u64;
    let mut c = 0;
    let mut left_out = 0;
    for ext in extents {
        let (es, ee) = (off, off + ext.len());
        match *ext {
            Extent::Chunk { .. } => served.push(*ext),
            Extent::Zero { .. } => {
                let mut kept = 0;
                let mut at = es;
                while c < cut.len() && cut[c].0 < ee {
                    kept += cut[c].0 - at;
                    left_out += cut[c].1 - cut[c].0;
                    at = cut[c].1;
                    c += 1;
                }
                kept += ee - at;
                if kept > 0 {
                    served.push(Extent::Zero { zero: kept });
                }
            }
        }
        off = ee;
    }
    Ok(ZeroPagePlan {
        pagemaps: HashMap::from([(pagemap_name.to_string(), out.freeze())]),
        pages: HashMap::from([(pages_name, served)]),
        bytes_left_out: left_out,
        runs,
    })
}

/// A pagemap image of present runs (address, pages), for tests.
#[cfg(test)]
pub(crate) fn test_pagemap(pages_id: u32, runs: &[(u64, u64)]) -> Bytes {
    let runs: Vec<_> = runs
        .iter()
        .map(|&(vaddr, pages)| (vaddr, pages, PE_PRESENT | 1 << 1))
        .collect();
    test_pagemap_with_flags(pages_id, &runs)
}

/// A pagemap image of runs (address, pages, flags), for tests.
#[cfg(test)]
pub(crate) fn test_pagemap_with_flags(pages_id: u32, runs: &[(u64, u64, u32)]) -> Bytes {
    let mut b = BytesMut::new();
    b.put_u32_le(0x5456_4319);
    b.put_u32_le(0x5608_4025);
    let head = PagemapHead { pages_id }.encode_to_vec();
    b.put_u32_le(head.len() as u32);
    b.put_slice(&head);
    for &(vaddr, pages, flags) in runs {
        let e = PagemapEntry {
            vaddr,
            compat_nr_pages: 0,
            in_parent: None,
            flags: Some(flags),
            nr_pages: Some(pages),
        };
        put_entry(&mut b, &e, vaddr, pages);
    }
    b.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::criu_image::VmaEntry;

    fn image(msgs: &[Vec<u8>]) -> Bytes {
        let mut b = BytesMut::new();
        b.put_u32_le(0x5456_4319);
        b.put_u32_le(0x5608_4025);
        for m in msgs {
            b.put_u32_le(m.len() as u32);
            b.put_slice(m);
        }
        b.freeze()
    }

    fn digest(n: u8) -> snapreg_proto::Digest {
        snapreg_proto::Digest::of(&[n])
    }

    fn setup(status: u32) -> (HashMap<String, Vec<Extent>>, HashMap<String, Bytes>) {
        // One VMA at 0x10000 of 8 pages, all present: page 0 data, pages 1..7 zero
        // except page 5 data.
        let mm = MmEntry {
            vmas: vec![VmaEntry {
                start: 0x10000,
                end: 0x10000 + 8 * PAGE,
                status,
                ..VmaEntry::default()
            }],
            ..MmEntry::default()
        };
        let pm = image(&[
            PagemapHead { pages_id: 3 }.encode_to_vec(),
            PagemapEntry {
                vaddr: 0x10000,
                compat_nr_pages: 8,
                in_parent: None,
                flags: Some(PE_PRESENT | 1 << 1),
                nr_pages: None,
            }
            .encode_to_vec(),
        ]);
        let files = HashMap::from([
            ("pagemap-7.img".to_string(), vec![]),
            ("mm-7.img".to_string(), vec![]),
            (
                "pages-3.img".to_string(),
                vec![
                    Extent::Chunk {
                        chunk: digest(1),
                        len: PAGE,
                    },
                    Extent::Zero { zero: 4 * PAGE },
                    Extent::Chunk {
                        chunk: digest(2),
                        len: PAGE,
                    },
                    Extent::Zero { zero: 2 * PAGE },
                ],
            ),
        ]);
        let small = HashMap::from([
            ("mm-7.img".to_string(), image(&[mm.encode_to_vec()])),
            ("pagemap-7.img".to_string(), pm),
        ]);
        (files, small)
    }

    #[test]
    fn zero_runs_of_anonymous_private_memory_leave_the_pagemap() {
        let (files, small) = setup(VMA_AREA_REGULAR | VMA_ANON_PRIVATE);
        let p = plan(&files, &small);
        assert_eq!(p.bytes_left_out, 6 * PAGE);
        assert_eq!(
            p.runs,
            PageRuns {
                in_image: 1,
                served: 2
            }
        );
        assert_eq!(
            p.pages["pages-3.img"],
            vec![
                Extent::Chunk {
                    chunk: digest(1),
                    len: PAGE
                },
                Extent::Chunk {
                    chunk: digest(2),
                    len: PAGE
                },
            ]
        );
        let (_, pm) = entries(&p.pagemaps["pagemap-7.img"]).unwrap();
        let got: Vec<(u64, u64)> = pm[1..]
            .iter()
            .map(|m| {
                let e = PagemapEntry::decode(*m).unwrap();
                (e.vaddr, page_count(&e))
            })
            .collect();
        assert_eq!(got, vec![(0x10000, 1), (0x10000 + 5 * PAGE, 1)]);
    }

    #[test]
    fn file_backed_or_shared_memory_and_process_trees_are_served_whole() {
        for status in [
            VMA_AREA_REGULAR | VMA_FILE_PRIVATE,
            VMA_AREA_REGULAR | VMA_ANON_SHARED,
        ] {
            let (files, small) = setup(status);
            assert_eq!(plan(&files, &small).bytes_left_out, 0);
        }
        let (mut files, small) = setup(VMA_AREA_REGULAR | VMA_ANON_PRIVATE);
        files.insert("pagemap-8.img".into(), vec![]);
        assert_eq!(plan(&files, &small).bytes_left_out, 0);
    }
}
