//! OCI content digests: `sha256:<64 lowercase hex>`, the only algorithm served here
//! (the distribution spec requires registries to support it; `sha512` is optional
//! and refused with `DIGEST_INVALID`).

use std::fmt;
use std::str::FromStr;

use aws_lc_rs::digest::{Context, SHA256};

/// A sha256 content digest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OciDigest(pub [u8; 32]);

impl OciDigest {
    pub fn of(bytes: &[u8]) -> OciDigest {
        let mut h = Sha256::default();
        h.update(bytes);
        h.finish()
    }

    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for OciDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl FromStr for OciDigest {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let Some((alg, hex)) = s.split_once(':') else {
            return Err(format!(
                "{s:?} is not a digest: expected sha256:<64 hex digits>"
            ));
        };
        if alg != "sha256" {
            return Err(format!(
                "digest algorithm {alg:?} is not supported here: use sha256"
            ));
        }
        if hex.len() != 64
            || !hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(format!(
                "{s:?} is not a sha256 digest: expected 64 lowercase hex digits"
            ));
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(hex, &mut out).map_err(|e| format!("{s:?}: {e}"))?;
        Ok(OciDigest(out))
    }
}

/// An incremental SHA-256.
#[derive(Clone)]
pub struct Sha256(Context);

impl Default for Sha256 {
    fn default() -> Self {
        Sha256(Context::new(&SHA256))
    }
}

impl Sha256 {
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    /// The digest of everything so far; the hasher goes on from there.
    pub fn current(&self) -> OciDigest {
        self.clone().finish()
    }

    pub fn finish(self) -> OciDigest {
        let d = self.0.finish();
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        OciDigest(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_of_empty_is_the_well_known_value() {
        assert_eq!(
            OciDigest::of(b"").to_string(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn parses_and_refuses() {
        let d = OciDigest::of(b"x");
        assert_eq!(d.to_string().parse::<OciDigest>().unwrap(), d);
        assert!("sha512:00"
            .parse::<OciDigest>()
            .unwrap_err()
            .contains("not supported"));
        assert!("sha256:ABC".parse::<OciDigest>().is_err());
        assert!("nocolon".parse::<OciDigest>().is_err());
        let upper = d.to_string().to_uppercase().replace("SHA256", "sha256");
        assert!(upper.parse::<OciDigest>().is_err());
    }

    #[test]
    fn incremental_matches_one_shot() {
        let mut h = Sha256::default();
        h.update(b"hello ");
        assert_eq!(h.current(), OciDigest::of(b"hello "));
        h.update(b"world");
        assert_eq!(h.finish(), OciDigest::of(b"hello world"));
    }
}
