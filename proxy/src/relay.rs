//! Standalone GET streams that outlive their backend.
//!
//! For pools whose backends share sessions (`shared_sessions: true`; `mcp-backend` replicas
//! do, through Redis), the proxy serves `GET <mcp_path>` with a session itself rather than
//! handing the connection to pingora. It opens the stream on a backend, forwards whole SSE
//! events, and remembers the id of the last one it forwarded. When the upstream ends or fails
//! while the client is still there (backend killed, restarted, connection reset, idle
//! timeout), or when its backend is drained or marked down, it reopens the stream on another
//! backend with `Last-Event-ID` set to that id and goes on writing into the same response. The
//! backend replays what came after that id, so the client sees no break, no repeated event and
//! no gap. After [`MAX_ATTEMPTS`] reopenings in a row that deliver nothing (with backoff), the
//! response ends cleanly and the client reconnects by itself.
//!
//! A client's own reconnection with `Last-Event-ID` takes the same path, so it lands on any
//! healthy backend even while the one it used is down.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use http::header;
use pingora::Result;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;

use crate::pool::Pool;
use crate::proxy::{Ctx, McpProxy};

/// Reopenings in a row that deliver no event before the stream ends.
pub const MAX_ATTEMPTS: u32 = 5;
/// Wait before the second reopening in a row; doubles each time (the first is at once).
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// How often the relay checks that its backend is still available (drain, health).
const WATCH_EVERY: Duration = Duration::from_millis(200);
/// Longest SSE event held while waiting for its end.
const MAX_EVENT_BYTES: usize = 4 * 1024 * 1024;
/// Longest `Last-Event-ID` taken from a client.
const MAX_EVENT_ID_BYTES: usize = 1024;
/// Longest non-stream answer (an error) passed on from a backend.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// Request headers never copied upstream: hop-by-hop ones and those the relay sets itself.
const NOT_FORWARDED: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "last-event-id",
];

/// Response headers never copied from a backend's answer: hop-by-hop ones and the length
/// (the proxy frames the body itself).
fn copy_response_headers(resp: &mut ResponseHeader, upstream: &http::HeaderMap) -> Result<()> {
    for (k, v) in upstream {
        if !matches!(
            k.as_str(),
            "connection" | "keep-alive" | "transfer-encoding" | "content-length"
        ) {
            resp.append_header(k.clone(), v.clone())?;
        }
    }
    Ok(())
}

/// Splits an SSE byte stream into whole events and remembers the last event id.
#[derive(Debug, Default)]
pub struct EventCursor {
    buf: BytesMut,
    /// The id of the last whole event passed on (or the client's own `Last-Event-ID`).
    pub last_id: Option<String>,
}

/// An SSE stream that is not one: an event longer than [`MAX_EVENT_BYTES`].
#[derive(Debug, PartialEq, Eq)]
pub struct Oversized;

impl EventCursor {
    pub fn new(last_id: Option<String>) -> Self {
        Self {
            buf: BytesMut::new(),
            last_id,
        }
    }

    /// Adds `chunk`; returns the whole events it completes (with their blank lines), ready to
    /// forward, and notes the last `id:` among them.
    pub fn feed(&mut self, chunk: &[u8]) -> std::result::Result<Option<Bytes>, Oversized> {
        self.buf.extend_from_slice(chunk);
        let Some(end) = last_event_end(&self.buf) else {
            if self.buf.len() > MAX_EVENT_BYTES {
                return Err(Oversized);
            }
            return Ok(None);
        };
        let events = self.buf.split_to(end).freeze();
        if let Some(id) = last_id_in(&events) {
            self.last_id = Some(id);
        }
        Ok(Some(events))
    }

    /// Forgets a partial event (its upstream is gone; the next one replays it whole).
    pub fn discard_partial(&mut self) {
        self.buf.clear();
    }

    /// Whatever is held, as it is (the end of a body, or a stream that is not SSE after all).
    pub fn take_all(&mut self) -> Bytes {
        self.buf.split().freeze()
    }
}

/// The events of `bytes` (whole events, as [`EventCursor::feed`] returns them), each without
/// its blank line.
pub fn split_events(bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = bytes;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let lf = rest.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2));
        let crlf = rest
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map(|i| (i, 4));
        let (at, len) = match (lf, crlf) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b).unwrap_or((rest.len(), 0)),
        };
        let event = &rest[..at];
        rest = &rest[(at + len).min(rest.len())..];
        Some(event)
    })
}

/// The end (exclusive) of the last whole event in `buf`: after its `\n\n` or `\r\n\r\n`.
fn last_event_end(buf: &[u8]) -> Option<usize> {
    let lf = buf.windows(2).rposition(|w| w == b"\n\n").map(|i| i + 2);
    let crlf = buf
        .windows(4)
        .rposition(|w| w == b"\r\n\r\n")
        .map(|i| i + 4);
    lf.max(crlf)
}

/// The value of the last valid `id:` field in `events` (SSE: one leading space dropped; an id
/// with NUL is ignored).
fn last_id_in(events: &[u8]) -> Option<String> {
    let mut last = None;
    for line in events.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(value) = line.strip_prefix(b"id:") else {
            continue;
        };
        let value = value.strip_prefix(b" ").unwrap_or(value);
        if !value.contains(&0)
            && let Ok(v) = std::str::from_utf8(value)
        {
            last = Some(v.to_owned());
        }
    }
    last
}

/// A client's `Last-Event-ID`, if it is usable.
fn client_last_id(session: &Session) -> Option<String> {
    session
        .req_header()
        .headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= MAX_EVENT_ID_BYTES)
        .map(str::to_owned)
}

/// How one upstream stream ended.
enum Ended {
    /// The client went away (a write failed): stop.
    ClientGone,
    /// The upstream ended, failed or went idle, or its backend left: reopen elsewhere.
    Upstream { delivered: bool },
}

impl McpProxy {
    /// The headers of an upstream stream request: the client's, without hop-by-hop ones and
    /// forged identity, with the principal signed now and `Last-Event-ID` from `cursor`.
    pub(crate) fn relay_headers(
        &self,
        session: &Session,
        ctx: &Ctx,
        last_id: Option<&str>,
    ) -> http::HeaderMap {
        let mut h = session.req_header().headers.clone();
        for name in NOT_FORWARDED {
            h.remove(name);
        }
        let edits = self.upstream_edits(session, ctx, &h);
        for k in &edits.remove {
            h.remove(k);
        }
        for (k, v) in edits.set {
            if let (Ok(k), Ok(v)) = (
                http::HeaderName::from_bytes(k.as_bytes()),
                http::HeaderValue::from_str(&v),
            ) {
                h.insert(k, v);
            }
        }
        if let Some(id) = last_id.and_then(|v| http::HeaderValue::from_str(v).ok()) {
            h.insert("last-event-id", id);
        }
        h
    }

    /// Serves a standalone GET stream of a `shared_sessions` pool (see the module docs).
    /// Always answers the request itself (`Ok(true)`).
    pub(crate) async fn relay_stream(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        pool: &Arc<Pool>,
    ) -> Result<bool> {
        let mut cursor = EventCursor::new(client_last_id(session));
        let query = session
            .req_header()
            .uri
            .query()
            .map(|q| format!("?{q}"))
            .unwrap_or_default();
        let t = pool.config.timeouts.clone();
        let mut started = false;
        let mut idle_attempts = 0u32;
        loop {
            let i = match self.select(session, ctx, pool) {
                Ok(i) => i,
                Err(failure) if !started => {
                    ctx.failure = Some(failure);
                    return self.answer_failure(session, ctx).await;
                }
                Err(_) if ctx.tried.is_empty() => break,
                // Every other backend is out too: the one just left may serve again.
                Err(_) => {
                    ctx.tried.clear();
                    continue;
                }
            };
            self.count(ctx, pool, i);
            let b = &pool.backends[i];
            let url = format!("http://{}{}{query}", b.address, pool.config.mcp_path);
            let headers = self.relay_headers(session, ctx, cursor.last_id.as_deref());
            let sent = tokio::time::timeout(
                t.connect + t.read,
                self.shared.relay_client.get(url).headers(headers).send(),
            )
            .await;
            let response = match sent {
                Ok(Ok(r)) => r,
                failed => {
                    let error = match failed {
                        Ok(Err(e)) => e.to_string(),
                        _ => "no answer in time".to_owned(),
                    };
                    self.release(ctx);
                    if let Some(tr) = b.connect_failed(error) {
                        self.shared
                            .transition(&pool.config.name, &b.name, tr, "stream failed");
                    }
                    ctx.tried = vec![i];
                    if give_up(&mut idle_attempts).await {
                        break;
                    }
                    continue;
                }
            };
            let is_stream = response.status() == http::StatusCode::OK
                && response
                    .headers()
                    .get(header::CONTENT_TYPE)
                    .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
            if !is_stream {
                let status = response.status();
                self.release(ctx);
                if !started {
                    // Not a stream (404 unknown session, 400, 405...): the backend's answer.
                    self.pass_answer(session, ctx, response).await?;
                    return Ok(true);
                }
                if status == http::StatusCode::NOT_FOUND {
                    // The session ended: so does its stream.
                    break;
                }
                ctx.tried = vec![i];
                if give_up(&mut idle_attempts).await {
                    break;
                }
                continue;
            }
            if !started {
                self.start_stream(session, ctx, pool, i, response.headers())
                    .await?;
                started = true;
            }
            crate::proxy::stream_moved(ctx, &pool.backends[i]);
            match self.pump(session, pool, i, &t, response, &mut cursor).await {
                Ended::ClientGone => {
                    self.release(ctx);
                    return Ok(true);
                }
                Ended::Upstream { delivered } => {
                    self.release(ctx);
                    cursor.discard_partial();
                    self.retried(ctx, &pool.config.name, "stream_resume");
                    ctx.tried = vec![i];
                    if delivered {
                        idle_attempts = 0;
                    } else if give_up(&mut idle_attempts).await {
                        break;
                    }
                }
            }
        }
        if started {
            // A clean end: the client reconnects with its last event id.
            let _ = session.write_response_body(None, true).await;
        } else {
            ctx.failure = Some(crate::proxy::Failure::NoneAvailable);
            return self.answer_failure(session, ctx).await;
        }
        Ok(true)
    }

    /// Writes the stream's response head, once, from the first backend's.
    async fn start_stream(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        pool: &Pool,
        i: usize,
        upstream: &http::HeaderMap,
    ) -> Result<()> {
        let mut resp = ResponseHeader::build(200, Some(upstream.len() + 3))?;
        copy_response_headers(&mut resp, upstream)?;
        if !session.as_downstream().is_http2() {
            resp.insert_header(header::TRANSFER_ENCODING, "chunked")?;
        }
        if ctx
            .snapshot
            .as_ref()
            .is_some_and(|s| s.config.server.backend_header)
        {
            resp.insert_header("X-MCP-Backend", &pool.backends[i].name)?;
        }
        session.write_response_header(Box::new(resp), false).await?;
        ctx.response_started = true;
        ctx.status = 200;
        ctx.sse = true;
        self.shared
            .metrics
            .sse_streams
            .with_label_values(&[&pool.config.name])
            .inc();
        Ok(())
    }

    /// Forwards whole events from `response` until it ends, fails, idles past `sse_idle`, or
    /// its backend stops being available.
    async fn pump(
        &self,
        session: &mut Session,
        pool: &Pool,
        i: usize,
        t: &crate::config::Timeouts,
        response: reqwest::Response,
        cursor: &mut EventCursor,
    ) -> Ended {
        let mut body = response.bytes_stream();
        let mut delivered = false;
        let mut watch = tokio::time::interval(WATCH_EVERY);
        let mut idle = tokio::time::Instant::now();
        loop {
            tokio::select! {
                chunk = body.next() => match chunk {
                    Some(Ok(bytes)) => {
                        idle = tokio::time::Instant::now();
                        match cursor.feed(&bytes) {
                            Ok(Some(events)) => {
                                if session.write_response_body(Some(events), false).await.is_err() {
                                    return Ended::ClientGone;
                                }
                                delivered = true;
                            }
                            Ok(None) => {}
                            Err(Oversized) => return Ended::Upstream { delivered },
                        }
                    }
                    _ => return Ended::Upstream { delivered },
                },
                _ = watch.tick() => {
                    if !pool.backends[i].available() || idle.elapsed() > t.sse_idle {
                        return Ended::Upstream { delivered };
                    }
                }
            }
        }
    }

    /// Passes a backend's non-stream answer (an error) to the client.
    async fn pass_answer(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        response: reqwest::Response,
    ) -> Result<()> {
        let status = response.status().as_u16();
        let mut resp = ResponseHeader::build(status, Some(response.headers().len()))?;
        copy_response_headers(&mut resp, response.headers())?;
        let mut body = BytesMut::new();
        let mut chunks = response.bytes_stream();
        while let Some(Ok(c)) = chunks.next().await {
            body.extend_from_slice(&c);
            if body.len() > MAX_ERROR_BODY {
                body.truncate(MAX_ERROR_BODY);
                break;
            }
        }
        resp.insert_header(header::CONTENT_LENGTH, body.len().to_string())?;
        ctx.status = status;
        ctx.response_started = true;
        session.write_response_header(Box::new(resp), false).await?;
        session.write_response_body(Some(body.freeze()), true).await
    }
}

/// Counts a reopening that delivered nothing: `true` once there were [`MAX_ATTEMPTS`] in a
/// row (end the stream), otherwise waits the backoff (none for the first).
async fn give_up(attempts: &mut u32) -> bool {
    *attempts += 1;
    if *attempts >= MAX_ATTEMPTS {
        return true;
    }
    if *attempts > 1 {
        tokio::time::sleep(FIRST_BACKOFF * 2u32.pow((*attempts).min(6) - 2)).await;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_events_pass_and_the_last_id_is_kept() {
        let mut c = EventCursor::new(Some("client/1".into()));
        assert_eq!(
            c.feed(b"id: a/1\ndata: {\"x\"").ok(),
            Some(None),
            "partial: held"
        );
        assert_eq!(c.last_id.as_deref(), Some("client/1"));
        let out = c
            .feed(b":1}\n\nid: a/2\ndata: y\n\nid: a/3\nda")
            .ok()
            .flatten();
        assert_eq!(
            out.as_deref(),
            Some(&b"id: a/1\ndata: {\"x\":1}\n\nid: a/2\ndata: y\n\n"[..])
        );
        assert_eq!(c.last_id.as_deref(), Some("a/2"), "only whole events count");
        c.discard_partial();
        assert_eq!(
            c.feed(b": keep-alive\n\n").ok().flatten().as_deref(),
            Some(&b": keep-alive\n\n"[..])
        );
        assert_eq!(c.last_id.as_deref(), Some("a/2"), "a comment has no id");
        let out = c.feed(b"id:b/1\r\ndata: z\r\n\r\n").ok().flatten();
        assert!(out.is_some(), "CRLF events");
        assert_eq!(
            c.last_id.as_deref(),
            Some("b/1"),
            "no space after the colon"
        );
    }

    #[test]
    fn ids_with_nul_are_ignored_and_endless_events_are_refused() {
        let mut c = EventCursor::default();
        assert!(c.feed(b"id: ok\n\nid: bad\0\ndata: x\n\n").is_ok());
        assert_eq!(c.last_id.as_deref(), Some("ok"));
        let big = vec![b'x'; MAX_EVENT_BYTES + 1];
        assert_eq!(c.feed(&big), Err(Oversized));
    }
}
