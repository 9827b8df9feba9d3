//! POST answers cut short by a backend that dies.
//!
//! A POST's SSE answer passes to the client whole event by whole event ([`whole_events`]), so
//! a backend that dies in the middle of an answer never leaves half an event with the client,
//! and the proxy knows the id of the last event and whether the JSON-RPC response has already
//! gone out. If it has not, the proxy finishes the answer itself ([`McpProxy::finish_cut_post`]):
//! 1. in `shared_sessions` pools it resumes the answer from the session's log on another backend
//!    (`GET` with `Last-Event-ID` of this POST's stream): `mcp-backend` logs every event of a
//!    request stream, so a response the dead backend had produced still arrives;
//! 2. a request that may be repeated (`Pool::repeatable`: a safe method, or a `tools/call` of a
//!    safe tool) is sent again to another backend and its answer continues the same response;
//! 3. otherwise the answer ends with a JSON-RPC error for the request's id that says the
//!    backend failed and the call may or may not have run.
//!
//! The client always gets one well-formed response: never a truncated body.

use std::sync::atomic::Ordering;

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use http::header;
use pingora::proxy::Session;

use crate::mcp;
use crate::pool::Pool;
use crate::proxy::{Ctx, McpProxy};
use crate::relay::{EventCursor, Oversized};

/// Largest `tools/list` answer read for its annotations.
pub const MAX_TOOLS_LIST_BYTES: usize = 4 * 1024 * 1024;
/// JSON-RPC code of the error that ends an answer the proxy could not finish.
pub const BACKEND_FAILED: i32 = -32000;

/// Passes only whole SSE events of `body` on (holding a partial one for the next chunk), and
/// notes when one of them is the JSON-RPC response. At the end of the body, whatever is held
/// goes too.
pub fn whole_events(
    cursor: &mut EventCursor,
    body: &mut Option<Bytes>,
    end: bool,
    answered: &mut bool,
) {
    let mut out = BytesMut::new();
    if let Some(chunk) = body.take() {
        match cursor.feed(&chunk) {
            Ok(Some(events)) => {
                *answered |= carries_response(&events);
                out.extend_from_slice(&events);
            }
            Ok(None) => {}
            Err(Oversized) => out.extend_from_slice(&cursor.take_all()),
        }
    }
    if end {
        out.extend_from_slice(&cursor.take_all());
    }
    *body = (!out.is_empty()).then(|| out.freeze());
}

/// Whether any event in `events` carries a JSON-RPC response.
pub fn carries_response(events: &[u8]) -> bool {
    crate::relay::split_events(events)
        .filter_map(mcp::event_data)
        .any(|data| mcp::is_response(&data))
}

/// An SSE event carrying one JSON-RPC message.
fn event(json: &[u8]) -> Bytes {
    let mut e = BytesMut::with_capacity(json.len() + 8);
    e.extend_from_slice(b"data: ");
    e.extend_from_slice(json);
    e.extend_from_slice(b"\n\n");
    e.freeze()
}

/// What writing an upstream answer into the client's response came to.
enum Pumped {
    Answered,
    Unanswered,
    ClientGone,
}

impl McpProxy {
    /// Finishes a POST's SSE answer whose backend died before the JSON-RPC response went out
    /// (see the module docs). Ends the client's response in every case.
    pub(crate) async fn finish_cut_post(&self, session: &mut Session, ctx: &mut Ctx) {
        let Some(pool) = ctx.pool.clone() else {
            return;
        };
        let mut cursor = ctx.post.take().unwrap_or_default();
        cursor.discard_partial();
        if let Some(i) = ctx.backend {
            ctx.tried.push(i);
        }
        let name = pool.config.name.clone();
        let mut outcome = Pumped::Unanswered;
        if pool.config.shared_sessions
            && ctx.session.is_some()
            && let Some(last) = cursor.last_id.clone()
        {
            outcome = self.resume_answer(session, ctx, &pool, &last).await;
            if !matches!(outcome, Pumped::Unanswered) {
                self.retried(ctx, &name, "post_resume");
            }
        }
        if matches!(outcome, Pumped::Unanswered)
            && pool.repeatable(&ctx.peek)
            && !session.as_ref().retry_buffer_truncated()
            && let Some(body) = session.as_ref().get_retry_buffer()
        {
            outcome = self.repeat_post(session, ctx, &pool, body).await;
            if !matches!(outcome, Pumped::Unanswered) {
                self.retried(ctx, &name, "post_repeat");
            }
        }
        match outcome {
            Pumped::ClientGone => return,
            Pumped::Answered => {}
            Pumped::Unanswered => {
                let repeatable = pool.repeatable(&ctx.peek);
                let message = if repeatable {
                    "backend failed while answering and no other could; retry the request"
                } else {
                    "backend failed while answering; the call may or may not have run"
                };
                let body = serde_json::json!({
                    "jsonrpc": "2.0",
                    "id": crate::proxy::request_id(session, ctx).unwrap_or(serde_json::Value::Null),
                    "error": {"code": BACKEND_FAILED, "message": message,
                              "data": {"retryable": repeatable}},
                });
                let _ = session
                    .write_response_body(Some(event(body.to_string().as_bytes())), false)
                    .await;
                self.retried(ctx, &name, "post_cut");
            }
        }
        let _ = session.write_response_body(None, true).await;
    }

    /// Replays the rest of this POST's stream from another backend (`Last-Event-ID: last`).
    async fn resume_answer(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        pool: &Pool,
        last: &str,
    ) -> Pumped {
        let Ok(i) = self.select(session, ctx, pool) else {
            return Pumped::Unanswered;
        };
        let b = &pool.backends[i];
        ctx.attempts += 1;
        if let Some(tr) = ctx.trace.as_mut() {
            tr.attempt(&self.shared, &b.name, &b.address.to_string(), ctx.attempts);
        }
        let headers = self.relay_headers(session, ctx, Some(last));
        let url = format!("http://{}{}", b.address, pool.config.mcp_path);
        let request = self.shared.relay_client.get(url).headers(headers);
        self.pump_answer(session, ctx, pool, i, request).await
    }

    /// Sends the POST again to another backend and writes its answer.
    async fn repeat_post(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        pool: &Pool,
        body: Bytes,
    ) -> Pumped {
        let Ok(i) = self.select(session, ctx, pool) else {
            return Pumped::Unanswered;
        };
        let b = &pool.backends[i];
        ctx.attempts += 1;
        if let Some(tr) = ctx.trace.as_mut() {
            tr.attempt(&self.shared, &b.name, &b.address.to_string(), ctx.attempts);
        }
        let headers = self.relay_headers(session, ctx, None);
        let url = format!("http://{}{}", b.address, pool.config.mcp_path);
        let request = self
            .shared
            .relay_client
            .post(url)
            .headers(headers)
            .header(header::CONTENT_LENGTH, body.len())
            .body(body);
        self.pump_answer(session, ctx, pool, i, request).await
    }

    /// Sends `request` to backend `i` and writes the JSON-RPC messages of its answer (SSE or
    /// JSON) into the client's response until the response among them.
    async fn pump_answer(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        pool: &Pool,
        i: usize,
        request: reqwest::RequestBuilder,
    ) -> Pumped {
        let t = &pool.config.timeouts;
        let b = &pool.backends[i];
        ctx.tried.push(i);
        b.requests.fetch_add(1, Ordering::Relaxed);
        b.active.fetch_add(1, Ordering::Relaxed);

        let outcome = async {
            let Ok(Ok(response)) = tokio::time::timeout(t.connect + t.read, request.send()).await
            else {
                return Pumped::Unanswered;
            };
            if !response.status().is_success() {
                return Pumped::Unanswered;
            }
            let sse = response
                .headers()
                .get(header::CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
            let mut body = response.bytes_stream();
            let mut cursor = EventCursor::default();
            let mut json = BytesMut::new();
            loop {
                let chunk = match tokio::time::timeout(t.read, body.next()).await {
                    Ok(Some(Ok(c))) => c,
                    _ => break,
                };
                if !sse {
                    json.extend_from_slice(&chunk);
                    if json.len() > MAX_TOOLS_LIST_BYTES {
                        return Pumped::Unanswered;
                    }
                    continue;
                }
                let Ok(Some(events)) = cursor.feed(&chunk) else {
                    continue;
                };
                let answered = carries_response(&events);
                if session
                    .write_response_body(Some(events), false)
                    .await
                    .is_err()
                {
                    return Pumped::ClientGone;
                }
                if answered {
                    return Pumped::Answered;
                }
            }
            if !sse && mcp::is_response(&json) {
                if session
                    .write_response_body(Some(event(&json)), false)
                    .await
                    .is_err()
                {
                    return Pumped::ClientGone;
                }
                return Pumped::Answered;
            }
            Pumped::Unanswered
        }
        .await;
        b.active.fetch_sub(1, Ordering::Relaxed);
        outcome
    }
}
