//! `/api/v1/ota/*` handlers (issue 17): artifacts (create, chunks, complete, list, show,
//! delete), download links, the download itself (a download token, `Range`), the update key.

use super::{ApiJson, ApiPath, ApiQuery, ApiResult, Caller, ErrorBody};
use crate::app::App;
use crate::error::{ErrorKind, ServiceError};
use crate::ota::{NewArtifact, CHUNK_SIZE_BYTES_MAX, DOWNLOAD_FRAME_BYTES, READ_PIECE_BYTES};
use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use mooring_api::{
    Artifact, ArtifactList, CompleteArtifact, CreateArtifact, CreateDeployment, CreateLink,
    Deployment, DeploymentList, DeviceUpdate, DeviceUpdates, DownloadLink, PageParams,
    UpdateKeyInfo,
};
use mooring_store::ArtifactRecord;
use serde::Deserialize;
use std::sync::Arc;

/// A stored artifact as the API shows it.
fn artifact_body(a: ArtifactRecord) -> Artifact {
    Artifact {
        id: a.id,
        version: a.version,
        sha256: a.sha256,
        size: a.size,
        compatible: a.compatible,
        notes: a.notes,
        state: a.state.as_str().to_owned(),
        stored_bytes: a.stored_bytes,
        manifest: String::from_utf8_lossy(&a.manifest).into_owned(),
        signature: a.signature,
        created_at: a.created_at_ms,
        created_by: a.created_by,
    }
}

#[utoipa::path(get, path = "/api/v1/ota/update-key",
    security(()),
    responses((status = 200, body = UpdateKeyInfo, description = "the fleet's Ed25519 update key (devices pin it)")))]
pub(super) async fn update_key(State(app): State<Arc<App>>) -> ApiResult<Json<UpdateKeyInfo>> {
    Ok(Json(UpdateKeyInfo {
        public_key: app.ota.public_key_hex(),
        server_signs: app.ota.signs(),
    }))
}

#[utoipa::path(post, path = "/api/v1/ota/artifacts", request_body = CreateArtifact,
    responses((status = 201, body = Artifact, description = "created (uploading): send the bytes, then complete"),
        (status = 400, body = ErrorBody, description = "invalid_artifact (version, sha256, compatible), invalid_size, invalid_notes"),
        (status = 409, body = ErrorBody, description = "artifact_version_exists"),
        (status = 503, body = ErrorBody, description = "too_many_artifacts")))]
pub(super) async fn create_artifact(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ApiJson(req): ApiJson<CreateArtifact>,
) -> ApiResult<(StatusCode, Json<Artifact>)> {
    crate::ota::artifacts_unscoped(&caller.access)?;
    let a = app
        .ota
        .create_artifact(
            caller.principal(),
            NewArtifact {
                version: req.version,
                compatible: req.compatible,
                notes: req.notes,
                sha256: req.sha256,
                size: req.size,
            },
        )
        .await?;
    Ok((StatusCode::CREATED, Json(artifact_body(a))))
}

#[utoipa::path(get, path = "/api/v1/ota/artifacts", params(PageParams),
    responses((status = 200, body = ArtifactList, description = "by id"), (status = 400, body = ErrorBody)))]
pub(super) async fn list_artifacts(
    State(app): State<Arc<App>>,
    ApiQuery(p): ApiQuery<PageParams>,
) -> ApiResult<Json<ArtifactList>> {
    let limit = p
        .limit
        .unwrap_or(100)
        .clamp(1, crate::ota::ARTIFACT_PAGE_LEN_MAX);
    let artifacts = app.ota.list_artifacts(limit, p.cursor.as_deref()).await?;
    let next_cursor = (artifacts.len() == limit)
        .then(|| artifacts.last().map(|a| a.id.clone()))
        .flatten();
    Ok(Json(ArtifactList {
        artifacts: artifacts.into_iter().map(artifact_body).collect(),
        next_cursor,
    }))
}

#[utoipa::path(get, path = "/api/v1/ota/artifacts/{id}", params(("id" = String, Path)),
    responses((status = 200, body = Artifact, description = "stored_bytes: where a resumed upload goes on"), (status = 404, body = ErrorBody)))]
pub(super) async fn get_artifact(
    State(app): State<Arc<App>>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<Artifact>> {
    Ok(Json(artifact_body(app.ota.get_artifact(&id).await?)))
}

#[utoipa::path(delete, path = "/api/v1/ota/artifacts/{id}", params(("id" = String, Path)),
    responses((status = 204, description = "deleted with its bytes"), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "artifact_in_use: a deployment uses it")))]
pub(super) async fn delete_artifact(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<StatusCode> {
    crate::ota::artifacts_unscoped(&caller.access)?;
    app.ota.delete_artifact(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `?offset=N` of a chunk.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub(super) struct OffsetParams {
    /// Where the chunk goes: the artifact's `stored_bytes`.
    offset: u64,
}

#[utoipa::path(put, path = "/api/v1/ota/artifacts/{id}/content", params(("id" = String, Path), OffsetParams),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "one chunk, at most 8 MiB"),
    responses((status = 200, body = Artifact, description = "stored; stored_bytes moved on"),
        (status = 400, body = ErrorBody, description = "empty_chunk, chunk_past_size"),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody, description = "offset_mismatch (the message says where the upload is), artifact_not_uploading"),
        (status = 413, body = ErrorBody, description = "chunk_too_large")))]
pub(super) async fn put_content(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(p): ApiQuery<OffsetParams>,
    body: Body,
) -> ApiResult<Json<Artifact>> {
    crate::ota::artifacts_unscoped(&caller.access)?;
    let data = axum::body::to_bytes(body, CHUNK_SIZE_BYTES_MAX)
        .await
        .map_err(|e| {
            let text = e.to_string();
            if text.contains("length limit") {
                ServiceError::new(
                    ErrorKind::PayloadTooLarge,
                    "chunk_too_large",
                    format!("a chunk is at most {CHUNK_SIZE_BYTES_MAX} bytes"),
                )
            } else {
                ServiceError::new(
                    ErrorKind::RequestTimeout,
                    "body_incomplete",
                    format!("the chunk did not arrive whole: {text}"),
                )
            }
        })?;
    let a = app.ota.put_content(&id, p.offset, data.to_vec()).await?;
    Ok(Json(artifact_body(a)))
}

#[utoipa::path(post, path = "/api/v1/ota/artifacts/{id}/complete", params(("id" = String, Path)), request_body = CompleteArtifact,
    responses((status = 200, body = Artifact, description = "ready: size, SHA-256 and signature checked"),
        (status = 400, body = ErrorBody, description = "sha256_mismatch (the bytes were discarded), signature_required, bad_signature"),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody, description = "upload_incomplete")))]
pub(super) async fn complete_artifact(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<CompleteArtifact>,
) -> ApiResult<Json<Artifact>> {
    crate::ota::artifacts_unscoped(&caller.access)?;
    Ok(Json(artifact_body(
        app.ota.complete(&id, req.signature).await?,
    )))
}

#[utoipa::path(post, path = "/api/v1/ota/artifacts/{id}/links", params(("id" = String, Path)), request_body = CreateLink,
    responses((status = 201, body = DownloadLink, description = "a token for this device and artifact only"),
        (status = 400, body = ErrorBody, description = "invalid_ttl"),
        (status = 404, body = ErrorBody, description = "artifact or device not found"), (status = 409, body = ErrorBody, description = "artifact_not_ready")))]
pub(super) async fn create_link(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<CreateLink>,
) -> ApiResult<(StatusCode, Json<DownloadLink>)> {
    let link = app
        .ota
        .mint_link(&caller.access, &req.device_id, &id, req.ttl_ms)
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(DownloadLink {
            url: link.url,
            token: link.token,
            expires_at: link.expires_at,
        }),
    ))
}

/// A `Range` header against `size` (RFC 9110 14.2): `Some(Some(range))` for one range
/// (`bytes=N-`, `bytes=N-M` or the last N bytes, `bytes=-N`; inclusive), `Some(None)` for a
/// header the server ignores and answers with the whole file (another unit, or several ranges:
/// no multipart answers), `None` for an unsatisfiable or malformed one (416).
fn parse_range(text: &str, size: u64) -> Option<Option<(u64, u64)>> {
    let (unit, spec) = text.trim().split_once('=')?;
    if !unit.trim().eq_ignore_ascii_case("bytes") || spec.contains(',') {
        return Some(None);
    }
    let (start, end) = spec.split_once('-')?;
    let last = size.checked_sub(1)?;
    let (start, end) = match (start.trim(), end.trim()) {
        ("", suffix) => {
            let n: u64 = suffix.parse().ok()?;
            if n == 0 {
                return None;
            }
            (size - n.min(size), last)
        }
        (start, "") => (start.parse().ok()?, last),
        (start, end) => (start.parse().ok()?, end.parse::<u64>().ok()?.min(last)),
    };
    (start <= end).then_some(Some((start, end)))
}

/// How long a download's next frame may wait to be taken, `taken` bytes into the body (this
/// frame included): the idle timeout, or less when the rate floor is due sooner (then `true`).
fn frame_wait(
    began: tokio::time::Instant,
    idle: std::time::Duration,
    min_rate_bytes_per_s: u64,
    taken: u64,
) -> (std::time::Duration, bool) {
    if min_rate_bytes_per_s == 0 {
        return (idle, false);
    }
    let due_ms = taken.saturating_mul(1000) / min_rate_bytes_per_s;
    let due = began + idle + std::time::Duration::from_millis(due_ms);
    let left = due.saturating_duration_since(tokio::time::Instant::now());
    if left < idle {
        (left, true)
    } else {
        (idle, false)
    }
}

#[utoipa::path(get, path = "/api/v1/ota/artifacts/{id}/download", params(("id" = String, Path)),
    security(()),
    responses((status = 200, description = "the whole file (application/octet-stream)"),
        (status = 206, description = "the range asked for (Range: bytes=N- or bytes=N-M)"),
        (status = 401, body = ErrorBody, description = "invalid_download_token, download_token_expired (ask for a new link)"),
        (status = 403, body = ErrorBody, description = "wrong_artifact: the token is for another artifact"),
        (status = 404, body = ErrorBody), (status = 416, body = ErrorBody, description = "range_not_satisfiable")))]
pub(super) async fn download(
    State(app): State<Arc<App>>,
    ApiPath(id): ApiPath<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    // Only the id's syntax before the token: nothing about stored artifacts leaks.
    if !mooring_proto::ota::is_valid_artifact_id(&id) {
        return Err(
            ServiceError::not_found("artifact_not_found", format!("no artifact {id}")).into(),
        );
    }
    // The scheme name is case-insensitive (RFC 9110 11.1).
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then_some(token)
        })
        .ok_or_else(|| {
            app.ota.count_download(false);
            ServiceError::new(
                ErrorKind::Unauthorized,
                "invalid_download_token",
                "a download needs `Authorization: Bearer <download token>` (from the update's link)",
            )
        })?;
    let device = match app.ota.verify_token(token.trim(), &id).await {
        Ok(device) => device,
        Err(e) => {
            app.ota.count_download(false);
            return Err(e.into());
        }
    };
    // Held by the body until it is sent or dropped: bounds downloads per node and per device.
    let slot = app.ota.download_slot(&device)?;
    let a = app.ota.downloadable(&id).await?;
    let range = match headers.get(header::RANGE) {
        None => None,
        Some(v) => {
            let parsed = v.to_str().ok().and_then(|t| parse_range(t, a.size));
            match parsed {
                Some(r) => r,
                None => {
                    let mut resp = super::ApiError(ServiceError::new(
                        ErrorKind::InvalidArgument,
                        "range_not_satisfiable",
                        format!(
                            "the artifact has {} bytes; ask for bytes=N- with N below that",
                            a.size
                        ),
                    ))
                    .into_response();
                    *resp.status_mut() = StatusCode::RANGE_NOT_SATISFIABLE;
                    if let Ok(v) = header::HeaderValue::from_str(&format!("bytes */{}", a.size)) {
                        resp.headers_mut().insert(header::CONTENT_RANGE, v);
                    }
                    return Ok(resp);
                }
            }
        }
    };
    let (start, end) = range.unwrap_or((0, a.size.saturating_sub(1)));
    let len = end + 1 - start;
    // The body streams piece by piece from the blobs, never the whole file in memory: a task
    // reads the pieces and hands them over in frames through a one-frame channel. A client that
    // stops reading stops hyper taking frames; once a frame waits longer than
    // `[ota] download_idle_timeout_ms` the task gives up, and the slot goes with it (the body
    // ends short of its length, so the connection closes). A client that keeps reading, but
    // slower than `[ota] download_min_rate_bytes_per_s`, ends the same way: frame by frame, the
    // bytes taken so far must have been taken by `idle + bytes / rate` after the start. The task
    // ends on its own: when the body is sent, when the connection goes (the channel closes), or
    // at a timeout.
    let idle = std::time::Duration::from_millis(app.config().ota.download_idle_timeout_ms);
    let min_rate = app.config().ota.download_min_rate_bytes_per_s;
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<axum::body::Bytes>>(1);
    let feeder = app.ota.clone();
    let id_owned = a.id.clone();
    app.ota_tasks.spawn(async move {
        let _slot = slot;
        let began = tokio::time::Instant::now();
        let mut taken: u64 = 0;
        let mut at = start;
        while at <= end {
            let want = usize::try_from(end + 1 - at)
                .unwrap_or(usize::MAX)
                .min(READ_PIECE_BYTES);
            let piece = match feeder.read(&id_owned, at, want).await {
                Ok(p) if !p.is_empty() => p,
                failed => {
                    let e = match failed {
                        Err(e) => std::io::Error::other(e.to_string()),
                        Ok(_) => std::io::Error::other("artifact bytes missing"),
                    };
                    tracing::warn!(artifact = %id_owned, at, error = %e, "download cut short");
                    // The body fails (the connection closes) unless its client is gone.
                    let _ = tokio::time::timeout(idle, tx.send(Err(e))).await;
                    return;
                }
            };
            at += piece.len() as u64;
            let mut piece = axum::body::Bytes::from(piece);
            while !piece.is_empty() {
                let frame = piece.split_to(piece.len().min(DOWNLOAD_FRAME_BYTES));
                taken += frame.len() as u64;
                let (wait, floor) = frame_wait(began, idle, min_rate, taken);
                match tokio::time::timeout(wait, tx.send(Ok(frame))).await {
                    Ok(Ok(())) => {}
                    // The client went away.
                    Ok(Err(_)) => return,
                    Err(_) if floor => {
                        feeder.count_download_slow();
                        tracing::info!(artifact = %id_owned, at, taken, "download ended: its client read slower than [ota] download_min_rate_bytes_per_s");
                        return;
                    }
                    Err(_) => {
                        feeder.count_download_idle();
                        tracing::info!(artifact = %id_owned, at, "download ended: its client stopped reading");
                        return;
                    }
                }
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    app.ota.count_download(true);
    let mut resp = Response::new(Body::from_stream(stream));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(
        header::ACCEPT_RANGES,
        header::HeaderValue::from_static("bytes"),
    );
    if let Ok(v) = header::HeaderValue::from_str(&len.to_string()) {
        h.insert(header::CONTENT_LENGTH, v);
    }
    if let Ok(v) = header::HeaderValue::from_str(&format!("\"{}\"", a.sha256)) {
        h.insert(header::ETAG, v);
    }
    if range.is_some() {
        if let Ok(v) = header::HeaderValue::from_str(&format!("bytes {start}-{end}/{}", a.size)) {
            h.insert(header::CONTENT_RANGE, v);
        }
        *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::parse_range;

    #[test]
    fn ranges_parse_and_bad_ones_are_refused() {
        assert_eq!(parse_range("bytes=0-", 10), Some(Some((0, 9))));
        assert_eq!(parse_range("bytes=4-", 10), Some(Some((4, 9))));
        assert_eq!(parse_range("bytes=4-6", 10), Some(Some((4, 6))));
        assert_eq!(parse_range("Bytes = 4-6", 10), Some(Some((4, 6))));
        assert_eq!(parse_range("bytes=4-600", 10), Some(Some((4, 9))));
        // The last N bytes (all of them if N is larger than the file).
        assert_eq!(parse_range("bytes=-4", 10), Some(Some((6, 9))));
        assert_eq!(parse_range("bytes=-40", 10), Some(Some((0, 9))));
        // Ignored: the whole file.
        assert_eq!(parse_range("items=0-", 10), Some(None));
        assert_eq!(parse_range("bytes=0-1,4-5", 10), Some(None));
        // Unsatisfiable or malformed: 416.
        assert_eq!(parse_range("bytes=10-", 10), None);
        assert_eq!(parse_range("bytes=6-4", 10), None);
        assert_eq!(parse_range("bytes=-0", 10), None);
        assert_eq!(parse_range("bytes=-", 10), None);
        assert_eq!(parse_range("bytes=x-", 10), None);
        assert_eq!(parse_range("bytes=0-", 0), None);
        assert_eq!(parse_range("bytes", 10), None);
    }
}

fn deployment_body(v: crate::ota::DeploymentView) -> Deployment {
    Deployment {
        id: v.deployment.id,
        artifact_id: v.deployment.artifact_id,
        version: v.version,
        selector: v.deployment.selector,
        allow_downgrade: v.deployment.allow_downgrade,
        created_by: v.deployment.created_by,
        created_at: v.deployment.created_at_ms,
        canceled_at: v.deployment.canceled_at_ms,
        counts: v.counts,
        total: v.total,
    }
}

#[utoipa::path(post, path = "/api/v1/ota/deployments", request_body = CreateDeployment,
    responses((status = 201, body = Deployment, description = "one mooring.update command per matching device"),
        (status = 400, body = ErrorBody, description = "invalid_selector, no_matching_devices, too_many_devices"),
        (status = 404, body = ErrorBody, description = "artifact_not_found"), (status = 409, body = ErrorBody, description = "artifact_not_ready"),
        (status = 503, body = ErrorBody, description = "too_many_deployments: [ota] deployments_max are stored; delete one that is over")))]
pub(super) async fn create_deployment(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ApiJson(req): ApiJson<CreateDeployment>,
) -> ApiResult<(StatusCode, Json<Deployment>)> {
    let (v, pending) = app
        .ota
        .deploy(
            &caller.access,
            caller.principal(),
            &req.artifact_id,
            &req.selector,
            req.allow_downgrade,
        )
        .await?;
    // Apart from the request: a client that goes away (a CLI timeout on a large selector) does
    // not cut the sending short.
    let sender = app.ota.clone();
    app.ota_tasks
        .spawn(async move { sender.send_updates(pending).await });
    Ok((StatusCode::CREATED, Json(deployment_body(v))))
}

#[utoipa::path(get, path = "/api/v1/ota/deployments", params(PageParams),
    responses((status = 200, body = DeploymentList, description = "a page, newest first, with counts per state (limit 1..=100, default 100)"),
        (status = 400, body = ErrorBody, description = "invalid_limit, invalid_cursor")))]
pub(super) async fn list_deployments(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ApiQuery(p): ApiQuery<PageParams>,
) -> ApiResult<Json<DeploymentList>> {
    let (list, next_cursor) = app
        .ota
        .list_deployments(&caller.access, p.cursor.as_deref(), p.limit)
        .await?;
    Ok(Json(DeploymentList {
        deployments: list.into_iter().map(deployment_body).collect(),
        next_cursor,
    }))
}

#[utoipa::path(get, path = "/api/v1/ota/deployments/{id}", params(("id" = String, Path)),
    responses((status = 200, body = Deployment, description = "devices per update state"), (status = 404, body = ErrorBody)))]
pub(super) async fn get_deployment(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<Deployment>> {
    Ok(Json(deployment_body(
        app.ota.visible_deployment(&caller.access, &id).await?,
    )))
}

#[utoipa::path(post, path = "/api/v1/ota/deployments/{id}/cancel", params(("id" = String, Path)),
    responses((status = 200, body = Deployment, description = "canceled: pending updates withdrawn, started ones sent mooring.update.cancel"),
        (status = 404, body = ErrorBody)))]
pub(super) async fn cancel_deployment(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<Deployment>> {
    Ok(Json(deployment_body(
        app.ota.cancel(&caller.access, &id).await?,
    )))
}

#[utoipa::path(delete, path = "/api/v1/ota/deployments/{id}", params(("id" = String, Path)),
    responses((status = 204, description = "deleted with its devices' updates (their history); its artifact is free to delete once no deployment names it"),
        (status = 404, body = ErrorBody, description = "deployment_not_found"),
        (status = 409, body = ErrorBody, description = "deployment_active: not canceled and an update is not final yet")))]
pub(super) async fn delete_deployment(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<StatusCode> {
    app.ota.delete_deployment(&caller.access, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/api/v1/devices/{id}/ota", params(("id" = String, Path)),
    responses((status = 200, body = DeviceUpdates, description = "the device's updates, newest first"), (status = 404, body = ErrorBody)))]
pub(super) async fn device_updates(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<DeviceUpdates>> {
    let list = app.ota.device_history(&caller.access, &id).await?;
    Ok(Json(DeviceUpdates {
        updates: list
            .into_iter()
            .map(|u| DeviceUpdate {
                deployment_id: u.deployment_id,
                device_id: u.device_id,
                artifact_id: u.artifact_id,
                version: u.version,
                state: u.state.as_str().to_owned(),
                reason: u.reason,
                progress_pct: u.progress_pct,
                running_version: u.running_version,
                command_id: u.command_id,
                updated_at: u.updated_at_ms,
            })
            .collect(),
    }))
}
