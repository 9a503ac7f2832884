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

    // `snapctl export` writes the very image the OCI listener serves.
    let exported = t.path().join("exported");
    assert_eq!(
        export_manifest_digest(&a.url, "t/ck:v1", &format!("oci:{}", exported.display())),
        sha256(raw.as_bytes())
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
    // Exported from the registry it was pushed to: the pushed manifest, byte for byte.
    let back = t.path().join("back.tar");
    assert_eq!(
        export_manifest_digest(
            &b.url,
            "t/moved:v1",
            &format!("oci-archive:{}", back.display())
        ),
        sha256(raw.as_bytes())
    );
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

fn sha256(bytes: &[u8]) -> String {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes);
    format!("sha256:{}", hex(d.as_ref()))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// One blocking HTTP client for the API.
struct Api {
    rt: tokio::runtime::Runtime,
    http: reqwest::Client,
    base: String,
    auth: Option<String>,
}

struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    }

    fn code(&self) -> String {
        let v: serde_json::Value = serde_json::from_slice(&self.body).unwrap_or_default();
        v["errors"][0]["code"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

impl Api {
    fn new(base: String, ca: Option<&std::path::Path>) -> Api {
        let mut b = reqwest::Client::builder();
        if let Some(ca) = ca {
            let pem = std::fs::read(ca).unwrap();
            b = b.add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap());
        }
        Api {
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
            http: b.build().unwrap(),
            base,
            auth: None,
        }
    }

    fn call(&self, method: &str, path: &str, headers: &[(&str, &str)], body: Vec<u8>) -> Answer {
        let url = if path.starts_with("http") {
            path.to_string()
        } else {
            format!("{}{path}", self.base)
        };
        let mut req = self.http.request(method.parse().unwrap(), url).body(body);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(a) = &self.auth {
            req = req.header("authorization", a);
        }
        self.rt.block_on(async {
            let resp = req.send().await.unwrap();
            let status = resp.status().as_u16();
            let headers = resp.headers().clone();
            let body = resp.bytes().await.unwrap().to_vec();
            Answer {
                status,
                headers,
                body,
            }
        })
    }

    fn get(&self, path: &str) -> Answer {
        self.call("GET", path, &[], vec![])
    }

    /// Pushes a blob monolithically (POST ?digest=); returns its digest.
    fn push_blob(&self, repo: &str, bytes: &[u8]) -> String {
        let d = sha256(bytes);
        let a = self.call(
            "POST",
            &format!("/v2/{repo}/blobs/uploads/?digest={d}"),
            &[],
            bytes.to_vec(),
        );
        assert_eq!(a.status, 201, "{}", a.text());
        d
    }

    fn push_manifest(&self, repo: &str, reference: &str, body: &str) -> Answer {
        self.call(
            "PUT",
            &format!("/v2/{repo}/manifests/{reference}"),
            &[("content-type", "application/vnd.oci.image.manifest.v1+json")],
            body.as_bytes().to_vec(),
        )
    }
}

fn image_manifest(config: (&str, usize), layers: &[(&str, usize, &str)]) -> String {
    let layers: Vec<_> = layers
        .iter()
        .map(|(d, n, t)| serde_json::json!({"mediaType": t, "digest": d, "size": n}))
        .collect();
    serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config.0, "size": config.1},
        "layers": layers,
    })
    .to_string()
}

/// The spec's workflows: push (monolithic, POST+PUT, chunked, mount), pull (by tag
/// and digest, HEAD), discovery (tags with pagination), deletion, and the error
/// answers a client acts on. Each failed push leaves nothing visible.
#[test]
fn distribution_api_push_pull_discovery_and_refusals() {
    let t = tempfile::tempdir().unwrap();
    let reg = oci_registry(&t.path().join("reg"), &["--metrics-listen", "127.0.0.1:0"]);
    let api = Api::new(format!("http://{}", reg.oci.clone().unwrap()), None);

    let ping = api.get("/v2/");
    assert_eq!(ping.status, 200);
    assert_eq!(
        ping.header("docker-distribution-api-version"),
        "registry/2.0"
    );

    // Push: monolithic POST ?digest= (spec: "Single POST").
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let cd = api.push_blob("app/one", config);
    let head = api.call("HEAD", &format!("/v2/app/one/blobs/{cd}"), &[], vec![]);
    assert_eq!(
        (head.status, head.header("content-length")),
        (200, config.len().to_string())
    );
    assert_eq!(api.get(&format!("/v2/app/one/blobs/{cd}")).body, config);

    // Chunked upload (spec: "Pushing a blob in chunks"), with an out-of-order chunk.
    let layer: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let ld = sha256(&layer);
    let start = api.call("POST", "/v2/app/one/blobs/uploads/", &[], vec![]);
    assert_eq!(start.status, 202, "{}", start.text());
    let loc = start.header("location");
    let first = api.call(
        "PATCH",
        &loc,
        &[("content-range", "0-999999")],
        layer[..1_000_000].to_vec(),
    );
    assert_eq!(
        (first.status, first.header("range")),
        (202, "0-999999".to_string()),
        "{}",
        first.text()
    );
    let skipped = api.call(
        "PATCH",
        &loc,
        &[("content-range", "2000000-2999999")],
        layer[2_000_000..].to_vec(),
    );
    assert_eq!(skipped.status, 416, "{}", skipped.text());
    let status = api.get(&loc);
    assert_eq!(
        (status.status, status.header("range")),
        (204, "0-999999".to_string())
    );
    let second = api.call(
        "PATCH",
        &loc,
        &[("content-range", "1000000-1999999")],
        layer[1_000_000..2_000_000].to_vec(),
    );
    assert_eq!(second.status, 202);
    let sep = if loc.contains('?') { '&' } else { '?' };
    let done = api.call(
        "PUT",
        &format!("{loc}{sep}digest={ld}"),
        &[],
        layer[2_000_000..].to_vec(),
    );
    assert_eq!(
        (done.status, done.header("docker-content-digest")),
        (201, ld.clone()),
        "{}",
        done.text()
    );
    assert_eq!(api.get(&format!("/v2/app/one/blobs/{ld}")).body, layer);

    // A digest that does not match: refused, and nothing becomes visible.
    let junk = b"these bytes are not what the digest says";
    let start = api.call("POST", "/v2/app/one/blobs/uploads/", &[], vec![]);
    let wrong = api.call(
        "PUT",
        &format!("{}?digest={cd}", start.header("location")),
        &[],
        junk.to_vec(),
    );
    assert_eq!(
        (wrong.status, wrong.code()),
        (400, "DIGEST_INVALID".to_string()),
        "{}",
        wrong.text()
    );
    let junk_d = sha256(junk);
    assert_eq!(
        api.call("HEAD", &format!("/v2/app/one/blobs/{junk_d}"), &[], vec![])
            .status,
        404
    );
    let gone = api.get(&start.header("location"));
    assert_eq!(
        (gone.status, gone.code()),
        (404, "BLOB_UPLOAD_UNKNOWN".to_string())
    );

    // Manifests: one naming a missing blob is refused; a whole one is stored.
    let missing = sha256(b"never pushed");
    let m = image_manifest(
        (&cd, config.len()),
        &[(&missing, 12, "application/vnd.oci.image.layer.v1.tar")],
    );
    let refused = api.push_manifest("app/one", "v1", &m);
    assert_eq!(
        (refused.status, refused.code()),
        (400, "MANIFEST_BLOB_UNKNOWN".to_string()),
        "{}",
        refused.text()
    );
    let bad_size = image_manifest((&cd, config.len() + 1), &[]);
    assert_eq!(
        api.push_manifest("app/one", "v1", &bad_size).code(),
        "MANIFEST_INVALID"
    );
    assert_eq!(
        api.push_manifest("app/one", "v1", "{\"schemaVersion\":")
            .code(),
        "MANIFEST_INVALID"
    );
    let m = image_manifest(
        (&cd, config.len()),
        &[(&ld, layer.len(), "application/vnd.oci.image.layer.v1.tar")],
    );
    let md = sha256(m.as_bytes());
    let put = api.push_manifest("app/one", "v1", &m);
    assert_eq!(
        (put.status, put.header("docker-content-digest")),
        (201, md.clone()),
        "{}",
        put.text()
    );
    let wrong_digest = api.push_manifest("app/one", &sha256(b"other"), &m);
    assert_eq!(wrong_digest.code(), "DIGEST_INVALID");

    // Pull by tag and by digest, byte for byte; HEAD gives the digest.
    for reference in ["v1", md.as_str()] {
        let got = api.get(&format!("/v2/app/one/manifests/{reference}"));
        assert_eq!(got.status, 200, "{}", got.text());
        assert_eq!(got.body, m.as_bytes());
        assert_eq!(
            got.header("content-type"),
            "application/vnd.oci.image.manifest.v1+json"
        );
        assert_eq!(got.header("docker-content-digest"), md);
    }
    let unknown = api.get("/v2/app/one/manifests/nope");
    assert_eq!(
        (unknown.status, unknown.code()),
        (404, "MANIFEST_UNKNOWN".to_string())
    );
    assert_eq!(api.get("/v2/Bad_Name/manifests/v1").code(), "NAME_INVALID");

    // Cross-repository mount (spec: "Mounting a blob from another repository").
    let mount = api.call(
        "POST",
        &format!("/v2/app/two/blobs/uploads/?mount={ld}&from=app/one"),
        &[],
        vec![],
    );
    assert_eq!(mount.status, 201, "{}", mount.text());
    assert_eq!(
        api.call("HEAD", &format!("/v2/app/two/blobs/{ld}"), &[], vec![])
            .status,
        200
    );
    assert_eq!(
        api.call("HEAD", &format!("/v2/app/three/blobs/{ld}"), &[], vec![])
            .status,
        404
    );

    // Discovery: tags, paged with Link.
    for tag in ["v2", "v3", "a0"] {
        assert_eq!(api.push_manifest("app/one", tag, &m).status, 201);
    }
    let all: serde_json::Value =
        serde_json::from_slice(&api.get("/v2/app/one/tags/list").body).unwrap();
    assert_eq!(
        all["tags"],
        serde_json::json!(["a0", "v1", "v2", "v3"]),
        "{all}"
    );
    let page = api.get("/v2/app/one/tags/list?n=2");
    let v: serde_json::Value = serde_json::from_slice(&page.body).unwrap();
    assert_eq!(v["tags"], serde_json::json!(["a0", "v1"]));
    assert!(
        page.header("link").contains("last=v1"),
        "{}",
        page.header("link")
    );
    let next: serde_json::Value =
        serde_json::from_slice(&api.get("/v2/app/one/tags/list?n=2&last=v1").body).unwrap();
    assert_eq!(next["tags"], serde_json::json!(["v2", "v3"]));
    let catalog: serde_json::Value = serde_json::from_slice(&api.get("/v2/_catalog").body).unwrap();
    assert_eq!(
        catalog["repositories"],
        serde_json::json!(["app/one"]),
        "{catalog}"
    );

    // Deletion by tag, then by digest (every tag naming it goes).
    assert_eq!(
        api.call("DELETE", "/v2/app/one/manifests/a0", &[], vec![])
            .status,
        202
    );
    assert_eq!(api.get("/v2/app/one/manifests/a0").status, 404);
    assert_eq!(
        api.call(
            "DELETE",
            &format!("/v2/app/one/manifests/{md}"),
            &[],
            vec![]
        )
        .status,
        202
    );
    assert_eq!(api.get(&format!("/v2/app/one/manifests/{md}")).status, 404);
    assert_eq!(api.get("/v2/app/one/manifests/v2").status, 404);

    // What operators see: requests by route and status, upload bytes.
    let metrics = api
        .get(&format!("http://{}/metrics", reg.metrics.clone().unwrap()))
        .text();
    let value = |line_start: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(line_start))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or_else(|| panic!("no {line_start} in\n{metrics}"))
    };
    assert!(
        value("snapreg_oci_requests_total{method=\"PUT\",route=\"manifest\",code=\"201\"}") >= 4.0
    );
    assert!(
        value("snapreg_oci_requests_total{method=\"PATCH\",route=\"upload\",code=\"416\"}") >= 1.0
    );
    assert!(value("snapreg_oci_upload_bytes_total") >= 3_000_000.0);
}

/// A checkpoint image's layer pushed gzipped (as `podman push` sends it) is looked
/// into: the image becomes a snapshot with Podman's native layers, and its CRIU
/// images land as the chunks a native push of the same files stores.
#[test]
fn a_gzipped_checkpoint_layer_becomes_native_layers_that_dedup_with_a_native_push() {
    let t = tempfile::tempdir().unwrap();
    let reg = oci_registry(&t.path().join("reg"), &[]);
    let api = Api::new(format!("http://{}", reg.oci.clone().unwrap()), None);
    let ck = t.path().join("bundle/checkpoint");
    std::fs::create_dir_all(&ck).unwrap();
    let pages: Vec<u8> = (0..4_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(ck.join("pages-1.img"), &pages).unwrap();
    std::fs::write(ck.join("inventory.img"), b"inventory").unwrap();
    std::fs::write(t.path().join("bundle/config.dump"), b"{}").unwrap();
    let tar = t.path().join("layer.tar");
    let ok = Command::new("tar")
        .arg("-C")
        .arg(t.path().join("bundle"))
        .arg("-cf")
        .arg(&tar)
        .args(["config.dump", "checkpoint"])
        .status()
        .unwrap();
    assert!(ok.success());
    assert!(Command::new("gzip")
        .arg("-k")
        .arg(&tar)
        .status()
        .unwrap()
        .success());
    let gz = std::fs::read(t.path().join("layer.tar.gz")).unwrap();

    let config = br#"{"architecture":"amd64","os":"linux"}"#;
    let cd = api.push_blob("ck/img", config);
    let ld = api.push_blob("ck/img", &gz);
    let m = image_manifest(
        (&cd, config.len()),
        &[(&ld, gz.len(), "application/vnd.oci.image.layer.v1.tar+gzip")],
    );
    assert_eq!(api.push_manifest("ck/img", "v1", &m).status, 201);
    // The blob is served as it was pushed.
    assert_eq!(api.get(&format!("/v2/ck/img/blobs/{ld}")).body, gz);

    let inspect = snapctl(&reg.url, &["inspect", "ck/img:v1"]).ok().json();
    let layers = inspect["layers"].as_array().unwrap();
    let process = layers
        .iter()
        .find(|l| l["kind"] == "process")
        .unwrap_or_else(|| panic!("{inspect}"));
    assert_eq!(process["name"], "checkpoint");

    // A native push of the same CRIU images sends no chunk of pages-1.img again.
    let native = snapctl(&reg.url, &["push", ck.to_str().unwrap(), "ck/native:v1"])
        .ok()
        .json();
    assert!(
        native["bytes_transferred"].as_u64().unwrap() < 64 << 10,
        "the native push re-sent the pages: {native}"
    );
}

/// The OCI listener takes the registry's tokens the way registries take them
/// (401 with a Bearer challenge, the token endpoint, Basic credentials) over the
/// registry's own TLS; a pull token cannot push.
#[test]
fn tokens_and_tls_on_the_oci_listener() {
    let t = tempfile::tempdir().unwrap();
    let pki = crate::auth::Pki::new(&t.path().join("pki"));
    let mut args: Vec<String> = vec!["--anonymous".into(), "none".into()];
    args.extend(pki.serve_args(false));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let reg = oci_registry(&t.path().join("reg"), &args);
    let oci = reg.oci.clone().unwrap();
    let (_, pull) = reg.issue_token(&["--repo", "team/*", "--scope", "pull"]);
    let (_, push) = reg.issue_token(&["--repo", "team/app", "--scope", "push"]);

    let src = t.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("pages-1.img"), vec![5u8; 100_000]).unwrap();
    std::fs::write(src.join("inventory.img"), b"inv").unwrap();
    let ca = pki.ca.display().to_string();
    snapctl(
        &reg.url,
        &[
            "--ca-cert",
            &ca,
            "--token",
            &push,
            "push",
            src.to_str().unwrap(),
            "team/app:v1",
        ],
    )
    .ok();

    let mut api = Api::new(format!("https://{oci}"), Some(&pki.ca));
    let denied = api.get("/v2/team/app/manifests/v1");
    assert_eq!(
        (denied.status, denied.code()),
        (401, "UNAUTHORIZED".to_string()),
        "{}",
        denied.text()
    );
    let challenge = denied.header("www-authenticate");
    assert_eq!(
        challenge,
        format!("Bearer realm=\"https://{oci}/v2/token\",service=\"snapreg\"")
    );
    // The token flow: Basic credentials (the token as password) for a bearer token.
    let basic = |token: &str| {
        use base64::Engine;
        let encoded = base64::engine::general_purpose::STANDARD.encode(format!("ci:{token}"));
        format!("Basic {encoded}")
    };
    api.auth = Some(basic("snapreg_0123456789abcdef_00"));
    assert_eq!(
        api.get("/v2/token?service=snapreg&scope=repository:team/app:pull")
            .status,
        401
    );
    api.auth = Some(basic(&pull));
    let issued: serde_json::Value =
        serde_json::from_slice(&api.get("/v2/token?service=snapreg").body).unwrap();
    api.auth = Some(format!("Bearer {}", issued["token"].as_str().unwrap()));
    assert_eq!(api.get("/v2/").status, 200);
    assert_eq!(api.get("/v2/team/app/manifests/v1").status, 200);
    // Pull scope does not push.
    let refused = api.call("POST", "/v2/team/app/blobs/uploads/?digest=sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", &[], vec![]);
    assert_eq!(
        (refused.status, refused.code()),
        (403, "DENIED".to_string()),
        "{}",
        refused.text()
    );

    // skopeo, trusting the private CA, with the tokens as credentials.
    let certs = t.path().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    std::fs::copy(&pki.ca, certs.join("ca.crt")).unwrap();
    let certs = certs.display().to_string();
    let anonymous = skopeo(&[
        "inspect",
        "--cert-dir",
        &certs,
        &format!("docker://{oci}/team/app:v1"),
    ]);
    assert_ne!(anonymous.code, 0, "{}", anonymous.stdout);
    let raw = skopeo_ok(&[
        "inspect",
        "--raw",
        "--cert-dir",
        &certs,
        "--creds",
        &format!("ci:{pull}"),
        &format!("docker://{oci}/team/app:v1"),
    ]);
    assert!(
        raw.contains("io.kubernetes.cri-o.annotations.checkpoint.name"),
        "{raw}"
    );
    let dir = format!("oci:{}:v1", t.path().join("image").display());
    skopeo_ok(&[
        "copy",
        "--src-cert-dir",
        &certs,
        "--src-creds",
        &format!("ci:{pull}"),
        &format!("docker://{oci}/team/app:v1"),
        &dir,
    ]);
    let with_pull = skopeo(&[
        "copy",
        "--dest-cert-dir",
        &certs,
        "--dest-creds",
        &format!("ci:{pull}"),
        &dir,
        &format!("docker://{oci}/team/app:v2"),
    ]);
    assert_ne!(
        with_pull.code, 0,
        "a pull token pushed: {}",
        with_pull.stdout
    );
    skopeo_ok(&[
        "copy",
        "--dest-cert-dir",
        &certs,
        "--dest-creds",
        &format!("ci:{push}"),
        &dir,
        &format!("docker://{oci}/team/app:v2"),
    ]);
}

fn podman(args: &[&str]) -> Out {
    let criu = std::env::var("SNAPCTL_CRIU").unwrap_or_else(|_| "criu".into());
    let criu_dir = std::path::Path::new(&criu)
        .parent()
        .map(|p| p.display().to_string());
    let path = match criu_dir {
        // runc runs the `criu` it finds on PATH: the one the project installed.
        Some(d) if !d.is_empty() => format!("{d}:{}", std::env::var("PATH").unwrap_or_default()),
        _ => std::env::var("PATH").unwrap_or_default(),
    };
    Out::from(
        Command::new("podman")
            .args(args)
            .env("PATH", path)
            .output()
            .expect("podman runs"),
    )
}

fn podman_ok(args: &[&str]) -> String {
    let out = podman(args);
    assert_eq!(out.code, 0, "podman {args:?}: {}{}", out.stdout, out.stderr);
    out.stdout
}

/// A local image whose root file system is busybox alone: nothing to pull.
fn busybox_image(dir: &std::path::Path) -> &'static str {
    const IMAGE: &str = "localhost/snapreg-test-busybox:2";
    if podman(&["image", "exists", IMAGE]).code == 0 {
        return IMAGE;
    }
    let root = dir.join("rootfs");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::create_dir_all(root.join("tmp")).unwrap();
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    for applet in ["sh", "cat", "sleep"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    let tar = dir.join("rootfs.tar");
    assert!(Command::new("tar")
        .arg("-C")
        .arg(&root)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()
        .unwrap()
        .success());
    podman_ok(&["import", tar.to_str().unwrap(), IMAGE]);
    IMAGE
}

fn container_counter(name: &str) -> u64 {
    podman(&["exec", name, "cat", "/tmp/c"])
        .stdout
        .trim()
        .parse()
        .unwrap_or(0)
}

/// Podman's own checkpoint image (`podman container checkpoint --create-image`),
/// pushed to snapreg with `podman push`, pulled back and restored by Podman: the
/// container carries on counting from where it was.
#[test]
fn podman_checkpoint_image_pushed_to_snapreg_restores_with_podman() {
    let _lock = criu_lock();
    let t = tempfile::tempdir().unwrap();
    let reg = oci_registry(&t.path().join("reg"), &[]);
    let oci = reg.oci.clone().unwrap();
    let image = busybox_image(t.path());
    let name = format!("snapreg-oci-{}", std::process::id());
    let local = format!("localhost/{name}-ck:v1");
    let remote = format!("{oci}/podman/{name}:v1");
    struct Cleanup(String, String, String);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = Command::new("podman").args(["rm", "-f", &self.0]).output();
            let _ = Command::new("podman")
                .args(["rmi", "-f", &self.1, &self.2])
                .output();
        }
    }
    let _cleanup = Cleanup(name.clone(), local.clone(), remote.clone());

    // The sandbox's hard limits are below Podman's defaults: ask for less.
    podman_ok(&[
        "run",
        "-d",
        "--name",
        &name,
        "--ulimit",
        "nofile=1024:1024",
        "--ulimit",
        "nproc=1024:1024",
        image,
        "/bin/sh",
        "-c",
        "i=0; while true; do i=$((i+1)); echo $i > /tmp/c; sleep 0.1; done",
    ]);
    wait_for(Duration::from_secs(30), || {
        (container_counter(&name) >= 50).then_some(())
    })
    .expect("the container never counted to 50");
    podman_ok(&["container", "checkpoint", "--create-image", &local, &name]);
    let at_checkpoint = container_counter(&name).max(50);
    podman_ok(&[
        "push",
        "--tls-verify=false",
        &local,
        &format!("docker://{remote}"),
    ]);
    podman_ok(&["rm", "-f", &name]);
    podman_ok(&["rmi", "-f", &local]);

    let inspect = snapctl(&reg.url, &["inspect", &format!("podman/{name}:v1")])
        .ok()
        .json();
    let process = inspect["layers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["kind"] == "process")
        .cloned();
    assert_eq!(
        process.unwrap_or_else(|| panic!("{inspect}"))["name"],
        "checkpoint"
    );

    podman_ok(&["pull", "--tls-verify=false", &remote]);
    podman_ok(&["container", "restore", &remote]);
    let first = container_counter(&name);
    assert!(
        first >= at_checkpoint,
        "restored at {first}, checkpointed at {at_checkpoint}: not its state"
    );
    wait_for(Duration::from_secs(30), || {
        (container_counter(&name) > first + 5).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "the restored container is not counting ({})",
            container_counter(&name)
        )
    });
}

/// Bad input on the OCI listener: a body that breaks off mid-PATCH leaves the upload
/// where it was (nothing of the broken part is kept); a manifest that says it is a
/// checkpoint image over a truncated archive (plain or gzip) is refused, naming the
/// layer and where the archive breaks.
#[test]
fn broken_uploads_keep_nothing_and_truncated_checkpoint_layers_are_refused_naming_the_offset() {
    use std::io::{Read, Write};
    let t = tempfile::tempdir().unwrap();
    let reg = oci_registry(&t.path().join("reg"), &[]);
    let oci = reg.oci.clone().unwrap();
    let api = Api::new(format!("http://{oci}"), None);

    // A PATCH whose body stops after 400 of the 1000 bytes it announced.
    let start = api.call("POST", "/v2/bad/up/blobs/uploads/", &[], vec![]);
    let loc = start.header("location");
    let mut conn = std::net::TcpStream::connect(&oci).unwrap();
    write!(
        conn,
        "PATCH {loc} HTTP/1.1\r\nHost: {oci}\r\nContent-Length: 1000\r\nContent-Range: 0-999\r\n\r\n"
    )
    .unwrap();
    conn.write_all(&[7u8; 400]).unwrap();
    conn.shutdown(std::net::Shutdown::Write).unwrap();
    let mut answer = String::new();
    let _ = conn.read_to_string(&mut answer);
    let status = wait_for(Duration::from_secs(10), || {
        let s = api.get(&loc);
        (s.header("range") == "0-0").then_some(s)
    })
    .unwrap_or_else(|| {
        panic!(
            "the broken body's bytes were kept: {}",
            api.get(&loc).header("range")
        )
    });
    assert_eq!(status.status, 204);
    let blob = vec![9u8; 1000];
    let again = api.call("PATCH", &loc, &[("content-range", "0-999")], blob.clone());
    assert_eq!(again.status, 202, "{}", again.text());
    let done = api.call(
        "PUT",
        &format!("{loc}?digest={}", sha256(&blob)),
        &[],
        vec![],
    );
    assert_eq!(done.status, 201, "{}", done.text());

    // Checkpoint images whose layer is truncated.
    let ck = t.path().join("bundle/checkpoint");
    std::fs::create_dir_all(&ck).unwrap();
    std::fs::write(ck.join("pages-1.img"), vec![3u8; 200_000]).unwrap();
    std::fs::write(ck.join("inventory.img"), b"inventory").unwrap();
    let tar = t.path().join("layer.tar");
    assert!(Command::new("tar")
        .arg("-C")
        .arg(t.path().join("bundle"))
        .arg("-cf")
        .arg(&tar)
        .arg("checkpoint")
        .status()
        .unwrap()
        .success());
    let whole = std::fs::read(&tar).unwrap();
    let gz = Command::new("gzip")
        .arg("-c")
        .arg(&tar)
        .output()
        .unwrap()
        .stdout;
    let config = br#"{"architecture":"amd64","os":"linux"}"#;
    let cd = api.push_blob("bad/ck", config);
    for (what, layer) in [
        ("tar", whole[..100_000].to_vec()),
        ("gzip", gz[..gz.len() / 2].to_vec()),
    ] {
        let ld = api.push_blob("bad/ck", &layer);
        let m = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": config.len()},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": ld, "size": layer.len()}],
            "annotations": {"io.kubernetes.cri-o.annotations.checkpoint.name": "worker"},
        })
        .to_string();
        let refused = api.push_manifest("bad/ck", what, &m);
        assert_eq!(
            (refused.status, refused.code()),
            (400, "MANIFEST_INVALID".to_string()),
            "{}",
            refused.text()
        );
        let msg = refused.text();
        assert!(
            msg.contains("layers[0]") && msg.contains(&ld),
            "{what}: {msg}"
        );
        let place = if what == "tar" {
            "at offset"
        } else {
            "gzip: does not decompress after"
        };
        assert!(msg.contains(place), "{what}: {msg}");
        assert_eq!(api.get(&format!("/v2/bad/ck/manifests/{what}")).status, 404);
    }
}

fn chunk_objects(data: &std::path::Path) -> usize {
    fn count(dir: &std::path::Path) -> usize {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| {
                if e.path().is_dir() {
                    count(&e.path())
                } else {
                    1
                }
            })
            .sum()
    }
    count(&data.join("store/chunks"))
}

/// Deleting an image by digest frees what only it used: its blobs' tags move to
/// another image that holds them, or go; then GC removes the chunks no image names.
#[test]
fn deleting_images_lets_gc_free_the_blobs_only_they_used() {
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("reg");
    let reg = oci_registry(&data, &["--gc-grace", "0s", "--lease-ttl", "1s"]);
    let api = Api::new(format!("http://{}", reg.oci.clone().unwrap()), None);
    let shared: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
        .collect();
    let own: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(40503) >> 5) as u8)
        .collect();
    let config = br#"{"architecture":"amd64","os":"linux"}"#;
    let cd = api.push_blob("gc/app", config);
    let sd = api.push_blob("gc/app", &shared);
    let od = api.push_blob("gc/app", &own);
    let tar = "application/vnd.oci.image.layer.v1.tar";
    let m1 = image_manifest(
        (&cd, config.len()),
        &[(&sd, shared.len(), tar), (&od, own.len(), tar)],
    );
    let m2 = image_manifest((&cd, config.len()), &[(&sd, shared.len(), tar)]);
    assert_eq!(api.push_manifest("gc/app", "one", &m1).status, 201);
    assert_eq!(api.push_manifest("gc/app", "two", &m2).status, 201);
    let before = chunk_objects(&data);

    // Without image one, its own layer is gone and the shared one stays.
    let d1 = sha256(m1.as_bytes());
    assert_eq!(
        api.call("DELETE", &format!("/v2/gc/app/manifests/{d1}"), &[], vec![])
            .status,
        202
    );
    std::thread::sleep(Duration::from_millis(1500)); // the push leases expire
    snapctl(&reg.url, &["gc", "--grace", "0s"]).ok();
    assert_eq!(
        api.call("HEAD", &format!("/v2/gc/app/blobs/{od}"), &[], vec![])
            .status,
        404
    );
    assert_eq!(api.get(&format!("/v2/gc/app/blobs/{sd}")).body, shared);
    assert_eq!(api.get("/v2/gc/app/manifests/two").body, m2.as_bytes());
    let after_one = chunk_objects(&data);
    assert!(
        after_one + 3 <= before,
        "GC freed {} of the chunks only image one used",
        before - after_one
    );

    // Without image two, nothing of either stays.
    let d2 = sha256(m2.as_bytes());
    assert_eq!(
        api.call("DELETE", &format!("/v2/gc/app/manifests/{d2}"), &[], vec![])
            .status,
        202
    );
    snapctl(&reg.url, &["gc", "--grace", "0s"]).ok();
    assert_eq!(
        api.call("HEAD", &format!("/v2/gc/app/blobs/{sd}"), &[], vec![])
            .status,
        404
    );
    assert!(
        chunk_objects(&data) + 3 <= after_one,
        "the shared layer's chunks were not freed"
    );
}
