//! The `auth:` section of a pool (OAuth 2.1 resource server, API keys, the principal sent to
//! the backends) and secrets (`env:NAME`, `file:PATH` or the value itself), which never appear
//! in errors, logs or `Debug` output.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, invalid};

/// Defaults of the `auth:` section.
pub mod defaults {
    pub const ALGORITHMS: &[&str] = &["RS256", "ES256", "EdDSA"];
    pub const LEEWAY_SECONDS: u64 = 30;
    pub const JWKS_REFRESH_SECONDS: u64 = 300;
    /// An unknown `kid` triggers a JWKS fetch at most this often, so that tokens with random
    /// key ids cannot make the proxy hammer the identity provider.
    pub const JWKS_MIN_REFETCH_SECONDS: u64 = 10;
}

/// A secret from the config: the value itself, `env:NAME` (an environment variable) or
/// `file:PATH` (the file's contents, without a trailing newline). `Debug` hides it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Resolves `text` for `key`; errors name the key and where the secret was looked for,
    /// never the secret.
    pub fn resolve(key: &str, text: &str) -> Result<Self, ConfigError> {
        let value = if let Some(name) = text.strip_prefix("env:") {
            std::env::var(name)
                .map_err(|_| invalid(key, text, "environment variable not set or not UTF-8"))?
        } else if let Some(path) = text.strip_prefix("file:") {
            std::fs::read_to_string(path)
                .map_err(|e| invalid(key, text, &format!("cannot read the file: {e}")))?
                .trim_end_matches(['\r', '\n'])
                .to_owned()
        } else {
            text.to_owned()
        };
        if value.is_empty() {
            return Err(invalid(key, "<redacted>", "must not be empty"));
        }
        Ok(Self(value))
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthFile {
    /// The canonical URL of this MCP server as clients name it: the audience tokens must be
    /// issued for (RFC 8707 resource indicator) and the `resource` of the metadata document.
    pub resource: String,
    #[serde(default)]
    pub authorization_servers: Vec<String>,
    #[serde(default)]
    pub scopes_supported: Vec<String>,
    #[serde(default)]
    pub required_scopes: Vec<String>,
    #[serde(default)]
    pub jwt: Option<JwtFile>,
    #[serde(default)]
    pub api_keys: Vec<ApiKeyFile>,
    /// Pass the client's `Authorization` header to the backends (off: no token passthrough).
    #[serde(default)]
    pub forward_authorization: bool,
    /// The HMAC key shared with the backends, which signs `X-MCP-Principal`.
    #[serde(default)]
    pub principal_secret: Option<String>,
    /// Send the principal to the backends (needs `principal_secret`). Only for backends that
    /// do not bind sessions to principals: without it every authenticated client shares
    /// anonymous sessions.
    #[serde(default = "yes")]
    pub forward_principal: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtFile {
    pub issuer: String,
    /// Accepted `aud` values; default: `[resource]`.
    #[serde(default)]
    pub audiences: Vec<String>,
    #[serde(default = "algorithms")]
    pub algorithms: Vec<String>,
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    #[serde(default)]
    pub jwks_url: Option<String>,
    #[serde(default = "jwks_refresh")]
    pub jwks_refresh_seconds: u64,
    /// The only way to accept HS256 tokens: a shared secret (at least 32 bytes).
    #[serde(default)]
    pub hs256_secret: Option<String>,
    #[serde(default = "leeway")]
    pub leeway_seconds: u64,
    /// An unknown `kid` fetches the JWKS again at most this often.
    #[serde(default = "min_refetch")]
    pub jwks_min_refetch_seconds: u64,
}

fn min_refetch() -> u64 {
    defaults::JWKS_MIN_REFETCH_SECONDS
}
fn algorithms() -> Vec<String> {
    defaults::ALGORITHMS
        .iter()
        .map(|s| (*s).to_owned())
        .collect()
}
fn jwks_refresh() -> u64 {
    defaults::JWKS_REFRESH_SECONDS
}
fn leeway() -> u64 {
    defaults::LEEWAY_SECONDS
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyFile {
    /// Names the client in logs and as its principal (`apikey` + id).
    pub id: String,
    /// Lowercase hex SHA-256 of the key: the key itself is never in the file.
    pub sha256: String,
    #[serde(default)]
    pub scopes: Vec<String>,
}

/// A validated `auth:` section.
#[derive(Debug, Clone, PartialEq)]
pub struct AuthConfig {
    pub resource: String,
    /// `https://host/.well-known/oauth-protected-resource/path` of `resource` (RFC 9728).
    pub metadata_url: String,
    /// The path part of `metadata_url`, answered by the proxy itself.
    pub metadata_path: String,
    pub authorization_servers: Vec<String>,
    pub scopes_supported: Vec<String>,
    pub required_scopes: Vec<String>,
    pub jwt: Option<JwtConfig>,
    pub api_keys: Vec<ApiKey>,
    pub forward_authorization: bool,
    pub principal_secret: Option<Secret>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct JwtConfig {
    pub issuer: String,
    pub audiences: Vec<String>,
    pub algorithms: Vec<jsonwebtoken::Algorithm>,
    pub jwks: JwksSource,
    pub refresh: Duration,
    pub hs256_secret: Option<Secret>,
    pub leeway: Duration,
    pub min_refetch: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub enum JwksSource {
    None,
    File(PathBuf),
    Url(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct ApiKey {
    pub id: String,
    pub sha256: [u8; 32],
    pub scopes: Vec<String>,
}

/// RFC 6749 scope tokens: `%x21 / %x23-5B / %x5D-7E`.
pub fn is_scope(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 256
        && s.bytes()
            .all(|b| b == 0x21 || (0x23..=0x5b).contains(&b) || (0x5d..=0x7e).contains(&b))
}

/// `scheme://authority` and the path of an absolute http(s) URL without query or fragment.
fn split_url(url: &str) -> Option<(&str, &str)> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))?;
    if url.contains(['?', '#']) || !url.bytes().all(|b| b.is_ascii_graphic()) {
        return None;
    }
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if authority.is_empty() || authority.contains('@') {
        return None;
    }
    Some((&url[..url.len() - rest.len() + authority.len()], path))
}

/// Whether `url` is `https://`, or `http://` to a loopback host (for tests and sidecars).
fn secure_or_loopback(url: &str) -> bool {
    if url.starts_with("https://") {
        return true;
    }
    let Some(rest) = url.strip_prefix("http://") else {
        return false;
    };
    let host = rest.split(['/', ':']).next().unwrap_or_default();
    host == "localhost" || host == "127.0.0.1" || rest.starts_with("[::1]")
}

fn scopes(key: &str, list: &[String]) -> Result<Vec<String>, ConfigError> {
    for (i, s) in list.iter().enumerate() {
        if !is_scope(s) {
            return Err(invalid(
                format!("{key}[{i}]"),
                s,
                "not an OAuth scope (visible ASCII without spaces, quotes or backslashes)",
            ));
        }
    }
    Ok(list.to_vec())
}

impl AuthFile {
    pub fn validate(self, key: &str) -> Result<AuthConfig, ConfigError> {
        let (origin, path) = split_url(&self.resource).ok_or_else(|| {
            invalid(
                format!("{key}.resource"),
                &self.resource,
                "must be an absolute http(s) URL without query or fragment",
            )
        })?;
        let metadata_path = format!("/.well-known/oauth-protected-resource{path}");
        let metadata_url = format!("{origin}{metadata_path}");
        for (i, s) in self.authorization_servers.iter().enumerate() {
            if split_url(s).is_none() {
                return Err(invalid(
                    format!("{key}.authorization_servers[{i}]"),
                    s,
                    "must be an absolute http(s) URL",
                ));
            }
        }
        let scopes_supported = scopes(&format!("{key}.scopes_supported"), &self.scopes_supported)?;
        let required_scopes = scopes(&format!("{key}.required_scopes"), &self.required_scopes)?;
        if self.jwt.is_none() && self.api_keys.is_empty() {
            return Err(invalid(
                key,
                "{}",
                "needs `jwt`, `api_keys` or both (omit `auth` to turn authentication off)",
            ));
        }
        let jwt = match self.jwt {
            None => None,
            Some(j) => Some(j.validate(&format!("{key}.jwt"), &self.resource)?),
        };
        let mut api_keys = Vec::new();
        let mut ids = HashSet::new();
        for (i, k) in self.api_keys.into_iter().enumerate() {
            let kkey = format!("{key}.api_keys[{i}]");
            if k.id.is_empty() || k.id.len() > 128 || !k.id.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(invalid(
                    format!("{kkey}.id"),
                    &k.id,
                    "must be 1-128 visible ASCII characters",
                ));
            }
            if !ids.insert(k.id.clone()) {
                return Err(invalid(format!("{kkey}.id"), &k.id, "ids must be unique"));
            }
            let sha256 = hex32(&k.sha256).ok_or_else(|| {
                invalid(
                    format!("{kkey}.sha256"),
                    "<redacted>",
                    "must be 64 hex digits: the SHA-256 of the key (e.g. `printf %s KEY | sha256sum`)",
                )
            })?;
            api_keys.push(ApiKey {
                id: k.id,
                sha256,
                scopes: scopes(&format!("{kkey}.scopes"), &k.scopes)?,
            });
        }
        let principal_secret = match self.principal_secret {
            None if self.forward_principal => {
                return Err(invalid(
                    format!("{key}.principal_secret"),
                    "<none>",
                    "needed with auth: the backends bind sessions to the principal it signs (set the same secret on mcp-backend), or set forward_principal: false for backends that cannot",
                ));
            }
            Some(_) if !self.forward_principal => {
                return Err(invalid(
                    format!("{key}.forward_principal"),
                    "false",
                    "principal_secret is set but would never be used",
                ));
            }
            None => None,
            Some(s) => {
                let k = format!("{key}.principal_secret");
                let secret = Secret::resolve(&k, &s)?;
                if secret.expose().len() < 32 {
                    return Err(invalid(k, "<redacted>", "must be at least 32 bytes"));
                }
                Some(secret)
            }
        };
        Ok(AuthConfig {
            resource: self.resource,
            metadata_url,
            metadata_path,
            authorization_servers: self.authorization_servers,
            scopes_supported,
            required_scopes,
            jwt,
            api_keys,
            forward_authorization: self.forward_authorization,
            principal_secret,
        })
    }
}

impl JwtFile {
    fn validate(self, key: &str, resource: &str) -> Result<JwtConfig, ConfigError> {
        if self.issuer.is_empty() {
            return Err(invalid(format!("{key}.issuer"), "", "must not be empty"));
        }
        let audiences = if self.audiences.is_empty() {
            vec![resource.to_owned()]
        } else {
            self.audiences
        };
        let hs256_secret = match self.hs256_secret {
            None => None,
            Some(s) => {
                let k = format!("{key}.hs256_secret");
                let secret = Secret::resolve(&k, &s)?;
                if secret.expose().len() < 32 {
                    return Err(invalid(k, "<redacted>", "must be at least 32 bytes"));
                }
                Some(secret)
            }
        };
        let mut algorithms = Vec::new();
        for (i, a) in self.algorithms.iter().enumerate() {
            let k = format!("{key}.algorithms[{i}]");
            let alg = match a.as_str() {
                "RS256" => jsonwebtoken::Algorithm::RS256,
                "ES256" => jsonwebtoken::Algorithm::ES256,
                "EdDSA" => jsonwebtoken::Algorithm::EdDSA,
                "HS256" if hs256_secret.is_some() => jsonwebtoken::Algorithm::HS256,
                "HS256" => {
                    return Err(invalid(
                        k,
                        a,
                        "HS256 needs an explicit jwt.hs256_secret (it is never checked against a public key)",
                    ));
                }
                _ => {
                    return Err(invalid(
                        k,
                        a,
                        "supported algorithms are RS256, ES256, EdDSA and HS256 (never none)",
                    ));
                }
            };
            if !algorithms.contains(&alg) {
                algorithms.push(alg);
            }
        }
        if algorithms.is_empty() {
            return Err(invalid(
                format!("{key}.algorithms"),
                "[]",
                "at least one algorithm",
            ));
        }
        let asymmetric = algorithms
            .iter()
            .any(|a| *a != jsonwebtoken::Algorithm::HS256);
        let jwks = match (self.jwks_file, self.jwks_url) {
            (Some(_), Some(u)) => {
                return Err(invalid(
                    format!("{key}.jwks_url"),
                    u,
                    "give jwks_file or jwks_url, not both",
                ));
            }
            (Some(f), None) => {
                if !f.is_file() {
                    return Err(invalid(
                        format!("{key}.jwks_file"),
                        f.display(),
                        "file not found",
                    ));
                }
                JwksSource::File(f)
            }
            (None, Some(u)) => {
                if split_url(&u).is_none() || !secure_or_loopback(&u) {
                    return Err(invalid(
                        format!("{key}.jwks_url"),
                        u,
                        "must be an https:// URL (http:// only to a loopback host)",
                    ));
                }
                JwksSource::Url(u)
            }
            (None, None) if asymmetric => {
                return Err(invalid(
                    key,
                    &self.issuer,
                    "RS256/ES256/EdDSA need jwks_file or jwks_url",
                ));
            }
            (None, None) => JwksSource::None,
        };
        if !(10..=86_400).contains(&self.jwks_refresh_seconds) {
            return Err(invalid(
                format!("{key}.jwks_refresh_seconds"),
                self.jwks_refresh_seconds,
                "must be between 10 and 86400",
            ));
        }
        if self.leeway_seconds > 300 {
            return Err(invalid(
                format!("{key}.leeway_seconds"),
                self.leeway_seconds,
                "must be at most 300",
            ));
        }
        if !(1..=3600).contains(&self.jwks_min_refetch_seconds) {
            return Err(invalid(
                format!("{key}.jwks_min_refetch_seconds"),
                self.jwks_min_refetch_seconds,
                "must be between 1 and 3600",
            ));
        }
        Ok(JwtConfig {
            min_refetch: Duration::from_secs(self.jwks_min_refetch_seconds),
            issuer: self.issuer,
            audiences,
            algorithms,
            jwks,
            refresh: Duration::from_secs(self.jwks_refresh_seconds),
            hs256_secret,
            leeway: Duration::from_secs(self.leeway_seconds),
        })
    }
}

fn hex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in s.as_bytes().chunks(2).enumerate() {
        let text = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(text, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_url_inserts_the_well_known_path_before_the_resource_path() {
        let a = AuthFile {
            resource: "https://mcp.example.com/github/mcp".into(),
            authorization_servers: vec![],
            scopes_supported: vec![],
            required_scopes: vec![],
            jwt: None,
            api_keys: vec![ApiKeyFile {
                id: "k".into(),
                sha256: "ab".repeat(32),
                scopes: vec![],
            }],
            forward_authorization: false,
            principal_secret: None,
            forward_principal: false,
        }
        .validate("pools[0].auth")
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            a.metadata_url,
            "https://mcp.example.com/.well-known/oauth-protected-resource/github/mcp"
        );
        assert_eq!(
            a.metadata_path,
            "/.well-known/oauth-protected-resource/github/mcp"
        );
    }

    #[test]
    fn secrets_never_show_in_debug_or_errors() {
        let s = Secret::resolve("k", "hunter2-hunter2").unwrap_or_else(|e| panic!("{e}"));
        assert!(!format!("{s:?}").contains("hunter2"));
        let e = Secret::resolve("k", "env:MCP_EDGE_SURELY_UNSET_VARIABLE")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("MCP_EDGE_SURELY_UNSET_VARIABLE"), "{e}");
    }

    #[test]
    fn scope_tokens() {
        assert!(is_scope("mcp:tools"));
        assert!(!is_scope("a b"));
        assert!(!is_scope("a\"b"));
        assert!(!is_scope(""));
    }

    #[test]
    fn urls() {
        assert_eq!(
            split_url("https://a.example:8443/x/y"),
            Some(("https://a.example:8443", "/x/y"))
        );
        assert_eq!(
            split_url("https://a.example"),
            Some(("https://a.example", ""))
        );
        assert!(split_url("https://u@a.example/").is_none());
        assert!(split_url("ftp://a/").is_none());
        assert!(split_url("https://a/?q").is_none());
        assert!(secure_or_loopback("http://127.0.0.1:9/jwks"));
        assert!(!secure_or_loopback("http://idp.example/jwks"));
    }
}
