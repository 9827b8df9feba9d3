//! Prometheus metrics of one replica, served at `/metrics` on its own port. One registry per
//! process ([`metrics()`]). Label values are bounded: MCP methods from a fixed list, tools
//! from the tools this server serves, Redis operations from the engine's own names; never a
//! session id or another client-chosen string.

use std::sync::LazyLock;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

/// Latency buckets, in seconds: Redis round trips start well under a millisecond.
const BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    10.0, 60.0,
];

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// POSTs by MCP method and HTTP status.
    pub requests: IntCounterVec,
    /// Time to the response head, by MCP method.
    pub request_duration: HistogramVec,
    /// `tools/call` by tool and outcome (`ok`, `error`).
    pub tool_calls: IntCounterVec,
    /// Time a tool ran, by tool.
    pub tool_duration: HistogramVec,
    /// Sessions created here.
    pub sessions_created: IntCounter,
    /// Sessions this replica took over from the store (created elsewhere, or before a
    /// restart, or its worker was evicted).
    pub sessions_restored: IntCounter,
    /// Sessions ended here (`deleted`).
    pub sessions_ended: IntCounterVec,
    /// Session workers in memory (set at scrape time).
    pub workers: IntGauge,
    /// Sessions in the store, all replicas (set at scrape time; -1 when the store cannot say).
    pub sessions_active: IntGauge,
    /// Store round trips by operation.
    pub store_duration: HistogramVec,
    /// Store operations that failed or timed out, by operation.
    pub store_errors: IntCounterVec,
    /// Messages a local listener missed because it fell behind the bus (it re-reads the log).
    pub bus_lagged: IntCounter,
    /// Bus subscriptions lost and made again.
    pub bus_reconnects: IntCounter,
    /// Tasks by event: `created`, `refused` (a limit), how the ones run here ended
    /// (`completed`, `failed`, `cancelled`, or `lost`: no longer ours, its lease lost or its
    /// record expired), and two markers within those: `stopped` (cancelled work that ignored
    /// the cancel) and `shutdown` (failed because this replica left).
    pub tasks: IntCounterVec,
    /// Tasks running on this replica (set at scrape time).
    pub tasks_running: IntGauge,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    #[allow(clippy::expect_used)]
    Metrics::new().expect("metric names and labels are valid")
});

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    &METRICS
}

/// A bounded label for an MCP method (notifications are all `notification`, see `http.rs`).
pub use telemetry::method_label;

impl Metrics {
    fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(c.clone()))?;
            Ok::<_, prometheus::Error>(c)
        };
        let histogram = |name: &str, help: &str, labels: &[&str]| {
            let h = HistogramVec::new(
                HistogramOpts::new(name, help).buckets(BUCKETS.to_vec()),
                labels,
            )?;
            registry.register(Box::new(h.clone()))?;
            Ok::<_, prometheus::Error>(h)
        };
        let single = |name: &str, help: &str| {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok::<_, prometheus::Error>(c)
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok::<_, prometheus::Error>(g)
        };
        Ok(Self {
            requests: counter(
                "mcp_backend_requests_total",
                "MCP POSTs by method and HTTP status",
                &["method", "status"],
            )?,
            request_duration: histogram(
                "mcp_backend_request_duration_seconds",
                "Time to the response head, by MCP method",
                &["method"],
            )?,
            tool_calls: counter(
                "mcp_backend_tool_calls_total",
                "Tool calls by tool and outcome",
                &["tool", "outcome"],
            )?,
            tool_duration: histogram(
                "mcp_backend_tool_duration_seconds",
                "Time a tool ran",
                &["tool"],
            )?,
            sessions_created: single(
                "mcp_backend_sessions_created_total",
                "Sessions created on this replica",
            )?,
            sessions_restored: single(
                "mcp_backend_sessions_restored_total",
                "Sessions this replica restored from the store",
            )?,
            sessions_ended: counter(
                "mcp_backend_sessions_ended_total",
                "Sessions ended on this replica",
                &["reason"],
            )?,
            workers: gauge(
                "mcp_backend_session_workers",
                "Session workers in this replica's memory",
            )?,
            sessions_active: gauge(
                "mcp_backend_sessions_active",
                "Sessions in the store (all replicas)",
            )?,
            store_duration: histogram(
                "mcp_backend_store_duration_seconds",
                "Store (Redis) round trips by operation",
                &["op"],
            )?,
            store_errors: counter(
                "mcp_backend_store_errors_total",
                "Store operations that failed or timed out",
                &["op"],
            )?,
            bus_lagged: single(
                "mcp_backend_bus_lagged_messages_total",
                "Bus messages a local listener missed (it re-reads the log)",
            )?,
            bus_reconnects: single(
                "mcp_backend_bus_reconnects_total",
                "Bus subscriptions lost and made again",
            )?,
            tasks: counter(
                "mcp_backend_tasks_total",
                "Tasks created or refused here, and how the ones run here ended",
                &["event"],
            )?,
            tasks_running: gauge("mcp_backend_tasks_running", "Tasks running on this replica")?,
            registry,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_labels_are_bounded() {
        assert_eq!(method_label("tools/call"), "tools/call");
        assert_eq!(method_label("x/../../etc"), "other");
        assert_eq!(method_label(""), "other");
    }

    /// Every `mcp_backend_*` metric the Grafana dashboard queries is one this registry
    /// defines.
    #[test]
    fn the_dashboard_queries_only_metrics_that_exist() {
        let m = metrics();
        m.requests.with_label_values(&["ping", "200"]).inc();
        m.request_duration.with_label_values(&["ping"]).observe(0.1);
        m.tool_calls.with_label_values(&["echo", "ok"]).inc();
        m.tool_duration.with_label_values(&["echo"]).observe(0.1);
        m.sessions_ended.with_label_values(&["deleted"]).inc();
        m.store_duration.with_label_values(&["touch"]).observe(0.1);
        m.store_errors.with_label_values(&["touch"]).inc();
        m.tasks.with_label_values(&["created"]).inc();
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
        let used = telemetry::metric_names(&dashboard, "mcp_backend_");
        assert!(used.len() >= 10, "{used:?}");
        for name in used {
            assert!(defined.contains(&name.as_str()), "{name} is not a metric");
        }
    }

    #[test]
    fn every_metric_renders_once_touched() {
        let m = metrics();
        m.sessions_created.inc();
        m.store_duration
            .with_label_values(&["touch"])
            .observe(0.001);
        let text = String::from_utf8(m.render()).unwrap();
        assert!(text.contains("mcp_backend_sessions_created_total"));
        assert!(text.contains("mcp_backend_store_duration_seconds_bucket{op=\"touch\""));
        assert!(text.contains("mcp_backend_session_workers"));
    }
}
