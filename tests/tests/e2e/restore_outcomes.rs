//! Restores that fail are seen, and stop being offered: a real checkpoint whose
//! executable is gone at restore fails `snapctl pull-restore` twice (for real, CRIU and
//! all); each failure is recorded by the registry with its phase and reason, `snapctl
//! inspect` shows them, and Resolve then withholds the snapshot, naming why, and offers
//! the older good one; a success recorded afterwards offers it again.

use std::path::Path;
use std::process::Command;

use snapreg_proto::pb::{self, registry_client::RegistryClient};

use crate::support::*;

/// This host's facts, GPUs included (restore reports carry this host's GPU models).
fn host_facts() -> pb::NodeFacts {
    let f = snapreg_client::host::facts();
    pb::NodeFacts {
        arch: f.arch,
        cpu_features: f.cpu_features,
        kernel: f.kernel,
        criu_version: f.criu_version,
        container_image: f.container_image,
        gpu: f.gpu.map(|g| pb::GpuFacts {
            models: g.devices.into_iter().map(|d| d.model).collect(),
            driver_version: g.driver_version,
            cuda_driver_api: g.cuda_driver_api,
            mig_profile: g.mig_profile,
        }),
        labels: f.labels.into_iter().collect(),
    }
}

fn registry_call<T>(
    url: &str,
    call: impl AsyncFnOnce(&mut RegistryClient<tonic::transport::Channel>) -> T,
) -> T {
    block_on(async {
        let mut c = RegistryClient::connect(url.to_string()).await.unwrap();
        call(&mut c).await
    })
}

fn resolve(url: &str) -> pb::ResolveResponse {
    let req = pb::ResolveRequest {
        repository: "t/app".into(),
        node: Some(host_facts()),
        ..Default::default()
    };
    registry_call(url, async |c| c.resolve(req).await.unwrap().into_inner())
}

fn tags(list: &[String]) -> Vec<&str> {
    list.iter().map(String::as_str).collect()
}

/// A test process run from its own copy of the binary, so the test can take the
/// executable away before restoring.
fn spawn_from_copy(dir: &Path) -> (TestProc, std::path::PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    let exe = dir.join("testproc-copy");
    std::fs::copy(testproc_bin(), &exe).unwrap();
    let out = dir.join("out");
    std::fs::create_dir_all(&out).unwrap();
    let mut cmd = Command::new(&exe);
    cmd.args(["hold", "--out"]).arg(&out).args(["--mib", "4"]);
    let p = TestProc::adopt(spawn_detached(&mut cmd), &out);
    p.wait_counter_above(2);
    (p, exe)
}

#[test]
fn a_snapshot_that_fails_twice_is_withheld_by_resolve_until_a_success() {
    let _lock = criu_lock();
    let t = tempfile::tempdir().unwrap();
    let reg = Registry::start(&t.path().join("reg"));
    let cache = t.path().join("cache");
    let src = t.path().join("src");
    write(&src, "pages-1.img", &noise(31, 1 << 20));
    push(&reg.url, &src, "t/app:v1");

    let (mut p, exe) = spawn_from_copy(&t.path().join("proc"));
    let pid = p.pid();
    let ck = snapctl(
        &reg.url,
        &["checkpoint", "--pid", &pid.to_string(), "t/app:v2"],
    )
    .ok()
    .json();
    let digest = ck["digest"].as_str().unwrap().to_string();
    let _ = p.child.wait();
    kill_and_wait(pid);
    let r = resolve(&reg.url);
    let offered: Vec<String> = r.compatible.iter().map(|s| s.tag.clone()).collect();
    assert_eq!(tags(&offered), ["v2", "v1"], "{r:?}");

    std::fs::remove_file(&exe).unwrap();
    for _ in 0..2 {
        let failed = snapctl_cached(&reg.url, &cache, &["pull-restore", "--detach", "t/app:v2"]);
        assert_ne!(
            failed.code, 0,
            "restored without its executable: {}",
            failed.stdout
        );
        kill_and_wait(pid);
    }

    let inspect = snapctl(&reg.url, &["inspect", "t/app:v2"]).ok().json();
    let restores = &inspect["restores"];
    assert_eq!(restores["failures"], 2, "{inspect}");
    assert_eq!(restores["successes"], 0, "{inspect}");
    let last = &restores["last_failure"];
    assert!(
        last["reason"].as_str().unwrap().contains("testproc-copy"),
        "{last}"
    );
    let phase = last["phase"].as_str().unwrap();
    assert!(phase == "plan" || phase == "criu-restore", "{last}");

    let r = resolve(&reg.url);
    let offered: Vec<String> = r.compatible.iter().map(|s| s.tag.clone()).collect();
    assert_eq!(tags(&offered), ["v1"], "{r:?}");
    let withheld = r
        .incompatible
        .iter()
        .find(|s| s.tag == "v2")
        .expect("v2 named");
    let why = withheld.mismatches.join("; ");
    assert!(
        why.contains("last 2 restores") && why.contains("testproc-copy"),
        "{why}"
    );
    assert!(why.contains("push a new snapshot"), "{why}");

    // A node (here: the test, as a node would) restores it fine: offered again.
    let ok = pb::ReportRestoreRequest {
        repository: "t/app".into(),
        digest: digest.clone(),
        outcome: Some(pb::RestoreOutcome {
            node_name: "fixed-node".into(),
            gpu_models: host_facts().gpu.map(|g| g.models).unwrap_or_default(),
            success: true,
            seconds: 1.0,
            ..Default::default()
        }),
    };
    registry_call(&reg.url, async |c| c.report_restore(ok).await.unwrap());
    let r = resolve(&reg.url);
    let offered: Vec<String> = r.compatible.iter().map(|s| s.tag.clone()).collect();
    assert_eq!(tags(&offered), ["v2", "v1"], "{r:?}");
}

#[test]
fn a_garbled_outcome_report_is_refused_naming_the_field() {
    let t = tempfile::tempdir().unwrap();
    let reg = Registry::start(&t.path().join("reg"));
    let bad_digest = pb::ReportRestoreRequest {
        repository: "t/app".into(),
        digest: "sha256:abc".into(),
        outcome: Some(pb::RestoreOutcome::default()),
    };
    let e = registry_call(&reg.url, async |c| {
        c.report_restore(bad_digest).await.unwrap_err()
    });
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    assert!(e.message().contains("digest"), "{e}");
    let no_outcome = pb::ReportRestoreRequest {
        repository: "t/app".into(),
        digest: format!("blake3:{}", "0".repeat(64)),
        outcome: None,
    };
    let e = registry_call(&reg.url, async |c| {
        c.report_restore(no_outcome).await.unwrap_err()
    });
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    assert!(e.message().contains("outcome"), "{e}");
}
