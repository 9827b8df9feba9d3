//! OpenTelemetry spans of one request: a server span for the request (MCP method and what it
//! names, hashed session id, principal, pool) and a client span per upstream attempt (backend,
//! attempt number, status), whose context goes upstream as W3C `traceparent`. Retries,
//! failovers and stream resumes are events on the request span. With traces off
//! (`telemetry:` unset) a request carries no [`Trace`] and none of this runs.

use opentelemetry::trace::{SpanKind, Status, TraceContextExt, Tracer as _};
use opentelemetry::{Context, KeyValue};
use telemetry::traces;

use crate::mcp::Peek;
use crate::state::Shared;

/// The spans of one request.
pub struct Trace {
    request: Context,
    attempt: Option<Context>,
}

impl Trace {
    /// Starts the request span, continuing or linking the caller's `traceparent`.
    pub fn start(shared: &Shared, req: &pingora::http::RequestHeader) -> Option<Self> {
        let tracing = shared.tracing()?;
        let tracer = tracing.tracer()?;
        let (parent, link) = tracing.incoming(&req.headers);
        let mut builder = tracer
            .span_builder(format!("{} {}", req.method, req.uri.path()))
            .with_kind(SpanKind::Server)
            .with_attributes([
                KeyValue::new("http.request.method", req.method.to_string()),
                KeyValue::new("url.path", req.uri.path().to_owned()),
            ]);
        if let Some(l) = link {
            builder = builder.with_links(vec![opentelemetry::trace::Link::with_context(l)]);
        }
        let span = builder.start_with_context(tracer, &parent);
        Some(Self {
            request: parent.with_span(span),
            attempt: None,
        })
    }

    /// What the request turned out to be, once routed and read.
    pub fn describe(
        &self,
        peek: &Peek,
        pool: &str,
        session: Option<&str>,
        principal: Option<&str>,
    ) {
        let span = self.request.span();
        if let Some(m) = &peek.method {
            let name = match &peek.target {
                Some(t) => format!("{m} {t}"),
                None => m.clone(),
            };
            span.update_name(name);
            span.set_attribute(KeyValue::new("mcp.method.name", m.clone()));
        }
        if let Some(t) = &peek.target {
            let key = match peek.method.as_deref() {
                Some("tools/call") => "gen_ai.tool.name",
                Some("prompts/get") => "gen_ai.prompt.name",
                _ => "mcp.resource.uri",
            };
            span.set_attribute(KeyValue::new(key, t.clone()));
        }
        if let Some(id) = &peek.id {
            span.set_attribute(KeyValue::new("jsonrpc.request.id", id.to_string()));
        }
        span.set_attribute(KeyValue::new("mcp_edge.pool", pool.to_owned()));
        if let Some(s) = session {
            span.set_attribute(KeyValue::new("mcp.session.id", traces::session_hash(s)));
        }
        if let Some(p) = principal {
            span.set_attribute(KeyValue::new("enduser.id", p.to_owned()));
        }
    }

    /// Starts the span of attempt `n` on `backend`, ending the previous one.
    pub fn attempt(&mut self, shared: &Shared, backend: &str, address: &str, n: usize) {
        self.end_attempt(None);
        let Some(tracer) = shared.tracing().and_then(|t| t.tracer()) else {
            return;
        };
        let span = tracer
            .span_builder(format!("upstream {backend}"))
            .with_kind(SpanKind::Client)
            .with_attributes([
                KeyValue::new("mcp_edge.backend", backend.to_owned()),
                KeyValue::new("server.address", address.to_owned()),
                KeyValue::new("mcp_edge.attempt", n as i64),
            ])
            .start_with_context(tracer, &self.request);
        if n > 1 {
            self.event(
                "retry",
                vec![
                    KeyValue::new("mcp_edge.backend", backend.to_owned()),
                    KeyValue::new("mcp_edge.attempt", n as i64),
                ],
            );
        }
        self.attempt = Some(self.request.with_span(span));
    }

    /// The attempt failed with `error` (it may be retried).
    pub fn attempt_failed(&mut self, error: &str) {
        self.end_attempt(Some(error));
    }

    /// The backend answered with `status`.
    pub fn response(&self, status: u16) {
        if let Some(a) = &self.attempt {
            let span = a.span();
            span.set_attribute(KeyValue::new("http.response.status_code", status as i64));
            if status >= 500 {
                span.set_status(Status::error(format!("status {status}")));
            }
        }
        self.request
            .span()
            .set_attribute(KeyValue::new("http.response.status_code", status as i64));
    }

    /// `traceparent` for the request going upstream: the current attempt's, else the
    /// request's (the stream relay and cut-POST resumes make their own requests).
    pub fn upstream_headers(&self) -> Vec<(&'static str, String)> {
        traces::outgoing(self.attempt.as_ref().unwrap_or(&self.request))
    }

    /// An event on the request span (`failover`, `stream resume`, `answer resumed`...).
    pub fn event(&self, name: &'static str, attributes: Vec<KeyValue>) {
        self.request.span().add_event(name, attributes);
    }

    /// Ends the spans: `status` as sent to the client, `error` when the request failed.
    pub fn finish(&mut self, status: u16, error: Option<&str>, failover: Option<(&str, &str)>) {
        self.end_attempt(error);
        let span = self.request.span();
        if let Some((from, to)) = failover {
            span.add_event(
                "failover",
                vec![
                    KeyValue::new("mcp_edge.from", from.to_owned()),
                    KeyValue::new("mcp_edge.to", to.to_owned()),
                ],
            );
        }
        if status > 0 {
            span.set_attribute(KeyValue::new("http.response.status_code", status as i64));
        }
        if status >= 500 || error.is_some() {
            span.set_status(Status::error(
                error.map_or_else(|| format!("status {status}"), str::to_owned),
            ));
        }
        span.end();
    }

    /// The trace id, for the access log.
    pub fn id(&self) -> Option<String> {
        traces::trace_id(&self.request)
    }

    fn end_attempt(&mut self, error: Option<&str>) {
        if let Some(a) = self.attempt.take() {
            let span = a.span();
            if let Some(e) = error {
                span.set_status(Status::error(e.to_owned()));
            }
            span.end();
        }
    }
}

impl Drop for Trace {
    /// A request dropped without `logging` (a panic, a dropped connection) still ends its spans.
    fn drop(&mut self) {
        self.end_attempt(None);
        self.request.span().end();
    }
}
