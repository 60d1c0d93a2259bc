//! The provisioning pipeline of each device (issue 16) and installation confirmations.
//!
//! A device's first boot is a sequence of steps — claimed, certificate issued, registered,
//! first connect, first telemetry — any of which can fail halfway. [`Pipeline::steps`] shows
//! where a device is: each step's time from the device record (first connect and first
//! telemetry are set once by presence's batched `record_activity`), and the last error of a
//! step that failed ([`Pipeline::step_failed`], kept per device and step, so it is bounded by
//! the registry).
//!
//! An installer confirms an installation with [`Pipeline::record_installation`]: accepted only
//! while the device's telemetry is recent (`[installations] seen_within_ms`), so the record
//! says the unit works where it was mounted.

use crate::access::Access;
use crate::app::Core;
use crate::error::{ErrorKind, ServiceError, ServiceResult};
use crate::registry::{DeviceView, Registry};
use mooring_api::{PipelineStep, Provisioning, StepFailure, StepState};
use mooring_store::{DeviceRecord, Installation, StepError};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// A pipeline step, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Step {
    Claimed,
    CertificateIssued,
    Registered,
    FirstConnect,
    FirstTelemetry,
}

impl Step {
    pub const ALL: [Step; 5] = [
        Step::Claimed,
        Step::CertificateIssued,
        Step::Registered,
        Step::FirstConnect,
        Step::FirstTelemetry,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Step::Claimed => "claimed",
            Step::CertificateIssued => "certificate_issued",
            Step::Registered => "registered",
            Step::FirstConnect => "first_connect",
            Step::FirstTelemetry => "first_telemetry",
        }
    }
}

/// A step's failures of one device are written at most once per this interval (a device
/// retrying with a revoked certificate every second costs one write per interval).
pub const STEP_ERROR_WRITE_INTERVAL_MS: u64 = 10_000;
/// (device, step) pairs whose last write time is remembered; when full, the memory starts over.
const STEP_ERROR_THROTTLE_LEN_MAX: usize = 10_000;

/// The pipeline service.
pub struct Pipeline {
    core: Arc<Core>,
    registry: Arc<Registry>,
    written: Mutex<HashMap<(String, Step), u64>>,
}

impl Pipeline {
    pub(crate) fn new(core: Arc<Core>, registry: Arc<Registry>) -> Self {
        Self {
            core,
            registry,
            written: Mutex::default(),
        }
    }

    /// Where device `id` is in its pipeline (not found outside `access`).
    pub async fn steps(&self, access: &Access, id: &str) -> ServiceResult<Provisioning> {
        let view = self.registry.get_device(access, id).await?;
        let cert = self.core.store.get_cert(&view.record.cert_serial).await?;
        // Claimed if an enrollment named it and issued a certificate of this very device (a
        // device deleted and registered again by an operator has no such ledger row).
        let mut claimed = None;
        if let Some(e) = self
            .core
            .store
            .enrollment_of_device(view.record.id.as_str())
            .await?
        {
            let cert_of_enrollment = self.core.store.get_cert(&e.cert_serial).await?;
            if cert_of_enrollment.is_some_and(|c| c.device_id == view.record.id) {
                claimed = Some(e);
            }
        }
        let facts = Facts {
            // A certificate from a registered CA (just-in-time registration, issuer `ca:<id>`)
            // was issued by its manufacturer: its not-before is when; the server learned of it
            // at registration.
            certificate_issued_ms: cert.map_or(view.record.created_at_ms, |c| {
                if c.issuer.starts_with("ca:") {
                    c.not_before_ms
                } else {
                    c.issued_at_ms
                }
            }),
            claimed_ms: claimed.map(|e| e.created_at_ms),
        };
        Ok(provisioning(&view.record, &facts))
    }

    /// How many devices (matching `selector`, inside `access`) reached each step.
    pub async fn funnel(
        &self,
        access: &Access,
        selector: Option<&str>,
    ) -> ServiceResult<mooring_api::Funnel> {
        let sel = access.selection(selector)?;
        let c = self
            .core
            .store
            .count_pipeline(&self.registry.filter_of(&sel))
            .await?;
        let stage = |step: &str, devices: u64| mooring_api::FunnelStage {
            step: step.to_owned(),
            devices,
        };
        Ok(mooring_api::Funnel {
            selector: selector.map(str::to_owned),
            stages: vec![
                stage("registered", c.devices),
                stage("first_connect", c.connected),
                stage("first_telemetry", c.reporting),
                stage("installed", c.installed),
            ],
        })
    }

    /// Records that `step` failed for device `id` (an existing device; others are ignored,
    /// so nobody can grow this by naming devices). Written in the background, throttled.
    pub fn step_failed(&self, id: &str, step: Step, message: String) {
        let now_ms = self.core.now_ms();
        {
            let mut written = mooring_proto::sync::lock(&self.written);
            let key = (id.to_owned(), step);
            if written
                .get(&key)
                .is_some_and(|&at| now_ms < at.saturating_add(STEP_ERROR_WRITE_INTERVAL_MS))
            {
                return;
            }
            if written.len() >= STEP_ERROR_THROTTLE_LEN_MAX {
                // Forget what is past its interval; if still full (a mass failure), this error
                // is not written: the ones recorded already say what happened.
                written.retain(|_, at| now_ms < at.saturating_add(STEP_ERROR_WRITE_INTERVAL_MS));
                if written.len() >= STEP_ERROR_THROTTLE_LEN_MAX {
                    return;
                }
            }
            written.insert(key, now_ms);
        }
        let store = Arc::clone(&self.core.store);
        let id = id.to_owned();
        tokio::spawn(async move {
            let error = StepError {
                at_ms: now_ms,
                message,
            };
            if let Err(e) = store.record_step_error(&id, step.as_str(), error).await {
                tracing::warn!(device = %id, step = step.as_str(), error = %e, "recording a provisioning step error failed");
            }
        });
    }

    /// An installer confirms device `id` is installed at `location`. Accepted only while its
    /// telemetry is recent (`409 device_not_seen` otherwise, naming when it was last heard
    /// from); the newest confirmation is kept with the device.
    pub async fn record_installation(
        &self,
        access: &Access,
        by: &str,
        id: &str,
        location: &str,
        notes: Option<&str>,
    ) -> ServiceResult<DeviceView> {
        let location = location.trim();
        if location.is_empty()
            || location.chars().count() > mooring_api::INSTALLATION_LOCATION_LEN_MAX
        {
            return Err(ServiceError::invalid(
                "invalid_location",
                format!(
                    "location must be 1 to {} characters",
                    mooring_api::INSTALLATION_LOCATION_LEN_MAX
                ),
            ));
        }
        let notes = notes.unwrap_or("");
        if notes.chars().count() > mooring_api::INSTALLATION_NOTES_LEN_MAX {
            return Err(ServiceError::invalid(
                "invalid_notes",
                format!(
                    "notes must be at most {} characters",
                    mooring_api::INSTALLATION_NOTES_LEN_MAX
                ),
            ));
        }
        if location.chars().chain(notes.chars()).any(|c| c == '\0') {
            return Err(ServiceError::invalid(
                "invalid_location",
                "location and notes may not contain NUL characters",
            ));
        }
        let view = self.registry.get_device(access, id).await?;
        let now_ms = self.core.now_ms();
        let window_ms = self.core.config.installations.seen_within_ms;
        let telemetry_ms = view
            .record
            .last_telemetry_ms
            .max(self.registry.presence().unflushed_telemetry_ms(id));
        let recent = telemetry_ms.is_some_and(|t| now_ms.saturating_sub(t) <= window_ms);
        if !recent {
            let minutes = window_ms / 60_000;
            let window = if minutes > 0 {
                format!("{minutes} minutes")
            } else {
                format!("{} seconds", window_ms / 1000)
            };
            let message = match (telemetry_ms, view.last_seen_ms) {
                (Some(t), _) => format!(
                    "device {id} has not sent telemetry since {} (more than {window} ago); \
                     power it on and check its connection, then confirm again",
                    utc(t)
                ),
                (None, Some(seen)) => format!(
                    "device {id} has never sent telemetry (last seen {}); confirm once it reports",
                    utc(seen)
                ),
                (None, None) => format!(
                    "device {id} has never connected; power it on and confirm once it reports"
                ),
            };
            return Err(ServiceError::new(
                ErrorKind::Conflict,
                "device_not_seen",
                message,
            ));
        }
        let installation = Installation {
            at_ms: now_ms,
            by: by.to_owned(),
            location: location.to_owned(),
            notes: notes.to_owned(),
        };
        if !self
            .core
            .store
            .set_installation(id, installation.clone())
            .await?
        {
            return Err(ServiceError::not_found(
                "device_not_found",
                format!("device {id} not found"),
            ));
        }
        let mut view = view;
        view.record.installation = Some(installation);
        Ok(view)
    }
}

/// What the pipeline needs beyond the device record.
struct Facts {
    /// When the device's current certificate was issued (the ledger).
    certificate_issued_ms: u64,
    /// When it enrolled with a claim (`None`: an operator registered it, or the claim was
    /// pruned a week after it ended).
    claimed_ms: Option<u64>,
}

/// The pipeline as the API shows it, from a device record.
fn provisioning(record: &DeviceRecord, facts: &Facts) -> Provisioning {
    let steps = Step::ALL
        .iter()
        .map(|&step| {
            let (state, at) = match step {
                // A device registered by an operator was never claimed.
                Step::Claimed => match facts.claimed_ms {
                    Some(at) => (StepState::Done, Some(at)),
                    None => (StepState::Skipped, None),
                },
                Step::CertificateIssued => (StepState::Done, Some(facts.certificate_issued_ms)),
                Step::Registered => (StepState::Done, Some(record.created_at_ms)),
                Step::FirstConnect => done_at(record.first_connect_ms),
                Step::FirstTelemetry => done_at(record.first_telemetry_ms),
            };
            PipelineStep {
                step: step.as_str().to_owned(),
                state,
                at,
                last_error: record
                    .provisioning_errors
                    .get(step.as_str())
                    .map(|e| StepFailure {
                        at: e.at_ms,
                        message: e.message.clone(),
                    }),
            }
        })
        .collect();
    Provisioning {
        device_id: record.id.to_string(),
        steps,
        installation: record
            .installation
            .clone()
            .map(|i| mooring_api::Installation {
                at: i.at_ms,
                by: i.by,
                location: i.location,
                notes: i.notes,
            }),
    }
}

/// An installation as the API shows it (the device body and the pipeline).
pub(crate) fn installation_body(i: Installation) -> mooring_api::Installation {
    mooring_api::Installation {
        at: i.at_ms,
        by: i.by,
        location: i.location,
        notes: i.notes,
    }
}

fn done_at(at: Option<u64>) -> (StepState, Option<u64>) {
    match at {
        Some(at) => (StepState::Done, Some(at)),
        None => (StepState::Pending, None),
    }
}

/// A unix-ms time as RFC 3339 in UTC (`2026-12-01T09:30:00.123Z`), for messages and log lines
/// people read.
pub(crate) fn utc(ms: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{ms} ms"))
}
