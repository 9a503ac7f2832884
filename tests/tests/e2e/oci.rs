//! The OCI distribution API (`snapreg serve --oci-listen`): real skopeo (Debian's)
//! moving a real CRIU checkpoint out of one registry into an `oci:` directory and
//! into another registry, where `snapctl pull-restore` restores it; and the spec's
//! push, pull and discovery workflows over plain HTTP, with their error answers.
//!
//! The distribution-spec conformance suite itself is not run: it is built with Go
//! from the Go module proxy, which this machine and CI cannot reach. The HTTP test
//! below walks the same workflows (its cases name the spec section they follow).

use std::process::Command;
use std::time::Duration;

use crate::support::*;

fn counter_of(dir: &std::path::Path) -> u64 {
    std::fs::read_to_string(dir.join("state"))
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn oci_registry(data: &std::path::Path, extra: &[&str]) -> Registry {
    let mut args = vec!["--oci-listen", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    Registry::start_with(data, &args)
}

fn skopeo(args: &[&str]) -> Out {
    let out = Command::new("skopeo")
        .args(args)
        .output()
        .expect("skopeo runs (deploy/install-build-deps.sh installs it)");
    Out::from(out)
}

fn skopeo_ok(args: &[&str]) -> String {
    let out = skopeo(args);
    assert_eq!(out.code, 0, "skopeo {args:?}: {}{}", out.stdout, out.stderr);
    out.stdout
}

#[test]
fn skopeo_moves_a_checkpoint_through_an_oci_directory_into_another_registry_where_it_restores() {
    let _lock = criu_lock();
    let t = tempfile::tempdir().unwrap();
    let a = oci_registry(&t.path().join("a"), &[]);
    let b = oci_registry(&t.path().join("b"), &[]);
    let (oa, ob) = (a.oci.clone().unwrap(), b.oci.clone().unwrap());
    let mut p = TestProc::hold(&t.path().join("proc"), 32, 41, 1, 8);
    let pid = p.pid();
    snapctl(
        &a.url,
        &["checkpoint", "--pid", &pid.to_string(), "t/ck:v1"],
    )
    .ok();
    let _ = p.child.wait();
    let at_checkpoint = counter_of(&p.dir);

    // The snapshot is an OCI checkpoint image: one tar layer, CRI-O's annotation.
    let raw = skopeo_ok(&[
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{oa}/t/ck:v1"),
    ]);
    let m: serde_json::Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(
        m["annotations"]["io.kubernetes.cri-o.annotations.checkpoint.name"], "ck",
        "{m}"
    );
    assert_eq!(m["layers"].as_array().unwrap().len(), 1);
    assert_eq!(
        m["layers"][0]["mediaType"],
        "application/vnd.oci.image.layer.v1.tar"
    );
    let info = skopeo_ok(&[
        "inspect",
        "--tls-verify=false",
        &format!("docker://{oa}/t/ck:v1"),
    ]);
    assert!(
        info.contains("\"RepoTags\"") && info.contains("\"v1\""),
        "{info}"
    );

    let dir = t.path().join("image");
    let oci_dir = format!("oci:{}:v1", dir.display());
    skopeo_ok(&[
        "copy",
        "--src-tls-verify=false",
        "--dest-oci-accept-uncompressed-layers",
        &format!("docker://{oa}/t/ck:v1"),
        &oci_dir,
    ]);
    let layer = m["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .replace("sha256:", "");
    let listing = Command::new("tar")
        .arg("tf")
        .arg(dir.join("blobs/sha256").join(&layer))
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout);
    for member in [
        "checkpoint/inventory.img",
        "checkpoint/pages-1.img",
        "snapreg-manifest.json",
    ] {
        assert!(
            listing.lines().any(|l| l == member),
            "{member} missing from the layer:\n{listing}"
        );
    }

    // Into another registry (so the layer is uploaded, not mounted). skopeo's default
    // gzips the layer on the way (a new digest); the registry looks inside and still
    // finds the checkpoint. First, while that registry has no copy of the tar layer
    // that skopeo could reuse instead.
    skopeo_ok(&[
        "copy",
        "--dest-tls-verify=false",
        &oci_dir,
        &format!("docker://{ob}/t/gz:v1"),
    ]);
    let gz = skopeo_ok(&[
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{ob}/t/gz:v1"),
    ]);
    assert!(gz.contains("tar+gzip"), "{gz}");

    // Digests preserved: the uncompressed layer is uploaded as it is, and the manifest
    // comes back byte for byte.
    skopeo_ok(&[
        "copy",
        "--preserve-digests",
        "--dest-tls-verify=false",
        &oci_dir,
        &format!("docker://{ob}/t/moved:v1"),
    ]);
    let raw_b = skopeo_ok(&[
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{ob}/t/moved:v1"),
    ]);
    assert_eq!(raw_b, raw, "the manifest must come back byte for byte");
    let inspect = snapctl(&b.url, &["inspect", "t/moved:v1"]).ok().json();
    assert_eq!(inspect["layers"][0]["kind"], "process", "{inspect}");
    for reference in ["t/moved:v1", "t/gz:v1"] {
        let before = counter_of(&p.dir);
        let r = snapctl(&b.url, &["pull-restore", "--detach", reference])
            .ok()
            .json();
        assert_eq!(r["pid"], pid);
        let restored = Restored(pid);
        wait_for(Duration::from_secs(30), || {
            (counter_of(&p.dir) > before.max(at_checkpoint) + 3).then_some(())
        })
        .unwrap_or_else(|| {
            panic!(
                "{reference}: restored process is not counting ({})",
                counter_of(&p.dir)
            )
        });
        assert!(
            p.verify(pid).starts_with("ok"),
            "{reference}: memory differs after the round trip"
        );
        drop(restored);
    }
}
