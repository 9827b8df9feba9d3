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

pub mod bus;
pub mod config;
pub mod conformance;
pub mod handler;
pub mod http;
pub mod legacy;
pub mod principal;
pub mod redis_link;
pub mod sessions;
pub mod store;

use axum::serve::ListenerExt;
use std::{sync::Arc, time::Instant};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{bus::Bus, config::Config, redis_link::Link, store::Store};

/// What every part of one replica shares.
pub struct Node {
    pub config: Config,
    pub store: Arc<Store>,
    pub bus: Arc<Bus>,
    pub started: Instant,
    /// Cancelled at shutdown: ends sessions, SSE streams and background tasks.
    pub stop: CancellationToken,
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
    Ok(Arc::new(Node {
        config,
        store,
        bus,
        started: Instant::now(),
        stop,
    }))
}

/// Serves one replica on `listener` until `shutdown` completes, then ends open streams.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let stop = CancellationToken::new();
    let node = node(config, stop.clone()).map_err(std::io::Error::other)?;
    let app = http::app(node);
    let serve_stop = stop.clone();
    // Responses go out in several small writes (headers, SSE chunks). Without TCP_NODELAY,
    // Nagle holds the last one until the client's delayed ACK: 40 ms per request on every
    // kept-alive connection, the proxy's pooled ones included.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            // Open SSE streams would hold graceful shutdown forever: end them first.
            serve_stop.cancel();
        })
        .await?;
    stop.cancel();
    Ok(())
}
