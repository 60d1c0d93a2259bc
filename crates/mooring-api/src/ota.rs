//! Over-the-air updates (issue 17): artifacts (chunked, resumable uploads with a signed
//! manifest), download links, the update key.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `POST /api/v1/ota/artifacts`: announce a file; the answer carries the manifest to sign.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateArtifact {
    /// What a device runs after installing it (`1.4.0`); unique among artifacts.
    pub version: String,
    /// Hardware revisions it runs on (1..=32).
    pub compatible: Vec<String>,
    /// Release notes for people (at most 4096 characters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notes: Option<String>,
    /// Lowercase hex SHA-256 of the whole file.
    pub sha256: String,
    /// Size of the file in bytes (at most `[ota] artifact_size_bytes_max`).
    pub size: u64,
}

/// An artifact as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Artifact {
    /// `art_<hex>`.
    pub id: String,
    pub version: String,
    pub sha256: String,
    pub size: u64,
    pub compatible: Vec<String>,
    pub notes: Option<String>,
    /// `uploading` or `ready`.
    pub state: String,
    /// How many bytes are stored: the next chunk goes at this offset.
    pub stored_bytes: u64,
    /// The manifest's JSON exactly as signed (sign these bytes with `--sign-key`).
    pub manifest: String,
    /// Hex Ed25519 signature over `manifest` (when ready).
    pub signature: Option<String>,
    pub created_at: u64,
    pub created_by: String,
}

/// `GET /api/v1/ota/artifacts`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ArtifactList {
    pub artifacts: Vec<Artifact>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// `POST /api/v1/ota/artifacts/{id}/complete`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CompleteArtifact {
    /// Hex Ed25519 signature over the manifest bytes: required when the update key is kept
    /// offline (`[ota] update_public_key`); otherwise the server signs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

/// `POST /api/v1/ota/artifacts/{id}/links`: a download link for one device.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateLink {
    pub device_id: String,
    /// How long the token is valid (default and most: `[ota] download_token_ttl_ms`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_ms: Option<u64>,
}

/// A download link: `GET url` with `Authorization: Bearer <token>` until `expires_at`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DownloadLink {
    pub url: String,
    pub token: String,
    /// Unix ms.
    pub expires_at: u64,
}

/// `GET /api/v1/ota/update-key`: what devices pin in their config.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct UpdateKeyInfo {
    /// The Ed25519 public key, 64 hex digits.
    pub public_key: String,
    /// Whether the server signs manifests (false: the private key is kept offline).
    pub server_signs: bool,
}

/// `POST /api/v1/ota/deployments`: send a ready artifact to the devices a selector matches.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateDeployment {
    pub artifact_id: String,
    /// A device selector (`tag:site=berlin`, `id:d1,d2`, `all`...), narrowed by the caller's scope.
    pub selector: String,
    /// Devices install it even if it is older than what they run.
    #[serde(default)]
    pub allow_downgrade: bool,
}

/// A deployment with its devices' states.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Deployment {
    /// `dep_<hex>`.
    pub id: String,
    pub artifact_id: String,
    pub version: String,
    /// The selector as applied (with the creator's scope).
    pub selector: String,
    pub allow_downgrade: bool,
    pub created_by: String,
    pub created_at: u64,
    pub canceled_at: Option<u64>,
    /// Devices per update state (`pending`, `deferred`, `downloading`, `verifying`,
    /// `installing`, `rebooting`, `health_checking`, `committed`, `rolled_back`, `failed`).
    pub counts: std::collections::BTreeMap<String, u64>,
    /// Devices in the deployment.
    pub total: u64,
}

/// `GET /api/v1/ota/deployments`: a page, newest first (`limit` 1..=100, default 100).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DeploymentList {
    pub deployments: Vec<Deployment>,
    /// Pass as `cursor` to get the next (older) page; null on the last page.
    #[serde(default)]
    pub next_cursor: Option<String>,
}

/// One update of a device, as its reports tell it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DeviceUpdate {
    pub deployment_id: String,
    pub device_id: String,
    pub artifact_id: String,
    pub version: String,
    pub state: String,
    /// `<code>: <text>` for deferred, rolled back and failed.
    pub reason: Option<String>,
    pub progress_pct: Option<u8>,
    /// What the device reported it runs.
    pub running_version: Option<String>,
    pub command_id: Option<String>,
    pub updated_at: u64,
}

/// `GET /api/v1/devices/{id}/ota`: the device's updates, newest first (at most 100).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DeviceUpdates {
    pub updates: Vec<DeviceUpdate>,
}
