//! The store in process memory (one replica, nothing shared), with the same rules as
//! [`super::redis`]: a session's record and event log live and end together, expire after
//! the TTL, and are trimmed by count and bytes. Expired sessions are removed when touched and
//! by a sweep at most once a second, so memory follows the live sessions.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use super::{
    Access, Admission, Engine, FieldOp, FieldReply, Settings, StoreResult, StoredEvent, Touch,
    event_seq, now_ms,
    task::{self, TaskOp, TaskReply},
};
use crate::bus::Bus;

/// How often expired sessions are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

struct Session {
    fields: HashMap<String, String>,
    expires: Instant,
    /// (sequence, stream, payload), oldest first.
    events: VecDeque<(u64, String, String)>,
    event_bytes: u64,
}

impl Session {
    fn new(expires: Instant) -> Self {
        Self {
            fields: HashMap::new(),
            expires,
            events: VecDeque::new(),
            event_bytes: 0,
        }
    }

    fn owner(&self) -> &str {
        self.fields.get("owner").map_or("", String::as_str)
    }
}

/// A task record and when it expires (see [`task`]).
struct TaskRecord {
    fields: HashMap<String, String>,
    expires: Instant,
}

struct State {
    sessions: HashMap<String, Session>,
    tasks: HashMap<String, TaskRecord>,
    next_event: u64,
    last_sweep: Instant,
}

/// The store in memory.
pub struct MemoryEngine {
    settings: Settings,
    bus: Arc<Bus>,
    state: Mutex<State>,
}

impl MemoryEngine {
    pub fn new(settings: Settings, bus: Arc<Bus>) -> Self {
        Self {
            settings,
            bus,
            state: Mutex::new(State {
                sessions: HashMap::new(),
                tasks: HashMap::new(),
                next_event: 0,
                last_sweep: Instant::now(),
            }),
        }
    }

    /// The state, with expired sessions swept if a sweep is due.
    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the maps half-updated in a way that
        // matters more than losing the node, so a poisoned lock is used as is.
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if now.duration_since(s.last_sweep) >= SWEEP_EVERY {
            s.sessions.retain(|_, session| session.expires > now);
            s.tasks.retain(|_, t| t.expires > now);
            s.last_sweep = now;
        }
        s
    }

    /// Number of sessions held, expired ones included until swept (tests).
    pub fn held(&self) -> usize {
        self.state().sessions.len()
    }
}

impl State {
    /// The live session `id`; an expired one is removed.
    fn live(&mut self, id: &str) -> Option<&mut Session> {
        let now = Instant::now();
        if self.sessions.get(id).is_some_and(|s| s.expires <= now) {
            self.sessions.remove(id);
        }
        self.sessions.get_mut(id)
    }

    /// [`Engine::admit`]: `owner`'s live sessions other than `except` against `limit`.
    fn admit(&self, owner: &str, limit: u64, except: Option<&str>) -> Admission {
        if limit == 0 {
            return Admission::Admitted;
        }
        let mine = self
            .sessions
            .iter()
            .filter(|(id, s)| Some(id.as_str()) != except && s.owner() == owner)
            .map(|(_, s)| s.expires);
        admit_by_expiry(mine, limit)
    }
}

/// Whether one more fits beside the entries expiring at `expiries` within `limit`; when not,
/// how long until the oldest live one expires. Expired entries do not count.
fn admit_by_expiry(expiries: impl Iterator<Item = Instant>, limit: u64) -> Admission {
    let now = Instant::now();
    let live: Vec<Instant> = expiries.filter(|e| *e > now).collect();
    if (live.len() as u64) < limit {
        return Admission::Admitted;
    }
    let oldest = live.into_iter().min().unwrap_or(now);
    Admission::Full {
        retry_after: oldest.saturating_duration_since(now),
    }
}

#[async_trait::async_trait]
impl Engine for MemoryEngine {
    fn is_shared(&self) -> bool {
        false
    }

    async fn ping(&self) -> StoreResult<()> {
        Ok(())
    }

    async fn create(
        &self,
        id: &str,
        fields: &[(&str, String)],
        must_exist: bool,
    ) -> StoreResult<bool> {
        let ttl = self.settings.ttl;
        let mut s = self.state();
        let expires = Instant::now() + ttl;
        let session = match s.live(id) {
            Some(session) => session,
            None if must_exist => return Ok(false),
            None => s
                .sessions
                .entry(id.to_owned())
                .or_insert_with(|| Session::new(expires)),
        };
        session
            .fields
            .extend(fields.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
        session.expires = expires;
        Ok(true)
    }

    async fn touch(&self, id: &str, owner: &str, want_init: bool) -> StoreResult<Touch> {
        let ttl = self.settings.ttl;
        let mut s = self.state();
        let Some(session) = s.live(id) else {
            return Ok(Touch {
                access: Access::NotFound,
                init: None,
            });
        };
        if session.owner() != owner {
            return Ok(Touch {
                access: Access::OtherOwner,
                init: None,
            });
        }
        session.expires = Instant::now() + ttl;
        session
            .fields
            .insert("last_seen".into(), now_ms().to_string());
        Ok(Touch {
            access: Access::Granted,
            init: want_init
                .then(|| session.fields.get("init").cloned())
                .flatten(),
        })
    }

    async fn admit(&self, owner: &str, limit: u64) -> StoreResult<Admission> {
        Ok(self.state().admit(owner, limit, None))
    }

    async fn claim(&self, id: &str, owner: &str, limit: u64, open: bool) -> StoreResult<Admission> {
        let ttl = self.settings.ttl;
        let node = self.settings.node_id.clone();
        let mut s = self.state();
        let exists = s.live(id).is_some();
        if !exists && !open {
            return Ok(Admission::Missing);
        }
        if !owner.is_empty() {
            let admission = s.admit(owner, limit, Some(id));
            if admission != Admission::Admitted {
                return Ok(admission);
            }
        }
        let session = s.sessions.entry(id.to_owned()).or_insert_with(|| {
            let mut session = Session::new(Instant::now() + ttl);
            let now = now_ms().to_string();
            session.fields.extend([
                ("created".to_owned(), now.clone()),
                ("last_seen".to_owned(), now),
                ("node".to_owned(), node),
            ]);
            session
        });
        if !owner.is_empty() {
            session.fields.insert("owner".into(), owner.to_owned());
        }
        Ok(Admission::Admitted)
    }

    async fn delete(&self, id: &str, caller: Option<&str>) -> StoreResult<Access> {
        let mut s = self.state();
        let Some(session) = s.live(id) else {
            return Ok(Access::NotFound);
        };
        if caller.is_some_and(|c| c != session.owner()) {
            return Ok(Access::OtherOwner);
        }
        s.sessions.remove(id);
        Ok(Access::Granted)
    }

    async fn field(&self, id: &str, op: FieldOp<'_>) -> StoreResult<FieldReply> {
        let mut s = self.state();
        let Some(session) = s.live(id) else {
            return Ok(FieldReply::Gone);
        };
        let f = &mut session.fields;
        Ok(match op {
            FieldOp::Get(k) => FieldReply::Value(f.get(k).cloned()),
            FieldOp::Set(k, v) => {
                f.insert(k.to_owned(), v.to_owned());
                FieldReply::Done
            }
            FieldOp::Del(k) => {
                f.remove(k);
                FieldReply::Done
            }
            FieldOp::Incr(k, by) => {
                let v = f
                    .get(k)
                    .and_then(|v| v.parse::<i64>().ok())
                    .unwrap_or(0)
                    .saturating_add(by);
                f.insert(k.to_owned(), v.to_string());
                FieldReply::Int(v)
            }
            FieldOp::Subscribe(k, max) => {
                if f.contains_key(k) {
                    return Ok(FieldReply::Done);
                }
                let n: u64 = f.get("nsub").and_then(|v| v.parse().ok()).unwrap_or(0);
                if n >= max {
                    return Ok(FieldReply::Full);
                }
                f.insert(k.to_owned(), "1".into());
                f.insert("nsub".into(), (n + 1).to_string());
                FieldReply::Done
            }
            FieldOp::Unsubscribe(k) => {
                if f.remove(k).is_some() {
                    let n: u64 = f.get("nsub").and_then(|v| v.parse().ok()).unwrap_or(1);
                    f.insert("nsub".into(), n.saturating_sub(1).to_string());
                }
                FieldReply::Done
            }
        })
    }

    async fn record(&self, id: &str) -> StoreResult<HashMap<String, String>> {
        Ok(self
            .state()
            .live(id)
            .map(|s| s.fields.clone())
            .unwrap_or_default())
    }

    async fn list(&self, limit: usize) -> StoreResult<Vec<(String, HashMap<String, String>)>> {
        let now = Instant::now();
        let s = self.state();
        let mut live: Vec<(String, HashMap<String, String>)> = s
            .sessions
            .iter()
            .filter(|(_, session)| session.expires > now)
            .map(|(id, session)| (id.clone(), session.fields.clone()))
            .collect();
        live.sort_by_key(|(_, f)| {
            std::cmp::Reverse(
                f.get("last_seen")
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0),
            )
        });
        live.truncate(limit);
        Ok(live)
    }

    async fn count(&self) -> StoreResult<u64> {
        let now = Instant::now();
        Ok(self
            .state()
            .sessions
            .values()
            .filter(|s| s.expires > now)
            .count() as u64)
    }

    async fn append(
        &self,
        session: &str,
        stream: &str,
        payload: &str,
        publish: bool,
    ) -> StoreResult<Option<String>> {
        let (max_len, max_bytes) = (
            self.settings.event_log_max_len as usize,
            self.settings.event_log_max_bytes,
        );
        let id = {
            let mut s = self.state();
            s.next_event += 1;
            let n = s.next_event;
            let Some(live) = s.live(session) else {
                return Ok(None);
            };
            live.events
                .push_back((n, stream.to_owned(), payload.to_owned()));
            live.event_bytes += payload.len() as u64;
            while live.events.len() > 1
                && (live.events.len() > max_len || live.event_bytes > max_bytes)
            {
                if let Some((_, _, p)) = live.events.pop_front() {
                    live.event_bytes -= p.len() as u64;
                }
            }
            format!("{n}-0")
        };
        if publish {
            self.bus
                .dispatch(&format!("ev:{session}"), format!("{id} {payload}").into());
        }
        Ok(Some(id))
    }

    async fn events_after(
        &self,
        session: &str,
        stream: &str,
        after: Option<&str>,
    ) -> StoreResult<Vec<StoredEvent>> {
        let after = after.and_then(event_seq).unwrap_or((0, 0));
        Ok(self
            .state()
            .live(session)
            .map(|s| {
                s.events
                    .iter()
                    .filter(|(n, st, _)| (*n, 0) > after && st == stream)
                    .map(|(n, _, p)| (format!("{n}-0"), p.clone()))
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn log_tail(&self, session: &str) -> StoreResult<Option<String>> {
        Ok(self
            .state()
            .live(session)
            .and_then(|s| s.events.back().map(|(n, _, _)| format!("{n}-0"))))
    }

    async fn publish(&self, topic: &str, payload: &str) -> StoreResult<()> {
        self.bus.dispatch(topic, payload.into());
        Ok(())
    }

    async fn task(&self, id: &str, op: TaskOp<'_>) -> StoreResult<TaskReply> {
        let mut s = self.state();
        let now = Instant::now();
        if s.tasks.get(id).is_some_and(|t| t.expires <= now) {
            s.tasks.remove(id);
        }
        let mut fresh = HashMap::new();
        let reply = task::apply(s.tasks.get_mut(id).map(|t| &mut t.fields), &op, &mut fresh);
        if let TaskOp::Create { ttl_ms, .. } = op {
            s.tasks.insert(
                id.to_owned(),
                TaskRecord {
                    fields: fresh,
                    expires: now + Duration::from_millis(ttl_ms),
                },
            );
        }
        Ok(reply)
    }

    async fn release_task(&self, _owner: &str, _id: &str) -> StoreResult<()> {
        // The count is the live records themselves: nothing was taken.
        Ok(())
    }

    async fn admit_task(
        &self,
        owner: &str,
        id: &str,
        _expires: u64,
        limit: u64,
    ) -> StoreResult<Admission> {
        // The record written next carries the owner and the expiry: counting live records
        // is the owner set.
        let s = self.state();
        let mine = s
            .tasks
            .iter()
            .filter(|(tid, t)| {
                tid.as_str() != id && t.fields.get("owner").map_or("", String::as_str) == owner
            })
            .map(|(_, t)| t.expires);
        Ok(admit_by_expiry(mine, limit))
    }
}
