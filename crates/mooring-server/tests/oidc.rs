//! OpenID Connect login through the HTTP routes, against a provider started in the test: the
//! browser is a plain HTTP client following the redirects by hand.

#[path = "support/oidc_provider.rs"]
mod oidc_provider;

use axum::response::{IntoResponse, Response};
use mooring_proto::ManualClock;
use mooring_server::config::OidcConfig;
use mooring_server::error::ServiceError;
use mooring_server::oidc::{oidc_routes, Oidc, OidcIdentity, OidcLogin, STATE_TTL_MS};
use oidc_provider::TestProvider;
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::sync::{Arc, Mutex};

const CLIENT_ID: &str = "mooring-test";
const CLIENT_SECRET: &str = "s3cret-client-secret";

/// Records who logged in and answers 200, as the accounts service would set a session.
#[derive(Default)]
struct FakeLogin {
    logins: Mutex<Vec<(OidcIdentity, String, String)>>,
}

#[async_trait::async_trait]
impl OidcLogin for FakeLogin {
    async fn login(
        &self,
        id: OidcIdentity,
        source: String,
        user_agent: String,
    ) -> Result<Response, ServiceError> {
        let body = json!({"subject": id.subject, "role": id.role});
        self.logins
            .lock()
            .expect("lock")
            .push((id, source, user_agent));
        Ok(axum::Json(body).into_response())
    }
}

struct Harness {
    provider: TestProvider,
    base: String,
    clock: Arc<ManualClock>,
    login: Arc<FakeLogin>,
    browser: reqwest::Client,
    server: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("time")
        .as_millis() as u64
}

/// The `[oidc]` table for a provider, with a secret file in `dir`.
fn config_for(provider: &TestProvider, redirect_url: String, dir: &std::path::Path) -> OidcConfig {
    let secret_file = dir.join("oidc-client-secret");
    std::fs::write(&secret_file, format!("{}\n", provider.client_secret)).expect("write secret");
    std::fs::set_permissions(&secret_file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let toml = format!(
        r#"
        issuer = "{}"
        client_id = "{}"
        client_secret_file = "{}"
        redirect_url = "{redirect_url}"
        scope_claim = "fleet_scope"
        [role_map]
        fleet-admins = "admin"
        ops = "operator"
        "#,
        provider.issuer,
        provider.client_id,
        secret_file.display()
    );
    toml::from_str(&toml).expect("oidc config")
}

async fn harness(customize: impl FnOnce(&mut OidcConfig)) -> Harness {
    let provider = TestProvider::start(CLIENT_ID, CLIENT_SECRET).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let mut config = config_for(
        &provider,
        format!("{base}/api/v1/auth/oidc/callback"),
        dir.path(),
    );
    customize(&mut config);
    let clock = Arc::new(ManualClock::new(now_ms()));
    let oidc = Oidc::new(&config, [7u8; 32], clock.clone())
        .await
        .expect("oidc");
    assert!(oidc.is_discovered());
    let login = Arc::new(FakeLogin::default());
    let app: axum::Router = oidc_routes(Arc::new(oidc), login.clone());
    let server = tokio::spawn(async move {
        axum::serve(listener, app).await.expect("serve");
    });
    // Plain HTTP only; reqwest is built without a default crypto provider.
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("tls")
    .with_root_certificates(rustls::RootCertStore::empty())
    .with_no_client_auth();
    let browser = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent("test-browser/1.0")
        .build()
        .expect("client");
    Harness {
        provider,
        base,
        clock,
        login,
        browser,
        server,
        _dir: dir,
    }
}

struct Started {
    authorize_url: String,
    /// `mooring_oidc=<sealed>`, as the browser would send it back.
    cookie: String,
    set_cookie: String,
}

impl Harness {
    async fn begin(&self, return_to: &str) -> Started {
        let resp = self
            .browser
            .get(format!("{}/api/v1/auth/oidc/login", self.base))
            .query(&[("return_to", return_to)])
            .send()
            .await
            .expect("login");
        assert_eq!(resp.status(), StatusCode::FOUND);
        let header = |name| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .expect("header")
                .to_owned()
        };
        let set_cookie = header(reqwest::header::SET_COOKIE);
        let cookie = set_cookie
            .split(';')
            .next()
            .expect("cookie pair")
            .to_owned();
        Started {
            authorize_url: header(reqwest::header::LOCATION),
            cookie,
            set_cookie,
        }
    }

    /// Follows the authorization URL to the provider; returns the callback URL it redirects to.
    async fn authorize(&self, started: &Started) -> reqwest::Url {
        let resp = self
            .browser
            .get(&started.authorize_url)
            .send()
            .await
            .expect("authorize");
        assert_eq!(resp.status(), StatusCode::FOUND, "{:?}", resp.text().await);
        let location = resp.headers()[reqwest::header::LOCATION]
            .to_str()
            .expect("location");
        reqwest::Url::parse(location).expect("callback url")
    }

    async fn callback(&self, url: &str, cookie: Option<&str>) -> (StatusCode, Value, Vec<String>) {
        let mut req = self.browser.get(url);
        if let Some(cookie) = cookie {
            req = req.header(reqwest::header::COOKIE, cookie);
        }
        let resp = req.send().await.expect("callback");
        let status = resp.status();
        let set_cookies = resp
            .headers()
            .get_all(reqwest::header::SET_COOKIE)
            .iter()
            .map(|v| v.to_str().expect("ascii").to_owned())
            .collect();
        let body = resp.json().await.expect("json body");
        (status, body, set_cookies)
    }

    /// The whole round trip: login → provider → callback with the cookie.
    async fn log_in(&self, return_to: &str) -> (StatusCode, Value) {
        let started = self.begin(return_to).await;
        let callback = self.authorize(&started).await;
        let (status, body, _) = self
            .callback(callback.as_str(), Some(&started.cookie))
            .await;
        (status, body)
    }

    fn logins(&self) -> Vec<(OidcIdentity, String, String)> {
        self.login.logins.lock().expect("lock").clone()
    }
}

fn error_code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("<none>")
}

fn with_query(url: &reqwest::Url, key: &str, value: &str) -> String {
    let mut url = url.clone();
    let pairs: Vec<(String, String)> = url
        .query_pairs()
        .filter(|(k, _)| k != key)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    url.query_pairs_mut()
        .clear()
        .extend_pairs(pairs)
        .append_pair(key, value);
    url.to_string()
}

#[tokio::test]
async fn login_round_trip_maps_role_scope_and_email() {
    let h = harness(|_| {}).await;
    h.provider.set_claims(json!({
        "sub": "ada-42",
        "mooring_role": ["ops", "fleet-admins", "unmapped"],
        "fleet_scope": "tag:site=berlin",
    }));
    let started = h.begin("/devices?tag=site%3Dberlin").await;
    for attribute in [
        "Path=/api/v1/auth/oidc",
        "Max-Age=600",
        "HttpOnly",
        "SameSite=Lax",
    ] {
        assert!(
            started.set_cookie.contains(attribute),
            "{attribute} in {}",
            started.set_cookie
        );
    }
    assert!(started.authorize_url.starts_with(&h.provider.issuer));
    assert!(started.authorize_url.contains("code_challenge_method=S256"));
    let callback = h.authorize(&started).await;
    let (status, body, set_cookies) = h.callback(callback.as_str(), Some(&started.cookie)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({"subject": "ada-42", "role": "admin"}));
    assert!(
        set_cookies
            .iter()
            .any(|c| c.starts_with("mooring_oidc=;") && c.contains("Max-Age=0")),
        "the state cookie is cleared: {set_cookies:?}"
    );
    let logins = h.logins();
    assert_eq!(logins.len(), 1);
    let (id, _source, user_agent) = &logins[0];
    assert_eq!(
        id,
        &OidcIdentity {
            issuer: h.provider.issuer.clone(),
            subject: "ada-42".to_owned(),
            email: "ada@example.com".to_owned(),
            email_verified: true,
            role: "admin".to_owned(),
            scope: Some("tag:site=berlin".to_owned()),
            return_to: "/devices?tag=site%3Dberlin".to_owned(),
        }
    );
    assert_eq!(user_agent, "test-browser/1.0");

    // The same callback again: the provider refuses the used code.
    let (status, body, _) = h.callback(callback.as_str(), Some(&started.cookie)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(error_code(&body), "oidc_code_rejected");
    assert_eq!(h.logins().len(), 1);
}

#[tokio::test]
async fn tampered_id_tokens_are_refused() {
    let h = harness(|_| {}).await;
    let past = now_ms() / 1000 - 3600;
    // (what, claims, flip the signature, what the message names)
    let cases = [
        (
            "signature",
            json!({"mooring_role": "ops"}),
            true,
            "signature",
        ),
        (
            "audience",
            json!({"mooring_role": "ops", "aud": "another-client"}),
            false,
            "audience",
        ),
        (
            "issuer",
            json!({"mooring_role": "ops", "iss": "http://127.0.0.1:1"}),
            false,
            "issuer",
        ),
        (
            "expired",
            json!({"mooring_role": "ops", "iat": past - 300, "exp": past}),
            false,
            "expired",
        ),
        (
            "nonce",
            json!({"mooring_role": "ops", "nonce": "not-this-login"}),
            false,
            "nonce",
        ),
        (
            "no nonce",
            json!({"mooring_role": "ops", "nonce": null}),
            false,
            "nonce",
        ),
    ];
    for (what, claims, flip, named) in cases {
        h.provider.set_claims(claims);
        h.provider.set_flip_signature(flip);
        let (status, body) = h.log_in("/").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}: {body}");
        assert_eq!(error_code(&body), "oidc_token_invalid", "{what}: {body}");
        let message = body["error"]["message"].as_str().expect("message");
        assert!(message.contains(named), "{what}: {message}");
    }
    assert!(h.logins().is_empty());

    // The same provider, untampered, works.
    h.provider.set_claims(json!({"mooring_role": "ops"}));
    h.provider.set_flip_signature(false);
    let (status, body) = h.log_in("/").await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test]
async fn state_mismatch_missing_or_forged_state_is_refused() {
    let h = harness(|_| {}).await;
    h.provider.set_claims(json!({"mooring_role": "ops"}));
    let started = h.begin("/").await;
    let callback = h.authorize(&started).await;

    let (status, body, _) = h
        .callback(
            &with_query(&callback, "state", "attacker-state"),
            Some(&started.cookie),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error_code(&body), "oidc_state_mismatch");

    let (status, body, _) = h.callback(callback.as_str(), None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error_code(&body), "oidc_state_missing");

    // One hex digit of the sealed state changed.
    let mut forged = started.cookie.clone().into_bytes();
    let last = forged.len() - 1;
    forged[last] = if forged[last] == b'0' { b'1' } else { b'0' };
    let forged = String::from_utf8(forged).expect("ascii");
    let (status, body, _) = h.callback(callback.as_str(), Some(&forged)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error_code(&body), "oidc_state_invalid");

    // Another login's cookie with this login's state.
    let other = h.begin("/").await;
    let (status, body, _) = h.callback(callback.as_str(), Some(&other.cookie)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error_code(&body), "oidc_state_mismatch");

    // None of it spent the code: the right state and cookie still log in.
    let (status, body, _) = h.callback(callback.as_str(), Some(&started.cookie)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(h.logins().len(), 1);
}

#[tokio::test]
async fn state_older_than_ten_minutes_is_refused() {
    let h = harness(|_| {}).await;
    h.provider.set_claims(json!({"mooring_role": "ops"}));
    let started = h.begin("/").await;
    let callback = h.authorize(&started).await;
    h.clock.advance_ms(STATE_TTL_MS + 1);
    let (status, body, _) = h.callback(callback.as_str(), Some(&started.cookie)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(error_code(&body), "oidc_state_expired");
    assert!(h.logins().is_empty());
}

#[tokio::test]
async fn injected_code_fails_pkce_at_the_provider() {
    let h = harness(|_| {}).await;
    h.provider.set_claims(json!({"mooring_role": "ops"}));
    // The attacker's own login gives a code bound to the attacker's PKCE challenge ...
    let attacker = h.begin("/").await;
    let attacker_callback = h.authorize(&attacker).await;
    let attacker_code = attacker_callback
        .query_pairs()
        .find(|(k, _)| k == "code")
        .expect("code")
        .1
        .into_owned();
    // ... injected into the victim's callback, with the victim's state and cookie.
    let victim = h.begin("/").await;
    let victim_callback = h.authorize(&victim).await;
    let injected = with_query(&victim_callback, "code", &attacker_code);
    let (status, body, _) = h.callback(&injected, Some(&victim.cookie)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(error_code(&body), "oidc_code_rejected");
    assert!(
        body["error"]["message"]
            .as_str()
            .expect("message")
            .contains("invalid_grant"),
        "{body}"
    );
    assert_eq!(h.provider.token_errors(), ["invalid_grant"]);
    assert!(h.logins().is_empty());
}

#[tokio::test]
async fn unmapped_role_is_refused_without_a_default_role() {
    let h = harness(|_| {}).await;
    for claims in [
        json!({"mooring_role": "interns"}),
        json!({"mooring_role": ["interns", 7]}),
        json!({}),
    ] {
        h.provider.set_claims(claims.clone());
        let (status, body) = h.log_in("/").await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{claims}: {body}");
        assert_eq!(error_code(&body), "oidc_no_role", "{claims}");
    }
    assert!(h.logins().is_empty());
}

#[tokio::test]
async fn unmapped_role_gets_the_default_role() {
    let h = harness(|c| c.default_role = Some("viewer".to_owned())).await;
    h.provider.set_claims(json!({"mooring_role": "interns"}));
    let (status, body) = h.log_in("/").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(h.logins()[0].0.role, "viewer");
    assert_eq!(h.logins()[0].0.scope, None);
}

#[tokio::test]
async fn unverified_or_missing_email_and_bad_scope_are_refused() {
    let h = harness(|_| {}).await;
    let cases = [
        (
            json!({"mooring_role": "ops", "email_verified": false}),
            "oidc_email_unverified",
        ),
        (
            json!({"mooring_role": "ops", "email": null}),
            "oidc_email_missing",
        ),
        (
            json!({"mooring_role": "ops", "fleet_scope": "tag:=="}),
            "oidc_scope_invalid",
        ),
        (
            json!({"mooring_role": "ops", "fleet_scope": ["tag:a=b"]}),
            "oidc_scope_invalid",
        ),
    ];
    for (claims, code) in cases {
        h.provider.set_claims(claims.clone());
        let (status, body) = h.log_in("/").await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{claims}: {body}");
        assert_eq!(error_code(&body), code, "{claims}");
    }
    assert!(h.logins().is_empty());
}

#[tokio::test]
async fn custom_email_and_role_claims() {
    let h = harness(|c| {
        c.email_claim = "upn".to_owned();
        c.role_claim = "groups".to_owned();
    })
    .await;
    h.provider.set_claims(json!({
        "email": null,
        "email_verified": null,
        "upn": "grace@corp.example",
        "groups": "ops",
    }));
    let (status, body) = h.log_in("/").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let id = &h.logins()[0].0;
    assert_eq!(id.email, "grace@corp.example");
    assert_eq!(id.role, "operator");
}

#[tokio::test]
async fn open_redirect_return_to_is_refused() {
    let h = harness(|_| {}).await;
    for bad in [
        "//evil.example/",
        "https://evil.example/",
        "/\\evil.example",
        "\\\\evil.example",
        "/\t/evil.example",
        "evil.example",
    ] {
        let resp = h
            .browser
            .get(format!("{}/api/v1/auth/oidc/login", h.base))
            .query(&[("return_to", bad)])
            .send()
            .await
            .expect("login");
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{bad:?}");
        assert!(resp.headers().get(reqwest::header::SET_COOKIE).is_none());
        assert!(resp.headers().get(reqwest::header::LOCATION).is_none());
        let body: Value = resp.json().await.expect("json");
        assert_eq!(error_code(&body), "oidc_invalid_return_to", "{bad:?}");
    }
}

#[tokio::test]
async fn provider_error_on_callback_is_reported() {
    let h = harness(|_| {}).await;
    let started = h.begin("/").await;
    let (status, body, _) = h
        .callback(
            &format!(
                "{}/api/v1/auth/oidc/callback?error=access_denied&error_description=%3Cb%3Eno%3C%2Fb%3E&state=x",
                h.base
            ),
            Some(&started.cookie),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(error_code(&body), "oidc_provider_denied");
    assert!(!body.to_string().contains("<b>"), "{body}");
}

#[tokio::test]
async fn provider_down_at_callback_is_unavailable() {
    let mut h = harness(|_| {}).await;
    h.provider.set_claims(json!({"mooring_role": "ops"}));
    let started = h.begin("/").await;
    let callback = h.authorize(&started).await;
    h.provider.stop().await;
    let (status, body, _) = h.callback(callback.as_str(), Some(&started.cookie)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(error_code(&body), "oidc_provider_unavailable");
    let text = body.to_string();
    assert!(
        !text.contains(CLIENT_SECRET) && !text.contains("127.0.0.1"),
        "{text}"
    );
}

#[tokio::test]
async fn provider_down_at_start_does_not_stop_the_server() {
    let mut provider = TestProvider::start(CLIENT_ID, CLIENT_SECRET).await;
    provider.stop().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config_for(
        &provider,
        "http://127.0.0.1:8080/api/v1/auth/oidc/callback".to_owned(),
        dir.path(),
    );
    let clock = Arc::new(ManualClock::new(now_ms()));
    let oidc = Oidc::new(&config, [1u8; 32], clock.clone())
        .await
        .expect("starts without the provider");
    assert!(!oidc.is_discovered());
    let err = oidc.begin("/").await.expect_err("no provider");
    assert_eq!(err.code(), "oidc_provider_unavailable");
    // Still down after the retry interval: tried again, still unavailable.
    clock.advance_ms(mooring_server::oidc::DISCOVERY_RETRY_MS);
    let err = oidc.begin("/").await.expect_err("no provider");
    assert_eq!(err.code(), "oidc_provider_unavailable");
}

#[tokio::test]
async fn client_secret_file_readable_by_others_is_refused() {
    let provider = TestProvider::start(CLIENT_ID, CLIENT_SECRET).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config_for(
        &provider,
        "http://127.0.0.1:8080/api/v1/auth/oidc/callback".to_owned(),
        dir.path(),
    );
    let path = config.client_secret_file.clone().expect("file");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let clock = Arc::new(ManualClock::new(now_ms()));
    let err = Oidc::new(&config, [1u8; 32], clock)
        .await
        .err()
        .expect("refused");
    let text = format!("{err:#}");
    assert!(text.contains("chmod 600"), "{text}");
    assert!(!text.contains(CLIENT_SECRET), "{text}");
}

#[test]
fn role_map_defaults() {
    let c: OidcConfig = toml::from_str(
        r#"
        issuer = "https://id.example.com/realms/fleet"
        client_id = "mooring"
        redirect_url = "https://mooring.example.com/api/v1/auth/oidc/callback"
        default_role = "viewer"
        "#,
    )
    .expect("parse");
    assert_eq!(c.scopes, ["openid", "email", "profile"]);
    assert_eq!(c.role_claim, "mooring_role");
    assert_eq!(c.email_claim, "email");
    assert_eq!(c.role_map, BTreeMap::new());
    c.validate().expect("valid");
}
