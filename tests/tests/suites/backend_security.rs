//! The backend's own defences, against real `mcp-backend` processes and a real Redis, with the
//! principal headers computed here (independently of the backend's code) as the proxy sends
//! them: operations endpoints behind a token, forged principals refused, sessions answering
//! only their owner, and the per-principal session cap.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use hmac::{KeyInit, Mac};
use reqwest::{Method, header::HeaderMap};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tests::{Backend, McpClient, Redis, TempDir, next_matching};

const SECRET: &str = "backend-principal-secret-0123456789abcdef";
const OPS_TOKEN: &str = "ops-token-0123456789abcdef";
/// A well-formed id no backend minted.
const UNKNOWN: &str = "0123456789abcdef0123456789abcdef";
const WAIT: Duration = Duration::from_secs(10);

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `X-MCP-Principal` for `principal`: base64url without padding.
fn principal_value(principal: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(principal)
}

/// The three headers the proxy sends for `principal`, signed with `secret` at `t`.
fn signed(secret: &str, principal: &str, scopes: &str, t: u64) -> HeaderMap {
    let value = principal_value(principal);
    let mut mac = hmac::Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("hmac key");
    mac.update(format!("{t}\n{value}\n{scopes}").as_bytes());
    let tag = hex(&mac.finalize().into_bytes());
    let mut h = HeaderMap::new();
    h.insert("x-mcp-principal", value.parse().expect("header"));
    if !scopes.is_empty() {
        h.insert("x-mcp-principal-scopes", scopes.parse().expect("header"));
    }
    h.insert(
        "x-mcp-principal-signature",
        format!("t={t},v1={tag}").parse().expect("header"),
    );
    h
}

/// An HTTP client that sends these headers on every request.
fn http_with(headers: HeaderMap) -> reqwest::Client {
    reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .expect("client")
}

/// An HTTP client speaking as `principal`, correctly signed now.
fn as_principal(principal: &str) -> reqwest::Client {
    http_with(signed(SECRET, principal, "mcp:tools", unix_now()))
}

fn mcp_client(http: reqwest::Client) -> McpClient {
    McpClient {
        http,
        ..McpClient::new()
    }
}

/// The owner hash the backend stores: hex SHA-256 of the header value.
fn owner_of(principal: &str) -> String {
    hex(&Sha256::digest(principal_value(principal).as_bytes()))
}

/// A backend with `yaml` as its config file and these environment variables.
async fn backend(
    name: &str,
    redis: Option<&Redis>,
    yaml: &str,
    envs: &[(&str, &str)],
) -> (Backend, TempDir) {
    let dir = TempDir::new("backend-conf");
    let conf = dir.0.join("backend.yaml");
    std::fs::write(&conf, yaml).expect("write config");
    let url = redis.map(Redis::url);
    let b = Backend::start_with(
        name,
        url.as_deref(),
        &["-c", conf.to_str().unwrap_or_default()],
        envs,
    )
    .await
    .unwrap_or_else(|e| panic!("backend {name}: {e:#}"));
    (b, dir)
}

const SECURE: &[(&str, &str)] = &[
    ("MCP_PRINCIPAL_SECRET", SECRET),
    ("MCP_OPERATIONS_TOKEN", OPS_TOKEN),
];

/// What came back, to compare answers byte for byte.
#[derive(Debug, PartialEq)]
struct Answer {
    status: u16,
    content_type: Option<String>,
    body: bytes::Bytes,
}

/// One MCP request with `session`; the whole body is read (a 404 ends at once; a stream
/// that would not end fails the test after `WAIT`).
async fn send(
    http: &reqwest::Client,
    method: Method,
    url: &str,
    session: &str,
    extra: &[(&str, &str)],
    body: Option<&Value>,
) -> Answer {
    let mut r = http
        .request(method, url)
        .header("accept", "application/json, text/event-stream")
        .header("mcp-protocol-version", "2025-11-25")
        .header("mcp-session-id", session);
    for (k, v) in extra {
        r = r.header(*k, *v);
    }
    if let Some(body) = body {
        r = r
            .header("content-type", "application/json")
            .body(body.to_string());
    }
    let response = tokio::time::timeout(WAIT, async {
        let response = r.send().await.expect("send");
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = response.bytes().await.unwrap_or_default();
        Answer {
            status,
            content_type,
            body,
        }
    })
    .await;
    response.unwrap_or_else(|_| panic!("no complete answer within {WAIT:?} from {url}"))
}

fn ping() -> Value {
    json!({"jsonrpc": "2.0", "id": 7, "method": "ping"})
}

fn client_reply() -> Value {
    json!({"jsonrpc": "2.0", "id": 0, "result": {"action": "accept", "content": {}}})
}

fn initialize() -> Value {
    json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {},
        "clientInfo": {"name": "security-tests", "version": "1"}}})
}

/// One request of [`assert_indistinguishable_from_unknown`]: what, method, headers, body.
type Case<'a> = (&'a str, Method, &'a [(&'a str, &'a str)], Option<Value>);

/// Every request naming `sid` that `intruder` can make on `url` gets exactly the answer an
/// unknown session gets.
async fn assert_indistinguishable_from_unknown(
    intruder: &reqwest::Client,
    who: &str,
    url: &str,
    sid: &str,
    event_id: &str,
) {
    let resume = [("last-event-id", event_id)];
    let cases: [Case; 6] = [
        ("POST request", Method::POST, &[], Some(ping())),
        ("POST client reply", Method::POST, &[], Some(client_reply())),
        ("POST initialize", Method::POST, &[], Some(initialize())),
        ("GET stream", Method::GET, &[], None),
        ("GET Last-Event-ID", Method::GET, &resume, None),
        ("DELETE", Method::DELETE, &[], None),
    ];
    for (what, method, extra, body) in cases {
        let unknown = send(intruder, method.clone(), url, UNKNOWN, extra, body.as_ref()).await;
        let foreign = send(intruder, method, url, sid, extra, body.as_ref()).await;
        assert_eq!(unknown.status, 404, "{what} of an unknown session is 404");
        assert_eq!(
            foreign, unknown,
            "{what} by {who} on {url}: another principal's session must answer exactly like an unknown one"
        );
    }
}

/// Opens a 2024-11-05 session on `base` as `http`; returns its `/messages` path and stream.
async fn legacy_session(
    http: reqwest::Client,
    base: &str,
) -> (
    String,
    tokio::sync::mpsc::UnboundedReceiver<tests::SseEvent>,
) {
    let (status, mut rx) = mcp_client(http)
        .open_stream(&format!("{base}/sse"), None)
        .await
        .expect("GET /sse");
    assert_eq!(status, 200, "GET /sse opens a session");
    let endpoint = tokio::time::timeout(WAIT, rx.recv())
        .await
        .ok()
        .flatten()
        .filter(|e| e.event.as_deref() == Some("endpoint"))
        .expect("endpoint event first");
    (endpoint.data, rx)
}

async fn post_legacy(http: &reqwest::Client, base: &str, path: &str, body: &Value) -> Answer {
    let response = http
        .post(format!("{base}{path}"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .expect("POST /messages");
    Answer {
        status: response.status().as_u16(),
        content_type: response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        body: response.bytes().await.unwrap_or_default(),
    }
}

#[tokio::test]
async fn operations_endpoints_need_the_token_and_do_not_exist_without_one() {
    let redis = Redis::start(false).await.expect("redis");
    let (open, _c1) = backend("open", Some(&redis), "", &[]).await;
    let (ops, _c2) = backend("ops", Some(&redis), "", SECURE).await;
    let http = reqwest::Client::new();
    let mut alice = mcp_client(as_principal("apikey\nalice"));
    alice
        .initialize(&ops.mcp(), json!({}))
        .await
        .expect("alice");
    let sid = alice.session.clone().expect("session id");

    // No token configured: the endpoints do not exist, with or without credentials.
    for auth in [None, Some(OPS_TOKEN)] {
        let mut list = http.get(format!("{}/sessions?full=true", open.base()));
        let mut del = http.delete(format!("{}/sessions/{sid}", open.base()));
        if let Some(t) = auth {
            list = list.bearer_auth(t);
            del = del.bearer_auth(t);
        }
        assert_eq!(
            list.send().await.expect("list").status(),
            404,
            "GET /sessions is off"
        );
        assert_eq!(
            del.send().await.expect("delete").status(),
            404,
            "DELETE /sessions is off"
        );
    }

    // Configured: 401 with a Bearer challenge without it or with a wrong one.
    for (auth, challenge) in [
        (None, "Bearer"),
        (Some("wrong-token-0123456789"), "invalid_token"),
        (Some(&OPS_TOKEN[..OPS_TOKEN.len() - 1]), "invalid_token"),
    ] {
        for mut request in [
            http.get(format!("{}/sessions", ops.base())),
            http.delete(format!("{}/sessions/{sid}", ops.base())),
        ] {
            if let Some(t) = auth {
                request = request.bearer_auth(t);
            }
            let r = request.send().await.expect("ops request");
            assert_eq!(r.status(), 401, "token {auth:?} must be refused");
            let www = r
                .headers()
                .get("www-authenticate")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            assert!(
                www.starts_with("Bearer") && www.contains(challenge),
                "401 carries a Bearer challenge ({challenge}): {www:?}"
            );
            let body: Value = r.json().await.unwrap_or_default();
            assert_eq!(body["error"]["code"], -32600, "JSON-RPC error body: {body}");
        }
    }

    // The right token lists (owner hashes, short ids unless full=true) and deletes any
    // principal's session.
    let list: Value = http
        .get(format!("{}/sessions?full=true", ops.base()))
        .bearer_auth(OPS_TOKEN)
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    let mine = list["sessions"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["id"] == sid.as_str()).cloned())
        .unwrap_or_else(|| panic!("alice's session listed: {list}"));
    assert_eq!(
        mine["owner"],
        owner_of("apikey\nalice"),
        "listing shows the owner hash"
    );

    // /health stays open and shows counts, never ids.
    for b in [&open, &ops] {
        let r = http
            .get(format!("{}/health", b.base()))
            .send()
            .await
            .expect("health");
        assert_eq!(r.status(), 200, "/health needs no token");
        let text = r.text().await.unwrap_or_default();
        assert!(
            !text.contains(&sid[..8]),
            "/health must not reveal session ids: {text}"
        );
        let health: Value = serde_json::from_str(&text).unwrap_or_default();
        assert!(health["activeSessions"].as_u64() >= Some(1), "{health}");
    }

    let owner_set = tests::owner_key(&owner_of("apikey\nalice"));
    assert_eq!(
        redis.cli(&["ZCARD", &owner_set]).await.ok().as_deref(),
        Some("1")
    );
    let r = http
        .delete(format!("{}/sessions/{sid}", ops.base()))
        .bearer_auth(OPS_TOKEN)
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), 200, "operators delete any principal's session");
    assert_eq!(
        alice
            .call(&ops.mcp(), 1, "ping", json!({}))
            .await
            .expect("ping")
            .status,
        404,
        "the deleted session is gone for its owner"
    );
    assert_eq!(
        redis.cli(&["ZCARD", &owner_set]).await.ok().as_deref(),
        Some("0"),
        "DELETE removes the session from its owner's set"
    );
}

#[tokio::test]
async fn a_principals_session_answers_everyone_else_exactly_like_an_unknown_session() {
    let redis = Redis::start(false).await.expect("redis");
    let (a, _c1) = backend("a", Some(&redis), "", SECURE).await;
    let (b, _c2) = backend("b", Some(&redis), "", SECURE).await;
    let (solo, _c3) = backend("solo", None, "", SECURE).await;

    for (holder, other) in [(&a, &b), (&solo, &solo)] {
        let mut alice = mcp_client(as_principal("https://issuer.example\nalice"));
        alice
            .initialize(&holder.mcp(), json!({}))
            .await
            .expect("alice");
        let sid = alice.session.clone().expect("session id");
        let reply = alice
            .post(
                &holder.mcp(),
                &json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {
                    "name": "slow_task", "arguments": {"steps": 2, "delay_ms": 1}}}),
            )
            .await
            .expect("alice's tool call");
        let event_id = reply
            .events
            .iter()
            .filter_map(|e| e.id.clone())
            .nth(1)
            .unwrap_or_else(|| panic!("event ids in {reply:?}"));

        let bob = as_principal("https://issuer.example\nbob");
        let anonymous = reqwest::Client::new();
        // The same subject from another issuer is another principal.
        let other_issuer = as_principal("https://other.example\nalice");
        for (who, intruder) in [
            ("bob", &bob),
            ("anonymous", &anonymous),
            ("alice@other issuer", &other_issuer),
        ] {
            for url in [holder.mcp(), other.mcp()] {
                assert_indistinguishable_from_unknown(intruder, who, &url, &sid, &event_id).await;
            }
        }
        // All of that left alice's session alone.
        for url in [holder.mcp(), other.mcp()] {
            let r = alice.call(&url, 2, "ping", json!({})).await.expect("ping");
            assert_eq!(
                r.status, 200,
                "alice's session survives the intruders on {url}"
            );
        }
        let (status, _rx) = alice
            .open_stream(&other.mcp(), Some(&event_id))
            .await
            .expect("alice resumes");
        assert_eq!(status, 200, "alice replays her own stream");
        if holder.port != other.port {
            let field = redis
                .cli(&["HGET", &tests::session_key(&sid), "owner"])
                .await
                .unwrap_or_default();
            assert_eq!(
                field,
                owner_of("https://issuer.example\nalice"),
                "the record carries the owner hash"
            );
        }
        assert_eq!(
            alice.delete(&other.mcp()).await.ok(),
            Some(200),
            "owner deletes"
        );
    }

    // Anonymous sessions: principals cannot use them either.
    let mut anon = mcp_client(reqwest::Client::new());
    anon.initialize(&a.mcp(), json!({}))
        .await
        .expect("anonymous");
    let sid = anon.session.clone().expect("session id");
    let bob = as_principal("https://issuer.example\nbob");
    assert_indistinguishable_from_unknown(&bob, "bob", &b.mcp(), &sid, "common/1-0").await;
    assert_eq!(
        anon.call(&b.mcp(), 3, "ping", json!({}))
            .await
            .expect("ping")
            .status,
        200
    );

    // The 2024-11-05 transport: POST /messages answers intruders like an unknown session,
    // on the holding replica and on the one that would forward.
    let alice = as_principal("https://issuer.example\nalice");
    let (path, mut events) = legacy_session(alice.clone(), &a.base()).await;
    let unknown_path = format!("/messages?sessionId={UNKNOWN}");
    for (who, intruder) in [("bob", &bob), ("anonymous", &reqwest::Client::new())] {
        for base in [a.base(), b.base()] {
            let unknown = post_legacy(intruder, &base, &unknown_path, &ping()).await;
            let foreign = post_legacy(intruder, &base, &path, &ping()).await;
            assert_eq!(unknown.status, 404);
            assert_eq!(
                foreign, unknown,
                "legacy POST by {who} on {base} must answer like an unknown session"
            );
        }
    }
    let own = post_legacy(&alice, &b.base(), &path, &initialize()).await;
    assert_eq!(own.status, 202, "alice posts to her own legacy session");
    assert!(
        next_matching(&mut events, WAIT, |m| m["id"] == 0
            && m["result"].is_object())
        .await
        .is_some(),
        "alice's initialize is answered on her stream"
    );
}

#[tokio::test]
async fn forged_stale_or_missing_principals_are_refused_and_never_downgraded() {
    let redis = Redis::start(false).await.expect("redis");
    let (b, _c1) = backend("a", Some(&redis), "", SECURE).await;
    let (strict, _c2) = backend("strict", Some(&redis), "require_principal: true\n", SECURE).await;
    let (trusting, _c3) = backend("trusting", Some(&redis), "", &[]).await;
    let now = unix_now();
    let principal = "apikey\nci-bot";

    let mut tampered_scopes = signed(SECRET, principal, "mcp:tools", now);
    tampered_scopes.insert(
        "x-mcp-principal-scopes",
        "mcp:tools admin".parse().expect("h"),
    );
    let mut tampered_principal = signed(SECRET, principal, "", now);
    tampered_principal.insert(
        "x-mcp-principal",
        principal_value("apikey\nadmin").parse().expect("h"),
    );
    let mut unsigned = signed(SECRET, principal, "", now);
    unsigned.remove("x-mcp-principal-signature");
    let mut garbage = signed(SECRET, principal, "", now);
    garbage.insert("x-mcp-principal-signature", "t=1,v1=00".parse().expect("h"));
    for (what, headers) in [
        (
            "another secret",
            signed("another-secret-of-at-least-32-bytes!!", principal, "", now),
        ),
        ("tampered scopes", tampered_scopes),
        ("tampered principal", tampered_principal),
        ("stale", signed(SECRET, principal, "", now - 1000)),
        ("future", signed(SECRET, principal, "", now + 1000)),
        ("unsigned", unsigned),
        ("malformed signature", garbage),
    ] {
        let mut c = mcp_client(http_with(headers.clone()));
        let r = c.initialize(&b.mcp(), json!({})).await;
        assert!(r.is_err(), "{what}: initialize must fail");
        let http = http_with(headers);
        for (path, request) in [
            ("/mcp", http.post(b.mcp()).body(initialize().to_string())),
            ("/sse", http.get(format!("{}/sse", b.base()))),
            (
                "/messages",
                http.post(format!("{}/messages?sessionId={UNKNOWN}", b.base()))
                    .body(ping().to_string()),
            ),
        ] {
            let r = request
                .header("content-type", "application/json")
                .header("accept", "application/json, text/event-stream")
                .send()
                .await
                .expect("request");
            assert_eq!(r.status(), 401, "{what} on {path}: 401, never anonymous");
            let body: Value = r.json().await.unwrap_or_default();
            assert_eq!(body["error"]["code"], -32600, "{what} on {path}: {body}");
            assert_eq!(body["error"]["message"], "invalid principal signature");
        }
    }
    assert_eq!(
        redis.cli(&["DBSIZE"]).await.ok().as_deref(),
        Some("0"),
        "no refused request created anything"
    );

    // require_principal: anonymous MCP requests are refused; /health is not.
    let r = mcp_client(reqwest::Client::new())
        .call(
            &strict.mcp(),
            0,
            "initialize",
            initialize()["params"].clone(),
        )
        .await
        .expect("anonymous initialize");
    assert_eq!(r.status, 401, "require_principal refuses anonymous callers");
    assert_eq!(
        r.response(0).map(|m| m["error"]["message"].clone()),
        None,
        "the 401 has no request id to answer"
    );
    assert!(r.body.contains("principal required"), "{}", r.body);
    let sse = reqwest::get(format!("{}/sse", strict.base()))
        .await
        .expect("sse");
    assert_eq!(sse.status(), 401, "require_principal covers /sse");
    let health = reqwest::get(format!("{}/health", strict.base()))
        .await
        .expect("health");
    assert_eq!(health.status(), 200, "/health stays open");
    let mut ok = mcp_client(as_principal(principal));
    ok.initialize(&strict.mcp(), json!({}))
        .await
        .expect("a signed principal is served");

    // Without a secret the headers mean nothing: a forged principal is anonymous, and its
    // session is open to any anonymous caller.
    let forged = signed(
        "not-the-secret-but-looks-right-0123456789",
        principal,
        "",
        now,
    );
    let mut c = mcp_client(http_with(forged));
    c.initialize(&trusting.mcp(), json!({}))
        .await
        .expect("served as anonymous");
    let sid = c.session.clone().expect("session id");
    let field = redis
        .cli(&["HEXISTS", &tests::session_key(&sid), "owner"])
        .await
        .unwrap_or_default();
    assert_eq!(field, "0", "no owner recorded from untrusted headers");
    let mut anon = mcp_client(reqwest::Client::new());
    anon.session = Some(sid);
    assert_eq!(
        anon.call(&trusting.mcp(), 1, "ping", json!({}))
            .await
            .expect("ping")
            .status,
        200,
        "the forged header bound nothing"
    );
}

#[tokio::test]
async fn initialize_never_adopts_a_session_id_the_client_names() {
    let redis = Redis::start(false).await.expect("redis");
    let (b, _c) = backend("a", Some(&redis), "", SECURE).await;
    let mut alice = mcp_client(as_principal("apikey\nalice"));
    alice.initialize(&b.mcp(), json!({})).await.expect("alice");
    let sid = alice.session.clone().expect("session id");
    let bob = as_principal("apikey\nbob");

    let unknown = send(
        &bob,
        Method::POST,
        &b.mcp(),
        UNKNOWN,
        &[],
        Some(&initialize()),
    )
    .await;
    assert_eq!(
        unknown.status, 404,
        "initialize naming an unknown id is 404"
    );
    assert_eq!(
        redis
            .cli(&["EXISTS", &tests::session_key(UNKNOWN)])
            .await
            .ok()
            .as_deref(),
        Some("0"),
        "no session is created under a client-chosen id"
    );
    let foreign = send(&bob, Method::POST, &b.mcp(), &sid, &[], Some(&initialize())).await;
    assert_eq!(
        foreign, unknown,
        "naming another principal's id: the unknown-session 404"
    );

    let own = alice
        .post(&b.mcp(), &initialize())
        .await
        .expect("initialize inside the session");
    assert_eq!(
        own.status, 400,
        "initialize inside a live session is refused: {own:?}"
    );
    assert!(
        own.headers.get("mcp-session-id").is_none(),
        "no session id handed out"
    );
    assert_eq!(
        own.messages().first().map(|m| m["id"].clone()),
        Some(json!(0)),
        "the error answers the initialize"
    );
    let r = alice
        .call(&b.mcp(), 1, "ping", json!({}))
        .await
        .expect("ping");
    assert_eq!(r.status, 200, "the session itself is unchanged");
    let (count, ids) = (
        redis
            .cli(&["ZCARD", "mcp:sessions"])
            .await
            .unwrap_or_default(),
        redis
            .cli(&["ZRANGE", "mcp:sessions", "0", "-1"])
            .await
            .unwrap_or_default(),
    );
    assert_eq!(count, "1", "still exactly alice's one session: {ids}");
}

#[tokio::test]
async fn the_per_principal_session_cap_answers_429_until_a_session_ends() {
    let redis = Redis::start(false).await.expect("redis");
    let yaml = "max_sessions_per_principal: 2\nsession_ttl_seconds: 600\n";
    let (a, _c1) = backend("a", Some(&redis), yaml, SECURE).await;
    let (b, _c2) = backend("b", Some(&redis), yaml, SECURE).await;
    let (solo, _c3) = backend("solo", None, yaml, SECURE).await;

    for (first, second) in [(&a, &b), (&solo, &solo)] {
        let alice = as_principal("apikey\nalice");
        let mut sessions = Vec::new();
        for (i, node) in [first, second].into_iter().enumerate() {
            let mut c = mcp_client(alice.clone());
            c.initialize(&node.mcp(), json!({}))
                .await
                .unwrap_or_else(|e| panic!("session {i} of 2: {e:#}"));
            sessions.push(c);
        }
        for node in [first, second] {
            let r = mcp_client(alice.clone())
                .post(&node.mcp(), &initialize())
                .await
                .expect("third initialize");
            assert_eq!(
                r.status, 429,
                "the 3rd session of a principal with a cap of 2"
            );
            let retry: u64 = r
                .headers
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("429 carries Retry-After: {:?}", r.headers));
            assert!(
                (1..=600).contains(&retry),
                "retry when the oldest expires: {retry}"
            );
            let error = r
                .response(0)
                .map(|m| m["error"].clone())
                .unwrap_or_default();
            assert_eq!(error["code"], -32000, "{error}");
            assert!(
                error["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("max_sessions_per_principal") && m.contains('2')),
                "the error names the limit: {error}"
            );
            assert!(
                r.headers.get("mcp-session-id").is_none(),
                "no session handed out"
            );
        }
        let sse = alice
            .get(format!("{}/sse", second.base()))
            .send()
            .await
            .expect("sse");
        assert_eq!(
            sse.status(),
            429,
            "2024-11-05 sessions count against the same cap"
        );

        // Others are not affected: another principal, and anonymous callers (not counted).
        let mut bob = mcp_client(as_principal("apikey\nbob"));
        bob.initialize(&first.mcp(), json!({})).await.expect("bob");
        for _ in 0..3 {
            let mut anon = mcp_client(reqwest::Client::new());
            anon.initialize(&second.mcp(), json!({}))
                .await
                .expect("anonymous");
        }
        // Ending a session frees a place.
        assert_eq!(sessions[0].delete(&second.mcp()).await.ok(), Some(200));
        let mut again = mcp_client(alice.clone());
        again
            .initialize(&first.mcp(), json!({}))
            .await
            .expect("a place was freed by DELETE");
        if first.port != second.port {
            let key = tests::owner_key(&owner_of("apikey\nalice"));
            assert_eq!(redis.cli(&["ZCARD", &key]).await.ok().as_deref(), Some("2"));
            let ttl: i64 = redis
                .cli(&["PTTL", &key])
                .await
                .unwrap_or_default()
                .parse()
                .unwrap_or(-3);
            // Index entries outlive their session by at most a quarter TTL (`sessions.md`).
            assert!(
                (1..=750_000).contains(&ttl),
                "the owner set expires with its sessions: {ttl}"
            );
        }
    }
}

/// A task answers only the principal that created it: to anyone else (another principal, an
/// anonymous caller) `tasks/get`, `tasks/update` and `tasks/cancel` are an unknown task
/// (-32602), on every replica, and leave it untouched; each principal holds at most
/// `tasks.max_per_principal` live tasks.
#[tokio::test]
async fn a_task_answers_only_the_principal_that_created_it() {
    use super::tasks::{get, rpc, start_task};
    let redis = Redis::start(false).await.expect("redis");
    let yaml = "tasks: {max_per_principal: 2}\n";
    let (a, _da) = backend("a", Some(&redis), yaml, SECURE).await;
    let (b, _db) = backend("b", Some(&redis), yaml, SECURE).await;
    let alice = as_principal("alice");
    let mallory = as_principal("mallory");
    let anonymous = reqwest::Client::new();
    let long = json!({"steps": 100, "delay_ms": 200});
    let id = start_task(&alice, &a.mcp(), "slow_task", long.clone()).await;
    let unknown = get(&mallory, &b.mcp(), UNKNOWN).await;
    assert_eq!(unknown["error"]["code"], -32602, "{unknown}");
    for (who, http) in [("mallory", &mallory), ("anonymous", &anonymous)] {
        let seen = get(http, &b.mcp(), &id).await;
        assert_eq!(seen["error"]["code"], -32602, "{who} get: {seen}");
        assert_eq!(
            seen["error"]["message"]
                .as_str()
                .map(|m| m.replace(&id, UNKNOWN)),
            unknown["error"]["message"].as_str().map(str::to_owned),
            "{who}: a foreign task reads exactly like an unknown one"
        );
        let cancel = rpc(http, &a.mcp(), "tasks/cancel", json!({"taskId": id})).await;
        assert_eq!(cancel["error"]["code"], -32602, "{who} cancel: {cancel}");
        let update = rpc(
            http,
            &b.mcp(),
            "tasks/update",
            json!({"taskId": id, "inputResponses": {"x": {}}}),
        )
        .await;
        assert_eq!(update["error"]["code"], -32602, "{who} update: {update}");
    }
    let still = get(&alice, &b.mcp(), &id).await;
    assert_eq!(still["result"]["status"], "working", "untouched: {still}");

    start_task(&alice, &b.mcp(), "slow_task", long.clone()).await;
    let third = rpc(
        &alice,
        &a.mcp(),
        "tools/call",
        json!({"name": "slow_task", "arguments": long}),
    )
    .await;
    assert_eq!(third["error"]["code"], -32000, "{third}");
    assert!(
        third["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("tasks.max_per_principal: 2")),
        "{third}"
    );
    start_task(&mallory, &a.mcp(), "slow_task", long).await;
    let ack = rpc(&alice, &a.mcp(), "tasks/cancel", json!({"taskId": id})).await;
    assert_eq!(ack["result"]["resultType"], "complete", "{ack}");
}
