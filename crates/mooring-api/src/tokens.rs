//! API tokens.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `POST /api/v1/tokens`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    pub name: String,
    /// `service` (MQTT read access per policy, read-only API) or `admin`.
    pub role: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreatedToken {
    pub id: String,
    pub name: String,
    pub role: String,
    /// The secret; shown only here (stored hashed).
    pub token: String,
}
