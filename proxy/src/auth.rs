//! Authentication at the edge: an OAuth 2.1 resource server (bearer JWTs checked against a
//! JWKS, an issuer and this server's audience, per the MCP authorization specification) and
//! static API keys, per pool. The authenticated principal goes to the backends in
//! `X-MCP-Principal`, signed with a shared secret so that only the proxy can assert it.
//!
//! What is refused: a token of an algorithm outside the pool's allow-list (never `none`; HS256
//! only with an explicit shared secret, so a token "signed" with an RSA public key as HMAC key
//! is refused), a bad signature, another issuer or audience (no token passthrough), an expired
//! or not yet valid token (small leeway), a missing required scope (403).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit, Mac};
use jsonwebtoken::jwk::{JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::{AuthConfig, JwksSource, Secret, is_scope};

/// Header names between the proxy and the backends. Client requests never get them through.
pub const PRINCIPAL: &str = "x-mcp-principal";
pub const PRINCIPAL_SCOPES: &str = "x-mcp-principal-scopes";
pub const PRINCIPAL_SIGNATURE: &str = "x-mcp-principal-signature";

/// Longest bearer token read; longer ones are refused unread.
const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// A JWKS document larger than this is refused.
const MAX_JWKS_BYTES: usize = 1024 * 1024;
const JWKS_FETCH_TIMEOUT: Duration = Duration::from_secs(5);
const JWKS_FETCH_ATTEMPTS: u32 = 3;
const MALFORMED_HEADER: &str = "malformed token header";
/// What `mcp-backend` accepts: `X-MCP-Principal` up to 1024 characters (so issuer and subject
/// up to 760 bytes together), `X-MCP-Principal-Scopes` up to 4096.
const MAX_PRINCIPAL_BYTES: usize = 760;
const MAX_SCOPES_BYTES: usize = 4096;

/// Who a request comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// `X-MCP-Principal`: base64url of `issuer\nsubject` or `apikey\nid`.
    pub header: String,
    pub scopes: Vec<String>,
    /// Lowercase hex SHA-256 of `header`: the owner of its sessions (the backend computes the
    /// same), the key of its limits and pins.
    pub hash: String,
    /// For logs: the API key id, or the subject.
    pub name: String,
}

impl Principal {
    /// Scopes beyond what the backends read are not forwarded (called once required scopes
    /// were checked on the whole list).
    fn fit_scopes(&mut self) {
        let mut total = 0;
        self.scopes.retain(|s| {
            total += s.len() + 1;
            total <= MAX_SCOPES_BYTES
        });
    }

    fn new(kind: &str, value: &str, name: &str, scopes: Vec<String>) -> Self {
        let header = URL_SAFE_NO_PAD.encode(format!("{kind}\n{value}"));
        let hash = hex(&Sha256::digest(header.as_bytes()));
        Self {
            header,
            scopes,
            hash,
            name: name.to_owned(),
        }
    }

    /// The start of `hash`, for logs.
    pub fn short(&self) -> &str {
        self.hash.get(..12).unwrap_or(&self.hash)
    }

    /// `X-MCP-Principal-Scopes` and `X-MCP-Principal-Signature` for this principal, signed at
    /// `now` (unix seconds): `t=<now>,v1=<hex HMAC-SHA256(secret, "t\nprincipal\nscopes")>`.
    pub fn sign(&self, secret: &Secret, now: u64) -> (String, String) {
        let scopes = self.scopes.join(" ");
        let mac = signature(secret.expose().as_bytes(), now, &self.header, &scopes);
        (scopes, format!("t={now},v1={mac}"))
    }
}

/// Lowercase hex HMAC-SHA256 over `t\nprincipal\nscopes`.
pub fn signature(secret: &[u8], t: u64, principal: &str, scopes: &str) -> String {
    // HMAC takes keys of any length: `new_from_slice` cannot fail.
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    mac.update(format!("{t}\n{principal}\n{scopes}").as_bytes());
    hex(&mac.finalize().into_bytes())
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Why a request is not authenticated; each maps to a status and a `WWW-Authenticate`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthError {
    /// No credentials: 401 without an error code (RFC 6750 section 3.1).
    Missing,
    /// 400 `invalid_request`: e.g. two `Authorization` headers.
    BadRequest(&'static str),
    /// 401 `invalid_token`.
    Invalid(&'static str),
    /// 403 `insufficient_scope`.
    InsufficientScope,
    /// 503: no signing keys could be loaded to check the token.
    Unavailable,
}

impl AuthError {
    pub fn status(&self) -> u16 {
        match self {
            AuthError::Missing | AuthError::Invalid(_) => 401,
            AuthError::BadRequest(_) => 400,
            AuthError::InsufficientScope => 403,
            AuthError::Unavailable => 503,
        }
    }

    /// A bounded metrics label.
    pub fn label(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::BadRequest(_) => "bad_request",
            AuthError::Invalid(_) => "invalid_token",
            AuthError::InsufficientScope => "insufficient_scope",
            AuthError::Unavailable => "unavailable",
        }
    }

    pub fn message(&self) -> &'static str {
        match self {
            AuthError::Missing => "authentication required",
            AuthError::BadRequest(m) | AuthError::Invalid(m) => m,
            AuthError::InsufficientScope => "insufficient scope",
            AuthError::Unavailable => "cannot verify tokens right now; retry later",
        }
    }

    /// The `WWW-Authenticate` value (RFC 6750, RFC 9728 `resource_metadata`).
    pub fn challenge(&self, config: &AuthConfig) -> Option<String> {
        let mut v = format!("Bearer resource_metadata=\"{}\"", config.metadata_url);
        let scope = config.required_scopes.join(" ");
        match self {
            AuthError::Missing => {}
            AuthError::BadRequest(m) => {
                v.push_str(&format!(
                    ", error=\"invalid_request\", error_description=\"{m}\""
                ));
            }
            AuthError::Invalid(m) => {
                v.push_str(&format!(
                    ", error=\"invalid_token\", error_description=\"{m}\""
                ));
            }
            AuthError::InsufficientScope => v.push_str(", error=\"insufficient_scope\""),
            AuthError::Unavailable => return None,
        }
        if !scope.is_empty() {
            v.push_str(&format!(", scope=\"{scope}\""));
        }
        Some(v)
    }
}

#[derive(Deserialize)]
struct Claims {
    iss: String,
    sub: String,
    #[serde(default)]
    scope: Option<String>,
    #[serde(default)]
    scp: Option<ScopeList>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum ScopeList {
    One(String),
    Many(Vec<String>),
}

/// What asks for a JWKS fetch.
#[derive(Debug, Clone, Copy)]
enum Trigger {
    UnknownKid,
    Schedule,
}

/// Keys by `kid` (`""` for a key without one).
#[derive(Default)]
struct Keys {
    by_kid: HashMap<String, Arc<(DecodingKey, Option<Algorithm>)>>,
    loaded: bool,
}

/// One pool's authenticator; it lives as long as the pool's snapshot.
pub struct Authenticator {
    pub config: Arc<AuthConfig>,
    keys: ArcSwap<Keys>,
    hs256: Option<DecodingKey>,
    last_fetch: Mutex<Option<Instant>>,
    fetching: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("resource", &self.config.resource)
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    /// Builds the authenticator; a `jwks_file` is read now (an unreadable one is logged and
    /// leaves no keys: tokens then get 503 until a reload fixes it).
    pub fn new(config: Arc<AuthConfig>) -> Self {
        let hs256 = config
            .jwt
            .as_ref()
            .and_then(|j| j.hs256_secret.as_ref())
            .and_then(|s| DecodingKey::from_secret(s.expose().as_bytes()).ok());
        let a = Self {
            config,
            keys: ArcSwap::from_pointee(Keys::default()),
            hs256,
            last_fetch: Mutex::new(None),
            fetching: tokio::sync::Mutex::new(()),
        };
        if let Some(JwksSource::File(path)) = a.config.jwt.as_ref().map(|j| &j.jwks) {
            match std::fs::read(path) {
                Ok(bytes) => match a.install(&bytes) {
                    Ok(n) => tracing::info!(file = %path.display(), keys = n, "JWKS loaded"),
                    Err(e) => tracing::error!(file = %path.display(), error = %e, "bad JWKS file"),
                },
                Err(e) => {
                    tracing::error!(file = %path.display(), error = %e, "cannot read JWKS file")
                }
            }
        }
        a
    }

    /// Parses a JWKS document and swaps it in; returns how many keys it has.
    fn install(&self, bytes: &[u8]) -> Result<usize, String> {
        let set: JwkSet = serde_json::from_slice(bytes).map_err(|e| format!("not a JWKS: {e}"))?;
        let mut by_kid = HashMap::new();
        for jwk in &set.keys {
            if jwk.common.public_key_use == Some(PublicKeyUse::Encryption) {
                continue;
            }
            let alg = jwk
                .common
                .key_algorithm
                .and_then(|a| a.to_string().parse::<Algorithm>().ok());
            match DecodingKey::from_jwk(jwk) {
                // Symmetric keys never come from a JWKS: HS256 needs the configured secret.
                Ok(k) if k.family() != jsonwebtoken::AlgorithmFamily::Hmac => {
                    let kid = jwk.common.key_id.clone().unwrap_or_default();
                    by_kid.insert(kid, Arc::new((k, alg)));
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "JWKS key skipped"),
            }
        }
        let n = by_kid.len();
        self.keys.store(Arc::new(Keys {
            by_kid,
            loaded: true,
        }));
        Ok(n)
    }

    /// Whether a fetch for `trigger` is due now. An unknown `kid` refetches at most every
    /// `jwks_min_refetch_seconds`; the schedule every `jwks_refresh_seconds` (never more often
    /// than the minimum); without keys, every minimum interval either way.
    fn due(&self, trigger: Trigger) -> bool {
        let Some(jwt) = &self.config.jwt else {
            return false;
        };
        let Some(last) = self.last_fetch.lock().ok().and_then(|t| *t) else {
            return true;
        };
        let wait = match trigger {
            _ if !self.keys.load().loaded => jwt.min_refetch,
            Trigger::UnknownKid => jwt.min_refetch,
            Trigger::Schedule => jwt.refresh.max(jwt.min_refetch),
        };
        last.elapsed() >= wait
    }

    /// Fetches the JWKS URL (bounded attempts with backoff) when due for `trigger`; the
    /// decision is made under the fetch lock, so concurrent triggers fetch once.
    async fn fetch(&self, trigger: Trigger) {
        let Some(JwksSource::Url(url)) = self.config.jwt.as_ref().map(|j| &j.jwks) else {
            return;
        };
        let _one = self.fetching.lock().await;
        if !self.due(trigger) {
            return;
        }
        if let Ok(mut t) = self.last_fetch.lock() {
            *t = Some(Instant::now());
        }
        let client = match reqwest::Client::builder()
            .timeout(JWKS_FETCH_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()
        {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "cannot build the JWKS client");
                return;
            }
        };
        let mut delay = Duration::from_millis(200);
        for attempt in 1..=JWKS_FETCH_ATTEMPTS {
            match fetch_once(&client, url).await {
                Ok(bytes) => match self.install(&bytes) {
                    Ok(n) => {
                        tracing::info!(url = %url, keys = n, "JWKS fetched");
                        return;
                    }
                    Err(e) => tracing::warn!(url = %url, error = %e, "bad JWKS document"),
                },
                Err(e) => tracing::warn!(url = %url, attempt, error = %e, "JWKS fetch failed"),
            }
            if attempt < JWKS_FETCH_ATTEMPTS {
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
        }
    }

    /// Whether a JWKS URL is due for its scheduled fetch and none is running (cheap: the
    /// background loop asks every tick, then calls [`Self::refresh`]).
    pub fn refresh_wanted(&self) -> bool {
        let url = matches!(
            self.config.jwt.as_ref().map(|j| &j.jwks),
            Some(JwksSource::Url(_))
        );
        url && self.fetching.try_lock().is_ok() && self.due(Trigger::Schedule)
    }

    /// The scheduled JWKS fetch (the first one too).
    pub async fn refresh(&self) {
        self.fetch(Trigger::Schedule).await;
    }

    async fn key_for(
        &self,
        kid: Option<&str>,
        alg: Algorithm,
    ) -> Result<Arc<(DecodingKey, Option<Algorithm>)>, AuthError> {
        let find = |keys: &Keys| -> Option<Arc<(DecodingKey, Option<Algorithm>)>> {
            match kid {
                Some(k) => keys.by_kid.get(k).cloned(),
                // Without a kid only an unambiguous set will do.
                None if keys.by_kid.len() == 1 => keys.by_kid.values().next().cloned(),
                None => None,
            }
        };
        if let Some(k) = find(&self.keys.load()) {
            return check_alg(k, alg);
        }
        // An unknown kid: the provider may have rotated its keys.
        self.fetch(Trigger::UnknownKid).await;
        let keys = self.keys.load();
        if !keys.loaded {
            return Err(AuthError::Unavailable);
        }
        match find(&keys) {
            Some(k) => check_alg(k, alg),
            None => Err(AuthError::Invalid("unknown signing key")),
        }
    }

    /// Authenticates a request from its `Authorization` header lines.
    pub async fn authenticate<'a>(
        &self,
        mut authorization: impl Iterator<Item = &'a [u8]>,
    ) -> Result<Principal, AuthError> {
        let Some(value) = authorization.next() else {
            return Err(AuthError::Missing);
        };
        if authorization.next().is_some() {
            return Err(AuthError::BadRequest("more than one Authorization header"));
        }
        let token = bearer_token(value)?;
        let jwt_shaped = token.bytes().filter(|b| *b == b'.').count() == 2;
        let mut principal = match self.config.jwt {
            Some(_) if jwt_shaped => match self.jwt(token).await {
                // Not a JWT after all (an API key with two dots, say).
                Err(AuthError::Invalid(MALFORMED_HEADER)) if !self.config.api_keys.is_empty() => {
                    self.api_key(token)?
                }
                other => other?,
            },
            _ => self.api_key(token)?,
        };
        let missing = self
            .config
            .required_scopes
            .iter()
            .any(|s| !principal.scopes.contains(s));
        if missing {
            return Err(AuthError::InsufficientScope);
        }
        principal.fit_scopes();
        Ok(principal)
    }

    fn api_key(&self, token: &str) -> Result<Principal, AuthError> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        // Every key is compared, in constant time, whatever matches.
        let mut found = None;
        for k in &self.config.api_keys {
            if bool::from(k.sha256.ct_eq(&digest)) {
                found = Some(k);
            }
        }
        let k = found.ok_or(AuthError::Invalid("unknown or malformed token"))?;
        Ok(Principal::new("apikey", &k.id, &k.id, k.scopes.clone()))
    }

    async fn jwt(&self, token: &str) -> Result<Principal, AuthError> {
        let Some(jwt) = &self.config.jwt else {
            return Err(AuthError::Invalid("unknown or malformed token"));
        };
        let header =
            jsonwebtoken::decode_header(token).map_err(|_| AuthError::Invalid(MALFORMED_HEADER))?;
        if !jwt.algorithms.contains(&header.alg) {
            return Err(AuthError::Invalid("token algorithm not accepted"));
        }
        let key = if header.alg == Algorithm::HS256 {
            match &self.hs256 {
                Some(k) => Arc::new((k.clone(), Some(Algorithm::HS256))),
                None => return Err(AuthError::Invalid("token algorithm not accepted")),
            }
        } else {
            self.key_for(header.kid.as_deref(), header.alg).await?
        };
        let mut v = Validation::new(header.alg);
        v.algorithms = vec![header.alg];
        v.set_issuer(&[&jwt.issuer]);
        v.set_audience(&jwt.audiences);
        v.leeway = jwt.leeway.as_secs();
        v.validate_exp = true;
        v.validate_nbf = true;
        v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let data = jsonwebtoken::decode::<Claims>(token, &key.0, &v).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            AuthError::Invalid(match e.kind() {
                K::ExpiredSignature => "token expired",
                K::ImmatureSignature => "token not yet valid",
                K::InvalidAudience => "token is for another audience",
                K::InvalidIssuer => "token from another issuer",
                K::InvalidSignature => "bad token signature",
                K::InvalidAlgorithm => "token algorithm not accepted",
                K::MissingRequiredClaim(_) => "token lacks a required claim",
                _ => "invalid token",
            })
        })?;
        let c = data.claims;
        if c.sub.is_empty() {
            return Err(AuthError::Invalid("token lacks a required claim"));
        }
        if c.iss.len() + c.sub.len() > MAX_PRINCIPAL_BYTES {
            return Err(AuthError::Invalid("token subject too long"));
        }
        let mut scopes: Vec<String> = match (c.scope, c.scp) {
            (Some(s), _) => s.split_whitespace().map(str::to_owned).collect(),
            (None, Some(ScopeList::One(s))) => s.split_whitespace().map(str::to_owned).collect(),
            (None, Some(ScopeList::Many(v))) => v,
            (None, None) => Vec::new(),
        };
        // Scopes travel in a header: only well-formed ones, and not too many.
        scopes.retain(|s| is_scope(s));
        scopes.truncate(64);
        Ok(Principal::new(
            "jwt",
            &format!("{}\n{}", c.iss, c.sub),
            &c.sub,
            scopes,
        ))
    }
}

fn check_alg(
    k: Arc<(DecodingKey, Option<Algorithm>)>,
    alg: Algorithm,
) -> Result<Arc<(DecodingKey, Option<Algorithm>)>, AuthError> {
    let family_ok = k.0.family() == alg.family();
    let alg_ok = k.1.is_none_or(|a| a == alg);
    if family_ok && alg_ok {
        Ok(k)
    } else {
        Err(AuthError::Invalid("token algorithm does not match its key"))
    }
}

async fn fetch_once(client: &reqwest::Client, url: &str) -> Result<Vec<u8>, String> {
    let mut r = client.get(url).send().await.map_err(|e| e.to_string())?;
    if !r.status().is_success() {
        return Err(format!("status {}", r.status()));
    }
    let mut body = Vec::new();
    while let Some(chunk) = r.chunk().await.map_err(|e| e.to_string())? {
        body.extend_from_slice(&chunk);
        if body.len() > MAX_JWKS_BYTES {
            return Err("JWKS document over 1 MiB".into());
        }
    }
    Ok(body)
}

/// The token of an `Authorization: Bearer <token>` value (scheme case-insensitive, RFC 6750
/// `b64token` characters only).
pub fn bearer_token(value: &[u8]) -> Result<&str, AuthError> {
    let text = std::str::from_utf8(value).map_err(|_| AuthError::Invalid("malformed token"))?;
    let Some((scheme, token)) = text.split_once(' ') else {
        return Err(AuthError::Invalid("expected a Bearer token"));
    };
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthError::Invalid("expected a Bearer token"));
    }
    let token = token.trim_matches(' ');
    let body = token.trim_end_matches('=');
    let ok = !body.is_empty()
        && token.len() <= MAX_TOKEN_BYTES
        && body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~+/".contains(&b));
    if ok {
        Ok(token)
    } else {
        Err(AuthError::Invalid("malformed token"))
    }
}

/// The RFC 9728 protected resource metadata document of a pool.
pub fn metadata(config: &AuthConfig) -> serde_json::Value {
    let mut v = serde_json::json!({
        "resource": config.resource,
        "authorization_servers": config.authorization_servers,
        "bearer_methods_supported": ["header"],
    });
    if !config.scopes_supported.is_empty() {
        v["scopes_supported"] = serde_json::json!(config.scopes_supported);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn bearer_tokens_are_read_strictly() {
        assert_eq!(bearer_token(b"Bearer abc.def-_~+/=="), Ok("abc.def-_~+/=="));
        assert_eq!(bearer_token(b"bearer x"), Ok("x"));
        assert!(bearer_token(b"Basic abc").is_err());
        assert!(bearer_token(b"Bearer").is_err());
        assert!(bearer_token(b"Bearer ").is_err());
        assert!(bearer_token(b"Bearer a b").is_err());
        assert!(bearer_token(b"Bearer a\"b").is_err());
        assert!(bearer_token("Bearer é".as_bytes()).is_err());
        assert!(bearer_token(&[b'B'; 5]).is_err());
    }

    #[test]
    fn signatures_cover_principal_scopes_and_time() {
        let s = signature(b"k".repeat(32).as_slice(), 100, "p", "a b");
        assert_eq!(s.len(), 64);
        assert_ne!(s, signature(b"k".repeat(32).as_slice(), 101, "p", "a b"));
        assert_ne!(s, signature(b"k".repeat(32).as_slice(), 100, "q", "a b"));
        assert_ne!(s, signature(b"k".repeat(32).as_slice(), 100, "p", "a"));
        assert_ne!(s, signature(b"j".repeat(32).as_slice(), 100, "p", "a b"));
    }

    #[test]
    fn principals_hash_their_header() {
        let p = Principal::new("jwt", "https://idp\nalice", "alice", vec![]);
        assert_eq!(
            URL_SAFE_NO_PAD.decode(&p.header).ok(),
            Some(b"jwt\nhttps://idp\nalice".to_vec())
        );
        assert_eq!(p.hash, hex(&Sha256::digest(p.header.as_bytes())));
        assert_ne!(
            p.hash,
            Principal::new("apikey", "alice", "alice", vec![]).hash,
            "an API key id never collides with a subject"
        );
    }

    proptest! {
        #[test]
        fn token_extraction_never_panics_and_never_yields_unsafe_bytes(
            v in proptest::collection::vec(any::<u8>(), 0..200),
        ) {
            if let Ok(t) = bearer_token(&v) {
                prop_assert!(!t.is_empty());
                prop_assert!(t.bytes().all(|b| b.is_ascii_graphic() && b != b'"' && b != b','));
            }
        }
    }
}
