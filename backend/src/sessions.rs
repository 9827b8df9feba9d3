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
//!   replies to server-initiated requests are published on `reply` and delivered where the
//!   request waits.
//!
//! See `sessions.md` beside this file for the whole picture.

use std::{
    cell::RefCell,
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use futures::{Stream, StreamExt};
use rmcp::{
    model::{ClientJsonRpcMessage, ClientNotification, NumberOrString, ServerJsonRpcMessage},
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
    store::{Store, StoreError, decode_init, event_seq},
};

/// Name of the standalone stream in event ids and the log.
pub const COMMON_STREAM: &str = "common";
/// Buffer between a bus subscription and the SSE response that drains it.
const STREAM_BUFFER: usize = 64;

tokio::task_local! {
    /// The `init` field the guard's touch already read for this request's session.
    static PREFETCHED: RefCell<Option<(String, String)>>;
}

/// Runs `f` (one HTTP request) with the `init` of session `id` already read, so a restore
/// in it costs no second round trip.
pub async fn with_prefetched_init<F: Future>(id: &str, init: Option<String>, f: F) -> F::Output {
    let value = init.map(|init| (id.to_owned(), init));
    PREFETCHED.scope(RefCell::new(value), f).await
}

fn take_prefetched(id: &str) -> Option<String> {
    PREFETCHED
        .try_with(|p| {
            let mut p = p.borrow_mut();
            match p.as_ref() {
                Some((pid, _)) if pid == id => p.take().map(|(_, init)| init),
                _ => None,
            }
        })
        .ok()
        .flatten()
}

/// rmcp's session store on the shared [`Store`].
pub struct RecordStore(pub Arc<Store>);

#[async_trait::async_trait]
impl SessionStore for RecordStore {
    async fn load(&self, session_id: &str) -> Result<Option<SessionState>, SessionStoreError> {
        if let Some(init) = take_prefetched(session_id) {
            return Ok(Some(SessionState::new(decode_init(session_id, &init)?)));
        }
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

/// Gives a server-initiated request an id no other worker of the session can mint:
/// `<worker tag>-<rmcp's id>` (rmcp numbers them per worker, from 0 on every replica).
fn tag_request(tag: &str, message: &mut ServerJsonRpcMessage) {
    if let ServerJsonRpcMessage::Request(r) = message {
        let original = match &r.id {
            NumberOrString::Number(n) => n.to_string(),
            NumberOrString::String(s) => s.to_string(),
        };
        r.id = NumberOrString::String(format!("{tag}-{original}").into());
    }
}

/// The id rmcp gave a request this worker (`tag`) sent, if `id` names one.
fn untag(tag: &str, id: &NumberOrString) -> Option<NumberOrString> {
    let NumberOrString::String(s) = id else {
        return None;
    };
    let original = s.strip_prefix(tag)?.strip_prefix('-')?;
    Some(match original.parse::<i64>() {
        Ok(n) => NumberOrString::Number(n),
        Err(_) => NumberOrString::String(original.into()),
    })
}

/// An SSE event with its server request (if any) tagged for this worker.
fn tag_event(tag: &str, mut event: ServerSseMessage) -> ServerSseMessage {
    if let Some(message) = event.message.take() {
        let mut message = Arc::unwrap_or_clone(message);
        tag_request(tag, &mut message);
        event.message = Some(Arc::new(message));
    }
    event
}

/// rmcp's event store for one worker of one session.
pub struct SessionEvents {
    store: Arc<Store>,
    session: String,
    tag: Arc<str>,
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
        // A priming event carries no message: resuming from "before the first event" needs
        // no stored entry, so it costs no round trip.
        let Some(message) = &event.message else {
            return Ok(format!("{stream}/0-0"));
        };
        let mut message = (**message).clone();
        tag_request(&self.tag, &mut message);
        let payload = serde_json::to_string(&EventRecord {
            message: Some(message),
            retry_ms: event.retry.map(|r| r.as_millis() as u64),
        })?;
        let xid = self
            .store
            .append_event(&self.session, stream, &payload, stream == COMMON_STREAM)
            .await?
            .ok_or_else(|| EventStoreError::from(format!("session {} ended", self.session)))?;
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
    /// Prefix of this worker's server-request ids.
    tag: Arc<str>,
    /// Last use, in milliseconds since the replica started.
    last_used: AtomicU64,
    /// Streams of this worker still open (a worker with none is idle and may be evicted).
    open_streams: Arc<AtomicUsize>,
}

/// Keeps a worker busy while a stream of it is open.
struct Busy(Arc<AtomicUsize>);

impl Busy {
    fn new(counter: &Arc<AtomicUsize>) -> Self {
        counter.fetch_add(1, Ordering::AcqRel);
        Self(counter.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// `stream`, counted as an open stream of its worker until dropped.
fn counted<S: Stream<Item = ServerSseMessage>>(
    stream: S,
    counter: Arc<AtomicUsize>,
) -> impl Stream<Item = ServerSseMessage> {
    let busy = Busy::new(&counter);
    stream.map(move |e| {
        let _ = &busy;
        e
    })
}

/// rmcp's session manager for a group of replicas sharing a [`Store`].
///
/// Workers are a cache: at most `max_local_sessions` are kept (the least recently used idle
/// one makes room), and one unused for `worker_idle_seconds` is dropped. A dropped worker's
/// session lives on in the store and is restored on its next request.
pub struct ReplicaSessions {
    node: Arc<Node>,
    sessions: RwLock<HashMap<SessionId, LocalSession>>,
    epoch: Instant,
}

impl ReplicaSessions {
    pub fn new(node: Arc<Node>) -> Arc<Self> {
        let this = Arc::new(Self {
            node,
            sessions: RwLock::default(),
            epoch: Instant::now(),
        });
        tokio::spawn(drop_deleted_sessions(Arc::downgrade(&this)));
        tokio::spawn(deliver_replies(Arc::downgrade(&this)));
        tokio::spawn(drop_idle_workers(Arc::downgrade(&this)));
        this
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
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

    /// After a session ended in the store (DELETE, the end of a 2024-11-05 stream): tells
    /// every replica to drop its worker (bus topic `del`) and drops this one's. Replicas that
    /// miss the message answer 404 from the store at the next request, and drop the worker
    /// then or when it idles out.
    pub async fn ended(&self, id: &str) {
        if let Err(e) = self.node.store.publish("del", id).await {
            tracing::warn!(error = %e, "could not announce the end of a session; other replicas answer 404 from the store");
        }
        self.drop_local(id).await;
    }

    /// The worker of `id`, marked as used now.
    async fn local(
        &self,
        id: &SessionId,
    ) -> Result<
        (
            Arc<LocalSessionManager>,
            CancellationToken,
            Arc<AtomicUsize>,
            Arc<str>,
        ),
        SessionError,
    > {
        let now = self.now();
        self.sessions
            .read()
            .await
            .get(id)
            .map(|s| {
                s.last_used.store(now, Ordering::Relaxed);
                (
                    s.manager.clone(),
                    s.stop.clone(),
                    s.open_streams.clone(),
                    s.tag.clone(),
                )
            })
            .ok_or_else(|| SessionError::NotFound(id.clone()))
    }

    /// Drops the least recently used idle worker if the cache is full.
    async fn make_room(&self) {
        let victim = {
            let sessions = self.sessions.read().await;
            if sessions.len() < self.node.config.max_local_sessions {
                return;
            }
            sessions
                .iter()
                .filter(|(_, s)| s.open_streams.load(Ordering::Acquire) == 0)
                .min_by_key(|(_, s)| s.last_used.load(Ordering::Relaxed))
                .map(|(id, _)| id.clone())
        };
        match victim {
            Some(id) => {
                tracing::debug!(session = %id, "worker evicted (max_local_sessions)");
                self.drop_local(&id).await;
            }
            // Every worker has an open stream: the proxy's stream limits bound them.
            None => tracing::warn!("max_local_sessions reached and every worker is busy"),
        }
    }

    /// Creates the in-memory worker of `id` on this replica.
    async fn start_local(&self, id: SessionId) -> Result<SessionTransport, SessionError> {
        self.make_room().await;
        let tag: Arc<str> = uuid::Uuid::new_v4().simple().to_string()[..12].into();
        let mut manager = LocalSessionManager::default();
        let mut session_config = SessionConfig::default();
        // rmcp's own inactivity timeout is a safety net only: idle workers leave through
        // `drop_idle_workers` first, and the session itself lives in the store.
        let config = &self.node.config;
        session_config.keep_alive = Some(config.session_ttl.max(config.worker_idle) * 2);
        // Resumption reads the store, never rmcp's per-stream cache: keep that short.
        session_config.completed_cache_ttl = Duration::from_secs(1);
        manager.session_config = session_config;
        let manager = Arc::new(manager.with_event_store(Arc::new(SessionEvents {
            store: self.node.store.clone(),
            session: id.to_string(),
            tag: tag.clone(),
        })));
        let RestoreOutcome::Restored(transport) = manager.restore_session(id.clone()).await? else {
            return Err(SessionError::NotFound(id));
        };
        let stop = self.node.stop.child_token();
        let previous = self.sessions.write().await.insert(
            id,
            LocalSession {
                manager,
                stop,
                ready: Arc::new(AtomicBool::new(false)),
                tag,
                last_used: AtomicU64::new(self.now()),
                open_streams: Arc::new(AtomicUsize::new(0)),
            },
        );
        if let Some(previous) = previous {
            previous.stop.cancel();
        }
        Ok(transport)
    }

    /// A stream fed from bus topic `ev:<id>`, optionally after replaying the standalone
    /// stream's log after `after` (or from its start, with `Some(None)`). Whenever live
    /// messages may have been missed (the local channel lagged, or the bus resubscribed), it
    /// re-reads the log from the last event it delivered: nothing lost, nothing repeated.
    fn standalone_stream(
        &self,
        id: &SessionId,
        stop: CancellationToken,
        replay_after: Option<Option<String>>,
    ) -> ReceiverStream<ServerSseMessage> {
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let mut live = self.node.bus.subscribe(&format!("ev:{id}"));
        let mut generation = self.node.bus.generation();
        generation.mark_unchanged();
        let store = self.node.store.clone();
        let session = id.to_string();
        tokio::spawn(async move {
            // The last event delivered (or, for a fresh stream, the log's end at opening).
            let mut last: Option<String> = match &replay_after {
                Some(after) => after.clone(),
                None => store.log_tail(&session).await.ok().flatten(),
            };
            if replay_after.is_none() {
                // An event with only an id: the client (or a proxy resuming for it) knows from
                // the first byte where this stream starts, so a reconnection with it as
                // `Last-Event-ID` misses nothing and repeats nothing.
                let mut start = ServerSseMessage::default();
                start.event_id = Some(format!(
                    "{COMMON_STREAM}/{}",
                    last.as_deref().unwrap_or("0-0")
                ));
                if tx.send(start).await.is_err() {
                    return;
                }
            }
            let mut catch_up = replay_after.is_some();
            loop {
                if catch_up {
                    catch_up = false;
                    match store
                        .events_after(&session, COMMON_STREAM, last.as_deref())
                        .await
                    {
                        Ok(events) => {
                            for (xid, payload) in events {
                                last = Some(xid.clone());
                                let Some(event) = decode_event(COMMON_STREAM, &xid, &payload)
                                else {
                                    continue;
                                };
                                if tx.send(event).await.is_err() {
                                    return;
                                }
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "standalone stream cannot read the log; client can resume");
                            return;
                        }
                    }
                }
                let payload = tokio::select! {
                    p = live.recv() => p,
                    changed = generation.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        catch_up = true;
                        continue;
                    }
                    () = stop.cancelled() => return,
                    () = tx.closed() => return,
                };
                let payload = match payload {
                    Ok(p) => p,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        crate::metrics::metrics().bus_lagged.inc_by(n);
                        tracing::debug!(
                            skipped = n,
                            "standalone stream lagged; re-reading the log"
                        );
                        catch_up = true;
                        continue;
                    }
                    Err(_) => return,
                };
                let Some((xid, json)) = payload.split_once(' ') else {
                    continue;
                };
                let Some(seq) = event_seq(xid) else { continue };
                if last
                    .as_deref()
                    .and_then(event_seq)
                    .is_some_and(|l| seq <= l)
                {
                    continue;
                }
                last = Some(xid.to_owned());
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

/// Bus topic of the client's replies and cancellations, as `<session id> <message>`: one
/// topic for all sessions, so a worker costs no subscription of its own.
pub const REPLY_TOPIC: &str = "reply";

/// Hands the client's replies and cancellations published on [`REPLY_TOPIC`] to this
/// replica's worker of their session: a reply only if its id carries the worker's tag (so
/// exactly the one waiting request gets it), a notification always.
async fn deliver_replies(sessions: std::sync::Weak<ReplicaSessions>) {
    let Some(mut replies) = sessions
        .upgrade()
        .map(|s| s.node.bus.subscribe(REPLY_TOPIC))
    else {
        return;
    };
    loop {
        let payload = match replies.recv().await {
            Ok(p) => p,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                crate::metrics::metrics().bus_lagged.inc_by(n);
                tracing::warn!(lost = n, "client replies lagged");
                continue;
            }
            Err(_) => return,
        };
        let Some(sessions) = sessions.upgrade() else {
            return;
        };
        let Some((id, json)) = payload.split_once(' ') else {
            continue;
        };
        let id = SessionId::from(id);
        let Some((manager, tag)) = sessions
            .sessions
            .read()
            .await
            .get(&id)
            .map(|s| (s.manager.clone(), s.tag.clone()))
        else {
            continue;
        };
        let message = match serde_json::from_str::<ClientJsonRpcMessage>(json) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "undecodable reply on bus");
                continue;
            }
        };
        let message = match message {
            ClientJsonRpcMessage::Response(mut r) => match untag(&tag, &r.id) {
                Some(original) => {
                    r.id = original;
                    ClientJsonRpcMessage::Response(r)
                }
                None => continue,
            },
            ClientJsonRpcMessage::Error(mut e) => {
                match e.id.as_ref().and_then(|i| untag(&tag, i)) {
                    Some(original) => {
                        e.id = Some(original);
                        ClientJsonRpcMessage::Error(e)
                    }
                    None => continue,
                }
            }
            other => other,
        };
        if let Err(e) = manager.accept_message(&id, message).await {
            tracing::debug!(error = %e, "reply not deliverable here");
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

/// Drops workers unused for `worker_idle` (checked every quarter of it, at least every
/// second): a replica's memory follows its recent sessions, not all sessions in Redis.
async fn drop_idle_workers(sessions: std::sync::Weak<ReplicaSessions>) {
    let Some(idle) = sessions.upgrade().map(|s| s.node.config.worker_idle) else {
        return;
    };
    let mut tick = tokio::time::interval(
        (idle / 4).clamp(Duration::from_millis(250), Duration::from_secs(60)),
    );
    loop {
        tick.tick().await;
        let Some(sessions) = sessions.upgrade() else {
            return;
        };
        let cutoff = sessions.now().saturating_sub(idle.as_millis() as u64);
        let idle_ids: Vec<SessionId> = sessions
            .sessions
            .read()
            .await
            .iter()
            .filter(|(_, s)| {
                s.open_streams.load(Ordering::Acquire) == 0
                    && s.last_used.load(Ordering::Relaxed) < cutoff
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in idle_ids {
            sessions.drop_local(&id).await;
        }
    }
}

impl SessionManager for ReplicaSessions {
    type Error = SessionError;
    type Transport = SessionTransport;

    async fn create_session(&self) -> Result<(SessionId, Self::Transport), Self::Error> {
        let id: SessionId = uuid::Uuid::new_v4().simple().to_string().into();
        let transport = self.start_local(id.clone()).await?;
        crate::metrics::metrics().sessions_created.inc();
        Ok((id, transport))
    }

    async fn initialize_session(
        &self,
        id: &SessionId,
        message: ClientJsonRpcMessage,
    ) -> Result<ServerJsonRpcMessage, Self::Error> {
        let (manager, ..) = self.local(id).await?;
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
        let (manager, _, open, tag) = self.local(id).await?;
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
        let live = ReceiverStream::new(receiver.inner).map(move |e| tag_event(&tag, e));
        Ok(counted(live, open))
    }

    async fn accept_message(
        &self,
        id: &SessionId,
        message: ClientJsonRpcMessage,
    ) -> Result<(), Self::Error> {
        let crosses = match &message {
            // The request this answers may wait on another replica: let the bus find it.
            ClientJsonRpcMessage::Response(_) | ClientJsonRpcMessage::Error(_) => true,
            // The request it cancels may run on another replica.
            ClientJsonRpcMessage::Notification(n) => {
                matches!(n.notification, ClientNotification::CancelledNotification(_))
            }
            _ => false,
        };
        if crosses {
            let json = serde_json::to_string(&message)?;
            self.node
                .store
                .publish(REPLY_TOPIC, &format!("{id} {json}"))
                .await?;
        } else {
            let (manager, ..) = self.local(id).await?;
            manager.accept_message(id, message).await?;
        }
        Ok(())
    }

    async fn create_standalone_stream(
        &self,
        id: &SessionId,
    ) -> Result<impl Stream<Item = ServerSseMessage> + Send + Sync + 'static, Self::Error> {
        let (_, stop, open, _) = self.local(id).await?;
        Ok(counted(self.standalone_stream(id, stop, None), open))
    }

    async fn resume(
        &self,
        id: &SessionId,
        last_event_id: String,
    ) -> Result<impl Stream<Item = ServerSseMessage> + Send + Sync + 'static, Self::Error> {
        let (_, stop, open, _) = self.local(id).await?;
        let (stream, after) = parse_event_id(&last_event_id);
        if stream == COMMON_STREAM {
            return Ok(counted(self.standalone_stream(id, stop, Some(after)), open).left_stream());
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
        let transport = self.start_local(id).await?;
        crate::metrics::metrics().sessions_restored.inc();
        Ok(RestoreOutcome::Restored(transport))
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
