//! Issue 9: session state that stays bounded and correct, on the Redis deployments users run.
//! Real Redis processes (one server, a Cluster, a Sentinel setup, TLS), real backends, the
//! real proxy.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tests::{
    Backend, McpClient, Proxy, Redis, TempDir, next_matching,
    redis_deploy::{RedisCluster, RedisSentinel, TestPki, TlsRedis},
};

const WAIT: Duration = Duration::from_secs(10);

/// A backend with `yaml` as its config file (and `REDIS_URL` when given).
async fn backend(name: &str, redis_url: Option<&str>, yaml: &str) -> (Backend, TempDir) {
    let dir = TempDir::new("backend-conf");
    let conf = dir.0.join("backend.yaml");
    std::fs::write(&conf, yaml).expect("write config");
    let b = Backend::start(name, redis_url, &["-c", conf.to_str().unwrap_or_default()])
        .await
        .unwrap_or_else(|e| panic!("backend {name}: {e:#}"));
    (b, dir)
}

async fn health(b: &Backend) -> Value {
    reqwest::get(format!("{}/health", b.base()))
        .await
        .expect("health")
        .json()
        .await
        .unwrap_or_default()
}

async fn dbsize(redis: &Redis) -> i64 {
    redis
        .cli(&["DBSIZE"])
        .await
        .unwrap_or_default()
        .parse()
        .unwrap_or(-1)
}

async fn session(url: &str, capabilities: Value) -> McpClient {
    let mut c = McpClient::new();
    c.initialize(url, capabilities)
        .await
        .unwrap_or_else(|e| panic!("initialize on {url}: {e:#}"));
    c
}

async fn count(c: &McpClient, url: &str, id: i64) -> Value {
    c.tool(url, id, "counter", json!({"action": "increment"}))
        .await
        .unwrap_or_else(|e| panic!("counter: {e:#}"))["structuredContent"]
        .clone()
}

/// Polls `check` until it holds or `limit` passes; returns whether it held.
async fn eventually(limit: Duration, mut check: impl AsyncFnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// N sessions × M calls through the proxy over three replicas, then half deleted and half
/// left to expire: Redis keys and every replica's in-process state return to their
/// baseline, and during the run there are at most 2 keys per live session (+1 index).
#[tokio::test]
async fn session_state_returns_to_baseline_after_delete_and_expiry() {
    const N: usize = 24;
    const M: i64 = 4;
    let redis = Redis::start(false).await.expect("redis");
    let yaml = "session_ttl_seconds: 3\nworker_idle_seconds: 1\n";
    let mut backends = Vec::new();
    for name in ["a", "b", "c"] {
        backends.push(backend(name, Some(&redis.url()), yaml).await);
    }
    let addrs: Vec<String> = backends.iter().map(|(b, _)| b.address()).collect();
    let proxy = Proxy::start(&addrs, "").await.expect("proxy");
    let keys_before = dbsize(&redis).await;
    let mut topics_before = Vec::new();
    for (b, _) in &backends {
        topics_before.push(health(b).await["busTopics"].as_u64().unwrap_or(99));
    }

    let mut clients = Vec::new();
    let mut peak = 0;
    for _ in 0..N {
        let c = session(&proxy.mcp(), json!({})).await;
        for i in 0..M {
            let v = count(&c, &proxy.mcp(), i + 1).await;
            assert_eq!(v["value"], i + 1, "the counter survives round-robin");
        }
        clients.push(c);
        peak = peak.max(dbsize(&redis).await - keys_before);
    }
    let live = clients.len() as i64;
    assert!(
        peak <= 2 * live + 1,
        "at most 2 keys per live session plus the index: {peak} keys for {live} sessions"
    );
    assert!(peak >= live, "every session has its record: {peak}");
    let (deleted, expiring) = clients.split_at(N / 2);
    for c in deleted {
        assert_eq!(c.delete(&proxy.mcp()).await.ok(), Some(200));
    }
    for c in deleted {
        for (b, _) in &backends {
            let r = c.call(&b.mcp(), 99, "ping", json!({})).await.expect("ping");
            assert_eq!(r.status, 404, "a deleted session is 404 on {}", b.node_id);
        }
    }
    let _still_open = expiring;
    let settled = eventually(Duration::from_secs(20), async || {
        dbsize(&redis).await == keys_before
    })
    .await;
    let left = redis.cli(&["KEYS", "*"]).await.unwrap_or_default();
    assert!(settled, "every key expires with its session; left: {left}");
    for ((b, _), topics) in backends.iter().zip(topics_before) {
        let back = eventually(WAIT, async || {
            let h = health(b).await;
            h["localSessions"] == 0 && h["busTopics"].as_u64() == Some(topics)
        })
        .await;
        assert!(
            back,
            "{} keeps no worker or bus topic: {}",
            b.node_id,
            health(b).await
        );
    }
}

/// DELETE racing counter increments on two replicas never leaves a key behind or a key
/// without a TTL.
#[tokio::test]
async fn delete_racing_writes_never_leaves_a_key_without_ttl() {
    let redis = Redis::start(false).await.expect("redis");
    let (a, _ca) = backend("a", Some(&redis.url()), "").await;
    let (b, _cb) = backend("b", Some(&redis.url()), "").await;
    for round in 0..8 {
        let c = session(&a.mcp(), json!({})).await;
        let mut calls = Vec::new();
        for i in 0..8 {
            let c = c.clone();
            let url = if i % 2 == 0 { a.mcp() } else { b.mcp() };
            calls.push(tokio::spawn(async move {
                let _ = c
                    .call(
                        &url,
                        i + 1,
                        "tools/call",
                        json!({"name": "counter", "arguments": {}}),
                    )
                    .await;
            }));
        }
        let del = {
            let c = c.clone();
            let url = b.mcp();
            tokio::spawn(async move { c.delete(&url).await.ok() })
        };
        for call in calls {
            let _ = call.await;
        }
        assert_eq!(del.await.ok().flatten(), Some(200), "round {round}");
        let sid = c.session.clone().unwrap_or_default();
        for key in [tests::session_key(&sid), tests::log_key(&sid)] {
            assert_eq!(
                redis.cli(&["EXISTS", &key]).await.ok().as_deref(),
                Some("0"),
                "round {round}: {key} is gone after DELETE"
            );
        }
    }
    let keys = redis.cli(&["KEYS", "*"]).await.unwrap_or_default();
    for key in keys.lines().filter(|k| !k.is_empty()) {
        let ttl = redis.cli(&["PTTL", key]).await.unwrap_or_default();
        assert_ne!(ttl, "-1", "{key} has no TTL");
    }
}

/// Two replicas each wait on an elicitation of the same session: each gets only the
/// answer to its own request.
#[tokio::test]
async fn elicitations_on_two_replicas_each_get_their_own_reply() {
    let redis = Redis::start(false).await.expect("redis");
    let (a, _ca) = backend("a", Some(&redis.url()), "").await;
    let (b, _cb) = backend("b", Some(&redis.url()), "").await;
    let c = session(&a.mcp(), json!({"elicitation": {}})).await;
    let call = |id: i64, question: &str| {
        json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
               "params": {"name": "confirm", "arguments": {"question": question}}})
    };
    let (_, mut on_a) = c.post_stream(&a.mcp(), &call(3, "on a?")).await.expect("a");
    let (_, mut on_b) = c.post_stream(&b.mcp(), &call(4, "on b?")).await.expect("b");
    let ask = async |s: &mut _| {
        next_matching(s, WAIT, |m| m["method"] == "elicitation/create")
            .await
            .and_then(|e| e.json())
            .expect("elicitation/create")
    };
    let ask_a = ask(&mut on_a).await;
    let ask_b = ask(&mut on_b).await;
    assert_ne!(
        ask_a["id"], ask_b["id"],
        "server request ids are unique across replicas"
    );
    // Each answer goes through the other replica, b's first.
    let answer = |ask: &Value, yes: bool| {
        json!({"jsonrpc": "2.0", "id": ask["id"],
               "result": {"action": "accept", "content": {"confirmed": yes}}})
    };
    assert_eq!(
        c.post(&a.mcp(), &answer(&ask_b, false))
            .await
            .ok()
            .map(|r| r.status),
        Some(202)
    );
    assert_eq!(
        c.post(&b.mcp(), &answer(&ask_a, true))
            .await
            .ok()
            .map(|r| r.status),
        Some(202)
    );
    let result = async |s: &mut _, id: i64| {
        next_matching(s, WAIT, |m| m["id"] == id)
            .await
            .and_then(|e| e.json())
            .expect("tool result")
    };
    let ra = result(&mut on_a, 3).await;
    let rb = result(&mut on_b, 4).await;
    assert_eq!(ra["result"]["structuredContent"]["confirmed"], true, "{ra}");
    assert_eq!(ra["result"]["structuredContent"]["node"], "a");
    assert_eq!(
        rb["result"]["structuredContent"]["confirmed"], false,
        "{rb}"
    );
    assert_eq!(rb["result"]["structuredContent"]["node"], "b");
}

/// `notifications/cancelled` posted to one replica ends the request running on another.
#[tokio::test]
async fn a_cancellation_reaches_the_request_on_another_replica() {
    let redis = Redis::start(false).await.expect("redis");
    let (a, _ca) = backend("a", Some(&redis.url()), "").await;
    let (b, _cb) = backend("b", Some(&redis.url()), "").await;
    let c = session(&a.mcp(), json!({})).await;
    let slow = json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call",
        "params": {"name": "slow_task", "arguments": {"steps": 100, "delay_ms": 100}}});
    let (_, mut on_a) = c
        .post_stream(&a.mcp(), &slow)
        .await
        .expect("slow_task on a");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let cancel = json!({"jsonrpc": "2.0", "method": "notifications/cancelled",
        "params": {"requestId": 7, "reason": "changed my mind"}});
    let posted = c.post(&b.mcp(), &cancel).await.expect("cancel posted to b");
    assert_eq!(posted.status, 202);
    // A cancelled request gets no response (MCP): its stream on a just ends, early.
    let mut answered = None;
    while let Ok(Some(event)) = tokio::time::timeout(WAIT, on_a.recv()).await {
        if let Some(m) = event.json().filter(|m| m["id"] == 7) {
            answered = Some(m);
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the stream on a ends well before the task's 10 s: {:?}",
        started.elapsed()
    );
    assert!(
        answered.is_none(),
        "no result for a cancelled request: {answered:?}"
    );
}

/// Killing the replicas' pub/sub connections while notifications are raised loses none
/// of them on an open GET stream and repeats none: the stream re-reads the log.
#[tokio::test]
async fn a_forced_pubsub_reconnect_loses_no_event_of_an_open_stream() {
    let redis = Redis::start(false).await.expect("redis");
    let started = Instant::now();
    let (a, _ca) = backend("a", Some(&redis.url()), "").await;
    let (b, _cb) = backend("b", Some(&redis.url()), "").await;
    let c = session(&a.mcp(), json!({})).await;
    let (status, mut stream) = c.open_stream(&a.mcp(), None).await.expect("GET on a");
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut sent = Vec::new();
    for round in 0..3 {
        let killed = redis
            .cli(&["CLIENT", "KILL", "TYPE", "pubsub"])
            .await
            .unwrap_or_default();
        assert!(
            killed.parse::<u32>().unwrap_or(0) >= 2,
            "both bus connections cut: {killed}"
        );
        for i in 0..3 {
            let message = format!("r{round}-{i}");
            c.tool(
                &b.mcp(),
                10 * round + i + 1,
                "notify",
                json!({"message": message}),
            )
            .await
            .expect("notify on b");
            sent.push(message);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut got = Vec::new();
    while got.len() < sent.len() {
        let Some(event) = next_matching(&mut stream, WAIT, |m| {
            m["method"] == "notifications/message"
        })
        .await
        else {
            break;
        };
        let m = event.json().unwrap_or_default();
        got.push(
            m["params"]["data"]["message"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        );
    }
    assert_eq!(got, sent, "every notification arrives once, in order");
    let extra = next_matching(&mut stream, Duration::from_secs(1), |m| {
        m["method"] == "notifications/message"
    })
    .await;
    assert!(extra.is_none(), "no event is repeated: {extra:?}");
    // The bus PINGs its subscription every 5 s: a healthy one never fails the check.
    let wait = Duration::from_secs(11).saturating_sub(started.elapsed());
    tokio::time::sleep(wait).await;
    for backend in [&a, &b] {
        let log = backend.log();
        assert!(
            !log.contains("did not answer its health check"),
            "{}: a live subscription passes its health check: {log}",
            backend.node_id
        );
    }
}

/// Three backends and the proxy on a real 3-master Redis Cluster: a session moves across
/// replicas, its keys share one slot, `Last-Event-ID` replays on another replica, DELETE
/// is 404 everywhere.
#[tokio::test]
async fn a_redis_cluster_serves_sessions_across_replicas() {
    let cluster = RedisCluster::start().await.expect("redis cluster");
    let nodes = cluster
        .urls()
        .iter()
        .map(|u| format!("\"{u}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let yaml = format!("redis:\n  cluster_nodes: [{nodes}]\n");
    let mut backends = Vec::new();
    for name in ["a", "b", "c"] {
        backends.push(backend(name, None, &yaml).await);
    }
    let addrs: Vec<String> = backends.iter().map(|(b, _)| b.address()).collect();
    let proxy = Proxy::start(&addrs, "").await.expect("proxy");
    let c = session(&proxy.mcp(), json!({})).await;
    let mut served = std::collections::HashSet::new();
    for i in 1..=6 {
        let v = count(&c, &proxy.mcp(), i).await;
        assert_eq!(v["value"], i, "one counter across replicas");
        served.insert(v["node"].as_str().unwrap_or_default().to_owned());
    }
    assert_eq!(served.len(), 3, "round-robin moved the session: {served:?}");
    let sid = c.session.clone().expect("session id");
    let cluster = &cluster;
    let slot = async |k: String| {
        cluster
            .cli(&["CLUSTER", "KEYSLOT", &k])
            .await
            .unwrap_or_default()
    };
    assert_eq!(
        slot(tests::session_key(&sid)).await,
        slot(tests::log_key(&sid)).await,
        "a session's keys share one slot"
    );
    // A request stream logged on a, replayed on c.
    let (a, c_backend) = (&backends[0].0, &backends[2].0);
    let (_, mut s) = c
        .post_stream(
            &a.mcp(),
            &json!({"jsonrpc": "2.0", "id": 50, "method": "tools/call",
                    "params": {"name": "echo", "arguments": {"message": "hi"}}}),
        )
        .await
        .expect("post on a");
    let mut first_id = None;
    let mut answered = false;
    while let Some(e) = tokio::time::timeout(WAIT, s.recv()).await.ok().flatten() {
        if first_id.is_none() {
            first_id = e.id.clone();
        }
        if e.json().is_some_and(|m| m["id"] == 50) {
            answered = true;
            break;
        }
    }
    assert!(answered, "the echo answers on a");
    let first = first_id.expect("the stream's first event has an id");
    let (status, mut replay) = c
        .open_stream(&c_backend.mcp(), Some(&first))
        .await
        .expect("GET on c");
    assert_eq!(status, 200);
    let again = next_matching(&mut replay, WAIT, |m| m["id"] == 50).await;
    assert!(
        again.is_some(),
        "Last-Event-ID {first} replays the answer on c"
    );
    assert_eq!(c.delete(&proxy.mcp()).await.ok(), Some(200));
    for (b, _) in &backends {
        let r = c.call(&b.mcp(), 99, "ping", json!({})).await.expect("ping");
        assert_eq!(r.status, 404, "deleted: 404 on {}", b.node_id);
    }
    let left = cluster.keys(&format!("*{sid}*")).await.unwrap_or_default();
    assert!(left.is_empty(), "no key of the session is left: {left:?}");
}

/// One master, one replica, three sentinels: the master is killed under load; requests get
/// 503 (never 404) during the failover and sessions continue on the new master without a
/// backend restart.
#[tokio::test]
async fn a_sentinel_failover_costs_503s_and_no_replicated_session() {
    let mut sentinel = RedisSentinel::start().await.expect("sentinel setup");
    let list = sentinel
        .sentinels()
        .iter()
        .map(|s| format!("\"{s}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let yaml = format!(
        "redis:\n  sentinels: [{list}]\n  sentinel_master: {}\nredis_timeout_ms: 500\n",
        RedisSentinel::MASTER
    );
    let (a, _ca) = backend("a", None, &yaml).await;
    let (b, _cb) = backend("b", None, &yaml).await;
    let urls = [a.mcp(), b.mcp()];
    let mut clients = Vec::new();
    for i in 0..4 {
        let c = session(&urls[i % 2], json!({})).await;
        assert_eq!(count(&c, &urls[(i + 1) % 2], 1).await["value"], 1);
        clients.push(c);
    }
    sentinel.sync_replica().await.expect("records replicated");
    let old_master = sentinel.master_port;
    sentinel.kill_master().await;
    let mut statuses = std::collections::BTreeMap::<u16, u32>::new();
    let mut last_value = vec![1_i64; clients.len()];
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut recovered_at = None;
    let mut id = 10;
    while Instant::now() < deadline {
        let mut all_ok = true;
        for (i, c) in clients.iter().enumerate() {
            id += 1;
            let r = c
                .call(
                    &urls[id as usize % 2],
                    id,
                    "tools/call",
                    json!({"name": "counter", "arguments": {}}),
                )
                .await
                .expect("request");
            *statuses.entry(r.status).or_default() += 1;
            assert_ne!(r.status, 404, "a replicated session is never 404: {r:?}");
            if r.status == 200 {
                let v = r
                    .result(id)
                    .map(|v| v["structuredContent"]["value"].as_i64().unwrap_or(-1));
                let v = v.unwrap_or(-1);
                assert!(v > last_value[i], "session {i} continues its counter: {v}");
                last_value[i] = v;
            } else {
                assert_eq!(r.status, 503, "during the failover: 503, got {r:?}");
                assert!(
                    r.headers.get("retry-after").is_some(),
                    "503 has Retry-After"
                );
                all_ok = false;
            }
        }
        if all_ok
            && sentinel
                .current_master()
                .await
                .is_some_and(|p| p != old_master)
        {
            recovered_at = Some(Instant::now());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        recovered_at.is_some(),
        "sessions continue on the new master: {statuses:?}"
    );
    assert!(
        statuses.contains_key(&503),
        "the failover was seen as 503s, not hidden: {statuses:?}"
    );
    assert_eq!(sentinel.current_master().await, Some(sentinel.replica_port));
    let _ = sentinel.dir();
}

/// Backends reach a TLS-only Redis (client certificate required) with `rediss://`.
#[tokio::test]
async fn backends_use_a_tls_redis_with_a_client_certificate() {
    let pki = TestPki::new().expect("test pki");
    let redis = TlsRedis::start(&pki).await.expect("tls redis");
    let yaml = format!(
        "redis:\n  url: rediss://127.0.0.1:{}\n  ca_file: {}\n  cert_file: {}\n  key_file: {}\n",
        redis.port,
        pki.ca.display(),
        pki.client_cert.display(),
        pki.client_key.display(),
    );
    let (a, _ca) = backend("a", None, &yaml).await;
    let (b, _cb) = backend("b", None, &yaml).await;
    let c = session(&a.mcp(), json!({})).await;
    assert_eq!(count(&c, &b.mcp(), 1).await["value"], 1);
    assert_eq!(count(&c, &a.mcp(), 2).await["value"], 2);
    let sid = c.session.clone().expect("sid");
    assert_eq!(
        redis
            .cli(&pki, &["EXISTS", &tests::session_key(&sid)])
            .await
            .ok()
            .as_deref(),
        Some("1"),
        "the record is in the TLS Redis"
    );
    assert_eq!(health(&a).await["redis"], "connected");
}
