//! Device shadow: desired and reported state, with a version for `If-Match`.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Shadow {
    #[schema(value_type = Object)]
    pub desired: serde_json::Map<String, serde_json::Value>,
    #[schema(value_type = Object)]
    pub reported: serde_json::Map<String, serde_json::Value>,
    /// Bumped on every change; send it back as `If-Match`.
    pub version: u64,
    /// Desired keys whose value differs from reported; `{}` when in sync.
    #[schema(value_type = Object)]
    pub delta: serde_json::Map<String, serde_json::Value>,
}

/// `PATCH /api/v1/devices/{id}/shadow`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ShadowPatch {
    /// JSON merge patch (RFC 7396) applied to desired: objects merge, `null` deletes a key.
    #[schema(value_type = Object)]
    pub desired: serde_json::Value,
}
