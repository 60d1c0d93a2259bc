//! Devices: create (with credentials), list, show, tags.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use utoipa::{IntoParams, ToSchema};

/// `POST /api/v1/devices`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateDevice {
    /// Device id: `^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`; becomes the certificate CN and MQTT client id.
    pub id: String,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// A PEM certificate signing request (PKCS#10) made on the device: the certificate is issued
    /// for its key, which never leaves the device, and no private key is returned. Only the
    /// public key is used (the server sets serial, validity, key usage and CN = id). Without
    /// it the server makes the key and returns it once (quick starts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub csr_pem: Option<String>,
}

/// A newly created device with its credentials. The private key is shown only here.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreatedDevice {
    #[serde(flatten)]
    pub device: Device,
    pub certificate_pem: String,
    /// The key the server made; absent when the device sent a CSR.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_key_pem: Option<String>,
    pub ca_pem: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Device {
    pub id: String,
    pub tags: BTreeMap<String, String>,
    pub online: bool,
    /// Unix ms of the last connect, disconnect or message; null if never seen.
    pub last_seen: Option<u64>,
    pub created_at: u64,
    pub cert_serial: String,
    pub cert_sha256: String,
    pub cert_not_after: u64,
    /// Who installed it, where and when; absent until an installation is recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub installation: Option<crate::Installation>,
    /// The firmware version the device runs, as its agent reports it (shadow
    /// `reported.version`: the committed slot's version with the A/B updater), never what a
    /// deployment sent; absent until the device reports one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DeviceList {
    pub devices: Vec<Device>,
    /// Pass as `cursor` to get the next page; null on the last page.
    pub next_cursor: Option<String>,
}

/// Query of `GET /api/v1/devices`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListDevicesParams {
    /// Page size, 1..=1000 (default 100).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
    /// Only devices matching this selector, e.g. `tag:site=berlin and online`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
}
