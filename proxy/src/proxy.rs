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
use pingora::{Error, ErrorSource, ErrorType, OrErr, Result, RetryType};

use crate::auth::{self, Principal};
use crate::client_addr::client_ip;
use crate::config::Policy;
use crate::limits::{Refusal, Ticket};
use crate::mcp;
use crate::pool::{Pick, Pool};
use crate::request::{Endpoint, has_content_length, host_name};
use crate::respond;
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
pub(crate) enum Failure {
    NoneAvailable,
    SessionGone,
}

/// Headers to drop from and set on a request going upstream ([`McpProxy::upstream_edits`]).
pub(crate) struct UpstreamEdits {
    pub remove: Vec<http::HeaderName>,
    pub set: Vec<(&'static str, String)>,
}

pub struct McpProxy {
    pub shared: Arc<Shared>,
    /// Index of the listener in the config, which names its routes.
    pub listener: usize,
    pub tls: bool,
}

pub struct Ctx {
    pub(crate) start: Instant,
    pub(crate) snapshot: Option<Arc<Snapshot>>,
    pub(crate) pool: Option<Arc<Pool>>,
    pub(crate) kind: Kind,
    pub(crate) session: Option<String>,
    pub(crate) stateless: bool,
    pub(crate) peek: mcp::Peek,
    pub(crate) client_ip: Option<IpAddr>,
    /// The backend of the current attempt, and the first one chosen.
    pub(crate) backend: Option<usize>,
    pub(crate) first: Option<usize>,
    /// Whether `backend`'s active count includes this request.
    pub(crate) counted: bool,
    /// Sent to a persistence pin: no other backend can serve it, so it is never retried.
    pub(crate) pinned: bool,
    pub(crate) tried: Vec<usize>,
    pub(crate) attempts: usize,
    pub(crate) body_bytes: u64,
    pub(crate) response_started: bool,
    pub(crate) status: u16,
    pub(crate) sse: bool,
    pub(crate) set_cookie: bool,
    pub(crate) scan: Option<Vec<u8>>,
    pub(crate) legacy_pin: Option<String>,
    pub(crate) failure: Option<Failure>,
    /// The route's path prefix (`""` for none), stripped upstream.
    pub(crate) prefix: Arc<str>,
    /// The 2024-11-05 `endpoint` event still has to get the route's prefix.
    pub(crate) rewrite_endpoint: bool,
    pub(crate) principal: Option<Principal>,
    pub(crate) ticket: Option<Ticket>,
    /// A POST's SSE answer, forwarded whole event by whole event (`resume.rs`).
    pub(crate) post: Option<crate::relay::EventCursor>,
    /// The POST's JSON-RPC response has reached the client.
    pub(crate) answered: bool,
    /// A `tools/list` answer being read for its tool annotations.
    pub(crate) tools_list: Option<BytesMut>,
    /// A list request the pool's list cache may keep the answer of, and that answer so far.
    pub(crate) list_fill: Option<crate::list_cache::Lookup>,
    pub(crate) list_body: Option<BytesMut>,
    /// A notification stream whose list changes empty the pool's list cache.
    pub(crate) list_watch: bool,
    /// The request's spans, when traces are on.
    pub(crate) trace: Option<crate::trace::Trace>,
    /// When the current attempt's backend was chosen.
    pub(crate) attempt_start: Option<Instant>,
    /// The backend whose `streams` count this request's open stream.
    pub(crate) stream_on: Option<Arc<crate::pool::BackendState>>,
}

impl McpProxy {
    fn pool<'a>(&self, ctx: &'a Ctx) -> Result<&'a Arc<Pool>> {
        ctx.pool
            .as_ref()
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "no pool chosen"))
    }

    /// Picks the backend for this attempt, skipping backends already tried.
    pub(crate) fn select(
        &self,
        session: &Session,
        ctx: &mut Ctx,
        pool: &Pool,
    ) -> std::result::Result<usize, Failure> {
        let r = &pool.config.routing;
        let exclude = ctx.tried.as_slice();
        // Pins may reach a draining backend, never a full one (load is shed before a backend
        // is overwhelmed).
        let usable =
            |i: usize| pool.backends[i].healthy() && !pool.full(i) && !exclude.contains(&i);

        if ctx.kind == Kind::LegacyMessage
            && let Some(sid) = &ctx.session
            && let Some(pin) = self
                .shared
                .legacy
                .get(&pin_key(ctx.principal.as_ref(), sid))
            && pin.pool == pool.config.name
            && let Some(i) = pool.find(&pin.backend)
        {
            if usable(i) {
                return Ok(i);
            }
            self.handoff(pool);
        }

        let mut policy = match ctx.kind {
            Kind::Post => r.post,
            Kind::Stream => r.stream,
            Kind::LegacyStream | Kind::LegacyMessage => r.legacy,
        };
        // A stateless (2026-07-28) request without a session has nothing for the session-bound
        // policies to follow; the address and a header (an `Mcp-Param-*` one, say) still do.
        if ctx.session.is_none()
            && ctx.stateless
            && matches!(
                policy,
                Policy::SessionHash | Policy::Cookie | Policy::Persistence
            )
        {
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
                Some(s) => {
                    let pick = pool.hash(s.as_bytes(), exclude);
                    if let Pick::Backend(i) = pick
                        && pool.home(s.as_bytes()) != Some(i)
                    {
                        self.handoff(pool);
                    }
                    pick
                }
                None => pool.round_robin(exclude),
            },
            Policy::Header => match session.req_header().headers.get(&r.header_name) {
                Some(v) => pool.hash(v.as_bytes(), exclude),
                None => pool.round_robin(exclude),
            },
            Policy::Cookie => {
                let named = cookie(session, &r.cookie_name).and_then(|v| pool.find(v));
                match named.filter(|i| pool.backends[*i].available() && usable(*i)) {
                    Some(i) => Pick::Backend(i),
                    None => {
                        if named.is_some() {
                            self.handoff(pool);
                        }
                        ctx.set_cookie = true;
                        pool.round_robin(exclude)
                    }
                }
            }
            Policy::Persistence => {
                let key = ctx
                    .session
                    .as_deref()
                    .map(|sid| pin_key(ctx.principal.as_ref(), sid));
                if let Some(key) = &key
                    && let Some(pin) = self.shared.sessions.get(key)
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
                            self.shared.sessions.remove(key);
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

    /// Counts a request sent away from the backend its session or cookie names.
    fn handoff(&self, pool: &Pool) {
        self.shared
            .metrics
            .handoffs
            .with_label_values(&[&pool.config.name])
            .inc();
    }

    /// Counts this attempt on backend `i`, for pingora's attempts and the stream relay's alike:
    /// the backend's request and active counts, the request's attempt number and its span.
    pub(crate) fn count(&self, ctx: &mut Ctx, pool: &Pool, i: usize) {
        ctx.backend = Some(i);
        ctx.first.get_or_insert(i);
        ctx.attempts += 1;
        let b = &pool.backends[i];
        b.requests.fetch_add(1, Ordering::Relaxed);
        b.active.fetch_add(1, Ordering::Relaxed);
        ctx.counted = true;
        ctx.attempt_start = Some(Instant::now());
        if let Some(t) = ctx.trace.as_mut() {
            t.attempt(&self.shared, &b.name, &b.address.to_string(), ctx.attempts);
        }
    }

    pub(crate) fn release(&self, ctx: &mut Ctx) {
        if ctx.counted
            && let (Some(pool), Some(i)) = (&ctx.pool, ctx.backend)
        {
            pool.backends[i].active.fetch_sub(1, Ordering::Relaxed);
        }
        ctx.counted = false;
    }

    /// What the proxy changes in the request headers it sends upstream, through pingora or
    /// through its own client (`relay.rs`, `resume.rs`): identity headers come from the proxy
    /// only (whatever the client sent under `x-mcp-principal*` is dropped, and `Authorization`
    /// unless the pool forwards it), the principal is signed now, and `X-Forwarded-For` /
    /// `X-Forwarded-Proto` are added. `headers` are the request's as they stand.
    pub(crate) fn upstream_edits(
        &self,
        session: &Session,
        ctx: &Ctx,
        headers: &http::HeaderMap,
    ) -> UpstreamEdits {
        let mut remove: Vec<http::HeaderName> = headers
            .keys()
            .filter(|k| k.as_str().starts_with(auth::PRINCIPAL))
            .cloned()
            .collect();
        let mut set = Vec::new();
        if let Some(a) = ctx.pool.as_ref().and_then(|p| p.auth.clone()) {
            // No token passthrough: the backend is not the token's audience.
            if !a.config.forward_authorization {
                remove.push(header::AUTHORIZATION);
            }
            if let (Some(p), Some(secret)) = (&ctx.principal, &a.config.principal_secret) {
                let (scopes, signature) = p.sign(secret, auth::unix_now());
                set.push((auth::PRINCIPAL, p.header.clone()));
                if !scopes.is_empty() {
                    set.push((auth::PRINCIPAL_SCOPES, scopes));
                }
                set.push((auth::PRINCIPAL_SIGNATURE, signature));
            }
        }
        if let Some(peer) = session.client_addr().and_then(|a| a.as_inet()) {
            let ip = match peer.ip() {
                IpAddr::V4(a) => ipv4_text("", a),
                other => other.to_string(),
            };
            let xff = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
                Some(prev) => format!("{prev}, {ip}"),
                None => ip,
            };
            set.push(("X-Forwarded-For", xff));
        }
        set.push((
            "X-Forwarded-Proto",
            if self.tls { "https" } else { "http" }.to_owned(),
        ));
        if let Some(t) = &ctx.trace {
            // The backend continues the proxy's trace, never the client's directly.
            remove.push(http::HeaderName::from_static("tracestate"));
            set.extend(t.upstream_headers());
        }
        UpstreamEdits { remove, set }
    }

    /// Counts a recovery step (`connect`, `safe_method`, `stream_resume`, `post_resume`,
    /// `post_repeat`, `post_cut`) and marks it on the request's trace.
    pub(crate) fn retried(&self, ctx: &Ctx, pool: &str, reason: &'static str) {
        self.shared
            .metrics
            .retries
            .with_label_values(&[pool, reason])
            .inc();
        if let Some(t) = &ctx.trace {
            t.event(reason, Vec::new());
        }
    }

    /// Feeds outlier detection; an ejection is counted like a health transition.
    fn outcome(&self, pool: &Pool, i: usize, ok: bool) {
        if !ok {
            pool.backends[i].errors.fetch_add(1, Ordering::Relaxed);
        }
        if pool.outcome(i, ok).is_some() {
            let (pool, backend) = (&pool.config.name, &pool.backends[i].name);
            self.shared
                .metrics
                .health_transitions
                .with_label_values(&[pool, backend, "ejected"])
                .inc();
            self.shared
                .events
                .record(pool, backend, "ejected", "failing live traffic");
        }
    }

    /// Answers a request that could not be routed (`ctx.failure`) as `fail_to_proxy` would.
    pub(crate) async fn answer_failure(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
    ) -> Result<bool> {
        let Some(f) = ctx.failure else {
            return Ok(false);
        };
        let pool = ctx.pool.clone();
        let name = pool.as_ref().map_or("-", |p| p.config.name.as_str());
        let (status, code, message, retry) =
            failure_reply(f, name, pool.as_ref().map(|p| retry_after(p)));
        let extra: Vec<(&'static str, String)> = retry
            .map(|s| ("retry-after", s.to_string()))
            .into_iter()
            .collect();
        self.refuse(session, ctx, status, code, &message, &extra)
            .await
    }

    fn may_retry(&self, ctx: &Ctx, pool: &Pool) -> bool {
        ctx.attempts <= pool.config.failover.max_retries
    }

    /// Answers a request the proxy refuses itself, with a JSON-RPC error.
    async fn refuse(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        status: u16,
        code: i32,
        message: &str,
        extra: &[(&'static str, String)],
    ) -> Result<bool> {
        ctx.status = status;
        let id = request_id(session, ctx);
        respond::rpc_error(session, id.as_ref(), status, code, message, extra).await?;
        Ok(true)
    }

    /// Authenticates the request when its pool asks for it; `Ok(false)` goes on.
    async fn authenticate(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        pool: &Pool,
    ) -> Result<bool> {
        let Some(a) = pool.auth.clone() else {
            return Ok(false);
        };
        let lines = session
            .req_header()
            .headers
            .get_all(header::AUTHORIZATION)
            .iter()
            .map(|v| v.as_bytes());
        match a.authenticate(lines).await {
            Ok(p) => {
                ctx.principal = Some(p);
                Ok(false)
            }
            Err(e) => {
                let name = pool.config.name.as_str();
                self.shared
                    .metrics
                    .auth_failures
                    .with_label_values(&[name, e.label()])
                    .inc();
                // Failures pay from the client address's own bucket: guessing is slow.
                if let Err(r) = pool.limiter.charge_failure(&address_key(ctx.client_ip)) {
                    return self.refuse_limited(session, ctx, name, r).await;
                }
                if e != auth::AuthError::Missing {
                    tracing::warn!(
                        target: "security",
                        pool = name,
                        client = %client_label(ctx.client_ip),
                        reason = e.message(),
                        "request refused: authentication failed"
                    );
                }
                let mut extra = Vec::new();
                if let Some(c) = e.challenge(&a.config) {
                    extra.push(("www-authenticate", c));
                }
                if e == auth::AuthError::Unavailable {
                    extra.push(("retry-after", "5".to_owned()));
                }
                self.refuse(session, ctx, e.status(), -32001, e.message(), &extra)
                    .await
            }
        }
    }

    /// Applies the pool's per-principal limits; `Ok(false)` goes on.
    async fn limit(&self, session: &mut Session, ctx: &mut Ctx, pool: &Pool) -> Result<bool> {
        let key = match &ctx.principal {
            Some(p) => p.hash.clone(),
            None => address_key(ctx.client_ip),
        };
        let stream = matches!(ctx.kind, Kind::Stream | Kind::LegacyStream);
        match pool.limiter.admit(key, stream) {
            Ok(t) => {
                ctx.ticket = Some(t);
                Ok(false)
            }
            Err(r) => {
                let name = pool.config.name.clone();
                self.refuse_limited(session, ctx, &name, r).await
            }
        }
    }

    /// Answers 429 for a limit, counted and logged.
    async fn refuse_limited(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        name: &str,
        r: Refusal,
    ) -> Result<bool> {
        self.shared
            .metrics
            .limited
            .with_label_values(&[name, r.label()])
            .inc();
        let (message, retry) = match r {
            Refusal::Rate(s) => ("rate limit exceeded; retry later", s),
            Refusal::AuthFailures(s) => ("too many failed authentications; retry later", s),
            Refusal::Concurrency => ("too many concurrent requests; retry later", 1),
            Refusal::Streams => ("too many open streams; close one first", 1),
        };
        tracing::info!(
            target: "security",
            pool = name,
            client = %client_label(ctx.client_ip),
            principal = ctx.principal.as_ref().map_or("-", Principal::short),
            limit = r.label(),
            "request refused by a limit"
        );
        self.refuse(
            session,
            ctx,
            429,
            -32000,
            message,
            &[("retry-after", retry.to_string())],
        )
        .await
    }
}

/// The client address for logs, `-` when unknown.
/// The JSON-RPC id of the request, for errors the proxy answers itself: peeked, or (when the
/// method came from headers) read from the buffered body now.
pub(crate) fn request_id(session: &Session, ctx: &Ctx) -> Option<serde_json::Value> {
    if ctx.peek.id.is_some() || !ctx.peek.from_headers {
        return ctx.peek.id.clone();
    }
    session
        .as_ref()
        .get_retry_buffer()
        .and_then(|b| mcp::peek(&b).id)
}

/// This request's open stream now counts on backend `b` (the relay moves it when it resumes
/// on another backend).
pub(crate) fn stream_moved(ctx: &mut Ctx, b: &Arc<crate::pool::BackendState>) {
    if let Some(old) = ctx.stream_on.replace(b.clone()) {
        old.streams.fetch_sub(1, Ordering::Relaxed);
    }
    b.streams.fetch_add(1, Ordering::Relaxed);
}

fn client_label(ip: Option<IpAddr>) -> String {
    match ip {
        Some(IpAddr::V4(a)) => ipv4_text("", a),
        Some(ip) => ip.to_string(),
        None => "-".to_owned(),
    }
}

/// The limit key of an unauthenticated client: its address, IPv6 by /64 (one host's share of
/// addresses), so rotating addresses within a prefix does not escape the limits.
fn address_key(ip: Option<IpAddr>) -> String {
    match ip {
        Some(IpAddr::V6(a)) if a.to_ipv4_mapped().is_none() => {
            let s = a.segments();
            format!("ip:{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
        Some(IpAddr::V6(a)) => match a.to_ipv4_mapped() {
            Some(v4) => ipv4_text("ip:", v4),
            None => format!("ip:{a}"),
        },
        Some(IpAddr::V4(a)) => ipv4_text("ip:", a),
        None => "ip:-".to_owned(),
    }
}

/// `prefix` then `a` in dotted decimal, without the formatting machinery (it runs for every
/// request: the limiter key and `X-Forwarded-For`).
pub(crate) fn ipv4_text(prefix: &str, a: std::net::Ipv4Addr) -> String {
    let mut out = String::with_capacity(prefix.len() + 15);
    out.push_str(prefix);
    for (i, o) in a.octets().into_iter().enumerate() {
        if i > 0 {
            out.push('.');
        }
        if o >= 100 {
            out.push(char::from(b'0' + o / 100));
        }
        if o >= 10 {
            out.push(char::from(b'0' + o / 10 % 10));
        }
        out.push(char::from(b'0' + o % 10));
    }
    out
}

/// Pins are kept per principal and session: another principal presenting the same session id
/// does not reach the pinned backend through the pin.
fn pin_key(principal: Option<&Principal>, session: &str) -> String {
    match principal {
        Some(p) => format!("{}:{session}", p.hash),
        None => session.to_owned(),
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

/// The status, JSON-RPC code, message and `Retry-After` of a request the proxy could not
/// route.
fn failure_reply(f: Failure, pool: &str, retry: Option<u64>) -> (u16, i32, String, Option<u64>) {
    match f {
        Failure::NoneAvailable => (
            503,
            -32000,
            format!("no healthy backend in pool {pool}; retry later"),
            retry,
        ),
        Failure::SessionGone => (
            404,
            -32001,
            "session not found: its backend is gone; initialize a new session".into(),
            None,
        ),
    }
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

    /// No downstream modules: pingora's default adds a (disabled) compression module, a
    /// `Vec`, a `Box` and dynamic calls on every request; the proxy never compresses.
    fn init_downstream_modules(&self, _modules: &mut pingora::modules::http::HttpModules) {}

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
            prefix: Arc::from(""),
            rewrite_endpoint: false,
            principal: None,
            ticket: None,
            post: None,
            answered: false,
            tools_list: None,
            list_fill: None,
            list_body: None,
            list_watch: false,
            trace: None,
            attempt_start: None,
            stream_on: None,
        }
    }

    async fn early_request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<()> {
        crate::limits::head_read();
        // The request keeps this snapshot to its end (request_filter and after use it).
        let snapshot = self.shared.snapshot();
        let l = &snapshot.config.limits;
        // Per read of the request body, and per write to the client: a client that stops
        // reading a stream is cut off.
        session.set_read_timeout(Some(l.body_read_timeout));
        session.set_write_timeout(Some(l.client_write_timeout));
        ctx.snapshot = Some(snapshot);
        Ok(())
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        let snapshot = match &ctx.snapshot {
            Some(s) => s.clone(),
            None => {
                let s = self.shared.snapshot();
                ctx.snapshot = Some(s.clone());
                s
            }
        };
        let limits = &snapshot.config.limits;

        let req = session.req_header();
        let peer = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        ctx.client_ip = client_ip(
            peer,
            req.headers
                .get_all("x-forwarded-for")
                .iter()
                .map(|v| v.as_bytes()),
            &snapshot.config.trusted_proxies,
        );

        // The route allow-list: only the MCP endpoints of this listener's routes (and their
        // OAuth metadata) are served, matched on the raw target; everything else is 404 here.
        let mut hosts = req.headers.get_all(header::HOST).iter();
        let host = match (hosts.next(), hosts.next()) {
            (Some(_), Some(_)) => {
                return self
                    .refuse(session, ctx, 400, -32600, "more than one Host header", &[])
                    .await;
            }
            (Some(h), None) => match host_name(h.as_bytes()) {
                Some(h) => Some(h),
                None => {
                    return self
                        .refuse(session, ctx, 400, -32600, "invalid Host header", &[])
                        .await;
                }
            },
            (None, _) => req
                .uri
                .authority()
                .and_then(|a| host_name(a.as_str().as_bytes())),
        };
        let get = req.method == http::Method::GET;
        let Some(entry) = snapshot
            .routes(self.listener)
            .find(host.as_deref(), req.raw_path())
            .cloned()
        else {
            if get && req.raw_path() == b"/health" {
                let (status, body) = if snapshot.serving() {
                    (200, r#"{"status":"ok"}"#)
                } else {
                    (503, r#"{"status":"degraded"}"#)
                };
                ctx.status = status;
                respond::json(session, status, Bytes::from_static(body.as_bytes()), &[]).await?;
                return Ok(true);
            }
            return self
                .refuse(
                    session,
                    ctx,
                    404,
                    -32601,
                    "not found: no MCP endpoint at this path",
                    &[],
                )
                .await;
        };
        ctx.trace = crate::trace::Trace::start(&self.shared, req);
        let pool = snapshot.pools[entry.pool].clone();
        ctx.pool = Some(pool.clone());
        ctx.prefix = entry.prefix.clone();
        if !entry.endpoint.allows(&req.method) {
            return self
                .refuse(
                    session,
                    ctx,
                    405,
                    -32600,
                    "method not allowed",
                    &[("allow", entry.endpoint.allow_header().to_owned())],
                )
                .await;
        }
        let kind = match entry.endpoint {
            Endpoint::Metadata => {
                let body = pool
                    .auth
                    .as_ref()
                    .map(|a| auth::metadata(&a.config).to_string())
                    .unwrap_or_default();
                ctx.status = 200;
                respond::json(
                    session,
                    200,
                    Bytes::from(body),
                    &[("cache-control", "max-age=3600".to_owned())],
                )
                .await?;
                return Ok(true);
            }
            Endpoint::Mcp if get => Kind::Stream,
            Endpoint::Mcp => Kind::Post,
            Endpoint::LegacyStream => Kind::LegacyStream,
            Endpoint::LegacyMessage => Kind::LegacyMessage,
        };
        ctx.kind = kind;
        ctx.rewrite_endpoint = kind == Kind::LegacyStream && !ctx.prefix.is_empty();
        let post = req.method == http::Method::POST;

        // Request smuggling guard: with both framing headers pingora drops Content-Length and
        // goes on (RFC 9112 allows that); an edge proxy refuses such a request instead.
        if req.headers.contains_key(header::TRANSFER_ENCODING)
            && (req.headers.contains_key(header::CONTENT_LENGTH)
                || session
                    .as_downstream()
                    .as_http1()
                    .is_some_and(|h1| has_content_length(&h1.get_headers_raw_bytes())))
        {
            return self
                .refuse(
                    session,
                    ctx,
                    400,
                    -32600,
                    "request has both Content-Length and Transfer-Encoding",
                    &[],
                )
                .await;
        }
        let header_bytes: usize = req
            .headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 4)
            .sum();
        if header_bytes > limits.max_header_bytes {
            return self
                .refuse(session, ctx, 431, -32600, "request headers too large", &[])
                .await;
        }
        let content_length = match req.headers.get(header::CONTENT_LENGTH) {
            None => None,
            Some(v) => match v.to_str().ok().and_then(|s| s.trim().parse::<u64>().ok()) {
                Some(n) => Some(n),
                None => {
                    return self
                        .refuse(
                            session,
                            ctx,
                            400,
                            -32600,
                            "invalid Content-Length header",
                            &[],
                        )
                        .await;
                }
            },
        };
        if content_length.is_some_and(|n| n > limits.max_body_bytes) {
            self.refuse(session, ctx, 413, -32600, "request body too large", &[])
                .await?;
            // Lingering close: read what the client is still sending (bounded), so it gets to
            // read the 413 instead of a connection reset.
            if content_length.is_some_and(|n| n <= LINGER_LIMIT) {
                let _ = tokio::time::timeout(LINGER_TIME, session.drain_request_body()).await;
            }
            return Ok(true);
        }
        if self.authenticate(session, ctx, &pool).await? || self.limit(session, ctx, &pool).await? {
            return Ok(true);
        }
        // Read a small POST body first, so that even errors below can echo its id.
        // `Expect: 100-continue` clients send the body only after the backend's 100: not peeked.
        let expects = session.req_header().headers.contains_key(header::EXPECT);
        let method_header = mcp::method_header(&session.req_header().headers);
        let mut peeked: Option<Bytes> = None;
        if post
            && !expects
            && let Some(len) = content_length.filter(|n| (1..=PEEK_LIMIT).contains(n))
        {
            session.enable_retry_buffering();
            // Most bodies arrive in one read: peeked where they are, copied only when split.
            let mut first: Option<Bytes> = None;
            let mut joined = BytesMut::new();
            let mut got = 0u64;
            while let Some(chunk) = session
                .read_request_body()
                .await
                .map_err(|e| e.into_down())?
            {
                got += chunk.len() as u64;
                match first.take() {
                    None if joined.is_empty() => first = Some(chunk),
                    earlier => {
                        if let Some(e) = earlier {
                            joined.reserve(len as usize);
                            joined.extend_from_slice(&e);
                        }
                        joined.extend_from_slice(&chunk);
                    }
                }
                if got >= len {
                    break;
                }
            }
            let whole = match first {
                Some(f) => f,
                None => joined.freeze(),
            };
            ctx.peek = match &method_header {
                // 2026-07-28 requests name their method in headers, which the backend checks
                // against the body (-32020): no body parse here.
                Some(m) => mcp::Peek::from_headers(m, &session.req_header().headers),
                None => mcp::peek(&whole),
            };
            peeked = Some(whole);
        }
        let req = session.req_header();
        if let Some(v) = req.headers.get("mcp-session-id") {
            match mcp::session_id(v.as_bytes(), limits.max_session_id_bytes) {
                Ok(s) => ctx.session = Some(s.to_owned()),
                Err(mcp::BadHeader(m)) => {
                    return self.refuse(session, ctx, 400, -32600, m, &[]).await;
                }
            }
        }
        if let Some(v) = req.headers.get("mcp-protocol-version") {
            match mcp::protocol_version(v.as_bytes()) {
                Ok(stateless) => ctx.stateless = stateless,
                Err(mcp::BadHeader(m)) => {
                    return self.refuse(session, ctx, 400, -32600, m, &[]).await;
                }
            }
        }
        if kind == Kind::LegacyMessage {
            ctx.session = req.uri.query().and_then(mcp::query_session_id);
        }
        // Only a request the backend would surely accept is answered from the cache: its
        // method from `Mcp-Method` (checked against the body in `lookup`), no `Mcp-Name`, an
        // `Accept` of both types, no `Origin` (the backend's DNS-rebinding check stays the
        // backend's), no credentials the proxy did not check itself, and the `_meta` a
        // 2026-07-28 request must carry (checked in `lookup`).
        // Every listen stream through a cached pool is read for list changes, whoever sends it.
        ctx.list_watch = pool.list_cache.is_some()
            && kind == Kind::Post
            && ctx.peek.method.as_deref() == Some("subscriptions/listen");
        if let Some(cache) = &pool.list_cache
            && kind == Kind::Post
            && ctx.stateless
            && ctx.session.is_none()
            && ctx.peek.from_headers
            && crate::list_cache::plain_request(&session.req_header().headers, pool.auth.is_some())
        {
            let method = ctx.peek.method.as_deref().unwrap_or_default();
            let version = session
                .req_header()
                .headers
                .get("mcp-protocol-version")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            if let Some(lookup) = peeked
                .as_ref()
                .and_then(|body| cache.lookup(method, body, version, ctx.principal.as_ref()))
            {
                let count = |result| {
                    self.shared
                        .metrics
                        .list_cache
                        .with_label_values(&[pool.config.name.as_str(), result])
                        .inc();
                };
                if let Some(hit) = cache.get(&lookup) {
                    count("hit");
                    ctx.status = 200;
                    respond::json(session, 200, hit, &[("x-mcp-cache", "hit".to_owned())]).await?;
                    return Ok(true);
                }
                count("miss");
                ctx.list_fill = Some(lookup);
            }
        }
        if kind == Kind::Stream && pool.config.shared_sessions && ctx.session.is_some() {
            // Any backend can resume this stream: the proxy keeps it open across backends.
            return self.relay_stream(session, ctx, &pool).await;
        }
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
        // request_body_filter sees the whole body again on every attempt.
        ctx.body_bytes = 0;
        self.count(ctx, &pool, i);
        let b = &pool.backends[i];

        let t = &pool.config.timeouts;
        let mut peer = HttpPeer::new(b.address, false, String::new());
        peer.options.connection_timeout = Some(t.connect);
        peer.options.read_timeout = Some(match ctx.kind {
            Kind::Stream | Kind::LegacyStream => t.sse_idle,
            Kind::Post | Kind::LegacyMessage => t.read,
        });
        peer.options.write_timeout = Some(t.write);
        // Zero: no idle timer per pooled connection (it stays until the backend closes it or
        // the pool makes room).
        peer.options.idle_timeout =
            (!t.upstream_keepalive.is_zero()).then_some(t.upstream_keepalive);
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream: &mut pingora::http::RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let edits = self.upstream_edits(session, ctx, &upstream.headers);
        for k in &edits.remove {
            upstream.remove_header(k);
        }
        for (k, v) in edits.set {
            upstream.insert_header(k, v)?;
        }
        if !ctx.prefix.is_empty()
            && let Some(pool) = &ctx.pool
        {
            let path = match ctx.kind {
                Kind::Post | Kind::Stream => pool.config.mcp_path.as_str(),
                Kind::LegacyStream => "/sse",
                Kind::LegacyMessage => "/messages",
            };
            let target = match upstream.uri.query() {
                Some(q) => format!("{path}?{q}"),
                None => path.to_owned(),
            };
            let uri = target
                .parse::<http::Uri>()
                .or_err(ErrorType::InternalError, "rewriting the upstream path")?;
            upstream.set_uri(uri);
        }
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
            b.errors.fetch_add(1, Ordering::Relaxed);
            if let Some(t) = b.connect_failed(e.to_string()) {
                self.shared
                    .transition(&pool.config.name, &b.name, t, "connection failed");
            }
            ctx.tried.push(i);
        }
        // The request never reached a backend: always safe to send elsewhere.
        let retry = self.may_retry(ctx, &pool);
        e.set_retry(retry);
        if let Some(t) = ctx.trace.as_mut() {
            t.attempt_failed(&e.to_string());
        }
        if retry {
            self.retried(ctx, &pool.config.name, "connect");
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
            && let Some(i) = ctx.backend
        {
            self.outcome(&pool, i, false);
        }
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
        let safe =
            matches!(ctx.kind, Kind::Stream | Kind::LegacyStream) || pool.repeatable(&ctx.peek);
        // A pooled connection closed under us never delivered the request (pingora's
        // ReusedOnly): safe to send elsewhere for any method.
        let retry = upstream_fault
            && (safe || stale_connection)
            && !ctx.pinned
            && !ctx.response_started
            && !session.as_ref().retry_buffer_truncated()
            && self.may_retry(ctx, &pool);
        e.set_retry(retry);
        if let Some(t) = ctx.trace.as_mut() {
            t.attempt_failed(&e.to_string());
        }
        if retry {
            self.release(ctx);
            if let Some(i) = ctx.backend
                && !stale_connection
            {
                ctx.tried.push(i);
            }
            self.retried(ctx, &pool.config.name, "safe_method");
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
        if let Some(t) = &ctx.trace {
            t.response(ctx.status);
        }
        let (Some(pool), Some(i)) = (ctx.pool.clone(), ctx.backend) else {
            return Ok(());
        };
        self.outcome(&pool, i, resp.status.as_u16() < 500);
        if resp.status.is_success()
            && pool.config.failover.trust_tool_annotations
            && ctx.peek.method.as_deref() == Some("tools/list")
        {
            ctx.tools_list = Some(BytesMut::new());
        }
        if ctx.list_fill.is_some() {
            if resp.status == http::StatusCode::OK {
                ctx.list_body = Some(BytesMut::new());
                resp.insert_header("x-mcp-cache", "miss")?;
            } else {
                ctx.list_fill = None;
            }
        }
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
            stream_moved(ctx, b);
            if ctx.kind == Kind::Post {
                ctx.post = Some(crate::relay::EventCursor::default());
            }
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
                self.shared.sessions.insert(
                    &pin_key(ctx.principal.as_ref(), sid),
                    name,
                    &b.name,
                    r.persistence_ttl,
                );
            }
        }
        let deleted =
            session.req_header().method == http::Method::DELETE && resp.status.is_success();
        if let Some(sid) = &ctx.session
            && (deleted || resp.status == http::StatusCode::NOT_FOUND)
        {
            let reason = if deleted { "deleted" } else { "gone" };
            self.shared
                .metrics
                .sessions_ended
                .with_label_values(&[name, reason])
                .inc();
            if r.uses(Policy::Persistence) {
                self.shared
                    .sessions
                    .remove(&pin_key(ctx.principal.as_ref(), sid));
            }
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
        end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<Option<Duration>> {
        if ctx.rewrite_endpoint
            && let Some(chunk) = body.as_mut()
            && let Some(rewritten) = mcp::prefix_endpoint(chunk, &ctx.prefix)
        {
            *chunk = rewritten;
            ctx.rewrite_endpoint = false;
        }
        if let Some(list) = ctx.tools_list.as_mut() {
            if let Some(chunk) = body.as_ref() {
                list.extend_from_slice(chunk);
            }
            if list.len() > crate::resume::MAX_TOOLS_LIST_BYTES {
                ctx.tools_list = None;
            } else if end_of_stream
                && let (Some(list), Some(pool)) = (ctx.tools_list.take(), &ctx.pool)
            {
                pool.learn_tools(mcp::tool_hints(&list));
            }
        }
        if let Some(buf) = ctx.list_body.as_mut() {
            if let Some(chunk) = body.as_ref() {
                buf.extend_from_slice(chunk);
            }
            let cache = ctx.pool.as_ref().and_then(|p| p.list_cache.as_ref());
            if cache.is_none_or(|c| buf.len() > c.max_answer_bytes()) {
                ctx.list_body = None;
            } else if end_of_stream
                && let (Some(buf), Some(lookup), Some(pool)) =
                    (ctx.list_body.take(), ctx.list_fill.take(), &ctx.pool)
                && let Some(cache) = &pool.list_cache
                && cache.fill(&lookup, &buf)
            {
                self.shared
                    .metrics
                    .list_cache
                    .with_label_values(&[pool.config.name.as_str(), "stored"])
                    .inc();
            }
        }
        if let Some(cursor) = ctx.post.as_mut() {
            crate::resume::whole_events(cursor, body, end_of_stream, &mut ctx.answered);
        }
        if ctx.list_watch
            && let Some(chunk) = body.as_ref()
            && let Some(cache) = ctx.pool.as_ref().and_then(|p| p.list_cache.as_ref())
        {
            // Whole events, before the client reads them: a list change empties the cache
            // first, so the client's next list is not a stale hit.
            cache.watch(chunk);
        }
        if let (Some(buf), Some(chunk)) = (ctx.scan.as_mut(), body.as_ref()) {
            buf.extend_from_slice(chunk);
            if let Some(sid) = mcp::endpoint_session(buf) {
                ctx.scan = None;
                if let (Some(pool), Some(i)) = (&ctx.pool, ctx.backend) {
                    // Lives as long as the stream: `logging` removes it.
                    let sid = pin_key(ctx.principal.as_ref(), &sid);
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
            Some(f) => failure_reply(f, &pool_name, retry),
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
        if ctx.response_started && ctx.post.is_some() && !ctx.answered {
            // The backend died in the middle of a POST's SSE answer: finish it cleanly.
            self.finish_cut_post(session, ctx).await;
            return FailToProxy {
                error_code: 0,
                can_reuse_downstream: false,
            };
        }
        if status > 0 && !ctx.response_started {
            let extra: Vec<(&'static str, String)> = retry_after
                .map(|s| ("retry-after", s.to_string()))
                .into_iter()
                .collect();
            if let Err(err) = self
                .refuse(session, ctx, status, code, &message, &extra)
                .await
            {
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

    /// A client that goes away (closed, reset, stopped reading) is its own business: the
    /// access log records the request with its error; pingora's ERROR line per disconnect is
    /// noise, and costs a formatted line on the writer thread each time.
    fn suppress_error_log(&self, _session: &Session, _ctx: &Ctx, error: &Error) -> bool {
        *error.esource() == ErrorSource::Downstream
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        self.release(ctx);
        if let (Some(t), Some(pool)) = (ctx.ticket.take(), &ctx.pool) {
            pool.limiter.release(t);
        }
        let Some(pool) = ctx.pool.clone() else {
            return;
        };
        let m = &self.shared.metrics;
        let name = pool.config.name.as_str();
        if ctx.sse {
            m.sse_streams.with_label_values(&[name]).dec();
        }
        if let Some(b) = ctx.stream_on.take() {
            b.streams.fetch_sub(1, Ordering::Relaxed);
        }
        if let Some(sid) = ctx.legacy_pin.take() {
            self.shared.legacy.remove(&sid);
        }
        let status = session
            .response_written()
            .map_or(ctx.status, |r| r.status.as_u16());
        let backend = ctx.backend.map_or("-", |i| pool.backends[i].name.as_str());
        let method = mcp::method_label(ctx.peek.method.as_deref());
        let code = http::StatusCode::from_u16(status).ok();
        let status_label = code.as_ref().map_or("0", http::StatusCode::as_str);
        m.requests
            .with_label_values(&[name, backend, status_label, method])
            .inc();
        let elapsed = ctx.start.elapsed();
        m.duration
            .with_label_values(&[name, method])
            .observe(elapsed.as_secs_f64());
        if let (Some(t), Kind::Post | Kind::LegacyMessage, true, Some(i)) = (
            ctx.attempt_start,
            ctx.kind,
            ctx.response_started,
            ctx.backend,
        ) {
            let took = t.elapsed();
            m.backend_duration
                .with_label_values(&[name, backend])
                .observe(took.as_secs_f64());
            let b = &pool.backends[i];
            b.answered.fetch_add(1, Ordering::Relaxed);
            b.latency_us
                .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
        }
        let failover = match (ctx.first, ctx.backend) {
            (Some(f), Some(b)) if f != b => Some((
                pool.backends[f].name.as_str(),
                pool.backends[b].name.as_str(),
            )),
            _ => None,
        };
        if let Some((from, to)) = failover {
            m.failovers.with_label_values(&[name]).inc();
            self.shared
                .events
                .record(name, to, "failover", &format!("from {from}"));
        }
        let error = e.map(|e| e.to_string());
        let trace_id = ctx.trace.as_mut().and_then(|t| {
            t.describe(
                &ctx.peek,
                name,
                ctx.session.as_deref(),
                ctx.principal.as_ref().map(|p| p.name.as_str()),
            );
            t.finish(status, error.as_deref(), failover);
            t.id()
        });
        if !ctx
            .snapshot
            .as_ref()
            .is_some_and(|s| s.config.server.access_log)
        {
            return;
        }
        if let Some(mut line) = telemetry::access::line("request") {
            let req = session.req_header();
            line.str("client", &client_label(ctx.client_ip))
                .str("method", req.method.as_str())
                .str("path", req.uri.path())
                .uint("status", u64::from(status))
                .str("pool", name)
                .str("backend", backend)
                .str("mcp_method", ctx.peek.method.as_deref().unwrap_or("-"))
                .str("session", &short(ctx.session.as_deref()))
                .str(
                    "principal",
                    ctx.principal.as_ref().map_or("-", Principal::short),
                )
                .uint("attempts", ctx.attempts as u64)
                .millis("duration_ms", elapsed)
                .str("error", error.as_deref().unwrap_or("-"))
                .str("trace_id", trace_id.as_deref().unwrap_or("-"));
            line.emit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anonymous_limits_key_ipv6_clients_by_their_64_prefix() {
        let ip = |s: &str| s.parse::<IpAddr>().ok();
        assert_eq!(
            address_key(ip("2001:db8:1:2::aa")),
            address_key(ip("2001:db8:1:2:ffff:1:2:3")),
            "one /64, one bucket"
        );
        assert_ne!(
            address_key(ip("2001:db8:1:2::1")),
            address_key(ip("2001:db8:1:3::1"))
        );
        assert_eq!(address_key(ip("::ffff:10.0.0.1")), "ip:10.0.0.1");
        for a in [
            "0.0.0.0",
            "1.2.3.4",
            "10.0.100.255",
            "255.255.255.255",
            "192.168.9.10",
        ] {
            let v4: std::net::Ipv4Addr = a.parse().unwrap();
            assert_eq!(ipv4_text("", v4), a);
            assert_eq!(address_key(Some(IpAddr::V4(v4))), format!("ip:{a}"));
        }
        assert_eq!(address_key(ip("10.0.0.1")), "ip:10.0.0.1");
        assert_eq!(address_key(None), "ip:-");
    }

    #[test]
    fn short_session_ids_in_logs() {
        assert_eq!(short(Some("0123456789abcdef")), "01234567…");
        assert_eq!(short(Some("abc")), "abc");
        assert_eq!(short(None), "-");
    }
}
