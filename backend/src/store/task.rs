//! Task records of the tasks extension (SEP-2663), on either engine with the same rules.
//!
//! A task is its own entity, not part of a session (2026-07-28 requests have none): one hash
//! `<p>{<task id>}:t` that expires `ttl` after its creation and is never slid or recreated.
//! Every operation is one atomic step on that one key (one Cluster slot): the Lua script
//! [`TASK_LUA`] on Redis, [`apply`] in memory. Both are written from the same table:
//!
//! - client operations (`read`, `update`, `cancel`) name the caller's owner hash and answer
//!   [`TaskReply::Foreign`] for another principal's task without touching it. A task still
//!   `working` whose `lease` has passed (the replica running it died) is first made `failed`
//!   with [`lost_error`], in the same step, so nobody ever sees it stuck;
//! - `update` moves each answered `in:<key>` to `re:<key>` before it returns (the next read,
//!   through any replica, no longer lists it); unknown or answered keys are ignored;
//! - `cancel` sets `cancel` and drops the pending inputs; the runner notices (bus or renewal)
//!   and settles the task;
//! - runner operations (`ask`, `take`, `renew`, `finish`) name the runner (`<node>/<random>`)
//!   and answer [`TaskReply::Fenced`] unless the task is still `working` and theirs: a replica
//!   that lost its lease, or whose task expired, can no longer write.
//!
//! Fields: `owner` ('' anonymous), `tool`, `created`, `updated` (ms), `ttl`, `poll` (ms),
//! `status` (`working`, `completed`, `failed`, `cancelled`; `input_required` is `working` with
//! `nin` > 0), `msg`, `runner`, `lease` (ms deadline), `cancel`, `nin`/`in:<key>` (pending
//! input requests), `nre`/`re:<key>` (answers not yet taken), `result` or `error` (JSON).
//!
//! Leases are set and compared on one clock, the store's (Redis `TIME`; the memory engine is
//! one process), so clock skew between replicas neither fails healthy tasks nor delays the
//! report of a dead one. Only the displayed times (`created`, `updated`) come from the
//! replica.

use std::collections::HashMap;

use serde_json::json;

use super::{Admission, Store, StoreResult};

/// The message of a task whose replica stopped renewing its lease.
pub const LOST_MESSAGE: &str =
    "the replica running this task stopped before it finished (its lease ran out)";

/// The JSON-RPC error of a task whose replica stopped renewing its lease.
pub fn lost_error() -> String {
    json!({"code": -32603, "message": LOST_MESSAGE}).to_string()
}

/// What a client asks of a task.
#[derive(Debug, Clone, Copy)]
pub enum ClientAct<'a> {
    Read,
    /// Answers: (input key, response JSON).
    Update(&'a [(String, String)]),
    Cancel,
}

/// What the replica running a task does with it.
#[derive(Debug, Clone, Copy)]
pub enum RunnerAct<'a> {
    /// Adds pending input requests (key, request JSON), within `max` pending; refused
    /// (`cancel: true`) once a cancel was asked.
    Ask {
        max: u64,
        requests: &'a [(String, String)],
    },
    /// Takes (and removes) the answers given so far.
    Take,
    /// Moves the lease to `lease_ms` from now (the store's clock) and, with `msg`, sets the
    /// status message.
    Renew { lease_ms: u64, msg: Option<&'a str> },
    /// Ends the task: `status` with `field` (`result`, `error` or '') set to `payload`.
    Finish {
        status: &'a str,
        field: &'a str,
        payload: &'a str,
        msg: &'a str,
    },
}

/// One atomic operation on a task record.
#[derive(Debug, Clone, Copy)]
pub enum TaskOp<'a> {
    /// Writes a new record, alive `ttl_ms`, its lease `lease_ms` from now (the store's clock).
    Create {
        fields: &'a [(&'a str, String)],
        now: u64,
        ttl_ms: u64,
        lease_ms: u64,
    },
    Client {
        owner: &'a str,
        now: u64,
        act: ClientAct<'a>,
    },
    Runner {
        runner: &'a str,
        now: u64,
        act: RunnerAct<'a>,
    },
}

/// What a [`TaskOp`] answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskReply {
    /// No such task: unknown or expired.
    Gone,
    /// Another principal's task (untouched).
    Foreign,
    /// Runner operations: the task is no longer this runner's to write (or has ended).
    Fenced,
    /// `ask` beyond its `max` pending requests.
    Full,
    /// `read`: the whole record.
    Record(HashMap<String, String>),
    /// `create` (1), `update` (answers delivered), `cancel` (1: cancel asked; 0: the task
    /// had already ended).
    Applied(u64),
    /// Runner operations: whether a cancel was asked, how many answers wait, and the answers
    /// `take` took.
    Runner {
        cancel: bool,
        waiting: u64,
        answers: Vec<(String, String)>,
    },
}

/// [`TaskOp`] on Redis. KEYS: the record. ARGV: op, now ms (the replica's, for display),
/// then per op: `create` ttl ms, lease ms and field, value pairs; `read`/`update`/`cancel`
/// owner, lost error, lost message and (update) key, answer pairs; `ask` runner, max, key,
/// request pairs; `take` runner; `renew` runner, lease ms, '1' with a message, message;
/// `finish` runner, status, field, payload, message. Leases use the server's `TIME`. Returns
/// {0} gone, {2} foreign, {3} fenced, {4} full, {1, ...} done.
pub const TASK_LUA: &str = r"
local k = KEYS[1]
local op = ARGV[1]
local now = ARGV[2]
local function clock()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
if op == 'create' then
  redis.call('HSET', k, unpack(ARGV, 5))
  redis.call('HSET', k, 'lease', clock() + tonumber(ARGV[4]))
  redis.call('PEXPIRE', k, ARGV[3])
  return {1, 1}
end
if redis.call('EXISTS', k) == 0 then return {0} end
local status = redis.call('HGET', k, 'status')
local function clear()
  for _, f in ipairs(redis.call('HKEYS', k)) do
    local p = string.sub(f, 1, 3)
    if p == 'in:' or p == 're:' then redis.call('HDEL', k, f) end
  end
  redis.call('HSET', k, 'nin', '0', 'nre', '0')
end
if op == 'read' or op == 'update' or op == 'cancel' then
  if (redis.call('HGET', k, 'owner') or '') ~= ARGV[3] then return {2} end
  if status == 'working' and tonumber(redis.call('HGET', k, 'lease') or '0') <= clock() then
    clear()
    redis.call('HSET', k, 'status', 'failed', 'error', ARGV[4], 'msg', ARGV[5], 'updated', now)
    redis.call('HDEL', k, 'lease')
    status = 'failed'
  end
  if op == 'read' then return {1, redis.call('HGETALL', k)} end
  if status ~= 'working' then return {1, 0} end
  if op == 'cancel' then
    clear()
    redis.call('HSET', k, 'cancel', '1', 'updated', now)
    return {1, 1}
  end
  local n = 0
  for i = 6, #ARGV, 2 do
    if redis.call('HDEL', k, 'in:' .. ARGV[i]) == 1 then
      redis.call('HSET', k, 're:' .. ARGV[i], ARGV[i + 1])
      n = n + 1
    end
  end
  if n > 0 then
    redis.call('HINCRBY', k, 'nin', -n)
    redis.call('HINCRBY', k, 'nre', n)
    redis.call('HSET', k, 'updated', now)
  end
  return {1, n}
end
if status ~= 'working' or redis.call('HGET', k, 'runner') ~= ARGV[3] then return {3} end
local cancel = 0
if redis.call('HGET', k, 'cancel') == '1' then cancel = 1 end
if op == 'ask' then
  if cancel == 1 then return {1, 1, 0} end
  local n = 0
  for i = 5, #ARGV, 2 do
    if redis.call('HEXISTS', k, 'in:' .. ARGV[i]) == 0 then n = n + 1 end
  end
  if tonumber(redis.call('HGET', k, 'nin') or '0') + n > tonumber(ARGV[4]) then return {4} end
  for i = 5, #ARGV, 2 do redis.call('HSET', k, 'in:' .. ARGV[i], ARGV[i + 1]) end
  redis.call('HINCRBY', k, 'nin', n)
  redis.call('HSET', k, 'updated', now)
  return {1, 0, 0}
elseif op == 'take' then
  local out = {}
  for _, f in ipairs(redis.call('HKEYS', k)) do
    if string.sub(f, 1, 3) == 're:' then
      table.insert(out, string.sub(f, 4))
      table.insert(out, redis.call('HGET', k, f))
      redis.call('HDEL', k, f)
    end
  end
  redis.call('HSET', k, 'nre', '0')
  return {1, cancel, 0, out}
elseif op == 'renew' then
  redis.call('HSET', k, 'lease', clock() + tonumber(ARGV[4]))
  if ARGV[5] == '1' then redis.call('HSET', k, 'msg', ARGV[6], 'updated', now) end
  return {1, cancel, tonumber(redis.call('HGET', k, 'nre') or '0')}
elseif op == 'finish' then
  clear()
  redis.call('HSET', k, 'status', ARGV[4], 'updated', now)
  if ARGV[5] ~= '' then redis.call('HSET', k, ARGV[5], ARGV[6]) end
  if ARGV[7] ~= '' then redis.call('HSET', k, 'msg', ARGV[7]) end
  redis.call('HDEL', k, 'lease')
  return {1, 0, 0}
end
return redis.error_reply('unknown task op ' .. op)";

/// The ARGV of `op` for [`TASK_LUA`] (after KEYS).
pub fn lua_args(op: &TaskOp<'_>) -> Vec<String> {
    let mut a = Vec::new();
    match *op {
        TaskOp::Create {
            fields,
            now,
            ttl_ms,
            lease_ms,
        } => {
            a.extend([
                "create".into(),
                now.to_string(),
                ttl_ms.to_string(),
                lease_ms.to_string(),
            ]);
            for (f, v) in fields {
                a.extend([(*f).to_owned(), v.clone()]);
            }
        }
        TaskOp::Client { owner, now, act } => {
            let name = match act {
                ClientAct::Read => "read",
                ClientAct::Update(_) => "update",
                ClientAct::Cancel => "cancel",
            };
            a.extend([
                name.into(),
                now.to_string(),
                owner.into(),
                lost_error(),
                LOST_MESSAGE.into(),
            ]);
            if let ClientAct::Update(answers) = act {
                for (k, v) in answers {
                    a.extend([k.clone(), v.clone()]);
                }
            }
        }
        TaskOp::Runner { runner, now, act } => {
            let now = now.to_string();
            match act {
                RunnerAct::Ask { max, requests } => {
                    a.extend(["ask".into(), now, runner.into(), max.to_string()]);
                    for (k, v) in requests {
                        a.extend([k.clone(), v.clone()]);
                    }
                }
                RunnerAct::Take => a.extend(["take".into(), now, runner.into()]),
                RunnerAct::Renew { lease_ms, msg } => a.extend([
                    "renew".into(),
                    now,
                    runner.into(),
                    lease_ms.to_string(),
                    if msg.is_some() { "1" } else { "" }.into(),
                    msg.unwrap_or_default().into(),
                ]),
                RunnerAct::Finish {
                    status,
                    field,
                    payload,
                    msg,
                } => a.extend([
                    "finish".into(),
                    now,
                    runner.into(),
                    status.into(),
                    field.into(),
                    payload.into(),
                    msg.into(),
                ]),
            }
        }
    }
    a
}

/// Removes the pending inputs and waiting answers of a record.
fn clear_inputs(r: &mut HashMap<String, String>) {
    r.retain(|f, _| !(f.starts_with("in:") || f.starts_with("re:")));
    r.insert("nin".into(), "0".into());
    r.insert("nre".into(), "0".into());
}

fn number(r: &HashMap<String, String>, field: &str) -> i64 {
    r.get(field).and_then(|v| v.parse().ok()).unwrap_or(0)
}

fn add(r: &mut HashMap<String, String>, field: &str, by: i64) {
    let v = number(r, field) + by;
    r.insert(field.into(), v.to_string());
}

/// [`TaskOp`] on a record in memory, exactly as [`TASK_LUA`] does it. `record` is the live
/// record (`None`: none); `Create` writes into `fresh`, which the caller stores.
pub fn apply(
    record: Option<&mut HashMap<String, String>>,
    op: &TaskOp<'_>,
    fresh: &mut HashMap<String, String>,
) -> TaskReply {
    if let TaskOp::Create {
        fields,
        now,
        lease_ms,
        ..
    } = op
    {
        fresh.extend(fields.iter().map(|(f, v)| ((*f).to_owned(), v.clone())));
        fresh.insert("lease".into(), (now + lease_ms).to_string());
        return TaskReply::Applied(1);
    }
    let Some(r) = record else {
        return TaskReply::Gone;
    };
    let working = r.get("status").is_some_and(|s| s == "working");
    match *op {
        TaskOp::Create { .. } => TaskReply::Applied(1),
        TaskOp::Client { owner, now, act } => {
            if r.get("owner").map_or("", String::as_str) != owner {
                return TaskReply::Foreign;
            }
            let mut working = working;
            if working && number(r, "lease") <= now as i64 {
                clear_inputs(r);
                r.insert("status".into(), "failed".into());
                r.insert("error".into(), lost_error());
                r.insert("msg".into(), LOST_MESSAGE.into());
                r.insert("updated".into(), now.to_string());
                r.remove("lease");
                working = false;
            }
            match act {
                ClientAct::Read => TaskReply::Record(r.clone()),
                _ if !working => TaskReply::Applied(0),
                ClientAct::Cancel => {
                    clear_inputs(r);
                    r.insert("cancel".into(), "1".into());
                    r.insert("updated".into(), now.to_string());
                    TaskReply::Applied(1)
                }
                ClientAct::Update(answers) => {
                    let mut n = 0;
                    for (k, v) in answers {
                        if r.remove(&format!("in:{k}")).is_some() {
                            r.insert(format!("re:{k}"), v.clone());
                            n += 1;
                        }
                    }
                    if n > 0 {
                        add(r, "nin", -n);
                        add(r, "nre", n);
                        r.insert("updated".into(), now.to_string());
                    }
                    TaskReply::Applied(n as u64)
                }
            }
        }
        TaskOp::Runner { runner, now, act } => {
            if !working || r.get("runner").map(String::as_str) != Some(runner) {
                return TaskReply::Fenced;
            }
            let cancel = r.get("cancel").is_some_and(|c| c == "1");
            let done = |cancel, waiting| TaskReply::Runner {
                cancel,
                waiting,
                answers: Vec::new(),
            };
            match act {
                RunnerAct::Ask { max, requests } => {
                    if cancel {
                        return done(true, 0);
                    }
                    let new = requests
                        .iter()
                        .filter(|(k, _)| !r.contains_key(&format!("in:{k}")))
                        .count() as i64;
                    if number(r, "nin") + new > max as i64 {
                        return TaskReply::Full;
                    }
                    for (k, v) in requests {
                        r.insert(format!("in:{k}"), v.clone());
                    }
                    add(r, "nin", new);
                    r.insert("updated".into(), now.to_string());
                    done(false, 0)
                }
                RunnerAct::Take => {
                    let keys: Vec<String> =
                        r.keys().filter(|f| f.starts_with("re:")).cloned().collect();
                    let mut answers = Vec::new();
                    for f in keys {
                        if let Some(v) = r.remove(&f) {
                            answers.push((f[3..].to_owned(), v));
                        }
                    }
                    r.insert("nre".into(), "0".into());
                    TaskReply::Runner {
                        cancel,
                        waiting: 0,
                        answers,
                    }
                }
                RunnerAct::Renew { lease_ms, msg } => {
                    r.insert("lease".into(), (now + lease_ms).to_string());
                    if let Some(m) = msg {
                        r.insert("msg".into(), m.into());
                        r.insert("updated".into(), now.to_string());
                    }
                    done(cancel, number(r, "nre").max(0) as u64)
                }
                RunnerAct::Finish {
                    status,
                    field,
                    payload,
                    msg,
                } => {
                    clear_inputs(r);
                    r.insert("status".into(), status.into());
                    r.insert("updated".into(), now.to_string());
                    if !field.is_empty() {
                        r.insert(field.into(), payload.into());
                    }
                    if !msg.is_empty() {
                        r.insert("msg".into(), msg.into());
                    }
                    r.remove("lease");
                    done(false, 0)
                }
            }
        }
    }
}

impl Store {
    /// One atomic operation on task `id`.
    pub async fn task(&self, id: &str, op: TaskOp<'_>) -> StoreResult<TaskReply> {
        self.engine.task(id, op).await
    }

    /// Gives back the place [`Store::admit_task`] took for `id`, whose record could not be
    /// written.
    pub async fn release_task(&self, owner: Option<&str>, id: &str) -> StoreResult<()> {
        self.engine
            .release_task(owner.unwrap_or_default(), id)
            .await
    }

    /// Whether principal `owner` (`None`: the anonymous callers, together) may hold one more
    /// live task within `limit` (0: none); on admission `id` is counted until `expires` (ms).
    pub async fn admit_task(
        &self,
        owner: Option<&str>,
        id: &str,
        expires: u64,
        limit: u64,
    ) -> StoreResult<Admission> {
        if limit == 0 {
            return Ok(Admission::Admitted);
        }
        self.engine
            .admit_task(owner.unwrap_or_default(), id, expires, limit)
            .await
    }
}
