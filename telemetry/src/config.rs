//! The `telemetry:` section, the same in `conf/proxy.yaml` and `conf/backend.yaml`.
//!
//! Traces are off unless an endpoint is configured here or in `OTEL_EXPORTER_OTLP_ENDPOINT` /
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`; `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`
//! turn them off whatever the file says. Values in the file win over the variables.

use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Protocol {
    #[serde(rename = "grpc")]
    Grpc,
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// `text` or `json` lines on stdout (`LOG_FORMAT=json` still works when this is unset).
    pub log_format: Option<LogFormat>,
    /// The log level or filter (`info`, `warn,access=off`); `RUST_LOG` wins. Unset: `info`
    /// (`info,rmcp=warn` for the backend).
    pub log_level: Option<String>,
    /// Log lines held for a slow stdout before new ones are dropped (and counted); the
    /// buffer is also bounded to this many KiB.
    pub log_buffer_lines: usize,
    /// The OTLP collector: `http://host:4317` for gRPC, `http://host:4318` for HTTP (the
    /// signal path `/v1/traces` is added when missing).
    pub otlp_endpoint: Option<String>,
    /// `grpc` or `http/protobuf`; else `OTEL_EXPORTER_OTLP_PROTOCOL`; else `http/protobuf`.
    pub otlp_protocol: Option<Protocol>,
    /// Headers sent to the collector (e.g. an API key); else `OTEL_EXPORTER_OTLP_HEADERS`.
    pub otlp_headers: std::collections::BTreeMap<String, String>,
    /// Fraction of new traces sampled, 0.0 to 1.0; a trace continued from a trusted parent
    /// follows the parent's decision. Unset: `OTEL_TRACES_SAMPLER`(`_ARG`), else 1.0.
    pub sample_ratio: Option<f64>,
    /// Continue the caller's trace from its `traceparent`. Unset: the proxy starts a new
    /// trace and links the caller's (an edge does not let clients choose its sampling); the
    /// backend continues the proxy's.
    pub trust_traceparent: Option<bool>,
    /// `service.name`; else `OTEL_SERVICE_NAME`; else `mcp-proxy` / `mcp-backend`.
    pub service_name: Option<String>,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            log_format: None,
            log_level: None,
            log_buffer_lines: 65_536,
            otlp_endpoint: None,
            otlp_protocol: None,
            otlp_headers: Default::default(),
            sample_ratio: None,
            trust_traceparent: None,
            service_name: None,
        }
    }
}

/// A value the section refuses: its key (`telemetry.sample_ratio`), the value, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub key: String,
    pub value: String,
    pub message: String,
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {} (got {:?})", self.key, self.message, self.value)
    }
}

impl std::error::Error for Invalid {}

fn invalid(key: &str, value: impl ToString, message: impl Into<String>) -> Invalid {
    Invalid {
        key: format!("telemetry.{key}"),
        value: value.to_string(),
        message: message.into(),
    }
}

impl TelemetryConfig {
    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), Invalid> {
        if let Some(r) = self.sample_ratio
            && !(0.0..=1.0).contains(&r)
        {
            return Err(invalid("sample_ratio", r, "must be between 0.0 and 1.0"));
        }
        if let Some(e) = &self.otlp_endpoint
            && !(e.starts_with("http://") || e.starts_with("https://"))
        {
            return Err(invalid(
                "otlp_endpoint",
                e,
                "must start with http:// or https://",
            ));
        }
        if self.log_buffer_lines == 0 {
            return Err(invalid("log_buffer_lines", 0, "must be at least 1"));
        }
        if let Some(level) = &self.log_level {
            tracing_subscriber::EnvFilter::try_new(level)
                .map_err(|e| invalid("log_level", level, e.to_string()))?;
        }
        for (k, v) in &self.otlp_headers {
            if http::HeaderName::from_bytes(k.as_bytes()).is_err() {
                return Err(invalid("otlp_headers", k, "not a header name"));
            }
            if http::HeaderValue::from_str(v).is_err() {
                return Err(invalid(
                    &format!("otlp_headers.{k}"),
                    "(hidden)",
                    "not a valid header value",
                ));
            }
        }
        Ok(())
    }

    pub fn format(&self) -> LogFormat {
        self.log_format.unwrap_or_else(|| {
            if std::env::var("LOG_FORMAT").is_ok_and(|f| f == "json") {
                LogFormat::Json
            } else {
                LogFormat::Text
            }
        })
    }

    /// The collector endpoint, or None when traces are off.
    pub fn endpoint(&self) -> Option<String> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        if env("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"))
            || env("OTEL_TRACES_EXPORTER").is_some_and(|v| v.eq_ignore_ascii_case("none"))
        {
            return None;
        }
        self.otlp_endpoint
            .clone()
            .or_else(|| env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
            .or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT"))
    }

    pub fn protocol(&self) -> Protocol {
        self.otlp_protocol.unwrap_or_else(|| {
            let env = std::env::var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                .or_else(|_| std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL"));
            match env.as_deref() {
                Ok("grpc") => Protocol::Grpc,
                _ => Protocol::HttpProtobuf,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_values_are_named() {
        let c = TelemetryConfig {
            sample_ratio: Some(1.5),
            ..Default::default()
        };
        let e = c.validate().unwrap_err();
        assert_eq!(
            (e.key.as_str(), e.value.as_str()),
            ("telemetry.sample_ratio", "1.5")
        );
        let c = TelemetryConfig {
            otlp_endpoint: Some("collector:4317".into()),
            ..Default::default()
        };
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("collector:4317")
        );
        let c = TelemetryConfig {
            log_level: Some("info,[".into()),
            ..Default::default()
        };
        assert_eq!(c.validate().unwrap_err().key, "telemetry.log_level");
        assert!(TelemetryConfig::default().validate().is_ok());
    }

    #[test]
    fn unknown_keys_are_refused() {
        let e = serde_yaml::from_str::<TelemetryConfig>("otlp_endpoint: http://x\nsampling: 1\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("sampling"), "{e}");
        let c: TelemetryConfig =
            serde_yaml::from_str("otlp_protocol: grpc\nlog_format: json\n").unwrap();
        assert_eq!(c.otlp_protocol, Some(Protocol::Grpc));
        assert_eq!(c.format(), LogFormat::Json);
    }
}
