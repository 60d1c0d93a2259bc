//! `/api/v1` handlers for commands, fleet commands, tags and shadows, with their OpenAPI types.

use super::{ApiError, ApiJson, ApiPath, ApiQuery, ApiResult, Caller, ErrorBody};
use crate::app::App;
use crate::commands::{FleetCommandView, NewCommand};
use crate::error::ServiceError;
use crate::shadow::ShadowView;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use mooring_api::{
    AnyCommand, Command, CommandList, CommandListParams, CommandResultBody, CreateCommand,
    CreateFleetCommand, FleetCommand, HistoryEntry, Shadow, ShadowPatch, WaitParams,
};
use mooring_store::{CommandRecord, CommandState};
use std::collections::BTreeMap;
use std::sync::Arc;

/// A stored command as the API shows it (an update's download token redacted: only the device
/// gets it).
pub(super) fn command_body(r: CommandRecord) -> Command {
    Command {
        id: r.id,
        device_id: r.device_id.into_string(),
        params: crate::ota::redacted_params(&r.name, r.params),
        name: r.name,
        state: r.state.as_str().to_owned(),
        attempts: r.attempts,
        max_attempts: r.max_attempts,
        created_at: r.created_at_ms,
        expires_at: r.expires_at_ms,
        parent_id: r.parent_id,
        idempotency_key: r.idempotency_key,
        history: r
            .history
            .into_iter()
            .map(|(s, at)| HistoryEntry {
                state: s.as_str().to_owned(),
                at,
            })
            .collect(),
        result: r.result.map(|o| CommandResultBody {
            status: if o.succeeded { "succeeded" } else { "failed" }.to_owned(),
            output: o.output,
        }),
        result_timeout_secs: r.result_timeout_ms / 1000,
        origin: if r.synced_at_ms.is_some() {
            "local"
        } else {
            "cloud"
        }
        .to_owned(),
        synced_at: r.synced_at_ms,
    }
}

impl From<FleetCommandView> for FleetCommand {
    fn from(v: FleetCommandView) -> Self {
        FleetCommand {
            id: v.parent.id,
            selector: v.parent.selector,
            params: crate::ota::redacted_params(&v.parent.name, v.parent.params),
            name: v.parent.name,
            created_at: v.parent.created_at_ms,
            expires_at: v.parent.expires_at_ms,
            total: v.parent.total,
            counts: CommandState::ALL
                .iter()
                .map(|s| (s.as_str().to_owned(), v.counts.get(s).copied().unwrap_or(0)))
                .collect(),
            done: v.done,
        }
    }
}

impl From<ShadowView> for Shadow {
    fn from(v: ShadowView) -> Self {
        Shadow {
            desired: v.desired,
            reported: v.reported,
            version: v.version,
            delta: v.delta,
        }
    }
}

fn shadow_response(v: ShadowView) -> Response {
    let etag = HeaderValue::from_str(&format!("\"{}\"", v.version));
    let mut resp = Json(Shadow::from(v)).into_response();
    if let Ok(etag) = etag {
        resp.headers_mut().insert(header::ETAG, etag);
    }
    resp
}

/// `If-Match: 3`, `"3"` or `W/"3"`.
fn if_match(headers: &HeaderMap) -> ApiResult<Option<u64>> {
    let Some(v) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    let text = v.to_str().unwrap_or("").trim();
    let text = text.strip_prefix("W/").unwrap_or(text).trim_matches('"');
    text.parse::<u64>().map(Some).map_err(|_| {
        ApiError(ServiceError::invalid(
            "invalid_if_match",
            "If-Match must be the shadow version, e.g. If-Match: \"3\"",
        ))
    })
}

/// Command names under `mooring.` are the server's own (`mooring.update`, `mooring.update.cancel`,
/// `mooring.cert.rotate`): made only by their services (a deployment, a rotation), each with its
/// own checks and records. A client asking for one by name would bypass them (an update with no
/// deployment behind it, from any URL, with `allow_downgrade`).
fn check_not_reserved(name: &str) -> Result<(), ServiceError> {
    if name.starts_with(RESERVED_PREFIX) {
        return Err(ServiceError::invalid(
            "reserved_command_name",
            format!(
                "command names starting with {RESERVED_PREFIX:?} are the server's own: use `mooring ota deploy` (POST /api/v1/ota/deployments) for updates, `mooring cert rotate` (POST .../certificates/rotate) for rotations"
            ),
        ));
    }
    Ok(())
}

/// The prefix of the server's own command names.
pub const RESERVED_PREFIX: &str = "mooring.";

fn new_command(
    name: String,
    params: serde_json::Value,
    ttl_secs: Option<u64>,
    max_attempts: Option<u32>,
    idempotency_key: Option<String>,
    result_timeout_secs: Option<u64>,
) -> NewCommand {
    NewCommand {
        name,
        params,
        ttl_secs,
        max_attempts,
        idempotency_key,
        result_timeout_secs,
    }
}

#[utoipa::path(post, path = "/api/v1/devices/{id}/commands", request_body = CreateCommand,
    params(("id" = String, Path), WaitParams),
    responses((status = 202, body = Command, description = "created"), (status = 200, body = Command, description = "an earlier command with this idempotency_key"),
        (status = 400, body = ErrorBody, description = "invalid_command_name, reserved_command_name (`mooring.*`), ..."), (status = 404, body = ErrorBody)))]
pub(super) async fn create_command(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(w): ApiQuery<WaitParams>,
    ApiJson(req): ApiJson<CreateCommand>,
) -> ApiResult<(StatusCode, Json<Command>)> {
    check_not_reserved(&req.name)?;
    let c = new_command(
        req.name,
        req.params,
        req.ttl_secs,
        req.max_attempts,
        req.idempotency_key,
        req.result_timeout_secs,
    );
    let (created, record) = app
        .commands
        .create_command(&caller.access, &id, c, w.wait_ms)
        .await?;
    let status = if created {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(command_body(record))))
}

#[utoipa::path(get, path = "/api/v1/devices/{id}/commands", params(("id" = String, Path), CommandListParams),
    responses((status = 200, body = CommandList), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(super) async fn list_commands(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(p): ApiQuery<CommandListParams>,
) -> ApiResult<Json<CommandList>> {
    let (records, next_cursor) = app
        .commands
        .list_commands(
            &caller.access,
            &id,
            p.state.as_deref(),
            p.limit,
            p.cursor.as_deref(),
        )
        .await?;
    Ok(Json(CommandList {
        commands: records.into_iter().map(command_body).collect(),
        next_cursor,
    }))
}

#[utoipa::path(get, path = "/api/v1/devices/{id}/commands/{cmd}", params(("id" = String, Path), ("cmd" = String, Path), WaitParams),
    responses((status = 200, body = Command), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(super) async fn get_command(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ApiPath((id, cmd)): ApiPath<(String, String)>,
    ApiQuery(w): ApiQuery<WaitParams>,
) -> ApiResult<Json<Command>> {
    Ok(Json(command_body(
        app.commands
            .get_command(&caller.access, &id, &cmd, w.wait_ms)
            .await?,
    )))
}

#[utoipa::path(post, path = "/api/v1/devices/{id}/commands/{cmd}/cancel", params(("id" = String, Path), ("cmd" = String, Path)),
    responses((status = 200, body = Command), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody, description = "already acknowledged or final")))]
pub(super) async fn cancel_command(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ApiPath((id, cmd)): ApiPath<(String, String)>,
) -> ApiResult<Json<Command>> {
    Ok(Json(command_body(
        app.commands
            .cancel_command(&caller.access, &id, &cmd)
            .await?,
    )))
}

#[utoipa::path(post, path = "/api/v1/commands", request_body = CreateFleetCommand,
    responses((status = 202, body = FleetCommand), (status = 400, body = ErrorBody, description = "invalid_command_name, reserved_command_name (`mooring.*`), ...")))]
pub(super) async fn create_fleet_command(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ApiJson(req): ApiJson<CreateFleetCommand>,
) -> ApiResult<(StatusCode, Json<FleetCommand>)> {
    check_not_reserved(&req.name)?;
    let c = new_command(
        req.name,
        req.params,
        req.ttl_secs,
        req.max_attempts,
        None,
        req.result_timeout_secs,
    );
    let view = app
        .commands
        .create_fleet_command(&caller.access, &req.selector, c)
        .await?;
    Ok((StatusCode::ACCEPTED, Json(view.into())))
}

#[utoipa::path(get, path = "/api/v1/commands/{id}", params(("id" = String, Path)),
    responses((status = 200, body = AnyCommand, description = "a fleet command with counts per state, or a device command"), (status = 404, body = ErrorBody)))]
pub(super) async fn get_any_command(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<AnyCommand>> {
    if let Some(v) = app.commands.fleet_command(&caller.access, &id).await? {
        return Ok(Json(AnyCommand::Fleet(v.into())));
    }
    match app.commands.find_command(&caller.access, &id).await? {
        Some(r) => Ok(Json(AnyCommand::Device(command_body(r)))),
        None => Err(ApiError(ServiceError::not_found(
            "command_not_found",
            format!("command {id} not found"),
        ))),
    }
}

#[utoipa::path(put, path = "/api/v1/devices/{id}/tags", params(("id" = String, Path)),
    request_body(content = BTreeMap<String, String>, description = "all tags (replaces the current ones)"),
    responses((status = 200, body = mooring_api::Device), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(super) async fn put_tags(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
    ApiJson(tags): ApiJson<BTreeMap<String, String>>,
) -> ApiResult<Json<mooring_api::Device>> {
    Ok(Json(
        app.registry
            .set_tags(&caller.access, &id, tags)
            .await?
            .into(),
    ))
}

#[utoipa::path(get, path = "/api/v1/devices/{id}/shadow", params(("id" = String, Path)),
    responses((status = 200, body = Shadow, headers(("ETag" = String, description = "the version, quoted"))), (status = 404, body = ErrorBody)))]
pub(super) async fn get_shadow(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Response> {
    Ok(shadow_response(app.shadows.get(&caller.access, &id).await?))
}

#[utoipa::path(patch, path = "/api/v1/devices/{id}/shadow", request_body = ShadowPatch,
    params(("id" = String, Path), ("If-Match" = Option<String>, Header, description = "apply only if the shadow is at this version")),
    responses((status = 200, body = Shadow, headers(("ETag" = String))), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 412, body = ErrorBody, description = "version_mismatch: the shadow changed since that version")))]
pub(super) async fn patch_shadow(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
    headers: HeaderMap,
    ApiJson(req): ApiJson<ShadowPatch>,
) -> ApiResult<Response> {
    let expected = if_match(&headers)?;
    Ok(shadow_response(
        app.shadows
            .patch_desired(&caller.access, &id, req.desired, expected)
            .await?,
    ))
}
