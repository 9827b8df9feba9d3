//! Configuration in two stages: [`FileConfig`] is what the YAML file says (unknown keys are
//! errors), [`FileConfig::validate`] turns it into a [`Config`] that cannot hold invalid state
//! (parsed addresses, durations, non-empty pools, unique names). Every error names the key and
//! the offending value. `conf/proxy.yaml` documents each key with its default.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub mod auth;
pub use auth::{ApiKey, AuthConfig, AuthFile, JwksSource, JwtConfig, Secret, is_scope};

/// Defaults, named so that `conf/proxy.yaml`, the docs and the code agree.
pub mod defaults {
    pub const ADMIN_ADDRESS: &str = "127.0.0.1:9090";
    pub const GRACE_PERIOD_SECONDS: u64 = 30;
    pub const GRACEFUL_SHUTDOWN_TIMEOUT_SECONDS: u64 = 5;
    pub const UPGRADE_SOCK: &str = "/tmp/mcp-proxy-upgrade.sock";
    pub const PID_FILE: &str = "/tmp/mcp-proxy.pid";
    pub const MCP_PATH: &str = "/mcp";
    pub const HEADER_NAME: &str = "x-mcp-affinity";
    pub const COOKIE_NAME: &str = "mcp_backend";
    pub const PERSISTENCE_TTL_SECONDS: u64 = 3600;
    pub const HEALTH_PATH: &str = "/health";
    pub const HEALTH_HOST: &str = "localhost";
    pub const HEALTH_INTERVAL_MS: u64 = 2000;
    pub const HEALTH_TIMEOUT_MS: u64 = 1000;
    pub const HEALTHY_THRESHOLD: u32 = 2;
    pub const UNHEALTHY_THRESHOLD: u32 = 2;
    pub const MAX_RETRIES: usize = 2;
    /// Methods that change nothing on the server, so repeating one that reached a backend is
    /// harmless. `tools/call` is deliberately absent.
    pub const SAFE_METHODS: &[&str] = &[
        "ping",
        "tools/list",
        "resources/list",
        "resources/templates/list",
        "resources/read",
        "prompts/list",
        "prompts/get",
        "completion/complete",
        // The tasks extension: a read, and two writes the spec makes idempotent (answered
        // input keys are ignored; a cancel of an ended task is the same ack).
        "tasks/get",
        "tasks/update",
        "tasks/cancel",
    ];
    pub const CONNECT_MS: u64 = 1000;
    pub const READ_MS: u64 = 120_000;
    pub const WRITE_MS: u64 = 30_000;
    pub const SSE_IDLE_MS: u64 = 600_000;
    pub const UPSTREAM_KEEPALIVE_MS: u64 = 60_000;
    /// No read buffer: pingora's default 64 KiB one cost 4.4 KiB of RSS per idle SSE stream
    /// and saved no instructions (benches, callgrind: 85.1k vs 85.2k per small POST).
    pub const LISTENER_READ_BUFFER_BYTES: usize = 0;
    pub const LISTENER_WRITE_BUFFER_BYTES: usize = 1460;
    /// Idle upstream connections kept for reuse, per process. Pingora's own default (128) is
    /// below the concurrency of a busy edge: past it every request opens a new connection.
    pub const UPSTREAM_KEEPALIVE_POOL_SIZE: usize = 1024;
    pub const MAX_BODY_BYTES: u64 = 4 * 1024 * 1024;
    pub const MAX_HEADER_BYTES: usize = 32 * 1024;
    pub const MAX_SESSION_ID_BYTES: usize = 256;
    /// Slowloris guard: a client must send its request headers within this time.
    pub const HEADER_READ_TIMEOUT_MS: u64 = 10_000;
    /// Each read of a request body must complete within this time.
    pub const BODY_READ_TIMEOUT_MS: u64 = 30_000;
    /// Each write to a client must complete within this time: a client that stops reading a
    /// stream is cut off.
    pub const CLIENT_WRITE_TIMEOUT_MS: u64 = 30_000;
    /// Session pins held at most (each map: persistence, 2024-11-05 streams).
    pub const MAX_SESSION_PINS: usize = 100_000;
    /// Per principal (or client address without auth); 0 turns the limit off.
    pub const REQUESTS_PER_SECOND: u32 = 0;
    pub const MAX_CONCURRENT_REQUESTS: u32 = 256;
    pub const MAX_STREAMS: u32 = 64;
    /// Requests in flight on one backend (SSE streams included) before the proxy sheds load
    /// with 503.
    pub const BACKEND_MAX_IN_FLIGHT: u32 = 10_000;
    /// Failed authentications per client address and second (burst: twice that) before 429.
    pub const AUTH_FAILURES_PER_SECOND: u32 = 10;
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{key}: {message} (got {value:?})")]
    Invalid {
        key: String,
        value: String,
        message: String,
    },
}

fn invalid(key: impl Into<String>, value: impl ToString, message: &str) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        value: value.to_string(),
        message: message.to_owned(),
    }
}

/// How a request picks its backend. *Affinity* policies hash something about the request;
/// *persistence* remembers which backend answered `initialize`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// The next healthy backend in weighted turn.
    RoundRobin,
    /// Affinity: rendezvous hash of the client address (after trusted `X-Forwarded-For`).
    IpHash,
    /// Affinity: rendezvous hash of `Mcp-Session-Id`; requests without one go round-robin.
    SessionHash,
    /// Affinity: rendezvous hash of the header named by `routing.header_name`.
    Header,
    /// Persistence by cookie: the proxy sets `routing.cookie_name` to the backend's name and
    /// routes by it while that backend is healthy.
    Cookie,
    /// Persistence: session -> backend learned from the `initialize` response. A session whose
    /// backend is gone gets 404 so that the client re-initializes.
    Persistence,
}

impl Policy {
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::RoundRobin => "round-robin",
            Policy::IpHash => "ip-hash",
            Policy::SessionHash => "session-hash",
            Policy::Header => "header",
            Policy::Cookie => "cookie",
            Policy::Persistence => "persistence",
        }
    }
}

// ---------------------------------------------------------------- the file

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub server: ServerFile,
    pub listeners: Vec<ListenerFile>,
    #[serde(default)]
    pub admin: Option<AdminFile>,
    #[serde(default)]
    pub client_address: ClientAddressFile,
    #[serde(default)]
    pub limits: LimitsFile,
    pub pools: Vec<PoolFile>,
    /// Logs and traces (`telemetry` crate); read at start only, a reload keeps the first.
    #[serde(default)]
    pub telemetry: telemetry::TelemetryConfig,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerFile {
    pub threads: Option<usize>,
    pub work_stealing: bool,
    pub grace_period_seconds: u64,
    pub graceful_shutdown_timeout_seconds: u64,
    pub upgrade_sock: String,
    pub pid_file: String,
    pub access_log: bool,
    pub backend_header: bool,
    pub upstream_keepalive_pool_size: usize,
    /// Per client connection: the read buffer in front of the socket (0: none, reads go to
    /// the socket) and the write buffer.
    pub listener_read_buffer_bytes: usize,
    pub listener_write_buffer_bytes: usize,
}

impl Default for ServerFile {
    fn default() -> Self {
        Self {
            threads: None,
            work_stealing: true,
            grace_period_seconds: defaults::GRACE_PERIOD_SECONDS,
            graceful_shutdown_timeout_seconds: defaults::GRACEFUL_SHUTDOWN_TIMEOUT_SECONDS,
            upgrade_sock: defaults::UPGRADE_SOCK.into(),
            pid_file: defaults::PID_FILE.into(),
            access_log: true,
            backend_header: false,
            upstream_keepalive_pool_size: defaults::UPSTREAM_KEEPALIVE_POOL_SIZE,
            listener_read_buffer_bytes: defaults::LISTENER_READ_BUFFER_BYTES,
            listener_write_buffer_bytes: defaults::LISTENER_WRITE_BUFFER_BYTES,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerFile {
    pub address: String,
    /// One MCP server on this listener: its pool (default: the first pool). Exclusive with
    /// `routes`.
    #[serde(default)]
    pub pool: Option<String>,
    /// Several MCP servers on this listener, told apart by host and path prefix.
    #[serde(default)]
    pub routes: Vec<RouteFile>,
    #[serde(default)]
    pub tls: Option<TlsFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteFile {
    pub pool: String,
    /// Matches the `Host` header (port ignored, case-insensitive); default: any host.
    #[serde(default)]
    pub host: Option<String>,
    /// Prefix of the public paths: `/github` serves `/github/mcp`, `/github/sse` and
    /// `/github/messages`, sent upstream without the prefix. Default: none.
    #[serde(default)]
    pub path_prefix: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFile {
    pub certificate: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminFile {
    #[serde(default = "admin_address")]
    pub address: String,
    #[serde(default)]
    pub token: Option<String>,
}

fn admin_address() -> String {
    defaults::ADMIN_ADDRESS.into()
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClientAddressFile {
    pub trusted_proxies: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsFile {
    pub max_body_bytes: u64,
    pub max_header_bytes: usize,
    pub max_session_id_bytes: usize,
    pub header_read_timeout_ms: u64,
    pub body_read_timeout_ms: u64,
    pub client_write_timeout_ms: u64,
    pub max_session_pins: usize,
}

impl Default for LimitsFile {
    fn default() -> Self {
        Self {
            max_body_bytes: defaults::MAX_BODY_BYTES,
            max_header_bytes: defaults::MAX_HEADER_BYTES,
            max_session_id_bytes: defaults::MAX_SESSION_ID_BYTES,
            header_read_timeout_ms: defaults::HEADER_READ_TIMEOUT_MS,
            body_read_timeout_ms: defaults::BODY_READ_TIMEOUT_MS,
            client_write_timeout_ms: defaults::CLIENT_WRITE_TIMEOUT_MS,
            max_session_pins: defaults::MAX_SESSION_PINS,
        }
    }
}

/// A pool's `limits`: what one principal (or one client address, without auth) may use.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolLimitsFile {
    pub requests_per_second: u32,
    /// Requests allowed at once above the steady rate; default: twice the rate.
    pub burst: Option<u32>,
    pub max_concurrent_requests: u32,
    pub max_streams: u32,
    pub backend_max_in_flight: u32,
    pub auth_failures_per_second: u32,
}

impl Default for PoolLimitsFile {
    fn default() -> Self {
        Self {
            requests_per_second: defaults::REQUESTS_PER_SECOND,
            burst: None,
            max_concurrent_requests: defaults::MAX_CONCURRENT_REQUESTS,
            max_streams: defaults::MAX_STREAMS,
            backend_max_in_flight: defaults::BACKEND_MAX_IN_FLIGHT,
            auth_failures_per_second: defaults::AUTH_FAILURES_PER_SECOND,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolFile {
    pub name: String,
    pub backends: Vec<BackendFile>,
    #[serde(default = "mcp_path")]
    pub mcp_path: String,
    /// Serve the 2024-11-05 transport (`/sse`, `/messages`) of this pool's routes.
    #[serde(default = "serve_legacy")]
    pub legacy_transport: bool,
    /// The backends share sessions and resume each other's streams (`mcp-backend` on one
    /// Redis): GET streams survive the loss of their backend.
    #[serde(default)]
    pub shared_sessions: bool,
    #[serde(default)]
    pub routing: RoutingFile,
    #[serde(default)]
    pub health_check: HealthFile,
    #[serde(default)]
    pub failover: FailoverFile,
    #[serde(default)]
    pub timeouts: TimeoutsFile,
    #[serde(default)]
    pub auth: Option<AuthFile>,
    #[serde(default)]
    pub limits: PoolLimitsFile,
    #[serde(default)]
    pub outlier_detection: OutlierFile,
    #[serde(default)]
    pub dns: DnsFile,
    #[serde(default)]
    pub list_cache: ListCacheFile,
}

/// A pool's `list_cache` as written (see `list_cache.rs`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListCacheFile {
    pub enabled: bool,
    pub max_entries: usize,
    pub max_bytes: usize,
    pub max_entry_bytes: usize,
    pub max_ttl_ms: u64,
}

impl Default for ListCacheFile {
    fn default() -> Self {
        Self {
            enabled: false,
            max_entries: 1024,
            max_bytes: 16 * 1024 * 1024,
            max_entry_bytes: 1024 * 1024,
            max_ttl_ms: 300_000,
        }
    }
}

/// The validated `list_cache` section.
#[derive(Debug, Clone, PartialEq)]
pub struct ListCacheConfig {
    pub enabled: bool,
    /// Lists kept (each page, method, client capabilities and, for private lists, principal
    /// is one), least recently used out first.
    pub max_entries: usize,
    /// Bytes of cached results in all, least recently used out first.
    pub max_bytes: usize,
    /// A larger answer is not cached.
    pub max_entry_bytes: usize,
    /// Never kept longer than this, whatever `ttlMs` says.
    pub max_ttl: Duration,
}

/// How a pool's `discover` entries are resolved.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsFile {
    /// Name servers (`ip:port`); empty: the system's (`/etc/resolv.conf`).
    pub servers: Vec<String>,
    /// Bounds on the refresh interval, which otherwise follows the records' TTL.
    pub min_refresh_ms: u64,
    pub max_refresh_ms: u64,
}

impl Default for DnsFile {
    fn default() -> Self {
        Self {
            servers: Vec::new(),
            min_refresh_ms: 1_000,
            max_refresh_ms: 30_000,
        }
    }
}

/// A `discover` entry: a name whose A/AAAA records are the backends.
#[derive(Debug, Clone, PartialEq)]
pub struct DiscoverConfig {
    pub host: String,
    pub port: u16,
    /// Backend names are `<name>-<ip>`.
    pub name: String,
    pub weight: usize,
}

/// The validated `dns` section.
#[derive(Debug, Clone, PartialEq)]
pub struct DnsConfig {
    pub servers: Vec<SocketAddr>,
    pub min_refresh: Duration,
    pub max_refresh: Duration,
}

/// A pool's `outlier_detection` as written (see `outlier.rs`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutlierFile {
    pub consecutive_errors: u32,
    pub base_ejection_ms: u64,
    pub max_ejection_ms: u64,
    pub max_ejected_percent: u32,
    pub slow_start_ms: u64,
}

impl Default for OutlierFile {
    fn default() -> Self {
        Self {
            consecutive_errors: 5,
            base_ejection_ms: 10_000,
            max_ejection_ms: 300_000,
            max_ejected_percent: 50,
            slow_start_ms: 10_000,
        }
    }
}

fn mcp_path() -> String {
    defaults::MCP_PATH.into()
}

fn serve_legacy() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendFile {
    /// `ip:port` (or `host:port`, resolved once at load).
    #[serde(default)]
    pub address: Option<String>,
    /// `host:port` resolved periodically: every A/AAAA record is a backend (a Kubernetes
    /// headless service, say). Instead of `address`.
    #[serde(default)]
    pub discover: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default = "one")]
    pub weight: usize,
}

fn one() -> usize {
    1
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingFile {
    pub post: Policy,
    pub stream: Policy,
    pub legacy: Policy,
    pub header_name: String,
    pub cookie_name: String,
    pub persistence_ttl_seconds: u64,
}

impl Default for RoutingFile {
    fn default() -> Self {
        Self {
            post: Policy::RoundRobin,
            stream: Policy::IpHash,
            legacy: Policy::IpHash,
            header_name: defaults::HEADER_NAME.into(),
            cookie_name: defaults::COOKIE_NAME.into(),
            persistence_ttl_seconds: defaults::PERSISTENCE_TTL_SECONDS,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthFile {
    pub path: String,
    pub host: String,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
}

impl Default for HealthFile {
    fn default() -> Self {
        Self {
            path: defaults::HEALTH_PATH.into(),
            host: defaults::HEALTH_HOST.into(),
            interval_ms: defaults::HEALTH_INTERVAL_MS,
            timeout_ms: defaults::HEALTH_TIMEOUT_MS,
            healthy_threshold: defaults::HEALTHY_THRESHOLD,
            unhealthy_threshold: defaults::UNHEALTHY_THRESHOLD,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FailoverFile {
    pub max_retries: usize,
    pub safe_methods: Vec<String>,
    /// Repeat `tools/call` of tools whose `tools/list` annotations say `readOnlyHint` or
    /// `idempotentHint` (hints from the server: trust them only for servers you run).
    pub trust_tool_annotations: bool,
    /// Tools always safe to repeat, whatever their annotations.
    pub safe_tools: Vec<String>,
    /// Tools never repeated, whatever their annotations (wins over `safe_tools`).
    pub unsafe_tools: Vec<String>,
}

impl Default for FailoverFile {
    fn default() -> Self {
        Self {
            max_retries: defaults::MAX_RETRIES,
            safe_methods: defaults::SAFE_METHODS.iter().map(|s| (*s).into()).collect(),
            trust_tool_annotations: false,
            safe_tools: Vec::new(),
            unsafe_tools: Vec::new(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TimeoutsFile {
    pub connect_ms: u64,
    pub read_ms: u64,
    pub write_ms: u64,
    pub sse_idle_ms: u64,
    pub upstream_keepalive_ms: u64,
}

impl Default for TimeoutsFile {
    fn default() -> Self {
        Self {
            connect_ms: defaults::CONNECT_MS,
            read_ms: defaults::READ_MS,
            write_ms: defaults::WRITE_MS,
            sse_idle_ms: defaults::SSE_IDLE_MS,
            upstream_keepalive_ms: defaults::UPSTREAM_KEEPALIVE_MS,
        }
    }
}

// ---------------------------------------------------------------- the validated config

#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerSettings,
    pub listeners: Vec<Listener>,
    pub admin: Option<Admin>,
    pub trusted_proxies: Vec<Cidr>,
    pub limits: Limits,
    pub pools: Vec<PoolConfig>,
    pub telemetry: telemetry::TelemetryConfig,
    /// The file this came from, for reloads; `None` in `--listen/--backend` mode.
    pub source: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub threads: usize,
    pub work_stealing: bool,
    pub grace_period_seconds: u64,
    pub graceful_shutdown_timeout_seconds: u64,
    pub upgrade_sock: String,
    pub pid_file: String,
    pub access_log: bool,
    pub backend_header: bool,
    pub upstream_keepalive_pool_size: usize,
    pub listener_read_buffer_bytes: usize,
    pub listener_write_buffer_bytes: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Listener {
    pub address: SocketAddr,
    /// Host routes first, then host-less ones; never empty.
    pub routes: Vec<Route>,
    pub tls: Option<(PathBuf, PathBuf)>,
}

/// One MCP server on a listener. See [`crate::request::match_route`].
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub pool: String,
    /// Lowercase, without port; `None`: any host.
    pub host: Option<String>,
    /// `""` or `/segment[/segment...]`.
    pub prefix: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Admin {
    pub address: SocketAddr,
    pub token: Option<Secret>,
}

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_body_bytes: u64,
    pub max_header_bytes: usize,
    pub max_session_id_bytes: usize,
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub client_write_timeout: Duration,
    /// Session pins held at most; the least recently used goes first.
    pub max_session_pins: usize,
}

/// A pool's per-principal limits (0: off).
#[derive(Debug, Clone, PartialEq)]
pub struct PoolLimits {
    pub requests_per_second: u32,
    pub burst: u32,
    pub max_concurrent_requests: u32,
    pub max_streams: u32,
    pub backend_max_in_flight: u32,
    pub auth_failures_per_second: u32,
}

#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub name: String,
    pub backends: Vec<BackendConfig>,
    pub mcp_path: String,
    pub legacy_transport: bool,
    /// GET streams are relayed by the proxy and resumed on another backend (`relay.rs`).
    pub shared_sessions: bool,
    pub routing: Routing,
    pub health: HealthConfig,
    pub failover: Failover,
    pub timeouts: Timeouts,
    pub auth: Option<std::sync::Arc<AuthConfig>>,
    pub limits: PoolLimits,
    pub outlier: crate::outlier::OutlierConfig,
    /// Entries resolved periodically into backends (`discovery.rs`).
    pub discover: Vec<DiscoverConfig>,
    pub dns: DnsConfig,
    pub list_cache: ListCacheConfig,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BackendConfig {
    pub name: String,
    pub address: SocketAddr,
    pub weight: usize,
}

#[derive(Debug, Clone)]
pub struct Routing {
    pub post: Policy,
    pub stream: Policy,
    pub legacy: Policy,
    pub header_name: http::HeaderName,
    pub cookie_name: String,
    pub persistence_ttl: Duration,
}

impl PoolConfig {
    /// The public paths of this pool behind a route with `prefix`, in this order: the MCP
    /// endpoint, then (with `legacy_transport`) the 2024-11-05 `/sse` and `/messages`.
    pub fn public_paths(&self, prefix: &str) -> Vec<String> {
        let mut paths = vec![format!("{prefix}{}", self.mcp_path)];
        if self.legacy_transport {
            paths.push(format!("{prefix}/sse"));
            paths.push(format!("{prefix}/messages"));
        }
        paths
    }
}

impl Routing {
    pub fn uses(&self, p: Policy) -> bool {
        self.post == p || self.stream == p || self.legacy == p
    }
}

#[derive(Debug, Clone)]
pub struct HealthConfig {
    pub path: String,
    pub host: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
}

#[derive(Debug, Clone)]
pub struct Failover {
    pub max_retries: usize,
    pub safe_methods: HashSet<String>,
    pub trust_tool_annotations: bool,
    pub safe_tools: HashSet<String>,
    pub unsafe_tools: HashSet<String>,
}

#[derive(Debug, Clone)]
pub struct Timeouts {
    pub connect: Duration,
    pub read: Duration,
    pub write: Duration,
    pub sse_idle: Duration,
    pub upstream_keepalive: Duration,
}

/// An address block for `client_address.trusted_proxies`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    bits: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Option<Self> {
        let (ip, bits) = match s.split_once('/') {
            Some((ip, bits)) => (ip.parse::<IpAddr>().ok()?, Some(bits.parse::<u8>().ok()?)),
            None => (s.parse::<IpAddr>().ok()?, None),
        };
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let bits = bits.unwrap_or(max);
        (bits <= max).then_some(Self { net: ip, bits })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.net, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.bits)).unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.bits))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

// ---------------------------------------------------------------- loading

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config = Self::parse(&text, &path.display().to_string())?;
        config.source = Some(path.to_owned());
        Ok(config)
    }

    /// Parses YAML text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let file: FileConfig = serde_yaml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_owned(),
            message: e.to_string(),
        })?;
        file.validate()
    }

    /// The simplest case: one pool of `backends` behind `listen`, default policies.
    pub fn from_cli(
        listen: &[String],
        backends: &[String],
        admin: Option<&str>,
    ) -> Result<Self, ConfigError> {
        let file = FileConfig {
            server: ServerFile::default(),
            listeners: listen
                .iter()
                .map(|a| ListenerFile {
                    address: a.clone(),
                    pool: None,
                    routes: Vec::new(),
                    tls: None,
                })
                .collect(),
            admin: admin.map(|a| AdminFile {
                address: a.to_owned(),
                token: None,
            }),
            client_address: ClientAddressFile::default(),
            limits: LimitsFile::default(),
            telemetry: Default::default(),
            pools: vec![PoolFile {
                name: "default".into(),
                backends: backends
                    .iter()
                    .map(|a| BackendFile {
                        address: Some(a.clone()),
                        discover: None,
                        name: None,
                        weight: 1,
                    })
                    .collect(),
                mcp_path: mcp_path(),
                legacy_transport: true,
                shared_sessions: false,
                routing: RoutingFile::default(),
                health_check: HealthFile::default(),
                failover: FailoverFile::default(),
                timeouts: TimeoutsFile::default(),
                auth: None,
                limits: PoolLimitsFile::default(),
                outlier_detection: OutlierFile::default(),
                dns: DnsFile::default(),
                list_cache: ListCacheFile::default(),
            }],
        };
        file.validate().map_err(|e| match e {
            ConfigError::Invalid {
                key,
                value,
                message,
            } => ConfigError::Invalid {
                key: key
                    .replace("listeners[", "--listen[")
                    .replace("pools[0].backends[", "--backend["),
                value,
                message,
            },
            other => other,
        })
    }
}

fn socket_addr(key: &str, value: &str) -> Result<SocketAddr, ConfigError> {
    if let Ok(a) = value.parse() {
        return Ok(a);
    }
    if !value.contains(':') {
        return Err(invalid(key, value, "expected host:port"));
    }
    value
        .to_socket_addrs()
        .ok()
        .and_then(|mut it| it.next())
        .ok_or_else(|| invalid(key, value, "cannot resolve host:port"))
}

fn millis(key: &str, ms: u64, min: u64, max: u64) -> Result<Duration, ConfigError> {
    if ms < min || ms > max {
        return Err(invalid(
            key,
            ms,
            &format!("must be between {min} and {max} milliseconds"),
        ));
    }
    Ok(Duration::from_millis(ms))
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

impl FileConfig {
    pub fn validate(self) -> Result<Config, ConfigError> {
        let s = self.server;
        let threads = match s.threads {
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
            Some(t) if (1..=1024).contains(&t) => t,
            Some(t) => return Err(invalid("server.threads", t, "must be between 1 and 1024")),
        };
        for (key, v) in [
            (
                "server.listener_read_buffer_bytes",
                s.listener_read_buffer_bytes,
            ),
            (
                "server.listener_write_buffer_bytes",
                s.listener_write_buffer_bytes,
            ),
        ] {
            if v > 16 * 1024 * 1024 {
                return Err(invalid(key, v, "must be at most 16777216"));
            }
        }
        if s.upstream_keepalive_pool_size > 1_000_000 {
            return Err(invalid(
                "server.upstream_keepalive_pool_size",
                s.upstream_keepalive_pool_size,
                "must be at most 1000000",
            ));
        }
        for (key, v) in [
            ("server.grace_period_seconds", s.grace_period_seconds),
            (
                "server.graceful_shutdown_timeout_seconds",
                s.graceful_shutdown_timeout_seconds,
            ),
        ] {
            if v > 86_400 {
                return Err(invalid(key, v, "must be at most 86400"));
            }
        }
        let server = ServerSettings {
            threads,
            work_stealing: s.work_stealing,
            grace_period_seconds: s.grace_period_seconds,
            graceful_shutdown_timeout_seconds: s.graceful_shutdown_timeout_seconds,
            upgrade_sock: s.upgrade_sock,
            pid_file: s.pid_file,
            access_log: s.access_log,
            backend_header: s.backend_header,
            upstream_keepalive_pool_size: s.upstream_keepalive_pool_size,
            listener_read_buffer_bytes: s.listener_read_buffer_bytes,
            listener_write_buffer_bytes: s.listener_write_buffer_bytes,
        };

        if let Err(e) = self.telemetry.validate() {
            return Err(ConfigError::Invalid {
                key: e.key,
                value: e.value,
                message: e.message,
            });
        }
        if self.pools.is_empty() {
            return Err(invalid("pools", "[]", "at least one pool is required"));
        }
        let mut pools = Vec::new();
        let mut names = HashSet::new();
        for (i, p) in self.pools.into_iter().enumerate() {
            let pool = validate_pool(&format!("pools[{i}]"), p)?;
            if !names.insert(pool.name.clone()) {
                return Err(invalid(
                    format!("pools[{i}].name"),
                    &pool.name,
                    "pool names must be unique",
                ));
            }
            pools.push(pool);
        }

        let mut resources = HashSet::new();
        for (i, p) in pools.iter().enumerate() {
            if let Some(a) = &p.auth
                && !resources.insert(a.resource.clone())
            {
                return Err(invalid(
                    format!("pools[{i}].auth.resource"),
                    &a.resource,
                    "two pools with one resource would accept each other's tokens",
                ));
            }
        }

        if self.listeners.is_empty() {
            return Err(invalid(
                "listeners",
                "[]",
                "at least one listener is required",
            ));
        }
        let mut listeners = Vec::new();
        let mut bound = HashSet::new();
        for (i, l) in self.listeners.into_iter().enumerate() {
            let key = format!("listeners[{i}]");
            let address = socket_addr(&format!("{key}.address"), &l.address)?;
            if !bound.insert(address) {
                return Err(invalid(
                    format!("{key}.address"),
                    &l.address,
                    "listener addresses must be unique",
                ));
            }
            let routes = validate_routes(&key, l.pool, l.routes, &pools)?;
            let tls = match l.tls {
                None => None,
                Some(t) => {
                    for (k, f) in [("certificate", &t.certificate), ("key", &t.key)] {
                        if !f.is_file() {
                            return Err(invalid(
                                format!("{key}.tls.{k}"),
                                f.display(),
                                "file not found",
                            ));
                        }
                    }
                    Some((t.certificate, t.key))
                }
            };
            listeners.push(Listener {
                address,
                routes,
                tls,
            });
        }

        let admin = match self.admin {
            None => None,
            Some(a) => {
                let address = socket_addr("admin.address", &a.address)?;
                if bound.contains(&address) {
                    return Err(invalid(
                        "admin.address",
                        &a.address,
                        "already used by a listener",
                    ));
                }
                let token = match a.token {
                    None => None,
                    Some(t) if t.is_empty() => {
                        return Err(invalid(
                            "admin.token",
                            "",
                            "must not be empty (omit it to disable, on a loopback address only)",
                        ));
                    }
                    Some(t) => {
                        let token = Secret::resolve("admin.token", &t)?;
                        if token.expose().len() < 16 {
                            return Err(invalid(
                                "admin.token",
                                "<redacted>",
                                "must be at least 16 characters",
                            ));
                        }
                        Some(token)
                    }
                };
                if token.is_none() && !address.ip().is_loopback() {
                    return Err(invalid(
                        "admin.address",
                        &a.address,
                        "the admin API can drain backends and reload the config: on a non-loopback address it needs admin.token",
                    ));
                }
                Some(Admin { address, token })
            }
        };

        let mut trusted_proxies = Vec::new();
        for (i, c) in self.client_address.trusted_proxies.iter().enumerate() {
            trusted_proxies.push(Cidr::parse(c).ok_or_else(|| {
                invalid(
                    format!("client_address.trusted_proxies[{i}]"),
                    c,
                    "expected an IP address or CIDR block",
                )
            })?);
        }

        let l = self.limits;
        if l.max_body_bytes == 0 {
            return Err(invalid("limits.max_body_bytes", 0, "must be positive"));
        }
        if !(1024..=1024 * 1024).contains(&l.max_header_bytes) {
            return Err(invalid(
                "limits.max_header_bytes",
                l.max_header_bytes,
                "must be between 1024 and 1048576",
            ));
        }
        if !(16..=4096).contains(&l.max_session_id_bytes) {
            return Err(invalid(
                "limits.max_session_id_bytes",
                l.max_session_id_bytes,
                "must be between 16 and 4096",
            ));
        }

        let header_read_timeout = millis(
            "limits.header_read_timeout_ms",
            l.header_read_timeout_ms,
            100,
            600_000,
        )?;
        let body_read_timeout = millis(
            "limits.body_read_timeout_ms",
            l.body_read_timeout_ms,
            100,
            3_600_000,
        )?;
        let client_write_timeout = millis(
            "limits.client_write_timeout_ms",
            l.client_write_timeout_ms,
            100,
            3_600_000,
        )?;

        if !(1..=10_000_000).contains(&l.max_session_pins) {
            return Err(invalid(
                "limits.max_session_pins",
                l.max_session_pins,
                "must be between 1 and 10000000",
            ));
        }

        Ok(Config {
            server,
            listeners,
            admin,
            trusted_proxies,
            limits: Limits {
                max_body_bytes: l.max_body_bytes,
                max_header_bytes: l.max_header_bytes,
                max_session_id_bytes: l.max_session_id_bytes,
                header_read_timeout,
                body_read_timeout,
                client_write_timeout,
                max_session_pins: l.max_session_pins,
            },
            pools,
            telemetry: self.telemetry,
            source: None,
        })
    }
}

fn validate_pool(key: &str, p: PoolFile) -> Result<PoolConfig, ConfigError> {
    if p.name.is_empty() || !p.name.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid(
            format!("{key}.name"),
            &p.name,
            "must be non-empty visible ASCII",
        ));
    }
    if p.backends.is_empty() {
        return Err(invalid(
            format!("{key}.backends"),
            "[]",
            "at least one backend is required",
        ));
    }
    let mut backends = Vec::new();
    let mut discover = Vec::new();
    let mut seen = HashSet::new();
    for (i, b) in p.backends.into_iter().enumerate() {
        let bkey = format!("{key}.backends[{i}]");
        if !(1..=1000).contains(&b.weight) {
            return Err(invalid(
                format!("{bkey}.weight"),
                b.weight,
                "must be between 1 and 1000",
            ));
        }
        let address = match (&b.address, &b.discover) {
            (Some(a), None) => socket_addr(&format!("{bkey}.address"), a)?,
            (None, Some(d)) => {
                let (host, port) = d
                    .rsplit_once(':')
                    .and_then(|(h, p)| Some((h, p.parse::<u16>().ok().filter(|p| *p > 0)?)))
                    .filter(|(h, _)| {
                        !h.is_empty()
                            && h.len() <= 253
                            && h.bytes()
                                .all(|c| c.is_ascii_alphanumeric() || b"-._".contains(&c))
                    })
                    .ok_or_else(|| invalid(format!("{bkey}.discover"), d, "expected host:port"))?;
                let name = b.name.clone().unwrap_or_else(|| host.to_owned());
                if !seen.insert(format!("discover:{name}")) {
                    return Err(invalid(
                        format!("{bkey}.name"),
                        &name,
                        "discover entries need distinct names",
                    ));
                }
                discover.push(DiscoverConfig {
                    host: host.to_owned(),
                    port,
                    name,
                    weight: b.weight,
                });
                continue;
            }
            _ => {
                return Err(invalid(
                    bkey,
                    "address, discover",
                    "set exactly one of address or discover",
                ));
            }
        };
        let name = b.name.unwrap_or_else(|| address.to_string());
        if name.is_empty()
            || !name
                .bytes()
                .all(|c| c.is_ascii_graphic() && !b"\",;\\".contains(&c))
        {
            return Err(invalid(
                format!("{bkey}.name"),
                &name,
                "must be visible ASCII without quotes, commas, semicolons or backslashes",
            ));
        }
        if !seen.insert(format!("addr:{address}")) {
            return Err(invalid(
                format!("{bkey}.address"),
                b.address.as_deref().unwrap_or_default(),
                "backend addresses must be unique within a pool",
            ));
        }
        if !seen.insert(name.clone()) {
            return Err(invalid(
                format!("{bkey}.name"),
                &name,
                "backend names must be unique within a pool",
            ));
        }
        backends.push(BackendConfig {
            name,
            address,
            weight: b.weight,
        });
    }
    if !is_route_path(&p.mcp_path) || ["/sse", "/messages"].contains(&p.mcp_path.as_str()) {
        return Err(invalid(
            format!("{key}.mcp_path"),
            &p.mcp_path,
            "must be a path like /mcp: /segment[/segment...] of letters, digits and -._~ (not /sse or /messages)",
        ));
    }

    let r = p.routing;
    let header_name = if is_token(&r.header_name) {
        http::HeaderName::from_bytes(r.header_name.to_ascii_lowercase().as_bytes()).ok()
    } else {
        None
    }
    .ok_or_else(|| {
        invalid(
            format!("{key}.routing.header_name"),
            &r.header_name,
            "not a valid header name",
        )
    })?;
    if !is_token(&r.cookie_name) {
        return Err(invalid(
            format!("{key}.routing.cookie_name"),
            &r.cookie_name,
            "not a valid cookie name",
        ));
    }
    if r.persistence_ttl_seconds == 0 {
        return Err(invalid(
            format!("{key}.routing.persistence_ttl_seconds"),
            0,
            "must be positive",
        ));
    }
    if r.legacy == Policy::SessionHash {
        return Err(invalid(
            format!("{key}.routing.legacy"),
            "session-hash",
            "the 2024-11-05 transport has no Mcp-Session-Id header; use ip-hash, header, cookie or persistence",
        ));
    }

    let h = p.health_check;
    let hkey = format!("{key}.health_check");
    if !h.path.starts_with('/') || h.path.parse::<http::uri::PathAndQuery>().is_err() {
        return Err(invalid(
            format!("{hkey}.path"),
            &h.path,
            "must be a URL path starting with /",
        ));
    }
    let interval = millis(&format!("{hkey}.interval_ms"), h.interval_ms, 50, 3_600_000)?;
    let timeout = millis(&format!("{hkey}.timeout_ms"), h.timeout_ms, 10, 600_000)?;
    if timeout > interval {
        return Err(invalid(
            format!("{hkey}.timeout_ms"),
            h.timeout_ms,
            "must not exceed interval_ms",
        ));
    }
    for (k, v) in [
        ("healthy_threshold", h.healthy_threshold),
        ("unhealthy_threshold", h.unhealthy_threshold),
    ] {
        if !(1..=100).contains(&v) {
            return Err(invalid(
                format!("{hkey}.{k}"),
                v,
                "must be between 1 and 100",
            ));
        }
    }
    if h.host.is_empty() || !h.host.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid(
            format!("{hkey}.host"),
            &h.host,
            "must be non-empty visible ASCII",
        ));
    }

    let f = p.failover;
    if f.max_retries > 10 {
        return Err(invalid(
            format!("{key}.failover.max_retries"),
            f.max_retries,
            "must be at most 10",
        ));
    }
    for (i, m) in f.safe_methods.iter().enumerate() {
        if m.is_empty() || m.contains(char::is_whitespace) {
            return Err(invalid(
                format!("{key}.failover.safe_methods[{i}]"),
                m,
                "must be an MCP method name",
            ));
        }
    }

    let t = p.timeouts;
    let tkey = format!("{key}.timeouts");
    let timeouts = Timeouts {
        connect: millis(&format!("{tkey}.connect_ms"), t.connect_ms, 1, 600_000)?,
        read: millis(&format!("{tkey}.read_ms"), t.read_ms, 1, 86_400_000)?,
        write: millis(&format!("{tkey}.write_ms"), t.write_ms, 1, 86_400_000)?,
        sse_idle: millis(&format!("{tkey}.sse_idle_ms"), t.sse_idle_ms, 1, 86_400_000)?,
        upstream_keepalive: millis(
            &format!("{tkey}.upstream_keepalive_ms"),
            t.upstream_keepalive_ms,
            0,
            86_400_000,
        )?,
    };

    let auth = match p.auth {
        None => None,
        Some(a) => Some(std::sync::Arc::new(a.validate(&format!("{key}.auth"))?)),
    };
    let l = p.limits;
    let lkey = format!("{key}.limits");
    for (k, v, max) in [
        ("requests_per_second", l.requests_per_second, 1_000_000),
        (
            "max_concurrent_requests",
            l.max_concurrent_requests,
            1_000_000,
        ),
        ("max_streams", l.max_streams, 1_000_000),
        ("backend_max_in_flight", l.backend_max_in_flight, 10_000_000),
        (
            "auth_failures_per_second",
            l.auth_failures_per_second,
            1_000_000,
        ),
    ] {
        if v > max {
            return Err(invalid(
                format!("{lkey}.{k}"),
                v,
                &format!("must be at most {max} (0 turns the limit off)"),
            ));
        }
    }
    let burst = match l.burst {
        None => l.requests_per_second.saturating_mul(2).max(1),
        Some(0) => {
            return Err(invalid(format!("{lkey}.burst"), 0, "must be positive"));
        }
        Some(b) => b,
    };
    let limits = PoolLimits {
        requests_per_second: l.requests_per_second,
        burst,
        max_concurrent_requests: l.max_concurrent_requests,
        max_streams: l.max_streams,
        backend_max_in_flight: l.backend_max_in_flight,
        auth_failures_per_second: l.auth_failures_per_second,
    };
    let o = p.outlier_detection;
    let okey = format!("{key}.outlier_detection");
    if o.consecutive_errors > 1000 {
        return Err(invalid(
            format!("{okey}.consecutive_errors"),
            o.consecutive_errors,
            "must be at most 1000 (0 turns outlier detection off)",
        ));
    }
    if o.max_ejected_percent > 100 {
        return Err(invalid(
            format!("{okey}.max_ejected_percent"),
            o.max_ejected_percent,
            "must be between 0 and 100",
        ));
    }
    let base_ejection = millis(
        &format!("{okey}.base_ejection_ms"),
        o.base_ejection_ms,
        1,
        86_400_000,
    )?;
    let max_ejection = millis(
        &format!("{okey}.max_ejection_ms"),
        o.max_ejection_ms,
        1,
        86_400_000,
    )?;
    if max_ejection < base_ejection {
        return Err(invalid(
            format!("{okey}.max_ejection_ms"),
            o.max_ejection_ms,
            "must be at least base_ejection_ms",
        ));
    }
    let dkey = format!("{key}.dns");
    let mut servers = Vec::new();
    for (i, srv) in p.dns.servers.iter().enumerate() {
        servers.push(
            srv.parse::<SocketAddr>()
                .map_err(|_| invalid(format!("{dkey}.servers[{i}]"), srv, "expected ip:port"))?,
        );
    }
    let min_refresh = millis(
        &format!("{dkey}.min_refresh_ms"),
        p.dns.min_refresh_ms,
        100,
        3_600_000,
    )?;
    let max_refresh = millis(
        &format!("{dkey}.max_refresh_ms"),
        p.dns.max_refresh_ms,
        100,
        86_400_000,
    )?;
    if max_refresh < min_refresh {
        return Err(invalid(
            format!("{dkey}.max_refresh_ms"),
            p.dns.max_refresh_ms,
            "must be at least min_refresh_ms",
        ));
    }
    let dns = DnsConfig {
        servers,
        min_refresh,
        max_refresh,
    };
    let c = p.list_cache;
    let ckey = format!("{key}.list_cache");
    if !(1..=1_000_000).contains(&c.max_entries) {
        return Err(invalid(
            format!("{ckey}.max_entries"),
            c.max_entries,
            "must be between 1 and 1000000",
        ));
    }
    if !(1024..=16 * 1024 * 1024).contains(&c.max_entry_bytes) {
        return Err(invalid(
            format!("{ckey}.max_entry_bytes"),
            c.max_entry_bytes,
            "must be between 1024 and 16777216",
        ));
    }
    if c.max_bytes < c.max_entry_bytes || c.max_bytes > 1 << 30 {
        return Err(invalid(
            format!("{ckey}.max_bytes"),
            c.max_bytes,
            "must be at least max_entry_bytes and at most 1073741824",
        ));
    }
    let list_cache = ListCacheConfig {
        enabled: c.enabled,
        max_entries: c.max_entries,
        max_bytes: c.max_bytes,
        max_entry_bytes: c.max_entry_bytes,
        max_ttl: millis(&format!("{ckey}.max_ttl_ms"), c.max_ttl_ms, 1, 86_400_000)?,
    };
    let outlier = crate::outlier::OutlierConfig {
        consecutive_errors: o.consecutive_errors,
        base_ejection,
        max_ejection,
        max_ejected_percent: o.max_ejected_percent,
        slow_start: millis(
            &format!("{okey}.slow_start_ms"),
            o.slow_start_ms,
            0,
            3_600_000,
        )?,
    };

    Ok(PoolConfig {
        name: p.name,
        backends,
        mcp_path: p.mcp_path,
        legacy_transport: p.legacy_transport,
        shared_sessions: p.shared_sessions,
        routing: Routing {
            post: r.post,
            stream: r.stream,
            legacy: r.legacy,
            header_name,
            cookie_name: r.cookie_name,
            persistence_ttl: Duration::from_secs(r.persistence_ttl_seconds),
        },
        health: HealthConfig {
            path: h.path,
            host: h.host,
            interval,
            timeout,
            healthy_threshold: h.healthy_threshold,
            unhealthy_threshold: h.unhealthy_threshold,
        },
        failover: Failover {
            max_retries: f.max_retries,
            safe_methods: f.safe_methods.into_iter().collect(),
            trust_tool_annotations: f.trust_tool_annotations,
            safe_tools: f.safe_tools.into_iter().collect(),
            unsafe_tools: f.unsafe_tools.into_iter().collect(),
        },
        timeouts,
        auth,
        limits,
        outlier,
        discover,
        dns,
        list_cache,
    })
}

/// A path (or prefix) the route matcher can compare byte for byte: `/` followed by segments of
/// unreserved characters, no empty, `.` or `..` segment, no percent-encoding.
fn is_route_path(p: &str) -> bool {
    p.strip_prefix('/').is_some_and(|rest| {
        rest.split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b))
        })
    })
}

/// A listener's routes: `pool:` alone is one route without host or prefix.
fn validate_routes(
    key: &str,
    pool: Option<String>,
    routes: Vec<RouteFile>,
    pools: &[PoolConfig],
) -> Result<Vec<Route>, ConfigError> {
    let known = |k: String, p: &str| -> Result<(), ConfigError> {
        if pools.iter().any(|x| x.name == p) {
            Ok(())
        } else {
            Err(invalid(k, p, "no pool has this name"))
        }
    };
    if routes.is_empty() {
        let pool = match pool {
            None => pools[0].name.clone(),
            Some(p) => {
                known(format!("{key}.pool"), &p)?;
                p
            }
        };
        return Ok(vec![Route {
            pool,
            host: None,
            prefix: String::new(),
        }]);
    }
    if let Some(p) = pool {
        return Err(invalid(
            format!("{key}.pool"),
            p,
            "give `pool` or `routes`, not both",
        ));
    }
    let mut out: Vec<Route> = Vec::new();
    let mut public = HashSet::new();
    for (i, r) in routes.into_iter().enumerate() {
        let rkey = format!("{key}.routes[{i}]");
        known(format!("{rkey}.pool"), &r.pool)?;
        let host = match r.host {
            None => None,
            Some(h) => {
                let lower = h.to_ascii_lowercase();
                let ok = !lower.is_empty()
                    && lower.len() <= 253
                    && (lower.parse::<IpAddr>().is_ok()
                        || lower
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"-.".contains(&b)));
                if !ok {
                    return Err(invalid(
                        format!("{rkey}.host"),
                        h,
                        "must be a host name or IP address, without port",
                    ));
                }
                Some(lower)
            }
        };
        let prefix = r.path_prefix.unwrap_or_default();
        if !prefix.is_empty() && !is_route_path(&prefix) {
            return Err(invalid(
                format!("{rkey}.path_prefix"),
                prefix,
                "must be /segment[/segment...] of letters, digits and -._~, without a trailing /",
            ));
        }
        let paths = pools
            .iter()
            .find(|p| p.name == r.pool)
            .map(|p| p.public_paths(&prefix))
            .unwrap_or_default();
        for full in paths {
            if !public.insert((host.clone(), full.clone())) {
                return Err(invalid(
                    format!("{rkey}.path_prefix"),
                    &prefix,
                    &format!("{full} is already served by another route of this listener"),
                ));
            }
        }
        out.push(Route {
            pool: r.pool,
            host,
            prefix,
        });
    }
    // Routes that name a host win over host-less ones with the same path.
    out.sort_by_key(|r| r.host.is_none());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "listeners: [{address: 127.0.0.1:8080}]\npools: [{name: mcp, backends: [{address: 127.0.0.1:3001}]}]\n";

    fn err(text: &str) -> String {
        match Config::parse(text, "test.yaml") {
            Ok(_) => panic!("expected an error for:\n{text}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn the_minimal_file_gets_the_documented_defaults() {
        let c = Config::parse(MINIMAL, "test.yaml").unwrap_or_else(|e| panic!("{e}"));
        let p = &c.pools[0];
        assert_eq!(p.routing.post, Policy::RoundRobin);
        assert_eq!(p.routing.stream, Policy::IpHash);
        assert_eq!(p.routing.legacy, Policy::IpHash);
        assert_eq!(p.health.interval, Duration::from_millis(2000));
        assert!(p.failover.safe_methods.contains("tools/list"));
        assert!(!p.failover.safe_methods.contains("tools/call"));
        assert_eq!(c.listeners[0].routes[0].pool, "mcp");
        assert!(c.admin.is_none());
        assert_eq!(p.backends[0].name, "127.0.0.1:3001");
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key_and_the_value() {
        let pool = |extra: &str| MINIMAL.replace("{name: mcp,", &format!("{{name: mcp, {extra},"));
        let cases = [
            (
                MINIMAL.replace("address: 127.0.0.1:3001", "adress: 127.0.0.1:3001"),
                "pools[0].backends[0]",
                "adress",
            ),
            (
                MINIMAL.replace("127.0.0.1:3001}", "127.0.0.1:3001, weight: 0}"),
                "pools[0].backends[0].weight",
                "\"0\"",
            ),
            (
                format!("{MINIMAL}limits: {{max_header_bytes: 5}}\n"),
                "limits.max_header_bytes",
                "\"5\"",
            ),
            (
                format!("{MINIMAL}limits: {{max_session_pins: 0}}\n"),
                "limits.max_session_pins",
                "\"0\"",
            ),
            (
                MINIMAL.replace("{address: 127.0.0.1:3001}", "{discover: \"no port\"}"),
                "pools[0].backends[0].discover",
                "no port",
            ),
            (
                MINIMAL.replace(
                    "{address: 127.0.0.1:3001}",
                    "{address: 127.0.0.1:3001, discover: \"a:1\"}",
                ),
                "pools[0].backends[0]",
                "address, discover",
            ),
            (
                pool("dns: {servers: [nowhere]}"),
                "pools[0].dns.servers[0]",
                "nowhere",
            ),
            (
                pool("outlier_detection: {max_ejected_percent: 101}"),
                "pools[0].outlier_detection.max_ejected_percent",
                "101",
            ),
            (
                pool("list_cache: {enabled: true, max_ttl_ms: 0}"),
                "pools[0].list_cache.max_ttl_ms",
                "0",
            ),
            (
                pool("list_cache: {max_entry_bytes: 4096, max_bytes: 1024}"),
                "pools[0].list_cache.max_bytes",
                "1024",
            ),
            (
                pool("routing: {post: random}"),
                "pools[0].routing.post",
                "random",
            ),
            (
                MINIMAL.replace("127.0.0.1:8080", "nowhere"),
                "listeners[0].address",
                "nowhere",
            ),
            (
                pool("health_check: {interval_ms: 100, timeout_ms: 500}"),
                "health_check.timeout_ms",
                "500",
            ),
            (
                format!("{MINIMAL}client_address: {{trusted_proxies: [10.0.0.0/99]}}\n"),
                "trusted_proxies[0]",
                "10.0.0.0/99",
            ),
            (
                MINIMAL.replace("8080}", "8080, pool: other}"),
                "listeners[0].pool",
                "other",
            ),
            (
                MINIMAL.replace(
                    "[{address: 127.0.0.1:3001}]",
                    "[{address: 127.0.0.1:3001}, {address: 127.0.0.1:3001}]",
                ),
                "pools[0].backends[1].address",
                "127.0.0.1:3001",
            ),
            (
                pool("health_check: {path: /a b}"),
                "health_check.path",
                "/a b",
            ),
        ];
        for (yaml, key, value) in cases {
            let e = err(&yaml);
            assert!(
                e.contains(key) && e.contains(value),
                "want {key} and {value} in: {e}"
            );
        }
    }

    #[test]
    fn the_cli_mode_names_its_flags() {
        let e = Config::from_cli(&["127.0.0.1:1".into()], &["bad".into()], None)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains("--backend[0].address") && e.contains("bad"),
            "{e}"
        );
        let c = Config::from_cli(
            &["127.0.0.1:1".into()],
            &["127.0.0.1:2".into(), "127.0.0.1:3".into()],
            Some("127.0.0.1:4"),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.pools[0].backends.len(), 2);
    }

    #[test]
    fn cidr_matching() {
        let c = Cidr::parse("10.1.0.0/16").unwrap_or_else(|| panic!("parse"));
        assert!(c.contains("10.1.200.3".parse().unwrap_or_else(|_| panic!())));
        assert!(!c.contains("10.2.0.1".parse().unwrap_or_else(|_| panic!())));
        assert!(c.contains("::ffff:10.1.0.9".parse().unwrap_or_else(|_| panic!())));
        let all = Cidr::parse("0.0.0.0/0").unwrap_or_else(|| panic!("parse"));
        assert!(all.contains("8.8.8.8".parse().unwrap_or_else(|_| panic!())));
        assert!(Cidr::parse("::1").is_some());
        assert!(Cidr::parse("1.2.3.4/33").is_none());
    }
}
