//! Manifests as the distribution API carries them: media types, and the descriptors
//! a pushed manifest refers to, checked field by field.

use serde_json::Value;

use crate::digest::OciDigest;
use crate::error::{OciError, Result};

pub use snapreg_client::oci_image::OCI_MANIFEST;
use snapreg_client::oci_image::{CRIO_CHECKPOINT_NAME, PODMAN_CHECKPOINT_NAME};
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Largest manifest accepted (the spec suggests registries accept at least 4 MiB).
pub const MAX_MANIFEST_BYTES: usize = 4 << 20;

/// A content descriptor a manifest refers to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Descriptor {
    /// Where it sits in the manifest, for messages (`layers[2]`).
    pub field: String,
    pub digest: OciDigest,
    pub size: u64,
    pub media_type: String,
}

/// What a pushed manifest refers to.
#[derive(Debug)]
pub struct Parsed {
    pub media_type: String,
    /// Blobs (config and layers) that must be in the repository.
    pub blobs: Vec<Descriptor>,
    /// Manifests (of an index) that must be in the repository.
    pub manifests: Vec<Descriptor>,
    /// The checkpoint annotation (CRI-O's or Podman's) the manifest carries, if any.
    pub checkpoint_annotation: Option<&'static str>,
}

/// Parses a pushed manifest, refusing what a client could not pull back intact.
pub fn parse(body: &[u8], content_type: Option<&str>) -> Result<Parsed> {
    if body.len() > MAX_MANIFEST_BYTES {
        return Err(OciError::new(
            axum::http::StatusCode::PAYLOAD_TOO_LARGE,
            "MANIFEST_INVALID",
            format!(
                "manifest is {} bytes; the limit is {MAX_MANIFEST_BYTES}",
                body.len()
            ),
        ));
    }
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        OciError::manifest_invalid(format!(
            "not JSON at line {} column {}: {e}",
            e.line(),
            e.column()
        ))
    })?;
    let obj = v
        .as_object()
        .ok_or_else(|| OciError::manifest_invalid("a manifest is a JSON object"))?;
    if obj.get("schemaVersion").and_then(Value::as_u64) != Some(2) {
        return Err(OciError::manifest_invalid("schemaVersion: must be 2"));
    }
    let declared = obj.get("mediaType").and_then(Value::as_str);
    let media_type = match (declared, content_type) {
        (Some(d), Some(c)) if !c.is_empty() && d != c => {
            return Err(OciError::manifest_invalid(format!(
                "mediaType says {d:?} but the request's Content-Type is {c:?}"
            )))
        }
        (Some(d), _) => d.to_string(),
        (None, Some(c)) if !c.is_empty() => c.to_string(),
        (None, _) if obj.contains_key("manifests") => OCI_INDEX.to_string(),
        (None, _) => OCI_MANIFEST.to_string(),
    };
    let mut parsed = Parsed {
        media_type: media_type.clone(),
        blobs: vec![],
        manifests: vec![],
        checkpoint_annotation: None,
    };
    let annotations = obj.get("annotations").and_then(Value::as_object);
    parsed.checkpoint_annotation = [CRIO_CHECKPOINT_NAME, PODMAN_CHECKPOINT_NAME]
        .into_iter()
        .find(|k| annotations.is_some_and(|a| a.contains_key(*k)));
    // Checked, then not acted on: the referrers API is not served (lib.rs).
    if let Some(s) = obj.get("subject") {
        descriptor("subject", s)?;
    }
    match media_type.as_str() {
        OCI_MANIFEST | DOCKER_MANIFEST => {
            let config = obj
                .get("config")
                .ok_or_else(|| OciError::manifest_invalid("config: missing"))?;
            parsed.blobs.push(descriptor("config", config)?);
            for (i, l) in array(obj, "layers")?.iter().enumerate() {
                parsed.blobs.push(descriptor(&format!("layers[{i}]"), l)?);
            }
        }
        OCI_INDEX | DOCKER_LIST => {
            for (i, m) in array(obj, "manifests")?.iter().enumerate() {
                parsed
                    .manifests
                    .push(descriptor(&format!("manifests[{i}]"), m)?);
            }
        }
        other => {
            return Err(OciError::manifest_invalid(format!(
                "media type {other:?} is not a manifest this registry stores: push an OCI \
                 image manifest or index (or Docker schema 2)"
            )))
        }
    }
    Ok(parsed)
}

fn array<'a>(obj: &'a serde_json::Map<String, Value>, field: &str) -> Result<&'a Vec<Value>> {
    obj.get(field)
        .and_then(Value::as_array)
        .ok_or_else(|| OciError::manifest_invalid(format!("{field}: missing or not an array")))
}

fn descriptor(field: &str, v: &Value) -> Result<Descriptor> {
    let digest = v
        .get("digest")
        .and_then(Value::as_str)
        .ok_or_else(|| OciError::manifest_invalid(format!("{field}.digest: missing")))?
        .parse()
        .map_err(|e| OciError::digest_invalid(format!("{field}.digest: {e}")))?;
    let size = v.get("size").and_then(Value::as_u64).ok_or_else(|| {
        OciError::manifest_invalid(format!("{field}.size: missing or not a count"))
    })?;
    let media_type = v
        .get("mediaType")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    Ok(Descriptor {
        field: field.to_string(),
        digest,
        size,
        media_type,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use snapreg_client::oci_image::{OCI_CONFIG, OCI_LAYER_TAR};

    fn manifest(layers: &str) -> String {
        let d = OciDigest::of(b"c");
        format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"{OCI_CONFIG}","digest":"{d}","size":1}},"layers":[{layers}]}}"#
        )
    }

    #[test]
    fn finds_config_and_layers() {
        let d = OciDigest::of(b"l");
        let body = manifest(&format!(
            r#"{{"mediaType":"{OCI_LAYER_TAR}","digest":"{d}","size":5}}"#
        ));
        let p = parse(body.as_bytes(), Some(OCI_MANIFEST)).unwrap();
        assert_eq!(p.blobs.len(), 2);
        assert_eq!(p.blobs[1].digest, d);
        assert_eq!(p.blobs[1].size, 5);
        assert_eq!(p.media_type, OCI_MANIFEST);
    }

    #[test]
    fn refuses_naming_the_field() {
        let e = parse(
            manifest(r#"{"digest":"sha256:zz","size":5}"#).as_bytes(),
            None,
        )
        .unwrap_err();
        assert_eq!(e.code, "DIGEST_INVALID");
        assert!(e.message.contains("layers[0].digest"), "{}", e.message);
        let d = OciDigest::of(b"l");
        let e = parse(manifest(&format!(r#"{{"digest":"{d}"}}"#)).as_bytes(), None).unwrap_err();
        assert!(e.message.contains("layers[0].size"), "{}", e.message);
        let e = parse(manifest("").as_bytes(), Some(OCI_INDEX)).unwrap_err();
        assert!(e.message.contains("Content-Type"), "{}", e.message);
        let e = parse(b"{\"schemaVersion\":1}", None).unwrap_err();
        assert!(e.message.contains("schemaVersion"));
        let e = parse(b"{not json", None).unwrap_err();
        assert!(e.message.contains("line 1"), "{}", e.message);
    }
}
