//! Logs and OpenTelemetry traces for `mcp-proxy` and `mcp-backend`: one setup for both.
//!
//! # Layout
//! - [`config`]: the `telemetry:` section of both config files, and the `OTEL_*` variables.
//! - [`logs`]: the log subscriber: text or JSON lines with the node id and trace id, written by
//!   a background thread so a slow stdout never blocks a request.
//! - [`access`]: the access line, built by hand (tracing's formatter cost a fifth of a request).
//! - [`writer`]: that thread and the bounded buffer the lines wait in, written out in batches.
//! - [`traces`]: the OTLP exporter (HTTP or gRPC), sampling, and W3C `traceparent` in and out.

pub mod access;
pub mod config;
pub mod logs;
pub mod traces;
pub(crate) mod writer;

pub use config::{Invalid, LogFormat, Protocol, TelemetryConfig};
pub use logs::LogDrops;
pub use traces::Tracing;

/// What [`init`] set up. At shutdown call `tracing.shutdown()` and drop `logs`: both send
/// what they still hold.
#[derive(Debug)]
pub struct Telemetry {
    pub tracing: Tracing,
    pub logs: logs::Guard,
}

/// Sets up logs and (when configured) trace export for `service` on node `node`. Call once, at
/// start; `RUST_LOG` overrides the configured level. `trust_traceparent` is the default for
/// `telemetry.trust_traceparent`: whether a caller's `traceparent` is a parent or a link;
/// `log_level` the filter when neither `RUST_LOG` nor `telemetry.log_level` is set.
pub fn init(
    config: &TelemetryConfig,
    service: &'static str,
    node: &str,
    trust_traceparent: bool,
    log_level: &str,
) -> anyhow::Result<Telemetry> {
    let tracing = traces::Tracing::new(config, service, node, trust_traceparent)?;
    let logs = logs::init(config, node, log_level)?;
    if tracing.enabled() {
        ::tracing::info!(
            endpoint = %tracing.endpoint(),
            "exporting traces over OTLP"
        );
    }
    Ok(Telemetry { tracing, logs })
}

/// The Prometheus metric names starting with `prefix` that `text` (a dashboard, a query)
/// mentions, histogram suffixes (`_bucket`, `_sum`, `_count`) removed. Both binaries' tests
/// check `conf/grafana/mcp-edge.json` with it.
pub fn metric_names(text: &str, prefix: &str) -> std::collections::BTreeSet<String> {
    text.match_indices(prefix)
        .map(|(i, _)| {
            let rest = &text[i..];
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            let name = &rest[..end];
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name)
                .to_owned()
        })
        .collect()
}

/// MCP methods that are metric labels under their own name; anything else is counted as
/// `other` (a client chooses the method: labels must stay bounded).
pub const METHOD_LABELS: &[&str] = &[
    "initialize",
    "ping",
    "tools/list",
    "tools/call",
    "resources/list",
    "resources/templates/list",
    "resources/read",
    "resources/subscribe",
    "resources/unsubscribe",
    "prompts/list",
    "prompts/get",
    "completion/complete",
    "logging/setLevel",
    "notifications/initialized",
    "notifications/cancelled",
    "notifications/progress",
    "notifications/roots/list_changed",
    "tasks/get",
    "tasks/list",
    "tasks/cancel",
    "tasks/result",
];

/// A bounded metric label for the MCP method `method`: itself when known, else `other`.
pub fn method_label(method: &str) -> &'static str {
    METHOD_LABELS
        .iter()
        .find(|m| **m == method)
        .copied()
        .unwrap_or("other")
}
