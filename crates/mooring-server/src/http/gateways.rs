//! `/api/v1/devices/{id}/gateway`, `/api/v1/devices/{id}/children` and
//! `/api/v1/devices/{id}/local-key` (docs/edge.md).

use super::{ApiJson, ApiPath, ApiQuery, ApiResult, Caller, ErrorBody};
use crate::app::App;
use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};
use mooring_api::{
    AttachGateway, ChildrenParams, GatewayAttachment, GatewayChildren, LocalKeyView,
};
use std::sync::Arc;

#[utoipa::path(put, path = "/api/v1/devices/{id}/gateway", params(("id" = String, Path, description = "the child")),
    request_body = AttachGateway,
    responses((status = 200, body = GatewayAttachment, description = "attached (moved from its earlier gateway, if any)"),
        (status = 400, body = ErrorBody, description = "invalid_gateway: itself, a gateway that is a child, or a child that is a gateway"),
        (status = 404, body = ErrorBody, description = "device_not_found"),
        (status = 409, body = ErrorBody, description = "gateway_full")))]
pub(super) async fn attach_gateway(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<AttachGateway>,
) -> ApiResult<Json<GatewayAttachment>> {
    Ok(Json(
        app.gateways
            .attach(&caller.access, &id, &req.gateway)
            .await?,
    ))
}

#[utoipa::path(get, path = "/api/v1/devices/{id}/gateway", params(("id" = String, Path, description = "the child")),
    responses((status = 200, body = GatewayAttachment),
        (status = 404, body = ErrorBody, description = "device_not_found, not_attached")))]
pub(super) async fn get_gateway(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<GatewayAttachment>> {
    Ok(Json(app.gateways.gateway_of(&caller.access, &id).await?))
}

#[utoipa::path(delete, path = "/api/v1/devices/{id}/gateway", params(("id" = String, Path, description = "the child")),
    responses((status = 204, description = "detached: the gateway may no longer act for it"),
        (status = 404, body = ErrorBody, description = "device_not_found, not_attached")))]
pub(super) async fn detach_gateway(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<StatusCode> {
    app.gateways.detach(&caller.access, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/api/v1/devices/{id}/children", params(("id" = String, Path, description = "the gateway"), ChildrenParams),
    responses((status = 200, body = GatewayChildren, description = "by child id; those within the caller's scope"),
        (status = 400, body = ErrorBody, description = "invalid_limit, invalid_cursor"),
        (status = 404, body = ErrorBody, description = "device_not_found")))]
pub(super) async fn list_children(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(p): ApiQuery<ChildrenParams>,
) -> ApiResult<Json<GatewayChildren>> {
    Ok(Json(
        app.gateways
            .children(&caller.access, &id, p.cursor.as_deref(), p.limit)
            .await?,
    ))
}

#[utoipa::path(get, path = "/api/v1/devices/{id}/local-key", params(("id" = String, Path, description = "the device")),
    responses((status = 200, body = LocalKeyView, description = "the key the device's local API accepts (`Authorization: Bearer <key>`) while it uses its current certificate; the read is audited"),
        (status = 404, body = ErrorBody, description = "device_not_found, no_certificate")))]
pub(super) async fn local_key(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<LocalKeyView>> {
    Ok(Json(app.local.key(&caller.access, &id).await?))
}
