//! `/api/v1/rollouts` (docs/ota.md "Rollouts").

use super::{ApiError, ApiJson, ApiPath, ApiQuery, ApiResult, Caller, ErrorBody};
use crate::app::App;
use crate::error::ServiceError;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::{Extension, Json};
use futures::Stream;
use mooring_api::{
    AddRolloutDevices, CreateRollout, PageParams, Rollout, RolloutAction, RolloutEventList,
    RolloutList,
};
use serde::Deserialize;
use std::convert::Infallible;
use std::sync::Arc;

#[utoipa::path(post, path = "/api/v1/rollouts", request_body = CreateRollout,
    responses((status = 201, body = Rollout, description = "stored; the controller starts its first wave at its next tick"),
        (status = 400, body = ErrorBody, description = "invalid_rollout (with the field and why), invalid_selector, no_matching_devices, too_many_devices"),
        (status = 404, body = ErrorBody, description = "artifact_not_found"), (status = 409, body = ErrorBody, description = "artifact_not_ready"),
        (status = 503, body = ErrorBody, description = "too_many_rollouts: [rollouts] rollouts_max are stored")))]
pub(super) async fn create_rollout(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ApiJson(req): ApiJson<CreateRollout>,
) -> ApiResult<(StatusCode, Json<Rollout>)> {
    let r = app
        .rollouts
        .create(&caller.access, &caller.actor(), req)
        .await?;
    Ok((StatusCode::CREATED, Json(r)))
}

#[utoipa::path(get, path = "/api/v1/rollouts", params(PageParams),
    responses((status = 200, body = RolloutList, description = "newest first; a scoped caller sees the rollouts whose target carries its scope"),
        (status = 400, body = ErrorBody, description = "invalid_limit, invalid_cursor")))]
pub(super) async fn list_rollouts(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ApiQuery(p): ApiQuery<PageParams>,
) -> ApiResult<Json<RolloutList>> {
    let (rollouts, next_cursor) = app
        .rollouts
        .list(&caller.access, p.cursor.as_deref(), p.limit)
        .await?;
    Ok(Json(RolloutList {
        rollouts,
        next_cursor,
    }))
}

#[utoipa::path(get, path = "/api/v1/rollouts/{id}", params(("id" = String, Path)),
    responses((status = 200, body = Rollout, description = "its waves' progress and the last gate comparison"),
        (status = 404, body = ErrorBody, description = "rollout_not_found")))]
pub(super) async fn get_rollout(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<Rollout>> {
    Ok(Json(app.rollouts.get(&caller.access, &id).await?))
}

/// `?after=&limit=` of the event log.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct EventParams {
    /// Events after this `seq` (default 0: from the oldest kept).
    after: Option<u64>,
    /// 1..=1000 (default 1000).
    limit: Option<usize>,
}

#[utoipa::path(get, path = "/api/v1/rollouts/{id}/events", params(("id" = String, Path), EventParams),
    responses((status = 200, body = RolloutEventList, description = "oldest first: every change with who made it"),
        (status = 404, body = ErrorBody, description = "rollout_not_found")))]
pub(super) async fn rollout_events(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(p): ApiQuery<EventParams>,
) -> ApiResult<Json<RolloutEventList>> {
    let events = app
        .rollouts
        .events(&caller.access, &id, p.after.unwrap_or(0), p.limit)
        .await?;
    Ok(Json(RolloutEventList { events }))
}

#[utoipa::path(get, path = "/api/v1/rollouts/{id}/stream", params(("id" = String, Path)),
    responses((status = 200, content_type = "text/event-stream", body = Rollout,
            description = "Server-Sent Events: `event: rollout`, `data: <Rollout JSON>` at once and whenever it changes (read every second); the stream ends after the rollout completes or aborts, or when the caller's credentials no longer hold"),
        (status = 404, body = ErrorBody, description = "rollout_not_found"),
        (status = 429, body = ErrorBody, description = "too_many_streams: the caller holds 8 rollout streams on this node"),
        (status = 503, body = ErrorBody, description = "too_many_streams: this node serves 256 rollout streams")))]
pub(super) async fn rollout_stream(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Sse<impl Stream<Item = Result<Event, Infallible>>>> {
    let first = app.rollouts.get(&caller.access, &id).await?;
    let slot = app.rollouts.open_stream(caller.principal())?;
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(
        crate::rollouts::STREAM_POLL_MS,
    ));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.reset();
    // (app, caller, id, the JSON last sent, over, the tick, the slot): the first frame is sent
    // at once, then each change; after a final state is sent the stream ends.
    let state = (
        app,
        caller,
        id,
        Some(first),
        String::new(),
        false,
        tick,
        slot,
    );
    let stream = futures::stream::unfold(
        state,
        |(app, caller, id, mut next, mut last, over, mut tick, slot)| async move {
            loop {
                if over {
                    return None;
                }
                if let Some(r) = next.take() {
                    let done = matches!(r.state.as_str(), "completed" | "aborted");
                    let json = serde_json::to_string(&r).unwrap_or_default();
                    if json != last {
                        last.clone_from(&json);
                        let frame = Event::default().event("rollout").data(json);
                        return Some((Ok(frame), (app, caller, id, None, last, done, tick, slot)));
                    }
                    if done {
                        return None;
                    }
                }
                tick.tick().await;
                if !caller.still_valid(&app).await {
                    return None;
                }
                match app.rollouts.get(&caller.access, &id).await {
                    Ok(r) => next = Some(r),
                    Err(_) => return None,
                }
            }
        },
    );
    Ok(Sse::new(stream).keep_alive(axum::response::sse::KeepAlive::default()))
}

/// The optional body of pause, resume and abort (none: no note).
fn action(body: &[u8]) -> Result<RolloutAction, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(RolloutAction::default());
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError(ServiceError::invalid("invalid_body", e.to_string())))
}

#[utoipa::path(post, path = "/api/v1/rollouts/{id}/pause", params(("id" = String, Path)), request_body = RolloutAction,
    responses((status = 200, body = Rollout, description = "paused: no device starts until it is resumed"),
        (status = 404, body = ErrorBody, description = "rollout_not_found"), (status = 409, body = ErrorBody, description = "rollout_over: aborted or completed")))]
pub(super) async fn pause_rollout(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
    body: axum::body::Bytes,
) -> ApiResult<Json<Rollout>> {
    let a = action(&body)?;
    Ok(Json(
        app.rollouts
            .pause(&caller.access, &caller.actor(), &id, a.reason)
            .await?,
    ))
}

#[utoipa::path(post, path = "/api/v1/rollouts/{id}/resume", params(("id" = String, Path)), request_body = RolloutAction,
    responses((status = 200, body = Rollout, description = "running again; after a failed gate, on to the next wave"),
        (status = 404, body = ErrorBody, description = "rollout_not_found"), (status = 409, body = ErrorBody, description = "rollout_over: aborted or completed")))]
pub(super) async fn resume_rollout(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
    body: axum::body::Bytes,
) -> ApiResult<Json<Rollout>> {
    let a = action(&body)?;
    Ok(Json(
        app.rollouts
            .resume(&caller.access, &caller.actor(), &id, a.reason)
            .await?,
    ))
}

#[utoipa::path(post, path = "/api/v1/rollouts/{id}/abort", params(("id" = String, Path)), request_body = RolloutAction,
    responses((status = 200, body = Rollout, description = "aborted: its deployment canceled; with rollback, a rollout of the previous version for the devices that committed"),
        (status = 404, body = ErrorBody, description = "rollout_not_found"), (status = 409, body = ErrorBody, description = "rollout_over: completed")))]
pub(super) async fn abort_rollout(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
    body: axum::body::Bytes,
) -> ApiResult<Json<Rollout>> {
    let a = action(&body)?;
    Ok(Json(
        app.rollouts
            .abort(&caller.access, &caller.actor(), &id, a.reason, a.rollback)
            .await?,
    ))
}

#[utoipa::path(post, path = "/api/v1/rollouts/{id}/devices", params(("id" = String, Path)), request_body = AddRolloutDevices,
    responses((status = 200, body = Rollout, description = "the devices the selector matches now added, each in the wave the rollout's order gives it"),
        (status = 400, body = ErrorBody, description = "invalid_selector, no_matching_devices, too_many_devices"),
        (status = 404, body = ErrorBody, description = "rollout_not_found"), (status = 409, body = ErrorBody, description = "rollout_over")))]
pub(super) async fn add_rollout_devices(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<AddRolloutDevices>,
) -> ApiResult<Json<Rollout>> {
    Ok(Json(
        app.rollouts
            .add_devices(&caller.access, &caller.actor(), &id, &req.selector)
            .await?,
    ))
}
