//! Field-service tickets that playbooks open (docs/health.md "Playbooks"). Times are unix ms.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use utoipa::{IntoParams, ToSchema};

/// A field-service ticket: the devices to visit, their sites and installation records, and
/// the parts to bring.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Ticket {
    pub id: String,
    /// The `[[playbook]]` that opened it.
    pub playbook: String,
    /// The alert that ran the playbook (`null`: a rule's `job:` action did).
    pub alert_id: Option<String>,
    pub title: String,
    /// `open` or `closed`.
    pub state: String,
    pub created_at: u64,
    pub closed_at: Option<u64>,
    pub closed_by: Option<String>,
    /// The alert's signal (`disconnects`, `battery_low`, ...); `null` for one device's rule.
    pub signal: Option<String>,
    /// The cohort (`site=c`); `null` for one device.
    pub cohort: Option<String>,
    /// Devices in the cohort (1 for one device).
    pub devices_total: u64,
    /// Devices of the cohort the signal shows on; `devices` lists them, worst first, at most
    /// the playbook's `devices_max`.
    pub devices_affected: u64,
    pub devices: Vec<TicketDevice>,
    /// Parts to bring (`[[part]]`): each with how many listed devices it is suggested for.
    pub parts: BTreeMap<String, u64>,
    /// What the playbook did, in order.
    pub steps: Vec<String>,
}

/// One device on a ticket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TicketDevice {
    pub device_id: String,
    /// Its `[playbooks] site_tag` tag (default `site`).
    pub site: Option<String>,
    pub tags: BTreeMap<String, String>,
    /// Where and by whom it was installed (`null`: no installation recorded).
    pub installation: Option<crate::Installation>,
    /// The signal on the device: its count in the last 24 hours, or its battery level.
    pub value: Option<f64>,
    /// The parts `[[part]]` suggests for it.
    pub parts: Vec<String>,
}

/// Query of `GET /api/v1/tickets`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct TicketListParams {
    /// `open` or `closed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub playbook: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alert_id: Option<String>,
    /// 1..=100, default 20.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    /// `next_cursor` of the previous page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
}

/// `GET /api/v1/tickets`: newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TicketList {
    pub tickets: Vec<Ticket>,
    /// Set when there may be more: pass it as `cursor`.
    pub next_cursor: Option<String>,
}
