//! `/api/v1` handlers and their OpenAPI description. API types are separate from store types.

use super::{ApiJson, ApiPath, ApiQuery, ApiResult, Caller, ErrorBody};
use crate::app::{App, DeviceView};
use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};
use mooring_api::{
    CreateDevice, CreatedDevice, Device, DeviceList, LatestMetrics, LatestValue, ListDevicesParams,
    TelemetryParams, TelemetryPoint, TelemetryPoints,
};
use mooring_store::MetricValue;
use std::sync::Arc;
use utoipa::OpenApi;

#[derive(OpenApi)]
#[openapi(
    info(title = "Mooring API", version = "1", description = "Device registry, provisioning, telemetry, commands and shadows. Every call except /healthz, /metrics, this document, /api/v1/auth/login and /api/v1/auth/password needs `Authorization: Bearer <token>` or a login session cookie (`mooring_session`; writes with the cookie also need `X-CSRF-Token`). Each route needs one permission (docs/access.md). Times are unix milliseconds."),
    paths(create_device, list_devices, get_device, delete_device, device_telemetry, device_telemetry_latest,
        super::accounts::login, super::accounts::oidc_login, super::accounts::oidc_callback, super::accounts::logout, super::accounts::me, super::accounts::set_password,
        super::accounts::create_user, super::accounts::list_users, super::accounts::get_user, super::accounts::update_user,
        super::accounts::delete_user, super::accounts::password_link, super::accounts::create_token, super::accounts::list_tokens,
        super::accounts::get_token, super::accounts::revoke_token, super::accounts::rotate_admin, super::accounts::list_audit,
        super::commands::create_command, super::commands::list_commands, super::commands::get_command,
        super::commands::cancel_command, super::commands::create_fleet_command, super::commands::get_any_command,
        super::commands::put_tags, super::commands::get_shadow, super::commands::patch_shadow,
        super::events::events, super::fleet::summary, super::fleet::history, super::health::device_health, super::health::summary,
        super::rules::create_rule, super::rules::list_rules, super::rules::get_rule, super::rules::update_rule, super::rules::delete_rule,
        super::rules::list_alerts, super::rules::get_alert, super::rules::acknowledge_alert, super::rules::resolve_alert,
        super::tickets::list_tickets, super::tickets::get_ticket, super::tickets::close_ticket, super::jobs::create_job, super::jobs::list_jobs, super::jobs::get_job, super::jobs::get_job_result, super::jobs::create_report,
        super::jobs::cancel_job, super::certs::device_certificates, super::certs::expiring_certificates,
        super::certs::revoke_device, super::certs::revoke_certificate, super::certs::rotate_certificate, super::certs::create_rotation, super::certs::get_rotation, super::certs::list_rotations,
        super::pipeline::provisioning, super::pipeline::record_installation, super::pipeline::funnel,
        super::provision::create_claim, super::provision::list_claims,
        super::provision::get_claim, super::provision::revoke_claim, super::provision::enroll,
        super::cas::register_ca, super::cas::list_cas, super::cas::disable_ca, super::cas::enable_ca,
        super::cas::fleet_cas, super::cas::begin_rollover, super::cas::retire_ca,
        super::ota::update_key, super::ota::create_artifact, super::ota::list_artifacts, super::ota::get_artifact,
        super::ota::delete_artifact, super::ota::put_content, super::ota::complete_artifact, super::ota::create_link,
        super::ota::download, super::ota::create_deployment, super::ota::list_deployments, super::ota::get_deployment,
        super::ota::cancel_deployment, super::ota::delete_deployment, super::ota::device_updates,
        super::rollouts::create_rollout, super::rollouts::list_rollouts, super::rollouts::get_rollout, super::rollouts::rollout_events, super::rollouts::rollout_stream,
        super::rollouts::pause_rollout, super::rollouts::resume_rollout, super::rollouts::abort_rollout, super::rollouts::add_rollout_devices,
        super::gateways::attach_gateway, super::gateways::get_gateway, super::gateways::detach_gateway, super::gateways::list_children, super::gateways::local_key),
    components(schemas(ErrorBody, CreateDevice, CreatedDevice, Device, DeviceList, TelemetryPoints, TelemetryPoint, LatestMetrics, LatestValue, mooring_api::CreateToken, mooring_api::CreatedToken,
        mooring_api::TokenInfo, mooring_api::TokenList, mooring_api::LoginRequest, mooring_api::LoginResponse, mooring_api::User,
        mooring_api::CreateUser, mooring_api::CreatedUser, mooring_api::UpdateUser, mooring_api::UserList, mooring_api::PasswordLink,
        mooring_api::SetPassword, mooring_api::Me, mooring_api::AuditEntry, mooring_api::AuditList,
        mooring_api::CreateCommand, mooring_api::RotateRequest, mooring_api::CreateRotation, mooring_api::Rotation, mooring_api::RotationList, mooring_api::CreateFleetCommand, mooring_api::Command, mooring_api::CommandList,
        mooring_api::HistoryEntry, mooring_api::CommandResultBody, mooring_api::FleetCommand, mooring_api::AnyCommand,
        mooring_api::Shadow, mooring_api::ShadowPatch, mooring_api::Event, mooring_api::EventBody, mooring_api::EventsReset,
        mooring_api::FleetSummary, mooring_api::VersionCount, mooring_api::DeviceHealth, mooring_api::HealthCounts,
        mooring_api::TelemetryHealth, mooring_api::BatteryHealth, mooring_api::AgentHealth, mooring_api::DiagnosticsRef,
        mooring_api::UpdateProblem, mooring_api::HealthSummary, mooring_api::HealthGroup, mooring_api::HealthAnomaly,
        mooring_api::CreateRule, mooring_api::UpdateRule, mooring_api::Rule, mooring_api::RuleList, mooring_api::Alert, mooring_api::AlertList,
        mooring_api::Ticket, mooring_api::TicketDevice, mooring_api::TicketList,
        mooring_api::CreateRollout, mooring_api::Rollout, mooring_api::RolloutWave, mooring_api::Gate, mooring_api::GateSignal, mooring_api::GateCounts,
        mooring_api::RolloutList, mooring_api::RolloutEvent, mooring_api::RolloutEventList, mooring_api::RolloutAction, mooring_api::AddRolloutDevices, mooring_api::FleetHistory, mooring_api::FleetSamplePoint,
        mooring_api::CreateJob, mooring_api::CreateReport, mooring_api::JobCommand, mooring_api::Job, mooring_api::JobErrorEntry, mooring_api::JobList,
        mooring_api::Certificate, mooring_api::CertificateList, mooring_api::RevokeRequest, mooring_api::Revoked,
        mooring_api::RecordInstallation, mooring_api::Installation, mooring_api::Provisioning, mooring_api::PipelineStep,
        mooring_api::StepState, mooring_api::StepFailure, mooring_api::Funnel, mooring_api::FunnelStage,
        mooring_api::CreateClaim, mooring_api::Claim, mooring_api::CreatedClaim, mooring_api::ClaimList,
        mooring_api::EnrollRequest, mooring_api::EnrollResponse,
        mooring_api::RegisterCa, mooring_api::Ca, mooring_api::CaList,
        mooring_api::FleetCa, mooring_api::FleetCas, mooring_api::BeginRollover, mooring_api::RetireCa,
        mooring_api::RetiredCa, mooring_api::CreateArtifact, mooring_api::Artifact, mooring_api::ArtifactList,
        mooring_api::CompleteArtifact, mooring_api::CreateLink, mooring_api::DownloadLink, mooring_api::UpdateKeyInfo,
        mooring_api::CreateDeployment, mooring_api::Deployment, mooring_api::DeploymentList, mooring_api::DeviceUpdate, mooring_api::DeviceUpdates,
        mooring_api::AttachGateway, mooring_api::GatewayAttachment, mooring_api::GatewayChild, mooring_api::GatewayChildren, mooring_api::LocalKeyView)),
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
            installation: v
                .record
                .installation
                .map(crate::pipeline::installation_body),
            version: v.version,
        }
    }
}

fn value_json(v: MetricValue) -> serde_json::Value {
    v.to_json()
}

#[utoipa::path(post, path = "/api/v1/devices", request_body = CreateDevice,
    responses((status = 201, body = CreatedDevice), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(super) async fn create_device(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ApiJson(req): ApiJson<CreateDevice>,
) -> ApiResult<(StatusCode, Json<CreatedDevice>)> {
    let (record, issued) = app
        .registry
        .create_device(&caller.access, &req.id, req.tags, req.csr_pem.as_deref())
        .await?;
    let device = Device::from(DeviceView {
        record,
        online: false,
        last_seen_ms: None,
        version: None,
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
pub(super) async fn list_devices(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ApiQuery(p): ApiQuery<ListDevicesParams>,
) -> ApiResult<Json<DeviceList>> {
    let (devices, next_cursor) = match p.selector.as_deref() {
        None => {
            app.registry
                .list_devices(&caller.access, p.limit, p.cursor.as_deref())
                .await?
        }
        Some(sel) => {
            app.registry
                .list_selected_devices(&caller.access, sel, p.limit, p.cursor.as_deref())
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
pub(super) async fn get_device(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<Device>> {
    Ok(Json(
        app.registry.get_device(&caller.access, &id).await?.into(),
    ))
}

#[utoipa::path(delete, path = "/api/v1/devices/{id}", params(("id" = String, Path)),
    responses((status = 204, description = "deleted; its certificate is refused and a live session closed"), (status = 404, body = ErrorBody)))]
pub(super) async fn delete_device(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<StatusCode> {
    app.registry.delete_device(&caller.access, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/api/v1/devices/{id}/telemetry", params(("id" = String, Path), TelemetryParams),
    responses((status = 200, body = TelemetryPoints), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(super) async fn device_telemetry(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(p): ApiQuery<TelemetryParams>,
) -> ApiResult<Json<TelemetryPoints>> {
    let named = p.metric.is_some();
    let points = app
        .telemetry
        .query(&caller.access, &id, p.metric, p.from, p.to, p.limit)
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
pub(super) async fn device_telemetry_latest(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<LatestMetrics>> {
    let latest = app.telemetry.latest(&caller.access, &id).await?;
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
