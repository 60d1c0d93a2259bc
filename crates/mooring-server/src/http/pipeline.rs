//! `/api/v1/devices/{id}/provisioning` and `/installation` handlers (issue 16).

use super::{ApiJson, ApiPath, ApiQuery, ApiResult, Caller, ErrorBody};
use crate::app::App;
use axum::extract::State;
use axum::{Extension, Json};
use mooring_api::{Device, Funnel, FunnelParams, Provisioning, RecordInstallation};
use std::sync::Arc;

#[utoipa::path(get, path = "/api/v1/devices/{id}/provisioning", params(("id" = String, Path)),
    responses((status = 200, body = Provisioning, description = "the steps in order: claimed, certificate_issued, registered, first_connect, first_telemetry; each done, pending or skipped, with its time and last error"),
        (status = 404, body = ErrorBody)))]
pub(super) async fn provisioning(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<Provisioning>> {
    Ok(Json(app.pipeline.steps(&caller.access, &id).await?))
}

#[utoipa::path(post, path = "/api/v1/devices/{id}/installation", params(("id" = String, Path)),
    request_body = RecordInstallation,
    responses((status = 200, body = Device, description = "recorded; the device now names who installed it, where and when"),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "device_not_seen: its telemetry is not recent ([installations] seen_within_ms); nothing recorded")))]
pub(super) async fn record_installation(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<RecordInstallation>,
) -> ApiResult<Json<Device>> {
    let view = app
        .pipeline
        .record_installation(
            &caller.access,
            &caller.name,
            &id,
            &req.location,
            req.notes.as_deref(),
        )
        .await?;
    Ok(Json(view.into()))
}

#[utoipa::path(get, path = "/api/v1/provisioning/funnel", params(FunnelParams),
    responses((status = 200, body = Funnel, description = "devices that reached each step: registered, first_connect, first_telemetry, installed"),
        (status = 400, body = ErrorBody)))]
pub(super) async fn funnel(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ApiQuery(p): ApiQuery<FunnelParams>,
) -> ApiResult<Json<Funnel>> {
    Ok(Json(
        app.pipeline
            .funnel(&caller.access, p.selector.as_deref())
            .await?,
    ))
}
