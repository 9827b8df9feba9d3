//! What a request may be before anything is forwarded: the route allow-list (only the MCP
//! endpoints of a listener's routes, and their OAuth metadata, matched byte for byte on the raw
//! request target), the `Host` a route names, and the smuggling guard's header scan.

use std::sync::Arc;

use crate::config::{Listener, PoolConfig};

/// What a public path is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// The pool's MCP endpoint (`mcp_path`): POST, GET stream, DELETE.
    Mcp,
    /// `GET .../sse` of the 2024-11-05 transport.
    LegacyStream,
    /// `POST .../messages?sessionId=` of the 2024-11-05 transport.
    LegacyMessage,
    /// `GET /.well-known/oauth-protected-resource...` (RFC 9728), answered by the proxy.
    Metadata,
}

impl Endpoint {
    /// The methods the endpoint accepts; anything else is 405.
    pub fn allows(self, method: &http::Method) -> bool {
        use http::Method as M;
        match self {
            Endpoint::Mcp => [M::POST, M::GET, M::DELETE, M::OPTIONS].contains(method),
            Endpoint::LegacyStream | Endpoint::Metadata => method == M::GET,
            Endpoint::LegacyMessage => method == M::POST,
        }
    }

    pub fn allow_header(self) -> &'static str {
        match self {
            Endpoint::Mcp => "POST, GET, DELETE, OPTIONS",
            Endpoint::LegacyStream | Endpoint::Metadata => "GET",
            Endpoint::LegacyMessage => "POST",
        }
    }
}

/// One public path of a listener.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Lowercase host without port; `None` matches any host.
    pub host: Option<String>,
    pub path: String,
    pub endpoint: Endpoint,
    /// Index of the pool in the snapshot.
    pub pool: usize,
    /// The route's path prefix, stripped before the request goes upstream.
    pub prefix: Arc<str>,
}

/// Every public path of one listener, host routes first.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    pub entries: Vec<Entry>,
}

impl RouteTable {
    pub fn new(listener: &Listener, pools: &[PoolConfig]) -> Self {
        let mut entries = Vec::new();
        let with_auth = listener
            .routes
            .iter()
            .filter(|r| pools.iter().any(|p| p.name == r.pool && p.auth.is_some()))
            .count();
        for r in &listener.routes {
            let Some(pool) = pools.iter().position(|p| p.name == r.pool) else {
                continue;
            };
            let p = &pools[pool];
            let prefix: Arc<str> = Arc::from(r.prefix.as_str());
            let mut add = |path: String, endpoint: Endpoint| {
                entries.push(Entry {
                    host: r.host.clone(),
                    path,
                    endpoint,
                    pool,
                    prefix: prefix.clone(),
                });
            };
            let kinds = [
                Endpoint::Mcp,
                Endpoint::LegacyStream,
                Endpoint::LegacyMessage,
            ];
            for (path, endpoint) in p.public_paths(&r.prefix).into_iter().zip(kinds) {
                add(path, endpoint);
            }
            if let Some(a) = &p.auth {
                add(a.metadata_path.clone(), Endpoint::Metadata);
                // Clients that only know the origin ask the root document.
                if with_auth == 1 && a.metadata_path != "/.well-known/oauth-protected-resource" {
                    add(
                        "/.well-known/oauth-protected-resource".to_owned(),
                        Endpoint::Metadata,
                    );
                }
            }
        }
        // Stable: a host route wins over a host-less one with the same path.
        entries.sort_by_key(|e| e.host.is_none());
        Self { entries }
    }

    /// The entry for a raw request target and `Host`. The path is the target up to `?`,
    /// compared byte for byte: no decoding, no normalisation, so `//mcp`, `/mcp/../x`,
    /// `/%6dcp`, `/MCP` and absolute-form targets (`http://h/mcp`) match nothing.
    pub fn find(&self, host: Option<&str>, raw_target: &[u8]) -> Option<&Entry> {
        let path = match raw_target.iter().position(|b| *b == b'?') {
            Some(i) => &raw_target[..i],
            None => raw_target,
        };
        if path.first() != Some(&b'/') {
            return None;
        }
        self.entries.iter().find(|e| {
            e.path.as_bytes() == path && e.host.as_deref().is_none_or(|h| Some(h) == host)
        })
    }
}

/// The host of a `Host` header value (or `:authority`), lowercase and without port; `None`
/// when it is not a plausible host.
pub fn host_name(value: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(value).ok()?;
    let name = if let Some(rest) = text.strip_prefix('[') {
        let end = rest.find(']')?;
        let after = &rest[end + 1..];
        if !(after.is_empty() || after.strip_prefix(':').is_some_and(is_port)) {
            return None;
        }
        &rest[..end]
    } else {
        match text.rsplit_once(':') {
            Some((n, port)) if is_port(port) => n,
            Some(_) => return None,
            None => text,
        }
    };
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:".contains(&b));
    ok.then(|| name.to_ascii_lowercase())
}

fn is_port(s: &str) -> bool {
    !s.is_empty() && s.len() <= 5 && s.bytes().all(|b| b.is_ascii_digit())
}

/// Whether raw request header bytes carry a `Content-Length` line.
pub fn has_content_length(raw: &[u8]) -> bool {
    raw.split(|b| *b == b'\n')
        .any(|line| line.len() > 15 && line[..15].eq_ignore_ascii_case(b"content-length:"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use proptest::prelude::*;

    fn table(yaml_listener: &str, pools: &str) -> RouteTable {
        let yaml = format!("listeners: [{yaml_listener}]\npools: [{pools}]\n");
        let c = Config::parse(&yaml, "t").unwrap_or_else(|e| panic!("{e}"));
        RouteTable::new(&c.listeners[0], &c.pools)
    }

    fn two_pools() -> RouteTable {
        table(
            "{address: 127.0.0.1:1, routes: [{pool: github, path_prefix: /github}, {pool: search, path_prefix: /search}, {pool: search, host: Search.Example, path_prefix: /s}]}",
            "{name: github, backends: [{address: 127.0.0.1:2}]}, {name: search, backends: [{address: 127.0.0.1:3}], auth: {resource: 'https://search.example/s/mcp', api_keys: [{id: k, sha256: '0000000000000000000000000000000000000000000000000000000000000000'}], forward_principal: false}}",
        )
    }

    #[test]
    fn only_the_exact_public_paths_match() {
        let t = two_pools();
        let f =
            |host: Option<&str>, p: &str| t.find(host, p.as_bytes()).map(|e| (e.pool, e.endpoint));
        assert_eq!(f(None, "/github/mcp"), Some((0, Endpoint::Mcp)));
        assert_eq!(f(None, "/github/mcp?x=1"), Some((0, Endpoint::Mcp)));
        assert_eq!(f(None, "/github/sse"), Some((0, Endpoint::LegacyStream)));
        assert_eq!(
            f(None, "/search/messages?sessionId=a"),
            Some((1, Endpoint::LegacyMessage))
        );
        assert_eq!(
            f(Some("search.example"), "/s/mcp"),
            Some((1, Endpoint::Mcp))
        );
        assert_eq!(f(Some("other.example"), "/s/mcp"), None, "host route");
        assert_eq!(
            f(
                Some("search.example"),
                "/.well-known/oauth-protected-resource/s/mcp"
            ),
            Some((1, Endpoint::Metadata))
        );
        for bad in [
            "/mcp",
            "//github/mcp",
            "/github//mcp",
            "/github/mcp/",
            "/github/mcp/../mcp",
            "/github/./mcp",
            "/github/%6dcp",
            "/%2e%2e/github/mcp",
            "/GITHUB/MCP",
            "/github/mcp#x",
            "http://127.0.0.1:1/github/mcp",
            "*",
            "",
            "/sessions",
            "/health/../github/mcp",
            "/github/mcp%00",
        ] {
            assert!(f(None, bad).is_none(), "{bad:?} must not match");
        }
    }

    #[test]
    fn a_listener_with_a_pool_serves_the_classic_paths() {
        let t = table(
            "{address: 127.0.0.1:1}",
            "{name: mcp, backends: [{address: 127.0.0.1:2}]}",
        );
        let paths: Vec<&str> = t.entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["/mcp", "/sse", "/messages"]);
        let t = table(
            "{address: 127.0.0.1:1}",
            "{name: mcp, backends: [{address: 127.0.0.1:2}], legacy_transport: false}",
        );
        assert!(t.find(None, b"/sse").is_none() && t.find(None, b"/messages").is_none());
    }

    #[test]
    fn host_headers() {
        assert_eq!(
            host_name(b"Example.COM:8080").as_deref(),
            Some("example.com")
        );
        assert_eq!(host_name(b"[::1]:80").as_deref(), Some("::1"));
        assert_eq!(host_name(b"127.0.0.1").as_deref(), Some("127.0.0.1"));
        assert_eq!(host_name(b"a b"), None);
        assert_eq!(host_name(b"x:y"), None);
        assert_eq!(host_name(b""), None);
        assert_eq!(host_name(b"[::1]x"), None);
    }

    proptest! {
        #[test]
        fn the_matcher_never_panics_and_only_accepts_listed_paths(
            target in proptest::collection::vec(any::<u8>(), 0..64),
            host in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..32)),
        ) {
            let t = two_pools();
            let host = host.as_deref().and_then(host_name);
            if let Some(e) = t.find(host.as_deref(), &target) {
                let path = target.split(|b| *b == b'?').next().unwrap_or_default();
                prop_assert_eq!(e.path.as_bytes(), path);
                prop_assert!(t.entries.iter().any(|x| x.path == e.path));
            }
        }

        #[test]
        fn mutations_of_a_listed_path_never_match_another_route(
            i in 0usize..12, byte in any::<u8>(),
        ) {
            let t = two_pools();
            let mut p = b"/github/mcp".to_vec();
            let i = i % p.len();
            if p[i] != byte {
                p[i] = byte;
                let path = p.split(|b| *b == b'?').next().unwrap_or_default().to_vec();
                if let Some(e) = t.find(None, &p) {
                    prop_assert_eq!(e.path.as_bytes(), &path[..]);
                }
            }
        }

        #[test]
        fn host_parsing_never_panics(v in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = host_name(&v);
        }
    }
}
