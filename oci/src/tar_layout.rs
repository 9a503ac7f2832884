//! Tar framing of an uploaded blob: where the member data lies (so each member is
//! chunked on its own, and CRIU's `pages-*.img` on page boundaries, as a native push
//! chunks them). Generated layers are composed in `snapreg_client::oci_image`.
//!
//! [`segments`] splits a tar into consecutive byte ranges that cover it exactly:
//! framing (header blocks, extension members, padding, the end-of-archive blocks and
//! whatever follows them) and the data of each regular member. The split decides only
//! how bytes are chunked; a blob rebuilt from its segments is the uploaded bytes
//! whatever the tar says. Recognised: ustar/GNU headers (checksums checked), GNU
//! long names (`L`), PAX `path` and `size` records (`x`); global headers (`g`) and
//! anything else are framing.

use std::io::{self, Read, Seek, SeekFrom};

use snapreg_client::podman::tar::{checksum_ok, pax_records, trim_nul, BLOCK};

/// A byte range of an uploaded tar.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    pub offset: u64,
    pub len: u64,
    /// The member whose data this is; `None` for framing.
    pub member: Option<Member>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// The member's name without a leading `./` or `/`.
    pub path: String,
    pub mode: u32,
}

/// Why a stream is not a tar, and where that showed.
#[derive(Debug, thiserror::Error)]
#[error("not a tar at offset {offset}: {reason}")]
pub struct NotTar {
    pub offset: u64,
    pub reason: String,
}

/// Splits the tar in `input` (`len` bytes) into segments, or says where it stops
/// being one.
pub fn segments<R: Read + Seek>(input: &mut R, len: u64) -> Result<Vec<Segment>, NotTar> {
    let mut out = Vec::new();
    let mut framing_from = 0u64;
    let mut pos = 0u64;
    let mut long_name: Option<String> = None;
    let mut pax_path: Option<String> = None;
    let mut pax_size: Option<u64> = None;
    let not_tar = |offset, reason: String| NotTar { offset, reason };
    loop {
        let block = read_at(input, pos, BLOCK).map_err(|e| not_tar(pos, e))?;
        if block.iter().all(|&b| b == 0) {
            break;
        }
        if !checksum_ok(&block) {
            return Err(not_tar(pos, "header checksum does not match".into()));
        }
        let header = tar::Header::from_byte_slice(&block);
        let stored = header
            .entry_size()
            .map_err(|e| not_tar(pos, format!("header size field: {e}")))?;
        let typeflag = block[156];
        let size = match typeflag {
            b'0' | 0 | b'7' => pax_size.take().unwrap_or(stored),
            _ => stored,
        };
        let data = pos + BLOCK as u64;
        let padded = size.div_ceil(BLOCK as u64) * BLOCK as u64;
        if data + padded > len {
            let name = pax_path
                .clone()
                .or(long_name.clone())
                .unwrap_or_else(|| String::from_utf8_lossy(&header.path_bytes()).into_owned());
            return Err(not_tar(
                pos,
                format!("member {name:?} of {size} bytes runs past the end ({len} bytes)"),
            ));
        }
        match typeflag {
            b'L' => {
                let body = read_at(input, data, size as usize).map_err(|e| not_tar(data, e))?;
                long_name = Some(String::from_utf8_lossy(trim_nul(&body)).into_owned());
            }
            b'x' => {
                let body = read_at(input, data, size as usize).map_err(|e| not_tar(data, e))?;
                for (key, value) in pax_records(&body).map_err(|r| not_tar(data, r))? {
                    match key.as_str() {
                        "path" => pax_path = Some(String::from_utf8_lossy(&value).into_owned()),
                        "size" => {
                            pax_size = std::str::from_utf8(&value)
                                .ok()
                                .and_then(|v| v.parse().ok())
                        }
                        _ => {}
                    }
                }
            }
            b'0' | 0 | b'7' => {
                let raw = pax_path
                    .take()
                    .or(long_name.take())
                    .unwrap_or_else(|| String::from_utf8_lossy(&header.path_bytes()).into_owned());
                let path = raw
                    .trim_start_matches("./")
                    .trim_start_matches('/')
                    .to_string();
                let mode = header.mode().unwrap_or(0o644);
                out.push(framing(framing_from, data));
                out.push(Segment {
                    offset: data,
                    len: size,
                    member: Some(Member { path, mode }),
                });
                framing_from = data + size;
            }
            _ => {
                long_name = None;
                pax_path = None;
                pax_size = None;
            }
        }
        pos = data + padded;
    }
    out.push(framing(framing_from, len));
    out.retain(|s| s.len > 0 || s.member.is_some());
    Ok(out)
}

fn framing(from: u64, to: u64) -> Segment {
    Segment {
        offset: from,
        len: to - from,
        member: None,
    }
}

fn read_at<R: Read + Seek>(input: &mut R, at: u64, n: usize) -> Result<Vec<u8>, String> {
    let mut buf = vec![0u8; n];
    input
        .seek(SeekFrom::Start(at))
        .and_then(|_| input.read_exact(&mut buf))
        .map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => "the stream ends inside a header or member".to_string(),
            _ => e.to_string(),
        })?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_of(members: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in members {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o600);
            b.append_data(&mut h, name, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn segments_cover_the_tar_and_find_member_data() {
        let long = format!("checkpoint/{}", "x".repeat(150));
        let t = tar_of(&[("checkpoint/pages-1.img", &[7u8; 5000]), (&long, b"hi")]);
        let segs = segments(&mut io::Cursor::new(&t), t.len() as u64).unwrap();
        let mut at = 0;
        for s in &segs {
            assert_eq!(s.offset, at, "{segs:?}");
            at += s.len;
        }
        assert_eq!(at, t.len() as u64);
        let members: Vec<_> = segs.iter().filter_map(|s| s.member.as_ref()).collect();
        assert_eq!(members[0].path, "checkpoint/pages-1.img");
        assert_eq!(members[0].mode, 0o600);
        assert_eq!(members[1].path, long);
        let data = segs.iter().find(|s| s.member.is_some()).unwrap();
        assert_eq!(
            &t[data.offset as usize..][..data.len as usize],
            &[7u8; 5000][..]
        );
    }

    #[test]
    fn refuses_what_is_not_a_tar_naming_the_offset() {
        let junk = vec![1u8; 4096];
        let e = segments(&mut io::Cursor::new(&junk), 4096).unwrap_err();
        assert_eq!(e.offset, 0);
        let mut t = tar_of(&[("a", &[1u8; 3000])]);
        t.truncate(1500);
        let e = segments(&mut io::Cursor::new(&t), t.len() as u64).unwrap_err();
        assert!(e.reason.contains("past the end"), "{e}");
    }
}
