//! The admin listener: health, Prometheus metrics and a small JSON API.
//!
//! - `GET /health` — status and each backend's health (200 when every pool can serve, else 503)
//! - `GET /metrics` — Prometheus text format
//! - `GET /status` — the status page (`status.rs`), and `GET /status.json`, its data
//! - `GET /admin/backends` — backends with health, drain flag and traffic
//! - `GET /admin/sessions/{id}` — which backend a session id maps to, per pool, and why
//! - `POST /admin/backends/{name}/drain` and `/undrain` (`?pool=` to pick one pool) — a draining
//!   backend gets no new sessions or requests; its open streams finish
//! - `POST /admin/backends` (`{"pool": .., "address": "ip:port", "name": .., "weight": ..}`)
//!   and `DELETE /admin/backends/{name}` (`?pool=`) — add or remove a backend at run time
//!   (kept across reloads, lost on restart); a removed backend is drained
//! - `POST /admin/reload` — re-read the config file, as SIGHUP does
//!
//! With `admin.token` set, every path but `/health`, `/metrics` and the status page needs
//! `Authorization: Bearer <token>` (compared in constant time); the admin listener refuses to
//! start on a non-loopback address without a token. Paths are matched exactly as sent: no
//! trimming or decoding, so `//admin/reload` is just an unknown path. A `POST` must not come
//! from a browser page of another origin: an `Origin` other than the admin listener's own is
//! refused, and the request must say `Content-Type: application/json` or carry an
//! `X-MCP-Admin` header, which a cross-site form cannot send without a CORS preflight.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use async_trait::async_trait;
use http::{Method, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde_json::{Value, json};
use subtle::ConstantTimeEq;

use crate::config::Policy;
use crate::pool::Pick;
use crate::state::{Shared, Snapshot};

pub struct AdminApp {
    pub shared: Arc<Shared>,
}

/// The health document of the admin listener (the proxy listeners answer only its status).
pub fn health(snapshot: &Snapshot) -> (u16, Vec<u8>) {
    let all_serving = snapshot.serving();
    let pools: Vec<Value> = snapshot
        .pools
        .iter()
        .map(|p| {
            let available = p.backends.iter().filter(|b| b.available()).count();
            json!({
                "name": p.config.name,
                "available": available,
                "backends": p.backends.iter().map(|b| json!({
                    "name": b.name,
                    "address": b.address.to_string(),
                    "healthy": b.healthy(),
                    "draining": b.draining(),
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    let status = if all_serving { "ok" } else { "degraded" };
    let code = if all_serving { 200 } else { 503 };
    (
        code,
        json!({"status": status, "pools": pools})
            .to_string()
            .into_bytes(),
    )
}

fn reply(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
        .header(http::header::CONTENT_LENGTH, body.len())
        .body(body)
        .unwrap_or_else(|_| Response::new(Vec::new()))
}

fn json_reply(status: StatusCode, v: Value) -> Response<Vec<u8>> {
    reply(status, "application/json", v.to_string().into_bytes())
}

fn error(status: StatusCode, message: &str) -> Response<Vec<u8>> {
    json_reply(status, json!({"error": message}))
}

impl AdminApp {
    fn backends(&self) -> Value {
        let snapshot = self.shared.snapshot();
        json!({"pools": snapshot.pools.iter().map(|p| json!({
            "name": p.config.name,
            "routing": {
                "post": p.config.routing.post.as_str(),
                "stream": p.config.routing.stream.as_str(),
                "legacy": p.config.routing.legacy.as_str(),
            },
            "backends": p.backends.iter().zip(&p.weights).map(|(b, w)| json!({
                "name": b.name,
                "address": b.address.to_string(),
                "weight": w,
                "healthy": b.healthy(),
                "draining": b.draining(),
                "drained": b.draining() && b.active.load(Ordering::Relaxed) == 0,
                "ejected": b.outlier.ejected(crate::outlier::now_ms()),
                "ejections": b.outlier.ejections_total(),
                "requests": b.requests.load(Ordering::Relaxed),
                "active": b.active.load(Ordering::Relaxed),
                "failures": b.failures.load(Ordering::Relaxed),
                "last_error": b.last_error(),
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>()})
    }

    fn session(&self, id: &str) -> Value {
        let snapshot = self.shared.snapshot();
        let pins = self.shared.sessions.find_session(id);
        let legacy = self.shared.legacy.find_session(id);
        let pools: Vec<Value> = snapshot
            .pools
            .iter()
            .map(|p| {
                let name = &p.config.name;
                let (policy, backend) = if let Some(pin) = pins.iter().find(|x| &x.pool == name) {
                    ("persistence", Some(pin.backend.clone()))
                } else if let Some(pin) = legacy.iter().find(|x| &x.pool == name) {
                    ("legacy endpoint pin", Some(pin.backend.clone()))
                } else if p.config.routing.post == Policy::SessionHash {
                    let b = match p.hash(id.as_bytes(), &[]) {
                        Pick::Backend(i) => Some(p.backends[i].name.clone()),
                        Pick::NoneAvailable => None,
                    };
                    ("session-hash", b)
                } else {
                    (p.config.routing.post.as_str(), None)
                };
                let healthy = backend
                    .as_deref()
                    .and_then(|b| p.find(b))
                    .map(|i| p.backends[i].healthy());
                json!({
                    "pool": name,
                    "policy": policy,
                    "backend": backend,
                    "healthy": healthy,
                    "note": if backend.is_none() {
                        "not pinned: each request goes to a backend chosen by the policy; the backends share the session"
                    } else { "" },
                })
            })
            .collect();
        json!({"session": id, "pools": pools})
    }

    /// Re-reads the config file; reading it and resolving host names block, so this runs
    /// off the async threads.
    async fn reload(&self) -> Result<Vec<String>, crate::state::ReloadError> {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || shared.reload())
            .await
            .unwrap_or(Err(crate::state::ReloadError::NoFile))
    }

    /// `POST /admin/backends`: adds a backend to a pool at run time.
    fn add_backend(&self, body: &[u8]) -> Response<Vec<u8>> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Add {
            pool: Option<String>,
            address: String,
            name: Option<String>,
            weight: Option<usize>,
        }
        let add: Add = match serde_json::from_slice(body) {
            Ok(a) => a,
            Err(e) => return error(StatusCode::BAD_REQUEST, &format!("invalid body: {e}")),
        };
        let snapshot = self.shared.snapshot();
        let pool = match add.pool.as_deref() {
            Some(name) => snapshot.pool(name),
            None if snapshot.pools.len() == 1 => snapshot.pools.first(),
            None => return error(StatusCode::BAD_REQUEST, "name the pool (\"pool\")"),
        };
        let Some(pool) = pool else {
            return error(StatusCode::NOT_FOUND, "no such pool");
        };
        // An IP address only: resolving a name here would block; use `discover` for names.
        let Ok(address) = add.address.parse::<std::net::SocketAddr>() else {
            return error(StatusCode::BAD_REQUEST, "address must be ip:port");
        };
        let weight = add.weight.unwrap_or(1);
        if !(1..=1000).contains(&weight) {
            return error(StatusCode::BAD_REQUEST, "weight must be between 1 and 1000");
        }
        let name = add.name.unwrap_or_else(|| address.to_string());
        if name.is_empty()
            || name.len() > 128
            || !name
                .bytes()
                .all(|c| c.is_ascii_graphic() && !b"\",;\\".contains(&c))
        {
            return error(StatusCode::BAD_REQUEST, "invalid backend name");
        }
        if pool
            .backends
            .iter()
            .any(|b| b.name == name || b.address == address)
        {
            return error(
                StatusCode::CONFLICT,
                "a backend with this name or address exists",
            );
        }
        let pool_name = pool.config.name.clone();
        self.shared.dynamic(|d| {
            d.add(
                &pool_name,
                crate::config::BackendConfig {
                    name: name.clone(),
                    address,
                    weight,
                },
            );
        });
        self.shared.rebuild();
        tracing::info!(pool = %pool_name, backend = %name, %address, "backend added by admin");
        json_reply(
            StatusCode::OK,
            json!({"pool": pool_name, "backend": name, "address": address.to_string(), "added": true}),
        )
    }

    /// `DELETE /admin/backends/{name}`: removes a backend at run time (it is drained).
    fn remove_backend(&self, name: &str, pool: Option<&str>) -> Response<Vec<u8>> {
        let snapshot = self.shared.snapshot();
        let mut removed = Vec::new();
        for p in &snapshot.pools {
            if pool.is_some_and(|x| x != p.config.name) {
                continue;
            }
            if let Some(i) = p.find(name) {
                let backend = p.backends[i].name.clone();
                let pool_name = p.config.name.clone();
                self.shared.dynamic(|d| d.remove(&pool_name, &backend));
                removed.push(json!({"pool": pool_name, "backend": backend}));
            }
        }
        if removed.is_empty() {
            return error(StatusCode::NOT_FOUND, &format!("no backend named {name:?}"));
        }
        self.shared.rebuild();
        tracing::info!(backend = %name, "backend removed by admin; draining");
        json_reply(
            StatusCode::OK,
            json!({"removed": removed, "draining": true}),
        )
    }

    fn drain(&self, name: &str, pool: Option<&str>, on: bool) -> Response<Vec<u8>> {
        let snapshot = self.shared.snapshot();
        let mut changed = Vec::new();
        for p in &snapshot.pools {
            if pool.is_some_and(|x| x != p.config.name) {
                continue;
            }
            if let Some(i) = p.find(name) {
                let b = &p.backends[i];
                b.set_draining(on);
                self.shared.events.record(
                    &p.config.name,
                    &b.name,
                    if on { "drain" } else { "undrain" },
                    "admin API",
                );
                tracing::info!(pool = %p.config.name, backend = %b.name, draining = on, "drain changed by admin");
                changed.push(json!({
                    "pool": p.config.name,
                    "backend": b.name,
                    "draining": on,
                    "active": b.active.load(Ordering::Relaxed),
                }));
            }
        }
        if changed.is_empty() {
            return error(StatusCode::NOT_FOUND, &format!("no backend named {name:?}"));
        }
        json_reply(StatusCode::OK, json!({"changed": changed}))
    }
}

/// Whether the request carries exactly one `Authorization: Bearer <token>`, compared in
/// constant time.
fn token_matches(req: &pingora::http::RequestHeader, token: &str) -> bool {
    let mut lines = req.headers.get_all(http::header::AUTHORIZATION).iter();
    let (Some(v), None) = (lines.next(), lines.next()) else {
        return false;
    };
    let Some(given) = v
        .as_bytes()
        .strip_prefix(b"Bearer ")
        .or_else(|| v.as_bytes().strip_prefix(b"bearer "))
    else {
        return false;
    };
    bool::from(given.ct_eq(token.as_bytes()))
}

/// Whether `Host` is `localhost`, `127.0.0.1` or `[::1]` with the admin port.
fn loopback_host(req: &pingora::http::RequestHeader, port: u16) -> bool {
    let mut hosts = req.headers.get_all(http::header::HOST).iter();
    let (Some(h), None) = (hosts.next(), hosts.next()) else {
        return false;
    };
    ["localhost", "127.0.0.1", "[::1]"]
        .iter()
        .any(|name| h.as_bytes() == format!("{name}:{port}").as_bytes())
}

/// The request body, up to 16 KiB (more is cut: the API takes small JSON documents).
async fn read_body(session: &mut ServerSession) -> Vec<u8> {
    let mut body = Vec::new();
    while let Ok(Some(chunk)) = session.read_request_body().await {
        body.extend_from_slice(&chunk);
        if body.len() > 16 * 1024 {
            body.truncate(16 * 1024);
            break;
        }
    }
    body
}

/// Refuses what a browser page of another origin could send: an `Origin` that is not this
/// listener's own, or a request without `Content-Type: application/json` or `X-MCP-Admin`.
fn same_origin_only(req: &pingora::http::RequestHeader) -> Result<(), &'static str> {
    if let Some(origin) = req.headers.get(http::header::ORIGIN) {
        let host = req
            .headers
            .get(http::header::HOST)
            .map(|h| h.as_bytes())
            .unwrap_or_default();
        let o = origin.as_bytes();
        let own = [b"http://".as_slice(), b"https://".as_slice()]
            .iter()
            .any(|scheme| o.strip_prefix(*scheme) == Some(host));
        if !own || host.is_empty() {
            return Err("cross-origin admin requests are refused");
        }
    }
    let json = req
        .headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !json && !req.headers.contains_key("x-mcp-admin") {
        return Err("send Content-Type: application/json or an X-MCP-Admin header");
    }
    Ok(())
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req = session.req_header();
        let method = req.method.clone();
        let path = String::from_utf8_lossy(req.raw_path()).into_owned();
        let (path, query) = match path.split_once('?') {
            Some((p, q)) => (p.to_owned(), q.to_owned()),
            None => (path, String::new()),
        };
        let snapshot = self.shared.snapshot();
        // Read-only documents without secrets or session ids: open, like `/health`.
        let open = method == Method::GET
            && matches!(
                path.as_str(),
                "/health" | "/metrics" | "/status" | "/status.json"
            );
        if !open
            && let Some(token) = snapshot
                .config
                .admin
                .as_ref()
                .and_then(|a| a.token.as_ref())
            && !token_matches(req, token.expose())
        {
            tracing::warn!(target: "security", path = %path.chars().take(64).collect::<String>(), "admin request refused: bad or missing token");
            let mut r = error(StatusCode::UNAUTHORIZED, "admin token required");
            r.headers_mut().insert(
                http::header::WWW_AUTHENTICATE,
                http::HeaderValue::from_static("Bearer"),
            );
            return r;
        }
        // Without a token, only loopback names reach the API: a DNS-rebinding page in an
        // operator's browser sends its own host name.
        if !open
            && let Some(a) = &snapshot.config.admin
            && a.token.is_none()
            && !loopback_host(req, a.address.port())
        {
            tracing::warn!(target: "security", "admin request refused: Host is not a loopback name");
            return error(
                StatusCode::FORBIDDEN,
                "Host must name the loopback admin address",
            );
        }
        if method != Method::GET
            && let Err(why) = same_origin_only(req)
        {
            tracing::warn!(target: "security", reason = why, "admin request refused: cross-site");
            return error(StatusCode::FORBIDDEN, why);
        }
        // Exact segments: a leading `/` and no empty segment anywhere.
        let Some(parts) = path
            .strip_prefix('/')
            .map(|p| p.split('/').collect::<Vec<&str>>())
            .filter(|p| p.iter().all(|s| !s.is_empty()))
        else {
            return error(StatusCode::NOT_FOUND, "no such admin endpoint");
        };
        let pool = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("pool="))
            .map(str::to_owned);
        match (&method, parts.as_slice()) {
            (&Method::GET, ["health"]) => {
                let (code, body) = health(&snapshot);
                reply(
                    StatusCode::from_u16(code).unwrap_or(StatusCode::OK),
                    "application/json",
                    body,
                )
            }
            (&Method::GET, ["metrics"]) => {
                self.shared.metrics.refresh(&snapshot);
                reply(
                    StatusCode::OK,
                    "text/plain; version=0.0.4",
                    self.shared.metrics.render(),
                )
            }
            (&Method::GET, ["status"]) => {
                let mut r = reply(
                    StatusCode::OK,
                    "text/html; charset=utf-8",
                    crate::status::PAGE.as_bytes().to_vec(),
                );
                let h = r.headers_mut();
                // Its own inline script and style, data from this origin, nothing else.
                h.insert(
                    http::header::CONTENT_SECURITY_POLICY,
                    http::HeaderValue::from_static(
                        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; frame-ancestors 'none'",
                    ),
                );
                h.insert(
                    http::header::X_CONTENT_TYPE_OPTIONS,
                    http::HeaderValue::from_static("nosniff"),
                );
                r
            }
            (&Method::GET, ["status.json"]) => json_reply(
                StatusCode::OK,
                crate::status::document(&snapshot, &self.shared.events),
            ),
            (&Method::GET, ["admin", "backends"]) => json_reply(StatusCode::OK, self.backends()),
            (&Method::GET, ["admin", "sessions", id]) => {
                json_reply(StatusCode::OK, self.session(id))
            }
            (&Method::POST, ["admin", "backends", name, "drain"]) => {
                self.drain(name, pool.as_deref(), true)
            }
            (&Method::POST, ["admin", "backends", name, "undrain"]) => {
                self.drain(name, pool.as_deref(), false)
            }
            (&Method::POST, ["admin", "backends"]) => {
                let body = read_body(session).await;
                self.add_backend(&body)
            }
            (&Method::DELETE, ["admin", "backends", name]) => {
                self.remove_backend(name, pool.as_deref())
            }
            (&Method::POST, ["admin", "reload"]) => match self.reload().await {
                Ok(warnings) => {
                    tracing::info!("configuration reloaded through the admin API");
                    json_reply(
                        StatusCode::OK,
                        json!({"reloaded": true, "warnings": warnings}),
                    )
                }
                Err(e) => error(StatusCode::BAD_REQUEST, &e.to_string()),
            },
            _ => error(StatusCode::NOT_FOUND, "no such admin endpoint"),
        }
    }
}
