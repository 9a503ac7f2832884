//! The agent's side of the peer protocol: `WatchChunks` and `GetChunks` over the
//! node cache, and who may call them.
//!
//! Access: a caller that presented a client certificate the agent's client CA signed
//! (mutual TLS: the TLS layer verified it), or whose bearer token (or anonymous
//! access) the agent's registries accept for pull. The agent cannot judge tokens
//! itself, so it forwards the caller's token to its nearest reachable registry's
//! `WhoAmI` and remembers the verdict for [`VERDICT_TTL`] (revocations reach peers
//! within that time, as they reach the registry's own cache).
//!
//! Chunks go out as the cache holds them (verified on the way out, ciphertext for
//! an encrypted tenant), framed raw by the chunk codec: a node's neighbours are a
//! LAN away, and compressing each chunk again for them would cost the serving node
//! CPU that its own restore needs.

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use snapreg_proto::credentials::{BearerToken, AUTHORIZATION};
use snapreg_proto::pb;
use snapreg_proto::Digest;
use tonic::metadata::MetadataMap;
use tonic::Status;

use crate::cache::ChunkCache;
use crate::error::ClientError;
use crate::remote::{Credentials, Remote};

/// How long a token's verdict (admitted or refused) is remembered.
pub const VERDICT_TTL: Duration = Duration::from_secs(5);
/// How often a watch looks for chunks that arrived: every hop a chunk takes through
/// the swarm waits up to this long before the next node hears of it.
const WATCH_TICK: Duration = Duration::from_millis(50);
/// A watch ends after this long even if chunks are still missing.
const WATCH_LIMIT: Duration = Duration::from_secs(30 * 60);
/// Digests per WatchChunks and GetChunks call.
const MAX_WATCHED: usize = 1 << 18;
const MAX_CHUNKS_PER_CALL: usize = 1024;
/// A chunk found absent is not looked for again sooner than this (however many
/// peers watch it).
const ABSENT_RECHECK: Duration = Duration::from_millis(150);

/// What the agent did for peers since it started.
#[derive(Default, Debug)]
pub struct Served {
    pub chunks: AtomicU64,
    pub bytes: AtomicU64,
    pub refused: AtomicU64,
}

pub type HeldStream = Pin<Box<dyn Stream<Item = Result<pb::HeldChunks, Status>> + Send>>;
pub type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::ChunkData, Status>> + Send>>;

pub struct PeerService {
    cache: ChunkCache,
    held: Arc<HeldMemo>,
    access: PeerAccess,
    pub served: Arc<Served>,
}

impl PeerService {
    /// `registries` (nearest first) judge peers' tokens; `credentials` are the
    /// agent's own TLS settings for reaching them.
    pub fn new(cache: ChunkCache, registries: Vec<String>, credentials: Credentials) -> Self {
        PeerService {
            held: Arc::new(HeldMemo {
                cache: cache.clone(),
                known: Mutex::default(),
                absent: Mutex::default(),
            }),
            cache,
            access: PeerAccess {
                registries,
                credentials,
                verdicts: Mutex::default(),
            },
            served: Arc::default(),
        }
    }

    /// Admits a peer call, or refuses it (counted).
    pub async fn admit(&self, metadata: &MetadataMap, has_certificate: bool) -> Result<(), Status> {
        if has_certificate {
            return Ok(());
        }
        let verdict = self.access.judge(metadata).await;
        if verdict.is_err() {
            self.served.refused.fetch_add(1, Relaxed);
        }
        verdict
    }

    pub fn watch(&self, digests: &[Bytes]) -> Result<HeldStream, Status> {
        let digests: Arc<[Digest]> = parse_digests(digests, MAX_WATCHED)?.into();
        let held = self.held.clone();
        let deadline = Instant::now() + WATCH_LIMIT;
        let remaining: Vec<u32> = (0..digests.len() as u32).collect();
        let stream = futures::stream::unfold((remaining, true), move |(remaining, first)| {
            let (held, digests) = (held.clone(), digests.clone());
            async move {
                let mut remaining = remaining;
                let mut first = first;
                loop {
                    if remaining.is_empty() || Instant::now() >= deadline {
                        return None;
                    }
                    if !first {
                        tokio::time::sleep(WATCH_TICK).await;
                    }
                    let sent_none = first;
                    first = false;
                    let (held, digests) = (held.clone(), digests.clone());
                    let checked =
                        tokio::task::spawn_blocking(move || held.split(&digests, remaining)).await;
                    let Ok((now_held, still)) = checked else {
                        return Some((
                            Err(Status::internal("checking the node cache")),
                            (Vec::new(), false),
                        ));
                    };
                    remaining = still;
                    // The first answer goes out even if empty: the caller waits for it.
                    if !now_held.is_empty() || sent_none {
                        let msg = pb::HeldChunks { indices: now_held };
                        return Some((Ok(msg), (remaining, false)));
                    }
                }
            }
        });
        Ok(Box::pin(stream))
    }

    pub fn get_chunks(&self, digests: &[Bytes]) -> Result<ChunkStream, Status> {
        let digests = parse_digests(digests, MAX_CHUNKS_PER_CALL)?;
        let (cache, served) = (self.cache.clone(), self.served.clone());
        let stream = futures::stream::iter(digests).then(move |d| {
            let (cache, served) = (cache.clone(), served.clone());
            async move {
                let content = tokio::task::spawn_blocking(move || cache.get(&d))
                    .await
                    .ok()
                    .flatten()
                    .ok_or_else(|| {
                        Status::not_found(format!("chunk {d} is not in this node's cache"))
                    })?;
                served.chunks.fetch_add(1, Relaxed);
                served.bytes.fetch_add(content.len() as u64, Relaxed);
                Ok(pb::ChunkData {
                    digest: Bytes::copy_from_slice(&d.0),
                    data: snapreg_proto::codec::encode_raw(&content),
                })
            }
        });
        Ok(Box::pin(stream))
    }
}

fn parse_digests(list: &[Bytes], max: usize) -> Result<Vec<Digest>, Status> {
    if list.len() > max {
        return Err(Status::invalid_argument(format!(
            "digests: {} asked, at most {max} a call",
            list.len()
        )));
    }
    list.iter()
        .enumerate()
        .map(|(i, b)| {
            Digest::from_slice(b)
                .map_err(|e| Status::invalid_argument(format!("digests[{i}]: {e}")))
        })
        .collect()
}

/// Which chunks the node cache holds, remembered across watches: a held chunk is
/// not looked for again (eviction shows up as NOT_FOUND from GetChunks, which
/// peers take in their stride), an absent one not before [`ABSENT_RECHECK`].
struct HeldMemo {
    cache: ChunkCache,
    known: Mutex<HashSet<Digest>>,
    absent: Mutex<HashMap<Digest, Instant>>,
}

impl HeldMemo {
    /// Splits `remaining` (indices into `digests`) into held now and still absent.
    fn split(&self, digests: &[Digest], remaining: Vec<u32>) -> (Vec<u32>, Vec<u32>) {
        let now = Instant::now();
        let (mut held, mut still) = (Vec::new(), Vec::new());
        for i in remaining {
            let d = &digests[i as usize];
            if self.is_held(d, now) {
                held.push(i);
            } else {
                still.push(i);
            }
        }
        (held, still)
    }

    fn is_held(&self, d: &Digest, now: Instant) -> bool {
        if self.known.lock().unwrap().contains(d) {
            return true;
        }
        if let Some(t) = self.absent.lock().unwrap().get(d) {
            if now.duration_since(*t) < ABSENT_RECHECK {
                return false;
            }
        }
        if self.cache.contains(d) {
            self.known.lock().unwrap().insert(*d);
            self.absent.lock().unwrap().remove(d);
            true
        } else {
            let mut absent = self.absent.lock().unwrap();
            if absent.len() >= MAX_WATCHED * 4 {
                absent.clear();
            }
            absent.insert(*d, now);
            false
        }
    }
}

/// When a verdict was reached, and what it was.
type Verdict = (Instant, Result<(), Status>);

struct PeerAccess {
    registries: Vec<String>,
    credentials: Credentials,
    /// BLAKE3 of the caller's authorization value (empty: anonymous) → verdict.
    verdicts: Mutex<HashMap<[u8; 32], Verdict>>,
}

impl PeerAccess {
    async fn judge(&self, metadata: &MetadataMap) -> Result<(), Status> {
        let header = metadata
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let key = *blake3::hash(header.as_bytes()).as_bytes();
        if let Some((at, verdict)) = self.verdicts.lock().unwrap().get(&key) {
            if at.elapsed() < VERDICT_TTL {
                return verdict.clone();
            }
        }
        let verdict = self.ask_registry(&header).await;
        // An unreachable registry is not a verdict: ask again next time.
        if !matches!(&verdict, Err(s) if s.code() == tonic::Code::Unavailable) {
            let mut verdicts = self.verdicts.lock().unwrap();
            if verdicts.len() > 4096 {
                verdicts.retain(|_, (at, _)| at.elapsed() < VERDICT_TTL);
            }
            verdicts.insert(key, (Instant::now(), verdict.clone()));
        }
        verdict
    }

    async fn ask_registry(&self, header: &str) -> Result<(), Status> {
        const HOW: &str = "peer calls need the cluster's client certificate (mutual TLS) or \
                           a token this node's registry accepts for pull (--token)";
        let token = header.strip_prefix("Bearer ").map(str::trim);
        let bearer =
            BearerToken::new(token).map_err(|e| Status::unauthenticated(format!("{e}; {HOW}")))?;
        let creds = self.credentials.with_token(bearer);
        let mut last = None;
        for url in &self.registries {
            let answer = match Remote::connect_with(url, &creds).await {
                Ok(r) => r.who_am_i().await,
                Err(e) => Err(e),
            };
            match answer {
                Ok(who) if !who.scope.is_empty() => return Ok(()),
                Ok(_) => {
                    return Err(Status::permission_denied(format!(
                        "the registry grants this caller nothing; {HOW}"
                    )))
                }
                Err(ClientError::Auth { message, .. }) => {
                    return Err(Status::unauthenticated(format!(
                        "{url} refused the caller's credentials ({message}); {HOW}"
                    )))
                }
                Err(e) => last = Some(e),
            }
        }
        Err(Status::unavailable(format!(
            "no registry to check the caller's token with ({}); try again",
            last.map_or_else(|| "none configured".to_string(), |e| e.to_string())
        )))
    }
}
