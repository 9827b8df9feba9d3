//! Who is calling: the principal the edge proxy authenticated, passed on in signed headers.
//!
//! The backend does not authenticate clients itself. The proxy does (JWT, API key, ...) and
//! states the result in three headers, signed with a secret only the proxy and the backends
//! know (`principal_secret`):
//!
//! ```text
//! X-MCP-Principal: <base64url, no padding, of the UTF-8 principal, at most 1024 characters>
//! X-MCP-Principal-Scopes: <space-separated scope tokens>            (absent: no scopes)
//! X-MCP-Principal-Signature: t=<unix seconds>,v1=<lowercase hex HMAC-SHA256(secret,
//!                            "{t}\n{X-MCP-Principal value}\n{X-MCP-Principal-Scopes value or empty}")>
//! ```
//!
//! - Without a configured secret the headers are never trusted: every request is anonymous.
//! - With one, a request carrying `X-MCP-Principal` must carry a valid signature made at most
//!   `principal_max_skew_seconds` away from this replica's clock, or it is refused (401). The
//!   signature is checked before the time, so "stale" in the security log means an authentic
//!   but old (replayed, or clock-skewed) header set, "bad signature" a forgery or a wrong
//!   secret.
//! - A request without `X-MCP-Principal` is anonymous, or refused when `require_principal` is
//!   set.
//!
//! The verified [`Caller`] travels in the request's extensions (rmcp hands them to the
//! handler); the raw headers are removed, so nothing after the guard can trust them by mistake.
//! Sessions are bound to [`Principal::owner`], the SHA-256 of the header value: see
//! `sessions.md`.

use axum::http::HeaderMap;
use base64::Engine;
use hmac::{KeyInit, Mac};
use sha2::{Digest, Sha256};

use crate::config::Config;

/// The principal, base64url without padding.
pub const PRINCIPAL_HEADER: &str = "x-mcp-principal";
/// Space-separated scopes; may be absent.
pub const SCOPES_HEADER: &str = "x-mcp-principal-scopes";
/// `t=<unix seconds>,v1=<hex HMAC-SHA256>`.
pub const SIGNATURE_HEADER: &str = "x-mcp-principal-signature";
/// Longest accepted `X-MCP-Principal` value.
pub const MAX_PRINCIPAL_LEN: usize = 1024;
/// Longest accepted `X-MCP-Principal-Scopes` value.
pub const MAX_SCOPES_LEN: usize = 4096;
/// Longest accepted signature header (`t=` 20 digits, `v1=` 64 hex digits and slack).
const MAX_SIGNATURE_LEN: usize = 128;

type HmacSha256 = hmac::Hmac<Sha256>;

/// A principal whose headers carried a valid signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The principal as the proxy named it, e.g. `"https://issuer.example\nuser-42"`.
    pub name: String,
    /// Scope tokens, in header order.
    pub scopes: Vec<String>,
    /// Lowercase hex SHA-256 of the `X-MCP-Principal` value: what sessions are bound to.
    pub owner: String,
}

/// Who sent a request; the guard puts one in every MCP request's extensions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Caller {
    /// No (trusted) principal: no secret configured, or no `X-MCP-Principal` header.
    #[default]
    Anonymous,
    Principal(Principal),
}

impl Caller {
    /// The owner hash sessions of this caller carry; `None` for anonymous callers.
    pub fn owner(&self) -> Option<&str> {
        match self {
            Caller::Anonymous => None,
            Caller::Principal(p) => Some(&p.owner),
        }
    }
}

/// Why principal headers were refused. Never carries header values or the secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PrincipalError {
    #[error("principal required")]
    Missing,
    #[error("malformed principal headers: {0}")]
    Malformed(&'static str),
    #[error("bad signature")]
    BadSignature,
    #[error("signature time outside the allowed skew")]
    Stale,
}

/// Checks principal headers against the shared secret. Built once per replica.
pub struct Verifier {
    /// The keyed MAC, cloned per request (saves hashing the key every time).
    mac: HmacSha256,
    max_skew_seconds: u64,
    required: bool,
}

impl Verifier {
    /// The verifier for `config`; `None` when no secret is configured (headers are ignored).
    pub fn from_config(config: &Config) -> Option<Self> {
        let secret = config.principal_secret.as_ref()?;
        Self::new(
            secret.expose(),
            config.principal_max_skew.as_secs(),
            config.require_principal,
        )
    }

    /// A verifier for `secret` (HMAC accepts keys of any length, so this is `Some`).
    pub fn new(secret: &[u8], max_skew_seconds: u64, required: bool) -> Option<Self> {
        Some(Self {
            mac: <HmacSha256 as KeyInit>::new_from_slice(secret).ok()?,
            max_skew_seconds,
            required,
        })
    }

    /// The caller of a request whose headers are `headers`, at `now` (Unix seconds).
    pub fn verify(&self, headers: &HeaderMap, now: u64) -> Result<Caller, PrincipalError> {
        let Some(principal) = single(headers, PRINCIPAL_HEADER)? else {
            return if self.required {
                Err(PrincipalError::Missing)
            } else {
                Ok(Caller::Anonymous)
            };
        };
        let name = decode_principal(principal)?;
        let scopes = single(headers, SCOPES_HEADER)?.unwrap_or("");
        if scopes.len() > MAX_SCOPES_LEN {
            return Err(PrincipalError::Malformed("scopes too long"));
        }
        let signature = single(headers, SIGNATURE_HEADER)?
            .ok_or(PrincipalError::Malformed("signature missing"))?;
        let (t, tag) = parse_signature(signature)?;
        let mut mac = self.mac.clone();
        mac.update(t.as_bytes());
        mac.update(b"\n");
        mac.update(principal.as_bytes());
        mac.update(b"\n");
        mac.update(scopes.as_bytes());
        mac.verify_slice(&tag)
            .map_err(|_| PrincipalError::BadSignature)?;
        let t: u64 = t
            .parse()
            .map_err(|_| PrincipalError::Malformed("t is not a number"))?;
        if now.abs_diff(t) > self.max_skew_seconds {
            return Err(PrincipalError::Stale);
        }
        Ok(Caller::Principal(Principal {
            name,
            scopes: scopes.split_ascii_whitespace().map(str::to_owned).collect(),
            owner: owner_of(principal),
        }))
    }
}

/// The caller of a request: anonymous without a verifier (the headers are not trusted).
pub fn caller(
    verifier: Option<&Verifier>,
    headers: &HeaderMap,
    now: u64,
) -> Result<Caller, PrincipalError> {
    match verifier {
        Some(v) => v.verify(headers, now),
        None => Ok(Caller::Anonymous),
    }
}

/// Removes the principal headers, so nothing after the guard reads unverified values.
pub fn strip(headers: &mut HeaderMap) {
    headers.remove(PRINCIPAL_HEADER);
    headers.remove(SCOPES_HEADER);
    headers.remove(SIGNATURE_HEADER);
}

/// The owner hash of an `X-MCP-Principal` value: lowercase hex SHA-256.
pub fn owner_of(principal_header: &str) -> String {
    hex(&Sha256::digest(principal_header.as_bytes()))
}

/// The `X-MCP-Principal-Signature` value the proxy sends for these header values at `t`.
pub fn sign(secret: &[u8], t: u64, principal_header: &str, scopes_header: &str) -> String {
    let Ok(mut mac) = <HmacSha256 as KeyInit>::new_from_slice(secret) else {
        return String::new();
    };
    mac.update(format!("{t}\n{principal_header}\n{scopes_header}").as_bytes());
    format!("t={t},v1={}", hex(&mac.finalize().into_bytes()))
}

/// The one value of `name` as text; `Err` when repeated or not visible ASCII.
fn single<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, PrincipalError> {
    let mut values = headers.get_all(name).iter();
    let Some(first) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(PrincipalError::Malformed("repeated header"));
    }
    first
        .to_str()
        .map(Some)
        .map_err(|_| PrincipalError::Malformed("header is not visible ASCII"))
}

/// Checks and decodes `X-MCP-Principal`: canonical base64url without padding of UTF-8 text.
fn decode_principal(value: &str) -> Result<String, PrincipalError> {
    if value.is_empty() || value.len() > MAX_PRINCIPAL_LEN {
        return Err(PrincipalError::Malformed("principal empty or too long"));
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(PrincipalError::Malformed("principal is not base64url"));
    }
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(value)
        .map_err(|_| PrincipalError::Malformed("principal is not base64url"))?;
    String::from_utf8(bytes).map_err(|_| PrincipalError::Malformed("principal is not UTF-8"))
}

/// Splits `t=<digits>,v1=<64 lowercase hex>` into the time text and the tag.
fn parse_signature(value: &str) -> Result<(&str, [u8; 32]), PrincipalError> {
    if value.len() > MAX_SIGNATURE_LEN {
        return Err(PrincipalError::Malformed("signature too long"));
    }
    let (mut t, mut v1) = (None, None);
    for part in value.split(',') {
        match part.split_once('=') {
            Some(("t", v)) if t.is_none() => t = Some(v),
            Some(("v1", v)) if v1.is_none() => v1 = Some(v),
            _ => return Err(PrincipalError::Malformed("signature is not t=..,v1=..")),
        }
    }
    let t = t.ok_or(PrincipalError::Malformed("signature has no t"))?;
    if t.is_empty() || t.len() > 20 || !t.bytes().all(|b| b.is_ascii_digit()) {
        return Err(PrincipalError::Malformed("t is not a number"));
    }
    let tag = v1.and_then(unhex).ok_or(PrincipalError::Malformed(
        "v1 is not 64 lowercase hex digits",
    ))?;
    Ok((t, tag))
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

/// 32 bytes from exactly 64 lowercase hex digits.
fn unhex(text: &str) -> Option<[u8; 32]> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let bytes = text.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::{HeaderName, HeaderValue};

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";
    const NOW: u64 = 1_800_000_000;

    fn b64(text: &str) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text)
    }

    fn verifier(required: bool) -> Verifier {
        Verifier::new(SECRET, 300, required).unwrap_or_else(|| panic!("hmac takes any key"))
    }

    /// Headers as the proxy sends them: `sign` with `secret` at `t` over these values.
    fn signed(secret: &[u8], t: u64, principal: &str, scopes: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        let signature = sign(secret, t, principal, scopes.unwrap_or(""));
        for (name, value) in [
            (PRINCIPAL_HEADER, Some(principal)),
            (SCOPES_HEADER, scopes),
            (SIGNATURE_HEADER, Some(signature.as_str())),
        ] {
            if let Some(v) = value.and_then(|v| HeaderValue::from_str(v).ok()) {
                h.insert(HeaderName::from_static(name), v);
            }
        }
        h
    }

    fn set(h: &mut HeaderMap, name: &'static str, value: &str) {
        if let Ok(v) = HeaderValue::from_str(value) {
            h.insert(HeaderName::from_static(name), v);
        }
    }

    #[test]
    fn a_signed_principal_is_accepted_with_its_scopes_and_owner() {
        let p = b64("https://issuer.example\nuser-42");
        let h = signed(SECRET, NOW, &p, Some("tools:read  tools:call"));
        let Ok(Caller::Principal(principal)) = verifier(false).verify(&h, NOW + 299) else {
            panic!("a valid signature within the skew must be accepted");
        };
        assert_eq!(principal.name, "https://issuer.example\nuser-42");
        assert_eq!(principal.scopes, ["tools:read", "tools:call"]);
        assert_eq!(principal.owner, owner_of(&p));
        assert_eq!(principal.owner.len(), 64, "owner is hex SHA-256");
        let no_scopes = signed(SECRET, NOW, &b64("apikey\nci-bot"), None);
        assert!(
            matches!(verifier(false).verify(&no_scopes, NOW), Ok(Caller::Principal(p)) if p.scopes.is_empty()),
            "absent scopes header = no scopes, signed as empty"
        );
    }

    #[test]
    fn the_signature_matches_the_documented_contract() {
        // HMAC-SHA256(key, "{t}\n{principal}\n{scopes}"), computed independently of `sign`.
        let mut mac = <HmacSha256 as KeyInit>::new_from_slice(b"k").unwrap_or_else(|_| panic!());
        mac.update(b"42\nYQ\ns1 s2");
        let expected = format!("t=42,v1={}", hex(&mac.finalize().into_bytes()));
        assert_eq!(sign(b"k", 42, "YQ", "s1 s2"), expected);
        // RFC 4231 test case 2 pins the HMAC itself.
        let mut mac = <HmacSha256 as KeyInit>::new_from_slice(b"Jefe").unwrap_or_else(|_| panic!());
        mac.update(b"what do ya want for nothing?");
        assert_eq!(
            hex(&mac.finalize().into_bytes()),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn wrong_secret_and_tampered_values_are_bad_signatures() {
        let p = b64("apikey\nci-bot");
        let v = verifier(false);
        let wrong = signed(b"another secret, also 32 bytes long", NOW, &p, Some("a"));
        assert_eq!(v.verify(&wrong, NOW), Err(PrincipalError::BadSignature));

        let mut principal = signed(SECRET, NOW, &p, Some("a"));
        set(&mut principal, PRINCIPAL_HEADER, &b64("apikey\nadmin"));
        assert_eq!(v.verify(&principal, NOW), Err(PrincipalError::BadSignature));

        let mut scopes = signed(SECRET, NOW, &p, Some("a"));
        set(&mut scopes, SCOPES_HEADER, "a admin");
        assert_eq!(v.verify(&scopes, NOW), Err(PrincipalError::BadSignature));

        let mut dropped = signed(SECRET, NOW, &p, Some("a"));
        dropped.remove(SCOPES_HEADER);
        assert_eq!(
            v.verify(&dropped, NOW),
            Err(PrincipalError::BadSignature),
            "removing the scopes header changes the signed text"
        );

        let mut time = signed(SECRET, NOW, &p, None);
        let tag = sign(SECRET, NOW, &p, "");
        set(
            &mut time,
            SIGNATURE_HEADER,
            &tag.replace(&NOW.to_string(), &(NOW + 1).to_string()),
        );
        assert_eq!(
            v.verify(&time, NOW),
            Err(PrincipalError::BadSignature),
            "t is signed"
        );
    }

    #[test]
    fn stale_and_future_times_are_refused() {
        let p = b64("apikey\nci-bot");
        let v = verifier(false);
        let at = |t| signed(SECRET, t, &p, None);
        assert!(
            v.verify(&at(NOW - 300), NOW).is_ok(),
            "the skew is inclusive"
        );
        assert!(
            v.verify(&at(NOW + 300), NOW).is_ok(),
            "the skew is inclusive"
        );
        assert_eq!(v.verify(&at(NOW - 301), NOW), Err(PrincipalError::Stale));
        assert_eq!(v.verify(&at(NOW + 301), NOW), Err(PrincipalError::Stale));
        assert_eq!(v.verify(&at(0), NOW), Err(PrincipalError::Stale));
    }

    #[test]
    fn malformed_headers_are_refused_never_anonymous() {
        let p = b64("apikey\nci-bot");
        let v = verifier(false);
        let good = sign(SECRET, NOW, &p, "");
        let tag = good
            .split_once(",v1=")
            .map(|(_, t)| t.to_owned())
            .unwrap_or_default();
        for bad in [
            String::new(),
            "garbage".to_owned(),
            format!("v1={tag}"),
            format!("t={NOW}"),
            format!("t={NOW},v1={}", tag.to_uppercase()),
            format!("t={NOW},v1={}", &tag[..62]),
            format!("t=-{NOW},v1={tag}"),
            format!("t={NOW} ,v1={tag}"),
            format!("t={NOW},v1={tag},v1={tag}"),
            format!("t={NOW},v1={tag},v2=00"),
            format!("t=99999999999999999999999,v1={tag}"),
        ] {
            let mut h = signed(SECRET, NOW, &p, None);
            set(&mut h, SIGNATURE_HEADER, &bad);
            assert!(
                matches!(v.verify(&h, NOW), Err(PrincipalError::Malformed(_))),
                "signature {bad:?} must be malformed"
            );
        }
        let mut missing = signed(SECRET, NOW, &p, None);
        missing.remove(SIGNATURE_HEADER);
        assert!(matches!(
            v.verify(&missing, NOW),
            Err(PrincipalError::Malformed(_))
        ));

        for principal in [
            format!("{p}="),
            "a+b/".to_owned(),
            "A".repeat(MAX_PRINCIPAL_LEN + 1),
            "eB".to_owned(), // "x" is "eA": non-zero trailing bits are not canonical
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode([0xff, 0xfe]),
        ] {
            let h = signed(SECRET, NOW, &principal, None);
            assert!(
                matches!(v.verify(&h, NOW), Err(PrincipalError::Malformed(_))),
                "principal {principal:?} must be malformed even when signed"
            );
        }
        let mut repeated = signed(SECRET, NOW, &p, None);
        if let Ok(v2) = HeaderValue::from_str(&p) {
            repeated.append(PRINCIPAL_HEADER, v2);
        }
        assert_eq!(
            v.verify(&repeated, NOW),
            Err(PrincipalError::Malformed("repeated header"))
        );
        let long_scopes = "s ".repeat(MAX_SCOPES_LEN);
        let h = signed(SECRET, NOW, &p, Some(&long_scopes));
        assert!(matches!(
            v.verify(&h, NOW),
            Err(PrincipalError::Malformed(_))
        ));
    }

    #[test]
    fn without_a_principal_header_the_caller_is_anonymous_unless_required() {
        let mut only_signature = HeaderMap::new();
        set(
            &mut only_signature,
            SIGNATURE_HEADER,
            &sign(SECRET, NOW, "", ""),
        );
        assert_eq!(
            verifier(false).verify(&only_signature, NOW),
            Ok(Caller::Anonymous)
        );
        assert_eq!(
            verifier(true).verify(&HeaderMap::new(), NOW),
            Err(PrincipalError::Missing)
        );
    }

    #[test]
    fn without_a_secret_principal_headers_are_ignored() {
        let h = signed(SECRET, NOW, &b64("apikey\nci-bot"), None);
        assert_eq!(caller(None, &h, NOW), Ok(Caller::Anonymous));
        let mut forged = h.clone();
        set(&mut forged, SIGNATURE_HEADER, "nonsense");
        assert_eq!(caller(None, &forged, NOW), Ok(Caller::Anonymous));
        strip(&mut forged);
        assert!(forged.is_empty(), "strip removes all three headers");
    }

    #[test]
    fn owners_are_lowercase_hex_sha256_of_the_header_value() {
        assert_eq!(
            owner_of("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            unhex(&owner_of("abc")).map(|b| hex(&b)),
            Some(owner_of("abc"))
        );
    }
}
