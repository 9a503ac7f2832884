//! A connection to one registry: the generated gRPC client plus errors that name the
//! registry's address.

use std::time::Duration;

use bytes::Bytes;
use snapreg_proto::pb::registry_client::RegistryClient;
use snapreg_proto::pb::{self};
use snapreg_proto::Digest;
use tonic::transport::{Channel, Endpoint};

use crate::error::{ClientError, Result};

/// Matches the registry's limit: a manifest or a 16 MiB chunk fits.
const MAX_MESSAGE_BYTES: usize = snapreg_proto::manifest::MAX_MANIFEST_BYTES + (1 << 20);

#[derive(Clone)]
pub struct Remote {
    url: String,
    client: RegistryClient<Channel>,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote").field("url", &self.url).finish()
    }
}

impl Remote {
    /// Connects now, so an unreachable registry fails here with its address.
    pub async fn connect(url: &str) -> Result<Self> {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(ClientError::Usage(format!(
                "registry {url:?} needs a scheme: --registry http://{url}"
            )));
        }
        let endpoint = Endpoint::from_shared(url.to_string())
            .map_err(|e| ClientError::Usage(format!("registry URL {url:?}: {e}")))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            // A registry that stops answering (stalled, SIGSTOPped, partitioned) fails
            // the calls in ~30 s instead of hanging them forever.
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(20))
            .keep_alive_while_idle(true)
            // Large windows: chunks are 0.5-2 MiB and restores are throughput-bound.
            .initial_stream_window_size(Some(8 << 20))
            .initial_connection_window_size(Some(32 << 20));
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| ClientError::Unreachable {
                url: url.to_string(),
                reason: error_chain(&e),
            })?;
        let client = RegistryClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        Ok(Remote {
            url: url.to_string(),
            client,
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn status(&self, s: tonic::Status) -> ClientError {
        ClientError::from_status(&self.url, s)
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

    /// Streams chunk objects (codec framing, unverified) in the order asked.
    pub async fn get_chunks(&self, digests: &[Digest]) -> Result<tonic::Streaming<pb::ChunkData>> {
        let req = pb::GetChunksRequest {
            digests: digests
                .iter()
                .map(|d| Bytes::copy_from_slice(&d.0))
                .collect(),
        };
        Ok(self
            .client
            .clone()
            .get_chunks(req)
            .await
            .map_err(|s| self.status(s))?
            .into_inner())
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
