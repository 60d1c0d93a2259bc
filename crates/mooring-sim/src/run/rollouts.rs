//! Rollouts in a run (issue 19): `rollout` events create a staged rollout through the server's
//! rollouts service (the code behind `POST /api/v1/rollouts`); the server's own controller
//! (every `[rollouts] tick_ms` of virtual time) moves it through its waves and gates. At the
//! end each rollout is read back: its state, its waves, the last gate, when each wave started
//! (from its event log) and how many devices of each cohort it updated.

use super::ota::RolloutCohorts;
use super::Control;
use crate::report::{RolloutReport, RolloutWaveReport};
use crate::scenario::{self, Scenario};
use mooring_proto::sync::lock;
use mooring_server::access::Access;
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

/// Who the simulator acts as in a rollout's event log.
const BY: &str = "sim";

/// A rollout a `rollout` event made.
#[derive(Debug, Clone)]
pub(super) struct SimRollout {
    /// Simulated ms of its event.
    pub(super) at_ms: u64,
    pub(super) id: String,
    pub(super) deployment_id: String,
    pub(super) version: String,
    pub(super) selector: String,
}

/// A `rollout` event: the rollout is stored with its waves and control cohort; the server's
/// controller starts the first wave at its next tick.
pub(super) async fn create(
    control: &Control,
    r: &scenario::Rollout,
    seed: u64,
    at_ms: u64,
) -> Result<mooring_api::Rollout, String> {
    let app = control
        .app()
        .ok_or_else(|| "needs a running server".to_owned())?;
    let artifact = control
        .artifacts
        .iter()
        .find(|a| a.version == r.version)
        .ok_or_else(|| format!("no artifact {}", r.version))?;
    let view = app
        .rollouts
        .create(&Access::all(), BY, r.request(&artifact.id, seed))
        .await
        .map_err(|e| e.to_string())?;
    lock(&control.rollouts).push(SimRollout {
        at_ms,
        id: view.id.clone(),
        deployment_id: view.deployment_id.clone(),
        version: r.version.clone(),
        selector: view.selector.clone(),
    });
    Ok(view)
}

/// How often a rollout's event log is polled for what the controller did (simulated time).
const WATCH_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

/// Follows a rollout's event log while the run lasts: logs each entry as it appears, with the
/// wall time it was seen at (what each phase of the rollout costs this machine), until the
/// rollout completed or aborted.
pub(super) async fn watch(control: Arc<Control>, id: String) {
    let mut after = 0u64;
    loop {
        tokio::time::sleep(WATCH_INTERVAL).await;
        let Some(app) = control.app() else {
            continue;
        };
        let Ok(events) = app
            .rollouts
            .events(
                &Access::all(),
                &id,
                after,
                Some(mooring_server::rollouts::EVENT_PAGE_LEN_MAX),
            )
            .await
        else {
            continue;
        };
        let wall_ms = u64::try_from(control.wall_start.elapsed().as_millis()).unwrap_or(u64::MAX);
        let sim = crate::report::clock_of(control.net.clock.elapsed_ms());
        let mut over = false;
        for e in &events {
            after = after.max(e.seq);
            lock(&control.rollout_wall_ms)
                .entry(id.clone())
                .or_default()
                .insert(e.seq, wall_ms);
            let detail: String = e.detail.chars().take(160).collect();
            tracing::info!(
                "{sim} (wall {:.1} s): rollout {id} {}: {detail}",
                wall_ms as f64 / 1000.0,
                e.kind
            );
            over |= matches!(e.kind.as_str(), "completed" | "aborted");
        }
        if over {
            return;
        }
    }
}

/// The wave a log entry's detail names: `wave 3 ...` -> 3 (1-based).
fn wave_named(detail: &str) -> Option<u32> {
    let rest = detail.strip_prefix("wave ")?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Every rollout as it stands now (read before the fleet stops, so the state is the end's).
/// `epoch_ms`: the server clock's time at the start of the run.
pub(super) async fn read(control: &Control, epoch_ms: u64) -> Vec<RolloutReport> {
    let rollouts = lock(&control.rollouts).clone();
    let app = control.app();
    let mut out = Vec::with_capacity(rollouts.len());
    for sr in rollouts {
        let mut report = RolloutReport {
            at_ms: sr.at_ms,
            id: sr.id.clone(),
            version: sr.version.clone(),
            selector: sr.selector.clone(),
            state: "unknown".to_owned(),
            ..RolloutReport::default()
        };
        let Some(app) = &app else {
            out.push(report);
            continue;
        };
        let (Ok(view), Ok(log)) = (
            app.rollouts.get(&Access::all(), &sr.id).await,
            app.rollouts
                .events(
                    &Access::all(),
                    &sr.id,
                    0,
                    Some(mooring_server::rollouts::EVENT_PAGE_LEN_MAX),
                )
                .await,
        ) else {
            out.push(report);
            continue;
        };
        let since = |at: u64| at.saturating_sub(epoch_ms);
        let planned = view.waves.iter().filter(|w| !w.control).count() as u32;
        report.state = view.state.clone();
        report.reason = view.reason.clone();
        report.waves_planned = planned;
        report.waves_started = (view.wave + 1).min(planned);
        report.control_started = view.wave >= planned;
        report.devices = view.total;
        report.committed = view.committed;
        report.failed = view.failed;
        report.rolled_back = view.rolled_back;
        report.in_flight = view.in_flight;
        report.waiting = view.waiting;
        report.deferred = view.deferred;
        report.gate = view.gate.clone();
        report.waves = view
            .waves
            .iter()
            .map(|w| {
                let n = |state: &str| w.states.get(state).copied().unwrap_or(0);
                let ended = n("committed") + n("failed") + n("rolled_back");
                RolloutWaveReport {
                    wave: w.wave + 1,
                    pct: w.pct,
                    control: w.control,
                    devices: w.total,
                    committed: n("committed"),
                    failed: n("failed"),
                    rolled_back: n("rolled_back"),
                    in_flight: w.states.values().sum::<u64>().saturating_sub(ended),
                    waiting: w.waiting,
                    deferred: w.deferred,
                    ..RolloutWaveReport::default()
                }
            })
            .collect();
        let control_no = planned + 1;
        let seen = lock(&control.rollout_wall_ms)
            .get(&sr.id)
            .cloned()
            .unwrap_or_default();
        for e in &log {
            let at = since(e.at);
            let wall_ms = seen.get(&e.seq).copied();
            let wave = match e.kind.as_str() {
                "created" => Some(1),
                "wave_started" if e.detail == "the control cohort" => Some(control_no),
                _ => wave_named(&e.detail),
            };
            let slot = wave.and_then(|k| (k as usize).checked_sub(1));
            if let Some(w) = slot.and_then(|i| report.waves.get_mut(i)) {
                match e.kind.as_str() {
                    "created" | "wave_started" => {
                        w.started_ms = Some(at);
                        w.started_wall_ms = wall_ms;
                    }
                    "window_started" => {
                        w.window_ms = Some(at);
                        w.window_wall_ms = wall_ms;
                    }
                    "gate_passed" => {
                        w.gate_ms = Some(at);
                        w.gate_wall_ms = wall_ms;
                        w.gate = Some("pass".to_owned());
                    }
                    "gate_failed" => {
                        w.gate_ms = Some(at);
                        w.gate_wall_ms = wall_ms;
                        w.gate = Some("fail".to_owned());
                    }
                    _ => {}
                }
            }
            let wall = wall_ms.map_or_else(String::new, |w| {
                format!(" [wall {:.1} s]", w as f64 / 1000.0)
            });
            report.log.push(format!(
                "{}{wall} {} ({}): {}",
                crate::report::clock_of(at),
                e.kind,
                e.by,
                e.detail
            ));
        }
        out.push(report);
    }
    out
}

/// Fills in each rollout's cohorts from what the devices' update histories say (counted by the
/// OTA report), each cohort's size the scenario's minus the devices deleted.
pub(super) fn add_cohorts(
    reports: &mut [RolloutReport],
    control: &Control,
    s: &Scenario,
    by_rollout: &RolloutCohorts,
    deleted: &HashSet<String>,
) {
    let deployments: BTreeMap<String, String> = lock(&control.rollouts)
        .iter()
        .map(|r| (r.id.clone(), r.deployment_id.clone()))
        .collect();
    for r in reports {
        let counted = deployments.get(&r.id).and_then(|d| by_rollout.get(d));
        for c in &s.cohorts {
            let gone = if deleted.is_empty() {
                0
            } else {
                (0..c.count)
                    .filter(|n| deleted.contains(&c.device_id(*n)))
                    .count()
            };
            let devices = (c.count - gone) as u64;
            let mut rc = counted
                .and_then(|m| m.get(&c.name))
                .cloned()
                .unwrap_or_default();
            rc.devices = devices;
            rc.updated_share = if devices == 0 {
                0.0
            } else {
                rc.started as f64 / devices as f64
            };
            r.cohorts.insert(c.name.clone(), rc);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_details_name_their_wave() {
        assert_eq!(wave_named("wave 3"), Some(3));
        assert_eq!(wave_named("wave 12: disconnects ..."), Some(12));
        assert_eq!(wave_named("wave 1 ended (95 committed so far)"), Some(1));
        assert_eq!(wave_named("the control cohort"), None);
    }
}
