//! The global flags and what they build: credentials, registry connections, the node
//! cache and progress reports.

use std::path::PathBuf;
use std::sync::Arc;

use snapreg_client::cache::{self, ChunkCache};
use snapreg_client::host;
use snapreg_client::peer::PeerConfig;
use snapreg_client::progress::Progress;
use snapreg_client::remote::{Credentials, Remote};
use snapreg_client::ClientError;
use snapreg_proto::encryption::TenantKey;

use crate::exit;
use crate::progress_bar::Bar;

#[derive(clap::Args)]
pub struct Global {
    /// Registry URL, e.g. http://registry:5000. pull-restore takes several,
    /// comma-separated, nearest first: each chunk comes from the first that has it.
    #[arg(long, global = true, env = "SNAPCTL_REGISTRY")]
    pub registry: Option<String>,
    /// Print one JSON object on stdout's last line.
    #[arg(long, global = true)]
    pub json: bool,
    /// CRIU executable (default: SNAPCTL_CRIU, then /opt/snapreg-criu/bin/criu, then PATH).
    #[arg(long, global = true, env = "SNAPCTL_CRIU")]
    pub criu: Option<PathBuf>,
    /// Node chunk cache directory (default /var/cache/snapctl as root, else $XDG_CACHE_HOME/snapctl).
    #[arg(long, global = true, env = "SNAPCTL_CACHE")]
    pub cache: Option<PathBuf>,
    /// Node chunk cache size limit, e.g. 20G, 512M.
    #[arg(long, global = true, env = "SNAPCTL_CACHE_SIZE", default_value = "20G", value_parser = parse_size)]
    pub cache_size: u64,
    /// Fetch chunks through the registry even when it offers presigned object-store URLs.
    #[arg(long, global = true, env = "SNAPCTL_NO_DIRECT",
          value_parser = clap::builder::FalseyValueParser::new())]
    pub no_direct: bool,
    /// Connections to each registry for chunk downloads: the first carries what a
    /// restore waits on now (page faults, CRIU's next bytes), the others take the
    /// bulk in turn; with 1 all share it (more can help where one HTTP/2 connection is
    /// the limit: a fast registry, a long link).
    #[arg(long, global = true, env = "SNAPCTL_CHUNK_CONNECTIONS",
          default_value_t = snapreg_client::remote::DEFAULT_CHUNK_CONNECTIONS as u16,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    pub chunk_connections: u16,
    /// Access token for the registries (`snapreg token issue` prints one).
    #[arg(long, global = true, env = "SNAPCTL_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Read the token from this file's first line (used when --token is not given).
    #[arg(long, global = true, env = "SNAPCTL_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// CA certificate (PEM) to trust for https:// registries (default: the system's roots).
    #[arg(long, global = true, env = "SNAPCTL_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// Client certificate (PEM) for registries that require mutual TLS.
    #[arg(long, global = true, env = "SNAPCTL_CLIENT_CERT")]
    pub client_cert: Option<PathBuf>,
    /// The private key of --client-cert (PEM).
    #[arg(long, global = true, env = "SNAPCTL_CLIENT_KEY")]
    pub client_key: Option<PathBuf>,
    /// This node's name as its agent registers it (`snapctl agent --name`): pull,
    /// prefetch and pull-restore announce it to the registry's tracker so that
    /// sibling nodes fetch from this node's cache (default: the hostname).
    #[arg(long, global = true, env = "SNAPCTL_NODE")]
    pub node: Option<String>,
    /// Fetch chunks from the registries only, never from sibling nodes.
    #[arg(long, global = true, env = "SNAPCTL_NO_PEERS",
          value_parser = clap::builder::FalseyValueParser::new())]
    pub no_peers: bool,
    /// Tenant key file (`snapctl key new`): pushes and checkpoints encrypt every chunk
    /// with it; snapshots encrypted with it can be pulled and restored.
    #[arg(long, global = true, env = "SNAPCTL_KEY_FILE")]
    pub key_file: Option<PathBuf>,
    /// Log lines on stderr as text, or as one JSON object per line (filter: SNAPCTL_LOG).
    #[arg(
        long,
        global = true,
        env = "SNAPCTL_LOG_FORMAT",
        default_value = "text"
    )]
    pub log_format: snapreg_telemetry::log::LogFormat,
}

/// Sizes like 20G, 512M, 4096 (bytes).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("unknown size suffix in {s:?}: use K, M, G or T")),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    num.parse::<u64>()
        .map(|n| n * mult)
        .map_err(|_| format!("{s:?} is not a size like 20G"))
}

impl Global {
    /// A progress report on stderr for the operation `verb` (a bar only on a terminal
    /// and without `--json`; warnings always).
    pub fn progress(&self, verb: &str) -> Progress {
        Progress::new(verb, Arc::new(Bar::new(!self.json)))
    }

    pub fn open_cache(&self) -> anyhow::Result<ChunkCache> {
        let dir = self.cache.clone().unwrap_or_else(cache::default_dir);
        Ok(ChunkCache::open(&dir, self.cache_size)
            .map_err(|e| ClientError::io(format!("opening the node cache {}", dir.display()), e))?)
    }

    /// The registries named by --registry, nearest first.
    pub fn registry_urls(&self) -> anyhow::Result<Vec<&str>> {
        let list = self.registry.as_deref().ok_or(ClientError::NoRegistry)?;
        Ok(list
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .collect())
    }

    /// The token and TLS settings of the global flags.
    pub fn credentials(&self) -> anyhow::Result<Credentials> {
        Ok(Credentials::new(
            self.token.as_deref(),
            self.token_file.as_deref(),
            self.ca_cert.as_deref(),
            self.client_cert.as_deref(),
            self.client_key.as_deref(),
        )?)
    }

    /// How pull, prefetch and pull-restore take part in their snapshot's swarm
    /// (`None` with --no-peers).
    pub fn peers(&self) -> anyhow::Result<Option<PeerConfig>> {
        if self.no_peers {
            return Ok(None);
        }
        let node = self.node.clone().unwrap_or_else(host::hostname);
        let node = (!node.is_empty()).then_some(node);
        Ok(Some(PeerConfig::new(node, self.credentials()?)))
    }

    /// The tenant key of --key-file, if given.
    pub fn tenant_key(&self) -> anyhow::Result<Option<Arc<TenantKey>>> {
        let Some(path) = &self.key_file else {
            return Ok(None);
        };
        let key = TenantKey::load(path).map_err(ClientError::from)?;
        if let Ok(meta) = std::fs::metadata(path) {
            use std::os::unix::fs::PermissionsExt;
            if meta.permissions().mode() & 0o077 != 0 {
                eprintln!(
                    "snapctl: warning: tenant key file {} is readable by other users: chmod 600 it",
                    path.display()
                );
            }
        }
        Ok(Some(Arc::new(key)))
    }

    /// The first (nearest) registry: pushes, tags and listings go there.
    pub async fn connect(&self) -> anyhow::Result<Remote> {
        let urls = self.registry_urls()?;
        let url = urls.first().ok_or(ClientError::NoRegistry)?;
        Ok(Remote::connect_with(url, &self.credentials()?)
            .await?
            .with_chunk_connections(self.chunk_connections.into())
            .with_direct(!self.no_direct)
            .with_tenant_key(self.tenant_key()?))
    }

    /// Every reachable registry, nearest first; unreachable ones are skipped with a
    /// warning as long as one answers.
    pub async fn connect_all(&self) -> anyhow::Result<Vec<Remote>> {
        let mut out = Vec::new();
        let mut last = None;
        let creds = self.credentials()?;
        let key = self.tenant_key()?;
        for url in self.registry_urls()? {
            match Remote::connect_with(url, &creds).await {
                Ok(r) => out.push(
                    r.with_chunk_connections(self.chunk_connections.into())
                        .with_direct(!self.no_direct)
                        .with_tenant_key(key.clone()),
                ),
                Err(e) => {
                    eprintln!("snapctl: warning: skipping {url}: {e}{}", exit::advice(&e));
                    last = Some(e);
                }
            }
        }
        match (out.is_empty(), last) {
            (true, Some(e)) => Err(e.into()),
            (true, None) => Err(ClientError::NoRegistry.into()),
            _ => Ok(out),
        }
    }
}
