//! The deprecated HTTP+SSE transport of protocol 2024-11-05, over the same handler and
//! session manager as `/mcp`.
//!
//! `GET /sse` opens the session: its first event is `endpoint` with
//! `/messages?sessionId=<id>`; every reply and notification then travels on this one stream.
//! `POST /messages?sessionId=<id>` answers 202 at once. The stream lives on one replica (the
//! holder, recorded in the store); a POST that lands on another replica is forwarded to the
//! holder over the bus (topic `legacy:<id>`), so a round-robin balancer in front works. When
//! the stream closes, the session ends: this transport has no resumption.
//!
//! `GET /sse` writes the session record (without `init`) and binds it to the caller's
//! principal before the `endpoint` event names the id, within `max_sessions_per_principal`;
//! the guard then checks every `POST /messages` against that owner, as for `/mcp`.

use std::{collections::HashMap, convert::Infallible, sync::Arc};

use axum::{
    body::Bytes,
    extract::{Extension, Query, State},
    http::StatusCode,
    response::{
        IntoResponse, Response,
        sse::{Event, KeepAlive, Sse},
    },
};
use futures::{Stream, StreamExt};
use rmcp::{
    model::{ClientJsonRpcMessage, ClientRequest, GetExtensions},
    service::serve_server_with_ct,
    transport::streamable_http_server::session::{ServerSseMessage, SessionId, SessionManager},
};
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::{
    Node,
    handler::Handler,
    http::{
        AppState, rpc_error, session_not_found, short_id, too_many_sessions, unavailable,
        valid_session_id,
    },
    principal::Caller,
    sessions::ReplicaSessions,
    store::{Admission, StoreError},
};

/// Messages queued for one session before POSTs see back-pressure.
const INBOX: usize = 64;
/// Events queued for one SSE stream.
const OUTBOX: usize = 256;

/// The 2024-11-05 sessions whose stream this replica holds.
pub struct LegacySessions {
    node: Arc<Node>,
    sessions: Arc<ReplicaSessions>,
    inboxes: std::sync::Mutex<HashMap<String, mpsc::Sender<ClientJsonRpcMessage>>>,
}

impl LegacySessions {
    pub fn new(node: Arc<Node>, sessions: Arc<ReplicaSessions>) -> Arc<Self> {
        Arc::new(Self {
            node,
            sessions,
            inboxes: std::sync::Mutex::default(),
        })
    }

    fn inbox(&self, id: &str) -> Option<mpsc::Sender<ClientJsonRpcMessage>> {
        self.inboxes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    fn set_inbox(&self, id: &str, tx: Option<mpsc::Sender<ClientJsonRpcMessage>>) {
        let mut inboxes = self.inboxes.lock().unwrap_or_else(|p| p.into_inner());
        match tx {
            Some(tx) => inboxes.insert(id.to_owned(), tx),
            None => inboxes.remove(id),
        };
    }
}

/// Ends a legacy session when its SSE response is dropped (client gone or server stopping).
struct StreamGuard {
    legacy: Arc<LegacySessions>,
    id: String,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let legacy = self.legacy.clone();
        let id = std::mem::take(&mut self.id);
        legacy.set_inbox(&id, None);
        tokio::spawn(async move {
            // The transport has no resumption: the session ends with its stream, everywhere
            // (the holder is a field of the record, so it goes with it).
            if let Err(e) = legacy.node.store.delete(&id).await {
                tracing::warn!(error = %e, "legacy session record left to expire");
            }
            legacy.sessions.ended(&id).await;
            tracing::info!(session = short_id(&id), "legacy sse session closed");
        });
    }
}

fn sse_event(message: &ServerSseMessage) -> Option<Event> {
    let message = message.message.as_ref()?;
    let json = serde_json::to_string(&**message).ok()?;
    Some(Event::default().event("message").data(json))
}

/// Puts the HTTP context rmcp would attach onto a message, so the handler finds its session.
fn with_session(mut message: ClientJsonRpcMessage, id: &str) -> ClientJsonRpcMessage {
    let parts = http::Request::builder()
        .header("mcp-session-id", id)
        .body(())
        .map(|r| r.into_parts().0);
    if let Ok(parts) = parts {
        match &mut message {
            ClientJsonRpcMessage::Request(r) => {
                r.request.extensions_mut().insert(parts);
            }
            ClientJsonRpcMessage::Notification(n) => {
                n.notification.extensions_mut().insert(parts);
            }
            _ => {}
        }
    }
    message
}

/// `GET /sse`: opens a 2024-11-05 session on this replica.
pub async fn open_stream(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Response {
    let legacy = state.legacy.clone();
    let node = state.node.clone();
    let sessions = state.sessions.clone();
    let (id, transport) = match sessions.create_session().await {
        Ok(pair) => pair,
        Err(e) => {
            tracing::error!(error = %e, "cannot create legacy session");
            return rpc_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                -32603,
                "cannot create session",
                None,
            );
        }
    };
    let limit = node.config.max_sessions_per_principal;
    let refused = match node.store.claim(&id, caller.owner(), limit, true).await {
        Ok(Admission::Admitted) => None,
        Ok(Admission::Full { retry_after }) => Some(too_many_sessions(limit, retry_after, None)),
        Ok(Admission::Missing) => Some(unavailable(&StoreError::Unavailable(
            "session record was not written".into(),
        ))),
        Err(e) => Some(unavailable(&e)),
    };
    if let Some(response) = refused {
        sessions.drop_local(&id).await;
        return response;
    }
    match node
        .store
        .set_legacy_holder(&id, Some(&node.config.node_id))
        .await
    {
        Ok(true) => {}
        Ok(false) => {
            sessions.drop_local(&id).await;
            return unavailable(&StoreError::Unavailable(
                "session record was not written".into(),
            ));
        }
        Err(e) => {
            sessions.drop_local(&id).await;
            let _ = node.store.delete(&id).await;
            return unavailable(&e);
        }
    }
    // The MCP worker: waits for `initialize`, then serves until the session is dropped.
    let worker_id = id.clone();
    let worker_sessions = sessions.clone();
    let handler = Handler::new(node.clone());
    let ct = node.stop.child_token();
    tokio::spawn(async move {
        match serve_server_with_ct(handler, transport, ct).await {
            Ok(running) => {
                let _ = running.waiting().await;
            }
            Err(e) => tracing::debug!(error = %e, "legacy session ended before initialize"),
        }
        worker_sessions.drop_local(&worker_id).await;
    });

    let (out_tx, out_rx) = mpsc::channel::<Event>(OUTBOX);
    let (in_tx, in_rx) = mpsc::channel::<ClientJsonRpcMessage>(INBOX);
    legacy.set_inbox(&id, Some(in_tx.clone()));

    // Forwarded POSTs from other replicas.
    let mut forwarded = node.bus.subscribe(&format!("legacy:{id}"));
    let fwd_tx = in_tx;
    let fwd_stop = node.stop.child_token();
    let fwd_out = out_tx.clone();
    tokio::spawn(async move {
        loop {
            let payload = tokio::select! {
                p = forwarded.recv() => p,
                () = fwd_out.closed() => return,
                () = fwd_stop.cancelled() => return,
            };
            match payload {
                Ok(p) => match serde_json::from_str::<ClientJsonRpcMessage>(&p) {
                    Ok(m) => {
                        if fwd_tx.send(m).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "undecodable forwarded message"),
                },
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    crate::metrics::metrics().bus_lagged.inc_by(n);
                    tracing::warn!(lost = n, "legacy forward lagged");
                }
                Err(_) => return,
            }
        }
    });

    // Server-initiated messages not tied to a request (list_changed, logs, updates).
    if let Ok(standalone) = sessions.create_standalone_stream(&id).await {
        tokio::spawn(forward(standalone, out_tx.clone()));
    }
    tokio::spawn(process_inbox(
        node.clone(),
        sessions,
        id.clone(),
        in_rx,
        out_tx,
    ));

    tracing::info!(session = short_id(&id), "legacy sse session opened");
    let endpoint = Event::default()
        .event("endpoint")
        .data(format!("/messages?sessionId={id}"));
    let guard = StreamGuard {
        legacy,
        id: id.to_string(),
    };
    let events = futures::stream::once(async move { endpoint })
        .chain(ReceiverStream::new(out_rx))
        .map(move |e| {
            let _ = &guard;
            Ok::<_, Infallible>(e)
        });
    Sse::new(events)
        .keep_alive(KeepAlive::new().interval(node.config.sse_keep_alive))
        .into_response()
}

async fn forward(stream: impl Stream<Item = ServerSseMessage>, out: mpsc::Sender<Event>) {
    let mut stream = std::pin::pin!(stream);
    while let Some(message) = stream.next().await {
        if let Some(event) = sse_event(&message)
            && out.send(event).await.is_err()
        {
            return;
        }
    }
}

/// Feeds the session's messages to its worker in arrival order.
async fn process_inbox(
    node: Arc<Node>,
    sessions: Arc<ReplicaSessions>,
    id: SessionId,
    mut inbox: mpsc::Receiver<ClientJsonRpcMessage>,
    out: mpsc::Sender<Event>,
) {
    loop {
        let message = tokio::select! {
            m = inbox.recv() => m,
            () = out.closed() => return,
        };
        let Some(message) = message else { return };
        let message = with_session(message, &id);
        let result = match message {
            ClientJsonRpcMessage::Request(ref r) => {
                if let ClientRequest::InitializeRequest(init) = &r.request {
                    let params = init.params.clone();
                    match sessions.initialize_session(&id, message).await {
                        Ok(response) => {
                            match node.store.initialize_existing(&id, &params).await {
                                Ok(true) => {}
                                Ok(false) => return,
                                Err(e) => {
                                    tracing::warn!(error = %e, "legacy session record not written");
                                }
                            }
                            let event = ServerSseMessage::from_message(response);
                            if let Some(ev) = sse_event(&event)
                                && out.send(ev).await.is_err()
                            {
                                return;
                            }
                            Ok(())
                        }
                        Err(e) => Err(e),
                    }
                } else {
                    // The guard refreshed the session's TTL when it checked the POST's owner.
                    match sessions.create_stream(&id, message).await {
                        Ok(stream) => {
                            tokio::spawn(forward(stream, out.clone()));
                            Ok(())
                        }
                        Err(e) => Err(e),
                    }
                }
            }
            other => sessions.accept_message(&id, other).await,
        };
        if let Err(e) = result {
            tracing::warn!(session = short_id(&id), error = %e, "legacy message not delivered");
        }
    }
}

#[derive(Deserialize)]
pub struct MessageQuery {
    #[serde(rename = "sessionId")]
    pub session_id: Option<String>,
}

/// `POST /messages?sessionId=<id>`: queues a message for the session, wherever its stream is.
/// The guard has checked that the session exists and is the caller's.
pub async fn post_message(
    State(state): State<AppState>,
    Query(q): Query<MessageQuery>,
    body: Bytes,
) -> Response {
    let Some(id) = q.session_id.filter(|id| valid_session_id(id)) else {
        return rpc_error(
            StatusCode::BAD_REQUEST,
            -32600,
            "missing or invalid sessionId query parameter",
            None,
        );
    };
    // The guard already answered 400 for bodies that are not a JSON-RPC message.
    let Ok(message) = serde_json::from_slice::<ClientJsonRpcMessage>(&body) else {
        return rpc_error(
            StatusCode::BAD_REQUEST,
            -32600,
            "invalid JSON-RPC message",
            None,
        );
    };
    if let Some(inbox) = state.legacy.inbox(&id) {
        return match inbox.send(message).await {
            Ok(()) => StatusCode::ACCEPTED.into_response(),
            Err(_) => session_not_found(),
        };
    }
    match state.node.store.legacy_holder(&id).await {
        Ok(Some(_)) => {
            let payload = String::from_utf8_lossy(&body);
            match state
                .node
                .store
                .publish(&format!("legacy:{id}"), &payload)
                .await
            {
                Ok(()) => StatusCode::ACCEPTED.into_response(),
                Err(e) => unavailable(&e),
            }
        }
        Ok(None) => session_not_found(),
        Err(e) => unavailable(&e),
    }
}
