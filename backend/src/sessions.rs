//! Sessions that any replica can serve, built on rmcp's own extension points.
//!
//! - [`RecordStore`] is rmcp's `SessionStore` on [`Store`]: rmcp writes the `initialize`
//!   parameters after the handshake and, on a replica that has no worker for a session, reads
//!   them back and replays `initialize` into a fresh worker.
//! - [`SessionEvents`] is rmcp's `EventStore`, one per session, so event ids and their logs are
//!   scoped to the session that produced them: a `Last-Event-ID` from another session finds
//!   nothing.
//! - [`ReplicaSessions`] is rmcp's `SessionManager`: one `LocalSessionManager` per session for the
//!   in-memory worker, plus what crosses replicas: the standalone stream (`GET /mcp`) is fed
//!   from the bus topic `ev:<id>`, so notifications produced on any replica reach it; client
//!   replies to server-initiated requests are published on `reply:<id>` and delivered where the
//!   request waits.
//!
//! See `sessions.md` beside this file for the whole picture.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use futures::{Stream, StreamExt};
use rmcp::{
    model::{ClientJsonRpcMessage, ServerJsonRpcMessage},
    transport::streamable_http_server::session::{
        EventStore, EventStoreError, EventStream, RestoreOutcome, ServerSseMessage, SessionId,
        SessionManager, SessionState, SessionStore, SessionStoreError,
        local::{LocalSessionManager, LocalSessionManagerError, SessionConfig, SessionTransport},
    },
};
use serde::{Deserialize, Serialize};
use tokio::sync::{RwLock, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::{
    Node,
    store::{Store, StoreError, event_seq},
};

/// Name of the standalone stream in event ids and log keys.
pub const COMMON_STREAM: &str = "common";
/// Buffer between a bus subscription and the SSE response that drains it.
const STREAM_BUFFER: usize = 64;

/// rmcp's session store on the shared [`Store`].
pub struct RecordStore(pub Arc<Store>);

#[async_trait::async_trait]
impl SessionStore for RecordStore {
    async fn load(&self, session_id: &str) -> Result<Option<SessionState>, SessionStoreError> {
        Ok(self.0.load_init(session_id).await?.map(SessionState::new))
    }

    async fn store(&self, session_id: &str, state: &SessionState) -> Result<(), SessionStoreError> {
        Ok(self.0.create(session_id, &state.initialize_params).await?)
    }

    async fn delete(&self, session_id: &str) -> Result<(), SessionStoreError> {
        self.0.delete(session_id).await?;
        Ok(())
    }
}

/// One stored SSE event, as kept in the log and sent on the bus.
#[derive(Serialize, Deserialize)]
struct EventRecord {
    #[serde(rename = "m", skip_serializing_if = "Option::is_none")]
    message: Option<ServerJsonRpcMessage>,
    #[serde(rename = "r", skip_serializing_if = "Option::is_none")]
    retry_ms: Option<u64>,
}

/// Encodes an SSE event for the event log (public for the micro benchmarks).
pub fn encode_event(event: &ServerSseMessage) -> Result<String, serde_json::Error> {
    serde_json::to_string(&EventRecord {
        message: event.message.as_deref().cloned(),
        retry_ms: event.retry.map(|r| r.as_millis() as u64),
    })
}

/// Decodes a logged event back into the SSE event with its id `stream/xid`.
pub fn decode_event(stream: &str, xid: &str, payload: &str) -> Option<ServerSseMessage> {
    let record: EventRecord = serde_json::from_str(payload)
        .inspect_err(|e| tracing::warn!(error = %e, "undecodable stored event skipped"))
        .ok()?;
    let mut event = ServerSseMessage::default();
    event.event_id = Some(format!("{stream}/{xid}"));
    event.message = record.message.map(Arc::new);
    event.retry = record.retry_ms.map(Duration::from_millis);
    Some(event)
}

/// Splits a client's `Last-Event-ID` into stream and position. Ids this server did not mint
/// (rmcp's priming id `0`, say) mean "the standalone stream from its start".
fn parse_event_id(id: &str) -> (String, Option<String>) {
    match id.rsplit_once('/') {
        Some((stream, xid))
            if event_seq(xid).is_some()
                && !stream.is_empty()
                && stream
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-') =>
        {
            (stream.to_owned(), Some(xid.to_owned()))
        }
        _ => (COMMON_STREAM.to_owned(), None),
    }
}

/// The logged events of `stream` of `session` after `after`, decoded for an SSE response.
async fn replay(
    store: &Store,
    session: &str,
    stream: &str,
    after: Option<&str>,
) -> Result<Vec<ServerSseMessage>, StoreError> {
    let events = store.events_after(session, stream, after).await?;
    Ok(events
        .iter()
        .filter_map(|(xid, payload)| decode_event(stream, xid, payload))
        .collect())
}

/// rmcp's event store for one session.
pub struct SessionEvents {
    store: Arc<Store>,
    session: String,
}

#[async_trait::async_trait]
impl EventStore for SessionEvents {
    async fn store_event(
        &self,
        stream_id: &str,
        event: &ServerSseMessage,
    ) -> Result<String, EventStoreError> {
        // rmcp names the standalone stream `<session>:common` and request streams by a UUID.
        let stream = if stream_id.ends_with(":common") {
            COMMON_STREAM
        } else {
            stream_id
        };
        let payload = encode_event(event)?;
        let xid = self
            .store
            .append_event(&self.session, stream, &payload, stream == COMMON_STREAM)
            .await?;
        Ok(format!("{stream}/{xid}"))
    }

    async fn replay_events_after(
        &self,
        last_event_id: &str,
    ) -> Result<EventStream, EventStoreError> {
        let (stream, after) = parse_event_id(last_event_id);
        let events = replay(&self.store, &self.session, &stream, after.as_deref()).await?;
        Ok(Box::pin(futures::stream::iter(events)))
    }
}

/// An error of [`ReplicaSessions`].
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("session not found on this replica: {0}")]
    NotFound(SessionId),
    #[error(transparent)]
    Local(#[from] LocalSessionManagerError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot encode message: {0}")]
    Encode(#[from] serde_json::Error),
}

struct LocalSession {
    manager: Arc<LocalSessionManager>,
    /// Cancelled when the session leaves this replica: ends its bus listeners and streams.
    stop: CancellationToken,
    /// Set once the worker has answered its `initialize` (the client's, or the one rmcp
    /// replays on restore). Until then a worker accepts nothing else and dies on any other
    /// event, so `has_session` says no and rmcp makes concurrent requests wait for the
    /// restore in progress.
    ready: Arc<AtomicBool>,
}

/// rmcp's session manager for a group of replicas sharing a [`Store`].
pub struct ReplicaSessions {
    node: Arc<Node>,
    sessions: RwLock<HashMap<SessionId, LocalSession>>,
}

impl ReplicaSessions {
    pub fn new(node: Arc<Node>) -> Arc<Self> {
        let this = Arc::new(Self {
            node,
            sessions: RwLock::default(),
        });
        tokio::spawn(drop_deleted_sessions(Arc::downgrade(&this)));
        this
    }

    /// Number of sessions with a worker on this replica.
    pub async fn local_count(&self) -> usize {
        self.sessions.read().await.len()
    }

    /// Whether this replica has a worker for `id`.
    pub async fn is_local(&self, id: &str) -> bool {
        self.sessions.read().await.contains_key(id)
    }

    /// Ends this replica's worker and streams for `id` (the shared record is untouched).
    pub async fn drop_local(&self, id: &str) {
        let entry = self.sessions.write().await.remove(id);
        if let Some(entry) = entry {
            entry.stop.cancel();
            let _ = entry.manager.close_session(&SessionId::from(id)).await;
        }
    }

    async fn local(
        &self,
        id: &SessionId,
    ) -> Result<(Arc<LocalSessionManager>, CancellationToken), SessionError> {
        self.sessions
            .read()
            .await
            .get(id)
            .map(|s| (s.manager.clone(), s.stop.clone()))
            .ok_or_else(|| SessionError::NotFound(id.clone()))
    }

    /// Creates the in-memory worker of `id` on this replica.
    async fn start_local(&self, id: SessionId) -> Result<SessionTransport, SessionError> {
        let mut manager = LocalSessionManager::default();
        let mut session_config = SessionConfig::default();
        // The worker lives as long as the session could: idle sessions are restored on
        // demand, so nothing is lost when it stops.
        session_config.keep_alive = Some(self.node.config.session_ttl);
        manager.session_config = session_config;
        let manager = Arc::new(manager.with_event_store(Arc::new(SessionEvents {
            store: self.node.store.clone(),
            session: id.to_string(),
        })));
        let RestoreOutcome::Restored(transport) = manager.restore_session(id.clone()).await? else {
            return Err(SessionError::NotFound(id));
        };
        let stop = self.node.stop.child_token();
        tokio::spawn(deliver_replies(
            self.node.clone(),
            manager.clone(),
            id.clone(),
            stop.clone(),
        ));
        self.sessions.write().await.insert(
            id,
            LocalSession {
                manager,
                stop,
                ready: Arc::new(AtomicBool::new(false)),
            },
        );
        Ok(transport)
    }

    /// A stream fed from bus topic `ev:<id>`, optionally after replaying the standalone
    /// stream's log after `after` (or from its start, with `Some(None)`).
    fn standalone_stream(
        &self,
        id: &SessionId,
        stop: CancellationToken,
        replay_after: Option<Option<String>>,
    ) -> ReceiverStream<ServerSseMessage> {
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let mut live = self.node.bus.subscribe(&format!("ev:{id}"));
        let store = self.node.store.clone();
        let session = id.to_string();
        tokio::spawn(async move {
            let mut last = (0, 0);
            if let Some(after) = replay_after {
                match store
                    .events_after(&session, COMMON_STREAM, after.as_deref())
                    .await
                {
                    Ok(events) => {
                        for (xid, payload) in events {
                            last = event_seq(&xid).unwrap_or(last).max(last);
                            let Some(event) = decode_event(COMMON_STREAM, &xid, &payload) else {
                                continue;
                            };
                            if tx.send(event).await.is_err() {
                                return;
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "standalone stream replay failed");
                        return;
                    }
                }
            }
            loop {
                let payload = tokio::select! {
                    p = live.recv() => p,
                    () = stop.cancelled() => return,
                    () = tx.closed() => return,
                };
                let payload = match payload {
                    Ok(p) => p,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(skipped = n, "standalone stream lagged; client can resume");
                        continue;
                    }
                    Err(_) => return,
                };
                let Some((xid, json)) = payload.split_once(' ') else {
                    continue;
                };
                let Some(seq) = event_seq(xid) else { continue };
                if seq <= last {
                    continue;
                }
                last = seq;
                let Some(event) = decode_event(COMMON_STREAM, xid, json) else {
                    continue;
                };
                if tx.send(event).await.is_err() {
                    return;
                }
            }
        });
        ReceiverStream::new(rx)
    }
}

/// Delivers the client's replies published on `reply:<id>` to this replica's worker.
async fn deliver_replies(
    node: Arc<Node>,
    manager: Arc<LocalSessionManager>,
    id: SessionId,
    stop: CancellationToken,
) {
    let mut replies = node.bus.subscribe(&format!("reply:{id}"));
    loop {
        let payload = tokio::select! {
            p = replies.recv() => p,
            () = stop.cancelled() => return,
        };
        let payload = match payload {
            Ok(p) => p,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
            Err(_) => return,
        };
        match serde_json::from_str::<ClientJsonRpcMessage>(&payload) {
            Ok(message) => {
                if let Err(e) = manager.accept_message(&id, message).await {
                    tracing::debug!(error = %e, "reply not deliverable here");
                }
            }
            Err(e) => tracing::warn!(error = %e, "undecodable reply on bus"),
        }
    }
}

/// Drops workers of sessions deleted on any replica (bus topic `del`).
async fn drop_deleted_sessions(sessions: std::sync::Weak<ReplicaSessions>) {
    let Some(mut deleted) = sessions.upgrade().map(|s| s.node.bus.subscribe("del")) else {
        return;
    };
    while let Ok(id) = deleted.recv().await {
        let Some(sessions) = sessions.upgrade() else {
            return;
        };
        sessions.drop_local(&id).await;
    }
}

impl SessionManager for ReplicaSessions {
    type Error = SessionError;
    type Transport = SessionTransport;

    async fn create_session(&self) -> Result<(SessionId, Self::Transport), Self::Error> {
        let id: SessionId = uuid::Uuid::new_v4().simple().to_string().into();
        let transport = self.start_local(id.clone()).await?;
        Ok((id, transport))
    }

    async fn initialize_session(
        &self,
        id: &SessionId,
        message: ClientJsonRpcMessage,
    ) -> Result<ServerJsonRpcMessage, Self::Error> {
        let (manager, _) = self.local(id).await?;
        let response = manager.initialize_session(id, message).await?;
        if let Some(s) = self.sessions.read().await.get(id) {
            s.ready.store(true, Ordering::Release);
        }
        Ok(response)
    }

    async fn has_session(&self, id: &SessionId) -> Result<bool, Self::Error> {
        Ok(self
            .sessions
            .read()
            .await
            .get(id)
            .is_some_and(|s| s.ready.load(Ordering::Acquire)))
    }

    async fn close_session(&self, id: &SessionId) -> Result<(), Self::Error> {
        self.drop_local(id).await;
        Ok(())
    }

    async fn create_stream(
        &self,
        id: &SessionId,
        message: ClientJsonRpcMessage,
    ) -> Result<impl Stream<Item = ServerSseMessage> + Send + Sync + 'static, Self::Error> {
        // Same as `LocalSessionManager::create_stream`, through the handle, so the stream
        // does not borrow the manager.
        let (manager, _) = self.local(id).await?;
        let handle = manager
            .sessions
            .read()
            .await
            .get(id)
            .cloned()
            .ok_or_else(|| SessionError::NotFound(id.clone()))?;
        let receiver = handle
            .establish_request_wise_channel()
            .await
            .map_err(LocalSessionManagerError::from)?;
        handle
            .push_message(message, receiver.http_request_id)
            .await
            .map_err(LocalSessionManagerError::from)?;
        Ok(ReceiverStream::new(receiver.inner))
    }

    async fn accept_message(
        &self,
        id: &SessionId,
        message: ClientJsonRpcMessage,
    ) -> Result<(), Self::Error> {
        match message {
            // The request this answers may wait on another replica: let the bus find it.
            ClientJsonRpcMessage::Response(_) | ClientJsonRpcMessage::Error(_) => {
                let json = serde_json::to_string(&message)?;
                self.node
                    .store
                    .publish(&format!("reply:{id}"), &json)
                    .await?;
            }
            _ => {
                let (manager, _) = self.local(id).await?;
                manager.accept_message(id, message).await?;
            }
        }
        Ok(())
    }

    async fn create_standalone_stream(
        &self,
        id: &SessionId,
    ) -> Result<impl Stream<Item = ServerSseMessage> + Send + Sync + 'static, Self::Error> {
        let (_, stop) = self.local(id).await?;
        Ok(self.standalone_stream(id, stop, None))
    }

    async fn resume(
        &self,
        id: &SessionId,
        last_event_id: String,
    ) -> Result<impl Stream<Item = ServerSseMessage> + Send + Sync + 'static, Self::Error> {
        let (_, stop) = self.local(id).await?;
        let (stream, after) = parse_event_id(&last_event_id);
        if stream == COMMON_STREAM {
            return Ok(self.standalone_stream(id, stop, Some(after)).left_stream());
        }
        // A request stream: replay what its worker logged; it ends with the response.
        let events = replay(&self.node.store, id, &stream, after.as_deref()).await?;
        Ok(futures::stream::iter(events).right_stream())
    }

    async fn restore_session(
        &self,
        id: SessionId,
    ) -> Result<RestoreOutcome<Self::Transport>, Self::Error> {
        if self.is_local(&id).await {
            return Ok(RestoreOutcome::AlreadyPresent);
        }
        Ok(RestoreOutcome::Restored(self.start_local(id).await?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rmcp::model::{
        CallToolResult, ContentBlock, JsonRpcResponse, JsonRpcVersion2_0, NumberOrString,
        ServerResult,
    };

    #[test]
    fn event_ids_round_trip_and_foreign_ids_mean_start_of_standalone_stream() {
        assert_eq!(
            parse_event_id("3f2a-77/1700000000000-3"),
            ("3f2a-77".to_owned(), Some("1700000000000-3".to_owned()))
        );
        assert_eq!(
            parse_event_id("common/5-0"),
            ("common".into(), Some("5-0".into()))
        );
        for foreign in ["0", "", "x/y", "a b/1-0", "/1-0", "../x/1-0"] {
            assert_eq!(
                parse_event_id(foreign).1,
                None,
                "{foreign:?} must not select a position"
            );
        }
    }

    #[test]
    fn stored_tool_result_replays_byte_for_byte() {
        let result = CallToolResult::success(vec![ContentBlock::text("42")]);
        let message = ServerJsonRpcMessage::Response(JsonRpcResponse {
            jsonrpc: JsonRpcVersion2_0,
            id: NumberOrString::Number(7),
            result: ServerResult::CallToolResult(result),
        });
        let original = serde_json::to_string(&message).unwrap_or_default();
        let mut event = ServerSseMessage::default();
        event.message = Some(Arc::new(message));
        let payload = encode_event(&event).unwrap_or_default();
        let back = decode_event("s", "1-0", &payload).and_then(|e| e.message);
        let replayed = back
            .map(|m| serde_json::to_string(&*m).unwrap_or_default())
            .unwrap_or_default();
        assert_eq!(replayed, original, "replay must not change the message");
    }
}
