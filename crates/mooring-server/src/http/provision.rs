//! `/api/v1/claims` and `/api/v1/provision/enroll` handlers: claim tokens and enrollment
//! (issue 16).

use super::{client_addr, ApiJson, ApiPath, ApiQuery, ApiResult, Caller, ErrorBody};
use crate::app::App;
use crate::audit::AuditEntryIn;
use crate::error::{ErrorKind, ServiceError};
use crate::provision::NewClaim;
use axum::extract::{FromRequest, Request, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use mooring_api::{
    Claim, ClaimList, CreateClaim, CreatedClaim, EnrollRequest, EnrollResponse, PageParams,
};
use mooring_store::ClaimRecord;
use std::sync::Arc;

/// A stored claim as the API shows it.
fn claim_body(c: ClaimRecord, now_ms: u64, devices: Option<Vec<String>>) -> Claim {
    let state = if c.revoked_at_ms.is_some() {
        "revoked"
    } else if now_ms >= c.expires_at_ms {
        "expired"
    } else if c.uses >= c.uses_max {
        "used"
    } else {
        "live"
    };
    Claim {
        id: c.id,
        name: c.name,
        uses_max: c.uses_max,
        uses: c.uses,
        tags: c.tags,
        assign_ids: c.assign_ids,
        state: state.to_owned(),
        expires_at: c.expires_at_ms,
        created_by: c.created_by,
        created_at: c.created_at_ms,
        revoked_at: c.revoked_at_ms,
        devices,
    }
}

#[utoipa::path(post, path = "/api/v1/claims", request_body = CreateClaim,
    responses((status = 201, body = CreatedClaim, description = "the token is shown only here"),
        (status = 400, body = ErrorBody, description = "bad count, ttl, tags or name"),
        (status = 403, body = ErrorBody, description = "outside_scope: the claim's tags are outside the caller's scope"),
        (status = 429, body = ErrorBody, description = "too_many_claims: the caller holds its maximum of live claims")))]
pub(super) async fn create_claim(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ApiJson(req): ApiJson<CreateClaim>,
) -> ApiResult<(StatusCode, Json<CreatedClaim>)> {
    let ttl_ms = match (req.ttl_ms, req.ttl.as_deref()) {
        (Some(_), Some(_)) => {
            return Err(ServiceError::invalid("invalid_ttl", "give ttl_ms or ttl, not both").into())
        }
        (Some(ms), None) => Some(ms),
        (None, Some(text)) => Some(
            mooring_api::parse_duration_ms(text)
                .map_err(|m| ServiceError::invalid("invalid_ttl", m))?,
        ),
        (None, None) => None,
    };
    let (claim, token) = app
        .provisioning
        .create_claim(
            &caller.access,
            caller.principal(),
            NewClaim {
                uses_max: req.count,
                ttl_ms,
                tags: req.tags,
                assign_ids: req.assign_ids,
                name: req.name,
            },
        )
        .await?;
    let now_ms = app.now_ms();
    Ok((
        StatusCode::CREATED,
        Json(CreatedClaim {
            claim: claim_body(claim, now_ms, None),
            token,
        }),
    ))
}

#[utoipa::path(get, path = "/api/v1/claims", params(PageParams),
    responses((status = 200, body = ClaimList, description = "by id; never a token"), (status = 400, body = ErrorBody)))]
pub(super) async fn list_claims(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ApiQuery(p): ApiQuery<PageParams>,
) -> ApiResult<Json<ClaimList>> {
    let (claims, next_cursor) = app
        .provisioning
        .list_claims(&caller.access, p.limit, p.cursor.as_deref())
        .await?;
    let now_ms = app.now_ms();
    Ok(Json(ClaimList {
        claims: claims
            .into_iter()
            .map(|c| claim_body(c, now_ms, None))
            .collect(),
        next_cursor,
    }))
}

#[utoipa::path(get, path = "/api/v1/claims/{id}", params(("id" = String, Path)),
    responses((status = 200, body = Claim, description = "with the devices enrolled with it"), (status = 404, body = ErrorBody)))]
pub(super) async fn get_claim(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<Claim>> {
    let (claim, devices) = app.provisioning.get_claim(&caller.access, &id).await?;
    Ok(Json(claim_body(claim, app.now_ms(), Some(devices))))
}

#[utoipa::path(delete, path = "/api/v1/claims/{id}", params(("id" = String, Path)),
    responses((status = 200, body = Claim, description = "revoked (devices it enrolled keep their certificates)"), (status = 404, body = ErrorBody)))]
pub(super) async fn revoke_claim(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<Claim>> {
    let claim = app.provisioning.revoke_claim(&caller.access, &id).await?;
    Ok(Json(claim_body(claim, app.now_ms(), None)))
}

#[utoipa::path(post, path = "/api/v1/provision/enroll", request_body = EnrollRequest,
    security(()),
    responses((status = 201, body = EnrollResponse, description = "enrolled: the device exists with this certificate"),
        (status = 200, body = EnrollResponse, description = "the same claim and key enrolled before: the same certificate"),
        (status = 400, body = ErrorBody, description = "invalid_csr, invalid_device_id"),
        (status = 401, body = ErrorBody, description = "claim_invalid: unknown, expired or revoked token (one answer for all three)"),
        (status = 409, body = ErrorBody, description = "claim_used (single-use claim, another key), claim_exhausted, device_exists"),
        (status = 429, body = ErrorBody, description = "too_many_attempts: too many failed enrollments from this address")))]
pub(super) async fn enroll(
    State(app): State<Arc<App>>,
    req: Request,
) -> ApiResult<(StatusCode, Json<EnrollResponse>)> {
    let source = client_addr(&app, &req);
    let body = ApiJson::<EnrollRequest>::from_request(req, &()).await?.0;
    let result = app
        .provisioning
        .enroll(
            &body.claim_token,
            &body.csr_pem,
            body.device_id.as_deref(),
            &source,
        )
        .await;
    // Throttled and busy answers are only counted: an anonymous client must not grow the log.
    let recorded = match &result {
        Ok(e) => Some((
            format!("claim:{}", e.claim_id),
            if e.created { 201 } else { 200 },
            format!("device {}", e.device_id),
        )),
        Err(e) if matches!(e.kind, ErrorKind::TooManyRequests | ErrorKind::Unavailable) => None,
        Err(e) => Some((
            "anonymous".to_owned(),
            e.kind.http_status(),
            e.code.to_owned(),
        )),
    };
    if let Some((actor, status, detail)) = recorded {
        app.audit
            .record(AuditEntryIn {
                actor,
                action: "provision.enroll",
                target: "/api/v1/provision/enroll".to_owned(),
                source,
                status,
                detail,
            })
            .await;
    }
    let e = result?;
    let status = if e.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        Json(EnrollResponse {
            device_id: e.device_id,
            certificate_pem: e.certificate_pem,
            ca_pem: e.ca_pem,
        }),
    ))
}
