//! OpenTelemetry spans of one replica: a server span per HTTP request, continuing the proxy's
//! `traceparent`; a span per tool call; a span per store round trip. The request's context
//! rides in the request's extensions (for the tool handler, which rmcp runs in the session's
//! worker task) and around the request's future (for the store calls made in the request task).
//! With traces off (`telemetry:` unset) nothing here runs but a check of a `OnceLock`.

use std::sync::{Arc, OnceLock};

use opentelemetry::trace::{SpanKind, Status, TraceContextExt, Tracer as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::trace::SdkTracer;

static TRACING: OnceLock<Arc<telemetry::Tracing>> = OnceLock::new();

/// Turns traces on (once, at start).
pub fn set(tracing: Arc<telemetry::Tracing>) {
    if tracing.enabled() {
        let _ = TRACING.set(tracing);
    }
}

fn tracer() -> Option<&'static SdkTracer> {
    TRACING.get().and_then(|t| t.tracer())
}

/// The server span of a request with these headers, as the context its work runs in.
pub fn request(method: &http::Method, path: &str, headers: &http::HeaderMap) -> Option<Context> {
    let tracing = TRACING.get()?;
    let tracer = tracing.tracer()?;
    let (parent, link) = tracing.incoming(headers);
    let mut builder = tracer
        .span_builder(format!("{method} {path}"))
        .with_kind(SpanKind::Server)
        .with_attributes([
            KeyValue::new("http.request.method", method.to_string()),
            KeyValue::new("url.path", path.to_owned()),
        ]);
    if let Some(l) = link {
        builder = builder.with_links(vec![opentelemetry::trace::Link::with_context(l)]);
    }
    let span = builder.start_with_context(tracer, &parent);
    Some(parent.with_span(span))
}

/// Names the request span after its MCP method and what it names, once the body is read.
pub fn describe(cx: &Context, method: &str, target: Option<&str>, session: Option<&str>) {
    let span = cx.span();
    span.update_name(match target {
        Some(t) => format!("{method} {t}"),
        None => method.to_owned(),
    });
    span.set_attribute(KeyValue::new("mcp.method.name", method.to_owned()));
    if let Some(t) = target {
        let key = match method {
            "tools/call" => "gen_ai.tool.name",
            "prompts/get" => "gen_ai.prompt.name",
            _ => "mcp.resource.uri",
        };
        span.set_attribute(KeyValue::new(key, t.to_owned()));
    }
    if let Some(s) = session {
        span.set_attribute(KeyValue::new(
            "mcp.session.id",
            telemetry::traces::session_hash(s),
        ));
    }
}

/// Ends the request span with the response status.
pub fn finish(cx: &Context, status: u16) {
    let span = cx.span();
    span.set_attribute(KeyValue::new(
        "http.response.status_code",
        i64::from(status),
    ));
    if status >= 500 {
        span.set_status(Status::error(format!("status {status}")));
    }
    span.end();
}

/// A child span of `parent` (or of the current context), for a tool call or a store round
/// trip; `None` when traces are off or nothing is being traced.
pub fn child(parent: Option<&Context>, name: String, attributes: Vec<KeyValue>) -> Option<Context> {
    let tracer = tracer()?;
    let current;
    let parent = match parent {
        Some(p) => p,
        None => {
            current = Context::current();
            &current
        }
    };
    if !parent.span().span_context().is_valid() {
        return None;
    }
    let span = tracer
        .span_builder(name)
        .with_kind(SpanKind::Internal)
        .with_attributes(attributes)
        .start_with_context(tracer, parent);
    Some(parent.with_span(span))
}

/// Ends a span from [`child`], marking `error` on it.
pub fn end(cx: Option<Context>, error: Option<&str>) {
    if let Some(cx) = cx {
        let span = cx.span();
        if let Some(e) = error {
            span.set_status(Status::error(e.to_owned()));
        }
        span.end();
    }
}
