//! Gateways (issue 20): which gateway may act for which child device.

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

/// `PUT /api/v1/devices/{id}/gateway`: attach the device (a child) to a gateway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AttachGateway {
    /// The gateway's device id.
    pub gateway: String,
}

/// A child's attachment to its gateway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct GatewayAttachment {
    pub child: String,
    pub gateway: String,
    /// Unix ms.
    pub attached_at: u64,
}

/// One child of a gateway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct GatewayChild {
    pub id: String,
    /// Unix ms.
    pub attached_at: u64,
    /// The gateway says it sees the child now (and the gateway is connected).
    pub online: bool,
}

/// `GET /api/v1/devices/{id}/children`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct GatewayChildren {
    pub gateway: String,
    pub children: Vec<GatewayChild>,
    /// Pass as `cursor` for the next page; `null` on the last.
    pub next_cursor: Option<String>,
}

/// `GET /api/v1/devices/{id}/children?limit=&cursor=`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ChildrenParams {
    /// 1..=1000 (default 100).
    pub limit: Option<usize>,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// `GET /api/v1/devices/{id}/local-key`: the key a local client (a phone app, a technician's
/// laptop) presents to the device's local API, `Authorization: Bearer <key>`. It is derived from
/// the certificate the device last connected with: a rotated certificate means a new key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LocalKeyView {
    pub device_id: String,
    /// 64 lowercase hex digits.
    pub key: String,
    /// The certificate it belongs to: SHA-256 of its DER, lowercase hex.
    pub cert_sha256: String,
    pub cert_serial: String,
    /// When that certificate (and so the key) stops being used, unix ms.
    pub cert_not_after: u64,
}
