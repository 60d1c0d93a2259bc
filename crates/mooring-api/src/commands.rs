//! Commands to one device, fleet commands (one per device a selector matches), their states.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use utoipa::{IntoParams, ToSchema};

/// `POST /api/v1/devices/{id}/commands`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateCommand {
    /// `[A-Za-z0-9_.-]{1,64}`, starting with a letter or digit, e.g. `reboot`.
    pub name: String,
    /// Any JSON (at most 64 KiB encoded); passed to the device as is.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub params: serde_json::Value,
    /// Seconds until the command expires if it has not run (default from `[commands]`, at most 30 days).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u64>,
    /// Deliveries without an acknowledgement before it fails (default 5, at most 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// Same key for the same device: the existing command is returned (200), none is created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// Seconds an acknowledged command may wait for its result before it fails with reason
    /// `timeout` (0: no limit; default `commands.default_result_timeout_secs`, 3600; at most 7 days).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result_timeout_secs: Option<u64>,
}

/// `POST /api/v1/commands`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateFleetCommand {
    /// Which devices, e.g. `tag:site=berlin and online`, `d1,d2`, `version=1.4.0`.
    pub selector: String,
    pub name: String,
    #[serde(default)]
    #[schema(value_type = Object)]
    pub params: serde_json::Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// As for one device's command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result_timeout_secs: Option<u64>,
}

/// Query of the calls that can wait for a command to finish.
#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct WaitParams {
    /// Wait up to this many ms (0..=30000) for a final state before answering.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wait_ms: Option<u64>,
}

/// Query of `GET /api/v1/devices/{id}/commands`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct CommandListParams {
    /// Only commands in this state.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// Page size, 1..=1000 (default 100).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    /// `next_cursor` of the previous page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct HistoryEntry {
    pub state: String,
    /// Unix ms.
    pub at: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CommandResultBody {
    /// `succeeded` or `failed`.
    pub status: String,
    #[schema(value_type = Object)]
    pub output: serde_json::Value,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Command {
    pub id: String,
    pub device_id: String,
    pub name: String,
    /// As created, except a `mooring.update`'s download token (`link.token`), which reads
    /// `redacted`: only the device gets it.
    #[schema(value_type = Object)]
    pub params: serde_json::Value,
    /// queued, delivered, acknowledged, succeeded, failed, expired or canceled.
    pub state: String,
    /// Deliveries to the device so far.
    pub attempts: u32,
    pub max_attempts: u32,
    pub created_at: u64,
    pub expires_at: u64,
    /// The fleet command this belongs to.
    pub parent_id: Option<String>,
    pub idempotency_key: Option<String>,
    pub history: Vec<HistoryEntry>,
    pub result: Option<CommandResultBody>,
    /// Seconds it may stay acknowledged without a result before it fails with `timeout` (0: no
    /// limit). A result that comes later is kept as `result.output.late_result`.
    pub result_timeout_secs: u64,
    /// `cloud`: created here and sent to the device. `local`: asked for on the device's local
    /// API (docs/edge.md), recorded when its result synced; its `created_at` and `history` are
    /// the device's own times and `idempotency_key` is the id the device ran it under.
    #[serde(default = "cloud_origin")]
    pub origin: String,
    /// For a `local` command: when its result reached the server (unix ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub synced_at: Option<u64>,
}

fn cloud_origin() -> String {
    "cloud".to_owned()
}

impl Command {
    /// States after which nothing changes any more.
    pub const FINAL_STATES: [&'static str; 4] = ["succeeded", "failed", "expired", "canceled"];

    /// Whether the command reached a final state.
    pub fn is_final(&self) -> bool {
        Self::FINAL_STATES.contains(&self.state.as_str())
    }

    /// `result.output.reason` of a failed command (`timeout`, `not_supported`, ...).
    pub fn failure_reason(&self) -> Option<&str> {
        self.result.as_ref()?.output.get("reason")?.as_str()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CommandList {
    /// Newest first.
    pub commands: Vec<Command>,
    pub next_cursor: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FleetCommand {
    pub id: String,
    /// The selector as parsed (normalised).
    pub selector: String,
    pub name: String,
    #[schema(value_type = Object)]
    pub params: serde_json::Value,
    pub created_at: u64,
    pub expires_at: u64,
    /// Device commands created.
    pub total: u64,
    /// Device commands per state (every state listed, 0 if none).
    pub counts: BTreeMap<String, u64>,
    /// Every device command is in a final state.
    pub done: bool,
}

/// A fleet command (`f...`) with its aggregate status, or a single device command (`c...`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
// One value per API answer, moved once: the size of the larger variant costs nothing here.
#[allow(clippy::large_enum_variant)]
pub enum AnyCommand {
    Fleet(FleetCommand),
    Device(Command),
}
