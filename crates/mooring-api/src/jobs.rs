//! Background jobs: one bulk action on the devices a selector matches, with progress.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use utoipa::{IntoParams, ToSchema};

/// `POST /api/v1/jobs`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateJob {
    /// Which devices, e.g. `tag:site=berlin and online` or `d1,d2,d3`; narrowed by the
    /// caller's scope.
    pub selector: String,
    /// `tag`, `untag`, `command` or `delete`.
    pub action: String,
    /// Action `tag`: set these tags (others kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<BTreeMap<String, String>>,
    /// Action `untag`: remove these tag keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys: Option<Vec<String>>,
    /// Action `command`: the command every matching device gets (one fleet command).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<JobCommand>,
}

/// The command of a job with action `command`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JobCommand {
    /// `[A-Za-z0-9_.-]{1,64}`, e.g. `reboot`.
    pub name: String,
    /// Any JSON, passed to each device as is.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub params: serde_json::Value,
    /// Milliseconds until each device's command expires if it has not run (rounded up to
    /// seconds; default from `[commands]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_ms: Option<u64>,
}

/// One device a job could not act on.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JobErrorEntry {
    /// Empty when the job as a whole failed.
    pub device_id: String,
    pub message: String,
}

/// A job and its progress.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Job {
    /// `job_...`; ids sort by creation time.
    pub id: String,
    pub action: String,
    /// The selector as applied: the one given, narrowed by the creator's scope.
    pub selector: String,
    /// The tags, keys or command given.
    #[schema(value_type = Object)]
    pub params: serde_json::Value,
    /// `queued`, `running`, `succeeded`, `failed`, `canceled` or `dead` (out of attempts:
    /// see `last_error`).
    pub state: String,
    /// Devices matched; null until counted.
    pub total: Option<u64>,
    /// Devices acted on.
    pub done: u64,
    /// Devices the action failed on.
    pub failed: u64,
    /// The first 20 failures.
    pub errors: Vec<JobErrorEntry>,
    /// Action `command`: the fleet command it created (`GET /api/v1/commands/{id}`).
    pub command_id: Option<String>,
    /// The creator: a user's email or a token's id.
    pub created_by: String,
    /// Unix ms.
    pub created_ms: u64,
    pub started_ms: Option<u64>,
    pub finished_ms: Option<u64>,
    /// The worker running its current turn (`<node id>/<n>`); null between turns.
    #[serde(default)]
    pub worker: Option<String>,
    /// Turns of the current step that failed or whose worker stopped (reset when a turn
    /// succeeds); at `[jobs] attempts_max` the job is `dead`.
    #[serde(default)]
    pub attempts: u32,
    /// Why the last failed attempt failed (a turn's error, or `worker <w> stopped mid-turn
    /// (its lease ran out)`); kept after the job recovered.
    #[serde(default)]
    pub last_error: Option<String>,
    /// A report: what it made so far (`format`, `content_type`, `points`, `bytes`); download
    /// it from `GET /api/v1/jobs/{id}/result` once `succeeded`.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub result: Option<serde_json::Value>,
}

impl Job {
    /// `succeeded`, `failed`, `canceled` or `dead`: the job does nothing more.
    pub fn is_finished(&self) -> bool {
        matches!(
            self.state.as_str(),
            "succeeded" | "failed" | "canceled" | "dead"
        )
    }
}

/// `POST /api/v1/reports`: a report made in the background as a job.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateReport {
    /// `telemetry`: the points of the selected devices; `fleet`: their health per cohort,
    /// firmware versions and open alerts.
    pub kind: String,
    /// Which devices, e.g. `tag:site=berlin`; narrowed by the caller's scope. A fleet report
    /// without one covers every device the caller may see.
    #[serde(default)]
    pub selector: String,
    /// `telemetry`: points from this Unix ms (inclusive)…
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_ms: Option<u64>,
    /// …to this one (exclusive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_ms: Option<u64>,
    /// `telemetry`: `csv` (default; `device_id,ts_ms,time,metric,value`) or `jsonl`; `fleet`:
    /// `html` (default) or `csv` (the cohort table).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// `fleet`: the cohorts, e.g. `tag:site,version` (as `GET /api/v1/health`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_by: Option<String>,
    /// Only these metrics (default: all).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub metrics: Vec<String>,
}

/// `GET /api/v1/jobs`: newest first.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JobList {
    pub jobs: Vec<Job>,
    /// Pass as `cursor` for the next page; null on the last.
    pub next_cursor: Option<String>,
}

/// Query of `GET /api/v1/jobs`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct JobListParams {
    /// Page size, 1..=200 (default 50).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    /// `next_cursor` of the previous page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
    /// Only jobs in this state, e.g. `dead` (the dead letter list).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
}
