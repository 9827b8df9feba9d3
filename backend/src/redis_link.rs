//! Connections to the Redis deployment users run: one server, a Sentinel-managed master, or a
//! Cluster; each over TCP or TLS, with ACL user and password. Everything here is the redis
//! crate's own support ([`redis::sentinel`], [`redis::cluster`], `rediss://`); this module
//! only chooses between them and keeps a Sentinel connection on the current master.
//!
//! - **Command connection** ([`Conn`]): a `ConnectionManager` (reconnects by itself), a
//!   cluster connection (follows slot moves and failovers by itself), or, for Sentinel, a
//!   `ConnectionManager` on the master the sentinels name, replaced when a command fails in a
//!   way that means "this is not the master any more" (connection refused or reset, timeout,
//!   `READONLY`).
//! - **Pub/sub connection** ([`Link::pubsub`]): classic pub/sub, which a Cluster broadcasts to
//!   every node, so one subscription on any node hears every channel. Each reconnect takes the
//!   next node, so a dead node is skipped.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use redis::{
    Client, Cmd, ConnectionAddr, ErrorKind, IntoConnectionInfo, RedisError, RedisFuture,
    RedisResult, TlsCertificates, Value,
    aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig},
    cluster::ClusterClient,
    cluster_async::ClusterConnection,
    sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType},
};

use crate::config::{RedisConfig, RedisTopology};

/// Shortest time between two lookups of the Sentinel master.
const SENTINEL_REFRESH_EVERY: Duration = Duration::from_millis(300);

/// How to reach the configured deployment.
pub struct Link {
    kind: Kind,
    timeout: Duration,
    /// Pub/sub connections made so far: picks the next node on each reconnect.
    pubsub_attempts: AtomicUsize,
}

enum Kind {
    Single(Client),
    Sentinel(tokio::sync::Mutex<SentinelClient>),
    Cluster {
        client: ClusterClient,
        /// One plain client per seed node, for pub/sub.
        nodes: Vec<Client>,
    },
}

fn invalid(reason: String) -> RedisError {
    RedisError::from((
        ErrorKind::InvalidClientConfig,
        "redis configuration",
        reason,
    ))
}

/// The TLS files of `config`, read now so a missing file is a startup error.
fn certificates(config: &RedisConfig) -> RedisResult<Option<TlsCertificates>> {
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|e| invalid(format!("cannot read {}: {e}", path.display())))
    };
    let root_cert = config.ca_file.as_deref().map(read).transpose()?;
    let client_tls = match (&config.cert_file, &config.key_file) {
        (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
            client_cert: read(cert)?,
            client_key: read(key)?,
        }),
        _ => None,
    };
    Ok(
        (root_cert.is_some() || client_tls.is_some()).then_some(TlsCertificates {
            client_tls,
            root_cert,
        }),
    )
}

/// A client for one node URL, with the configured certificates and credentials.
fn node_client(
    url: &str,
    config: &RedisConfig,
    certs: Option<&TlsCertificates>,
) -> RedisResult<Client> {
    let mut info = url.into_connection_info()?;
    let mut redis = info.redis_settings().clone();
    if let Some(user) = &config.username {
        redis = redis.set_username(user);
    }
    if let Some(password) = &config.password {
        redis = redis.set_password(password.expose_str());
    }
    info = info.set_redis_settings(redis);
    match certs {
        Some(certs) => Client::build_with_tls(info, certs.clone()),
        None => Client::open(info),
    }
}

/// `host:port` of a sentinel, over TLS when `tls`.
fn sentinel_addr(address: &str, tls: bool) -> RedisResult<ConnectionAddr> {
    let (host, port) = address
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h.trim_matches(['[', ']']), p.parse::<u16>().ok()?)))
        .ok_or_else(|| invalid(format!("sentinel address {address:?} is not host:port")))?;
    Ok(if tls {
        ConnectionAddr::TcpTls {
            host: host.to_owned(),
            port,
            insecure: false,
            tls_params: None,
        }
    } else {
        ConnectionAddr::Tcp(host.to_owned(), port)
    })
}

impl Link {
    /// Checks `config` and prepares clients; nothing connects yet.
    pub fn new(config: &RedisConfig, timeout: Duration) -> RedisResult<Self> {
        let certs = certificates(config)?;
        let kind = match &config.topology {
            RedisTopology::Single(url) => Kind::Single(node_client(url, config, certs.as_ref())?),
            RedisTopology::Sentinel { master, sentinels } => {
                let addrs = sentinels
                    .iter()
                    .map(|a| sentinel_addr(a, config.tls))
                    .collect::<RedisResult<Vec<_>>>()?;
                let mut builder =
                    SentinelClientBuilder::new(addrs, master, SentinelServerType::Master)?;
                if let Some(user) = &config.username {
                    builder = builder.set_client_to_redis_username(user);
                }
                if let Some(password) = &config.password {
                    builder = builder.set_client_to_redis_password(password.expose_str());
                }
                if config.tls {
                    builder = builder
                        .set_client_to_redis_tls_mode(redis::TlsMode::Secure)
                        .set_client_to_sentinel_tls_mode(redis::TlsMode::Secure);
                    if let Some(certs) = &certs {
                        builder = builder
                            .set_client_to_redis_certificates(certs.clone())
                            .set_client_to_sentinel_certificates(certs.clone());
                    }
                }
                Kind::Sentinel(tokio::sync::Mutex::new(builder.build()?))
            }
            RedisTopology::Cluster(urls) => {
                let mut builder = ClusterClient::builder(urls.iter().map(String::as_str))
                    .connection_timeout(timeout)
                    .response_timeout(timeout);
                if let Some(user) = &config.username {
                    builder = builder.username(user);
                }
                if let Some(password) = &config.password {
                    builder = builder.password(password.expose_str());
                }
                if let Some(certs) = &certs {
                    builder = builder.certs(certs.clone());
                }
                let nodes = urls
                    .iter()
                    .map(|u| node_client(u, config, certs.as_ref()))
                    .collect::<RedisResult<Vec<_>>>()?;
                Kind::Cluster {
                    client: builder.build()?,
                    nodes,
                }
            }
        };
        Ok(Self {
            kind,
            timeout,
            pubsub_attempts: AtomicUsize::new(0),
        })
    }

    /// Whether keys of different sessions may live on different servers (scripts then touch
    /// one session's keys only, and shared keys are written by separate commands).
    pub fn is_cluster(&self) -> bool {
        matches!(self.kind, Kind::Cluster { .. })
    }

    fn manager_config(&self) -> ConnectionManagerConfig {
        ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500))
    }

    async fn sentinel_master(&self) -> RedisResult<Client> {
        let Kind::Sentinel(sentinel) = &self.kind else {
            return Err(invalid("not a sentinel deployment".into()));
        };
        let mut sentinel = sentinel.lock().await;
        tokio::time::timeout(self.timeout * 2, sentinel.async_get_client())
            .await
            .map_err(|_| RedisError::from((ErrorKind::Io, "sentinels did not answer in time")))?
    }

    /// Connects the command connection (fails if the deployment does not answer now).
    pub async fn connect(self: &Arc<Self>) -> RedisResult<Conn> {
        match &self.kind {
            Kind::Single(client) => Ok(Conn::Manager(
                ConnectionManager::new_with_config(client.clone(), self.manager_config()).await?,
            )),
            Kind::Cluster { client, .. } => Ok(Conn::Cluster(client.get_async_connection().await?)),
            Kind::Sentinel(_) => {
                let master = self.sentinel_master().await?;
                let address = master.get_connection_info().addr().to_string();
                let manager =
                    ConnectionManager::new_with_config(master, self.manager_config()).await?;
                tracing::info!(master = %address, "connected to the sentinel master");
                Ok(Conn::Sentinel(Arc::new(SentinelConn {
                    link: self.clone(),
                    current: Mutex::new((address, manager)),
                    refreshing: AtomicBool::new(false),
                    last_refresh: Mutex::new(Instant::now()),
                })))
            }
        }
    }

    /// A new pub/sub connection (each call after a failure tries the next node).
    pub async fn pubsub(&self) -> RedisResult<redis::aio::PubSub> {
        let attempt = self.pubsub_attempts.fetch_add(1, Ordering::Relaxed);
        match &self.kind {
            Kind::Single(client) => client.get_async_pubsub().await,
            Kind::Sentinel(_) => self.sentinel_master().await?.get_async_pubsub().await,
            Kind::Cluster { nodes, .. } => match nodes.get(attempt % nodes.len().max(1)) {
                Some(client) => client.get_async_pubsub().await,
                None => Err(invalid("no cluster nodes".into())),
            },
        }
    }
}

/// A command connection to the configured deployment (cheap to clone; all clones share it).
#[derive(Clone)]
pub enum Conn {
    Manager(ConnectionManager),
    Cluster(ClusterConnection),
    Sentinel(Arc<SentinelConn>),
}

/// A connection to the master the sentinels name, replaced after failures.
pub struct SentinelConn {
    link: Arc<Link>,
    /// The master's address and a connection to it.
    current: Mutex<(String, ConnectionManager)>,
    refreshing: AtomicBool,
    last_refresh: Mutex<Instant>,
}

/// Whether `e` may mean that the server we talk to is no longer the master.
fn master_may_have_moved(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || matches!(
            e.kind(),
            ErrorKind::Server(redis::ServerErrorKind::ReadOnly)
        )
        || e.to_string().contains("READONLY")
}

impl SentinelConn {
    fn manager(&self) -> ConnectionManager {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .1
            .clone()
    }

    /// Asks the sentinels for the master again (at most every [`SENTINEL_REFRESH_EVERY`]) and
    /// switches to it if it moved.
    fn refresh(self: &Arc<Self>) {
        {
            let mut last = self.last_refresh.lock().unwrap_or_else(|p| p.into_inner());
            if last.elapsed() < SENTINEL_REFRESH_EVERY {
                return;
            }
            *last = Instant::now();
        }
        if self.refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let result = async {
                let master = this.link.sentinel_master().await?;
                let address = master.get_connection_info().addr().to_string();
                let same = this
                    .current
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .0
                    .clone()
                    == address;
                if !same {
                    let manager =
                        ConnectionManager::new_with_config(master, this.link.manager_config())
                            .await?;
                    tracing::warn!(master = %address, "sentinel master changed; following it");
                    *this.current.lock().unwrap_or_else(|p| p.into_inner()) = (address, manager);
                }
                Ok::<_, RedisError>(())
            }
            .await;
            if let Err(e) = result {
                tracing::warn!(error = %e, "cannot ask the sentinels for the master");
            }
            this.refreshing.store(false, Ordering::Release);
        });
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Manager(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
            Conn::Sentinel(s) => Box::pin(async move {
                let mut c = s.manager();
                let r = c.req_packed_command(cmd).await;
                if let Err(e) = &r
                    && master_may_have_moved(e)
                {
                    s.refresh();
                }
                r
            }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Manager(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Sentinel(s) => Box::pin(async move {
                let mut c = s.manager();
                let r = c.req_packed_commands(pipeline, offset, count).await;
                if let Err(e) = &r
                    && master_may_have_moved(e)
                {
                    s.refresh();
                }
                r
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Manager(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
            Conn::Sentinel(s) => s.manager().get_db(),
        }
    }
}
