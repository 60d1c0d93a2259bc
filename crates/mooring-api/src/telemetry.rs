//! Stored telemetry: points of a metric over time, and each metric's latest value.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use utoipa::{IntoParams, ToSchema};

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TelemetryPoint {
    pub ts: u64,
    /// A number or a boolean.
    #[schema(value_type = Object)]
    pub value: serde_json::Value,
    /// Present when the query did not name a metric.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TelemetryPoints {
    pub points: Vec<TelemetryPoint>,
}

/// Query of `GET /api/v1/devices/{id}/telemetry`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct TelemetryParams {
    /// Metric name (flattened, e.g. `gps.lat`); all metrics if absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metric: Option<String>,
    /// Inclusive lower bound, unix ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<u64>,
    /// Inclusive upper bound, unix ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to: Option<u64>,
    /// 1..=10000 (default 1000); oldest first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LatestValue {
    pub ts: u64,
    #[schema(value_type = Object)]
    pub value: serde_json::Value,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LatestMetrics {
    pub metrics: BTreeMap<String, LatestValue>,
}
