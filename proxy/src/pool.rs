//! Upstream pools at run time: each backend's health, drain flag and traffic counters, and
//! backend selection for every policy.
//!
//! Hash policies (*affinity*: ip-hash, session-hash, header) use weighted rendezvous hashing
//! over the backends that can take traffic, so losing one backend remaps only the keys that
//! were on it, and two proxies with the same config agree. *Persistence* (the `persistence`
//! and `cookie` policies, and legacy `endpoint` pins) remembers a session -> backend pin.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use pingora::lb::health_check::HttpHealthCheck;

use crate::config::{BackendConfig, PoolConfig};

/// One backend's live state. It outlives reloads: a backend that keeps its pool and address
/// keeps its health and counters.
#[derive(Debug)]
pub struct BackendState {
    pub name: String,
    pub address: SocketAddr,
    /// The pingora view of this backend, for health checks.
    pub lb_backend: pingora::lb::Backend,
    /// Hash of the name, mixed with request keys by rendezvous hashing.
    seed: u64,
    healthy: AtomicBool,
    draining: AtomicBool,
    streak: Mutex<Streak>,
    pub requests: AtomicU64,
    pub failures: AtomicU64,
    pub active: AtomicI64,
    /// SSE streams open on this backend (the status page).
    pub streams: AtomicI64,
    /// Answers that were 5xx or failed, and answered POSTs with their total time (the status
    /// page computes error rates and mean latency from these).
    pub errors: AtomicU64,
    pub answered: AtomicU64,
    pub latency_us: AtomicU64,
    checking: AtomicBool,
    /// When the next active check is due (`None`: at once).
    next_check: Mutex<Option<Instant>>,
    last_error: Mutex<Option<String>>,
    /// Outlier detection on live traffic (`outlier.rs`).
    pub outlier: crate::outlier::Outlier,
}

/// Consecutive results of one kind, for rise/fall thresholds.
#[derive(Debug, Default)]
struct Streak {
    ok: bool,
    count: u32,
}

/// A change of health that callers log and count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Up,
    Down,
}

impl BackendState {
    pub fn new(cfg: &BackendConfig) -> Self {
        let lb_backend = pingora::lb::Backend {
            addr: pingora::protocols::l4::socket::SocketAddr::Inet(cfg.address),
            weight: cfg.weight,
            ext: Default::default(),
        };
        Self {
            name: cfg.name.clone(),
            address: cfg.address,
            lb_backend,
            seed: hash64(cfg.name.as_bytes()),
            // Like pingora and nginx: healthy until a check or a connection says otherwise.
            healthy: AtomicBool::new(true),
            draining: AtomicBool::new(false),
            streak: Mutex::new(Streak { ok: true, count: 0 }),
            requests: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            active: AtomicI64::new(0),
            streams: AtomicI64::new(0),
            errors: AtomicU64::new(0),
            answered: AtomicU64::new(0),
            latency_us: AtomicU64::new(0),
            checking: AtomicBool::new(false),
            next_check: Mutex::new(None),
            last_error: Mutex::new(None),
            outlier: crate::outlier::Outlier::default(),
        }
    }

    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    pub fn set_draining(&self, on: bool) {
        self.draining.store(on, Ordering::Relaxed);
    }

    /// Can take new requests.
    pub fn available(&self) -> bool {
        self.healthy() && !self.draining()
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|e| e.clone())
    }

    /// Whether an active check is due at `now` and none is running; if so, claims it (the
    /// caller runs it and calls [`Self::check_done`]) and schedules the next `interval` later.
    pub fn claim_check(&self, now: Instant, interval: Duration) -> bool {
        let Ok(mut next) = self.next_check.lock() else {
            return false;
        };
        if next.is_some_and(|t| t > now) || self.checking.swap(true, Ordering::AcqRel) {
            return false;
        }
        *next = Some(now + interval);
        true
    }

    pub fn check_done(&self) {
        self.checking.store(false, Ordering::Release);
    }

    /// Records one health observation; flips state after `rise` successes or `fall` failures
    /// in a row.
    pub fn observe(
        &self,
        ok: bool,
        rise: u32,
        fall: u32,
        error: Option<String>,
    ) -> Option<Transition> {
        let Ok(mut streak) = self.streak.lock() else {
            return None;
        };
        if streak.ok == ok {
            streak.count = streak.count.saturating_add(1);
        } else {
            *streak = Streak { ok, count: 1 };
        }
        if let Some(e) = error
            && let Ok(mut last) = self.last_error.lock()
        {
            *last = Some(e);
        }
        let healthy = self.healthy();
        if ok && !healthy && streak.count >= rise {
            self.healthy.store(true, Ordering::Relaxed);
            self.outlier.came_back(crate::outlier::now_ms());
            return Some(Transition::Up);
        }
        if !ok && healthy && streak.count >= fall {
            self.healthy.store(false, Ordering::Relaxed);
            return Some(Transition::Down);
        }
        None
    }

    /// A connection to the backend could not be made: it is down now, not after `fall`
    /// checks. Checks bring it back.
    pub fn connect_failed(&self, error: String) -> Option<Transition> {
        self.failures.fetch_add(1, Ordering::Relaxed);
        self.observe(false, u32::MAX, 1, Some(error))
    }
}

/// A pool as the current config has it.
pub struct Pool {
    pub config: PoolConfig,
    /// The active check of this pool's `health_check` settings (`None` if it cannot be built,
    /// which is logged).
    pub checker: Option<Arc<HttpHealthCheck>>,
    pub backends: Vec<Arc<BackendState>>,
    /// Weights from the config, by backend index (not in the state, so that a reload that only
    /// changes a weight keeps health, drain flag and counters).
    pub weights: Vec<usize>,
    /// Weighted round-robin order: each backend index repeated `weight` times, interleaved.
    order: Vec<usize>,
    next: AtomicUsize,
    /// Checks credentials when the pool has an `auth` section.
    pub auth: Option<Arc<crate::auth::Authenticator>>,
    /// Kept across reloads that leave `limits` unchanged, so a reload resets no count.
    pub limiter: Arc<crate::limits::Limiter>,
    /// Tool -> whether its `tools/list` annotations say it may be repeated, learned from the
    /// answers passing through (at most [`MAX_TOOLS`]); kept across reloads.
    tools: Arc<Mutex<HashMap<String, bool>>>,
    /// The edge cache of list results (`list_cache.enabled`); kept across reloads that change
    /// neither it nor the backends.
    pub list_cache: Option<Arc<crate::list_cache::ListCache>>,
}

/// Tools remembered per pool.
pub const MAX_TOOLS: usize = 10_000;

/// What selection found.
#[derive(Debug)]
pub enum Pick {
    Backend(usize),
    /// No backend in the pool can take the request.
    NoneAvailable,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("config", &self.config)
            .field("backends", &self.backends)
            .finish_non_exhaustive()
    }
}

impl Pool {
    /// Builds the pool, reusing the state of backends that `previous` already had.
    pub fn new(config: PoolConfig, previous: Option<&Pool>) -> Self {
        let backends: Vec<Arc<BackendState>> = config
            .backends
            .iter()
            .map(|b| {
                previous
                    .and_then(|p| {
                        p.backends
                            .iter()
                            .find(|s| s.name == b.name && s.address == b.address)
                    })
                    .cloned()
                    .unwrap_or_else(|| Arc::new(BackendState::new(b)))
            })
            .collect();
        let weights: Vec<usize> = config.backends.iter().map(|b| b.weight).collect();
        // Smooth interleaving: round r takes every backend whose weight exceeds r.
        let max = weights.iter().copied().max().unwrap_or(1);
        let mut order = Vec::new();
        for r in 0..max {
            for (i, w) in weights.iter().enumerate() {
                if *w > r {
                    order.push(i);
                }
            }
        }
        let checker = match crate::health::http_check(&config.health) {
            Ok(hc) => Some(Arc::new(hc)),
            Err(e) => {
                tracing::error!(pool = %config.name, error = %e, "cannot build health check");
                None
            }
        };
        // An unchanged auth section keeps its authenticator (and the JWKS it fetched).
        let auth = config.auth.as_ref().map(|a| {
            previous
                .and_then(|p| p.auth.as_ref())
                .filter(|old| old.config == *a)
                .cloned()
                .unwrap_or_else(|| Arc::new(crate::auth::Authenticator::new(a.clone())))
        });
        let limiter = previous
            .map(|p| &p.limiter)
            .filter(|l| *l.limits() == config.limits)
            .cloned()
            .unwrap_or_else(|| Arc::new(crate::limits::Limiter::new(config.limits.clone())));
        let tools = previous.map(|p| p.tools.clone()).unwrap_or_default();
        let list_cache = previous
            .filter(|p| p.config.backends == config.backends)
            .and_then(|p| p.list_cache.as_ref())
            .filter(|c| *c.config() == config.list_cache)
            .cloned()
            .or_else(|| crate::list_cache::ListCache::new(&config.list_cache));
        Self {
            config,
            checker,
            backends,
            weights,
            order,
            next: AtomicUsize::new(0),
            auth,
            limiter,
            tools,
            list_cache,
        }
    }

    /// Remembers what a `tools/list` answer says of its tools.
    pub fn learn_tools(&self, hints: Vec<(String, bool)>) {
        let mut tools = self.tools.lock().unwrap_or_else(|p| p.into_inner());
        for (name, safe) in hints {
            if tools.len() < MAX_TOOLS || tools.contains_key(&name) {
                tools.insert(name, safe);
            }
        }
    }

    /// Whether a request that may have reached a backend can be sent again: a method in
    /// `failover.safe_methods`, or a `tools/call` of a safe tool (`unsafe_tools` never;
    /// `safe_tools`; with `trust_tool_annotations`, a tool announced read-only or
    /// idempotent). Batches never.
    pub fn repeatable(&self, peek: &crate::mcp::Peek) -> bool {
        let f = &self.config.failover;
        if peek.batch {
            return false;
        }
        let Some(method) = peek.method.as_deref() else {
            return false;
        };
        if f.safe_methods.contains(method) {
            return true;
        }
        let Some(tool) = peek.tool.as_deref().filter(|_| method == "tools/call") else {
            return false;
        };
        if f.unsafe_tools.contains(tool) {
            return false;
        }
        f.safe_tools.contains(tool)
            || (f.trust_tool_annotations
                && self
                    .tools
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(tool)
                    .copied()
                    .unwrap_or(false))
    }

    pub fn find(&self, name_or_address: &str) -> Option<usize> {
        self.backends
            .iter()
            .position(|b| b.name == name_or_address || b.address.to_string() == name_or_address)
    }

    /// Whether backend `i` is at the pool's `backend_max_in_flight` (0: no limit).
    pub fn full(&self, i: usize) -> bool {
        let max = self.config.limits.backend_max_in_flight;
        max > 0 && self.backends[i].active.load(Ordering::Relaxed) >= i64::from(max)
    }

    /// Whether backend `i` can take a new request: available and not full. Selection sheds
    /// load this way: a full backend is skipped like a down one.
    pub fn can_take(&self, i: usize) -> bool {
        let b = &self.backends[i];
        b.available() && !self.full(i) && !b.outlier.ejected(crate::outlier::now_ms())
    }

    /// Records how a request on backend `i` went (a 5xx or a gateway failure is not ok) and
    /// ejects the backend when its errors in a row reach the threshold, unless that would
    /// eject more than `max_ejected_percent` of the pool. Returns the ejection's length.
    pub fn outcome(&self, i: usize, ok: bool) -> Option<Duration> {
        let o = &self.config.outlier;
        let b = &self.backends[i];
        if ok {
            b.outlier.success();
            return None;
        }
        if !b.outlier.error(o.consecutive_errors) {
            return None;
        }
        let now = crate::outlier::now_ms();
        // Backends already out of rotation (ejected, or down by the health checks) count
        // against the share: ejecting one more must not leave the pool with too few.
        let ejected = self
            .backends
            .iter()
            .filter(|x| x.outlier.ejected(now) || !x.healthy())
            .count();
        if (ejected + 1) * 100 > o.max_ejected_percent as usize * self.backends.len() {
            tracing::warn!(pool = %self.config.name, backend = %b.name, ejected,
                "outlier not ejected: max_ejected_percent reached (panic threshold)");
            b.outlier.success();
            return None;
        }
        let length = b.outlier.eject(now, o);
        tracing::warn!(pool = %self.config.name, backend = %b.name,
            seconds = length.as_secs_f64(), "backend ejected: errors in a row on live traffic");
        Some(length)
    }

    /// The next backend that can take a request, in weighted turn, skipping `exclude`.
    pub fn round_robin(&self, exclude: &[usize]) -> Pick {
        // Each skipped slot is consumed too, so an unavailable backend's share spreads over
        // the others instead of all falling to its successor.
        let n = self.order.len();
        if n == 0 {
            // A pool whose backends are all discovered, before the first answer.
            return Pick::NoneAvailable;
        }
        let now = crate::outlier::now_ms();
        let slow_start = self.config.outlier.slow_start;
        let mut ramping = None;
        for _ in 0..n {
            let i = self.order[self.next.fetch_add(1, Ordering::Relaxed) % n];
            if self.can_take(i) && !exclude.contains(&i) {
                if self.backends[i].outlier.admits(now, slow_start) {
                    return Pick::Backend(i);
                }
                ramping.get_or_insert(i);
            }
        }
        // Only backends in slow start are left: better one of them than none.
        ramping.map_or(Pick::NoneAvailable, Pick::Backend)
    }

    /// Weighted rendezvous hashing of `key` over the backends that can take a request,
    /// skipping `exclude`.
    pub fn hash(&self, key: &[u8], exclude: &[usize]) -> Pick {
        self.rendezvous(key, |i| self.can_take(i) && !exclude.contains(&i))
    }

    /// The backend `key` hashes to when every backend is up: its home. A request served
    /// elsewhere is a handoff.
    pub fn home(&self, key: &[u8]) -> Option<usize> {
        match self.rendezvous(key, |_| true) {
            Pick::Backend(i) => Some(i),
            Pick::NoneAvailable => None,
        }
    }

    fn rendezvous(&self, key: &[u8], eligible: impl Fn(usize) -> bool) -> Pick {
        let k = hash64(key);
        let mut best: Option<(f64, usize)> = None;
        for (i, b) in self.backends.iter().enumerate() {
            if !eligible(i) {
                continue;
            }
            let score = rendezvous_score(k, b.seed, self.weights[i]);
            if best.is_none_or(|(s, _)| score > s) {
                best = Some((score, i));
            }
        }
        best.map_or(Pick::NoneAvailable, |(_, i)| Pick::Backend(i))
    }
}

/// FNV-1a, then a splitmix64 finish: cheap, stable across processes and versions.
pub fn hash64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    mix(h)
}

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `-weight / ln(u)` with `u` uniform in (0, 1): the highest score wins, and a backend's share
/// is proportional to its weight.
fn rendezvous_score(key: u64, seed: u64, weight: usize) -> f64 {
    let h = mix(key ^ seed);
    let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    -(weight as f64) / u.ln()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn pool(weights: &[usize]) -> Pool {
        let backends: Vec<String> = weights
            .iter()
            .enumerate()
            .map(|(i, w)| format!("{{address: 127.0.0.1:{}, weight: {w}}}", 3001 + i))
            .collect();
        let yaml = format!(
            "listeners: [{{address: 127.0.0.1:8080}}]\npools: [{{name: p, backends: [{}]}}]\n",
            backends.join(", ")
        );
        let c = Config::parse(&yaml, "t").unwrap();
        Pool::new(c.pools[0].clone(), None)
    }

    fn pick(p: Pick) -> usize {
        match p {
            Pick::Backend(i) => i,
            Pick::NoneAvailable => usize::MAX,
        }
    }

    #[test]
    fn round_robin_follows_weights_and_skips_unavailable_backends() {
        let p = pool(&[1, 2, 1]);
        let mut counts = [0; 3];
        for _ in 0..400 {
            counts[pick(p.round_robin(&[]))] += 1;
        }
        assert_eq!(counts, [100, 200, 100]);
        p.backends[1].connect_failed("refused".into());
        p.backends[2].set_draining(true);
        for _ in 0..10 {
            assert_eq!(
                pick(p.round_robin(&[])),
                0,
                "only backend 0 can take traffic"
            );
        }
        assert!(matches!(p.round_robin(&[0]), Pick::NoneAvailable));
        // One of three down: the other two share its traffic evenly.
        let p = pool(&[1, 1, 1]);
        p.backends[0].connect_failed("down".into());
        let mut counts = [0; 3];
        for _ in 0..300 {
            counts[pick(p.round_robin(&[]))] += 1;
        }
        assert!(
            (130..=170).contains(&counts[1]) && (130..=170).contains(&counts[2]),
            "{counts:?}"
        );
    }

    #[test]
    fn losing_a_backend_remaps_only_its_share_of_hashed_keys() {
        let p = pool(&[1, 1, 1, 1]);
        let keys: Vec<String> = (0..2000)
            .map(|i| format!("10.0.{}.{}", i / 250, i % 250))
            .collect();
        let before: Vec<usize> = keys
            .iter()
            .map(|k| pick(p.hash(k.as_bytes(), &[])))
            .collect();
        let mut share = [0; 4];
        for b in &before {
            share[*b] += 1;
        }
        for s in share {
            assert!((350..650).contains(&s), "uneven spread {share:?}");
        }
        p.backends[2].connect_failed("gone".into());
        for (k, b) in keys.iter().zip(&before) {
            let now = pick(p.hash(k.as_bytes(), &[]));
            assert_ne!(now, 2, "never an unhealthy backend");
            if *b != 2 {
                assert_eq!(now, *b, "key {k} moved although its backend is healthy");
            }
        }
    }

    #[test]
    fn hashing_never_picks_an_unavailable_backend_and_is_stable() {
        let p = pool(&[3, 1]);
        let mut heavy = 0;
        for i in 0..4000 {
            let k = format!("session-{i}");
            let a = pick(p.hash(k.as_bytes(), &[]));
            assert_eq!(a, pick(p.hash(k.as_bytes(), &[])));
            heavy += usize::from(a == 0);
        }
        assert!(
            (2700..3300).contains(&heavy),
            "weight 3 of 4 got {heavy}/4000"
        );
        p.backends[0].set_draining(true);
        p.backends[1].connect_failed("x".into());
        assert!(matches!(p.hash(b"k", &[]), Pick::NoneAvailable));
    }

    #[test]
    fn rise_and_fall_thresholds() {
        let p = pool(&[1]);
        let b = &p.backends[0];
        assert_eq!(b.observe(false, 2, 3, None), None);
        assert_eq!(b.observe(false, 2, 3, None), None);
        assert_eq!(b.observe(false, 2, 3, None), Some(Transition::Down));
        assert!(!b.healthy());
        assert_eq!(b.observe(true, 2, 3, None), None);
        assert_eq!(b.observe(false, 2, 3, None), None);
        assert_eq!(b.observe(true, 2, 3, None), None);
        assert_eq!(b.observe(true, 2, 3, None), Some(Transition::Up));
        assert_eq!(b.connect_failed("refused".into()), Some(Transition::Down));
        assert_eq!(b.last_error().as_deref(), Some("refused"));
    }

    #[test]
    fn reloads_keep_the_state_of_unchanged_backends() {
        let p = pool(&[1, 1]);
        p.backends[0].set_draining(true);
        let mut changed = p.config.clone();
        changed.backends[0].weight = 5;
        let q = Pool::new(changed, Some(&p));
        assert!(
            q.backends[0].draining(),
            "a weight change keeps the drain flag"
        );
        assert_eq!(q.weights[0], 5);
        assert!(Arc::ptr_eq(&p.backends[1], &q.backends[1]));
    }
}
