//! A connection to one registry: the generated gRPC client plus errors that name the
//! registry's address, carrying this side's [`Credentials`] (a bearer token on every
//! call; for `https://` URLs the CA to trust and, for mutual TLS, a client certificate).

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use snapreg_proto::credentials::{self, BearerToken, CredentialsError};
use snapreg_proto::encryption::TenantKey;
use snapreg_proto::pb::registry_client::RegistryClient;
use snapreg_proto::pb::{self};
use snapreg_proto::Digest;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::error::{ClientError, Result};

/// Matches the registry's limit: a manifest or a 16 MiB chunk fits.
const MAX_MESSAGE_BYTES: usize = snapreg_proto::manifest::MAX_MANIFEST_BYTES + (1 << 20);

/// What this side presents to registries and which servers it trusts.
#[derive(Clone, Debug, Default)]
pub struct Credentials {
    token: BearerToken,
    /// For `https://` URLs; `None`: the platform's roots, no client certificate.
    tls: Option<ClientTlsConfig>,
    client_identity: bool,
}

impl From<CredentialsError> for ClientError {
    fn from(e: CredentialsError) -> Self {
        ClientError::Usage(e.to_string())
    }
}

impl Credentials {
    /// `token` wins over `token_file`; `client_cert` and `client_key` come together.
    /// The same TLS settings presenting another bearer token: a node agent asking
    /// its registry about a peer's token (the peer module, `peer/serve.rs`).
    pub fn with_token(&self, token: BearerToken) -> Credentials {
        Credentials {
            token,
            ..self.clone()
        }
    }

    pub(crate) fn token(&self) -> &BearerToken {
        &self.token
    }

    pub fn new(
        token: Option<&str>,
        token_file: Option<&Path>,
        ca_cert: Option<&Path>,
        client_cert: Option<&Path>,
        client_key: Option<&Path>,
    ) -> Result<Self> {
        let from_file = match (token, token_file) {
            (None, Some(f)) => Some(credentials::read_token_file(f)?),
            _ => None,
        };
        let token = BearerToken::new(token.or(from_file.as_deref()))?;
        let identity =
            credentials::identity_pair(client_cert, client_key, ("--client-cert", "--client-key"))?;
        let client_identity = identity.is_some();
        let tls = match (ca_cert, identity) {
            (None, None) => None,
            (ca, identity) => Some(credentials::client_tls(ca, identity)?),
        };
        Ok(Credentials {
            token,
            tls,
            client_identity,
        })
    }
}

/// Which of a remote's chunk connections a fetch takes.
///
/// A fetch that a reader is blocked on (a page fault of a lazy restore, CRIU's next
/// bytes) must not queue behind the bulk of a restore: over one HTTP/2 connection a
/// new stream gets its share of the bytes in flight, so with 32 fetches of ~0.5 MiB
/// in flight a fault's chunk takes ~32 chunk-times. The scheduler sends its
/// `Demand` fetches on the urgent lane, a connection of their own when the remote
/// has more than one, and everything else on the bulk lane.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lane {
    Urgent,
    Bulk,
}

type Client = RegistryClient<InterceptedService<Channel, BearerToken>>;

/// Connections a remote downloads chunks over by default (`with_chunk_connections`):
/// the first for urgent fetches ([`Lane::Urgent`]: a page fault, CRIU's next bytes),
/// the second for the bulk of a restore; with one every fetch shares it. One H100 A/B
/// (bench/RESULTS.md, "The urgent lane"; one rep each): eager separated 5.82 s with 2
/// against 6.67 s with 1 (CRIU's part 3.24 s against 4.11 s); separated `--lazy`
/// 6.50 s against 6.00 s, with a fault's wait for its chunk 2.9 ms against 4.7 ms and
/// the CUDA restore unchanged (2.55 s, 2.45 s). Eager is the default restore, so 2.
pub const DEFAULT_CHUNK_CONNECTIONS: usize = 2;

/// Which of `n` chunk connections a fetch on `lane` takes; `turn` counts bulk fetches.
/// Connection 0 is the urgent lane's; the bulk ones take 1..n in turn. With one, both
/// lanes share it.
fn lane_connection(lane: Lane, n: usize, turn: usize) -> usize {
    match (lane, n) {
        (_, 0 | 1) | (Lane::Urgent, _) => 0,
        (Lane::Bulk, n) => 1 + turn % (n - 1),
    }
}

#[derive(Clone)]
pub struct Remote {
    url: String,
    client: Client,
    /// Chunk downloads (GetChunks): `client` first, then further connections to the
    /// same registry, opened at their first call ([`lane_connection`] picks one).
    chunk_clients: Arc<[Client]>,
    next_chunk_client: Arc<AtomicUsize>,
    /// How to open those connections; none over an in-process link.
    endpoint: Option<(Endpoint, BearerToken)>,
    /// Whether chunk downloads may use the presigned URLs the registry offers
    /// (direct.rs); on unless `--no-direct`.
    direct: bool,
    /// TLS without a client certificate: a server that requires one (mutual TLS)
    /// closes the connection after the handshake, which the client sees only as a
    /// closed stream on its first call.
    tls_without_identity: bool,
    /// The tenant key (`--key-file`): pushes through this remote encrypt their chunks
    /// with it, and snapshots encrypted with it can be read.
    tenant_key: Option<Arc<TenantKey>>,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote").field("url", &self.url).finish()
    }
}

impl Remote {
    /// Connects now without credentials (anonymous, platform roots for https).
    pub async fn connect(url: &str) -> Result<Self> {
        Remote::connect_with(url, &Credentials::default()).await
    }

    /// Connects now, so an unreachable registry (or a failed TLS handshake) fails
    /// here with its address.
    pub async fn connect_with(url: &str, creds: &Credentials) -> Result<Self> {
        let endpoint = endpoint(url, creds, "registry", Duration::from_secs(5))?;
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| connect_failed(url, error_chain(&e)))?;
        let client = client(channel, creds.token.clone());
        Ok(Remote {
            url: url.to_string(),
            tls_without_identity: url.starts_with("https://") && !creds.client_identity,
            chunk_clients: Arc::new([client.clone()]),
            client,
            next_chunk_client: Arc::default(),
            endpoint: Some((endpoint, creds.token.clone())),
            direct: true,
            tenant_key: None,
        }
        .with_chunk_connections(DEFAULT_CHUNK_CONNECTIONS))
    }

    /// Downloads chunks over `n` connections (at least one; the first is the one
    /// every other call uses, and the urgent lane's when there are more). The others
    /// open at their first call, so an unreachable registry still fails at
    /// `connect_with`.
    pub fn with_chunk_connections(mut self, n: usize) -> Self {
        if let Some((endpoint, token)) = &self.endpoint {
            let more = (1..n.max(1)).map(|_| client(endpoint.connect_lazy(), token.clone()));
            self.chunk_clients = std::iter::once(self.client.clone()).chain(more).collect();
        }
        self
    }

    /// The connection for a chunk download on `lane`.
    fn chunk_client(&self, lane: Lane) -> Client {
        let turn = match lane {
            Lane::Urgent => 0,
            Lane::Bulk => self.next_chunk_client.fetch_add(1, Ordering::Relaxed),
        };
        self.chunk_clients[lane_connection(lane, self.chunk_clients.len(), turn)].clone()
    }

    /// A remote over a channel made elsewhere (a registry's in-process link,
    /// `snapreg_registry::server::LocalLink`), calling with `token`; `label` names it
    /// in messages. Cheap: a gateway makes one per request with that request's token.
    pub fn over_channel(label: &str, channel: Channel, token: BearerToken) -> Remote {
        let client = client(channel, token);
        Remote {
            url: label.to_string(),
            tls_without_identity: false,
            chunk_clients: Arc::new([client.clone()]),
            client,
            next_chunk_client: Arc::default(),
            endpoint: None,
            direct: false,
            tenant_key: None,
        }
    }

    pub fn with_tenant_key(mut self, key: Option<Arc<TenantKey>>) -> Self {
        self.tenant_key = key;
        self
    }

    pub fn tenant_key(&self) -> Option<&Arc<TenantKey>> {
        self.tenant_key.as_ref()
    }

    /// Switches the direct data path (presigned chunk URLs) on or off.
    pub fn with_direct(mut self, direct: bool) -> Self {
        self.direct = direct;
        self
    }

    /// Presigned URLs for chunk objects, one per digest in order (at most 1024);
    /// `None` when the registry offers none (file:// store, a registry without the
    /// call) or the direct path is off.
    pub async fn chunk_urls(&self, digests: &[Digest]) -> Result<Option<Vec<String>>> {
        if !self.direct {
            return Ok(None);
        }
        let req = pb::GetChunkUrlsRequest {
            digests: digests
                .iter()
                .map(|d| Bytes::copy_from_slice(&d.0))
                .collect(),
        };
        match self.client.clone().get_chunk_urls(req).await {
            Ok(resp) => {
                let urls = resp.into_inner().urls;
                Ok((!urls.is_empty()).then_some(urls))
            }
            Err(s) if s.code() == tonic::Code::Unimplemented => Ok(None),
            Err(s) => Err(self.status(s)),
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn status(&self, s: tonic::Status) -> ClientError {
        match from_status(&self.url, s) {
            ClientError::Unreachable { url, reason }
                if self.tls_without_identity
                    && [
                        "broken pipe",
                        "connection reset",
                        "closed",
                        "canceled",
                        "end of file",
                    ]
                    .iter()
                    .any(|w| reason.contains(w)) =>
            {
                ClientError::Tls {
                    url,
                    reason: format!(
                        "the registry closed the connection after the TLS handshake; it may \
                         require a client certificate ({reason})"
                    ),
                }
            }
            e => e,
        }
    }

    pub async fn begin_push(&self, repository: &str) -> Result<String> {
        let resp = self
            .client
            .clone()
            .begin_push(pb::BeginPushRequest {
                repository: repository.into(),
            })
            .await
            .map_err(|s| self.status(s))?;
        Ok(resp.into_inner().lease_id)
    }

    pub async fn find_missing(&self, lease: &str, digests: &[Digest]) -> Result<Vec<Digest>> {
        let req = pb::FindMissingChunksRequest {
            lease_id: lease.into(),
            digests: digests
                .iter()
                .map(|d| Bytes::copy_from_slice(&d.0))
                .collect(),
        };
        let resp = self
            .client
            .clone()
            .find_missing_chunks(req)
            .await
            .map_err(|s| self.status(s))?;
        resp.into_inner()
            .missing
            .iter()
            .map(|b| Ok(Digest::from_slice(b)?))
            .collect()
    }

    /// Uploads a stream of (digest, chunk object) on one gRPC stream.
    pub async fn put_chunks<S>(&self, lease: &str, chunks: S) -> Result<pb::PutChunksResponse>
    where
        S: futures::Stream<Item = (Digest, Bytes)> + Send + 'static,
    {
        use futures::StreamExt;
        let lease = lease.to_string();
        let stream = chunks.map(move |(d, data)| pb::PutChunkRequest {
            lease_id: lease.clone(),
            digest: Bytes::copy_from_slice(&d.0),
            data,
        });
        let resp = self
            .client
            .clone()
            .put_chunks(stream)
            .await
            .map_err(|s| self.status(s))?;
        Ok(resp.into_inner())
    }

    /// Streams chunk objects (codec framing, unverified) in the order asked, over a
    /// connection of `lane`.
    pub async fn get_chunks(
        &self,
        digests: &[Digest],
        lane: Lane,
    ) -> Result<tonic::Streaming<pb::ChunkData>> {
        let req = pb::GetChunksRequest {
            digests: digests
                .iter()
                .map(|d| Bytes::copy_from_slice(&d.0))
                .collect(),
        };
        Ok(self
            .chunk_client(lane)
            .get_chunks(req)
            .await
            .map_err(|s| self.status(s))?
            .into_inner())
    }

    /// One chunk object (not yet verified). The call is read to its end, so it
    /// finishes cleanly instead of being reset: a restore makes thousands of these, and
    /// that many resets trip HTTP/2's limit on reset streams.
    pub async fn get_chunk(&self, digest: Digest, lane: Lane) -> Result<Bytes> {
        let mut stream = self.get_chunks(&[digest], lane).await?;
        let msg = stream
            .message()
            .await
            .map_err(|s| self.status(s))?
            .ok_or_else(|| {
                ClientError::NotFound(format!("registry sent no data for chunk {digest}"))
            })?;
        if msg.digest.as_ref() != digest.0.as_slice() {
            return Err(ClientError::Registry(format!(
                "asked for chunk {digest}, the registry sent another"
            )));
        }
        let _ = stream.message().await;
        Ok(msg.data)
    }

    pub fn map_stream_error(&self, s: tonic::Status) -> ClientError {
        self.status(s)
    }

    pub async fn put_manifest(
        &self,
        repository: &str,
        lease: &str,
        manifest: Bytes,
        tags: Vec<String>,
    ) -> Result<Digest> {
        let req = pb::PutManifestRequest {
            repository: repository.into(),
            lease_id: lease.into(),
            manifest,
            tags,
        };
        let resp = self
            .client
            .clone()
            .put_manifest(req)
            .await
            .map_err(|s| self.status(s))?;
        Ok(resp.into_inner().digest.parse()?)
    }

    /// Fetches a manifest and verifies its bytes against the digest asked for (or the
    /// one the registry names for a tag).
    pub async fn get_manifest(&self, repository: &str, reference: &str) -> Result<(Digest, Bytes)> {
        let req = pb::GetManifestRequest {
            repository: repository.into(),
            reference: reference.into(),
        };
        let resp = self
            .client
            .clone()
            .get_manifest(req)
            .await
            .map_err(|s| self.status(s))?
            .into_inner();
        let named: Digest = resp.digest.parse()?;
        let expected = if reference.starts_with(snapreg_proto::digest::PREFIX) {
            reference.parse()?
        } else {
            named
        };
        let actual = Digest::of(&resp.manifest);
        if actual != expected || named != expected {
            return Err(ClientError::ManifestCorrupt { expected, actual });
        }
        Ok((actual, resp.manifest))
    }

    pub async fn list_repositories(&self) -> Result<Vec<String>> {
        let resp = self
            .client
            .clone()
            .list_repositories(pb::ListRepositoriesRequest {})
            .await
            .map_err(|s| self.status(s))?;
        Ok(resp.into_inner().repositories)
    }

    pub async fn list_tags(&self, repository: &str) -> Result<Vec<pb::TagInfo>> {
        let req = pb::ListTagsRequest {
            repository: repository.into(),
        };
        Ok(self
            .client
            .clone()
            .list_tags(req)
            .await
            .map_err(|s| self.status(s))?
            .into_inner()
            .tags)
    }

    pub async fn set_tag(&self, repository: &str, tag: &str, digest: &Digest) -> Result<()> {
        let req = pb::SetTagRequest {
            repository: repository.into(),
            tag: tag.into(),
            digest: digest.to_string(),
        };
        self.client
            .clone()
            .set_tag(req)
            .await
            .map_err(|s| self.status(s))?;
        Ok(())
    }

    pub async fn delete_tag(&self, repository: &str, tag: &str) -> Result<Digest> {
        let req = pb::DeleteTagRequest {
            repository: repository.into(),
            tag: tag.into(),
        };
        let resp = self
            .client
            .clone()
            .delete_tag(req)
            .await
            .map_err(|s| self.status(s))?;
        Ok(resp.into_inner().digest.parse()?)
    }

    pub async fn collect_garbage(
        &self,
        grace: Option<Duration>,
        dry_run: bool,
    ) -> Result<pb::CollectGarbageResponse> {
        let req = pb::CollectGarbageRequest {
            grace_seconds: grace.map(|g| g.as_secs()),
            dry_run,
        };
        Ok(self
            .client
            .clone()
            .collect_garbage(req)
            .await
            .map_err(|s| self.status(s))?
            .into_inner())
    }

    /// Per-peer replication progress of this registry.
    pub async fn replication_status(&self) -> Result<pb::ReplicationStatusResponse> {
        let resp = self
            .client
            .clone()
            .replication_status(pb::ReplicationStatusRequest {})
            .await
            .map_err(|s| self.status(s))?;
        Ok(resp.into_inner())
    }

    /// Registers (or refreshes) a node with this registry (`snapctl agent`).
    pub async fn register_node(
        &self,
        req: pb::RegisterNodeRequest,
    ) -> Result<pb::RegisterNodeResponse> {
        let resp = self
            .client
            .clone()
            .register_node(req)
            .await
            .map_err(|s| self.status(s))?;
        Ok(resp.into_inner())
    }

    /// Every node registered with this registry.
    /// The fan-out tracker (the peer module): announces this node for a snapshot and
    /// returns its siblings.
    pub async fn swarm(&self, req: pb::SwarmRequest) -> Result<pb::SwarmResponse> {
        Ok(self
            .client
            .clone()
            .swarm(req)
            .await
            .map_err(|s| self.status(s))?
            .into_inner())
    }

    /// Who this side's credentials make it to the registry.
    pub async fn who_am_i(&self) -> Result<pb::WhoAmIResponse> {
        Ok(self
            .client
            .clone()
            .who_am_i(pb::WhoAmIRequest {})
            .await
            .map_err(|s| self.status(s))?
            .into_inner())
    }

    /// The registry instance's transfer counters since it started.
    /// Records how a restore went (restore/outcome.rs).
    pub async fn report_restore(&self, req: pb::ReportRestoreRequest) -> Result<()> {
        self.client
            .clone()
            .report_restore(req)
            .await
            .map_err(|s| self.status(s))?;
        Ok(())
    }

    /// A snapshot's recent restore outcomes, newest first.
    pub async fn restore_outcomes(
        &self,
        repository: &str,
        digest: &str,
    ) -> Result<pb::RestoreOutcomesResponse> {
        Ok(self
            .client
            .clone()
            .restore_outcomes(pb::RestoreOutcomesRequest {
                repository: repository.to_string(),
                digest: digest.to_string(),
            })
            .await
            .map_err(|s| self.status(s))?
            .into_inner())
    }

    pub async fn stats(&self) -> Result<pb::StatsResponse> {
        Ok(self
            .client
            .clone()
            .stats(pb::StatsRequest {})
            .await
            .map_err(|s| self.status(s))?
            .into_inner())
    }

    pub async fn list_nodes(&self) -> Result<Vec<pb::NodeInfo>> {
        let resp = self
            .client
            .clone()
            .list_nodes(pb::ListNodesRequest {})
            .await
            .map_err(|s| self.status(s))?;
        Ok(resp.into_inner().nodes)
    }

    /// Deletes an untagged manifest (`snapctl rm repo@blake3:..`).
    pub async fn delete_manifest(&self, repository: &str, digest: &Digest) -> Result<Digest> {
        let req = pb::DeleteManifestRequest {
            repository: repository.into(),
            digest: digest.to_string(),
        };
        let resp = self
            .client
            .clone()
            .delete_manifest(req)
            .await
            .map_err(|s| self.status(s))?;
        Ok(resp.into_inner().digest.parse()?)
    }

    /// Sets (or with an all-zero policy, removes) a repository's retention policy.
    pub async fn set_retention(&self, repository: &str, policy: pb::RetentionPolicy) -> Result<()> {
        let req = pb::SetRetentionRequest {
            repository: repository.into(),
            policy: Some(policy),
        };
        self.client
            .clone()
            .set_retention(req)
            .await
            .map_err(|s| self.status(s))?;
        Ok(())
    }

    pub async fn get_retention(&self, repository: &str) -> Result<Option<pb::RetentionPolicy>> {
        let req = pb::GetRetentionRequest {
            repository: repository.into(),
        };
        let resp = self
            .client
            .clone()
            .get_retention(req)
            .await
            .map_err(|s| self.status(s))?;
        Ok(resp.into_inner().policy)
    }

    /// Applies the retention policy of `repository` (`None`: of every repository).
    pub async fn apply_retention(
        &self,
        repository: Option<&str>,
        dry_run: bool,
    ) -> Result<Vec<pb::RetentionOutcome>> {
        let req = pb::ApplyRetentionRequest {
            repository: repository.unwrap_or_default().into(),
            dry_run,
        };
        let resp = self
            .client
            .clone()
            .apply_retention(req)
            .await
            .map_err(|s| self.status(s))?;
        Ok(resp.into_inner().repositories)
    }
}

/// A channel to a snapreg gRPC server (a registry or a peer's agent) at `url` with
/// `creds`' TLS settings, connected now so an unreachable server (or a failed TLS
/// handshake) fails here with its address. `what` names the server in usage errors.
pub(crate) async fn connect_channel(
    url: &str,
    creds: &Credentials,
    what: &str,
    connect_timeout: Duration,
) -> Result<Channel> {
    endpoint(url, creds, what, connect_timeout)?
        .connect()
        .await
        .map_err(|e| connect_failed(url, error_chain(&e)))
}

fn client(channel: Channel, token: BearerToken) -> Client {
    RegistryClient::with_interceptor(channel, token)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// The endpoint `connect_channel` connects to: `creds`' TLS, keep-alives, windows.
fn endpoint(
    url: &str,
    creds: &Credentials,
    what: &str,
    connect_timeout: Duration,
) -> Result<Endpoint> {
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(ClientError::Usage(format!(
            "{what} {url:?} needs a scheme: http://{url} or https://{url}"
        )));
    }
    let mut endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|e| ClientError::Usage(format!("{what} URL {url:?}: {e}")))?
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true)
        // A server that stops answering (stalled, SIGSTOPped, partitioned) fails the
        // calls in ~30 s instead of hanging them forever.
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true)
        // Large windows: chunks are 0.5-2 MiB and restores are throughput-bound.
        .initial_stream_window_size(Some(8 << 20))
        .initial_connection_window_size(Some(32 << 20));
    match (&creds.tls, url.starts_with("https://")) {
        (tls, true) => {
            let tls = tls
                .clone()
                .unwrap_or_else(|| ClientTlsConfig::new().with_native_roots());
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| ClientError::Usage(format!("TLS settings: {e}")))?;
        }
        (Some(_), false) => {
            return Err(ClientError::Usage(format!(
                "--ca-cert / --client-cert are for TLS: use an https:// URL instead of {url}"
            )))
        }
        (None, false) => {}
    }
    if creds.token.is_set() && url.starts_with("http://") && !is_loopback(url) {
        tracing::warn!("sending a token to {url} over plain HTTP: anyone on the path can read it; serve TLS (snapreg serve --tls-cert) and use https://");
    }
    Ok(endpoint)
}

fn is_loopback(url: &str) -> bool {
    let host = url
        .split("://")
        .nth(1)
        .unwrap_or_default()
        .split(['/', ':'])
        .next()
        .unwrap_or_default();
    host == "localhost" || host.starts_with("127.") || url.contains("://[::1]")
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// A connection that failed: a TLS refusal (certificate not trusted, or one the
/// server requires and we lack) is told apart from an unreachable address.
fn connect_failed(url: &str, reason: String) -> ClientError {
    let lower = reason.to_ascii_lowercase();
    if lower.contains("certificate") || lower.contains("tls") || lower.contains("handshake") {
        ClientError::Tls {
            url: url.to_string(),
            reason,
        }
    } else {
        ClientError::Unreachable {
            url: url.to_string(),
            reason,
        }
    }
}

/// Maps a registry answer, keeping the registry's own message.
pub(crate) fn from_status(url: &str, s: tonic::Status) -> ClientError {
    use tonic::Code;
    let msg = s.message().to_string();
    match s.code() {
        Code::Unauthenticated | Code::PermissionDenied => ClientError::Auth {
            url: url.to_string(),
            message: msg,
        },
        Code::NotFound => ClientError::NotFound(msg),
        Code::DataLoss => ClientError::Registry(format!("integrity failure: {msg}")),
        Code::InvalidArgument => ClientError::Usage(msg),
        Code::Unavailable | Code::Unknown
            if msg.contains("transport")
                || msg.contains("connect")
                || msg.contains("error trying to connect") =>
        {
            // The transport's own cause (e.g. the server's TLS alert) is in the source.
            connect_failed(url, error_chain(&s))
        }
        // hyper's whole message when the connection dies under a call, e.g. after
        // keep-alive pings went unanswered (a SIGSTOPped or partitioned registry).
        Code::Unavailable | Code::Unknown if msg.contains("http2 error") => {
            ClientError::Unreachable {
                url: url.to_string(),
                reason: format!(
                    "{msg}: the connection broke mid-call (the registry stopped answering \
                     keep-alive pings for 20 s, or closed the connection)"
                ),
            }
        }
        Code::Cancelled | Code::DeadlineExceeded => ClientError::Unreachable {
            url: url.to_string(),
            reason: msg,
        },
        _ => ClientError::Registry(msg),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    #[test]
    fn urgent_fetches_keep_the_first_connection_and_bulk_ones_take_the_rest_in_turn() {
        let bulk: Vec<usize> = (0..6).map(|t| lane_connection(Lane::Bulk, 4, t)).collect();
        assert_eq!(bulk, [1, 2, 3, 1, 2, 3]);
        for t in 0..6 {
            assert_eq!(lane_connection(Lane::Urgent, 4, t), 0);
            assert_eq!(lane_connection(Lane::Bulk, 2, t), 1);
            // One connection: both lanes share it.
            assert_eq!(lane_connection(Lane::Bulk, 1, t), 0);
            assert_eq!(lane_connection(Lane::Urgent, 1, t), 0);
        }
    }

    #[test]
    fn access_refusals_keep_the_registry_message_and_address() {
        for s in [
            tonic::Status::unauthenticated("this registry requires a token: issue one"),
            tonic::Status::permission_denied("token x grants pull"),
        ] {
            let msg = s.message().to_string();
            let e = from_status("http://r:5000", s);
            assert_eq!(e.kind(), ErrorKind::AccessRefused, "{e}");
            assert!(e.to_string().contains(&msg), "{e}");
            assert!(e.to_string().contains("http://r:5000"), "{e}");
        }
    }

    #[test]
    fn certificate_failures_are_tls_refusals_not_unreachable() {
        let e = connect_failed(
            "https://r:5000",
            "transport error: invalid peer certificate: UnknownIssuer".into(),
        );
        assert!(matches!(e, ClientError::Tls { .. }), "{e:?}");
        assert_eq!(e.kind(), ErrorKind::AccessRefused);
        let e = connect_failed("http://r:5000", "connection refused".into());
        assert!(matches!(e, ClientError::Unreachable { .. }), "{e:?}");
        assert_eq!(e.kind(), ErrorKind::Failure);
    }
}
