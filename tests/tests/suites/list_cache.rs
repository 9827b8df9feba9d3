//! Issue 12: the proxy's edge cache of 2026-07-28 list results, against real backends that
//! mark their lists `ttlMs` / `cacheScope`, on one Redis, round-robined by the real proxy.

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};
use tests::{Backend, Proxy, Redis};

/// A stateless 2026-07-28 request through the proxy; returns `X-MCP-Cache` ("" without one)
/// and the JSON-RPC message.
async fn send(
    http: &reqwest::Client,
    url: &str,
    bearer: Option<&str>,
    method: &str,
    params: Value,
) -> (String, Value) {
    let (headers, m) =
        super::tasks::stateless(http, url, bearer, json!("c-1"), method, (params, json!({}))).await;
    let cache = headers
        .get("x-mcp-cache")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    (cache, m)
}

/// `method` requests the backends answered, all replicas together.
async fn served(backends: &[Backend], method: &str) -> u64 {
    let mut n = 0.0;
    let prefix = format!("mcp_backend_requests_total{{method=\"{method}\"");
    for b in backends {
        let text = reqwest::get(format!("{}/metrics", b.base()))
            .await
            .expect("metrics")
            .text()
            .await
            .unwrap_or_default();
        n += text
            .lines()
            .filter(|l| l.starts_with(&prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>();
    }
    n as u64
}

/// Lists `method` until the cache answers (its invalidation stream is up), within 10 s.
async fn until_hit(http: &reqwest::Client, url: &str, bearer: Option<&str>, method: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (cache, m) = send(http, url, bearer, method, json!({})).await;
        assert!(m.get("result").is_some(), "{m}");
        if cache == "hit" {
            return;
        }
        assert!(Instant::now() < deadline, "the list cache never answered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn repeated_lists_reach_the_backends_once_per_ttl_and_a_list_change_empties_the_cache() {
    let redis = Redis::start(false).await.expect("redis");
    let ttl = Duration::from_millis(2000);
    let (b, _dir) = super::continuity::backends_on(
        &redis,
        &["a", "b", "c"],
        &[],
        Some("conformance: true\nlist_ttl_ms: 2000\n"),
    )
    .await;
    let addrs: Vec<String> = b.iter().map(Backend::address).collect();
    let proxy = Proxy::start(&addrs, "list_cache: {enabled: true}\n")
        .await
        .expect("proxy");
    let http = reqwest::Client::new();
    let url = proxy.mcp();

    // Without the cache every list is a backend request; with it, one per ttlMs.
    let before = served(&b, "tools/list").await;
    until_hit(&http, &url, None, "tools/list").await;
    let start = Instant::now();
    let warm = served(&b, "tools/list").await;
    let mut hits = 0;
    // 120 lists spread over about 5 s: about three ttl windows.
    for _ in 0..120 {
        let (cache, m) = send(&http, &url, None, "tools/list", json!({})).await;
        assert_eq!(m["id"], "c-1", "each answer carries its request's id: {m}");
        let left = m["result"]["ttlMs"].as_u64().unwrap_or(0);
        assert!(left <= 2000, "never beyond the server's ttlMs: {left}");
        hits += u64::from(cache == "hit");
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    let took = start.elapsed();
    let reached = served(&b, "tools/list").await - warm;
    let windows = took.as_millis() as u64 / ttl.as_millis() as u64 + 1;
    eprintln!(
        "120 tools/list through the proxy in {took:?}: {hits} from the cache, {reached} reached a backend (ttlMs 2000; warm-up took {} backend requests)",
        warm - before
    );
    assert!(
        (2..=windows).contains(&reached),
        "{reached} backend lists for {windows} ttl windows: one per ttlMs"
    );
    assert_eq!(hits + reached, 120);

    // Past ttlMs the next list goes to a backend.
    tokio::time::sleep(ttl).await;
    let (cache, _) = send(&http, &url, None, "tools/list", json!({})).await;
    assert_eq!(cache, "miss", "expired after ttlMs");
    let (cache, _) = send(&http, &url, None, "tools/list", json!({})).await;
    assert_eq!(cache, "hit");

    // A client listening through the proxy learns of a list change only after the cache
    // forgot the old list: its next list is never a stale hit.
    let listen = json!({"jsonrpc": "2.0", "id": "l-1", "method": "subscriptions/listen", "params": {
        "notifications": {"toolsListChanged": true},
        "_meta": super::tasks::meta(json!({}))
    }});
    let stream = http
        .post(&url)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("mcp-protocol-version", "2026-07-28")
        .header("mcp-method", "subscriptions/listen")
        .body(listen.to_string())
        .send()
        .await
        .expect("listen");
    let mut chunks = stream.bytes_stream();
    let (_, trigger) = send(
        &http,
        &url,
        None,
        "tools/call",
        json!({"name": "test_trigger_tool_change", "arguments": {}}),
    )
    .await;
    assert!(trigger.get("result").is_some(), "{trigger}");
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !seen.contains("notifications/tools/list_changed") {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, chunks.next()).await {
            Ok(Some(Ok(c))) => seen.push_str(&String::from_utf8_lossy(&c)),
            other => panic!("no list change on the listen stream: {other:?} {seen}"),
        }
    }
    let (cache, m) = send(&http, &url, None, "tools/list", json!({})).await;
    assert_eq!(cache, "miss", "the change emptied the cache: {m}");
}

#[tokio::test]
async fn private_lists_never_cross_principals_and_public_ones_are_shared() {
    let redis = Redis::start(false).await.expect("redis");
    let (b, _dir) =
        super::continuity::backends_on(&redis, &["a", "b", "c"], &[], Some("list_ttl_ms: 60000\n"))
            .await;
    let addrs: Vec<String> = b.iter().map(Backend::address).collect();
    let (alice, bob) = ("alice-key-0123456789abcdef", "bob-key-0123456789abcdef0");
    let sha = |k: &str| {
        use sha2::Digest;
        sha2::Sha256::digest(k.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    let proxy = Proxy::start_custom(|p| {
        format!(
            "{}listeners: [{{address: 127.0.0.1:{}}}]\nadmin: {{address: 127.0.0.1:{}}}\npools:\n  - name: mcp\n    backends: [{}]\n    list_cache: {{enabled: true}}\n    auth:\n      resource: http://127.0.0.1:{}/mcp\n      principal_secret: list-cache-principal-secret-0123456789\n      api_keys: [{{id: alice, sha256: {}}}, {{id: bob, sha256: {}}}]\n",
            p.server_yaml(),
            p.port,
            p.admin_port,
            addrs
                .iter()
                .map(|a| format!("{{address: \"{a}\"}}"))
                .collect::<Vec<_>>()
                .join(", "),
            p.port,
            sha(alice),
            sha(bob),
        )
    })
    .await
    .expect("proxy");
    let http = reqwest::Client::new();
    let url = proxy.mcp();
    until_hit(&http, &url, Some(alice), "resources/list").await;
    let (cache, m) = send(&http, &url, Some(alice), "resources/list", json!({})).await;
    assert_eq!(
        cache, "hit",
        "alice's private list is cached for alice: {m}"
    );
    assert_eq!(m["result"]["cacheScope"], "private");
    let before = served(&b, "resources/list").await;
    let (cache, m) = send(&http, &url, Some(bob), "resources/list", json!({})).await;
    assert_eq!(cache, "miss", "bob never gets alice's private list: {m}");
    assert_eq!(served(&b, "resources/list").await, before + 1);
    let (cache, _) = send(&http, &url, Some(bob), "resources/list", json!({})).await;
    assert_eq!(cache, "hit", "bob's own list is cached for bob");

    // The tools list is public: one principal's miss fills it for everyone.
    until_hit(&http, &url, Some(alice), "tools/list").await;
    let (cache, m) = send(&http, &url, Some(bob), "tools/list", json!({})).await;
    assert_eq!(cache, "hit", "{m}");
    assert_eq!(m["result"]["cacheScope"], "public");
}
