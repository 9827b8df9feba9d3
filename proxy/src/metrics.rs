//! Prometheus metrics, served on the admin listener at `/metrics`. Label values are bounded:
//! pools and backends come from the config, methods from [`crate::mcp::method_label`].

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

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
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
                60.0,
            ]),
            &["pool", "method"],
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
        })
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
