//! Prometheus metrics, served on the admin listener at `/metrics`. Label values are bounded:
//! pools and backends come from the config, methods from [`crate::mcp::method_label`].

use std::sync::OnceLock;
use std::sync::atomic::Ordering;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::state::Snapshot;

/// Latency buckets, in seconds, from half a millisecond to a minute.
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0,
];

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Requests by pool, backend ("-" when none was reached), status and MCP method.
    pub requests: IntCounterVec,
    /// Request duration (to the end of the response) by pool and MCP method.
    pub duration: HistogramVec,
    /// Open SSE streams by pool.
    pub sse_streams: IntGaugeVec,
    /// New sessions seen (an `Mcp-Session-Id` first returned by a backend) by pool.
    pub sessions: IntCounterVec,
    /// Attempts repeated on another backend, by pool and reason (`connect`, `safe_method`).
    pub retries: IntCounterVec,
    /// Requests that ended on a backend other than the first one chosen.
    pub failovers: IntCounterVec,
    /// Health transitions by pool, backend and new state (`up`, `down`).
    pub health_transitions: IntCounterVec,
    /// 1 when the backend is healthy, else 0.
    pub backend_up: IntGaugeVec,
    /// Requests refused by authentication, by pool and reason.
    pub auth_failures: IntCounterVec,
    /// Requests refused by a limit (429), by pool and limit (`rate`, `concurrency`, `streams`).
    pub limited: IntCounterVec,
    /// Time from choosing a backend to the end of its answer, POSTs only (streams last as
    /// long as the client wants), by pool and backend.
    pub backend_duration: HistogramVec,
    /// Requests and streams open on each backend (set at scrape time).
    pub backend_in_flight: IntGaugeVec,
    /// 1 while a backend drains (set at scrape time).
    pub backend_draining: IntGaugeVec,
    /// 1 while outlier detection ejects a backend (set at scrape time).
    pub backend_ejected: IntGaugeVec,
    /// Sessions that ended through the proxy: `deleted` (DELETE) or `gone` (404 from the backend).
    pub sessions_ended: IntCounterVec,
    /// Requests of a known session sent to another backend than its pin (the pinned one was
    /// down, draining or full), by pool.
    pub handoffs: IntCounterVec,
    /// List requests of `list_cache` pools by pool and result (`hit`, `miss`, `stored`).
    pub list_cache: IntCounterVec,
    /// Log lines dropped because stdout could not keep up.
    pub log_lines_dropped: IntCounter,
    log_drops: OnceLock<telemetry::LogDrops>,
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new("mcp_proxy_requests_total", "Requests proxied or answered"),
            &["pool", "backend", "status", "method"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "mcp_proxy_request_duration_seconds",
                "Time from request to the end of the response",
            )
            .buckets(BUCKETS.to_vec()),
            &["pool", "method"],
        )?;
        let backend_duration = HistogramVec::new(
            HistogramOpts::new(
                "mcp_proxy_backend_request_duration_seconds",
                "Time from choosing a backend to the end of its answer (POSTs)",
            )
            .buckets(BUCKETS.to_vec()),
            &["pool", "backend"],
        )?;
        let gauge =
            |name: &str, help: &str| IntGaugeVec::new(Opts::new(name, help), &["pool", "backend"]);
        let backend_in_flight = gauge(
            "mcp_proxy_backend_in_flight",
            "Requests and streams open on the backend",
        )?;
        let backend_draining = gauge("mcp_proxy_backend_draining", "1 while the backend drains")?;
        let backend_ejected = gauge(
            "mcp_proxy_backend_ejected",
            "1 while outlier detection ejects the backend",
        )?;
        let sessions_ended = IntCounterVec::new(
            Opts::new(
                "mcp_proxy_sessions_ended_total",
                "Sessions ended through the proxy (deleted, or gone on the backend)",
            ),
            &["pool", "reason"],
        )?;
        let handoffs = IntCounterVec::new(
            Opts::new(
                "mcp_proxy_session_handoffs_total",
                "Requests of a pinned session sent to another backend",
            ),
            &["pool"],
        )?;
        let list_cache = IntCounterVec::new(
            Opts::new(
                "mcp_proxy_list_cache_total",
                "List requests of list_cache pools: answered from the cache (hit), sent to a backend (miss), answers kept (stored)",
            ),
            &["pool", "result"],
        )?;
        let log_lines_dropped = IntCounter::new(
            "mcp_proxy_log_lines_dropped_total",
            "Log lines dropped because stdout could not keep up",
        )?;
        let sse_streams = IntGaugeVec::new(
            Opts::new("mcp_proxy_sse_streams_active", "Open SSE streams"),
            &["pool"],
        )?;
        let sessions = IntCounterVec::new(
            Opts::new("mcp_proxy_sessions_seen_total", "New MCP sessions seen"),
            &["pool"],
        )?;
        let retries = IntCounterVec::new(
            Opts::new(
                "mcp_proxy_retries_total",
                "Attempts repeated on another backend",
            ),
            &["pool", "reason"],
        )?;
        let failovers = IntCounterVec::new(
            Opts::new(
                "mcp_proxy_failovers_total",
                "Requests served by another backend than the first chosen",
            ),
            &["pool"],
        )?;
        let health_transitions = IntCounterVec::new(
            Opts::new(
                "mcp_proxy_health_transitions_total",
                "Backend health changes",
            ),
            &["pool", "backend", "state"],
        )?;
        let backend_up = IntGaugeVec::new(
            Opts::new("mcp_proxy_backend_up", "1 when the backend is healthy"),
            &["pool", "backend"],
        )?;
        let auth_failures = IntCounterVec::new(
            Opts::new(
                "mcp_proxy_auth_failures_total",
                "Requests refused by authentication",
            ),
            &["pool", "reason"],
        )?;
        let limited = IntCounterVec::new(
            Opts::new("mcp_proxy_limited_total", "Requests refused by a limit"),
            &["pool", "limit"],
        )?;
        registry.register(Box::new(auth_failures.clone()))?;
        registry.register(Box::new(limited.clone()))?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(sse_streams.clone()))?;
        registry.register(Box::new(sessions.clone()))?;
        registry.register(Box::new(retries.clone()))?;
        registry.register(Box::new(failovers.clone()))?;
        registry.register(Box::new(health_transitions.clone()))?;
        registry.register(Box::new(backend_up.clone()))?;
        registry.register(Box::new(backend_duration.clone()))?;
        registry.register(Box::new(backend_in_flight.clone()))?;
        registry.register(Box::new(backend_draining.clone()))?;
        registry.register(Box::new(backend_ejected.clone()))?;
        registry.register(Box::new(sessions_ended.clone()))?;
        registry.register(Box::new(handoffs.clone()))?;
        registry.register(Box::new(list_cache.clone()))?;
        registry.register(Box::new(log_lines_dropped.clone()))?;
        Ok(Self {
            registry,
            requests,
            duration,
            sse_streams,
            sessions,
            retries,
            failovers,
            health_transitions,
            backend_up,
            auth_failures,
            limited,
            backend_duration,
            backend_in_flight,
            backend_draining,
            backend_ejected,
            sessions_ended,
            handoffs,
            list_cache,
            log_lines_dropped,
            log_drops: OnceLock::new(),
        })
    }

    /// Counts the log lines the writer drops (set once at start).
    pub fn set_log_drops(&self, drops: telemetry::LogDrops) {
        let _ = self.log_drops.set(drops);
    }

    /// Sets the gauges read from live state, just before a scrape. Backends removed since
    /// the last scrape lose their series.
    pub fn refresh(&self, snapshot: &Snapshot) {
        self.backend_in_flight.reset();
        self.backend_draining.reset();
        self.backend_ejected.reset();
        let now = crate::outlier::now_ms();
        for p in &snapshot.pools {
            for b in &p.backends {
                let labels = [p.config.name.as_str(), b.name.as_str()];
                self.backend_in_flight
                    .with_label_values(&labels)
                    .set(b.active.load(Ordering::Relaxed));
                self.backend_draining
                    .with_label_values(&labels)
                    .set(i64::from(b.draining()));
                self.backend_ejected
                    .with_label_values(&labels)
                    .set(i64::from(b.outlier.ejected(now)));
            }
        }
        if let Some(d) = self.log_drops.get() {
            let seen = self.log_lines_dropped.get();
            self.log_lines_dropped
                .inc_by(d.count().saturating_sub(seen));
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "cannot encode metrics");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `mcp_proxy_*` metric the Grafana dashboard queries is one this registry defines
    /// (each is touched here once, since an untouched labelled metric is not rendered).
    #[test]
    fn the_dashboard_queries_only_metrics_that_exist() {
        let m = Metrics::new().unwrap();
        m.requests.with_label_values(&["p", "b", "200", "m"]).inc();
        m.duration.with_label_values(&["p", "m"]).observe(0.1);
        m.sse_streams.with_label_values(&["p"]).inc();
        m.sessions.with_label_values(&["p"]).inc();
        m.retries.with_label_values(&["p", "connect"]).inc();
        m.failovers.with_label_values(&["p"]).inc();
        m.health_transitions
            .with_label_values(&["p", "b", "up"])
            .inc();
        m.backend_up.with_label_values(&["p", "b"]).set(1);
        m.auth_failures.with_label_values(&["p", "r"]).inc();
        m.limited.with_label_values(&["p", "rate"]).inc();
        m.backend_duration
            .with_label_values(&["p", "b"])
            .observe(0.1);
        m.backend_in_flight.with_label_values(&["p", "b"]).set(1);
        m.backend_draining.with_label_values(&["p", "b"]).set(0);
        m.backend_ejected.with_label_values(&["p", "b"]).set(0);
        m.sessions_ended.with_label_values(&["p", "deleted"]).inc();
        m.handoffs.with_label_values(&["p"]).inc();
        m.list_cache.with_label_values(&["p", "hit"]).inc();
        m.log_lines_dropped.inc();
        let text = String::from_utf8(m.render()).unwrap();
        let defined: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split(' ').next())
            .collect();
        let dashboard = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../conf/grafana/mcp-edge.json"
        ))
        .unwrap();
        let used = telemetry::metric_names(&dashboard, "mcp_proxy_");
        assert!(used.len() >= 10, "{used:?}");
        for name in used {
            assert!(defined.contains(&name.as_str()), "{name} is not a metric");
        }
    }
}
