//! The MCP server itself: tools, resources and prompts.
//!
//! Per-session state (the `counter`, the log level, resource subscriptions) is kept in the
//! shared session record, never in this struct: a request for a session may land on any
//! replica, including one that started after the session.
#![allow(deprecated)] // logging and resources/subscribe are legacy-only, and still served

use std::{
    borrow::Cow,
    sync::{Arc, LazyLock},
    time::Duration,
};

use rmcp::{
    ErrorData, RoleServer, ServerHandler,
    model::*,
    service::{RequestContext, SubscriptionContext},
};
use serde_json::{Value, json};

use crate::{
    Node, conformance,
    principal::Caller,
    store::Subscribed,
    tasks::{Started, Support, TaskCtx, TaskExit},
};

/// Server name in `serverInfo`.
pub const SERVER_NAME: &str = "mcp-edge-backend";
/// Version in `serverInfo`, `/health` and `system://info`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The handler; one per session worker, all sharing the node.
#[derive(Clone)]
pub struct Handler {
    node: Arc<Node>,
}

impl Handler {
    pub fn new(node: Arc<Node>) -> Self {
        Self { node }
    }
}

/// The session a request belongs to, from the HTTP request rmcp attached to it.
pub fn session_of(extensions: &Extensions) -> Option<String> {
    extensions
        .get::<http::request::Parts>()
        .and_then(|p| p.headers.get("mcp-session-id"))
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// The owner hash of the principal that sent a request (`None`: anonymous).
fn owner_of(cx: &RequestContext<RoleServer>) -> Option<String> {
    cx.extensions
        .get::<http::request::Parts>()
        .and_then(|p| p.extensions.get::<Caller>())
        .and_then(|c| c.owner().map(str::to_owned))
}

/// The capability a task-only tool needs, for -32021's `data.requiredCapabilities`.
fn tasks_capability() -> ClientCapabilities {
    let mut extensions = ExtensionCapabilities::new();
    extensions.insert(TASKS_EXTENSION_ID.to_owned(), JsonObject::new());
    let mut c = ClientCapabilities::default();
    c.extensions = Some(extensions);
    c
}

fn object(v: Value) -> Arc<JsonObject> {
    match v {
        Value::Object(map) => Arc::new(map),
        _ => Arc::new(JsonObject::new()),
    }
}

fn text_result(text: impl Into<String>) -> CallToolResult {
    CallToolResult::success(vec![ContentBlock::text(text)])
}

fn tool_error(text: impl Into<String>) -> CallToolResult {
    CallToolResult::error(vec![ContentBlock::text(text)])
}

fn tools() -> Vec<Tool> {
    let number = json!({"type": "number"});
    vec![
        Tool::new(
            "calculator",
            "Arithmetic on two numbers: add, subtract, multiply or divide.",
            object(json!({
                "type": "object",
                "properties": {
                    "operation": {"type": "string", "enum": ["add", "subtract", "multiply", "divide"]},
                    "a": number, "b": number
                },
                "required": ["operation", "a", "b"]
            })),
        ),
        Tool::new(
            "echo",
            "Returns its message unchanged.",
            object(json!({
                "type": "object",
                "properties": {"message": {"type": "string"}},
                "required": ["message"]
            })),
        ),
        Tool::new(
            "hello",
            "Greets someone, naming the replica that answered.",
            object(json!({
                "type": "object",
                "properties": {"name": {"type": "string", "default": "world"}}
            })),
        ),
        Tool::new(
            "counter",
            "A counter kept with the session: increment it or get it, on any replica.",
            object(json!({
                "type": "object",
                "properties": {
                    "action": {"type": "string", "enum": ["increment", "get"], "default": "increment"},
                    "by": {"type": "integer", "default": 1}
                }
            })),
        ),
        Tool::new(
            "slow_task",
            "Works for steps x delay_ms, sending a progress notification per step.",
            object(json!({
                "type": "object",
                "properties": {
                    "steps": {"type": "integer", "minimum": 1, "maximum": 100, "default": 5},
                    "delay_ms": {"type": "integer", "minimum": 0, "maximum": 10000, "default": 100}
                }
            })),
        ),
        Tool::new(
            "notify",
            "Sends a log message and a resources/updated notification to the session's standalone stream.",
            object(json!({
                "type": "object",
                "properties": {
                    "message": {"type": "string"},
                    "uri": {"type": "string", "default": "system://info"}
                },
                "required": ["message"]
            })),
        ),
        Tool::new(
            "confirm",
            "Asks the user to confirm a question (elicitation) and returns the answer.",
            object(json!({
                "type": "object",
                "properties": {"question": {"type": "string"}},
                "required": ["question"]
            })),
        ),
    ]
    .into_iter()
    .map(annotate)
    .collect()
}

/// What a tool does to state, for clients and for mcp-proxy's failover (a read-only tool may
/// be repeated on another replica when its first one dies mid-call; the others never are).
fn annotate(tool: Tool) -> Tool {
    let read_only = matches!(
        tool.name.as_ref(),
        "calculator" | "echo" | "hello" | "slow_task"
    );
    let annotations = ToolAnnotations::new()
        .read_only(read_only)
        .destructive(false)
        .idempotent(read_only);
    tool.annotate(annotations)
}

fn arg_f64(args: &JsonObject, key: &str) -> Result<f64, String> {
    args.get(key)
        .and_then(Value::as_f64)
        .ok_or_else(|| format!("argument `{key}` must be a number"))
}

/// What `confirm` asks, inline (elicitation) or as a task (an input request).
fn confirm_schema(question: &str) -> Value {
    json!({
        "type": "object",
        "properties": {"confirmed": {"type": "boolean", "description": question}},
        "required": ["confirmed"]
    })
}

/// `confirm`'s result, inline or as a task.
fn confirm_result(action: &str, confirmed: bool, node: &str) -> CallToolResult {
    let mut r = text_result(format!("action={action} confirmed={confirmed}"));
    r.structured_content = Some(json!({"confirmed": confirmed, "node": node}));
    r
}

/// `slow_task`'s steps and delay per step (ms), clamped to its schema.
fn slow_task_args(args: &JsonObject) -> (u64, u64) {
    let steps = args
        .get("steps")
        .and_then(Value::as_u64)
        .unwrap_or(5)
        .clamp(1, 100);
    let delay = args
        .get("delay_ms")
        .and_then(Value::as_u64)
        .unwrap_or(100)
        .min(10_000);
    (steps, delay)
}

fn arg_str<'a>(args: &'a JsonObject, key: &str) -> Option<&'a str> {
    args.get(key).and_then(Value::as_str)
}

/// The calculator, as a pure function: division by zero is an error value, not a panic.
pub fn calculate(operation: &str, a: f64, b: f64) -> Result<f64, String> {
    let r = match operation {
        "add" => a + b,
        "subtract" => a - b,
        "multiply" => a * b,
        "divide" if b == 0.0 => return Err("division by zero".into()),
        "divide" => a / b,
        other => {
            return Err(format!(
                "unknown operation `{other}` (expected add, subtract, multiply or divide)"
            ));
        }
    };
    if r.is_finite() {
        Ok(r)
    } else {
        Err("result is not a finite number".into())
    }
}

fn level_rank(level: LoggingLevel) -> u8 {
    match level {
        LoggingLevel::Debug => 0,
        LoggingLevel::Info => 1,
        LoggingLevel::Notice => 2,
        LoggingLevel::Warning => 3,
        LoggingLevel::Error => 4,
        LoggingLevel::Critical => 5,
        LoggingLevel::Alert => 6,
        LoggingLevel::Emergency => 7,
    }
}

/// The product's tools, built once: rmcp looks a tool up on every header-checked `tools/call`.
static TOOLS: LazyLock<Vec<Tool>> = LazyLock::new(tools);
/// The conformance fixtures' tools, built once.
static FIXTURE_TOOLS: LazyLock<Vec<Tool>> = LazyLock::new(conformance::tools);

impl Handler {
    /// The tools this server lists, in a stable order (fixtures only with `--conformance`).
    /// Runs one tool call (the main tools, then the conformance fixtures when served).
    async fn run_tool(
        &self,
        request: CallToolRequestParams,
        cx: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        if let Some(response) = self.maybe_task(&request, &cx).await? {
            return Ok(response);
        }
        let args = request.arguments.clone().unwrap_or_default();
        if let Some(result) = self.call_main_tool(&request.name, &args, &cx).await? {
            return Ok(result.into());
        }
        if self.node.config.conformance
            && let Some(result) = conformance::call_tool(&self.node, &request, &cx).await?
        {
            return Ok(result);
        }
        Err(ErrorData::invalid_params(
            format!("unknown tool: {}", request.name),
            None,
        ))
    }

    /// Whether `name` runs as a task for clients that declare the extension.
    fn task_support(&self, name: &str) -> Option<Support> {
        match name {
            "slow_task" | "confirm" => Some(Support::Optional),
            _ if self.node.config.conformance => conformance::task_support(name),
            _ => None,
        }
    }

    /// A task (or the answer before one) for a call that may become a task; `None`: run it
    /// inline. Tasks exist for 2026-07-28 requests that declare the extension; a task-only
    /// tool called without it gets -32021 before any work.
    async fn maybe_task(
        &self,
        request: &CallToolRequestParams,
        cx: &RequestContext<RoleServer>,
    ) -> Result<Option<CallToolResponse>, ErrorData> {
        let Some(support) = self.task_support(&request.name) else {
            return Ok(None);
        };
        // The stateless path (2026-07-28 or later): no session, the version in `_meta`.
        let stateless = session_of(&cx.extensions).is_none()
            && cx
                .meta
                .protocol_version()
                .is_some_and(|v| v.to_string().as_str() >= "2026-07-28");
        let declared = stateless && cx.client_capabilities().is_some_and(|c| c.supports_tasks());
        if !declared {
            return match support {
                Support::Required => Err(ErrorData::missing_required_client_capability(
                    tasks_capability(),
                )),
                Support::Optional => Ok(None),
            };
        }
        let work = match self.task_work(request)? {
            Started::Now(response) => return Ok(Some(response)),
            Started::Task(work) => work,
        };
        // A replica that is leaving starts no task (the balancer is already moving new
        // requests elsewhere); nor does one at `tasks.max_running`. Either way an optional
        // tool runs inline and a task-only one is refused.
        let draining = self.node.is_draining();
        let created = if draining {
            None
        } else {
            let owner = owner_of(cx);
            self.node
                .tasks
                .create(owner.as_deref(), &request.name, work)
                .await?
        };
        match created {
            Some(created) => Ok(Some(CallToolResponse::Task(created))),
            None if support == Support::Optional => Ok(None),
            None if draining => Err(ErrorData::new(
                ErrorCode(-32000),
                "this replica is shutting down; retry the call (another replica takes it)",
                None,
            )),
            None => Err(ErrorData::new(
                ErrorCode(-32000),
                format!(
                    "this replica runs tasks.max_running ({}) tasks already; retry later",
                    self.node.config.tasks.max_running
                ),
                None,
            )),
        }
    }

    /// The task body of a task-capable tool.
    fn task_work(&self, request: &CallToolRequestParams) -> Result<Started, ErrorData> {
        let args = request.arguments.clone().unwrap_or_default();
        Ok(match request.name.as_ref() {
            "slow_task" => {
                let (steps, delay) = slow_task_args(&args);
                Started::task(move |ctx| async move {
                    for step in 1..=steps {
                        tokio::select! {
                            () = tokio::time::sleep(Duration::from_millis(delay)) => {}
                            () = ctx.cancelled() => return Err(TaskExit::Cancelled),
                        }
                        ctx.status(format!("step {step} of {steps}")).await;
                    }
                    Ok(text_result(format!("completed {steps} steps")))
                })
            }
            "confirm" => {
                let question = arg_str(&args, "question").unwrap_or("Confirm?").to_owned();
                let node = self.node.config.node_id.clone();
                Started::task(move |ctx: TaskCtx| async move {
                    let request: InputRequest = serde_json::from_value(json!({
                        "method": "elicitation/create",
                        "params": {"message": question, "requestedSchema": confirm_schema(&question)}
                    }))
                    .map_err(|e| TaskExit::Error(ErrorData::internal_error(e.to_string(), None)))?;
                    let answers = ctx
                        .request_input([("confirmed".to_owned(), request)].into())
                        .await?;
                    let answer = answers.get("confirmed");
                    let action = answer
                        .and_then(|a| a.get("action"))
                        .and_then(Value::as_str)
                        .unwrap_or("decline")
                        .to_owned();
                    let confirmed = answer
                        .and_then(|a| a.get("content"))
                        .and_then(|c| c.get("confirmed"))
                        .and_then(Value::as_bool)
                        .unwrap_or(false);
                    Ok(confirm_result(&action, confirmed, &node))
                })
            }
            _ => conformance::task_work(request)?,
        })
    }

    fn served_tools(&self) -> impl Iterator<Item = &'static Tool> {
        let fixtures: &'static [Tool] = if self.node.config.conformance {
            &FIXTURE_TOOLS
        } else {
            &[]
        };
        TOOLS.iter().chain(fixtures)
    }

    fn store_unavailable(e: impl std::fmt::Display) -> ErrorData {
        ErrorData::internal_error(format!("session store unavailable: {e}"), None)
    }

    /// Whether a log message at `level` passes the session's `logging/setLevel` threshold.
    async fn log_enabled(&self, session: Option<&str>, level: LoggingLevel) -> bool {
        let Some(session) = session else {
            return true;
        };
        let min = match self.node.store.get_field(session, "log_level").await {
            Ok(Some(v)) => serde_json::from_value::<LoggingLevel>(Value::String(v)).ok(),
            _ => None,
        };
        min.is_none_or(|min| level_rank(level) >= level_rank(min))
    }

    async fn system_info(&self) -> Value {
        json!({
            "nodeId": self.node.config.node_id,
            "version": VERSION,
            "uptimeSeconds": self.node.started.elapsed().as_secs(),
            "sessions": self.node.store.count().await.ok(),
            "store": if self.node.store.is_redis() { "redis" } else { "memory" },
        })
    }

    fn server_config(&self) -> Value {
        let c = &self.node.config;
        json!({
            "nodeId": c.node_id,
            "sessionTtlSeconds": c.session_ttl.as_secs(),
            "keyPrefix": c.key_prefix,
            "store": if c.redis.is_some() { "redis" } else { "memory" },
            "maxBodyBytes": c.max_body_bytes,
            "sseKeepAliveSeconds": c.sse_keep_alive.as_secs(),
            "conformance": c.conformance,
        })
    }

    async fn call_main_tool(
        &self,
        name: &str,
        args: &JsonObject,
        cx: &RequestContext<RoleServer>,
    ) -> Result<Option<CallToolResult>, ErrorData> {
        let session = session_of(&cx.extensions);
        let result = match name {
            "calculator" => {
                let op = arg_str(args, "operation").unwrap_or_default();
                match arg_f64(args, "a")
                    .and_then(|a| arg_f64(args, "b").map(|b| (a, b)))
                    .and_then(|(a, b)| calculate(op, a, b))
                {
                    Ok(r) => text_result(r.to_string()),
                    Err(e) => tool_error(e),
                }
            }
            "echo" => match arg_str(args, "message") {
                Some(m) => text_result(m),
                None => tool_error("argument `message` must be a string"),
            },
            "hello" => {
                let who = arg_str(args, "name").unwrap_or("world");
                text_result(format!("Hello, {who}! (from {})", self.node.config.node_id))
            }
            "counter" => {
                let Some(session) = session else {
                    return Ok(Some(tool_error(
                        "the counter lives with a session; this request has none",
                    )));
                };
                let by = match arg_str(args, "action").unwrap_or("increment") {
                    "increment" => args.get("by").and_then(Value::as_i64).unwrap_or(1),
                    "get" => 0,
                    other => {
                        return Ok(Some(tool_error(format!(
                            "unknown action `{other}` (expected increment or get)"
                        ))));
                    }
                };
                let Some(value) = self
                    .node
                    .store
                    .incr_field(&session, "counter", by)
                    .await
                    .map_err(Self::store_unavailable)?
                else {
                    return Err(session_ended());
                };
                let mut r = text_result(value.to_string());
                r.structured_content =
                    Some(json!({"value": value, "node": self.node.config.node_id}));
                r
            }
            "slow_task" => {
                let (steps, delay) = slow_task_args(args);
                let token = cx.meta.get_progress_token();
                for step in 1..=steps {
                    // `notifications/cancelled` (from any replica, see `sessions.rs`) ends it.
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_millis(delay)) => {}
                        () = cx.ct.cancelled() => {
                            return Err(ErrorData::new(
                                ErrorCode(REQUEST_CANCELLED),
                                format!("cancelled after {} of {steps} steps", step - 1),
                                None,
                            ));
                        }
                    }
                    if let Some(token) = &token {
                        let _ = cx
                            .peer
                            .notify_progress(
                                ProgressNotificationParam::new(token.clone(), step as f64)
                                    .with_total(steps as f64)
                                    .with_message(format!("step {step} of {steps}")),
                            )
                            .await;
                    }
                }
                text_result(format!("completed {steps} steps"))
            }
            "notify" => {
                let message = arg_str(args, "message").unwrap_or_default().to_owned();
                let uri = arg_str(args, "uri").unwrap_or("system://info").to_owned();
                if self
                    .log_enabled(session.as_deref(), LoggingLevel::Info)
                    .await
                {
                    let _ = cx
                        .peer
                        .notify_logging_message(
                            LoggingMessageNotificationParam::new(
                                LoggingLevel::Info,
                                json!({"message": message, "node": self.node.config.node_id}),
                            )
                            .with_logger("notify"),
                        )
                        .await;
                }
                let _ = cx
                    .peer
                    .notify_resource_updated(ResourceUpdatedNotificationParam::new(uri.clone()))
                    .await;
                // 2026-07-28 clients learn of updates on their subscriptions/listen streams.
                let _ = self
                    .node
                    .store
                    .publish(conformance::CHANGED_TOPIC, &format!("updated {uri}"))
                    .await;
                text_result("notified")
            }
            "confirm" => {
                let question = arg_str(args, "question").unwrap_or("Confirm?").to_owned();
                let schema: ElicitationSchema =
                    serde_json::from_value(confirm_schema(&question))
                        .map_err(|e| ErrorData::internal_error(e.to_string(), None))?;
                match cx
                    .peer
                    .create_elicitation(ElicitRequestParams::FormElicitationParams {
                        meta: None,
                        message: question,
                        requested_schema: schema,
                    })
                    .await
                {
                    Ok(answer) => {
                        let confirmed = answer
                            .content
                            .as_ref()
                            .and_then(|c| c.get("confirmed"))
                            .and_then(Value::as_bool)
                            .unwrap_or(false);
                        let action = serde_json::to_value(&answer.action)
                            .ok()
                            .and_then(|v| v.as_str().map(str::to_owned))
                            .unwrap_or_default();
                        confirm_result(&action, confirmed, &self.node.config.node_id)
                    }
                    Err(e) => tool_error(format!("elicitation failed: {e}")),
                }
            }
            _ => return Ok(None),
        };
        Ok(Some(result))
    }
}

impl ServerHandler for Handler {
    fn get_info(&self) -> ServerConfig {
        let mut capabilities = ServerCapabilities::builder()
            .enable_logging()
            .enable_completions()
            .enable_prompts()
            .enable_resources()
            .enable_resources_subscribe()
            .enable_resources_list_changed()
            .enable_tools()
            .enable_tasks()
            .build();
        if self.node.config.conformance {
            // Only the conformance fixtures change these lists (their trigger tools).
            if let Some(tools) = capabilities.tools.as_mut() {
                tools.list_changed = Some(true);
            }
            if let Some(prompts) = capabilities.prompts.as_mut() {
                prompts.list_changed = Some(true);
            }
        }
        InitializeResult::new(capabilities)
            .with_server_info(Implementation::new(SERVER_NAME, VERSION))
            .with_instructions("Reference MCP backend of mcp-edge: any replica serves any session.")
    }

    fn supported_protocol_versions(&self) -> Cow<'static, [ProtocolVersion]> {
        Cow::Borrowed(ProtocolVersion::KNOWN_VERSIONS)
    }

    fn accepted_subscription_filter(
        &self,
        requested: &SubscriptionFilter,
    ) -> Option<SubscriptionFilter> {
        // rmcp narrows this to what `get_info` advertises.
        Some(requested.clone())
    }

    /// One `subscriptions/listen` stream (2026-07-28): forwards list changes and resource
    /// updates announced on the bus by any replica, until the client cancels.
    async fn listen(&self, context: SubscriptionContext) -> Result<(), ErrorData> {
        let mut changes = self.node.bus.subscribe(conformance::CHANGED_TOPIC);
        loop {
            let change = tokio::select! {
                c = changes.recv() => c,
                () = context.cancelled() => return Ok(()),
            };
            let change = match change {
                Ok(c) => c,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(_) => return Ok(()),
            };
            let sink = context.sink();
            let sent = match &*change {
                "tools" => sink.notify_tool_list_changed().await,
                "prompts" => sink.notify_prompt_list_changed().await,
                "resources" => sink.notify_resource_list_changed().await,
                other => match other.strip_prefix("updated ") {
                    Some(uri) => sink.notify_resource_updated(uri).await,
                    None => continue,
                },
            };
            if let Err(e) = sent {
                tracing::trace!(error = %e, "change not sent on this listen stream");
            }
        }
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _cx: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        Ok(
            ListToolsResult::with_all_items(self.served_tools().cloned().collect())
                .with_ttl_ms(self.node.config.list_ttl_ms)
                .with_cache_scope(CacheScope::Public),
        )
    }

    fn get_tool(&self, name: &str) -> Option<Tool> {
        self.served_tools().find(|t| t.name == name).cloned()
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        cx: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        use opentelemetry::trace::FutureExt as _;
        // rmcp runs this in the session's worker: the request's trace context comes along in
        // the HTTP request it attached.
        let parent = cx
            .extensions
            .get::<http::request::Parts>()
            .and_then(|p| p.extensions.get::<opentelemetry::Context>())
            .cloned();
        let known = self.served_tools().any(|t| t.name == request.name);
        let label = if known { &*request.name } else { "unknown" };
        let span = crate::trace::child(
            parent.as_ref(),
            format!("tool {label}"),
            vec![opentelemetry::KeyValue::new(
                "gen_ai.tool.name",
                request.name.to_string(),
            )],
        );
        let started = std::time::Instant::now();
        let call = self.run_tool(request.clone(), cx);
        let result = match &span {
            Some(s) => call.with_context(s.clone()).await,
            None => call.await,
        };
        let failed = match &result {
            Ok(rmcp::model::CallToolResponse::Complete(r)) => r.is_error == Some(true),
            Ok(_) => false,
            Err(_) => true,
        };
        let m = crate::metrics::metrics();
        m.tool_calls
            .with_label_values(&[label, if failed { "error" } else { "ok" }])
            .inc();
        m.tool_duration
            .with_label_values(&[label])
            .observe(started.elapsed().as_secs_f64());
        crate::trace::end(span, failed.then_some("the tool failed"));
        result
    }

    async fn list_resources(
        &self,
        _request: Option<PaginatedRequestParams>,
        _cx: RequestContext<RoleServer>,
    ) -> Result<ListResourcesResult, ErrorData> {
        let mut resources = vec![
            Resource::new("system://info", "system-info")
                .with_description(
                    "Node id, version, uptime and session count of the replica that answers",
                )
                .with_mime_type("application/json"),
            Resource::new("config://server", "server-config")
                .with_description("The server's effective configuration (no secrets)")
                .with_mime_type("application/json"),
        ];
        if self.node.config.conformance {
            resources.extend(conformance::resources());
        }
        // Private: a server's resources are often the caller's own.
        Ok(ListResourcesResult::with_all_items(resources)
            .with_ttl_ms(self.node.config.list_ttl_ms)
            .with_cache_scope(CacheScope::Private))
    }

    async fn list_resource_templates(
        &self,
        _request: Option<PaginatedRequestParams>,
        _cx: RequestContext<RoleServer>,
    ) -> Result<ListResourceTemplatesResult, ErrorData> {
        let templates = if self.node.config.conformance {
            conformance::resource_templates()
        } else {
            Vec::new()
        };
        Ok(ListResourceTemplatesResult::with_all_items(templates)
            .with_ttl_ms(self.node.config.list_ttl_ms)
            .with_cache_scope(CacheScope::Public))
    }

    async fn read_resource(
        &self,
        request: ReadResourceRequestParams,
        _cx: RequestContext<RoleServer>,
    ) -> Result<ReadResourceResponse, ErrorData> {
        let json_contents = |uri: &str, v: Value| {
            ReadResourceResult::new(vec![
                ResourceContents::text(v.to_string(), uri).with_mime_type("application/json"),
            ])
        };
        let result = match request.uri.as_str() {
            "system://info" => json_contents("system://info", self.system_info().await),
            "config://server" => json_contents("config://server", self.server_config()),
            uri if self.node.config.conformance => match conformance::read_resource(uri) {
                Some(r) => r,
                None => return Err(resource_not_found(uri)),
            },
            uri => return Err(resource_not_found(uri)),
        };
        Ok(result.into())
    }

    async fn subscribe(
        &self,
        request: SubscribeRequestParams,
        cx: RequestContext<RoleServer>,
    ) -> Result<(), ErrorData> {
        if let Some(session) = session_of(&cx.extensions) {
            if request.uri.len() > MAX_SUBSCRIPTION_URI_LEN {
                return Err(ErrorData::invalid_params(
                    format!("resource URI longer than {MAX_SUBSCRIPTION_URI_LEN} bytes"),
                    None,
                ));
            }
            let max = self.node.config.max_subscriptions_per_session;
            match self
                .node
                .store
                .subscribe(&session, &request.uri, max)
                .await
                .map_err(Self::store_unavailable)?
            {
                Subscribed::Yes => {}
                Subscribed::Full => {
                    return Err(ErrorData::invalid_request(
                        format!(
                            "too many resource subscriptions in this session (max_subscriptions_per_session: {max})"
                        ),
                        None,
                    ));
                }
                Subscribed::Gone => return Err(session_ended()),
            }
        }
        Ok(())
    }

    async fn unsubscribe(
        &self,
        request: UnsubscribeRequestParams,
        cx: RequestContext<RoleServer>,
    ) -> Result<(), ErrorData> {
        if let Some(session) = session_of(&cx.extensions) {
            self.node
                .store
                .unsubscribe(&session, &request.uri)
                .await
                .map_err(Self::store_unavailable)?;
        }
        Ok(())
    }

    async fn set_level(
        &self,
        request: SetLevelRequestParams,
        cx: RequestContext<RoleServer>,
    ) -> Result<(), ErrorData> {
        if let Some(session) = session_of(&cx.extensions) {
            let level = serde_json::to_value(request.level)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_else(|| "info".into());
            let live = self
                .node
                .store
                .set_field(&session, "log_level", Some(&level))
                .await
                .map_err(Self::store_unavailable)?;
            if !live {
                return Err(session_ended());
            }
        }
        Ok(())
    }

    async fn list_prompts(
        &self,
        _request: Option<PaginatedRequestParams>,
        _cx: RequestContext<RoleServer>,
    ) -> Result<ListPromptsResult, ErrorData> {
        let mut prompts = vec![Prompt::new(
            "summarize-session",
            Some("Asks the model to summarise what this session has done so far"),
            Some(vec![
                PromptArgument::new("style")
                    .with_description("short or detailed")
                    .with_required(false),
            ]),
        )];
        if self.node.config.conformance {
            prompts.extend(conformance::prompts());
        }
        Ok(ListPromptsResult::with_all_items(prompts)
            .with_ttl_ms(self.node.config.list_ttl_ms)
            .with_cache_scope(CacheScope::Public))
    }

    async fn get_prompt(
        &self,
        request: GetPromptRequestParams,
        _cx: RequestContext<RoleServer>,
    ) -> Result<GetPromptResponse, ErrorData> {
        if request.name == "summarize-session" {
            let style = request
                .arguments
                .as_ref()
                .and_then(|a| a.get("style"))
                .and_then(Value::as_str)
                .unwrap_or("short");
            return Ok(GetPromptResult::new(vec![PromptMessage::new_text(
                Role::User,
                format!("Summarise this session's tool calls in a {style} paragraph."),
            )])
            .with_description("Session summary")
            .into());
        }
        if self.node.config.conformance {
            if let Some(result) = conformance::get_prompt(&request) {
                return Ok(result.into());
            }
            if let Some(response) = conformance::get_mrtr_prompt(&request) {
                return Ok(response);
            }
        }
        Err(ErrorData::invalid_params(
            format!("unknown prompt: {}", request.name),
            None,
        ))
    }

    async fn get_task(
        &self,
        request: GetTaskParams,
        cx: RequestContext<RoleServer>,
    ) -> Result<GetTaskResult, ErrorData> {
        let owner = owner_of(&cx);
        self.node
            .tasks
            .get(owner.as_deref(), &request.task_id)
            .await
    }

    async fn update_task(
        &self,
        request: UpdateTaskParams,
        cx: RequestContext<RoleServer>,
    ) -> Result<(), ErrorData> {
        let owner = owner_of(&cx);
        self.node
            .tasks
            .update(owner.as_deref(), &request.task_id, request.input_responses)
            .await
    }

    async fn cancel_task(
        &self,
        request: CancelTaskParams,
        cx: RequestContext<RoleServer>,
    ) -> Result<(), ErrorData> {
        let owner = owner_of(&cx);
        self.node
            .tasks
            .cancel(owner.as_deref(), &request.task_id)
            .await
    }

    async fn complete(
        &self,
        request: CompleteRequestParams,
        _cx: RequestContext<RoleServer>,
    ) -> Result<CompleteResult, ErrorData> {
        Ok(conformance::complete(&request))
    }
}

/// JSON-RPC error code of a request ended by `notifications/cancelled`.
const REQUEST_CANCELLED: i32 = -32800;

/// Longest resource URI a session may subscribe to.
const MAX_SUBSCRIPTION_URI_LEN: usize = 2048;

/// The session ended (deleted or expired) while a request of it was running.
fn session_ended() -> ErrorData {
    ErrorData::invalid_request("session not found (it ended)", None)
}

fn resource_not_found(uri: &str) -> ErrorData {
    ErrorData::resource_not_found(
        format!("unknown resource: {uri}"),
        Some(json!({"uri": uri})),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calculator_covers_the_four_operations_and_refuses_division_by_zero() {
        assert_eq!(calculate("add", 2.0, 3.0), Ok(5.0));
        assert_eq!(calculate("subtract", 2.0, 3.0), Ok(-1.0));
        assert_eq!(calculate("multiply", 2.0, 3.0), Ok(6.0));
        assert_eq!(calculate("divide", 3.0, 2.0), Ok(1.5));
        assert_eq!(
            calculate("divide", 1.0, 0.0),
            Err("division by zero".into())
        );
        assert!(
            calculate("modulo", 1.0, 2.0).is_err(),
            "unknown operation is an error"
        );
        assert!(
            calculate("multiply", f64::MAX, 2.0).is_err(),
            "overflow is an error"
        );
    }

    #[test]
    fn level_order_follows_syslog() {
        assert!(level_rank(LoggingLevel::Debug) < level_rank(LoggingLevel::Info));
        assert!(level_rank(LoggingLevel::Error) < level_rank(LoggingLevel::Emergency));
    }
}
