//! The one error body every failed call answers with.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `{"error":{"code":..,"message":..}}`, with a 4xx/5xx status.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable machine-readable code, e.g. `device_not_found`.
    pub code: String,
    pub message: String,
}
