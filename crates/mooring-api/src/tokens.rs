//! API tokens (for apps and machines).

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

/// `POST /api/v1/tokens`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    /// 1-128 characters, e.g. the app that uses it (`grafana`).
    pub name: String,
    /// `admin`, `operator`, `installer`, `viewer` or `service` (MQTT read access per policy,
    /// read-only API).
    pub role: String,
    /// Limit the token to the devices matching this selector (`tag:` and `id:` terms only),
    /// e.g. `tag:customer=acme`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// The token stops working this many milliseconds from now (default: never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in_ms: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreatedToken {
    pub id: String,
    pub name: String,
    pub role: String,
    /// The secret; shown only here (stored hashed).
    pub token: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
}

/// A token as listed (never its secret: only a hash of it is stored).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TokenInfo {
    pub id: String,
    pub name: String,
    pub role: String,
    pub scope: Option<String>,
    pub created_at: u64,
    pub expires_at: Option<u64>,
    /// Last use (recorded at most about once a minute per node).
    pub last_used_at: Option<u64>,
}

/// `GET /api/v1/tokens`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TokenList {
    pub tokens: Vec<TokenInfo>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// Paging of the list calls (`GET /api/v1/tokens`, `GET /api/v1/users`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct PageParams {
    /// Page size, 1..=1000 (default 100).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
}
