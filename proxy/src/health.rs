//! Active health checks: an HTTP GET of each backend's `health_check.path` every
//! `interval_ms`, run as a pingora background service. `healthy_threshold` successes in a row
//! bring a backend up, `unhealthy_threshold` failures take it down; a refused connection on
//! live traffic takes it down at once (see [`crate::pool::BackendState::connect_failed`]).
//! The same loop also drops expired session pins, reloads on SIGHUP, and starts the list
//! caches' invalidation streams.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::http::RequestHeader;
use pingora::lb::health_check::{HealthCheck, HttpHealthCheck};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use crate::config::HealthConfig;
use crate::state::Shared;

/// How often the loop looks for due checks: a quarter of the shortest `interval_ms`, within
/// these bounds. It bounds how late a check runs (and a JWKS refresh starts); an idle proxy
/// with the default 2 s interval wakes twice a second, not fifty times (benches/run measured
/// 650k-750k instructions a second of idle proxy with a fixed 20 ms tick).
const MIN_TICK: Duration = Duration::from_millis(20);
const MAX_TICK: Duration = Duration::from_millis(500);

fn tick(snapshot: &crate::state::Snapshot) -> Duration {
    snapshot
        .pools
        .iter()
        .filter(|p| p.checker.is_some())
        .map(|p| p.config.health.interval / 4)
        .min()
        .unwrap_or(MAX_TICK)
        .clamp(MIN_TICK, MAX_TICK)
}

pub struct HealthChecker {
    pub shared: Arc<Shared>,
}

/// The pingora check for one pool's `health_check` settings; [`crate::pool::Pool`] builds it.
pub(crate) fn http_check(h: &HealthConfig) -> pingora::Result<HttpHealthCheck> {
    let mut hc = HttpHealthCheck::new(&h.host, false);
    let mut req = RequestHeader::build("GET", h.path.as_bytes(), None)?;
    req.insert_header("Host", &h.host)?;
    req.insert_header("User-Agent", "mcp-proxy-health")?;
    hc.req = req;
    // One connection per backend across checks, not a new one every interval.
    hc.reuse_connection = true;
    hc.peer_template.options.connection_timeout = Some(h.timeout);
    hc.peer_template.options.read_timeout = Some(h.timeout);
    hc.peer_template.options.write_timeout = Some(h.timeout);
    Ok(hc)
}

#[async_trait]
impl BackgroundService for HealthChecker {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGHUP; reload through the admin API");
                None
            }
        };
        let mut last_sweep = Instant::now();
        let mut wait = tick(&self.shared.snapshot());
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                Some(()) = async { match hangup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                    // File reading and host-name resolution block: off the async threads.
                    let shared = self.shared.clone();
                    let reloaded = tokio::task::spawn_blocking(move || shared.reload())
                        .await
                        .unwrap_or(Err(crate::state::ReloadError::NoFile));
                    match reloaded {
                        Ok(warnings) => {
                            tracing::info!("configuration reloaded on SIGHUP");
                            for w in warnings { tracing::warn!("{w}"); }
                        }
                        Err(e) => tracing::error!(error = %e, "reload failed; keeping the running configuration"),
                    }
                }
                _ = tokio::time::sleep(wait) => {}
            }
            let snapshot = self.shared.snapshot();
            wait = tick(&snapshot);
            let now = Instant::now();
            for pool in &snapshot.pools {
                let Some(hc) = &pool.checker else {
                    continue;
                };
                let h = &pool.config.health;
                for b in &pool.backends {
                    if !b.claim_check(now, h.interval) {
                        continue;
                    }
                    let (hc, b, shared) = (hc.clone(), b.clone(), self.shared.clone());
                    let (pool_name, timeout, rise, fall) = (
                        pool.config.name.clone(),
                        h.timeout,
                        h.healthy_threshold,
                        h.unhealthy_threshold,
                    );
                    tokio::spawn(async move {
                        let result = match tokio::time::timeout(timeout, hc.check(&b.lb_backend))
                            .await
                        {
                            Ok(Ok(())) => Ok(()),
                            Ok(Err(e)) => Err(e.to_string()),
                            Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
                        };
                        b.check_done();
                        let ok = result.is_ok();
                        let error = result.err();
                        if let Some(t) = b.observe(ok, rise, fall, error.clone()) {
                            let reason = error.unwrap_or_else(|| "health check passed".into());
                            shared.transition(&pool_name, &b.name, t, &reason);
                        }
                    });
                }
            }
            if last_sweep.elapsed() > Duration::from_secs(5) {
                self.shared.sessions.sweep();
                self.shared.legacy.sweep();
                for pool in &snapshot.pools {
                    pool.limiter.sweep();
                }
                last_sweep = Instant::now();
            }
            // JWKS fetches and refreshes run off the request path (at most one at a time); a
            // list cache's invalidation stream starts once per cache.
            for pool in &snapshot.pools {
                if let Some(c) = &pool.list_cache {
                    c.ensure_listener(self.shared.clone(), pool.config.name.clone());
                }
                if let Some(a) = &pool.auth
                    && a.refresh_wanted()
                {
                    let a = a.clone();
                    tokio::spawn(async move { a.refresh().await });
                }
            }
        }
    }
}
