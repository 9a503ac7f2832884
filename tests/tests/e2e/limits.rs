//! Input limits and validation where bytes arrive: chunk objects over the codec's
//! limit, too many digests in a call, names that are not names, manifests whose
//! paths would escape a pull directory, Podman archives with `../`, absolute and
//! symlinked members, and a pull destination with a symlink planted in it. Each is
//! refused with an error that names the field or path, and nothing lands outside
//! the directory it was meant for.

use std::path::Path;

use bytes::Bytes;
use snapreg_client::chunker::ChunkerConfig;
use snapreg_client::push::new_manifest;
use snapreg_client::remote::Remote;
use snapreg_proto::manifest::{Extent, File, Layer, LayerKind};
use snapreg_proto::pb;
use snapreg_proto::{codec, Digest};

use crate::support::*;

#[test]
fn oversized_objects_and_batches_and_bad_names_are_refused_by_field() {
    let t = tempfile::tempdir().unwrap();
    let reg = Registry::start(&t.path().join("reg"));
    block_on(async {
        let remote = Remote::connect(&reg.url).await.unwrap();
        let lease = remote.begin_push("t/lim").await.unwrap();
        // One byte over the largest object the codec can produce.
        let big = vec![7u8; codec::MAX_OBJECT_LEN + 1];
        let err = remote
            .put_chunks(
                &lease,
                futures::stream::iter(vec![(Digest::of(b"x"), Bytes::from(big))]),
            )
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("data") && err.contains("limit"), "{err}");

        let many: Vec<Digest> = (0..70_000u32)
            .map(|i| Digest::of(&i.to_le_bytes()))
            .collect();
        let err = remote
            .find_missing(&lease, &many)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("digests") && err.contains("at most"), "{err}");

        let mut raw = pb::registry_client::RegistryClient::connect(reg.url.clone())
            .await
            .unwrap();
        for (repo, tag) in [
            (
                "t/lim",
                "blake3:0000000000000000000000000000000000000000000000000000000000000000",
            ),
            ("t/lim", "../x"),
            ("T/Upper", "v1"),
            ("t/../etc", "v1"),
        ] {
            let s = raw
                .delete_tag(pb::DeleteTagRequest {
                    repository: repo.into(),
                    tag: tag.into(),
                })
                .await
                .unwrap_err();
            // 3: INVALID_ARGUMENT.
            assert_eq!(i32::from(s.code()), 3, "{repo}:{tag}: {s}");
        }
        let s = raw
            .set_retention(pb::SetRetentionRequest {
                repository: "../x".into(),
                policy: Some(pb::RetentionPolicy {
                    keep_last: 1,
                    keep_for_seconds: 0,
                }),
            })
            .await
            .unwrap_err();
        assert_eq!(i32::from(s.code()), 3, "{s}");
    });
    // Nothing was stored under any of those names.
    assert!(!reg.store().join("retention").exists());
    assert!(!reg.store().join("tags").exists());
}

#[test]
fn manifests_whose_paths_escape_are_refused_and_nothing_is_tagged() {
    let t = tempfile::tempdir().unwrap();
    let reg = Registry::start(&t.path().join("reg"));
    block_on(async {
        let remote = Remote::connect(&reg.url).await.unwrap();
        let data = b"payload".to_vec();
        let d = Digest::of(&data);
        for (layer_name, path) in [
            (Some("../../outside"), "f"),
            (Some("/abs"), "f"),
            (None, "../f"),
            (None, "/etc/passwd"),
            (None, "a/../../f"),
        ] {
            let lease = remote.begin_push("t/esc").await.unwrap();
            remote
                .put_chunks(
                    &lease,
                    futures::stream::iter(vec![(d, codec::encode(&data))]),
                )
                .await
                .unwrap();
            let layer = Layer {
                kind: LayerKind::Extra,
                name: layer_name.map(str::to_string),
                rank: None,
                files: vec![File {
                    path: path.into(),
                    size: data.len() as u64,
                    mode: 0o644,
                    extents: vec![Extent::Chunk {
                        chunk: d,
                        len: data.len() as u64,
                    }],
                }],
            };
            let m = new_manifest(&ChunkerConfig::default(), vec![layer], false);
            let err = remote
                .put_manifest("t/esc", &lease, Bytes::from(m.encode()), vec!["v1".into()])
                .await
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("absolute") || err.contains(".."),
                "{layer_name:?}/{path}: {err}"
            );
        }
    });
    assert_eq!(snapctl(&reg.url, &["inspect", "t/esc:v1"]).code, 3);
}

#[test]
fn pull_refuses_a_symlink_planted_in_its_destination() {
    let t = tempfile::tempdir().unwrap();
    let reg = Registry::start(&t.path().join("reg"));
    let src = t.path().join("src");
    write(&src, "sub/f.img", b"secret-free bytes");
    push(&reg.url, &src, "t/link:v1");
    let outside = t.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let dst = t.path().join("dst");
    std::fs::create_dir_all(&dst).unwrap();
    std::os::unix::fs::symlink(&outside, dst.join("sub")).unwrap();
    let out = snapctl(&reg.url, &["pull", "t/link:v1", dst.to_str().unwrap()]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(out.stderr.contains("symlink"), "{}", out.stderr);
    assert!(
        read_tree(&outside).is_empty(),
        "the pull wrote through the symlink"
    );
}

/// A ustar header block for `name` (type `kind`, `size` bytes, optional link).
fn tar_header(name: &str, kind: u8, size: usize, link: &str) -> Vec<u8> {
    let mut h = vec![0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    h[100..107].copy_from_slice(b"0000600");
    h[108..115].copy_from_slice(b"0000000");
    h[116..123].copy_from_slice(b"0000000");
    h[124..135].copy_from_slice(format!("{size:011o}").as_bytes());
    h[136..147].copy_from_slice(b"00000000000");
    h[156] = kind;
    h[157..157 + link.len()].copy_from_slice(link.as_bytes());
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
    h
}

fn tar(members: &[(&str, u8, &[u8], &str)]) -> Vec<u8> {
    let mut v = Vec::new();
    for (name, kind, data, link) in members {
        v.extend(tar_header(name, *kind, data.len(), link));
        v.extend_from_slice(data);
        v.resize(v.len().div_ceil(512) * 512, 0);
    }
    v.resize(v.len() + 1024, 0);
    v
}

fn push_archive(url: &str, dir: &Path, name: &str, bytes: &[u8], reference: &str) -> Out {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    snapctl(
        url,
        &[
            "push",
            "--podman-archive",
            path.to_str().unwrap(),
            reference,
        ],
    )
}

#[test]
fn podman_archives_with_escaping_or_symlinked_members_never_write_outside() {
    let t = tempfile::tempdir().unwrap();
    let reg = Registry::start(&t.path().join("reg"));
    let inv: (&str, u8, &[u8], &str) = ("checkpoint/inventory.img", b'0', b"inv", "");
    for (i, bad) in ["../evil", "/etc/evil", "checkpoint/../../evil"]
        .iter()
        .enumerate()
    {
        let bytes = tar(&[inv, (bad, b'0', b"boom", "")]);
        let out = push_archive(
            &reg.url,
            t.path(),
            &format!("bad{i}.tar"),
            &bytes,
            "t/pod:bad",
        );
        assert_eq!(out.code, 2, "{bad}: {}", out.stderr);
        assert!(out.stderr.contains("outside"), "{bad}: {}", out.stderr);
    }
    assert_eq!(snapctl(&reg.url, &["inspect", "t/pod:bad"]).code, 3);

    // A symlink member pointing outside, then a file "under" it: the symlink is kept
    // as a header only, so the pull makes a real directory and writes inside.
    let outside = t.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let bytes = tar(&[
        inv,
        ("checkpoint/link", b'2', b"", outside.to_str().unwrap()),
        ("checkpoint/link/x.img", b'0', b"data", ""),
    ]);
    push_archive(&reg.url, t.path(), "link.tar", &bytes, "t/pod:link").ok();
    let dst = t.path().join("dst");
    snapctl(&reg.url, &["pull", "t/pod:link", dst.to_str().unwrap()]).ok();
    assert!(
        read_tree(&outside).is_empty(),
        "a pull wrote through the archive's symlink"
    );
    let link = dst.join("checkpoint/link");
    assert!(
        !std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink(),
        "the pull created the archive's symlink"
    );
    assert_eq!(std::fs::read(link.join("x.img")).unwrap(), b"data");
    // And the export reproduces the archive, symlink header included.
    let out = t.path().join("out.tar");
    snapctl(
        &reg.url,
        &[
            "pull",
            "--podman-archive",
            out.to_str().unwrap(),
            "t/pod:link",
        ],
    )
    .ok();
    assert_eq!(std::fs::read(&out).unwrap(), bytes);
}
