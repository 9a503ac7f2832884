//! The import and the export together: every archive the scan accepts comes back
//! byte for byte; every archive it refuses says where and why.

use std::collections::{BTreeMap, HashSet};
use std::io::{self, Read, Write};

use super::export::assemble;
use super::import::{normalize, open_archive, scan, FileStart, Place, ScanError};
use super::tar::{padding_of, pax_records};
use super::{ArchiveIndex, CHECKPOINT_DIR};

type Files = BTreeMap<String, (Place, String, u32, Vec<u8>)>;

/// Scans an archive held in memory; every member's data is read by its own thread,
/// as chunk_stream would.
fn scan_bytes(bytes: Vec<u8>) -> std::result::Result<(ArchiveIndex, Files), ScanError> {
    scan_reader(Box::new(io::Cursor::new(bytes)), "none")
}

fn scan_reader(
    input: Box<dyn Read + Send>,
    compression: &'static str,
) -> std::result::Result<(ArchiveIndex, Files), ScanError> {
    let mut readers = Vec::new();
    let index = scan(input, "test.tar", compression, &mut |mut f: FileStart| {
        let meta = (f.member.clone(), f.place, f.path.clone(), f.mode, f.size);
        readers.push((
            meta,
            std::thread::spawn(move || {
                let mut v = Vec::new();
                f.data.read_to_end(&mut v).map(|_| v)
            }),
        ));
        true
    });
    let mut files = Files::new();
    for ((member, place, path, mode, size), h) in readers {
        if let Ok(data) = h.join().unwrap() {
            assert_eq!(data.len() as u64, size, "{member}");
            files.insert(normalize(&member).to_string(), (place, path, mode, data));
        }
    }
    index.map(|i| (i, files))
}

/// scan, then assemble from a directory laid out as a pull would: the original bytes.
fn round_trip(bytes: &[u8]) -> (ArchiveIndex, Files) {
    let (index, files) = scan_bytes(bytes.to_vec()).unwrap_or_else(|e| panic!("{e:?}"));
    let dir = tempfile::tempdir().unwrap();
    let mut pulled = HashSet::new();
    for (rel, (place, path, _, data)) in &files {
        let on_disk = match place {
            Place::Process => format!("{CHECKPOINT_DIR}/{path}"),
            _ => path.clone(),
        };
        assert_eq!(&on_disk, rel);
        let p = dir.path().join(&on_disk);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, data).unwrap();
        pulled.insert(on_disk);
    }
    let out_path = dir.path().join("out.tar");
    let mut out = std::fs::File::create(&out_path).unwrap();
    // Through JSON, as it travels.
    let index2: ArchiveIndex =
        serde_json::from_slice(&serde_json::to_vec(&index).unwrap()).unwrap();
    assemble(&index2, dir.path(), &pulled, &mut out, &out_path).unwrap();
    drop(out);
    let back = std::fs::read(&out_path).unwrap();
    assert_eq!(back.len(), bytes.len());
    assert!(back == bytes, "export differs from the original");
    (index, files)
}

fn data(seed: u8, n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn gnu_header(kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(mode);
    h.set_mtime(1_700_000_000);
    h.set_uid(1000);
    h.set_gid(1000);
    h.set_username("podman").unwrap();
    h
}

/// A GNU-format archive as Podman might write it, padded to a 10240-byte record.
fn podman_like() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let dir = |b: &mut tar::Builder<Vec<u8>>, p: &str| {
        let mut h = gnu_header(tar::EntryType::Directory, 0, 0o755);
        b.append_data(&mut h, p, io::empty()).unwrap();
    };
    let file = |b: &mut tar::Builder<Vec<u8>>, p: &str, d: &[u8], mode: u32| {
        let mut h = gnu_header(tar::EntryType::Regular, d.len() as u64, mode);
        b.append_data(&mut h, p, d).unwrap();
    };
    dir(&mut b, "checkpoint/");
    file(&mut b, "checkpoint/inventory.img", &data(1, 44), 0o600);
    file(
        &mut b,
        "checkpoint/pages-1.img",
        &data(2, (1 << 20) + 4096 * 3 + 17),
        0o600,
    );
    file(&mut b, "checkpoint/dump.log", &data(3, 5000), 0o644);
    file(&mut b, "checkpoint/empty.img", &[], 0o600);
    file(&mut b, "config.dump", b"{\"id\":\"abc\"}", 0o600);
    file(&mut b, "spec.dump", b"{\"ociVersion\":\"1.0\"}", 0o600);
    file(&mut b, "rootfs-diff.tar", &data(4, 10240), 0o600);
    let long = format!("volumes/{}/data.bin", "x".repeat(120));
    file(&mut b, &long, &data(5, 700), 0o640);
    let mut h = gnu_header(tar::EntryType::Symlink, 0, 0o777);
    b.append_link(&mut h, "checkpoint/link", "inventory.img")
        .unwrap();
    let mut h = gnu_header(tar::EntryType::Link, 0, 0o600);
    b.append_link(&mut h, "hard.dump", "config.dump").unwrap();
    let mut out = b.into_inner().unwrap();
    out.resize(out.len().div_ceil(10240) * 10240, 0);
    out
}

/// One raw ustar header block with any name (even one tar::Builder refuses).
fn raw_header(name: &[u8], kind: u8, size: u64) -> Vec<u8> {
    let mut h = tar::Header::new_ustar();
    h.as_old_mut().name[..name.len()].copy_from_slice(name);
    h.as_old_mut().linkflag = [kind];
    h.set_size(size);
    h.set_mode(0o644);
    h.set_mtime(1_700_000_000);
    h.set_cksum();
    h.as_bytes().to_vec()
}

fn pax(records: &[(&str, &str)]) -> Vec<u8> {
    let mut body = Vec::new();
    for (k, v) in records {
        let rest = format!(" {k}={v}\n");
        let mut len = rest.len() + 1;
        while format!("{len}").len() + rest.len() != len {
            len += 1;
        }
        body.extend_from_slice(format!("{len}{rest}").as_bytes());
    }
    let mut out = raw_header(b"PaxHeaders/x", b'x', body.len() as u64);
    out.extend_from_slice(&body);
    out.resize(out.len() + padding_of(body.len() as u64), 0);
    out
}

fn member(name: &[u8], kind: u8, d: &[u8]) -> Vec<u8> {
    let mut out = raw_header(name, kind, d.len() as u64);
    out.extend_from_slice(d);
    out.resize(out.len() + padding_of(d.len() as u64), 0);
    out
}

fn finish(mut v: Vec<u8>) -> Vec<u8> {
    v.extend_from_slice(&[0u8; 1024]);
    v
}

#[test]
fn gnu_archive_round_trips_byte_identical() {
    let bytes = podman_like();
    let (index, files) = round_trip(&bytes);
    assert_eq!(index.trailer_len % 512, 0);
    assert!(index.trailer_len >= 1024);
    assert!(index.trailer_hex.is_none());
    let (place, path, mode, _) = &files["checkpoint/pages-1.img"];
    assert_eq!(
        (*place, path.as_str(), *mode),
        (Place::Process, "pages-1.img", 0o600)
    );
    assert_eq!(files["rootfs-diff.tar"].0, Place::Rootfs);
    assert_eq!(files["config.dump"].0, Place::Extra);
    let long = files.keys().find(|k| k.starts_with("volumes/")).unwrap();
    assert!(
        long.ends_with("/data.bin") && long.len() > 100,
        "GNU long name: {long}"
    );
    let kinds: Vec<&str> = index.members.iter().map(|m| m.kind.as_str()).collect();
    assert_eq!(kinds.iter().filter(|k| **k == "file").count(), 8);
    assert!(kinds.contains(&"dir") && kinds.contains(&"symlink") && kinds.contains(&"hardlink"));
    // The GNU long-name member travels inside the header of the member it names.
    let m = index
        .members
        .iter()
        .find(|m| m.name.starts_with("volumes/"))
        .unwrap();
    assert_eq!(hex::decode(&m.header_hex).unwrap().len(), 512 * 3);
}

#[test]
fn pax_headers_name_and_size_members() {
    let long = format!("checkpoint/{}.img", "p".repeat(150));
    let d = data(9, 3000);
    let mut v = member(b"checkpoint/inventory.img", b'0', b"inv");
    v.extend(pax(&[
        ("path", &long),
        ("mtime", "1700000000.5"),
        ("size", "3000"),
    ]));
    // The header's own size field says 0: the PAX record wins.
    let mut h = raw_header(b"checkpoint/truncated-name", b'0', 0);
    h.extend_from_slice(&d);
    h.resize(h.len() + padding_of(3000), 0);
    v.extend(h);
    // A global header, and a value holding a newline.
    v.extend(
        pax(&[("comment", "two\nlines")])
            .into_iter()
            .enumerate()
            .map(|(i, b)| if i == 156 { b'g' } else { b }),
    );
    let v = finish(v);
    // The 'g' header's checksum changed with its type: recompute it.
    let mut v = v;
    let g_at = v.len() - 1024 - 1024;
    let mut hdr = tar::Header::new_old();
    hdr.as_mut_bytes().copy_from_slice(&v[g_at..g_at + 512]);
    hdr.set_cksum();
    v[g_at..g_at + 512].copy_from_slice(hdr.as_bytes());
    let (index, files) = round_trip(&v);
    assert_eq!(files[long.as_str()].3, d);
    assert_eq!(index.members.last().unwrap().kind, "extension");
}

#[test]
fn compression_is_found_by_magic_bytes_not_by_name() {
    let bytes = podman_like();
    let t = tempfile::tempdir().unwrap();
    let gz = t.path().join("a.tar"); // misleading names on purpose
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(&bytes).unwrap();
    std::fs::write(&gz, e.finish().unwrap()).unwrap();
    let zst = t.path().join("b.tar.gz");
    std::fs::write(&zst, zstd::encode_all(&bytes[..], 3).unwrap()).unwrap();
    let plain = t.path().join("c.tar.zst");
    std::fs::write(&plain, &bytes).unwrap();
    for (path, want) in [(&gz, "gzip"), (&zst, "zstd"), (&plain, "none")] {
        let (input, found) = open_archive(path).unwrap();
        assert_eq!(found, want);
        let (index, files) = scan_reader(input, found).unwrap();
        assert_eq!(index.compression, want);
        assert_eq!(files.len(), 8);
    }
    let xz = t.path().join("d.tar");
    std::fs::write(&xz, b"\xfd7zXZ\0rest").unwrap();
    match open_archive(&xz) {
        Err(e) => assert!(e.to_string().contains("xz"), "{e}"),
        Ok(_) => panic!("xz accepted"),
    }
}

fn scan_err(bytes: Vec<u8>) -> String {
    match scan_bytes(bytes) {
        Err(ScanError::Failed(e)) => e.to_string(),
        Err(ScanError::Cancelled) => panic!("cancelled"),
        Ok(_) => panic!("accepted"),
    }
}

#[test]
fn truncated_archives_are_refused_clearly() {
    let bytes = podman_like();
    // Inside pages-1.img's data, at a header boundary, inside a header, in the marker.
    let (index, _) = scan_bytes(bytes.clone()).unwrap();
    let end = bytes.len() - index.trailer_len as usize;
    for cut in [600 * 1024, end, end - 300] {
        let e = scan_err(bytes[..cut].to_vec());
        assert!(e.contains("truncated"), "cut at {cut}: {e}");
    }
    // Compressed: cut the gzip stream.
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(&bytes).unwrap();
    let gz = enc.finish().unwrap();
    let cut = gz[..gz.len() / 2].to_vec();
    let input = Box::new(flate2::read::MultiGzDecoder::new(io::Cursor::new(cut)));
    match scan_reader(input, "gzip") {
        Err(ScanError::Failed(e)) => {
            let e = e.to_string();
            assert!(e.contains("truncated"), "{e}");
        }
        _ => panic!("truncated gzip accepted"),
    }
}

#[test]
fn escaping_names_are_refused() {
    for name in [
        &b"../evil"[..],
        b"/etc/passwd",
        b"checkpoint/../../x",
        b"./../x",
    ] {
        let mut v = member(b"checkpoint/inventory.img", b'0', b"inv");
        v.extend(member(name, b'0', b"boom"));
        let e = scan_err(finish(v));
        assert!(
            e.contains("outside"),
            "{}: {e}",
            String::from_utf8_lossy(name)
        );
    }
    // A symlink's name is checked too; its target is never followed.
    let mut v = member(b"checkpoint/inventory.img", b'0', b"inv");
    v.extend(raw_header(b"../link", b'2', 0));
    assert!(scan_err(finish(v)).contains("outside"));
    // "./" prefixes are fine.
    let mut v = raw_header(b"./", b'5', 0);
    v.extend(member(b"./checkpoint/inventory.img", b'0', b"inv"));
    let (_, files) = round_trip(&finish(v));
    assert!(files.contains_key("checkpoint/inventory.img"));
}

#[test]
fn archives_that_are_not_checkpoints_are_refused() {
    assert!(scan_err(b"hello, not a tar".repeat(100)).contains("not a tar archive"));
    assert!(scan_err(Vec::new()).contains("empty"));
    let e = scan_err(finish(member(b"config.dump", b'0', b"{}")));
    assert!(e.contains("inventory.img"), "{e}");
    let mut v = member(b"checkpoint/inventory.img", b'0', b"inv");
    v.extend(member(b"checkpoint/inventory.img", b'0', b"inv"));
    assert!(scan_err(finish(v)).contains("twice"));
    let mut v = member(b"checkpoint/inventory.img", b'0', b"inv");
    v.extend(member(b"podman-archive/x", b'0', b"x"));
    assert!(scan_err(finish(v)).contains("collides"));
    let mut v = member(b"checkpoint/inventory.img", b'0', b"inv");
    v.extend(member(b"sparse", b'S', b""));
    assert!(scan_err(finish(v)).contains("sparse"));
    // A corrupt header after the first.
    let mut v = member(b"checkpoint/inventory.img", b'0', b"inv");
    let mut bad = member(b"x", b'0', b"x");
    bad[0] ^= 1;
    v.extend(bad);
    assert!(scan_err(finish(v)).contains("checksum"));
}

#[test]
fn odd_padding_and_trailers_are_kept() {
    let mut v = member(b"checkpoint/inventory.img", b'0', b"inv");
    let n = v.len();
    v[n - 1] = 0xAA; // garbage in the padding after the data
    v.extend_from_slice(&[0u8; 1024]);
    v.extend_from_slice(b"junk after the end marker");
    let (index, _) = round_trip(&v);
    assert!(index.members[0].padding_hex.is_some());
    assert!(index.trailer_hex.is_some());
    // A lone zero block followed by another member is not an end.
    let mut v = member(b"checkpoint/inventory.img", b'0', b"inv");
    v.extend_from_slice(&[0u8; 512]);
    v.extend(member(b"more", b'0', b"x"));
    assert!(scan_err(finish(v)).contains("lone zero block"));
}

#[test]
fn a_consumer_that_goes_away_stops_the_scan() {
    let r = scan(
        Box::new(io::Cursor::new(podman_like())),
        "t",
        "none",
        &mut |_| false,
    );
    assert!(matches!(r, Err(ScanError::Cancelled)));
    // The reader dropped mid-member: the scanner stops too.
    let r = scan(
        Box::new(io::Cursor::new(podman_like())),
        "t",
        "none",
        &mut |f| {
            drop(f.data);
            true
        },
    );
    assert!(matches!(r, Err(ScanError::Cancelled)));
}

#[test]
fn pax_records_honour_their_lengths() {
    let recs = pax_records(b"12 path=a\nb\n12 size=300\n").unwrap();
    assert_eq!(recs[0], ("path".into(), b"a\nb".to_vec()));
    assert_eq!(recs[1], ("size".into(), b"300".to_vec()));
    assert!(pax_records(b"99 path=x\n").is_err());
    assert_eq!(normalize("./checkpoint/"), "checkpoint");
    assert_eq!(normalize("."), "");
    assert_eq!(normalize("./"), "");
}
