//! The request path: pingora's [`ProxyHttp`] filters for one listener. See `README.md` beside
//! this file for which requests are pinned and what happens when a backend dies.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use http::header;
use pingora::http::ResponseHeader;
use pingora::prelude::HttpPeer;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::{Error, ErrorSource, ErrorType, Result, RetryType};

use crate::config::{Cidr, Policy};
use crate::mcp;
use crate::pool::{Pick, Pool};
use crate::state::{Shared, Snapshot};

/// Bodies up to this size are read before the backend is chosen, to learn the JSON-RPC method
/// (retry safety, metrics). It is pingora's retry buffer size: larger bodies stream unread.
pub const PEEK_LIMIT: u64 = 64 * 1024;

/// After a 413, the proxy reads and discards up to this much of the body, for this long, so
/// that the client sees the answer rather than a reset.
const LINGER_LIMIT: u64 = 64 * 1024 * 1024;
const LINGER_TIME: Duration = Duration::from_secs(5);

/// The kind of request, which picks the routing policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// POST, DELETE and anything else on the MCP endpoint (routing.post).
    Post,
    /// GET on the MCP endpoint: the standalone SSE stream (routing.stream).
    Stream,
    /// GET /sse of the 2024-11-05 transport (routing.legacy).
    LegacyStream,
    /// POST /messages?sessionId= of the 2024-11-05 transport (its endpoint pin, else routing.legacy).
    LegacyMessage,
}

/// Why the proxy answers a request itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    NoneAvailable,
    SessionGone,
}

pub struct McpProxy {
    pub shared: Arc<Shared>,
    /// Index of the listener in the config, which names its pool.
    pub listener: usize,
    pub tls: bool,
}

pub struct Ctx {
    start: Instant,
    snapshot: Option<Arc<Snapshot>>,
    pool: Option<Arc<Pool>>,
    kind: Kind,
    session: Option<String>,
    stateless: bool,
    peek: mcp::Peek,
    client_ip: Option<IpAddr>,
    /// The backend of the current attempt, and the first one chosen.
    backend: Option<usize>,
    first: Option<usize>,
    /// Whether `backend`'s active count includes this request.
    counted: bool,
    /// Sent to a persistence pin: no other backend can serve it, so it is never retried.
    pinned: bool,
    tried: Vec<usize>,
    attempts: usize,
    body_bytes: u64,
    response_started: bool,
    status: u16,
    sse: bool,
    set_cookie: bool,
    scan: Option<Vec<u8>>,
    legacy_pin: Option<String>,
    failure: Option<Failure>,
}

impl McpProxy {
    fn pool<'a>(&self, ctx: &'a Ctx) -> Result<&'a Arc<Pool>> {
        ctx.pool
            .as_ref()
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "no pool chosen"))
    }

    /// Picks the backend for this attempt, skipping backends already tried.
    fn select(
        &self,
        session: &Session,
        ctx: &mut Ctx,
        pool: &Pool,
    ) -> std::result::Result<usize, Failure> {
        let r = &pool.config.routing;
        let exclude = ctx.tried.as_slice();
        let usable = |i: usize| pool.backends[i].healthy() && !exclude.contains(&i);

        if ctx.kind == Kind::LegacyMessage
            && let Some(sid) = &ctx.session
            && let Some(pin) = self.shared.legacy.get(sid)
            && pin.pool == pool.config.name
            && let Some(i) = pool.find(&pin.backend)
            && usable(i)
        {
            return Ok(i);
        }

        let mut policy = match ctx.kind {
            Kind::Post => r.post,
            Kind::Stream => r.stream,
            Kind::LegacyStream | Kind::LegacyMessage => r.legacy,
        };
        if ctx.session.is_none() && ctx.stateless {
            policy = Policy::RoundRobin;
        }
        let pick = match policy {
            Policy::RoundRobin => pool.round_robin(exclude),
            Policy::IpHash => match ctx.client_ip {
                Some(IpAddr::V4(a)) => pool.hash(&a.octets(), exclude),
                Some(IpAddr::V6(a)) => pool.hash(&a.octets(), exclude),
                None => pool.round_robin(exclude),
            },
            Policy::SessionHash => match &ctx.session {
                Some(s) => pool.hash(s.as_bytes(), exclude),
                None => pool.round_robin(exclude),
            },
            Policy::Header => match session.req_header().headers.get(&r.header_name) {
                Some(v) => pool.hash(v.as_bytes(), exclude),
                None => pool.round_robin(exclude),
            },
            Policy::Cookie => {
                let named = cookie(session, &r.cookie_name)
                    .and_then(|v| pool.find(v))
                    .filter(|i| pool.backends[*i].available() && usable(*i));
                match named {
                    Some(i) => Pick::Backend(i),
                    None => {
                        ctx.set_cookie = true;
                        pool.round_robin(exclude)
                    }
                }
            }
            Policy::Persistence => {
                if let Some(sid) = &ctx.session
                    && let Some(pin) = self.shared.sessions.get(sid)
                    && pin.pool == pool.config.name
                {
                    // A draining backend keeps its pinned sessions: they live nowhere else.
                    return match pool.find(&pin.backend) {
                        Some(i) if usable(i) => {
                            ctx.pinned = true;
                            Ok(i)
                        }
                        // Healthy but already tried: the session is fine, this request failed.
                        Some(i) if pool.backends[i].healthy() => Err(Failure::NoneAvailable),
                        _ => {
                            self.shared.sessions.remove(sid);
                            Err(Failure::SessionGone)
                        }
                    };
                }
                // A session this proxy never saw (another proxy, or before a restart): any
                // backend; one that does not know it answers 404 itself.
                pool.round_robin(exclude)
            }
        };
        match pick {
            Pick::Backend(i) => Ok(i),
            Pick::NoneAvailable => Err(Failure::NoneAvailable),
        }
    }

    fn release(&self, ctx: &mut Ctx) {
        if ctx.counted
            && let (Some(pool), Some(i)) = (&ctx.pool, ctx.backend)
        {
            pool.backends[i].active.fetch_sub(1, Ordering::Relaxed);
        }
        ctx.counted = false;
    }

    fn may_retry(&self, ctx: &Ctx, pool: &Pool) -> bool {
        ctx.attempts <= pool.config.failover.max_retries
    }
}

/// The value of cookie `name` in the request's `Cookie` headers.
fn cookie<'a>(session: &'a Session, name: &str) -> Option<&'a str> {
    session
        .req_header()
        .headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|kv| {
            let (k, v) = kv.trim().split_once('=')?;
            (k == name).then_some(v.trim_matches('"'))
        })
}

/// The client address: the TCP peer, or, when the peer is a trusted proxy, the right-most
/// `X-Forwarded-For` entry that is not itself trusted.
pub fn client_ip(peer: Option<IpAddr>, xff: Option<&str>, trusted: &[Cidr]) -> Option<IpAddr> {
    let peer = peer?;
    let is_trusted = |ip: IpAddr| trusted.iter().any(|c| c.contains(ip));
    if !is_trusted(peer) {
        return Some(peer);
    }
    let mut ip = peer;
    for part in xff.unwrap_or_default().rsplit(',') {
        match part.trim().parse::<IpAddr>() {
            Ok(a) => {
                ip = a;
                if !is_trusted(a) {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    Some(ip)
}

/// Whether raw request header bytes carry a `Content-Length` line.
fn has_content_length(raw: &[u8]) -> bool {
    raw.split(|b| *b == b'\n')
        .any(|line| line.len() > 15 && line[..15].eq_ignore_ascii_case(b"content-length:"))
}

/// Writes a JSON-RPC error response and closes the connection afterwards.
async fn respond(
    session: &mut Session,
    ctx: &mut Ctx,
    status: u16,
    code: i32,
    message: &str,
    retry_after: Option<u64>,
) -> Result<()> {
    let body = mcp::error_body(ctx.peek.id.as_ref(), code, message);
    ctx.status = status;
    session.set_keepalive(None);
    write_json(session, status, body, retry_after).await
}

/// Writes a whole JSON response the proxy answers itself.
async fn write_json(
    session: &mut Session,
    status: u16,
    body: Bytes,
    retry_after: Option<u64>,
) -> Result<()> {
    let mut resp = ResponseHeader::build(status, Some(4))?;
    resp.insert_header(header::CONTENT_TYPE, "application/json")?;
    resp.insert_header(header::CONTENT_LENGTH, body.len().to_string())?;
    if let Some(s) = retry_after {
        resp.insert_header(header::RETRY_AFTER, s.to_string())?;
    }
    session.write_response_header(Box::new(resp), false).await?;
    session.write_response_body(Some(body), true).await
}

fn retry_after(pool: &Pool) -> u64 {
    pool.config.health.interval.as_secs().max(1)
}

fn short(session: Option<&str>) -> String {
    match session {
        None => "-".into(),
        Some(s) if s.len() <= 8 => s.into(),
        Some(s) => format!("{}…", &s[..8]),
    }
}

#[async_trait]
impl ProxyHttp for McpProxy {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx {
            start: Instant::now(),
            snapshot: None,
            pool: None,
            kind: Kind::Post,
            session: None,
            stateless: false,
            peek: mcp::Peek::default(),
            client_ip: None,
            backend: None,
            first: None,
            counted: false,
            pinned: false,
            tried: Vec::new(),
            attempts: 0,
            body_bytes: 0,
            response_started: false,
            status: 0,
            sse: false,
            set_cookie: false,
            scan: None,
            legacy_pin: None,
            failure: None,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        let snapshot = self.shared.snapshot();
        let pool = snapshot.pool_for_listener(self.listener).clone();
        ctx.pool = Some(pool.clone());
        ctx.snapshot = Some(snapshot.clone());
        let limits = &snapshot.config.limits;

        let req = session.req_header();
        let get = req.method == http::Method::GET;
        let post = req.method == http::Method::POST;
        let path = req.uri.path();
        let kind = if get && path == "/sse" {
            Kind::LegacyStream
        } else if post && path == "/messages" {
            Kind::LegacyMessage
        } else if get && path == pool.config.mcp_path {
            Kind::Stream
        } else {
            Kind::Post
        };

        if get && path == "/health" {
            let (status, body) = crate::admin::health(&snapshot);
            ctx.status = status;
            write_json(session, status, Bytes::from(body), None).await?;
            return Ok(true);
        }

        // Request smuggling guard: with both framing headers pingora drops Content-Length and
        // goes on (RFC 9112 allows that); an edge proxy refuses such a request instead.
        if req.headers.contains_key(header::TRANSFER_ENCODING)
            && (req.headers.contains_key(header::CONTENT_LENGTH)
                || session
                    .as_downstream()
                    .as_http1()
                    .is_some_and(|h1| has_content_length(&h1.get_headers_raw_bytes())))
        {
            respond(
                session,
                ctx,
                400,
                -32600,
                "request has both Content-Length and Transfer-Encoding",
                None,
            )
            .await?;
            return Ok(true);
        }
        let header_bytes: usize = req
            .headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 4)
            .sum();
        if header_bytes > limits.max_header_bytes {
            respond(session, ctx, 431, -32600, "request headers too large", None).await?;
            return Ok(true);
        }
        let content_length = match req.headers.get(header::CONTENT_LENGTH) {
            None => None,
            Some(v) => match v.to_str().ok().and_then(|s| s.trim().parse::<u64>().ok()) {
                Some(n) => Some(n),
                None => {
                    respond(
                        session,
                        ctx,
                        400,
                        -32600,
                        "invalid Content-Length header",
                        None,
                    )
                    .await?;
                    return Ok(true);
                }
            },
        };
        if content_length.is_some_and(|n| n > limits.max_body_bytes) {
            respond(session, ctx, 413, -32600, "request body too large", None).await?;
            // Lingering close: read what the client is still sending (bounded), so it gets to
            // read the 413 instead of a connection reset.
            if content_length.is_some_and(|n| n <= LINGER_LIMIT) {
                let _ = tokio::time::timeout(LINGER_TIME, session.drain_request_body()).await;
            }
            return Ok(true);
        }
        // Read a small POST body first, so that even errors below can echo its id.
        // `Expect: 100-continue` clients send the body only after the backend's 100: not peeked.
        let expects = session.req_header().headers.contains_key(header::EXPECT);
        if post
            && !expects
            && let Some(len) = content_length.filter(|n| (1..=PEEK_LIMIT).contains(n))
        {
            session.enable_retry_buffering();
            let mut body = BytesMut::with_capacity(len as usize);
            while let Some(chunk) = session
                .read_request_body()
                .await
                .map_err(|e| e.into_down())?
            {
                body.extend_from_slice(&chunk);
                if body.len() as u64 >= len {
                    break;
                }
            }
            ctx.peek = mcp::peek(&body);
        }
        let req = session.req_header();
        if let Some(v) = req.headers.get("mcp-session-id") {
            match mcp::session_id(v.as_bytes(), limits.max_session_id_bytes) {
                Ok(s) => ctx.session = Some(s.to_owned()),
                Err(mcp::BadHeader(m)) => {
                    respond(session, ctx, 400, -32600, m, None).await?;
                    return Ok(true);
                }
            }
        }
        if let Some(v) = req.headers.get("mcp-protocol-version") {
            match mcp::protocol_version(v.as_bytes()) {
                Ok(stateless) => ctx.stateless = stateless,
                Err(mcp::BadHeader(m)) => {
                    respond(session, ctx, 400, -32600, m, None).await?;
                    return Ok(true);
                }
            }
        }
        ctx.kind = kind;
        if kind == Kind::LegacyMessage {
            ctx.session = req.uri.query().and_then(mcp::query_session_id);
        }
        let peer = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        let xff = req
            .headers
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok());
        ctx.client_ip = client_ip(peer, xff, &snapshot.config.trusted_proxies);

        Ok(false)
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<()> {
        // Chunked bodies have no Content-Length to check up front.
        if let Some(b) = body {
            ctx.body_bytes += b.len() as u64;
            let max = ctx
                .snapshot
                .as_ref()
                .map_or(u64::MAX, |s| s.config.limits.max_body_bytes);
            if ctx.body_bytes > max {
                return Error::e_explain(ErrorType::HTTPStatus(413), "request body too large");
            }
        }
        Ok(())
    }

    async fn upstream_peer(&self, session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        let pool = self.pool(ctx)?.clone();
        let i = match self.select(session, ctx, &pool) {
            Ok(i) => i,
            Err(f) => {
                ctx.failure = Some(f);
                return Error::e_explain(ErrorType::HTTPStatus(503), "no backend to route to");
            }
        };
        ctx.backend = Some(i);
        ctx.first.get_or_insert(i);
        // request_body_filter sees the whole body again on every attempt.
        ctx.body_bytes = 0;
        ctx.attempts += 1;
        let b = &pool.backends[i];
        b.requests.fetch_add(1, Ordering::Relaxed);
        b.active.fetch_add(1, Ordering::Relaxed);
        ctx.counted = true;

        let t = &pool.config.timeouts;
        let mut peer = HttpPeer::new(b.address, false, String::new());
        peer.options.connection_timeout = Some(t.connect);
        peer.options.read_timeout = Some(match ctx.kind {
            Kind::Stream | Kind::LegacyStream => t.sse_idle,
            Kind::Post | Kind::LegacyMessage => t.read,
        });
        peer.options.write_timeout = Some(t.write);
        peer.options.idle_timeout = Some(t.upstream_keepalive);
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream: &mut pingora::http::RequestHeader,
        _ctx: &mut Ctx,
    ) -> Result<()> {
        if let Some(peer) = session.client_addr().and_then(|a| a.as_inet()) {
            let xff = match upstream
                .headers
                .get("x-forwarded-for")
                .and_then(|v| v.to_str().ok())
            {
                Some(prev) => format!("{prev}, {}", peer.ip()),
                None => peer.ip().to_string(),
            };
            upstream.insert_header("X-Forwarded-For", xff)?;
        }
        upstream.insert_header("X-Forwarded-Proto", if self.tls { "https" } else { "http" })?;
        Ok(())
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Ctx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        self.release(ctx);
        let Some(pool) = ctx.pool.clone() else {
            return e;
        };
        if let Some(i) = ctx.backend {
            let b = &pool.backends[i];
            if let Some(t) = b.connect_failed(e.to_string()) {
                self.shared
                    .transition(&pool.config.name, &b.name, t, "connection failed");
            }
            ctx.tried.push(i);
        }
        // The request never reached a backend: always safe to send elsewhere.
        let retry = self.may_retry(ctx, &pool);
        e.set_retry(retry);
        if retry {
            self.shared
                .metrics
                .retries
                .with_label_values(&[&pool.config.name, "connect"])
                .inc();
        }
        e
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut Ctx,
        client_reused: bool,
    ) -> Box<Error> {
        // A pooled connection the backend had already closed says nothing about its health.
        let stale_connection = client_reused && matches!(e.retry, RetryType::ReusedOnly);
        let mut e = e.more_context(format!("peer: {peer}"));
        let Some(pool) = ctx.pool.clone() else {
            e.set_retry(false);
            return e;
        };
        let upstream_fault = *e.esource() == ErrorSource::Upstream;
        if upstream_fault
            && !stale_connection
            && !ctx.response_started
            && let Some(i) = ctx.backend
        {
            let b = &pool.backends[i];
            b.failures.fetch_add(1, Ordering::Relaxed);
            let h = &pool.config.health;
            if let Some(t) = b.observe(
                false,
                h.healthy_threshold,
                h.unhealthy_threshold,
                Some(e.to_string()),
            ) {
                self.shared
                    .transition(&pool.config.name, &b.name, t, "request failed");
            }
        }
        // The request may have reached the backend: repeat it only when doing so is harmless.
        let safe = matches!(ctx.kind, Kind::Stream | Kind::LegacyStream)
            || (!ctx.peek.batch
                && ctx
                    .peek
                    .method
                    .as_deref()
                    .is_some_and(|m| pool.config.failover.safe_methods.contains(m)));
        let retry = upstream_fault
            && safe
            && !ctx.pinned
            && !ctx.response_started
            && !session.as_ref().retry_buffer_truncated()
            && self.may_retry(ctx, &pool);
        e.set_retry(retry);
        if retry {
            self.release(ctx);
            if let Some(i) = ctx.backend
                && !stale_connection
            {
                ctx.tried.push(i);
            }
            self.shared
                .metrics
                .retries
                .with_label_values(&[&pool.config.name, "safe_method"])
                .inc();
        }
        e
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if resp.status.is_informational() {
            return Ok(());
        }
        ctx.response_started = true;
        ctx.status = resp.status.as_u16();
        let (Some(pool), Some(i)) = (ctx.pool.clone(), ctx.backend) else {
            return Ok(());
        };
        let b = &pool.backends[i];
        let r = &pool.config.routing;
        let name = pool.config.name.as_str();
        if resp
            .headers
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"))
        {
            ctx.sse = true;
            self.shared
                .metrics
                .sse_streams
                .with_label_values(&[name])
                .inc();
            if ctx.kind == Kind::LegacyStream {
                ctx.scan = Some(Vec::new());
            }
        }
        if ctx.session.is_none()
            && let Some(sid) = resp
                .headers
                .get("mcp-session-id")
                .and_then(|v| v.to_str().ok())
        {
            self.shared
                .metrics
                .sessions
                .with_label_values(&[name])
                .inc();
            if r.uses(Policy::Persistence) {
                self.shared
                    .sessions
                    .insert(sid, name, &b.name, r.persistence_ttl);
            }
        }
        if let Some(sid) = &ctx.session
            && r.uses(Policy::Persistence)
            && ((session.req_header().method == http::Method::DELETE && resp.status.is_success())
                || resp.status == http::StatusCode::NOT_FOUND)
        {
            self.shared.sessions.remove(sid);
        }
        if ctx.set_cookie {
            resp.append_header(
                header::SET_COOKIE,
                format!(
                    "{}={}; Path=/; HttpOnly; SameSite=Lax",
                    r.cookie_name, b.name
                ),
            )?;
        }
        if ctx
            .snapshot
            .as_ref()
            .is_some_and(|s| s.config.server.backend_header)
        {
            resp.insert_header("X-MCP-Backend", &b.name)?;
        }
        Ok(())
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<Option<Duration>> {
        if let (Some(buf), Some(chunk)) = (ctx.scan.as_mut(), body.as_ref()) {
            buf.extend_from_slice(chunk);
            if let Some(sid) = mcp::endpoint_session(buf) {
                ctx.scan = None;
                if let (Some(pool), Some(i)) = (&ctx.pool, ctx.backend) {
                    // Lives as long as the stream: `logging` removes it.
                    self.shared.legacy.insert(
                        &sid,
                        &pool.config.name,
                        &pool.backends[i].name,
                        Duration::MAX,
                    );
                    ctx.legacy_pin = Some(sid);
                }
            } else if buf.len() > 8192 {
                ctx.scan = None; // no endpoint event where it must be: stop looking
            }
        }
        Ok(None)
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        let pool_name = ctx
            .pool
            .as_ref()
            .map_or("-", |p| p.config.name.as_str())
            .to_owned();
        let retry = ctx.pool.as_ref().map(|p| retry_after(p));
        let (status, code, message, retry_after): (u16, i32, String, Option<u64>) = match ctx
            .failure
        {
            Some(Failure::NoneAvailable) => (
                503,
                -32000,
                format!("no healthy backend in pool {pool_name}; retry later"),
                retry,
            ),
            Some(Failure::SessionGone) => (
                404,
                -32001,
                "session not found: its backend is gone; initialize a new session".into(),
                None,
            ),
            None => match e.etype() {
                ErrorType::HTTPStatus(413) => (413, -32600, "request body too large".into(), None),
                ErrorType::HTTPStatus(c) => (*c, -32000, "request failed".into(), None),
                ErrorType::ConnectTimedout
                | ErrorType::ConnectRefused
                | ErrorType::ConnectError => (502, -32000, "backend unavailable".into(), retry),
                ErrorType::ReadTimedout | ErrorType::WriteTimedout => {
                    (504, -32000, "backend did not answer in time".into(), None)
                }
                _ => match e.esource() {
                    ErrorSource::Downstream => (0, 0, String::new(), None),
                    _ => (502, -32000, "backend failed while answering".into(), None),
                },
            },
        };
        if status > 0 && !ctx.response_started {
            if let Err(err) = respond(session, ctx, status, code, &message, retry_after).await {
                tracing::debug!(error = %err, "cannot send the error response");
            }
        } else if ctx.response_started {
            ctx.status = ctx.status.max(1);
        }
        FailToProxy {
            error_code: status,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        self.release(ctx);
        let Some(pool) = ctx.pool.clone() else {
            return;
        };
        let m = &self.shared.metrics;
        let name = pool.config.name.as_str();
        if ctx.sse {
            m.sse_streams.with_label_values(&[name]).dec();
        }
        if let Some(sid) = ctx.legacy_pin.take() {
            self.shared.legacy.remove(&sid);
        }
        let status = session
            .response_written()
            .map_or(ctx.status, |r| r.status.as_u16());
        let backend = ctx.backend.map_or("-", |i| pool.backends[i].name.as_str());
        let method = mcp::method_label(ctx.peek.method.as_deref());
        m.requests
            .with_label_values(&[name, backend, &status.to_string(), method])
            .inc();
        let elapsed = ctx.start.elapsed();
        m.duration
            .with_label_values(&[name, method])
            .observe(elapsed.as_secs_f64());
        if ctx.first.is_some() && ctx.first != ctx.backend {
            m.failovers.with_label_values(&[name]).inc();
        }
        if ctx
            .snapshot
            .as_ref()
            .is_some_and(|s| s.config.server.access_log)
        {
            let req = session.req_header();
            tracing::info!(
                target: "access",
                client = %ctx.client_ip.map_or_else(|| "-".to_owned(), |ip| ip.to_string()),
                method = %req.method,
                path = %req.uri.path(),
                status,
                pool = name,
                backend,
                mcp_method = ctx.peek.method.as_deref().unwrap_or("-"),
                session = %short(ctx.session.as_deref()),
                attempts = ctx.attempts,
                duration_ms = elapsed.as_secs_f64() * 1000.0,
                error = %e.map_or_else(String::new, |e| e.to_string()),
                "request"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let trusted = vec![Cidr::parse("10.0.0.0/8").unwrap()];
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            client_ip(Some(ip("1.2.3.4")), Some("9.9.9.9"), &trusted),
            Some(ip("1.2.3.4"))
        );
        assert_eq!(
            client_ip(Some(ip("10.0.0.5")), Some("9.9.9.9, 10.0.0.7"), &trusted),
            Some(ip("9.9.9.9"))
        );
        assert_eq!(
            client_ip(Some(ip("10.0.0.5")), Some("garbage, 8.8.8.8"), &trusted),
            Some(ip("8.8.8.8"))
        );
        assert_eq!(
            client_ip(Some(ip("10.0.0.5")), None, &trusted),
            Some(ip("10.0.0.5"))
        );
        assert_eq!(
            client_ip(Some(ip("10.0.0.5")), Some("9.9.9.9"), &[]),
            Some(ip("10.0.0.5"))
        );
    }

    #[test]
    fn content_length_lines_are_found_in_raw_headers() {
        assert!(has_content_length(
            b"POST / HTTP/1.1\r\nHost: x\r\ncontent-LENGTH: 5\r\n\r\n"
        ));
        assert!(!has_content_length(
            b"POST / HTTP/1.1\r\nX-Content-Length: 5\r\n\r\n"
        ));
    }

    #[test]
    fn short_session_ids_in_logs() {
        assert_eq!(short(Some("0123456789abcdef")), "01234567…");
        assert_eq!(short(Some("abc")), "abc");
        assert_eq!(short(None), "-");
    }
}
