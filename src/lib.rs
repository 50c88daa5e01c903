//! regproxy: a caching, intercepting HTTPS proxy for container registries.
//!
//! [`run`] is the whole server: tests call it with their own listener and config, and `main.rs`
//! calls it through [`cli`].

pub(crate) mod access;
pub(crate) mod admin;
pub(crate) mod body;
pub mod ca;
pub(crate) mod cache;
pub mod cli;
mod cli_cache;
pub mod config;
pub mod credentials;
pub(crate) mod dockerhub;
pub(crate) mod exchange;
pub(crate) mod fleet;
pub(crate) mod hints;
pub(crate) mod listener;
pub(crate) mod log_writer;
pub(crate) mod manifest;
pub(crate) mod metrics;
pub(crate) mod prefetch;
pub(crate) mod proxy;
pub(crate) mod ratelimit;
pub(crate) mod registry;
pub mod secret;
pub(crate) mod status;
pub(crate) mod trust;
pub(crate) mod upstream;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use cache::StoreError;
pub use config::Config;
pub use upstream::UpstreamError;

/// Why the server could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The CA could not be loaded or created.
    #[error(transparent)]
    Ca(#[from] ca::CaError),
    /// The upstream client could not be built.
    #[error(transparent)]
    Upstream(#[from] upstream::UpstreamError),
    /// The cache directory is unusable.
    #[error(transparent)]
    Cache(#[from] cache::StoreError),
    /// The configuration is refused (e.g. an open listener that names no clients).
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// Upstream credentials could not be loaded.
    #[error(transparent)]
    Credentials(#[from] credentials::CredentialsError),
    /// The shared tier could not be set up.
    #[error(transparent)]
    Shared(#[from] cache::shared::SharedError),
    /// The fleet could not be set up.
    #[error(transparent)]
    Fleet(#[from] fleet::FleetError),
    /// A socket operation failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// State shared by every connection.
pub(crate) struct Shared {
    /// The effective configuration.
    pub config: Config,
    /// Issues leaf certificates for intercepted hosts.
    pub ca: ca::CertAuthority,
    /// Who may use the proxy.
    pub gate: proxy::gate::Gate,
    /// What the upstreams said about clients and repositories (who may read what).
    pub access: access::Access,
    /// Counters and gauges for `/metrics`.
    pub metrics: Arc<metrics::Metrics>,
    /// Blobs, manifests and tags on disk, and the downloads in flight.
    pub cache: cache::Cache,
    /// The upstream client: credentials, tokens, redirects, pooled connections.
    pub client: upstream::Client,
    /// The other members of the fleet, when there is one.
    pub fleet: Option<Arc<fleet::Fleet>>,
    /// Resolve overrides and the self-connection guard.
    pub resolver: Arc<upstream::Resolver>,
    /// Cancelled when shutdown starts.
    pub shutdown: CancellationToken,
    /// Every connection and transfer task, so that shutdown can wait for them.
    pub tasks: TaskTracker,
}

impl AsRef<upstream::Client> for Shared {
    fn as_ref(&self) -> &upstream::Client {
        &self.client
    }
}

impl Shared {
    /// Defaults, with the CA and the cache in `dir` (for unit tests).
    #[cfg(test)]
    pub(crate) fn in_dir(dir: &std::path::Path) -> Arc<Shared> {
        let config = Config {
            ca_dir: dir.join("ca"),
            cache_dir: dir.join("cache"),
            ..Default::default()
        };
        Shared::new(config, "127.0.0.1:1".parse().expect("an address")).expect("shared state")
    }

    /// Loads the CA, opens the cache and builds the upstream client; `own` is the proxy's
    /// listen address, which upstream connections refuse to reach.
    pub fn new(config: Config, own: std::net::SocketAddr) -> Result<Arc<Shared>, Error> {
        let metrics = Arc::new(metrics::Metrics::default());
        let (gate, client, resolver) = front(&config, own, metrics.clone())?;
        let ca = ca::CertAuthority::load_or_create(&config.ca_dir)?;
        let mut cache = cache::Cache::open(&config.cache_dir, metrics.clone())?;
        cache.shared = cache::SharedTier::start(config.shared_store_settings(), metrics.clone())?;
        let fleet = fleet::Fleet::from_config(&config)?;
        Ok(Arc::new(Shared {
            config,
            gate,
            access: access::Access::default(),
            ca,
            metrics,
            cache,
            client,
            fleet,
            resolver,
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
        }))
    }
}

/// What serving needs before the CA and the cache: the exposure check, the gate (the proxy
/// credentials file) and the upstream client (credentials, `--upstream-ca` files).
fn front(
    config: &Config,
    own: std::net::SocketAddr,
    metrics: Arc<metrics::Metrics>,
) -> Result<(proxy::gate::Gate, upstream::Client, Arc<upstream::Resolver>), Error> {
    config.check_exposure()?;
    config.check_fleet()?;
    let gate = proxy::gate::Gate::new(config)?;
    let (client, resolver) = upstream_client(config, own, metrics)?;
    Ok((gate, client, resolver))
}

/// Refuses whatever [`run`] would refuse at start, with the same errors, creating nothing: no
/// CA (an existing one must load), no cache, no listener. What `regproxy config check` runs.
pub fn check(config: &Config) -> Result<(), Error> {
    front(config, config.listen, Arc::default())?;
    ca::CertAuthority::existing(&config.ca_dir)?;
    mirror_acceptor(config)?;
    if let Some(store) = config.shared_store_settings() {
        cache::shared::operator(&store)?;
    }
    fleet::Fleet::from_config(config)?;
    Ok(())
}

/// The TLS acceptor of the mirror listener, when it has a certificate.
fn mirror_acceptor(config: &Config) -> Result<Option<tokio_rustls::TlsAcceptor>, Error> {
    match &config.mirror_tls {
        Some((cert, key)) => Ok(Some(ca::acceptor_from_files(cert, key)?)),
        None => Ok(None),
    }
}

/// The upstream client for `config` and its resolver, which refuses `own` (the proxy's listen
/// address). It needs no CA and no cache: what `regproxy ratelimit` uses alone.
pub(crate) fn upstream_client(
    config: &Config,
    own: std::net::SocketAddr,
    metrics: Arc<metrics::Metrics>,
) -> Result<(upstream::Client, Arc<upstream::Resolver>), Error> {
    let credentials =
        credentials::Credentials::load(&config.registries, config.docker_config.as_deref())?;
    let resolver = Arc::new(
        upstream::Resolver::new(&config.resolve, own)
            .with_destinations(&config.allow_destination, &config.deny_destination),
    );
    let http = upstream::Upstream::new(config, resolver.clone(), metrics)?;
    let client = upstream::Client::new(http, Arc::new(credentials), config.allow_port.clone());
    Ok((client, resolver))
}

/// The rustls crypto provider used on both sides.
pub(crate) fn tls_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Serves the proxy on `listener` until `shutdown` resolves, then drains in-flight transfers for
/// at most `config.shutdown_grace`.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let admin = listener::bind(config.admin_listen).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("admin_listen {}: {e}", config.admin_listen),
        )
    })?;
    serve(listener, admin, config, shutdown).await
}

/// [`run`] with the admin listener bound already (tests bind both to port 0, so that no other
/// process can take the port between choosing and binding it).
pub async fn serve(
    listener: TcpListener,
    admin: TcpListener,
    mut config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    config.admin_listen = admin.local_addr()?;
    if let Some(fit) = listener::connections_that_fit() {
        if config.max_connections > fit {
            tracing::warn!(
                max_connections = config.max_connections,
                fit,
                "the descriptor limit allows fewer connections than max_connections; using {fit}"
            );
            config.max_connections = fit;
        }
    }
    let own = listener.local_addr()?;
    let shared = Shared::new(config, own)?;
    hints::at_start(&shared, own);
    tokio::spawn(admin::serve(admin, shared.clone()));
    if let Some(addr) = shared.config.mirror_listen {
        let mirror = listener::bind(addr)
            .map_err(|e| std::io::Error::new(e.kind(), format!("mirror_listen {addr}: {e}")))?;
        let tls = mirror_acceptor(&shared.config)?;
        tokio::spawn(proxy::serve_mirror(mirror, tls, shared.clone()));
    }
    tokio::spawn(
        shared
            .client
            .credentials()
            .clone()
            .keep_fresh(shared.shutdown.clone()),
    );
    if let (Some(fleet), Some((host, port))) = (&shared.fleet, &shared.config.peers_dns) {
        let resolve = fleet
            .clone()
            .keep_resolved(host.clone(), *port, shared.shutdown.clone());
        tokio::spawn(resolve);
    }
    tokio::spawn(cache::evict::keep_within(
        shared.cache.store.clone(),
        shared.config.cache_bounds(),
        shared.shutdown.clone(),
    ));
    proxy::serve(listener, shared, shutdown).await;
    Ok(())
}
