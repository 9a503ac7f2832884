//! A connection to a peer's agent: its node cache's chunks and what it holds.

use std::time::Duration;

use bytes::Bytes;
use snapreg_proto::credentials::BearerToken;
use snapreg_proto::pb::node_agent_client::NodeAgentClient;
use snapreg_proto::pb::{self};
use snapreg_proto::Digest;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::error::{ClientError, Result};
use crate::remote::{connect_channel, from_status, Credentials};

/// Peers are asked only when they answer at once; an unreachable one is skipped.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// A chunk object in codec framing (16 MiB at most) with room for the message.
const MAX_MESSAGE_BYTES: usize = snapreg_proto::codec::MAX_OBJECT_LEN + (1 << 20);

#[derive(Clone)]
pub struct PeerClient {
    url: String,
    client: NodeAgentClient<InterceptedService<Channel, BearerToken>>,
}

impl PeerClient {
    pub async fn connect(url: &str, creds: &Credentials) -> Result<Self> {
        let channel = connect_channel(url, creds, "peer agent", CONNECT_TIMEOUT).await?;
        let client = NodeAgentClient::with_interceptor(channel, creds.token().clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        Ok(PeerClient {
            url: url.to_string(),
            client,
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn status(&self, s: tonic::Status) -> ClientError {
        from_status(&self.url, s)
    }

    /// One chunk object from the peer's cache (codec framing, not yet verified),
    /// reading the call to its end so it finishes cleanly.
    pub async fn get_chunk(&self, digest: Digest) -> Result<Bytes> {
        let req = pb::GetChunksRequest {
            digests: vec![Bytes::copy_from_slice(&digest.0)],
        };
        let mut stream = self
            .client
            .clone()
            .get_chunks(req)
            .await
            .map_err(|s| self.status(s))?
            .into_inner();
        let msg = stream
            .message()
            .await
            .map_err(|s| self.status(s))?
            .ok_or_else(|| ClientError::NotFound(format!("{} sent no chunk {digest}", self.url)))?;
        if msg.digest.as_ref() != digest.0.as_slice() {
            return Err(ClientError::Registry(format!(
                "asked {} for chunk {digest}, it sent another",
                self.url
            )));
        }
        let _ = stream.message().await;
        Ok(msg.data)
    }

    /// Which of `digests` the peer holds: now, then as they arrive.
    pub async fn watch(&self, digests: &[Digest]) -> Result<tonic::Streaming<pb::HeldChunks>> {
        let req = pb::WatchChunksRequest {
            digests: digests
                .iter()
                .map(|d| Bytes::copy_from_slice(&d.0))
                .collect(),
        };
        Ok(self
            .client
            .clone()
            .watch_chunks(req)
            .await
            .map_err(|s| self.status(s))?
            .into_inner())
    }

    pub fn map_stream_error(&self, s: tonic::Status) -> ClientError {
        self.status(s)
    }
}
