//! An OTLP trace receiver for tests, on the official protobuf definitions
//! (`opentelemetry-proto`): HTTP (`POST /v1/traces`, protobuf) and gRPC (`TraceService/Export`)
//! on one free port. It keeps every span it is sent.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use axum::body::Bytes;
use axum::response::IntoResponse;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message;

/// One received span, flattened.
#[derive(Debug, Clone)]
pub struct Span {
    pub service: String,
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent: String,
    pub name: String,
    /// 1 internal, 2 server, 3 client.
    pub kind: i32,
    pub attributes: BTreeMap<String, String>,
    pub events: Vec<String>,
    /// Trace ids of the span's links.
    pub links: Vec<String>,
    /// 2 is error.
    pub status: i32,
}

impl Span {
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

#[derive(Clone, Default)]
struct Store(Arc<Mutex<Vec<Span>>>);

impl Store {
    fn add(&self, request: ExportTraceServiceRequest) {
        let mut out = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for rs in request.resource_spans {
            let service = rs
                .resource
                .as_ref()
                .and_then(|r| flat(&r.attributes).remove("service.name"))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    out.push(Span {
                        service: service.clone(),
                        trace_id: hex(&s.trace_id),
                        span_id: hex(&s.span_id),
                        parent: hex(&s.parent_span_id),
                        name: s.name,
                        kind: s.kind,
                        attributes: flat(&s.attributes),
                        events: s.events.into_iter().map(|e| e.name).collect(),
                        links: s.links.iter().map(|l| hex(&l.trace_id)).collect(),
                        status: s.status.map_or(0, |st| st.code),
                    });
                }
            }
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn flat(attributes: &[KeyValue]) -> BTreeMap<String, String> {
    attributes
        .iter()
        .map(|kv| {
            let v = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(AnyValue::StringValue(s)) => s.clone(),
                Some(AnyValue::IntValue(i)) => i.to_string(),
                Some(AnyValue::BoolValue(b)) => b.to_string(),
                Some(AnyValue::DoubleValue(d)) => d.to_string(),
                other => format!("{other:?}"),
            };
            (kv.key.clone(), v)
        })
        .collect()
}

#[tonic::async_trait]
impl TraceService for Store {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.add(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// The receiver; it stops when dropped.
pub struct Collector {
    pub port: u16,
    store: Store,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Collector {
    pub async fn start() -> Result<Self> {
        let store = Store::default();
        let http = store.clone();
        let app = axum::Router::new()
            .route(
                "/v1/traces",
                axum::routing::post(move |body: Bytes| {
                    let http = http.clone();
                    async move {
                        match ExportTraceServiceRequest::decode(body) {
                            Ok(r) => {
                                http.add(r);
                                (
                                    [(http::header::CONTENT_TYPE, "application/x-protobuf")],
                                    ExportTraceServiceResponse::default().encode_to_vec(),
                                )
                                    .into_response()
                            }
                            Err(_) => http::StatusCode::BAD_REQUEST.into_response(),
                        }
                    }
                }),
            )
            .route_service(
                "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
                TraceServiceServer::new(store.clone()),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { port, store, task })
    }

    /// The base URL (`http://127.0.0.1:port`), for HTTP and gRPC alike.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn spans(&self) -> Vec<Span> {
        self.store
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits (up to `limit`) until `ready` holds for the spans received.
    pub async fn wait_for(
        &self,
        limit: Duration,
        what: &str,
        ready: impl Fn(&[Span]) -> bool,
    ) -> Result<Vec<Span>> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let spans = self.spans();
            if ready(&spans) {
                return Ok(spans);
            }
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!(
                    "no {what} within {limit:?}; received: {:#?}",
                    spans
                        .iter()
                        .map(|s| format!("{} {} {}", s.service, s.name, s.trace_id))
                        .collect::<Vec<_>>()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
