//! mcp-proxy: a Pingora edge load balancer that understands MCP sessions.
//!
//! # Layout
//! - [`config`]: the YAML file, its validation and the `--listen/--backend` shortcut;
//!   `config::auth` the `auth:` section and secrets.
//! - [`request`]: the route allow-list (a listener's MCP endpoints, matched on the raw target)
//!   and request header checks.
//! - [`auth`]: bearer JWTs and API keys, the principal sent to the backends.
//! - [`limits`]: rate, concurrency and stream limits per principal; the header deadline.
//! - [`list_cache`]: the edge cache of 2026-07-28 list results (`ttlMs`, `cacheScope`).
//! - [`client_addr`]: the client address behind trusted proxies.
//! - [`mcp`]: what the proxy reads of MCP requests (session id, protocol version, JSON-RPC
//!   method) and the JSON-RPC errors it answers with.
//! - [`respond`]: the answers the proxy writes itself.
//! - [`pool`]: backends' live state (health, drain, counters) and selection per policy.
//! - [`pins`]: session -> backend pins, bounded (least recently used out first).
//! - [`outlier`]: ejection of backends failing live traffic, the panic threshold, slow start.
//! - [`proxy`]: the request path, pingora's `ProxyHttp` filters (see `proxy/README.md`).
//! - [`relay`]: GET streams the proxy keeps open across backends (`shared_sessions` pools).
//! - [`resume`]: POST answers cut short by a dying backend: resumed, repeated, or ended with
//!   a JSON-RPC error.
//! - [`health`]: active health checks and SIGHUP reloads, as a background service.
//! - [`discovery`]: backends from DNS (`discover` entries) and the admin API, without reloads.
//! - [`admin`]: the admin listener (health, metrics, backends, sessions, drain, reload).
//! - [`metrics`]: the Prometheus registry.
//! - [`status`]: the status page and its recent events.
//! - [`trace`]: OpenTelemetry spans of a request and its upstream attempts.
//! - [`state`]: the shared, reloadable snapshot of config and pools.

pub mod admin;
pub mod auth;
pub mod client_addr;
pub mod config;
pub mod discovery;
pub mod health;
pub mod limits;
pub mod list_cache;
pub mod mcp;
pub mod metrics;
pub mod outlier;
pub mod pins;
pub mod pool;
pub mod proxy;
pub mod relay;
pub mod request;
pub mod respond;
pub mod resume;
pub mod state;
pub mod status;
pub mod trace;

use std::sync::Arc;

use pingora::server::Server;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::services::background::background_service;
use pingora::services::listening::Service;

use crate::config::Config;
use crate::state::Shared;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot set up metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("listener {address}: {message}")]
    Listener { address: String, message: String },
}

/// How the process was asked to start (pingora's own flags).
#[derive(Debug, Default, Clone, Copy)]
pub struct StartOptions {
    /// Take over the listeners of a running mcp-proxy (graceful upgrade, `-u`).
    pub upgrade: bool,
    pub daemon: bool,
}

/// Builds the pingora server: one proxy service per listener, the health-check service and
/// the admin listener. The caller runs it (`run_forever`).
pub fn server(config: Config, options: StartOptions) -> Result<(Server, Arc<Shared>), StartError> {
    let conf = ServerConf {
        threads: config.server.threads,
        work_stealing: config.server.work_stealing,
        grace_period_seconds: Some(config.server.grace_period_seconds),
        graceful_shutdown_timeout_seconds: Some(config.server.graceful_shutdown_timeout_seconds),
        upgrade_sock: config.server.upgrade_sock.clone(),
        pid_file: config.server.pid_file.clone(),
        // Attempts per request are bounded per pool (failover.max_retries <= 10) by the proxy.
        max_retries: 11,
        upstream_keepalive_pool_size: config.server.upstream_keepalive_pool_size,
        ..ServerConf::default()
    };
    let opt = Opt {
        upgrade: options.upgrade,
        daemon: options.daemon,
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();

    let shared = Shared::new(config.clone())?;
    for (i, l) in config.listeners.iter().enumerate() {
        let proxy = proxy::McpProxy {
            shared: shared.clone(),
            listener: i,
            tls: l.tls.is_some(),
        };
        let mut http = pingora::proxy::HttpProxy::new(proxy, server.configuration.clone());
        http.handle_init_modules();
        let mut service = Service::new(
            format!("mcp-proxy {}", l.address),
            limits::HeaderDeadline {
                inner: Arc::new(http),
                timeout: config.limits.header_read_timeout,
            },
        );
        let address = l.address.to_string();
        let mut listener = pingora::listeners::ListenerConfig::tcp(address.clone()).l4_buffer(
            pingora::listeners::L4BufferSettings::new(
                config.server.listener_read_buffer_bytes,
                config.server.listener_write_buffer_bytes,
            ),
        );
        if let Some((cert, key)) = &l.tls {
            let tls = pingora::listeners::tls::TlsSettings::intermediate(
                &cert.display().to_string(),
                &key.display().to_string(),
            )
            .map_err(|e| StartError::Listener {
                address: address.clone(),
                message: e.to_string(),
            })?;
            listener = listener.tls(tls);
        }
        service.add_listener(listener);
        server.add_service(service);
    }
    server.add_service(background_service(
        "backend discovery",
        discovery::Discovery {
            shared: shared.clone(),
        },
    ));
    server.add_service(background_service(
        "health checks",
        health::HealthChecker {
            shared: shared.clone(),
        },
    ));
    if let Some(admin) = &config.admin {
        let mut service = Service::new(
            "mcp-proxy admin".to_owned(),
            admin::AdminApp {
                shared: shared.clone(),
            },
        );
        service.add_tcp(&admin.address.to_string());
        server.add_service(service);
    }
    Ok((server, shared))
}
