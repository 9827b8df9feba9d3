//! The admin listener: health, Prometheus metrics and a small JSON API.
//!
//! - `GET /health` — status and each backend's health (200 when every pool can serve, else 503)
//! - `GET /metrics` — Prometheus text format
//! - `GET /admin/backends` — backends with health, drain flag and traffic
//! - `GET /admin/sessions/{id}` — which backend a session id maps to, per pool, and why
//! - `POST /admin/backends/{name}/drain` and `/undrain` (`?pool=` to pick one pool) — a draining
//!   backend gets no new sessions or requests; its open streams finish
//! - `POST /admin/reload` — re-read the config file, as SIGHUP does
//!
//! With `admin.token` set, `/admin/*` needs `Authorization: Bearer <token>`.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use async_trait::async_trait;
use http::{Method, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde_json::{Value, json};

use crate::config::Policy;
use crate::pool::Pick;
use crate::state::{Shared, Snapshot};

pub struct AdminApp {
    pub shared: Arc<Shared>,
}

/// The health document shared by the admin and the proxy listeners.
pub fn health(snapshot: &Snapshot) -> (u16, Vec<u8>) {
    let mut all_serving = true;
    let pools: Vec<Value> = snapshot
        .pools
        .iter()
        .map(|p| {
            let available = p.backends.iter().filter(|b| b.available()).count();
            all_serving &= available > 0;
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
                "requests": b.requests.load(Ordering::Relaxed),
                "active": b.active.load(Ordering::Relaxed),
                "failures": b.failures.load(Ordering::Relaxed),
                "last_error": b.last_error(),
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>()})
    }

    fn session(&self, id: &str) -> Value {
        let snapshot = self.shared.snapshot();
        let pin = self.shared.sessions.get(id);
        let legacy = self.shared.legacy.get(id);
        let pools: Vec<Value> = snapshot
            .pools
            .iter()
            .map(|p| {
                let name = &p.config.name;
                let (policy, backend) = if let Some(pin) = pin.as_ref().filter(|x| &x.pool == name) {
                    ("persistence", Some(pin.backend.clone()))
                } else if let Some(pin) = legacy.as_ref().filter(|x| &x.pool == name) {
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

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req = session.req_header();
        let method = req.method.clone();
        let path = req.uri.path().to_owned();
        let query = req.uri.query().unwrap_or_default().to_owned();
        let auth = req
            .headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let snapshot = self.shared.snapshot();

        if path.starts_with("/admin/")
            && let Some(token) = snapshot
                .config
                .admin
                .as_ref()
                .and_then(|a| a.token.as_deref())
            && auth.as_deref() != Some(&format!("Bearer {token}"))
        {
            return error(StatusCode::UNAUTHORIZED, "admin token required");
        }
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
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
            (&Method::GET, ["metrics"]) => reply(
                StatusCode::OK,
                "text/plain; version=0.0.4",
                self.shared.metrics.render(),
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
            (&Method::POST, ["admin", "reload"]) => match self.shared.reload() {
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
