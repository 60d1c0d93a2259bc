//! Certificate ledger handlers (issue 16): a device's certificates, certificates expiring soon,
//! and revocation (of a device's certificates, or of one by serial).

use super::{ApiJson, ApiPath, ApiQuery, ApiResult, Caller, ErrorBody};
use crate::app::App;
use axum::extract::State;
use axum::{Extension, Json};
use mooring_api::{
    Certificate, CertificateList, Command, CreateRotation, ExpiringParams, RevokeRequest, Revoked,
    RotateRequest, Rotation, RotationList,
};
use mooring_store::CertRecord;
use std::sync::Arc;

/// A ledger row as the API shows it.
fn cert_body(c: CertRecord) -> Certificate {
    Certificate {
        serial: c.serial,
        device_id: c.device_id.into_string(),
        sha256: c.sha256,
        not_before: c.not_before_ms,
        not_after: c.not_after_ms,
        issued_at: c.issued_at_ms,
        issuer: c.issuer,
        state: c.state.as_str().to_owned(),
        revoked_at: c.revoked_at_ms,
        revoke_reason: c.revoke_reason,
    }
}

#[utoipa::path(get, path = "/api/v1/devices/{id}/certificates", params(("id" = String, Path)),
    responses((status = 200, body = CertificateList, description = "newest issued first"), (status = 404, body = ErrorBody)))]
pub(super) async fn device_certificates(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<CertificateList>> {
    let certs = app
        .registry
        .device_certificates(&caller.access, &id)
        .await?;
    Ok(Json(CertificateList {
        certificates: certs.into_iter().map(cert_body).collect(),
        next_cursor: None,
    }))
}

#[utoipa::path(get, path = "/api/v1/certificates", params(ExpiringParams),
    responses((status = 200, body = CertificateList, description = "active certificates expiring within the window (expired ones included), soonest first"),
        (status = 400, body = ErrorBody)))]
pub(super) async fn expiring_certificates(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ApiQuery(p): ApiQuery<ExpiringParams>,
) -> ApiResult<Json<CertificateList>> {
    let (certs, next_cursor) = app
        .registry
        .expiring_certificates(
            &caller.access,
            p.expiring_within_ms,
            p.limit,
            p.after.as_deref(),
        )
        .await?;
    Ok(Json(CertificateList {
        certificates: certs.into_iter().map(cert_body).collect(),
        next_cursor,
    }))
}

#[utoipa::path(post, path = "/api/v1/devices/{id}/revoke", params(("id" = String, Path)), request_body = RevokeRequest,
    responses((status = 200, body = Revoked, description = "every active certificate of the device revoked; its live sessions closed on every node"),
        (status = 404, body = ErrorBody)))]
pub(super) async fn revoke_device(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<RevokeRequest>,
) -> ApiResult<Json<Revoked>> {
    let revoked = app
        .registry
        .revoke_device(&caller.access, &id, req.reason.as_deref())
        .await?;
    Ok(Json(Revoked { revoked }))
}

#[utoipa::path(post, path = "/api/v1/certificates/{serial}/revoke", params(("serial" = String, Path)), request_body = RevokeRequest,
    responses((status = 200, body = Revoked, description = "revoked (or already revoked: empty list); a live session using it closed on every node"),
        (status = 404, body = ErrorBody, description = "certificate_not_found")))]
pub(super) async fn revoke_certificate(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ApiPath(serial): ApiPath<String>,
    ApiJson(req): ApiJson<RevokeRequest>,
) -> ApiResult<Json<Revoked>> {
    let revoked = app
        .registry
        .revoke_certificate(&caller.access, &serial, req.reason.as_deref())
        .await?;
    Ok(Json(Revoked { revoked }))
}

/// The reserved command the agent handles by renewing its certificate.
pub const ROTATE_COMMAND: &str = "mooring.cert.rotate";

#[utoipa::path(post, path = "/api/v1/devices/{id}/certificates/rotate", params(("id" = String, Path)), request_body = RotateRequest,
    responses((status = 202, body = Command, description = "the device is told to renew its certificate (the command `mooring.cert.rotate`, delivered when it is online, up to ttl_secs); once it connects with the new certificate the old one is revoked"),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(super) async fn rotate_certificate(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<RotateRequest>,
) -> ApiResult<(axum::http::StatusCode, Json<Command>)> {
    let c = crate::commands::NewCommand {
        name: ROTATE_COMMAND.to_owned(),
        params: serde_json::json!({}),
        ttl_secs: req.ttl_secs,
        max_attempts: None,
        idempotency_key: None,
        result_timeout_secs: None,
    };
    let (_, record) = app
        .commands
        .create_command(&caller.access, &id, c, None)
        .await?;
    Ok((
        axum::http::StatusCode::ACCEPTED,
        Json(super::commands::command_body(record)),
    ))
}

/// Fleet rotations listed at most (the newest).
pub const ROTATIONS_LISTED_MAX: usize = 50;

/// A rotation job as the API shows it, with its confirmed count read now.
async fn rotation_body(app: &App, job: mooring_store::JobRecord) -> ApiResult<Rotation> {
    let (confirmed, _) = app.jobs.rotation_progress(&job).await?;
    let confirmed = confirmed.min(job.done);
    Ok(Rotation {
        selected: job.total,
        requested: job.done,
        confirmed,
        pending: job.done.saturating_sub(confirmed),
        failed: job.failed,
        job: super::jobs::job_body(job),
    })
}

#[utoipa::path(post, path = "/api/v1/certificates/rotations", request_body = CreateRotation,
    responses((status = 202, body = Rotation, description = "queued; the job runner tells the devices at the rate asked"),
        (status = 400, body = ErrorBody), (status = 403, body = ErrorBody, description = "a scoped caller"),
        (status = 429, body = ErrorBody, description = "too_many_jobs")))]
pub(super) async fn create_rotation(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ApiJson(req): ApiJson<CreateRotation>,
) -> ApiResult<(axum::http::StatusCode, Json<Rotation>)> {
    let job = app
        .jobs
        .create_rotation(
            &caller.access,
            &super::jobs::creator(&caller),
            req.expiring_within_ms,
            req.max_per_minute,
        )
        .await?;
    Ok((
        axum::http::StatusCode::ACCEPTED,
        Json(rotation_body(&app, job).await?),
    ))
}

#[utoipa::path(get, path = "/api/v1/certificates/rotations/{id}", params(("id" = String, Path)),
    responses((status = 200, body = Rotation), (status = 404, body = ErrorBody)))]
pub(super) async fn get_rotation(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<Rotation>> {
    let job = app.jobs.get(&caller.access, &id).await?;
    if job.action != crate::jobs::ROTATE_CERTS_ACTION {
        return Err(crate::error::ServiceError::not_found(
            "rotation_not_found",
            format!("rotation {id} not found"),
        )
        .into());
    }
    Ok(Json(rotation_body(&app, job).await?))
}

#[utoipa::path(get, path = "/api/v1/certificates/rotations",
    responses((status = 200, body = RotationList, description = "newest first, among the newest jobs")))]
pub(super) async fn list_rotations(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<Json<RotationList>> {
    let (jobs, _) = app
        .jobs
        .list(
            &caller.access,
            Some(crate::jobs::JOB_PAGE_LEN_MAX),
            None,
            None,
        )
        .await?;
    let mut rotations = Vec::new();
    for job in jobs
        .into_iter()
        .filter(|j| j.action == crate::jobs::ROTATE_CERTS_ACTION)
        .take(ROTATIONS_LISTED_MAX)
    {
        rotations.push(rotation_body(&app, job).await?);
    }
    Ok(Json(RotationList { rotations }))
}
