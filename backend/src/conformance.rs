//! Fixtures of the official MCP conformance suite (`@modelcontextprotocol/conformance`),
//! served with `--conformance`. Names, arguments and contents follow the suite's fixture
//! contract; they are test data, not product features.
#![allow(deprecated)] // logging and sampling are legacy-only, and the suite still calls them

use std::{sync::Arc, time::Duration};

use rmcp::{ErrorData, RoleServer, model::*, service::RequestContext};

use crate::{
    Node,
    tasks::{Started, Support, TaskCtx, TaskExit},
};
use serde_json::{Value, json};

/// A 1x1 red PNG.
const PNG: &str = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg==";
/// A minimal WAV file.
const WAV: &str = "UklGRiYAAABXQVZFZm10IBAAAAABAAEAQB8AAAB9AAACABAAZGF0YQIAAAA=";

fn schema(v: Value) -> Arc<JsonObject> {
    match v {
        Value::Object(m) => Arc::new(m),
        _ => Arc::new(JsonObject::new()),
    }
}

fn no_args() -> Arc<JsonObject> {
    schema(json!({"type": "object", "properties": {}}))
}

fn text(t: impl Into<String>) -> CallToolResult {
    CallToolResult::success(vec![ContentBlock::text(t)])
}

pub fn tools() -> Vec<Tool> {
    let simple =
        |name: &'static str, description: &'static str| Tool::new(name, description, no_args());
    vec![
        simple("test_simple_text", "Returns a simple text response"),
        simple("test_image_content", "Returns an image"),
        simple("test_audio_content", "Returns an audio clip"),
        simple("test_embedded_resource", "Returns an embedded resource"),
        simple(
            "test_multiple_content_types",
            "Returns text, image and resource content",
        ),
        simple(
            "test_tool_with_logging",
            "Sends three log messages while it runs",
        ),
        simple(
            "test_tool_with_progress",
            "Sends three progress notifications while it runs",
        ),
        simple("test_error_handling", "Always returns a tool error"),
        Tool::new(
            "test_sampling",
            "Asks the client's model to complete a prompt",
            schema(json!({
                "type": "object",
                "properties": {"prompt": {"type": "string", "description": "The prompt to send"}},
                "required": ["prompt"]
            })),
        ),
        Tool::new(
            "test_elicitation",
            "Asks the user for input",
            schema(json!({
                "type": "object",
                "properties": {"message": {"type": "string", "description": "The message to show"}},
                "required": ["message"]
            })),
        ),
        simple(
            "test_elicitation_sep1034_defaults",
            "Elicitation whose fields have defaults (SEP-1034)",
        ),
        simple(
            "test_elicitation_sep1330_enums",
            "Elicitation with every enum form (SEP-1330)",
        ),
        simple(
            "test_reconnection",
            "Closes its SSE stream mid-call; the client resumes",
        ),
        Tool::new(
            "json_schema_2020_12_tool",
            "Echoes arguments validated by a JSON Schema 2020-12 input schema",
            schema(json!({
                "$schema": "https://json-schema.org/draft/2020-12/schema",
                "type": "object",
                "$defs": {"address": {"$anchor": "addressDef", "type": "object",
                    "properties": {"street": {"type": "string"}, "city": {"type": "string"}}}},
                "properties": {
                    "name": {"type": "string"},
                    "address": {"$ref": "#/$defs/address"},
                    "contactMethod": {"type": "string", "enum": ["phone", "email"]},
                    "phone": {"type": "string"},
                    "email": {"type": "string"}
                },
                "allOf": [{"anyOf": [{"required": ["phone"]}, {"required": ["email"]}]}],
                "if": {"properties": {"contactMethod": {"const": "phone"}}, "required": ["contactMethod"]},
                "then": {"required": ["phone"]},
                "else": {"required": ["email"]},
                "additionalProperties": false
            })),
        ),
        simple(
            "test_missing_capability",
            "Needs the client's sampling capability",
        ),
        simple(
            "test_streaming_elicitation",
            "Streams notifications, never an independent request",
        ),
        simple(
            "test_logging_tool",
            "Logs only when the request opts in with a log level",
        ),
        simple(
            "test_trigger_tool_change",
            "Announces a tools/list change to listen streams",
        ),
        simple(
            "test_trigger_prompt_change",
            "Announces a prompts/list change to listen streams",
        ),
        simple(
            "test_input_required_result_elicitation",
            "Needs the user's name (MRTR elicitation)",
        ),
        simple(
            "test_input_required_result_sampling",
            "Needs a model completion (MRTR sampling)",
        ),
        simple(
            "test_input_required_result_list_roots",
            "Needs the client's roots (MRTR roots)",
        ),
        simple(
            "test_input_required_result_request_state",
            "Round-trips signed request state",
        ),
        simple(
            "test_input_required_result_multiple_inputs",
            "Needs three inputs in one round",
        ),
        simple(
            "test_input_required_result_multi_round",
            "Needs two rounds of input",
        ),
        simple(
            "test_input_required_result_tampered_state",
            "Refuses request state it did not sign",
        ),
        simple(
            "test_input_required_result_capabilities",
            "Asks only for inputs the client supports",
        ),
        Tool::new(
            "test_header_param",
            "Echoes its region, which 2026-07-28 clients also send as Mcp-Param-Region",
            schema(json!({
                "type": "object",
                "properties": {"region": {
                    "type": "string",
                    "description": "A region; mirrored in the Mcp-Param-Region header",
                    "x-mcp-header": "Region"
                }},
                "required": ["region"]
            })),
        ),
        Tool::new(
            "greet",
            "Greets by name (never a task)",
            schema(
                json!({"type": "object", "properties": {"name": {"type": "string"}},
                "required": ["name"]}),
            ),
        ),
        Tool::new(
            "slow_compute",
            "Sleeps `seconds`, then answers; a task for clients with the tasks extension",
            schema(json!({"type": "object", "properties": {
                "seconds": {"type": "number", "minimum": 0, "maximum": 300},
                "label": {"type": "string"}}})),
        ),
        simple(
            "failing_job",
            "Runs only as a task, and ends with a tool error",
        ),
        simple(
            "protocol_error_job",
            "Ends with a protocol error (a failed task)",
        ),
        Tool::new(
            "confirm_delete",
            "Asks to confirm deleting a file (a task's input request)",
            schema(json!({"type": "object", "properties": {"filename": {"type": "string"}}})),
        ),
        simple(
            "multi_input",
            "Asks two questions at once (task input requests)",
        ),
        simple(
            "test_tool_with_task",
            "Asks a name synchronously (MRTR), then greets it from a task",
        ),
    ]
}

/// Whether a fixture runs as a task for clients that declare the extension.
pub fn task_support(name: &str) -> Option<Support> {
    match name {
        "slow_compute" | "protocol_error_job" | "confirm_delete" | "multi_input" => {
            Some(Support::Optional)
        }
        "failing_job" | "test_tool_with_task" => Some(Support::Required),
        _ => None,
    }
}

fn confirm_request(message: String) -> Option<InputRequest> {
    input_request(
        "elicitation/create",
        json!({"message": message, "requestedSchema": {"type": "object",
            "properties": {"confirm": {"type": "boolean"}}, "required": ["confirm"]}}),
    )
}

fn requests(list: Vec<(&str, Option<InputRequest>)>) -> Result<InputRequests, TaskExit> {
    list.into_iter()
        .map(|(k, r)| {
            r.map(|r| (k.to_owned(), r)).ok_or_else(|| {
                TaskExit::Error(ErrorData::internal_error("bad input request fixture", None))
            })
        })
        .collect()
}

/// Sleeps `seconds` unless the task is cancelled first.
async fn sleep_or_cancel(ctx: &TaskCtx, seconds: f64) -> Result<(), TaskExit> {
    tokio::select! {
        () = tokio::time::sleep(Duration::from_secs_f64(seconds.clamp(0.0, 300.0))) => Ok(()),
        () = ctx.cancelled() => Err(TaskExit::Cancelled),
    }
}

/// The task body of a fixture, or (MRTR before the task) an answer now.
pub fn task_work(request: &CallToolRequestParams) -> Result<Started, ErrorData> {
    let args = request.arguments.clone().unwrap_or_default();
    let seconds = args.get("seconds").and_then(Value::as_f64).unwrap_or(1.0);
    let work: Started = match request.name.as_ref() {
        "slow_compute" => Started::task(move |ctx| async move {
            ctx.status(format!("sleeping {seconds} s")).await;
            sleep_or_cancel(&ctx, seconds).await?;
            Ok(text(format!("computed after {seconds} s")))
        }),
        "failing_job" => Started::task(|ctx| async move {
            sleep_or_cancel(&ctx, 1.0).await?;
            Ok(CallToolResult::error(vec![ContentBlock::text(
                "the job failed (a tool error)",
            )]))
        }),
        "protocol_error_job" => Started::task(|ctx| async move {
            sleep_or_cancel(&ctx, 0.2).await?;
            Err(TaskExit::Error(ErrorData::internal_error(
                "the job hit a protocol error",
                None,
            )))
        }),
        "confirm_delete" => {
            let file = args
                .get("filename")
                .and_then(Value::as_str)
                .unwrap_or("file")
                .to_owned();
            Started::task(move |ctx| async move {
                let asked = requests(vec![(
                    "confirm",
                    confirm_request(format!("Delete {file}?")),
                )])?;
                let answers = ctx.request_input(asked).await?;
                let yes = answers
                    .get("confirm")
                    .and_then(|a| a.get("content"))
                    .and_then(|c| c.get("confirm"))
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
                Ok(text(if yes {
                    format!("deleted {file}")
                } else {
                    format!("kept {file}")
                }))
            })
        }
        "multi_input" => Started::task(|ctx| async move {
            let asked = requests(vec![
                ("first", elicit_field("First name?", "name")),
                ("second", confirm_request("Proceed?".into())),
            ])?;
            let answers = ctx.request_input(asked).await?;
            Ok(text(format!("received {} answers", answers.len())))
        }),
        "test_tool_with_task" => {
            let empty = InputResponses::new();
            let responses = request.input_responses.as_ref().unwrap_or(&empty);
            match accepted(responses, "user_name", "name") {
                Some(name) => {
                    let name = name.to_owned();
                    Started::task(move |ctx| async move {
                        sleep_or_cancel(&ctx, 0.2).await?;
                        Ok(text(format!("Hello, {name}! (from a task)")))
                    })
                }
                None => Started::Now(
                    input_required(
                        vec![("user_name", elicit_field("What is your name?", "name"))],
                        None,
                    )
                    .into(),
                ),
            }
        }
        other => {
            return Err(ErrorData::invalid_params(
                format!("{other} does not run as a task"),
                None,
            ));
        }
    };
    Ok(work)
}

/// Bus topic that carries list changes to every replica's `subscriptions/listen` streams.
pub const CHANGED_TOPIC: &str = "changed";

fn input_request(method: &str, params: Value) -> Option<InputRequest> {
    serde_json::from_value(json!({"method": method, "params": params}))
        .inspect_err(|e| tracing::warn!(error = %e, method, "bad input request fixture"))
        .ok()
}

fn elicit_field(message: &str, field: &str) -> Option<InputRequest> {
    input_request(
        "elicitation/create",
        json!({"message": message, "requestedSchema": {"type": "object",
            "properties": {field: {"type": "string"}}, "required": [field]}}),
    )
}

fn sample(question: &str) -> Option<InputRequest> {
    input_request(
        "sampling/createMessage",
        json!({"messages": [{"role": "user", "content": {"type": "text", "text": question}}],
            "maxTokens": 100}),
    )
}

fn roots() -> Option<InputRequest> {
    input_request("roots/list", json!({}))
}

fn input_required(
    requests: Vec<(&str, Option<InputRequest>)>,
    state: Option<String>,
) -> InputRequiredResult {
    let requests: InputRequests = requests
        .into_iter()
        .filter_map(|(k, r)| Some((k.to_owned(), r?)))
        .collect();
    InputRequiredResult::new(Some(requests), state)
}

/// Request state as `<payload>.<checksum>`. A fixture, not a security boundary: the checksum
/// only makes edits detectable, identically on every replica.
fn sign_state(payload: &str) -> String {
    format!("{payload}.{:016x}", checksum(payload))
}

fn checksum(payload: &str) -> u64 {
    // FNV-1a: stable across processes and replicas, unlike std's randomly keyed hasher.
    payload.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn verify_state(state: &str) -> Option<&str> {
    let (payload, sum) = state.rsplit_once('.')?;
    (format!("{:016x}", checksum(payload)) == sum).then_some(payload)
}

/// The string field `field` of an accepted elicitation answer under `key`.
fn accepted<'a>(responses: &'a InputResponses, key: &str, field: &str) -> Option<&'a str> {
    let r = responses.get(key)?;
    if r.get("action")?.as_str()? != "accept" {
        return None;
    }
    r.get("content")?.get(field)?.as_str()
}

fn sampled_text<'a>(responses: &'a InputResponses, key: &str) -> Option<&'a str> {
    responses.get(key)?.get("content")?.get("text")?.as_str()
}

fn bad_state() -> ErrorData {
    ErrorData::invalid_params("request state is invalid or was modified", None)
}

/// The multi-round-trip (MRTR) fixtures of protocol 2026-07-28; `None` for other tools.
fn call_mrtr_tool(
    request: &CallToolRequestParams,
    cx: &RequestContext<RoleServer>,
) -> Option<Result<CallToolResponse, ErrorData>> {
    let empty = InputResponses::new();
    let responses = request.input_responses.as_ref().unwrap_or(&empty);
    let state = request.request_state.as_deref().map(verify_state);
    let done = |t: String| Some(Ok(text(t).into()));
    let ask = |r: InputRequiredResult| Some(Ok(r.into()));
    let ask_name = || {
        input_required(
            vec![("user_name", elicit_field("What is your name?", "name"))],
            None,
        )
    };
    match request.name.as_ref() {
        "test_input_required_result_elicitation" => {
            match accepted(responses, "user_name", "name") {
                Some(name) => done(format!("Hello, {name}!")),
                None => ask(ask_name()),
            }
        }
        "test_input_required_result_sampling" => match sampled_text(responses, "capital") {
            Some(t) => done(format!("The model said: {t}")),
            None => ask(input_required(
                vec![("capital", sample("What is the capital of France?"))],
                None,
            )),
        },
        "test_input_required_result_list_roots" => match responses.get("roots") {
            Some(r) if r.get("roots").is_some_and(Value::is_array) => {
                done(format!("Roots: {}", r["roots"]))
            }
            _ => ask(input_required(vec![("roots", roots())], None)),
        },
        "test_input_required_result_request_state"
        | "test_input_required_result_tampered_state" => {
            let confirm = || {
                input_request(
                    "elicitation/create",
                    json!({"message": "Confirm?",
                    "requestedSchema": {"type": "object",
                        "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}}),
                )
            };
            match state {
                None => ask(input_required(
                    vec![("confirm", confirm())],
                    Some(sign_state("round-1")),
                )),
                Some(Some("round-1")) if responses.contains_key("confirm") => {
                    done("State verified and input received".into())
                }
                Some(Some("round-1")) => ask(input_required(
                    vec![("confirm", confirm())],
                    Some(sign_state("round-1")),
                )),
                Some(_) => Some(Err(bad_state())),
            }
        }
        "test_input_required_result_multiple_inputs" => match state {
            Some(Some("multi"))
                if accepted(responses, "user_name", "name").is_some()
                    && sampled_text(responses, "greeting").is_some()
                    && responses.contains_key("roots") =>
            {
                done("All inputs received".into())
            }
            None | Some(Some("multi")) => ask(input_required(
                vec![
                    ("user_name", elicit_field("What is your name?", "name")),
                    ("greeting", sample("Say hello")),
                    ("roots", roots()),
                ],
                Some(sign_state("multi")),
            )),
            Some(_) => Some(Err(bad_state())),
        },
        "test_input_required_result_multi_round" => match state {
            None => ask(input_required(
                vec![("name", elicit_field("What is your name?", "name"))],
                Some(sign_state("round-1")),
            )),
            Some(Some("round-1")) if accepted(responses, "name", "name").is_some() => {
                ask(input_required(
                    vec![("color", elicit_field("Favourite colour?", "color"))],
                    Some(sign_state("round-2")),
                ))
            }
            Some(Some("round-1")) => ask(input_required(
                vec![("name", elicit_field("What is your name?", "name"))],
                Some(sign_state("round-1")),
            )),
            Some(Some("round-2")) => match accepted(responses, "color", "color") {
                Some(color) => done(format!("Favourite colour: {color}")),
                None => ask(input_required(
                    vec![("color", elicit_field("Favourite colour?", "color"))],
                    Some(sign_state("round-2")),
                )),
            },
            Some(_) => Some(Err(bad_state())),
        },
        "test_input_required_result_capabilities" => {
            let caps = cx.meta.client_capabilities().unwrap_or_default();
            let mut wanted = Vec::new();
            if caps.elicitation.is_some() {
                wanted.push(("user_name", elicit_field("What is your name?", "name")));
            }
            if caps.sampling.is_some() {
                wanted.push(("greeting", sample("Say hello")));
            }
            if caps.roots.is_some() {
                wanted.push(("roots", roots()));
            }
            if wanted.is_empty() || !responses.is_empty() {
                done("Capabilities respected".into())
            } else {
                ask(input_required(wanted, None))
            }
        }
        _ => None,
    }
}

/// `prompts/get test_input_required_result_prompt` (MRTR on a non-tool request).
pub fn get_mrtr_prompt(request: &GetPromptRequestParams) -> Option<GetPromptResponse> {
    if request.name != "test_input_required_result_prompt" {
        return None;
    }
    let empty = InputResponses::new();
    let responses = request.input_responses.as_ref().unwrap_or(&empty);
    Some(match accepted(responses, "context", "context") {
        Some(context) => GetPromptResult::new(vec![PromptMessage::new_text(
            Role::User,
            format!("Use this context: {context}"),
        )])
        .into(),
        None => input_required(
            vec![("context", elicit_field("Which context?", "context"))],
            None,
        )
        .into(),
    })
}

async fn elicit(
    cx: &RequestContext<RoleServer>,
    message: &str,
    requested: Value,
) -> Result<ElicitResult, String> {
    let requested_schema: ElicitationSchema =
        serde_json::from_value(requested).map_err(|e| e.to_string())?;
    cx.peer
        .create_elicitation(ElicitRequestParams::FormElicitationParams {
            meta: None,
            message: message.to_owned(),
            requested_schema,
        })
        .await
        .map_err(|e| e.to_string())
}

fn elicitation_text(prefix: &str, r: Result<ElicitResult, String>) -> CallToolResult {
    match r {
        Ok(r) => text(format!(
            "{prefix}: action={}, content={}",
            serde_json::to_value(&r.action)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
            serde_json::to_string(&r.content).unwrap_or_default()
        )),
        Err(e) => {
            CallToolResult::error(vec![ContentBlock::text(format!("elicitation failed: {e}"))])
        }
    }
}

/// Runs a fixture tool; `Ok(None)` when `request` names none.
pub async fn call_tool(
    node: &Node,
    request: &CallToolRequestParams,
    cx: &RequestContext<RoleServer>,
) -> Result<Option<CallToolResponse>, ErrorData> {
    if let Some(r) = call_mrtr_tool(request, cx) {
        return r.map(Some);
    }
    let args = request.arguments.clone().unwrap_or_default();
    let result = match request.name.as_ref() {
        "test_simple_text" => text("This is a simple text response for testing."),
        "greet" => text(format!(
            "Hello, {}!",
            args.get("name").and_then(Value::as_str).unwrap_or("World")
        )),
        "slow_compute" => {
            let seconds = args.get("seconds").and_then(Value::as_f64).unwrap_or(0.0);
            tokio::time::sleep(Duration::from_secs_f64(seconds.clamp(0.0, 300.0))).await;
            text(format!("computed after {seconds} s"))
        }
        "protocol_error_job" => {
            return Err(ErrorData::internal_error(
                "the job hit a protocol error",
                None,
            ));
        }
        "confirm_delete" | "multi_input" => CallToolResult::error(vec![ContentBlock::text(
            "this tool asks for input while it runs: call it with the tasks extension",
        )]),
        "test_header_param" => text(format!(
            "region={}",
            args.get("region").and_then(Value::as_str).unwrap_or("")
        )),
        "test_image_content" => {
            CallToolResult::success(vec![ContentBlock::image(PNG, "image/png")])
        }
        "test_audio_content" => CallToolResult::success(vec![ContentBlock::Audio(
            AudioContent::new(WAV, "audio/wav"),
        )]),
        "test_embedded_resource" => CallToolResult::success(vec![ContentBlock::resource(
            ResourceContents::text(
                "This is an embedded resource content.",
                "test://embedded-resource",
            )
            .with_mime_type("text/plain"),
        )]),
        "test_multiple_content_types" => CallToolResult::success(vec![
            ContentBlock::text("Multiple content types test:"),
            ContentBlock::image(PNG, "image/png"),
            ContentBlock::resource(
                ResourceContents::text(
                    r#"{"test":"data","value":123}"#,
                    "test://mixed-content-resource",
                )
                .with_mime_type("application/json"),
            ),
        ]),
        "test_tool_with_logging" => {
            for message in [
                "Tool execution started",
                "Tool processing data",
                "Tool execution completed",
            ] {
                let _ = cx
                    .peer
                    .notify_logging_message(LoggingMessageNotificationParam::new(
                        LoggingLevel::Info,
                        json!(message),
                    ))
                    .await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            text("Tool with logging executed successfully")
        }
        "test_tool_with_progress" => {
            let token = cx.meta.get_progress_token();
            for progress in [0.0, 50.0, 100.0] {
                if let Some(token) = &token {
                    let _ = cx
                        .peer
                        .notify_progress(
                            ProgressNotificationParam::new(token.clone(), progress)
                                .with_total(100.0)
                                .with_message(format!("Completed step {progress} of 100")),
                        )
                        .await;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let token = token
                .and_then(|t| serde_json::to_value(&t).ok())
                .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned))
                .unwrap_or_default();
            text(token)
        }
        "test_error_handling" => CallToolResult::error(vec![ContentBlock::text(
            "This tool intentionally returns an error for testing",
        )]),
        "test_sampling" => {
            let prompt = args
                .get("prompt")
                .and_then(Value::as_str)
                .unwrap_or("Hello");
            match cx
                .peer
                .create_message(CreateMessageRequestParams::new(
                    vec![SamplingMessage::user_text(prompt)],
                    100,
                ))
                .await
            {
                Ok(r) => {
                    let reply = r
                        .message
                        .content
                        .first()
                        .and_then(|c| c.as_text())
                        .map(|t| t.text.clone())
                        .unwrap_or_default();
                    text(format!("LLM response: {reply}"))
                }
                Err(e) => {
                    CallToolResult::error(vec![ContentBlock::text(format!("sampling failed: {e}"))])
                }
            }
        }
        "test_elicitation" => {
            let message = args
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("Please provide your information");
            let r = elicit(
                cx,
                message,
                json!({"type": "object",
                    "properties": {"response": {"type": "string", "description": "User's response"}},
                    "required": ["response"]}),
            )
            .await;
            elicitation_text("User response", r)
        }
        "test_elicitation_sep1034_defaults" => {
            let r = elicit(
                cx,
                "Please review and update the form fields with defaults",
                json!({"type": "object", "properties": {
                    "name": {"type": "string", "description": "User name", "default": "John Doe"},
                    "age": {"type": "integer", "description": "User age", "default": 30},
                    "score": {"type": "number", "description": "User score", "default": 95.5},
                    "status": {"type": "string", "description": "User status",
                        "enum": ["active", "inactive", "pending"], "default": "active"},
                    "verified": {"type": "boolean", "description": "Verification status", "default": true}
                }, "required": []}),
            )
            .await;
            elicitation_text("Elicitation completed", r)
        }
        "test_elicitation_sep1330_enums" => {
            let r = elicit(
                cx,
                "Please select options from the enum fields",
                json!({"type": "object", "properties": {
                    "untitledSingle": {"type": "string", "description": "Untitled single-select",
                        "enum": ["option1", "option2", "option3"]},
                    "titledSingle": {"type": "string", "description": "Titled single-select",
                        "oneOf": [{"const": "value1", "title": "First Option"},
                                  {"const": "value2", "title": "Second Option"},
                                  {"const": "value3", "title": "Third Option"}]},
                    "legacyEnum": {"type": "string", "description": "Legacy titled enum",
                        "enum": ["opt1", "opt2", "opt3"],
                        "enumNames": ["Option One", "Option Two", "Option Three"]},
                    "untitledMulti": {"type": "array", "description": "Untitled multi-select",
                        "minItems": 1, "maxItems": 3,
                        "items": {"type": "string", "enum": ["option1", "option2", "option3"]}},
                    "titledMulti": {"type": "array", "description": "Titled multi-select",
                        "minItems": 1, "maxItems": 3,
                        "items": {"anyOf": [{"const": "value1", "title": "First Choice"},
                                            {"const": "value2", "title": "Second Choice"},
                                            {"const": "value3", "title": "Third Choice"}]}}
                }, "required": []}),
            )
            .await;
            elicitation_text("Elicitation completed", r)
        }
        "test_reconnection" => {
            tokio::time::sleep(Duration::from_millis(100)).await;
            text("Reconnection test completed")
        }
        "json_schema_2020_12_tool" => text(serde_json::to_string(&args).unwrap_or_default()),
        "test_missing_capability" => {
            let has_sampling = cx
                .meta
                .client_capabilities()
                .or_else(|| cx.peer.peer_info().map(|i| i.capabilities.clone()))
                .is_some_and(|c| c.sampling.is_some());
            if !has_sampling {
                return Err(ErrorData::new(
                    ErrorCode::MISSING_REQUIRED_CLIENT_CAPABILITY,
                    "this tool needs the client's sampling capability",
                    Some(json!({"requiredCapabilities": {"sampling": {}}})),
                ));
            }
            text("Success")
        }
        "test_streaming_elicitation" => {
            if let Some(token) = cx.meta.get_progress_token() {
                let _ = cx
                    .peer
                    .notify_progress(ProgressNotificationParam::new(token, 1.0).with_total(1.0))
                    .await;
            }
            text("Streaming complete")
        }
        "test_logging_tool" => {
            // 2026-07-28: log only when the request opted in with a level.
            if let Some(level) = cx.meta.log_level() {
                let _ = cx
                    .peer
                    .notify_logging_message(LoggingMessageNotificationParam::new(
                        level,
                        json!("logging tool ran"),
                    ))
                    .await;
            }
            text("Logging evaluated")
        }
        "test_trigger_tool_change" | "test_trigger_prompt_change" => {
            let what = if request.name == "test_trigger_tool_change" {
                "tools"
            } else {
                "prompts"
            };
            node.store
                .publish(CHANGED_TOPIC, what)
                .await
                .map_err(|e| ErrorData::internal_error(e.to_string(), None))?;
            text("Mutation triggered")
        }
        _ => return Ok(None),
    };
    Ok(Some(result.into()))
}

pub fn resources() -> Vec<Resource> {
    vec![
        Resource::new("test://static-text", "static-text")
            .with_title("Static Text Resource")
            .with_description("A static text resource for testing")
            .with_mime_type("text/plain"),
        Resource::new("test://static-binary", "static-binary")
            .with_title("Static Binary Resource")
            .with_description("A static binary resource (image) for testing")
            .with_mime_type("image/png"),
        Resource::new("test://watched-resource", "watched-resource")
            .with_title("Watched Resource")
            .with_description("A resource that can be subscribed to")
            .with_mime_type("text/plain"),
    ]
}

pub fn resource_templates() -> Vec<ResourceTemplate> {
    vec![
        ResourceTemplate::new("test://template/{id}/data", "template")
            .with_title("Template Resource")
            .with_description("A resource template with a parameter")
            .with_mime_type("application/json"),
    ]
}

/// Reads a fixture resource; `None` when `uri` names none.
pub fn read_resource(uri: &str) -> Option<ReadResourceResult> {
    let contents = match uri {
        "test://static-text" => {
            ResourceContents::text("This is the content of the static text resource.", uri)
                .with_mime_type("text/plain")
        }
        "test://static-binary" => ResourceContents::blob(PNG, uri).with_mime_type("image/png"),
        "test://watched-resource" => {
            ResourceContents::text("Watched resource content", uri).with_mime_type("text/plain")
        }
        _ => {
            let id = uri
                .strip_prefix("test://template/")?
                .strip_suffix("/data")
                .filter(|id| !id.is_empty() && !id.contains('/'))?;
            ResourceContents::text(
                json!({"id": id, "templateTest": true, "data": format!("Data for ID: {id}")})
                    .to_string(),
                uri,
            )
            .with_mime_type("application/json")
        }
    };
    Some(ReadResourceResult::new(vec![contents]))
}

pub fn prompts() -> Vec<Prompt> {
    let arg = |name: &str, description: &str| {
        PromptArgument::new(name)
            .with_description(description)
            .with_required(true)
    };
    vec![
        Prompt::new(
            "test_simple_prompt",
            Some("A simple prompt without arguments"),
            None,
        ),
        Prompt::new(
            "test_prompt_with_arguments",
            Some("A prompt with required arguments"),
            Some(vec![
                arg("arg1", "First test argument"),
                arg("arg2", "Second test argument"),
            ]),
        ),
        Prompt::new(
            "test_prompt_with_embedded_resource",
            Some("A prompt that includes an embedded resource"),
            Some(vec![arg("resourceUri", "URI of the resource to embed")]),
        ),
        Prompt::new(
            "test_prompt_with_image",
            Some("A prompt that includes image content"),
            None,
        ),
    ]
}

/// Renders a fixture prompt; `None` when `request` names none.
pub fn get_prompt(request: &GetPromptRequestParams) -> Option<GetPromptResult> {
    let arg = |k: &str| {
        request
            .arguments
            .as_ref()
            .and_then(|a| a.get(k))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    let user = |t: String| PromptMessage::new_text(Role::User, t);
    let messages = match request.name.as_str() {
        "test_simple_prompt" => vec![user("This is a simple prompt for testing.".into())],
        "test_prompt_with_arguments" => vec![user(format!(
            "Prompt with arguments: arg1='{}', arg2='{}'",
            arg("arg1"),
            arg("arg2")
        ))],
        "test_prompt_with_embedded_resource" => vec![
            PromptMessage::new(
                Role::User,
                ContentBlock::resource(
                    ResourceContents::text(
                        "Embedded resource content for testing.",
                        arg("resourceUri"),
                    )
                    .with_mime_type("text/plain"),
                ),
            ),
            user("Please process the embedded resource above.".into()),
        ],
        "test_prompt_with_image" => vec![
            PromptMessage::new(Role::User, ContentBlock::image(PNG, "image/png")),
            user("Please analyze the image above.".into()),
        ],
        _ => return None,
    };
    Some(GetPromptResult::new(messages))
}

/// `completion/complete`: no suggestions (any array passes; the product has nothing to complete).
pub fn complete(_request: &CompleteRequestParams) -> CompleteResult {
    CompleteResult::default()
}
