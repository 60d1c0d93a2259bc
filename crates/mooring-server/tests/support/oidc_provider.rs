//! A small OpenID provider for tests: discovery, JWKS (an ES256 key made per provider),
//! `/authorize` (approves at once), `/token` (checks code, PKCE verifier, client credentials).
//!
//! Include it with `#[path = ".../mooring-server/tests/support/oidc_provider.rs"] mod
//! oidc_provider;` (it needs axum, reqwest, ring, serde_json and tokio). The ID token's claims
//! are set per test through [`TestProvider::set_claims`] (merged over the defaults: `iss`,
//! `sub`, `aud`, `iat`, `exp`, `nonce`, `email`, `email_verified`; a `null` removes one);
//! [`TestProvider::set_flip_signature`] corrupts the signature.
#![allow(dead_code)]

use axum::extract::{Form, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

/// Most codes a provider holds (tests make a handful).
const CODES_MAX: usize = 1000;

pub struct TestProvider {
    pub addr: SocketAddr,
    /// `http://127.0.0.1:<port>`, the issuer.
    pub issuer: String,
    pub client_id: String,
    pub client_secret: String,
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

struct Shared {
    issuer: String,
    client_id: String,
    client_secret: String,
    key: EcdsaKeyPair,
    kid: String,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    codes: HashMap<String, Grant>,
    claims: Map<String, Value>,
    flip_signature: bool,
    /// Every `/token` request's outcome, for assertions.
    token_errors: Vec<String>,
}

struct Grant {
    challenge: String,
    nonce: String,
    redirect_uri: String,
}

impl TestProvider {
    /// Starts a provider on 127.0.0.1:0 knowing one client.
    pub async fn start(client_id: &str, client_secret: &str) -> TestProvider {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind provider");
        let addr = listener.local_addr().expect("addr");
        let issuer = format!("http://{addr}");
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .expect("generate P-256 key");
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .expect("parse P-256 key");
        let shared = Arc::new(Shared {
            issuer: issuer.clone(),
            client_id: client_id.to_owned(),
            client_secret: client_secret.to_owned(),
            key,
            kid: "test-key-1".to_owned(),
            inner: Mutex::new(Inner::default()),
        });
        let app = Router::new()
            .route("/.well-known/openid-configuration", get(discovery))
            .route("/jwks", get(jwks))
            .route("/authorize", get(authorize))
            .route("/token", post(token))
            .with_state(shared.clone());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await
                .expect("provider serve");
        });
        TestProvider {
            addr,
            issuer,
            client_id: client_id.to_owned(),
            client_secret: client_secret.to_owned(),
            shared,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Claims merged over the defaults of every ID token issued from now on.
    pub fn set_claims(&self, claims: Value) {
        let Value::Object(map) = claims else {
            panic!("claims must be a JSON object")
        };
        self.shared.inner.lock().expect("lock").claims = map;
    }

    /// Flip one bit of the signature of every ID token issued from now on.
    pub fn set_flip_signature(&self, flip: bool) {
        self.shared.inner.lock().expect("lock").flip_signature = flip;
    }

    /// The errors `/token` answered, in order.
    pub fn token_errors(&self) -> Vec<String> {
        self.shared.inner.lock().expect("lock").token_errors.clone()
    }

    /// Stops serving: afterwards connections to it are refused.
    pub async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("provider task");
        }
    }
}

impl Drop for TestProvider {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

async fn discovery(State(s): State<Arc<Shared>>) -> Json<Value> {
    let i = &s.issuer;
    Json(json!({
        "issuer": i,
        "authorization_endpoint": format!("{i}/authorize"),
        "token_endpoint": format!("{i}/token"),
        "jwks_uri": format!("{i}/jwks"),
        "response_types_supported": ["code"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["ES256"],
        "token_endpoint_auth_methods_supported": ["client_secret_post"],
        "code_challenge_methods_supported": ["S256"],
        "scopes_supported": ["openid", "email", "profile"],
    }))
}

async fn jwks(State(s): State<Arc<Shared>>) -> Json<Value> {
    let public = s.key.public_key().as_ref();
    assert_eq!(public.len(), 65, "uncompressed P-256 point");
    Json(json!({"keys": [{
        "kty": "EC",
        "crv": "P-256",
        "use": "sig",
        "alg": "ES256",
        "kid": s.kid,
        "x": b64url(&public[1..33]),
        "y": b64url(&public[33..65]),
    }]}))
}

async fn authorize(
    State(s): State<Arc<Shared>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let param = |k: &str| q.get(k).cloned().unwrap_or_default();
    if param("client_id") != s.client_id
        || param("response_type") != "code"
        || param("code_challenge_method") != "S256"
        || param("code_challenge").is_empty()
        || !param("scope").split(' ').any(|s| s == "openid")
    {
        return (StatusCode::BAD_REQUEST, "bad authorization request").into_response();
    }
    let code = format!("code-{:032x}", rand_u128());
    let redirect_uri = param("redirect_uri");
    {
        let mut inner = s.inner.lock().expect("lock");
        assert!(inner.codes.len() < CODES_MAX, "too many codes");
        inner.codes.insert(
            code.clone(),
            Grant {
                challenge: param("code_challenge"),
                nonce: param("nonce"),
                redirect_uri: redirect_uri.clone(),
            },
        );
    }
    let mut target = reqwest::Url::parse(&redirect_uri).expect("redirect_uri");
    target
        .query_pairs_mut()
        .append_pair("code", &code)
        .append_pair("state", &param("state"));
    (StatusCode::FOUND, [(header::LOCATION, target.to_string())]).into_response()
}

fn token_error(s: &Shared, error: &str) -> Response {
    s.inner
        .lock()
        .expect("lock")
        .token_errors
        .push(error.to_owned());
    (
        StatusCode::BAD_REQUEST,
        Json(json!({"error": error, "error_description": format!("test provider: {error}")})),
    )
        .into_response()
}

async fn token(State(s): State<Arc<Shared>>, Form(f): Form<HashMap<String, String>>) -> Response {
    let param = |k: &str| f.get(k).cloned().unwrap_or_default();
    if param("client_id") != s.client_id || param("client_secret") != s.client_secret {
        return token_error(&s, "invalid_client");
    }
    if param("grant_type") != "authorization_code" {
        return token_error(&s, "unsupported_grant_type");
    }
    // A code is used once.
    let Some(grant) = s.inner.lock().expect("lock").codes.remove(&param("code")) else {
        return token_error(&s, "invalid_grant");
    };
    if param("redirect_uri") != grant.redirect_uri {
        return token_error(&s, "invalid_grant");
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, param("code_verifier").as_bytes());
    if b64url(digest.as_ref()) != grant.challenge {
        return token_error(&s, "invalid_grant");
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("time")
        .as_secs();
    let mut claims = json!({
        "iss": s.issuer,
        "sub": "user-1",
        "aud": s.client_id,
        "iat": now,
        "exp": now + 300,
        "nonce": grant.nonce,
        "email": "ada@example.com",
        "email_verified": true,
    })
    .as_object()
    .cloned()
    .expect("object");
    let flip = {
        let inner = s.inner.lock().expect("lock");
        for (k, v) in &inner.claims {
            if v.is_null() {
                claims.remove(k);
            } else {
                claims.insert(k.clone(), v.clone());
            }
        }
        inner.flip_signature
    };
    let id_token = sign_jwt(&s, &Value::Object(claims), flip);
    Json(json!({
        "access_token": format!("at-{:032x}", rand_u128()),
        "token_type": "Bearer",
        "expires_in": 300,
        "id_token": id_token,
    }))
    .into_response()
}

fn sign_jwt(s: &Shared, claims: &Value, flip: bool) -> String {
    let header = json!({"alg": "ES256", "typ": "JWT", "kid": s.kid});
    let signing_input = format!(
        "{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes())
    );
    let rng = ring::rand::SystemRandom::new();
    let sig = s
        .key
        .sign(&rng, signing_input.as_bytes())
        .expect("sign ES256");
    let mut sig = sig.as_ref().to_vec();
    if flip {
        sig[10] ^= 0x01;
    }
    format!("{signing_input}.{}", b64url(&sig))
}

fn rand_u128() -> u128 {
    let mut b = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).expect("random");
    u128::from_le_bytes(b)
}

/// Base64url without padding (RFC 7515 §2).
pub fn b64url(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

#[cfg(test)]
mod b64_tests {
    #[test]
    fn b64url_matches_rfc4648_vectors() {
        assert_eq!(super::b64url(b""), "");
        assert_eq!(super::b64url(b"f"), "Zg");
        assert_eq!(super::b64url(b"fo"), "Zm8");
        assert_eq!(super::b64url(b"foo"), "Zm9v");
        assert_eq!(super::b64url(b"foob"), "Zm9vYg");
        assert_eq!(super::b64url(&[0xfb, 0xff]), "-_8");
    }
}
