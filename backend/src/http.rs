//! HTTP surface: `/mcp` (rmcp's Streamable HTTP service behind our guard), the 2024-11-05
//! routes, and the operations endpoints.
//!
//! The guard fixes what rmcp alone gets wrong for a replicated deployment:
//! - a session id is checked against the shared store on every request (sliding TTL): deleted
//!   or expired anywhere means 404 everywhere, and Redis down means 503 with `Retry-After`,
//!   never 404;
//! - malformed JSON is 400 with JSON-RPC -32700 (rmcp says 415), an invalid message -32600;
//! - `DELETE` removes the shared record first and answers 200 (rmcp answers 202, which the
//!   Python SDK client logs as a failure);
//! - `Host` and `Origin` are checked once here, for `/mcp` and the legacy routes alike;
//! - the caller's principal is verified here (see [`crate::principal`]) and every request that
//!   names a session must come from the session's owner: another principal's session answers
//!   exactly as an unknown one (404, same body), so ids cannot be probed;
//! - a principal's new sessions are bound to it before the client learns their id, within
//!   `max_sessions_per_principal` (429 with `Retry-After` beyond).
//!
//! `GET /sessions` and `DELETE /sessions/{id}` need `Authorization: Bearer
//! <operations_token>`; without a configured token they do not exist (404).
// A ready error response is the natural error type of these request checks.
#![allow(clippy::result_large_err)]

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use axum::{
    Json, Router,
    body::Body,
    extract::{Path, Query, Request, State},
    http::{HeaderMap, HeaderValue, Method, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{delete, get, post},
};
use opentelemetry::trace::FutureExt as _;
use rmcp::{
    model::{ClientJsonRpcMessage, ClientRequest, ProtocolVersion},
    transport::{StreamableHttpServerConfig, StreamableHttpService},
};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::{
    Node,
    handler::{Handler, VERSION},
    legacy,
    principal::{self, Caller, PrincipalError, Verifier},
    sessions::{RecordStore, ReplicaSessions, with_prefetched_init},
    store::{Access, Admission, StoreError, now_ms, watch_failures},
};

/// Longest session id accepted (ours are 32 hex characters).
pub const MAX_SESSION_ID_LEN: usize = 128;
/// `Retry-After` seconds sent with 503.
const RETRY_AFTER_SECONDS: &str = "1";
/// JSON-RPC error code of a refused `initialize` beyond `max_sessions_per_principal`.
pub const TOO_MANY_SESSIONS: i32 = -32000;

/// State shared by the routes.
#[derive(Clone)]
pub struct AppState {
    pub node: Arc<Node>,
    pub sessions: Arc<ReplicaSessions>,
    pub legacy: Arc<legacy::LegacySessions>,
    /// `None`: no `principal_secret`, every caller is anonymous.
    pub principals: Option<Arc<Verifier>>,
}

/// The whole HTTP application of one replica.
pub fn app(node: Arc<Node>) -> Router {
    let sessions = ReplicaSessions::new(node.clone());
    let config = StreamableHttpServerConfig::default()
        .with_sse_keep_alive(Some(node.config.sse_keep_alive))
        .with_cancellation_token(node.stop.child_token())
        .with_max_request_body_bytes(node.config.max_body_bytes)
        // Checked by `guard` for every MCP route, with the configured lists.
        .disable_allowed_hosts()
        .disable_allowed_origins();
    let mut config = config;
    config.session_store = Some(Arc::new(RecordStore(node.store.clone())));
    let factory_node = node.clone();
    let mcp = StreamableHttpService::new(
        move || Ok(Handler::new(factory_node.clone())),
        sessions.clone(),
        config,
    );
    let state = AppState {
        legacy: legacy::LegacySessions::new(node.clone(), sessions.clone()),
        principals: Verifier::from_config(&node.config).map(Arc::new),
        node,
        sessions,
    };
    let mcp_routes = Router::new()
        .route_service("/mcp", mcp)
        .route("/sse", get(legacy::open_stream))
        .route("/messages", post(legacy::post_message))
        .route_layer(middleware::from_fn_with_state(state.clone(), observe));
    let operations = Router::new()
        .route("/sessions", get(list_sessions))
        .route("/sessions/{id}", delete(delete_session_route))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            operations_auth,
        ));
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .merge(operations)
        .merge(mcp_routes)
        .with_state(state)
}

/// What a POST's body says, for metrics and traces.
#[derive(Debug, Default)]
struct Rpc {
    /// A bounded label (`crate::metrics::method_label`).
    method: &'static str,
    /// The tool, prompt or resource named (client-chosen: traces only, never a label).
    target: Option<String>,
}

/// Spans and metrics around [`guard`]: the request runs inside its span's context, so store
/// round trips and the tool call (through the request's extensions) become its children.
async fn observe(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    let started = std::time::Instant::now();
    let cx = crate::trace::request(request.method(), request.uri().path(), request.headers());
    let post = request.method() == Method::POST;
    let session = request
        .headers()
        .get("mcp-session-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let rpc = Arc::new(std::sync::Mutex::new(Rpc::default()));
    request.extensions_mut().insert(RpcSlot(rpc.clone()));
    let response = match &cx {
        Some(cx) => {
            request.extensions_mut().insert(cx.clone());
            guard(State(state), request, next)
                .with_context(cx.clone())
                .await
        }
        None => guard(State(state), request, next).await,
    };
    let status = response.status().as_u16();
    let rpc = std::mem::take(&mut *rpc.lock().unwrap_or_else(|e| e.into_inner()));
    if post {
        let method = if rpc.method.is_empty() {
            "other"
        } else {
            rpc.method
        };
        let m = crate::metrics::metrics();
        m.requests
            .with_label_values(&[method, &status.to_string()])
            .inc();
        m.request_duration
            .with_label_values(&[method])
            .observe(started.elapsed().as_secs_f64());
    }
    if let Some(cx) = cx {
        if !rpc.method.is_empty() {
            crate::trace::describe(&cx, rpc.method, rpc.target.as_deref(), session.as_deref());
        }
        crate::trace::finish(&cx, status);
    }
    response
}

/// Where [`guard`] leaves what the body said, for [`observe`].
#[derive(Clone)]
struct RpcSlot(Arc<std::sync::Mutex<Rpc>>);

/// The backend's Prometheus metrics (see `metrics.rs`).
async fn metrics(State(state): State<AppState>) -> Response {
    let m = crate::metrics::metrics();
    m.workers.set(state.sessions.local_count().await as i64);
    m.tasks_running.set(state.node.tasks.running() as i64);
    let active = tokio::time::timeout(state.node.config.redis_timeout, state.node.store.count())
        .await
        .ok()
        .and_then(Result::ok)
        .map_or(-1, |n| n as i64);
    m.sessions_active.set(active);
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        m.render(),
    )
        .into_response()
}

/// A JSON-RPC error response with an HTTP status (503 also gets `Retry-After`).
pub fn rpc_error(
    status: StatusCode,
    code: i32,
    message: impl Into<String>,
    id: Option<Value>,
) -> Response {
    let body = json!({
        "jsonrpc": "2.0",
        "id": id.unwrap_or(Value::Null),
        "error": {"code": code, "message": message.into()},
    });
    let mut response = (status, Json(body)).into_response();
    if status == StatusCode::SERVICE_UNAVAILABLE {
        response.headers_mut().insert(
            header::RETRY_AFTER,
            HeaderValue::from_static(RETRY_AFTER_SECONDS),
        );
    }
    response
}

/// 503 for a store that did not answer.
pub fn unavailable(e: &StoreError) -> Response {
    tracing::warn!(error = %e, "session store unavailable");
    rpc_error(
        StatusCode::SERVICE_UNAVAILABLE,
        -32603,
        "session store unavailable, retry shortly",
        None,
    )
}

/// 404 for a session that does not exist (anymore): the client re-initializes. Also the
/// answer for another principal's session, byte for byte.
pub fn session_not_found() -> Response {
    rpc_error(StatusCode::NOT_FOUND, -32001, "session not found", None)
}

/// The 404 for a live session named by someone who does not own it, logged as a security
/// event (short ids only: a full session id is a credential).
pub fn foreign_session(id: &str, caller: &Caller) -> Response {
    tracing::warn!(
        target: "security",
        session = short_id(id),
        principal = caller.owner().map(short_id).unwrap_or("anonymous"),
        "session used by another principal"
    );
    session_not_found()
}

/// 429 for a principal at `max_sessions_per_principal`; `retry_after`: until its oldest
/// session expires.
pub fn too_many_sessions(limit: u64, retry_after: Duration, id: Option<Value>) -> Response {
    let mut response = rpc_error(
        StatusCode::TOO_MANY_REQUESTS,
        TOO_MANY_SESSIONS,
        format!("too many sessions for this principal (max_sessions_per_principal: {limit})"),
        id,
    );
    let seconds = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
    response
}

/// Session ids are visible ASCII (0x21-0x7E) and bounded.
pub fn valid_session_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_SESSION_ID_LEN
        && id.bytes().all(|b| (0x21..=0x7e).contains(&b))
}

/// Shortened id for logs and listings.
pub fn short_id(id: &str) -> &str {
    id.get(..8).unwrap_or(id)
}

fn host_allowed(allowed: &[String], headers: &HeaderMap) -> bool {
    if allowed.is_empty() {
        return true;
    }
    let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
        return false;
    };
    let host = host.to_ascii_lowercase();
    let name = match host.rsplit_once(':') {
        Some((n, port)) if port.bytes().all(|b| b.is_ascii_digit()) && !n.ends_with(':') => n,
        _ => host.as_str(),
    };
    let name = name.trim_matches(['[', ']']);
    allowed.iter().any(|a| {
        let a = a.to_ascii_lowercase();
        a == host || a.trim_matches(['[', ']']) == name
    })
}

fn origin_allowed(allowed: &[String], headers: &HeaderMap) -> bool {
    if allowed.is_empty() {
        return true;
    }
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let Ok(origin) = origin.to_str() else {
        return false;
    };
    let origin = origin.trim_end_matches('/').to_ascii_lowercase();
    allowed.iter().any(|a| {
        let a = a.to_ascii_lowercase();
        match a.strip_suffix(":*") {
            Some(base) => {
                origin == base
                    || origin
                        .strip_prefix(base)
                        .and_then(|rest| rest.strip_prefix(':'))
                        .is_some_and(|port| port.bytes().all(|b| b.is_ascii_digit()))
            }
            None => origin == a,
        }
    })
}

/// The session id header, if present: `Err` when present but malformed.
fn session_header(headers: &HeaderMap) -> Result<Option<String>, Response> {
    let Some(value) = headers.get("mcp-session-id") else {
        return Ok(None);
    };
    match value.to_str() {
        Ok(id) if valid_session_id(id) => Ok(Some(id.to_owned())),
        _ => Err(rpc_error(
            StatusCode::BAD_REQUEST,
            -32600,
            "invalid Mcp-Session-Id: visible ASCII only, at most 128 characters",
            None,
        )),
    }
}

/// Classifies a POST body: `Ok(Some(request id))` for `initialize`, `Ok(None)` for any other
/// message, or the error response.
fn check_body(headers: &HeaderMap, body: &[u8]) -> Result<(Option<Value>, Rpc), Response> {
    match serde_json::from_slice::<ClientJsonRpcMessage>(body) {
        Ok(ClientJsonRpcMessage::Request(r)) => {
            let id = || serde_json::to_value(&r.id).ok();
            check_method_headers(headers, Some(r.request.method()), named(&r.request), id)?;
            let target = match &r.request {
                ClientRequest::CallToolRequest(c) => Some(c.params.name.to_string()),
                ClientRequest::GetPromptRequest(p) => Some(p.params.name.clone()),
                ClientRequest::ReadResourceRequest(q) => Some(q.params.uri.clone()),
                _ => None,
            };
            let rpc = Rpc {
                method: crate::metrics::method_label(r.request.method()),
                target,
            };
            let init = matches!(r.request, ClientRequest::InitializeRequest(_))
                .then(|| serde_json::to_value(&r.id).unwrap_or(Value::Null));
            Ok((init, rpc))
        }
        Ok(ClientJsonRpcMessage::Notification(_)) => {
            if headers.contains_key("mcp-method") || headers.contains_key("mcp-name") {
                // rmcp's notification types do not say their method; rare enough to re-read.
                let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
                let method = v.get("method").and_then(Value::as_str);
                check_method_headers(headers, method, None, || None)?;
            }
            Ok((
                None,
                Rpc {
                    method: "notification",
                    target: None,
                },
            ))
        }
        Ok(_) => {
            check_method_headers(headers, None, None, || None)?;
            Ok((None, Rpc::default()))
        }
        Err(e) if e.is_syntax() || e.is_eof() => Err(rpc_error(
            StatusCode::BAD_REQUEST,
            -32700,
            format!("parse error: {e}"),
            None,
        )),
        Err(e) => {
            let id = serde_json::from_slice::<Value>(body)
                .ok()
                .and_then(|v| v.get("id").cloned());
            Err(rpc_error(
                StatusCode::BAD_REQUEST,
                -32600,
                format!("invalid request: {e}"),
                id,
            ))
        }
    }
}

/// JSON-RPC error of a request whose `Mcp-Method` / `Mcp-Name` headers disagree with its body.
pub const HEADER_MISMATCH: i32 = -32020;

/// What a request's `Mcp-Name` must say (SEP-2243's table): the tool or prompt name, the
/// resource URI, or the task id; `None` for methods that name nothing.
fn named(request: &ClientRequest) -> Option<&str> {
    match request {
        ClientRequest::CallToolRequest(r) => Some(&r.params.name),
        ClientRequest::GetPromptRequest(r) => Some(&r.params.name),
        ClientRequest::ReadResourceRequest(r) => Some(&r.params.uri),
        ClientRequest::SubscribeRequest(r) => Some(&r.params.uri),
        ClientRequest::UnsubscribeRequest(r) => Some(&r.params.uri),
        ClientRequest::GetTaskRequest(r) => Some(&r.params.task_id),
        ClientRequest::UpdateTaskRequest(r) => Some(&r.params.task_id),
        ClientRequest::CancelTaskRequest(r) => Some(&r.params.task_id),
        _ => None,
    }
}

/// A request that names its method in `Mcp-Method` (and what it acts on in `Mcp-Name`,
/// 2026-07-28) must say the same in its body: the proxy routes, retries and counts on the
/// headers without reading the body. Absent headers are fine (older clients); a header sent
/// twice, a `Mcp-Name` on a method that names nothing, or a `=?base64?...?=` value that does
/// not decode is a mismatch, so no intermediary can read a request differently from us.
fn check_method_headers(
    headers: &HeaderMap,
    method: Option<&str>,
    name: Option<&str>,
    id: impl Fn() -> Option<Value>,
) -> Result<(), Response> {
    let mismatch = |what: &str| {
        rpc_error(
            StatusCode::BAD_REQUEST,
            HEADER_MISMATCH,
            format!("the {what} header does not match the request body"),
            id(),
        )
    };
    let single = |header: &str| {
        let mut values = headers.get_all(header).iter();
        match (values.next(), values.next()) {
            (None, _) => Ok(None),
            (Some(v), None) => Ok(Some(v.as_bytes())),
            (Some(_), Some(_)) => Err(()),
        }
    };
    match single("mcp-method") {
        Ok(None) => {}
        Ok(Some(m)) if Some(m) == method.map(str::as_bytes) => {}
        _ => return Err(mismatch("Mcp-Method")),
    }
    match single("mcp-name") {
        Ok(None) => {}
        Ok(Some(n)) if name.is_some() && decode_header_value(n).as_deref() == name => {}
        _ => return Err(mismatch("Mcp-Name")),
    }
    Ok(())
}

/// A header value as SEP-2243 encodes it: `=?base64?<standard, padded>?=` wraps any value,
/// anything else is taken literally (and must be visible ASCII to be a header at all).
fn decode_header_value(raw: &[u8]) -> Option<String> {
    use base64::Engine as _;
    let text = std::str::from_utf8(raw).ok()?;
    match text
        .strip_prefix("=?base64?")
        .and_then(|inner| inner.strip_suffix("?="))
    {
        Some(inner) => base64::prelude::BASE64_STANDARD
            .decode(inner)
            .ok()
            .and_then(|b| String::from_utf8(b).ok()),
        None => Some(text.to_owned()),
    }
}

/// Unix seconds now, for signature times.
fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// The verified caller of a request, or the 401 that refuses it.
fn verify_caller(state: &AppState, headers: &HeaderMap) -> Result<Caller, Response> {
    principal::caller(state.principals.as_deref(), headers, unix_now()).map_err(|e| {
        tracing::warn!(target: "security", reason = %e, "principal refused");
        let message = match e {
            PrincipalError::Missing => "principal required",
            _ => "invalid principal signature",
        };
        rpc_error(StatusCode::UNAUTHORIZED, -32600, message, None)
    })
}

/// The `sessionId` a `POST /messages` names, if it is well formed (the route answers 400
/// otherwise).
fn legacy_session(uri: &http::Uri) -> Option<String> {
    Query::<legacy::MessageQuery>::try_from_uri(uri)
        .ok()
        .and_then(|q| q.0.session_id)
        .filter(|id| valid_session_id(id))
}

async fn guard(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let config = &state.node.config;
    if !host_allowed(&config.allowed_hosts, request.headers()) {
        return rpc_error(
            StatusCode::FORBIDDEN,
            -32600,
            "Host header is not allowed",
            None,
        );
    }
    if !origin_allowed(&config.allowed_origins, request.headers()) {
        return rpc_error(StatusCode::FORBIDDEN, -32600, "Origin is not allowed", None);
    }
    let caller = match verify_caller(&state, request.headers()) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let is_mcp = request.uri().path() == "/mcp";
    let session = if is_mcp {
        match session_header(request.headers()) {
            Ok(s) => s,
            Err(r) => return r,
        }
    } else if request.uri().path() == "/messages" {
        legacy_session(request.uri())
    } else {
        None
    };
    if is_mcp && request.method() == Method::DELETE {
        return delete_mcp(&state, request.headers(), session, &caller).await;
    }
    let (mut parts, body) = request.into_parts();
    principal::strip(&mut parts.headers);
    parts.extensions.insert(caller.clone());
    let mut initialize = None;
    let body = if parts.method == Method::POST {
        let bytes = match axum::body::to_bytes(body, config.max_body_bytes).await {
            Ok(b) => b,
            Err(_) => {
                return rpc_error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    -32600,
                    format!("request body exceeds {} bytes", config.max_body_bytes),
                    None,
                );
            }
        };
        let json_body = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.to_ascii_lowercase().starts_with("application/json"));
        if json_body || !is_mcp {
            match check_body(&parts.headers, &bytes) {
                Ok((init, rpc)) => {
                    initialize = init;
                    if let Some(slot) = parts.extensions.get::<RpcSlot>() {
                        *slot.0.lock().unwrap_or_else(|e| e.into_inner()) = rpc;
                    }
                }
                Err(r) => return r,
            }
        }
        Body::from(bytes)
    } else {
        body
    };
    let mut prefetched = None;
    if let Some(id) = &session {
        // One round trip: the session exists, is the caller's, its TTL slides and, when this
        // replica has no worker for it, its `initialize` comes back for the restore.
        let want_init = is_mcp && !state.sessions.is_local(id).await;
        match state.node.store.touch(id, caller.owner(), want_init).await {
            Ok(t) if t.access == Access::Granted => prefetched = t.init,
            Ok(t) if t.access == Access::OtherOwner => return foreign_session(id, &caller),
            Ok(_) => {
                state.sessions.drop_local(id).await;
                return session_not_found();
            }
            Err(e) => return unavailable(&e),
        }
        if is_mcp && initialize.is_some() {
            // rmcp would hand this `initialize` to the live session: a session id is never
            // chosen by the client.
            return rpc_error(
                StatusCode::BAD_REQUEST,
                -32600,
                "initialize starts a new session: send it without Mcp-Session-Id",
                initialize,
            );
        }
    } else if is_mcp && let Some(request_id) = initialize {
        return open_session(
            &state,
            &caller,
            request_id,
            Request::from_parts(parts, body),
            next,
        )
        .await;
    }
    let request = Request::from_parts(parts, body);
    let run = with_prefetched_init(
        session.as_deref().unwrap_or_default(),
        prefetched,
        next.run(request),
    );
    let (response, failures) = watch_failures(run).await;
    store_failure_is_503(response, failures)
}

/// rmcp answers 500 when the store fails under it (a restore that cannot read the record,
/// an event that cannot be logged): that is the store being unavailable, so 503 with
/// `Retry-After`, like every other store failure.
fn store_failure_is_503(response: Response, failures: u32) -> Response {
    if failures > 0 && response.status() == StatusCode::INTERNAL_SERVER_ERROR {
        return unavailable(&StoreError::Unavailable(format!(
            "{failures} store operation(s) failed during the request"
        )));
    }
    response
}

/// A Streamable HTTP `initialize`: admitted within the caller's session limit, run by rmcp
/// (which writes the session record), then bound to the caller before the response, the only
/// place the new id appears, leaves this function.
async fn open_session(
    state: &AppState,
    caller: &Caller,
    request_id: Value,
    request: Request,
    next: Next,
) -> Response {
    let store = &state.node.store;
    let limit = state.node.config.max_sessions_per_principal;
    match store.admit(caller.owner(), limit).await {
        Ok(Admission::Admitted | Admission::Missing) => {}
        Ok(Admission::Full { retry_after }) => {
            return too_many_sessions(limit, retry_after, Some(request_id));
        }
        Err(e) => return unavailable(&e),
    }
    let (response, failures) = watch_failures(next.run(request)).await;
    let response = store_failure_is_503(response, failures);
    let Some(id) = response
        .headers()
        .get("mcp-session-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
    else {
        return response;
    };
    let claimed = if failures > 0 {
        // rmcp only logs a record it could not write: the id would be 404 at once.
        Ok(Admission::Missing)
    } else if caller.owner().is_none() {
        return response;
    } else {
        store.claim(&id, caller.owner(), limit, false).await
    };
    let refused = match claimed {
        Ok(Admission::Admitted) => return response,
        // Concurrent initializes of one principal passed `admit` together.
        Ok(Admission::Full { retry_after }) => {
            too_many_sessions(limit, retry_after, Some(request_id))
        }
        Ok(Admission::Missing) => unavailable(&StoreError::Unavailable(
            "session record was not written".into(),
        )),
        Err(e) => unavailable(&e),
    };
    // The client never learns this id: end the session rmcp just made.
    drop(response);
    state.sessions.drop_local(&id).await;
    if let Err(e) = store.delete(&id).await {
        tracing::warn!(error = %e, session = short_id(&id), "unbound session left to expire");
    }
    refused
}

async fn delete_mcp(
    state: &AppState,
    headers: &HeaderMap,
    session: Option<String>,
    caller: &Caller,
) -> Response {
    let Some(id) = session else {
        return rpc_error(
            StatusCode::BAD_REQUEST,
            -32600,
            "DELETE needs an Mcp-Session-Id header",
            None,
        );
    };
    if let Some(v) = headers.get("mcp-protocol-version") {
        let known = v.to_str().is_ok_and(|v| {
            ProtocolVersion::KNOWN_VERSIONS
                .iter()
                .any(|k| k.as_str() == v)
        });
        if !known {
            return rpc_error(
                StatusCode::BAD_REQUEST,
                -32600,
                "unsupported MCP-Protocol-Version",
                None,
            );
        }
    }
    delete_session(state, &id, Some(caller)).await
}

/// Deletes a session everywhere: the shared record, then every replica's worker. With a
/// `caller`, only a session of theirs; without, any (operators).
async fn delete_session(state: &AppState, id: &str, caller: Option<&Caller>) -> Response {
    let deleted = match caller {
        Some(c) => state.node.store.delete_as(id, c.owner()).await,
        None => state
            .node
            .store
            .delete(id)
            .await
            .map(|d| if d { Access::Granted } else { Access::NotFound }),
    };
    match deleted {
        Ok(Access::Granted) => {
            state.sessions.ended(id).await;
            crate::metrics::metrics()
                .sessions_ended
                .with_label_values(&["deleted"])
                .inc();
            tracing::info!(session = short_id(id), "session deleted");
            StatusCode::OK.into_response()
        }
        Ok(Access::NotFound) => session_not_found(),
        Ok(Access::OtherOwner) => foreign_session(id, caller.unwrap_or(&Caller::Anonymous)),
        Err(e) => unavailable(&e),
    }
}

/// The bearer token of an `Authorization` header.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Constant-time comparison; hashing first hides the token's length too.
fn token_matches(expected: &[u8], given: &str) -> bool {
    Sha256::digest(expected)
        .as_slice()
        .ct_eq(Sha256::digest(given.as_bytes()).as_slice())
        .into()
}

/// Guards the operations endpoints: 404 when no `operations_token` is configured (they do
/// not exist), 401 with `WWW-Authenticate` without the right bearer token. The token is
/// never logged.
async fn operations_auth(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let Some(expected) = &state.node.config.operations_token else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let given = bearer(request.headers());
    if given.is_some_and(|t| token_matches(expected.expose(), t)) {
        return next.run(request).await;
    }
    tracing::warn!(
        target: "security",
        path = request.uri().path(),
        token_presented = given.is_some(),
        "operations request refused"
    );
    let mut response = rpc_error(
        StatusCode::UNAUTHORIZED,
        -32600,
        "missing or invalid operations token",
        None,
    );
    let challenge = if given.is_some() {
        r#"Bearer realm="mcp-backend", error="invalid_token""#
    } else {
        r#"Bearer realm="mcp-backend""#
    };
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(challenge),
    );
    response
}

async fn delete_session_route(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    if !valid_session_id(&id) {
        return rpc_error(StatusCode::BAD_REQUEST, -32600, "invalid session id", None);
    }
    delete_session(&state, &id, None).await
}

async fn health(State(state): State<AppState>) -> Response {
    let node = &state.node;
    let redis = if node.store.is_redis() {
        match node.store.ping().await {
            Ok(()) => "connected",
            Err(_) => "unreachable",
        }
    } else {
        "not configured"
    };
    let active = node.store.count().await.ok();
    let draining = node.is_draining();
    let healthy = redis != "unreachable" && !draining;
    let status = match (draining, healthy) {
        (true, _) => "draining",
        (false, true) => "healthy",
        (false, false) => "unhealthy",
    };
    let body = json!({
        "status": status,
        "nodeId": node.config.node_id,
        "activeSessions": active,
        "localSessions": state.sessions.local_count().await,
        "busTopics": node.bus.topic_count(),
        "redis": redis,
        "version": VERSION,
        "timestamp": humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
        "uptimeSeconds": node.started.elapsed().as_secs(),
    });
    let status = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

#[derive(Deserialize)]
struct ListQuery {
    /// `true`: full session ids (they are bearer-like: shown shortened by default).
    #[serde(default)]
    full: bool,
    #[serde(default = "default_limit")]
    limit: usize,
}

fn default_limit() -> usize {
    100
}

async fn list_sessions(State(state): State<AppState>, Query(q): Query<ListQuery>) -> Response {
    match state.node.store.list(q.limit.clamp(1, 10_000)).await {
        Ok(mut sessions) => {
            if !q.full {
                for s in &mut sessions {
                    s.id = format!("{}…", short_id(&s.id));
                }
            }
            let body = json!({
                "nodeId": state.node.config.node_id,
                "count": sessions.len(),
                "sessions": sessions,
                "timestamp": now_ms(),
            });
            Json(body).into_response()
        }
        Err(e) => unavailable(&e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            if let Ok(v) = HeaderValue::from_str(v) {
                h.insert(*k, v);
            }
        }
        h
    }

    #[test]
    fn session_ids_are_visible_ascii_and_bounded() {
        assert!(valid_session_id("abc-123_XYZ"));
        assert!(!valid_session_id(""), "empty");
        assert!(!valid_session_id("a b"), "space is not visible ASCII");
        assert!(!valid_session_id("é"), "non-ASCII");
        assert!(!valid_session_id(&"a".repeat(129)), "too long");
    }

    #[test]
    fn hosts_match_with_or_without_port() {
        let allowed = vec![
            "localhost".to_owned(),
            "api.example.com:8443".to_owned(),
            "::1".to_owned(),
        ];
        assert!(host_allowed(
            &allowed,
            &headers(&[("host", "localhost:3000")])
        ));
        assert!(host_allowed(&allowed, &headers(&[("host", "[::1]:3000")])));
        assert!(host_allowed(
            &allowed,
            &headers(&[("host", "api.example.com:8443")])
        ));
        assert!(!host_allowed(
            &allowed,
            &headers(&[("host", "evil.example:3000")])
        ));
        assert!(
            !host_allowed(&allowed, &headers(&[])),
            "missing Host is refused"
        );
        assert!(
            host_allowed(&[], &headers(&[("host", "anything")])),
            "empty list allows all"
        );
    }

    #[test]
    fn origins_match_exactly_or_by_port_wildcard() {
        let allowed = vec![
            "https://app.example.com".to_owned(),
            "http://localhost:*".to_owned(),
        ];
        assert!(origin_allowed(&allowed, &headers(&[])), "no Origin passes");
        assert!(origin_allowed(
            &allowed,
            &headers(&[("origin", "https://app.example.com")])
        ));
        assert!(origin_allowed(
            &allowed,
            &headers(&[("origin", "http://localhost:6274")])
        ));
        assert!(!origin_allowed(
            &allowed,
            &headers(&[("origin", "https://evil.example")])
        ));
        assert!(!origin_allowed(
            &allowed,
            &headers(&[("origin", "http://localhost.evil:1")])
        ));
    }

    #[test]
    fn bearer_tokens_are_parsed_and_compared_exactly() {
        let auth = |v: &str| headers(&[("authorization", v)]);
        assert_eq!(bearer(&auth("Bearer abc")), Some("abc"));
        assert_eq!(
            bearer(&auth("bearer abc")),
            Some("abc"),
            "scheme is case-insensitive"
        );
        assert_eq!(bearer(&auth("Basic abc")), None);
        assert_eq!(bearer(&auth("Bearer ")), None);
        assert_eq!(bearer(&headers(&[])), None);
        assert!(token_matches(b"secret-token-123", "secret-token-123"));
        for wrong in [
            "secret-token-12",
            "secret-token-1234",
            "",
            "SECRET-TOKEN-123",
        ] {
            assert!(!token_matches(b"secret-token-123", wrong), "{wrong:?}");
        }
    }

    #[test]
    fn too_many_sessions_says_when_to_retry_in_whole_seconds() {
        let retry = |d| {
            too_many_sessions(2, d, None)
                .headers()
                .get(header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok().map(str::to_owned))
        };
        assert_eq!(
            retry(Duration::from_millis(1500)).as_deref(),
            Some("2"),
            "rounded up"
        );
        assert_eq!(retry(Duration::ZERO).as_deref(), Some("1"), "never 0");
        assert_eq!(
            too_many_sessions(2, Duration::ZERO, None).status(),
            StatusCode::TOO_MANY_REQUESTS
        );
    }

    #[test]
    fn method_headers_must_match_the_body() {
        let check = |h: &HeaderMap, body: &[u8]| check_body(h, body).map(|_| ());
        let body = br#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"echo"}}"#;
        let ok = headers(&[("mcp-method", "tools/call"), ("mcp-name", "echo")]);
        assert!(check(&ok, body).is_ok());
        assert!(
            check(&HeaderMap::new(), body).is_ok(),
            "older clients send none"
        );
        let b64 = headers(&[
            ("mcp-method", "tools/call"),
            ("mcp-name", "=?base64?ZWNobw==?="),
        ]);
        assert!(check(&b64, body).is_ok(), "base64-wrapped name");
        let mut twice = ok.clone();
        twice.append("mcp-method", HeaderValue::from_static("tools/call"));
        for bad in [
            headers(&[("mcp-method", "tools/list")]),
            headers(&[("mcp-method", "tools/call"), ("mcp-name", "rm")]),
            headers(&[("mcp-name", "echo2")]),
            headers(&[("mcp-name", "=?base64?ZWNobw?=")]),
            headers(&[("mcp-name", "=?base64?ZW!!obw==?=")]),
            twice,
        ] {
            let Err(r) = check(&bad, body) else {
                panic!("accepted {bad:?}, which disagrees with the body");
            };
            assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        }
        let read = br#"{"jsonrpc":"2.0","id":1,"method":"resources/read","params":{"uri":"system://info"}}"#;
        let h = headers(&[
            ("mcp-method", "resources/read"),
            ("mcp-name", "system://info"),
        ]);
        assert!(check(&h, read).is_ok());
        let get = br#"{"jsonrpc":"2.0","id":3,"method":"tasks/get","params":{"taskId":"t-1"}}"#;
        let h = headers(&[("mcp-method", "tasks/get"), ("mcp-name", "t-1")]);
        assert!(check(&h, get).is_ok(), "tasks are named by their id");
        let h = headers(&[("mcp-method", "tasks/get"), ("mcp-name", "t-2")]);
        assert!(check(&h, get).is_err());
        let list = br#"{"jsonrpc":"2.0","id":4,"method":"tools/list"}"#;
        let h = headers(&[("mcp-method", "tools/list"), ("mcp-name", "echo")]);
        assert!(
            check(&h, list).is_err(),
            "a name on a method that names nothing"
        );
        let note = br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#;
        let h = headers(&[("mcp-method", "notifications/initialized")]);
        assert!(check(&h, note).is_ok());
        let h = headers(&[("mcp-method", "tools/call")]);
        assert!(check(&h, note).is_err());
    }

    #[test]
    fn bodies_are_classified_as_parse_error_invalid_or_initialize() {
        let init = br#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#;
        assert_eq!(
            check_body(&HeaderMap::new(), init).ok().map(|b| b.0),
            Some(Some(json!(1)))
        );
        assert_eq!(
            check_body(&HeaderMap::new(), init).ok().map(|b| b.1.method),
            Some("initialize")
        );
        let ping = br#"{"jsonrpc":"2.0","id":2,"method":"ping"}"#;
        assert_eq!(
            check_body(&HeaderMap::new(), ping).ok().map(|b| b.0),
            Some(None)
        );
        assert_eq!(
            check_body(&HeaderMap::new(), ping).ok().map(|b| b.1.method),
            Some("ping")
        );
        let status = |b: &[u8]| check_body(&HeaderMap::new(), b).err().map(|r| r.status());
        assert_eq!(status(b"{not json"), Some(StatusCode::BAD_REQUEST));
        assert_eq!(status(br#"{"id":1}"#), Some(StatusCode::BAD_REQUEST));
    }
}
