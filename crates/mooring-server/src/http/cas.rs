//! Registered manufacturer CA handlers (issue 16, just-in-time registration): register, list,
//! enable, disable. Admins only (`pki.manage`).

use super::{ApiJson, ApiPath, ApiResult, Caller, ErrorBody};
use crate::app::App;
use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};
use mooring_api::{Ca, CaList, RegisterCa};
use mooring_store::CaRecord;
use std::sync::Arc;

/// A registered CA as the API shows it.
fn ca_body(c: CaRecord) -> Ca {
    Ca {
        not_after: crate::cas::ca_not_after_ms(&c.cert_pem),
        id: c.id,
        subject: c.subject,
        sha256: c.sha256,
        auto_register: c.auto_register,
        tags: c.tags,
        enabled: c.enabled,
        created_at: c.created_at_ms,
        created_by: c.created_by,
        cert_pem: c.cert_pem,
    }
}

#[utoipa::path(post, path = "/api/v1/cas", request_body = RegisterCa,
    responses((status = 201, body = Ca, description = "registered and trusted by the MQTT listener"),
        (status = 400, body = ErrorBody, description = "invalid_ca: not one usable CA certificate (the message says why), or the fleet CA"),
        (status = 409, body = ErrorBody, description = "ca_exists, too_many_cas")))]
pub(super) async fn register_ca(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ApiJson(req): ApiJson<RegisterCa>,
) -> ApiResult<(StatusCode, Json<Ca>)> {
    let ca = app
        .cas
        .register(
            &caller.access,
            &caller.actor(),
            &req.cert_pem,
            req.auto_register,
            req.tags,
        )
        .await?;
    Ok((StatusCode::CREATED, Json(ca_body(ca))))
}

#[utoipa::path(get, path = "/api/v1/cas",
    responses((status = 200, body = CaList, description = "every registered CA, oldest first")))]
pub(super) async fn list_cas(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<Json<CaList>> {
    let cas = app.cas.list(&caller.access).await?;
    Ok(Json(CaList {
        cas: cas.into_iter().map(ca_body).collect(),
    }))
}

#[utoipa::path(post, path = "/api/v1/cas/{id}/disable", params(("id" = String, Path)),
    responses((status = 200, body = Ca, description = "disabled: its certificates fail the TLS handshake from the next connection on"),
        (status = 404, body = ErrorBody, description = "ca_not_found")))]
pub(super) async fn disable_ca(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<Ca>> {
    let ca = app.cas.set_enabled(&caller.access, &id, false).await?;
    Ok(Json(ca_body(ca)))
}

#[utoipa::path(post, path = "/api/v1/cas/{id}/enable", params(("id" = String, Path)),
    responses((status = 200, body = Ca, description = "enabled: trusted again"),
        (status = 404, body = ErrorBody, description = "ca_not_found")))]
pub(super) async fn enable_ca(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<Ca>> {
    let ca = app.cas.set_enabled(&caller.access, &id, true).await?;
    Ok(Json(ca_body(ca)))
}
