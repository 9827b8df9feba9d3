//! The one integration-test binary: real Redis, real `mcp-backend` processes, real clients.
#![allow(clippy::expect_used, clippy::unwrap_used)] // a failed expectation is the test failing

use std::time::Duration;

use serde_json::{Value, json};
use tests::{Backend, McpClient, Redis, Relay, assert_eventually, next_matching, tools_path};

const WAIT: Duration = Duration::from_secs(10);

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
    let key = format!("mcp:session:{}", c.session.clone().unwrap_or_default());
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

/// Runs the official conformance suite; returns the `Total:` line.
async fn conformance(url: &str, requirements: &str) -> String {
    let out = tokio::process::Command::new("conformance")
        .env("PATH", tools_path())
        .args(["server", "--url", url, "--requirements", requirements])
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
    eprintln!("conformance {requirements} at {url}: {total}");
    assert!(
        out.status.success(),
        "conformance {requirements} failed ({total}):\n{plain}"
    );
    total
}

#[tokio::test]
async fn official_conformance_suite_passes_on_one_replica_and_across_three() {
    let redis = Redis::start(false).await.expect("redis");
    let mut b = Vec::new();
    for name in ["a", "b", "c"] {
        b.push(
            Backend::start(name, Some(&redis.url()), &["--conformance"])
                .await
                .expect("backend"),
        );
    }
    for req in ["2025-11-25", "2026-07-28"] {
        let total = conformance(&b[0].mcp(), req).await;
        assert!(
            total.ends_with(", 0 failed") || req == "2026-07-28",
            "{total}"
        );
    }
    // Every request round-robined over three replicas, as a naive balancer would.
    let relay = Relay::start(b.iter().map(Backend::base).collect())
        .await
        .expect("relay");
    let total = conformance(&format!("{}/mcp", relay.base()), "2025-11-25").await;
    assert!(
        total.ends_with(", 0 failed"),
        "round-robined over 3 replicas: {total}"
    );
}

async fn python(script_args: &[&str]) -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/clients/python_client.py");
    let out = tokio::process::Command::new("python3")
        .env("PATH", tools_path())
        .arg(script)
        .args(script_args)
        .output()
        .await
        .expect("run python client");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "python client {script_args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
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
