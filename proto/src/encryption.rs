//! Chunk encryption at rest: per tenant, convergent, done by the client.
//!
//! A tenant holds one secret. From it come a cipher key, a nonce key and a public key
//! id (BLAKE3 `derive_key`, one context string each). A chunk is encrypted as
//!
//! ```text
//! offset  size  field
//! 0       4     magic "SRE1"
//! 4       4     reserved, zero
//! 8       8     key id
//! 16      12    nonce = keyed BLAKE3(nonce key, plaintext), first 12 bytes
//! 28      ...   AES-256-GCM-SIV(cipher key, nonce, aad = bytes 0..28) of the chunk's
//!               codec object (so compression happens before encryption), 16-byte tag
//! ```
//!
//! and that whole byte string is what the registry stores and addresses: the chunk's
//! digest is the BLAKE3 of the *encrypted* bytes. So:
//!
//! - The same plaintext in one tenant always encrypts to the same bytes (the nonce is
//!   a keyed hash of it, and GCM-SIV is deterministic given key, nonce and input), so it
//!   has one address and dedups across snapshots of that tenant.
//! - Another tenant's key gives other bytes and another address: tenants share no
//!   chunk objects, and without the key nobody can compute the address a known
//!   plaintext would have (no confirmation of content through FindMissingChunks).
//! - The registry verifies every upload and scrubs exactly as for plaintext chunks
//!   (BLAKE3 of what it stores); only a key holder can read the content, and the AEAD
//!   tag tells it whether the key is the right one.
//!
//! GCM-SIV rather than GCM: the nonce is derived, not random, and two different
//! plaintexts whose nonces collide must not reuse a keystream; GCM-SIV then leaks only
//! that they differ. What stays visible to the registry: chunk sizes (within the
//! compression the codec applied), which chunks each snapshot shares with the tenant's
//! others, where the all-zero runs are, and the manifest's file names and metadata.

use std::fmt;
use std::path::Path;

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM_SIV, NONCE_LEN};
use bytes::Bytes;

use crate::{codec, Digest, Error};

pub const MAGIC: &[u8; 4] = b"SRE1";
pub const HEADER_LEN: usize = 28;
const TAG_LEN: usize = 16;
/// Bytes an encrypted chunk adds over its plaintext, at most: this header, the tag and
/// the inner codec header. A chunker's max_size must leave this much room under
/// [`codec::MAX_CHUNK_LEN`].
pub const OVERHEAD: usize = HEADER_LEN + TAG_LEN + codec::HEADER_LEN;
/// The manifest's name for this construction.
pub const SCHEME: &str = "aes-256-gcm-siv+blake3-v1";

const CONTEXT_KEY_ID: &str = "snapreg 2026 tenant key id v1";
const CONTEXT_CIPHER: &str = "snapreg 2026 chunk cipher key v1";
const CONTEXT_NONCE: &str = "snapreg 2026 chunk nonce key v1";
const KEY_FILE_KIND: &str = "snapreg-tenant-key";

/// Public name of a tenant key: recorded in manifests and in chunk headers.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyId([u8; 8]);

impl KeyId {
    pub fn parse(text: &str) -> Option<Self> {
        let mut id = [0u8; 8];
        hex::decode_to_slice(text, &mut id).ok()?;
        Some(KeyId(id))
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

/// A tenant's chunk key. Debug output never shows the secret.
pub struct TenantKey {
    tenant: String,
    id: KeyId,
    secret: [u8; 32],
    cipher: LessSafeKey,
    nonce_key: [u8; 32],
}

impl fmt::Debug for TenantKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TenantKey")
            .field("tenant", &self.tenant)
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct KeyFile {
    kind: String,
    tenant: String,
    key_id: String,
    secret: String,
}

impl TenantKey {
    pub fn from_secret(tenant: &str, secret: [u8; 32]) -> Self {
        let id = blake3::derive_key(CONTEXT_KEY_ID, &secret);
        let cipher = blake3::derive_key(CONTEXT_CIPHER, &secret);
        let cipher = UnboundKey::new(&AES_256_GCM_SIV, &cipher).expect("a 32-byte AES-256 key");
        TenantKey {
            tenant: tenant.to_string(),
            id: KeyId(id[..8].try_into().unwrap()),
            secret,
            cipher: LessSafeKey::new(cipher),
            nonce_key: blake3::derive_key(CONTEXT_NONCE, &secret),
        }
    }

    /// A new key from the system's random source.
    pub fn generate(tenant: &str) -> Self {
        let mut secret = [0u8; 32];
        aws_lc_rs::rand::fill(&mut secret).expect("the system random source works");
        Self::from_secret(tenant, secret)
    }

    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    pub fn id(&self) -> KeyId {
        self.id
    }

    /// The key file's contents (JSON, secret included): write it readable by its owner
    /// only.
    pub fn to_file_contents(&self) -> String {
        let file = KeyFile {
            kind: KEY_FILE_KIND.into(),
            tenant: self.tenant.clone(),
            key_id: self.id.to_string(),
            secret: hex::encode(self.secret),
        };
        serde_json::to_string_pretty(&file).expect("key file serializes") + "\n"
    }

    pub fn from_file_contents(text: &str) -> Result<Self, String> {
        let file: KeyFile = serde_json::from_str(text)
            .map_err(|e| format!("not a snapreg tenant key file ({e})"))?;
        if file.kind != KEY_FILE_KIND {
            return Err(format!("kind is {:?}, not {KEY_FILE_KIND:?}", file.kind));
        }
        let mut secret = [0u8; 32];
        hex::decode_to_slice(&file.secret, &mut secret)
            .map_err(|_| "secret is not 64 hex digits".to_string())?;
        let key = Self::from_secret(&file.tenant, secret);
        // The id is derived from the secret: a mismatch means the file was damaged or
        // edited, and everything encrypted with it would fail to open.
        if key.id.to_string() != file.key_id {
            return Err(format!(
                "key_id {} does not belong to its secret (that secret's id is {}): the file is damaged",
                file.key_id, key.id
            ));
        }
        Ok(key)
    }

    pub fn load(path: &Path) -> Result<Self, Error> {
        let bad = |reason: String| Error::KeyFile {
            path: path.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        Self::from_file_contents(&text).map_err(bad)
    }

    /// Encrypts one chunk (compressing first when that pays). Deterministic: the same
    /// plaintext under the same key gives the same bytes.
    pub fn encrypt_chunk(&self, plaintext: &[u8]) -> Bytes {
        assert!(
            plaintext.len() <= codec::MAX_CHUNK_LEN - OVERHEAD,
            "chunk too large to encrypt"
        );
        let nonce: [u8; NONCE_LEN] = blake3::keyed_hash(&self.nonce_key, plaintext).as_bytes()
            [..NONCE_LEN]
            .try_into()
            .unwrap();
        let inner = codec::encode(plaintext);
        let mut out = Vec::with_capacity(HEADER_LEN + inner.len() + TAG_LEN);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(&self.id.0);
        out.extend_from_slice(&nonce);
        let header: [u8; HEADER_LEN] = out[..].try_into().unwrap();
        out.extend_from_slice(&inner);
        let mut body = out.split_off(HEADER_LEN);
        self.cipher
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&header[..]),
                &mut body,
            )
            .expect("AES-GCM-SIV encrypts any chunk-sized input");
        out.extend_from_slice(&body);
        Bytes::from(out)
    }

    /// Decrypts a chunk's stored content (already verified against its address).
    /// `digest` names the chunk in errors.
    pub fn decrypt_chunk(&self, digest: &Digest, content: &[u8]) -> Result<Bytes, Error> {
        let corrupt = |reason: String| Error::Undecryptable {
            digest: *digest,
            reason,
        };
        let header = header(content).map_err(corrupt)?;
        if header.key_id != self.id {
            return Err(corrupt(format!(
                "encrypted with tenant key {}, not with {} (tenant {})",
                header.key_id, self.id, self.tenant
            )));
        }
        let mut body = content[HEADER_LEN..].to_vec();
        let inner = self
            .cipher
            .open_in_place(
                Nonce::assume_unique_for_key(header.nonce),
                Aad::from(&content[..HEADER_LEN]),
                &mut body,
            )
            .map_err(|_| {
                corrupt(format!(
                    "does not decrypt with tenant key {} (tenant {}): the authentication tag \
                     fails, so it was written with another secret under the same key id, or damaged",
                    self.id, self.tenant
                ))
            })?;
        codec::unframe(inner).map_err(|reason| corrupt(format!("inside the encryption: {reason}")))
    }
}

struct Header {
    key_id: KeyId,
    nonce: [u8; NONCE_LEN],
}

fn header(content: &[u8]) -> Result<Header, String> {
    if content.len() < HEADER_LEN + TAG_LEN || &content[..4] != MAGIC {
        return Err(
            "not an encrypted chunk (no SRE1 header): the snapshot's manifest and its chunks disagree"
                .into(),
        );
    }
    if content[4..8] != [0; 4] {
        return Err("reserved header bytes are not zero".into());
    }
    Ok(Header {
        key_id: KeyId(content[8..16].try_into().unwrap()),
        nonce: content[16..HEADER_LEN].try_into().unwrap(),
    })
}

/// The key id an encrypted chunk names, if `content` is one.
pub fn key_id_of(content: &[u8]) -> Option<KeyId> {
    header(content).ok().map(|h| h.key_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(tenant: &str, byte: u8) -> TenantKey {
        TenantKey::from_secret(tenant, [byte; 32])
    }

    #[test]
    fn round_trips_compressible_and_random_chunks() {
        let k = key("acme", 1);
        for data in [
            b"weights ".repeat(50_000),
            crate::test_noise(300_000),
            Vec::new(),
        ] {
            let enc = k.encrypt_chunk(&data);
            assert!(enc.len() <= data.len() + OVERHEAD);
            let d = Digest::of(&enc);
            assert_eq!(k.decrypt_chunk(&d, &enc).unwrap(), data);
            assert_eq!(key_id_of(&enc), Some(k.id()));
        }
    }

    #[test]
    fn convergent_within_a_tenant_disjoint_across_tenants() {
        let data = crate::test_noise(100_000);
        let (a, a_again, b) = (key("a", 1), key("a", 1), key("b", 2));
        assert_eq!(a.encrypt_chunk(&data), a_again.encrypt_chunk(&data));
        assert_ne!(a.encrypt_chunk(&data), b.encrypt_chunk(&data));
        assert_ne!(a.id(), b.id());
        // No trace of the plaintext in what is stored.
        let enc = a.encrypt_chunk(&data);
        assert!(!enc.windows(32).any(|w| w == &data[1000..1032]));
    }

    #[test]
    fn wrong_key_and_tampering_are_refused_naming_the_key() {
        let (a, b) = (key("a", 1), key("b", 2));
        let enc = a.encrypt_chunk(&crate::test_noise(10_000));
        let d = Digest::of(&enc);
        let e = b.decrypt_chunk(&d, &enc).unwrap_err().to_string();
        assert!(
            e.contains(&a.id().to_string()) && e.contains(&b.id().to_string()),
            "{e}"
        );
        // Same key id, another secret: only the tag can tell.
        let mut forged = enc.to_vec();
        forged[8..16].copy_from_slice(&b.id().0);
        let e = b.decrypt_chunk(&d, &forged).unwrap_err().to_string();
        assert!(e.contains("authentication tag"), "{e}");
        for at in [5, 20, HEADER_LEN + 3, enc.len() - 1] {
            let mut bad = enc.to_vec();
            bad[at] ^= 1;
            assert!(a.decrypt_chunk(&d, &bad).is_err(), "flip at {at}");
        }
        assert!(a.decrypt_chunk(&d, &enc[..HEADER_LEN + 10]).is_err());
        assert!(a.decrypt_chunk(&d, &codec::encode(b"plain")).is_err());
    }

    #[test]
    fn key_files_round_trip_and_damage_is_named() {
        let k = TenantKey::generate("acme");
        let text = k.to_file_contents();
        let back = TenantKey::from_file_contents(&text).unwrap();
        assert_eq!((back.id(), back.tenant()), (k.id(), "acme"));
        assert!(!format!("{k:?}").contains(&hex::encode(k.secret)));
        let mut damaged: serde_json::Value = serde_json::from_str(&text).unwrap();
        damaged["secret"] = hex::encode([7u8; 32]).into();
        let e = TenantKey::from_file_contents(&damaged.to_string()).unwrap_err();
        assert!(e.contains("damaged"), "{e}");
        assert!(TenantKey::from_file_contents("{}").is_err());
    }

    /// Golden encrypted chunk: this layout, these derivations, must decrypt forever.
    #[test]
    fn golden_v1_encrypted_chunk_decrypts() {
        let golden = include_bytes!("../tests/golden/chunk-encrypted-v1.bin");
        let k = TenantKey::from_secret("golden", [0x42; 32]);
        let data = b"snapreg golden encrypted chunk\n".repeat(100);
        assert_eq!(k.decrypt_chunk(&Digest::of(golden), golden).unwrap(), data);
        assert_eq!(k.encrypt_chunk(&data), golden[..]);
    }
}
