//! Issue 12: tasks (SEP-2663) that any replica answers. Real Redis, real backends; each
//! request goes to the replica the test names, as a round-robin balancer would spread them.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tests::{Backend, Redis};

/// The `_meta` of a stateless 2026-07-28 request declaring `capabilities`.
pub(crate) fn meta(capabilities: Value) -> Value {
    json!({
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientInfo": {"name": "mcp-edge-tests", "version": "1"},
        "io.modelcontextprotocol/clientCapabilities": capabilities
    })
}

/// A stateless 2026-07-28 JSON-RPC request (id `id`) with `capabilities` in its `_meta` and
/// the routing headers the spec asks for (`Mcp-Name` from `name` or `taskId`), optionally
/// with a bearer token; returns the reply's headers and its JSON-RPC response.
pub(crate) async fn stateless(
    http: &reqwest::Client,
    url: &str,
    bearer: Option<&str>,
    id: Value,
    method: &str,
    (params, capabilities): (Value, Value),
) -> (reqwest::header::HeaderMap, Value) {
    let mut params = params;
    params["_meta"] = meta(capabilities);
    let mut r = http
        .post(url)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("mcp-protocol-version", "2026-07-28")
        .header("mcp-method", method);
    if let Some(n) = params
        .get("name")
        .or_else(|| params.get("taskId"))
        .and_then(Value::as_str)
    {
        r = r.header("mcp-name", n);
    }
    if let Some(t) = bearer {
        r = r.bearer_auth(t);
    }
    let body = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
    let reply = r
        .body(body.to_string())
        .send()
        .await
        .unwrap_or_else(|e| panic!("{method} to {url}: {e}"));
    let headers = reply.headers().clone();
    let mut text = reply.text().await.unwrap_or_default();
    let m = tests::parse_sse(&mut text)
        .iter()
        .filter_map(tests::SseEvent::json)
        .find(|m| m.get("id").is_some())
        .or_else(|| serde_json::from_str(&text).ok())
        .unwrap_or_else(|| panic!("{method}: no JSON-RPC response in {text:?}"));
    (headers, m)
}

/// A stateless request of a client that declares the tasks extension; returns the JSON-RPC
/// response.
pub(crate) async fn rpc(http: &reqwest::Client, url: &str, method: &str, params: Value) -> Value {
    let capabilities = json!({
        "elicitation": {},
        "extensions": {"io.modelcontextprotocol/tasks": {}}
    });
    stateless(http, url, None, json!(1), method, (params, capabilities))
        .await
        .1
}

/// Starts `name` with `args` on `url` and returns the task id of the CreateTaskResult.
pub(crate) async fn start_task(
    http: &reqwest::Client,
    url: &str,
    name: &str,
    args: Value,
) -> String {
    let m = rpc(
        http,
        url,
        "tools/call",
        json!({"name": name, "arguments": args}),
    )
    .await;
    assert_eq!(m["result"]["resultType"], "task", "{name} made a task: {m}");
    m["result"]["taskId"]
        .as_str()
        .unwrap_or_else(|| panic!("no taskId: {m}"))
        .to_owned()
}

pub(crate) async fn get(http: &reqwest::Client, url: &str, id: &str) -> Value {
    rpc(http, url, "tasks/get", json!({"taskId": id})).await
}

/// Polls `tasks/get` on `url` until `done` holds for the result; returns it and how long it
/// took.
async fn poll_until(
    http: &reqwest::Client,
    url: &str,
    id: &str,
    within: Duration,
    done: impl Fn(&Value) -> bool,
) -> (Value, Duration) {
    let started = Instant::now();
    loop {
        let m = get(http, url, id).await;
        if done(&m["result"]) {
            return (m["result"].clone(), started.elapsed());
        }
        assert!(
            started.elapsed() < within,
            "task {id} not there within {within:?}: last {m}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn status_is(status: &'static str) -> impl Fn(&Value) -> bool {
    move |r: &Value| r["status"] == status
}

#[tokio::test]
async fn a_task_created_on_one_replica_is_polled_on_the_others_and_cancelled_on_a_third() {
    let redis = Redis::start(false).await.expect("redis");
    let (b, _dir) = super::continuity::backends_on(&redis, &["a", "b", "c"], &[], None).await;
    let http = reqwest::Client::new();
    let (a, bb, c) = (b[0].mcp(), b[1].mcp(), b[2].mcp());

    // A short one runs to completion on A while B and C poll it.
    let id = start_task(&http, &a, "slow_task", json!({"steps": 3, "delay_ms": 100})).await;
    let first = get(&http, &bb, &id).await;
    assert_eq!(
        first["result"]["taskId"],
        id.as_str(),
        "an immediate get on B finds it: {first}"
    );
    let (done, _) = poll_until(
        &http,
        &c,
        &id,
        Duration::from_secs(10),
        status_is("completed"),
    )
    .await;
    assert_eq!(
        done["result"]["content"][0]["text"], "completed 3 steps",
        "{done}"
    );

    // A long one: B sees it working with a status message, C cancels it, B sees it cancelled.
    let id = start_task(
        &http,
        &a,
        "slow_task",
        json!({"steps": 100, "delay_ms": 300}),
    )
    .await;
    let (working, _) = poll_until(&http, &bb, &id, Duration::from_secs(10), |r| {
        r["status"] == "working"
            && r["statusMessage"]
                .as_str()
                .is_some_and(|m| m.starts_with("step "))
    })
    .await;
    assert!(working.get("result").is_none(), "{working}");
    let ack = rpc(&http, &c, "tasks/cancel", json!({"taskId": id})).await;
    assert_eq!(ack["result"], json!({"resultType": "complete"}), "{ack}");
    let (cancelled, took) = poll_until(
        &http,
        &bb,
        &id,
        Duration::from_secs(5),
        status_is("cancelled"),
    )
    .await;
    eprintln!("cancel on C reached the runner on A: B saw `cancelled` after {took:?}");
    assert!(cancelled.get("result").is_none(), "{cancelled}");
    let again = rpc(&http, &a, "tasks/cancel", json!({"taskId": id})).await;
    assert_eq!(
        again["result"],
        json!({"resultType": "complete"}),
        "a second cancel is the same ack"
    );

    let unknown = get(&http, &c, "0123456789abcdef0123456789abcdef").await;
    assert_eq!(unknown["error"]["code"], -32602, "{unknown}");
    // Hostile ids name no other key (hash tags, prefixes, case, length) and are unknown.
    for bad in [
        "mcp:{x}:t",
        "{0123456789abcdef0123456789abcde}",
        &id.to_uppercase(),
        &format!("{id}0"),
        "",
    ] {
        let m = get(&http, &c, bad).await;
        assert_eq!(m["error"]["code"], -32602, "{bad:?}: {m}");
    }
    let flood: serde_json::Map<String, Value> =
        (0..65).map(|i| (format!("k{i}"), json!({}))).collect();
    let m = rpc(
        &http,
        &bb,
        "tasks/update",
        json!({"taskId": id, "inputResponses": flood}),
    )
    .await;
    assert_eq!(m["error"]["code"], -32602, "more than 64 answers: {m}");

    // A's metrics say what ran there; the pollers ran nothing.
    let metric = |text: &str, event: &str| {
        let line = format!("mcp_backend_tasks_total{{event=\"{event}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&line)?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let scrape = |base: String| async move {
        reqwest::get(format!("{base}/metrics"))
            .await
            .expect("metrics")
            .text()
            .await
            .unwrap_or_default()
    };
    // (A counts an end right after writing it, so a poller may see the end a moment first.)
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let on_a = scrape(b[0].base()).await;
        let counts = ["created", "completed", "cancelled"].map(|e| metric(&on_a, e));
        if counts == [2, 1, 1] {
            break;
        }
        assert!(Instant::now() < deadline, "{counts:?}: {on_a}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(metric(&scrape(b[1].base()).await, "created"), 0);
}

#[tokio::test]
async fn an_input_required_task_is_answered_through_another_replica() {
    let redis = Redis::start(false).await.expect("redis");
    let (b, _dir) = super::continuity::backends_on(&redis, &["a", "b", "c"], &[], None).await;
    let http = reqwest::Client::new();
    let id = start_task(
        &http,
        &b[0].mcp(),
        "confirm",
        json!({"question": "Ship it?"}),
    )
    .await;
    let (asking, _) = poll_until(
        &http,
        &b[1].mcp(),
        &id,
        Duration::from_secs(10),
        status_is("input_required"),
    )
    .await;
    let request = &asking["inputRequests"]["confirmed"];
    assert_eq!(request["method"], "elicitation/create", "{asking}");
    assert_eq!(request["params"]["message"], "Ship it?", "{asking}");

    let answer = json!({"confirmed": {"action": "accept", "content": {"confirmed": true}}});
    let ack = rpc(
        &http,
        &b[2].mcp(),
        "tasks/update",
        json!({"taskId": id, "inputResponses": answer}),
    )
    .await;
    assert_eq!(ack["result"]["resultType"], "complete", "{ack}");
    let (done, took) = poll_until(
        &http,
        &b[1].mcp(),
        &id,
        Duration::from_secs(10),
        status_is("completed"),
    )
    .await;
    eprintln!("answer given on C reached the runner on A: completed after {took:?}");
    assert_eq!(
        done["result"]["structuredContent"]["confirmed"], true,
        "{done}"
    );
    assert_eq!(
        done["result"]["structuredContent"]["node"], "a",
        "it ran on the replica that created it: {done}"
    );
}

/// Three replicas with `yaml`, and a long `slow_task` (50 s) started on the first.
async fn long_task_on_a(
    yaml: &str,
) -> (Redis, Vec<Backend>, tests::TempDir, reqwest::Client, String) {
    let redis = Redis::start(false).await.expect("redis");
    let (b, dir) = super::continuity::backends_on(&redis, &["a", "b", "c"], &[], Some(yaml)).await;
    let http = reqwest::Client::new();
    let id = start_task(
        &http,
        &b[0].mcp(),
        "slow_task",
        json!({"steps": 100, "delay_ms": 500}),
    )
    .await;
    (redis, b, dir, http, id)
}

/// The replica running a task is SIGKILLed: the others report the task `failed`, with a
/// message saying why, within the lease (`tasks.lease_seconds: 3` here), never `working`
/// forever.
#[tokio::test]
async fn the_task_of_a_killed_replica_is_reported_failed_within_its_lease() {
    let lease = Duration::from_secs(3);
    let (_redis, mut b, _dir, http, id) = long_task_on_a("tasks: {lease_seconds: 3}\n").await;
    let (_, _) = poll_until(
        &http,
        &b[1].mcp(),
        &id,
        Duration::from_secs(5),
        status_is("working"),
    )
    .await;
    b[0].kill().await;
    let killed = Instant::now();
    let (failed, _) = poll_until(
        &http,
        &b[2].mcp(),
        &id,
        lease + Duration::from_secs(3),
        status_is("failed"),
    )
    .await;
    let took = killed.elapsed();
    eprintln!(
        "task of a SIGKILLed replica reported failed {took:?} after the kill (lease {lease:?})"
    );
    assert!(
        took <= lease + Duration::from_secs(1),
        "failed after {took:?}"
    );
    assert_eq!(failed["error"]["code"], -32603, "{failed}");
    assert!(
        failed["statusMessage"]
            .as_str()
            .is_some_and(|m| m.contains("stopped")),
        "{failed}"
    );
    // Every replica agrees, and stays so.
    let later = get(&http, &b[1].mcp(), &id).await;
    assert_eq!(later["result"]["status"], "failed", "{later}");
}

/// Without the extension a task-capable tool runs inline; the task surface answers -32021.
#[tokio::test]
async fn clients_without_the_extension_get_inline_results_and_no_task_surface() {
    let b = Backend::start("solo", None, &[]).await.expect("backend");
    let http = reqwest::Client::new();
    let call = json!({"name": "slow_task", "arguments": {"steps": 1, "delay_ms": 0}});
    let (_, m) = stateless(
        &http,
        &b.mcp(),
        None,
        json!(1),
        "tools/call",
        (call, json!({})),
    )
    .await;
    assert_eq!(
        m["result"]["content"][0]["text"], "completed 1 steps",
        "{m}"
    );
    assert!(m["result"].get("taskId").is_none(), "{m}");
    let poll = json!({"taskId": "0123456789abcdef0123456789abcdef"});
    let (_, m) = stateless(
        &http,
        &b.mcp(),
        None,
        json!(2),
        "tasks/get",
        (poll, json!({})),
    )
    .await;
    assert_eq!(m["error"]["code"], -32021, "{m}");
}

/// A replica leaving on SIGTERM (a rolling restart) fails the tasks it runs as it goes, so
/// pollers learn at once instead of after the lease (15 s here).
#[tokio::test]
async fn a_replica_leaving_on_sigterm_fails_its_tasks_at_once() {
    let (_redis, mut b, _dir, http, id) =
        long_task_on_a("shutdown_drain_seconds: 0\nshutdown_grace_seconds: 1\n").await;
    let started = Instant::now();
    b[0].terminate(Duration::from_secs(10))
        .await
        .expect("exits on SIGTERM");
    let failed = get(&http, &b[1].mcp(), &id).await;
    let took = started.elapsed();
    eprintln!("SIGTERM to exit took {took:?}; the task then read {failed}");
    assert_eq!(failed["result"]["status"], "failed", "{failed}");
    assert!(
        failed["result"]["statusMessage"]
            .as_str()
            .is_some_and(|m| m.contains("shut down")),
        "{failed}"
    );
    assert!(took < Duration::from_secs(15), "before the lease ran out");
}
