//! Fleet health (docs/health.md): one device's health signals, and the fleet's by cohort with
//! the cohorts significantly worse than the rest.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use utoipa::{IntoParams, ToSchema};

/// The hours every rate and `last_24h` count covers.
pub const HEALTH_WINDOW_HOURS: u32 = 24;
/// Most keys `group_by` names.
pub const HEALTH_GROUP_KEYS_MAX: usize = 3;
/// The failure signals the fleet summary tests per cohort, in this order.
pub const HEALTH_TESTED_SIGNALS: [&str; 6] = [
    "disconnects",
    "telemetry_gaps",
    "command_failures",
    "command_timeouts",
    "crashes",
    "update_rollbacks",
];

/// The proportion signal the fleet summary also tests: devices whose battery is below
/// `[health] battery_low_level`, of the devices that report one (Fisher's exact test).
pub const HEALTH_BATTERY_SIGNAL: &str = "battery_low";

/// Counts of each signal over a period.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HealthCounts {
    /// Sessions opened (a reconnect is a connect after a disconnect).
    pub connects: u64,
    /// Sessions closed.
    pub disconnects: u64,
    /// Telemetry that resumed after more than `[health] telemetry_gap_ms` of silence.
    pub telemetry_gaps: u64,
    /// Commands that ended `failed`.
    pub command_failures: u64,
    /// Commands that ended `expired` (not answered in time).
    pub command_timeouts: u64,
    /// Agent restarts (increases of the shadow's `reported.agent.boots`).
    pub restarts: u64,
    /// Restarts after an unclean stop: crash, kill, power loss (`reported.agent.unclean_stops`).
    pub crashes: u64,
    /// Updates the device rolled back.
    pub update_rollbacks: u64,
    /// Updates that failed before switching.
    pub update_failures: u64,
}

impl HealthCounts {
    /// The count of a signal by its name (`None`: no such signal).
    pub fn get(&self, signal: &str) -> Option<u64> {
        Some(match signal {
            "connects" => self.connects,
            "disconnects" => self.disconnects,
            "telemetry_gaps" => self.telemetry_gaps,
            "command_failures" => self.command_failures,
            "command_timeouts" => self.command_timeouts,
            "restarts" => self.restarts,
            "crashes" => self.crashes,
            "update_rollbacks" => self.update_rollbacks,
            "update_failures" => self.update_failures,
            _ => return None,
        })
    }

    /// Adds `o` (saturating: a sum never wraps).
    pub fn add(&mut self, o: &HealthCounts) {
        let add = |a: &mut u64, b: u64| *a = a.saturating_add(b);
        add(&mut self.connects, o.connects);
        add(&mut self.disconnects, o.disconnects);
        add(&mut self.telemetry_gaps, o.telemetry_gaps);
        add(&mut self.command_failures, o.command_failures);
        add(&mut self.command_timeouts, o.command_timeouts);
        add(&mut self.restarts, o.restarts);
        add(&mut self.crashes, o.crashes);
        add(&mut self.update_rollbacks, o.update_rollbacks);
        add(&mut self.update_failures, o.update_failures);
    }
}

/// `GET /api/v1/devices/{id}/health`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DeviceHealth {
    pub device_id: String,
    /// Connected now.
    pub online: bool,
    /// When the first signal was recorded (`null`: none yet).
    pub since_ms: Option<u64>,
    /// Hours of the last 24 the record covers (from `since_ms`), what the rates divide by.
    pub window_hours: f64,
    /// Counts in the last 24 hours (whole hours: the current one and the 23 before).
    pub last_24h: HealthCounts,
    /// Counts since `since_ms`.
    pub totals: HealthCounts,
    /// Connects per hour over the window.
    pub reconnects_per_hour: f64,
    /// Time online since `since_ms` (the open session included).
    pub online_ms: u64,
    pub telemetry: TelemetryHealth,
    /// The level of the `[health] battery_metric` telemetry (`null`: never sent).
    pub battery: Option<BatteryHealth>,
    /// The agent's own start counts, as its shadow reports them.
    pub agent: AgentHealth,
    /// The newest `diagnostics` command that ended (read it with
    /// `GET /api/v1/devices/{id}/commands/{command_id}`).
    pub last_diagnostics: Option<DiagnosticsRef>,
    /// The newest update that rolled back or failed.
    pub last_update_problem: Option<UpdateProblem>,
    /// When the server answered, unix ms.
    pub generated_ms: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TelemetryHealth {
    /// When telemetry was last stored (server time).
    pub last_ms: Option<u64>,
    /// Time since then.
    pub silent_ms: Option<u64>,
    /// The longest silence between two telemetry messages.
    pub longest_gap_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BatteryHealth {
    pub level: f64,
    pub at_ms: u64,
    /// Level units per hour (negative: draining), a weighted mean of slopes over at least 10
    /// minutes each (`null`: not enough samples yet).
    pub trend_per_hour: Option<f64>,
    /// At the trend, hours until the level reaches 0 (`null` unless draining).
    pub hours_to_empty: Option<f64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AgentHealth {
    pub boots: Option<u64>,
    pub unclean_stops: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DiagnosticsRef {
    pub command_id: String,
    /// `succeeded`, `failed` or `expired`.
    pub state: String,
    pub at_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct UpdateProblem {
    pub deployment_id: String,
    pub version: String,
    /// `rolled_back` or `failed`.
    pub state: String,
    pub reason: Option<String>,
    pub at_ms: u64,
}

/// Query of `GET /api/v1/health`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct HealthParams {
    /// Only devices matching this selector (default: all the caller may see).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// Cohorts: up to 3 comma-separated keys, each `tag:<key>` or `version` (the reported
    /// firmware version), e.g. `tag:hw,version`. Default: one group, the whole selection.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group_by: Option<String>,
}

/// `GET /api/v1/health`: the selection's health per cohort, and the cohorts whose rate of a
/// failure signal is significantly above the rest's (docs/health.md, "The cohort test").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HealthSummary {
    pub selector: Option<String>,
    /// The `group_by` keys, in order.
    pub group_by: Vec<String>,
    pub window_hours: u32,
    /// Devices in the selection.
    pub devices: u64,
    /// The cohorts, most devices first (ties by label).
    pub groups: Vec<HealthGroup>,
    /// Flagged cohorts, one per cohort and signal, most significant first.
    pub anomalies: Vec<HealthAnomaly>,
    pub generated_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HealthGroup {
    /// E.g. `hw=rev-b on 1.4.0` (`-` for a device without the tag or version; `all` when not
    /// grouped).
    pub label: String,
    /// `group_by` key → this cohort's value (`null`: the device has none).
    pub key: BTreeMap<String, Option<String>>,
    pub devices: u64,
    /// Devices with a health record (the ones the test counts).
    pub reporting: u64,
    pub online: u64,
    /// Device-hours of the window the records cover (the rates' exposure).
    pub device_hours: f64,
    pub last_24h: HealthCounts,
    /// Each tested signal's events per device-hour.
    pub rates: BTreeMap<String, f64>,
    /// Mean battery level of the devices that report one.
    pub battery_mean: Option<f64>,
    /// Devices whose battery is below `[health] battery_low_level`.
    pub battery_low: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HealthAnomaly {
    pub signal: String,
    pub cohort: String,
    pub devices: u64,
    pub events: u64,
    /// The cohort's rate over the rest of the selection's.
    pub rate_ratio: f64,
    pub p_value: f64,
    /// Benjamini-Hochberg adjusted, across the cohorts tested for this signal.
    pub q_value: f64,
    /// E.g. `hw=rev-b on 1.4.0: disconnects 6.2× fleet rate (n=412, p<0.001)`.
    pub description: String,
}
