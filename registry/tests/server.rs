//! The registry embedded in-process: `Server::run` on port 0 over a real socket, a
//! real tonic client, a push (chunk, manifest, tag) read back, and a clean shutdown.

use bytes::Bytes;
use snapreg_proto::manifest::{Extent, File, Layer, LayerKind, Manifest};
use snapreg_proto::pb::{self, registry_client::RegistryClient};
use snapreg_proto::{codec, Digest};
use snapreg_registry::auth::Scope;
use snapreg_registry::{Server, ServerConfig};

fn manifest(chunk: Digest, len: u64) -> Bytes {
    let golden = include_bytes!("../../proto/tests/golden/manifest-v1.json");
    let mut m = Manifest::decode(golden).unwrap();
    m.layers = vec![Layer {
        kind: LayerKind::Extra,
        name: None,
        rank: None,
        files: vec![File {
            path: "data.bin".into(),
            size: len,
            mode: 0o644,
            extents: vec![Extent::Chunk { chunk, len }],
        }],
    }];
    m.encryption = None;
    Bytes::from(m.encode())
}

#[tokio::test]
async fn push_and_read_back_over_a_real_socket_then_shut_down() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = ServerConfig::new(dir.path());
    config.anonymous = Some(Scope::Push);
    let server = Server::open(config).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.run(listener, async move {
        let _ = stopped.await;
    }));

    let mut client = RegistryClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let digest = Digest::of(&data);
    let lease = client
        .begin_push(pb::BeginPushRequest {
            repository: "team/app".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .lease_id;
    let missing = client
        .find_missing_chunks(pb::FindMissingChunksRequest {
            lease_id: lease.clone(),
            digests: vec![Bytes::copy_from_slice(&digest.0)],
        })
        .await
        .unwrap()
        .into_inner()
        .missing;
    assert_eq!(missing, vec![Bytes::copy_from_slice(&digest.0)]);
    let put = client
        .put_chunks(futures::stream::iter([pb::PutChunkRequest {
            lease_id: lease.clone(),
            digest: Bytes::copy_from_slice(&digest.0),
            data: codec::encode(&data),
        }]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(put.chunks_stored, 1, "{put:?}");
    let manifest = manifest(digest, data.len() as u64);
    let committed = client
        .put_manifest(pb::PutManifestRequest {
            repository: "team/app".into(),
            lease_id: lease,
            manifest: manifest.clone(),
            tags: vec!["v1".into()],
        })
        .await
        .unwrap()
        .into_inner()
        .digest;
    assert_eq!(committed, Digest::of(&manifest).to_string());

    let got = client
        .get_manifest(pb::GetManifestRequest {
            repository: "team/app".into(),
            reference: "v1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((got.digest, got.manifest), (committed.clone(), manifest));
    let tags = client
        .list_tags(pb::ListTagsRequest {
            repository: "team/app".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .tags;
    assert_eq!(tags.len(), 1);
    assert_eq!((tags[0].tag.as_str(), &tags[0].digest), ("v1", &committed));
    let mut chunks = client
        .get_chunks(pb::GetChunksRequest {
            digests: vec![Bytes::copy_from_slice(&digest.0)],
        })
        .await
        .unwrap()
        .into_inner();
    let chunk = chunks.message().await.unwrap().expect("one chunk");
    assert_eq!(codec::decode(&digest, &chunk.data).unwrap(), data);
    assert!(chunks.message().await.unwrap().is_none());

    // Invalid requests name their field; the anonymous scope stops at push.
    let bad = client
        .get_chunks(pb::GetChunksRequest {
            digests: vec![Bytes::from_static(b"short")],
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(bad.message().contains("digests"), "{}", bad.message());
    let denied = client
        .collect_garbage(pb::CollectGarbageRequest::default())
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::Unauthenticated, "{denied:?}");

    stop.send(()).unwrap();
    drop(client);
    serving.await.unwrap().unwrap();
}
