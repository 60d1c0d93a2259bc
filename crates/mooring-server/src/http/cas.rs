//! Registered manufacturer CA handlers (issue 16, just-in-time registration): register, list,
//! enable, disable; and the fleet CA's rollover (`registry/rollover.rs`): show, begin, retire.
//! Admins only (`pki.manage`).

use super::{ApiJson, ApiPath, ApiResult, Caller, ErrorBody};
use crate::app::App;
use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};
use mooring_api::{BeginRollover, Ca, CaList, FleetCas, RegisterCa, RetireCa, RetiredCa};
use mooring_store::CaRecord;
use std::sync::Arc;

/// A registered CA as the API shows it.
fn ca_body(c: CaRecord) -> Ca {
    Ca {
        not_after: crate::cas::ca_not_after_ms(&c.cert_pem),
        id: c.id,
        subject: c.subject,
        sha256: c.sha256,
        auto_register: c.auto_register,
        tags: c.tags,
        enabled: c.enabled,
        created_at: c.created_at_ms,
        created_by: c.created_by,
        cert_pem: c.cert_pem,
    }
}

#[utoipa::path(post, path = "/api/v1/cas", request_body = RegisterCa,
    responses((status = 201, body = Ca, description = "registered and trusted by the MQTT listener"),
        (status = 400, body = ErrorBody, description = "invalid_ca: not one usable CA certificate (the message says why), or the fleet CA"),
        (status = 409, body = ErrorBody, description = "ca_exists, too_many_cas")))]
pub(super) async fn register_ca(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ApiJson(req): ApiJson<RegisterCa>,
) -> ApiResult<(StatusCode, Json<Ca>)> {
    let ca = app
        .cas
        .register(
            &caller.access,
            &caller.actor(),
            &req.cert_pem,
            req.auto_register,
            req.tags,
        )
        .await?;
    Ok((StatusCode::CREATED, Json(ca_body(ca))))
}

#[utoipa::path(get, path = "/api/v1/cas",
    responses((status = 200, body = CaList, description = "every registered CA, oldest first")))]
pub(super) async fn list_cas(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<Json<CaList>> {
    let cas = app.cas.list(&caller.access).await?;
    Ok(Json(CaList {
        cas: cas.into_iter().map(ca_body).collect(),
    }))
}

#[utoipa::path(post, path = "/api/v1/cas/{id}/disable", params(("id" = String, Path)),
    responses((status = 200, body = Ca, description = "disabled: its certificates fail the TLS handshake from the next connection on"),
        (status = 404, body = ErrorBody, description = "ca_not_found")))]
pub(super) async fn disable_ca(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<Ca>> {
    let ca = app.cas.set_enabled(&caller.access, &id, false).await?;
    Ok(Json(ca_body(ca)))
}

#[utoipa::path(post, path = "/api/v1/cas/{id}/enable", params(("id" = String, Path)),
    responses((status = 200, body = Ca, description = "enabled: trusted again"),
        (status = 404, body = ErrorBody, description = "ca_not_found")))]
pub(super) async fn enable_ca(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<Ca>> {
    let ca = app.cas.set_enabled(&caller.access, &id, true).await?;
    Ok(Json(ca_body(ca)))
}

fn fleet_ca_body(c: crate::pki::FleetCaInfo) -> mooring_api::FleetCa {
    mooring_api::FleetCa {
        sha256: c.sha256,
        subject: c.subject,
        not_before: c.not_before_ms,
        not_after: c.not_after_ms,
    }
}

/// The fleet CA(s) as the API shows them, with the rollover's rotation if one is among the
/// newest jobs.
async fn fleet_cas_body(
    app: &App,
    caller: &Caller,
    r: crate::registry::CaRollover,
) -> ApiResult<FleetCas> {
    let rotation_id = match r.previous {
        Some(_) => app
            .jobs
            .list(
                &caller.access,
                Some(crate::jobs::JOB_PAGE_LEN_MAX),
                None,
                None,
            )
            .await?
            .0
            .into_iter()
            .find(|j| {
                j.action == crate::jobs::ROTATE_CERTS_ACTION
                    && j.params["rotate"]["fleet_issuer"].as_str() == Some(&r.issuer_label)
            })
            .map(|j| j.id),
        None => None,
    };
    Ok(FleetCas {
        rolling_over: r.previous.is_some(),
        issuing: fleet_ca_body(r.issuing),
        previous: r.previous.map(fleet_ca_body),
        previous_certificates: r.previous_certificates,
        rotation_id,
        ca_pem: app.registry.ca_pem(),
    })
}

#[utoipa::path(get, path = "/api/v1/cas/fleet",
    responses((status = 200, body = FleetCas, description = "the fleet CA, and during a rollover the previous one with the certificates it still has live")))]
pub(super) async fn fleet_cas(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<Json<FleetCas>> {
    let r = app.registry.ca_rollover(&caller.access).await?;
    Ok(Json(fleet_cas_body(&app, &caller, r).await?))
}

#[utoipa::path(post, path = "/api/v1/cas/fleet/rollover", request_body = BeginRollover,
    responses((status = 201, body = FleetCas, description = "a new fleet CA issues from now on; both are trusted; unless no_rotation, a throttled rotation moves the devices to it"),
        (status = 400, body = ErrorBody, description = "invalid_max_per_minute"),
        (status = 409, body = ErrorBody, description = "rollover_in_progress")))]
pub(super) async fn begin_rollover(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ApiJson(req): ApiJson<BeginRollover>,
) -> ApiResult<(StatusCode, Json<FleetCas>)> {
    let max_per_minute = req
        .max_per_minute
        .unwrap_or(mooring_api::ROLLOVER_ROTATIONS_PER_MINUTE_DEFAULT);
    if max_per_minute == 0 || max_per_minute > crate::jobs::ROTATIONS_PER_MINUTE_MAX {
        return Err(crate::error::ServiceError::invalid(
            "invalid_max_per_minute",
            format!(
                "max_per_minute must be between 1 and {}",
                crate::jobs::ROTATIONS_PER_MINUTE_MAX
            ),
        )
        .into());
    }
    let r = app.registry.begin_ca_rollover(&caller.access).await?;
    // Embedded: the listener trusts both CAs at once (a cluster's other nodes within a second).
    app.cas
        .reload()
        .await
        .map_err(crate::error::ServiceError::internal)?;
    if !req.no_rotation {
        app.jobs
            .create_rollover_rotation(
                &caller.access,
                &super::jobs::creator(&caller),
                &r.issuer_label,
                max_per_minute,
            )
            .await?;
    }
    Ok((
        StatusCode::CREATED,
        Json(fleet_cas_body(&app, &caller, r).await?),
    ))
}

#[utoipa::path(post, path = "/api/v1/cas/fleet/retire", request_body = RetireCa,
    responses((status = 200, body = RetiredCa, description = "retired: the previous CA is no longer trusted and the server presents a certificate from the new one (MQTT and HTTPS); or, with force and more than 5,000 certificates to revoke, retired false: call again"),
        (status = 409, body = ErrorBody, description = "no_rollover; rollover_incomplete: devices still hold live certificates from the previous CA (retry with force to revoke them)")))]
pub(super) async fn retire_ca(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ApiJson(req): ApiJson<RetireCa>,
) -> ApiResult<Json<RetiredCa>> {
    let r = app
        .registry
        .retire_previous_ca(&caller.access, req.force)
        .await?;
    app.cas
        .reload()
        .await
        .map_err(crate::error::ServiceError::internal)?;
    Ok(Json(RetiredCa {
        fleet: fleet_cas_body(&app, &caller, r.rollover).await?,
        revoked: r.revoked,
        retired: r.retired,
    }))
}
