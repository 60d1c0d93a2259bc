//! The HTTP API: routes, bearer-token auth, JSON errors, OpenAPI, health and metrics.
//!
//! Handlers only translate between HTTP and [`App`](crate::app::App) operations; there is no
//! storage access here. Every error is `{"error":{"code":..,"message":..}}` with a 4xx/5xx status:
//! our extractors answer JSON rejections, and [`json_errors`] rewrites any other error response
//! (axum's own rejections, layers) into that shape.

mod accounts;
mod api;
mod cas;
mod certs;
mod commands;
mod events;
mod fleet;
mod gateways;
mod health;
mod jobs;
mod ota;
mod pipeline;
mod provision;
mod rollouts;
pub mod routes;
mod rules;
mod tickets;
mod web;

use crate::access::{access_of, role_allows, Access, Permission};
use crate::accounts::{CSRF_HEADER, SESSION_COOKIE};
use crate::app::App;
use crate::audit::AuditEntryIn;
use crate::error::{ErrorKind, ServiceError};
use crate::metrics::Counters;
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use mooring_store::Role;
use std::sync::Arc;
use utoipa::OpenApi;

pub(crate) use accounts::cookie;
pub use api::ApiDoc;
pub use certs::ROTATE_COMMAND;
pub use events::ConnectionCloser;
pub use mooring_api::{ErrorBody, ErrorDetail};
pub use routes::{route_specs, RouteSpec};
pub use web::CONTENT_SECURITY_POLICY;

/// Largest request body accepted, in bytes.
pub const REQUEST_BODY_SIZE_BYTES_MAX: usize = 1024 * 1024;

/// An API error response.
pub struct ApiError(pub ServiceError);

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        Self(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.0.kind.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.0.code.to_owned(),
                message: self.0.message,
            },
        };
        let mut resp = (status, axum::Json(body)).into_response();
        resp.extensions_mut().insert(ErrorCode(self.0.code));
        resp
    }
}

/// The stable code of an error response (in its extensions, for the audit log).
#[derive(Clone, Copy)]
pub struct ErrorCode(pub &'static str);

pub type ApiResult<T> = Result<T, ApiError>;

/// JSON body extractor whose rejections are JSON errors too.
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(ApiJson(v)),
            Err(rejection) => Err(ApiError(json_rejection(&rejection))),
        }
    }
}

fn json_rejection(rejection: &JsonRejection) -> ServiceError {
    if caused_by_body_timeout(rejection) {
        return ServiceError::new(
            ErrorKind::RequestTimeout,
            "request_timeout",
            "the request body did not arrive in time",
        );
    }
    match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ServiceError::new(
            ErrorKind::PayloadTooLarge,
            "payload_too_large",
            format!("the request body is larger than {REQUEST_BODY_SIZE_BYTES_MAX} bytes"),
        ),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ServiceError::new(
            ErrorKind::UnsupportedMediaType,
            "unsupported_media_type",
            rejection.body_text(),
        ),
        _ => ServiceError::invalid("invalid_body", rejection.body_text()),
    }
}

/// Whether reading the body failed because tower-http's `RequestBodyTimeoutLayer` gave up.
fn caused_by_body_timeout(rejection: &JsonRejection) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(rejection);
    while let Some(e) = cause {
        if e.is::<tower_http::timeout::TimeoutError>() {
            return true;
        }
        cause = e.source();
    }
    false
}

/// Query-string extractor whose rejections are JSON errors too.
pub struct ApiQuery<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiQuery<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(ApiQuery(v)),
            Err(rejection) => Err(ApiError(ServiceError::invalid(
                "invalid_query",
                rejection.body_text(),
            ))),
        }
    }
}

/// Path-parameter extractor whose rejections (e.g. `%ff`, not UTF-8) are JSON errors too.
pub struct ApiPath<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiPath<T>
where
    T: serde::de::DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(ApiPath(v)),
            Err(rejection) => match rejection.status() {
                s if s.is_server_error() => {
                    Err(ApiError(ServiceError::internal(rejection.body_text())))
                }
                _ => Err(ApiError(ServiceError::invalid(
                    "invalid_path",
                    rejection.body_text(),
                ))),
            },
        }
    }
}

/// Who is calling: a person (login session cookie) or an app (API token).
#[derive(Clone, Debug)]
pub enum CallerKind {
    /// `session`: the SHA-256 of the session cookie.
    User {
        id: String,
        email: String,
        session: String,
    },
    Token {
        id: String,
    },
}

/// The authenticated caller, put in request extensions by the route table's check.
#[derive(Clone, Debug)]
pub struct Caller {
    pub role: Role,
    /// The user's email or the token's name.
    pub name: String,
    pub kind: CallerKind,
    /// The devices the caller reaches (its scope).
    pub access: Access,
}

impl Caller {
    /// Whether the caller's credentials still hold (a long-lived stream re-checks them): the
    /// token not revoked or expired, the session not ended, the user not disabled.
    pub async fn still_valid(&self, app: &App) -> bool {
        match &self.kind {
            CallerKind::Token { id } => app.tokens.still_valid(id).await,
            CallerKind::User { session, .. } => app.accounts.session_still_valid(session).await,
        }
    }

    /// The principal's stable id (`usr_...` or the token id): what per-caller bounds count by.
    pub fn principal(&self) -> &str {
        match &self.kind {
            CallerKind::User { id, .. } => id,
            CallerKind::Token { id } => id,
        }
    }

    /// How the audit log names the caller.
    pub fn actor(&self) -> String {
        match &self.kind {
            CallerKind::User { email, .. } => format!("user:{email}"),
            CallerKind::Token { id } => format!("token:{} ({id})", self.name),
        }
    }
}

fn unauthorized(message: &str) -> ApiError {
    ApiError(ServiceError::new(
        ErrorKind::Unauthorized,
        "unauthorized",
        message,
    ))
}

/// The client's address: the TCP peer, or (with `auth.trust_forwarded_for`, behind a load
/// balancer) the last `X-Forwarded-For` entry.
pub(crate) fn client_addr(app: &App, req: &Request) -> String {
    if app.config().auth.trust_forwarded_for {
        let forwarded = req
            .headers()
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .rfind(|v| v.parse::<std::net::IpAddr>().is_ok());
        if let Some(addr) = forwarded {
            return addr.to_owned();
        }
    }
    req.extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map_or_else(|| "unknown".to_owned(), |c| c.0.ip().to_string())
}

fn is_write(method: &axum::http::Method) -> bool {
    !matches!(
        *method,
        axum::http::Method::GET | axum::http::Method::HEAD | axum::http::Method::OPTIONS
    )
}

/// The caller a request authenticates as: `Authorization: Bearer <token>`, else the session
/// cookie (a write with the cookie must carry the session's CSRF token in `X-CSRF-Token`).
/// `Ok(None)`: no credentials at all.
async fn authenticate(
    app: &App,
    method: &axum::http::Method,
    headers: &axum::http::HeaderMap,
) -> Result<Option<Caller>, ApiError> {
    if let Some(auth) = headers.get(header::AUTHORIZATION) {
        let token = auth
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(|| unauthorized("the Authorization header must be `Bearer <token>`"))?;
        let record = app
            .tokens
            .verify(token)
            .await
            .ok_or_else(|| unauthorized("invalid, expired or revoked token"))?;
        return Ok(Some(Caller {
            role: record.role,
            name: record.name,
            access: access_of(record.scope.as_deref()),
            kind: CallerKind::Token { id: record.id },
        }));
    }
    let Some(secret) = cookie(headers, SESSION_COOKIE) else {
        return Ok(None);
    };
    let (session, user) = app.accounts.session(secret).await?.ok_or_else(|| {
        unauthorized("the session has ended (logged out, expired or disabled); log in again")
    })?;
    if is_write(method) {
        let presented = headers
            .get(CSRF_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(crate::auth::token_sha256);
        if presented.as_deref() != Some(session.csrf_sha256.as_str()) {
            return Err(ApiError(ServiceError::new(
                ErrorKind::Forbidden,
                "csrf_failed",
                "a write with the session cookie must carry the session's CSRF token in X-CSRF-Token (the mooring_csrf cookie)",
            )));
        }
    }
    Ok(Some(Caller {
        role: user.role,
        name: user.email.clone(),
        access: access_of(user.scope.as_deref()),
        kind: CallerKind::User {
            id: user.id,
            email: user.email,
            session: session.id_sha256,
        },
    }))
}

/// Reads that hand out a secret: logged in the audit log like a write.
const AUDITED_READS: &[&str] = &["device.local_key"];

/// Every route's check: authenticates the caller, checks its role against the route's one
/// permission, and after the handler logs a write (and a refused write by an authenticated
/// caller) in the audit log.
async fn authorize(
    State((app, spec)): State<(Arc<App>, RouteSpec)>,
    mut req: Request,
    next: Next,
) -> Response {
    if spec.permission == Permission::Public {
        return next.run(req).await;
    }
    let write = is_write(req.method()) || AUDITED_READS.contains(&spec.action);
    let target = req.uri().path().to_owned();
    let source = client_addr(&app, &req);
    let method = req.method().clone();
    let caller =
        match authenticate(&app, &method, req.headers()).await {
            Ok(Some(c)) => c,
            Ok(None) => return unauthorized(
                "missing credentials: `Authorization: Bearer <token>` or a login session cookie",
            )
            .into_response(),
            Err(e) => return e.into_response(),
        };
    let resp = if role_allows(caller.role, spec.permission) {
        req.extensions_mut().insert(caller.clone());
        next.run(req).await
    } else {
        ApiError(ServiceError::new(
            ErrorKind::Forbidden,
            "forbidden",
            format!(
                "role {} does not have the permission {} this call needs",
                caller.role,
                spec.permission.as_str()
            ),
        ))
        .into_response()
    };
    if write {
        app.audit
            .record(AuditEntryIn {
                actor: caller.actor(),
                action: spec.action,
                target,
                source,
                status: resp.status().as_u16(),
                detail: resp
                    .extensions()
                    .get::<ErrorCode>()
                    .map(|c| c.0.to_owned())
                    .unwrap_or_default(),
            })
            .await;
    }
    resp
}

pub(super) async fn healthz(State(app): State<Arc<App>>) -> impl IntoResponse {
    axum::Json(serde_json::json!({"status": "ok", "node": app.config().node_id}))
}

pub(super) async fn openapi_json() -> impl IntoResponse {
    axum::Json(ApiDoc::openapi())
}

pub(super) async fn metrics(State(app): State<Arc<App>>) -> impl IntoResponse {
    // Counted at most every few seconds (a scrape costs two count queries at most).
    app.registry.cert_gauges().await;
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::render_metrics(&app),
    )
}

async fn method_not_allowed() -> Response {
    let body = ErrorBody {
        error: ErrorDetail {
            code: "method_not_allowed".to_owned(),
            message: "this route does not accept that HTTP method".to_owned(),
        },
    };
    (StatusCode::METHOD_NOT_ALLOWED, axum::Json(body)).into_response()
}

async fn not_found() -> ApiError {
    ApiError(ServiceError::not_found("route_not_found", "no such route"))
}

/// Longest error body [`json_errors`] reads from a response it rewrites.
const ERROR_BODY_SIZE_BYTES_MAX: usize = 4096;

/// The stable code for an error status when nothing more specific is known.
fn status_code_name(status: StatusCode) -> &'static str {
    match status {
        StatusCode::BAD_REQUEST => "bad_request",
        StatusCode::UNAUTHORIZED => "unauthorized",
        StatusCode::FORBIDDEN => "forbidden",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::REQUEST_TIMEOUT => "request_timeout",
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::UNPROCESSABLE_ENTITY => "unprocessable_entity",
        StatusCode::TOO_MANY_REQUESTS => "too_many_requests",
        StatusCode::SERVICE_UNAVAILABLE => "unavailable",
        s if s.is_server_error() => "internal",
        _ => "bad_request",
    }
}

/// The Content-Security-Policy of every response that is not a dashboard file (API answers,
/// errors, event streams): nothing in it may load or run anything, nor be framed.
pub const API_CONTENT_SECURITY_POLICY: &str = "default-src 'none'; frame-ancestors 'none'";

/// Every response (API, errors, dashboard files, refused methods) says `nosniff` and has a
/// Content-Security-Policy (the dashboard files keep their own), so no answer can be sniffed
/// as another type or framed by another origin.
async fn security_headers(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        header::HeaderValue::from_static("nosniff"),
    );
    h.entry(header::CONTENT_SECURITY_POLICY)
        .or_insert(header::HeaderValue::from_static(
            API_CONTENT_SECURITY_POLICY,
        ));
    resp
}

/// Rewrites every 4xx/5xx response whose body is not JSON (axum's own rejections, layers)
/// into `{"error":{"code","message"}}`. A 4xx keeps its text as the message; a 5xx's text goes
/// to the log only, like [`ServiceError::internal`].
async fn json_errors(resp: Response) -> Response {
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, ERROR_BODY_SIZE_BYTES_MAX)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_default();
    let text = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_owned()
    } else {
        text
    };
    let error = if status.is_server_error() {
        ServiceError::internal(format!("{status}: {text}"))
    } else {
        ServiceError::invalid(status_code_name(status), text)
    };
    let body = ErrorBody {
        error: ErrorDetail {
            code: error.code.to_owned(),
            message: error.message,
        },
    };
    parts.headers.remove(header::CONTENT_LENGTH);
    let mut rewritten = (status, axum::Json(body)).into_response();
    // Keep the other headers (e.g. `Allow`), with the JSON content type.
    for (name, value) in parts.headers.iter() {
        if name != header::CONTENT_TYPE {
            rewritten.headers_mut().insert(name.clone(), value.clone());
        }
    }
    rewritten
}

/// Counts the requests the API refused for a bound or a missing token (`/metrics`).
async fn count_refusals(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let c = app.counters();
    match resp.status() {
        StatusCode::REQUEST_TIMEOUT => Counters::inc(&c.http_body_timeouts),
        StatusCode::PAYLOAD_TOO_LARGE => Counters::inc(&c.http_body_too_large),
        StatusCode::UNAUTHORIZED => Counters::inc(&c.http_unauthorized),
        StatusCode::FORBIDDEN => Counters::inc(&c.http_forbidden),
        StatusCode::TOO_MANY_REQUESTS => Counters::inc(&c.http_throttled),
        _ => {}
    }
    resp
}

/// Longest response body [`etags`] hashes; larger ones go out without an ETag.
const ETAG_BODY_BYTES_MAX: usize = 8 * 1024 * 1024;

/// `ETag` on every successful JSON read, and `304 Not Modified` when `If-None-Match` names it
/// (a weak tag over the body, so a client polling an unchanged resource gets no body). A
/// handler's own `ETag` (the shadow's version) is kept. Streams (SSE) pass untouched.
async fn etags(req: Request, next: Next) -> Response {
    let if_none_match = req.headers().get(header::IF_NONE_MATCH).cloned();
    let is_get = req.method() == axum::http::Method::GET;
    let resp = next.run(req).await;
    let json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !is_get || resp.status() != StatusCode::OK || !json {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let not_modified = |tag: axum::http::HeaderValue| {
        let mut r = StatusCode::NOT_MODIFIED.into_response();
        r.headers_mut().insert(header::ETAG, tag);
        r
    };
    if let Some(tag) = parts.headers.get(header::ETAG).cloned() {
        if matches_etag(if_none_match.as_ref(), &tag) {
            return not_modified(tag);
        }
        return Response::from_parts(parts, body);
    }
    // Only bodies of a known size within the bound are buffered and tagged; others go out as
    // they are.
    let size = axum::body::HttpBody::size_hint(&body).exact();
    if size.is_none_or(|n| n > ETAG_BODY_BYTES_MAX as u64) {
        return Response::from_parts(parts, body);
    }
    let Ok(bytes) = axum::body::to_bytes(body, ETAG_BODY_BYTES_MAX).await else {
        return ApiError(ServiceError::internal("response body too large to tag")).into_response();
    };
    use sha2::Digest;
    let digest = sha2::Sha256::digest(&bytes);
    if let Ok(tag) =
        axum::http::HeaderValue::from_str(&format!("W/\"{}\"", hex::encode(&digest[..16])))
    {
        if matches_etag(if_none_match.as_ref(), &tag) {
            return not_modified(tag);
        }
        parts.headers.insert(header::ETAG, tag);
    }
    Response::from_parts(parts, axum::body::Body::from(bytes))
}

/// Whether an `If-None-Match` header names this tag (weak comparison, `*` matches all).
fn matches_etag(header: Option<&axum::http::HeaderValue>, tag: &axum::http::HeaderValue) -> bool {
    let Some(h) = header.and_then(|h| h.to_str().ok()) else {
        return false;
    };
    let bare = |t: &str| t.trim().trim_start_matches("W/").to_owned();
    let want = tag.to_str().map(bare).unwrap_or_default();
    h.split(',').any(|t| t.trim() == "*" || bare(t) == want)
}

/// CORS for the configured web and mobile origins (credentials allowed, so the session cookie
/// works cross-origin for exactly those origins).
fn cors(app: &App) -> Option<tower_http::cors::CorsLayer> {
    use axum::http::{HeaderName, HeaderValue, Method};
    let origins: Vec<HeaderValue> = app
        .config()
        .auth
        .cors_origins
        .iter()
        .filter_map(|o| HeaderValue::from_str(o).ok())
        .collect();
    if origins.is_empty() {
        return None;
    }
    Some(
        tower_http::cors::CorsLayer::new()
            .allow_origin(origins)
            .allow_credentials(true)
            .allow_methods([
                Method::GET,
                Method::POST,
                Method::PUT,
                Method::PATCH,
                Method::DELETE,
            ])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                header::IF_MATCH,
                header::IF_NONE_MATCH,
                HeaderName::from_static(CSRF_HEADER),
                HeaderName::from_static("last-event-id"),
            ])
            .expose_headers([header::ETAG])
            .max_age(std::time::Duration::from_secs(600)),
    )
}

/// The whole HTTP router, built from the route table ([`routes::table`]): each route gets its
/// permission check.
pub fn router(app: Arc<App>) -> Router {
    let body_timeout = std::time::Duration::from_millis(app.config().http.request_body_timeout_ms);
    let mut router: Router<Arc<App>> = Router::new();
    for (spec, handler) in routes::table() {
        let check = axum::middleware::from_fn_with_state((app.clone(), spec), authorize);
        router = router.route(spec.path, handler.route_layer(check));
    }
    let mut router = router
        .fallback(web::fallback)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn(etags))
        .layer(axum::extract::DefaultBodyLimit::max(
            REQUEST_BODY_SIZE_BYTES_MAX,
        ))
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
            body_timeout,
        ))
        .layer(axum::middleware::map_response(json_errors))
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            count_refusals,
        ));
    if let Some(cors) = cors(&app) {
        router = router.layer(cors);
    }
    router
        .layer(axum::middleware::map_response(security_headers))
        .with_state(app)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn json_errors_rewrites_plain_text_errors_and_keeps_other_headers() {
        let plain = (
            StatusCode::BAD_REQUEST,
            [(header::ALLOW, "GET")],
            "Invalid URL: something",
        )
            .into_response();
        let resp = json_errors(plain).await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        assert_eq!(resp.headers()[header::CONTENT_TYPE], "application/json");
        assert_eq!(resp.headers()[header::ALLOW], "GET");
        let body = axum::body::to_bytes(resp.into_body(), 4096)
            .await
            .expect("body");
        let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(v["error"]["code"], "bad_request");
        assert_eq!(v["error"]["message"], "Invalid URL: something");

        let backend = (StatusCode::BAD_GATEWAY, "upstream at 10.0.0.7 refused").into_response();
        let body = axum::body::to_bytes(json_errors(backend).await.into_body(), 4096)
            .await
            .expect("body");
        let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(v["error"]["code"], "internal");
        assert!(!v.to_string().contains("10.0.0.7"), "{v}");
    }
}
