//! `mcp-backend`: an MCP server whose sessions live in Redis, so any replica serves any session.
//!
//! # Layout
//! - [`config`]: the YAML file, environment and flags, validated into [`config::Config`].
//! - [`store`]: session records, one event log per session and bus publishing, on a Redis
//!   engine or a memory engine with the same rules (see `sessions.md`).
//! - [`redis_link`]: connections to one Redis server, a Sentinel master or a Cluster, over
//!   TCP or TLS.
//! - [`bus`]: live messages between replicas (standalone-stream events, client replies and
//!   cancellations, deletions, forwarded 2024-11-05 POSTs) over one Redis pattern subscription.
//! - [`sessions`]: rmcp's `SessionStore`, `EventStore` and `SessionManager` on the store, so a
//!   replica that never saw a session restores it on demand.
//! - [`handler`]: the MCP tools, resources and prompts; [`conformance`]: the fixtures the
//!   official conformance suite calls (served with `--conformance`).
//! - [`http`]: the routes (`/mcp`, `/sse`, `/messages`, `/health`, `/sessions`) and the guard
//!   in front of rmcp; [`legacy`]: the HTTP+SSE transport of 2024-11-05.
//! - [`principal`]: the caller's principal from the proxy's signed headers; sessions are
//!   bound to it.
//! - [`tasks`]: the tasks extension (SEP-2663): tasks in the store, run under a lease, that
//!   any replica answers.

pub mod bus;
pub mod config;
pub mod conformance;
pub mod handler;
pub mod http;
pub mod legacy;
pub mod metrics;
pub mod principal;
pub mod redis_link;
pub mod sessions;
pub mod store;
pub mod tasks;
pub mod trace;

use axum::serve::ListenerExt;
use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Instant,
};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{bus::Bus, config::Config, redis_link::Link, store::Store, tasks::Tasks};

/// What every part of one replica shares.
pub struct Node {
    pub config: Config,
    pub store: Arc<Store>,
    pub bus: Arc<Bus>,
    pub tasks: Arc<Tasks>,
    pub started: Instant,
    /// Cancelled at shutdown: ends sessions, SSE streams and background tasks.
    pub stop: CancellationToken,
    /// Set when shutdown begins: `/health` answers 503 `draining` so balancers stop sending
    /// new work, while requests are still served for `shutdown_drain_seconds`.
    pub draining: AtomicBool,
}

impl Node {
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }
}

/// Builds the node for `config` (starts the Redis connection and bus in the background).
pub fn node(config: Config, stop: CancellationToken) -> Result<Arc<Node>, store::StoreError> {
    let bus = Bus::new();
    let link = match &config.redis {
        Some(redis) => Some(Arc::new(Link::new(redis, config.redis_timeout)?)),
        None => None,
    };
    let store = Arc::new(Store::new(&config, bus.clone(), link.clone()));
    if let Some(link) = link {
        tokio::spawn(bus.clone().run_redis(
            link,
            config.key_prefix.clone(),
            config.redis_timeout,
            stop.clone(),
        ));
    }
    let tasks = Tasks::new(store.clone(), config.tasks.clone(), &config.node_id);
    tasks.start(bus.clone(), stop.clone());
    Ok(Arc::new(Node {
        config,
        store,
        bus,
        tasks,
        started: Instant::now(),
        stop,
        draining: AtomicBool::new(false),
    }))
}

/// Serves one replica on `listener` until `shutdown` completes, then leaves gracefully:
/// `/health` says `draining` (503) while requests are still served for
/// `shutdown_drain_seconds` (a balancer's health check takes the replica out meanwhile), then
/// open streams end (a proxy with `shared_sessions` resumes them on another replica), the
/// listener closes, and requests in flight get `shutdown_grace_seconds` to finish.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let stop = CancellationToken::new();
    let drain = config.shutdown_drain;
    let grace = config.shutdown_grace;
    let node = node(config, stop.clone()).map_err(std::io::Error::other)?;
    let tasks = node.tasks.clone();
    let app = http::app(node.clone());
    let serve_stop = stop.clone();
    let leaving = Arc::new(tokio::sync::Notify::new());
    let left = leaving.clone();
    // Responses go out in several small writes (headers, SSE chunks). Without TCP_NODELAY,
    // Nagle holds the last one until the client's delayed ACK: 40 ms per request on every
    // kept-alive connection, the proxy's pooled ones included.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
    });
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        shutdown.await;
        node.draining.store(true, Ordering::Relaxed);
        tracing::info!(
            drain_seconds = drain.as_secs(),
            "draining: /health says so; still serving"
        );
        tokio::time::sleep(drain).await;
        tracing::info!(
            grace_seconds = grace.as_secs(),
            "closing streams and the listener"
        );
        // Open SSE streams would hold graceful shutdown forever: end them first.
        serve_stop.cancel();
        left.notify_one();
    });
    let out_of_time = async {
        leaving.notified().await;
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        r = server => r?,
        () = out_of_time => tracing::warn!("requests still in flight after the grace period; exiting"),
    }
    stop.cancel();
    // Tasks still running here are marked failed now, not when their lease runs out.
    tasks.stopped(std::time::Duration::from_secs(2)).await;
    Ok(())
}
