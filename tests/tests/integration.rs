//! The one integration-test binary: real Redis, real `mcp-backend` processes, real clients.
#![allow(clippy::expect_used, clippy::unwrap_used)] // a failed expectation is the test failing

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tests::{
    Backend, McpClient, Proxy, Redis, Relay, assert_eventually, next_matching, tools_path,
};

const WAIT: Duration = Duration::from_secs(10);

#[path = "suites/backend_security.rs"]
mod backend_security;
#[path = "suites/continuity.rs"]
mod continuity;
#[path = "suites/deploy.rs"]
mod deploy;
#[path = "suites/edge_security.rs"]
mod edge_security;
#[path = "suites/list_cache.rs"]
mod list_cache;
#[path = "suites/observability.rs"]
mod observability;
#[path = "suites/session_state.rs"]
mod session_state;
#[path = "suites/tasks.rs"]
mod tasks;

async fn cluster(n: usize, aof: bool) -> (Redis, Vec<Backend>) {
    let redis = Redis::start(aof)
        .await
        .unwrap_or_else(|e| panic!("redis: {e:#}"));
    let mut backends = Vec::new();
    for i in 0..n {
        let name = ["a", "b", "c"][i];
        backends.push(
            Backend::start(name, Some(&redis.url()), &[])
                .await
                .unwrap_or_else(|e| panic!("backend {name}: {e:#}")),
        );
    }
    (redis, backends)
}

/// A client with a session initialized on `url` (`notifications/initialized` sent).
async fn session_on(url: &str, capabilities: Value) -> McpClient {
    let mut c = McpClient::new();
    c.initialize(url, capabilities)
        .await
        .unwrap_or_else(|e| panic!("initialize on {url}: {e:#}"));
    c
}

fn text(result: &Value) -> String {
    result["content"][0]["text"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

async fn counter(c: &McpClient, b: &Backend, id: i64) -> i64 {
    let r = c
        .tool(&b.mcp(), id, "counter", json!({"action": "increment"}))
        .await
        .unwrap_or_else(|e| panic!("counter on {}: {e:#}", b.node_id));
    assert_eq!(
        r["structuredContent"]["node"], b.node_id,
        "the request must have been served by replica {}",
        b.node_id
    );
    r["structuredContent"]["value"].as_i64().unwrap_or(-1)
}

#[tokio::test]
async fn a_session_started_on_one_replica_is_served_by_every_other() {
    let (redis, b) = cluster(3, false).await;
    let c = session_on(&b[0].mcp(), json!({})).await;
    let echo = c
        .tool(&b[1].mcp(), 1, "echo", json!({"message": "hi from b"}))
        .await
        .expect("tools/call on b");
    assert_eq!(text(&echo), "hi from b", "b serves a's session");
    let info = c
        .call(
            &b[2].mcp(),
            2,
            "resources/read",
            json!({"uri": "system://info"}),
        )
        .await
        .and_then(|r| r.result(2))
        .expect("resources/read on c");
    let body: Value = serde_json::from_str(info["contents"][0]["text"].as_str().unwrap_or("{}"))
        .unwrap_or_default();
    assert_eq!(body["nodeId"], "c", "c answered resources/read");
    assert_eq!(counter(&c, &b[0], 3).await, 1);
    assert_eq!(
        counter(&c, &b[1], 4).await,
        2,
        "counter keeps counting on b"
    );
    assert_eq!(
        counter(&c, &b[2], 5).await,
        3,
        "counter keeps counting on c"
    );
    let calc = c
        .tool(
            &b[1].mcp(),
            6,
            "calculator",
            json!({"operation": "divide", "a": 1, "b": 0}),
        )
        .await
        .expect("calculator");
    assert_eq!(calc["isError"], true, "division by zero is a tool error");
    // The session record is in Redis with its sliding TTL.
    let key = tests::session_key(&c.session.clone().unwrap_or_default());
    let ttl: i64 = redis
        .cli(&["TTL", &key])
        .await
        .unwrap_or_default()
        .parse()
        .unwrap_or(-3);
    assert!(
        (1..=1800).contains(&ttl),
        "session record {key} must carry the 30 min TTL, got {ttl}"
    );
}

#[tokio::test]
async fn delete_on_one_replica_is_404_on_every_replica() {
    let (_redis, b) = cluster(3, false).await;
    let c = session_on(&b[0].mcp(), json!({})).await;
    c.call(&b[2].mcp(), 1, "ping", json!({}))
        .await
        .expect("ping on c")
        .result(1)
        .expect("ping ok");
    assert_eq!(
        c.delete(&b[0].mcp()).await.ok(),
        Some(200),
        "DELETE succeeds with 200"
    );
    for (i, r) in b.iter().enumerate() {
        let reply = c
            .call(&r.mcp(), 10 + i as i64, "ping", json!({}))
            .await
            .expect("post");
        assert_eq!(
            reply.status, 404,
            "replica {} must answer 404 after DELETE",
            r.node_id
        );
    }
    assert_eq!(
        c.delete(&b[1].mcp()).await.ok(),
        Some(404),
        "second DELETE is 404"
    );
}

#[tokio::test]
async fn last_event_id_on_another_replica_replays_that_stream_only() {
    let (_redis, b) = cluster(2, false).await;
    let c = session_on(&b[0].mcp(), json!({})).await;
    let reply = c
        .post(
            &b[0].mcp(),
            &json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {
                "name": "slow_task", "arguments": {"steps": 3, "delay_ms": 10},
                "_meta": {"progressToken": "p1"}}}),
        )
        .await
        .expect("slow_task on a");
    let ids: Vec<String> = reply.events.iter().filter_map(|e| e.id.clone()).collect();
    assert!(
        ids.len() >= 5,
        "priming, 3 progress and the result carry ids: {ids:?}"
    );
    // Resume after the first progress notification, on replica b.
    let (status, mut rx) = c
        .open_stream(&b[1].mcp(), Some(&ids[1]))
        .await
        .expect("resume on b");
    assert_eq!(status, 200);
    let mut replayed = Vec::new();
    while let Ok(Some(ev)) = tokio::time::timeout(Duration::from_secs(3), rx.recv()).await {
        replayed.push(ev);
    }
    let replayed_ids: Vec<String> = replayed.iter().filter_map(|e| e.id.clone()).collect();
    assert_eq!(
        replayed_ids,
        ids[2..].to_vec(),
        "b replays exactly the later events of that stream"
    );
    assert!(
        replayed
            .last()
            .and_then(|e| e.json())
            .is_some_and(|m| m["id"] == 7),
        "the replay ends with the tool result"
    );
    // Another session presenting this session's event id gets nothing of it.
    let other = session_on(&b[1].mcp(), json!({})).await;
    let (_, mut rx) = other
        .open_stream(&b[0].mcp(), Some(&ids[1]))
        .await
        .expect("foreign resume");
    let leaked = next_matching(&mut rx, Duration::from_secs(1), |m| m["id"] == 7).await;
    assert!(
        leaked.is_none(),
        "another session's events must never be replayed"
    );
}

#[tokio::test]
async fn a_notification_raised_on_one_replica_reaches_the_stream_held_on_another() {
    let (_redis, b) = cluster(2, false).await;
    let c = session_on(&b[0].mcp(), json!({})).await;
    let (status, mut stream) = c.open_stream(&b[0].mcp(), None).await.expect("GET on a");
    assert_eq!(status, 200, "standalone stream opens on a");
    // Let the subscription settle: the first request may race the GET's setup.
    tokio::time::sleep(Duration::from_millis(200)).await;
    c.tool(&b[1].mcp(), 1, "notify", json!({"message": "from b"}))
        .await
        .expect("notify on b");
    let log = next_matching(&mut stream, WAIT, |m| {
        m["method"] == "notifications/message"
    })
    .await;
    let log = log
        .and_then(|e| e.json())
        .expect("log message reaches the stream on a");
    assert_eq!(log["params"]["data"]["node"], "b", "it was raised on b");
    let update = next_matching(&mut stream, WAIT, |m| {
        m["method"] == "notifications/resources/updated"
    })
    .await;
    assert!(
        update.is_some(),
        "resources/updated reaches the stream on a"
    );
}

#[tokio::test]
async fn an_elicitation_issued_on_one_replica_is_answered_through_another() {
    let (_redis, b) = cluster(2, false).await;
    let c = session_on(&b[0].mcp(), json!({"elicitation": {}})).await;
    let (_, mut call) = c
        .post_stream(
            &b[0].mcp(),
            &json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call",
                    "params": {"name": "confirm", "arguments": {"question": "Deploy?"}}}),
        )
        .await
        .expect("confirm on a");
    let ask = next_matching(&mut call, WAIT, |m| m["method"] == "elicitation/create")
        .await
        .and_then(|e| e.json())
        .expect("a sends elicitation/create");
    let answer = json!({"jsonrpc": "2.0", "id": ask["id"],
        "result": {"action": "accept", "content": {"confirmed": true}}});
    let posted = c
        .post(&b[1].mcp(), &answer)
        .await
        .expect("answer posted to b");
    assert_eq!(posted.status, 202, "b accepts the client's reply");
    let result = next_matching(&mut call, WAIT, |m| m["id"] == 3)
        .await
        .and_then(|e| e.json())
        .expect("the tool call on a completes");
    assert_eq!(
        result["result"]["structuredContent"]["confirmed"], true,
        "a got b's answer"
    );
    assert_eq!(result["result"]["structuredContent"]["node"], "a");
}

#[tokio::test]
async fn sessions_survive_a_killed_replica_and_a_fresh_one() {
    let (_redis, mut b) = cluster(3, false).await;
    let c = session_on(&b[0].mcp(), json!({})).await;
    assert_eq!(counter(&c, &b[0], 1).await, 1);
    b[0].kill().await;
    assert_eq!(
        counter(&c, &b[1], 2).await,
        2,
        "b continues after a was SIGKILLed"
    );
    b[0].restart().await.expect("fresh a");
    assert_eq!(
        counter(&c, &b[0], 3).await,
        3,
        "a fresh replica serves the session"
    );
    let late = Backend::start("d", Some(&_redis.url()), &[])
        .await
        .expect("replica d");
    assert_eq!(
        counter(&c, &late, 4).await,
        4,
        "a replica started after the session serves it"
    );
}

#[tokio::test]
async fn redis_restart_gives_503_never_404_and_sessions_continue() {
    let (mut redis, b) = cluster(2, true).await;
    let c = session_on(&b[0].mcp(), json!({})).await;
    assert_eq!(counter(&c, &b[0], 1).await, 1);
    redis.kill().await;
    for (i, r) in b.iter().enumerate() {
        let reply = c
            .call(&r.mcp(), 10 + i as i64, "ping", json!({}))
            .await
            .expect("post");
        assert_eq!(
            reply.status, 503,
            "Redis down on {} must be 503, not {}",
            r.node_id, reply.status
        );
        assert!(
            reply.headers.contains_key("retry-after"),
            "503 carries Retry-After"
        );
    }
    let health = reqwest::get(format!("{}/health", b[0].base()))
        .await
        .expect("health");
    assert_eq!(health.status().as_u16(), 503, "/health reports Redis down");
    redis.restart().await.expect("redis back");
    assert_eventually!(WAIT, "b serves the session again after Redis returns", {
        c.call(&b[1].mcp(), 20, "ping", json!({}))
            .await
            .is_ok_and(|r| r.status == 200)
    });
    assert_eq!(
        counter(&c, &b[1], 21).await,
        2,
        "the counter survived the restart (AOF)"
    );
}

#[tokio::test]
async fn sessions_expire_after_the_ttl_and_slide_while_used() {
    let redis = Redis::start(false).await.expect("redis");
    let b = Backend::start_with(
        "a",
        Some(&redis.url()),
        &[],
        &[("SESSION_TTL_SECONDS", "2")],
    )
    .await
    .expect("backend");
    let c = session_on(&b.mcp(), json!({})).await;
    for i in 0..6 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let r = c.call(&b.mcp(), i, "ping", json!({})).await.expect("ping");
        assert_eq!(
            r.status, 200,
            "use within the TTL keeps the session (ping {i})"
        );
    }
    // Polling would itself keep the session alive: let the TTL pass untouched, then look.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let r = c
        .call(&b.mcp(), 99, "ping", json!({}))
        .await
        .expect("ping after expiry");
    assert_eq!(r.status, 404, "session expired 2 s after its last use");
}

#[tokio::test]
async fn bad_input_gets_the_right_status_and_a_json_rpc_error() {
    let dir = tests::TempDir::new("conf");
    let conf = dir.0.join("backend.yaml");
    std::fs::write(
        &conf,
        "allowed_origins: [\"http://localhost:*\"]\nmax_body_bytes: 2048\n",
    )
    .expect("write config");
    let b = Backend::start("a", None, &["-c", conf.to_str().unwrap_or_default()])
        .await
        .expect("backend");
    let http = reqwest::Client::new();
    let post = |body: String| {
        http.post(b.mcp())
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .body(body)
    };
    let r = post("{not json".into()).send().await.expect("malformed");
    assert_eq!(r.status().as_u16(), 400, "malformed JSON is 400");
    let body: Value = r.json().await.unwrap_or_default();
    assert_eq!(body["error"]["code"], -32700, "with JSON-RPC parse error");
    let r = post(format!(
        "{{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"ping\",\"params\":{{\"x\":\"{}\"}}}}",
        "y".repeat(4096)
    ))
    .send()
    .await
    .expect("big");
    assert_eq!(r.status().as_u16(), 413, "body over max_body_bytes is 413");
    let r = post(r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#.into())
        .send()
        .await
        .expect("no session");
    assert_eq!(
        r.status().as_u16(),
        400,
        "non-initialize without a session is 400"
    );
    let r = post(r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#.into())
        .header("mcp-session-id", "no-such-session")
        .send()
        .await
        .expect("unknown session");
    assert_eq!(r.status().as_u16(), 404, "unknown session is 404");
    let r = post(r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#.into())
        .header("mcp-session-id", "bad id")
        .send()
        .await
        .expect("bad session id");
    assert_eq!(r.status().as_u16(), 400, "session id with a space is 400");
    let r = post(r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#.into())
        .header("origin", "https://evil.example")
        .send()
        .await
        .expect("foreign origin");
    assert_eq!(r.status().as_u16(), 403, "foreign Origin is 403");
    let r = http
        .post(b.mcp())
        .header("content-type", "application/json")
        .header("accept", "text/html")
        .body(r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#)
        .send()
        .await
        .expect("bad accept");
    assert_eq!(
        r.status().as_u16(),
        406,
        "Accept without json and event-stream is 406"
    );
}

#[tokio::test]
async fn one_node_works_without_redis() {
    let b = Backend::start("solo", None, &[]).await.expect("backend");
    let c = session_on(&b.mcp(), json!({})).await;
    assert_eq!(counter(&c, &b, 1).await, 1);
    assert_eq!(counter(&c, &b, 2).await, 2);
    let health: Value = reqwest::get(format!("{}/health", b.base()))
        .await
        .expect("health")
        .json()
        .await
        .unwrap_or_default();
    assert_eq!(health["redis"], "not configured");
    assert_eq!(health["activeSessions"], 1);
    assert_eq!(c.delete(&b.mcp()).await.ok(), Some(200));
    let r = c.call(&b.mcp(), 3, "ping", json!({})).await.expect("ping");
    assert_eq!(r.status, 404, "deleted session is gone");
}

/// Runs the official conformance suite on the scenarios a spec revision requires; returns the
/// `Total:` line and the scenarios with a failed check.
async fn conformance(url: &str, requirements: &str) -> (String, Vec<String>) {
    conformance_with(url, &["--requirements", requirements]).await
}

/// Runs the official conformance suite with `args` (a spec version or requirements).
async fn conformance_with(url: &str, args: &[&str]) -> (String, Vec<String>) {
    let out = tokio::process::Command::new("conformance")
        .env("PATH", tools_path())
        .args(["server", "--url", url])
        .args(args)
        .output()
        .await
        .expect("run conformance");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let plain: String = stdout
        .replace("\u{1b}[32m", "")
        .replace("\u{1b}[31m", "")
        .replace("\u{1b}[0m", "");
    let total = plain
        .lines()
        .find(|l| l.starts_with("Total:"))
        .unwrap_or("no Total line")
        .to_owned();
    eprintln!("conformance {args:?} at {url}: {total}");
    assert!(
        out.status.success(),
        "conformance {args:?} failed ({total}):\n{plain}"
    );
    let failing = plain
        .lines()
        .filter_map(|l| l.strip_prefix("✗ "))
        .filter_map(|l| l.split(':').next())
        .map(str::to_owned)
        .collect();
    (total, failing)
}

/// Redis and three replicas serving the conformance suite's fixtures.
async fn conformance_cluster() -> (Redis, Vec<Backend>) {
    let redis = Redis::start(false).await.expect("redis");
    let mut b = Vec::new();
    for name in ["a", "b", "c"] {
        b.push(
            Backend::start(name, Some(&redis.url()), &["--conformance"])
                .await
                .expect("backend"),
        );
    }
    (redis, b)
}

/// Both eras, every scenario (extensions, pending and draft included, no expected-failures
/// file): nothing fails on one replica, nor through mcp-proxy round-robining every request
/// over three, where a task created on one replica is polled, answered and cancelled on the
/// others.
#[tokio::test]
async fn official_conformance_suite_passes_on_one_replica_and_through_the_proxy_to_three() {
    let (_redis, b) = conformance_cluster().await;
    let proxy = Proxy::start(
        &addrs(&b),
        "routing: {post: round-robin}\nlist_cache: {enabled: true}\n",
    )
    .await
    .expect("proxy");
    for url in [b[0].mcp(), proxy.mcp()] {
        for args in [
            &["--spec-version", "2025-11-25", "--suite", "all"][..],
            &["--requirements", "2026-07-28"][..],
        ] {
            let (total, failing) = conformance_with(&url, args).await;
            assert!(
                total.ends_with(", 0 failed") && failing.is_empty(),
                "{url} {args:?}: {total}: {failing:?}"
            );
            let passed: u32 = total
                .trim_start_matches("Total: ")
                .split(' ')
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            assert!(passed >= 80, "{url} {args:?}: too few checks ran: {total}");
        }
    }
    // The POSTs really were spread over the three replicas.
    let all = proxy.admin("/admin/backends").await.expect("backends");
    for x in all["pools"][0]["backends"].as_array().expect("backends") {
        assert!(
            x["requests"].as_u64().unwrap_or(0) > 10,
            "every replica served: {all}"
        );
    }
}

/// A 2026-07-28 `Mcp-Param-*` header (a tool parameter marked `x-mcp-header`) as the affinity
/// key: each region stays on one replica while the proxy reads no body, the regions spread, and
/// a header that disagrees with the body is refused by the backend before the tool runs, so a
/// client cannot be routed as one region while acting as another.
#[tokio::test]
async fn an_mcp_param_header_pins_each_region_to_one_replica_and_cannot_lie() {
    let (_redis, b) = conformance_cluster().await;
    let proxy = Proxy::start(
        &addrs(&b),
        "routing: {post: header, header_name: Mcp-Param-Region}\n",
    )
    .await
    .expect("proxy");
    let http = reqwest::Client::new();
    let call = |region: String, header: String| {
        http.post(proxy.mcp())
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .header("mcp-protocol-version", "2026-07-28")
            .header("mcp-method", "tools/call")
            .header("mcp-name", "test_header_param")
            .header("mcp-param-region", header)
            .body(
                json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {
                    "name": "test_header_param", "arguments": {"region": region},
                    "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
                              "io.modelcontextprotocol/clientCapabilities": {}}}})
                .to_string(),
            )
            .send()
    };
    let mut homes = HashMap::new();
    for r in 0..12 {
        let region = format!("region-{r}");
        for _ in 0..3 {
            let reply = call(region.clone(), region.clone()).await.expect("send");
            assert_eq!(reply.status(), 200, "{region}");
            let backend = reply.headers()["x-mcp-backend"]
                .to_str()
                .unwrap_or("-")
                .to_owned();
            let text = reply.text().await.expect("body");
            assert!(text.contains(&format!("region={region}")), "{text}");
            let prev = homes.insert(r, backend.clone());
            assert!(prev.is_none_or(|p| p == backend), "{region} moved");
        }
    }
    let spread: HashSet<_> = homes.values().collect();
    assert!(spread.len() >= 2, "12 regions spread: {homes:?}");

    let lying = call("region-1".into(), "region-2".into())
        .await
        .expect("send");
    assert_eq!(
        lying.status(),
        400,
        "the header names another region than the body"
    );
    let body: Value = lying.json().await.expect("json");
    assert_eq!(body["error"]["code"], -32020, "{body}");
}

async fn python(script_args: &[&str]) -> String {
    let (ok, out) = tests::sdk_client("python3", "python_client.py", script_args, None).await;
    assert!(ok, "python client {script_args:?} failed:\n{out}");
    out
}

#[tokio::test]
async fn python_sdk_completes_sessions_against_two_replicas_taking_turns() {
    let (_redis, b) = cluster(2, false).await;
    let relay = Relay::start(b.iter().map(Backend::base).collect())
        .await
        .expect("relay");
    for mode in ["legacy", "2026-07-28", "sse"] {
        let out = python(&[&relay.base(), mode]).await;
        assert!(out.contains("OK"), "python {mode}: {out}");
        // Streamable HTTP requests are served where they land; a 2024-11-05 session is served
        // by the replica holding its SSE stream, whichever replica its POSTs reach.
        if mode != "sse" {
            assert!(
                out.contains("nodes=a,b"),
                "python {mode} must have been served by both replicas: {out}"
            );
        }
    }
}

#[tokio::test]
async fn python_sdk_completes_sessions_through_the_proxy() {
    let (_redis, b) = cluster(3, false).await;
    let proxy = Proxy::start(&addrs(&b), "").await.expect("proxy");
    for mode in ["legacy", "2026-07-28", "sse"] {
        let out = python(&[&proxy.base(), mode]).await;
        assert!(out.contains("OK"), "python {mode} through the proxy: {out}");
        if mode != "sse" {
            assert!(
                out.contains("nodes=a,b,c"),
                "python {mode}: POSTs round-robined over the three replicas: {out}"
            );
        }
    }
}

// ------------------------------------------------------------------ through the real proxy

fn addrs(b: &[Backend]) -> Vec<String> {
    b.iter().map(Backend::address).collect()
}

async fn wait_health(proxy: &Proxy, backend: &Backend, healthy: bool) -> Duration {
    let start = Instant::now();
    assert_eventually!(
        Duration::from_secs(10),
        format!("backend {} healthy={healthy} in the proxy", backend.node_id),
        proxy
            .backend(&backend.address())
            .await
            .is_ok_and(|b| b["healthy"] == healthy)
    );
    start.elapsed()
}

#[tokio::test]
async fn through_the_proxy_a_session_spreads_over_three_replicas_and_survives_a_restart() {
    let (redis, mut b) = cluster(3, false).await;
    let proxy = Proxy::start(&addrs(&b), "").await.expect("proxy");
    let url = proxy.mcp();
    let c = session_on(&url, json!({})).await;

    // (1) ten tool calls, round-robined over all three replicas, all succeed.
    let mut nodes = HashSet::new();
    for i in 1..=10 {
        let r = c
            .tool(&url, i, "counter", json!({"action": "increment"}))
            .await
            .unwrap_or_else(|e| panic!("call {i} through the proxy: {e:#}"));
        assert_eq!(r["structuredContent"]["value"], i, "the counter goes on");
        nodes.insert(
            r["structuredContent"]["node"]
                .as_str()
                .unwrap_or("?")
                .to_owned(),
        );
    }
    assert_eq!(
        nodes.len(),
        3,
        "ten calls reached all three replicas: {nodes:?}"
    );

    // (2) a replica restarted mid-session; the session goes on, on it too.
    b[1].restart().await.expect("restart b");
    wait_health(&proxy, &b[1], true).await;
    let mut after = HashSet::new();
    for i in 11..=16 {
        let r = c
            .tool(&url, i, "counter", json!({"action": "increment"}))
            .await
            .unwrap_or_else(|e| panic!("call {i} after the restart: {e:#}"));
        assert_eq!(
            r["structuredContent"]["value"], i,
            "the counter survives the restart"
        );
        after.insert(
            r["structuredContent"]["node"]
                .as_str()
                .unwrap_or("?")
                .to_owned(),
        );
    }
    assert!(
        after.contains("b"),
        "the restarted replica serves the session: {after:?}"
    );

    // (3) 30 requests spread over all three backends, each 20%-47%.
    let mut share: HashMap<String, usize> = HashMap::new();
    for i in 0..30 {
        let r = c
            .call(&url, 100 + i, "tools/list", json!({}))
            .await
            .expect("tools/list");
        assert_eq!(r.status, 200);
        *share.entry(r.served_by()).or_default() += 1;
    }
    for x in &b {
        let n = share.get(&x.address()).copied().unwrap_or(0);
        assert!(
            (6..=14).contains(&n),
            "backend {} got {n}/30: {share:?}",
            x.node_id
        );
    }

    // (4) the session record is in Redis with its TTL.
    let sid = c.session.clone().expect("session id");
    let key = tests::session_key(&sid);
    assert_eq!(redis.cli(&["EXISTS", &key]).await.expect("redis"), "1");
    let ttl: i64 = redis
        .cli(&["TTL", &key])
        .await
        .expect("redis")
        .parse()
        .unwrap_or(-9);
    assert!(ttl > 0, "the session record has a TTL, got {ttl}");
}

#[tokio::test]
async fn sse_passes_through_the_proxy_event_by_event_and_outlives_read_timeouts() {
    let (_redis, b) = cluster(3, false).await;
    // A read timeout far below the idle gaps below: streams must use sse_idle_ms instead.
    let proxy = Proxy::start(&addrs(&b), "timeouts: {read_ms: 300, sse_idle_ms: 20000}")
        .await
        .expect("proxy");
    let url = proxy.mcp();
    let c = session_on(&url, json!({})).await;

    // A POST answered as an SSE stream: one progress event every 250 ms.
    let call = json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {
        "name": "slow_task", "arguments": {"steps": 5, "delay_ms": 250},
        "_meta": {"progressToken": "p7"}}});
    let start = Instant::now();
    let (status, mut rx) = c.post_stream(&url, &call).await.expect("slow_task");
    assert_eq!(status, 200);
    let mut progress = Vec::new();
    let mut done = None;
    while let Ok(Some(ev)) = tokio::time::timeout(WAIT, rx.recv()).await {
        let Some(m) = ev.json() else { continue };
        if m["method"] == "notifications/progress" {
            progress.push(start.elapsed());
        } else if m["id"] == 7 {
            done = Some(start.elapsed());
            break;
        }
    }
    let done = done.expect("the result arrives");
    assert_eq!(progress.len(), 5, "five progress events");
    for w in progress.windows(2) {
        assert!(
            w[1] - w[0] >= Duration::from_millis(150),
            "events arrived together, so something buffered: {progress:?}"
        );
    }
    assert!(
        done - progress[0] >= Duration::from_millis(800),
        "the first event came long before the end: {progress:?} end {done:?}"
    );

    // The standalone GET stream: idle for 5x the read timeout, then a notification arrives.
    let (status, mut stream) = c.open_stream(&url, None).await.expect("GET stream");
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let sent = Instant::now();
    c.tool(&url, 8, "notify", json!({"message": "after idle"}))
        .await
        .expect("notify");
    let got = next_matching(&mut stream, WAIT, |m| {
        m["method"] == "notifications/resources/updated"
    })
    .await;
    assert!(
        got.is_some(),
        "the idle stream was not cut by the 300 ms read timeout"
    );
    assert!(
        sent.elapsed() < Duration::from_secs(2),
        "delivered promptly"
    );

    // The client leaves: the proxy ends the upstream request.
    assert_eventually!(
        WAIT,
        "the proxy holds the stream open",
        proxy.admin("/admin/backends").await.is_ok_and(|v| {
            v["pools"][0]["backends"]
                .as_array()
                .is_some_and(|bs| bs.iter().any(|b| b["active"] == 1))
        })
    );
    drop(stream); // closes the connection
    assert_eventually!(
        WAIT,
        "no request left open on any backend after the client left",
        proxy.admin("/admin/backends").await.is_ok_and(|v| {
            v["pools"][0]["backends"]
                .as_array()
                .is_some_and(|bs| bs.iter().all(|b| b["active"] == 0))
        })
    );
}

#[tokio::test]
async fn ip_hash_keeps_a_client_address_on_one_backend_and_spreads_addresses() {
    let (_redis, b) = cluster(3, false).await;
    let proxy = Proxy::start(&addrs(&b), "").await.expect("proxy");
    let url = proxy.mcp();
    let c = session_on(&url, json!({})).await;
    let sid = c.session.clone().expect("session");
    let mut seen = HashSet::new();
    for last in 2..32u8 {
        let ip = std::net::IpAddr::from([127, 0, 0, last]);
        let http = reqwest::Client::builder()
            .local_address(ip)
            .build()
            .expect("client");
        let mut first = None;
        for _ in 0..3 {
            let r = http
                .get(&url)
                .header("accept", "text/event-stream")
                .header("mcp-session-id", &sid)
                .header("mcp-protocol-version", "2025-11-25")
                .send()
                .await
                .expect("GET stream");
            assert_eq!(r.status(), 200, "stream from {ip}");
            let backend = r
                .headers()
                .get("x-mcp-backend")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_owned();
            drop(r);
            match &first {
                None => first = Some(backend),
                Some(f) => assert_eq!(f, &backend, "client {ip} moved between backends"),
            }
        }
        seen.insert(first.unwrap_or_default());
    }
    assert_eq!(
        seen.len(),
        3,
        "30 client addresses spread over all 3 backends: {seen:?}"
    );
}

#[tokio::test]
async fn a_killed_backend_costs_no_request_that_had_not_reached_it() {
    let (_redis, mut b) = cluster(3, false).await;
    let proxy = Proxy::start(&addrs(&b), "").await.expect("proxy");
    let url = proxy.mcp();
    let c = session_on(&url, json!({})).await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..4i64 {
        let (c, url, stop) = (c.clone(), url.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            // (method, ok, detail)
            let mut log: Vec<(&'static str, bool, String)> = Vec::new();
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                let id = w * 100_000 + i;
                let (method, reply) = if i % 2 == 0 {
                    (
                        "tools/list",
                        c.call(&url, id, "tools/list", json!({})).await,
                    )
                } else {
                    (
                        "tools/call",
                        c.call(
                            &url,
                            id,
                            "tools/call",
                            json!({"name": "echo", "arguments": {"message": "x"}}),
                        )
                        .await,
                    )
                };
                match reply {
                    Ok(r) if r.status == 200 && r.result(id).is_ok() => {
                        log.push((method, true, r.served_by()))
                    }
                    Ok(r) => log.push((method, false, format!("{} {}", r.status, r.body))),
                    Err(e) => log.push((method, false, format!("{e:#}"))),
                }
            }
            log
        }));
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    b[2].kill().await;
    let down_after = wait_health(&proxy, &b[2], false).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut log = Vec::new();
    for w in workers {
        log.extend(w.await.expect("worker"));
    }
    let failed: Vec<_> = log.iter().filter(|(_, ok, _)| !ok).collect();
    eprintln!(
        "kill under load: {} requests, {} failed, marked down after {down_after:?}",
        log.len(),
        failed.len()
    );
    assert!(log.len() > 40, "requests flowed: {}", log.len());
    // Only a request in flight on the killed backend may fail (at most one per worker). A safe
    // method is repeated elsewhere unless the backend's response had already begun reaching the
    // client: then its body is cut off, and the error names the killed backend.
    let killed = b[2].address();
    let in_flight_on_killed = |(m, _, detail): &&(&str, bool, String)| {
        *m == "tools/call"
            || detail.contains(&format!("reply cut off: status 200 from backend {killed}"))
    };
    assert!(
        failed.iter().all(in_flight_on_killed) && failed.len() <= 4,
        "only requests in flight on the killed backend may fail: {failed:?}"
    );
    // Marked down within two check intervals (200 ms each) of the kill; the bound allows for
    // a suite running beside others on two cores.
    assert!(
        down_after <= Duration::from_millis(1000),
        "marked down after {down_after:?}"
    );

    // Without traffic a dead backend is found by the checks alone: unhealthy_threshold (2) checks.
    b[1].kill().await;
    let idle_down = wait_health(&proxy, &b[1], false).await;
    eprintln!("idle backend marked down after {idle_down:?}");
    assert!(
        idle_down <= Duration::from_millis(1000),
        "idle kill found after {idle_down:?}"
    );

    // Both come back after a restart and take traffic again.
    b[1].restart().await.expect("restart b");
    b[2].restart().await.expect("restart c");
    wait_health(&proxy, &b[1], true).await;
    wait_health(&proxy, &b[2], true).await;
    // Under load the killed backend may also have been ejected by outlier detection (its
    // connection errors count): then it takes traffic again once the ejection (10 s) ends,
    // ramping up over slow start (10 s). Every call must succeed meanwhile.
    let mut nodes = HashSet::new();
    let mut id = 900;
    assert_eventually!(
        Duration::from_secs(30),
        format!("all three backends serve again (seen {nodes:?})"),
        {
            id += 1;
            let r = c
                .call(&url, id, "tools/list", json!({}))
                .await
                .expect("after restart");
            assert_eq!(r.status, 200, "call {id} after the restart: {}", r.body);
            nodes.insert(r.served_by());
            nodes.len() == 3
        }
    );
}

#[tokio::test]
async fn the_proxy_rejects_bad_input_with_json_rpc_errors_and_answers_503_when_all_are_down() {
    let (_redis, mut b) = cluster(2, false).await;
    let proxy = Proxy::start(&addrs(&b), "").await.expect("proxy");
    let url = proxy.mcp();
    let http = reqwest::Client::new();
    let post = |body: String| {
        http.post(&url)
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .body(body)
    };
    let ping = json!({"jsonrpc": "2.0", "id": 41, "method": "ping"}).to_string();

    for (header, value) in [
        ("mcp-session-id", "has space"),
        ("mcp-session-id", &"x".repeat(300)),
        ("mcp-protocol-version", &"9".repeat(65)),
    ] {
        let r = post(ping.clone())
            .header(header, value)
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 400, "{header}: {value:.20}");
        let v: Value = r.json().await.expect("json body");
        assert_eq!(v["error"]["code"], -32600, "{v}");
        assert_eq!(v["id"], 41, "the error echoes the request id: {v}");
    }

    let r = post("x".repeat(5 * 1024 * 1024))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 413, "a body over limits.max_body_bytes");

    // Content-Length and Transfer-Encoding together: request smuggling, refused.
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", proxy.port))
        .await
        .expect("tcp");
    let raw = format!(
        "POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n{}",
        ping.len(),
        ping
    );
    tokio::io::AsyncWriteExt::write_all(&mut s, raw.as_bytes())
        .await
        .expect("write");
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(WAIT, tokio::io::AsyncReadExt::read(&mut s, &mut buf))
        .await
        .expect("an answer")
        .expect("read");
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(head.starts_with("HTTP/1.1 400"), "CL+TE answered: {head}");

    // The proxy's own health and metrics.
    let health: Value = http
        .get(format!("{}/health", proxy.base()))
        .send()
        .await
        .expect("health")
        .json()
        .await
        .expect("json");
    assert_eq!(health["status"], "ok", "{health}");
    let c = session_on(&url, json!({})).await;
    c.tool(&url, 1, "echo", json!({"message": "m"}))
        .await
        .expect("echo");
    let metrics = http
        .get(proxy.admin_url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    for needle in [
        "mcp_proxy_requests_total{",
        "method=\"tools/call\"",
        "mcp_proxy_request_duration_seconds_bucket",
        "mcp_proxy_sessions_seen_total{pool=\"mcp\"} 1",
        "mcp_proxy_backend_up{",
    ] {
        assert!(
            metrics.contains(needle),
            "metrics lack {needle}:\n{metrics}"
        );
    }

    // Every backend down: 503, Retry-After, a JSON-RPC error; never a hang.
    for x in &mut b {
        x.kill().await;
    }
    let r = post(ping.clone()).send().await.expect("send");
    assert_eq!(r.status(), 503, "no backend can serve");
    assert!(
        r.headers().get("retry-after").is_some(),
        "Retry-After is set"
    );
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["error"]["code"], -32000, "{v}");
    let health = http
        .get(format!("{}/health", proxy.base()))
        .send()
        .await
        .expect("health");
    assert_eq!(health.status(), 503, "the proxy reports itself degraded");
}

#[tokio::test]
async fn persistence_pins_sessions_of_unshared_backends_and_404s_when_their_backend_dies() {
    // In-memory backends: a session lives on exactly one of them.
    let mut b = Vec::new();
    for name in ["a", "b", "c"] {
        b.push(Backend::start(name, None, &[]).await.expect("backend"));
    }
    let proxy = Proxy::start(
        &addrs(&b),
        "routing: {post: persistence, stream: persistence, legacy: persistence}",
    )
    .await
    .expect("proxy");
    let url = proxy.mcp();
    let mut c = session_on(&url, json!({})).await;
    let mut home = None;
    for i in 1..=9 {
        let r = c
            .tool(&url, i, "counter", json!({"action": "increment"}))
            .await
            .unwrap_or_else(|e| panic!("pinned call {i}: {e:#}"));
        assert_eq!(r["structuredContent"]["value"], i);
        let node = r["structuredContent"]["node"]
            .as_str()
            .unwrap_or("?")
            .to_owned();
        assert_eq!(
            *home.get_or_insert(node.clone()),
            node,
            "the session stays on its backend"
        );
    }
    let home = home.expect("home");
    let sid = c.session.clone().expect("sid");
    let idx = b
        .iter()
        .position(|x| x.node_id == home)
        .expect("home backend");
    let lookup = proxy
        .admin(&format!("/admin/sessions/{sid}"))
        .await
        .expect("lookup");
    assert_eq!(lookup["pools"][0]["backend"], b[idx].address(), "{lookup}");
    assert_eq!(lookup["pools"][0]["policy"], "persistence", "{lookup}");

    b[idx].kill().await;
    let r = c.call(&url, 20, "ping", json!({})).await.expect("ping");
    assert_eq!(
        r.status, 404,
        "a session whose backend is gone gets 404: {}",
        r.body
    );
    let v: Value = serde_json::from_str(&r.body).expect("json body");
    assert_eq!(v["error"]["code"], -32001, "{v}");
    c.initialize(&url, json!({})).await.expect("re-initialize");
    let r = c
        .tool(&url, 21, "counter", json!({"action": "increment"}))
        .await
        .expect("the new session works");
    assert_ne!(r["structuredContent"]["node"], home.as_str());
}

/// Calls `notify` through `url` and waits for its `resources/updated` on `stream`.
async fn notify_reaches(
    c: &McpClient,
    url: &str,
    id: i64,
    stream: &mut tokio::sync::mpsc::UnboundedReceiver<tests::SseEvent>,
    what: &str,
) {
    c.tool(url, id, "notify", json!({"message": what}))
        .await
        .expect("notify");
    assert!(
        next_matching(stream, WAIT, |m| m["method"]
            == "notifications/resources/updated")
        .await
        .is_some(),
        "{what}"
    );
}

/// A sessionless `ping` POST through the proxy with one extra header.
async fn ping(http: &reqwest::Client, proxy: &Proxy, header: (&str, &str)) -> reqwest::Response {
    http.post(proxy.mcp())
        .header(header.0, header.1)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .body(r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#)
        .send()
        .await
        .expect("ping through the proxy")
}

#[tokio::test]
async fn session_hash_header_and_cookie_policies_reload_and_drain() {
    let (_redis, b) = cluster(3, false).await;
    let proxy = Proxy::start(&addrs(&b[..2]), "").await.expect("proxy");
    let url = proxy.mcp();
    let c = session_on(&url, json!({})).await;
    let (status, mut stream) = c.open_stream(&url, None).await.expect("GET stream");
    assert_eq!(status, 200);

    // Reload with SIGHUP: a third backend and session-hash routing. The open stream stays.
    proxy
        .write_config(&addrs(&b), "routing: {post: session-hash}")
        .expect("write config");
    proxy.signal("HUP").await.expect("SIGHUP");
    assert_eventually!(
        WAIT,
        "the reload added the third backend",
        proxy.backend(&b[2].address()).await.is_ok()
    );
    let mut by_session = HashSet::new();
    for i in 0..8 {
        let r = c
            .call(&url, 30 + i, "tools/list", json!({}))
            .await
            .expect("call");
        by_session.insert(r.served_by());
    }
    assert_eq!(
        by_session.len(),
        1,
        "session-hash keeps one session on one backend"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    notify_reaches(
        &c,
        &url,
        40,
        &mut stream,
        "the SSE stream opened before the reload still delivers",
    )
    .await;

    // Header affinity and sticky cookies, through the admin reload endpoint.
    proxy
        .write_config(
            &addrs(&b),
            "routing: {post: header, header_name: x-tenant}\n",
        )
        .expect("write config");
    assert_eq!(
        proxy.admin_post("/admin/reload").await.expect("reload").0,
        200
    );
    let http = reqwest::Client::new();
    let mut tenants = HashMap::new();
    for t in 0..12 {
        for _ in 0..2 {
            let r = ping(&http, &proxy, ("x-tenant", &format!("tenant-{t}"))).await;
            let backend = r.headers()["x-mcp-backend"]
                .to_str()
                .unwrap_or("-")
                .to_owned();
            let prev = tenants.insert(t, backend.clone());
            assert!(prev.is_none_or(|p| p == backend), "tenant-{t} moved");
        }
    }
    let spread: HashSet<_> = tenants.values().collect();
    assert!(spread.len() >= 2, "12 tenants spread: {tenants:?}");

    proxy
        .write_config(&addrs(&b), "routing: {post: cookie, cookie_name: lb}\n")
        .expect("write config");
    assert_eq!(
        proxy.admin_post("/admin/reload").await.expect("reload").0,
        200
    );
    let r = ping(&http, &proxy, ("x-none", "1")).await;
    let set = r.headers()["set-cookie"]
        .to_str()
        .unwrap_or_default()
        .to_owned();
    let backend = r.headers()["x-mcp-backend"]
        .to_str()
        .unwrap_or_default()
        .to_owned();
    assert!(set.starts_with(&format!("lb={backend};")), "{set}");
    for _ in 0..5 {
        let r = ping(&http, &proxy, ("cookie", &format!("other=1; lb={backend}"))).await;
        assert_eq!(
            r.headers()["x-mcp-backend"],
            backend.as_str(),
            "the cookie pins"
        );
    }

    // A bad file is refused by reload and the running config stays.
    std::fs::write(proxy.config_path(), "listeners: []\npools: []\n").expect("write");
    let (status, v) = proxy.admin_post("/admin/reload").await.expect("reload");
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error"].as_str().unwrap_or_default().contains("pools"),
        "{v}"
    );
    proxy.write_config(&addrs(&b), "").expect("write config");
    assert_eq!(
        proxy.admin_post("/admin/reload").await.expect("reload").0,
        200
    );

    // Drain: no new requests reach the backend; its open stream keeps delivering.
    let stream_backend = {
        let r = c
            .call(&url, 50, "tools/list", json!({}))
            .await
            .expect("call");
        assert_eq!(r.status, 200);
        // The GET stream went by ip-hash from 127.0.0.1: ask which backend holds it, once
        // the call above is no longer counted (the proxy counts a request until its log line).
        let deadline = Instant::now() + WAIT;
        loop {
            let all = proxy.admin("/admin/backends").await.expect("backends");
            let holders: Vec<&Value> = all["pools"][0]["backends"]
                .as_array()
                .map(|bs| bs.iter().filter(|b| b["active"] != 0).collect())
                .unwrap_or_default();
            if let [only] = holders.as_slice()
                && only["active"] == 1
            {
                break only["name"].as_str().unwrap_or_default().to_owned();
            }
            assert!(
                Instant::now() < deadline,
                "one backend holds the open stream: {all}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let (status, v) = proxy
        .admin_post(&format!("/admin/backends/{stream_backend}/drain"))
        .await
        .expect("drain");
    assert_eq!(status, 200, "{v}");
    for i in 0..9 {
        let r = c
            .call(&url, 60 + i, "tools/list", json!({}))
            .await
            .expect("call");
        assert_ne!(
            r.served_by(),
            stream_backend,
            "a draining backend gets no new requests"
        );
    }
    notify_reaches(
        &c,
        &url,
        70,
        &mut stream,
        "the stream on the draining backend finishes its life",
    )
    .await;
    assert_eq!(
        proxy
            .admin_post(&format!("/admin/backends/{stream_backend}/undrain"))
            .await
            .expect("undrain")
            .0,
        200
    );
    assert_eq!(
        proxy
            .admin_post("/admin/backends/nope/drain")
            .await
            .expect("drain")
            .0,
        404
    );
}

#[tokio::test]
async fn every_config_file_parses_and_bad_keys_are_named() {
    let conf = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../conf");
    let run = |args: Vec<String>| {
        // The shipped docker and Kubernetes files read the admin token from the environment.
        let out = std::process::Command::new(tests::binary("mcp-proxy"))
            .env("MCP_ADMIN_TOKEN", "test-admin-token-0123456789abcdef")
            .args(args)
            .output()
            .expect("run mcp-proxy");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let mut proxy_files = 0;
    for entry in std::fs::read_dir(&conf).expect("conf/") {
        let path = entry.expect("entry").path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned();
        if name.starts_with("proxy") && name.ends_with(".yaml") {
            let (code, out) = run(vec![
                "--test".into(),
                "-c".into(),
                path.display().to_string(),
            ]);
            assert_eq!(code, Some(0), "{name}: {out}");
            proxy_files += 1;
        } else if name.starts_with("backend") && name.ends_with(".yaml") {
            let text = std::fs::read_to_string(&path).expect("read");
            backend::config::FileConfig::parse(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }
    assert!(
        proxy_files >= 2,
        "conf/proxy.yaml and conf/proxy.docker.yaml exist"
    );

    // The compose file: valid YAML with the whole topology.
    let compose: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(conf.join("docker-compose.yml")).expect("docker-compose.yml"),
    )
    .expect("docker-compose.yml is YAML");
    for service in ["redis", "backend-1", "backend-2", "backend-3", "proxy"] {
        assert!(
            !compose["services"][service].is_null(),
            "compose has {service}"
        );
    }
    // Kubernetes: every document parses; the proxy's ConfigMap is a valid config once its
    // in-cluster names (resolvable only in the cluster) are mapped to local addresses.
    let k8s = std::fs::read_to_string(conf.join("k8s/mcp-edge.yaml")).expect("k8s manifest");
    let mut kinds = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&k8s) {
        let v = <serde_yaml::Value as serde::Deserialize>::deserialize(doc).expect("k8s YAML");
        kinds.push(v["kind"].as_str().unwrap_or_default().to_owned());
        if v["kind"] == "ConfigMap" {
            let mut cfg = v["data"]["proxy.yaml"]
                .as_str()
                .expect("proxy.yaml")
                .to_owned();
            for i in 0..3 {
                cfg = cfg.replace(
                    &format!("mcp-backend-{i}.mcp-backend.mcp-edge.svc.cluster.local:3000"),
                    &format!("127.0.0.1:{}", 3000 + i),
                );
            }
            let path = std::env::temp_dir().join(format!("k8s-proxy-{}.yaml", std::process::id()));
            std::fs::write(&path, cfg).expect("write");
            let (code, out) = run(vec![
                "--test".into(),
                "-c".into(),
                path.display().to_string(),
            ]);
            let _ = std::fs::remove_file(&path);
            assert_eq!(code, Some(0), "k8s ConfigMap proxy.yaml: {out}");
        }
    }
    for kind in ["StatefulSet", "ConfigMap", "Deployment", "Service"] {
        assert!(
            kinds.iter().any(|k| k == kind),
            "k8s manifest has a {kind}: {kinds:?}"
        );
    }

    let dir = tests::TempDir::new("conf");
    for (yaml, key, value) in [
        (
            "listeners: [{address: 127.0.0.1:1}]\npools: [{name: p, backends: [{address: 127.0.0.1:2, wieght: 2}]}]\n",
            "pools[0].backends[0]",
            "wieght",
        ),
        (
            "listeners: [{address: 127.0.0.1:1}]\npools: [{name: p, backends: [{address: 127.0.0.1:2}], timeouts: {connect_ms: 0}}]\n",
            "pools[0].timeouts.connect_ms",
            "\"0\"",
        ),
        (
            "listeners: [{address: 127.0.0.1:1}]\npools: [{name: p, backends: [{address: 127.0.0.1:2}], routing: {stream: sticky}}]\n",
            "pools[0].routing.stream",
            "sticky",
        ),
        (
            "listeners: [{address: 127.0.0.1:1}]\npools: [{name: p, backends: [{address: 127.0.0.1:2}], auth: {resource: 'https://x/mcp', api_keys: [{id: k, sha256: '0000000000000000000000000000000000000000000000000000000000000000'}]}}]\n",
            "pools[0].auth.principal_secret",
            "bind sessions",
        ),
        (
            "listeners: [{address: 127.0.0.1:1}]\nadmin: {address: 0.0.0.0:9}\npools: [{name: p, backends: [{address: 127.0.0.1:2}]}]\n",
            "admin.address",
            "needs admin.token",
        ),
        (
            "listeners: [{address: 127.0.0.1:1}]\nadmin: {address: 0.0.0.0:9, token: env:MCP_EDGE_UNSET_TOKEN_VAR}\npools: [{name: p, backends: [{address: 127.0.0.1:2}]}]\n",
            "admin.token",
            "MCP_EDGE_UNSET_TOKEN_VAR",
        ),
        (
            "listeners: [{address: 127.0.0.1:1, routes: [{pool: p, path_prefix: /a/}]}]\npools: [{name: p, backends: [{address: 127.0.0.1:2}]}]\n",
            "listeners[0].routes[0].path_prefix",
            "/a/",
        ),
        (
            "listeners: [{address: 127.0.0.1:1}]\npools: [{name: p, backends: [{address: 127.0.0.1:2}], auth: {resource: 'https://x/mcp', jwt: {issuer: i, jwks_url: 'http://idp.example/jwks'}}}]\n",
            "pools[0].auth.jwt.jwks_url",
            "http://idp.example/jwks",
        ),
        (
            "listeners: [{address: 127.0.0.1:1}]\npools: [{name: p, backends: [{address: 127.0.0.1:2}], auth: {resource: 'https://x/mcp', jwt: {issuer: i, algorithms: [none]}}}]\n",
            "pools[0].auth.jwt.algorithms[0]",
            "none",
        ),
    ] {
        let path = dir.0.join("bad.yaml");
        std::fs::write(&path, yaml).expect("write");
        let (code, out) = run(vec![
            "--test".into(),
            "-c".into(),
            path.display().to_string(),
        ]);
        assert_eq!(code, Some(2), "a bad file fails --test: {out}");
        assert!(
            out.contains(key) && out.contains(value),
            "the error names {key} and {value}: {out}"
        );
    }
    let (code, out) = run(vec![
        "--listen".into(),
        "127.0.0.1:1".into(),
        "--backend".into(),
        "nohost".into(),
        "--test".into(),
    ]);
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains("--backend[0].address") && out.contains("nohost"),
        "{out}"
    );
}

/// MCP Inspector's CLI (2.x), as a user runs it: one process per call, each a new session,
/// through the proxy to three replicas.
async fn inspector(url: &str, transport: &str, args: &[&str]) -> Value {
    let home = tests::TempDir::new("inspector-home");
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new("inspector")
            .env("PATH", tools_path())
            .env("HOME", &home.0)
            .env("MCP_CATALOG_PATH", home.0.join("mcp.json"))
            .env("CI", "true")
            .args(["--cli", url, "--transport", transport])
            .args(args)
            .stdin(std::process::Stdio::null())
            .output(),
    )
    .await
    .unwrap_or_else(|_| panic!("inspector {transport} {args:?} did not finish within 60 s"))
    .unwrap_or_else(|e| panic!("cannot run the inspector: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "inspector {transport} {args:?}: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("inspector {transport} {args:?}: not JSON ({e}): {stdout}"))
}

#[tokio::test]
async fn mcp_inspector_cli_uses_tools_resources_and_prompts_through_the_proxy() {
    let (_redis, b) = cluster(3, false).await;
    let proxy = Proxy::start(&addrs(&b), "shared_sessions: true\n")
        .await
        .expect("proxy");
    for (transport, url) in [
        ("http", proxy.mcp()),
        ("sse", format!("{}/sse", proxy.base())),
    ] {
        let run = |args: &'static [&'static str]| inspector(&url, transport, args);
        let (tools, echo, hello, resources, read, prompts, prompt) = tokio::join!(
            run(&["--method", "tools/list"]),
            run(&[
                "--method",
                "tools/call",
                "--tool-name",
                "echo",
                "--tool-arg",
                "message=hi there"
            ]),
            run(&[
                "--method",
                "tools/call",
                "--tool-name",
                "hello",
                "--tool-arg",
                "name=inspector"
            ]),
            run(&["--method", "resources/list"]),
            run(&["--method", "resources/read", "--uri", "system://info"]),
            run(&["--method", "prompts/list"]),
            run(&[
                "--method",
                "prompts/get",
                "--prompt-name",
                "summarize-session",
                "--prompt-args",
                "style=detailed"
            ]),
        );
        let names: Vec<&str> = tools["tools"]
            .as_array()
            .map(|t| t.iter().filter_map(|t| t["name"].as_str()).collect())
            .unwrap_or_default();
        for want in [
            "calculator",
            "echo",
            "hello",
            "counter",
            "slow_task",
            "confirm",
        ] {
            assert!(
                names.contains(&want),
                "{transport}: tools/list lacks {want}: {names:?}"
            );
        }
        assert_eq!(
            echo["content"][0]["text"], "hi there",
            "{transport}: {echo}"
        );
        assert!(
            hello["content"][0]["text"]
                .as_str()
                .is_some_and(|t| t.starts_with("Hello, inspector! (from ")),
            "{transport}: {hello}"
        );
        assert!(
            resources["resources"]
                .as_array()
                .is_some_and(|r| r.iter().any(|r| r["uri"] == "system://info")),
            "{transport}: {resources}"
        );
        let info: Value = read["contents"][0]["text"]
            .as_str()
            .and_then(|t| serde_json::from_str(t).ok())
            .unwrap_or_default();
        assert_eq!(info["store"], "redis", "{transport}: {read}");
        assert!(
            prompts["prompts"]
                .as_array()
                .is_some_and(|p| p.iter().any(|p| p["name"] == "summarize-session")),
            "{transport}: {prompts}"
        );
        assert!(
            prompt["messages"][0]["content"]["text"]
                .as_str()
                .is_some_and(|t| t.contains("detailed paragraph")),
            "{transport}: {prompt}"
        );
    }
    // The calls were spread over the replicas.
    let all = proxy.admin("/admin/backends").await.expect("backends");
    let served = all["pools"][0]["backends"]
        .as_array()
        .map(|b| {
            b.iter()
                .filter(|x| x["requests"].as_u64().unwrap_or(0) > 0)
                .count()
        })
        .unwrap_or(0);
    assert_eq!(served, 3, "every replica served the inspector: {all}");
}

#[tokio::test]
async fn typescript_sdk_completes_sessions_through_the_proxy() {
    let (_redis, b) = cluster(3, false).await;
    let proxy = Proxy::start(&addrs(&b), "").await.expect("proxy");
    for mode in ["http", "sse"] {
        let (ok, stdout) =
            tests::sdk_client("node", "ts_client.mjs", &[&proxy.base(), mode], None).await;
        assert!(ok, "typescript {mode} through the proxy:\n{stdout}");
        if mode == "http" {
            assert!(
                stdout.contains("nodes=a,b,c"),
                "typescript: POSTs round-robined over the three replicas: {stdout}"
            );
        }
    }
}

#[tokio::test]
async fn a_tls_listener_serves_mcp_with_the_configured_certificate() {
    let backend = Backend::start("t", None, &[]).await.expect("backend");
    let dir = tests::TempDir::new("tls");
    let (cert, key) = (dir.0.join("cert.pem"), dir.0.join("key.pem"));
    let made = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args([
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("run openssl");
    assert!(
        made.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&made.stderr)
    );
    let port = tests::free_port();
    let config = dir.0.join("proxy.yaml");
    std::fs::write(
        &config,
        format!(
            "server: {{grace_period_seconds: 0, upgrade_sock: {d}/up.sock}}\nlisteners:\n  - address: 127.0.0.1:{port}\n    tls: {{certificate: {c}, key: {k}}}\npools: [{{name: p, backends: [{{address: \"{b}\"}}]}}]\n",
            d = dir.0.display(),
            c = cert.display(),
            k = key.display(),
            b = backend.address(),
        ),
    )
    .expect("write config");
    let _proxy = tokio::process::Command::new(tests::binary("mcp-proxy"))
        .arg("-c")
        .arg(&config)
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .expect("start mcp-proxy");
    let url = format!("https://127.0.0.1:{port}/mcp");
    let body = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"tls","version":"1"}}}"#;
    // The listener comes up asynchronously: retry until it answers.
    let deadline = Instant::now() + WAIT;
    loop {
        let o = tokio::process::Command::new("curl")
            .args(["-s", "--cacert"])
            .arg(&cert)
            .args(["-H", "content-type: application/json"])
            .args(["-H", "accept: application/json, text/event-stream"])
            .args(["-d", body, &url])
            .output()
            .await
            .expect("run curl");
        let out = String::from_utf8_lossy(&o.stdout);
        if out.contains("\"serverInfo\"") {
            break;
        }
        assert!(Instant::now() < deadline, "no initialize over TLS: {out}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
