//! `/api/v1` handlers and their OpenAPI description. API types are separate from store types.

use super::{ApiError, ApiJson, ApiPath, ApiQuery, ApiResult, Caller, ErrorBody};
use crate::app::{App, DeviceView};
use crate::error::{ErrorKind, ServiceError};
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use mooring_api::{
    CreateDevice, CreateToken, CreatedDevice, CreatedToken, Device, DeviceList, LatestMetrics,
    LatestValue, ListDevicesParams, TelemetryParams, TelemetryPoint, TelemetryPoints,
};
use mooring_store::{MetricValue, TokenRole};
use std::sync::Arc;
use utoipa::OpenApi;

#[derive(OpenApi)]
#[openapi(
    info(title = "Mooring API", version = "1", description = "Device registry, provisioning, telemetry, commands and shadows. Every call except /healthz, /metrics and this document needs `Authorization: Bearer <token>`. Times are unix milliseconds."),
    paths(create_device, list_devices, get_device, delete_device, device_telemetry, device_telemetry_latest, create_token,
        super::commands::create_command, super::commands::list_commands, super::commands::get_command,
        super::commands::cancel_command, super::commands::create_fleet_command, super::commands::get_any_command,
        super::commands::put_tags, super::commands::get_shadow, super::commands::patch_shadow,
        super::events::events),
    components(schemas(ErrorBody, CreateDevice, CreatedDevice, Device, DeviceList, TelemetryPoints, TelemetryPoint, LatestMetrics, LatestValue, CreateToken, CreatedToken,
        mooring_api::CreateCommand, mooring_api::CreateFleetCommand, mooring_api::Command, mooring_api::CommandList,
        mooring_api::HistoryEntry, mooring_api::CommandResultBody, mooring_api::FleetCommand, mooring_api::AnyCommand,
        mooring_api::Shadow, mooring_api::ShadowPatch, mooring_api::Event, mooring_api::EventBody, mooring_api::EventsReset)),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        openapi.security = Some(vec![utoipa::openapi::security::SecurityRequirement::new(
            "bearer",
            Vec::<String>::new(),
        )]);
    }
}

pub fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/api/v1/devices", post(create_device).get(list_devices))
        .route(
            "/api/v1/devices/{id}",
            get(get_device).delete(delete_device),
        )
        .route("/api/v1/devices/{id}/telemetry", get(device_telemetry))
        .route(
            "/api/v1/devices/{id}/telemetry/latest",
            get(device_telemetry_latest),
        )
        .route("/api/v1/tokens", post(create_token))
}

impl From<DeviceView> for Device {
    fn from(v: DeviceView) -> Self {
        Device {
            id: v.record.id.into_string(),
            tags: v.record.tags,
            online: v.online,
            last_seen: v.last_seen_ms,
            created_at: v.record.created_at_ms,
            cert_serial: v.record.cert_serial,
            cert_sha256: v.record.cert_sha256,
            cert_not_after: v.record.cert_not_after_ms,
        }
    }
}

fn value_json(v: MetricValue) -> serde_json::Value {
    v.to_json()
}

#[utoipa::path(post, path = "/api/v1/devices", request_body = CreateDevice,
    responses((status = 201, body = CreatedDevice), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn create_device(
    State(app): State<Arc<App>>,
    ApiJson(req): ApiJson<CreateDevice>,
) -> ApiResult<(StatusCode, Json<CreatedDevice>)> {
    let (record, issued) = app.registry.create_device(&req.id, req.tags).await?;
    let device = Device::from(DeviceView {
        record,
        online: false,
        last_seen_ms: None,
    });
    Ok((
        StatusCode::CREATED,
        Json(CreatedDevice {
            device,
            certificate_pem: issued.certificate_pem,
            private_key_pem: issued.private_key_pem,
            ca_pem: app.registry.ca_pem().to_owned(),
        }),
    ))
}

#[utoipa::path(get, path = "/api/v1/devices", params(ListDevicesParams),
    responses((status = 200, body = DeviceList), (status = 400, body = ErrorBody)))]
async fn list_devices(
    State(app): State<Arc<App>>,
    ApiQuery(p): ApiQuery<ListDevicesParams>,
) -> ApiResult<Json<DeviceList>> {
    let (devices, next_cursor) = match p.selector.as_deref() {
        None => {
            app.registry
                .list_devices(p.limit, p.cursor.as_deref())
                .await?
        }
        Some(sel) => {
            app.registry
                .list_selected_devices(sel, p.limit, p.cursor.as_deref())
                .await?
        }
    };
    Ok(Json(DeviceList {
        devices: devices.into_iter().map(Device::from).collect(),
        next_cursor,
    }))
}

#[utoipa::path(get, path = "/api/v1/devices/{id}", params(("id" = String, Path)),
    responses((status = 200, body = Device), (status = 404, body = ErrorBody)))]
async fn get_device(
    State(app): State<Arc<App>>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<Device>> {
    Ok(Json(app.registry.get_device(&id).await?.into()))
}

#[utoipa::path(delete, path = "/api/v1/devices/{id}", params(("id" = String, Path)),
    responses((status = 204, description = "deleted; its certificate is refused and a live session closed"), (status = 404, body = ErrorBody)))]
async fn delete_device(
    State(app): State<Arc<App>>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<StatusCode> {
    app.registry.delete_device(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/api/v1/devices/{id}/telemetry", params(("id" = String, Path), TelemetryParams),
    responses((status = 200, body = TelemetryPoints), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn device_telemetry(
    State(app): State<Arc<App>>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(p): ApiQuery<TelemetryParams>,
) -> ApiResult<Json<TelemetryPoints>> {
    let named = p.metric.is_some();
    let points = app
        .telemetry
        .query(&id, p.metric, p.from, p.to, p.limit)
        .await?;
    Ok(Json(TelemetryPoints {
        points: points
            .into_iter()
            .map(|pt| TelemetryPoint {
                ts: pt.ts_ms,
                value: value_json(pt.value),
                metric: (!named).then_some(pt.metric),
            })
            .collect(),
    }))
}

#[utoipa::path(get, path = "/api/v1/devices/{id}/telemetry/latest", params(("id" = String, Path)),
    responses((status = 200, body = LatestMetrics), (status = 404, body = ErrorBody)))]
async fn device_telemetry_latest(
    State(app): State<Arc<App>>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<LatestMetrics>> {
    let latest = app.telemetry.latest(&id).await?;
    Ok(Json(LatestMetrics {
        metrics: latest
            .into_iter()
            .map(|(name, (ts, value))| {
                (
                    name,
                    LatestValue {
                        ts,
                        value: value_json(value),
                    },
                )
            })
            .collect(),
    }))
}

#[utoipa::path(post, path = "/api/v1/tokens", request_body = CreateToken,
    responses((status = 201, body = CreatedToken), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)))]
async fn create_token(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ApiJson(req): ApiJson<CreateToken>,
) -> ApiResult<(StatusCode, Json<CreatedToken>)> {
    if caller.role != TokenRole::Admin {
        return Err(ApiError(ServiceError::new(
            ErrorKind::Forbidden,
            "forbidden",
            "only admin tokens may create tokens",
        )));
    }
    let role = match req.role.as_str() {
        "service" => TokenRole::Service,
        "admin" => TokenRole::Admin,
        other => {
            return Err(ApiError(ServiceError::invalid(
                "invalid_role",
                format!("role {other:?} is not one of: service, admin"),
            )))
        }
    };
    if req.name.is_empty() || req.name.len() > 128 {
        return Err(ApiError(ServiceError::invalid(
            "invalid_name",
            "name must be 1-128 characters",
        )));
    }
    let (record, secret) = app
        .tokens
        .create(&req.name, role)
        .await
        .map_err(ServiceError::internal)?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedToken {
            id: record.id,
            name: record.name,
            role: record.role.as_str().to_owned(),
            token: secret,
        }),
    ))
}
