//! Encryption at rest: tenant keys on the client, ciphertext in the registry, dedup
//! within a tenant and nothing shared across tenants, and clear refusals without the
//! key.

use std::path::Path;
use std::time::Duration;

use crate::support::*;

const MARKER: &[u8] = b"TENANT-SECRET-7f3a9c-do-not-store-in-clear";

/// 3 MiB of noise with the marker every 64 KiB (so zstd does not pay and a plaintext
/// store holds the marker verbatim), plus zeros and a small text file.
fn secret_tree(dir: &Path) {
    let mut data = noise(91, 3 << 20);
    for at in (0..data.len() - MARKER.len()).step_by(64 << 10) {
        data[at..at + MARKER.len()].copy_from_slice(MARKER);
    }
    write(dir, "pages-1.img", &data);
    write(dir, "zeros.img", &vec![0u8; 1 << 20]);
    write(
        dir,
        "config.txt",
        b"api_key = TENANT-SECRET-7f3a9c-do-not-store-in-clear\n",
    );
}

fn chunk_objects(reg: &Registry) -> usize {
    read_tree(&reg.store().join("chunks")).len()
}

#[test]
fn encrypted_snapshots_dedup_within_a_tenant_and_share_nothing_across_tenants() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    secret_tree(&src);
    let (key_a, id_a) = new_tenant_key(t.path(), "acme");
    let (key_b, id_b) = new_tenant_key(t.path(), "beta");
    assert_ne!(id_a, id_b);
    let src_s = src.to_str().unwrap();

    // Control: pushed without a key, the marker is in the store as is.
    let plain = Registry::start(&t.path().join("plain"));
    snapctl(&plain.url, &["push", src_s, "acme/app:v1"]).ok();
    assert!(tree_contains(&plain.store(), MARKER));

    let reg = Registry::start(&t.path().join("reg"));
    let a1 = snapctl(
        &reg.url,
        &["--key-file", &key_a, "push", src_s, "acme/app:v1"],
    )
    .ok()
    .json();
    let chunks = a1["chunks_total"].as_u64().unwrap();
    assert!(chunks > 0);
    assert_eq!(a1["chunks_transferred"], chunks, "{a1}");
    assert_eq!(chunk_objects(&reg) as u64, chunks);
    // Same tenant, another repository: every chunk dedups.
    let a2 = snapctl(
        &reg.url,
        &["--key-file", &key_a, "push", src_s, "acme/other:v1"],
    )
    .ok()
    .json();
    assert_eq!(a2["chunks_transferred"], 0, "{a2}");
    // Another tenant, the same bytes: nothing shared, every chunk sent again.
    let b1 = snapctl(
        &reg.url,
        &["--key-file", &key_b, "push", src_s, "beta/app:v1"],
    )
    .ok()
    .json();
    assert_eq!(b1["chunks_transferred"], b1["chunks_total"], "{b1}");
    assert_eq!(
        chunk_objects(&reg) as u64,
        chunks + b1["chunks_total"].as_u64().unwrap()
    );
    // Nowhere in the registry's data dir (objects, manifests, tags, index) in clear.
    assert!(!tree_contains(&t.path().join("reg"), MARKER));

    // The manifest names the key; reading it needs no key.
    let inspect = snapctl(&reg.url, &["inspect", "acme/app:v1"]).ok().json();
    assert_eq!(inspect["schema_version"], 2);
    assert_eq!(inspect["encryption"]["key_id"], id_a.as_str());
    assert_eq!(inspect["encryption"]["tenant"], "acme");

    // No key, or another tenant's: refused (exit 6) before anything is written.
    let dst = t.path().join("dst");
    let dst_s = dst.to_str().unwrap();
    let none = snapctl(&reg.url, &["pull", "acme/app:v1", dst_s]);
    assert_eq!(none.code, 6, "{}", none.stderr);
    assert!(
        none.stderr.contains(&id_a) && none.stderr.contains("--key-file"),
        "{}",
        none.stderr
    );
    assert!(!dst.exists());
    let wrong = snapctl(
        &reg.url,
        &["--key-file", &key_b, "pull", "acme/app:v1", dst_s],
    );
    assert_eq!(wrong.code, 6, "{}", wrong.stderr);
    assert!(
        wrong.stderr.contains(&id_a) && wrong.stderr.contains(&id_b),
        "{}",
        wrong.stderr
    );
    // With it: byte-identical, from either repository.
    snapctl(
        &reg.url,
        &["--key-file", &key_a, "pull", "acme/other:v1", dst_s],
    )
    .ok();
    assert_trees_equal(&src, &dst);

    // copy: rotate to a new key (nothing shared, old key refused), keep the key
    // (everything dedups), decrypt for export; and encrypt a plaintext snapshot.
    let (key_c, id_c) = new_tenant_key(t.path(), "acme-2027");
    let rotated = snapctl(
        &reg.url,
        &[
            "--key-file",
            &key_a,
            "copy",
            "acme/app:v1",
            "acme/rotated:v1",
            "--to-key-file",
            &key_c,
        ],
    )
    .ok()
    .json();
    assert_eq!(rotated["key_id"], id_c.as_str());
    assert_eq!(
        rotated["chunks_transferred"], rotated["chunks_total"],
        "{rotated}"
    );
    let old = snapctl(
        &reg.url,
        &["--key-file", &key_a, "pull", "acme/rotated:v1", dst_s],
    );
    assert_eq!(old.code, 6, "{}", old.stderr);
    let dst_c = t.path().join("dst-c");
    snapctl(
        &reg.url,
        &[
            "--key-file",
            &key_c,
            "pull",
            "acme/rotated:v1",
            dst_c.to_str().unwrap(),
        ],
    )
    .ok();
    assert_trees_equal(&src, &dst_c);
    let same = snapctl(
        &reg.url,
        &["--key-file", &key_a, "copy", "acme/app:v1", "acme/same:v1"],
    )
    .ok()
    .json();
    assert_eq!(same["chunks_transferred"], 0, "{same}");
    snapctl(
        &reg.url,
        &[
            "--key-file",
            &key_a,
            "copy",
            "acme/app:v1",
            "export/app:v1",
            "--to-plaintext",
        ],
    )
    .ok();
    let dst_p = t.path().join("dst-p");
    snapctl(
        &reg.url,
        &["pull", "export/app:v1", dst_p.to_str().unwrap()],
    )
    .ok();
    assert_trees_equal(&src, &dst_p);
    assert_eq!(
        snapctl(&reg.url, &["inspect", "export/app:v1"]).ok().json()["schema_version"],
        1
    );
    snapctl(
        &plain.url,
        &[
            "copy",
            "acme/app:v1",
            "acme/enc:v1",
            "--to-key-file",
            &key_a,
        ],
    )
    .ok();
    let dst_e = t.path().join("dst-e");
    snapctl(
        &plain.url,
        &[
            "--key-file",
            &key_a,
            "pull",
            "acme/enc:v1",
            dst_e.to_str().unwrap(),
        ],
    )
    .ok();
    assert_trees_equal(&src, &dst_e);

    // verify checks the stored bytes without the key, and the content with it.
    let stored = snapctl(&reg.url, &["verify", "acme/app:v1"]).ok().json();
    assert_eq!(stored["content_checked"], false, "{stored}");
    let full = snapctl(&reg.url, &["--key-file", &key_a, "verify", "acme/app:v1"])
        .ok()
        .json();
    assert_eq!(full["content_checked"], true, "{full}");
    assert_eq!(full["chunks_ok"], chunks);

    // A key file edited or damaged is refused by name, not used.
    let text = std::fs::read_to_string(&key_a).unwrap();
    let damaged = t.path().join("damaged.key");
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["secret"] = "11".repeat(32).into();
    std::fs::write(&damaged, v.to_string()).unwrap();
    let bad = snapctl(&reg.url, &["key", "show", damaged.to_str().unwrap()]);
    assert_eq!(bad.code, 2, "{}", bad.stderr);
    assert!(bad.stderr.contains("damaged"), "{}", bad.stderr);
    // `key new` never overwrites a key (a lost key is every snapshot under it lost).
    let again = snapctl(&reg.url, &["key", "new", "--tenant", "acme", &key_a]);
    assert_ne!(again.code, 0);
    assert_eq!(std::fs::read_to_string(&key_a).unwrap(), text);
}

#[test]
fn a_registry_rule_keeps_a_tenants_repositories_encrypted_with_its_key() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    secret_tree(&src);
    let src_s = src.to_str().unwrap();
    let (key_a, id_a) = new_tenant_key(t.path(), "acme");
    let (key_b, _) = new_tenant_key(t.path(), "beta");
    let rule = format!("acme/*={id_a}");
    let reg = Registry::start_with(&t.path().join("reg"), &["--tenant-key", &rule]);

    for (key, what) in [
        (None, "not encrypted"),
        (Some(&key_b), "encrypted with key"),
    ] {
        let mut args = vec![];
        if let Some(k) = key {
            args.extend(["--key-file", k.as_str()]);
        }
        args.extend(["push", src_s, "acme/app:v1"]);
        let refused = snapctl(&reg.url, &args);
        assert_eq!(refused.code, 6, "{}", refused.stderr);
        assert!(
            refused.stderr.contains(what) && refused.stderr.contains(&rule),
            "{}",
            refused.stderr
        );
    }
    assert_eq!(list_tags(&reg.url, "acme/app").len(), 0);
    snapctl(
        &reg.url,
        &["--key-file", &key_a, "push", src_s, "acme/app:v1"],
    )
    .ok();
    // Other repositories are free; a tag cannot carry their snapshots in.
    snapctl(&reg.url, &["push", src_s, "misc/app:v1"]).ok();
    let tag = snapctl(&reg.url, &["tag", "misc/app:v1", "acme/app:v2"]);
    assert_eq!(tag.code, 6, "{}", tag.stderr);
    snapctl(&reg.url, &["tag", "acme/app:v1", "acme/app:v3"]).ok();
}

#[test]
fn an_encrypted_checkpoint_restores_only_with_its_key_also_after_rotation_and_keeps_counting() {
    let _lock = criu_lock();
    let t = tempfile::tempdir().unwrap();
    let reg = Registry::start(&t.path().join("reg"));
    let cache = t.path().join("cache");
    let (key, id) = new_tenant_key(t.path(), "acme");
    // The marker is in the process's memory: its --out argument is on its stack.
    let marker = "proc-TENANT-SECRET-7f3a9c";
    let mut p = TestProc::hold(&t.path().join(marker), 32, 5, 1, 8);
    let pid = p.pid();

    let ck = snapctl(
        &reg.url,
        &[
            "--key-file",
            &key,
            "checkpoint",
            "--pid",
            &pid.to_string(),
            "acme/ck:v1",
        ],
    )
    .ok()
    .json();
    assert!(ck["bytes_total"].as_u64().unwrap() > 32 << 20, "{ck}");
    let _ = p.child.wait();
    let at_checkpoint = p.counter();
    assert!(!tree_contains(&t.path().join("reg"), marker.as_bytes()));

    // Without the key: refused before CRIU starts; nothing runs under the PID.
    let refused = snapctl_cached(
        &reg.url,
        &cache,
        &["pull-restore", "--detach", "acme/ck:v1"],
    );
    assert_eq!(refused.code, 6, "{}", refused.stderr);
    assert!(refused.stderr.contains(&id), "{}", refused.stderr);
    assert!(!pid_alive(pid));

    // Rotated to a new key by `copy` (CRIU options, compatibility record and all), and
    // restored from the copy.
    let (key2, _) = new_tenant_key(t.path(), "acme-next");
    snapctl(
        &reg.url,
        &[
            "--key-file",
            &key,
            "copy",
            "acme/ck:v1",
            "acme/ck:rotated",
            "--to-key-file",
            &key2,
        ],
    )
    .ok();
    let r = snapctl_cached(
        &reg.url,
        &cache,
        &[
            "--key-file",
            &key2,
            "pull-restore",
            "--detach",
            "acme/ck:rotated",
        ],
    )
    .ok()
    .json();
    let restored = Restored(pid);
    assert_eq!(r["pid"], pid);
    // The zero-page plan read the (decrypted) pagemap and mm images.
    assert!(r["zero_bytes_left_out"].as_u64().unwrap() >= 7 << 20, "{r}");
    p.wait_counter_above(at_checkpoint + 3);
    assert!(
        p.verify(pid).starts_with("ok"),
        "memory differs after restore"
    );
    drop(restored);
    // The node cache holds the chunks as stored: encrypted.
    assert!(!tree_contains(&cache, marker.as_bytes()));

    // The marker was in the snapshot: the decrypted image has it.
    let images = t.path().join("images");
    snapctl(
        &reg.url,
        &[
            "--key-file",
            &key2,
            "pull",
            "acme/ck:rotated",
            images.to_str().unwrap(),
        ],
    )
    .ok();
    assert!(tree_contains(&images, marker.as_bytes()));
    wait_for(Duration::from_secs(5), || (!pid_alive(pid)).then_some(()));
}
