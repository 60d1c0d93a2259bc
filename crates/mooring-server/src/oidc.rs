//! OpenID Connect login: authorization code + PKCE, a sealed state cookie, ID token → identity.
//!
//! The flow, with no server-side storage (any node behind a load balancer can finish a login
//! another node began):
//!
//! ```text
//! GET /api/v1/auth/oidc/login?return_to=/devices
//!   -> Oidc::begin: random state, nonce, PKCE S256 verifier, sealed (AES-256-GCM, expiry inside)
//!   <- 302 to the provider's authorization endpoint + Set-Cookie mooring_oidc=<sealed> (10 min,
//!      HttpOnly, SameSite=Lax, Path=/api/v1/auth/oidc, Secure when redirect_url is https)
//! provider: the user logs in, the browser comes back with ?code=..&state=..
//! GET /api/v1/auth/oidc/callback?code=..&state=..  (+ the cookie)
//!   -> Oidc::finish: open the cookie, check expiry and state, exchange the code with the PKCE
//!      verifier, verify the ID token (JWKS signature, issuer, audience, nonce, expiry, at_hash),
//!      map its claims to an OidcIdentity (email, role, fleet scope)
//!   -> OidcLogin::login (the accounts service: create/link the user, set the session cookie)
//!   <- its response, plus the state cookie cleared
//! ```
//!
//! Discovery (`<issuer>/.well-known/openid-configuration` and its JWKS) is fetched by
//! [`Oidc::new`] within [`DISCOVERY_TIMEOUT`]; a provider that is down then does not stop the
//! server: the next login tries again (at most once per [`DISCOVERY_RETRY_MS`]), and meanwhile
//! logins answer `503 oidc_provider_unavailable`. An ID token signed with a key the cached JWKS
//! lacks (the provider rotated its keys) triggers one re-discovery, at most once per
//! [`JWKS_REFRESH_MIN_MS`].

use crate::config::OidcConfig;
use crate::error::{ErrorKind, ServiceError};
use crate::http::{ApiError, ApiQuery};
use anyhow::{anyhow, Context};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use mooring_proto::Clock;
use openidconnect::core::{
    CoreAuthDisplay, CoreAuthPrompt, CoreAuthenticationFlow, CoreClientAuthMethod,
    CoreErrorResponseType, CoreGenderClaim, CoreJsonWebKey, CoreJweContentEncryptionAlgorithm,
    CoreJwsSigningAlgorithm, CoreProviderMetadata, CoreRevocableToken, CoreRevocationErrorResponse,
    CoreTokenIntrospectionResponse, CoreTokenType,
};
use openidconnect::{
    AccessTokenHash, AdditionalClaims, AuthType, AuthorizationCode, Client, ClientId, ClientSecret,
    CsrfToken, EmptyExtraTokenFields, EndpointMaybeSet, EndpointNotSet, EndpointSet,
    HttpClientError, IdTokenFields, IssuerUrl, Nonce, OAuth2TokenResponse, PkceCodeChallenge,
    PkceCodeVerifier, RedirectUrl, RequestTokenError, Scope, StandardErrorResponse,
    StandardTokenResponse, TokenResponse,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// Role names, most privileged first (of several mapped claim values, the first here wins).
/// A `Role` enum in mooring-store replaces these strings when accounts land.
pub const ROLES: &[&str] = &["admin", "operator", "installer", "viewer", "service"];

/// How long a begun login may take before its state cookie is refused.
pub const STATE_TTL_MS: u64 = 10 * 60 * 1000;
/// The cookie carrying the sealed state through the browser.
pub const STATE_COOKIE: &str = "mooring_oidc";
/// The state cookie's path: only the OIDC routes ever see it.
pub const COOKIE_PATH: &str = "/api/v1/auth/oidc";
/// Login route: `GET ?return_to=/relative/path` → 302 to the provider.
pub const LOGIN_PATH: &str = "/api/v1/auth/oidc/login";
/// Callback route (the provider's redirect target, `[oidc] redirect_url`).
pub const CALLBACK_PATH: &str = "/api/v1/auth/oidc/callback";
/// Longest wait for one HTTP request to the provider.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for discovery (provider metadata, then its JWKS).
pub const DISCOVERY_TIMEOUT: Duration = Duration::from_secs(15);
/// After a failed discovery, logins fail fast for this long before the next attempt.
pub const DISCOVERY_RETRY_MS: u64 = 5_000;
/// An unknown signing key re-fetches the JWKS only if the cached one is at least this old.
pub const JWKS_REFRESH_MIN_MS: u64 = 60_000;
/// Longest `return_to`, in bytes.
pub const RETURN_TO_LEN_MAX: usize = 1024;
/// Longest `code`, `state` or state cookie accepted on the callback, in bytes.
pub const CALLBACK_PARAM_LEN_MAX: usize = 4096;
/// Longest `User-Agent` passed on to [`OidcLogin::login`], in bytes.
pub const USER_AGENT_LEN_MAX: usize = 512;

/// Who logged in, as the provider vouched for it; what [`OidcLogin::login`] gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OidcIdentity {
    /// The issuer URL (with `subject`, the stable key of the external account).
    pub issuer: String,
    pub subject: String,
    pub email: String,
    /// The provider said the address is verified (`email_verified: true` with the `email`
    /// claim); only then may the login be linked to an existing user by email.
    pub email_verified: bool,
    /// One of [`ROLES`].
    pub role: String,
    /// A fleet selector (mooring-proto `selector`) limiting the user, from `scope_claim`.
    pub scope: Option<String>,
    /// The relative path to send the browser to once logged in.
    pub return_to: String,
}

/// What turns a verified identity into a session (the accounts service): create or link the
/// user, set the session cookie, answer the browser (typically a redirect to `return_to`).
#[async_trait::async_trait]
pub trait OidcLogin: Send + Sync {
    async fn login(
        &self,
        id: OidcIdentity,
        source: String,
        user_agent: String,
    ) -> Result<Response, ServiceError>;
}

/// Why a login did not succeed. [`OidcError::code`] is stable; messages never carry secrets,
/// tokens or the provider's free text (that goes to the log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OidcError {
    /// `return_to` is not a relative path on this server.
    InvalidReturnTo,
    /// The callback lacks `code` or `state`, or a parameter is too long.
    InvalidRequest(&'static str),
    /// No state cookie (expired in the browser, or another browser).
    StateMissing,
    /// The state cookie does not open (forged, corrupted, or another key).
    StateInvalid,
    /// The login took longer than [`STATE_TTL_MS`].
    StateExpired,
    /// The `state` parameter is not the one this browser's login began with.
    StateMismatch,
    /// The provider sent the browser back with an error (e.g. `access_denied`).
    ProviderDenied(String),
    /// The provider refused the code (e.g. `invalid_grant`: used, expired, or PKCE mismatch).
    CodeRejected(String),
    /// The ID token failed verification; says which check.
    TokenInvalid(&'static str),
    /// The ID token has no e-mail address in `email_claim`.
    EmailMissing,
    /// The provider says the e-mail address is not verified.
    EmailUnverified,
    /// No claim value maps to a role and there is no `default_role`.
    NoRole,
    /// The `scope_claim` value is not a valid fleet selector.
    ScopeInvalid,
    /// The provider cannot be reached (discovery or token endpoint) or answered garbage.
    ProviderUnavailable,
    /// A failure on our side; the detail is in the log under this id.
    Internal(String),
}

impl OidcError {
    pub fn code(&self) -> &'static str {
        match self {
            OidcError::InvalidReturnTo => "oidc_invalid_return_to",
            OidcError::InvalidRequest(_) => "oidc_invalid_request",
            OidcError::StateMissing => "oidc_state_missing",
            OidcError::StateInvalid => "oidc_state_invalid",
            OidcError::StateExpired => "oidc_state_expired",
            OidcError::StateMismatch => "oidc_state_mismatch",
            OidcError::ProviderDenied(_) => "oidc_provider_denied",
            OidcError::CodeRejected(_) => "oidc_code_rejected",
            OidcError::TokenInvalid(_) => "oidc_token_invalid",
            OidcError::EmailMissing => "oidc_email_missing",
            OidcError::EmailUnverified => "oidc_email_unverified",
            OidcError::NoRole => "oidc_no_role",
            OidcError::ScopeInvalid => "oidc_scope_invalid",
            OidcError::ProviderUnavailable => "oidc_provider_unavailable",
            OidcError::Internal(_) => "internal",
        }
    }

    pub fn kind(&self) -> ErrorKind {
        match self {
            OidcError::InvalidReturnTo
            | OidcError::InvalidRequest(_)
            | OidcError::StateMissing
            | OidcError::StateInvalid
            | OidcError::StateExpired
            | OidcError::StateMismatch => ErrorKind::InvalidArgument,
            OidcError::ProviderDenied(_)
            | OidcError::CodeRejected(_)
            | OidcError::TokenInvalid(_) => ErrorKind::Unauthorized,
            OidcError::EmailMissing
            | OidcError::EmailUnverified
            | OidcError::NoRole
            | OidcError::ScopeInvalid => ErrorKind::Forbidden,
            OidcError::ProviderUnavailable => ErrorKind::Unavailable,
            OidcError::Internal(_) => ErrorKind::Internal,
        }
    }

    /// An internal failure: the detail to the log with a random id, only the id to the client.
    fn internal(detail: impl fmt::Display) -> Self {
        let id = format!("{:016x}", rand::random::<u64>());
        tracing::error!(error_id = %id, error = %detail, "OIDC internal error");
        OidcError::Internal(id)
    }
}

impl fmt::Display for OidcError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OidcError::InvalidReturnTo => write!(
                f,
                "return_to must be a path on this server, starting with a single '/' (no scheme, host, backslash or control character)"
            ),
            OidcError::InvalidRequest(what) => write!(f, "invalid login callback: {what}"),
            OidcError::StateMissing => write!(
                f,
                "no login in progress in this browser (the state cookie is missing); start the login again"
            ),
            OidcError::StateInvalid => {
                write!(f, "the login state cookie is not valid; start the login again")
            }
            OidcError::StateExpired => write!(
                f,
                "the login took longer than {} minutes; start the login again",
                STATE_TTL_MS / 60_000
            ),
            OidcError::StateMismatch => write!(
                f,
                "the state parameter does not match this browser's login; start the login again"
            ),
            OidcError::ProviderDenied(e) => write!(f, "the OpenID provider refused the login: {e}"),
            OidcError::CodeRejected(e) => write!(
                f,
                "the OpenID provider refused the authorization code ({e}); start the login again"
            ),
            OidcError::TokenInvalid(why) => write!(f, "the ID token is not valid: {why}"),
            OidcError::EmailMissing => {
                write!(f, "the OpenID provider did not send an e-mail address")
            }
            OidcError::EmailUnverified => write!(
                f,
                "the OpenID provider says this account's e-mail address is not verified"
            ),
            OidcError::NoRole => write!(
                f,
                "this account has no Mooring role: none of its role claim values is mapped; ask an administrator"
            ),
            OidcError::ScopeInvalid => write!(
                f,
                "this account's fleet scope claim is not a valid selector; ask an administrator"
            ),
            OidcError::ProviderUnavailable => write!(
                f,
                "the OpenID provider cannot be reached or answered unexpectedly; retry later"
            ),
            OidcError::Internal(id) => write!(f, "internal error; see server log, id {id}"),
        }
    }
}

impl std::error::Error for OidcError {}

impl From<OidcError> for ServiceError {
    fn from(e: OidcError) -> Self {
        ServiceError::new(e.kind(), e.code(), e.to_string())
    }
}

/// Every claim of the ID token beyond the standard ones (role, scope, custom e-mail claims).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct ExtraClaims {
    #[serde(flatten)]
    claims: serde_json::Map<String, serde_json::Value>,
}

impl AdditionalClaims for ExtraClaims {}

type OidcIdTokenFields = IdTokenFields<
    ExtraClaims,
    EmptyExtraTokenFields,
    CoreGenderClaim,
    CoreJweContentEncryptionAlgorithm,
    CoreJwsSigningAlgorithm,
>;

type OidcClient = Client<
    ExtraClaims,
    CoreAuthDisplay,
    CoreGenderClaim,
    CoreJweContentEncryptionAlgorithm,
    CoreJsonWebKey,
    CoreAuthPrompt,
    StandardErrorResponse<CoreErrorResponseType>,
    StandardTokenResponse<OidcIdTokenFields, CoreTokenType>,
    CoreTokenIntrospectionResponse,
    CoreRevocableToken,
    CoreRevocationErrorResponse,
    EndpointSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointMaybeSet,
    EndpointMaybeSet,
>;

/// ID token signature algorithms we accept: asymmetric only (no HMAC keyed by the client
/// secret, never `none`), intersected with what the provider announces.
const ALLOWED_ALGS: &[CoreJwsSigningAlgorithm] = &[
    CoreJwsSigningAlgorithm::RsaSsaPkcs1V15Sha256,
    CoreJwsSigningAlgorithm::RsaSsaPkcs1V15Sha384,
    CoreJwsSigningAlgorithm::RsaSsaPkcs1V15Sha512,
    CoreJwsSigningAlgorithm::RsaSsaPssSha256,
    CoreJwsSigningAlgorithm::RsaSsaPssSha384,
    CoreJwsSigningAlgorithm::RsaSsaPssSha512,
    CoreJwsSigningAlgorithm::EcdsaP256Sha256,
    CoreJwsSigningAlgorithm::EcdsaP384Sha384,
    CoreJwsSigningAlgorithm::EdDsa,
];

/// The provider as discovered: a client with its endpoints and JWKS.
struct Provider {
    client: OidcClient,
    algs: Vec<CoreJwsSigningAlgorithm>,
    fetched_ms: u64,
}

/// What survives the round trip through the browser, sealed in the state cookie.
#[derive(Serialize, Deserialize)]
struct SealedState {
    v: u32,
    state: String,
    nonce: String,
    pkce_verifier: String,
    return_to: String,
    expires_ms: u64,
}

/// Associated data of the sealed state: a blob sealed for anything else does not open here.
const STATE_AAD: &[u8] = b"mooring oidc state v1";

/// The OpenID Connect login service, built from `[oidc]`.
pub struct Oidc {
    issuer: IssuerUrl,
    client_id: ClientId,
    client_secret: Option<ClientSecret>,
    redirect: RedirectUrl,
    scopes: Vec<String>,
    role_claim: String,
    role_map: BTreeMap<String, String>,
    default_role: Option<String>,
    scope_claim: Option<String>,
    email_claim: String,
    /// `Secure` on the state cookie (the redirect URL is https).
    secure_cookie: bool,
    http: openidconnect::reqwest::Client,
    state_key: ring::aead::LessSafeKey,
    clock: Arc<dyn Clock>,
    provider: RwLock<Option<Arc<Provider>>>,
    /// Serializes discovery; holds when the last attempt failed.
    discovery: tokio::sync::Mutex<Option<u64>>,
}

impl Oidc {
    /// Builds the service from a validated `[oidc]` table. `state_key` seals the state cookie
    /// (the server derives it from its cluster key or a data-dir secret, the same on every
    /// node); a purpose-bound key is derived from it, so passing the cluster key is safe.
    /// Reads the client secret file (refused if others can read it) and tries discovery once
    /// within [`DISCOVERY_TIMEOUT`]; a provider that is down is only logged.
    pub async fn new(
        config: &OidcConfig,
        state_key: [u8; 32],
        clock: Arc<dyn Clock>,
    ) -> anyhow::Result<Oidc> {
        config.validate()?;
        let client_secret = match &config.client_secret_file {
            Some(path) => Some(ClientSecret::new(read_secret_file(path)?)),
            None => None,
        };
        let roots = match &config.ca_file {
            Some(path) => roots_from_file(path)?,
            None => system_roots(),
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("OIDC HTTPS client")?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let http = openidconnect::reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            // Following redirects would let a provider's answer point us anywhere (SSRF).
            .redirect(openidconnect::reqwest::redirect::Policy::none())
            .timeout(HTTP_TIMEOUT)
            .build()
            .context("OIDC HTTP client")?;
        let derive = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &state_key);
        let key_bytes = ring::hmac::sign(&derive, b"mooring oidc state key v1");
        let state_key = ring::aead::LessSafeKey::new(
            ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, key_bytes.as_ref())
                .map_err(|_| anyhow!("OIDC state key"))?,
        );
        let redirect = RedirectUrl::new(config.redirect_url.clone())
            .with_context(|| format!("oidc.redirect_url {:?}", config.redirect_url))?;
        let oidc = Oidc {
            issuer: IssuerUrl::new(config.issuer.clone())
                .with_context(|| format!("oidc.issuer {:?}", config.issuer))?,
            client_id: ClientId::new(config.client_id.clone()),
            client_secret,
            secure_cookie: redirect.url().scheme() == "https",
            redirect,
            scopes: config.scopes.clone(),
            role_claim: config.role_claim.clone(),
            role_map: config.role_map.clone(),
            default_role: config.default_role.clone(),
            scope_claim: config.scope_claim.clone(),
            email_claim: config.email_claim.clone(),
            http,
            state_key,
            clock,
            provider: RwLock::new(None),
            discovery: tokio::sync::Mutex::new(None),
        };
        if oidc.discover(false).await.is_err() {
            tracing::warn!(
                issuer = %oidc.issuer.as_str(),
                "OpenID provider unreachable at start; logins retry discovery"
            );
        }
        Ok(oidc)
    }

    /// Whether the provider's metadata and keys are loaded.
    pub fn is_discovered(&self) -> bool {
        self.cached().is_some()
    }

    /// Starts a login: the provider's authorization URL to redirect the browser to, and the
    /// sealed state to put in the [`STATE_COOKIE`] (see [`state_cookie`]).
    pub async fn begin(&self, return_to: &str) -> Result<(String, String), OidcError> {
        check_return_to(return_to)?;
        let provider = self.provider().await?;
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        let mut request = provider.client.authorize_url(
            CoreAuthenticationFlow::AuthorizationCode,
            CsrfToken::new_random,
            Nonce::new_random,
        );
        // `openid` is always sent by the client itself.
        for scope in self.scopes.iter().filter(|s| *s != "openid") {
            request = request.add_scope(Scope::new(scope.clone()));
        }
        let (url, state, nonce) = request.set_pkce_challenge(challenge).url();
        let sealed = SealedState {
            v: 1,
            state: state.secret().clone(),
            nonce: nonce.secret().clone(),
            pkce_verifier: verifier.secret().clone(),
            return_to: return_to.to_owned(),
            expires_ms: self.clock.now_ms() + STATE_TTL_MS,
        };
        Ok((url.to_string(), self.seal(&sealed)?))
    }

    /// Finishes a login: `code` and `state_param` from the callback's query, `state_blob`
    /// from the state cookie. Checks the state, exchanges the code (with the PKCE verifier),
    /// verifies the ID token and maps its claims.
    pub async fn finish(
        &self,
        code: &str,
        state_param: &str,
        state_blob: &str,
    ) -> Result<OidcIdentity, OidcError> {
        let sealed = self.open(state_blob)?;
        if self.clock.now_ms() > sealed.expires_ms {
            return Err(OidcError::StateExpired);
        }
        if !constant_time_eq(sealed.state.as_bytes(), state_param.as_bytes()) {
            return Err(OidcError::StateMismatch);
        }
        let provider = self.provider().await?;
        let response = provider
            .client
            .exchange_code(AuthorizationCode::new(code.to_owned()))
            .map_err(|e| {
                tracing::warn!(error = %e, "OpenID provider metadata has no token endpoint");
                OidcError::ProviderUnavailable
            })?
            .set_pkce_verifier(PkceCodeVerifier::new(sealed.pkce_verifier.clone()))
            .request_async(&self.http)
            .await
            .map_err(token_error)?;
        let id_token = response
            .id_token()
            .ok_or(OidcError::TokenInvalid("the provider sent no ID token"))?;
        let nonce = Nonce::new(sealed.nonce.clone());
        let access_token = response.access_token();
        let claims = match verify_id_token(&provider, id_token, &nonce, access_token) {
            Err(None)
                if self.clock.now_ms().saturating_sub(provider.fetched_ms)
                    >= JWKS_REFRESH_MIN_MS =>
            {
                // Signed with a key we do not know: the provider may have rotated its keys.
                // Fetch them again, once.
                let provider = self.discover(true).await?;
                verify_id_token(&provider, id_token, &nonce, access_token)
            }
            other => other,
        }
        .map_err(|e| e.unwrap_or(OidcError::TokenInvalid("signed with an unknown key")))?;
        self.identity(&claims, sealed.return_to)
    }

    fn identity(&self, claims: &Claims, return_to: String) -> Result<OidcIdentity, OidcError> {
        let extra = &claims.additional_claims().claims;
        let email = match self.email_claim.as_str() {
            "email" => claims.email().map(|e| e.as_str().to_owned()),
            "preferred_username" => claims.preferred_username().map(|u| u.as_str().to_owned()),
            name => extra.get(name).and_then(|v| v.as_str()).map(str::to_owned),
        }
        .filter(|e| !e.is_empty())
        .ok_or(OidcError::EmailMissing)?;
        if claims.email_verified() == Some(false) {
            return Err(OidcError::EmailUnverified);
        }
        let values: Vec<&str> = match extra.get(&self.role_claim) {
            Some(serde_json::Value::String(s)) => vec![s.as_str()],
            Some(serde_json::Value::Array(items)) => {
                items.iter().filter_map(|v| v.as_str()).collect()
            }
            _ => Vec::new(),
        };
        let role = ROLES
            .iter()
            .find(|role| {
                values
                    .iter()
                    .any(|v| self.role_map.get(*v).is_some_and(|r| r == *role))
            })
            .map(|r| (*r).to_owned())
            .or_else(|| self.default_role.clone())
            .ok_or(OidcError::NoRole)?;
        let scope = match self.scope_claim.as_ref().and_then(|c| extra.get(c)) {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(s)) => {
                mooring_proto::selector::Selector::parse(s).map_err(|_| OidcError::ScopeInvalid)?;
                Some(s.clone())
            }
            Some(_) => return Err(OidcError::ScopeInvalid),
        };
        Ok(OidcIdentity {
            issuer: claims.issuer().as_str().to_owned(),
            subject: claims.subject().as_str().to_owned(),
            email_verified: self.email_claim == "email" && claims.email_verified() == Some(true),
            email,
            role,
            scope,
            return_to,
        })
    }

    fn cached(&self) -> Option<Arc<Provider>> {
        self.provider
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    async fn provider(&self) -> Result<Arc<Provider>, OidcError> {
        match self.cached() {
            Some(p) => Ok(p),
            None => self.discover(false).await,
        }
    }

    /// Fetches the provider's metadata and JWKS (one at a time; after a failure, not again for
    /// [`DISCOVERY_RETRY_MS`]). `refresh`: replace a cached provider older than
    /// [`JWKS_REFRESH_MIN_MS`].
    async fn discover(&self, refresh: bool) -> Result<Arc<Provider>, OidcError> {
        let mut last_failure_ms = self.discovery.lock().await;
        let now = self.clock.now_ms();
        if let Some(p) = self.cached() {
            // Another login discovered while this one waited.
            if !refresh || now.saturating_sub(p.fetched_ms) < JWKS_REFRESH_MIN_MS {
                return Ok(p);
            }
        }
        if let Some(at) = *last_failure_ms {
            if now.saturating_sub(at) < DISCOVERY_RETRY_MS {
                return Err(OidcError::ProviderUnavailable);
            }
        }
        let fetched = tokio::time::timeout(
            DISCOVERY_TIMEOUT,
            CoreProviderMetadata::discover_async(self.issuer.clone(), &self.http),
        )
        .await;
        let metadata = match fetched {
            Ok(Ok(m)) => m,
            Ok(Err(e)) => {
                *last_failure_ms = Some(now);
                tracing::warn!(issuer = %self.issuer.as_str(), error = %error_chain(&e), "OIDC discovery failed");
                return Err(OidcError::ProviderUnavailable);
            }
            Err(_) => {
                *last_failure_ms = Some(now);
                tracing::warn!(issuer = %self.issuer.as_str(), "OIDC discovery timed out");
                return Err(OidcError::ProviderUnavailable);
            }
        };
        let algs: Vec<CoreJwsSigningAlgorithm> = metadata
            .id_token_signing_alg_values_supported()
            .iter()
            .filter(|a| ALLOWED_ALGS.contains(a))
            .cloned()
            .collect();
        if algs.is_empty() {
            *last_failure_ms = Some(now);
            tracing::error!(issuer = %self.issuer.as_str(), "the OpenID provider signs ID tokens with no algorithm Mooring accepts (RS*, PS*, ES256, ES384, EdDSA)");
            return Err(OidcError::ProviderUnavailable);
        }
        // client_secret_basic is the default; use the form body if that is all it takes.
        let post_only = metadata
            .token_endpoint_auth_methods_supported()
            .is_some_and(|m| {
                m.contains(&CoreClientAuthMethod::ClientSecretPost)
                    && !m.contains(&CoreClientAuthMethod::ClientSecretBasic)
            });
        let mut client = OidcClient::from_provider_metadata(
            metadata,
            self.client_id.clone(),
            self.client_secret.clone(),
        )
        .set_redirect_uri(self.redirect.clone());
        if post_only {
            client = client.set_auth_type(AuthType::RequestBody);
        }
        let provider = Arc::new(Provider {
            client,
            algs,
            fetched_ms: now,
        });
        *self.provider.write().unwrap_or_else(|e| e.into_inner()) = Some(provider.clone());
        *last_failure_ms = None;
        Ok(provider)
    }

    fn seal(&self, state: &SealedState) -> Result<String, OidcError> {
        let mut buf = serde_json::to_vec(state).map_err(OidcError::internal)?;
        let nonce: [u8; 12] = rand::random();
        self.state_key
            .seal_in_place_append_tag(
                ring::aead::Nonce::assume_unique_for_key(nonce),
                ring::aead::Aad::from(STATE_AAD),
                &mut buf,
            )
            .map_err(|_| OidcError::internal("sealing the OIDC state failed"))?;
        let mut out = hex::encode(nonce);
        out.push_str(&hex::encode(buf));
        Ok(out)
    }

    fn open(&self, blob: &str) -> Result<SealedState, OidcError> {
        if blob.len() > CALLBACK_PARAM_LEN_MAX {
            return Err(OidcError::StateInvalid);
        }
        let mut bytes = hex::decode(blob).map_err(|_| OidcError::StateInvalid)?;
        if bytes.len() < 12 + 16 {
            return Err(OidcError::StateInvalid);
        }
        let mut nonce = [0u8; 12];
        nonce.copy_from_slice(&bytes[..12]);
        let plain = self
            .state_key
            .open_in_place(
                ring::aead::Nonce::assume_unique_for_key(nonce),
                ring::aead::Aad::from(STATE_AAD),
                &mut bytes[12..],
            )
            .map_err(|_| OidcError::StateInvalid)?;
        let state: SealedState =
            serde_json::from_slice(plain).map_err(|_| OidcError::StateInvalid)?;
        if state.v != 1 {
            return Err(OidcError::StateInvalid);
        }
        Ok(state)
    }
}

type Claims = openidconnect::IdTokenClaims<ExtraClaims, CoreGenderClaim>;

/// Verifies the ID token (signature against the provider's JWKS with an allowed algorithm,
/// issuer, audience, nonce, expiry) and the access token's `at_hash`. `Err(None)`: signed with
/// a key the JWKS lacks.
fn verify_id_token(
    provider: &Provider,
    id_token: &openidconnect::IdToken<
        ExtraClaims,
        CoreGenderClaim,
        CoreJweContentEncryptionAlgorithm,
        CoreJwsSigningAlgorithm,
    >,
    nonce: &Nonce,
    access_token: &openidconnect::AccessToken,
) -> Result<Claims, Option<OidcError>> {
    let verifier = provider
        .client
        .id_token_verifier()
        .set_allowed_algs(provider.algs.clone());
    let claims = match id_token.claims(&verifier, nonce) {
        Ok(claims) => claims.clone(),
        Err(openidconnect::ClaimsVerificationError::SignatureVerification(
            openidconnect::SignatureVerificationError::NoMatchingKey,
        )) => return Err(None),
        Err(e) => return Err(Some(claims_error(&e))),
    };
    // The access token must be the one issued with this ID token.
    if let Some(expected) = claims.access_token_hash() {
        let actual = id_token
            .signing_alg()
            .ok()
            .zip(id_token.signing_key(&verifier).ok())
            .and_then(|(alg, key)| AccessTokenHash::from_token(access_token, alg, key).ok());
        if actual.as_ref() != Some(expected) {
            return Err(Some(OidcError::TokenInvalid(
                "the access token does not match the ID token's at_hash",
            )));
        }
    }
    Ok(claims)
}

/// `return_to` must stay on this server: one leading `/`, then no `/` or `\` right after it
/// (`//evil.example` and `/\evil.example` are host-relative to browsers), no backslash at all,
/// no control or white-space character (browsers drop tabs and newlines: `/\t/evil.example`).
pub fn check_return_to(return_to: &str) -> Result<(), OidcError> {
    let ok = return_to.len() <= RETURN_TO_LEN_MAX
        && return_to.starts_with('/')
        && !return_to.starts_with("//")
        && !return_to.contains('\\')
        && !return_to
            .chars()
            .any(|c| c.is_control() || c.is_whitespace());
    if ok {
        Ok(())
    } else {
        Err(OidcError::InvalidReturnTo)
    }
}

/// The `Set-Cookie` value carrying the sealed state (10 minutes, HttpOnly, SameSite=Lax, only
/// sent to the OIDC routes; `Secure` when the server is reached over https).
pub fn state_cookie(blob: &str, secure: bool) -> String {
    format!(
        "{STATE_COOKIE}={blob}; Path={COOKIE_PATH}; Max-Age={}; HttpOnly; SameSite=Lax{}",
        STATE_TTL_MS / 1000,
        if secure { "; Secure" } else { "" }
    )
}

/// The `Set-Cookie` value that removes the state cookie (a state is used once).
pub fn clear_state_cookie(secure: bool) -> String {
    format!(
        "{STATE_COOKIE}=; Path={COOKIE_PATH}; Max-Age=0; HttpOnly; SameSite=Lax{}",
        if secure { "; Secure" } else { "" }
    )
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn read_secret_file(path: &Path) -> anyhow::Result<String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path)
        .with_context(|| format!("reading oidc.client_secret_file {}", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    anyhow::ensure!(
        mode & 0o077 == 0,
        "oidc.client_secret_file {} is readable by others (mode {mode:o}); chmod 600 it",
        path.display()
    );
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading oidc.client_secret_file {}", path.display()))?;
    let secret = text.trim();
    anyhow::ensure!(
        !secret.is_empty(),
        "oidc.client_secret_file {} is empty",
        path.display()
    );
    Ok(secret.to_owned())
}

fn roots_from_file(path: &Path) -> anyhow::Result<rustls::RootCertStore> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_file_iter(path)
        .with_context(|| format!("reading oidc.ca_file {}", path.display()))?
    {
        let cert = cert.with_context(|| format!("reading oidc.ca_file {}", path.display()))?;
        roots
            .add(cert)
            .with_context(|| format!("oidc.ca_file {}", path.display()))?;
    }
    anyhow::ensure!(
        !roots.is_empty(),
        "oidc.ca_file {} holds no certificate",
        path.display()
    );
    Ok(roots)
}

/// The operating system's trust roots (those that parse; the rest are logged).
pub(crate) fn system_roots() -> rustls::RootCertStore {
    let found = rustls_native_certs::load_native_certs();
    for e in &found.errors {
        tracing::warn!(error = %e, "reading the system's trust roots");
    }
    let mut roots = rustls::RootCertStore::empty();
    let (added, ignored) = roots.add_parsable_certificates(found.certs);
    if ignored > 0 || added == 0 {
        tracing::warn!(added, ignored, "system trust roots for outgoing HTTPS");
    }
    roots
}

/// A token endpoint failure as the client sees it; the provider's text goes to the log.
fn token_error(
    e: RequestTokenError<
        HttpClientError<openidconnect::reqwest::Error>,
        StandardErrorResponse<CoreErrorResponseType>,
    >,
) -> OidcError {
    match e {
        RequestTokenError::ServerResponse(r) => {
            tracing::info!(
                error = %r.error().as_ref(),
                description = r.error_description().map(String::as_str).unwrap_or(""),
                "the OpenID provider refused an authorization code"
            );
            OidcError::CodeRejected(sanitize_code(r.error().as_ref()))
        }
        other => {
            tracing::warn!(error = %error_chain(&other), "OIDC token request failed");
            OidcError::ProviderUnavailable
        }
    }
}

fn claims_error(e: &openidconnect::ClaimsVerificationError) -> OidcError {
    use openidconnect::ClaimsVerificationError as C;
    tracing::info!(error = %e, "refused an ID token");
    OidcError::TokenInvalid(match e {
        C::Expired(_) => "expired",
        C::InvalidAudience(_) => "issued for another client (audience)",
        C::InvalidIssuer(_) => "issued by another issuer",
        C::InvalidNonce(_) => "the nonce does not match this login",
        C::InvalidSubject(_) => "invalid subject",
        C::SignatureVerification(_) => "the signature does not verify",
        _ => "refused by verification",
    })
}

/// An OAuth error code from the provider, safe to echo: `[a-z0-9_.-]`, at most 64 bytes.
fn sanitize_code(code: &str) -> String {
    let clean: String = code
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        .take(64)
        .collect();
    if clean.is_empty() {
        "unknown".to_owned()
    } else {
        clean
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

#[derive(Clone)]
struct RoutesState {
    oidc: Arc<Oidc>,
    login: Arc<dyn OidcLogin>,
}

/// The login route's query.
#[derive(Deserialize)]
pub struct LoginQuery {
    return_to: Option<String>,
}

/// The callback's query: providers add parameters of their own (`iss`, `session_state`, ...),
/// so unknown ones are ignored.
#[derive(Deserialize)]
pub struct CallbackQuery {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
}

/// The OIDC routes, with their own state, to merge into the API router:
/// `GET /api/v1/auth/oidc/login?return_to=/path` and `GET /api/v1/auth/oidc/callback`.
pub fn oidc_routes<S>(oidc: Arc<Oidc>, login: Arc<dyn OidcLogin>) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    Router::new()
        .route(LOGIN_PATH, get(login_route))
        .route(CALLBACK_PATH, get(callback_route))
        .with_state(RoutesState { oidc, login })
}

async fn login_route(
    State(st): State<RoutesState>,
    ApiQuery(q): ApiQuery<LoginQuery>,
) -> Result<Response, ApiError> {
    login_redirect(&st.oidc, q).await
}

/// `GET /api/v1/auth/oidc/login`: a redirect to the provider, with the sealed state cookie.
pub async fn login_redirect(oidc: &Oidc, q: LoginQuery) -> Result<Response, ApiError> {
    let return_to = q.return_to.unwrap_or_else(|| "/".to_owned());
    let (url, blob) = oidc
        .begin(&return_to)
        .await
        .map_err(|e| ApiError(e.into()))?;
    let mut resp = StatusCode::FOUND.into_response();
    let headers = resp.headers_mut();
    headers.insert(
        header::LOCATION,
        HeaderValue::from_str(&url).map_err(|e| ApiError(OidcError::internal(e).into()))?,
    );
    headers.insert(
        header::SET_COOKIE,
        HeaderValue::from_str(&state_cookie(&blob, oidc.secure_cookie))
            .map_err(|e| ApiError(OidcError::internal(e).into()))?,
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(resp)
}

async fn callback_route(
    State(st): State<RoutesState>,
    ApiQuery(q): ApiQuery<CallbackQuery>,
    request: axum::http::request::Parts,
) -> Response {
    callback_response(&st.oidc, st.login.as_ref(), q, &request).await
}

/// `GET /api/v1/auth/oidc/callback`: finishes the login (the state cookie is cleared whatever
/// the outcome).
pub async fn callback_response(
    oidc: &Oidc,
    login: &dyn OidcLogin,
    q: CallbackQuery,
    request: &axum::http::request::Parts,
) -> Response {
    let secure = oidc.secure_cookie;
    let mut resp = match callback(oidc, login, q, request).await {
        Ok(resp) => resp,
        Err(e) => ApiError(e).into_response(),
    };
    // A state is used once, whatever the outcome.
    if let Ok(v) = HeaderValue::from_str(&clear_state_cookie(secure)) {
        resp.headers_mut().append(header::SET_COOKIE, v);
    }
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

async fn callback(
    oidc: &Oidc,
    login: &dyn OidcLogin,
    q: CallbackQuery,
    request: &axum::http::request::Parts,
) -> Result<Response, ServiceError> {
    if let Some(error) = q.error {
        return Err(OidcError::ProviderDenied(sanitize_code(&error)).into());
    }
    let (Some(code), Some(state)) = (q.code, q.state) else {
        return Err(OidcError::InvalidRequest("the code or state parameter is missing").into());
    };
    if code.len() > CALLBACK_PARAM_LEN_MAX || state.len() > CALLBACK_PARAM_LEN_MAX {
        return Err(OidcError::InvalidRequest("a parameter is too long").into());
    }
    let blob = state_cookie_value(&request.headers).ok_or(OidcError::StateMissing)?;
    let identity = oidc.finish(&code, &state, blob).await?;
    let source = request
        .extensions
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip().to_string())
        .unwrap_or_default();
    let user_agent: String = request
        .headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .chars()
        .take(USER_AGENT_LEN_MAX)
        .collect();
    login.login(identity, source, user_agent).await
}

/// The state cookie's value from the request's `Cookie` headers.
fn state_cookie_value(headers: &HeaderMap) -> Option<&str> {
    crate::http::cookie(headers, STATE_COOKIE).filter(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn return_to_must_stay_on_this_server() {
        for ok in ["/", "/devices", "/devices?tag=a%2Fb#x", "/a//b"] {
            assert_eq!(check_return_to(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "devices",
            "//evil.example",
            "/\\evil.example",
            "\\\\evil.example",
            "https://evil.example/",
            "javascript:alert(1)",
            "/\t/evil.example",
            "/\n/evil.example",
            " /devices",
        ] {
            assert_eq!(
                check_return_to(bad),
                Err(OidcError::InvalidReturnTo),
                "{bad:?}"
            );
        }
        assert!(check_return_to(&format!("/{}", "a".repeat(RETURN_TO_LEN_MAX))).is_err());
    }

    #[test]
    fn state_cookie_is_found_among_others() {
        let mut h = HeaderMap::new();
        h.append(
            header::COOKIE,
            HeaderValue::from_static("a=1; mooring_oidc=abc"),
        );
        assert_eq!(state_cookie_value(&h), Some("abc"));
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("x_mooring_oidc=1"));
        assert_eq!(state_cookie_value(&h), None);
    }

    #[test]
    fn provider_error_codes_are_sanitized() {
        assert_eq!(sanitize_code("access_denied"), "access_denied");
        assert_eq!(sanitize_code("<script>"), "script");
        assert_eq!(sanitize_code("\u{1}"), "unknown");
    }
}
