//! The store on Redis (one server, Sentinel or Cluster; see [`crate::redis_link`]).
//!
//! | key | type | what |
//! |---|---|---|
//! | `<p>{<id>}:s` | hash | the session record: `init`, `protocol_version`, `client_name`, `client_version`, `created`, `last_seen`, `node`, `owner` (absent: anonymous), `log_level`, `counter`, `sub:<uri>`, `nsub`, `legacy` (holder of a 2024-11-05 stream), `ix` (last index refresh), `eb` (bytes in the log); sliding TTL |
//! | `<p>{<id>}:e` | stream | the session's event log: entries `s` (stream name) and `d` (payload); trimmed by count and bytes; same TTL as the record |
//! | `<p>sessions` | sorted set | session ids scored by their last index refresh, for `/sessions` and `activeSessions`; pruned as it goes; expires when no session refreshes it |
//! | `<p>owner:{<hash>}` | sorted set | one principal's sessions scored by expiry (ms), for `max_sessions_per_principal`; same refresh and TTL rules |
//! | `<p>{<task id>}:t` | hash | a task record (see [`super::task`]); expires `tasks.ttl_seconds` after its creation, never slid |
//! | `<p>tasks:{<hash>}` | sorted set | one principal's task ids scored by expiry (ms), for `tasks.max_per_principal` (`tasks:{anonymous}`: all anonymous callers', for `tasks.max_anonymous`); expires with its newest task |
//! | `<p>bus:<topic>` | pub/sub | live messages between replicas (see [`crate::bus`]) |
//!
//! A session's two keys share the hash tag `{<id>}`, so every script touches one Cluster
//! slot. The shared indexes are written by separate commands, never inside a session's
//! script, and only once per quarter TTL per session (the touch script says when).

use std::{collections::HashMap, sync::Arc, time::Duration};

use ::redis::{AsyncCommands, Value};
use tokio::sync::OnceCell;

use super::{
    Access, Admission, Engine, FieldOp, FieldReply, Settings, StoreError, StoreResult, StoredEvent,
    Touch, note_failure, now_ms,
    task::{self, TaskOp, TaskReply},
};
use crate::redis_link::{Conn, Link};

/// Refreshes a session's TTL (record and log) and last-seen time if it exists and belongs to
/// the caller. KEYS: record, log. ARGV: ttl ms, now ms, caller's owner ('' anonymous),
/// want init ('1'), index period ms. Returns {0} (no such session), {2} (another owner's,
/// untouched) or {1, reindex (1: refresh the indexes now), init ('' unless asked)}.
const TOUCH_LUA: &str = r"
local owner = redis.call('HGET', KEYS[1], 'owner')
if not owner then
  if redis.call('EXISTS', KEYS[1]) == 0 then return {0} end
  owner = ''
end
if owner ~= ARGV[3] then return {2} end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[1])
local now = tonumber(ARGV[2])
local reindex = 0
if now - tonumber(redis.call('HGET', KEYS[1], 'ix') or '0') >= tonumber(ARGV[5]) then
  redis.call('HSET', KEYS[1], 'last_seen', ARGV[2], 'ix', ARGV[2])
  reindex = 1
else
  redis.call('HSET', KEYS[1], 'last_seen', ARGV[2])
end
local init = ''
if ARGV[4] == '1' then init = redis.call('HGET', KEYS[1], 'init') or '' end
return {1, reindex, init}";

/// Writes fields and the TTL of a record. KEYS: record. ARGV: ttl ms, must exist ('1'),
/// then field, value pairs. Returns 0 (must exist and does not: nothing written) or 1.
const CREATE_LUA: &str = r"
if ARGV[2] == '1' and redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1";

/// Takes a place in an owner's set within the limit. KEYS: owner set. ARGV: now ms, limit
/// (0 none), id, expiry score, set ttl ms. Returns {1} or {2, expiry of the oldest}.
const OWNER_LUA: &str = r"
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
local limit = tonumber(ARGV[2])
if limit > 0 and not redis.call('ZSCORE', KEYS[1], ARGV[3])
   and redis.call('ZCARD', KEYS[1]) >= limit then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {2, tonumber(oldest[2])}
end
redis.call('ZADD', KEYS[1], ARGV[4], ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return {1}";

/// Writes the owner into a record. KEYS: record. ARGV: owner ('' none), node ('': the record
/// must exist; otherwise it is created without `init`, as for a 2024-11-05 session before
/// its `initialize`), now ms, ttl ms. Returns 0 (no record) or 1.
const BIND_LUA: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then
  if ARGV[2] == '' then return 0 end
  redis.call('HSET', KEYS[1], 'created', ARGV[3], 'last_seen', ARGV[3], 'node', ARGV[2], 'ix', ARGV[3])
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
end
if ARGV[1] ~= '' then redis.call('HSET', KEYS[1], 'owner', ARGV[1]) end
return 1";

/// Deletes a session (record and log), only the caller's when ARGV[1] is '1'. KEYS: record,
/// log. ARGV: check, caller's owner. Returns {0} (no such session), {2} (another owner's,
/// kept) or {1, owner}.
const DELETE_LUA: &str = r"
local owner = redis.call('HGET', KEYS[1], 'owner')
if not owner then
  if redis.call('EXISTS', KEYS[1]) == 0 then
    redis.call('DEL', KEYS[2])
    return {0}
  end
  owner = ''
end
if ARGV[1] == '1' and owner ~= ARGV[2] then return {2} end
redis.call('DEL', KEYS[1], KEYS[2])
return {1, owner}";

/// One field operation on a live record. KEYS: record. ARGV: op, field, value. Returns {0}
/// (no such session) or {1, result}; 'sub' answers {1, 0} at the limit.
const FIELD_LUA: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return {0} end
local op = ARGV[1]
if op == 'get' then return {1, redis.call('HGET', KEYS[1], ARGV[2])}
elseif op == 'set' then redis.call('HSET', KEYS[1], ARGV[2], ARGV[3]) return {1, 1}
elseif op == 'del' then return {1, redis.call('HDEL', KEYS[1], ARGV[2])}
elseif op == 'incr' then return {1, redis.call('HINCRBY', KEYS[1], ARGV[2], ARGV[3])}
elseif op == 'sub' then
  if redis.call('HEXISTS', KEYS[1], ARGV[2]) == 1 then return {1, 1} end
  if tonumber(redis.call('HGET', KEYS[1], 'nsub') or '0') >= tonumber(ARGV[3]) then return {1, 0} end
  redis.call('HSET', KEYS[1], ARGV[2], '1')
  redis.call('HINCRBY', KEYS[1], 'nsub', 1)
  return {1, 1}
elseif op == 'unsub' then
  if redis.call('HDEL', KEYS[1], ARGV[2]) == 1 then redis.call('HINCRBY', KEYS[1], 'nsub', -1) end
  return {1, 1}
end
return redis.error_reply('unknown field op ' .. op)";

/// Appends an event to a live session's log, trims the log to ARGV[3] entries and ARGV[4]
/// payload bytes (oldest first; the newest entry always stays), gives it the record's TTL
/// and, with a channel, publishes `<event id> <payload>` on it. KEYS: record, log. ARGV:
/// stream, payload, max entries, max bytes, channel (''), ttl ms. Returns the event id, or
/// false (no such session: nothing written).
const APPEND_LUA: &str = r"
local pttl = redis.call('PTTL', KEYS[1])
if pttl == -2 then return false end
if pttl < 0 then
  pttl = tonumber(ARGV[6])
  redis.call('PEXPIRE', KEYS[1], pttl)
end
local id = redis.call('XADD', KEYS[2], '*', 's', ARGV[1], 'd', ARGV[2])
local bytes = redis.call('HINCRBY', KEYS[1], 'eb', string.len(ARGV[2]))
local len = redis.call('XLEN', KEYS[2])
local maxlen = tonumber(ARGV[3])
local maxbytes = tonumber(ARGV[4])
while len > 1 and (len > maxlen or bytes > maxbytes) do
  local first = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)[1]
  local f = first[2]
  for i = 1, #f, 2 do
    if f[i] == 'd' then bytes = bytes - string.len(f[i + 1]) end
  end
  redis.call('XDEL', KEYS[2], first[1])
  len = len - 1
end
redis.call('HSET', KEYS[1], 'eb', bytes)
redis.call('PEXPIRE', KEYS[2], pttl)
if ARGV[5] ~= '' then redis.call('PUBLISH', ARGV[5], id .. ' ' .. ARGV[2]) end
return id";

struct Scripts {
    touch: ::redis::Script,
    create: ::redis::Script,
    owner: ::redis::Script,
    bind: ::redis::Script,
    delete: ::redis::Script,
    field: ::redis::Script,
    append: ::redis::Script,
    task: ::redis::Script,
}

/// The store on Redis.
pub struct RedisEngine {
    settings: Settings,
    conn: Arc<OnceCell<Conn>>,
    timeout: Duration,
    scripts: Scripts,
}

impl RedisEngine {
    /// Starts connecting in the background (retrying until Redis answers).
    pub fn new(settings: Settings, link: Arc<Link>, timeout: Duration) -> Self {
        let conn = Arc::new(OnceCell::new());
        tokio::spawn(connect_forever(link, conn.clone()));
        Self {
            settings,
            conn,
            timeout,
            scripts: Scripts {
                touch: ::redis::Script::new(TOUCH_LUA),
                create: ::redis::Script::new(CREATE_LUA),
                owner: ::redis::Script::new(OWNER_LUA),
                bind: ::redis::Script::new(BIND_LUA),
                delete: ::redis::Script::new(DELETE_LUA),
                field: ::redis::Script::new(FIELD_LUA),
                append: ::redis::Script::new(APPEND_LUA),
                task: ::redis::Script::new(task::TASK_LUA),
            },
        }
    }

    fn conn(&self) -> StoreResult<Conn> {
        self.conn.get().cloned().ok_or_else(|| {
            note_failure();
            StoreError::Unavailable("not connected to redis yet".into())
        })
    }

    /// One round trip, `op` naming it in metrics and traces, bounded by the Redis timeout.
    async fn timed<T>(
        &self,
        op: &'static str,
        f: impl Future<Output = ::redis::RedisResult<T>>,
    ) -> StoreResult<T> {
        let span = crate::trace::child(
            None,
            format!("redis {op}"),
            vec![
                opentelemetry::KeyValue::new("db.system.name", "redis"),
                opentelemetry::KeyValue::new("db.operation.name", op),
            ],
        );
        let started = std::time::Instant::now();
        let result = match tokio::time::timeout(self.timeout, f).await {
            Ok(r) => r.map_err(StoreError::from),
            Err(_) => Err(StoreError::Unavailable(format!(
                "redis did not answer within {} ms",
                self.timeout.as_millis()
            ))),
        };
        let m = crate::metrics::metrics();
        m.store_duration
            .with_label_values(&[op])
            .observe(started.elapsed().as_secs_f64());
        if let Err(e) = &result {
            note_failure();
            m.store_errors.with_label_values(&[op]).inc();
            crate::trace::end(span, Some(&e.to_string()));
        } else {
            crate::trace::end(span, None);
        }
        result
    }

    fn record_key(&self, id: &str) -> String {
        format!("{}{{{id}}}:s", self.settings.prefix)
    }

    fn log_key(&self, id: &str) -> String {
        format!("{}{{{id}}}:e", self.settings.prefix)
    }

    fn task_key(&self, id: &str) -> String {
        format!("{}{{{id}}}:t", self.settings.prefix)
    }

    /// One principal's task set; owners are hex hashes, the anonymous callers share one.
    fn task_owner_key(&self, owner: &str) -> String {
        let owner = if owner.is_empty() { "anonymous" } else { owner };
        format!("{}tasks:{{{owner}}}", self.settings.prefix)
    }

    fn index_key(&self) -> String {
        format!("{}sessions", self.settings.prefix)
    }

    fn owner_key(&self, owner: &str) -> String {
        format!("{}owner:{{{owner}}}", self.settings.prefix)
    }

    /// The Redis channel of a bus topic.
    pub fn channel(prefix: &str, topic: &str) -> String {
        format!("{prefix}bus:{topic}")
    }

    /// How long an index entry is kept without a refresh (TTL plus one refresh period).
    fn index_life_ms(&self) -> u64 {
        self.settings.ttl_ms() + self.settings.index_every_ms()
    }

    /// Refreshes `id` in the sessions index (pruning entries that outlived their session)
    /// and, with an owner, in the owner's set. Separate commands: the index lives in its own
    /// slot. The future owns what it needs, so the touch can run it off the request path.
    fn reindex(
        &self,
        id: &str,
        owner: &str,
    ) -> impl Future<Output = StoreResult<()>> + Send + 'static {
        let conn = self.conn.get().cloned();
        let timeout = self.timeout;
        let now = now_ms();
        let life = self.index_life_ms();
        let index = self.index_key();
        let mut pipe = ::redis::pipe();
        pipe.zrembyscore(&index, "-inf", now.saturating_sub(life))
            .ignore()
            .zadd(&index, id, now)
            .ignore()
            .pexpire(&index, life as i64)
            .ignore();
        let owner_pipe = (!owner.is_empty()).then(|| {
            let key = self.owner_key(owner);
            let mut p = ::redis::pipe();
            p.zadd(&key, id, now + life)
                .ignore()
                .pexpire(&key, life as i64)
                .ignore();
            p
        });
        async move {
            let Some(mut c) = conn else {
                return Err(StoreError::Unavailable("not connected to redis yet".into()));
            };
            let mut c2 = c.clone();
            let run = |r: Result<::redis::RedisResult<()>, tokio::time::error::Elapsed>| match r {
                Ok(r) => r.map_err(StoreError::from),
                Err(_) => Err(StoreError::Unavailable(
                    "redis did not answer in time".into(),
                )),
            };
            let (a, b) = tokio::join!(
                tokio::time::timeout(timeout, pipe.query_async::<()>(&mut c)),
                async {
                    match &owner_pipe {
                        Some(p) => {
                            tokio::time::timeout(timeout, p.query_async::<()>(&mut c2)).await
                        }
                        None => Ok(Ok(())),
                    }
                }
            );
            run(a).and(run(b))
        }
    }

    /// How long until the session whose owner-set score is `score` expires (scores carry
    /// one refresh period of margin, see [`Self::index_life_ms`]).
    fn until_expiry(&self, score: u64, now: u64) -> Duration {
        Duration::from_millis(
            score
                .saturating_sub(self.settings.index_every_ms())
                .saturating_sub(now),
        )
    }

    /// Removes `id` from the shared indexes after its session ended.
    async fn unindex(&self, id: &str, owner: &str) {
        let Ok(mut c) = self.conn() else { return };
        let mut c2 = c.clone();
        let index = self.index_key();
        let owner_key = self.owner_key(owner);
        let (a, b) = tokio::join!(
            self.timed("unindex", c.zrem::<_, _, ()>(&index, id)),
            async {
                if owner.is_empty() {
                    Ok(())
                } else {
                    self.timed("unindex", c2.zrem::<_, _, ()>(&owner_key, id))
                        .await
                }
            }
        );
        if let Err(e) = a.and(b) {
            tracing::debug!(error = %e, "index entry left to be pruned");
        }
    }
}

/// Reads an integer out of a script reply.
fn int(v: Option<&Value>) -> i64 {
    match v {
        Some(Value::Int(n)) => *n,
        Some(Value::BulkString(b)) => std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_default(),
        _ => 0,
    }
}

/// Reads text out of a script reply (`None` for nil / false / empty).
fn text(v: Option<&Value>) -> Option<String> {
    match v {
        Some(Value::BulkString(b)) if !b.is_empty() => String::from_utf8(b.clone()).ok(),
        Some(Value::SimpleString(s)) if !s.is_empty() => Some(s.clone()),
        _ => None,
    }
}

fn access(n: i64) -> Access {
    match n {
        1 => Access::Granted,
        2 => Access::OtherOwner,
        _ => Access::NotFound,
    }
}

#[async_trait::async_trait]
impl Engine for RedisEngine {
    fn is_shared(&self) -> bool {
        true
    }

    async fn ping(&self) -> StoreResult<()> {
        let mut c = self.conn()?;
        let _: String = self
            .timed("ping", ::redis::cmd("PING").query_async(&mut c))
            .await?;
        Ok(())
    }

    async fn create(
        &self,
        id: &str,
        fields: &[(&str, String)],
        must_exist: bool,
    ) -> StoreResult<bool> {
        let mut c = self.conn()?;
        let mut inv = self.scripts.create.prepare_invoke();
        inv.key(self.record_key(id))
            .arg(self.settings.ttl_ms())
            .arg(if must_exist { "1" } else { "" });
        for (k, v) in fields {
            inv.arg(*k).arg(v);
        }
        if !must_exist {
            inv.arg("ix").arg(now_ms());
        }
        let written: i64 = self.timed("create", inv.invoke_async(&mut c)).await?;
        if written == 1 && !must_exist {
            self.reindex(id, "").await?;
        }
        Ok(written == 1)
    }

    async fn touch(&self, id: &str, owner: &str, want_init: bool) -> StoreResult<Touch> {
        let mut c = self.conn()?;
        let mut inv = self.scripts.touch.prepare_invoke();
        inv.key(self.record_key(id))
            .key(self.log_key(id))
            .arg(self.settings.ttl_ms())
            .arg(now_ms())
            .arg(owner)
            .arg(if want_init { "1" } else { "" })
            .arg(self.settings.index_every_ms());
        let reply: Vec<Value> = self.timed("touch", inv.invoke_async(&mut c)).await?;
        let access = access(int(reply.first()));
        if access == Access::Granted && int(reply.get(1)) == 1 {
            // Off the request path; a refresh that fails is retried a quarter TTL later, and
            // index entries only feed /sessions, activeSessions and the session limit.
            let refresh = self.reindex(id, owner);
            tokio::spawn(async move {
                if let Err(e) = refresh.await {
                    tracing::debug!(error = %e, "index refresh failed");
                }
            });
        }
        Ok(Touch {
            access,
            init: text(reply.get(2)),
        })
    }

    async fn admit(&self, owner: &str, limit: u64) -> StoreResult<Admission> {
        let mut c = self.conn()?;
        let now = now_ms();
        let key = self.owner_key(owner);
        let mut pipe = ::redis::pipe();
        pipe.atomic()
            .zrembyscore(&key, "-inf", now)
            .ignore()
            .zcard(&key)
            .zrange_withscores(&key, 0, 0);
        let (count, oldest): (u64, Vec<(String, f64)>) =
            self.timed("admit", pipe.query_async(&mut c)).await?;
        Ok(if count >= limit {
            let score = oldest.first().map_or(now, |(_, score)| *score as u64);
            Admission::Full {
                retry_after: self.until_expiry(score, now),
            }
        } else {
            Admission::Admitted
        })
    }

    async fn claim(&self, id: &str, owner: &str, limit: u64, open: bool) -> StoreResult<Admission> {
        let mut c = self.conn()?;
        let now = now_ms();
        let life = self.index_life_ms();
        if !owner.is_empty() {
            let mut inv = self.scripts.owner.prepare_invoke();
            inv.key(self.owner_key(owner))
                .arg(now)
                .arg(limit)
                .arg(id)
                .arg(now + life)
                .arg(life);
            let reply: Vec<i64> = self.timed("claim", inv.invoke_async(&mut c)).await?;
            if let [2, score] = reply.as_slice() {
                return Ok(Admission::Full {
                    retry_after: self.until_expiry(u64::try_from(*score).unwrap_or(now), now),
                });
            }
        }
        let mut inv = self.scripts.bind.prepare_invoke();
        inv.key(self.record_key(id))
            .arg(owner)
            .arg(if open {
                self.settings.node_id.as_str()
            } else {
                ""
            })
            .arg(now)
            .arg(self.settings.ttl_ms());
        let bound: i64 = self.timed("bind", inv.invoke_async(&mut c)).await?;
        if bound == 0 {
            self.unindex(id, owner).await;
            return Ok(Admission::Missing);
        }
        if open {
            self.reindex(id, "").await?;
        }
        Ok(Admission::Admitted)
    }

    async fn delete(&self, id: &str, caller: Option<&str>) -> StoreResult<Access> {
        let mut c = self.conn()?;
        let mut inv = self.scripts.delete.prepare_invoke();
        inv.key(self.record_key(id))
            .key(self.log_key(id))
            .arg(if caller.is_some() { "1" } else { "" })
            .arg(caller.unwrap_or_default());
        let reply: Vec<Value> = self.timed("delete", inv.invoke_async(&mut c)).await?;
        let access = access(int(reply.first()));
        match access {
            Access::Granted => {
                let owner = text(reply.get(1)).unwrap_or_default();
                self.unindex(id, &owner).await;
            }
            Access::NotFound => self.unindex(id, "").await,
            Access::OtherOwner => {}
        }
        Ok(access)
    }

    async fn field(&self, id: &str, op: FieldOp<'_>) -> StoreResult<FieldReply> {
        let mut c = self.conn()?;
        let mut inv = self.scripts.field.prepare_invoke();
        inv.key(self.record_key(id));
        match op {
            FieldOp::Get(f) => inv.arg("get").arg(f),
            FieldOp::Set(f, v) => inv.arg("set").arg(f).arg(v),
            FieldOp::Del(f) => inv.arg("del").arg(f),
            FieldOp::Incr(f, by) => inv.arg("incr").arg(f).arg(by),
            FieldOp::Subscribe(f, max) => inv.arg("sub").arg(f).arg(max),
            FieldOp::Unsubscribe(f) => inv.arg("unsub").arg(f),
        };
        let reply: Vec<Value> = self.timed("field", inv.invoke_async(&mut c)).await?;
        if int(reply.first()) != 1 {
            return Ok(FieldReply::Gone);
        }
        Ok(match op {
            FieldOp::Get(_) => FieldReply::Value(text(reply.get(1))),
            FieldOp::Incr(..) => FieldReply::Int(int(reply.get(1))),
            FieldOp::Subscribe(..) if int(reply.get(1)) == 0 => FieldReply::Full,
            _ => FieldReply::Done,
        })
    }

    async fn record(&self, id: &str) -> StoreResult<HashMap<String, String>> {
        let mut c = self.conn()?;
        self.timed("record", c.hgetall(self.record_key(id))).await
    }

    async fn list(&self, limit: usize) -> StoreResult<Vec<(String, HashMap<String, String>)>> {
        let mut c = self.conn()?;
        let index = self.index_key();
        let min = now_ms().saturating_sub(self.index_life_ms());
        let ids: Vec<String> = self
            .timed(
                "list",
                c.zrevrangebyscore_limit(&index, "+inf", min, 0, limit as isize),
            )
            .await?;
        // One command per record, sent together: on a cluster they go to different nodes.
        let records = futures::future::join_all(ids.iter().map(|id| {
            let mut c = c.clone();
            let key = self.record_key(id);
            async move {
                self.timed("list", c.hgetall::<_, HashMap<String, String>>(key))
                    .await
            }
        }))
        .await;
        let mut out = Vec::with_capacity(ids.len());
        for (id, rec) in ids.into_iter().zip(records) {
            let rec = rec?;
            if rec.is_empty() {
                self.unindex(&id, "").await;
            } else {
                out.push((id, rec));
            }
        }
        Ok(out)
    }

    async fn count(&self) -> StoreResult<u64> {
        let mut c = self.conn()?;
        let min = now_ms().saturating_sub(self.index_life_ms());
        self.timed("count", c.zcount(self.index_key(), min, "+inf"))
            .await
    }

    async fn append(
        &self,
        session: &str,
        stream: &str,
        payload: &str,
        publish: bool,
    ) -> StoreResult<Option<String>> {
        let mut c = self.conn()?;
        let mut inv = self.scripts.append.prepare_invoke();
        inv.key(self.record_key(session))
            .key(self.log_key(session))
            .arg(stream)
            .arg(payload)
            .arg(self.settings.event_log_max_len)
            .arg(self.settings.event_log_max_bytes)
            .arg(if publish {
                Self::channel(&self.settings.prefix, &format!("ev:{session}"))
            } else {
                String::new()
            })
            .arg(self.settings.ttl_ms());
        self.timed("append", inv.invoke_async(&mut c)).await
    }

    async fn events_after(
        &self,
        session: &str,
        stream: &str,
        after: Option<&str>,
    ) -> StoreResult<Vec<StoredEvent>> {
        let mut c = self.conn()?;
        let start = after.map_or_else(|| "-".to_owned(), |a| format!("({a}"));
        let rows: Vec<(String, Vec<String>)> = self
            .timed(
                "events_after",
                ::redis::cmd("XRANGE")
                    .arg(self.log_key(session))
                    .arg(start)
                    .arg("+")
                    .query_async(&mut c),
            )
            .await?;
        Ok(rows
            .into_iter()
            .filter_map(|(id, kv)| {
                let mut s = None;
                let mut d = None;
                for pair in kv.chunks(2) {
                    match pair {
                        [k, v] if k == "s" => s = Some(v.clone()),
                        [k, v] if k == "d" => d = Some(v.clone()),
                        _ => {}
                    }
                }
                (s.as_deref() == Some(stream)).then_some((id, d?))
            })
            .collect())
    }

    async fn log_tail(&self, session: &str) -> StoreResult<Option<String>> {
        let mut c = self.conn()?;
        let rows: Vec<(String, Vec<String>)> = self
            .timed(
                "log_tail",
                ::redis::cmd("XREVRANGE")
                    .arg(self.log_key(session))
                    .arg("+")
                    .arg("-")
                    .arg("COUNT")
                    .arg(1)
                    .query_async(&mut c),
            )
            .await?;
        Ok(rows.into_iter().next().map(|(id, _)| id))
    }

    async fn publish(&self, topic: &str, payload: &str) -> StoreResult<()> {
        let mut c = self.conn()?;
        self.timed(
            "publish",
            c.publish::<_, _, ()>(Self::channel(&self.settings.prefix, topic), payload),
        )
        .await
    }

    async fn task(&self, id: &str, op: TaskOp<'_>) -> StoreResult<TaskReply> {
        let mut c = self.conn()?;
        let mut inv = self.scripts.task.prepare_invoke();
        inv.key(self.task_key(id));
        for a in task::lua_args(&op) {
            inv.arg(a);
        }
        let reply: Vec<Value> = self.timed("task", inv.invoke_async(&mut c)).await?;
        Ok(match int(reply.first()) {
            1 => match op {
                TaskOp::Client {
                    act: task::ClientAct::Read,
                    ..
                } => TaskReply::Record(pairs(reply.get(1))),
                TaskOp::Create { .. } | TaskOp::Client { .. } => {
                    TaskReply::Applied(int(reply.get(1)).max(0) as u64)
                }
                TaskOp::Runner { .. } => TaskReply::Runner {
                    cancel: int(reply.get(1)) == 1,
                    waiting: int(reply.get(2)).max(0) as u64,
                    answers: pairs(reply.get(3)).into_iter().collect(),
                },
            },
            2 => TaskReply::Foreign,
            3 => TaskReply::Fenced,
            4 => TaskReply::Full,
            _ => TaskReply::Gone,
        })
    }

    async fn release_task(&self, owner: &str, id: &str) -> StoreResult<()> {
        let mut c = self.conn()?;
        self.timed(
            "release_task",
            c.zrem::<_, _, ()>(self.task_owner_key(owner), id),
        )
        .await
    }

    async fn admit_task(
        &self,
        owner: &str,
        id: &str,
        expires: u64,
        limit: u64,
    ) -> StoreResult<Admission> {
        let mut c = self.conn()?;
        let now = now_ms();
        let mut inv = self.scripts.owner.prepare_invoke();
        inv.key(self.task_owner_key(owner))
            .arg(now)
            .arg(limit)
            .arg(id)
            .arg(expires)
            .arg(expires.saturating_sub(now).max(1));
        let reply: Vec<i64> = self.timed("admit_task", inv.invoke_async(&mut c)).await?;
        Ok(match reply.as_slice() {
            [2, oldest, ..] => Admission::Full {
                retry_after: Duration::from_millis((*oldest as u64).saturating_sub(now)),
            },
            _ => Admission::Admitted,
        })
    }
}

/// Reads a flat list of field, value pairs out of a script reply.
fn pairs(v: Option<&Value>) -> HashMap<String, String> {
    let Some(Value::Array(items)) = v else {
        return HashMap::new();
    };
    items
        .chunks(2)
        .filter_map(|kv| match kv {
            [k, v] => Some((text(Some(k))?, text(Some(v)).unwrap_or_default())),
            _ => None,
        })
        .collect()
}

/// Connects the command connection, retrying with backoff until Redis answers. Once made,
/// the connection reconnects by itself (and follows a Sentinel or Cluster failover).
async fn connect_forever(link: Arc<Link>, cell: Arc<OnceCell<Conn>>) {
    let mut delay = Duration::from_millis(100);
    loop {
        match link.connect().await {
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
