//! Shared state: session records, per-stream event logs and the message bus between replicas.
//!
//! With a Redis URL everything lives in Redis under one key prefix (default `mcp:`):
//!
//! | key | type | what |
//! |---|---|---|
//! | `mcp:session:<id>` | hash | `init` (initialize params JSON), `protocol_version`, `client_name`, `created`, `last_seen`, `node`, `owner` (absent: anonymous), `log_level`, `counter`, `sub:<uri>`; sliding TTL |
//! | `mcp:sessions` | sorted set | session ids scored by last use, for `/sessions` and `activeSessions` |
//! | `mcp:owner:<owner>` | sorted set | the sessions of one principal scored by expiry (ms), for `max_sessions_per_principal`; TTL refreshed with theirs |
//! | `mcp:events:<id>:<stream>` | stream | the SSE events of one stream of one session, capped, same TTL |
//! | `mcp:legacy:<id>` | string | node holding the `GET /sse` stream of a 2024-11-05 session |
//! | `mcp:bus:<topic>` | pub/sub | live messages between replicas (see [`crate::bus`]) |
//!
//! Every operation that names a session on behalf of a caller takes the caller's owner hash
//! (`None`: anonymous) and answers [`Access::OtherOwner`] without touching a session that is
//! not theirs, in the same round trip as the lookup itself.
//!
//! Without one, the same operations run on process memory (one node only). Redis being
//! unreachable or slow is [`StoreError::Unavailable`], which requests answer with 503, never with
//! "unknown session".

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use redis::{AsyncCommands, aio::ConnectionManager};
use rmcp::model::InitializeRequestParams;
use serde::Serialize;
use tokio::sync::OnceCell;

use crate::{bus::Bus, config::Config};

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

impl From<redis::RedisError> for StoreError {
    fn from(e: redis::RedisError) -> Self {
        StoreError::Unavailable(e.to_string())
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

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

/// One stored SSE event: its id within the stream and its encoded payload.
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

/// Session records, event logs and bus, in Redis or in memory.
pub struct Store {
    prefix: String,
    ttl: Duration,
    node_id: String,
    event_log_max_len: u64,
    bus: Arc<Bus>,
    backend: Backend,
}

enum Backend {
    Redis(RedisBackend),
    Memory(Mutex<Memory>),
}

struct RedisBackend {
    conn: Arc<OnceCell<ConnectionManager>>,
    timeout: Duration,
    touch: redis::Script,
    append: redis::Script,
    claim: redis::Script,
    delete: redis::Script,
}

#[derive(Default)]
struct Memory {
    records: HashMap<String, (HashMap<String, String>, Instant)>,
    events: HashMap<String, Vec<(u64, String)>>,
    legacy: HashMap<String, String>,
    next_event: u64,
}

/// Refreshes a session's TTL and last-seen time if it exists and belongs to the caller.
/// KEYS: record, index, owner set. ARGV: ttl ms, now ms, id, caller's owner ('' anonymous),
/// expiry ms. Returns 1 (touched), 0 (no such session) or 2 (another owner's, untouched).
const TOUCH_LUA: &str = r"
local owner = redis.call('HGET', KEYS[1], 'owner')
if not owner then
  if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
  owner = ''
end
if owner ~= ARGV[4] then return 2 end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[1], 'last_seen', ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
if owner ~= '' then
  redis.call('ZADD', KEYS[3], ARGV[5], ARGV[3])
  redis.call('PEXPIRE', KEYS[3], ARGV[1])
end
return 1";

/// Binds a session to its owner within the owner's session limit. KEYS: record, index, owner
/// set. ARGV: owner ('' anonymous), now ms, ttl ms, limit (0 none), id, expiry ms, node ('':
/// the record must exist already; otherwise a record without `init` is created, as for a
/// 2024-11-05 session before its `initialize`). Returns {1} (bound), {0} (no record) or
/// {2, expiry ms of the owner's oldest session} (at the limit).
const CLAIM_LUA: &str = r"
if ARGV[7] == '' and redis.call('EXISTS', KEYS[1]) == 0 then return {0} end
if ARGV[1] ~= '' then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', ARGV[2])
  local limit = tonumber(ARGV[4])
  if limit > 0 and redis.call('ZCARD', KEYS[3]) >= limit then
    local oldest = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
    return {2, tonumber(oldest[2])}
  end
end
if ARGV[7] ~= '' then
  redis.call('HSET', KEYS[1], 'created', ARGV[2], 'last_seen', ARGV[2], 'node', ARGV[7])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  redis.call('ZADD', KEYS[2], ARGV[2], ARGV[5])
end
if ARGV[1] ~= '' then
  redis.call('HSET', KEYS[1], 'owner', ARGV[1])
  redis.call('ZADD', KEYS[3], ARGV[6], ARGV[5])
  redis.call('PEXPIRE', KEYS[3], ARGV[3])
end
return {1}";

/// Deletes a session record (only the caller's when ARGV[3] is '1') and its place in the
/// index and its owner's set. KEYS: record, index. ARGV: id, owner set key prefix, check,
/// caller's owner. Returns 1 (deleted), 0 (no such session) or 2 (another owner's, kept).
/// The owner set's key is built here from the record (single Redis, not cluster-safe).
const DELETE_LUA: &str = r"
local owner = redis.call('HGET', KEYS[1], 'owner')
if not owner then
  if redis.call('EXISTS', KEYS[1]) == 0 then
    redis.call('ZREM', KEYS[2], ARGV[1])
    return 0
  end
  owner = ''
end
if ARGV[3] == '1' and owner ~= ARGV[4] then return 2 end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
if owner ~= '' then redis.call('ZREM', ARGV[2] .. owner, ARGV[1]) end
return 1";

/// Appends an event to a capped stream, refreshes its TTL and, when a channel is given,
/// publishes `<event id> <payload>` on it. Returns the event id.
const APPEND_LUA: &str = r"
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'd', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
if ARGV[4] ~= '' then redis.call('PUBLISH', ARGV[4], id .. ' ' .. ARGV[2]) end
return id";

impl Store {
    /// Builds the store for `config`. With Redis, connecting happens in the background and
    /// retries until it succeeds: until then every operation is `Unavailable`.
    pub fn new(config: &Config, bus: Arc<Bus>) -> StoreResult<Self> {
        let backend = match &config.redis_url {
            Some(url) => {
                let client = redis::Client::open(url.as_str())?;
                let conn = Arc::new(OnceCell::new());
                tokio::spawn(connect_forever(client, conn.clone(), config.redis_timeout));
                Backend::Redis(RedisBackend {
                    conn,
                    timeout: config.redis_timeout,
                    touch: redis::Script::new(TOUCH_LUA),
                    append: redis::Script::new(APPEND_LUA),
                    claim: redis::Script::new(CLAIM_LUA),
                    delete: redis::Script::new(DELETE_LUA),
                })
            }
            None => Backend::Memory(Mutex::new(Memory::default())),
        };
        Ok(Self {
            prefix: config.key_prefix.clone(),
            ttl: config.session_ttl,
            node_id: config.node_id.clone(),
            event_log_max_len: config.event_log_max_len,
            bus,
            backend,
        })
    }

    pub fn is_redis(&self) -> bool {
        matches!(self.backend, Backend::Redis(_))
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn key(&self, kind: &str, id: &str) -> String {
        format!("{}{kind}:{id}", self.prefix)
    }

    fn index_key(&self) -> String {
        format!("{}sessions", self.prefix)
    }

    /// The sorted set of one owner's sessions (`<prefix>owner:<hash>`).
    fn owner_key(&self, owner: &str) -> String {
        self.key("owner", owner)
    }

    /// The Redis channel of a bus topic.
    pub fn channel(&self, topic: &str) -> String {
        format!("{}bus:{topic}", self.prefix)
    }

    fn ttl_ms(&self) -> u64 {
        self.ttl.as_millis() as u64
    }

    fn conn(&self, r: &RedisBackend) -> StoreResult<ConnectionManager> {
        r.conn
            .get()
            .cloned()
            .ok_or_else(|| StoreError::Unavailable("not connected to redis yet".into()))
    }

    fn memory(m: &Mutex<Memory>) -> std::sync::MutexGuard<'_, Memory> {
        // A panic while holding this lock cannot leave the maps half-updated in a way that
        // matters more than losing the node, so a poisoned lock is used as is.
        m.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Checks the store answers (for `/health` and before minting a session).
    pub async fn ping(&self) -> StoreResult<()> {
        match &self.backend {
            Backend::Redis(r) => {
                let mut c = self.conn(r)?;
                let _: String = timed(r.timeout, redis::cmd("PING").query_async(&mut c)).await?;
                Ok(())
            }
            Backend::Memory(_) => Ok(()),
        }
    }

    /// Writes a new session record (rmcp calls this after a successful `initialize`).
    pub async fn create(&self, id: &str, init: &InitializeRequestParams) -> StoreResult<()> {
        let now = now_ms().to_string();
        let init_json = serde_json::to_string(init).map_err(|e| StoreError::Corrupt {
            id: id.to_owned(),
            reason: e.to_string(),
        })?;
        let fields = [
            ("init", init_json),
            ("protocol_version", init.protocol_version.to_string()),
            ("client_name", init.client_info.name.clone()),
            ("client_version", init.client_info.version.clone()),
            ("created", now.clone()),
            ("last_seen", now.clone()),
            ("node", self.node_id.clone()),
        ];
        match &self.backend {
            Backend::Redis(r) => {
                let mut c = self.conn(r)?;
                let key = self.key("session", id);
                let mut pipe = redis::pipe();
                pipe.atomic()
                    .hset_multiple(&key, &fields)
                    .ignore()
                    .pexpire(&key, self.ttl_ms() as i64)
                    .ignore()
                    .zadd(self.index_key(), id, now_ms())
                    .ignore();
                timed(r.timeout, pipe.query_async::<()>(&mut c)).await
            }
            Backend::Memory(m) => {
                // Like HSET: fields already there (the owner of a 2024-11-05 session) stay.
                let mut m = Self::memory(m);
                let now = Instant::now();
                let entry = m
                    .records
                    .entry(id.to_owned())
                    .or_insert_with(|| (HashMap::new(), now));
                if entry.1 <= now {
                    entry.0.clear();
                }
                entry
                    .0
                    .extend(fields.into_iter().map(|(k, v)| (k.to_owned(), v)));
                entry.1 = now + self.ttl;
                Ok(())
            }
        }
    }

    /// The `initialize` parameters of a live session, for restoring it on this replica.
    pub async fn load_init(&self, id: &str) -> StoreResult<Option<InitializeRequestParams>> {
        let Some(json) = self.get_field(id, "init").await? else {
            return Ok(None);
        };
        serde_json::from_str(&json)
            .map(Some)
            .map_err(|e| StoreError::Corrupt {
                id: id.to_owned(),
                reason: e.to_string(),
            })
    }

    /// Refreshes the sliding TTL of a session on behalf of the caller whose owner hash is
    /// `owner` (`None`: anonymous). A session of another owner is left as it is.
    pub async fn touch(&self, id: &str, owner: Option<&str>) -> StoreResult<Access> {
        match &self.backend {
            Backend::Redis(r) => {
                let mut c = self.conn(r)?;
                let now = now_ms();
                let mut inv = r.touch.prepare_invoke();
                inv.key(self.key("session", id))
                    .key(self.index_key())
                    .key(self.owner_key(owner.unwrap_or_default()))
                    .arg(self.ttl_ms())
                    .arg(now)
                    .arg(id)
                    .arg(owner.unwrap_or_default())
                    .arg(now + self.ttl_ms());
                let n: i64 = timed(r.timeout, inv.invoke_async(&mut c)).await?;
                Ok(access(n))
            }
            Backend::Memory(m) => {
                let mut m = Self::memory(m);
                let now = Instant::now();
                match m.records.get_mut(id) {
                    Some((rec, exp)) if *exp > now => {
                        if rec.get("owner").map(String::as_str) != owner {
                            return Ok(Access::OtherOwner);
                        }
                        *exp = now + self.ttl;
                        rec.insert("last_seen".into(), now_ms().to_string());
                        Ok(Access::Granted)
                    }
                    Some(_) => {
                        m.records.remove(id);
                        Ok(Access::NotFound)
                    }
                    None => Ok(Access::NotFound),
                }
            }
        }
    }

    /// Whether the principal `owner` may open another session (`limit` 0: no limit). Also
    /// the store's readiness check before a session is minted, so it costs one round trip
    /// either way. Anonymous sessions are not counted.
    pub async fn admit(&self, owner: Option<&str>, limit: u64) -> StoreResult<Admission> {
        let Some(owner) = owner.filter(|_| limit > 0) else {
            return self.ping().await.map(|()| Admission::Admitted);
        };
        let now = now_ms();
        match &self.backend {
            Backend::Redis(r) => {
                let mut c = self.conn(r)?;
                let key = self.owner_key(owner);
                let mut pipe = redis::pipe();
                pipe.atomic()
                    .zrembyscore(&key, "-inf", now)
                    .ignore()
                    .zcard(&key)
                    .zrange_withscores(&key, 0, 0);
                let (count, oldest): (u64, Vec<(String, f64)>) =
                    timed(r.timeout, pipe.query_async(&mut c)).await?;
                Ok(if count >= limit {
                    let expiry = oldest.first().map_or(now, |(_, score)| *score as u64);
                    Admission::Full {
                        retry_after: Duration::from_millis(expiry.saturating_sub(now)),
                    }
                } else {
                    Admission::Admitted
                })
            }
            Backend::Memory(m) => Ok(Self::memory(m).admit(owner, limit, None)),
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
        let now = now_ms();
        match &self.backend {
            Backend::Redis(r) => {
                let mut c = self.conn(r)?;
                let mut inv = r.claim.prepare_invoke();
                inv.key(self.key("session", id))
                    .key(self.index_key())
                    .key(self.owner_key(owner.unwrap_or_default()))
                    .arg(owner.unwrap_or_default())
                    .arg(now)
                    .arg(self.ttl_ms())
                    .arg(limit)
                    .arg(id)
                    .arg(now + self.ttl_ms())
                    .arg(if open_record {
                        self.node_id.as_str()
                    } else {
                        ""
                    });
                let reply: Vec<i64> = timed(r.timeout, inv.invoke_async(&mut c)).await?;
                Ok(match reply.as_slice() {
                    [1] => Admission::Admitted,
                    [2, expiry] => Admission::Full {
                        retry_after: Duration::from_millis(
                            u64::try_from(*expiry).unwrap_or(now).saturating_sub(now),
                        ),
                    },
                    _ => Admission::Missing,
                })
            }
            Backend::Memory(m) => {
                let mut m = Self::memory(m);
                let live_at = Instant::now();
                let exists = m.records.get(id).is_some_and(|(_, exp)| *exp > live_at);
                if !exists && !open_record {
                    return Ok(Admission::Missing);
                }
                if let Some(owner) = owner {
                    let admission = m.admit(owner, limit, Some(id));
                    if admission != Admission::Admitted {
                        return Ok(admission);
                    }
                }
                if !exists {
                    let record = [("created", now), ("last_seen", now)]
                        .into_iter()
                        .map(|(k, v)| (k.to_owned(), v.to_string()))
                        .chain([("node".to_owned(), self.node_id.clone())])
                        .collect();
                    m.records
                        .insert(id.to_owned(), (record, live_at + self.ttl));
                }
                if let (Some(owner), Some((rec, _))) = (owner, m.records.get_mut(id)) {
                    rec.insert("owner".into(), owner.to_owned());
                }
                Ok(Admission::Admitted)
            }
        }
    }

    /// Deletes a session record, whoever owns it (operators, rmcp, a closed 2024-11-05
    /// stream); `false` when there was none.
    pub async fn delete(&self, id: &str) -> StoreResult<bool> {
        Ok(self.delete_checked(id, None).await? == Access::Granted)
    }

    /// Deletes a session record on behalf of the caller whose owner hash is `owner`; a
    /// session of another owner is kept.
    pub async fn delete_as(&self, id: &str, owner: Option<&str>) -> StoreResult<Access> {
        self.delete_checked(id, Some(owner)).await
    }

    async fn delete_checked(&self, id: &str, caller: Option<Option<&str>>) -> StoreResult<Access> {
        match &self.backend {
            Backend::Redis(r) => {
                let mut c = self.conn(r)?;
                let mut inv = r.delete.prepare_invoke();
                inv.key(self.key("session", id))
                    .key(self.index_key())
                    .arg(id)
                    .arg(self.key("owner", ""))
                    .arg(if caller.is_some() { "1" } else { "0" })
                    .arg(caller.flatten().unwrap_or_default());
                let n: i64 = timed(r.timeout, inv.invoke_async(&mut c)).await?;
                Ok(access(n))
            }
            Backend::Memory(m) => {
                let mut m = Self::memory(m);
                let live = m
                    .records
                    .get(id)
                    .map(|(rec, exp)| (*exp > Instant::now(), rec.get("owner").cloned()));
                match live {
                    None => return Ok(Access::NotFound),
                    Some((true, owner)) if caller.is_some_and(|c| c != owner.as_deref()) => {
                        return Ok(Access::OtherOwner);
                    }
                    Some(_) => {}
                }
                let live = m
                    .records
                    .remove(id)
                    .is_some_and(|(_, exp)| exp > Instant::now());
                let prefix = format!("{id}:");
                m.events.retain(|k, _| !k.starts_with(&prefix));
                Ok(if live {
                    Access::Granted
                } else {
                    Access::NotFound
                })
            }
        }
    }

    /// One field of a session record.
    pub async fn get_field(&self, id: &str, field: &str) -> StoreResult<Option<String>> {
        match &self.backend {
            Backend::Redis(r) => {
                let mut c = self.conn(r)?;
                Ok(timed(r.timeout, c.hget(self.key("session", id), field)).await?)
            }
            Backend::Memory(m) => {
                let m = Self::memory(m);
                Ok(m.records
                    .get(id)
                    .filter(|(_, exp)| *exp > Instant::now())
                    .and_then(|(rec, _)| rec.get(field).cloned()))
            }
        }
    }

    /// Sets (`Some`) or removes (`None`) one field of an existing session record.
    pub async fn set_field(&self, id: &str, field: &str, value: Option<&str>) -> StoreResult<()> {
        match &self.backend {
            Backend::Redis(r) => {
                let mut c = self.conn(r)?;
                let key = self.key("session", id);
                match value {
                    Some(v) => timed(r.timeout, c.hset::<_, _, _, ()>(key, field, v)).await,
                    None => timed(r.timeout, c.hdel::<_, _, ()>(key, field)).await,
                }
            }
            Backend::Memory(m) => {
                let mut m = Self::memory(m);
                if let Some((rec, _)) = m.records.get_mut(id) {
                    match value {
                        Some(v) => rec.insert(field.to_owned(), v.to_owned()),
                        None => rec.remove(field),
                    };
                }
                Ok(())
            }
        }
    }

    /// Adds `by` to an integer field and returns the new value.
    pub async fn incr_field(&self, id: &str, field: &str, by: i64) -> StoreResult<i64> {
        match &self.backend {
            Backend::Redis(r) => {
                let mut c = self.conn(r)?;
                Ok(timed(r.timeout, c.hincr(self.key("session", id), field, by)).await?)
            }
            Backend::Memory(m) => {
                let mut m = Self::memory(m);
                let Some((rec, _)) = m.records.get_mut(id) else {
                    return Ok(0);
                };
                let v = rec
                    .get(field)
                    .and_then(|v| v.parse::<i64>().ok())
                    .unwrap_or(0)
                    .saturating_add(by);
                rec.insert(field.to_owned(), v.to_string());
                Ok(v)
            }
        }
    }

    /// Names of the fields that start with `prefix`, with the prefix removed.
    pub async fn fields_with_prefix(&self, id: &str, prefix: &str) -> StoreResult<Vec<String>> {
        let all: HashMap<String, String> = match &self.backend {
            Backend::Redis(r) => {
                let mut c = self.conn(r)?;
                timed(r.timeout, c.hgetall(self.key("session", id))).await?
            }
            Backend::Memory(m) => Self::memory(m)
                .records
                .get(id)
                .map(|(rec, _)| rec.clone())
                .unwrap_or_default(),
        };
        let mut names: Vec<String> = all
            .into_keys()
            .filter_map(|k| k.strip_prefix(prefix).map(str::to_owned))
            .collect();
        names.sort();
        Ok(names)
    }

    /// Live sessions, most recently used first (at most `limit`).
    pub async fn list(&self, limit: usize) -> StoreResult<Vec<SessionSummary>> {
        let min = now_ms().saturating_sub(self.ttl_ms());
        let rows: Vec<(String, HashMap<String, String>)> = match &self.backend {
            Backend::Redis(r) => {
                let mut c = self.conn(r)?;
                let index = self.index_key();
                let _: () = timed(r.timeout, c.zrembyscore(&index, "-inf", min)).await?;
                let ids: Vec<String> = timed(
                    r.timeout,
                    c.zrevrangebyscore_limit(&index, "+inf", min, 0, limit as isize),
                )
                .await?;
                let mut pipe = redis::pipe();
                for id in &ids {
                    pipe.hgetall(self.key("session", id));
                }
                let recs: Vec<HashMap<String, String>> =
                    timed(r.timeout, pipe.query_async(&mut c)).await?;
                ids.into_iter().zip(recs).collect()
            }
            Backend::Memory(m) => {
                let mut m = Self::memory(m);
                let now = Instant::now();
                m.records.retain(|_, (_, exp)| *exp > now);
                m.records
                    .iter()
                    .map(|(id, (rec, _))| (id.clone(), rec.clone()))
                    .collect()
            }
        };
        let num = |rec: &HashMap<String, String>, f: &str| {
            rec.get(f).and_then(|v| v.parse().ok()).unwrap_or_default()
        };
        let mut out: Vec<SessionSummary> = rows
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

    /// Number of sessions used within the TTL.
    pub async fn count(&self) -> StoreResult<u64> {
        match &self.backend {
            Backend::Redis(r) => {
                let mut c = self.conn(r)?;
                let min = now_ms().saturating_sub(self.ttl_ms());
                Ok(timed(r.timeout, c.zcount(self.index_key(), min, "+inf")).await?)
            }
            Backend::Memory(m) => {
                let now = Instant::now();
                Ok(Self::memory(m)
                    .records
                    .values()
                    .filter(|(_, exp)| *exp > now)
                    .count() as u64)
            }
        }
    }

    /// Appends an encoded event to the log of `stream` of `session` and returns its id.
    /// With `publish`, replicas also receive it live on the bus topic `ev:<session>` as
    /// `<event id> <payload>`.
    pub async fn append_event(
        &self,
        session: &str,
        stream: &str,
        payload: &str,
        publish: bool,
    ) -> StoreResult<String> {
        let topic = format!("ev:{session}");
        match &self.backend {
            Backend::Redis(r) => {
                let mut c = self.conn(r)?;
                let mut inv = r.append.prepare_invoke();
                inv.key(self.key("events", &format!("{session}:{stream}")))
                    .arg(self.event_log_max_len)
                    .arg(payload)
                    .arg(self.ttl_ms())
                    .arg(if publish {
                        self.channel(&topic)
                    } else {
                        String::new()
                    });
                Ok(timed(r.timeout, inv.invoke_async(&mut c)).await?)
            }
            Backend::Memory(m) => {
                let id = {
                    let mut m = Self::memory(m);
                    m.next_event += 1;
                    let n = m.next_event;
                    let log = m.events.entry(format!("{session}:{stream}")).or_default();
                    log.push((n, payload.to_owned()));
                    let excess = log.len().saturating_sub(self.event_log_max_len as usize);
                    log.drain(..excess);
                    format!("{n}-0")
                };
                if publish {
                    self.bus.dispatch(&topic, format!("{id} {payload}").into());
                }
                Ok(id)
            }
        }
    }

    /// Events of `stream` of `session` strictly after `after` (all when `None`), oldest first.
    pub async fn events_after(
        &self,
        session: &str,
        stream: &str,
        after: Option<&str>,
    ) -> StoreResult<Vec<StoredEvent>> {
        match &self.backend {
            Backend::Redis(r) => {
                let mut c = self.conn(r)?;
                let start = after.map_or_else(|| "-".to_owned(), |a| format!("({a}"));
                let rows: Vec<(String, Vec<String>)> = timed(
                    r.timeout,
                    redis::cmd("XRANGE")
                        .arg(self.key("events", &format!("{session}:{stream}")))
                        .arg(start)
                        .arg("+")
                        .query_async(&mut c),
                )
                .await?;
                Ok(rows
                    .into_iter()
                    .filter_map(|(id, mut kv)| (kv.len() == 2).then(|| (id, kv.swap_remove(1))))
                    .collect())
            }
            Backend::Memory(m) => {
                let after = after.and_then(event_seq).unwrap_or((0, 0));
                Ok(Self::memory(m)
                    .events
                    .get(&format!("{session}:{stream}"))
                    .map(|log| {
                        log.iter()
                            .filter(|(n, _)| (*n, 0) > after)
                            .map(|(n, p)| (format!("{n}-0"), p.clone()))
                            .collect()
                    })
                    .unwrap_or_default())
            }
        }
    }

    /// Publishes a message to every replica (and this one) on a bus topic.
    pub async fn publish(&self, topic: &str, payload: &str) -> StoreResult<()> {
        match &self.backend {
            Backend::Redis(r) => {
                let mut c = self.conn(r)?;
                timed(
                    r.timeout,
                    c.publish::<_, _, ()>(self.channel(topic), payload),
                )
                .await
            }
            Backend::Memory(_) => {
                self.bus.dispatch(topic, payload.into());
                Ok(())
            }
        }
    }

    /// Records (`Some(node)`) or clears (`None`) the holder of a 2024-11-05 SSE session.
    pub async fn set_legacy_holder(&self, id: &str, node: Option<&str>) -> StoreResult<()> {
        match &self.backend {
            Backend::Redis(r) => {
                let mut c = self.conn(r)?;
                let key = self.key("legacy", id);
                match node {
                    Some(n) => timed(r.timeout, c.pset_ex::<_, _, ()>(key, n, self.ttl_ms())).await,
                    None => timed(r.timeout, c.del::<_, ()>(key)).await,
                }
            }
            Backend::Memory(m) => {
                let mut m = Self::memory(m);
                match node {
                    Some(n) => m.legacy.insert(id.to_owned(), n.to_owned()),
                    None => m.legacy.remove(id),
                };
                Ok(())
            }
        }
    }

    /// The node holding a 2024-11-05 SSE session, if it is open.
    pub async fn legacy_holder(&self, id: &str) -> StoreResult<Option<String>> {
        match &self.backend {
            Backend::Redis(r) => {
                let mut c = self.conn(r)?;
                Ok(timed(r.timeout, c.get(self.key("legacy", id))).await?)
            }
            Backend::Memory(m) => Ok(Self::memory(m).legacy.get(id).cloned()),
        }
    }
}

impl Memory {
    /// [`Store::admit`] on memory: `owner`'s live sessions other than `except` against
    /// `limit` (0: none).
    fn admit(&self, owner: &str, limit: u64, except: Option<&str>) -> Admission {
        if limit == 0 {
            return Admission::Admitted;
        }
        let now = Instant::now();
        let expiries: Vec<Instant> = self
            .records
            .iter()
            .filter(|(id, (rec, exp))| {
                *exp > now
                    && Some(id.as_str()) != except
                    && rec.get("owner").is_some_and(|o| o == owner)
            })
            .map(|(_, (_, exp))| *exp)
            .collect();
        if (expiries.len() as u64) < limit {
            return Admission::Admitted;
        }
        let oldest = expiries.into_iter().min().unwrap_or(now);
        Admission::Full {
            retry_after: oldest.saturating_duration_since(now),
        }
    }
}

fn access(n: i64) -> Access {
    match n {
        1 => Access::Granted,
        2 => Access::OtherOwner,
        _ => Access::NotFound,
    }
}

/// Parses a Redis stream id `ms-seq`.
pub fn event_seq(id: &str) -> Option<(u64, u64)> {
    let (a, b) = id.split_once('-')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

async fn timed<T>(
    limit: Duration,
    f: impl Future<Output = redis::RedisResult<T>>,
) -> StoreResult<T> {
    match tokio::time::timeout(limit, f).await {
        Ok(r) => r.map_err(StoreError::from),
        Err(_) => Err(StoreError::Unavailable(format!(
            "redis did not answer within {} ms",
            limit.as_millis()
        ))),
    }
}

/// Connects the command connection, retrying with backoff until Redis answers. Once made,
/// the `ConnectionManager` reconnects by itself after Redis restarts.
async fn connect_forever(
    client: redis::Client,
    cell: Arc<OnceCell<ConnectionManager>>,
    timeout: Duration,
) {
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_millis(500));
    let mut delay = Duration::from_millis(100);
    loop {
        match ConnectionManager::new_with_config(client.clone(), config.clone()).await {
            Ok(conn) => {
                let _ = cell.set(conn);
                tracing::info!("connected to redis");
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "redis not reachable, retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rmcp::model::{ClientCapabilities, Implementation, ProtocolVersion};

    fn store(ttl_seconds: u64) -> Store {
        let config = Config {
            session_ttl: Duration::from_secs(ttl_seconds),
            ..Config::default()
        };
        match Store::new(&config, Bus::new()) {
            Ok(s) => s,
            Err(e) => panic!("memory store: {e}"),
        }
    }

    fn init() -> InitializeRequestParams {
        InitializeRequestParams::new(ClientCapabilities::default(), Implementation::new("t", "1"))
            .with_protocol_version(ProtocolVersion::V_2025_06_18)
    }

    async fn create(s: &Store, id: &str, owner: Option<&str>) {
        assert!(s.create(id, &init()).await.is_ok(), "create {id}");
        assert_eq!(
            s.claim(id, owner, 0, false).await.ok(),
            Some(Admission::Admitted),
            "claim {id}"
        );
    }

    #[tokio::test]
    async fn sessions_answer_only_their_owner_and_others_cannot_refresh_them() {
        let s = store(60);
        create(&s, "a1", Some("alice")).await;
        create(&s, "anon", None).await;
        assert_eq!(
            s.touch("a1", Some("alice")).await.ok(),
            Some(Access::Granted)
        );
        assert_eq!(
            s.touch("a1", Some("bob")).await.ok(),
            Some(Access::OtherOwner)
        );
        assert_eq!(s.touch("a1", None).await.ok(), Some(Access::OtherOwner));
        assert_eq!(s.touch("anon", None).await.ok(), Some(Access::Granted));
        assert_eq!(
            s.touch("anon", Some("alice")).await.ok(),
            Some(Access::OtherOwner)
        );
        assert_eq!(
            s.touch("nope", Some("alice")).await.ok(),
            Some(Access::NotFound)
        );
        assert_eq!(
            s.delete_as("a1", Some("bob")).await.ok(),
            Some(Access::OtherOwner)
        );
        assert_eq!(s.delete_as("a1", None).await.ok(), Some(Access::OtherOwner));
        assert_eq!(
            s.touch("a1", Some("alice")).await.ok(),
            Some(Access::Granted),
            "a refused delete leaves the session alone"
        );
        assert_eq!(
            s.delete_as("a1", Some("alice")).await.ok(),
            Some(Access::Granted)
        );
        assert_eq!(
            s.delete_as("a1", Some("alice")).await.ok(),
            Some(Access::NotFound)
        );
        assert_eq!(
            s.delete("anon").await.ok(),
            Some(true),
            "operators delete any session"
        );
    }

    #[tokio::test]
    async fn the_session_limit_counts_live_sessions_of_one_owner_only() {
        let s = store(60);
        for id in ["a1", "a2"] {
            create(&s, id, Some("alice")).await;
        }
        create(&s, "anon", None).await;
        assert_eq!(
            s.admit(Some("alice"), 3).await.ok(),
            Some(Admission::Admitted)
        );
        assert!(
            matches!(s.admit(Some("alice"), 2).await, Ok(Admission::Full { retry_after }) if retry_after <= Duration::from_secs(60)),
            "two of two: full, retry when the oldest expires"
        );
        assert_eq!(
            s.admit(Some("bob"), 2).await.ok(),
            Some(Admission::Admitted)
        );
        assert_eq!(
            s.admit(None, 1).await.ok(),
            Some(Admission::Admitted),
            "anonymous: not counted"
        );
        assert_eq!(
            s.admit(Some("alice"), 0).await.ok(),
            Some(Admission::Admitted),
            "0: unlimited"
        );
        assert!(s.create("a3", &init()).await.is_ok());
        assert!(
            matches!(
                s.claim("a3", Some("alice"), 2, false).await,
                Ok(Admission::Full { .. })
            ),
            "claim enforces the limit too (concurrent initializes)"
        );
        assert_eq!(
            s.delete_as("a1", Some("alice")).await.ok(),
            Some(Access::Granted)
        );
        assert_eq!(
            s.claim("a3", Some("alice"), 2, false).await.ok(),
            Some(Admission::Admitted)
        );
        assert_eq!(
            s.claim("gone", Some("alice"), 0, false).await.ok(),
            Some(Admission::Missing),
            "no record to bind"
        );
    }

    #[tokio::test]
    async fn an_opened_record_keeps_its_owner_through_initialize() {
        let s = store(60);
        assert_eq!(
            s.claim("l1", Some("alice"), 5, true).await.ok(),
            Some(Admission::Admitted)
        );
        assert!(
            s.create("l1", &init()).await.is_ok(),
            "initialize of a 2024-11-05 session"
        );
        assert_eq!(
            s.touch("l1", Some("alice")).await.ok(),
            Some(Access::Granted)
        );
        assert_eq!(s.touch("l1", None).await.ok(), Some(Access::OtherOwner));
        let listed = s.list(10).await.unwrap_or_default();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].owner.as_deref(), Some("alice"));
        assert_eq!(listed[0].client_name.as_deref(), Some("t"));
    }

    #[tokio::test]
    async fn expired_sessions_are_not_found_and_not_counted() {
        let s = store(1);
        create(&s, "a1", Some("alice")).await;
        // The memory store reads std's clock, which tokio cannot pause: wait, polling.
        let deadline = Instant::now() + Duration::from_secs(3);
        while s.touch("a1", Some("bob")).await.ok() != Some(Access::NotFound) {
            assert!(
                Instant::now() < deadline,
                "session must expire after its TTL"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            s.admit(Some("alice"), 1).await.ok(),
            Some(Admission::Admitted)
        );
    }
}
