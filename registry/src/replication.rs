//! Multi-region replication: this registry pushes its own commits to each peer.
//!
//! - **The log.** Every tag record this registry writes itself (a push's tags,
//!   `SetTag`, `DeleteTag` tombstones) is appended to an ordered log in the index
//!   (`r/<seq>`, see index.rs) after the record is durable. Records received from a peer
//!   are *not* logged: each registry sends only its own commits, so nothing bounces back
//!   and forth. A full mesh (every registry peering every other) is the topology; a
//!   chain A→B→C does not forward A's commits to C.
//! - **The cursor.** Per peer, `p/<name>` holds the last log sequence the peer
//!   acknowledged, written (synced) only after the peer acknowledged the whole entry.
//!   After a restart the loop resumes after it: nothing acknowledged is sent again. A
//!   crash between the peer's ack and the cursor write re-sends one entry, which is
//!   harmless: chunks and manifests are content-addressed, and a tag record carries its
//!   original HLC and target, so the peer writes the same object and the tag-record rule
//!   (highest `(hlc, target)` wins) gives the same answer.
//! - **One entry.** For a record naming a manifest: `BeginPush` on the peer (a lease, so
//!   the peer's GC leaves the chunks alone), `FindMissingChunks` over the manifest's
//!   chunks, `PutChunks` of only the missing ones (the peer decodes and verifies each
//!   against its digest before acknowledging), then `ReplicateTagRecord` with the
//!   manifest bytes, which stores the manifest and writes the record under its original
//!   name. A tombstone is just `ReplicateTagRecord`. Entries whose repository matches
//!   none of the peer's prefixes are skipped (the cursor still moves).
//! - **Faults.** A failed entry is retried with exponential backoff (100 ms doubling up
//!   to `--replication-backoff-max`); the loop never gives up. The last error, the
//!   failure count and the last success are kept per peer and served by
//!   `ReplicationStatus`, with the lag (log entries not yet acknowledged).
//! - **Credentials.** A peer's options give the token this registry presents there
//!   (`token-file=PATH`; a token with push on the replicated repositories) and, for an
//!   `https://` peer, the CA to trust (`ca-cert=PATH`) and a client certificate for
//!   mutual TLS (`client-cert=PATH,client-key=PATH`). Files are read when the peer's
//!   task starts; a refusal by the peer shows up in `ReplicationStatus`'s last error.
//! - **Lifetime.** One task per peer, started by [`Replicator::spawn`] when the server
//!   runs and stopped when it shuts down (an entry in flight is abandoned; it is re-sent later).

use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use snapreg_proto::credentials::{self, BearerToken};
use snapreg_proto::manifest::Manifest;
use snapreg_proto::pb::{self, registry_client::RegistryClient};
use snapreg_proto::tags::TagRecord;
use snapreg_proto::Digest;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::clock::now_ms;
use crate::error::{BoxError, RegistryError, Result};
use crate::index::LogEntry;
use crate::registry::Registry;

/// First retry delay after a failure; doubles up to the configured maximum.
const INITIAL_BACKOFF: Duration = Duration::from_millis(100);
/// Log entries read per batch.
const LOG_BATCH: usize = 64;
/// Digests per `FindMissingChunks` call.
const FIND_BATCH: usize = 4096;
/// One `PutChunks` call carries at most this many chunk objects / bytes.
const PUT_BATCH_CHUNKS: usize = 64;
const PUT_BATCH_BYTES: usize = 16 << 20;
/// While caught up, the loop re-reads the log at least this often.
const IDLE_POLL: Duration = Duration::from_secs(1);

/// Largest gRPC message either side accepts: a 16 MiB chunk object, or a manifest.
pub const MAX_MESSAGE_BYTES: usize = snapreg_proto::manifest::MAX_MANIFEST_BYTES + (1 << 20);

type PeerClient = RegistryClient<InterceptedService<Channel, BearerToken>>;

/// A peer from `--peer NAME=URL[,repos=PREFIX1|PREFIX2][,token-file=PATH]
/// [,ca-cert=PATH][,client-cert=PATH,client-key=PATH]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerConfig {
    pub name: String,
    pub url: String,
    /// Repository prefixes replicated to this peer; empty means every repository.
    pub repository_prefixes: Vec<String>,
    /// The token presented to the peer (a file, so it stays out of `ps`).
    pub token_file: Option<std::path::PathBuf>,
    /// CA that signed the peer's TLS certificate (default: the platform's roots).
    pub ca_cert: Option<std::path::PathBuf>,
    /// Client certificate and key for a peer that requires mutual TLS.
    pub client_cert: Option<std::path::PathBuf>,
    pub client_key: Option<std::path::PathBuf>,
}

impl PeerConfig {
    pub fn wants(&self, repository: &str) -> bool {
        self.repository_prefixes.is_empty()
            || self
                .repository_prefixes
                .iter()
                .any(|p| repository.starts_with(p.as_str()))
    }
}

impl FromStr for PeerConfig {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let usage = "expected NAME=URL[,repos=PREFIX1|PREFIX2][,token-file=PATH][,ca-cert=PATH]\
                     [,client-cert=PATH,client-key=PATH], e.g. eu=https://10.0.0.2:5000,token-file=/etc/snapreg/eu.token";
        let mut parts = s.split(',');
        let (name, url) = parts
            .next()
            .and_then(|p| p.split_once('='))
            .ok_or_else(|| format!("peer {s:?}: {usage}"))?;
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        {
            return Err(format!(
                "peer name {name:?}: use letters, digits, '-', '_' or '.'"
            ));
        }
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(format!(
                "peer {name}: URL {url:?} needs a scheme (http://host:port)"
            ));
        }
        let mut peer = PeerConfig {
            name: name.into(),
            url: url.into(),
            repository_prefixes: Vec::new(),
            token_file: None,
            ca_cert: None,
            client_cert: None,
            client_key: None,
        };
        for opt in parts {
            match opt.split_once('=') {
                Some(("repos", list)) => peer.repository_prefixes.extend(
                    list.split('|')
                        .filter(|p| !p.is_empty())
                        .map(str::to_string),
                ),
                Some(("token-file", p)) if !p.is_empty() => peer.token_file = Some(p.into()),
                Some(("ca-cert", p)) if !p.is_empty() => peer.ca_cert = Some(p.into()),
                Some(("client-cert", p)) if !p.is_empty() => peer.client_cert = Some(p.into()),
                Some(("client-key", p)) if !p.is_empty() => peer.client_key = Some(p.into()),
                _ => return Err(format!("peer {name}: unknown option {opt:?}; {usage}")),
            }
        }
        if peer.client_cert.is_some() != peer.client_key.is_some() {
            return Err(format!(
                "peer {name}: client-cert and client-key go together: give both or neither"
            ));
        }
        if !url.starts_with("https://") && (peer.ca_cert.is_some() || peer.client_cert.is_some()) {
            return Err(format!(
                "peer {name}: ca-cert and client-cert need an https:// URL"
            ));
        }
        Ok(peer)
    }
}

#[derive(Debug, Default)]
struct PeerStats {
    last_success_unix_ms: u64,
    last_error: String,
    failures: u64,
    chunks_sent: u64,
    bytes_sent: u64,
    manifests_sent: u64,
    records_sent: u64,
}

struct Peer {
    config: PeerConfig,
    stats: Mutex<PeerStats>,
}

/// One peer's replication state, as ReplicationStatus shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerStatus {
    pub name: String,
    pub url: String,
    pub repository_prefixes: Vec<String>,
    /// The last log sequence the peer acknowledged.
    pub acked_seq: u64,
    pub entries_behind: u64,
    pub last_success_unix_ms: u64,
    /// Empty while the last attempt succeeded.
    pub last_error: String,
    pub chunks_sent: u64,
    pub bytes_sent: u64,
    pub manifests_sent: u64,
    pub records_sent: u64,
    /// Failed attempts since the last success.
    pub failures: u64,
}

/// The commit log's head and every peer's state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplicationStatus {
    pub log_head: u64,
    pub peers: Vec<PeerStatus>,
}

/// The peers and their in-memory counters (the cursors are in the index).
pub struct Replicator {
    peers: Vec<Arc<Peer>>,
    backoff_max: Duration,
}

impl Replicator {
    pub fn new(peers: &[PeerConfig], backoff_max: Duration) -> Result<Self> {
        let mut names = std::collections::HashSet::new();
        for p in peers {
            if !names.insert(&p.name) {
                return Err(RegistryError::invalid(
                    "--peer",
                    format!("peer name {:?} is given twice", p.name),
                ));
            }
        }
        Ok(Replicator {
            peers: peers
                .iter()
                .map(|c| {
                    Arc::new(Peer {
                        config: c.clone(),
                        stats: Mutex::new(PeerStats::default()),
                    })
                })
                .collect(),
            backoff_max: backoff_max.max(INITIAL_BACKOFF),
        })
    }

    pub fn status(&self, reg: &Registry) -> Result<ReplicationStatus> {
        let log_head = reg.log_head();
        let mut peers = Vec::new();
        for p in &self.peers {
            let acked = reg.index().peer_cursor(&p.config.name)?;
            let s = p.stats.lock().unwrap();
            peers.push(PeerStatus {
                name: p.config.name.clone(),
                url: p.config.url.clone(),
                repository_prefixes: p.config.repository_prefixes.clone(),
                acked_seq: acked,
                entries_behind: log_head.saturating_sub(acked),
                last_success_unix_ms: s.last_success_unix_ms,
                last_error: s.last_error.clone(),
                chunks_sent: s.chunks_sent,
                bytes_sent: s.bytes_sent,
                manifests_sent: s.manifests_sent,
                records_sent: s.records_sent,
                failures: s.failures,
            });
        }
        Ok(ReplicationStatus { log_head, peers })
    }

    /// Starts one replication task per peer; each stops when `stop` turns true (or
    /// its sender is dropped).
    pub fn spawn(&self, reg: &Arc<Registry>, stop: watch::Receiver<bool>) -> Vec<JoinHandle<()>> {
        self.peers
            .iter()
            .map(|peer| {
                tokio::spawn(peer_loop(
                    reg.clone(),
                    peer.clone(),
                    self.backoff_max,
                    stop.clone(),
                ))
            })
            .collect()
    }
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    // A dropped sender means the server is gone: stop as well.
    let _ = stop.wait_for(|s| *s).await;
}

/// A [`RegistryError::PeerSetup`] saying which setting `source` is about.
fn setup(what: impl Into<String>, source: impl Into<BoxError>) -> RegistryError {
    RegistryError::PeerSetup {
        what: what.into(),
        source: source.into(),
    }
}

fn connect_lazy(peer: &PeerConfig) -> Result<PeerClient> {
    let url = &peer.url;
    let token = match &peer.token_file {
        Some(f) => {
            Some(credentials::read_token_file(f).map_err(|e| setup("the peer's token-file", e))?)
        }
        None => None,
    };
    let token = BearerToken::new(token.as_deref()).map_err(|e| setup("the peer's token", e))?;
    let mut endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|e| setup(format!("peer URL {url:?}"), e))?;
    if url.starts_with("https://") {
        let tls = credentials::identity_pair(
            peer.client_cert.as_deref(),
            peer.client_key.as_deref(),
            ("client-cert", "client-key"),
        )
        .and_then(|identity| credentials::client_tls(peer.ca_cert.as_deref(), identity))
        .map_err(|e| setup("the peer's TLS files", e))?;
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| setup("the peer's TLS settings", e))?;
    }
    let channel = endpoint
        .connect_timeout(Duration::from_secs(3))
        .tcp_nodelay(true)
        // A peer that stops answering fails the call instead of hanging the loop.
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true)
        .initial_stream_window_size(Some(8 << 20))
        .initial_connection_window_size(Some(32 << 20))
        .connect_lazy();
    Ok(RegistryClient::with_interceptor(channel, token)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

async fn peer_loop(
    reg: Arc<Registry>,
    peer: Arc<Peer>,
    backoff_max: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let name = peer.config.name.clone();
    let client = match connect_lazy(&peer.config) {
        Ok(c) => c,
        Err(e) => {
            let e = e.chain();
            tracing::error!(peer = %name, "replication disabled: {e}");
            peer.stats.lock().unwrap().last_error = e;
            return;
        }
    };
    let mut head = reg.subscribe_log();
    let mut backoff = INITIAL_BACKOFF;
    tracing::info!(peer = %name, url = %peer.config.url, "replication started");
    loop {
        if *stop.borrow() {
            break;
        }
        // Seen before the log is read: a commit appended after this wakes the wait below.
        head.borrow_and_update();
        // Re-read the durable cursor each round: it is the only truth.
        let entries = reg
            .index()
            .peer_cursor(&name)
            .and_then(|cursor| reg.log_entries_after(cursor, LOG_BATCH));
        let entries = match entries {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(peer = %name, "reading the replication log: {e}");
                tokio::select! {
                    _ = stopped(&mut stop) => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(backoff_max);
                continue;
            }
        };
        if entries.is_empty() {
            tokio::select! {
                _ = stopped(&mut stop) => break,
                _ = head.changed() => {}
                _ = tokio::time::sleep(IDLE_POLL) => {}
            }
            continue;
        }
        for (seq, entry) in entries {
            loop {
                let result = tokio::select! {
                    _ = stopped(&mut stop) => return,
                    r = send_entry(&reg, &peer, client.clone(), &entry) => r,
                };
                // The cursor moves only after the peer acknowledged the whole entry.
                let result = result.and_then(|()| reg.index().set_peer_cursor(&name, seq));
                match result {
                    Ok(()) => {
                        let mut s = peer.stats.lock().unwrap();
                        s.last_success_unix_ms = now_ms();
                        s.last_error.clear();
                        s.failures = 0;
                        backoff = INITIAL_BACKOFF;
                        break;
                    }
                    Err(e) => {
                        let msg = format!(
                            "entry {seq} ({}:{}): {}",
                            entry.repository,
                            entry.tag,
                            e.chain()
                        );
                        tracing::warn!(peer = %name, retry_in = ?backoff, "replication failed: {msg}");
                        {
                            let mut s = peer.stats.lock().unwrap();
                            s.last_error = msg;
                            s.failures += 1;
                        }
                        tokio::select! {
                            _ = stopped(&mut stop) => return,
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(backoff_max);
                    }
                }
            }
        }
    }
    tracing::info!(peer = %name, "replication stopped");
}

/// A [`RegistryError::PeerCall`] for a failed call to the peer.
fn peer_call(call: &'static str) -> impl FnOnce(tonic::Status) -> RegistryError {
    move |status| RegistryError::PeerCall {
        call,
        source: Box::new(status),
    }
}

/// Sends one log entry to the peer; returns once the peer acknowledged all of it.
async fn send_entry(
    reg: &Registry,
    peer: &Peer,
    mut client: PeerClient,
    entry: &LogEntry,
) -> Result<()> {
    if !peer.config.wants(&entry.repository) {
        return Ok(());
    }
    let record = TagRecord::parse(&entry.record_name)?;
    let (lease_id, manifest) = match record.digest() {
        None => (String::new(), Bytes::new()),
        Some(digest) => {
            let bytes = match reg.store().get_manifest(&digest).await {
                Ok(b) => b,
                Err(RegistryError::ManifestNotFound { .. }) => {
                    // Swept by GC: the tag moved on since, and a later entry carries it.
                    tracing::warn!(peer = %peer.config.name, repository = %entry.repository,
                        tag = %entry.tag, %digest, "manifest gone (collected); record skipped");
                    return Ok(());
                }
                Err(e) => return Err(e),
            };
            let chunks = Manifest::decode(&bytes)?.chunk_digests();
            let lease_id = client
                .begin_push(pb::BeginPushRequest {
                    repository: entry.repository.clone(),
                })
                .await
                .map_err(peer_call("BeginPush"))?
                .into_inner()
                .lease_id;
            let mut missing = Vec::new();
            for batch in chunks.chunks(FIND_BATCH) {
                let resp = client
                    .find_missing_chunks(pb::FindMissingChunksRequest {
                        lease_id: lease_id.clone(),
                        digests: batch.iter().map(|d| Bytes::copy_from_slice(&d.0)).collect(),
                    })
                    .await
                    .map_err(peer_call("FindMissingChunks"))?
                    .into_inner();
                for m in resp.missing {
                    missing.push(Digest::from_slice(&m)?);
                }
            }
            upload(reg, peer, &mut client, &lease_id, &missing).await?;
            (lease_id, bytes)
        }
    };
    let sent_manifest = !manifest.is_empty();
    client
        .replicate_tag_record(pb::ReplicateTagRecordRequest {
            repository: entry.repository.clone(),
            tag: entry.tag.clone(),
            record_name: entry.record_name.clone(),
            lease_id,
            manifest,
        })
        .await
        .map_err(peer_call("ReplicateTagRecord"))?;
    let mut s = peer.stats.lock().unwrap();
    s.records_sent += 1;
    s.manifests_sent += sent_manifest as u64;
    Ok(())
}

/// Uploads chunk objects from the local store, in bounded `PutChunks` calls; counts
/// each chunk as sent once the peer acknowledged its call.
async fn upload(
    reg: &Registry,
    peer: &Peer,
    client: &mut PeerClient,
    lease_id: &str,
    missing: &[Digest],
) -> Result<()> {
    let mut batch: Vec<pb::PutChunkRequest> = Vec::new();
    let mut batch_bytes = 0usize;
    for (i, d) in missing.iter().enumerate() {
        let data = reg.store().get_chunk(d).await?;
        batch_bytes += data.len();
        batch.push(pb::PutChunkRequest {
            lease_id: lease_id.to_string(),
            digest: Bytes::copy_from_slice(&d.0),
            data,
        });
        let last = i + 1 == missing.len();
        if last || batch.len() >= PUT_BATCH_CHUNKS || batch_bytes >= PUT_BATCH_BYTES {
            let n = batch.len() as u64;
            let bytes = batch_bytes as u64;
            client
                .put_chunks(futures::stream::iter(std::mem::take(&mut batch)))
                .await
                .map_err(peer_call("PutChunks"))?;
            batch_bytes = 0;
            let mut s = peer.stats.lock().unwrap();
            s.chunks_sent += n;
            s.bytes_sent += bytes;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_flags_parse() {
        let p: PeerConfig = "eu=http://10.0.0.2:5000".parse().unwrap();
        assert_eq!(p.name, "eu");
        assert_eq!(p.url, "http://10.0.0.2:5000");
        assert!(p.wants("anything"));
        let p: PeerConfig = "us-east=http://h:1,repos=team/|infra/llama"
            .parse()
            .unwrap();
        assert_eq!(p.repository_prefixes, ["team/", "infra/llama"]);
        assert!(p.wants("team/x") && p.wants("infra/llama3") && !p.wants("other/x"));
        let p: PeerConfig =
            "eu=https://h:1,token-file=/t,ca-cert=/ca.pem,client-cert=/c.pem,client-key=/k.pem"
                .parse()
                .unwrap();
        assert_eq!(p.token_file.as_deref(), Some(std::path::Path::new("/t")));
        assert_eq!(p.ca_cert.as_deref(), Some(std::path::Path::new("/ca.pem")));
        assert!(p.client_cert.is_some() && p.client_key.is_some());
        for bad in [
            "",
            "eu",
            "=http://h:1",
            "eu=h:1",
            "eu=http://h,zones=x",
            "e u=http://h",
            "eu=https://h:1,client-cert=/c.pem",
            "eu=http://h:1,ca-cert=/ca.pem",
            "eu=http://h:1,token-file=",
        ] {
            assert!(bad.parse::<PeerConfig>().is_err(), "{bad}");
        }
    }
}
