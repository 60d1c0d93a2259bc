//! `/api/v1/jobs` handlers: bulk actions on a selection of devices, run in the background.

use super::{ApiJson, ApiPath, ApiQuery, ApiResult, Caller, CallerKind, ErrorBody};
use crate::app::App;
use crate::jobs::{Creator, JobAction, JobCommand};
use crate::reports::ReportSpec;
use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use axum::{Extension, Json};
use mooring_api::{CreateJob, CreateReport, Job, JobErrorEntry, JobList, JobListParams};
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
        worker: j.worker,
        attempts: j.attempts,
        last_error: j.last_error,
        result: j.result,
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

#[utoipa::path(post, path = "/api/v1/reports", request_body = CreateReport,
    responses((status = 202, body = Job, description = "queued as a job with action `report`; poll GET /api/v1/jobs/{id}, then download GET /api/v1/jobs/{id}/result"),
        (status = 400, body = ErrorBody, description = "invalid_kind, invalid_format, invalid_range, invalid_metrics, invalid_selector, invalid_group_by, invalid_params"),
        (status = 429, body = ErrorBody, description = "too_many_jobs: 10 of the caller's jobs are unfinished")))]
pub(super) async fn create_report(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ApiJson(req): ApiJson<CreateReport>,
) -> ApiResult<(StatusCode, Json<Job>)> {
    let spec = ReportSpec::from_api(
        &req.kind,
        req.format.as_deref(),
        req.from_ms,
        req.to_ms,
        req.metrics,
        req.group_by,
    )?;
    let job = app
        .jobs
        .create(
            &caller.access,
            &creator(&caller),
            &req.selector,
            JobAction::Report(spec),
        )
        .await?;
    Ok((StatusCode::ACCEPTED, Json(job_body(job))))
}

/// Bytes one read of a stored result takes.
const RESULT_PIECE_BYTES: usize = 256 * 1024;

#[utoipa::path(get, path = "/api/v1/jobs/{id}/result", params(("id" = String, Path)),
    responses((status = 200, content_type = "text/csv", description = "the report, as its job's `result.content_type` says (CSV or JSON lines)"),
        (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "no_result: the job has not succeeded, or makes no result")))]
pub(super) async fn get_job_result(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Response> {
    let (job, len) = app.jobs.result(&caller.access, &id).await?;
    let content_type = job
        .result
        .as_ref()
        .and_then(|r| r["content_type"].as_str())
        .unwrap_or("application/octet-stream")
        .to_owned();
    // Read piece by piece as the client takes it: one piece in memory per download.
    let stream = futures::stream::unfold(0u64, move |at| {
        let (app, id) = (app.clone(), id.clone());
        async move {
            if at >= len {
                return None;
            }
            let want = usize::try_from(len - at)
                .unwrap_or(usize::MAX)
                .min(RESULT_PIECE_BYTES);
            match app.jobs.read_result(&id, at, want).await {
                Ok(piece) if !piece.is_empty() => {
                    let next = at + piece.len() as u64;
                    Some((Ok(axum::body::Bytes::from(piece)), next))
                }
                failed => {
                    let e = match failed {
                        Err(e) => std::io::Error::other(e.message),
                        Ok(_) => std::io::Error::other("the job's result is gone (pruned)"),
                    };
                    tracing::warn!(job = %id, at, error = %e, "result download cut short");
                    // Ends the body with an error: the client sees the connection fail.
                    Some((Err(e), len))
                }
            }
        }
    });
    let mut resp = Response::new(Body::from_stream(stream));
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&content_type) {
        h.insert(header::CONTENT_TYPE, v);
    }
    if let Ok(v) = HeaderValue::from_str(&len.to_string()) {
        h.insert(header::CONTENT_LENGTH, v);
    }
    // Never shown as a page of the API's origin: a download, with nothing it could run.
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; style-src 'unsafe-inline'; sandbox"),
    );
    let ext = match content_type.split(';').next().unwrap_or("") {
        "text/csv" => "csv",
        "text/html" => "html",
        _ => "jsonl",
    };
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{}.{ext}\"", job.id)) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(resp)
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
        .list(
            &caller.access,
            p.limit,
            p.cursor.as_deref(),
            p.state.as_deref(),
        )
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
