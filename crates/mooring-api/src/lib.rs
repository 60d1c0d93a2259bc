//! The Mooring HTTP API (`/api/v1`) as Rust types, shared by everything that speaks it.
//!
//! The server's handlers take and return these types (and derive its OpenAPI document from
//! their `utoipa` schemas); the CLI, the simulator's remote mode and the benchmarks call the
//! server through [`Client`] (feature `client`) with the same types. A new field is added here,
//! once, and the OpenAPI document, the server and every client agree by construction.
//!
//! Wire rules, kept by every type here:
//! - times are unix milliseconds (`u64`), durations say their unit (`ttl_secs`, `wait_ms`);
//! - request bodies refuse unknown fields (`deny_unknown_fields`) so a typo is an error, while
//!   responses are read leniently, so an older client keeps working against a newer server;
//! - every error is [`ErrorBody`]: `{"error":{"code":..,"message":..}}` with a 4xx/5xx status.
//!
//! Device ids travel as strings: the server validates them (and answers a stable error code), a
//! client need not parse them first.

mod accounts;
mod cas;
mod certs;
mod commands;
mod devices;
mod error;
mod events;
mod fleet;
mod gateways;
mod health;
mod jobs;
mod ota;
mod pipeline;
mod provision;
mod rollouts;
mod rules;
mod shadow;
mod telemetry;
mod tickets;
mod tokens;

#[cfg(feature = "client")]
mod client;

pub use accounts::{
    AuditEntry, AuditList, AuditParams, CreateUser, CreatedUser, LoginRequest, LoginResponse, Me,
    PasswordLink, SetPassword, UpdateUser, User, UserList,
};
pub use cas::{
    BeginRollover, Ca, CaList, FleetCa, FleetCas, RegisterCa, RetireCa, RetiredCa, CA_PEM_LEN_MAX,
    ROLLOVER_ROTATIONS_PER_MINUTE_DEFAULT,
};
pub use certs::{
    Certificate, CertificateList, CreateRotation, ExpiringParams, RevokeRequest, Revoked,
    RotateRequest, Rotation, RotationList,
};
pub use commands::{
    AnyCommand, Command, CommandList, CommandListParams, CommandResultBody, CreateCommand,
    CreateFleetCommand, FleetCommand, HistoryEntry, WaitParams,
};
pub use devices::{CreateDevice, CreatedDevice, Device, DeviceList, ListDevicesParams};
pub use error::{ErrorBody, ErrorDetail};
pub use events::{Event, EventBody, EventsParams, EventsReset, StreamItem, RESET_EVENT};
pub use fleet::{
    FleetHistory, FleetHistoryParams, FleetSamplePoint, FleetSummary, FleetSummaryParams,
    VersionCount, FLEET_VERSIONS_MAX,
};
pub use gateways::{
    AttachGateway, ChildrenParams, GatewayAttachment, GatewayChild, GatewayChildren, LocalKeyView,
};
pub use health::{
    AgentHealth, BatteryHealth, DeviceHealth, DiagnosticsRef, HealthAnomaly, HealthCounts,
    HealthGroup, HealthParams, HealthSummary, TelemetryHealth, UpdateProblem,
    HEALTH_BATTERY_SIGNAL, HEALTH_GROUP_KEYS_MAX, HEALTH_TESTED_SIGNALS, HEALTH_WINDOW_HOURS,
};
pub use jobs::{CreateJob, CreateReport, Job, JobCommand, JobErrorEntry, JobList, JobListParams};
pub use ota::{
    Artifact, ArtifactList, CompleteArtifact, CreateArtifact, CreateDeployment, CreateLink,
    Deployment, DeploymentList, DeviceUpdate, DeviceUpdates, DownloadLink, UpdateKeyInfo,
};
pub use pipeline::{
    Funnel, FunnelParams, FunnelStage, Installation, PipelineStep, Provisioning,
    RecordInstallation, StepFailure, StepState, INSTALLATION_LOCATION_LEN_MAX,
    INSTALLATION_NOTES_LEN_MAX,
};
pub use provision::{
    parse_duration_ms, Claim, ClaimList, CreateClaim, CreatedClaim, EnrollRequest, EnrollResponse,
};
pub use rollouts::{
    check_waves, gate_signal, parse_pct, parse_waves, pct_to_bp, AddRolloutDevices, Bp, Cmp,
    CreateRollout, Gate, GateCounts, GateSignal, MetricGate, Requirement, Rollout, RolloutAction,
    RolloutEvent, RolloutEventList, RolloutList, RolloutSpec, RolloutWave, Window, Worse, BP_ALL,
    GATE_SIGNALS, WAVES_MAX,
};
pub use rules::{Alert, AlertList, AlertListParams, CreateRule, Rule, RuleList, UpdateRule};
pub use shadow::{Shadow, ShadowPatch};
pub use telemetry::{LatestMetrics, LatestValue, TelemetryParams, TelemetryPoint, TelemetryPoints};
pub use tickets::{Ticket, TicketDevice, TicketList, TicketListParams};
pub use tokens::{CreateToken, CreatedToken, PageParams, TokenInfo, TokenList};

#[cfg(feature = "client")]
pub use client::{Client, ClientBuilder, Error, EventStream, EVENT_STREAM_IDLE_MAX};

/// Largest page of `GET /api/v1/devices` (`limit`).
pub const DEVICE_PAGE_LEN_MAX: usize = 1000;
/// Largest page of `GET /api/v1/devices/{id}/commands` (`limit`).
pub const COMMAND_PAGE_LEN_MAX: usize = 1000;
/// Largest page of `GET /api/v1/devices/{id}/telemetry` (`limit`).
pub const TELEMETRY_PAGE_LEN_MAX: usize = 10_000;
/// Longest `wait_ms` the command endpoints accept.
pub const WAIT_MS_MAX: u64 = 30_000;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn any_command_tells_a_fleet_command_from_a_device_command() {
        let fleet = json!({"id": "f1", "selector": "tag:a=b", "name": "x", "params": {},
            "created_at": 1, "expires_at": 2, "total": 3, "counts": {"queued": 3}, "done": false});
        assert!(matches!(
            serde_json::from_value::<AnyCommand>(fleet),
            Ok(AnyCommand::Fleet(f)) if f.total == 3
        ));
        let device = json!({"id": "c1", "device_id": "d1", "name": "x", "params": {},
            "state": "failed", "attempts": 1, "max_attempts": 5, "created_at": 1, "expires_at": 2,
            "parent_id": null, "idempotency_key": null, "history": [],
            "result": {"status": "failed", "output": {"reason": "timeout"}},
            "result_timeout_secs": 0, "added_in_a_later_version": true});
        match serde_json::from_value::<AnyCommand>(device) {
            Ok(AnyCommand::Device(c)) => {
                assert!(c.is_final());
                assert_eq!(c.failure_reason(), Some("timeout"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn requests_refuse_unknown_fields() {
        let typo = json!({"name": "reboot", "ttl_sec": 5});
        assert!(serde_json::from_value::<CreateCommand>(typo).is_err());
    }
}
