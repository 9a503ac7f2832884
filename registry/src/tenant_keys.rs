//! Which repositories must hold snapshots encrypted with which tenant key
//! (`snapreg serve --tenant-key 'acme/*=<key id>'`).
//!
//! Encryption happens on the clients (snapreg_proto::encryption), so the registry
//! never holds a key; what it can enforce is that a tenant's repositories only ever
//! receive manifests that name the tenant's key id. That catches a node configured
//! without its key file (which would otherwise push plaintext memory images into an
//! encrypted tenant) and a tag that would point such a repository at another
//! tenant's or a plaintext snapshot. It is checked on PutManifest and SetTag; records
//! replicated from peers are not re-checked (the peer applied its own rules).

use snapreg_proto::encryption::KeyId;
use snapreg_proto::manifest::Manifest;

use crate::auth::RepoPattern;
use crate::error::{RegistryError, Result};

/// `PATTERN=KEYID`: repositories matching PATTERN accept only snapshots encrypted with
/// the tenant key KEYID (`snapctl key show FILE` prints it).
#[derive(Clone, Debug)]
pub struct TenantKeyRule {
    pattern: RepoPattern,
    key_id: KeyId,
}

impl std::str::FromStr for TenantKeyRule {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (pattern, id) = s
            .split_once('=')
            .ok_or_else(|| format!("--tenant-key {s:?}: use PATTERN=KEYID, e.g. 'acme/*=3f2a…'"))?;
        Ok(TenantKeyRule {
            pattern: pattern.parse()?,
            key_id: KeyId::parse(id).ok_or_else(|| {
                format!("--tenant-key {s:?}: the key id is 16 hex digits (`snapctl key show FILE`)")
            })?,
        })
    }
}

/// Refuses `manifest` for `repository` when a rule asks for another key (the first
/// matching rule decides).
pub fn check(rules: &[TenantKeyRule], repository: &str, manifest: &Manifest) -> Result<()> {
    let Some(rule) = rules.iter().find(|r| r.pattern.matches(repository)) else {
        return Ok(());
    };
    let found = manifest.encryption.as_ref().map(|e| e.key_id.as_str());
    if found == Some(rule.key_id.to_string().as_str()) {
        return Ok(());
    }
    Err(RegistryError::EncryptionRequired {
        repository: repository.to_string(),
        rule: format!("{}={}", rule.pattern, rule.key_id),
        found: match found {
            Some(id) => format!("encrypted with key {id}"),
            None => "not encrypted".into(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse_and_match_by_pattern() {
        let rules: Vec<TenantKeyRule> = ["acme/*=00112233445566aa", "beta=ffeeddccbbaa9988"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert!("acme/*".parse::<TenantKeyRule>().is_err());
        assert!("acme/*=xyz".parse::<TenantKeyRule>().is_err());
        let golden = include_bytes!("../../proto/tests/golden/manifest-v2.json");
        let mut m = Manifest::decode(golden).unwrap();
        m.encryption.as_mut().unwrap().key_id = "00112233445566aa".into();
        assert!(check(&rules, "acme/app", &m).is_ok());
        assert!(check(&rules, "other/app", &m).is_ok());
        let e = check(&rules, "beta", &m).unwrap_err().to_string();
        assert!(
            e.contains("ffeeddccbbaa9988") && e.contains("--key-file"),
            "{e}"
        );
        m.encryption = None;
        let e = check(&rules, "acme/x", &m).unwrap_err().to_string();
        assert!(e.contains("not encrypted"), "{e}");
    }
}
