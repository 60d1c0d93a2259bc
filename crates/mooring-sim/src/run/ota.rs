//! OTA in a run (issue 17): the `[[artifact]]`s uploaded before the fleet boots, `ota_deploy`
//! events, the update states over time, and at the end every updating device's slots and
//! journal against what the server shows for it.

use super::Control;
use crate::device::ota::{image_bytes, sha256_hex, FACTORY_IMAGE_BYTES};
use crate::device::DeviceState;
use crate::report::{OtaReport, RolloutCohort};
use crate::scenario::Scenario;
use mooring_agent::ota::{BootControl, Slot, Slots as _, UpdateFiles as _};
use mooring_proto::ota::UpdateState;
use mooring_proto::sync::lock;
use mooring_server::access::Access;
use mooring_server::app::App;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

/// Devices named in each list of examples.
const EXAMPLES_MAX: usize = 20;
/// Bytes sent per upload call.
const UPLOAD_CHUNK_BYTES: usize = 1024 * 1024;

/// An `[[artifact]]` as uploaded.
#[derive(Debug, Clone)]
pub(super) struct SimArtifact {
    pub(super) id: String,
    pub(super) version: String,
    pub(super) sha256: String,
}

/// A deployment an `ota_deploy` event made.
#[derive(Debug, Clone)]
pub(super) struct SimDeployment {
    pub(super) id: String,
    pub(super) devices: u64,
}

/// Uploads every `[[artifact]]` (deterministic bytes from the seed) through the server's OTA
/// service, which checks size and hash and signs the manifest with the fleet's update key.
pub(super) async fn upload(s: &Scenario, app: &App) -> anyhow::Result<Vec<SimArtifact>> {
    let mut out = Vec::with_capacity(s.artifacts.len());
    for a in &s.artifacts {
        let bytes = image_bytes(s.seed, &a.version, a.size_bytes);
        let sha256 = sha256_hex(&bytes);
        let created = app
            .ota
            .create_artifact(
                "sim",
                mooring_server::ota::NewArtifact {
                    version: a.version.clone(),
                    compatible: a.compatible.clone(),
                    notes: Some("made by mooring sim".into()),
                    sha256: sha256.clone(),
                    size: a.size_bytes,
                },
            )
            .await
            .map_err(|e| anyhow::anyhow!("artifact {}: {e}", a.version))?;
        let mut at = 0usize;
        for chunk in bytes.chunks(UPLOAD_CHUNK_BYTES) {
            app.ota
                .put_content(&created.id, at as u64, chunk.to_vec())
                .await
                .map_err(|e| anyhow::anyhow!("artifact {}: {e}", a.version))?;
            at += chunk.len();
        }
        app.ota
            .complete(&created.id, None)
            .await
            .map_err(|e| anyhow::anyhow!("artifact {}: {e}", a.version))?;
        out.push(SimArtifact {
            id: created.id,
            version: a.version.clone(),
            sha256,
        });
    }
    Ok(out)
}

/// An `ota_deploy` event: the deployment is stored, its commands go out in the background (as
/// `POST /api/v1/ota/deployments` does).
pub(super) async fn deploy(
    control: &Control,
    version: &str,
    to: &str,
    allow_downgrade: bool,
) -> Result<SimDeployment, String> {
    let app = control
        .app()
        .ok_or_else(|| "needs a running server".to_owned())?;
    let artifact = control
        .artifacts
        .iter()
        .find(|a| a.version == version)
        .ok_or_else(|| format!("no artifact {version}"))?;
    let (view, pending) = app
        .ota
        .deploy(&Access::all(), "sim", &artifact.id, to, allow_downgrade)
        .await
        .map_err(|e| e.to_string())?;
    let sender = app.ota.clone();
    app.ota_tasks
        .spawn(async move { sender.send_updates(pending).await });
    let d = SimDeployment {
        id: view.deployment.id.clone(),
        devices: view.total,
    };
    lock(&control.deployments).push(d.clone());
    Ok(d)
}

/// The deployments' devices by update state now (summed over deployments, the rollouts' too).
pub(super) async fn states(control: &Control) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let mut deployments = lock(&control.deployments).clone();
    deployments.extend(lock(&control.rollouts).iter().map(|r| SimDeployment {
        id: r.deployment_id.clone(),
        devices: 0,
    }));
    let Some(app) = control.app() else {
        return out;
    };
    for d in deployments {
        if let Ok(view) = app.ota.deployment(&d.id).await {
            for (state, n) in view.counts {
                *out.entry(state).or_default() += n;
            }
        }
    }
    out
}

/// Whether a slot holds a whole image of a known version: its bytes hash to that version's
/// image and the boot-control record names the version.
fn whole(
    ota: &crate::device::ota::DeviceOta,
    c: &BootControl,
    slot: Slot,
    known: &HashMap<String, String>,
) -> bool {
    let info = c.info(slot);
    let Some(version) = &info.version else {
        return false;
    };
    let image = ota.slots.image(slot);
    image.len() as u64 == info.size
        && known
            .get(version)
            .is_some_and(|sha| *sha == sha256_hex(&image))
}

/// Per rollout deployment id, per cohort name: what the rollout did to the cohort's devices
/// (`devices` and `updated_share` are filled in by the rollout report).
pub(super) type RolloutCohorts = HashMap<String, BTreeMap<String, RolloutCohort>>;

/// Every updating device's slots and journal against the server's records (read while the
/// server is still up and the fleet has stopped, so neither moves). The updates of the
/// rollouts' deployments are checked like the `ota_deploy` ones, and counted per cohort.
pub(super) async fn report(
    control: &Control,
    s: &Scenario,
    devices: &[Arc<DeviceState>],
    deleted: &HashSet<String>,
) -> anyhow::Result<(Option<OtaReport>, RolloutCohorts)> {
    let mut by_rollout = RolloutCohorts::new();
    if !devices.iter().any(|d| d.ota.is_some()) {
        return Ok((None, by_rollout));
    }
    let stats = &control.net.stats;
    let deployments = lock(&control.deployments).clone();
    let rollout_deployments: HashSet<String> = lock(&control.rollouts)
        .iter()
        .map(|r| r.deployment_id.clone())
        .collect();
    let mut r = OtaReport {
        deployments: deployments
            .iter()
            .map(|d| d.id.clone())
            .chain(rollout_deployments.iter().cloned())
            .collect(),
        targeted: deployments.iter().map(|d| d.devices).sum(),
        downloads: stats
            .ota_downloads
            .load(std::sync::atomic::Ordering::Relaxed),
        downloads_resumed: stats
            .ota_downloads_resumed
            .load(std::sync::atomic::Ordering::Relaxed),
        downloads_busy: stats
            .ota_downloads_busy
            .load(std::sync::atomic::Ordering::Relaxed),
        downloads_cut: stats
            .ota_downloads_cut
            .load(std::sync::atomic::Ordering::Relaxed),
        reboots: stats.ota_reboots.load(std::sync::atomic::Ordering::Relaxed),
        power_losses_by_phase: lock(&stats.ota_power_losses.0).clone(),
        ..OtaReport::default()
    };
    r.power_losses = r.power_losses_by_phase.values().sum();
    // Every whole image there is: the factory images and the artifacts.
    let mut known: HashMap<String, String> = control
        .artifacts
        .iter()
        .map(|a| (a.version.clone(), a.sha256.clone()))
        .collect();
    for c in &s.cohorts {
        known
            .entry(c.version.clone())
            .or_insert_with(|| sha256_hex(&image_bytes(s.seed, &c.version, FACTORY_IMAGE_BYTES)));
    }
    let app = control.app();
    let ours: HashSet<&str> = deployments
        .iter()
        .map(|d| d.id.as_str())
        .chain(rollout_deployments.iter().map(String::as_str))
        .collect();
    let history_of = |id: String| {
        let app = app.clone();
        async move {
            match app {
                Some(app) => app
                    .ota
                    .device_history(&Access::all(), &id)
                    .await
                    .unwrap_or_default(),
                None => Vec::new(),
            }
        }
    };
    for d in devices {
        if deleted.contains(d.id.as_str()) {
            continue;
        }
        let history = history_of(d.id.as_str().to_owned()).await;
        let history: Vec<_> = history
            .into_iter()
            .filter(|u| ours.contains(u.deployment_id.as_str()))
            .collect();
        for u in history
            .iter()
            .filter(|u| rollout_deployments.contains(&u.deployment_id))
        {
            r.targeted += 1;
            let c = by_rollout
                .entry(u.deployment_id.clone())
                .or_default()
                .entry(s.cohorts[d.cohort].name.clone())
                .or_default();
            c.started += 1;
            match u.state {
                UpdateState::Committed => c.committed += 1,
                UpdateState::RolledBack => c.rolled_back += 1,
                UpdateState::Failed => c.failed += 1,
                _ => {}
            }
        }
        for u in &history {
            *r.final_states
                .entry(u.state.as_str().to_owned())
                .or_default() += 1;
            if let Some(why) = &u.reason {
                let code = why.split(':').next().unwrap_or_default();
                *r.reasons
                    .entry(format!("{}: {code}", u.state.as_str()))
                    .or_default() += 1;
            }
        }
        let mut lie = |why: String| {
            r.untruthful += 1;
            if r.untruthful_examples.len() < EXAMPLES_MAX {
                r.untruthful_examples.push(format!("{} {why}", d.id));
            }
        };
        let Some(ota) = &d.ota else {
            // A device without the updater that a deployment reached: it refuses the update
            // (or never gets it), so the server may show nothing else than pending or failed.
            for u in &history {
                r.targeted_without_updater += 1;
                if !matches!(u.state, UpdateState::Pending | UpdateState::Failed) {
                    lie(format!(
                        "has no updater but the server says {}",
                        u.state.as_str()
                    ));
                }
            }
            continue;
        };
        r.devices += 1;
        let c = ota.slots.control();
        // The slot the bootloader boots next: an armed trial not yet booted, else the
        // committed one (a booted, uncommitted trial is abandoned at the next boot).
        let next = match c.trial {
            Some(t) if c.trial_boots == 0 => t,
            _ => c.committed,
        };
        if !whole(ota, &c, c.committed, &known) || !whole(ota, &c, next, &known) {
            r.unbootable += 1;
            if r.unbootable_examples.len() < EXAMPLES_MAX {
                r.unbootable_examples
                    .push(format!("{} {:?}", d.id, c.to_reported()));
            }
        }
        let running = c.info(c.running()).version.clone().unwrap_or_default();
        *r.running_versions.entry(running.clone()).or_default() += 1;
        // Running a whole image of `version`, committed, no trial pending.
        let runs_committed = |version: &str| {
            running == version && c.trial.is_none() && whole(ota, &c, c.running(), &known)
        };
        let job = ota.files.load_journal().ok().flatten();
        // Settled: no status report of its own is still waiting in its outbox.
        let status_topic = mooring_proto::ota::status_topic(&d.id);
        let settled = !mooring_agent::AgentStore::peek_after(&d.flash, 0, usize::MAX)
            .unwrap_or_default()
            .iter()
            .any(|e| e.topic.as_deref() == Some(status_topic.as_str()));
        if !settled {
            r.unsettled += 1;
        }
        if let Some(j) = &job {
            if j.phase.state() == UpdateState::Committed && !runs_committed(&j.version) {
                lie(format!(
                    "its journal says committed {} but it runs {running} ({})",
                    j.version,
                    c.state_of(c.running())
                ));
            }
        }
        for u in &history {
            let current = job.as_ref().filter(|j| j.deployment_id == u.deployment_id);
            match (current, &job) {
                // The update the device holds: the server must show its state (once nothing
                // is left to send), and a final state must be what the slots say.
                (Some(j), _) => {
                    let truth = j.phase.state();
                    if u.state == UpdateState::Committed && !runs_committed(&u.version) {
                        lie(format!(
                            "the server says committed {} but the device runs {running} ({})",
                            u.version,
                            c.state_of(c.running())
                        ));
                    } else if settled && truth != u.state {
                        lie(format!(
                            "the server says {} but the device is {} with nothing left to send",
                            u.state.as_str(),
                            truth.as_str()
                        ));
                    } else if matches!(u.state, UpdateState::RolledBack | UpdateState::Failed)
                        && j.from_version.as_ref().is_some_and(|v| !runs_committed(v))
                    {
                        lie(format!(
                            "the server says {} but the device does not run {} committed (it runs {running})",
                            u.state.as_str(),
                            j.from_version.as_deref().unwrap_or_default()
                        ));
                    }
                }
                // The device holds a later update: this one is over (one update at a time) or
                // never reached it.
                (None, Some(_)) => {
                    if !(u.state.is_final() || u.state == UpdateState::Pending) {
                        lie(format!(
                            "the server says {} for an update the device has moved past",
                            u.state.as_str()
                        ));
                    }
                }
                // No journal entry: the device never got the update or refused it when it came
                // (wrong hardware, a bad signature: reported failed).
                (None, None) => {
                    if !matches!(u.state, UpdateState::Pending | UpdateState::Failed) {
                        lie(format!(
                            "the server says {} but the device never took the update",
                            u.state.as_str()
                        ));
                    }
                }
            }
        }
    }
    r.committed = r.final_states.get("committed").copied().unwrap_or(0);
    r.rolled_back = r.final_states.get("rolled_back").copied().unwrap_or(0);
    Ok((Some(r), by_rollout))
}
