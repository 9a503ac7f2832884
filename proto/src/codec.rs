//! The chunk object codec: how one chunk is stored and sent.
//!
//! ```text
//! offset  size  field
//! 0       4     magic "SRC1"
//! 4       1     codec: 0 = raw, 1 = zstd
//! 5       3     reserved, zero
//! 8       4     uncompressed length, u32 little-endian
//! 12      ...   payload (raw bytes, or one zstd frame)
//! ```
//!
//! The chunk's address is the BLAKE3 of the *uncompressed* bytes, so the same content
//! has one address whatever codec a client picked, and dedup sees raw pages.
//! Compression is kept only when it pays ([`MIN_SAVING_PERCENT`]); random memory
//! stays raw and costs no decompression on restore. Version 1 is the only layout; a
//! new one gets a new magic, and readers keep decoding "SRC1" forever.

use bytes::{BufMut, Bytes, BytesMut};

use crate::{Digest, Error};

pub const MAGIC: &[u8; 4] = b"SRC1";
pub const HEADER_LEN: usize = 12;
/// Largest chunk the codec accepts: the chunker's maximum with headroom; bounds the
/// memory a hostile object can make a reader allocate.
pub const MAX_CHUNK_LEN: usize = 16 << 20;
/// Largest chunk object: [`encode`] keeps zstd only when it is smaller than the raw
/// bytes, so an object is never more than the header over [`MAX_CHUNK_LEN`]. Receivers
/// refuse anything larger before decoding it.
pub const MAX_OBJECT_LEN: usize = HEADER_LEN + MAX_CHUNK_LEN;
/// zstd level 1: ~500 MB/s per core here, and most of the gain on memory images
/// (zeros never reach the codec; what compresses is text, heap metadata, code).
pub const ZSTD_LEVEL: i32 = 1;
/// Keep the compressed form only if it saves at least this much; below it, the
/// decompression on restore costs more than the bytes saved.
pub const MIN_SAVING_PERCENT: usize = 10;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Codec {
    Raw = 0,
    Zstd = 1,
}

/// Encodes `data`, compressing when it pays.
pub fn encode(data: &[u8]) -> Bytes {
    assert!(
        data.len() <= MAX_CHUNK_LEN,
        "chunk larger than MAX_CHUNK_LEN"
    );
    if let Ok(compressed) = zstd::bulk::compress(data, ZSTD_LEVEL) {
        if compressed.len() * 100 <= data.len() * (100 - MIN_SAVING_PERCENT) {
            return frame(Codec::Zstd, data.len(), &compressed);
        }
    }
    frame(Codec::Raw, data.len(), data)
}

/// Encodes without trying compression (tests, incompressible data).
pub fn encode_raw(data: &[u8]) -> Bytes {
    frame(Codec::Raw, data.len(), data)
}

fn frame(codec: Codec, len: usize, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(HEADER_LEN + payload.len());
    out.put_slice(MAGIC);
    out.put_u8(codec as u8);
    out.put_slice(&[0, 0, 0]);
    out.put_u32_le(len as u32);
    out.put_slice(payload);
    out.freeze()
}

/// The uncompressed length recorded in an object's header, without decoding it.
pub fn declared_len(object: &[u8]) -> Option<usize> {
    (object.len() >= HEADER_LEN && &object[..4] == MAGIC)
        .then(|| u32::from_le_bytes(object[8..12].try_into().unwrap()) as usize)
}

/// Decodes a chunk object and verifies it is the chunk `expected` names.
pub fn decode(expected: &Digest, object: &[u8]) -> Result<Bytes, Error> {
    verified(expected, unframe_with(object, Bytes::copy_from_slice))
}

/// [`decode`] of an object already held in a `Bytes` (as received): a raw payload is
/// returned as a slice of it instead of a copy.
pub fn decode_shared(expected: &Digest, object: Bytes) -> Result<Bytes, Error> {
    verified(
        expected,
        unframe_with(&object, |_| object.slice(HEADER_LEN..)),
    )
}

fn verified(expected: &Digest, data: Result<Bytes, String>) -> Result<Bytes, Error> {
    let data = data.map_err(|reason| Error::ChunkCorrupt {
        digest: *expected,
        reason,
    })?;
    let actual = Digest::of(&data);
    if actual != *expected {
        return Err(Error::ChunkCorrupt {
            digest: *expected,
            reason: format!("content hashes to {actual}"),
        });
    }
    Ok(data)
}

/// Decodes a chunk object's framing without checking its content against an address:
/// for objects authenticated another way (the inside of an encrypted chunk).
pub(crate) fn unframe(object: &[u8]) -> Result<Bytes, String> {
    unframe_with(object, Bytes::copy_from_slice)
}

/// [`unframe`], with `raw` making the result of a raw payload (copy or slice).
fn unframe_with(object: &[u8], raw: impl FnOnce(&[u8]) -> Bytes) -> Result<Bytes, String> {
    if object.len() > MAX_OBJECT_LEN {
        return Err(format!(
            "object is {} bytes, over the {MAX_OBJECT_LEN}-byte limit",
            object.len()
        ));
    }
    if object.len() < HEADER_LEN || &object[..4] != MAGIC {
        return Err("bad header (not a snapreg chunk object)".into());
    }
    let len = u32::from_le_bytes(object[8..12].try_into().unwrap()) as usize;
    if len > MAX_CHUNK_LEN {
        return Err(format!("declared length {len} exceeds {MAX_CHUNK_LEN}"));
    }
    let payload = &object[HEADER_LEN..];
    let data: Bytes = match object[4] {
        0 => raw(payload),
        1 => zstd::bulk::decompress(payload, len)
            .map_err(|e| format!("zstd payload does not decode: {e}"))?
            .into(),
        other => return Err(format!("unknown codec {other}")),
    };
    if data.len() != len {
        return Err(format!("length {} but header says {len}", data.len()));
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compressible_data_round_trips_as_zstd() {
        let data = b"abcdefgh".repeat(10_000);
        let obj = encode(&data);
        assert_eq!(obj[4], Codec::Zstd as u8);
        assert!(obj.len() < data.len() / 10);
        assert_eq!(decode(&Digest::of(&data), &obj).unwrap(), data);
    }

    #[test]
    fn incompressible_data_stays_raw() {
        let data = crate::test_noise(100_000);
        let obj = encode(&data);
        assert_eq!(obj[4], Codec::Raw as u8);
        assert_eq!(obj.len(), data.len() + HEADER_LEN);
        assert_eq!(decode(&Digest::of(&data), &obj).unwrap(), data);
    }

    #[test]
    fn shared_decode_slices_raw_payloads_and_checks_like_decode() {
        for data in [b"xy".repeat(50_000), crate::test_noise(50_000)] {
            let digest = Digest::of(&data);
            let obj = encode(&data);
            let out = decode_shared(&digest, obj.clone()).unwrap();
            assert_eq!(out, data);
            if obj[4] == Codec::Raw as u8 {
                assert_eq!(
                    out.as_ptr(),
                    obj[HEADER_LEN..].as_ptr(),
                    "a raw payload is not copied"
                );
            }
            let mut bad = obj.to_vec();
            let mid = HEADER_LEN + (bad.len() - HEADER_LEN) / 2;
            bad[mid] ^= 0x10;
            assert!(decode_shared(&digest, bad.into()).is_err());
        }
    }

    #[test]
    fn empty_chunk_round_trips() {
        let obj = encode(b"");
        assert_eq!(decode(&Digest::of(b""), &obj).unwrap().len(), 0);
    }

    #[test]
    fn flipped_bit_is_detected_in_either_codec() {
        for data in [b"xy".repeat(50_000), crate::test_noise(50_000)] {
            let digest = Digest::of(&data);
            let mut obj = encode(&data).to_vec();
            let mid = HEADER_LEN + (obj.len() - HEADER_LEN) / 2;
            obj[mid] ^= 0x10;
            let err = decode(&digest, &obj).unwrap_err();
            assert!(
                matches!(err, Error::ChunkCorrupt { digest: d, .. } if d == digest),
                "{err}"
            );
        }
    }

    #[test]
    fn wrong_digest_truncation_and_garbage_are_rejected() {
        let data = crate::test_noise(4096);
        let obj = encode(&data);
        assert!(decode(&Digest::of(b"other"), &obj).is_err());
        assert!(decode(&Digest::of(&data), &obj[..obj.len() - 1]).is_err());
        assert!(decode(&Digest::of(&data), &obj[..5]).is_err());
        assert!(decode(&Digest::of(&data), b"not a chunk object").is_err());
        let mut bad_codec = obj.to_vec();
        bad_codec[4] = 9;
        assert!(decode(&Digest::of(&data), &bad_codec).is_err());
    }

    /// Golden object: the v1 layout must decode forever.
    #[test]
    fn golden_v1_object_decodes() {
        let golden = include_bytes!("../tests/golden/chunk-v1-zstd.bin");
        let data = b"snapreg golden chunk\n".repeat(100);
        assert_eq!(decode(&Digest::of(&data), golden).unwrap(), data);
        assert_eq!(declared_len(golden), Some(data.len()));
    }
}
