//! Issue 10: nothing breaks when a backend goes away. Real Redis, real backends, the real
//! proxy; backends are SIGKILLed, drained and restarted while clients use them.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tests::{Backend, McpClient, Proxy, Redis};
use tokio::sync::Mutex;

const WAIT: Duration = Duration::from_secs(10);

/// Backends named `names` on one Redis, with `yaml` as their config file when given (the
/// directory holding it is returned too, to outlive them).
pub(crate) async fn backends_on(
    redis: &Redis,
    names: &[&str],
    extra: &[&str],
    yaml: Option<&str>,
) -> (Vec<Backend>, tests::TempDir) {
    let dir = tests::TempDir::new("backend-conf");
    let mut args: Vec<String> = extra.iter().map(|a| (*a).to_owned()).collect();
    if let Some(yaml) = yaml {
        let conf = dir.0.join("backend.yaml");
        std::fs::write(&conf, yaml).expect("write config");
        args.push("-c".into());
        args.push(conf.to_str().unwrap_or_default().to_owned());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut backends = Vec::new();
    for name in names {
        backends.push(
            Backend::start(name, Some(&redis.url()), &args)
                .await
                .unwrap_or_else(|e| panic!("backend {name}: {e:#}")),
        );
    }
    (backends, dir)
}

async fn health(b: &Backend) -> Value {
    match reqwest::get(format!("{}/health", b.base())).await {
        Ok(r) => r.json().await.unwrap_or_default(),
        Err(_) => Value::Null,
    }
}

/// The backend holding the session's standalone stream, once it is not `moved_from`: the one
/// with the stream's `ev:<id>` bus topic (one session in the test, so one more topic than the
/// other replicas).
async fn stream_holder(
    backends: &[Backend],
    baseline: u64,
    moved_from: Option<usize>,
) -> Option<usize> {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        let mut holders = Vec::new();
        for (i, b) in backends.iter().enumerate() {
            if health(b).await["busTopics"].as_u64() == Some(baseline + 1) {
                holders.push(i);
            }
        }
        if let [only] = holders.as_slice()
            && Some(*only) != moved_from
        {
            return Some(*only);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// A client holds a GET stream through the proxy while notifications are raised every 100 ms;
/// the stream's backend is SIGKILLed, then the next holder drained, then the next one
/// restarted: every notification arrives exactly once and in order, on one HTTP response.
#[tokio::test]
async fn a_stream_survives_its_backend_killed_drained_and_restarted() {
    let redis = Redis::start(false).await.expect("redis");
    let (mut backends, _dir) = backends_on(&redis, &["a", "b", "c"], &[], None).await;
    let baseline = health(&backends[0]).await["busTopics"]
        .as_u64()
        .unwrap_or(0);
    let addrs: Vec<String> = backends.iter().map(Backend::address).collect();
    let proxy = Proxy::start(&addrs, "shared_sessions: true")
        .await
        .expect("proxy");
    let mut c = McpClient::new();
    c.initialize(&proxy.mcp(), json!({}))
        .await
        .expect("initialize");
    let (status, mut stream) = c.open_stream(&proxy.mcp(), None).await.expect("GET");
    assert_eq!(status, 200);
    let first = stream_holder(&backends, baseline, None)
        .await
        .expect("a holder");

    // One notification every 100 ms; remember those whose call succeeded.
    let sent = Arc::new(Mutex::new(Vec::<u64>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let notifier = {
        let (c, url, sent, stop) = (c.clone(), proxy.mcp(), sent.clone(), stop.clone());
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let ok = c
                    .tool(
                        &url,
                        1000 + n as i64,
                        "notify",
                        json!({"message": format!("n{n}")}),
                    )
                    .await
                    .is_ok();
                if ok {
                    sent.lock().await.push(n);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let received = Arc::new(Mutex::new(Vec::<u64>::new()));
    let reader = {
        let received = received.clone();
        tokio::spawn(async move {
            let mut closed = false;
            loop {
                match tokio::time::timeout(Duration::from_secs(30), stream.recv()).await {
                    Ok(Some(event)) => {
                        let Some(m) = event.json() else { continue };
                        if m["method"] == "notifications/message"
                            && let Some(n) = m["params"]["data"]["message"]
                                .as_str()
                                .and_then(|s| s.strip_prefix('n'))
                                .and_then(|s| s.parse::<u64>().ok())
                        {
                            received.lock().await.push(n);
                        }
                    }
                    Ok(None) => {
                        closed = true;
                        break;
                    }
                    Err(_) => break,
                }
            }
            closed
        })
    };
    tokio::time::sleep(Duration::from_millis(800)).await;

    // 1. SIGKILL the holder.
    backends[first].kill().await;
    let second = stream_holder(&backends, baseline, Some(first))
        .await
        .expect("the stream moved to another backend");
    backends[first].restart().await.expect("restart");
    tokio::time::sleep(Duration::from_millis(800)).await;

    // 2. Drain the new holder: the stream moves within a second.
    let name = backends[second].address();
    let (s, v) = proxy
        .admin_post(&format!("/admin/backends/{name}/drain"))
        .await
        .expect("drain");
    assert_eq!(s, 200, "{v}");
    let moved_at = Instant::now();
    let third = stream_holder(&backends, baseline, Some(second))
        .await
        .expect("the stream left the drained backend");
    assert!(
        moved_at.elapsed() < Duration::from_secs(3),
        "moved in {:?}",
        moved_at.elapsed()
    );
    let (s, v) = proxy
        .admin_post(&format!("/admin/backends/{name}/undrain"))
        .await
        .expect("undrain");
    assert_eq!(s, 200, "{v}");
    tokio::time::sleep(Duration::from_millis(800)).await;

    // 3. Restart the holder (SIGKILL, start again).
    backends[third].restart().await.expect("restart");
    tokio::time::sleep(Duration::from_millis(1500)).await;

    stop.store(true, Ordering::Relaxed);
    let _ = notifier.await;
    let sent = sent.lock().await.clone();
    let last = *sent.last().expect("notifications were sent");
    let deadline = Instant::now() + WAIT;
    while !received.lock().await.contains(&last) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let got = received.lock().await.clone();
    assert!(
        got.windows(2).all(|w| w[0] < w[1]),
        "in order, none twice: {got:?}"
    );
    let missing: Vec<u64> = sent.iter().filter(|n| !got.contains(n)).copied().collect();
    assert!(
        missing.is_empty(),
        "every notification arrives: missing {missing:?} of {sent:?}"
    );
    assert!(
        got.len() >= 20,
        "the run lasted: {} notifications",
        got.len()
    );
    assert!(!reader.is_finished(), "the one HTTP response is still open");
    reader.abort();
}

/// Every backend restarted in turn with SIGTERM (drain, then exit) while sessions call tools
/// through the proxy and a stream receives notifications: no request fails, the stream never
/// breaks, and no counter skips or repeats.
#[tokio::test]
async fn a_rolling_restart_under_load_is_invisible() {
    let redis = Redis::start(false).await.expect("redis");
    let (mut backends, _dir) = backends_on(
        &redis,
        &["a", "b", "c"],
        &[],
        Some(
            "shutdown_drain_seconds: 1
shutdown_grace_seconds: 5
",
        ),
    )
    .await;
    let addrs: Vec<String> = backends.iter().map(Backend::address).collect();
    let proxy = Proxy::start(&addrs, "shared_sessions: true")
        .await
        .expect("proxy");
    let url = proxy.mcp();
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..6 {
        let (url, stop) = (url.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            let mut c = McpClient::new();
            c.initialize(&url, json!({})).await.expect("initialize");
            let (mut ok, mut failed, mut expected) = (0u64, Vec::new(), 1i64);
            let mut id = 10;
            while !stop.load(Ordering::Relaxed) {
                id += 1;
                match c
                    .tool(&url, id, "counter", json!({"action": "increment"}))
                    .await
                {
                    Ok(r) => {
                        let v = r["structuredContent"]["value"].as_i64().unwrap_or(-1);
                        assert_eq!(v, expected, "worker {w}: the counter goes up by one");
                        expected += 1;
                        ok += 1;
                    }
                    Err(e) => failed.push(format!("{e:#}")),
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (ok, failed)
        }));
    }
    let mut c = McpClient::new();
    c.initialize(&url, json!({})).await.expect("initialize");
    let (status, mut stream) = c.open_stream(&url, None).await.expect("GET");
    assert_eq!(status, 200);
    let sent = Arc::new(Mutex::new(Vec::<u64>::new()));
    let notifier = {
        let (c, url, sent, stop) = (c.clone(), url.clone(), sent.clone(), stop.clone());
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                if c.tool(
                    &url,
                    1000 + n as i64,
                    "notify",
                    json!({"message": format!("n{n}")}),
                )
                .await
                .is_ok()
                {
                    sent.lock().await.push(n);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            n
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    for b in &mut backends {
        b.terminate(Duration::from_secs(15))
            .await
            .expect("graceful exit");
        b.start_again().await.expect("start again");
        let name = b.address();
        let deadline = Instant::now() + WAIT;
        while !proxy
            .backend(&name)
            .await
            .is_ok_and(|v| v["healthy"] == true)
        {
            assert!(Instant::now() < deadline, "{name} back in the pool");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let attempted = notifier.await.unwrap_or_default();
    let mut calls = 0;
    for w in workers {
        let (ok, failed) = w.await.expect("worker");
        assert!(
            failed.is_empty(),
            "no call fails during a rolling restart: {failed:?}"
        );
        calls += ok;
    }
    let sent = sent.lock().await.clone();
    assert_eq!(sent.len() as u64, attempted, "every notify call succeeded");
    let mut got = Vec::new();
    let last = sent.last().copied().unwrap_or(0);
    let deadline = Instant::now() + WAIT;
    while !got.contains(&last) && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(1), stream.recv()).await {
            Ok(Some(event)) => {
                if let Some(n) = event.json().and_then(|m| {
                    (m["method"] == "notifications/message")
                        .then(|| m["params"]["data"]["message"].as_str().map(str::to_owned))
                        .flatten()
                }) && let Some(n) = n.strip_prefix('n').and_then(|s| s.parse::<u64>().ok())
                {
                    got.push(n);
                }
            }
            Ok(None) => panic!("the stream broke after {got:?}"),
            Err(_) => {}
        }
    }
    assert_eq!(
        got, sent,
        "every notification once, in order, on one response"
    );
    eprintln!(
        "rolling restart: {calls} tool calls, {} notifications, 0 failures",
        got.len()
    );
}

/// What one `tools/call` through the proxy came to.
enum Outcome {
    Value(Value),
    /// A well-formed JSON-RPC error (the call may or may not have run).
    RpcError(Value),
    /// No well-formed answer: a truncated body or a reset.
    Broken(String),
}

async fn call_tool(c: &McpClient, url: &str, id: i64, name: &str, args: Value) -> Outcome {
    let params = json!({"name": name, "arguments": args});
    match c.call(url, id, "tools/call", params).await {
        Err(e) => Outcome::Broken(format!("{e:#}")),
        Ok(reply) => match reply.response(id) {
            Some(m) if m.get("result").is_some() => Outcome::Value(m["result"].clone()),
            Some(m) if m.get("error").is_some() => Outcome::RpcError(m["error"].clone()),
            other => Outcome::Broken(format!(
                "status {} without a response: {other:?}",
                reply.status
            )),
        },
    }
}

/// Twenty sessions call a counter (not repeatable) and echo (read-only) through the proxy
/// while one of three backends is SIGKILLed every two seconds and started again: no session
/// is lost, no counter call runs twice, every echo succeeds, and every call that fails is a
/// well-formed JSON-RPC error, never a truncated answer.
#[tokio::test]
async fn killing_backends_under_load_loses_nothing_and_repeats_nothing() {
    let redis = Redis::start(false).await.expect("redis");
    let (mut backends, _dir) = backends_on(&redis, &["a", "b", "c"], &[], None).await;
    let addrs: Vec<String> = backends.iter().map(Backend::address).collect();
    let proxy = Proxy::start(
        &addrs,
        "shared_sessions: true\nfailover: {trust_tool_annotations: true}",
    )
    .await
    .expect("proxy");
    let url = proxy.mcp();
    // The proxy learns the tools' annotations from a tools/list passing through.
    let mut c = McpClient::new();
    c.initialize(&url, json!({})).await.expect("initialize");
    assert_eq!(
        c.call(&url, 2, "tools/list", json!({}))
            .await
            .map(|r| r.status)
            .ok(),
        Some(200)
    );
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..20 {
        let (url, stop) = (url.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            let mut c = McpClient::new();
            c.initialize(&url, json!({})).await.expect("initialize");
            let mut counts = [0u64; 5]; // counter ok, counter unsure, echo ok, echo failed, broken
            let mut problems = Vec::new();
            let (mut last, mut unsure) = (0i64, 0i64);
            let mut id = 10;
            while !stop.load(Ordering::Relaxed) {
                id += 1;
                match call_tool(&c, &url, id, "counter", json!({"action": "increment"})).await {
                    Outcome::Value(r) => {
                        let v = r["structuredContent"]["value"].as_i64().unwrap_or(-1);
                        if v <= last || v > last + 1 + unsure {
                            problems.push(format!(
                                "worker {w}: counter {last} -> {v} with {unsure} unsure calls"
                            ));
                        }
                        (last, unsure) = (v, 0);
                        counts[0] += 1;
                    }
                    Outcome::RpcError(e) => {
                        if e["code"] == -32001 {
                            problems.push(format!("worker {w}: session lost: {e}"));
                        }
                        unsure += 1;
                        counts[1] += 1;
                    }
                    Outcome::Broken(e) => {
                        problems.push(format!("worker {w}: counter answer broken: {e}"));
                        counts[4] += 1;
                    }
                }
                id += 1;
                match call_tool(&c, &url, id, "echo", json!({"message": format!("m{id}")})).await {
                    Outcome::Value(r) if r["content"][0]["text"] == format!("m{id}") => {
                        counts[2] += 1
                    }
                    Outcome::Value(r) => problems.push(format!("worker {w}: wrong echo {r}")),
                    Outcome::RpcError(e) => {
                        problems.push(format!("worker {w}: read-only call failed: {e}"));
                        counts[3] += 1;
                    }
                    Outcome::Broken(e) => {
                        problems.push(format!("worker {w}: echo answer broken: {e}"));
                        counts[4] += 1;
                    }
                }
            }
            (counts, problems)
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    for round in 0..5 {
        let b = &mut backends[round % 3];
        b.kill().await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        b.start_again().await.expect("start again");
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut totals = [0u64; 5];
    let mut problems = Vec::new();
    for w in workers {
        let (counts, p) = w.await.expect("worker");
        for (t, n) in totals.iter_mut().zip(counts) {
            *t += n;
        }
        problems.extend(p);
    }
    eprintln!(
        "5 SIGKILLs under load: counter {} ok, {} unsure (JSON-RPC error); echo {} ok, {} failed; {} broken answers",
        totals[0], totals[1], totals[2], totals[3], totals[4]
    );
    assert!(problems.is_empty(), "{problems:#?}");
    assert!(
        totals[0] > 100 && totals[2] > 100,
        "the load ran: {totals:?}"
    );
}

/// A backend answering 500 to every call while its health check passes is ejected after
/// three errors in a row and gets traffic again after its interval; with two of three
/// failing, max_ejected_percent keeps the pool serving.
#[tokio::test]
async fn outliers_are_ejected_and_the_panic_threshold_keeps_the_pool_serving() {
    use tests::capture::Failing;
    let redis = Redis::start(false).await.expect("redis");
    let good = Backend::start("good", Some(&redis.url()), &[])
        .await
        .expect("backend");
    let bad = Failing::start().await.expect("failing upstream");
    let outlier = "outlier_detection: {consecutive_errors: 3, base_ejection_ms: 1500, max_ejection_ms: 6000, max_ejected_percent: 50, slow_start_ms: 0}";
    let proxy = Proxy::start(&[good.address(), bad.address()], outlier)
        .await
        .expect("proxy");
    let url = proxy.mcp();
    let ping = |id: i64| json!({"jsonrpc": "2.0", "id": id, "method": "ping"});
    let mut c = McpClient::new();
    // The session is opened on the good backend itself (the failing one would break the
    // handshake); the pings then go through the proxy.
    c.initialize(&good.mcp(), json!({}))
        .await
        .expect("initialize");
    // Round-robin: the failing backend gets every other request until ejected.
    let mut statuses = Vec::new();
    for id in 0..12 {
        statuses.push(c.post(&url, &ping(id)).await.map(|r| r.status).unwrap_or(0));
    }
    let bad_state = proxy.backend(&bad.address()).await.expect("admin");
    assert_eq!(bad_state["ejected"], true, "{bad_state} after {statuses:?}");
    assert_eq!(bad_state["healthy"], true, "its health check still passes");
    assert_eq!(
        statuses.iter().filter(|s| **s == 500).count(),
        3,
        "{statuses:?}"
    );
    assert!(
        statuses[6..].iter().all(|s| *s == 200),
        "ejected: {statuses:?}"
    );
    // After the interval it gets traffic again (and is ejected again, for twice as long).
    let calls = bad.calls.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1700)).await;
    for id in 100..104 {
        let _ = c.post(&url, &ping(id)).await;
    }
    assert!(
        bad.calls.load(Ordering::SeqCst) > calls,
        "back after its interval"
    );

    // Two of three failing: at most half may be ejected, so one failing backend stays in.
    let bad2 = Failing::start().await.expect("failing upstream");
    proxy
        .write_config(&[good.address(), bad.address(), bad2.address()], outlier)
        .expect("config");
    assert_eq!(
        proxy.admin_post("/admin/reload").await.map(|r| r.0).ok(),
        Some(200)
    );
    let mut statuses = Vec::new();
    for id in 200..230 {
        statuses.push(c.post(&url, &ping(id)).await.map(|r| r.status).unwrap_or(0));
    }
    let all = proxy.admin("/admin/backends").await.expect("admin");
    let ejected = all["pools"][0]["backends"]
        .as_array()
        .map(|bs| bs.iter().filter(|b| b["ejected"] == true).count())
        .unwrap_or(9);
    assert!(ejected <= 1, "never more than half of the pool: {all}");
    assert!(
        !statuses.contains(&503),
        "the pool keeps serving: {statuses:?}"
    );
    assert!(
        statuses.iter().filter(|s| **s == 200).count() >= 10,
        "{statuses:?}"
    );
}

/// Restarts `b` gracefully (SIGTERM, then start) after `delay`, and waits until the proxy
/// sees it healthy again.
async fn restart_later(b: &mut Backend, proxy: &Proxy, delay: Duration) {
    tokio::time::sleep(delay).await;
    b.terminate(Duration::from_secs(15))
        .await
        .expect("graceful exit");
    b.start_again().await.expect("start again");
    let deadline = Instant::now() + WAIT;
    while !proxy
        .backend(&b.address())
        .await
        .is_ok_and(|v| v["healthy"] == true)
    {
        assert!(Instant::now() < deadline, "{} back in the pool", b.node_id);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The official conformance suite and the Python and TypeScript SDKs through the proxy give
/// the same results while backends are restarted in the middle of their runs.
#[tokio::test]
async fn conformance_and_the_sdks_pass_while_backends_restart() {
    let redis = Redis::start(false).await.expect("redis");
    let (mut b, _dir) = backends_on(
        &redis,
        &["a", "b", "c"],
        &["--conformance"],
        Some("shutdown_drain_seconds: 1\nshutdown_grace_seconds: 10\n"),
    )
    .await;
    let addrs: Vec<String> = b.iter().map(Backend::address).collect();
    let proxy = Proxy::start(
        &addrs,
        "shared_sessions: true\nfailover: {trust_tool_annotations: true}",
    )
    .await
    .expect("proxy");
    let direct = super::conformance(&b[0].mcp(), "2025-11-25").await;
    let url = proxy.mcp();
    let started = Instant::now();
    let ((proxied, took), restarted) = tokio::join!(
        async {
            let total = super::conformance(&url, "2025-11-25").await;
            (total, started.elapsed())
        },
        async {
            restart_later(&mut b[1], &proxy, Duration::from_millis(300)).await;
            let first = started.elapsed();
            restart_later(&mut b[2], &proxy, Duration::from_millis(100)).await;
            first
        }
    );
    eprintln!("conformance took {took:?}; the first restart was done at {restarted:?}");
    assert!(
        took > Duration::from_millis(300),
        "the first SIGTERM (at 300 ms) came during the run"
    );
    assert_eq!(
        proxied, direct,
        "the same totals while two backends restarted"
    );
    let base = proxy.base();
    let args = [base.as_str(), "legacy"];
    let started = Instant::now();
    let ((out, took), ()) = tokio::join!(
        async { (super::python(&args).await, started.elapsed()) },
        async {
            restart_later(&mut b[0], &proxy, Duration::from_millis(300)).await;
        }
    );
    eprintln!("python SDK took {took:?}; SIGTERM at 300 ms");
    assert!(
        took > Duration::from_millis(300),
        "the SIGTERM came during the run"
    );
    assert!(
        out.contains("OK"),
        "python SDK while a backend restarted: {out}"
    );
    let started = Instant::now();
    let (((ok, out), took), ()) = tokio::join!(
        async {
            let run = tests::sdk_client("node", "ts_client.mjs", &[&base, "http"], None).await;
            (run, started.elapsed())
        },
        async {
            restart_later(&mut b[1], &proxy, Duration::from_millis(100)).await;
        }
    );
    eprintln!("typescript SDK took {took:?}; SIGTERM at 100 ms");
    assert!(
        took > Duration::from_millis(100),
        "the SIGTERM came during the run"
    );
    assert!(ok, "typescript SDK while a backend restarted:\n{out}");
}

/// A port free on all of 127.0.0.2-4 (the backends behind one DNS name share it).
fn port_free_on_three_addresses() -> u16 {
    for _ in 0..50 {
        let port = tests::free_port();
        let free = (2..=4).all(|i| {
            std::net::TcpListener::bind(("127.0.0.".to_owned() + &i.to_string(), port)).is_ok()
        });
        if free {
            return port;
        }
    }
    panic!("no port free on 127.0.0.2-4");
}

/// Backends behind a DNS name (a test-owned DNS server whose records change mid-run): a new
/// record starts receiving traffic, a removed one is drained, the admin API adds and removes
/// a backend, and no request fails meanwhile.
#[tokio::test]
async fn dns_and_admin_backends_come_and_go_without_a_failed_request() {
    use std::net::Ipv4Addr;
    let dns = tests::dns::TestDns::start().await.expect("dns");
    let redis = Redis::start(false).await.expect("redis");
    let port = port_free_on_three_addresses();
    let ip = |i: u8| Ipv4Addr::new(127, 0, 0, i);
    let b2 = Backend::start_on("b2", Some(&redis.url()), "127.0.0.2", port)
        .await
        .expect("b2");
    let b3 = Backend::start_on("b3", Some(&redis.url()), "127.0.0.3", port)
        .await
        .expect("b3");
    let b4 = Backend::start_on("b4", Some(&redis.url()), "127.0.0.4", port)
        .await
        .expect("b4");
    dns.set("mcp.test", &[ip(2)]);
    let dns_address = dns.address();
    let proxy = Proxy::start_custom(|p| {
        format!(
            "{}listeners: [{{address: 127.0.0.1:{}}}]\nadmin: {{address: 127.0.0.1:{}}}\npools:\n  - name: mcp\n    shared_sessions: true\n    backends: [{{discover: \"mcp.test:{port}\", name: mcp}}]\n    dns: {{servers: [\"{dns_address}\"], min_refresh_ms: 200, max_refresh_ms: 1000}}\n    health_check: {{interval_ms: 200, timeout_ms: 150, healthy_threshold: 1, unhealthy_threshold: 2}}\n",
            p.server_yaml(),
            p.port,
            p.admin_port
        )
    })
    .await
    .expect("proxy");
    let url = proxy.mcp();
    let names = async || -> Vec<String> {
        let all = proxy.admin("/admin/backends").await.unwrap_or_default();
        all["pools"][0]["backends"]
            .as_array()
            .map(|bs| {
                bs.iter()
                    .filter_map(|b| b["name"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let until = async |what: &str, want: &dyn Fn(&[String]) -> bool| {
        let deadline = Instant::now() + WAIT;
        loop {
            let n = names().await;
            if want(&n) {
                return;
            }
            assert!(Instant::now() < deadline, "{what}: backends {n:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    until("the first record is a backend", &|n| n == ["mcp-127.0.0.2"]).await;

    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (url, stop) = (url.clone(), stop.clone());
        tokio::spawn(async move {
            let mut c = McpClient::new();
            c.initialize(&url, json!({})).await.expect("initialize");
            let (mut ok, mut failed) = (0u64, Vec::new());
            let mut served = std::collections::BTreeSet::new();
            let mut id = 10;
            while !stop.load(Ordering::Relaxed) {
                id += 1;
                match c
                    .call(
                        &url,
                        id,
                        "tools/call",
                        json!({"name": "hello", "arguments": {}}),
                    )
                    .await
                {
                    Ok(r) if r.result(id).is_ok() => {
                        ok += 1;
                        served.insert(r.served_by());
                    }
                    Ok(r) => failed.push(format!("{} {:?}", r.status, r.body)),
                    Err(e) => failed.push(format!("{e:#}")),
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (ok, failed, served)
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    dns.set("mcp.test", &[ip(2), ip(3)]);
    until("a new record joins", &|n| n.len() == 2).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    dns.set("mcp.test", &[ip(3)]);
    until("a removed record leaves", &|n| n == ["mcp-127.0.0.3"]).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The admin API refuses what it must not take: a host name (a lookup would block), a
    // taken name or address, a bad weight, unknown keys, no JSON at all.
    for (body, want) in [
        (json!({"pool": "mcp", "address": "evil.example:80"}), 400),
        (
            json!({"pool": "mcp", "address": "127.0.0.3:1", "name": "mcp-127.0.0.3"}),
            409,
        ),
        (
            json!({"pool": "mcp", "address": format!("127.0.0.3:{port}")}),
            409,
        ),
        (
            json!({"pool": "mcp", "address": "127.0.0.9:1", "weight": 0}),
            400,
        ),
        (
            json!({"pool": "mcp", "address": "127.0.0.9:1", "admin": true}),
            400,
        ),
        (json!({"pool": "nope", "address": "127.0.0.9:1"}), 404),
        (json!("not an object"), 400),
    ] {
        let (status, v) = proxy_post_json(&proxy, "/admin/backends", &body).await;
        assert_eq!(status, want, "{body} -> {v}");
    }
    assert_eq!(proxy_delete(&proxy, "/admin/backends/nobody").await.0, 404);
    assert_eq!(
        names().await,
        ["mcp-127.0.0.3"],
        "refused requests changed nothing"
    );
    // The admin API adds and removes one too.
    let add = json!({"pool": "mcp", "address": b4.address(), "name": "manual"});
    let (status, v) = proxy_post_json(&proxy, "/admin/backends", &add).await;
    assert_eq!(status, 200, "{v}");
    until("the added backend joins", &|n| {
        n.contains(&"manual".to_owned())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let (status, v) = proxy_delete(&proxy, "/admin/backends/manual").await;
    assert_eq!(status, 200, "{v}");
    until("the removed backend leaves", &|n| {
        !n.contains(&"manual".to_owned())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let (ok, failed, served) = load.await.expect("load");
    eprintln!(
        "dns and admin changes: {ok} calls, {} failed, served by {served:?}",
        failed.len()
    );
    assert!(failed.is_empty(), "no request fails: {failed:?}");
    for name in ["mcp-127.0.0.2", "mcp-127.0.0.3", "manual"] {
        assert!(served.contains(name), "{name} served requests: {served:?}");
    }
    drop((b2, b3, b4));
}

async fn proxy_post_json(proxy: &Proxy, path: &str, body: &Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(proxy.admin_url(path))
        .json(body)
        .send()
        .await
        .expect("admin POST");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or_default())
}

async fn proxy_delete(proxy: &Proxy, path: &str) -> (u16, Value) {
    let r = reqwest::Client::new()
        .delete(proxy.admin_url(path))
        .header("x-mcp-admin", "1")
        .send()
        .await
        .expect("admin DELETE");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or_default())
}

/// A client that reconnects by itself with `Last-Event-ID` while the backend its stream was
/// on is dead lands on another one and gets exactly what it missed.
#[tokio::test]
async fn a_client_reconnecting_with_its_last_event_id_while_its_backend_is_down_misses_nothing() {
    let redis = Redis::start(false).await.expect("redis");
    let (mut backends, _dir) = backends_on(&redis, &["a", "b"], &[], None).await;
    let addrs: Vec<String> = backends.iter().map(Backend::address).collect();
    let proxy = Proxy::start(&addrs, "shared_sessions: true")
        .await
        .expect("proxy");
    let url = proxy.mcp();
    let mut c = McpClient::new();
    c.initialize(&url, json!({})).await.expect("initialize");
    let (status, mut stream) = c.open_stream(&url, None).await.expect("GET");
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_millis(200)).await;
    c.tool(&url, 1, "notify", json!({"message": "before"}))
        .await
        .expect("notify");
    let mut last_id = None;
    while let Ok(Some(e)) = tokio::time::timeout(Duration::from_secs(2), stream.recv()).await {
        if e.id.is_some() {
            last_id = e.id.clone();
        }
        if e.json()
            .is_some_and(|m| m["params"]["data"]["message"] == "before")
        {
            break;
        }
    }
    let last_id = last_id.expect("the stream carries event ids");
    drop(stream);
    // The client is gone; both backends die and one comes back; events happen meanwhile.
    for b in &mut backends {
        b.kill().await;
    }
    backends[0].start_again().await.expect("a again");
    let deadline = Instant::now() + WAIT;
    while !proxy
        .backend(&backends[0].address())
        .await
        .is_ok_and(|v| v["healthy"] == true)
    {
        assert!(Instant::now() < deadline, "a back in the pool");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for i in 0..3 {
        c.tool(
            &url,
            10 + i,
            "notify",
            json!({"message": format!("missed{i}")}),
        )
        .await
        .expect("notify while the client was away");
    }
    let (status, mut again) = c
        .open_stream(&url, Some(&last_id))
        .await
        .expect("GET again");
    assert_eq!(status, 200);
    let mut got = Vec::new();
    while got.len() < 3 {
        let Ok(Some(e)) = tokio::time::timeout(WAIT, again.recv()).await else {
            break;
        };
        if let Some(m) = e.json().filter(|m| m["method"] == "notifications/message") {
            got.push(
                m["params"]["data"]["message"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            );
        }
    }
    assert_eq!(
        got,
        ["missed0", "missed1", "missed2"],
        "exactly what was missed"
    );
}
