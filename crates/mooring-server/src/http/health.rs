//! `/api/v1/devices/{id}/health` and `/api/v1/health`: fleet health (docs/health.md).

use super::{ApiPath, ApiQuery, ApiResult, Caller, ErrorBody};
use crate::app::App;
use axum::extract::State;
use axum::{Extension, Json};
use mooring_api::{DeviceHealth, HealthParams, HealthSummary};
use std::sync::Arc;

#[utoipa::path(get, path = "/api/v1/devices/{id}/health", params(("id" = String, Path)),
    responses((status = 200, body = DeviceHealth, description = "the device's health signals: counts over the last 24 hours and in total, reconnects per hour, time online, telemetry silence, battery level and trend, the agent's restarts and crashes, the last diagnostics and update problem"),
        (status = 404, body = ErrorBody)))]
pub(super) async fn device_health(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<DeviceHealth>> {
    Ok(Json(app.health.device(&caller.access, &id).await?))
}

#[utoipa::path(get, path = "/api/v1/health", params(HealthParams),
    responses((status = 200, body = HealthSummary, description = "the selection per cohort, and the cohorts whose rate of a failure signal is significantly above the rest's"),
        (status = 400, body = ErrorBody, description = "invalid_selector, invalid_group_by, too_many_groups")))]
pub(super) async fn summary(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ApiQuery(p): ApiQuery<HealthParams>,
) -> ApiResult<Json<HealthSummary>> {
    Ok(Json(
        app.health
            .summary(&caller.access, p.selector.as_deref(), p.group_by.as_deref())
            .await?,
    ))
}
