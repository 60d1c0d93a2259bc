//! `/api/v1/jobs` handlers: bulk actions on a selection of devices, run in the background.

use super::{ApiJson, ApiPath, ApiQuery, ApiResult, Caller, CallerKind, ErrorBody};
use crate::app::App;
use crate::jobs::{Creator, JobAction, JobCommand};
use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};
use mooring_api::{CreateJob, Job, JobErrorEntry, JobList, JobListParams};
use mooring_store::JobRecord;
use std::sync::Arc;

/// A stored job as the API shows it.
pub(super) fn job_body(j: JobRecord) -> Job {
    Job {
        id: j.id,
        action: j.action,
        selector: j.selector,
        params: j.params,
        state: j.state.as_str().to_owned(),
        total: j.total,
        done: j.done,
        failed: j.failed,
        errors: j
            .errors
            .into_iter()
            .map(|e| JobErrorEntry {
                device_id: e.device_id,
                message: e.message,
            })
            .collect(),
        command_id: j.command_id,
        created_by: j.created_by,
        created_ms: j.created_ms,
        started_ms: j.started_ms,
        finished_ms: j.finished_ms,
    }
}

/// How jobs name a caller: a user's email, a token's id.
pub(super) fn creator(caller: &Caller) -> Creator {
    Creator {
        name: match &caller.kind {
            CallerKind::User { email, .. } => email.clone(),
            CallerKind::Token { id } => id.clone(),
        },
        role: caller.role,
    }
}

#[utoipa::path(post, path = "/api/v1/jobs", request_body = CreateJob,
    responses((status = 202, body = Job, description = "queued; poll GET /api/v1/jobs/{id} for progress"),
        (status = 400, body = ErrorBody, description = "bad selector, action or parameters"),
        (status = 403, body = ErrorBody, description = "action command without commands.write"),
        (status = 429, body = ErrorBody, description = "too_many_jobs: 10 of the caller's jobs are unfinished")))]
pub(super) async fn create_job(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ApiJson(req): ApiJson<CreateJob>,
) -> ApiResult<(StatusCode, Json<Job>)> {
    let action = JobAction::from_request(
        &req.action,
        req.tags,
        req.keys,
        req.command.map(|c| JobCommand {
            name: c.name,
            params: c.params,
            ttl_ms: c.ttl_ms,
        }),
    )?;
    let job = app
        .jobs
        .create(&caller.access, &creator(&caller), &req.selector, action)
        .await?;
    Ok((StatusCode::ACCEPTED, Json(job_body(job))))
}

#[utoipa::path(get, path = "/api/v1/jobs", params(JobListParams),
    responses((status = 200, body = JobList, description = "newest first"), (status = 400, body = ErrorBody)))]
pub(super) async fn list_jobs(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ApiQuery(p): ApiQuery<JobListParams>,
) -> ApiResult<Json<JobList>> {
    let (jobs, next_cursor) = app
        .jobs
        .list(&caller.access, p.limit, p.cursor.as_deref())
        .await?;
    Ok(Json(JobList {
        jobs: jobs.into_iter().map(job_body).collect(),
        next_cursor,
    }))
}

#[utoipa::path(get, path = "/api/v1/jobs/{id}", params(("id" = String, Path)),
    responses((status = 200, body = Job), (status = 404, body = ErrorBody)))]
pub(super) async fn get_job(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<Job>> {
    Ok(Json(job_body(app.jobs.get(&caller.access, &id).await?)))
}

#[utoipa::path(post, path = "/api/v1/jobs/{id}/cancel", params(("id" = String, Path)),
    responses((status = 200, body = Job, description = "canceled, or as it was if it had finished"), (status = 404, body = ErrorBody)))]
pub(super) async fn cancel_job(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<Job>> {
    Ok(Json(job_body(app.jobs.cancel(&caller.access, &id).await?)))
}
