//! Who may call which RPC: the `snapreg.v1.Registry` service wrapped so that every
//! call is authenticated (auth.rs) and checked against this table before its handler.
//!
//! What each RPC needs, enforced by [`AuthorizedRegistry`] before the handler runs
//! (scopes and repository patterns are auth.rs's):
//!
//! | RPC | needs |
//! |---|---|
//! | BeginPush, PutManifest, SetTag, DeleteTag, ReplicateTagRecord | push on the request's repository |
//! | FindMissingChunks, PutChunks | push on some repository (see below) |
//! | GetManifest, ListTags, Resolve, Swarm, ReportRestore, RestoreOutcomes | pull on the request's repository |
//! | GetChunks, GetChunkUrls | pull on some repository (see below) |
//! | DeleteManifest | push on the named repository |
//! | SetRetention, ApplyRetention (one repository) | admin on the named repository |
//! | GetRetention | pull on the named repository |
//! | ApplyRetention (every repository), Scrub | admin on `*` |
//! | ListRepositories, Watch | pull on some repository; the answer is filtered to the repositories the token may pull |
//! | RegisterNode | pull on some repository (a node announces itself with the token it pulls with) |
//! | ListNodes, ReplicationStatus | pull on `*` (they describe the whole registry) |
//! | CollectGarbage | admin on `*` |
//! | Stats | pull on some repository (transfer totals name no repository) |
//! | WhoAmI | nothing: it answers who the caller is (an unknown or revoked token is still refused) |
//!
//! Chunk RPCs name digests, not repositories. Uploading needs push somewhere: a chunk
//! is verified against its digest and becomes reachable only through a manifest, which
//! PutManifest accepts only with push on its repository. Downloading needs pull
//! somewhere: a chunk's address is the BLAKE3 of its content, learned from a manifest
//! the caller may read (or from already knowing the content). Likewise a manifest
//! digest is a capability: GetManifest and SetTag by digest work for anyone who holds
//! it and may pull (push) the repository named in the request. Tenants that must not
//! confirm each other's content need separate registries (or buckets) today.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use snapreg_proto::pb::{self, registry_server::Registry as RegistryRpc};
use tonic::{Request, Response, Status, Streaming};

use crate::auth::{Authenticator, Principal, Scope};
use crate::service::RegistryService;

/// The registry service behind the table above. Every RPC of the trait
/// must be listed here, so a new RPC cannot be served without deciding what it needs.
pub struct AuthorizedRegistry {
    inner: RegistryService,
    auth: Arc<Authenticator>,
}

impl AuthorizedRegistry {
    pub fn new(inner: RegistryService, auth: Arc<Authenticator>) -> Self {
        AuthorizedRegistry { inner, auth }
    }

    async fn who<T>(&self, req: &Request<T>) -> Result<Principal, Status> {
        Ok(self.auth.authenticate(req.metadata()).await?)
    }
}

type Rpc<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl RegistryRpc for AuthorizedRegistry {
    async fn begin_push(&self, req: Request<pb::BeginPushRequest>) -> Rpc<pb::BeginPushResponse> {
        self.who(&req)
            .await?
            .require(Scope::Push, &req.get_ref().repository)?;
        self.inner.begin_push(req).await
    }

    async fn find_missing_chunks(
        &self,
        req: Request<pb::FindMissingChunksRequest>,
    ) -> Rpc<pb::FindMissingChunksResponse> {
        self.who(&req)
            .await?
            .require_some(Scope::Push, "FindMissingChunks (part of a push)")?;
        self.inner.find_missing_chunks(req).await
    }

    async fn put_chunks(
        &self,
        req: Request<Streaming<pb::PutChunkRequest>>,
    ) -> Rpc<pb::PutChunksResponse> {
        self.who(&req)
            .await?
            .require_some(Scope::Push, "PutChunks (part of a push)")?;
        self.inner.put_chunks(req).await
    }

    type GetChunksStream = <RegistryService as RegistryRpc>::GetChunksStream;

    async fn get_chunks(&self, req: Request<pb::GetChunksRequest>) -> Rpc<Self::GetChunksStream> {
        self.who(&req)
            .await?
            .require_some(Scope::Pull, "GetChunks (part of a pull)")?;
        self.inner.get_chunks(req).await
    }

    async fn get_chunk_urls(
        &self,
        req: Request<pb::GetChunkUrlsRequest>,
    ) -> Rpc<pb::GetChunkUrlsResponse> {
        self.who(&req)
            .await?
            .require_some(Scope::Pull, "GetChunkUrls (part of a pull)")?;
        self.inner.get_chunk_urls(req).await
    }

    async fn put_manifest(
        &self,
        req: Request<pb::PutManifestRequest>,
    ) -> Rpc<pb::PutManifestResponse> {
        self.who(&req)
            .await?
            .require(Scope::Push, &req.get_ref().repository)?;
        self.inner.put_manifest(req).await
    }

    async fn get_manifest(
        &self,
        req: Request<pb::GetManifestRequest>,
    ) -> Rpc<pb::GetManifestResponse> {
        self.who(&req)
            .await?
            .require(Scope::Pull, &req.get_ref().repository)?;
        self.inner.get_manifest(req).await
    }

    async fn list_repositories(
        &self,
        req: Request<pb::ListRepositoriesRequest>,
    ) -> Rpc<pb::ListRepositoriesResponse> {
        let who = self.who(&req).await?;
        who.require_some(Scope::Pull, "listing repositories")?;
        let mut resp = self.inner.list_repositories(req).await?;
        resp.get_mut()
            .repositories
            .retain(|r| who.allows(Scope::Pull, r));
        Ok(resp)
    }

    async fn list_tags(&self, req: Request<pb::ListTagsRequest>) -> Rpc<pb::ListTagsResponse> {
        self.who(&req)
            .await?
            .require(Scope::Pull, &req.get_ref().repository)?;
        self.inner.list_tags(req).await
    }

    async fn set_tag(&self, req: Request<pb::SetTagRequest>) -> Rpc<pb::SetTagResponse> {
        self.who(&req)
            .await?
            .require(Scope::Push, &req.get_ref().repository)?;
        self.inner.set_tag(req).await
    }

    async fn delete_tag(&self, req: Request<pb::DeleteTagRequest>) -> Rpc<pb::DeleteTagResponse> {
        self.who(&req)
            .await?
            .require(Scope::Push, &req.get_ref().repository)?;
        self.inner.delete_tag(req).await
    }

    async fn delete_manifest(
        &self,
        req: Request<pb::DeleteManifestRequest>,
    ) -> Rpc<pb::DeleteManifestResponse> {
        self.who(&req)
            .await?
            .require(Scope::Push, &req.get_ref().repository)?;
        self.inner.delete_manifest(req).await
    }

    async fn set_retention(
        &self,
        req: Request<pb::SetRetentionRequest>,
    ) -> Rpc<pb::SetRetentionResponse> {
        self.who(&req)
            .await?
            .require(Scope::Admin, &req.get_ref().repository)?;
        self.inner.set_retention(req).await
    }

    async fn get_retention(
        &self,
        req: Request<pb::GetRetentionRequest>,
    ) -> Rpc<pb::GetRetentionResponse> {
        self.who(&req)
            .await?
            .require(Scope::Pull, &req.get_ref().repository)?;
        self.inner.get_retention(req).await
    }

    async fn apply_retention(
        &self,
        req: Request<pb::ApplyRetentionRequest>,
    ) -> Rpc<pb::ApplyRetentionResponse> {
        let who = self.who(&req).await?;
        match req.get_ref().repository.as_str() {
            "" => who.require_all(Scope::Admin, "retention for every repository")?,
            repo => who.require(Scope::Admin, repo)?,
        }
        self.inner.apply_retention(req).await
    }

    async fn scrub(&self, req: Request<pb::ScrubRequest>) -> Rpc<pb::ScrubResponse> {
        self.who(&req)
            .await?
            .require_all(Scope::Admin, "scrubbing the store")?;
        self.inner.scrub(req).await
    }

    async fn collect_garbage(
        &self,
        req: Request<pb::CollectGarbageRequest>,
    ) -> Rpc<pb::CollectGarbageResponse> {
        self.who(&req)
            .await?
            .require_all(Scope::Admin, "garbage collection")?;
        self.inner.collect_garbage(req).await
    }

    async fn replicate_tag_record(
        &self,
        req: Request<pb::ReplicateTagRecordRequest>,
    ) -> Rpc<pb::ReplicateTagRecordResponse> {
        self.who(&req)
            .await?
            .require(Scope::Push, &req.get_ref().repository)?;
        self.inner.replicate_tag_record(req).await
    }

    async fn replication_status(
        &self,
        req: Request<pb::ReplicationStatusRequest>,
    ) -> Rpc<pb::ReplicationStatusResponse> {
        self.who(&req)
            .await?
            .require_all(Scope::Pull, "replication status")?;
        self.inner.replication_status(req).await
    }

    async fn report_restore(
        &self,
        req: Request<pb::ReportRestoreRequest>,
    ) -> Rpc<pb::ReportRestoreResponse> {
        self.who(&req)
            .await?
            .require(Scope::Pull, &req.get_ref().repository)?;
        self.inner.report_restore(req).await
    }

    async fn restore_outcomes(
        &self,
        req: Request<pb::RestoreOutcomesRequest>,
    ) -> Rpc<pb::RestoreOutcomesResponse> {
        self.who(&req)
            .await?
            .require(Scope::Pull, &req.get_ref().repository)?;
        self.inner.restore_outcomes(req).await
    }

    async fn resolve(&self, req: Request<pb::ResolveRequest>) -> Rpc<pb::ResolveResponse> {
        self.who(&req)
            .await?
            .require(Scope::Pull, &req.get_ref().repository)?;
        self.inner.resolve(req).await
    }

    type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchEvent, Status>> + Send>>;

    async fn watch(&self, req: Request<pb::WatchRequest>) -> Rpc<Self::WatchStream> {
        let who = self.who(&req).await?;
        who.require_some(Scope::Pull, "watching commits")?;
        let events = self.inner.watch(req).await?.into_inner();
        if who.sees_everything() {
            return Ok(Response::new(events));
        }
        let visible = events.filter(move |e| {
            let keep = match e {
                Ok(ev) => who.allows(Scope::Pull, &ev.repository),
                Err(_) => true,
            };
            std::future::ready(keep)
        });
        Ok(Response::new(Box::pin(visible)))
    }

    async fn register_node(
        &self,
        req: Request<pb::RegisterNodeRequest>,
    ) -> Rpc<pb::RegisterNodeResponse> {
        self.who(&req)
            .await?
            .require_some(Scope::Pull, "registering a node")?;
        self.inner.register_node(req).await
    }

    async fn list_nodes(&self, req: Request<pb::ListNodesRequest>) -> Rpc<pb::ListNodesResponse> {
        self.who(&req)
            .await?
            .require_all(Scope::Pull, "listing nodes")?;
        self.inner.list_nodes(req).await
    }

    async fn swarm(&self, req: Request<pb::SwarmRequest>) -> Rpc<pb::SwarmResponse> {
        self.who(&req)
            .await?
            .require(Scope::Pull, &req.get_ref().repository)?;
        self.inner.swarm(req).await
    }

    async fn who_am_i(&self, req: Request<pb::WhoAmIRequest>) -> Rpc<pb::WhoAmIResponse> {
        Ok(Response::new(match self.who(&req).await? {
            Principal::Anonymous(scope) => pb::WhoAmIResponse {
                scope: scope.to_string(),
                repository_pattern: "*".into(),
                ..Default::default()
            },
            Principal::Token(t) => pb::WhoAmIResponse {
                token_id: t.id,
                token_name: t.name,
                scope: t.scope.to_string(),
                repository_pattern: t.repository.to_string(),
            },
        }))
    }

    async fn stats(&self, req: Request<pb::StatsRequest>) -> Rpc<pb::StatsResponse> {
        self.who(&req)
            .await?
            .require_some(Scope::Pull, "registry stats")?;
        self.inner.stats(req).await
    }
}
