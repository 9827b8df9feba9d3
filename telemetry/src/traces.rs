//! Trace export over OTLP (HTTP/protobuf or gRPC) and W3C Trace Context in and out.
//!
//! Export runs on a small runtime of its own (one thread), so it works the same in pingora's
//! runtimes and in axum's, and a slow collector only fills the batch queue (2,048 spans; the
//! SDK drops what does not fit) instead of holding a request.

use std::time::Duration;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{SpanContext, TraceContextExt, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_http::{HeaderExtractor, HttpClient, HttpError};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig, WithTonicConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider};
use sha2::{Digest, Sha256};

use crate::config::{Protocol, TelemetryConfig};

pub use opentelemetry::trace::{Span, SpanKind, Status, Tracer};

/// The tracer when traces are on; `None` costs nothing per request.
pub struct Tracing {
    tracer: Option<SdkTracer>,
    provider: Option<SdkTracerProvider>,
    /// Runs the exporter's I/O; kept for the life of the process.
    _runtime: Option<tokio::runtime::Runtime>,
    endpoint: String,
    trust_traceparent: bool,
}

impl std::fmt::Debug for Tracing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracing")
            .field("enabled", &self.enabled())
            .field("endpoint", &self.endpoint)
            .finish()
    }
}

impl Tracing {
    /// Traces off.
    pub fn off() -> Self {
        Self {
            tracer: None,
            provider: None,
            _runtime: None,
            endpoint: String::new(),
            trust_traceparent: false,
        }
    }

    pub fn new(
        config: &TelemetryConfig,
        service: &'static str,
        node: &str,
        trust_by_default: bool,
    ) -> anyhow::Result<Self> {
        config.validate()?;
        let Some(mut endpoint) = config.endpoint() else {
            return Ok(Self::off());
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("otlp-export")
            .enable_all()
            .build()?;
        let exporter = {
            let _enter = runtime.enter();
            match config.protocol() {
                Protocol::Grpc => {
                    let mut b = opentelemetry_otlp::SpanExporter::builder()
                        .with_tonic()
                        .with_endpoint(endpoint.clone());
                    if !config.otlp_headers.is_empty() {
                        b = b.with_metadata(
                            opentelemetry_otlp::tonic_types::metadata::MetadataMap::from_headers(
                                header_map(&config.otlp_headers),
                            ),
                        );
                    }
                    b.build()?
                }
                Protocol::HttpProtobuf => {
                    if !endpoint.trim_end_matches('/').ends_with("/v1/traces") {
                        endpoint = format!("{}/v1/traces", endpoint.trim_end_matches('/'));
                    }
                    let mut b = opentelemetry_otlp::SpanExporter::builder()
                        .with_http()
                        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                        .with_http_client(Client {
                            client: reqwest::Client::builder()
                                .timeout(Duration::from_secs(10))
                                .build()?,
                            runtime: runtime.handle().clone(),
                        })
                        .with_endpoint(endpoint.clone());
                    if !config.otlp_headers.is_empty() {
                        b = b.with_headers(config.otlp_headers.clone().into_iter().collect());
                    }
                    b.build()?
                }
            }
        };
        let service_name = config
            .service_name
            .clone()
            .or_else(|| std::env::var("OTEL_SERVICE_NAME").ok())
            .unwrap_or_else(|| service.to_owned());
        let resource = opentelemetry_sdk::Resource::builder()
            .with_service_name(service_name)
            .with_attribute(KeyValue::new("service.instance.id", node.to_owned()))
            .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
            .build();
        let mut builder = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource);
        if let Some(ratio) = config.sample_ratio {
            builder = builder.with_sampler(Sampler::ParentBased(Box::new(
                Sampler::TraceIdRatioBased(ratio),
            )));
        }
        let provider = builder.build();
        let tracer = provider.tracer(service);
        Ok(Self {
            tracer: Some(tracer),
            provider: Some(provider),
            _runtime: Some(runtime),
            endpoint,
            trust_traceparent: config.trust_traceparent.unwrap_or(trust_by_default),
        })
    }

    pub fn enabled(&self) -> bool {
        self.tracer.is_some()
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    pub fn tracer(&self) -> Option<&SdkTracer> {
        self.tracer.as_ref()
    }

    /// The parent for a request with these headers, and the caller's span context when it is
    /// only linked (not trusted as a parent).
    pub fn incoming(&self, headers: &http::HeaderMap) -> (Context, Option<SpanContext>) {
        let caller = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
        let span = caller.span().span_context().clone();
        if !span.is_valid() {
            (Context::new(), None)
        } else if self.trust_traceparent {
            (caller, None)
        } else {
            (Context::new(), Some(span))
        }
    }

    /// Sends the spans still queued and stops the exporter (at exit).
    pub fn shutdown(&self) {
        if let Some(p) = &self.provider
            && let Err(e) = p.shutdown_with_timeout(Duration::from_secs(5))
        {
            tracing::warn!(error = %e, "could not send the last spans");
        }
    }
}

/// The configured collector headers (checked by `validate`).
fn header_map(headers: &std::collections::BTreeMap<String, String>) -> http::HeaderMap {
    headers
        .iter()
        .filter_map(|(k, v)| {
            Some((
                http::HeaderName::from_bytes(k.as_bytes()).ok()?,
                http::HeaderValue::from_str(v).ok()?,
            ))
        })
        .collect()
}

/// `traceparent` (and `tracestate`) for a request made inside `cx`.
pub fn outgoing(cx: &Context) -> Vec<(&'static str, String)> {
    let mut out = Vec::with_capacity(2);
    let mut carrier = std::collections::HashMap::new();
    TraceContextPropagator::new().inject_context(cx, &mut carrier);
    if let Some(v) = carrier.remove("traceparent") {
        out.push(("traceparent", v));
        if let Some(s) = carrier.remove("tracestate").filter(|s| !s.is_empty()) {
            out.push(("tracestate", s));
        }
    }
    out
}

/// The trace id of the span current on this thread, for log lines.
pub fn current_trace_id() -> Option<String> {
    let cx = Context::current();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

/// The trace id of `cx` in hex, or None.
pub fn trace_id(cx: &Context) -> Option<String> {
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

/// A session id as spans carry it: the first 16 hex digits of its SHA-256, enough to follow
/// one session across spans without handing the id itself to the collector.
pub fn session_hash(id: &str) -> String {
    let digest = Sha256::digest(id.as_bytes());
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// The OTLP/HTTP exporter's client: reqwest on the exporter's own runtime, whatever thread
/// the SDK's batch processor calls it from.
#[derive(Debug)]
struct Client {
    client: reqwest::Client,
    runtime: tokio::runtime::Handle,
}

#[async_trait::async_trait]
impl HttpClient for Client {
    async fn send_bytes(
        &self,
        request: http::Request<bytes::Bytes>,
    ) -> Result<http::Response<bytes::Bytes>, HttpError> {
        let client = self.client.clone();
        let request = reqwest::Request::try_from(request)?;
        self.runtime
            .spawn(async move {
                let response = client.execute(request).await?;
                let mut out = http::Response::builder().status(response.status());
                for (k, v) in response.headers() {
                    out = out.header(k, v);
                }
                let body = response.bytes().await?;
                Ok::<_, HttpError>(out.body(body)?)
            })
            .await?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_hashes_are_short_and_stable() {
        let h = session_hash("abc");
        assert_eq!(h.len(), 16);
        assert_eq!(h, session_hash("abc"));
        assert_ne!(h, session_hash("abd"));
    }

    #[test]
    fn a_caller_trace_is_linked_unless_trusted() {
        let mut headers = http::HeaderMap::new();
        headers.insert(
            "traceparent",
            http::HeaderValue::from_static(
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            ),
        );
        let mut t = Tracing::off();
        let (parent, link) = t.incoming(&headers);
        assert!(!parent.span().span_context().is_valid());
        assert_eq!(
            link.map(|l| l.trace_id().to_string()).as_deref(),
            Some("0af7651916cd43dd8448eb211c80319c")
        );
        t.trust_traceparent = true;
        let (parent, link) = t.incoming(&headers);
        assert!(link.is_none());
        assert_eq!(
            trace_id(&parent).as_deref(),
            Some("0af7651916cd43dd8448eb211c80319c")
        );
        let out = outgoing(&parent);
        assert_eq!(out[0].0, "traceparent");
        assert!(out[0].1.contains("0af7651916cd43dd8448eb211c80319c"));
        // Garbage is no parent and no link.
        headers.insert("traceparent", http::HeaderValue::from_static("00-zz-01"));
        assert!(
            t.incoming(&headers).0.span().span_context().trace_id()
                == opentelemetry::trace::TraceId::INVALID
        );
    }
}
