//! `/api/v1/fleet/*`: fleet statistics (docs/fleet.md).

use super::{ApiQuery, ApiResult, Caller, ErrorBody};
use crate::app::App;
use axum::extract::State;
use axum::{Extension, Json};
use mooring_api::{FleetHistory, FleetHistoryParams, FleetSummary, FleetSummaryParams};
use std::sync::Arc;

#[utoipa::path(get, path = "/api/v1/fleet/summary", params(FleetSummaryParams),
    responses((status = 200, body = FleetSummary), (status = 400, body = ErrorBody, description = "invalid_selector")))]
pub(super) async fn summary(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ApiQuery(p): ApiQuery<FleetSummaryParams>,
) -> ApiResult<Json<FleetSummary>> {
    Ok(Json(
        app.fleet
            .summary(&caller.access, p.selector.as_deref())
            .await?,
    ))
}

#[utoipa::path(get, path = "/api/v1/fleet/history", params(FleetHistoryParams),
    responses((status = 200, body = FleetHistory), (status = 400, body = ErrorBody, description = "invalid_window"),
        (status = 403, body = ErrorBody, description = "fleet_wide: the caller has a scope")))]
pub(super) async fn history(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ApiQuery(p): ApiQuery<FleetHistoryParams>,
) -> ApiResult<Json<FleetHistory>> {
    Ok(Json(
        app.fleet
            .history(&caller.access, p.from_ms, p.to_ms)
            .await?,
    ))
}
