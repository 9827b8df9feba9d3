//! The tasks extension (SEP-2663) across replicas.
//!
//! A 2026-07-28 `tools/call` that declares the extension, for a tool that supports tasks,
//! gets a task back at once (`resultType: "task"`); the tool runs here, in the background,
//! while the client polls `tasks/get`, answers input requests with `tasks/update` and stops
//! it with `tasks/cancel`, each of which may land on any replica. rmcp's `TaskManager` keeps
//! tasks in one process; here the record lives in the store (see [`crate::store::task`]) and
//! this module runs the work:
//!
//! - **Strongly created.** The record is written before the client learns the id, so an
//!   immediate `tasks/get` through any replica finds it.
//! - **Lease.** The record names the replica running it (`runner`: node id and a per-process
//!   random part) and a lease deadline, renewed every third of `tasks.lease_seconds`. When
//!   the replica dies, the first read after the deadline fails the task ("the replica running
//!   this task stopped"), so it is never seen `working` forever. A runner that lost its lease
//!   (or whose task expired) is fenced: it can no longer write, and its work is aborted.
//! - **Input and cancel from any replica.** `tasks/update` and `tasks/cancel` change the
//!   record first (read-your-writes through any replica), then wake the runner over the bus
//!   (topic [`TOPIC`]). The bus is only a wake-up: a lost message costs one renewal period,
//!   never an answer or a cancel, since the runner also reads the record at each renewal.
//! - **Bounds.** `tasks.max_running` tasks per replica, `tasks.max_per_principal` live tasks
//!   per principal, [`MAX_PENDING_INPUTS`] input requests per task, status messages of
//!   [`MAX_STATUS_MESSAGE`] bytes, results of `tasks.max_result_bytes`; every record expires
//!   `tasks.ttl_seconds` after its creation.
//! - **Owner.** A task is bound to the principal that created it; another principal's task
//!   answers exactly like an unknown one (-32602).

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    time::{Duration, Instant, UNIX_EPOCH},
};

use rmcp::model::{
    CallToolResponse, CallToolResult, CreateTaskResult, DetailedTask, ErrorCode, ErrorData,
    GetTaskResult, InputRequest, InputRequests, InputResponses, JsonObject, Task, TaskPayload,
    TaskStatus,
};
use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::{
    bus::Bus,
    config::TasksConfig,
    store::{
        Admission, Store, StoreError, now_ms,
        task::{ClientAct, RunnerAct, TaskOp, TaskReply},
    },
};

/// Bus topic of task wake-ups: `<task id> in` (answers wait) and `<task id> cancel`.
pub const TOPIC: &str = "task";
/// Input requests one task may have pending at once.
pub const MAX_PENDING_INPUTS: u64 = 16;
/// Longest status message kept, in bytes.
pub const MAX_STATUS_MESSAGE: usize = 1024;
/// Most answers one `tasks/update` may carry (the body limit bounds their size).
pub const MAX_ANSWERS_PER_UPDATE: usize = 64;
/// Longest input key accepted in `tasks/update`.
const MAX_INPUT_KEY_LEN: usize = 256;
/// How long work may go on after a cancel before it is stopped and the task settled
/// `cancelled` (cancellation is cooperative, but never unbounded).
pub const CANCEL_GRACE: Duration = Duration::from_secs(5);
/// Lease renewals in flight at once.
const RENEWALS_AT_ONCE: usize = 32;

/// Whether a tool can run as a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Support {
    /// A task for clients that declare the extension; inline for the others.
    Optional,
    /// Only as a task: other clients get -32021.
    Required,
}

/// How a task's work ended without a tool result.
#[derive(Debug)]
pub enum TaskExit {
    /// It honoured a cancel: the task ends `cancelled`.
    Cancelled,
    /// A protocol error: the task ends `failed` with it.
    Error(ErrorData),
}

/// The work of one task.
pub type Work = Pin<Box<dyn Future<Output = Result<CallToolResult, TaskExit>> + Send>>;

/// What a task-capable tool does with a call that may become a task.
pub enum Started {
    /// An answer now, no task (e.g. a multi-round-trip question asked before the task).
    Now(CallToolResponse),
    /// Run this as a task.
    Task(Box<dyn FnOnce(TaskCtx) -> Work + Send>),
}

impl Started {
    pub fn task<F, Fut>(f: F) -> Self
    where
        F: FnOnce(TaskCtx) -> Fut + Send + 'static,
        Fut: Future<Output = Result<CallToolResult, TaskExit>> + Send + 'static,
    {
        Started::Task(Box::new(move |ctx| Box::pin(f(ctx))))
    }
}

/// A running task on this replica.
struct Local {
    /// Answers (or a cancel) may be waiting in the record.
    wake: Notify,
    /// A cancel was asked.
    cancel: CancellationToken,
    /// The status message not yet written, and when one was last written.
    msg: Mutex<(Option<String>, Instant)>,
    /// Aborts the work when the task is no longer ours (fenced, expired, shutting down).
    abort: Mutex<Option<tokio::task::AbortHandle>>,
    /// Answers taken from the record that no `request_input` of this task waits for yet.
    answers: Mutex<HashMap<String, Value>>,
}

/// The tasks of one replica, and its view of everybody's.
pub struct Tasks {
    store: Arc<Store>,
    config: TasksConfig,
    /// `<node id>/<random>`: a restarted replica is another runner.
    runner: String,
    local: Mutex<HashMap<String, Arc<Local>>>,
    /// Tasks running or being created here (checked against `tasks.max_running`).
    running: std::sync::atomic::AtomicUsize,
    /// The renewal loop, awaited at shutdown (it fails the tasks still running).
    renewer: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// What a task's work uses to talk to its task.
pub struct TaskCtx {
    id: String,
    tasks: Arc<Tasks>,
    local: Arc<Local>,
}

/// Task ids are minted here: 32 lowercase hex digits. Anything else is unknown without a
/// store round trip (and cannot name another key or Cluster slot).
pub fn valid_task_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn unknown_task(id: &str) -> ErrorData {
    let shown: String = id.chars().take(64).collect();
    ErrorData::invalid_params(
        format!("unknown task: {shown} (never created, expired, or not yours)"),
        Some(json!({"taskId": shown})),
    )
}

/// Counts a task event in `mcp_backend_tasks_total`.
fn count(event: &str) {
    crate::metrics::metrics()
        .tasks
        .with_label_values(&[event])
        .inc();
}

fn unavailable(e: StoreError) -> ErrorData {
    ErrorData::internal_error(format!("task store unavailable: {e}"), None)
}

fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

fn field_u64(r: &HashMap<String, String>, f: &str) -> u64 {
    r.get(f).and_then(|v| v.parse().ok()).unwrap_or(0)
}

fn object(json: Option<&String>) -> JsonObject {
    match json.and_then(|j| serde_json::from_str::<Value>(j).ok()) {
        Some(Value::Object(o)) => o,
        _ => JsonObject::new(),
    }
}

/// Cuts `s` to at most `max` bytes on a character boundary.
fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// The wire view of a task record.
pub fn detailed(id: &str, r: &HashMap<String, String>) -> DetailedTask {
    let status = match r.get("status").map(String::as_str) {
        Some("completed") => TaskStatus::Completed,
        Some("failed") => TaskStatus::Failed,
        Some("cancelled") => TaskStatus::Cancelled,
        _ if field_u64(r, "nin") > 0 => TaskStatus::InputRequired,
        _ => TaskStatus::Working,
    };
    let mut task = Task::new(
        id,
        status,
        rfc3339(field_u64(r, "created")),
        rfc3339(field_u64(r, "updated")),
    )
    .with_ttl_ms(field_u64(r, "ttl"))
    .with_poll_interval_ms(field_u64(r, "poll").max(1));
    if let Some(m) = r.get("msg").filter(|m| !m.is_empty()) {
        task = task.with_status_message(m.clone());
    }
    let payload = match status {
        TaskStatus::InputRequired => TaskPayload::InputRequired {
            input_requests: r
                .iter()
                .filter_map(|(f, v)| {
                    let key = f.strip_prefix("in:")?;
                    let request: InputRequest = serde_json::from_str(v).ok()?;
                    Some((key.to_owned(), request))
                })
                .collect(),
        },
        TaskStatus::Completed => TaskPayload::Completed {
            result: object(r.get("result")),
        },
        TaskStatus::Failed => TaskPayload::Failed {
            error: object(r.get("error")),
        },
        TaskStatus::Cancelled => TaskPayload::Cancelled,
        _ => TaskPayload::Working,
    };
    DetailedTask::new(task, payload)
}

impl Tasks {
    pub fn new(store: Arc<Store>, config: TasksConfig, node_id: &str) -> Arc<Self> {
        let random = uuid::Uuid::new_v4().simple().to_string();
        Arc::new(Self {
            store,
            config,
            runner: format!("{node_id}/{}", &random[..12]),
            local: Mutex::new(HashMap::new()),
            running: std::sync::atomic::AtomicUsize::new(0),
            renewer: Mutex::new(None),
        })
    }

    fn locals(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Local>>> {
        self.local.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tasks running on this replica.
    pub fn running(&self) -> usize {
        self.running.load(std::sync::atomic::Ordering::Acquire)
    }

    fn lease_ms(&self) -> u64 {
        self.config.lease.as_millis() as u64
    }

    fn tick(&self) -> Duration {
        self.config.lease / 3
    }

    /// Renews this replica's leases and wakes its tasks from the bus until `stop`; then fails
    /// the tasks still running (the replica is leaving).
    pub fn start(self: &Arc<Self>, bus: Arc<Bus>, stop: CancellationToken) {
        let me = self.clone();
        let renew_stop = stop.clone();
        let renewer = tokio::spawn(async move {
            let mut every = tokio::time::interval(me.tick());
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = every.tick() => me.renew_all().await,
                    () = renew_stop.cancelled() => break,
                }
            }
            me.leave().await;
        });
        *self.renewer.lock().unwrap_or_else(|p| p.into_inner()) = Some(renewer);
        let me = self.clone();
        tokio::spawn(async move {
            let mut sub = bus.subscribe(TOPIC);
            let mut generation = bus.generation();
            generation.mark_unchanged();
            loop {
                tokio::select! {
                    m = sub.recv() => match m {
                        Ok(m) => me.on_message(&m),
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => me.wake_all(),
                        Err(_) => return,
                    },
                    changed = generation.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        // Messages may have been missed while resubscribing: look again.
                        me.wake_all();
                    }
                    () = stop.cancelled() => return,
                }
            }
        });
    }

    fn on_message(&self, m: &str) {
        let Some((id, what)) = m.split_once(' ') else {
            return;
        };
        let Some(local) = self.locals().get(id).cloned() else {
            return;
        };
        match what {
            "cancel" => local.cancel.cancel(),
            _ => local.wake.notify_one(),
        }
    }

    fn wake_all(&self) {
        for l in self.locals().values() {
            l.wake.notify_one();
        }
    }

    /// Renews every local task's lease, [`RENEWALS_AT_ONCE`] at a time (one slow round trip
    /// must not make the others late).
    async fn renew_all(&self) {
        use futures::StreamExt as _;
        let running: Vec<(String, Arc<Local>)> = self
            .locals()
            .iter()
            .map(|(id, l)| (id.clone(), l.clone()))
            .collect();
        futures::stream::iter(running)
            .for_each_concurrent(RENEWALS_AT_ONCE, |(id, local)| async move {
                let msg = {
                    let mut m = local.msg.lock().unwrap_or_else(|p| p.into_inner());
                    m.1 = Instant::now();
                    m.0.take()
                };
                self.renew(&id, &local, msg.as_deref()).await;
            })
            .await;
    }

    async fn renew(&self, id: &str, local: &Local, msg: Option<&str>) {
        let now = now_ms();
        let op = TaskOp::Runner {
            runner: &self.runner,
            now,
            act: RunnerAct::Renew {
                lease_ms: self.lease_ms(),
                msg,
            },
        };
        match self.store.task(id, op).await {
            Ok(TaskReply::Runner {
                cancel, waiting, ..
            }) => {
                if cancel {
                    local.cancel.cancel();
                }
                if waiting > 0 {
                    local.wake.notify_one();
                }
            }
            Ok(_) => {
                tracing::warn!(
                    task = id,
                    "task no longer ours (lease lost or expired); stopping its work"
                );
                count("lost");
                self.fence(local);
            }
            Err(e) => {
                tracing::warn!(task = id, error = %e, "cannot renew a task's lease");
                if let Some(m) = msg {
                    // Not lost: the next renewal carries it, unless a newer one came.
                    let mut pending = local.msg.lock().unwrap_or_else(|p| p.into_inner());
                    pending.0.get_or_insert_with(|| m.to_owned());
                }
            }
        }
    }

    fn fence(&self, local: &Local) {
        if let Some(a) = local.abort.lock().unwrap_or_else(|p| p.into_inner()).take() {
            a.abort();
        }
    }

    /// At shutdown: the tasks still running here end `failed` now rather than at their
    /// lease's end.
    async fn leave(&self) {
        let running: Vec<(String, Arc<Local>)> = self.locals().drain().collect();
        let message = "the replica running this task shut down";
        let error = json!({"code": -32603, "message": message}).to_string();
        futures::future::join_all(running.iter().map(|(id, local)| {
            self.fence(local);
            count("shutdown");
            self.finish(id, "failed", "error", &error, message)
        }))
        .await;
    }

    /// Waits (at most `within`) for the tasks running here to be marked failed after `stop`.
    pub async fn stopped(&self, within: Duration) {
        let renewer = self
            .renewer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(r) = renewer {
            let _ = tokio::time::timeout(within, r).await;
        }
    }

    /// Starts `work` as a task of `owner` for `tool`; `Ok(None)` when this replica runs
    /// `tasks.max_running` already (the caller runs it inline or refuses).
    pub async fn create(
        self: &Arc<Self>,
        owner: Option<&str>,
        tool: &str,
        work: impl FnOnce(TaskCtx) -> Work,
    ) -> Result<Option<CreateTaskResult>, ErrorData> {
        // A place among `tasks.max_running`, taken before any await (concurrent creates
        // cannot overshoot) and given back when the task ends or is not created.
        let taken = self
            .running
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        if taken >= self.config.max_running {
            self.running
                .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
            tracing::warn!(
                max_running = self.config.max_running,
                "tasks.max_running reached on this replica"
            );
            count("refused");
            return Ok(None);
        }
        let created = self.start_task(owner, tool, work).await;
        if !matches!(created, Ok(Some(_))) {
            self.running
                .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        }
        created
    }

    async fn start_task(
        self: &Arc<Self>,
        owner: Option<&str>,
        tool: &str,
        work: impl FnOnce(TaskCtx) -> Work,
    ) -> Result<Option<CreateTaskResult>, ErrorData> {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let now = now_ms();
        let ttl = self.config.ttl.as_millis() as u64;
        let limit = match owner {
            Some(_) => self.config.max_per_principal,
            None => self.config.max_anonymous,
        };
        match self
            .store
            .admit_task(owner, &id, now + ttl, limit)
            .await
            .map_err(unavailable)?
        {
            Admission::Admitted | Admission::Missing => {}
            Admission::Full { retry_after } => {
                count("refused");
                return Err(ErrorData::new(
                    ErrorCode(-32000),
                    format!(
                        "too many live tasks for {} ({}: {limit}); the oldest expires in {} s",
                        if owner.is_some() {
                            "this principal"
                        } else {
                            "anonymous callers"
                        },
                        if owner.is_some() {
                            "tasks.max_per_principal"
                        } else {
                            "tasks.max_anonymous"
                        },
                        retry_after.as_secs().max(1)
                    ),
                    Some(json!({"retryAfterSeconds": retry_after.as_secs().max(1)})),
                ));
            }
        }
        let poll = self.config.poll_interval.as_millis() as u64;
        let fields = [
            ("owner", owner.unwrap_or_default().to_owned()),
            ("tool", tool.to_owned()),
            ("created", now.to_string()),
            ("updated", now.to_string()),
            ("ttl", ttl.to_string()),
            ("poll", poll.to_string()),
            ("status", "working".to_owned()),
            ("runner", self.runner.clone()),
            ("nin", "0".to_owned()),
            ("nre", "0".to_owned()),
        ];
        let written = self
            .store
            .task(
                &id,
                TaskOp::Create {
                    fields: &fields,
                    now,
                    ttl_ms: ttl,
                    lease_ms: self.lease_ms(),
                },
            )
            .await;
        if let Err(e) = written {
            // The principal's place is not held until the TTL for a task that never was.
            if limit > 0
                && let Err(release) = self.store.release_task(owner, &id).await
            {
                tracing::debug!(error = %release, "task place not given back; it expires");
            }
            return Err(unavailable(e));
        }
        let local = Arc::new(Local {
            wake: Notify::new(),
            cancel: CancellationToken::new(),
            msg: Mutex::new((None, Instant::now())),
            abort: Mutex::new(None),
            answers: Mutex::new(HashMap::new()),
        });
        let ctx = TaskCtx {
            id: id.clone(),
            tasks: self.clone(),
            local: local.clone(),
        };
        let mut handle = tokio::spawn(work(ctx));
        *local.abort.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle.abort_handle());
        self.locals().insert(id.clone(), local.clone());
        let me = self.clone();
        let task_id = id.clone();
        tokio::spawn(async move {
            // Work that ignores a cancel is stopped CANCEL_GRACE after it.
            let overdue = async {
                local.cancel.cancelled().await;
                tokio::time::sleep(CANCEL_GRACE).await;
            };
            let outcome = tokio::select! {
                o = &mut handle => Some(o),
                () = overdue => None,
            };
            match outcome {
                Some(o) => me.settle(&task_id, o).await,
                None => {
                    handle.abort();
                    tracing::warn!(task = %task_id, "task work did not stop after a cancel; stopped");
                    count("stopped");
                    let _ = me
                        .finish(
                            &task_id,
                            "cancelled",
                            "",
                            "",
                            "cancelled (the work was stopped)",
                        )
                        .await;
                }
            }
            me.locals().remove(&task_id);
            me.running.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        });
        count("created");
        let created = rfc3339(now);
        Ok(Some(CreateTaskResult::new(
            Task::new(id, TaskStatus::Working, created.clone(), created)
                .with_ttl_ms(ttl)
                .with_poll_interval_ms(poll),
        )))
    }

    /// Writes how the work ended.
    async fn settle(
        &self,
        id: &str,
        outcome: Result<Result<CallToolResult, TaskExit>, tokio::task::JoinError>,
    ) {
        let error_of = |e: &ErrorData| serde_json::to_string(e).unwrap_or_default();
        let written = match outcome {
            Ok(Ok(result)) => {
                let json = serde_json::to_string(&result).unwrap_or_default();
                if json.len() > self.config.max_result_bytes {
                    let message = format!(
                        "the result is {} bytes, over tasks.max_result_bytes ({})",
                        json.len(),
                        self.config.max_result_bytes
                    );
                    let e = ErrorData::internal_error(message.clone(), None);
                    self.finish(id, "failed", "error", &error_of(&e), &message)
                        .await
                } else {
                    self.finish(id, "completed", "result", &json, "").await
                }
            }
            Ok(Err(TaskExit::Cancelled)) => self.finish(id, "cancelled", "", "", "").await,
            Ok(Err(TaskExit::Error(mut e))) => {
                let message = truncate(e.message.to_string(), MAX_STATUS_MESSAGE);
                if error_of(&e).len() > self.config.max_result_bytes {
                    // Keep the code and a bounded message; drop the oversized data.
                    e.data = None;
                    e.message = message.clone().into();
                }
                self.finish(id, "failed", "error", &error_of(&e), &message)
                    .await
            }
            Err(e) if e.is_panic() => {
                let e = ErrorData::internal_error("the tool panicked", None);
                self.finish(id, "failed", "error", &error_of(&e), "the tool panicked")
                    .await
            }
            // Aborted (counted where it was: a lost lease, or shutdown): the task is no
            // longer ours to write.
            Err(_) => return,
        };
        if let Err(e) = written {
            tracing::warn!(task = id, error = %e, "cannot record how a task ended; its lease will fail it");
        }
    }

    async fn finish(
        &self,
        id: &str,
        status: &str,
        field: &str,
        payload: &str,
        msg: &str,
    ) -> Result<(), StoreError> {
        let op = TaskOp::Runner {
            runner: &self.runner,
            now: now_ms(),
            act: RunnerAct::Finish {
                status,
                field,
                payload,
                msg,
            },
        };
        // A short store outage should not lose a finished result: retry within one lease.
        let deadline = Instant::now() + self.config.lease;
        loop {
            match self.store.task(id, op).await {
                Ok(TaskReply::Runner { .. }) => {
                    count(status);
                    return Ok(());
                }
                Ok(_) => {
                    count("lost");
                    return Ok(());
                }
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        }
    }

    /// `tasks/get` for `owner`.
    pub async fn get(&self, owner: Option<&str>, id: &str) -> Result<GetTaskResult, ErrorData> {
        match self.client(owner, id, ClientAct::Read).await? {
            TaskReply::Record(r) => Ok(GetTaskResult::new(detailed(id, &r))),
            _ => Err(unknown_task(id)),
        }
    }

    /// `tasks/update` for `owner`: answers for pending input requests (others ignored).
    pub async fn update(
        &self,
        owner: Option<&str>,
        id: &str,
        responses: InputResponses,
    ) -> Result<(), ErrorData> {
        if responses.len() > MAX_ANSWERS_PER_UPDATE {
            return Err(ErrorData::invalid_params(
                format!(
                    "tasks/update carries {} inputResponses; at most {MAX_ANSWERS_PER_UPDATE}",
                    responses.len()
                ),
                None,
            ));
        }
        let answers: Vec<(String, String)> = responses
            .into_iter()
            .filter(|(k, _)| !k.is_empty() && k.len() <= MAX_INPUT_KEY_LEN)
            .map(|(k, v)| (k, v.to_string()))
            .collect();
        if let TaskReply::Applied(n) = self.client(owner, id, ClientAct::Update(&answers)).await?
            && n > 0
        {
            self.wake(id, "in").await;
        }
        Ok(())
    }

    /// `tasks/cancel` for `owner`: acknowledged at once, settled by the runner.
    pub async fn cancel(&self, owner: Option<&str>, id: &str) -> Result<(), ErrorData> {
        if let TaskReply::Applied(1) = self.client(owner, id, ClientAct::Cancel).await? {
            self.wake(id, "cancel").await;
        }
        Ok(())
    }

    async fn wake(&self, id: &str, what: &str) {
        if let Err(e) = self.store.publish(TOPIC, &format!("{id} {what}")).await {
            // The runner reads the record at its next renewal anyway.
            tracing::debug!(task = id, error = %e, "task wake-up not published");
        }
    }

    /// A client operation: unknown, expired and foreign tasks all answer -32602.
    async fn client(
        &self,
        owner: Option<&str>,
        id: &str,
        act: ClientAct<'_>,
    ) -> Result<TaskReply, ErrorData> {
        if !valid_task_id(id) {
            return Err(unknown_task(id));
        }
        let op = TaskOp::Client {
            owner: owner.unwrap_or_default(),
            now: now_ms(),
            act,
        };
        match self.store.task(id, op).await.map_err(unavailable)? {
            TaskReply::Gone => Err(unknown_task(id)),
            TaskReply::Foreign => {
                tracing::warn!(target: "security", task = id, "task used by another principal");
                Err(unknown_task(id))
            }
            reply => Ok(reply),
        }
    }

    /// One runner operation, retried through short store outages until the task's TTL.
    async fn runner_op(&self, id: &str, act: RunnerAct<'_>) -> Result<TaskReply, TaskExit> {
        let deadline = Instant::now() + self.config.ttl;
        loop {
            let op = TaskOp::Runner {
                runner: &self.runner,
                now: now_ms(),
                act,
            };
            match self.store.task(id, op).await {
                Ok(TaskReply::Gone | TaskReply::Fenced | TaskReply::Foreign) => {
                    return Err(TaskExit::Cancelled);
                }
                Ok(reply) => return Ok(reply),
                Err(_) if Instant::now() >= deadline => return Err(TaskExit::Cancelled),
                Err(e) => {
                    tracing::debug!(task = id, error = %e, "task store unavailable; retrying");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        }
    }
}

impl TaskCtx {
    /// The task's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Resolves when a cancel of this task was asked (through any replica).
    pub async fn cancelled(&self) {
        self.local.cancel.cancelled().await;
    }

    pub fn is_cancelled(&self) -> bool {
        self.local.cancel.is_cancelled()
    }

    /// Sets the status message `tasks/get` shows (at most one write a second; the rest ride
    /// on the lease renewals).
    pub async fn status(&self, message: impl Into<String>) {
        let message = truncate(message.into(), MAX_STATUS_MESSAGE);
        let due = {
            let mut m = self.local.msg.lock().unwrap_or_else(|p| p.into_inner());
            if m.1.elapsed() >= Duration::from_secs(1) {
                m.0 = None;
                m.1 = Instant::now();
                true
            } else {
                m.0 = Some(message.clone());
                false
            }
        };
        if due {
            self.tasks
                .renew(&self.id, &self.local, Some(&message))
                .await;
        }
    }

    /// Asks the client for input (`tasks/get` shows `input_required` with these requests)
    /// and waits until every one is answered through any replica, or the task is cancelled.
    /// Keys must be unique over the task's life.
    pub async fn request_input(&self, requests: InputRequests) -> Result<InputResponses, TaskExit> {
        let mut asked = Vec::with_capacity(requests.len());
        for (k, r) in &requests {
            let json = serde_json::to_string(r)
                .map_err(|e| TaskExit::Error(ErrorData::internal_error(e.to_string(), None)))?;
            asked.push((k.clone(), json));
        }
        let act = RunnerAct::Ask {
            max: MAX_PENDING_INPUTS,
            requests: &asked,
        };
        match self.tasks.runner_op(&self.id, act).await? {
            TaskReply::Full => {
                return Err(TaskExit::Error(ErrorData::internal_error(
                    format!("more than {MAX_PENDING_INPUTS} input requests pending"),
                    None,
                )));
            }
            TaskReply::Runner { cancel: true, .. } => return Err(TaskExit::Cancelled),
            _ => {}
        }
        let mut got = InputResponses::new();
        loop {
            if let TaskReply::Runner {
                cancel, answers, ..
            } = self.tasks.runner_op(&self.id, RunnerAct::Take).await?
            {
                if cancel {
                    return Err(TaskExit::Cancelled);
                }
                // Answers for another wait of this task are kept for it, not dropped.
                let mut kept = self.local.answers.lock().unwrap_or_else(|p| p.into_inner());
                for (k, v) in answers {
                    kept.insert(k, serde_json::from_str(&v).unwrap_or(Value::Null));
                }
                for k in requests.keys() {
                    if let Some(v) = kept.remove(k) {
                        got.insert(k.clone(), v);
                    }
                }
            }
            if got.len() >= requests.len() {
                return Ok(got);
            }
            tokio::select! {
                () = self.local.wake.notified() => {}
                () = self.local.cancel.cancelled() => return Err(TaskExit::Cancelled),
                () = tokio::time::sleep(self.tasks.tick()) => {}
            }
        }
    }
}
