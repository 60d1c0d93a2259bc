//! The certificate ledger: every certificate issued to a device, its revocation and expiry.

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

/// One certificate of a device.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Certificate {
    /// Lowercase hex.
    pub serial: String,
    pub device_id: String,
    /// Lowercase hex of the SHA-256 of the certificate (DER).
    pub sha256: String,
    /// Unix ms.
    pub not_before: u64,
    /// Unix ms.
    pub not_after: u64,
    /// Unix ms.
    pub issued_at: u64,
    /// `fleet` (the fleet CA) or `ca:<id>` (a registered manufacturer CA).
    pub issuer: String,
    /// `active` or `revoked`.
    pub state: String,
    /// Unix ms; set once revoked.
    pub revoked_at: Option<u64>,
    pub revoke_reason: Option<String>,
}

/// `GET /api/v1/devices/{id}/certificates` (newest issued first) and
/// `GET /api/v1/certificates` (soonest expiry first).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CertificateList {
    pub certificates: Vec<Certificate>,
    /// Pass as `after` for the next page; null on the last.
    pub next_cursor: Option<String>,
}

/// Query of `GET /api/v1/certificates`: active certificates expiring within a time from now
/// (already expired ones included).
#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ExpiringParams {
    /// Milliseconds from now, e.g. 2592000000 for 30 days.
    pub expiring_within_ms: u64,
    /// Page size, 1..=1000 (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    /// The `next_cursor` of the previous page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
}

/// `POST /api/v1/devices/{id}/revoke` and `POST /api/v1/certificates/{serial}/revoke`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RevokeRequest {
    /// Why (kept with the certificate; at most 256 characters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// What a revocation did.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Revoked {
    /// The serials revoked by this call (empty: they were revoked already).
    pub revoked: Vec<String>,
}

/// `POST /api/v1/devices/{id}/certificates/rotate`: tell the device to renew its certificate
/// now. Delivered as the reserved command `mooring.cert.rotate` (handled inside the agent), so
/// it waits while the device is offline, up to `ttl_secs`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RotateRequest {
    /// How long the request waits for an offline device (default: the server's command TTL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u64>,
}

/// `POST /api/v1/certificates/rotations`: a fleet rotation. Every device whose active
/// certificate expires within `expiring_within_ms` from now is told to renew it, at most
/// `max_per_minute` a minute (evenly spaced), by a resumable background job.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateRotation {
    /// Milliseconds from now, e.g. 2592000000 for 30 days.
    pub expiring_within_ms: u64,
    /// Renewal requests per minute at most, 1..=60000.
    pub max_per_minute: u32,
}

/// A fleet rotation and its progress.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Rotation {
    /// The job that runs it (`GET /api/v1/jobs/{id}`, cancel with `POST /api/v1/jobs/{id}/cancel`).
    pub job: crate::Job,
    /// Certificates selected (active, expiring before the window's end when the job started);
    /// null until counted.
    pub selected: Option<u64>,
    /// Devices told to renew.
    pub requested: u64,
    /// Selected certificates replaced since: the device connected with its new one, the old one
    /// was revoked.
    pub confirmed: u64,
    /// Requested and not yet confirmed.
    pub pending: u64,
    /// Devices that could not be told (deleted meanwhile, ...); see `job.errors`.
    pub failed: u64,
}

/// `GET /api/v1/certificates/rotations`: newest first.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RotationList {
    pub rotations: Vec<Rotation>,
}
