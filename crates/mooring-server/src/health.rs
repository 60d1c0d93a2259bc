//! Fleet health (issue 18): per-device health signals, and the fleet's health per cohort with
//! the cohorts significantly worse than the rest (docs/health.md).
//!
//! Signals come from what the server already sees, with no extra device traffic: the
//! [`Tracker`] observes every event this node originates ([`crate::events::Observer`]:
//! presence, telemetry, command outcomes, shadow reports of the agent's start counts, update
//! reports) as it is published, and keeps one [`HealthDelta`] per device in memory. Every
//! `[health] flush_interval_ms` (and at shutdown) the deltas are folded into the stored
//! records ([`mooring_store::HealthStore`]), so no evaluation reads the telemetry table. A read
//! folds this node's unflushed deltas in memory; in a cluster the other nodes' arrive up to one
//! flush interval late.
//!
//! Bounds: the deltas waiting for a flush are at most `[health] pending_devices_max` devices
//! (beyond, new devices' events are not tracked until the next flush, counted in
//! `mooring_health_dropped_total`); a delta's battery samples are at most
//! [`mooring_store::health::BATTERY_SAMPLES_MAX`]; open sessions tracked are bounded the same.
//!
//! The fleet summary reads the selection a page of devices at a time (their records by id),
//! sums each cohort's window counts and device-hours, and runs the cohort test of
//! [`mooring_health::evaluate`] per failure signal.

use crate::access::Access;
use crate::error::{ServiceError, ServiceResult};
use crate::metrics::Counters;
use crate::registry::{DeviceView, Registry};
use mooring_api::{EventBody, HealthCounts as ApiCounts, HEALTH_WINDOW_HOURS};
use mooring_proto::sync::lock;
use mooring_proto::{Clock, DeviceId};
use mooring_store::health::{DeviceHealth, DiagnosticsRef, HealthCounts, HealthDelta, UpdateRef};
use mooring_store::Store;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

/// Devices read per page by the fleet summary.
const SUMMARY_PAGE_LEN: usize = 1000;

/// `[health]`.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// The telemetry metric that is the battery level (default `battery`).
    pub battery_metric: String,
    /// Below this battery level a device counts in a cohort's `battery_low` (default 20).
    pub battery_low_level: f64,
    /// Telemetry that resumes after more than this silence counts a gap (default 15 min).
    pub telemetry_gap_ms: u64,
    /// How often each node writes the signals it saw (default 5 s).
    pub flush_interval_ms: u64,
    /// Devices whose signals wait for one flush at most (default 200,000).
    pub pending_devices_max: usize,
    /// The cohort test: cohorts with fewer devices are not tested (default 20).
    pub cohort_devices_min: u64,
    /// The cohort test's false discovery rate across cohorts (default 0.01).
    pub fdr_q: f64,
    /// A cohort is flagged only if its rate is at least this many times the rest's (1.5).
    pub rate_ratio_min: f64,
    /// The groupings the cohort sweeper tests, each a `group_by` (default `["version"]`): a
    /// flagged cohort raises one alert (resolved when it is no longer flagged).
    pub cohort_group_by: Vec<String>,
    /// How often the sweeper runs (default 5 min; 0: never).
    pub cohort_interval_ms: u64,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            battery_metric: "battery".to_owned(),
            battery_low_level: 20.0,
            telemetry_gap_ms: 15 * 60 * 1000,
            flush_interval_ms: 5_000,
            pending_devices_max: 200_000,
            cohort_devices_min: 20,
            fdr_q: 0.01,
            rate_ratio_min: 1.5,
            cohort_group_by: vec!["version".to_owned()],
            cohort_interval_ms: 300_000,
        }
    }
}

impl HealthConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        use anyhow::bail;
        if self.battery_metric.is_empty() || self.battery_metric.len() > 128 {
            bail!("health.battery_metric must be 1 to 128 bytes");
        }
        if !self.battery_low_level.is_finite() {
            bail!("health.battery_low_level must be a number");
        }
        if !(1_000..=7 * 86_400_000).contains(&self.telemetry_gap_ms) {
            bail!("health.telemetry_gap_ms must be between 1000 (1 s) and 604800000 (7 days)");
        }
        if !(100..=600_000).contains(&self.flush_interval_ms) {
            bail!("health.flush_interval_ms must be between 100 and 600000 (10 min)");
        }
        if !(1..=10_000_000).contains(&self.pending_devices_max) {
            bail!("health.pending_devices_max must be between 1 and 10000000");
        }
        self.cohort_config()
            .validate()
            .map_err(|e| anyhow::anyhow!("health: {e}"))?;
        if self.cohort_devices_min == 0 {
            bail!("health.cohort_devices_min must be at least 1");
        }
        if self.cohort_group_by.len() > 16 {
            bail!("health.cohort_group_by: at most 16 groupings");
        }
        for g in &self.cohort_group_by {
            parse_group_by(Some(g))
                .map_err(|e| anyhow::anyhow!("health.cohort_group_by {g:?}: {}", e.message))?;
        }
        if self.cohort_interval_ms != 0 && !(1_000..=86_400_000).contains(&self.cohort_interval_ms)
        {
            bail!(
                "health.cohort_interval_ms must be 0 (never) or between 1000 and 86400000 (1 day)"
            );
        }
        Ok(())
    }

    fn cohort_config(&self) -> mooring_health::Config {
        mooring_health::Config {
            fdr_q: self.fdr_q,
            devices_min: self.cohort_devices_min,
            exposure_min: 0.0,
            rate_ratio_min: self.rate_ratio_min,
        }
    }
}

/// Counters of the tracker (`/metrics`).
#[derive(Default)]
pub struct HealthCounters {
    /// Events not tracked: `pending_devices_max` devices were waiting for a flush.
    pub dropped: AtomicU64,
    /// Deltas written to the store.
    pub flushed: AtomicU64,
}

#[derive(Default)]
struct Pending {
    deltas: HashMap<String, HealthDelta>,
    /// Sessions open on this node: when each opened.
    open: HashMap<String, u64>,
}

/// Sees every event this node originates and keeps the health deltas until a flush.
pub struct Tracker {
    config: HealthConfig,
    store: Arc<dyn Store>,
    pending: Mutex<Pending>,
    /// One flush at a time (the loop's, a read's, the last one's), so deltas reach the store
    /// in the order they were taken.
    flushing: tokio::sync::Mutex<()>,
    pub counters: HealthCounters,
}

impl Tracker {
    pub(crate) fn new(config: HealthConfig, store: Arc<dyn Store>) -> Self {
        Tracker {
            config,
            store,
            pending: Mutex::default(),
            flushing: tokio::sync::Mutex::new(()),
            counters: HealthCounters::default(),
        }
    }

    pub fn flush_interval_ms(&self) -> u64 {
        self.config.flush_interval_ms
    }

    /// This node's delta of `id` not yet flushed.
    fn pending_of(&self, id: &str) -> Option<HealthDelta> {
        lock(&self.pending).deltas.get(id).cloned()
    }

    /// Writes every waiting delta; on an error they are put back for the next flush.
    pub async fn flush(&self) -> mooring_store::Result<usize> {
        let _one = self.flushing.lock().await;
        let taken: Vec<HealthDelta> = {
            let mut p = lock(&self.pending);
            p.deltas.drain().map(|(_, d)| d).collect()
        };
        let mut written = 0;
        let mut rest = taken.into_iter().peekable();
        while rest.peek().is_some() {
            let batch: Vec<HealthDelta> = rest
                .by_ref()
                .take(mooring_store::HEALTH_BATCH_LEN_MAX)
                .collect();
            let n = batch.len();
            if let Err(e) = self
                .store
                .merge_device_health(batch.clone(), self.config.telemetry_gap_ms)
                .await
            {
                self.put_back(batch.into_iter().chain(rest));
                return Err(e);
            }
            written += n;
            Counters::add(&self.counters.flushed, n as u64);
        }
        Ok(written)
    }

    /// Deltas a failed flush took: merged under what arrived meanwhile (older first).
    fn put_back(&self, deltas: impl Iterator<Item = HealthDelta>) {
        let mut p = lock(&self.pending);
        for mut old in deltas {
            let key = old.device_id.clone();
            if let Some(newer) = p.deltas.remove(&key) {
                old.absorb(newer);
            }
            p.deltas.insert(key, old);
        }
    }

    /// One event this node originated.
    fn observe_event(&self, at_ms: u64, device: &DeviceId, body: &EventBody) {
        let mut p = lock(&self.pending);
        let p = &mut *p;
        let id = device.as_str();
        if !p.deltas.contains_key(id) && p.deltas.len() >= self.config.pending_devices_max {
            Counters::inc(&self.counters.dropped);
            return;
        }
        let d = p
            .deltas
            .entry(id.to_owned())
            .or_insert_with(|| HealthDelta::new(id, at_ms));
        match body {
            EventBody::Presence { online: true, .. } => {
                d.count(at_ms, |c| c.connects += 1);
                d.session = Some((at_ms, true));
                if p.open.len() < self.config.pending_devices_max || p.open.contains_key(id) {
                    p.open.insert(id.to_owned(), at_ms);
                }
            }
            EventBody::Presence { online: false, .. } => {
                d.count(at_ms, |c| c.disconnects += 1);
                d.session = Some((at_ms, false));
                if let Some(since) = p.open.remove(id) {
                    d.online_ms += at_ms.saturating_sub(since);
                }
            }
            EventBody::Telemetry { points, .. } => {
                d.telemetry(at_ms, self.config.telemetry_gap_ms);
                if let Some(level) = points
                    .get(&self.config.battery_metric)
                    .and_then(serde_json::Value::as_f64)
                {
                    d.battery(at_ms, level);
                }
            }
            EventBody::Command {
                command_id,
                name,
                state,
                ..
            } => {
                match state.as_str() {
                    "failed" => d.count(at_ms, |c| c.command_failures += 1),
                    "expired" => d.count(at_ms, |c| c.command_timeouts += 1),
                    _ => {}
                }
                let ended = matches!(state.as_str(), "succeeded" | "failed" | "expired");
                if ended && name == "diagnostics" {
                    d.diagnostics = Some(DiagnosticsRef {
                        command_id: command_id.clone(),
                        state: state.clone(),
                        at_ms,
                    });
                }
            }
            EventBody::Shadow { reported, .. } => {
                let agent = reported.get("agent");
                let count = |key: &str| agent.and_then(|a| a.get(key)).and_then(|v| v.as_u64());
                d.agent_counts(at_ms, count("boots"), count("unclean_stops"));
            }
            EventBody::Update {
                deployment_id,
                version,
                state,
                reason,
                ..
            } => {
                let problem = match state.as_str() {
                    "rolled_back" => {
                        d.count(at_ms, |c| c.update_rollbacks += 1);
                        true
                    }
                    "failed" => {
                        d.count(at_ms, |c| c.update_failures += 1);
                        true
                    }
                    _ => false,
                };
                if problem {
                    d.update_problem = Some(UpdateRef {
                        deployment_id: deployment_id.clone(),
                        version: version.clone(),
                        state: state.clone(),
                        reason: reason.clone(),
                        at_ms,
                    });
                }
            }
        }
    }
}

impl crate::events::Observer for Tracker {
    fn observe(&self, at_ms: u64, device: Option<&DeviceId>, body: &EventBody) {
        if let Some(device) = device {
            self.observe_event(at_ms, device, body);
        }
    }
}

/// The health service: the tracker's records read per device and per cohort.
pub struct Health {
    tracker: Arc<Tracker>,
    registry: Arc<Registry>,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    config: HealthConfig,
    /// `[rules] alerts_open_max`: cohort alerts share the bound.
    alerts_open_max: usize,
}

/// What one cohort sweep did.
#[derive(Debug, Default)]
pub struct CohortSweep {
    /// Cohorts flagged (alerts raised or counted again).
    pub flagged: usize,
    /// Alerts this sweep raised new (their playbooks run).
    pub raised: Vec<RaisedCohortAlert>,
}

/// A cohort alert raised new.
#[derive(Debug, Clone)]
pub struct RaisedCohortAlert {
    pub alert: mooring_store::AlertRecord,
    pub group_by: String,
    pub signal: String,
    pub cohort: String,
}

/// A signal on one device.
#[derive(Debug, Clone, PartialEq)]
pub struct SignalOn {
    pub id: String,
    /// `None`: the device has no record of it.
    pub value: Option<f64>,
    /// Whether the signal shows on it (a count above 0, a battery below the low level).
    pub affected: bool,
}

/// Signals a `[[part]]` or a playbook may name besides the counts.
pub const SIGNALS_EXTRA: [&str; 3] = [
    "battery",
    mooring_api::HEALTH_BATTERY_SIGNAL,
    "reconnects_per_hour",
];

/// Whether `signal` is one [`Health::signal_on_devices`] knows.
pub fn is_known_signal(signal: &str) -> bool {
    SIGNALS_EXTRA.contains(&signal) || ApiCounts::default().get(signal).is_some()
}

/// The rule id of a cohort alert: `cohort:<group_by>:<signal>:<cohort label>`.
fn cohort_rule_id(group_by: &str, signal: &str, cohort: &str) -> String {
    format!("cohort:{group_by}:{signal}:{cohort}")
}

/// A stored count by its signal's name (`None`: no such count).
pub(crate) fn count_of(c: &HealthCounts, signal: &str) -> Option<u64> {
    api_counts(c).get(signal)
}

fn api_counts(c: &HealthCounts) -> ApiCounts {
    ApiCounts {
        connects: c.connects,
        disconnects: c.disconnects,
        telemetry_gaps: c.telemetry_gaps,
        command_failures: c.command_failures,
        command_timeouts: c.command_timeouts,
        restarts: c.restarts,
        crashes: c.crashes,
        update_rollbacks: c.update_rollbacks,
        update_failures: c.update_failures,
    }
}

/// One `group_by` key.
#[derive(Debug, Clone, PartialEq)]
enum GroupKey {
    Tag(String),
    Version,
}

impl GroupKey {
    fn name(&self) -> String {
        match self {
            GroupKey::Tag(k) => format!("tag:{k}"),
            GroupKey::Version => "version".to_owned(),
        }
    }

    fn value_of(&self, v: &DeviceView) -> Option<String> {
        match self {
            GroupKey::Tag(k) => v.record.tags.get(k).cloned(),
            GroupKey::Version => v.version.clone(),
        }
    }
}

/// Checks `group_by` text (as `GET /api/v1/health` takes it).
pub(crate) fn check_group_by(text: Option<&str>) -> ServiceResult<()> {
    parse_group_by(text).map(|_| ())
}

fn parse_group_by(text: Option<&str>) -> ServiceResult<Vec<GroupKey>> {
    let Some(text) = text.map(str::trim).filter(|t| !t.is_empty()) else {
        return Ok(Vec::new());
    };
    let invalid = |why: String| ServiceError::invalid("invalid_group_by", why);
    let mut keys = Vec::new();
    for part in text.split(',').map(str::trim) {
        let key = if part == "version" {
            GroupKey::Version
        } else if let Some(tag) = part.strip_prefix("tag:") {
            if tag.is_empty() || tag.len() > 64 {
                return Err(invalid(format!("{part:?}: a tag key is 1 to 64 bytes")));
            }
            GroupKey::Tag(tag.to_owned())
        } else {
            return Err(invalid(format!(
                "{part:?} is not a group key: use tag:<key> or version, comma-separated"
            )));
        };
        if keys.contains(&key) {
            return Err(invalid(format!("{part:?} is named twice")));
        }
        keys.push(key);
    }
    if keys.len() > mooring_api::HEALTH_GROUP_KEYS_MAX {
        return Err(invalid(format!(
            "at most {} group keys",
            mooring_api::HEALTH_GROUP_KEYS_MAX
        )));
    }
    Ok(keys)
}

/// A cohort's label: `hw=rev-b on 1.4.0`, `site=berlin`, `version=1.4.0`; `-` for a missing
/// value; `all` with no keys.
fn group_label(keys: &[GroupKey], values: &[Option<String>]) -> String {
    let shown = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".to_owned());
    let tags: Vec<String> = keys
        .iter()
        .zip(values)
        .filter_map(|(k, v)| match k {
            GroupKey::Tag(t) => Some(format!("{t}={}", shown(v))),
            GroupKey::Version => None,
        })
        .collect();
    let version = keys
        .iter()
        .zip(values)
        .find(|(k, _)| **k == GroupKey::Version)
        .map(|(_, v)| shown(v));
    match (tags.is_empty(), version) {
        (true, None) => "all".to_owned(),
        (true, Some(v)) => format!("version={v}"),
        (false, None) => tags.join(","),
        (false, Some(v)) => format!("{} on {v}", tags.join(",")),
    }
}

#[derive(Default)]
struct GroupSum {
    values: Vec<Option<String>>,
    devices: u64,
    reporting: u64,
    online: u64,
    device_hours: f64,
    counts: ApiCounts,
    battery_sum: f64,
    battery_n: u64,
    battery_low: u64,
}

impl Health {
    pub(crate) fn new(
        tracker: Arc<Tracker>,
        registry: Arc<Registry>,
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        config: HealthConfig,
        alerts_open_max: usize,
    ) -> Self {
        Health {
            tracker,
            registry,
            store,
            clock,
            config,
            alerts_open_max,
        }
    }

    /// A device's stored record with what this node saw of it since its last flush folded in,
    /// in memory (a read writes nothing); a delta that began before the device was registered
    /// (an id deleted and registered again) is not its own.
    fn with_pending(
        &self,
        stored: Option<DeviceHealth>,
        id: &str,
        created_at_ms: u64,
    ) -> Option<DeviceHealth> {
        let Some(d) = self
            .tracker
            .pending_of(id)
            .filter(|d| d.first_ms >= created_at_ms)
        else {
            return stored;
        };
        let mut record = stored.unwrap_or_default();
        record.apply(&d, self.config.telemetry_gap_ms);
        Some(record)
    }

    /// How often the cohort sweeper runs (0: never).
    pub fn cohort_interval_ms(&self) -> u64 {
        self.config.cohort_interval_ms
    }

    /// The cohort sweeper: each `[health] cohort_group_by` grouping of the whole fleet is
    /// tested; a flagged cohort raises one alert (device `null`, rule `cohort:<group_by>:
    /// <signal>:<cohort>`, counted again while it stays flagged) and an open cohort alert whose
    /// cohort is no longer flagged is resolved (`auto`). Returns the flagged cohorts.
    pub async fn sweep_cohorts(&self) -> ServiceResult<CohortSweep> {
        let mut raised = Vec::new();
        let mut flagged = std::collections::BTreeSet::new();
        let mut failed = Vec::new();
        for group_by in &self.config.cohort_group_by {
            let s = match self.summary(&Access::all(), None, Some(group_by)).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(group_by = %group_by, error = %e, "a cohort sweep grouping failed");
                    failed.push(format!("cohort:{group_by}:"));
                    continue;
                }
            };
            for a in s.anomalies {
                let rule_id = cohort_rule_id(group_by, &a.signal, &a.cohort);
                let fired = self
                    .store
                    .fire_alert(
                        mooring_store::AlertFire {
                            id: crate::rules::new_id("alert", s.generated_ms),
                            rule_id: rule_id.clone(),
                            rule_name: format!("cohort {group_by}"),
                            device_id: String::new(),
                            severity: "warning".to_owned(),
                            detail: a.description,
                            at_ms: s.generated_ms,
                            rule_must_exist: false,
                        },
                        self.alerts_open_max,
                    )
                    .await?;
                match fired {
                    None => {
                        tracing::warn!(alert = %rule_id, "a cohort alert was not raised: [rules] alerts_open_max alerts are open");
                    }
                    Some((alert, true)) => raised.push(RaisedCohortAlert {
                        alert,
                        group_by: group_by.clone(),
                        signal: a.signal.clone(),
                        cohort: a.cohort.clone(),
                    }),
                    Some(_) => {}
                }
                flagged.insert(rule_id);
            }
        }
        let now = self.clock.now_ms();
        let filter = mooring_store::AlertFilter {
            open: true,
            device_id: Some(String::new()),
            ..mooring_store::AlertFilter::default()
        };
        let mut cursor: Option<String> = None;
        loop {
            let page = self
                .store
                .list_alerts(&filter, 500, cursor.as_deref())
                .await?;
            let full = page.len() == 500;
            cursor = page.last().map(|a| a.id.clone());
            for a in page {
                // A grouping that failed this time keeps its alerts as they are.
                let kept = failed.iter().any(|p| a.rule_id.starts_with(p.as_str()));
                if a.rule_id.starts_with("cohort:") && !flagged.contains(&a.rule_id) && !kept {
                    self.store.resolve_alert(&a.id, "auto", now).await?;
                }
            }
            if !full {
                break;
            }
        }
        Ok(CohortSweep {
            flagged: flagged.len(),
            raised,
        })
    }

    /// Every device of cohort `cohort` (its label) of grouping `group_by`, with `signal` on
    /// each (`battery_low`: its battery level, affected below `[health] battery_low_level`;
    /// a count: its count in the last 24 hours, affected above 0). Pages through the fleet.
    pub async fn cohort_members(
        &self,
        group_by: &str,
        cohort: &str,
        signal: &str,
    ) -> ServiceResult<Vec<SignalOn>> {
        let keys = parse_group_by(Some(group_by))?;
        let sel = Access::all().selection(None)?;
        let mut members: Vec<(String, u64)> = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let (page, next) = self
                .registry
                .select_devices(&sel, cursor.as_deref(), SUMMARY_PAGE_LEN)
                .await?;
            members.extend(
                page.iter()
                    .filter(|v| {
                        let values: Vec<Option<String>> =
                            keys.iter().map(|k| k.value_of(v)).collect();
                        group_label(&keys, &values) == cohort
                    })
                    .map(|v| (v.record.id.to_string(), v.record.created_at_ms)),
            );
            match next {
                Some(n) => cursor = Some(n),
                None => break,
            }
        }
        self.signal_on_devices(&members, signal).await
    }

    /// `signal` on each of `devices` (id, when it was registered), this node's deltas not
    /// yet flushed folded in (at most [`mooring_store::HEALTH_BATCH_LEN_MAX`] per read).
    pub async fn signal_on_devices(
        &self,
        devices: &[(String, u64)],
        signal: &str,
    ) -> ServiceResult<Vec<SignalOn>> {
        let now = self.clock.now_ms();
        let mut out = Vec::with_capacity(devices.len());
        for batch in devices.chunks(mooring_store::HEALTH_BATCH_LEN_MAX) {
            let ids: Vec<String> = batch.iter().map(|(id, _)| id.clone()).collect();
            let records: HashMap<String, DeviceHealth> = self
                .store
                .get_device_health(&ids)
                .await?
                .into_iter()
                .collect();
            for (id, created_at_ms) in batch {
                let record = self.with_pending(records.get(id).cloned(), id, *created_at_ms);
                let (value, affected) = self.signal_on(record.as_ref(), signal, now);
                out.push(SignalOn {
                    id: id.clone(),
                    value,
                    affected,
                });
            }
        }
        Ok(out)
    }

    /// A signal's value on a device's record: `battery` / `battery_low` (its level; affected
    /// below `[health] battery_low_level`), `reconnects_per_hour`, or a count's name (in the
    /// last 24 hours; affected above 0).
    fn signal_on(&self, h: Option<&DeviceHealth>, signal: &str, now: u64) -> (Option<f64>, bool) {
        let Some(h) = h else {
            return (None, false);
        };
        match signal {
            "battery" | mooring_api::HEALTH_BATTERY_SIGNAL => match &h.battery {
                Some(b) => (Some(b.level), b.level < self.config.battery_low_level),
                None => (None, false),
            },
            "reconnects_per_hour" => {
                let (counts, hours) = h.window(now);
                let rate = counts.connects as f64 / hours;
                (Some(rate), counts.connects > 0)
            }
            name => {
                let (counts, _) = h.window(now);
                match api_counts(&counts).get(name) {
                    Some(n) => (Some(n as f64), n > 0),
                    None => (None, false),
                }
            }
        }
    }

    /// The tracker (flushes, counters).
    pub fn tracker(&self) -> &Arc<Tracker> {
        &self.tracker
    }

    /// One device's health (`device_not_found` outside `access`).
    pub async fn device(
        &self,
        access: &Access,
        id: &str,
    ) -> ServiceResult<mooring_api::DeviceHealth> {
        let view = self.registry.get_device(access, id).await?;
        let id = view.record.id.to_string();
        let stored = self
            .store
            .get_device_health(std::slice::from_ref(&id))
            .await?
            .into_iter()
            .next()
            .map(|(_, h)| h);
        let record = self.with_pending(stored, &id, view.record.created_at_ms);
        let now = self.clock.now_ms();
        Ok(device_view(id, view.online, record.as_ref(), now))
    }

    /// The selection's health per cohort, and its anomalies.
    pub async fn summary(
        &self,
        access: &Access,
        selector: Option<&str>,
        group_by: Option<&str>,
    ) -> ServiceResult<mooring_api::HealthSummary> {
        let keys = parse_group_by(group_by)?;
        let sel = access.selection(selector)?;
        // This node's deltas not yet flushed are folded in memory (a read writes nothing); other
        // nodes' arrive with their next flush.
        let now = self.clock.now_ms();
        let mut groups: BTreeMap<String, GroupSum> = BTreeMap::new();
        let mut devices = 0u64;
        let mut cursor: Option<String> = None;
        loop {
            let (page, next) = self
                .registry
                .select_devices(&sel, cursor.as_deref(), SUMMARY_PAGE_LEN)
                .await?;
            let ids: Vec<String> = page.iter().map(|v| v.record.id.to_string()).collect();
            let records: HashMap<String, DeviceHealth> = self
                .store
                .get_device_health(&ids)
                .await?
                .into_iter()
                .collect();
            for v in &page {
                devices += 1;
                let values: Vec<Option<String>> = keys.iter().map(|k| k.value_of(v)).collect();
                let label = group_label(&keys, &values);
                if !groups.contains_key(&label) && groups.len() >= mooring_health::COHORTS_MAX {
                    return Err(ServiceError::invalid(
                        "too_many_groups",
                        format!(
                            "group_by makes more than {} cohorts; group by fewer keys or narrow the selector",
                            mooring_health::COHORTS_MAX
                        ),
                    ));
                }
                let g = groups.entry(label).or_insert_with(|| GroupSum {
                    values,
                    ..GroupSum::default()
                });
                g.devices += 1;
                g.online += u64::from(v.online);
                let record = self.with_pending(
                    records.get(v.record.id.as_str()).cloned(),
                    v.record.id.as_str(),
                    v.record.created_at_ms,
                );
                if let Some(h) = &record {
                    let (counts, hours) = h.window(now);
                    g.reporting += 1;
                    g.device_hours += hours;
                    g.counts.add(&api_counts(&counts));
                    if let Some(b) = &h.battery {
                        g.battery_sum += b.level;
                        g.battery_n += 1;
                        g.battery_low += u64::from(b.level < self.config.battery_low_level);
                    }
                }
            }
            match next {
                Some(n) => cursor = Some(n),
                None => break,
            }
        }
        let anomalies = self.anomalies(&groups)?;
        let mut out: Vec<mooring_api::HealthGroup> = groups
            .into_iter()
            .map(|(label, g)| mooring_api::HealthGroup {
                key: keys
                    .iter()
                    .zip(g.values)
                    .map(|(k, v)| (k.name(), v))
                    .collect(),
                devices: g.devices,
                reporting: g.reporting,
                online: g.online,
                device_hours: g.device_hours,
                rates: mooring_api::HEALTH_TESTED_SIGNALS
                    .iter()
                    .map(|s| {
                        let n = g.counts.get(s).unwrap_or(0) as f64;
                        let rate = if g.device_hours > 0.0 {
                            n / g.device_hours
                        } else {
                            0.0
                        };
                        ((*s).to_owned(), rate)
                    })
                    .collect(),
                last_24h: g.counts,
                battery_mean: (g.battery_n > 0).then(|| g.battery_sum / g.battery_n as f64),
                battery_low: g.battery_low,
                label,
            })
            .collect();
        out.sort_by(|a, b| b.devices.cmp(&a.devices).then(a.label.cmp(&b.label)));
        Ok(mooring_api::HealthSummary {
            selector: selector.map(str::to_owned),
            group_by: keys.iter().map(GroupKey::name).collect(),
            window_hours: HEALTH_WINDOW_HOURS,
            devices,
            groups: out,
            anomalies,
            generated_ms: now,
        })
    }

    /// The cohort test per tested signal, over the groups (at least two).
    fn anomalies(
        &self,
        groups: &BTreeMap<String, GroupSum>,
    ) -> ServiceResult<Vec<mooring_api::HealthAnomaly>> {
        let mut out = Vec::new();
        if groups.len() < 2 {
            return Ok(out);
        }
        let config = self.config.cohort_config();
        let rates = mooring_api::HEALTH_TESTED_SIGNALS
            .iter()
            .map(|s| (*s, mooring_health::SignalKind::Rate));
        // Low batteries: a proportion (devices below `battery_low_level` of those reporting a
        // battery), Fisher's exact test.
        let proportions = std::iter::once((
            mooring_api::HEALTH_BATTERY_SIGNAL,
            mooring_health::SignalKind::Proportion,
        ));
        for (signal, kind) in rates.chain(proportions) {
            let cohorts: Vec<mooring_health::Cohort> = groups
                .iter()
                .map(|(label, g)| match kind {
                    mooring_health::SignalKind::Rate => mooring_health::Cohort {
                        label: label.clone(),
                        devices: g.reporting,
                        events: g.counts.get(signal).unwrap_or(0),
                        exposure: g.device_hours,
                    },
                    mooring_health::SignalKind::Proportion => mooring_health::Cohort {
                        label: label.clone(),
                        devices: g.battery_n,
                        events: g.battery_low,
                        exposure: g.battery_n as f64,
                    },
                })
                .collect();
            // A signal the test cannot take (counts past its bounds) is left out, not the
            // summary: one device's absurd report must not hide the others' signals.
            let evaluation = match mooring_health::evaluate(signal, kind, &cohorts, &config) {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!(signal, error = %e, "the cohort test skipped a signal");
                    continue;
                }
            };
            for t in evaluation.flagged() {
                out.push(mooring_api::HealthAnomaly {
                    signal: signal.to_owned(),
                    cohort: t.label.clone(),
                    devices: t.devices,
                    events: t.events,
                    rate_ratio: t.rate_ratio,
                    p_value: t.p_value,
                    q_value: t.q_value,
                    description: t.describe(),
                });
            }
        }
        out.sort_by(|a, b| {
            a.q_value
                .total_cmp(&b.q_value)
                .then(a.cohort.cmp(&b.cohort))
                .then(a.signal.cmp(&b.signal))
        });
        Ok(out)
    }
}

/// What `GET /api/v1/devices/{id}/health` answers for a record (or none) at `now`.
fn device_view(
    device_id: String,
    online: bool,
    record: Option<&DeviceHealth>,
    now: u64,
) -> mooring_api::DeviceHealth {
    let empty = DeviceHealth::default();
    let h = record.unwrap_or(&empty);
    let (window, hours) = if record.is_some() {
        h.window(now)
    } else {
        (HealthCounts::default(), 0.0)
    };
    mooring_api::DeviceHealth {
        device_id,
        online,
        since_ms: record.map(|h| h.since_ms),
        window_hours: hours,
        reconnects_per_hour: if hours > 0.0 {
            window.connects as f64 / hours
        } else {
            0.0
        },
        last_24h: api_counts(&window),
        totals: api_counts(&h.totals),
        online_ms: h.online_ms_at(now),
        telemetry: mooring_api::TelemetryHealth {
            last_ms: h.last_telemetry_ms,
            silent_ms: h.last_telemetry_ms.map(|t| now.saturating_sub(t)),
            longest_gap_ms: h.longest_gap_ms,
        },
        battery: h.battery.map(|b| mooring_api::BatteryHealth {
            level: b.level,
            at_ms: b.at_ms,
            trend_per_hour: b.trend_per_hour,
            hours_to_empty: b
                .trend_per_hour
                .filter(|t| *t < 0.0 && b.level > 0.0)
                .map(|t| b.level / -t),
        }),
        agent: mooring_api::AgentHealth {
            boots: h.boots,
            unclean_stops: h.unclean_stops,
        },
        last_diagnostics: h
            .last_diagnostics
            .as_ref()
            .map(|d| mooring_api::DiagnosticsRef {
                command_id: d.command_id.clone(),
                state: d.state.clone(),
                at_ms: d.at_ms,
            }),
        last_update_problem: h
            .last_update_problem
            .as_ref()
            .map(|u| mooring_api::UpdateProblem {
                deployment_id: u.deployment_id.clone(),
                version: u.version.clone(),
                state: u.state.clone(),
                reason: u.reason.clone(),
                at_ms: u.at_ms,
            }),
        generated_ms: now,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_by_parses_tags_and_version_and_refuses_the_rest() {
        assert_eq!(parse_group_by(None).ok(), Some(Vec::new()));
        assert_eq!(
            parse_group_by(Some("tag:hw, version")).ok(),
            Some(vec![GroupKey::Tag("hw".into()), GroupKey::Version])
        );
        for bad in [
            "site",
            "tag:",
            "version,version",
            "tag:a,tag:b,tag:c,version",
        ] {
            let e = parse_group_by(Some(bad)).err().map(|e| e.code);
            assert_eq!(e, Some("invalid_group_by"), "{bad}");
        }
    }

    #[test]
    fn labels_read_like_the_alerts() {
        let keys = [GroupKey::Tag("hw".into()), GroupKey::Version];
        let label = group_label(&keys, &[Some("rev-b".into()), Some("1.4.0".into())]);
        assert_eq!(label, "hw=rev-b on 1.4.0");
        assert_eq!(group_label(&keys[..1], &[None]), "hw=-");
        assert_eq!(group_label(&keys[1..], &[Some("2".into())]), "version=2");
        assert_eq!(group_label(&[], &[]), "all");
    }
}
