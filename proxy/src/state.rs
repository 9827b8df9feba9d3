//! The state every part of the proxy shares: the current config snapshot (swapped whole on
//! reload), session pins, metrics.

use std::sync::Arc;
use std::sync::Mutex;

use arc_swap::ArcSwap;

use crate::config::Route;
use crate::config::{Config, ConfigError};
use crate::metrics::Metrics;
use crate::pins::Pins;
use crate::pool::{Pool, Transition};
use crate::request::RouteTable;

/// One consistent view of the config and its pools. Requests load it once and keep it, so a
/// reload never changes the rules under a request in flight.
#[derive(Debug)]
pub struct Snapshot {
    pub config: Config,
    pub pools: Vec<Arc<Pool>>,
    /// The public paths of each listener, by listener index.
    pub routes: Vec<RouteTable>,
}

impl Snapshot {
    pub fn pool(&self, name: &str) -> Option<&Arc<Pool>> {
        self.pools.iter().find(|p| p.config.name == name)
    }

    /// Whether every pool has a backend that can take new requests (the health status).
    pub fn serving(&self) -> bool {
        self.pools
            .iter()
            .all(|p| p.backends.iter().any(|b| b.available()))
    }

    /// The routes of listener `index` (none if the listener is gone after a reload).
    pub fn routes(&self, index: usize) -> &RouteTable {
        static EMPTY: RouteTable = RouteTable {
            entries: Vec::new(),
        };
        self.routes.get(index).unwrap_or(&EMPTY)
    }
}

#[derive(Debug)]
pub struct Shared {
    current: ArcSwap<Snapshot>,
    /// Persistence pins learned from `initialize` responses.
    pub sessions: Pins,
    /// 2024-11-05 session ids read from `endpoint` events, pinned to the backend of the stream.
    pub legacy: Pins,
    pub metrics: Metrics,
    /// HTTP client of the stream relay (`relay.rs`); system proxy settings are ignored.
    pub relay_client: reqwest::Client,
    /// The config as loaded (before discovered and admin-added backends, `discovery.rs`).
    base: Mutex<Config>,
    dynamic: Mutex<crate::discovery::Dynamic>,
    reload_lock: Mutex<()>,
    /// Recent health transitions, ejections, drains and failovers (the status page).
    pub events: crate::status::Events,
    /// Trace export, set once at start ([`crate::server`]); unset means traces are off.
    tracing: std::sync::OnceLock<Arc<telemetry::Tracing>>,
}

impl Shared {
    pub fn new(config: Config) -> Result<Arc<Self>, prometheus::Error> {
        let metrics = Metrics::new()?;
        let pins = config.limits.max_session_pins;
        let base = Mutex::new(config.clone());
        let snapshot = build(config, None);
        let shared = Arc::new(Self {
            current: ArcSwap::from_pointee(snapshot),
            sessions: Pins::new(pins),
            legacy: Pins::new(pins),
            metrics,
            relay_client: reqwest::Client::builder()
                .no_proxy()
                .tcp_nodelay(true)
                .build()
                .unwrap_or_default(),
            base,
            dynamic: Mutex::default(),
            reload_lock: Mutex::new(()),
            tracing: std::sync::OnceLock::new(),
            events: crate::status::Events::default(),
        });
        shared.publish_health();
        Ok(shared)
    }

    /// Turns traces on (once, at start).
    pub fn set_tracing(&self, tracing: Arc<telemetry::Tracing>) {
        if tracing.enabled() {
            let _ = self.tracing.set(tracing);
        }
    }

    /// The trace exporter, when traces are on.
    pub fn tracing(&self) -> Option<&telemetry::Tracing> {
        self.tracing.get().map(|t| &**t)
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Swaps in `config`. Backends that keep their pool, name and address keep their health,
    /// drain flag and counters. Listener and thread changes need a restart or a graceful
    /// upgrade; they are reported and otherwise ignored. A changed `admin` section is refused
    /// whole: a reload must never turn admin authentication off or change it.
    pub fn apply(&self, config: Config) -> Result<Vec<String>, ReloadError> {
        let _guard = self.reload_lock.lock();
        let old = self.snapshot();
        if config.admin != old.config.admin {
            return Err(ReloadError::AdminChanged);
        }
        *self.base.lock().unwrap_or_else(|p| p.into_inner()) = config.clone();
        let mut config = self.expanded(&config);
        let mut warnings = Vec::new();
        if config.listeners != old.config.listeners {
            warnings.push(
                "listeners changed: takes effect after a restart or graceful upgrade".to_owned(),
            );
            // Keep serving the listeners that exist, with their routes from the new file where
            // it still has them (validation checked their pools).
            let mut kept = old.config.listeners.clone();
            for (k, l) in kept.iter_mut().enumerate() {
                if let Some(new) = config.listeners.get(k) {
                    l.routes = new.routes.clone();
                } else {
                    l.routes
                        .retain(|r| config.pools.iter().any(|p| p.name == r.pool));
                    if l.routes.is_empty() {
                        l.routes.push(Route {
                            pool: config.pools[0].name.clone(),
                            host: None,
                            prefix: String::new(),
                        });
                    }
                }
            }
            config.listeners = kept;
        }
        if config.limits.header_read_timeout != old.config.limits.header_read_timeout {
            warnings.push(
                "limits.header_read_timeout_ms changed: takes effect after a restart".to_owned(),
            );
        }
        self.sessions.resize(config.limits.max_session_pins);
        self.legacy.resize(config.limits.max_session_pins);
        if config.server.threads != old.config.server.threads {
            warnings.push("server.threads changed: takes effect after a restart".to_owned());
        }
        self.swap(config, &old);
        Ok(warnings)
    }

    /// The config as loaded, before discovered and admin-added backends.
    /// Reads the config as loaded without copying it.
    pub fn with_base<T>(&self, f: impl FnOnce(&Config) -> T) -> T {
        f(&self.base.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn base_config(&self) -> Config {
        self.base.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Runs `f` on the run-time backends (call [`Shared::rebuild`] after a change).
    pub fn dynamic<T>(&self, f: impl FnOnce(&mut crate::discovery::Dynamic) -> T) -> T {
        f(&mut self.dynamic.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn expanded(&self, base: &Config) -> Config {
        crate::discovery::expand(
            base,
            &self.dynamic.lock().unwrap_or_else(|p| p.into_inner()),
        )
    }

    /// Rebuilds the pools after the run-time backends changed (discovery, admin).
    pub fn rebuild(&self) {
        let _guard = self.reload_lock.lock();
        let old = self.snapshot();
        let mut config = self.expanded(&self.base_config());
        // Listeners and limits come from the last applied file only.
        config.listeners = old.config.listeners.clone();
        self.swap(config, &old);
    }

    /// Installs `config`; backends it no longer has are drained, so that requests and streams
    /// still holding the old snapshot leave them (relayed streams move at once).
    fn swap(&self, config: Config, old: &Snapshot) {
        let snapshot = build(config, Some(old));
        for pool in &old.pools {
            for b in &pool.backends {
                let kept = snapshot
                    .pools
                    .iter()
                    .any(|p| p.backends.iter().any(|x| Arc::ptr_eq(x, b)));
                if !kept && !b.draining() {
                    tracing::info!(pool = %pool.config.name, backend = %b.name, "backend removed: draining it");
                    b.set_draining(true);
                }
            }
        }
        self.current.store(Arc::new(snapshot));
        self.publish_health();
    }

    /// Re-reads the config file this proxy was started with.
    pub fn reload(&self) -> Result<Vec<String>, ReloadError> {
        let path = self
            .snapshot()
            .config
            .source
            .clone()
            .ok_or(ReloadError::NoFile)?;
        let config = Config::load(&path)?;
        self.apply(config)
    }

    /// Counts and logs a health transition.
    pub fn transition(&self, pool: &str, backend: &str, t: Transition, reason: &str) {
        let (state, up) = match t {
            Transition::Up => ("up", 1),
            Transition::Down => ("down", 0),
        };
        self.metrics
            .health_transitions
            .with_label_values(&[pool, backend, state])
            .inc();
        self.metrics
            .backend_up
            .with_label_values(&[pool, backend])
            .set(up);
        self.events.record(pool, backend, state, reason);
        match t {
            Transition::Up => tracing::info!(pool, backend, reason, "backend up"),
            Transition::Down => tracing::warn!(pool, backend, reason, "backend down"),
        }
    }

    fn publish_health(&self) {
        self.metrics.backend_up.reset();
        for p in &self.snapshot().pools {
            for b in &p.backends {
                self.metrics
                    .backend_up
                    .with_label_values(&[&p.config.name, &b.name])
                    .set(i64::from(b.healthy()));
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("started without a config file (--listen/--backend mode): nothing to reload")]
    NoFile,
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(
        "the admin section changed: refused (admin address and token change only with a restart); the running configuration stays"
    )]
    AdminChanged,
}

fn build(config: Config, old: Option<&Snapshot>) -> Snapshot {
    let pools = config
        .pools
        .iter()
        .map(|p| {
            let previous = old.and_then(|o| o.pool(&p.name)).map(Arc::as_ref);
            Arc::new(Pool::new(p.clone(), previous))
        })
        .collect();
    let routes = config
        .listeners
        .iter()
        .map(|l| RouteTable::new(l, &config.pools))
        .collect();
    Snapshot {
        config,
        pools,
        routes,
    }
}
