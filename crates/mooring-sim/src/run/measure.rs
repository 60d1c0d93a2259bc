//! What the run measures: the fleet sampler during the run, the readback of telemetry and
//! commands at the end, how devices came back after each cut or restart, and the `[expect]`
//! checks.

use super::{Control, COMMANDS_PER_DEVICE_MAX};
use crate::device::DeviceState;
use crate::harness::node_id;
use crate::remote::RemoteApi;
use crate::report::{ExpectationResult, Reconnected, Report, Sample, TimelineEvent};
use crate::scenario::{Scenario, SEQ_METRIC};
use mooring_proto::sync::lock;
use mooring_server::app::Readback;
use mooring_store::{CommandState, TelemetryQuery};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// How long before each sample mark the sampler reads.
const SAMPLE_LEAD: Duration = Duration::from_millis(1);

/// Samples the fleet every `interval` (online devices as the server sees them; in cluster mode
/// per node too); the telemetry and command series are filled in at the end from recorded
/// times.
pub(super) async fn run_sampler(
    control: Arc<Control>,
    start: Instant,
    end: Instant,
    interval: Duration,
) {
    let mut k = 1u32;
    loop {
        let t = start + interval * k;
        if t > end {
            return;
        }
        // Read 1 ms before the mark, so events scheduled at the mark (scenario events are
        // whole seconds) are never racing the read.
        tokio::time::sleep_until(t - SAMPLE_LEAD).await;
        let online = control.online_count().await;
        let nodes = match &control.cluster {
            Some(_) => control
                .live_apps()
                .iter()
                .map(|(slot, app)| (node_id(slot + 1), app.presence.online_count() as u64))
                .collect(),
            None => BTreeMap::new(),
        };
        let ota = super::ota::states(&control).await;
        lock(&control.samples).push(Sample {
            t_ms: (interval * k).as_millis() as u64,
            online,
            nodes,
            ota,
            ..Sample::default()
        });
        k += 1;
    }
}

/// Where the end-of-run numbers come from: the in-process server's store (after it stopped),
/// or the remote server's API.
pub(super) enum Reader {
    /// Read after the server stopped, so only the store can answer (see `App::readback`).
    Store(Readback),
    Remote(Arc<RemoteApi>),
}

/// A command as the end of the run needs it.
pub(super) struct CommandView {
    pub(super) state: String,
    pub(super) parent_id: Option<String>,
    pub(super) failed_reason: Option<String>,
    pub(super) history: Vec<(String, u64)>,
}

impl Reader {
    pub(super) async fn telemetry_values(
        &self,
        id: &str,
        limit: usize,
    ) -> anyhow::Result<Vec<u32>> {
        match self {
            Reader::Remote(api) => api.telemetry_values(id, limit).await,
            Reader::Store(store) => Ok(store
                .telemetry(TelemetryQuery {
                    device_id: mooring_proto::DeviceId::parse(id)?,
                    metric: Some(SEQ_METRIC.to_owned()),
                    from_ms: None,
                    to_ms: None,
                    limit,
                })
                .await?
                .iter()
                .filter_map(|p| match p.value {
                    mooring_proto::telemetry::MetricValue::Number(v) => Some(v as u32),
                    mooring_proto::telemetry::MetricValue::Bool(_) => None,
                })
                .collect()),
        }
    }

    pub(super) async fn commands(&self, id: &str) -> anyhow::Result<Vec<CommandView>> {
        match self {
            Reader::Remote(api) => Ok(api
                .commands(id)
                .await?
                .into_iter()
                .map(|c| CommandView {
                    state: c.state,
                    parent_id: c.parent_id,
                    failed_reason: c.failed_reason,
                    history: c.history,
                })
                .collect()),
            Reader::Store(store) => Ok(store
                .commands(id, COMMANDS_PER_DEVICE_MAX)
                .await?
                .into_iter()
                .map(|c| CommandView {
                    state: c.state.as_str().to_owned(),
                    failed_reason: (c.state == CommandState::Failed)
                        .then(|| {
                            c.result.as_ref()?.output["reason"]
                                .as_str()
                                .map(str::to_owned)
                        })
                        .flatten(),
                    parent_id: c.parent_id,
                    history: c
                        .history
                        .iter()
                        .map(|(s, at)| (s.as_str().to_owned(), *at))
                        .collect(),
                })
                .collect()),
        }
    }
}

/// Prometheus text → `name{labels}` → value (comments skipped).
pub fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.trim().to_owned(), v.trim().parse().ok()?))
        })
        .collect()
}

/// `cohort_alerts`, `rule_alerts`, `max_detection` against the report's alerts.
fn health_expectations(s: &Scenario, r: &Report, out: &mut Vec<ExpectationResult>) {
    let e = &s.expect;
    let health = r.health.clone().unwrap_or_default();
    if let Some(want) = &e.cohort_alerts {
        let want: std::collections::BTreeSet<&str> = want.iter().map(String::as_str).collect();
        let got: std::collections::BTreeSet<&str> = health
            .alerts
            .iter()
            .filter(|(_, a)| a.cohort)
            .map(|(k, _)| k.as_str())
            .collect();
        let show = |set: &std::collections::BTreeSet<&str>| {
            format!("[{}]", set.iter().copied().collect::<Vec<_>>().join(", "))
        };
        out.push(ExpectationResult {
            name: "cohort_alerts".into(),
            expected: show(&want),
            actual: show(&got),
            ok: got == want,
        });
    }
    for rule in e.rule_alerts.keys() {
        let (named, missing, extra) = health
            .rule_mismatches
            .get(rule)
            .copied()
            .unwrap_or_default();
        out.push(ExpectationResult {
            name: format!("rule_alerts.{rule}"),
            expected: format!("the {named} devices its selector names"),
            actual: format!("{missing} of them without an alert, {extra} others alerted"),
            ok: missing == 0 && extra == 0 && named > 0,
        });
    }
    for playbook in e.tickets.keys() {
        let t = health.tickets.get(playbook).cloned().unwrap_or_default();
        out.push(ExpectationResult {
            name: format!("tickets.{playbook}"),
            expected: format!(
                "one ticket, for the {} devices its selector names",
                t.selector_devices
            ),
            actual: format!(
                "{} ticket(s); the first lists {} device(s) ({} outside the selector) of a cohort of {}",
                t.tickets, t.devices_listed, t.listed_outside_selector, t.devices_total
            ),
            ok: t.tickets == 1
                && t.devices_listed > 0
                && t.listed_outside_selector == 0
                && t.devices_total == t.selector_devices,
        });
    }
    for (key, bound) in &e.max_detection {
        let first = health.alerts.get(key).map(|a| a.first_raised_ms);
        out.push(ExpectationResult {
            name: format!("max_detection.{key}"),
            expected: format!("<= {}", super::fmt_ms(bound.0)),
            actual: first.map_or_else(|| "never raised".to_owned(), super::fmt_ms),
            ok: first.is_some_and(|t| t <= bound.0),
        });
    }
}

pub(super) fn check_expectations(
    s: &Scenario,
    r: &Report,
    event_errors: &[String],
) -> Vec<ExpectationResult> {
    let e = &s.expect;
    let mut out = Vec::new();
    health_expectations(s, r, &mut out);
    if let Some(want) = e.enrolled_exactly_once {
        let got = r
            .enrollment
            .as_ref()
            .is_some_and(|en| en.enrolled_exactly_once);
        out.push(ExpectationResult {
            name: "enrolled_exactly_once".into(),
            expected: want.to_string(),
            actual: got.to_string(),
            ok: got == want,
        });
    }
    let mut at_most = |name: &str, want: Option<u64>, got: u64| {
        if let Some(w) = want {
            out.push(ExpectationResult {
                name: name.into(),
                expected: format!("<= {w}"),
                actual: got.to_string(),
                ok: got <= w,
            });
        }
    };
    at_most(
        "lost_acked_telemetry",
        e.lost_acked_telemetry,
        r.lost_acked_telemetry,
    );
    let gw = r.gateways.clone().unwrap_or_default();
    at_most(
        "children_telemetry_lost",
        e.children_telemetry_lost,
        gw.telemetry_lost,
    );
    at_most(
        "children_out_of_order",
        e.children_out_of_order,
        gw.children_out_of_order,
    );
    at_most(
        "commands_executed_twice",
        e.commands_executed_twice,
        r.commands_executed_twice,
    );
    for (reason, max) in &e.max_mqtt_refusals {
        let key = format!("mooring_mqtt_refusals_total{{reason=\"{reason}\"}}");
        let got = r.server_metrics.get(&key).copied().unwrap_or(0.0) as u64;
        at_most(&format!("max_mqtt_refusals.{reason}"), Some(*max), got);
    }
    at_most(
        "max_commands_not_succeeded",
        e.max_commands_not_succeeded,
        r.commands_sent
            .saturating_sub(r.commands_deleted)
            .saturating_sub(r.commands_succeeded),
    );
    at_most(
        "max_duplicate_certificates",
        e.max_duplicate_certificates,
        r.enrollment
            .as_ref()
            .map_or(0, |en| en.duplicate_certificates),
    );
    let ota = r.ota.clone().unwrap_or_default();
    at_most("max_ota_unbootable", e.max_ota_unbootable, ota.unbootable);
    at_most("max_ota_untruthful", e.max_ota_untruthful, ota.untruthful);
    at_most("max_ota_unsettled", e.max_ota_unsettled, ota.unsettled);
    at_most(
        "max_jobs_not_succeeded",
        e.max_jobs_not_succeeded,
        r.jobs.iter().filter(|j| !j.succeeded()).count() as u64,
    );
    let mut at_least = |name: &str, want: Option<u64>, got: u64| {
        if let Some(w) = want {
            out.push(ExpectationResult {
                name: name.into(),
                expected: format!(">= {w}"),
                actual: got.to_string(),
                ok: got >= w,
            });
        }
    };
    at_least("min_ota_committed", e.min_ota_committed, ota.committed);
    at_least(
        "min_gateways_online_at_end",
        e.min_gateways_online_at_end,
        gw.gateways_online_at_end,
    );
    at_least(
        "min_ota_rolled_back",
        e.min_ota_rolled_back,
        ota.rolled_back,
    );
    at_least(
        "min_online_at_end",
        e.min_online_at_end.map(|v| v as u64),
        r.online_at_end,
    );
    at_least(
        "min_telemetry_stored",
        e.min_telemetry_stored,
        r.telemetry_stored,
    );
    at_least(
        "min_commands_succeeded",
        e.min_commands_succeeded,
        r.commands_succeeded,
    );
    if let Some(bound) = e.max_reconnect_time {
        // Every device each event cut off, back within the bound after the event ended.
        let mut worst = 0u64;
        let mut missing = Vec::new();
        for ev in &r.timeline {
            if let Some(rc) = &ev.reconnected {
                worst = worst.max(rc.max_ms);
                if rc.devices < rc.of {
                    missing.push(format!(
                        "{} at {} ms: {} of {} devices reconnected",
                        ev.action, ev.at_ms, rc.devices, rc.of
                    ));
                }
            }
        }
        out.push(ExpectationResult {
            name: "max_reconnect_time".into(),
            expected: format!("<= {} ms", bound.0),
            actual: if missing.is_empty() {
                format!("{worst} ms")
            } else {
                missing.join("; ")
            },
            ok: missing.is_empty() && worst <= bound.0,
        });
    }
    for (name, max) in &e.max_cluster_counters {
        let got: u64 = r.nodes.iter().filter_map(|n| n.counters.get(name)).sum();
        out.push(ExpectationResult {
            name: format!("max_cluster_counters.{name}"),
            expected: format!("<= {max}"),
            actual: got.to_string(),
            ok: got <= *max,
        });
    }
    rollout_expectations(s, r, &mut out);
    for err in event_errors {
        out.push(ExpectationResult {
            name: "event".into(),
            expected: "applied".into(),
            actual: err.clone(),
            ok: false,
        });
    }
    out
}

/// `[expect] rollouts`: each rollout of the version (there must be one) meets each bound.
fn rollout_expectations(s: &Scenario, r: &Report, out: &mut Vec<ExpectationResult>) {
    for (version, want) in &s.expect.rollouts {
        let name = |what: &str| format!("rollouts.{version}.{what}");
        let of_version: Vec<_> = r
            .rollouts
            .iter()
            .filter(|x| x.version == *version)
            .collect();
        if of_version.is_empty() {
            out.push(ExpectationResult {
                name: format!("rollouts.{version}"),
                expected: "a rollout".into(),
                actual: "none was created".into(),
                ok: false,
            });
        }
        for x in of_version {
            if let Some(state) = &want.state {
                out.push(ExpectationResult {
                    name: name("state"),
                    expected: state.clone(),
                    actual: match &x.reason {
                        Some(why) => format!("{} ({why})", x.state),
                        None => x.state.clone(),
                    },
                    ok: x.state == *state,
                });
            }
            if let Some(max) = want.waves_started_max {
                out.push(ExpectationResult {
                    name: name("waves_started_max"),
                    expected: format!("<= {max}"),
                    actual: x.waves_started.to_string(),
                    ok: x.waves_started <= max,
                });
            }
            for (cohort, max) in &want.cohort_updated_share_max {
                let c = x.cohorts.get(cohort).cloned().unwrap_or_default();
                out.push(ExpectationResult {
                    name: name(&format!("cohort_updated_share_max.{cohort}")),
                    expected: format!("<= {max}"),
                    actual: format!("{:.4} ({} of {})", c.updated_share, c.started, c.devices),
                    ok: c.updated_share <= *max,
                });
            }
        }
    }
}

/// The events' outcomes as played, each `cut_link`, `restart_server` and `kill_node` with how
/// its devices came back: how many the server accepted again after the link returned, the
/// server was back or the node was killed, and how long the median and the slowest took.
/// Devices deleted since do not count. A `kill_node` says where the node's leases went.
pub(super) fn timeline(control: &Control, devices: &[Arc<DeviceState>]) -> Vec<TimelineEvent> {
    let deleted = lock(&control.deleted).clone();
    let lease_moves = lock(&control.lease_moves).clone();
    lock(&control.timeline)
        .iter()
        .map(|(event, watch)| {
            let mut event = event.clone();
            if event.action == "kill_node" && event.error.is_none() {
                if let Some(moves) = lease_moves.get(&(event.at_ms, event.target.clone())) {
                    event.leases = moves.clone();
                }
            }
            if let Some((since_ms, indices)) = watch {
                let mut of = 0u64;
                let mut delays: Vec<u64> = Vec::new();
                for d in indices.iter().filter_map(|i| devices.get(*i)) {
                    if deleted.contains(d.id.as_str()) {
                        continue;
                    }
                    of += 1;
                    if let Some(at_ms) = d.link.reconnected_after(*since_ms) {
                        delays.push(at_ms.saturating_sub(*since_ms));
                    }
                }
                delays.sort_unstable();
                event.reconnected = Some(Reconnected {
                    devices: delays.len() as u64,
                    of,
                    median_ms: delays.get(delays.len() / 2).copied().unwrap_or(0),
                    max_ms: delays.last().copied().unwrap_or(0),
                });
            }
            event
        })
        .collect()
}
