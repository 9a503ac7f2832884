//! Who may call what: bearer tokens with per-repository scopes, checked on every RPC.
//!
//! **Tokens.** `snapreg token issue --repo PATTERN --scope pull|push|admin [--ttl D]`
//! prints `snapreg_<id>_<secret>` once: `id` is 16 hex digits, `secret` 32 random bytes
//! in hex. The store keeps only `auth/tokens/<id>.json` (name, pattern, scope, times,
//! BLAKE3 of the secret); `snapreg token revoke ID` adds `auth/revoked/<id>`, never
//! rewriting the token object. Both live **in the object store**, not in RocksDB: every
//! registry serving one bucket accepts the same tokens and sees the same revocations,
//! and a lost index loses no tokens. Nothing under `auth/` is a chunk, manifest or tag
//! record, so GC and index rebuilds (which list only their own prefixes) never see it.
//!
//! **Cache.** A looked-up token (its record and revocation state) is kept in memory
//! for `--auth-cache-ttl` (default 5 s), so a busy restore costs no store read per
//! call; a revocation therefore takes effect within that time on every registry.
//! Expiry is checked on every call. Unknown ids are not cached (a token issued a
//! moment ago works at once).
//!
//! **Scopes** are ordered: `admin` ⊃ `push` ⊃ `pull`. A pattern is `*` (every
//! repository), `prefix/*` (every repository under `prefix/`) or an exact repository.
//! What each RPC needs is access.rs's table.
//!
//! **Anonymous** callers (no `authorization` metadata) get the scope given by
//! `snapreg serve --anonymous pull|push|admin` on `*`, and nothing by default. A call
//! that carries a token is judged by the token alone, so a bad token fails loudly even
//! where anonymous access would have been enough.
//!
//! Refusals: no usable credentials (no token, malformed, unknown, revoked, expired) is
//! `UNAUTHENTICATED`; a valid token without the scope is `PERMISSION_DENIED`. Every
//! message names the token (id and name, never the secret) and says what to do.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use serde::{Deserialize, Serialize};
use tonic::metadata::MetadataMap;

use crate::error::{RegistryError, Result};

const TOKENS: &str = "auth/tokens";
const REVOKED: &str = "auth/revoked";
const TOKEN_PREFIX: &str = "snapreg_";

/// What a token (or anonymous access) allows, weakest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Pull,
    Push,
    Admin,
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Scope::Pull => "pull",
            Scope::Push => "push",
            Scope::Admin => "admin",
        })
    }
}

impl std::str::FromStr for Scope {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "pull" => Ok(Scope::Pull),
            "push" => Ok(Scope::Push),
            "admin" => Ok(Scope::Admin),
            _ => Err(format!("scope {s:?}: use pull, push or admin")),
        }
    }
}

/// `--anonymous none|pull|push|admin`.
pub fn parse_anonymous(s: &str) -> std::result::Result<Option<Scope>, String> {
    match s {
        "none" => Ok(None),
        other => other
            .parse()
            .map(Some)
            .map_err(|_| format!("--anonymous {s:?}: use none, pull, push or admin")),
    }
}

/// `*`, `prefix/*` or an exact repository name. An exact name also covers the
/// repository's OCI content by digest (`NAME/by-digest`, oci/src/store.rs), which
/// the OCI listener reads and writes on that repository's behalf.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RepoPattern(String);

impl RepoPattern {
    pub fn matches(&self, repository: &str) -> bool {
        match self.0.strip_suffix('*') {
            Some(prefix) => repository.starts_with(prefix),
            None => {
                self.0 == repository
                    || repository
                        .strip_suffix(snapreg_proto::reference::OCI_DIGEST_REPOSITORY)
                        .and_then(|r| r.strip_suffix('/'))
                        == Some(self.0.as_str())
            }
        }
    }

    pub fn is_everything(&self) -> bool {
        self.0 == "*"
    }
}

impl std::fmt::Display for RepoPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for RepoPattern {
    type Error = String;
    fn try_from(s: String) -> std::result::Result<Self, String> {
        let ok = match s.strip_suffix('*') {
            Some("") => true,
            Some(prefix) => prefix.ends_with('/') && !prefix[..prefix.len() - 1].contains('*'),
            None => !s.contains('*') && snapreg_proto::reference::validate_repository(&s).is_ok(),
        };
        if ok {
            Ok(RepoPattern(s))
        } else {
            Err(format!(
                "repository pattern {s:?}: use `*`, `team/*` or an exact repository name"
            ))
        }
    }
}

impl From<RepoPattern> for String {
    fn from(p: RepoPattern) -> String {
        p.0
    }
}

impl std::str::FromStr for RepoPattern {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        RepoPattern::try_from(s.to_string())
    }
}

/// A token as stored: everything but the secret, whose BLAKE3 stands in for it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub id: String,
    pub name: String,
    pub repository: RepoPattern,
    pub scope: Scope,
    pub created_unix: u64,
    /// `None`: never expires.
    pub expires_unix: Option<u64>,
    secret_blake3: String,
}

/// A token with its revocation state, as `snapreg token ls` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct TokenStatus {
    #[serde(flatten)]
    pub record: TokenRecord,
    pub revoked_unix: Option<u64>,
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

fn unix_shown(t: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(t)).to_string()
}

/// Splits `snapreg_<id>_<secret>`.
fn parse_token(token: &str) -> Option<(&str, &str)> {
    let (id, secret) = token.strip_prefix(TOKEN_PREFIX)?.split_once('_')?;
    let hex = |s: &str, len| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
    (hex(id, 16) && hex(secret, 64)).then_some((id, secret))
}

/// Tokens and revocations in the object store.
#[derive(Clone, Debug)]
pub struct TokenStore {
    store: Arc<dyn ObjectStore>,
}

impl TokenStore {
    pub fn new(store: Arc<dyn ObjectStore>) -> Self {
        TokenStore { store }
    }

    /// Creates a token; returns its record and the token text (shown once, never stored).
    pub async fn issue(
        &self,
        repository: RepoPattern,
        scope: Scope,
        ttl: Option<Duration>,
        name: Option<String>,
    ) -> Result<(TokenRecord, String)> {
        let id = format!("{:016x}", rand::random::<u64>());
        let secret = hex::encode(rand::random::<[u8; 32]>());
        let now = now_unix();
        let record = TokenRecord {
            name: name.unwrap_or_else(|| format!("{scope}-{id}")),
            repository,
            scope,
            created_unix: now,
            expires_unix: ttl.map(|t| now + t.as_secs().max(1)),
            secret_blake3: blake3::hash(secret.as_bytes()).to_hex().to_string(),
            id: id.clone(),
        };
        let body = serde_json::to_vec_pretty(&record).expect("token record serializes");
        self.store
            .put(&Path::from(format!("{TOKENS}/{id}.json")), body.into())
            .await?;
        Ok((record, format!("{TOKEN_PREFIX}{id}_{secret}")))
    }

    /// Marks a token revoked (a new object; the token's own object stays as it was).
    pub async fn revoke(&self, id: &str) -> Result<TokenRecord> {
        let Some(status) = self.lookup(id).await? else {
            return Err(RegistryError::invalid(
                "ID",
                format!("no token {id:?} in this registry's store; `snapreg token ls` lists them"),
            ));
        };
        let body = serde_json::json!({ "id": id, "revoked_unix": now_unix() });
        self.store
            .put(
                &Path::from(format!("{REVOKED}/{id}")),
                serde_json::to_vec(&body).expect("json").into(),
            )
            .await?;
        Ok(status.record)
    }

    /// Every token, oldest first.
    pub async fn list(&self) -> Result<Vec<TokenStatus>> {
        let metas: Vec<_> = self
            .store
            .list(Some(&Path::from(TOKENS)))
            .try_collect()
            .await?;
        let mut out = Vec::new();
        for m in metas {
            let Some(id) = m.location.filename().and_then(|f| f.strip_suffix(".json")) else {
                continue;
            };
            if let Some(s) = self.lookup(id).await? {
                out.push(s);
            }
        }
        out.sort_by(|a, b| {
            (a.record.created_unix, &a.record.id).cmp(&(b.record.created_unix, &b.record.id))
        });
        Ok(out)
    }

    async fn get(&self, path: String) -> Result<Option<bytes::Bytes>> {
        match self.store.get(&Path::from(path)).await {
            Ok(got) => Ok(Some(got.bytes().await?)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn lookup(&self, id: &str) -> Result<Option<TokenStatus>> {
        if !(id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit())) {
            return Ok(None);
        }
        let Some(body) = self.get(format!("{TOKENS}/{id}.json")).await? else {
            return Ok(None);
        };
        let record: TokenRecord = serde_json::from_slice(&body).map_err(|e| {
            RegistryError::invalid("token", format!("{TOKENS}/{id}.json does not parse: {e}"))
        })?;
        // A revocation object that does not parse still revokes.
        let revoked_unix = self.get(format!("{REVOKED}/{id}")).await?.map(|b| {
            serde_json::from_slice::<serde_json::Value>(&b)
                .ok()
                .and_then(|v| v["revoked_unix"].as_u64())
                .unwrap_or(0)
        });
        Ok(Some(TokenStatus {
            record,
            revoked_unix,
        }))
    }
}

/// Who is calling: anonymous (with the configured scope on every repository) or a token.
#[derive(Clone, Debug)]
pub enum Principal {
    Anonymous(Scope),
    Token(TokenRecord),
}

/// The hint every "no credentials" refusal ends with.
fn issue_hint(scope: Scope, repository: &str) -> String {
    format!(
        "issue a token on the registry host with `snapreg token issue --repo {repository} --scope {scope}` \
         and pass it with --token, --token-file or SNAPCTL_TOKEN"
    )
}

impl Principal {
    fn scope_and_pattern(&self) -> (Scope, Option<&RepoPattern>) {
        match self {
            Principal::Anonymous(s) => (*s, None),
            Principal::Token(t) => (t.scope, Some(&t.repository)),
        }
    }

    pub fn allows(&self, scope: Scope, repository: &str) -> bool {
        let (have, pattern) = self.scope_and_pattern();
        have >= scope && pattern.is_none_or(|p| p.matches(repository))
    }

    fn refuse(&self, scope: Scope, what: &str, repo_hint: &str) -> RegistryError {
        match self {
            Principal::Anonymous(have) => RegistryError::Unauthenticated(format!(
                "{what} needs {scope} access; anonymous callers get only {have} here: {}",
                issue_hint(scope, repo_hint)
            )),
            Principal::Token(t) => RegistryError::PermissionDenied(format!(
                "token {} ({}) grants {} on {:?}; {what} needs {scope}: use a token issued with \
                 `snapreg token issue --repo {repo_hint} --scope {scope}`",
                t.id, t.name, t.scope, t.repository.0
            )),
        }
    }

    /// `scope` on this repository.
    pub fn require(&self, scope: Scope, repository: &str) -> Result<()> {
        if self.allows(scope, repository) {
            return Ok(());
        }
        Err(self.refuse(
            scope,
            &format!("{scope} on repository {repository:?}"),
            repository,
        ))
    }

    /// `scope` on at least one repository (chunk RPCs, filtered listings).
    pub fn require_some(&self, scope: Scope, what: &str) -> Result<()> {
        if self.scope_and_pattern().0 >= scope {
            return Ok(());
        }
        Err(self.refuse(scope, what, "REPO"))
    }

    /// `scope` on every repository (`*`): registry-wide operations.
    pub fn require_all(&self, scope: Scope, what: &str) -> Result<()> {
        let (have, pattern) = self.scope_and_pattern();
        if have >= scope && pattern.is_none_or(RepoPattern::is_everything) {
            return Ok(());
        }
        Err(self.refuse(
            scope,
            &format!("{what} (registry-wide, pattern `*`)"),
            "'*'",
        ))
    }

    pub fn sees_everything(&self) -> bool {
        self.require_all(Scope::Pull, "").is_ok()
    }
}

struct Cached {
    fetched: Instant,
    status: TokenStatus,
}

/// Turns a request's metadata into a [`Principal`], or a refusal.
pub struct Authenticator {
    tokens: TokenStore,
    anonymous: Option<Scope>,
    cache_ttl: Duration,
    cache: Mutex<HashMap<String, Cached>>,
    /// The BLAKE3 of [`Authenticator::in_process_token`].
    in_process: blake3::Hash,
    in_process_token: String,
}

impl Authenticator {
    pub fn new(tokens: TokenStore, anonymous: Option<Scope>, cache_ttl: Duration) -> Self {
        let in_process_token = format!("snapreg-in-process_{:032x}", rand::random::<u128>());
        Authenticator {
            tokens,
            anonymous,
            cache_ttl,
            cache: Mutex::new(HashMap::new()),
            in_process: blake3::hash(in_process_token.as_bytes()),
            in_process_token,
        }
    }

    /// A token that exists only in this process, random per start, with push scope on
    /// every repository: what the OCI listener records a snapshot's OCI view with,
    /// after the caller's own token has read the snapshot (oci/src/view.rs). It never
    /// leaves the process: it travels only over the in-process link (server.rs).
    pub fn in_process_token(&self) -> &str {
        &self.in_process_token
    }

    fn in_process_principal() -> Principal {
        Principal::Token(TokenRecord {
            id: "in-process".into(),
            name: "the registry's own OCI listener".into(),
            repository: RepoPattern("*".into()),
            scope: Scope::Push,
            created_unix: 0,
            expires_unix: None,
            secret_blake3: String::new(),
        })
    }

    async fn status(&self, id: &str) -> Result<Option<TokenStatus>> {
        if let Some(c) = self.cache.lock().unwrap().get(id) {
            if c.fetched.elapsed() < self.cache_ttl {
                return Ok(Some(c.status.clone()));
            }
        }
        let status = self.tokens.lookup(id).await?;
        if let Some(s) = &status {
            self.cache.lock().unwrap().insert(
                id.to_string(),
                Cached {
                    fetched: Instant::now(),
                    status: s.clone(),
                },
            );
        }
        Ok(status)
    }

    pub async fn authenticate(&self, md: &MetadataMap) -> Result<Principal> {
        let Some(value) = md.get(snapreg_proto::credentials::AUTHORIZATION) else {
            return match self.anonymous {
                Some(scope) => Ok(Principal::Anonymous(scope)),
                None => Err(RegistryError::Unauthenticated(format!(
                    "this registry requires a token: {}",
                    issue_hint(Scope::Pull, "REPO")
                ))),
            };
        };
        let token = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(|| {
                RegistryError::Unauthenticated(
                    "the authorization metadata must be `Bearer <token>`".into(),
                )
            })?;
        let unknown = || {
            RegistryError::Unauthenticated(format!(
                "the token is not valid on this registry (check that it was issued for this \
                 registry's store and copied whole); {}",
                issue_hint(Scope::Pull, "REPO")
            ))
        };
        // blake3::Hash compares in constant time.
        if blake3::hash(token.as_bytes()) == self.in_process {
            return Ok(Self::in_process_principal());
        }
        let (id, secret) = parse_token(token).ok_or_else(unknown)?;
        let status = self.status(id).await?.ok_or_else(unknown)?;
        let expected =
            blake3::Hash::from_hex(&status.record.secret_blake3).map_err(|_| unknown())?;
        // blake3::Hash compares in constant time.
        if blake3::hash(secret.as_bytes()) != expected {
            return Err(unknown());
        }
        let r = &status.record;
        if let Some(at) = status.revoked_unix {
            return Err(RegistryError::Unauthenticated(format!(
                "token {} ({}) was revoked at {}; ask an admin for a new one (`snapreg token issue`)",
                r.id,
                r.name,
                unix_shown(at)
            )));
        }
        if let Some(exp) = r.expires_unix.filter(|&e| e <= now_unix()) {
            return Err(RegistryError::Unauthenticated(format!(
                "token {} ({}) expired at {}; issue a new one with `snapreg token issue --repo {} --scope {} --ttl ...`",
                r.id,
                r.name,
                unix_shown(exp),
                r.repository,
                r.scope
            )));
        }
        Ok(Principal::Token(status.record))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;

    fn pattern(s: &str) -> RepoPattern {
        s.parse().unwrap()
    }

    fn md(token: Option<&str>) -> MetadataMap {
        let mut m = MetadataMap::new();
        if let Some(t) = token {
            m.insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        m
    }

    fn setup(anonymous: Option<Scope>) -> (TokenStore, Authenticator) {
        let tokens = TokenStore::new(Arc::new(InMemory::new()));
        let auth = Authenticator::new(tokens.clone(), anonymous, Duration::ZERO);
        (tokens, auth)
    }

    #[test]
    fn patterns_match_what_they_say() {
        assert!(pattern("*").matches("anything/at-all"));
        assert!(pattern("team/*").matches("team/app"));
        assert!(pattern("team/*").matches("team/sub/app"));
        assert!(!pattern("team/*").matches("teammate/app"));
        assert!(!pattern("team/*").matches("team"));
        assert!(pattern("team/app").matches("team/app"));
        assert!(!pattern("team/app").matches("team/app2"));
        assert!(pattern("team/app").matches("team/app/by-digest"));
        assert!(!pattern("team/app").matches("team/app/other"));
        assert!(!pattern("team/app").matches("team/appby-digest"));
        for bad in ["", "team*", "t*/x", "team/*/*", "a b"] {
            assert!(bad.parse::<RepoPattern>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn scopes_nest() {
        let t = |scope, p: &str| {
            Principal::Token(TokenRecord {
                id: "0".repeat(16),
                name: "t".into(),
                repository: pattern(p),
                scope,
                created_unix: 0,
                expires_unix: None,
                secret_blake3: String::new(),
            })
        };
        assert!(t(Scope::Admin, "a/*").allows(Scope::Pull, "a/x"));
        assert!(t(Scope::Push, "a/*").allows(Scope::Pull, "a/x"));
        assert!(!t(Scope::Pull, "a/*").allows(Scope::Push, "a/x"));
        assert!(!t(Scope::Admin, "a/*").allows(Scope::Pull, "b/x"));
        let e = t(Scope::Pull, "a/*")
            .require(Scope::Push, "a/x")
            .unwrap_err();
        assert!(matches!(e, RegistryError::PermissionDenied(_)), "{e}");
        assert!(e.to_string().contains("--scope push"), "{e}");
        // Registry-wide operations need `*`, not just the scope.
        assert!(t(Scope::Admin, "a/*")
            .require_all(Scope::Admin, "gc")
            .is_err());
        assert!(t(Scope::Admin, "*").require_all(Scope::Admin, "gc").is_ok());
        let e = Principal::Anonymous(Scope::Pull)
            .require(Scope::Push, "a/x")
            .unwrap_err();
        assert!(matches!(e, RegistryError::Unauthenticated(_)), "{e}");
        assert!(e.to_string().contains("SNAPCTL_TOKEN"), "{e}");
    }

    #[tokio::test]
    async fn issued_tokens_authenticate_and_revoked_or_expired_ones_do_not() {
        let (tokens, auth) = setup(None);
        let (rec, token) = tokens
            .issue(pattern("team/*"), Scope::Push, None, Some("ci".into()))
            .await
            .unwrap();
        assert!(token.starts_with("snapreg_") && token.contains(&rec.id));
        let p = auth.authenticate(&md(Some(&token))).await.unwrap();
        assert!(p.allows(Scope::Push, "team/app"));

        // The secret is checked, not just the id.
        let forged = format!("snapreg_{}_{}", rec.id, "0".repeat(64));
        let e = auth.authenticate(&md(Some(&forged))).await.unwrap_err();
        assert!(matches!(e, RegistryError::Unauthenticated(_)), "{e}");
        let e = auth.authenticate(&md(Some("garbage"))).await.unwrap_err();
        assert!(e.to_string().contains("not valid"), "{e}");

        tokens.revoke(&rec.id).await.unwrap();
        let e = auth.authenticate(&md(Some(&token))).await.unwrap_err();
        assert!(matches!(e, RegistryError::Unauthenticated(_)), "{e}");
        assert!(e.to_string().contains("revoked"), "{e}");
        let listed = tokens.list().await.unwrap();
        assert_eq!(listed.len(), 1);
        assert!(listed[0].revoked_unix.is_some());
        // The store never holds the secret.
        let shown = serde_json::to_string(&listed[0]).unwrap();
        assert!(!shown.contains(token.rsplit('_').next().unwrap()));

        let (_, short) = tokens
            .issue(
                pattern("*"),
                Scope::Pull,
                Some(Duration::from_secs(1)),
                None,
            )
            .await
            .unwrap();
        auth.authenticate(&md(Some(&short))).await.unwrap();
        tokio::time::sleep(Duration::from_millis(2100)).await;
        let e = auth.authenticate(&md(Some(&short))).await.unwrap_err();
        assert!(e.to_string().contains("expired"), "{e}");

        let e = tokens.revoke("0123456789abcdef").await.unwrap_err();
        assert!(e.to_string().contains("snapreg token ls"), "{e}");
    }

    #[tokio::test]
    async fn anonymous_access_only_when_configured() {
        let (_, closed) = setup(None);
        let e = closed.authenticate(&md(None)).await.unwrap_err();
        assert!(matches!(e, RegistryError::Unauthenticated(_)), "{e}");
        assert!(
            e.to_string().contains("snapreg token issue"),
            "{}",
            e.to_string()
        );
        let (_, open) = setup(Some(Scope::Pull));
        let p = open.authenticate(&md(None)).await.unwrap();
        assert!(p.allows(Scope::Pull, "any/repo") && !p.allows(Scope::Push, "any/repo"));
        // A bad token is refused even where anonymous access would do.
        assert!(open.authenticate(&md(Some("snapreg_x_y"))).await.is_err());
    }
}
