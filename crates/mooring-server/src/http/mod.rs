//! The HTTP API: routes, bearer-token auth, JSON errors, OpenAPI, health and metrics.
//!
//! Handlers only translate between HTTP and [`App`](crate::app::App) operations; there is no
//! storage access here. Every error is `{"error":{"code":..,"message":..}}` with a 4xx/5xx status:
//! our extractors answer JSON rejections, and [`json_errors`] rewrites any other error response
//! (axum's own rejections, layers) into that shape.

mod api;
mod commands;
mod events;

use crate::app::App;
use crate::error::{ErrorKind, ServiceError};
use crate::metrics::Counters;
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use mooring_store::TokenRole;
use std::sync::Arc;
use utoipa::OpenApi;

pub use api::ApiDoc;
pub use events::ConnectionCloser;
pub use mooring_api::{ErrorBody, ErrorDetail};

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
        (status, axum::Json(body)).into_response()
    }
}

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

/// The authenticated caller, put in request extensions by [`require_token`].
#[derive(Clone)]
pub struct Caller {
    pub role: TokenRole,
    pub name: String,
}

async fn require_token(
    State(app): State<Arc<App>>,
    mut req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let Some(token) = token else {
        return Err(ApiError(ServiceError::new(
            ErrorKind::Unauthorized,
            "unauthorized",
            "missing `Authorization: Bearer <token>` header",
        )));
    };
    let Some(record) = app.tokens.verify(token).await else {
        return Err(ApiError(ServiceError::new(
            ErrorKind::Unauthorized,
            "unauthorized",
            "invalid or revoked token",
        )));
    };
    // Service tokens are read-only on the API.
    if record.role != TokenRole::Admin && req.method() != axum::http::Method::GET {
        return Err(ApiError(ServiceError::new(
            ErrorKind::Forbidden,
            "forbidden",
            "this token's role may only read; use an admin token",
        )));
    }
    req.extensions_mut().insert(Caller {
        role: record.role,
        name: record.name,
    });
    Ok(next.run(req).await)
}

async fn healthz(State(app): State<Arc<App>>) -> impl IntoResponse {
    axum::Json(serde_json::json!({"status": "ok", "node": app.config().node_id}))
}

async fn openapi_json() -> impl IntoResponse {
    axum::Json(ApiDoc::openapi())
}

async fn metrics(State(app): State<Arc<App>>) -> impl IntoResponse {
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
        _ => {}
    }
    resp
}

/// The whole HTTP router.
pub fn router(app: Arc<App>) -> Router {
    let body_timeout = std::time::Duration::from_millis(app.config().http.request_body_timeout_ms);
    let protected = api::routes()
        .merge(commands::routes())
        .merge(events::routes())
        .route_layer(axum::middleware::from_fn_with_state(
            app.clone(),
            require_token,
        ));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/api/v1/openapi.json", get(openapi_json))
        .merge(protected)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
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
        ))
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
