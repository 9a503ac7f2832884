//! Content addresses: BLAKE3-256, spelled `blake3:<64 lowercase hex>`.

use std::fmt;
use std::str::FromStr;

use crate::Error;

pub const PREFIX: &str = "blake3:";

#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    pub fn of(bytes: &[u8]) -> Self {
        Digest(*blake3::hash(bytes).as_bytes())
    }

    /// Parses the 32 raw bytes carried in protobuf messages.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, Error> {
        let arr: [u8; 32] = bytes.try_into().map_err(|_| Error::InvalidDigest {
            text: format!("{} raw bytes", bytes.len()),
        })?;
        Ok(Digest(arr))
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn from_hex(text: &str) -> Result<Self, Error> {
        let mut out = [0u8; 32];
        if text.len() != 64
            || text.bytes().any(|b| b.is_ascii_uppercase())
            || hex::decode_to_slice(text, &mut out).is_err()
        {
            return Err(Error::InvalidDigest { text: text.into() });
        }
        Ok(Digest(out))
    }

    /// First 12 hex digits, for humans.
    pub fn short(&self) -> String {
        self.to_hex()[..12].to_string()
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}{}", self.to_hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl FromStr for Digest {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s.strip_prefix(PREFIX) {
            Some(hex) => Digest::from_hex(hex),
            None => Err(Error::InvalidDigest { text: s.into() }),
        }
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_text() {
        let d = Digest::of(b"hello");
        let text = d.to_string();
        assert!(text.starts_with("blake3:"));
        assert_eq!(text.parse::<Digest>().unwrap(), d);
    }

    #[test]
    fn rejects_malformed_text() {
        for bad in [
            "sha256:00",
            "blake3:xyz",
            "blake3:",
            &format!("blake3:{}", "A".repeat(64)),
        ] {
            assert!(bad.parse::<Digest>().is_err(), "{bad} parsed");
        }
    }
}
