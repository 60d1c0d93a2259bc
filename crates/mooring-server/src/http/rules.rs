//! `/api/v1/rules` and `/api/v1/alerts` (docs/health.md "Rules" and "Alerts").

use super::jobs::creator;
use super::{ApiJson, ApiPath, ApiQuery, ApiResult, Caller, ErrorBody};
use crate::app::App;
use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};
use mooring_api::{Alert, AlertList, AlertListParams, CreateRule, Rule, RuleList, UpdateRule};
use std::sync::Arc;

#[utoipa::path(post, path = "/api/v1/rules", request_body = CreateRule,
    responses((status = 201, body = Rule, description = "created; every node evaluates it within [rules] reload_interval_ms"),
        (status = 400, body = ErrorBody, description = "invalid_rule (the message names the column of the error), invalid_name, invalid_selector, unsupported_action (job:, or nats: without a cluster on NATS), unknown_webhook"),
        (status = 403, body = ErrorBody, description = "a command action without commands.write"),
        (status = 409, body = ErrorBody, description = "rule_exists, too_many_rules")))]
pub(super) async fn create_rule(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ApiJson(req): ApiJson<CreateRule>,
) -> ApiResult<(StatusCode, Json<Rule>)> {
    let c = creator(&caller);
    let rule = app
        .rules
        .create(&caller.access, c.role, &c.name, req)
        .await?;
    Ok((StatusCode::CREATED, Json(rule)))
}

#[utoipa::path(get, path = "/api/v1/rules",
    responses((status = 200, body = RuleList, description = "by name; a scoped caller sees the rules made within its scope")))]
pub(super) async fn list_rules(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<Json<RuleList>> {
    Ok(Json(RuleList {
        rules: app.rules.list(&caller.access).await?,
    }))
}

#[utoipa::path(get, path = "/api/v1/rules/{id}", params(("id" = String, Path)),
    responses((status = 200, body = Rule), (status = 404, body = ErrorBody)))]
pub(super) async fn get_rule(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<Rule>> {
    Ok(Json(app.rules.get(&caller.access, &id).await?))
}

#[utoipa::path(patch, path = "/api/v1/rules/{id}", params(("id" = String, Path)), request_body = UpdateRule,
    responses((status = 200, body = Rule, description = "enabled or disabled"), (status = 404, body = ErrorBody)))]
pub(super) async fn update_rule(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<UpdateRule>,
) -> ApiResult<Json<Rule>> {
    Ok(Json(
        app.rules
            .set_enabled(&caller.access, &id, req.enabled)
            .await?,
    ))
}

#[utoipa::path(delete, path = "/api/v1/rules/{id}", params(("id" = String, Path)),
    responses((status = 204, description = "deleted; its open alerts are resolved (resolved_by rule_deleted)"),
        (status = 404, body = ErrorBody)))]
pub(super) async fn delete_rule(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<StatusCode> {
    app.rules.delete(&caller.access, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/api/v1/alerts", params(AlertListParams),
    responses((status = 200, body = AlertList, description = "newest first; a scoped caller sees the alerts of its devices"),
        (status = 400, body = ErrorBody, description = "invalid_state, invalid_limit")))]
pub(super) async fn list_alerts(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ApiQuery(p): ApiQuery<AlertListParams>,
) -> ApiResult<Json<AlertList>> {
    let (alerts, next_cursor) = app.rules.list_alerts(&caller.access, &p).await?;
    Ok(Json(AlertList {
        alerts,
        next_cursor,
    }))
}

#[utoipa::path(get, path = "/api/v1/alerts/{id}", params(("id" = String, Path)),
    responses((status = 200, body = Alert), (status = 404, body = ErrorBody)))]
pub(super) async fn get_alert(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<Alert>> {
    Ok(Json(app.rules.get_alert(&caller.access, &id).await?))
}

#[utoipa::path(post, path = "/api/v1/alerts/{id}/acknowledge", params(("id" = String, Path)),
    responses((status = 200, body = Alert, description = "acknowledged (an acknowledged alert is returned as it is)"),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody, description = "alert_resolved")))]
pub(super) async fn acknowledge_alert(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<Alert>> {
    let by = creator(&caller).name;
    Ok(Json(app.rules.acknowledge(&caller.access, &id, &by).await?))
}

#[utoipa::path(post, path = "/api/v1/alerts/{id}/resolve", params(("id" = String, Path)),
    responses((status = 200, body = Alert, description = "resolved (a resolved alert is returned as it is)"),
        (status = 404, body = ErrorBody)))]
pub(super) async fn resolve_alert(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<Alert>> {
    let by = creator(&caller).name;
    Ok(Json(app.rules.resolve(&caller.access, &id, &by).await?))
}
