//! `/api/v1` handlers for commands, fleet commands, tags and shadows, with their OpenAPI types.

use super::{ApiError, ApiJson, ApiPath, ApiQuery, ApiResult, ErrorBody};
use crate::app::App;
use crate::commands::{FleetCommandView, NewCommand};
use crate::error::ServiceError;
use crate::shadow::ShadowView;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use mooring_store::{CommandRecord, CommandState};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;
use utoipa::{IntoParams, ToSchema};

pub fn routes() -> Router<Arc<App>> {
    Router::new()
        .route(
            "/api/v1/devices/{id}/commands",
            post(create_command).get(list_commands),
        )
        .route("/api/v1/devices/{id}/commands/{cmd}", get(get_command))
        .route(
            "/api/v1/devices/{id}/commands/{cmd}/cancel",
            post(cancel_command),
        )
        .route("/api/v1/commands", post(create_fleet_command))
        .route("/api/v1/commands/{id}", get(get_any_command))
        .route("/api/v1/devices/{id}/tags", put(put_tags))
        .route(
            "/api/v1/devices/{id}/shadow",
            get(get_shadow).patch(patch_shadow),
        )
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateCommand {
    /// `[A-Za-z0-9_.-]{1,64}`, starting with a letter or digit, e.g. `reboot`.
    pub name: String,
    /// Any JSON (at most 64 KiB encoded); passed to the device as is.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub params: serde_json::Value,
    /// Seconds until the command expires if it has not run (default from `[commands]`, at most 30 days).
    pub ttl_secs: Option<u64>,
    /// Deliveries without an acknowledgement before it fails (default 5, at most 100).
    pub max_attempts: Option<u32>,
    /// Same key for the same device: the existing command is returned (200), none is created.
    pub idempotency_key: Option<String>,
    /// Seconds an acknowledged command may wait for its result before it fails with reason
    /// `timeout` (0: no limit; default `commands.default_result_timeout_secs`, 3600; at most 7 days).
    pub result_timeout_secs: Option<u64>,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateFleetCommand {
    /// Which devices, e.g. `tag:site=berlin and online`, `d1,d2`, `version=1.4.0`.
    pub selector: String,
    pub name: String,
    #[serde(default)]
    #[schema(value_type = Object)]
    pub params: serde_json::Value,
    pub ttl_secs: Option<u64>,
    pub max_attempts: Option<u32>,
    /// As for one device's command.
    pub result_timeout_secs: Option<u64>,
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct WaitParams {
    /// Wait up to this many ms (0..=30000) for a final state before answering.
    pub wait_ms: Option<u64>,
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct CommandListParams {
    /// Only commands in this state.
    pub state: Option<String>,
    /// Page size, 1..=1000 (default 100).
    pub limit: Option<usize>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct HistoryEntry {
    pub state: String,
    /// Unix ms.
    pub at: u64,
}

#[derive(Serialize, ToSchema)]
pub struct CommandResultBody {
    /// `succeeded` or `failed`.
    pub status: String,
    #[schema(value_type = Object)]
    pub output: serde_json::Value,
}

#[derive(Serialize, ToSchema)]
pub struct Command {
    pub id: String,
    pub device_id: String,
    pub name: String,
    #[schema(value_type = Object)]
    pub params: serde_json::Value,
    /// queued, delivered, acknowledged, succeeded, failed, expired or canceled.
    pub state: String,
    /// Deliveries to the device so far.
    pub attempts: u32,
    pub max_attempts: u32,
    pub created_at: u64,
    pub expires_at: u64,
    /// The fleet command this belongs to.
    pub parent_id: Option<String>,
    pub idempotency_key: Option<String>,
    pub history: Vec<HistoryEntry>,
    pub result: Option<CommandResultBody>,
    /// Seconds it may stay acknowledged without a result before it fails with `timeout` (0: no
    /// limit). A result that comes later is kept as `result.output.late_result`.
    pub result_timeout_secs: u64,
}

impl From<CommandRecord> for Command {
    fn from(r: CommandRecord) -> Self {
        Command {
            id: r.id,
            device_id: r.device_id,
            name: r.name,
            params: r.params,
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
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct CommandList {
    /// Newest first.
    pub commands: Vec<Command>,
    pub next_cursor: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct FleetCommand {
    pub id: String,
    /// The selector as parsed (normalised).
    pub selector: String,
    pub name: String,
    #[schema(value_type = Object)]
    pub params: serde_json::Value,
    pub created_at: u64,
    pub expires_at: u64,
    /// Device commands created.
    pub total: u64,
    /// Device commands per state (every state listed, 0 if none).
    pub counts: BTreeMap<String, u64>,
    /// Every device command is in a final state.
    pub done: bool,
}

impl From<FleetCommandView> for FleetCommand {
    fn from(v: FleetCommandView) -> Self {
        FleetCommand {
            id: v.parent.id,
            selector: v.parent.selector,
            name: v.parent.name,
            params: v.parent.params,
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

#[derive(Serialize, ToSchema)]
pub struct Shadow {
    #[schema(value_type = Object)]
    pub desired: serde_json::Map<String, serde_json::Value>,
    #[schema(value_type = Object)]
    pub reported: serde_json::Map<String, serde_json::Value>,
    /// Bumped on every change; send it back as `If-Match`.
    pub version: u64,
    /// Desired keys whose value differs from reported; `{}` when in sync.
    #[schema(value_type = Object)]
    pub delta: serde_json::Map<String, serde_json::Value>,
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

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ShadowPatch {
    /// JSON merge patch (RFC 7396) applied to desired: objects merge, `null` deletes a key.
    #[schema(value_type = Object)]
    pub desired: serde_json::Value,
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
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(super) async fn create_command(
    State(app): State<Arc<App>>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(w): ApiQuery<WaitParams>,
    ApiJson(req): ApiJson<CreateCommand>,
) -> ApiResult<(StatusCode, Json<Command>)> {
    let c = new_command(
        req.name,
        req.params,
        req.ttl_secs,
        req.max_attempts,
        req.idempotency_key,
        req.result_timeout_secs,
    );
    let (created, record) = app.commands.create_command(&id, c, w.wait_ms).await?;
    let status = if created {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(record.into())))
}

#[utoipa::path(get, path = "/api/v1/devices/{id}/commands", params(("id" = String, Path), CommandListParams),
    responses((status = 200, body = CommandList), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(super) async fn list_commands(
    State(app): State<Arc<App>>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(p): ApiQuery<CommandListParams>,
) -> ApiResult<Json<CommandList>> {
    let (records, next_cursor) = app
        .commands
        .list_commands(&id, p.state.as_deref(), p.limit, p.cursor.as_deref())
        .await?;
    Ok(Json(CommandList {
        commands: records.into_iter().map(Command::from).collect(),
        next_cursor,
    }))
}

#[utoipa::path(get, path = "/api/v1/devices/{id}/commands/{cmd}", params(("id" = String, Path), ("cmd" = String, Path), WaitParams),
    responses((status = 200, body = Command), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(super) async fn get_command(
    State(app): State<Arc<App>>,
    ApiPath((id, cmd)): ApiPath<(String, String)>,
    ApiQuery(w): ApiQuery<WaitParams>,
) -> ApiResult<Json<Command>> {
    Ok(Json(
        app.commands.get_command(&id, &cmd, w.wait_ms).await?.into(),
    ))
}

#[utoipa::path(post, path = "/api/v1/devices/{id}/commands/{cmd}/cancel", params(("id" = String, Path), ("cmd" = String, Path)),
    responses((status = 200, body = Command), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody, description = "already acknowledged or final")))]
pub(super) async fn cancel_command(
    State(app): State<Arc<App>>,
    ApiPath((id, cmd)): ApiPath<(String, String)>,
) -> ApiResult<Json<Command>> {
    Ok(Json(app.commands.cancel_command(&id, &cmd).await?.into()))
}

#[utoipa::path(post, path = "/api/v1/commands", request_body = CreateFleetCommand,
    responses((status = 202, body = FleetCommand), (status = 400, body = ErrorBody)))]
pub(super) async fn create_fleet_command(
    State(app): State<Arc<App>>,
    ApiJson(req): ApiJson<CreateFleetCommand>,
) -> ApiResult<(StatusCode, Json<FleetCommand>)> {
    let c = new_command(
        req.name,
        req.params,
        req.ttl_secs,
        req.max_attempts,
        None,
        req.result_timeout_secs,
    );
    let view = app.commands.create_fleet_command(&req.selector, c).await?;
    Ok((StatusCode::ACCEPTED, Json(view.into())))
}

/// A fleet command (`f...`) with its aggregate status, or a single device command (`c...`).
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
pub enum AnyCommand {
    Fleet(FleetCommand),
    Device(Command),
}

#[utoipa::path(get, path = "/api/v1/commands/{id}", params(("id" = String, Path)),
    responses((status = 200, body = AnyCommand, description = "a fleet command with counts per state, or a device command"), (status = 404, body = ErrorBody)))]
pub(super) async fn get_any_command(
    State(app): State<Arc<App>>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<AnyCommand>> {
    if let Some(v) = app.commands.fleet_command(&id).await? {
        return Ok(Json(AnyCommand::Fleet(v.into())));
    }
    match app.commands.find_command(&id).await? {
        Some(r) => Ok(Json(AnyCommand::Device(r.into()))),
        None => Err(ApiError(ServiceError::not_found(
            "command_not_found",
            format!("command {id} not found"),
        ))),
    }
}

#[utoipa::path(put, path = "/api/v1/devices/{id}/tags", params(("id" = String, Path)),
    request_body(content = BTreeMap<String, String>, description = "all tags (replaces the current ones)"),
    responses((status = 200, body = super::api::Device), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(super) async fn put_tags(
    State(app): State<Arc<App>>,
    ApiPath(id): ApiPath<String>,
    ApiJson(tags): ApiJson<BTreeMap<String, String>>,
) -> ApiResult<Json<super::api::Device>> {
    Ok(Json(app.registry.set_tags(&id, tags).await?.into()))
}

#[utoipa::path(get, path = "/api/v1/devices/{id}/shadow", params(("id" = String, Path)),
    responses((status = 200, body = Shadow, headers(("ETag" = String, description = "the version, quoted"))), (status = 404, body = ErrorBody)))]
pub(super) async fn get_shadow(
    State(app): State<Arc<App>>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Response> {
    Ok(shadow_response(app.shadows.get(&id).await?))
}

#[utoipa::path(patch, path = "/api/v1/devices/{id}/shadow", request_body = ShadowPatch,
    params(("id" = String, Path), ("If-Match" = Option<String>, Header, description = "apply only if the shadow is at this version")),
    responses((status = 200, body = Shadow, headers(("ETag" = String))), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 412, body = ErrorBody, description = "version_mismatch: the shadow changed since that version")))]
pub(super) async fn patch_shadow(
    State(app): State<Arc<App>>,
    ApiPath(id): ApiPath<String>,
    headers: HeaderMap,
    ApiJson(req): ApiJson<ShadowPatch>,
) -> ApiResult<Response> {
    let expected = if_match(&headers)?;
    Ok(shadow_response(
        app.shadows
            .patch_desired(&id, req.desired, expected)
            .await?,
    ))
}
