//! The chunk codec (registry PutChunks, every chunk a client reads): a hostile object
//! never panics and never decodes to bytes that do not hash to the digest asked for;
//! any bytes round-trip through encode/decode. The same for encrypted chunks: hostile
//! content never panics the decryption, and any bytes round-trip through it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use snapreg_proto::encryption::TenantKey;
use snapreg_proto::{codec, Digest};

fn key() -> &'static TenantKey {
    static KEY: std::sync::OnceLock<TenantKey> = std::sync::OnceLock::new();
    KEY.get_or_init(|| TenantKey::from_secret("fuzz", [0x42; 32]))
}

fuzz_target!(|data: &[u8]| {
    // As an object: under a digest taken from the input, and under the digest of its
    // payload (so the raw and zstd success paths are reachable too).
    if data.len() >= 32 {
        let (d, object) = data.split_at(32);
        let digest = Digest::from_slice(d).expect("32 bytes");
        if let Ok(out) = codec::decode(&digest, object) {
            assert_eq!(Digest::of(&out), digest);
        }
    }
    if data.len() >= codec::HEADER_LEN {
        let payload_digest = Digest::of(&data[codec::HEADER_LEN..]);
        if let Ok(out) = codec::decode(&payload_digest, data) {
            assert_eq!(Digest::of(&out), payload_digest);
        }
        let _ = codec::declared_len(data);
    }
    // As an encrypted chunk's content (the seed corpus holds one under this key, so
    // mutations reach the authentication tag and the inner codec).
    let _ = key().decrypt_chunk(&Digest::of(data), data);
    // As chunk bytes.
    let object = codec::encode(data);
    assert!(object.len() <= codec::HEADER_LEN + data.len());
    assert_eq!(codec::decode(&Digest::of(data), &object).unwrap(), data);
    if data.len() <= codec::MAX_CHUNK_LEN - snapreg_proto::encryption::OVERHEAD {
        let sealed = key().encrypt_chunk(data);
        assert_eq!(key().decrypt_chunk(&Digest::of(&sealed), &sealed).unwrap(), data);
    }
});
