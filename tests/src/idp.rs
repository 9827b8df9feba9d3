//! A test identity provider: real RSA, EC and Ed25519 keys made by `openssl`, a JWKS served
//! over HTTP on a free port (its key set can change, as a rotating provider's does), and
//! tokens signed with `jsonwebtoken`. Also the hostile tokens of the JWT corpus.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, bail};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use crate::TempDir;

pub struct Idp {
    pub port: u16,
    pub issuer: String,
    /// The RSA public key of `rsa-1` as PEM, for the HS256 key-confusion token.
    pub rsa_public_pem: Vec<u8>,
    /// How many times the JWKS was fetched.
    pub fetches: Arc<AtomicUsize>,
    keys: HashMap<String, (EncodingKey, Algorithm, Jwk)>,
    published: Arc<Mutex<Vec<Jwk>>>,
    task: tokio::task::JoinHandle<()>,
    _dir: TempDir,
}

impl Drop for Idp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn openssl(args: &[&str]) -> Result<()> {
    let out = tokio::process::Command::new("openssl")
        .args(args)
        .output()
        .await
        .context("run openssl")?;
    if !out.status.success() {
        bail!("openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

impl Idp {
    /// Makes keys `rsa-1`, `rsa-2`, `ec-1` and `ed-1`, publishes `rsa-1`, `ec-1` and `ed-1`,
    /// and serves the JWKS at [`Idp::jwks_url`].
    pub async fn start() -> Result<Self> {
        let dir = TempDir::new("idp");
        let path = |name: &str| dir.0.join(name).display().to_string();
        let mut keys = HashMap::new();
        for (kid, alg, args) in [
            (
                "rsa-1",
                Algorithm::RS256,
                vec!["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
            ),
            (
                "rsa-2",
                Algorithm::RS256,
                vec!["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
            ),
            (
                "ec-1",
                Algorithm::ES256,
                vec!["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
            ),
            ("ed-1", Algorithm::EdDSA, vec!["-algorithm", "ED25519"]),
        ] {
            let file = path(&format!("{kid}.pem"));
            let mut a = vec!["genpkey"];
            a.extend(args);
            a.extend(["-out", &file]);
            openssl(&a).await?;
            let pem = std::fs::read(&file)?;
            let key = match alg {
                Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem)?,
                Algorithm::ES256 => EncodingKey::from_ec_pem(&pem)?,
                _ => EncodingKey::from_ed_pem(&pem)?,
            };
            let mut jwk = Jwk::from_encoding_key(&key, alg)?;
            jwk.common.key_id = Some(kid.to_owned());
            keys.insert(kid.to_owned(), (key, alg, jwk));
        }
        let public = path("rsa-1.pub.pem");
        openssl(&[
            "pkey",
            "-in",
            &path("rsa-1.pem"),
            "-pubout",
            "-out",
            &public,
        ])
        .await?;
        let rsa_public_pem = std::fs::read(&public)?;

        let published = Arc::new(Mutex::new(
            ["rsa-1", "ec-1", "ed-1"]
                .iter()
                .filter_map(|k| keys.get(*k).map(|(_, _, j)| j.clone()))
                .collect::<Vec<_>>(),
        ));
        let fetches = Arc::new(AtomicUsize::new(0));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let (p, f) = (published.clone(), fetches.clone());
        let app = axum::Router::new().route(
            "/jwks",
            axum::routing::get(move || {
                let (p, f) = (p.clone(), f.clone());
                async move {
                    f.fetch_add(1, Ordering::SeqCst);
                    let keys = p.lock().map(|k| k.clone()).unwrap_or_default();
                    axum::Json(serde_json::to_value(JwkSet { keys }).unwrap_or_default())
                }
            }),
        );
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self {
            port,
            issuer: format!("http://127.0.0.1:{port}"),
            rsa_public_pem,
            fetches,
            keys,
            published,
            task,
            _dir: dir,
        })
    }

    pub fn jwks_url(&self) -> String {
        format!("http://127.0.0.1:{}/jwks", self.port)
    }

    /// Writes the published JWKS to `path` (for `jwks_file`).
    pub fn write_jwks(&self, path: &std::path::Path) -> Result<()> {
        let keys = self.published.lock().map(|k| k.clone()).unwrap_or_default();
        std::fs::write(path, serde_json::to_vec(&JwkSet { keys })?)?;
        Ok(())
    }

    /// Adds key `kid` to the published JWKS (a key rotation).
    pub fn publish(&self, kid: &str) {
        if let (Some((_, _, jwk)), Ok(mut p)) = (self.keys.get(kid), self.published.lock()) {
            p.push(jwk.clone());
        }
    }

    /// Claims valid for ten minutes from now.
    pub fn claims(&self, audience: &str, subject: &str, scope: &str) -> Value {
        let now = jsonwebtoken::get_current_timestamp();
        json!({"iss": self.issuer, "aud": audience, "sub": subject, "scope": scope,
               "iat": now, "nbf": now, "exp": now + 600})
    }

    /// A token signed with key `kid`.
    pub fn token(&self, kid: &str, claims: &Value) -> String {
        let Some((key, alg, _)) = self.keys.get(kid) else {
            return String::new();
        };
        let mut header = Header::new(*alg);
        header.kid = Some(kid.to_owned());
        jsonwebtoken::encode(&header, claims, key).unwrap_or_default()
    }
}

/// A token with `"alg": "none"` and no signature.
pub fn unsigned_token(claims: &Value) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
    let body = URL_SAFE_NO_PAD.encode(claims.to_string());
    format!("{header}.{body}.")
}

/// An HS256 token signed with `secret` (e.g. an RSA public key: the key-confusion attack).
pub fn hs256_token(secret: &[u8], kid: Option<&str>, claims: &Value) -> String {
    let mut header = Header::new(Algorithm::HS256);
    header.kid = kid.map(str::to_owned);
    EncodingKey::from_secret(secret)
        .ok()
        .and_then(|k| jsonwebtoken::encode(&header, claims, &k).ok())
        .unwrap_or_default()
}

/// `token` with the last character of its signature changed.
pub fn tampered(token: &str) -> String {
    let mut t = token.to_owned();
    let last = t.pop().unwrap_or('A');
    t.push(if last == 'A' { 'B' } else { 'A' });
    t
}
