//! Rules and alerts (docs/health.md "Rules" and "Alerts"). Times are unix ms.

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

/// `POST /api/v1/rules`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateRule {
    /// Unique; letters, digits, `.`, `_`, `-`; at most 64.
    pub name: String,
    /// The condition, e.g. `battery < 15 for 10m`, `no telemetry for 30m`, `on update_rolled_back`.
    pub when: String,
    /// The devices it watches (default: every device the creator may see), e.g. `tag:hw=rev-b`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// The actions, comma-separated: `alert:warning`, `command:diagnostics`, `tag:battery=low`.
    pub then: String,
    /// Default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
}

/// `PATCH /api/v1/rules/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateRule {
    pub enabled: bool,
}

/// A rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Rule {
    pub id: String,
    pub name: String,
    /// The condition in its canonical form.
    pub when: String,
    pub selector: Option<String>,
    /// The creator's scope: the rule never reaches a device outside it.
    pub scope: Option<String>,
    /// The actions in their canonical form.
    pub then: String,
    pub enabled: bool,
    /// `active`, `disabled`, or `suspended` (its creator can no longer do what it does:
    /// `status_reason` says why; it acts again if that changes back).
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_reason: Option<String>,
    pub created_by: String,
    pub created_at: u64,
    pub updated_at: u64,
}

/// `GET /api/v1/rules`: every rule, by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RuleList {
    pub rules: Vec<Rule>,
}

/// An alert: raised by a rule for a device; one per rule and device while open.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Alert {
    pub id: String,
    pub rule_id: String,
    pub rule_name: String,
    pub device_id: Option<String>,
    /// `info`, `warning`, `critical`.
    pub severity: String,
    /// `firing`, `acknowledged`, `resolved`.
    pub state: String,
    /// What was seen when it last fired.
    pub detail: String,
    /// Times the rule fired for the device while this alert was open.
    pub count: u64,
    pub first_fired_at: u64,
    pub last_fired_at: u64,
    pub acknowledged_at: Option<u64>,
    pub acknowledged_by: Option<String>,
    pub resolved_at: Option<u64>,
    /// A user or token, `auto` (the condition cleared) or `rule_deleted`.
    pub resolved_by: Option<String>,
}

/// Query of `GET /api/v1/alerts`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AlertListParams {
    /// `firing`, `acknowledged`, `resolved`, or `open` (firing or acknowledged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    /// 1..=500, default 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    /// `next_cursor` of the previous page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
}

/// `GET /api/v1/alerts`: newest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AlertList {
    pub alerts: Vec<Alert>,
    /// Set when there may be more: pass it as `cursor`.
    pub next_cursor: Option<String>,
}
