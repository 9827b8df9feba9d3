//! Shared state: session records, one event log per session, and publishing on the bus.
//!
//! [`Store`] is what the rest of the server calls. It runs on an [`Engine`]: [`redis`]
//! (any replica serves any session) or [`memory`] (one process). Both keep the same rules,
//! TTLs included, and the same layout (see `sessions.md`):
//!
//! - a session is a record (fields) and an event log, both living exactly as long as the
//!   session: every request slides the TTL of both; DELETE, expiry and the end of a
//!   2024-11-05 stream remove both;
//! - a write never creates a session that is gone: field writes, event appends and the
//!   2024-11-05 `initialize` check that the record exists in the same step as they write;
//! - the event log holds every stream of the session (each entry names its stream), trimmed
//!   to `event_log_max_len` entries and `event_log_max_bytes` payload bytes, oldest first;
//! - every operation that names a session on behalf of a caller takes the caller's owner
//!   hash (`None`: anonymous) and answers [`Access::OtherOwner`] without touching a session
//!   that is not theirs, in the same step as the lookup.
//!
//! Redis being unreachable or slow is [`StoreError::Unavailable`], which requests answer
//! with 503, never with "unknown session".

pub mod memory;
pub mod redis;
pub mod task;

use std::{
    cell::Cell,
    collections::HashMap,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rmcp::model::InitializeRequestParams;
use serde::Serialize;

use crate::{bus::Bus, config::Config, redis_link::Link};
use task::{TaskOp, TaskReply};

/// A store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Redis is down, refusing, or slower than `redis_timeout_ms`.
    #[error("session store unavailable: {0}")]
    Unavailable(String),
    /// A record exists but cannot be decoded.
    #[error("corrupt session record {id}: {reason}")]
    Corrupt { id: String, reason: String },
}

impl From<::redis::RedisError> for StoreError {
    fn from(e: ::redis::RedisError) -> Self {
        StoreError::Unavailable(e.to_string())
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

tokio::task_local! {
    /// Counts store failures within one HTTP request (see [`watch_failures`]).
    static FAILURES: Cell<u32>;
}

/// Runs `f` counting the store failures it meets, so a caller that only sees a generic
/// error (rmcp answers 500 for a failed restore) can tell it was the store (and answer 503).
pub async fn watch_failures<F: Future>(f: F) -> (F::Output, u32) {
    FAILURES
        .scope(Cell::new(0), async move {
            let out = f.await;
            (out, FAILURES.with(Cell::get))
        })
        .await
}

/// Records a failure for [`watch_failures`] (nothing outside one).
fn note_failure() {
    let _ = FAILURES.try_with(|c| c.set(c.get().saturating_add(1)));
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// One line of `/sessions`.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SessionSummary {
    pub id: String,
    pub created: u64,
    pub last_seen: u64,
    pub protocol_version: Option<String>,
    pub client_name: Option<String>,
    pub node: Option<String>,
    /// Owner hash of the principal that opened it; `None`: anonymous.
    pub owner: Option<String>,
}

/// One stored SSE event: its id within the session's log and its encoded payload.
pub type StoredEvent = (String, String);

/// What a lookup of a session on behalf of a caller found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// The session is live and the caller's (and was touched or deleted).
    Granted,
    /// No such session: unknown, deleted or expired.
    NotFound,
    /// The session is live but another principal's (left untouched).
    OtherOwner,
}

/// What [`Store::touch`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Touch {
    pub access: Access,
    /// The `init` field, when asked for and present (saves the restore a round trip).
    pub init: Option<String>,
}

/// Whether a principal may open one more session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Admitted,
    /// At `max_sessions_per_principal`; the oldest session expires in `retry_after`.
    Full {
        retry_after: Duration,
    },
    /// [`Store::claim`] only: the session record is gone (rmcp could not write it).
    Missing,
}

/// What a resource subscription came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subscribed {
    Yes,
    /// At `max_subscriptions_per_session`.
    Full,
    /// The session is gone.
    Gone,
}

/// One write to a session record, done only if the record exists.
#[derive(Debug, Clone, Copy)]
pub enum FieldOp<'a> {
    Get(&'a str),
    Set(&'a str, &'a str),
    Del(&'a str),
    Incr(&'a str, i64),
    /// Sets `sub:<uri>` unless the session holds `max` subscriptions already.
    Subscribe(&'a str, u64),
    Unsubscribe(&'a str),
}

/// What a [`FieldOp`] answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FieldReply {
    /// No such session: nothing was written.
    Gone,
    Done,
    Value(Option<String>),
    Int(i64),
    Full,
}

/// The record field naming the replica that holds a 2024-11-05 stream.
pub const LEGACY_FIELD: &str = "legacy";
/// Record fields the store keeps for itself (never shown as session data).
pub const SUBSCRIPTION_PREFIX: &str = "sub:";

/// Limits and names both engines share.
#[derive(Debug, Clone)]
pub struct Settings {
    pub prefix: String,
    pub ttl: Duration,
    pub node_id: String,
    pub event_log_max_len: u64,
    pub event_log_max_bytes: u64,
}

impl Settings {
    pub fn from_config(config: &Config) -> Self {
        Self {
            prefix: config.key_prefix.clone(),
            ttl: config.session_ttl,
            node_id: config.node_id.clone(),
            event_log_max_len: config.event_log_max_len,
            event_log_max_bytes: config.event_log_max_bytes,
        }
    }

    pub fn ttl_ms(&self) -> u64 {
        self.ttl.as_millis() as u64
    }

    /// How often the shared indexes (sessions, owner sets) are refreshed for a live session:
    /// a quarter of the TTL, so an index entry outlives its session by at most that much.
    pub fn index_every_ms(&self) -> u64 {
        (self.ttl_ms() / 4).max(1)
    }
}

/// The operations a backing store provides. Owners are `""` for anonymous.
#[async_trait::async_trait]
pub trait Engine: Send + Sync {
    /// Whether replicas share this store.
    fn is_shared(&self) -> bool;
    async fn ping(&self) -> StoreResult<()>;
    /// Writes `fields` and the TTL; with `must_exist`, only into a live record (`false`
    /// when there is none).
    async fn create(
        &self,
        id: &str,
        fields: &[(&str, String)],
        must_exist: bool,
    ) -> StoreResult<bool>;
    async fn touch(&self, id: &str, owner: &str, want_init: bool) -> StoreResult<Touch>;
    async fn admit(&self, owner: &str, limit: u64) -> StoreResult<Admission>;
    /// Binds `id` to `owner` within `limit`; with `open`, creates the record if missing.
    async fn claim(&self, id: &str, owner: &str, limit: u64, open: bool) -> StoreResult<Admission>;
    /// Deletes the session (record and log); `caller`: only if it is theirs.
    async fn delete(&self, id: &str, caller: Option<&str>) -> StoreResult<Access>;
    async fn field(&self, id: &str, op: FieldOp<'_>) -> StoreResult<FieldReply>;
    /// The whole record (empty: no such session).
    async fn record(&self, id: &str) -> StoreResult<HashMap<String, String>>;
    /// Live sessions with their records, most recently used first.
    async fn list(&self, limit: usize) -> StoreResult<Vec<(String, HashMap<String, String>)>>;
    async fn count(&self) -> StoreResult<u64>;
    /// Appends to the session's log; `None`: the session is gone (nothing written).
    async fn append(
        &self,
        session: &str,
        stream: &str,
        payload: &str,
        publish: bool,
    ) -> StoreResult<Option<String>>;
    async fn events_after(
        &self,
        session: &str,
        stream: &str,
        after: Option<&str>,
    ) -> StoreResult<Vec<StoredEvent>>;
    /// The id of the newest entry of the session's log, if any.
    async fn log_tail(&self, session: &str) -> StoreResult<Option<String>>;
    async fn publish(&self, topic: &str, payload: &str) -> StoreResult<()>;
    /// One atomic operation on a task record (see [`task`]).
    async fn task(&self, id: &str, op: TaskOp<'_>) -> StoreResult<TaskReply>;
    /// Gives back the place [`Engine::admit_task`] took for `id` (its record was never
    /// written).
    async fn release_task(&self, owner: &str, id: &str) -> StoreResult<()>;
    /// Counts task `id` (until `expires`, ms) among `owner`'s live tasks, within `limit`.
    async fn admit_task(
        &self,
        owner: &str,
        id: &str,
        expires: u64,
        limit: u64,
    ) -> StoreResult<Admission>;
}

/// Session records, event logs and publishing, on Redis or in memory.
pub struct Store {
    settings: Settings,
    engine: Box<dyn Engine>,
}

impl Store {
    /// Builds the store for `config`: on Redis through `link`, in memory without one. With
    /// Redis, connecting happens in the background and retries until it succeeds: until then
    /// every operation is `Unavailable`.
    pub fn new(config: &Config, bus: Arc<Bus>, link: Option<Arc<Link>>) -> Self {
        let settings = Settings::from_config(config);
        let engine: Box<dyn Engine> = match link {
            Some(link) => Box::new(redis::RedisEngine::new(
                settings.clone(),
                link,
                config.redis_timeout,
            )),
            None => Box::new(memory::MemoryEngine::new(settings.clone(), bus)),
        };
        Self { settings, engine }
    }

    /// A store on an engine made elsewhere (tests).
    pub fn with_engine(settings: Settings, engine: Box<dyn Engine>) -> Self {
        Self { settings, engine }
    }

    pub fn is_redis(&self) -> bool {
        self.engine.is_shared()
    }

    pub fn ttl(&self) -> Duration {
        self.settings.ttl
    }

    /// Checks the store answers (for `/health` and before minting a session).
    pub async fn ping(&self) -> StoreResult<()> {
        self.engine.ping().await
    }

    fn init_fields(&self, init: &InitializeRequestParams) -> StoreResult<Vec<(&str, String)>> {
        let init_json = serde_json::to_string(init).map_err(|e| StoreError::Corrupt {
            id: String::new(),
            reason: e.to_string(),
        })?;
        Ok(vec![
            ("init", init_json),
            ("protocol_version", init.protocol_version.to_string()),
            ("client_name", init.client_info.name.clone()),
            ("client_version", init.client_info.version.clone()),
        ])
    }

    /// Writes the record of a new Streamable HTTP session after its `initialize`.
    pub async fn create(&self, id: &str, init: &InitializeRequestParams) -> StoreResult<()> {
        let now = now_ms().to_string();
        let mut fields = self.init_fields(init)?;
        fields.extend([
            ("created", now.clone()),
            ("last_seen", now),
            ("node", self.settings.node_id.clone()),
        ]);
        self.engine.create(id, &fields, false).await.map(|_| ())
    }

    /// Adds the `initialize` of a 2024-11-05 session to its record (opened by
    /// [`Store::claim`]); `false` if the session ended meanwhile (nothing is written).
    pub async fn initialize_existing(
        &self,
        id: &str,
        init: &InitializeRequestParams,
    ) -> StoreResult<bool> {
        let fields = self.init_fields(init)?;
        self.engine.create(id, &fields, true).await
    }

    /// The `initialize` parameters of a live session, for restoring it on this replica.
    pub async fn load_init(&self, id: &str) -> StoreResult<Option<InitializeRequestParams>> {
        let Some(json) = self.get_field(id, "init").await? else {
            return Ok(None);
        };
        decode_init(id, &json).map(Some)
    }

    /// Refreshes the sliding TTL of a session on behalf of the caller whose owner hash is
    /// `owner` (`None`: anonymous). A session of another owner is left as it is. With
    /// `want_init`, also reads the `initialize` parameters (for a restore), in the same step.
    pub async fn touch(
        &self,
        id: &str,
        owner: Option<&str>,
        want_init: bool,
    ) -> StoreResult<Touch> {
        self.engine
            .touch(id, owner.unwrap_or_default(), want_init)
            .await
    }

    /// Whether the principal `owner` may open another session (`limit` 0: no limit). Also
    /// the store's readiness check before a session is minted, so it costs one round trip
    /// either way. Anonymous sessions are not counted.
    pub async fn admit(&self, owner: Option<&str>, limit: u64) -> StoreResult<Admission> {
        match owner.filter(|_| limit > 0) {
            Some(owner) => self.engine.admit(owner, limit).await,
            None => self.ping().await.map(|()| Admission::Admitted),
        }
    }

    /// Binds session `id` to `owner` (`None`: anonymous, nothing to write) unless the owner
    /// is at `limit` (0: none). With `open_record`, first creates the record (without
    /// `init`): 2024-11-05 sessions exist before their `initialize`. Otherwise the record must
    /// exist: [`Admission::Missing`] when it does not.
    ///
    /// Called before the client learns the id, so no request can see the session unbound.
    pub async fn claim(
        &self,
        id: &str,
        owner: Option<&str>,
        limit: u64,
        open_record: bool,
    ) -> StoreResult<Admission> {
        if owner.is_none() && !open_record {
            return Ok(Admission::Admitted);
        }
        self.engine
            .claim(id, owner.unwrap_or_default(), limit, open_record)
            .await
    }

    /// Deletes a session record, whoever owns it (operators, rmcp, a closed 2024-11-05
    /// stream); `false` when there was none.
    pub async fn delete(&self, id: &str) -> StoreResult<bool> {
        Ok(self.engine.delete(id, None).await? == Access::Granted)
    }

    /// Deletes a session record on behalf of the caller whose owner hash is `owner`; a
    /// session of another owner is kept.
    pub async fn delete_as(&self, id: &str, owner: Option<&str>) -> StoreResult<Access> {
        self.engine
            .delete(id, Some(owner.unwrap_or_default()))
            .await
    }

    /// One field of a session record.
    pub async fn get_field(&self, id: &str, field: &str) -> StoreResult<Option<String>> {
        Ok(match self.engine.field(id, FieldOp::Get(field)).await? {
            FieldReply::Value(v) => v,
            _ => None,
        })
    }

    /// Sets (`Some`) or removes (`None`) one field of a live session record; `false` when the
    /// session is gone (nothing is written).
    pub async fn set_field(&self, id: &str, field: &str, value: Option<&str>) -> StoreResult<bool> {
        let op = match value {
            Some(v) => FieldOp::Set(field, v),
            None => FieldOp::Del(field),
        };
        Ok(self.engine.field(id, op).await? != FieldReply::Gone)
    }

    /// Adds `by` to an integer field of a live session and returns the new value (`None`:
    /// the session is gone, nothing is written).
    pub async fn incr_field(&self, id: &str, field: &str, by: i64) -> StoreResult<Option<i64>> {
        Ok(
            match self.engine.field(id, FieldOp::Incr(field, by)).await? {
                FieldReply::Int(v) => Some(v),
                _ => None,
            },
        )
    }

    /// Subscribes the session to `uri`, within `max` subscriptions.
    pub async fn subscribe(&self, id: &str, uri: &str, max: u64) -> StoreResult<Subscribed> {
        let field = format!("{SUBSCRIPTION_PREFIX}{uri}");
        Ok(
            match self
                .engine
                .field(id, FieldOp::Subscribe(&field, max))
                .await?
            {
                FieldReply::Gone => Subscribed::Gone,
                FieldReply::Full => Subscribed::Full,
                _ => Subscribed::Yes,
            },
        )
    }

    /// Ends the session's subscription to `uri` (if any).
    pub async fn unsubscribe(&self, id: &str, uri: &str) -> StoreResult<()> {
        let field = format!("{SUBSCRIPTION_PREFIX}{uri}");
        self.engine
            .field(id, FieldOp::Unsubscribe(&field))
            .await
            .map(|_| ())
    }

    /// Names of the fields that start with `prefix`, with the prefix removed.
    pub async fn fields_with_prefix(&self, id: &str, prefix: &str) -> StoreResult<Vec<String>> {
        let mut names: Vec<String> = self
            .engine
            .record(id)
            .await?
            .into_keys()
            .filter_map(|k| k.strip_prefix(prefix).map(str::to_owned))
            .collect();
        names.sort();
        Ok(names)
    }

    /// Live sessions, most recently used first (at most `limit`).
    pub async fn list(&self, limit: usize) -> StoreResult<Vec<SessionSummary>> {
        let num = |rec: &HashMap<String, String>, f: &str| {
            rec.get(f).and_then(|v| v.parse().ok()).unwrap_or_default()
        };
        let mut out: Vec<SessionSummary> = self
            .engine
            .list(limit)
            .await?
            .into_iter()
            .filter(|(_, rec)| !rec.is_empty())
            .map(|(id, rec)| SessionSummary {
                created: num(&rec, "created"),
                last_seen: num(&rec, "last_seen"),
                protocol_version: rec.get("protocol_version").cloned(),
                client_name: rec.get("client_name").cloned(),
                node: rec.get("node").cloned(),
                owner: rec.get("owner").cloned(),
                id,
            })
            .collect();
        out.sort_by_key(|s| std::cmp::Reverse(s.last_seen));
        out.truncate(limit);
        Ok(out)
    }

    /// Number of live sessions (on Redis, from the index: sessions that ended within the
    /// last quarter TTL without a DELETE may still be counted).
    pub async fn count(&self) -> StoreResult<u64> {
        self.engine.count().await
    }

    /// Appends an encoded event of `stream` to the log of `session` and returns its id
    /// (`None`: the session is gone, nothing is written). With `publish`, replicas also
    /// receive it live on the bus topic `ev:<session>` as `<event id> <payload>`.
    pub async fn append_event(
        &self,
        session: &str,
        stream: &str,
        payload: &str,
        publish: bool,
    ) -> StoreResult<Option<String>> {
        self.engine.append(session, stream, payload, publish).await
    }

    /// Events of `stream` of `session` strictly after `after` (all when `None`), oldest first.
    pub async fn events_after(
        &self,
        session: &str,
        stream: &str,
        after: Option<&str>,
    ) -> StoreResult<Vec<StoredEvent>> {
        self.engine.events_after(session, stream, after).await
    }

    /// The id of the newest event of the session (any stream): a fresh standalone stream
    /// delivers what comes after it.
    pub async fn log_tail(&self, session: &str) -> StoreResult<Option<String>> {
        self.engine.log_tail(session).await
    }

    /// Publishes a message to every replica (and this one) on a bus topic.
    pub async fn publish(&self, topic: &str, payload: &str) -> StoreResult<()> {
        self.engine.publish(topic, payload).await
    }

    /// Records (`Some(node)`) or clears (`None`) the holder of a 2024-11-05 SSE session, a
    /// field of its record (so it lives and ends with the session). `false`: session gone.
    pub async fn set_legacy_holder(&self, id: &str, node: Option<&str>) -> StoreResult<bool> {
        self.set_field(id, LEGACY_FIELD, node).await
    }

    /// The node holding a 2024-11-05 SSE session, if it is open.
    pub async fn legacy_holder(&self, id: &str) -> StoreResult<Option<String>> {
        self.get_field(id, LEGACY_FIELD).await
    }
}

/// Decodes a stored `init` field.
pub fn decode_init(id: &str, json: &str) -> StoreResult<InitializeRequestParams> {
    serde_json::from_str(json).map_err(|e| StoreError::Corrupt {
        id: id.to_owned(),
        reason: e.to_string(),
    })
}

/// Parses an event id `ms-seq`.
pub fn event_seq(id: &str) -> Option<(u64, u64)> {
    let (a, b) = id.split_once('-')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

#[cfg(test)]
mod tests;
