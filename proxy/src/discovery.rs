//! Backends that come and go without a reload: `discover` entries resolved through DNS, and
//! backends added or removed through the admin API.
//!
//! A pool's backend entry may be `discover: host:port`: every A/AAAA record of `host` is a
//! backend named `<name>-<ip>` (a Kubernetes headless service: one record per ready pod). The
//! [`Discovery`] background service resolves each entry with an async resolver (never on a
//! request thread), again when the records' TTL runs out (bounded by `dns.min_refresh_ms` and
//! `dns.max_refresh_ms`), and keeps the last answer when a lookup fails. When the set changes,
//! the pools are rebuilt: backends that stay keep their health and counters; new ones take
//! traffic (gradually, by slow start); removed ones are drained (`Shared::rebuild`), so their
//! open streams move and their requests in flight finish. Admin additions and removals go
//! through the same rebuild. Both survive reloads of the file and are lost on restart.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, NameServerConfigGroup, ResolverConfig};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::xfer::Protocol;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use crate::config::{BackendConfig, Config, DiscoverConfig};
use crate::state::Shared;

/// How often the loop looks for due lookups.
const TICK: Duration = Duration::from_millis(100);
/// Retry delay after a failed lookup (the last answer stays meanwhile).
const RETRY: Duration = Duration::from_secs(2);
/// Most backends one `discover` entry may become.
pub const MAX_RECORDS: usize = 256;

/// What is added to the file's backends at run time.
#[derive(Debug, Default)]
pub struct Dynamic {
    /// (pool, entry name) -> the addresses its last successful lookup gave.
    resolved: HashMap<(String, String), Vec<IpAddr>>,
    /// Backends added through the admin API, by pool.
    added: HashMap<String, Vec<BackendConfig>>,
    /// Backend names removed through the admin API, by pool.
    removed: HashMap<String, HashSet<String>>,
}

impl Dynamic {
    /// Records a lookup; returns whether the set changed.
    pub fn set_resolved(&mut self, pool: &str, entry: &str, mut ips: Vec<IpAddr>) -> bool {
        ips.sort();
        ips.dedup();
        ips.truncate(MAX_RECORDS);
        let key = (pool.to_owned(), entry.to_owned());
        if self.resolved.get(&key) == Some(&ips) {
            return false;
        }
        self.resolved.insert(key, ips);
        true
    }

    pub fn add(&mut self, pool: &str, backend: BackendConfig) {
        if let Some(r) = self.removed.get_mut(pool) {
            r.remove(&backend.name);
        }
        self.added.entry(pool.to_owned()).or_default().push(backend);
    }

    /// Removes a backend by name (an admin addition is forgotten; any other is hidden).
    pub fn remove(&mut self, pool: &str, name: &str) {
        if let Some(a) = self.added.get_mut(pool) {
            a.retain(|b| b.name != name);
        }
        self.removed
            .entry(pool.to_owned())
            .or_default()
            .insert(name.to_owned());
    }
}

/// The backends of a `discover` entry for the addresses `ips`.
fn discovered(entry: &DiscoverConfig, ips: &[IpAddr]) -> Vec<BackendConfig> {
    ips.iter()
        .map(|ip| BackendConfig {
            name: format!("{}-{ip}", entry.name),
            address: SocketAddr::new(*ip, entry.port),
            weight: entry.weight,
        })
        .collect()
}

/// `config` with its `discover` entries resolved and the admin's additions and removals
/// applied. A backend whose name or address is already taken is left out.
pub fn expand(config: &Config, d: &Dynamic) -> Config {
    let mut out = config.clone();
    for pool in &mut out.pools {
        let mut extra: Vec<BackendConfig> = Vec::new();
        for entry in &pool.discover {
            if let Some(ips) = d.resolved.get(&(pool.name.clone(), entry.name.clone())) {
                extra.extend(discovered(entry, ips));
            }
        }
        extra.extend(d.added.get(&pool.name).cloned().unwrap_or_default());
        for b in extra {
            let taken = pool
                .backends
                .iter()
                .any(|x| x.name == b.name || x.address == b.address);
            if !taken {
                pool.backends.push(b);
            }
        }
        if let Some(removed) = d.removed.get(&pool.name) {
            pool.backends.retain(|b| !removed.contains(&b.name));
        }
    }
    out
}

/// A resolver for a pool's `dns.servers` (empty: the system's configuration).
fn resolver(servers: &[SocketAddr]) -> Result<TokioResolver, hickory_resolver::ResolveError> {
    if servers.is_empty() {
        return Ok(TokioResolver::builder_tokio()?.build());
    }
    let mut group = NameServerConfigGroup::new();
    for s in servers {
        group.push(NameServerConfig::new(*s, Protocol::Udp));
    }
    let config = ResolverConfig::from_parts(None, vec![], group);
    let mut builder =
        TokioResolver::builder_with_config(config, TokioConnectionProvider::default());
    builder.options_mut().attempts = 2;
    builder.options_mut().timeout = Duration::from_secs(2);
    Ok(builder.build())
}

/// The background service that keeps `discover` entries resolved.
pub struct Discovery {
    pub shared: Arc<Shared>,
}

#[async_trait]
impl BackgroundService for Discovery {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut due: HashMap<(String, String), Instant> = HashMap::new();
        let mut resolvers: HashMap<Vec<SocketAddr>, TokioResolver> = HashMap::new();
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                () = tokio::time::sleep(TICK) => {}
            }
            // Most configs discover nothing: then the loop costs a lock, not a config clone.
            if !self
                .shared
                .with_base(|c| c.pools.iter().any(|p| !p.discover.is_empty()))
            {
                due.clear();
                continue;
            }
            let base = self.shared.base_config();
            let now = Instant::now();
            let mut changed = false;
            let mut live = HashSet::new();
            for pool in &base.pools {
                for entry in &pool.discover {
                    let key = (pool.name.clone(), entry.name.clone());
                    live.insert(key.clone());
                    if due.get(&key).is_some_and(|t| *t > now) {
                        continue;
                    }
                    let r = match resolvers.get(&pool.dns.servers) {
                        Some(r) => r,
                        None => match resolver(&pool.dns.servers) {
                            Ok(r) => resolvers.entry(pool.dns.servers.clone()).or_insert(r),
                            Err(e) => {
                                tracing::error!(pool = %pool.name, error = %e, "cannot build a DNS resolver");
                                due.insert(key, now + RETRY);
                                continue;
                            }
                        },
                    };
                    match r.lookup_ip(entry.host.as_str()).await {
                        Ok(lookup) => {
                            let ttl = lookup
                                .valid_until()
                                .saturating_duration_since(Instant::now());
                            let ips: Vec<IpAddr> = lookup.iter().collect();
                            let next = ttl.clamp(pool.dns.min_refresh, pool.dns.max_refresh);
                            due.insert(key, Instant::now() + next);
                            if self
                                .shared
                                .dynamic(|d| d.set_resolved(&pool.name, &entry.name, ips.clone()))
                            {
                                tracing::info!(pool = %pool.name, entry = %entry.name, addresses = ?ips, "discovered backends changed");
                                changed = true;
                            }
                        }
                        Err(e) => {
                            // The last answer stays: a DNS hiccup must not empty a pool.
                            tracing::warn!(pool = %pool.name, host = %entry.host, error = %e, "DNS lookup failed; keeping the last answer");
                            due.insert(key, Instant::now() + RETRY.min(pool.dns.max_refresh));
                        }
                    }
                }
            }
            due.retain(|k, _| live.contains(k));
            if changed {
                self.shared.rebuild();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discovered_and_added_backends_join_the_file_ones_and_removed_ones_leave() {
        let yaml = "listeners: [{address: 127.0.0.1:8080}]\npools:\n  - name: p\n    backends:\n      - {address: 127.0.0.1:3001, name: one}\n      - {discover: mcp.internal:3000, name: mcp}\n";
        let config = Config::parse(yaml, "test").unwrap_or_else(|e| panic!("{e}"));
        let mut d = Dynamic::default();
        let names = |c: &Config| -> Vec<String> {
            c.pools[0].backends.iter().map(|b| b.name.clone()).collect()
        };
        assert_eq!(names(&expand(&config, &d)), ["one"], "nothing resolved yet");
        let ips: Vec<IpAddr> = vec![
            "10.0.0.2".parse().unwrap_or(IpAddr::from([0; 4])),
            "10.0.0.1".parse().unwrap_or(IpAddr::from([0; 4])),
        ];
        assert!(d.set_resolved("p", "mcp", ips.clone()));
        assert!(!d.set_resolved("p", "mcp", ips), "same set: no change");
        let c = expand(&config, &d);
        assert_eq!(names(&c), ["one", "mcp-10.0.0.1", "mcp-10.0.0.2"]);
        assert_eq!(c.pools[0].backends[1].address.to_string(), "10.0.0.1:3000");
        d.add(
            "p",
            BackendConfig {
                name: "extra".into(),
                address: "127.0.0.1:3009"
                    .parse()
                    .unwrap_or_else(|_| SocketAddr::from(([0; 4], 0))),
                weight: 1,
            },
        );
        d.remove("p", "one");
        assert_eq!(
            names(&expand(&config, &d)),
            ["mcp-10.0.0.1", "mcp-10.0.0.2", "extra"]
        );
        d.remove("p", "extra");
        assert_eq!(
            names(&expand(&config, &d)),
            ["mcp-10.0.0.1", "mcp-10.0.0.2"]
        );
    }
}
