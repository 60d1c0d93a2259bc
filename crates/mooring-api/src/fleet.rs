//! Fleet statistics: how many devices a selection holds, online and per firmware version, and
//! the fleet's history (docs/fleet.md).

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

/// Most versions [`FleetSummary::versions`] lists.
pub const FLEET_VERSIONS_MAX: usize = 50;

/// Query of `GET /api/v1/fleet/summary`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct FleetSummaryParams {
    /// Only devices matching this selector, e.g. `tag:site=berlin and online` (default: all
    /// devices the caller may see).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
}

/// `GET /api/v1/fleet/summary`: the devices a selector matches (within the caller's scope).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct FleetSummary {
    /// The selector asked for (`null`: all devices).
    pub selector: Option<String>,
    /// Devices matching it.
    pub devices: u64,
    /// Of those, connected now.
    pub online: u64,
    /// Devices per reported firmware version, most first (ties by version, unknown last), at
    /// most 50 entries; `version` `null` counts devices that report none.
    pub versions: Vec<VersionCount>,
    /// Devices whose version is not among those listed.
    pub versions_other: u64,
    /// When the server counted, unix ms.
    pub generated_ms: u64,
}

/// One firmware version and how many devices report it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VersionCount {
    pub version: Option<String>,
    pub devices: u64,
}

/// Query of `GET /api/v1/fleet/history`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct FleetHistoryParams {
    /// Window start, unix ms, inclusive (default: `to_ms` minus 24 h).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from_ms: Option<u64>,
    /// Window end, unix ms, exclusive (default: now). At most 7 days after `from_ms`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to_ms: Option<u64>,
}

/// `GET /api/v1/fleet/history`: one sample per interval, summed over the cluster's nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct FleetHistory {
    /// The sample interval (`[fleet] sample_interval_ms`); the ingest rate is
    /// `points / (step_ms / 1000)` per second.
    pub step_ms: u64,
    /// Oldest first.
    pub samples: Vec<FleetSamplePoint>,
}

/// One interval of the fleet's history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct FleetSamplePoint {
    /// Start of the interval, unix ms.
    pub ts_ms: u64,
    /// Registered devices (the largest any node counted).
    pub devices: u64,
    /// Devices connected, summed over nodes.
    pub online: u64,
    /// Telemetry points stored during the interval.
    pub points: u64,
    /// MQTT PUBLISH packets received during the interval.
    pub messages: u64,
}
