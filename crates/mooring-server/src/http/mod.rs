//! The HTTP API: routes, bearer-token auth, JSON errors, OpenAPI, health and metrics.
//!
//! Handlers only translate between HTTP and [`App`](crate::app::App) operations; there is no
//! storage access here. Every error is `{"error":{"code":..,"message":..}}` with a 4xx/5xx status.

mod api;
mod commands;

use crate::app::App;
use crate::error::{ErrorKind, ServiceError};
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use mooring_store::TokenRole;
use serde::Serialize;
use std::sync::Arc;
use utoipa::OpenApi;

pub use api::ApiDoc;

/// Largest request body accepted, in bytes.
pub const REQUEST_BODY_SIZE_BYTES_MAX: usize = 1024 * 1024;

#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// Stable machine-readable code, e.g. `device_not_found`.
    pub code: String,
    pub message: String,
}

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
    ServiceError::invalid("invalid_body", rejection.body_text())
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
    let Some(record) = crate::auth::verify_token(app.store.as_ref(), token).await else {
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

async fn healthz() -> impl IntoResponse {
    axum::Json(serde_json::json!({"status": "ok"}))
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

/// The whole HTTP router.
pub fn router(app: Arc<App>) -> Router {
    let body_timeout = std::time::Duration::from_millis(app.config.http.request_body_timeout_ms);
    let protected =
        api::routes()
            .merge(commands::routes())
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
        .with_state(app)
}
