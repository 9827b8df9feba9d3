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
//! - `Host` and `Origin` are checked once here, for `/mcp` and the legacy routes alike.
// A ready error response is the natural error type of these request checks.
#![allow(clippy::result_large_err)]

use std::sync::Arc;

use axum::{
    Json, Router,
    body::Body,
    extract::{Path, Query, Request, State},
    http::{HeaderMap, HeaderValue, Method, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{delete, get, post},
};
use rmcp::{
    model::{ClientJsonRpcMessage, ClientRequest, ProtocolVersion},
    transport::{StreamableHttpServerConfig, StreamableHttpService},
};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::{
    Node,
    handler::{Handler, VERSION},
    legacy,
    sessions::{RecordStore, ReplicaSessions},
    store::{StoreError, now_ms},
};

/// Longest session id accepted (ours are 32 hex characters).
pub const MAX_SESSION_ID_LEN: usize = 128;
/// `Retry-After` seconds sent with 503.
const RETRY_AFTER_SECONDS: &str = "1";

/// State shared by the routes.
#[derive(Clone)]
pub struct AppState {
    pub node: Arc<Node>,
    pub sessions: Arc<ReplicaSessions>,
    pub legacy: Arc<legacy::LegacySessions>,
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
        node,
        sessions,
    };
    let mcp_routes = Router::new()
        .route_service("/mcp", mcp)
        .route("/sse", get(legacy::open_stream))
        .route("/messages", post(legacy::post_message))
        .route_layer(middleware::from_fn_with_state(state.clone(), guard));
    Router::new()
        .route("/health", get(health))
        .route("/sessions", get(list_sessions))
        .route("/sessions/{id}", delete(delete_session_route))
        .merge(mcp_routes)
        .with_state(state)
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

/// 404 for a session that does not exist (anymore): the client re-initializes.
pub fn session_not_found() -> Response {
    rpc_error(StatusCode::NOT_FOUND, -32001, "session not found", None)
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

/// Classifies a POST body: `Ok(is_initialize)` or the error response.
fn check_body(body: &[u8]) -> Result<bool, Response> {
    match serde_json::from_slice::<ClientJsonRpcMessage>(body) {
        Ok(ClientJsonRpcMessage::Request(r)) => {
            Ok(matches!(r.request, ClientRequest::InitializeRequest(_)))
        }
        Ok(_) => Ok(false),
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
    let is_mcp = request.uri().path() == "/mcp";
    let session = match session_header(request.headers()) {
        Ok(s) => s,
        Err(r) => return r,
    };
    if is_mcp && request.method() == Method::DELETE {
        return delete_mcp(&state, request.headers(), session).await;
    }
    let (parts, body) = request.into_parts();
    let mut initialize = false;
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
            match check_body(&bytes) {
                Ok(init) => initialize = init,
                Err(r) => return r,
            }
        }
        Body::from(bytes)
    } else {
        body
    };
    if is_mcp {
        if let Some(id) = &session {
            match state.node.store.touch(id).await {
                Ok(true) => {}
                Ok(false) => {
                    state.sessions.drop_local(id).await;
                    return session_not_found();
                }
                Err(e) => return unavailable(&e),
            }
        } else if initialize && let Err(e) = state.node.store.ping().await {
            return unavailable(&e);
        }
    }
    next.run(Request::from_parts(parts, body)).await
}

async fn delete_mcp(state: &AppState, headers: &HeaderMap, session: Option<String>) -> Response {
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
    delete_session(state, &id).await
}

/// Deletes a session everywhere: the shared record, then every replica's worker.
async fn delete_session(state: &AppState, id: &str) -> Response {
    match state.node.store.delete(id).await {
        Ok(true) => {
            if let Err(e) = state.node.store.publish("del", id).await {
                tracing::warn!(error = %e, "could not announce deletion; other replicas answer 404 from the store");
            }
            state.sessions.drop_local(id).await;
            tracing::info!(session = short_id(id), "session deleted");
            StatusCode::OK.into_response()
        }
        Ok(false) => session_not_found(),
        Err(e) => unavailable(&e),
    }
}

async fn delete_session_route(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    if !valid_session_id(&id) {
        return rpc_error(StatusCode::BAD_REQUEST, -32600, "invalid session id", None);
    }
    delete_session(&state, &id).await
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
    let healthy = redis != "unreachable";
    let body = json!({
        "status": if healthy { "healthy" } else { "unhealthy" },
        "nodeId": node.config.node_id,
        "activeSessions": active,
        "localSessions": state.sessions.local_count().await,
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
    fn bodies_are_classified_as_parse_error_invalid_or_initialize() {
        let init = br#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#;
        assert_eq!(check_body(init).ok(), Some(true));
        let ping = br#"{"jsonrpc":"2.0","id":2,"method":"ping"}"#;
        assert_eq!(check_body(ping).ok(), Some(false));
        let status = |b: &[u8]| check_body(b).err().map(|r| r.status());
        assert_eq!(status(b"{not json"), Some(StatusCode::BAD_REQUEST));
        assert_eq!(status(br#"{"id":1}"#), Some(StatusCode::BAD_REQUEST));
    }
}
