//! Edge cache of 2026-07-28 list results (`tools/list`, `prompts/list`, `resources/list`,
//! `resources/templates/list`), per pool, on only where a pool's `list_cache.enabled` says so
//! (off by default: the proxy cannot know whether an unknown server means what its `ttlMs`
//! says).
//!
//! What it honours, exactly:
//! - **Only what the server marked cacheable.** A result is kept only when it carries an
//!   integer `ttlMs` > 0 and a `cacheScope` of `"public"` or `"private"` (absent: not cached),
//!   answers the request's own id, and its `resultType` is absent or `"complete"`.
//! - **Never beyond `ttlMs`** (nor `list_cache.max_ttl_ms`), counted from when the request
//!   was sent; a cached answer says how much of it is left (its `ttlMs` is the remainder), so
//!   the client's own cache cannot stretch it either.
//! - **Scopes.** `public` results are shared by every caller of the pool; `private` ones are
//!   keyed by the caller's principal and scopes, and never cached for an anonymous caller.
//! - **Keys.** Method, `cursor`, `MCP-Protocol-Version` and the request's declared client
//!   capabilities (which may change what a server lists). A request with any other parameter
//!   is not served from the cache.
//! - **Invalidation.** Every `notifications/{tools,prompts,resources}/list_changed` (the
//!   event's `method`, not text that happens to contain it) empties the cache: the proxy holds
//!   its own `subscriptions/listen` stream to one available backend of the pool ([`listen`]),
//!   and also reads the listen streams of clients passing through, before the client sees the
//!   notification. Hits are served only while the proxy's own stream is open and alive (a
//!   stream silent for [`LISTEN_IDLE`] is taken for dead and reopened; its backend leaving the
//!   pool's available set moves it), so a change is never missed because nobody was
//!   listening; while it is down every list goes to a backend. Several proxies each hold their
//!   own stream: a client that read a change through one proxy may meet another's copy until
//!   that proxy's stream delivers it (milliseconds on a shared bus).
//! - **Credentials.** In a pool without `auth` the backends may check credentials themselves:
//!   requests carrying `Authorization` or `Cookie` are then never answered from the cache.
//! - **Bounds.** `max_entries` lists, `max_bytes` of results in all (least recently used out
//!   first), `max_entry_bytes` per result.

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Deserialize;
use serde_json::Value;

use crate::auth::Principal;
use crate::config::ListCacheConfig;

/// The list methods whose results may be cached.
pub const METHODS: [&str; 4] = [
    "tools/list",
    "prompts/list",
    "resources/list",
    "resources/templates/list",
];

/// What a cacheable request is looked up and stored under.
#[derive(Debug, Clone)]
pub struct Lookup {
    /// The request's `id`, as sent (a string or a number).
    id: String,
    public: String,
    /// `None`: an anonymous caller (private results are not cached for it).
    private: Option<String>,
    /// The cache's generation when the request came: an answer that crossed a
    /// `list_changed` is not stored.
    generation: u64,
    /// When the request came: the answer's `ttlMs` counts from here.
    asked: Instant,
}

struct Entry {
    /// The result object's members after `ttlMs`, i.e. its JSON without the leading `{` and
    /// without `ttlMs`; a hit writes `{"ttlMs":<left>` in front.
    rest: Bytes,
    stored: Instant,
    ttl: Duration,
}

struct Inner {
    entries: lru::LruCache<String, Entry>,
    bytes: usize,
}

/// One pool's cache.
pub struct ListCache {
    config: ListCacheConfig,
    inner: Mutex<Inner>,
    generation: AtomicU64,
    /// The proxy's own invalidation stream is open: hits may be served.
    listening: AtomicBool,
    /// Its task runs (one per cache).
    listener: AtomicBool,
}

/// A silent invalidation stream is taken for dead after this long (mcp-backend sends a
/// keep-alive every `sse_keep_alive_seconds`, 15 by default).
pub const LISTEN_IDLE: Duration = Duration::from_secs(45);

/// The notifications that empty the cache.
const CHANGES: [&str; 3] = [
    "notifications/tools/list_changed",
    "notifications/prompts/list_changed",
    "notifications/resources/list_changed",
];

/// How a request's parameters look; any other parameter makes it uncacheable.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListParams {
    #[serde(default)]
    cursor: Option<String>,
    #[serde(rename = "_meta", default)]
    meta: Option<serde_json::Map<String, Value>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListRequest {
    jsonrpc: String,
    id: Value,
    method: String,
    #[serde(default)]
    params: Option<ListParams>,
}

impl ListCache {
    pub fn new(config: &ListCacheConfig) -> Option<Arc<Self>> {
        if !config.enabled {
            return None;
        }
        let entries = NonZeroUsize::new(config.max_entries).unwrap_or(NonZeroUsize::MIN);
        Some(Arc::new(Self {
            config: config.clone(),
            inner: Mutex::new(Inner {
                entries: lru::LruCache::new(entries),
                bytes: 0,
            }),
            generation: AtomicU64::new(0),
            listening: AtomicBool::new(false),
            listener: AtomicBool::new(false),
        }))
    }

    pub fn config(&self) -> &ListCacheConfig {
        &self.config
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Lists held now.
    pub fn len(&self) -> usize {
        self.inner().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The key of a list request (`body`, whose method the `Mcp-Method` header named as
    /// `method`), or `None` when it cannot be answered from the cache.
    pub fn lookup(
        &self,
        method: &str,
        body: &[u8],
        version: &str,
        principal: Option<&Principal>,
    ) -> Option<Lookup> {
        if !METHODS.contains(&method) {
            return None;
        }
        let req: ListRequest = serde_json::from_slice(body).ok()?;
        // String and integer ids come back exactly as sent (other numbers might not).
        let plain_id = req.id.is_string() || req.id.is_i64() || req.id.is_u64();
        if req.jsonrpc != "2.0" || req.method != method || !plain_id {
            return None;
        }
        let id = req.id.to_string();
        // The `_meta` every 2026-07-28 request carries, its version the header's: anything
        // else is the backend's to refuse.
        let params = req.params?;
        let meta = params.meta?;
        let declared = meta
            .get("io.modelcontextprotocol/protocolVersion")
            .and_then(Value::as_str);
        let capabilities = meta.get("io.modelcontextprotocol/clientCapabilities")?;
        if declared != Some(version)
            || !capabilities.is_object()
            || !meta
                .get("io.modelcontextprotocol/clientInfo")
                .is_some_and(Value::is_object)
        {
            return None;
        }
        let (cursor, capabilities) = (params.cursor, Some(capabilities.to_string()));
        let common = format!(
            "{method}\u{1f}{}\u{1f}{version}\u{1f}{}",
            cursor.as_deref().unwrap_or("\u{0}"),
            capabilities.as_deref().unwrap_or("")
        );
        Some(Lookup {
            id,
            private: principal.map(|p| {
                format!(
                    "u\u{1f}{}\u{1f}{}\u{1f}{common}",
                    p.hash,
                    p.scopes.join(" ")
                )
            }),
            public: format!("p\u{1f}{common}"),
            generation: self.generation.load(Ordering::Acquire),
            asked: Instant::now(),
        })
    }

    /// The whole JSON-RPC answer to `l` from the cache, if it holds a fresh one.
    pub fn get(&self, l: &Lookup) -> Option<Bytes> {
        if !self.listening.load(Ordering::Acquire) {
            return None;
        }
        let mut inner = self.inner();
        for key in l.private.iter().chain(std::iter::once(&l.public)) {
            let Some(e) = inner.entries.get(key) else {
                continue;
            };
            let age = e.stored.elapsed();
            let left = e.ttl.saturating_sub(age).as_millis() as u64;
            if left == 0 {
                if let Some(gone) = inner.entries.pop(key) {
                    inner.bytes -= gone.rest.len();
                }
                continue;
            }
            let mut out = Vec::with_capacity(e.rest.len() + l.id.len() + 64);
            out.extend_from_slice(b"{\"jsonrpc\":\"2.0\",\"id\":");
            out.extend_from_slice(l.id.as_bytes());
            out.extend_from_slice(b",\"result\":{\"ttlMs\":");
            out.extend_from_slice(left.to_string().as_bytes());
            if e.rest.first() != Some(&b'}') {
                out.push(b',');
            }
            out.extend_from_slice(&e.rest);
            out.push(b'}');
            return Some(Bytes::from(out));
        }
        None
    }

    /// The largest answer body worth reading for a fill: a result of `max_entry_bytes` and
    /// its JSON-RPC (and SSE) envelope.
    pub fn max_answer_bytes(&self) -> usize {
        self.config.max_entry_bytes + 4096
    }

    /// Stores the backend's answer `body` (a JSON body or SSE events) to `l`, if the server
    /// marked it cacheable. Returns whether it was stored.
    pub fn fill(&self, l: &Lookup, body: &[u8]) -> bool {
        if body.len() > self.max_answer_bytes() {
            return false;
        }
        let Some(answer) = answer_to(body, &l.id) else {
            return false;
        };
        let Some(Value::Object(mut result)) = answer.get("result").cloned() else {
            return false;
        };
        if result.get("resultType").is_some_and(|t| t != "complete") {
            return false;
        }
        let Some(ttl_ms) = result
            .get("ttlMs")
            .and_then(Value::as_u64)
            .filter(|t| *t > 0)
        else {
            return false;
        };
        let key = match result.get("cacheScope").and_then(Value::as_str) {
            Some("public") => l.public.clone(),
            Some("private") => match &l.private {
                Some(k) => k.clone(),
                None => return false,
            },
            _ => return false,
        };
        result.remove("ttlMs");
        let json = Value::Object(result).to_string();
        // `{...}` without its `{`.
        let rest = Bytes::copy_from_slice(&json.as_bytes()[1..]);
        if rest.len() > self.config.max_entry_bytes {
            return false;
        }
        let ttl = Duration::from_millis(ttl_ms).min(self.config.max_ttl);
        let mut inner = self.inner();
        // Checked under the lock that `invalidate` takes: an answer that crossed a change is
        // never stored.
        if self.generation.load(Ordering::Acquire) != l.generation {
            return false;
        }
        let size = rest.len();
        // `push` hands back what it displaced: the old value of this key, or the least
        // recently used entry when the cache is full. Either leaves the byte count.
        if let Some((_, old)) = inner.entries.push(
            key,
            Entry {
                rest,
                stored: l.asked,
                ttl,
            },
        ) {
            inner.bytes -= old.rest.len();
        }
        inner.bytes += size;
        while inner.bytes > self.config.max_bytes {
            match inner.entries.pop_lru() {
                Some((_, e)) => inner.bytes -= e.rest.len(),
                None => break,
            }
        }
        true
    }

    /// Empties the cache (a list changed, or the invalidation stream was down).
    pub fn invalidate(&self) {
        let mut inner = self.inner();
        self.generation.fetch_add(1, Ordering::AcqRel);
        inner.entries.clear();
        inner.bytes = 0;
    }

    /// Reads whole SSE events of a notification stream passing through: a list change
    /// empties the cache before the client reads it.
    pub fn watch(&self, events: &[u8]) {
        if changes_in(events) {
            self.invalidate();
        }
    }

    /// Starts the invalidation stream for pool `pool` of `shared`, once per cache.
    pub fn ensure_listener(self: &Arc<Self>, shared: Arc<crate::state::Shared>, pool: String) {
        if self.listener.swap(true, Ordering::AcqRel) {
            return;
        }
        tokio::spawn(listen(Arc::downgrade(self), shared, pool));
    }
}

/// Whether whole SSE `events` carry a list change (by the message's `method`).
fn changes_in(events: &[u8]) -> bool {
    if !contains(events, b"list_changed") {
        return false; // the common case, without parsing
    }
    #[derive(Deserialize)]
    struct Message {
        method: Option<String>,
    }
    crate::mcp::messages(events).iter().any(|m| {
        serde_json::from_slice::<Message>(m)
            .ok()
            .and_then(|m| m.method)
            .is_some_and(|m| CHANGES.contains(&m.as_str()))
    })
}

/// Headers the cache may answer: no `Mcp-Name` and no `Origin` (both are the backend's to
/// judge), an `Accept` naming both JSON and SSE, as 2026-07-28 clients send, and, when the
/// proxy does not authenticate the pool (`checks_auth` false), no credentials the backend may
/// check itself.
pub fn plain_request(headers: &http::HeaderMap, checks_auth: bool) -> bool {
    if !checks_auth
        && (headers.contains_key(http::header::AUTHORIZATION)
            || headers.contains_key(http::header::COOKIE))
    {
        return false;
    }
    let accept = headers
        .get_all(http::header::ACCEPT)
        .iter()
        .map(|v| v.as_bytes())
        .collect::<Vec<_>>()
        .concat();
    !headers.contains_key("mcp-name")
        && !headers.contains_key(http::header::ORIGIN)
        && contains(&accept, b"application/json")
        && contains(&accept, b"text/event-stream")
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// The JSON-RPC message answering id `id` in `body` (a JSON body or SSE events).
fn answer_to(body: &[u8], id: &str) -> Option<Value> {
    crate::mcp::messages(body).iter().find_map(|m| {
        let v: Value = serde_json::from_slice(m).ok()?;
        (v.get("id").map(Value::to_string).as_deref() == Some(id)).then_some(v)
    })
}

/// How long to wait before opening the invalidation stream again.
const RETRY: Duration = Duration::from_secs(1);

/// The proxy's own `subscriptions/listen` stream to one available backend of the pool,
/// reopened (on the next backend) whenever it ends; every list change empties the cache.
/// Ends when the cache is dropped (the pool was reloaded without it).
async fn listen(cache: Weak<ListCache>, shared: Arc<crate::state::Shared>, pool: String) {
    let http = match reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(2))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(pool, error = %e, "list cache: no HTTP client; cache stays off");
            return;
        }
    };
    let body = serde_json::json!({
        "jsonrpc": "2.0", "id": "mcp-proxy-list-cache", "method": "subscriptions/listen",
        "params": {
            "notifications": {"toolsListChanged": true, "promptsListChanged": true,
                "resourcesListChanged": true},
            "_meta": {
                "io.modelcontextprotocol/protocolVersion": crate::mcp::STATELESS_REVISION,
                "io.modelcontextprotocol/clientInfo": {"name": "mcp-proxy-list-cache",
                    "version": env!("CARGO_PKG_VERSION")},
                "io.modelcontextprotocol/clientCapabilities": {}
            }
        }
    })
    .to_string();
    let mut turn = 0usize;
    loop {
        let Some((url, backend)) = ({
            let Some(c) = cache.upgrade() else { return };
            let snapshot = shared.snapshot();
            let Some(p) = snapshot
                .pools
                .iter()
                .find(|p| p.list_cache.as_ref().is_some_and(|pc| Arc::ptr_eq(pc, &c)))
            else {
                return; // reloaded away
            };
            let up: Vec<_> = p.backends.iter().filter(|b| b.available()).collect();
            turn = turn.wrapping_add(1);
            up.get(turn % up.len().max(1)).map(|b| {
                (
                    format!("http://{}{}", b.address, p.config.mcp_path),
                    (*b).clone(),
                )
            })
        }) else {
            tokio::time::sleep(RETRY).await;
            continue;
        };
        let response = http
            .post(&url)
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .header("mcp-protocol-version", crate::mcp::STATELESS_REVISION)
            .header("mcp-method", "subscriptions/listen")
            .body(body.clone())
            .send()
            .await;
        match response {
            Ok(mut r)
                if r.status().is_success()
                    && r.headers()
                        .get("content-type")
                        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream")) =>
            {
                if let Some(c) = cache.upgrade() {
                    // Changes while nobody listened are unknown: start from empty.
                    c.invalidate();
                    c.listening.store(true, Ordering::Release);
                }
                tracing::info!(pool, url, "list cache: listening for list changes");
                let mut events = crate::relay::EventCursor::new(None);
                let mut heard = Instant::now();
                loop {
                    let chunk = tokio::time::timeout(Duration::from_secs(5), r.chunk()).await;
                    let Some(c) = cache.upgrade() else { return };
                    match chunk {
                        Ok(Ok(Some(bytes))) => {
                            heard = Instant::now();
                            match events.feed(&bytes) {
                                Ok(Some(whole)) => c.watch(&whole),
                                Ok(None) => {}
                                Err(_) => break, // not an SSE stream we can read
                            }
                        }
                        Ok(Ok(None)) | Ok(Err(_)) => break,
                        Err(_) if heard.elapsed() > LISTEN_IDLE => {
                            tracing::warn!(
                                pool,
                                url,
                                "list cache: the listen stream went silent; reopening"
                            );
                            break;
                        }
                        Err(_) if !backend.available() => break, // follow the pool
                        Err(_) => {}
                    }
                }
            }
            Ok(r) => {
                tracing::warn!(
                    pool,
                    url,
                    status = r.status().as_u16(),
                    "list cache: the backend refused subscriptions/listen; no hits until it accepts"
                );
            }
            Err(e) => {
                tracing::warn!(pool, url, error = %e, "list cache: cannot open subscriptions/listen");
            }
        }
        if let Some(c) = cache.upgrade() {
            c.listening.store(false, Ordering::Release);
            c.invalidate();
        }
        tokio::time::sleep(RETRY).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(max_entries: usize, max_bytes: usize) -> Arc<ListCache> {
        let c = ListCache::new(&ListCacheConfig {
            enabled: true,
            max_entries,
            max_bytes,
            max_entry_bytes: 1024,
            max_ttl: Duration::from_secs(60),
        })
        .expect("enabled");
        c.listening.store(true, Ordering::Release);
        c
    }

    fn principal(hash: &str) -> Principal {
        Principal {
            header: String::new(),
            scopes: vec!["mcp:tools".into()],
            hash: hash.into(),
            name: hash.into(),
        }
    }

    const REQ: &[u8] = br#"{"jsonrpc":"2.0","id":7,"method":"tools/list","params":{"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientInfo":{"name":"t","version":"1"},"io.modelcontextprotocol/clientCapabilities":{}}}}"#;

    fn with_cursor(cursor: &str) -> String {
        String::from_utf8_lossy(REQ).replace(
            r#""params":{"#,
            &format!(r#""params":{{"cursor":"{cursor}","#),
        )
    }

    fn answer(id: &str, ttl: &str, scope: &str) -> Vec<u8> {
        format!(
            r#"{{"jsonrpc":"2.0","id":{id},"result":{{"resultType":"complete","ttlMs":{ttl},"cacheScope":"{scope}","tools":[{{"name":"echo"}}]}}}}"#
        )
        .into_bytes()
    }

    #[test]
    fn a_public_list_is_shared_and_answers_each_request_with_its_own_id_and_the_time_left() {
        let c = cache(10, 1 << 20);
        let l = c
            .lookup("tools/list", REQ, "2026-07-28", None)
            .expect("cacheable");
        assert!(c.get(&l).is_none());
        assert!(c.fill(&l, &answer("7", "60000", "public")));
        let other = String::from_utf8_lossy(REQ).replace(r#""id":7"#, r#""id":"x-1""#);
        let l2 = c
            .lookup(
                "tools/list",
                other.as_bytes(),
                "2026-07-28",
                Some(&principal("bob")),
            )
            .expect("cacheable");
        let hit: Value = serde_json::from_slice(&c.get(&l2).expect("hit")).expect("json");
        assert_eq!(hit["id"], "x-1");
        assert_eq!(hit["result"]["tools"][0]["name"], "echo");
        assert_eq!(hit["result"]["cacheScope"], "public");
        let left = hit["result"]["ttlMs"].as_u64().expect("ttlMs");
        assert!(left > 0 && left <= 60_000, "{left}");
    }

    #[test]
    fn private_lists_stay_with_their_principal_and_anonymous_ones_are_not_kept() {
        let c = cache(10, 1 << 20);
        let alice = principal("alice");
        let l = c
            .lookup("tools/list", REQ, "2026-07-28", Some(&alice))
            .expect("key");
        assert!(c.fill(&l, &answer("7", "60000", "private")));
        assert!(c.get(&l).is_some(), "alice gets her list");
        let bob = c
            .lookup("tools/list", REQ, "2026-07-28", Some(&principal("bob")))
            .expect("key");
        assert!(c.get(&bob).is_none(), "bob never gets alice's private list");
        let anon = c
            .lookup("tools/list", REQ, "2026-07-28", None)
            .expect("key");
        assert!(c.get(&anon).is_none());
        assert!(
            !c.fill(&anon, &answer("7", "60000", "private")),
            "private + anonymous: not kept"
        );
    }

    #[test]
    fn only_what_the_server_marked_cacheable_is_kept() {
        let c = cache(10, 1 << 20);
        let l = c
            .lookup("tools/list", REQ, "2026-07-28", None)
            .expect("key");
        for body in [
            answer("7", "0", "public"),
            answer("7", "-5", "public"),
            answer("8", "60000", "public"), // another request's answer
            answer("7", "60000", "shared"),
            br#"{"jsonrpc":"2.0","id":7,"result":{"tools":[]}}"#.to_vec(),
            br#"{"jsonrpc":"2.0","id":7,"error":{"code":-32603,"message":"x"}}"#.to_vec(),
            br#"{"jsonrpc":"2.0","id":7,"result":{"resultType":"input_required","ttlMs":5,"cacheScope":"public"}}"#.to_vec(),
        ] {
            assert!(!c.fill(&l, &body), "{}", String::from_utf8_lossy(&body));
        }
        let sse = [
            b"event: message\ndata: ".as_slice(),
            &answer("7", "60000", "public"),
            b"\n\n",
        ]
        .concat();
        assert!(c.fill(&l, &sse), "an SSE answer is read too");
        for req in [
            br#"{"jsonrpc":"2.0","id":7,"method":"tools/list","params":{"extra":1}}"#.as_slice(),
            br#"{"jsonrpc":"2.0","id":null,"method":"tools/list"}"#,
            br#"{"jsonrpc":"2.0","id":7,"method":"prompts/list"}"#,
            br#"{"jsonrpc":"2.0","id":7,"method":"tools/list"}"#,
            br#"{"jsonrpc":"2.0","id":7,"method":"tools/list","params":{"_meta":{"io.modelcontextprotocol/protocolVersion":"2025-11-25","io.modelcontextprotocol/clientInfo":{},"io.modelcontextprotocol/clientCapabilities":{}}}}"#,
            br#"not json"#,
        ] {
            assert!(
                c.lookup("tools/list", req, "2026-07-28", None).is_none(),
                "{}",
                String::from_utf8_lossy(req)
            );
        }
        assert!(c.lookup("tools/call", REQ, "2026-07-28", None).is_none());
    }

    #[test]
    fn a_list_change_empties_the_cache_and_an_answer_that_crossed_it_is_not_stored() {
        let c = cache(10, 1 << 20);
        let l = c
            .lookup("tools/list", REQ, "2026-07-28", None)
            .expect("key");
        assert!(c.fill(&l, &answer("7", "60000", "public")));
        c.watch(b"data: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/message\",\"params\":{\"data\":\"notifications/tools/list_changed\"}}\n\n");
        assert!(
            c.get(&l).is_some(),
            "text that mentions a change is not one"
        );
        c.watch(b"data: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/tools/list_changed\"}\n\n");
        assert!(c.get(&l).is_none(), "emptied");
        assert!(
            !c.fill(&l, &answer("7", "60000", "public")),
            "asked before the change"
        );
        let fresh = c
            .lookup("tools/list", REQ, "2026-07-28", None)
            .expect("key");
        assert!(c.fill(&fresh, &answer("7", "60000", "public")));
        c.listening.store(false, Ordering::Release);
        assert!(
            c.get(&fresh).is_none(),
            "no hits while nobody listens for changes"
        );
    }

    #[test]
    fn credentials_the_proxy_did_not_check_keep_a_request_away_from_the_cache() {
        let mut h = http::HeaderMap::new();
        h.insert(
            "accept",
            "application/json, text/event-stream".parse().expect("h"),
        );
        assert!(plain_request(&h, false));
        for (name, value) in [("authorization", "Bearer x"), ("cookie", "s=1")] {
            let mut with = h.clone();
            with.insert(name, value.parse().expect("h"));
            assert!(!plain_request(&with, false), "{name} without proxy auth");
            assert!(plain_request(&with, true), "{name}: the proxy checked it");
        }
        for (name, value) in [("origin", "https://x.example"), ("mcp-name", "x")] {
            let mut with = h.clone();
            with.insert(name, value.parse().expect("h"));
            assert!(!plain_request(&with, true), "{name}");
        }
        h.insert("accept", "application/json".parse().expect("h"));
        assert!(!plain_request(&h, true), "a client that cannot take SSE");
    }

    #[test]
    fn entries_and_bytes_are_bounded_and_ttl_is_never_exceeded() {
        let c = cache(2, 1 << 20);
        for cursor in ["a", "b", "c"] {
            let req = with_cursor(cursor);
            let l = c
                .lookup("tools/list", req.as_bytes(), "2026-07-28", None)
                .expect("key");
            assert!(c.fill(&l, &answer("7", "60000", "public")));
        }
        assert_eq!(c.len(), 2, "max_entries");
        // Evictions leave the byte count: after many more, the newest list is still served.
        for cursor in 0..100 {
            let l = c
                .lookup(
                    "tools/list",
                    with_cursor(&cursor.to_string()).as_bytes(),
                    "2026-07-28",
                    None,
                )
                .expect("key");
            assert!(c.fill(&l, &answer("7", "60000", "public")));
            assert!(c.get(&l).is_some(), "served after {cursor} evictions");
        }
        let held: usize = c.inner().entries.iter().map(|(_, e)| e.rest.len()).sum();
        assert_eq!(c.inner().bytes, held, "the byte count is exact");
        let small = cache(100, 1024);
        for cursor in 0..50 {
            let req = with_cursor(&cursor.to_string());
            let l = small
                .lookup("tools/list", req.as_bytes(), "2026-07-28", None)
                .expect("key");
            small.fill(&l, &answer("7", "60000", "public"));
        }
        assert!(small.inner().bytes <= 1024 && small.len() < 50, "max_bytes");
        let l = c
            .lookup("tools/list", REQ, "2026-07-28", None)
            .expect("key");
        assert!(c.fill(&l, &answer("7", "30", "public")));
        std::thread::sleep(Duration::from_millis(40));
        assert!(c.get(&l).is_none(), "expired after its ttlMs");
    }
}
