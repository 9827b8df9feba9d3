//! Configuration: a YAML file (`conf/backend.yaml`), then environment variables, then flags.
//!
//! Two stages, as everywhere in this project: [`FileConfig`] is what serde reads (unknown keys
//! are errors), [`FileConfig::validate`] turns it into a [`Config`] that cannot hold an invalid
//! value. Every error names the key and the offending value.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

/// Default listen host.
pub const DEFAULT_HOST: &str = "0.0.0.0";
/// Default listen port (the seeds' port).
pub const DEFAULT_PORT: u16 = 3000;
/// Prefix of every Redis key and channel this server writes.
pub const DEFAULT_KEY_PREFIX: &str = "mcp:";
/// Sliding session TTL: 30 minutes.
pub const DEFAULT_SESSION_TTL_SECONDS: u64 = 1800;
/// Events kept per session (all its streams) for `Last-Event-ID` replay.
pub const DEFAULT_EVENT_LOG_MAX_LEN: u64 = 1000;
/// Payload bytes kept per session's event log: 1 MiB.
pub const DEFAULT_EVENT_LOG_MAX_BYTES: u64 = 1024 * 1024;
/// Session workers one replica keeps in memory; beyond, the least recently used idle one is
/// dropped (and restored from the store when its session comes back).
pub const DEFAULT_MAX_LOCAL_SESSIONS: usize = 10_000;
/// A session worker unused this long is dropped from memory (its session lives on).
pub const DEFAULT_WORKER_IDLE_SECONDS: u64 = 300;
/// Resource subscriptions one session may hold.
pub const DEFAULT_MAX_SUBSCRIPTIONS_PER_SESSION: u64 = 100;
/// After SIGTERM: seconds `/health` says draining while requests are still served.
pub const DEFAULT_SHUTDOWN_DRAIN_SECONDS: u64 = 5;
/// After the drain: seconds requests in flight get to finish.
pub const DEFAULT_SHUTDOWN_GRACE_SECONDS: u64 = 30;
/// Largest accepted POST body: 4 MiB.
pub const DEFAULT_MAX_BODY_BYTES: usize = 4 * 1024 * 1024;
/// Interval of SSE keep-alive comments.
pub const DEFAULT_SSE_KEEP_ALIVE_SECONDS: u64 = 15;
/// How long one Redis command may take before the request answers 503.
pub const DEFAULT_REDIS_TIMEOUT_MS: u64 = 1000;
/// Hosts accepted in `Host` by default: loopback only (DNS-rebinding protection).
pub const DEFAULT_ALLOWED_HOSTS: [&str; 3] = ["localhost", "127.0.0.1", "::1"];
/// How far the time in a principal signature may be from this replica's clock.
pub const DEFAULT_PRINCIPAL_MAX_SKEW_SECONDS: u64 = 60;
/// Live sessions one principal may hold (0: unlimited). Anonymous sessions are not counted.
pub const DEFAULT_MAX_SESSIONS_PER_PRINCIPAL: u64 = 100;
/// Shortest accepted `principal_secret` (HMAC-SHA256 key): 32 bytes.
pub const MIN_PRINCIPAL_SECRET_BYTES: usize = 32;
/// Default `list_ttl_ms`: how long list results may be treated as fresh (their `ttlMs`).
pub const DEFAULT_LIST_TTL_MS: u64 = 60_000;
/// Default `tasks.ttl_seconds`: how long a task stays readable from its creation.
pub const DEFAULT_TASK_TTL_SECONDS: u64 = 300;
/// Default `tasks.lease_seconds`: how long a task outlives the replica running it unrenewed.
pub const DEFAULT_TASK_LEASE_SECONDS: u64 = 15;
/// Default `tasks.poll_interval_ms`, suggested to clients.
pub const DEFAULT_TASK_POLL_INTERVAL_MS: u64 = 1000;
/// Default `tasks.max_per_principal`.
pub const DEFAULT_MAX_TASKS_PER_PRINCIPAL: u64 = 100;
/// Default `tasks.max_anonymous`: live tasks of all anonymous callers together.
pub const DEFAULT_MAX_ANONYMOUS_TASKS: u64 = 1000;
/// Default `tasks.max_running`, per replica.
pub const DEFAULT_MAX_RUNNING_TASKS: usize = 256;
/// Default `tasks.max_result_bytes`.
pub const DEFAULT_MAX_TASK_RESULT_BYTES: usize = 1024 * 1024;
/// Shortest accepted `operations_token`.
pub const MIN_OPERATIONS_TOKEN_LEN: usize = 16;

/// A configuration that could not be read or is invalid.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {source}")]
    Parse {
        path: String,
        source: serde_yaml::Error,
    },
    #[error("invalid value for `{key}`: {value:?} ({reason})")]
    Invalid {
        key: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("invalid value for `{}`: {:?} ({})", .0.key, .0.value, .0.message)]
    Telemetry(#[from] telemetry::Invalid),
    /// A secret is invalid: the error names the key, never the value.
    #[error("invalid value for `{key}` (value not shown): {reason}")]
    InvalidSecret {
        key: &'static str,
        reason: &'static str,
    },
}

/// A secret from the file or the environment. `Debug` never shows it, so neither does
/// `--test`, a log line or a panic message.
/// No `PartialEq`: compare secrets in constant time where they are used.
#[derive(Clone, serde::Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret's bytes, for the one place that uses it.
    pub fn expose(&self) -> &[u8] {
        self.0.as_bytes()
    }

    /// The secret as text (a password handed to a client library).
    pub fn expose_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// `url` with the password of its userinfo replaced by `***`, for errors and `--test` output.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => {
            let userinfo = &rest[..at];
            let user = userinfo.split_once(':').map_or("", |(u, _)| u);
            let masked = if userinfo.contains(':') {
                format!("{user}:***")
            } else {
                "***".to_owned()
            };
            format!("{scheme}://{masked}{}", &rest[at..])
        }
        None => url.to_owned(),
    }
}

fn invalid(key: &'static str, value: impl ToString, reason: &'static str) -> ConfigError {
    ConfigError::Invalid {
        key,
        value: value.to_string(),
        reason,
    }
}

/// The `redis:` section as written: one of `url`, `sentinels` (with `sentinel_master`) or
/// `cluster_nodes`, plus credentials and TLS files.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisFile {
    pub url: Option<String>,
    pub sentinel_master: Option<String>,
    pub sentinels: Option<Vec<String>>,
    pub cluster_nodes: Option<Vec<String>>,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub tls: Option<bool>,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

/// Which Redis deployment holds the sessions.
#[derive(Debug, Clone, PartialEq)]
pub enum RedisTopology {
    /// One server (`redis://` or `rediss://` URL).
    Single(String),
    /// The master that these sentinels (`host:port`) name `master`.
    Sentinel {
        master: String,
        sentinels: Vec<String>,
    },
    /// A Redis Cluster reached through these seed node URLs.
    Cluster(Vec<String>),
}

/// The validated Redis connection settings.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    pub topology: RedisTopology,
    /// ACL user and password (a URL's own userinfo also works for `Single` and `Cluster`).
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// TLS to the data nodes (and sentinels); implied by `rediss://` URLs.
    pub tls: bool,
    /// CA bundle (PEM) to verify the servers with; unset: the system's roots.
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key (PEM) for servers that require one.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

impl RedisConfig {
    /// Masks the passwords in URLs (for `--test` output).
    pub fn redact(&mut self) {
        match &mut self.topology {
            RedisTopology::Single(url) => *url = redact_url(url),
            RedisTopology::Cluster(nodes) => {
                for n in nodes {
                    *n = redact_url(n);
                }
            }
            RedisTopology::Sentinel { .. } => {}
        }
    }

    /// The deployment in one line for logs and `--test`, without passwords.
    pub fn describe(&self) -> String {
        let tls = if self.tls { " (tls)" } else { "" };
        match &self.topology {
            RedisTopology::Single(url) => format!("{}{tls}", redact_url(url)),
            RedisTopology::Sentinel { master, sentinels } => {
                format!(
                    "sentinel master {master:?} via {}{tls}",
                    sentinels.join(",")
                )
            }
            RedisTopology::Cluster(nodes) => {
                let nodes: Vec<String> = nodes.iter().map(|n| redact_url(n)).collect();
                format!("cluster via {}{tls}", nodes.join(","))
            }
        }
    }
}

/// The configuration file as written. Every key is optional; see `conf/backend.yaml`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub node_id: Option<String>,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub redis_url: Option<String>,
    pub key_prefix: Option<String>,
    pub session_ttl_seconds: Option<u64>,
    pub event_log_max_len: Option<u64>,
    pub event_log_max_bytes: Option<u64>,
    pub max_local_sessions: Option<usize>,
    pub worker_idle_seconds: Option<u64>,
    pub max_subscriptions_per_session: Option<u64>,
    pub shutdown_drain_seconds: Option<u64>,
    pub shutdown_grace_seconds: Option<u64>,
    pub redis: Option<RedisFile>,
    pub allowed_hosts: Option<Vec<String>>,
    pub allowed_origins: Option<Vec<String>>,
    pub max_body_bytes: Option<usize>,
    pub sse_keep_alive_seconds: Option<u64>,
    pub redis_timeout_ms: Option<u64>,
    pub conformance: Option<bool>,
    /// Logs and traces (see the `telemetry` crate).
    pub telemetry: Option<telemetry::TelemetryConfig>,
    pub operations_token: Option<Secret>,
    pub principal_secret: Option<Secret>,
    pub principal_max_skew_seconds: Option<u64>,
    pub require_principal: Option<bool>,
    pub max_sessions_per_principal: Option<u64>,
    pub tasks: Option<TasksFile>,
    pub list_ttl_ms: Option<u64>,
}

/// The `tasks:` section as written (the tasks extension; see `backend/src/sessions.md`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TasksFile {
    pub ttl_seconds: Option<u64>,
    pub lease_seconds: Option<u64>,
    pub poll_interval_ms: Option<u64>,
    pub max_per_principal: Option<u64>,
    pub max_anonymous: Option<u64>,
    pub max_running: Option<usize>,
    pub max_result_bytes: Option<usize>,
}

/// Tasks (SEP-2663) as validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TasksConfig {
    /// A task is readable this long from its creation, then gone (its `ttlMs`).
    pub ttl: Duration,
    /// A running task's record says which replica runs it until when; the replica renews it
    /// every third of this. Past it, readers see the task `failed`.
    pub lease: Duration,
    pub poll_interval: Duration,
    /// Live tasks per principal; 0: unlimited.
    pub max_per_principal: u64,
    /// Live tasks of all anonymous callers together (they are one budget); 0: unlimited.
    pub max_anonymous: u64,
    /// Tasks running at once on this replica.
    pub max_running: usize,
    /// Largest result (or error) a task keeps; a larger one fails the task.
    pub max_result_bytes: usize,
}

impl TasksFile {
    fn validate(self) -> Result<TasksConfig, ConfigError> {
        let ttl = self.ttl_seconds.unwrap_or(DEFAULT_TASK_TTL_SECONDS);
        if !(10..=7 * 86_400).contains(&ttl) {
            return Err(invalid(
                "tasks.ttl_seconds",
                ttl,
                "must be between 10 and 604800",
            ));
        }
        let lease = self.lease_seconds.unwrap_or(DEFAULT_TASK_LEASE_SECONDS);
        if !(3..=600).contains(&lease) || lease >= ttl {
            return Err(invalid(
                "tasks.lease_seconds",
                lease,
                "must be between 3 and 600, and below tasks.ttl_seconds",
            ));
        }
        let poll = self
            .poll_interval_ms
            .unwrap_or(DEFAULT_TASK_POLL_INTERVAL_MS);
        if !(50..=60_000).contains(&poll) {
            return Err(invalid(
                "tasks.poll_interval_ms",
                poll,
                "must be between 50 and 60000",
            ));
        }
        let max_running = self.max_running.unwrap_or(DEFAULT_MAX_RUNNING_TASKS);
        if !(1..=100_000).contains(&max_running) {
            return Err(invalid(
                "tasks.max_running",
                max_running,
                "must be between 1 and 100000",
            ));
        }
        let max_result_bytes = self
            .max_result_bytes
            .unwrap_or(DEFAULT_MAX_TASK_RESULT_BYTES);
        if !(1024..=64 * 1024 * 1024).contains(&max_result_bytes) {
            return Err(invalid(
                "tasks.max_result_bytes",
                max_result_bytes,
                "must be between 1024 and 67108864",
            ));
        }
        Ok(TasksConfig {
            ttl: Duration::from_secs(ttl),
            lease: Duration::from_secs(lease),
            poll_interval: Duration::from_millis(poll),
            max_per_principal: self
                .max_per_principal
                .unwrap_or(DEFAULT_MAX_TASKS_PER_PRINCIPAL),
            max_anonymous: self.max_anonymous.unwrap_or(DEFAULT_MAX_ANONYMOUS_TASKS),
            max_running,
            max_result_bytes,
        })
    }
}

/// The validated runtime configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub node_id: String,
    pub listen: SocketAddr,
    /// `None`: sessions live in this process only (one node).
    pub redis: Option<RedisConfig>,
    pub key_prefix: String,
    pub session_ttl: Duration,
    /// Events kept per session, all streams together.
    pub event_log_max_len: u64,
    /// Payload bytes kept per session's event log (the oldest events go first).
    pub event_log_max_bytes: u64,
    /// Session workers kept in memory on this replica.
    pub max_local_sessions: usize,
    /// Idle time after which a session worker leaves memory.
    pub worker_idle: Duration,
    pub max_subscriptions_per_session: u64,
    /// After SIGTERM, how long `/health` says draining while requests are still served.
    pub shutdown_drain: Duration,
    /// Then how long requests in flight get to finish (streams end at once).
    pub shutdown_grace: Duration,
    /// Empty: any `Host` is accepted.
    pub allowed_hosts: Vec<String>,
    /// Empty: `Origin` is not checked. Otherwise a present, unlisted `Origin` gets 403.
    pub allowed_origins: Vec<String>,
    pub max_body_bytes: usize,
    pub sse_keep_alive: Duration,
    pub redis_timeout: Duration,
    /// Serve the fixture tools, resources and prompts of the official conformance suite.
    pub conformance: bool,
    pub telemetry: telemetry::TelemetryConfig,
    /// Bearer token of `GET /sessions` and `DELETE /sessions/{id}`; `None`: both answer 404.
    pub operations_token: Option<Secret>,
    /// HMAC key of the principal headers from the proxy; `None`: they are ignored and every
    /// caller is anonymous (see [`crate::principal`]).
    pub principal_secret: Option<Secret>,
    pub principal_max_skew: Duration,
    /// Refuse MCP requests without a principal (only ever set with a `principal_secret`).
    pub require_principal: bool,
    /// Live sessions per principal; 0: unlimited.
    pub max_sessions_per_principal: u64,
    pub tasks: TasksConfig,
    /// `ttlMs` of 2026-07-28 list results (0: not to be cached).
    pub list_ttl_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        // The empty file is valid by construction; `validate` only fails on bad values.
        match FileConfig::default().validate() {
            Ok(config) => config,
            Err(e) => unreachable!("default config is invalid: {e}"),
        }
    }
}

impl FileConfig {
    /// Reads and parses a YAML file (unknown keys are errors).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text).map_err(|source| ConfigError::Parse {
            path: path.display().to_string(),
            source,
        })
    }

    /// Parses YAML text. An empty document is the default configuration.
    pub fn parse(text: &str) -> Result<Self, serde_yaml::Error> {
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        serde_yaml::from_str(text)
    }

    /// Overlays the documented environment variables (`NODE_ID`, `HOST`, `PORT`, `REDIS_URL`,
    /// `REDIS_PASSWORD`, `SESSION_TTL_SECONDS`, `MCP_OPERATIONS_TOKEN`, `MCP_PRINCIPAL_SECRET`)
    /// read through `get`.
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        let get = |k: &str| get(k).filter(|v| !v.trim().is_empty());
        if let Some(v) = get("NODE_ID") {
            self.node_id = Some(v);
        }
        if let Some(v) = get("HOST") {
            self.host = Some(v);
        }
        if let Some(v) = get("PORT") {
            self.port = Some(
                v.parse()
                    .map_err(|_| invalid("PORT", &v, "not a port number"))?,
            );
        }
        if let Some(v) = get("REDIS_URL") {
            self.redis_url = Some(v);
        }
        if let Some(v) = get("SESSION_TTL_SECONDS") {
            self.session_ttl_seconds = Some(v.parse().map_err(|_| {
                invalid("SESSION_TTL_SECONDS", &v, "not a whole number of seconds")
            })?);
        }
        // Secrets are better kept out of files: these two are meant to come from here.
        if let Some(v) = get("MCP_OPERATIONS_TOKEN") {
            self.operations_token = Some(Secret(v));
        }
        if let Some(v) = get("MCP_PRINCIPAL_SECRET") {
            self.principal_secret = Some(Secret(v));
        }
        if let Some(v) = get("REDIS_PASSWORD") {
            self.redis.get_or_insert_default().password = Some(Secret(v));
        }
        Ok(())
    }

    /// Checks every value and builds the runtime [`Config`].
    pub fn validate(self) -> Result<Config, ConfigError> {
        let telemetry = self.telemetry.clone().unwrap_or_default();
        telemetry.validate()?;
        let node_id = match self.node_id {
            Some(id) => {
                if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_graphic()) {
                    return Err(invalid(
                        "node_id",
                        id,
                        "must be 1-64 visible ASCII characters",
                    ));
                }
                id
            }
            None => format!("node-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]),
        };
        let host = self.host.unwrap_or_else(|| DEFAULT_HOST.to_owned());
        let port = self.port.unwrap_or(DEFAULT_PORT);
        let ip: std::net::IpAddr = host
            .trim_matches(['[', ']'])
            .parse()
            .map_err(|_| invalid("host", &host, "not an IP address"))?;
        let redis = redis_config(self.redis_url, self.redis)?;
        let key_prefix = self
            .key_prefix
            .unwrap_or_else(|| DEFAULT_KEY_PREFIX.to_owned());
        if key_prefix
            .chars()
            .any(|c| c.is_whitespace() || matches!(c, '*' | '{' | '}'))
            || key_prefix.len() > 64
        {
            return Err(invalid(
                "key_prefix",
                key_prefix,
                "must not contain whitespace, '*', '{' or '}' and be at most 64 bytes",
            ));
        }
        let ttl = self
            .session_ttl_seconds
            .unwrap_or(DEFAULT_SESSION_TTL_SECONDS);
        if ttl == 0 || ttl > 30 * 24 * 3600 {
            return Err(invalid(
                "session_ttl_seconds",
                ttl,
                "must be between 1 and 2592000 (30 days)",
            ));
        }
        let event_log_max_len = self.event_log_max_len.unwrap_or(DEFAULT_EVENT_LOG_MAX_LEN);
        if event_log_max_len == 0 || event_log_max_len > 1_000_000 {
            return Err(invalid(
                "event_log_max_len",
                event_log_max_len,
                "must be between 1 and 1000000",
            ));
        }
        let event_log_max_bytes = self
            .event_log_max_bytes
            .unwrap_or(DEFAULT_EVENT_LOG_MAX_BYTES);
        if !(1024..=1 << 30).contains(&event_log_max_bytes) {
            return Err(invalid(
                "event_log_max_bytes",
                event_log_max_bytes,
                "must be between 1024 and 1073741824",
            ));
        }
        let max_local_sessions = self
            .max_local_sessions
            .unwrap_or(DEFAULT_MAX_LOCAL_SESSIONS);
        if max_local_sessions == 0 {
            return Err(invalid("max_local_sessions", 0, "must be at least 1"));
        }
        let shutdown_drain = self
            .shutdown_drain_seconds
            .unwrap_or(DEFAULT_SHUTDOWN_DRAIN_SECONDS);
        if shutdown_drain > 600 {
            return Err(invalid(
                "shutdown_drain_seconds",
                shutdown_drain,
                "must be between 0 and 600",
            ));
        }
        let shutdown_grace = self
            .shutdown_grace_seconds
            .unwrap_or(DEFAULT_SHUTDOWN_GRACE_SECONDS);
        if shutdown_grace > 3600 {
            return Err(invalid(
                "shutdown_grace_seconds",
                shutdown_grace,
                "must be between 0 and 3600",
            ));
        }
        let worker_idle = self
            .worker_idle_seconds
            .unwrap_or(DEFAULT_WORKER_IDLE_SECONDS);
        if worker_idle == 0 || worker_idle > 30 * 24 * 3600 {
            return Err(invalid(
                "worker_idle_seconds",
                worker_idle,
                "must be between 1 and 2592000",
            ));
        }
        let allowed_hosts = self.allowed_hosts.unwrap_or_else(|| {
            DEFAULT_ALLOWED_HOSTS
                .iter()
                .map(|h| (*h).to_owned())
                .collect()
        });
        for h in &allowed_hosts {
            if h.is_empty() || h.contains(['/', ' ']) {
                return Err(invalid("allowed_hosts", h, "must be a host or host:port"));
            }
        }
        let allowed_origins = self.allowed_origins.unwrap_or_default();
        for o in &allowed_origins {
            if o != "null" && !(o.starts_with("http://") || o.starts_with("https://")) {
                return Err(invalid(
                    "allowed_origins",
                    o,
                    "must be scheme://host[:port|:*] or \"null\"",
                ));
            }
        }
        let max_body_bytes = self.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY_BYTES);
        if max_body_bytes < 1024 {
            return Err(invalid(
                "max_body_bytes",
                max_body_bytes,
                "must be at least 1024",
            ));
        }
        let keep_alive = self
            .sse_keep_alive_seconds
            .unwrap_or(DEFAULT_SSE_KEEP_ALIVE_SECONDS);
        if keep_alive == 0 || keep_alive > 3600 {
            return Err(invalid(
                "sse_keep_alive_seconds",
                keep_alive,
                "must be between 1 and 3600",
            ));
        }
        let redis_timeout_ms = self.redis_timeout_ms.unwrap_or(DEFAULT_REDIS_TIMEOUT_MS);
        if !(10..=60_000).contains(&redis_timeout_ms) {
            return Err(invalid(
                "redis_timeout_ms",
                redis_timeout_ms,
                "must be between 10 and 60000",
            ));
        }
        let operations_token = match self.operations_token {
            Some(Secret(t)) if t.is_empty() => None,
            Some(Secret(t)) => {
                if t.len() < MIN_OPERATIONS_TOKEN_LEN
                    || t.len() > 1024
                    || !t.bytes().all(|b| b.is_ascii_graphic())
                {
                    return Err(ConfigError::InvalidSecret {
                        key: "operations_token",
                        reason: "must be 16 to 1024 visible ASCII characters",
                    });
                }
                Some(Secret(t))
            }
            None => None,
        };
        let principal_secret = match self.principal_secret {
            Some(Secret(s)) if s.is_empty() => None,
            Some(Secret(s)) => {
                if s.len() < MIN_PRINCIPAL_SECRET_BYTES || s.len() > 1024 {
                    return Err(ConfigError::InvalidSecret {
                        key: "principal_secret",
                        reason: "must be 32 to 1024 bytes",
                    });
                }
                Some(Secret(s))
            }
            None => None,
        };
        let skew = self
            .principal_max_skew_seconds
            .unwrap_or(DEFAULT_PRINCIPAL_MAX_SKEW_SECONDS);
        if skew == 0 || skew > 3600 {
            return Err(invalid(
                "principal_max_skew_seconds",
                skew,
                "must be between 1 and 3600",
            ));
        }
        let require_principal = self.require_principal.unwrap_or(false);
        if require_principal && principal_secret.is_none() {
            return Err(invalid(
                "require_principal",
                true,
                "needs principal_secret (or MCP_PRINCIPAL_SECRET) to verify principals",
            ));
        }
        Ok(Config {
            node_id,
            listen: SocketAddr::new(ip, port),
            redis,
            key_prefix,
            session_ttl: Duration::from_secs(ttl),
            event_log_max_len,
            event_log_max_bytes,
            max_local_sessions,
            worker_idle: Duration::from_secs(worker_idle),
            max_subscriptions_per_session: self
                .max_subscriptions_per_session
                .unwrap_or(DEFAULT_MAX_SUBSCRIPTIONS_PER_SESSION),
            shutdown_drain: Duration::from_secs(shutdown_drain),
            shutdown_grace: Duration::from_secs(shutdown_grace),
            allowed_hosts,
            allowed_origins,
            max_body_bytes,
            sse_keep_alive: Duration::from_secs(keep_alive),
            redis_timeout: Duration::from_millis(redis_timeout_ms),
            conformance: self.conformance.unwrap_or(false),
            telemetry,
            operations_token,
            principal_secret,
            principal_max_skew: Duration::from_secs(skew),
            require_principal,
            max_sessions_per_principal: self
                .max_sessions_per_principal
                .unwrap_or(DEFAULT_MAX_SESSIONS_PER_PRINCIPAL),
            tasks: self.tasks.unwrap_or_default().validate()?,
            list_ttl_ms: match self.list_ttl_ms.unwrap_or(DEFAULT_LIST_TTL_MS) {
                ttl if ttl > 86_400_000 => {
                    return Err(invalid(
                        "list_ttl_ms",
                        ttl,
                        "must be at most 86400000 (one day)",
                    ));
                }
                ttl => ttl,
            },
        })
    }
}

/// A node URL of a Redis deployment: `redis://` or `rediss://`, parseable by the client.
fn check_redis_url(key: &'static str, url: &str) -> Result<(), ConfigError> {
    let scheme_ok = url.starts_with("redis://") || url.starts_with("rediss://");
    if !scheme_ok || redis::Client::open(url).is_err() {
        return Err(invalid(
            key,
            redact_url(url),
            "not a redis:// or rediss:// URL",
        ));
    }
    Ok(())
}

/// Builds the Redis settings from `redis_url` (shorthand for one server) and the `redis:`
/// section; `None`: no Redis.
fn redis_config(
    url: Option<String>,
    section: Option<RedisFile>,
) -> Result<Option<RedisConfig>, ConfigError> {
    let url = url.filter(|u| !u.trim().is_empty());
    let mut file = section.unwrap_or_default();
    if let Some(u) = url {
        if file.url.is_some() {
            return Err(invalid(
                "redis_url",
                redact_url(&u),
                "set either redis_url or redis.url, not both",
            ));
        }
        file.url = Some(u);
    }
    let file_url = file.url.filter(|u| !u.trim().is_empty());
    let sentinels = file.sentinels.unwrap_or_default();
    let cluster = file.cluster_nodes.unwrap_or_default();
    let chosen = usize::from(file_url.is_some())
        + usize::from(!sentinels.is_empty())
        + usize::from(!cluster.is_empty());
    if chosen == 0 {
        if file.sentinel_master.is_some() {
            return Err(invalid(
                "redis.sentinel_master",
                file.sentinel_master.unwrap_or_default(),
                "needs redis.sentinels",
            ));
        }
        return Ok(None);
    }
    if chosen > 1 {
        return Err(invalid(
            "redis",
            "url, sentinels, cluster_nodes",
            "set exactly one of redis.url (or redis_url), redis.sentinels, redis.cluster_nodes",
        ));
    }
    let mut tls = file.tls.unwrap_or(false);
    let topology = if let Some(u) = file_url {
        check_redis_url("redis_url", &u)?;
        tls |= u.starts_with("rediss://");
        RedisTopology::Single(u)
    } else if !sentinels.is_empty() {
        let Some(master) = file.sentinel_master.filter(|m| !m.trim().is_empty()) else {
            return Err(invalid(
                "redis.sentinel_master",
                "",
                "the master name the sentinels monitor is required with redis.sentinels",
            ));
        };
        for s in &sentinels {
            let ok = s
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
            if !ok {
                return Err(invalid(
                    "redis.sentinels",
                    s,
                    "each entry must be host:port",
                ));
            }
        }
        RedisTopology::Sentinel { master, sentinels }
    } else {
        for u in &cluster {
            check_redis_url("redis.cluster_nodes", u)?;
            tls |= u.starts_with("rediss://");
        }
        RedisTopology::Cluster(cluster)
    };
    if file.cert_file.is_some() != file.key_file.is_some() {
        return Err(invalid(
            "redis.cert_file",
            file.cert_file
                .or(file.key_file)
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            "cert_file and key_file go together",
        ));
    }
    for (key, path) in [
        ("redis.ca_file", &file.ca_file),
        ("redis.cert_file", &file.cert_file),
        ("redis.key_file", &file.key_file),
    ] {
        if let Some(p) = path {
            if !p.is_file() {
                return Err(invalid(key, p.display(), "file not found"));
            }
            tls = true;
        }
    }
    // A CA or client certificate with a plain redis:// URL would silently connect in the clear.
    let plain = match &topology {
        RedisTopology::Single(u) => Some(u.as_str()),
        RedisTopology::Cluster(nodes) => nodes
            .iter()
            .find(|u| !u.starts_with("rediss://"))
            .map(String::as_str),
        RedisTopology::Sentinel { .. } => None,
    };
    if tls && let Some(url) = plain.filter(|u| u.starts_with("redis://")) {
        return Err(invalid(
            "redis.url",
            redact_url(url),
            "TLS is configured (tls, ca_file or cert_file): use a rediss:// URL",
        ));
    }
    Ok(Some(RedisConfig {
        topology,
        username: file.username.filter(|u| !u.is_empty()),
        password: file.password.filter(|p| !p.0.is_empty()),
        tls,
        ca_file: file.ca_file,
        cert_file: file.cert_file,
        key_file: file.key_file,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(yaml: &str) -> String {
        match FileConfig::parse(yaml).map_err(|e| e.to_string()) {
            Ok(file) => file
                .validate()
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default(),
            Err(e) => e,
        }
    }

    #[test]
    fn empty_file_gives_documented_defaults() {
        let c = FileConfig::parse("").map(FileConfig::validate);
        let Ok(Ok(c)) = c else {
            panic!("empty config must be valid");
        };
        assert_eq!(c.listen.port(), DEFAULT_PORT);
        assert_eq!(c.session_ttl, Duration::from_secs(1800));
        assert_eq!(c.key_prefix, "mcp:");
        assert!(c.redis.is_none(), "no Redis unless configured");
        assert!(c.node_id.starts_with("node-"), "node id is generated");
        assert!(
            c.operations_token.is_none(),
            "operations endpoints off by default"
        );
        assert!(
            c.principal_secret.is_none(),
            "principal headers ignored by default"
        );
        assert!(!c.require_principal);
        assert_eq!(c.principal_max_skew, Duration::from_secs(60));
        assert_eq!(c.max_sessions_per_principal, 100);
    }

    #[test]
    fn secrets_come_from_env_and_are_never_shown() {
        let token = "ops-token-0123456789";
        let secret = "principal-secret-0123456789abcdef-xyz";
        let mut f = FileConfig::default();
        let env = |k: &str| match k {
            "MCP_OPERATIONS_TOKEN" => Some(token.to_owned()),
            "MCP_PRINCIPAL_SECRET" => Some(secret.to_owned()),
            _ => None,
        };
        assert!(f.apply_env(env).is_ok());
        let Ok(c) = f.validate() else { panic!("valid") };
        assert_eq!(
            c.operations_token.as_ref().map(Secret::expose),
            Some(token.as_bytes())
        );
        assert_eq!(
            c.principal_secret.as_ref().map(Secret::expose),
            Some(secret.as_bytes())
        );
        let shown = format!("{c:?} {c:#?}");
        assert!(
            !shown.contains(token) && !shown.contains(secret),
            "Debug (and so --test) must not print secrets: {shown}"
        );
    }

    #[test]
    fn bad_secrets_name_the_key_but_not_the_value() {
        for (yaml, key, value) in [
            (
                "principal_secret: short-secret-31-bytes-long-xxxx",
                "principal_secret",
                "short-secret-31-bytes-long-xxxx",
            ),
            (
                "operations_token: short-token",
                "operations_token",
                "short-token",
            ),
            (
                "operations_token: \"with space in the token\"",
                "operations_token",
                "with space",
            ),
        ] {
            let e = err(yaml);
            assert!(e.contains(key), "error for {yaml:?} must name the key: {e}");
            assert!(
                !e.contains(value),
                "error for {yaml:?} must not echo the secret: {e}"
            );
        }
        let e = err("require_principal: true");
        assert!(
            e.contains("require_principal") && e.contains("principal_secret"),
            "requiring principals without a secret is an error: {e}"
        );
        let e = err("principal_max_skew_seconds: 0");
        assert!(
            e.contains("principal_max_skew_seconds") && e.contains('0'),
            "{e}"
        );
    }

    #[test]
    fn task_limits_are_checked_and_named() {
        let c = Config::default();
        assert_eq!(c.tasks.ttl, Duration::from_secs(DEFAULT_TASK_TTL_SECONDS));
        assert_eq!(
            c.tasks.lease,
            Duration::from_secs(DEFAULT_TASK_LEASE_SECONDS)
        );
        for (yaml, key) in [
            ("tasks: {ttl_seconds: 5}", "tasks.ttl_seconds"),
            ("tasks: {lease_seconds: 1}", "tasks.lease_seconds"),
            (
                "tasks: {ttl_seconds: 20, lease_seconds: 20}",
                "tasks.lease_seconds",
            ),
            ("tasks: {poll_interval_ms: 0}", "tasks.poll_interval_ms"),
            ("tasks: {max_running: 0}", "tasks.max_running"),
            ("tasks: {max_result_bytes: 10}", "tasks.max_result_bytes"),
            ("tasks: {ttl: 5}", "ttl"),
            ("list_ttl_ms: 90000000", "list_ttl_ms"),
        ] {
            let e = err(yaml);
            assert!(e.contains(key), "error for {yaml:?} must name {key}: {e}");
        }
    }

    #[test]
    fn unknown_key_is_named() {
        let e = err("prot: 3000\n");
        assert!(e.contains("prot"), "error must name the unknown key: {e}");
    }

    #[test]
    fn bad_values_name_key_and_value() {
        for (yaml, key, value) in [
            ("session_ttl_seconds: 0", "session_ttl_seconds", "0"),
            ("host: example.com", "host", "example.com"),
            ("redis_url: http://x", "redis_url", "http://x"),
            (
                "allowed_origins: [example.com]",
                "allowed_origins",
                "example.com",
            ),
            ("max_body_bytes: 10", "max_body_bytes", "10"),
        ] {
            let e = err(yaml);
            assert!(
                e.contains(key) && e.contains(value),
                "error for {yaml:?} must name key and value: {e}"
            );
        }
    }

    #[test]
    fn env_overrides_file() {
        let mut f = FileConfig::parse("port: 1234\n").unwrap_or_default();
        let env = |k: &str| match k {
            "PORT" => Some("4321".to_owned()),
            "REDIS_URL" => Some("redis://127.0.0.1:6390".to_owned()),
            _ => None,
        };
        assert!(f.apply_env(env).is_ok());
        let Ok(c) = f.validate() else { panic!("valid") };
        assert_eq!(c.listen.port(), 4321, "PORT overrides the file");
        assert_eq!(
            c.redis.map(|r| r.topology),
            Some(RedisTopology::Single("redis://127.0.0.1:6390".into()))
        );
    }

    #[test]
    fn redis_passwords_never_show() {
        assert_eq!(
            redact_url("redis://user:hunter2@host:6379/0"),
            "redis://user:***@host:6379/0"
        );
        assert_eq!(redact_url("rediss://:hunter2@h"), "rediss://:***@h");
        assert_eq!(redact_url("redis://hunter2@h"), "redis://***@h");
        assert_eq!(redact_url("redis://h:6379"), "redis://h:6379");
        let file = FileConfig {
            redis_url: Some("redis://:hunter2@h:notaport".into()),
            ..FileConfig::default()
        };
        let e = file
            .validate()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("redis_url") && !e.contains("hunter2"), "{e}");
    }

    #[test]
    fn redis_deployments_are_chosen_by_one_key_and_errors_name_it() {
        let parse = |yaml: &str| FileConfig::parse(yaml).map_err(|e| e.to_string());
        let Ok(Ok(c)) =
            parse("redis:\n  sentinels: [\"10.0.0.1:26379\", \"h:26380\"]\n  sentinel_master: m\n")
                .map(FileConfig::validate)
        else {
            panic!("sentinel config is valid");
        };
        assert_eq!(
            c.redis.map(|r| r.topology),
            Some(RedisTopology::Sentinel {
                master: "m".into(),
                sentinels: vec!["10.0.0.1:26379".into(), "h:26380".into()],
            })
        );
        let Ok(Ok(c)) =
            parse("redis:\n  cluster_nodes: [\"rediss://:pw@h:7000\"]\n").map(FileConfig::validate)
        else {
            panic!("cluster config is valid");
        };
        let redis = c.redis.unwrap_or_else(|| panic!("redis"));
        assert!(redis.tls, "rediss:// means TLS");
        assert!(!redis.describe().contains("pw"), "{}", redis.describe());
        for (yaml, key, value) in [
            (
                "redis:\n  sentinels: [\"h:1\"]\n",
                "redis.sentinel_master",
                "",
            ),
            (
                "redis:\n  sentinels: [\"nohost\"]\n  sentinel_master: m\n",
                "redis.sentinels",
                "nohost",
            ),
            (
                "redis:\n  cluster_nodes: [\"http://h:1\"]\n",
                "redis.cluster_nodes",
                "http://h:1",
            ),
            (
                "redis_url: redis://h\nredis:\n  cluster_nodes: [\"redis://h:1\"]\n",
                "redis",
                "url",
            ),
            (
                "redis:\n  url: redis://h\n  ca_file: /nonexistent/ca.pem\n",
                "redis.ca_file",
                "/nonexistent/ca.pem",
            ),
            (
                "redis:\n  url: redis://h\n  cert_file: /x.pem\n",
                "redis.cert_file",
                "/x.pem",
            ),
            ("key_prefix: \"a{b}\"", "key_prefix", "a{b}"),
            ("event_log_max_bytes: 10", "event_log_max_bytes", "10"),
            ("max_local_sessions: 0", "max_local_sessions", "0"),
        ] {
            let e = err(yaml);
            assert!(
                e.contains(key) && e.contains(value),
                "error for {yaml:?} must name key and value: {e}"
            );
        }
        let mut f = FileConfig::parse("redis:\n  url: redis://h\n").unwrap_or_default();
        assert!(
            f.apply_env(|k| (k == "REDIS_PASSWORD").then(|| "s3cret-pw".to_owned()))
                .is_ok()
        );
        let Ok(c) = f.validate() else { panic!("valid") };
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("s3cret-pw"),
            "the password never shows: {shown}"
        );
        assert_eq!(
            c.redis
                .and_then(|r| r.password)
                .map(|p| p.expose_str().to_owned())
                .as_deref(),
            Some("s3cret-pw")
        );
    }

    #[test]
    fn bad_env_value_is_named() {
        let mut f = FileConfig::default();
        let e = f
            .apply_env(|k| (k == "PORT").then(|| "http".to_owned()))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("PORT") && e.contains("http"), "{e}");
    }
}

#[cfg(test)]
mod conf_files {
    use super::*;

    /// Every backend file shipped in `conf/` parses and validates.
    #[test]
    fn shipped_config_files_are_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../conf");
        let mut checked = 0;
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            if !name.starts_with("backend") || !name.ends_with(".yaml") {
                continue;
            }
            let config = FileConfig::load(&path).and_then(FileConfig::validate);
            assert!(config.is_ok(), "{}: {:?}", path.display(), config.err());
            checked += 1;
        }
        assert!(checked >= 1, "no backend*.yaml found in {}", dir.display());
    }

    #[test]
    fn documented_defaults_match_the_shipped_file() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../conf/backend.yaml");
        let Ok(Ok(shipped)) = FileConfig::load(&path).map(FileConfig::validate) else {
            panic!("conf/backend.yaml must be valid");
        };
        let default = Config::default();
        assert_eq!(shipped.listen, default.listen);
        assert_eq!(shipped.session_ttl, default.session_ttl);
        assert_eq!(shipped.key_prefix, default.key_prefix);
        assert_eq!(shipped.allowed_hosts, default.allowed_hosts);
        assert_eq!(shipped.max_body_bytes, default.max_body_bytes);
        assert_eq!(shipped.event_log_max_len, default.event_log_max_len);
        assert_eq!(shipped.event_log_max_bytes, default.event_log_max_bytes);
        assert_eq!(shipped.max_local_sessions, default.max_local_sessions);
        assert_eq!(shipped.worker_idle, default.worker_idle);
        assert_eq!(shipped.shutdown_drain, default.shutdown_drain);
        assert_eq!(shipped.shutdown_grace, default.shutdown_grace);
        assert_eq!(
            shipped.max_subscriptions_per_session,
            default.max_subscriptions_per_session
        );
        assert!(
            shipped.operations_token.is_none() && shipped.principal_secret.is_none(),
            "the shipped file sets no secret"
        );
        assert_eq!(shipped.principal_max_skew, default.principal_max_skew);
        assert_eq!(shipped.require_principal, default.require_principal);
        assert_eq!(
            shipped.max_sessions_per_principal,
            default.max_sessions_per_principal
        );
        assert_eq!(shipped.tasks, default.tasks);
        assert_eq!(shipped.list_ttl_ms, default.list_ttl_ms);
    }
}
