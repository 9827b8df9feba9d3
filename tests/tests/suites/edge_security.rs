//! The hostile-client suite through the real `mcp-proxy`: only MCP routes reach a backend,
//! the admin API is exact and hardened, bearer tokens are checked the way the MCP
//! authorization specification asks, identity headers cannot be forged, limits hold one
//! client back without starving others, and slow clients are cut off.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tests::capture::Capture;
use tests::idp::{self, Idp};
use tests::{Backend, McpClient, Proxy, Redis, assert_eventually};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(10);

/// Sends raw bytes and reads what comes back until the proxy closes or 3 s pass.
async fn raw(port: u16, request: &[u8]) -> String {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    s.write_all(request).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Opens a 2024-11-05 SSE stream and reads up to its first event (the `endpoint` event); the
/// response is returned to keep the stream open.
async fn legacy_endpoint(url: &str, bearer: Option<&str>) -> (reqwest::Response, String) {
    let mut r = reqwest::Client::new()
        .get(url)
        .header("accept", "text/event-stream");
    if let Some(t) = bearer {
        r = r.bearer_auth(t);
    }
    let mut sse = r.send().await.expect("sse");
    assert_eq!(sse.status(), 200, "GET {url}");
    let mut head = String::new();
    while !head.contains("\n\n") {
        let chunk = tokio::time::timeout(WAIT, sse.chunk())
            .await
            .expect("endpoint event in time")
            .expect("read")
            .expect("chunk");
        head.push_str(&String::from_utf8_lossy(&chunk));
    }
    (sse, head)
}

fn status_of(response: &str) -> u16 {
    response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

async fn backends(n: usize) -> (Redis, Vec<Backend>) {
    let redis = Redis::start(false).await.expect("redis");
    let mut b = Vec::new();
    for i in 0..n {
        b.push(
            Backend::start(&format!("node-{i}"), Some(&redis.url()), &[])
                .await
                .expect("backend"),
        );
    }
    (redis, b)
}

fn pool_yaml(name: &str, backends: &[&Backend], extra: &str) -> String {
    let list: Vec<String> = backends
        .iter()
        .map(|b| format!("{{address: \"{}\"}}", b.address()))
        .collect();
    format!(
        "  - name: {name}\n    backends: [{}]\n    health_check: {{interval_ms: 200, timeout_ms: 150, healthy_threshold: 1, unhealthy_threshold: 2}}\n{extra}",
        list.join(", ")
    )
}

#[tokio::test]
async fn only_mcp_routes_reach_the_backends_and_one_listener_fronts_two_servers() {
    let (_redis, b) = backends(3).await;
    let proxy = Proxy::start_custom(|p| {
        format!(
            "{}listeners:\n  - address: 127.0.0.1:{}\n    routes:\n      - {{pool: github, path_prefix: /github}}\n      - {{pool: search, path_prefix: /search}}\n      - {{pool: search, host: search.local}}\nadmin: {{address: 127.0.0.1:{}}}\npools:\n{}{}",
            p.server_yaml(),
            p.port,
            p.admin_port,
            pool_yaml("github", &[&b[0], &b[1]], ""),
            pool_yaml("search", &[&b[2]], ""),
        )
    })
    .await
    .expect("proxy");
    let base = proxy.base();

    // Each route reaches its own pool, and only it.
    let mut gh = McpClient::new();
    gh.initialize(&format!("{base}/github/mcp"), json!({}))
        .await
        .expect("github initialize");
    for i in 1..=4 {
        let r = gh
            .call(&format!("{base}/github/mcp"), i, "tools/list", json!({}))
            .await
            .expect("tools/list");
        assert!(
            [b[0].address(), b[1].address()].contains(&r.served_by()),
            "github went to {}",
            r.served_by()
        );
    }
    let mut search = McpClient::new();
    search
        .initialize(&format!("{base}/search/mcp"), json!({}))
        .await
        .expect("search initialize");
    let r = search
        .call(&format!("{base}/search/mcp"), 1, "ping", json!({}))
        .await
        .expect("ping");
    assert_eq!(
        r.served_by(),
        b[2].address(),
        "search is served by its pool"
    );
    // By host: `Host: search.local` on the plain /mcp path.
    let r = raw(
        proxy.port,
        b"POST /mcp HTTP/1.1\r\nHost: search.local:80\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream\r\nContent-Length: 40\r\nConnection: close\r\n\r\n{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"ping\"}",
    )
    .await;
    assert!(
        r.to_ascii_lowercase()
            .contains(&format!("x-mcp-backend: {}", b[2].address())),
        "the host route serves /mcp from the search pool: {r}"
    );

    // The 2024-11-05 transport through a prefix: the endpoint event names the prefixed path.
    let http = reqwest::Client::new();
    let (_sse, head) = legacy_endpoint(&format!("{base}/github/sse"), None).await;
    assert!(
        head.contains("data: /github/messages?sessionId="),
        "the endpoint event carries the route prefix: {head}"
    );

    // Everything else is 404 from the proxy itself: never forwarded (no X-MCP-Backend).
    for target in [
        "/sessions?full=true",
        "/github/sessions",
        "/search/sessions/abc",
        "/mcp",
        "//github/mcp",
        "/github//mcp",
        "/github/mcp/../mcp",
        "/github/./mcp",
        "/%2e%2e/github/mcp",
        "/github/%6dcp",
        "/GITHUB/MCP",
        "/github/mcp/",
        "http://127.0.0.1/github/mcp",
        "/admin/backends",
        "/metrics",
    ] {
        for method in ["GET", "POST", "DELETE"] {
            let r = raw(
                proxy.port,
                format!("{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await;
            let status = status_of(&r);
            assert!(
                status == 404 || status == 400,
                "{method} {target} must be refused by the proxy, got: {r}"
            );
            assert!(
                !r.to_ascii_lowercase().contains("x-mcp-backend"),
                "{method} {target} reached a backend: {r}"
            );
        }
    }
    // A method the endpoint does not take: 405 with Allow.
    let r = raw(
        proxy.port,
        b"PUT /github/mcp HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&r), 405, "{r}");
    assert!(
        r.to_ascii_lowercase().contains("allow: post, get, delete"),
        "{r}"
    );
    // Two Host headers: 400.
    let r = raw(
        proxy.port,
        b"GET /github/mcp HTTP/1.1\r\nHost: a\r\nHost: search.local\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&r), 400, "{r}");
    // The proxy's own health tells nothing of the topology.
    let health = http
        .get(format!("{base}/health"))
        .send()
        .await
        .expect("health")
        .text()
        .await
        .expect("text");
    assert_eq!(health, r#"{"status":"ok"}"#);
}

#[tokio::test]
async fn the_admin_api_matches_paths_exactly_and_refuses_what_it_should() {
    let (_redis, b) = backends(1).await;
    let token = "admin-token-0123456789abcdef";
    let render = |p: &Proxy, with_token: bool| {
        format!(
            "{}listeners: [{{address: 127.0.0.1:{}}}]\nadmin: {{address: 127.0.0.1:{}{}}}\npools:\n{}",
            p.server_yaml(),
            p.port,
            p.admin_port,
            if with_token {
                format!(", token: {token}")
            } else {
                String::new()
            },
            pool_yaml("mcp", &[&b[0]], ""),
        )
    };
    let proxy = Proxy::start_custom(|p| render(p, true))
        .await
        .expect("proxy");
    let admin = |path: &str| format!("http://127.0.0.1:{}{path}", proxy.admin_port);
    let http = reqwest::Client::new();
    let post = |path: &str, auth: Option<&str>| {
        let mut r = http
            .post(admin(path))
            .header("content-type", "application/json");
        if let Some(a) = auth {
            r = r.header("authorization", a);
        }
        r
    };
    let bearer = format!("Bearer {token}");

    // Open: health and metrics only.
    for p in ["/health", "/metrics"] {
        let r = http.get(admin(p)).send().await.expect("get");
        assert_eq!(r.status(), 200, "{p} is open");
    }
    // Everything else needs the token, whatever the path looks like.
    for p in [
        "/admin/reload",
        "//admin/reload",
        "/admin//reload",
        "/./admin/reload",
        "/admin/backends/x/drain",
        "//admin/backends/127.0.0.1/drain",
        "/nope",
    ] {
        let r = post(p, None).send().await.expect("post");
        assert_eq!(r.status(), 401, "POST {p} without a token");
        let r = post(p, Some("Bearer wrong-token-0123456789ab"))
            .send()
            .await
            .expect("post");
        assert_eq!(r.status(), 401, "POST {p} with a wrong token");
        let r = post(p, Some(&format!("Bearer {}", &token[..token.len() - 1])))
            .send()
            .await
            .expect("post");
        assert_eq!(r.status(), 401, "POST {p} with a token prefix");
        let r = post(p, Some(&format!("Basic {token}")))
            .send()
            .await
            .expect("post");
        assert_eq!(r.status(), 401, "POST {p} with another scheme");
    }
    let r = http
        .get(admin("/admin/backends"))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 401);
    // With the token, paths are still exact: the doubled slash is just unknown.
    let r = post("//admin/reload", Some(&bearer))
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 404, "//admin/reload is not /admin/reload");
    let r = http
        .get(admin("/admin/backends"))
        .header("authorization", &bearer)
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 200);

    // Cross-site: a foreign Origin, or no JSON content type and no X-MCP-Admin header.
    let drain = format!("/admin/backends/{}/drain", b[0].address());
    let r = post(&drain, Some(&bearer))
        .header("origin", "https://evil.example")
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 403, "a foreign Origin is refused");
    let r = http
        .post(admin(&drain))
        .header("authorization", &bearer)
        .header("content-type", "application/x-www-form-urlencoded")
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 403, "a form post is refused");
    let r = http
        .post(admin(&drain))
        .header("authorization", &bearer)
        .header("x-mcp-admin", "1")
        .header("origin", format!("http://127.0.0.1:{}", proxy.admin_port))
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 200, "same origin with X-MCP-Admin drains");

    // A reload that would drop the token is refused whole; the token still guards.
    std::fs::write(proxy.config_path(), render(&proxy, false)).expect("write");
    let r = post("/admin/reload", Some(&bearer))
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 400, "a reload that changes admin is refused");
    let v: Value = r.json().await.expect("json");
    assert!(
        v["error"].as_str().unwrap_or_default().contains("admin"),
        "{v}"
    );
    let r = post("/admin/reload", None).send().await.expect("post");
    assert_eq!(
        r.status(),
        401,
        "admin auth is still on after the refused reload"
    );
    proxy.signal("HUP").await.expect("hup");
    let r = post("/admin/backends/x/undrain", None)
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 401, "and after SIGHUP too");

    // Without a token (loopback only), a DNS-rebinding page's Host is refused.
    let open = Proxy::start_custom(|p| render(p, false))
        .await
        .expect("proxy");
    let head = |host: String| {
        format!(
            "POST /admin/reload HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nOrigin: http://{host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
    };
    let r = raw(
        open.admin_port,
        head(format!("rebind.evil.example:{}", open.admin_port)).as_bytes(),
    )
    .await;
    assert_eq!(status_of(&r), 403, "a foreign Host without a token: {r}");
    let r = raw(
        open.admin_port,
        head(format!("localhost:{}", open.admin_port)).as_bytes(),
    )
    .await;
    assert_eq!(
        status_of(&r),
        200,
        "localhost reaches the tokenless API: {r}"
    );
}

/// A proxy whose pool needs a bearer token: JWTs from `idp` for the resource
/// `http://127.0.0.1:<port>/mcp` with scope `mcp:tools`, or the API key `ci-key-...`.
async fn authenticated_proxy(idp: &Idp, backends: &[&Backend], pool_extra: &str) -> Proxy {
    let key_hash = sha256_hex(API_KEY);
    let (jwks, issuer) = (idp.jwks_url(), idp.issuer.clone());
    Proxy::start_custom(move |p| {
        let auth = format!(
            "    auth:\n      resource: http://127.0.0.1:{port}/mcp\n      authorization_servers: [{issuer}]\n      scopes_supported: [mcp:tools]\n      required_scopes: [mcp:tools]\n      principal_secret: {PRINCIPAL_SECRET}\n      jwt: {{issuer: \"{issuer}\", jwks_url: \"{jwks}\", jwks_min_refetch_seconds: 1}}\n      api_keys: [{{id: ci-bot, sha256: {key_hash}, scopes: [mcp:tools]}}, {{id: reader, sha256: {reader}, scopes: []}}]\n{pool_extra}",
            port = p.port,
            reader = sha256_hex(READER_KEY),
        );
        format!(
            "{}listeners: [{{address: 127.0.0.1:{}}}]\nadmin: {{address: 127.0.0.1:{}}}\npools:\n{}",
            p.server_yaml(),
            p.port,
            p.admin_port,
            pool_yaml("mcp", backends, &auth),
        )
    })
    .await
    .expect("proxy")
}

pub const API_KEY: &str = "ci-key-0123456789abcdef0123456789";
pub const READER_KEY: &str = "reader-key-0123456789abcdef012345";
pub const PRINCIPAL_SECRET: &str = "principal-secret-0123456789abcdef0123";

pub fn sha256_hex(s: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The proxy's Prometheus text.
async fn metrics(proxy: &Proxy) -> String {
    reqwest::get(proxy.admin_url("/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text")
}

async fn list_with(url: &str, auth: Option<&str>) -> reqwest::Response {
    let mut r = reqwest::Client::new()
        .post(url)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("mcp-protocol-version", "2026-07-28")
        .header("mcp-method", "tools/list")
        .body(
            json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {"_meta": {
                "io.modelcontextprotocol/protocolVersion": "2026-07-28",
                "io.modelcontextprotocol/clientCapabilities": {}}}})
            .to_string(),
        );
    if let Some(a) = auth {
        r = r.header("authorization", a);
    }
    r.send().await.expect("send")
}

fn challenge(r: &reqwest::Response) -> String {
    r.headers()
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn bearer_tokens_are_checked_as_the_mcp_authorization_spec_asks() {
    let (_redis, b) = backends(1).await;
    let idp = Idp::start().await.expect("idp");
    // Many refusals from one address in a row: the failure bucket is opened wide here.
    let proxy = authenticated_proxy(
        &idp,
        &[&b[0]],
        "    limits: {auth_failures_per_second: 1000}\n",
    )
    .await;
    let url = proxy.mcp();
    let aud = url.clone();
    let metadata_url = format!("{}/.well-known/oauth-protected-resource/mcp", proxy.base());

    // No token: 401 naming the metadata document, which names the authorization server.
    let r = list_with(&url, None).await;
    assert_eq!(r.status(), 401);
    let c = challenge(&r);
    assert!(
        c.starts_with("Bearer ") && c.contains(&format!("resource_metadata=\"{metadata_url}\"")),
        "{c}"
    );
    assert!(
        !c.contains("error="),
        "no error code without credentials: {c}"
    );
    let m: Value = reqwest::get(&metadata_url)
        .await
        .expect("metadata")
        .json()
        .await
        .expect("json");
    assert_eq!(m["resource"], aud);
    assert_eq!(m["authorization_servers"][0], idp.issuer);
    assert_eq!(m["scopes_supported"][0], "mcp:tools");

    // Valid tokens of every allowed algorithm pass.
    let good = idp.claims(&aud, "alice", "mcp:tools openid");
    for kid in ["rsa-1", "ec-1", "ed-1"] {
        let r = list_with(&url, Some(&format!("Bearer {}", idp.token(kid, &good)))).await;
        assert_eq!(r.status(), 200, "{kid} token");
    }
    let r = list_with(&url, Some(&format!("Bearer {API_KEY}"))).await;
    assert_eq!(r.status(), 200, "the API key");

    // The corpus: each refused with 401 invalid_token.
    let now = jsonwebtoken::get_current_timestamp();
    let with = |patch: Value| {
        let mut c = good.clone();
        for (k, v) in patch.as_object().into_iter().flatten() {
            c[k] = v.clone();
        }
        c
    };
    let corpus: Vec<(&str, String)> = vec![
        (
            "expired",
            idp.token("rsa-1", &with(json!({"exp": now - 120, "nbf": now - 600}))),
        ),
        (
            "not yet valid",
            idp.token("rsa-1", &with(json!({"nbf": now + 600}))),
        ),
        (
            "wrong audience",
            idp.token("rsa-1", &with(json!({"aud": "https://other.example/mcp"}))),
        ),
        (
            "wrong issuer",
            idp.token("rsa-1", &with(json!({"iss": "https://evil.example"}))),
        ),
        (
            "no subject",
            idp.token("rsa-1", &{
                let mut c = good.clone();
                c.as_object_mut().map(|o| o.remove("sub"));
                c
            }),
        ),
        ("alg none", idp::unsigned_token(&good)),
        (
            "HS256 with the RSA public key",
            idp::hs256_token(&idp.rsa_public_pem, Some("rsa-1"), &good),
        ),
        ("bad signature", idp::tampered(&idp.token("rsa-1", &good))),
        ("unknown kid", idp.token("rsa-2", &good)),
        ("unknown API key", "not-a-key-0123456789".to_owned()),
        ("garbage", "a.b.c".to_owned()),
    ];
    for (what, token) in &corpus {
        let r = list_with(&url, Some(&format!("Bearer {token}"))).await;
        assert_eq!(r.status(), 401, "{what}");
        let c = challenge(&r);
        assert!(
            c.contains("error=\"invalid_token\"") && c.contains("resource_metadata="),
            "{what}: {c}"
        );
    }
    // Malformed headers.
    let r = list_with(&url, Some("Basic YWxhZGRpbjpvcGVuc2VzYW1l")).await;
    assert_eq!(r.status(), 401, "another scheme");
    let r = reqwest::Client::new()
        .post(&url)
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {API_KEY}"))
        .header("authorization", format!("Bearer {API_KEY}"))
        .body("{}")
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 400, "two Authorization headers");

    // Missing scope: 403 insufficient_scope (the reader key, and a token without it).
    let r = list_with(&url, Some(&format!("Bearer {READER_KEY}"))).await;
    assert_eq!(r.status(), 403);
    assert!(
        challenge(&r).contains("error=\"insufficient_scope\""),
        "{}",
        challenge(&r)
    );
    let r = list_with(
        &url,
        Some(&format!(
            "Bearer {}",
            idp.token("rsa-1", &with(json!({"scope": "openid"})))
        )),
    )
    .await;
    assert_eq!(r.status(), 403, "a token without mcp:tools");

    // Rotation: the provider publishes rsa-2; a token signed with it is accepted once the
    // proxy fetches the JWKS again (an unknown kid triggers it, at most once a second here).
    let fetches = idp.fetches.load(std::sync::atomic::Ordering::SeqCst);
    idp.publish("rsa-2");
    let rotated = format!("Bearer {}", idp.token("rsa-2", &good));
    assert_eventually!(
        WAIT,
        "a token of the rotated key is accepted",
        list_with(&url, Some(&rotated)).await.status() == 200
    );
    let after = idp.fetches.load(std::sync::atomic::Ordering::SeqCst);
    assert!(after > fetches, "the JWKS was fetched again");
    // Unknown kids do not make the proxy hammer the provider: a burst of them costs at most
    // a fetch per second.
    let before = idp.fetches.load(std::sync::atomic::Ordering::SeqCst);
    let started = Instant::now();
    for i in 0..30 {
        let mut c = good.clone();
        c["jti"] = json!(i);
        let t = idp::hs256_token(b"x", Some(&format!("random-{i}")), &c);
        let _ = list_with(&url, Some(&format!("Bearer {t}"))).await;
        let t = idp.token("rsa-1", &c).replace("rsa-1", "zzz");
        let _ = list_with(&url, Some(&format!("Bearer {t}"))).await;
    }
    let spent = started.elapsed().as_secs() + 2;
    let burst = idp.fetches.load(std::sync::atomic::Ordering::SeqCst) - before;
    assert!(
        burst as u64 <= spent * 3 + 3,
        "{burst} JWKS fetches in about {spent} s of unknown kids"
    );

    // The refusals are counted.
    let metrics = metrics(&proxy).await;
    assert!(
        metrics.contains("mcp_proxy_auth_failures_total{pool=\"mcp\",reason=\"invalid_token\"}"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_jwks_file_and_an_explicit_hs256_secret_work_and_the_allow_list_holds() {
    let (_redis, b) = backends(1).await;
    let idp = Idp::start().await.expect("idp");
    let hs_secret = "hs256-shared-secret-0123456789abcdef";
    let proxy = Proxy::start_custom_env(
        |p| {
            let jwks = p.dir.0.join("jwks.json");
            idp.write_jwks(&jwks).expect("jwks file");
            let auth = format!(
                "    auth:\n      resource: http://127.0.0.1:{}/mcp\n      principal_secret: {PRINCIPAL_SECRET}\n      jwt: {{issuer: \"{}\", jwks_file: {}, algorithms: [ES256, HS256], hs256_secret: env:TEST_HS256_SECRET}}\n",
                p.port,
                idp.issuer,
                jwks.display()
            );
            format!(
                "{}listeners: [{{address: 127.0.0.1:{}}}]\nadmin: {{address: 127.0.0.1:{}}}\npools:\n{}",
                p.server_yaml(),
                p.port,
                p.admin_port,
                pool_yaml("mcp", &[&b[0]], &auth),
            )
        },
        &[("TEST_HS256_SECRET", hs_secret)],
    )
    .await
    .expect("proxy");
    let url = proxy.mcp();
    let good = idp.claims(&url, "carol", "");
    let bearer = |t: String| format!("Bearer {t}");
    assert_eq!(
        list_with(&url, Some(&bearer(idp.token("ec-1", &good))))
            .await
            .status(),
        200,
        "ES256 against the JWKS file"
    );
    assert_eq!(
        list_with(
            &url,
            Some(&bearer(idp::hs256_token(hs_secret.as_bytes(), None, &good)))
        )
        .await
        .status(),
        200,
        "HS256 with the configured secret"
    );
    for (what, token) in [
        (
            "RS256 is not in this pool's allow-list",
            idp.token("rsa-1", &good),
        ),
        (
            "EdDSA is not in this pool's allow-list",
            idp.token("ed-1", &good),
        ),
        (
            "HS256 with another secret",
            idp::hs256_token(b"another-secret-0123456789abcdefgh", None, &good),
        ),
        (
            "HS256 with the RSA public key",
            idp::hs256_token(&idp.rsa_public_pem, None, &good),
        ),
        ("ES256 tampered", idp::tampered(&idp.token("ec-1", &good))),
    ] {
        assert_eq!(
            list_with(&url, Some(&bearer(token))).await.status(),
            401,
            "{what}"
        );
    }
}

#[tokio::test]
async fn identity_headers_are_signed_by_the_proxy_and_never_taken_from_clients() {
    let upstream = Capture::start().await.expect("capture");
    let idp = Idp::start().await.expect("idp");
    let proxy = Proxy::start_custom(|p| {
        let auth = format!(
            "    auth:\n      resource: http://127.0.0.1:{}/mcp\n      principal_secret: {PRINCIPAL_SECRET}\n      api_keys: [{{id: ci-bot, sha256: {}, scopes: [mcp:tools, x:y]}}]\n",
            p.port,
            sha256_hex(API_KEY)
        );
        format!(
            "{}listeners: [{{address: 127.0.0.1:{}}}]\nadmin: {{address: 127.0.0.1:{}}}\npools:\n  - name: mcp\n    backends: [{{address: \"{}\"}}]\n{auth}",
            p.server_yaml(),
            p.port,
            p.admin_port,
            upstream.address(),
        )
    })
    .await
    .expect("proxy");
    drop(idp);
    let r = reqwest::Client::new()
        .post(proxy.mcp())
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {API_KEY}"))
        .header("x-mcp-principal", "Zm9yZ2Vk")
        .header("X-MCP-Principal-Signature", "t=1,v1=00")
        .header("x-mcp-principal-scopes", "admin")
        .body(r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let seen = upstream.requests();
    let (_, h) = seen.last().expect("the request reached the upstream");
    assert!(
        h.get("authorization").is_none(),
        "no token passthrough: {h:?}"
    );
    assert_eq!(h.get_all("x-mcp-principal").iter().count(), 1, "{h:?}");
    let principal = h["x-mcp-principal"].to_str().unwrap_or_default();
    use base64::Engine;
    let decoded = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(principal)
        .unwrap_or_default();
    assert_eq!(
        decoded, b"apikey\nci-bot",
        "the proxy's principal, not the client's"
    );
    let scopes = h["x-mcp-principal-scopes"].to_str().unwrap_or_default();
    assert_eq!(scopes, "mcp:tools x:y");
    let sig = h["x-mcp-principal-signature"].to_str().unwrap_or_default();
    let (t, v1) = sig
        .strip_prefix("t=")
        .and_then(|s| s.split_once(",v1="))
        .expect("t=...,v1=...");
    use hmac::{KeyInit, Mac};
    let mut mac =
        hmac::Hmac::<sha2::Sha256>::new_from_slice(PRINCIPAL_SECRET.as_bytes()).expect("hmac");
    mac.update(format!("{t}\n{principal}\n{scopes}").as_bytes());
    let want: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(v1, want, "the signature verifies with the shared secret");
    let now = jsonwebtoken::get_current_timestamp();
    let t: u64 = t.parse().expect("t");
    assert!(t.abs_diff(now) < 60, "signed now");
}

#[tokio::test]
async fn a_burst_over_the_rate_gets_429_while_another_principal_is_served() {
    let (_redis, b) = backends(1).await;
    let idp = Idp::start().await.expect("idp");
    let proxy = authenticated_proxy(
        &idp,
        &[&b[0]],
        "    limits: {requests_per_second: 2, burst: 5, auth_failures_per_second: 2}\n",
    )
    .await;
    let url = proxy.mcp();
    let alice = format!("Bearer {API_KEY}");
    let bob = format!(
        "Bearer {}",
        idp.token("rsa-1", &idp.claims(&url, "bob", "mcp:tools"))
    );
    let mut refused = 0;
    let mut retry_after = None;
    // All at once: the bucket (5, plus 2 a second) cannot cover 20 however slow the machine.
    let burst = futures::future::join_all((0..20).map(|_| list_with(&url, Some(&alice)))).await;
    for r in burst {
        match r.status().as_u16() {
            200 => {}
            429 => {
                refused += 1;
                retry_after = r
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                let v: Value = r.json().await.expect("json");
                assert_eq!(v["error"]["code"], -32000, "{v}");
            }
            s => panic!("unexpected status {s}"),
        }
    }
    assert!(
        refused >= 10,
        "a burst of 20 over 5 + 2/s: {refused} refused"
    );
    assert!(
        retry_after.is_some_and(|s| s.parse::<u64>().is_ok_and(|n| n >= 1)),
        "429 says when to come back"
    );
    // Failed authentications pay from the client address's own bucket (2/s, burst 4 here): a
    // burst of bad tokens turns from 401 into 429.
    let url_ref = &url;
    let guesses = futures::future::join_all((0..20).map(|i| async move {
        list_with(url_ref, Some(&format!("Bearer guess-{i}-0123456789"))).await
    }))
    .await;
    let limited = guesses.iter().filter(|r| r.status() == 429).count();
    assert!(
        limited >= 10
            && guesses
                .iter()
                .all(|r| [401, 429].contains(&r.status().as_u16())),
        "{limited} of 20 bad tokens at once were rate limited"
    );
    for _ in 0..5 {
        assert_eq!(
            list_with(&url, Some(&bob)).await.status(),
            200,
            "another principal is served meanwhile"
        );
    }
    let metrics = metrics(&proxy).await;
    assert!(
        metrics.contains("mcp_proxy_limited_total{limit=\"rate\",pool=\"mcp\"}"),
        "{metrics}"
    );
}

#[tokio::test]
async fn slowloris_and_clients_that_stop_reading_are_cut_off_while_others_are_served() {
    let upstream = Capture::start().await.expect("capture");
    let proxy = Proxy::start_custom(|p| {
        format!(
            "{}listeners: [{{address: 127.0.0.1:{}}}]\nadmin: {{address: 127.0.0.1:{}}}\nlimits: {{header_read_timeout_ms: 1000, body_read_timeout_ms: 1000, client_write_timeout_ms: 1000}}\npools:\n  - name: mcp\n    backends: [{{address: \"{}\"}}]\n",
            p.server_yaml(),
            p.port,
            p.admin_port,
            upstream.address(),
        )
    })
    .await
    .expect("proxy");

    // Slowloris: a header line trickled a byte every 200 ms. Per-read timeouts would never
    // fire; the header deadline closes it.
    let port = proxy.port;
    let slow = tokio::spawn(async move {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        let started = Instant::now();
        s.write_all(b"POST /mcp HTTP/1.1\r\nHost: x\r\n")
            .await
            .expect("write");
        loop {
            if s.write_all(b"X").await.is_err() {
                break;
            }
            let mut buf = [0u8; 64];
            match tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                _ => {}
            }
            if started.elapsed() > Duration::from_secs(10) {
                break;
            }
        }
        started.elapsed()
    });
    // Meanwhile other clients are served.
    for _ in 0..5 {
        assert_eq!(list_with(&proxy.mcp(), None).await.status(), 200);
    }
    let took = slow.await.expect("slow client");
    assert!(
        took < Duration::from_secs(4),
        "the slowloris connection was closed after {took:?}"
    );

    // A slow upload: the head arrives, then 10 of 100 body bytes, then nothing. The body read
    // times out and the connection is closed; the upstream never sees a partial request.
    let before = upstream.requests().len();
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", proxy.port))
        .await
        .expect("connect");
    let started = Instant::now();
    s.write_all(b"POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"jsonrpc\"")
        .await
        .expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the stalled upload was cut after {:?}",
        started.elapsed()
    );
    assert_eq!(upstream.requests().len(), before, "nothing was forwarded");

    // A client that opens a stream and never reads: once the buffers are full, writes to it
    // time out and the proxy lets go of the upstream stream too.
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", proxy.port))
        .await
        .expect("connect");
    s.write_all(b"GET /mcp HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n")
        .await
        .expect("write");
    assert_eventually!(
        WAIT,
        "the stream is open upstream",
        upstream.open_streams() == 1
    );
    assert_eventually!(
        Duration::from_secs(30),
        "the proxy closed the stream of the client that stopped reading",
        upstream.open_streams() == 0
    );
    assert_eq!(
        list_with(&proxy.mcp(), None).await.status(),
        200,
        "others still served"
    );
    drop(s);
}

/// Three replicas that trust the proxy's principal (same secret), behind an authenticated
/// proxy.
async fn bound_cluster(idp: &Idp) -> (Redis, Vec<Backend>, Proxy) {
    let redis = Redis::start(false).await.expect("redis");
    let mut b = Vec::new();
    for i in 0..3 {
        b.push(
            Backend::start_with(
                &format!("node-{i}"),
                Some(&redis.url()),
                &[],
                &[("MCP_PRINCIPAL_SECRET", PRINCIPAL_SECRET)],
            )
            .await
            .expect("backend"),
        );
    }
    let refs: Vec<&Backend> = b.iter().collect();
    let proxy = authenticated_proxy(idp, &refs, "").await;
    (redis, b, proxy)
}

#[tokio::test]
async fn a_session_is_404_for_every_other_principal_on_every_route() {
    let idp = Idp::start().await.expect("idp");
    let (_redis, b, proxy) = bound_cluster(&idp).await;
    let url = proxy.mcp();
    let alice_token = idp.token("rsa-1", &idp.claims(&url, "alice", "mcp:tools"));
    let mallory_token = idp.token("ec-1", &idp.claims(&url, "mallory", "mcp:tools"));

    let mut alice = McpClient::new();
    alice.bearer = Some(alice_token.clone());
    alice
        .initialize(&url, json!({}))
        .await
        .expect("alice initializes");
    let sid = alice.session.clone().expect("session id");
    alice
        .tool(&url, 1, "echo", json!({"message": "mine"}))
        .await
        .expect("alice uses her session");
    // A stream of alice's with an event in its log, to try replaying it.
    let (status, _rx) = alice.open_stream(&url, None).await.expect("stream");
    assert_eq!(status, 200);

    // The unknown-session answer, to compare with.
    let mut stranger = McpClient::new();
    stranger.bearer = Some(mallory_token.clone());
    stranger.session = Some("0123456789abcdef0123456789abcdef".into());
    let unknown = stranger
        .call(&url, 9, "tools/list", json!({}))
        .await
        .expect("unknown session");
    assert_eq!(unknown.status, 404);

    // Mallory (another valid principal), and the API-key client, with alice's session id.
    for token in [mallory_token.as_str(), API_KEY] {
        let mut m = McpClient::new();
        m.bearer = Some(token.to_owned());
        m.session = Some(sid.clone());
        let r = m
            .call(&url, 9, "tools/list", json!({}))
            .await
            .expect("post");
        assert_eq!(r.status, 404, "POST with another principal");
        assert_eq!(
            r.body, unknown.body,
            "the same answer as an unknown session: no existence oracle"
        );
        let r = m
            .tool(&url, 10, "counter", json!({"action": "increment"}))
            .await;
        assert!(r.is_err(), "tools/call with another principal");
        let (status, _) = m.open_stream(&url, None).await.expect("get");
        assert_eq!(status, 404, "GET stream with another principal");
        let (status, _) = m.open_stream(&url, Some("1-1")).await.expect("get");
        assert_eq!(status, 404, "Last-Event-ID replay with another principal");
        assert_eq!(m.delete(&url).await.expect("delete"), 404, "DELETE");
        // An answer to an elicitation of alice's session.
        let r = m
            .post(
                &url,
                &json!({"jsonrpc": "2.0", "id": 0, "result": {"action": "accept"}}),
            )
            .await
            .expect("reply");
        assert_eq!(r.status, 404, "a client reply with another principal");
        // initialize naming alice's session never adopts it.
        let r = m
            .call(
                &url,
                0,
                "initialize",
                json!({"protocolVersion": "2025-11-25", "capabilities": {},
                       "clientInfo": {"name": "m", "version": "1"}}),
            )
            .await
            .expect("initialize");
        assert_ne!(
            r.headers
                .get("mcp-session-id")
                .and_then(|v| v.to_str().ok()),
            Some(sid.as_str()),
            "initialize never hands out alice's id"
        );
    }
    // Without a token the proxy refuses before any backend sees the session.
    let mut anon = McpClient::new();
    anon.session = Some(sid.clone());
    let r = anon.call(&url, 9, "ping", json!({})).await.expect("post");
    assert_eq!(r.status, 401);

    // Alice's session is untouched by all that.
    let v = alice
        .tool(&url, 11, "counter", json!({"action": "increment"}))
        .await
        .expect("alice still has her session");
    assert_eq!(v["content"][0]["text"], "1", "{v}");

    // The 2024-11-05 transport: mallory posts to alice's legacy session.
    let http = reqwest::Client::new();
    let (_sse, head) = legacy_endpoint(&format!("{}/sse", proxy.base()), Some(&alice_token)).await;
    let endpoint = head
        .lines()
        .find_map(|l| l.strip_prefix("data: "))
        .expect("endpoint data")
        .to_owned();
    let post_legacy = |token: &str| {
        http.post(format!("{}{endpoint}", proxy.base()))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#)
            .send()
    };
    assert_eq!(
        post_legacy(&mallory_token).await.expect("post").status(),
        404,
        "legacy /messages with another principal"
    );
    let ok = post_legacy(&alice_token).await.expect("post").status();
    assert!(ok.is_success(), "alice's own legacy post: {ok}");

    // Each attempt was logged as a security event, with shortened ids only.
    let logs: String = b.iter().map(Backend::log).collect();
    let events = logs.matches("session used by another principal").count();
    assert!(events >= 10, "{events} security events logged:\n{logs}");
    assert!(logs.contains("security"), "{logs}");
    assert!(
        !logs.contains(&sid),
        "a full session id in the log:\n{logs}"
    );
}

#[tokio::test]
async fn the_python_and_typescript_sdks_work_with_a_bearer_token_and_are_refused_without() {
    let idp = Idp::start().await.expect("idp");
    let (_redis, _b, proxy) = bound_cluster(&idp).await;
    let token = idp.token("rsa-1", &idp.claims(&proxy.mcp(), "sdk-user", "mcp:tools"));
    let base = proxy.base();
    for mode in ["legacy", "2026-07-28", "sse"] {
        let (ok, out) =
            tests::sdk_client("python3", "python_client.py", &[&base, mode], Some(&token)).await;
        assert!(ok, "python {mode} with a token: {out}");
        let (ok, out) =
            tests::sdk_client("python3", "python_client.py", &[&base, mode], None).await;
        assert!(!ok, "python {mode} without a token must be refused: {out}");
    }
    for mode in ["http", "sse"] {
        let (ok, out) =
            tests::sdk_client("node", "ts_client.mjs", &[&base, mode], Some(API_KEY)).await;
        assert!(ok, "typescript {mode} with an API key: {out}");
        let (ok, out) = tests::sdk_client("node", "ts_client.mjs", &[&base, mode], None).await;
        assert!(
            !ok,
            "typescript {mode} without a token must be refused: {out}"
        );
    }
}

#[tokio::test]
async fn the_conformance_suite_passes_through_the_proxy_with_auth_on() {
    // The suite cannot send a token itself (`conformance server` has no header or auth
    // option): a relay in front of the proxy adds `Authorization: Bearer <valid JWT>` to each
    // of its requests. Everything behind it is the real thing: the proxy checks the token and
    // signs the principal, three replicas bind the sessions to it.
    let idp = Idp::start().await.expect("idp");
    let redis = Redis::start(false).await.expect("redis");
    let mut b = Vec::new();
    for name in ["a", "b", "c"] {
        b.push(
            Backend::start_with(
                name,
                Some(&redis.url()),
                &["--conformance"],
                &[("MCP_PRINCIPAL_SECRET", PRINCIPAL_SECRET)],
            )
            .await
            .expect("backend"),
        );
    }
    let refs: Vec<&Backend> = b.iter().collect();
    let proxy = authenticated_proxy(&idp, &refs, "").await;
    let mut claims = idp.claims(&proxy.mcp(), "conformance-suite", "mcp:tools");
    claims["exp"] = json!(jsonwebtoken::get_current_timestamp() + 3600);
    let token = idp.token("rsa-1", &claims);
    let relay = tests::Relay::start_with_headers(
        vec![proxy.base()],
        vec![("authorization".into(), format!("Bearer {token}"))],
    )
    .await
    .expect("relay");
    assert_eq!(
        list_with(&proxy.mcp(), None).await.status(),
        401,
        "without the relay's token the proxy refuses"
    );
    for req in ["2025-11-25", "2026-07-28"] {
        let direct = super::conformance(&b[0].mcp(), req).await;
        let authed = super::conformance(&format!("{}/mcp", relay.base()), req).await;
        assert_eq!(
            authed, direct,
            "{req}: with auth on through the proxy as on one backend"
        );
    }
}

/// A JSON-RPC ping with id `id`, as the holder of `key`.
async fn ping_as(proxy: &Proxy, key: &str, id: u64) -> reqwest::Response {
    reqwest::Client::new()
        .post(proxy.mcp())
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body(json!({"jsonrpc": "2.0", "id": id, "method": "ping"}).to_string())
        .send()
        .await
        .expect("post")
}

#[tokio::test]
async fn stream_and_in_flight_limits_hold_one_principal_back_and_shed_load() {
    let upstream = Capture::start().await.expect("capture");
    let proxy = Proxy::start_custom(|p| {
        format!(
            "{}listeners: [{{address: 127.0.0.1:{}}}]\nadmin: {{address: 127.0.0.1:{}}}\npools:\n  - name: mcp\n    backends: [{{address: \"{}\"}}]\n    limits: {{max_streams: 1, backend_max_in_flight: 2}}\n    auth:\n      resource: http://127.0.0.1:{}/mcp\n      api_keys: [{{id: alice, sha256: {}}}, {{id: bob, sha256: {}}}]\n      forward_principal: false\n",
            p.server_yaml(),
            p.port,
            p.admin_port,
            upstream.address(),
            p.port,
            sha256_hex(API_KEY),
            sha256_hex(READER_KEY),
        )
    })
    .await
    .expect("proxy");
    let open = |key: &'static str| {
        reqwest::Client::new()
            .get(proxy.mcp())
            .bearer_auth(key)
            .header("accept", "text/event-stream")
            .send()
    };
    let a1 = open(API_KEY).await.expect("stream");
    assert_eq!(a1.status(), 200, "alice's first stream");
    let a2 = open(API_KEY).await.expect("stream");
    assert_eq!(
        a2.status(),
        429,
        "alice's second stream is over max_streams"
    );
    assert!(a2.headers().contains_key("retry-after"));
    let b1 = open(READER_KEY).await.expect("stream");
    assert_eq!(b1.status(), 200, "bob has his own stream budget");
    assert_eventually!(
        WAIT,
        "both streams are open upstream",
        upstream.open_streams() == 2
    );
    // The backend now has two requests in flight, its limit: the proxy sheds the next one.
    let r = ping_as(&proxy, READER_KEY, 7).await;
    assert_eq!(r.status(), 503, "a full backend is skipped like a down one");
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["id"], 7, "{v}");
    drop((a1, b1));
    assert_eventually!(
        WAIT,
        "the streams closed upstream",
        upstream.open_streams() == 0
    );
    let r = ping_as(&proxy, READER_KEY, 8).await;
    assert_eq!(r.status(), 200, "served again once the streams are gone");
}

#[tokio::test]
async fn secrets_never_show_in_test_output_or_errors() {
    let dir = tests::TempDir::new("secrets");
    let run = |program: &str, args: &[&str], envs: &[(&str, &str)]| {
        let out = std::process::Command::new(tests::binary(program))
            .envs(envs.iter().copied())
            .args(args)
            .output()
            .expect("run");
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr)
    };
    let admin = "admin-secret-value-0123456789";
    let principal = "principal-secret-value-0123456789abcdef";
    let hs = "hs-secret-value-0123456789abcdefghijkl";
    let good = dir.0.join("good.yaml");
    std::fs::write(
        &good,
        format!("listeners: [{{address: 127.0.0.1:1}}]\nadmin: {{address: 127.0.0.1:2, token: {admin}}}\npools: [{{name: p, backends: [{{address: 127.0.0.1:3}}], auth: {{resource: 'https://x/mcp', principal_secret: {principal}, jwt: {{issuer: i, algorithms: [HS256], hs256_secret: {hs}}}}}}}]\n"),
    )
    .expect("write");
    let out = run(
        "mcp-proxy",
        &["--test", "-c", good.to_str().unwrap_or_default()],
        &[],
    );
    assert!(out.contains("configuration OK"), "{out}");
    // Too short: the error names the key, never the value.
    let bad = dir.0.join("bad.yaml");
    std::fs::write(
        &bad,
        format!("listeners: [{{address: 127.0.0.1:1}}]\npools: [{{name: p, backends: [{{address: 127.0.0.1:3}}], auth: {{resource: 'https://x/mcp', principal_secret: short-secret, api_keys: [{{id: k, sha256: {principal}}}]}}}}]\n"),
    )
    .expect("write");
    let err = run(
        "mcp-proxy",
        &["--test", "-c", bad.to_str().unwrap_or_default()],
        &[],
    );
    assert!(
        err.contains("principal_secret") || err.contains("sha256"),
        "{err}"
    );
    let backend = run(
        "mcp-backend",
        &["--test"],
        &[
            ("REDIS_URL", "redis://:redis-password-value@127.0.0.1:1"),
            ("MCP_PRINCIPAL_SECRET", principal),
            ("MCP_OPERATIONS_TOKEN", admin),
        ],
    );
    assert!(backend.contains("configuration ok"), "{backend}");
    for (what, text) in [
        ("proxy --test", &out),
        ("proxy error", &err),
        ("backend --test", &backend),
    ] {
        for secret in [admin, principal, hs, "short-secret", "redis-password-value"] {
            assert!(!text.contains(secret), "{what} shows a secret: {text}");
        }
    }
}
