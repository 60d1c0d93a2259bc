//! Where a device is in its provisioning pipeline, and installations (issue 16).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Longest `location` of an installation, in characters.
pub const INSTALLATION_LOCATION_LEN_MAX: usize = 256;
/// Longest `notes` of an installation, in characters.
pub const INSTALLATION_NOTES_LEN_MAX: usize = 2048;

/// `POST /api/v1/devices/{id}/installation`: an installer confirms the device is installed.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RecordInstallation {
    /// Where it is installed (1..=256 characters), e.g. `Hall 3, door 2`.
    pub location: String,
    /// Anything else worth knowing (at most 2048 characters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notes: Option<String>,
}

/// A confirmed installation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Installation {
    /// Unix ms when it was recorded.
    pub at: u64,
    /// Who recorded it: the user's email or the token's name.
    pub by: String,
    pub location: String,
    pub notes: String,
}

/// How far a step got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum StepState {
    Done,
    Pending,
    /// Not part of this device's path (a device registered by an operator was never claimed).
    Skipped,
}

/// The last failure of a step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct StepFailure {
    pub at: u64,
    pub message: String,
}

/// One step of the pipeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PipelineStep {
    /// `claimed`, `certificate_issued`, `registered`, `first_connect` or `first_telemetry`.
    pub step: String,
    pub state: StepState,
    /// Unix ms when it was reached; null if it was not.
    pub at: Option<u64>,
    /// The last time this step failed for the device, and why; null if it never did.
    pub last_error: Option<StepFailure>,
}

/// `GET /api/v1/devices/{id}/provisioning`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Provisioning {
    pub device_id: String,
    /// In pipeline order.
    pub steps: Vec<PipelineStep>,
    /// The confirmed installation, if any.
    pub installation: Option<Installation>,
}

/// Query of `GET /api/v1/provisioning/funnel`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct FunnelParams {
    /// Only devices matching this selector, e.g. `tag:site=berlin` [default: all].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
}

/// One stage of the funnel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct FunnelStage {
    /// `registered`, `first_connect`, `first_telemetry` or `installed`.
    pub step: String,
    /// Devices that reached it.
    pub devices: u64,
}

/// `GET /api/v1/provisioning/funnel`: how many devices reached each step.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Funnel {
    pub selector: Option<String>,
    /// In pipeline order; each stage counts the devices that reached it (and so every
    /// earlier one).
    pub stages: Vec<FunnelStage>,
}
