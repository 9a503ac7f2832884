//! Access control and TLS between real processes: registries started without
//! anonymous access, tokens issued and revoked with `snapreg token`, snapctl over
//! https with a private CA (certificates generated here with rcgen), mutual TLS for
//! agents and replication peers.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use crate::support::*;

/// Exit code for access refused (no/invalid token, missing scope, TLS refused).
const ACCESS_REFUSED: i32 = 6;

fn closed(data: &Path, extra: &[&str]) -> Registry {
    let mut args = vec!["--anonymous", "none"];
    args.extend_from_slice(extra);
    Registry::start_with(data, &args)
}

fn refused(out: &Out, needle: &str) {
    assert_eq!(
        out.code, ACCESS_REFUSED,
        "expected exit {ACCESS_REFUSED}\nstdout: {}\nstderr: {}",
        out.stdout, out.stderr
    );
    assert!(
        out.stderr.contains(needle),
        "stderr lacks {needle:?}: {}",
        out.stderr
    );
}

fn small_snapshot(dir: &Path) -> PathBuf {
    let src = dir.join("src");
    write(&src, "pages-1.img", &noise(3, 1 << 20));
    write(&src, "core.img", b"core\n");
    src
}

#[test]
fn tokens_grant_what_they_name_and_nothing_else() {
    let t = tempfile::tempdir().unwrap();
    let reg = closed(&t.path().join("reg"), &["--auth-cache-ttl", "100ms"]);
    let src = small_snapshot(t.path());
    let s = src.to_str().unwrap();
    // Issued first so that its second has passed by the end of the test.
    let (_, expiring) = reg.issue_token(&["--repo", "team/*", "--scope", "pull", "--ttl", "1s"]);
    let (_, push) = reg.issue_token(&["--repo", "team/*", "--scope", "push", "--name", "ci"]);
    let (_, pull) = reg.issue_token(&["--repo", "team/*", "--scope", "pull"]);
    let (_, other) = reg.issue_token(&["--repo", "other/app", "--scope", "admin"]);
    let (_, admin) = reg.issue_token(&["--repo", "*", "--scope", "admin"]);
    let (doomed_id, doomed) = reg.issue_token(&["--repo", "*", "--scope", "pull"]);

    // No token: refused, and told how to get one.
    let out = snapctl(&reg.url, &["ls"]);
    refused(&out, "snapreg token issue");
    assert!(out.stderr.contains("SNAPCTL_TOKEN"), "{}", out.stderr);
    assert_eq!(out.json()["exit_code"], ACCESS_REFUSED);
    refused(&snapctl(&reg.url, &["push", s, "team/app:v1"]), "--token");
    // A token that was never issued.
    refused(
        &snapctl(&reg.url, &["--token", "snapreg_0123456789abcdef_00", "ls"]),
        "not valid",
    );

    // Push with the push token (also accepted from a file).
    let token_file = t.path().join("push.token");
    std::fs::write(&token_file, format!("{push}\n")).unwrap();
    snapctl(
        &reg.url,
        &[
            "--token-file",
            token_file.to_str().unwrap(),
            "push",
            s,
            "team/app:v1",
        ],
    )
    .ok();
    // The push token cannot push outside its pattern.
    refused(
        &snapctl(&reg.url, &["--token", &push, "push", s, "elsewhere/app:v1"]),
        "grants push on \"team/*\"",
    );

    // A pull token pulls but cannot push, tag or delete.
    let dst = t.path().join("pulled");
    snapctl(
        &reg.url,
        &[
            "--token",
            &pull,
            "pull",
            "team/app:v1",
            dst.to_str().unwrap(),
        ],
    )
    .ok();
    assert_trees_equal(&src, &dst);
    let out = snapctl(&reg.url, &["--token", &pull, "push", s, "team/app:v2"]);
    refused(&out, "grants pull");
    assert!(out.stderr.contains("--scope push"), "{}", out.stderr);
    refused(
        &snapctl(
            &reg.url,
            &["--token", &pull, "tag", "team/app:v1", "team/app:v3"],
        ),
        "grants pull",
    );
    refused(
        &snapctl(&reg.url, &["--token", &pull, "rm", "team/app:v1"]),
        "grants pull",
    );

    // A token for another repository sees nothing of team/.
    refused(
        &snapctl(&reg.url, &["--token", &other, "ls", "team/app"]),
        "on repository \"team/app\"",
    );
    refused(
        &snapctl(
            &reg.url,
            &[
                "--token",
                &other,
                "pull",
                "team/app:v1",
                t.path().join("x").to_str().unwrap(),
            ],
        ),
        "other/app",
    );
    let listed = snapctl(&reg.url, &["--token", &other, "ls"]).ok().json();
    assert_eq!(listed["repositories"], serde_json::json!([]), "{listed}");
    let listed = snapctl(&reg.url, &["--token", &pull, "ls"]).ok().json();
    assert_eq!(listed["repositories"], serde_json::json!(["team/app"]));

    // GC is registry-wide: admin on `*` only.
    refused(&snapctl(&reg.url, &["--token", &push, "gc"]), "grants push");
    refused(
        &snapctl(&reg.url, &["--token", &other, "gc"]),
        "registry-wide",
    );
    let gc = snapctl(&reg.url, &["--token", &admin, "gc", "--dry-run"])
        .ok()
        .json();
    assert_eq!(gc["manifests_live"], 1, "{gc}");
    // An online scrub is registry-wide too.
    let scrub = |token: &str| {
        Command::new(bin("snapreg"))
            .args([
                "scrub",
                "--dry-run",
                "--registry",
                &reg.url,
                "--token",
                token,
            ])
            .env("RUST_LOG", "warn")
            .output()
            .unwrap()
    };
    let denied = scrub(&push);
    assert_ne!(denied.status.code(), Some(0));
    assert!(
        String::from_utf8_lossy(&denied.stderr).contains("scope"),
        "{denied:?}"
    );
    let ok = scrub(&admin);
    assert_eq!(ok.status.code(), Some(0), "{ok:?}");

    // Revocation reaches the running registry (within --auth-cache-ttl).
    snapctl(&reg.url, &["--token", &doomed, "ls"]).ok();
    let out = reg.token_command(&["revoke", &doomed_id]);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    std::thread::sleep(Duration::from_millis(300));
    refused(
        &snapctl(&reg.url, &["--token", &doomed, "ls"]),
        "was revoked",
    );

    // Expiry.
    let expired = wait_for(Duration::from_secs(5), || {
        let out = snapctl(&reg.url, &["--token", &expiring, "ls"]);
        (out.code != 0).then_some(out)
    })
    .expect("the 1s token still works after 5s");
    refused(&expired, "expired at");

    // The listing shows every token, the revoked one marked, and no secret.
    let ls = reg.token_command(&["ls"]);
    assert_eq!(ls.code, 0, "{}", ls.stderr);
    assert_eq!(ls.stdout.lines().count(), 6, "{}", ls.stdout);
    assert!(ls.stdout.contains(&format!("\"id\":\"{doomed_id}\"")));
    for line in ls.stdout.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(
            v["revoked_unix"].is_u64(),
            v["id"] == doomed_id.as_str(),
            "{v}"
        );
    }
    for secret in [&push, &pull, &other, &admin, &doomed] {
        let secret = secret.rsplit('_').next().unwrap();
        assert!(!ls.stdout.contains(secret));
        let stored = read_tree(&reg.store().join("auth"));
        assert!(stored
            .values()
            .all(|b| !String::from_utf8_lossy(b).contains(secret)));
    }
    // Tokens live in the object store, so a second registry on the same store (a
    // replica; here: after the index is gone) accepts them.
    drop(reg);
    std::fs::remove_dir_all(t.path().join("reg/index")).unwrap();
    let again = closed(&t.path().join("reg"), &[]);
    let listed = snapctl(&again.url, &["--token", &pull, "ls"]).ok().json();
    assert_eq!(listed["repositories"], serde_json::json!(["team/app"]));
}

/// A private CA with a server certificate for 127.0.0.1/localhost and a client
/// certificate, as PEM files in `dir`.
pub(crate) struct Pki {
    pub(crate) ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

impl Pki {
    pub(crate) fn new(dir: &Path) -> Pki {
        std::fs::create_dir_all(dir).unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "snapreg test CA");
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        let leaf = |names: Vec<String>, usage: ExtendedKeyUsagePurpose, stem: &str| {
            let key = KeyPair::generate().unwrap();
            let mut p = CertificateParams::new(names).unwrap();
            p.distinguished_name.push(DnType::CommonName, stem);
            p.extended_key_usages = vec![usage];
            let cert = p.signed_by(&key, &issuer).unwrap();
            let (c, k) = (
                dir.join(format!("{stem}.pem")),
                dir.join(format!("{stem}.key")),
            );
            std::fs::write(&c, cert.pem()).unwrap();
            std::fs::write(&k, key.serialize_pem()).unwrap();
            (c, k)
        };
        let (server_cert, server_key) = leaf(
            vec!["127.0.0.1".into(), "localhost".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
            "server",
        );
        let (client_cert, client_key) = leaf(
            vec!["node-1".into()],
            ExtendedKeyUsagePurpose::ClientAuth,
            "client",
        );
        let ca_path = dir.join("ca.pem");
        std::fs::write(&ca_path, ca_cert.pem()).unwrap();
        Pki {
            ca: ca_path,
            server_cert,
            server_key,
            client_cert,
            client_key,
        }
    }

    pub(crate) fn serve_args(&self, mutual: bool) -> Vec<String> {
        let mut v = vec![
            "--tls-cert".to_string(),
            self.server_cert.display().to_string(),
            "--tls-key".to_string(),
            self.server_key.display().to_string(),
        ];
        if mutual {
            v.push("--tls-client-ca".into());
            v.push(self.ca.display().to_string());
        }
        v
    }

    fn ca_args(&self) -> [String; 2] {
        ["--ca-cert".into(), self.ca.display().to_string()]
    }

    fn client_args(&self) -> [String; 6] {
        [
            "--ca-cert".into(),
            self.ca.display().to_string(),
            "--client-cert".into(),
            self.client_cert.display().to_string(),
            "--client-key".into(),
            self.client_key.display().to_string(),
        ]
    }
}

fn args<'a>(groups: &[&'a [String]], rest: &[&'a str]) -> Vec<&'a str> {
    groups
        .iter()
        .flat_map(|g| g.iter().map(String::as_str))
        .chain(rest.iter().copied())
        .collect()
}

#[test]
fn snapctl_over_https_needs_the_private_ca() {
    let t = tempfile::tempdir().unwrap();
    let pki = Pki::new(&t.path().join("pki"));
    let serve = pki.serve_args(false);
    let serve: Vec<&str> = serve.iter().map(String::as_str).collect();
    let reg = closed(&t.path().join("reg"), &serve);
    assert!(reg.url.starts_with("https://"), "{}", reg.url);
    let (_, token) = reg.issue_token(&["--repo", "*", "--scope", "push"]);
    let src = small_snapshot(t.path());
    let ca = pki.ca_args();

    let out = snapctl(&reg.url, &["--token", &token, "ls"]);
    refused(&out, "--ca-cert");
    assert!(out.stderr.contains("TLS"), "{}", out.stderr);
    snapctl(
        &reg.url,
        &args(
            &[&ca],
            &[
                "--token",
                &token,
                "push",
                src.to_str().unwrap(),
                "tls/app:v1",
            ],
        ),
    )
    .ok();
    let dst = t.path().join("pulled");
    snapctl(
        &reg.url,
        &args(
            &[&ca],
            &[
                "--token",
                &token,
                "pull",
                "tls/app:v1",
                dst.to_str().unwrap(),
            ],
        ),
    )
    .ok();
    assert_trees_equal(&src, &dst);
    // TLS does not replace the token.
    refused(
        &snapctl(&reg.url, &args(&[&ca], &["ls"])),
        "snapreg token issue",
    );
    // Plain HTTP to a TLS listener fails rather than talking in the clear.
    let plain = reg.url.replace("https://", "http://");
    assert_ne!(snapctl(&plain, &["--token", &token, "ls"]).code, 0);
}

#[test]
fn mutual_tls_refuses_clients_and_agents_without_a_certificate() {
    let t = tempfile::tempdir().unwrap();
    let pki = Pki::new(&t.path().join("pki"));
    let serve = pki.serve_args(true);
    let serve: Vec<&str> = serve.iter().map(String::as_str).collect();
    let reg = closed(&t.path().join("reg"), &serve);
    let (_, node_token) = reg.issue_token(&["--repo", "*", "--scope", "pull", "--name", "nodes"]);
    let (ca, client) = (pki.ca_args(), pki.client_args());

    let out = snapctl(&reg.url, &args(&[&ca], &["--token", &node_token, "ls"]));
    refused(&out, "--client-cert");
    snapctl(&reg.url, &args(&[&client], &["--token", &node_token, "ls"])).ok();

    // Two agents: one with the client certificate, one without. Each serves its own
    // listener with TLS too, admitting only callers with a certificate of the CA.
    let agent_tls = pki.serve_args(true);
    let start_agent = |name: &str, tls: &[String]| {
        let mut cmd = std::process::Command::new(bin("snapctl"));
        cmd.arg("--registry")
            .arg(&reg.url)
            .arg("--cache")
            .arg(t.path().join(name))
            .args(tls)
            .args(["--token", &node_token])
            .args(["agent", "--listen", "127.0.0.1:0", "--name", name])
            .args(["--register-every", "500ms"])
            .args(&agent_tls)
            .env_remove("SNAPCTL_REGISTRY")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null());
        let mut child = cmd.spawn().unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("snapctl agent printed {line:?}: {e}"));
        let url = format!("https://{}", v["listen"].as_str().unwrap());
        (KillOnDrop(child), url)
    };
    let (_good, good_url) = start_agent("with-cert", &client);
    let _bad = start_agent("without-cert", &ca);
    // A scheduler without a client certificate is refused by the agent; one with it
    // gets the cache status.
    let cache_status = |identity: bool| {
        block_on(async {
            let ca = tonic::transport::Certificate::from_pem(std::fs::read(&pki.ca).unwrap());
            let mut tls = tonic::transport::ClientTlsConfig::new().ca_certificate(ca);
            if identity {
                tls = tls.identity(tonic::transport::Identity::from_pem(
                    std::fs::read(&pki.client_cert).unwrap(),
                    std::fs::read(&pki.client_key).unwrap(),
                ));
            }
            let channel = tonic::transport::Endpoint::from_shared(good_url.clone())
                .unwrap()
                .tls_config(tls)
                .unwrap()
                .connect()
                .await
                .map_err(|e| e.to_string())?;
            snapreg_proto::pb::node_agent_client::NodeAgentClient::new(channel)
                .cache_status(snapreg_proto::pb::CacheStatusRequest { reference: None })
                .await
                .map(|r| r.into_inner())
                .map_err(|s| s.to_string())
        })
    };
    assert!(cache_status(false).is_err());
    let status = cache_status(true).expect("CacheStatus with a client certificate");
    assert_eq!(status.chunks, 0);
    // Peer calls: the cluster's certificate, or a token the registry accepts for pull
    // (the agent asks the registry over its own mutual TLS); neither is refused.
    let peer_watch = |identity: bool, token: Option<&str>| {
        block_on(async {
            let ca = tonic::transport::Certificate::from_pem(std::fs::read(&pki.ca).unwrap());
            let mut tls = tonic::transport::ClientTlsConfig::new().ca_certificate(ca);
            if identity {
                tls = tls.identity(tonic::transport::Identity::from_pem(
                    std::fs::read(&pki.client_cert).unwrap(),
                    std::fs::read(&pki.client_key).unwrap(),
                ));
            }
            let channel = tonic::transport::Endpoint::from_shared(good_url.clone())
                .unwrap()
                .tls_config(tls)
                .unwrap()
                .connect()
                .await
                .map_err(|e| e.to_string())?;
            let mut req = tonic::Request::new(snapreg_proto::pb::WatchChunksRequest {
                digests: vec![vec![9u8; 32].into()],
            });
            if let Some(t) = token {
                req.metadata_mut()
                    .insert("authorization", format!("Bearer {t}").parse().unwrap());
            }
            let mut stream = snapreg_proto::pb::node_agent_client::NodeAgentClient::new(channel)
                .watch_chunks(req)
                .await
                .map_err(|s| s.to_string())?
                .into_inner();
            stream.message().await.map_err(|s| s.to_string())
        })
    };
    let refused = peer_watch(false, None).unwrap_err();
    assert!(refused.contains("client certificate"), "{refused}");
    let first = peer_watch(false, Some(&node_token)).expect("a peer with a pull token");
    assert_eq!(first.map(|m| m.indices.len()), Some(0));
    peer_watch(true, None).expect("a peer with the cluster's certificate");
    let creds = snapreg_client::remote::Credentials::new(
        Some(&node_token),
        None,
        Some(&pki.ca),
        Some(&pki.client_cert),
        Some(&pki.client_key),
    )
    .unwrap();
    let names = || -> Vec<String> {
        block_on(async {
            snapreg_client::remote::Remote::connect_with(&reg.url, &creds)
                .await
                .unwrap()
                .list_nodes()
                .await
                .unwrap()
                .into_iter()
                .map(|n| n.node_name)
                .collect()
        })
    };
    wait_for(Duration::from_secs(10), || {
        (!names().is_empty()).then_some(())
    })
    .expect("the agent with a certificate registered");
    // Several registration rounds later, still only the agent with a certificate.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(names(), ["with-cert"]);
}

/// A child process killed by PID and reaped on drop.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn replication_over_mutual_tls_with_a_token() {
    let t = tempfile::tempdir().unwrap();
    let pki = Pki::new(&t.path().join("pki"));
    let serve = pki.serve_args(true);
    let serve: Vec<&str> = serve.iter().map(String::as_str).collect();
    let b = closed(&t.path().join("b"), &serve);
    let (_, peer_token) = b.issue_token(&["--repo", "*", "--scope", "push", "--name", "peer-a"]);
    let (_, pull_token) = b.issue_token(&["--repo", "*", "--scope", "pull"]);
    let token_file = |name: &str, token: &str| {
        let p = t.path().join(name);
        std::fs::write(&p, token).unwrap();
        p.display().to_string()
    };
    let (good_token, weak_token) = (
        token_file("peer.token", &peer_token),
        token_file("pull.token", &pull_token),
    );
    let ca = pki.ca.display().to_string();
    let (cc, ck) = (
        pki.client_cert.display().to_string(),
        pki.client_key.display().to_string(),
    );
    let good = format!(
        "good={},token-file={good_token},ca-cert={ca},client-cert={cc},client-key={ck}",
        b.url
    );
    let no_cert = format!("nocert={},token-file={good_token},ca-cert={ca}", b.url);
    let weak = format!(
        "weak={},token-file={weak_token},ca-cert={ca},client-cert={cc},client-key={ck}",
        b.url
    );
    let a = Registry::start_with(
        &t.path().join("a"),
        &[
            "--peer",
            &good,
            "--peer",
            &no_cert,
            "--peer",
            &weak,
            "--replication-backoff-max",
            "300ms",
        ],
    );
    let src = small_snapshot(t.path());
    let digest = push(&a.url, &src, "team/app:v1");

    let status = wait_for(Duration::from_secs(20), || {
        let s = replication_status(&a.url);
        let by = |n: &str| s.peers.iter().find(|p| p.name == n).unwrap().clone();
        let ready = by("good").entries_behind == 0
            && !by("nocert").last_error.is_empty()
            && !by("weak").last_error.is_empty();
        ready.then_some(s)
    })
    .expect("replication settled");
    let by = |n: &str| status.peers.iter().find(|p| p.name == n).unwrap();
    assert!(by("good").last_error.is_empty(), "{:?}", by("good"));
    assert!(by("nocert").entries_behind > 0 && by("weak").entries_behind > 0);
    assert!(
        by("weak").last_error.contains("grants pull"),
        "{}",
        by("weak").last_error
    );
    let e = by("nocert").last_error.to_lowercase();
    assert!(
        e.contains("certificate") || e.contains("tls") || e.contains("transport"),
        "{e}"
    );

    // B holds the snapshot, readable with a pull token over mutual TLS.
    let dst = t.path().join("pulled");
    let client = pki.client_args();
    let out = snapctl(
        &b.url,
        &args(
            &[&client],
            &[
                "--token",
                &pull_token,
                "pull",
                "team/app:v1",
                dst.to_str().unwrap(),
            ],
        ),
    )
    .ok()
    .json();
    assert_eq!(out["digest"], digest.as_str());
    assert_trees_equal(&src, &dst);
}

#[test]
fn watch_shows_only_the_repositories_a_token_may_pull() {
    let t = tempfile::tempdir().unwrap();
    let reg = closed(&t.path().join("reg"), &[]);
    let (_, admin) = reg.issue_token(&["--repo", "*", "--scope", "admin"]);
    let (_, team) = reg.issue_token(&["--repo", "team/*", "--scope", "pull"]);
    let src = small_snapshot(t.path());
    let s = src.to_str().unwrap();
    for r in ["team/app:v1", "other/app:v1", "team/app:v2"] {
        snapctl(&reg.url, &["--token", &admin, "push", s, r]).ok();
    }
    let events = block_on(async {
        use futures::StreamExt;
        let channel = tonic::transport::Endpoint::from_shared(reg.url.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let token = snapreg_proto::credentials::BearerToken::new(Some(&team)).unwrap();
        let mut stream =
            snapreg_proto::pb::registry_client::RegistryClient::with_interceptor(channel, token)
                .watch(snapreg_proto::pb::WatchRequest { from_sequence: 0 })
                .await
                .unwrap()
                .into_inner();
        let mut seen = Vec::new();
        // The stream stays open: read until team/app:v2, the last commit.
        while let Ok(Some(e)) = tokio::time::timeout(Duration::from_secs(10), stream.next()).await {
            let e = e.unwrap();
            seen.push((e.sequence, format!("{}:{}", e.repository, e.tag)));
            if e.tag == "v2" {
                break;
            }
        }
        seen
    });
    assert_eq!(
        events,
        [
            (1, "team/app:v1".to_string()),
            (3, "team/app:v2".to_string())
        ]
    );
}
