//! `snapreg-bench oci-dedup`: does a checkpoint pushed as an OCI image through /v2/
//! store what a native push of the same dump stores?
//!
//! Two sibling processes (the same program and data, different per-process content
//! shifting it to other offsets) are dumped with CRIU. Each dump is pushed to a fresh
//! registry three ways: `snapctl push` (native), and as an OCI checkpoint image
//! (Podman's layout: one tar layer holding `checkpoint/`) copied in by skopeo from an
//! `oci:` directory, once with the layer kept uncompressed (`--preserve-digests`)
//! and once gzipped (skopeo's default). Reported: the bytes each registry's object
//! store holds after both pushes, against the native one.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::{dir_bytes, dump_shaped, save_run, scratch, Registry, Shape};

fn sha256_hex(bytes: &[u8]) -> String {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes);
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// An OCI image layout holding `images` as a Podman-style checkpoint image.
fn checkpoint_layout(images: &Path, out: &Path, name: &str) -> Result<()> {
    let bundle = out.with_extension("bundle");
    std::fs::create_dir_all(&bundle)?;
    let tar = bundle.join("layer.tar");
    let st = Command::new("tar")
        .arg("-C")
        .arg(images.parent().context("images dir")?)
        .arg("-cf")
        .arg(&tar)
        .arg(format!(
            "--transform=s,^{},checkpoint,",
            images.file_name().context("images dir")?.to_string_lossy()
        ))
        .arg(images.file_name().context("images dir")?)
        .status()?;
    if !st.success() {
        bail!("tar of {} failed", images.display());
    }
    let layer = std::fs::read(&tar)?;
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let blobs = out.join("blobs/sha256");
    std::fs::create_dir_all(&blobs)?;
    let (ld, cd) = (sha256_hex(&layer), sha256_hex(config));
    std::fs::write(blobs.join(&ld), &layer)?;
    std::fs::write(blobs.join(&cd), config)?;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": format!("sha256:{cd}"), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": format!("sha256:{ld}"), "size": layer.len()}],
        "annotations": {"io.kubernetes.cri-o.annotations.checkpoint.name": name},
    })
    .to_string();
    let md = sha256_hex(manifest.as_bytes());
    std::fs::write(blobs.join(&md), &manifest)?;
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{md}"),
            "size": manifest.len(),
            "annotations": {"org.opencontainers.image.ref.name": "v1"},
        }],
    });
    std::fs::write(out.join("index.json"), index.to_string())?;
    std::fs::write(out.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)?;
    std::fs::remove_dir_all(&bundle)?;
    Ok(())
}

fn skopeo_copy(extra: &[&str], from: &str, to: &str) -> Result<()> {
    let out = Command::new("skopeo")
        .arg("copy")
        .args(["--dest-tls-verify=false", "--quiet"])
        .args(extra)
        .args([from, to])
        .output()
        .context("running skopeo (deploy/install-build-deps.sh installs it)")?;
    if !out.status.success() {
        bail!(
            "skopeo copy {from} {to}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

pub fn run(mib: usize) -> Result<()> {
    let work = scratch("snapreg-bench-oci-")?;
    let w = work.path();
    let gib = mib as f64 * 3.0 / 1024.0;
    let dumps = [w.join("a/images"), w.join("b/images")];
    dump_shaped(
        w,
        &dumps[0],
        Shape {
            pad_mib: 1,
            ..Shape::of(gib)
        },
    )?;
    dump_shaped(
        w,
        &dumps[1],
        Shape {
            pad_mib: 7,
            ..Shape::of(gib)
        },
    )?;
    let dump_bytes: u64 = dumps.iter().map(|d| dir_bytes(d)).sum();
    let layouts = [w.join("a/layout"), w.join("b/layout")];
    for (d, l) in dumps.iter().zip(&layouts) {
        checkpoint_layout(d, l, "sibling")?;
    }

    let mut rows = Vec::new();
    for way in [
        "native snapctl push",
        "OCI via skopeo, tar layer",
        "OCI via skopeo, tar+gzip layer",
    ] {
        let data = w.join(format!("reg-{}", rows.len()));
        let reg = Registry::start_with(&data, &["--oci-listen", "127.0.0.1:0"])?;
        let oci = reg
            .oci
            .clone()
            .context("the registry printed no OCI address")?;
        for (i, (dump, layout)) in dumps.iter().zip(&layouts).enumerate() {
            let reference = format!("bench/sib:{i}");
            let from = format!("oci:{}:v1", layout.display());
            let to = format!("docker://{oci}/{}", reference);
            match rows.len() {
                0 => {
                    crate::snapctl(&reg.url, &["push", &dump.display().to_string(), &reference])?;
                }
                1 => skopeo_copy(&["--preserve-digests"], &from, &to)?,
                _ => skopeo_copy(&[], &from, &to)?,
            }
        }
        drop(reg);
        let stored = dir_bytes(&data.join("store"));
        rows.push((way, stored));
    }
    let native = rows[0].1 as f64;
    let mut report = format!(
        "two sibling CRIU dumps, {:.0} MiB on disk together\n\n| pushed as | registry store after both | ratio to native |\n|---|---|---|\n",
        dump_bytes as f64 / (1 << 20) as f64
    );
    for (way, stored) in &rows {
        report += &format!(
            "| {way} | {:.1} MiB | {:.2}× |\n",
            *stored as f64 / (1 << 20) as f64,
            *stored as f64 / native
        );
    }
    println!("{report}");
    save_run(
        "oci-dedup",
        &serde_json::json!({
            "mib_per_third": mib,
            "dump_bytes": dump_bytes,
            "stored_bytes": rows.iter().map(|(w, s)| serde_json::json!({"way": w, "bytes": s})).collect::<Vec<_>>(),
        }),
    )
}
