//! Podman checkpoint archives: a real CRIU dump packed as `podman container checkpoint
//! --export` packs it (plain, gzip, zstd), imported, exported byte-identical.

use std::path::{Path, PathBuf};
use std::process::Command;

use snapreg_client::podman::{pull_archive, push_archive};
use snapreg_client::progress::Progress;
use snapreg_client::push::PushReport;
use snapreg_client::remote::Remote;
use snapreg_proto::reference::Reference;

use crate::support::*;

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn tar_listing(tar: &Path) -> String {
    let out = Command::new("tar")
        .arg("-tvf")
        .arg(tar)
        .arg("--full-time")
        .output()
        .unwrap();
    assert!(out.status.success(), "tar -tvf {}", tar.display());
    String::from_utf8(out.stdout).unwrap()
}

/// A bundle directory laid out as Podman's: checkpoint/ (a real CRIU dump), the
/// container's config and spec, network status, a rootfs diff, and one member whose
/// name needs a long-name extension.
fn podman_bundle(t: &Path) -> (PathBuf, Vec<String>) {
    let bundle = t.join("bundle");
    let mut p = TestProc::hold(&t.join("proc"), 32, 11, 1, 4);
    criu_dump(&mut p, &bundle.join("checkpoint"));
    drop(p);
    std::fs::write(
        bundle.join("config.dump"),
        br#"{"id":"0123abcd","name":"worker","rootfsImageName":"registry.example/worker:1"}"#,
    )
    .unwrap();
    std::fs::write(
        bundle.join("spec.dump"),
        br#"{"ociVersion":"1.0.2","process":{"args":["/worker"]},"root":{"path":"rootfs"}}"#,
    )
    .unwrap();
    std::fs::write(bundle.join("network.status"), b"[]").unwrap();
    let diff = t.join("diff");
    std::fs::create_dir_all(diff.join("etc")).unwrap();
    std::fs::write(diff.join("etc/worker.conf"), noise(3, 3000)).unwrap();
    run(Command::new("tar")
        .arg("-C")
        .arg(&diff)
        .arg("-cf")
        .arg(bundle.join("rootfs-diff.tar"))
        .arg("etc"));
    let long = format!("artifacts/{}/notes.txt", "n".repeat(110));
    std::fs::create_dir_all(bundle.join(&long).parent().unwrap()).unwrap();
    std::fs::write(bundle.join(&long), b"a member with a long name\n").unwrap();
    let members = [
        "checkpoint",
        "config.dump",
        "spec.dump",
        "network.status",
        "rootfs-diff.tar",
        "artifacts",
    ];
    (bundle, members.iter().map(|s| s.to_string()).collect())
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .or((a.len() != b.len()).then(|| a.len().min(b.len())))
}

fn parse(r: &str) -> Reference {
    r.parse().unwrap()
}

async fn push(url: &str, archive: &Path, r: &str) -> snapreg_client::error::Result<PushReport> {
    let remote = Remote::connect(url).await.unwrap();
    push_archive(&remote, archive, &parse(r), Progress::hidden()).await
}

#[test]
fn podman_archives_import_and_export_byte_identical() {
    let _lock = criu_lock();
    let t = tempfile::tempdir().unwrap();
    let reg = Registry::start(&t.path().join("reg"));
    let (bundle, members) = podman_bundle(t.path());

    // Three variants: GNU tar (long names as 'L' members) plain, PAX (an 'x' header
    // per member) gzip-compressed, GNU tar zstd-compressed. Names lie about nothing,
    // but the import reads magic bytes, not names.
    let gnu = t.path().join("gnu.tar");
    let pax = t.path().join("pax.tar");
    for (out, format) in [(&gnu, "--format=gnu"), (&pax, "--format=pax")] {
        run(Command::new("tar")
            .arg(format)
            .arg("-C")
            .arg(&bundle)
            .arg("-cf")
            .arg(out)
            .args(&members));
    }
    let gz = t.path().join("pax.tar.gz");
    run(Command::new("sh")
        .arg("-c")
        .arg(format!("gzip -c {} > {}", pax.display(), gz.display())));
    let zst = t.path().join("gnu.tar.zst");
    run(Command::new("zstd")
        .args(["-q", "-f", "-o"])
        .arg(&zst)
        .arg(&gnu));
    assert_eq!(std::fs::metadata(&gnu).unwrap().len() % 10240, 0);
    // The variants exercise both kinds of extension member.
    let has = |tar: &Path, what: &[u8]| {
        let b = std::fs::read(tar).unwrap();
        b.windows(what.len()).any(|w| w == what)
    };
    assert!(has(&gnu, b"././@LongLink") && has(&pax, b"PaxHeaders"));

    let rt = tokio::runtime::Runtime::new().unwrap();
    for (name, archive, original) in [
        ("plain", &gnu, &gnu),
        ("gzip", &gz, &pax),
        ("zstd", &zst, &gnu),
    ] {
        let r = format!("t/podman:{name}");
        let out = t.path().join(format!("export-{name}.tar"));
        let report = rt.block_on(push(&reg.url, archive, &r)).unwrap();
        assert!(report.counters.bytes_total > 32 << 20, "{report:?}");
        assert!(report.files >= 10, "{report:?}");

        rt.block_on(async {
            let remote = Remote::connect(&reg.url).await.unwrap();
            pull_archive(&remote, &parse(&r), &out, Progress::hidden())
                .await
                .unwrap()
        });
        assert_eq!(
            tar_listing(&out),
            tar_listing(original),
            "{name}: member lists differ"
        );
        let (a, b) = (
            std::fs::read(original).unwrap(),
            std::fs::read(&out).unwrap(),
        );
        assert!(
            a == b,
            "{name}: export differs from the original tar at byte {:?} ({} vs {} bytes)",
            first_difference(&a, &b),
            a.len(),
            b.len()
        );
        // Nothing left behind next to the export.
        let leftovers: Vec<_> = std::fs::read_dir(t.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("snapreg"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");

        let inspect = snapctl(&reg.url, &["inspect", &r]).ok().json();
        let layers: Vec<(String, Option<String>)> = inspect["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| {
                (
                    l["kind"].as_str().unwrap().to_string(),
                    l["name"].as_str().map(str::to_string),
                )
            })
            .collect();
        let kinds: Vec<&str> = layers.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            kinds,
            ["process", "rootfs", "extra", "extra"],
            "{name}: {inspect}"
        );
        assert_eq!(layers[0].1.as_deref(), Some("checkpoint"));
        assert_eq!(layers[3].1.as_deref(), Some("podman-archive"));
        assert!(
            inspect["layers"][0]["files"].as_u64().unwrap() >= 5,
            "{inspect}"
        );
    }

    // The same archive again: nothing to send.
    let again = rt.block_on(push(&reg.url, &gz, "t/podman:again")).unwrap();
    assert_eq!(again.counters.chunks_transferred, 0, "{again:?}");
    assert!(again.counters.chunks_total > 0);

    // A plain pull lays the files out as Podman extracts them.
    let dir = t.path().join("pulled");
    snapctl(&reg.url, &["pull", "t/podman:zstd", dir.to_str().unwrap()]).ok();
    assert_trees_equal(&bundle.join("checkpoint"), &dir.join("checkpoint"));
    assert_eq!(
        std::fs::read(dir.join("rootfs-diff.tar")).unwrap(),
        std::fs::read(bundle.join("rootfs-diff.tar")).unwrap()
    );
    assert!(dir.join("podman-archive/archive-index.json").is_file());
}

#[test]
fn truncated_podman_archives_are_refused_and_tag_nothing() {
    let _lock = criu_lock();
    let t = tempfile::tempdir().unwrap();
    let reg = Registry::start(&t.path().join("reg"));
    let (bundle, members) = podman_bundle(t.path());
    let full = t.path().join("full.tar");
    run(Command::new("tar")
        .arg("-C")
        .arg(&bundle)
        .arg("-cf")
        .arg(&full)
        .args(&members));
    let bytes = std::fs::read(&full).unwrap();
    let gz = t.path().join("full.tar.gz");
    run(Command::new("sh")
        .arg("-c")
        .arg(format!("gzip -c {} > {}", full.display(), gz.display())));
    let gz_bytes = std::fs::read(&gz).unwrap();

    let rt = tokio::runtime::Runtime::new().unwrap();
    let cut_tar = t.path().join("cut.tar");
    std::fs::write(&cut_tar, &bytes[..bytes.len() / 2]).unwrap();
    let cut_gz = t.path().join("cut.tar.gz");
    std::fs::write(&cut_gz, &gz_bytes[..gz_bytes.len() / 2]).unwrap();
    for (i, cut) in [&cut_tar, &cut_gz].into_iter().enumerate() {
        let r = format!("t/podman:cut{i}");
        let err = rt
            .block_on(push(&reg.url, cut, &r))
            .expect_err("a truncated archive was accepted");
        let msg = err.to_string();
        eprintln!("truncated archive refused: {msg}");
        assert!(
            msg.contains("truncated") && msg.contains(&cut.display().to_string()),
            "{msg}"
        );
        let out = snapctl(&reg.url, &["inspect", &r]);
        assert_eq!(out.code, 3, "a tag appeared: {}", out.stdout);
    }
    let ls = snapctl(&reg.url, &["ls"]).ok().json();
    assert_eq!(ls["repositories"].as_array().map_or(0, Vec::len), 0, "{ls}");

    // Exporting something that was not imported from an archive says what to do.
    let plain = t.path().join("plain");
    std::fs::create_dir_all(&plain).unwrap();
    std::fs::write(plain.join("f"), b"x").unwrap();
    snapctl(&reg.url, &["push", plain.to_str().unwrap(), "t/plain:v1"]).ok();
    let err = rt
        .block_on(async {
            let remote = Remote::connect(&reg.url).await.unwrap();
            pull_archive(
                &remote,
                &parse("t/plain:v1"),
                &t.path().join("x.tar"),
                Progress::hidden(),
            )
            .await
        })
        .expect_err("exported a snapshot without an archive index");
    assert!(err.to_string().contains("snapctl pull"), "{err}");
    assert!(!t.path().join("x.tar").exists());
}

/// A kubelet checkpoint archive (CRI-O writes Podman's layout under
/// /var/lib/kubelet/checkpoints/) imported with `snapctl import`, then exported with
/// `snapctl export` as an OCI checkpoint image: its one layer is the archive, byte for
/// byte, and skopeo reads both the directory and the archive form.
#[test]
fn kubelet_archive_imports_and_exports_as_an_oci_image_whose_layer_is_the_archive() {
    let _lock = criu_lock();
    let t = tempfile::tempdir().unwrap();
    let reg = Registry::start(&t.path().join("reg"));
    let (bundle, members) = podman_bundle(t.path());
    let archive = t
        .path()
        .join("checkpoint-worker-7d9f_default-worker-2026-12-04T09:00:00Z.tar");
    run(Command::new("tar")
        .arg("-C")
        .arg(&bundle)
        .arg("-cf")
        .arg(&archive)
        .args(&members));

    snapctl(
        &reg.url,
        &["import", archive.to_str().unwrap(), "k8s/worker:v1"],
    )
    .ok();
    let inspect = snapctl(&reg.url, &["inspect", "k8s/worker:v1"]).ok().json();
    let kinds: Vec<_> = inspect["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["kind"].as_str().unwrap().to_string())
        .collect();
    for kind in ["process", "rootfs", "extra"] {
        assert!(
            kinds.iter().any(|k| k == kind),
            "no {kind} layer: {inspect}"
        );
    }

    let dir = t.path().join("image");
    let exported = export_manifest_digest(
        &reg.url,
        "k8s/worker:v1",
        &format!("oci:{}:v1", dir.display()),
    );
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
    assert_eq!(index["manifests"][0]["digest"], exported);
    let manifest_hex = exported.trim_start_matches("sha256:").to_string();
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.join("blobs/sha256").join(&manifest_hex)).unwrap(),
    )
    .unwrap();
    assert_eq!(
        manifest["annotations"]["io.kubernetes.cri-o.annotations.checkpoint.name"],
        "worker"
    );
    let layer_hex = manifest["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:")
        .to_string();
    let layer = std::fs::read(dir.join("blobs/sha256").join(layer_hex)).unwrap();
    let original = std::fs::read(&archive).unwrap();
    assert!(
        layer == original,
        "layer differs from the archive at byte {:?}",
        first_difference(&layer, &original)
    );

    // The archive form, read by skopeo; an existing target is refused, not merged.
    let tarred = t.path().join("image.tar");
    snapctl(
        &reg.url,
        &[
            "export",
            "k8s/worker:v1",
            &format!("oci-archive:{}", tarred.display()),
        ],
    )
    .ok();
    let out = Command::new("skopeo")
        .args([
            "inspect",
            "--raw",
            &format!("oci-archive:{}", tarred.display()),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        out.stdout,
        std::fs::read(dir.join("blobs/sha256").join(&manifest_hex)).unwrap()
    );
    let again = snapctl(
        &reg.url,
        &["export", "k8s/worker:v1", &format!("oci:{}", dir.display())],
    );
    assert_eq!(again.code, 2, "{}", again.stderr);
    assert!(again.stderr.contains("exists"), "{}", again.stderr);
}
