//! Rollouts (issue 19): an artifact sent to a target in waves, each gated on the health of the
//! devices already updated against a control cohort kept on the old version.
//!
//! * [`plan`] holds the decisions, pure and deterministic: the random but reproducible choice of
//!   waves and control cohort (a seed in the rollout), the health gate, the abort threshold and
//!   the throttle.
//! * A rollout owns one deployment (`dep_...`, created empty with it). Starting a device adds
//!   its `pending` update to that deployment and marks the device started in one store
//!   transaction ([`mooring_store::RolloutStore::start_rollout_devices`]), then sends its
//!   `mooring.update` command through the OTA service; so a device never starts twice, its
//!   state comes from its own status reports like any deployment's, and a crash between the two
//!   leaves an unsent update the OTA sweeper sends.
//! * The controller ([`Rollouts::tick`], every `[rollouts] tick_ms`, on one node of a cluster:
//!   the lease `rollouts.controller`) moves each running rollout on from what is stored, so
//!   every node may stop at any time: it aborts past the failure threshold, starts the current
//!   wave's devices (throttled; a device whose preconditions fail is deferred and tried again
//!   at the next tick, never failed), opens the health window once the wave's devices have all
//!   ended, and when the window is over compares the updated devices with the control cohort
//!   on each gate signal. Pass: the next wave; fail: pause (or abort and roll back with
//!   `auto_abort`); unclear: wait. After the last wave, the control cohort is updated and the
//!   rollout completes once every device has ended.
//! * Every change is in the rollout's event log with who made it.

pub mod plan;

use crate::access::Access;
use crate::app::Core;
use crate::error::{ErrorKind, ServiceError, ServiceResult};
use crate::ota::{Ota, PendingSends};
use crate::registry::{DeviceView, Registry};
use mooring_api::{
    CreateRollout, Gate, GateCounts, GateSignal, Rollout, RolloutEvent, RolloutSpec, RolloutWave,
    BP_ALL,
};
use mooring_proto::ota::UpdateState;
use mooring_proto::selector::{Selector, Term};
use mooring_proto::DeviceId;
use mooring_store::health::HealthCounts;
use mooring_store::{
    ArtifactRecord, ArtifactState, DeploymentRecord, DeviceUpdateRecord, RolloutCreate,
    RolloutDeviceRecord, RolloutEventRecord, RolloutRecord, WaveProgress,
};
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

/// Most devices one rollout targets.
pub const ROLLOUT_DEVICES_MAX: usize = 100_000;
/// Most events a rollout's log keeps (the newest).
pub const EVENTS_KEPT_MAX: usize = 1_000;
/// Most events one page of the log shows.
pub const EVENT_PAGE_LEN_MAX: usize = 1_000;
/// Most rollouts one list page shows.
pub const LIST_LEN_MAX: usize = 100;
/// Devices read per store page.
const PAGE_LEN: usize = 500;
/// Most waiting devices one start pass looks at per rollout (the rest at the next tick: the
/// scan goes on from where it stopped).
const SCAN_MAX: usize = 5_000;
/// The gate's significance level: a signal fails only if `p <= ALPHA`.
pub const GATE_ALPHA: f64 = 0.01;
/// The gate's margin: a signal fails only if the updated devices' rate is at least this many
/// times the control cohort's.
pub const GATE_MARGIN: f64 = 1.5;
/// A gate that waits (unclear) is compared again this often, not at every tick: each
/// comparison reads every compared device's health.
pub const GATE_WAIT_RECHECK_MS: u64 = 60_000;
/// How long after its deployment was canceled a rollout is aborted for it: an operator's abort
/// (which cancels the deployment first) has that long to record its own reason.
pub const CANCELED_ABORT_GRACE_MS: u64 = 10_000;
/// Most devices per side whose values a metric gate reads (the first in id order past it are
/// a sample large enough for the rank-sum test).
pub const METRIC_GATE_DEVICES_MAX: usize = 1_000;
/// Most points of one device a metric gate averages (the earliest in the window).
pub const METRIC_GATE_POINTS_MAX: usize = 1_000;
/// Longest note a pause or abort carries.
pub const REASON_LEN_MAX: usize = 500;

/// Rollout streams (`GET /api/v1/rollouts/{id}/stream`) one node serves at once.
pub const STREAMS_MAX: usize = 256;
/// Rollout streams one caller holds on one node at once.
pub const STREAMS_PER_CALLER_MAX: usize = 8;
/// How often a rollout stream reads the rollout (it sends only what changed).
pub const STREAM_POLL_MS: u64 = 1_000;

/// Who the controller acts as in the event log.
pub const BY_SERVER: &str = "server";

/// `[rollouts]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RolloutsConfig {
    /// How often the controller moves the rollouts on.
    pub tick_ms: u64,
    /// Most rollouts stored (each with its deployment); one more is `503 too_many_rollouts`.
    pub rollouts_max: u32,
    /// Most rollouts running or paused that one caller (a user or token) created; one more is
    /// `429 too_many_rollouts`. Rollbacks the server makes do not count against it.
    pub active_per_creator_max: u32,
}

impl Default for RolloutsConfig {
    fn default() -> Self {
        Self {
            tick_ms: 5_000,
            rollouts_max: 1_000,
            active_per_creator_max: 20,
        }
    }
}

impl RolloutsConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            (10..=600_000).contains(&self.tick_ms),
            "rollouts.tick_ms must be from 10 to 600000"
        );
        anyhow::ensure!(
            (1..=100_000).contains(&self.rollouts_max),
            "rollouts.rollouts_max must be from 1 to 100000"
        );
        anyhow::ensure!(
            (1..=self.rollouts_max).contains(&self.active_per_creator_max),
            "rollouts.active_per_creator_max must be from 1 to rollouts.rollouts_max"
        );
        Ok(())
    }
}

/// The rollouts service.
pub struct Rollouts {
    core: Arc<Core>,
    registry: Arc<Registry>,
    ota: Ota,
    health: Arc<crate::health::Health>,
    /// Per rollout: the (rank, device) after which the next start pass looks, so devices
    /// deferred at the front of the order do not keep the rest waiting.
    scan: Mutex<HashMap<String, (u64, String)>>,
    /// Open rollout streams per caller (principal id); entries go with their last stream.
    streams: Arc<Mutex<HashMap<String, usize>>>,
}

/// A rollout stream's place in the node's and its caller's bounds, until dropped.
pub struct StreamSlot {
    caller: String,
    streams: Arc<Mutex<HashMap<String, usize>>>,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut m = mooring_proto::sync::lock(&self.streams);
        if let Some(n) = m.get_mut(&self.caller) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.caller);
            }
        }
    }
}

/// What a device's health says at one moment, for the gate: its counts and its time online
/// so far (sessions ended plus the open one). A baseline is one of these, as JSON.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, Deserialize)]
struct HealthSample {
    counts: HealthCounts,
    online_ms: u64,
}

impl HealthSample {
    fn of(h: &mooring_store::health::DeviceHealth, now: u64) -> Self {
        let open = h
            .online_since_ms
            .map_or(0, |since| now.saturating_sub(since));
        Self {
            counts: h.totals,
            online_ms: h.online_ms.saturating_add(open),
        }
    }
}

/// What [`Rollouts::store_new`] stores: a checked request for an artifact, its target's
/// devices, and whether it rolls another rollout back.
struct NewRollout<'a> {
    req: &'a CreateRollout,
    spec: &'a RolloutSpec,
    seed: u64,
    /// The target as applied.
    selector: String,
    artifact: &'a ArtifactRecord,
    devices: Vec<String>,
    rollback_of: Option<String>,
}

/// A rollout's devices summed over its waves.
#[derive(Debug, Default, Clone, Copy)]
struct Sums {
    total: u64,
    waiting: u64,
    deferred: u64,
    in_flight: u64,
    committed: u64,
    failed: u64,
    rolled_back: u64,
}

impl Sums {
    fn of<'a>(waves: impl IntoIterator<Item = &'a WaveProgress>) -> Self {
        let mut s = Sums::default();
        for w in waves {
            s.total += w.total;
            s.waiting += w.waiting;
            s.deferred += w.deferred;
            for (state, n) in &w.states {
                match state.as_str() {
                    "committed" => s.committed += n,
                    "failed" => s.failed += n,
                    "rolled_back" => s.rolled_back += n,
                    _ => s.in_flight += n,
                }
            }
        }
        s
    }

    /// Devices whose update ended, one way or another.
    fn tried(&self) -> u64 {
        self.committed + self.failed + self.rolled_back
    }
}

fn not_found(id: &str) -> ServiceError {
    ServiceError::not_found("rollout_not_found", format!("no rollout {id}"))
}

/// The request with every default filled in (what the rollout shows as its `spec`).
fn normalized(req: &CreateRollout, spec: &RolloutSpec, seed: u64) -> CreateRollout {
    let pct = |bp: u32| f64::from(bp) / 100.0;
    CreateRollout {
        artifact_id: req.artifact_id.clone(),
        selector: req.selector.clone(),
        waves: Some(spec.waves.iter().map(|w| pct(*w)).collect()),
        control_pct: Some(pct(spec.control)),
        max_per_minute: spec.max_per_minute,
        max_concurrent: spec.max_concurrent,
        abort_failure_rate_pct: Some(pct(spec.abort_failure_rate)),
        min_devices: Some(spec.min_devices),
        health_window_ms: Some(spec.health_window_ms),
        gate: Some(
            spec.gate
                .iter()
                .map(|s| (*s).to_owned())
                .chain(spec.gate_metrics.iter().map(ToString::to_string))
                .collect(),
        ),
        require: spec.require.iter().map(ToString::to_string).collect(),
        window: spec.window.map(|w| w.to_string()),
        auto_abort: spec.auto_abort,
        allow_downgrade: req.allow_downgrade,
        seed: Some(seed),
    }
}

/// A stored rollout's request and its checked spec.
fn spec_of(r: &RolloutRecord) -> ServiceResult<(CreateRollout, RolloutSpec)> {
    let req: CreateRollout = serde_json::from_str(&r.spec).map_err(ServiceError::internal)?;
    let spec = req.spec().map_err(ServiceError::internal)?;
    Ok((req, spec))
}

/// Pauses every running rollout `access` sees that holds any of `devices` (a rollback aside:
/// it is the way back): the playbook step `pause_rollouts` (docs/health.md#playbooks), so a
/// cohort in trouble gets no more updates until someone has looked. Each pause is a
/// compare-and-set like an operator's and is logged as `by`; the rollouts paused.
pub(crate) async fn pause_touching(
    store: &Arc<dyn mooring_store::Store>,
    now_ms: u64,
    access: &Access,
    devices: &[DeviceId],
    by: &str,
    reason: &str,
) -> ServiceResult<Vec<String>> {
    let mut holding = std::collections::BTreeSet::new();
    for d in devices {
        holding.extend(store.device_rollouts(d.as_str(), PAGE_LEN).await?);
    }
    let mut paused = Vec::new();
    for id in holding {
        let not_paused = || ServiceError::new(ErrorKind::Conflict, "rollout_not_paused", "");
        let changed = change_stored(store, now_ms, &id, |cur| {
            if cur.state != "running" || cur.rollback_of.is_some() || !visible(access, cur) {
                return Err(not_paused());
            }
            cur.state = "paused".to_owned();
            cur.reason = Some(format!("paused by {by}: {reason}"));
            Ok(())
        })
        .await;
        match changed {
            Ok(cur) => {
                log_event(store, &cur.id, now_ms, by, "paused", reason.to_owned()).await?;
                paused.push(cur.id);
            }
            // Not running, a rollback, out of scope, gone, or kept moving: left as it is.
            Err(e)
                if matches!(
                    e.code,
                    "rollout_not_paused" | "rollout_not_found" | "rollout_busy"
                ) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(paused)
}

/// Changes a stored rollout by compare-and-set, again when something else (the controller, an
/// operator) moved it meanwhile, at most 20 times; `change` says what to do with the record as
/// stored (`Err`: refuse, nothing written). The record as written.
async fn change_stored(
    store: &Arc<dyn mooring_store::Store>,
    now_ms: u64,
    id: &str,
    mut change: impl FnMut(&mut RolloutRecord) -> ServiceResult<()>,
) -> ServiceResult<RolloutRecord> {
    for _ in 0..20 {
        let mut r = store.get_rollout(id).await?.ok_or_else(|| not_found(id))?;
        change(&mut r)?;
        r.updated_at_ms = now_ms;
        if store.update_rollout(&r).await? {
            r.revision += 1;
            return Ok(r);
        }
    }
    Err(ServiceError::new(
        ErrorKind::Conflict,
        "rollout_busy",
        format!("rollout {id} kept changing; try again"),
    ))
}

/// Appends an entry to a rollout's event log (its newest [`EVENTS_KEPT_MAX`] are kept).
async fn log_event(
    store: &Arc<dyn mooring_store::Store>,
    id: &str,
    at_ms: u64,
    by: &str,
    kind: &str,
    detail: String,
) -> ServiceResult<()> {
    store
        .append_rollout_event(
            RolloutEventRecord {
                rollout_id: id.to_owned(),
                seq: 0,
                at_ms,
                by: by.to_owned(),
                kind: kind.to_owned(),
                detail,
            },
            EVENTS_KEPT_MAX,
        )
        .await?;
    Ok(())
}

/// Whether a scoped caller sees a rollout: its target carries every term of the caller's scope
/// (as a deployment's does).
fn visible(access: &Access, r: &RolloutRecord) -> bool {
    match access.scope() {
        None => true,
        Some(scope) => Selector::parse(&r.selector)
            .is_ok_and(|s| scope.terms.iter().all(|t| s.terms.contains(t))),
    }
}

/// A device's local minute of the day in the time zone its `tz` tag names (`Europe/Berlin`,
/// `UTC`, `+02:00`, `-0530`); UTC without the tag. `Err`: a tag that names no time zone.
pub fn local_minute(now_ms: u64, tz: Option<&str>) -> Result<u16, String> {
    let utc_min = (now_ms / 60_000 % 1440) as i64;
    let offset_min: i64 = match tz.map(str::trim) {
        None | Some("") | Some("UTC") | Some("Z") => 0,
        Some(t) if t.starts_with(['+', '-']) => {
            let sign = if t.starts_with('-') { -1 } else { 1 };
            let digits: String = t[1..].chars().filter(|c| *c != ':').collect();
            let ok = digits.len() == 4 && digits.bytes().all(|b| b.is_ascii_digit());
            let (h, m): (i64, i64) = if ok {
                (
                    digits[..2].parse().unwrap_or(99),
                    digits[2..].parse().unwrap_or(99),
                )
            } else {
                (99, 99)
            };
            if h > 14 || m > 59 {
                return Err(format!("tz {t:?} is not an offset like +02:00"));
            }
            sign * (h * 60 + m)
        }
        Some(name) => {
            let zone = jiff::tz::TimeZone::get(name)
                .map_err(|_| format!("tz {name:?} is not a time zone"))?;
            let at = jiff::Timestamp::from_millisecond(now_ms as i64)
                .map_err(|e| format!("time {now_ms}: {e}"))?;
            i64::from(zone.to_offset(at).seconds()) / 60
        }
    };
    Ok((utc_min + offset_min).rem_euclid(1440) as u16)
}

impl Rollouts {
    pub(crate) fn new(
        core: Arc<Core>,
        registry: Arc<Registry>,
        ota: Ota,
        health: Arc<crate::health::Health>,
    ) -> Self {
        Self {
            core,
            registry,
            ota,
            health,
            scan: Mutex::default(),
            streams: Arc::default(),
        }
    }

    /// A place for one more rollout stream of `caller`: `503 too_many_streams` when the node
    /// serves [`STREAMS_MAX`], `429 too_many_streams` when the caller holds
    /// [`STREAMS_PER_CALLER_MAX`].
    pub fn open_stream(&self, caller: &str) -> ServiceResult<StreamSlot> {
        let mut m = mooring_proto::sync::lock(&self.streams);
        if m.values().sum::<usize>() >= STREAMS_MAX {
            return Err(ServiceError::new(
                ErrorKind::Unavailable,
                "too_many_streams",
                "this node serves as many rollout streams as it may; retry later",
            ));
        }
        let n = m.entry(caller.to_owned()).or_default();
        if *n >= STREAMS_PER_CALLER_MAX {
            return Err(ServiceError::new(
                ErrorKind::TooManyRequests,
                "too_many_streams",
                format!("you hold {STREAMS_PER_CALLER_MAX} rollout streams on this node; close one first"),
            ));
        }
        *n += 1;
        Ok(StreamSlot {
            caller: caller.to_owned(),
            streams: self.streams.clone(),
        })
    }

    pub fn tick_ms(&self) -> u64 {
        self.core.config.rollouts.tick_ms
    }

    /// Starts a rollout of `req.artifact_id` to the devices `req.selector` matches now
    /// (narrowed by the caller's scope): picks the control cohort and the waves, stores it with
    /// its deployment, and leaves the rest to the controller.
    pub async fn create(
        &self,
        access: &Access,
        by: &str,
        req: CreateRollout,
    ) -> ServiceResult<Rollout> {
        let spec = req
            .spec()
            .map_err(|m| ServiceError::invalid("invalid_rollout", m))?;
        // `battery` names `[health] battery_metric`: gating on both would test one metric twice.
        let battery = self.core.config.health.battery_metric.as_str();
        if battery != "battery"
            && spec.gate_metrics.iter().any(|g| g.metric == "battery")
            && spec.gate_metrics.iter().any(|g| g.metric == battery)
        {
            return Err(ServiceError::invalid(
                "invalid_rollout",
                format!(
                    "gate: battery and {battery} are the same metric ([health] battery_metric)"
                ),
            ));
        }
        let artifact = self.ota.get_artifact(&req.artifact_id).await?;
        if artifact.state != ArtifactState::Ready {
            return Err(ServiceError::new(
                ErrorKind::Conflict,
                "artifact_not_ready",
                format!("artifact {} is still uploading", artifact.id),
            ));
        }
        let given = crate::commands::parse_selector(&req.selector)?;
        let sel = access.narrow(Some(given.clone())).unwrap_or(given);
        let devices = self.select(&sel).await?;
        // A gate that could never compare would hold the rollout at its first wave for good.
        let (control_n, upto) = plan::sizes(devices.len() as u64, &spec);
        let first = upto.first().copied().unwrap_or(0);
        if gates(&spec) && control_n > 0 && control_n.min(first) < spec.min_devices {
            return Err(ServiceError::invalid(
                "invalid_rollout",
                format!(
                    "{} device(s): the control cohort would have {control_n} and the first wave {first}, \
                     fewer than min_devices {}, so the health gate could never compare them; \
                     take larger waves or control, a smaller min_devices, or control 0 (no gate)",
                    devices.len(),
                    spec.min_devices
                ),
            ));
        }
        self.check_creator_bound(by).await?;
        let id = self
            .store_new(
                NewRollout {
                    req: &req,
                    spec: &spec,
                    seed: req.seed.unwrap_or_else(rand::random),
                    selector: sel.to_string(),
                    artifact: &artifact,
                    devices,
                    rollback_of: None,
                },
                by,
            )
            .await?;
        self.view(&id).await
    }

    /// `429 too_many_rollouts` when `by` has `[rollouts] active_per_creator_max` rollouts running
    /// or paused (at most `rollouts_max` are read). Two creations racing may pass together: the
    /// bound is per caller, the store's `rollouts_max` the hard one.
    async fn check_creator_bound(&self, by: &str) -> ServiceResult<()> {
        let max = self.core.config.rollouts.active_per_creator_max;
        let mut mine = 0u32;
        let mut after: Option<String> = None;
        loop {
            let page = self
                .core
                .store
                .active_rollouts(after.as_deref(), PAGE_LEN)
                .await?;
            mine += page.iter().filter(|r| r.created_by == by).count() as u32;
            if mine >= max {
                return Err(ServiceError::new(
                    ErrorKind::TooManyRequests,
                    "too_many_rollouts",
                    format!(
                        "{by} has {max} rollouts running or paused ([rollouts] active_per_creator_max); \
                         finish or abort one first"
                    ),
                ));
            }
            match page.last() {
                Some(r) if page.len() == PAGE_LEN => after = Some(r.id.clone()),
                _ => return Ok(()),
            }
        }
    }

    /// Every device `sel` matches, at most [`ROLLOUT_DEVICES_MAX`]; at least one.
    async fn select(&self, sel: &Selector) -> ServiceResult<Vec<String>> {
        let mut devices = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let (page, next) = self
                .registry
                .select_devices(sel, cursor.as_deref(), PAGE_LEN)
                .await?;
            devices.extend(page.into_iter().map(|d| d.record.id.to_string()));
            if devices.len() > ROLLOUT_DEVICES_MAX {
                return Err(ServiceError::invalid(
                    "too_many_devices",
                    format!(
                        "the selector matches more than {ROLLOUT_DEVICES_MAX} devices; narrow it"
                    ),
                ));
            }
            match next {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
        if devices.is_empty() {
            return Err(ServiceError::invalid(
                "no_matching_devices",
                format!("no device matches {sel}"),
            ));
        }
        Ok(devices)
    }

    /// Stores a new rollout with its deployment and its devices' waves, and logs `created`.
    async fn store_new(&self, new: NewRollout<'_>, by: &str) -> ServiceResult<String> {
        let NewRollout {
            req,
            spec,
            seed,
            selector,
            artifact,
            devices,
            rollback_of,
        } = new;
        let now = self.core.now_ms();
        let record = RolloutRecord {
            id: format!("rol_{:016x}", rand::random::<u64>()),
            deployment_id: format!("dep_{:016x}", rand::random::<u64>()),
            artifact_id: artifact.id.clone(),
            selector,
            spec: serde_json::to_string(&normalized(req, spec, seed))
                .map_err(ServiceError::internal)?,
            seed,
            state: "running".to_owned(),
            wave: 0,
            reason: None,
            gate: None,
            window_started_at_ms: None,
            rollback_of,
            created_by: by.to_owned(),
            created_at_ms: now,
            updated_at_ms: now,
            revision: 0,
        };
        let a = plan::assign(&devices, record.seed, spec);
        let control_wave = spec.waves.len() as u32;
        let row = |d: String, wave: u32| RolloutDeviceRecord {
            rollout_id: record.id.clone(),
            rank: plan::rank(record.seed, &d),
            device_id: d,
            wave,
            started_at_ms: None,
            from_version: None,
            deferred: None,
            baseline: None,
        };
        let mut rows: Vec<RolloutDeviceRecord> = a
            .control
            .into_iter()
            .map(|d| row(d, control_wave))
            .collect();
        for (w, devices) in a.waves.into_iter().enumerate() {
            rows.extend(devices.into_iter().map(|d| row(d, w as u32)));
        }
        let detail = format!(
            "{} device(s): waves {} of the target, {} in the control cohort; version {}",
            rows.len(),
            spec.waves
                .iter()
                .map(|w| format!("{}%", f64::from(*w) / 100.0))
                .collect::<Vec<_>>()
                .join(", "),
            rows.iter().filter(|r| r.wave == control_wave).count(),
            artifact.version
        );
        let deployment = DeploymentRecord {
            id: record.deployment_id.clone(),
            artifact_id: artifact.id.clone(),
            selector: record.selector.clone(),
            allow_downgrade: req.allow_downgrade,
            created_by: by.to_owned(),
            created_at_ms: record.created_at_ms,
            canceled_at_ms: None,
        };
        let max = self.core.config.rollouts.rollouts_max;
        match self
            .core
            .store
            .create_rollout(record.clone(), deployment, rows, max)
            .await?
        {
            RolloutCreate::Created => {}
            RolloutCreate::Full => {
                return Err(ServiceError::new(
                    ErrorKind::Unavailable,
                    "too_many_rollouts",
                    format!(
                        "the server holds its maximum of {max} rollouts ([rollouts] rollouts_max)"
                    ),
                ))
            }
            RolloutCreate::ArtifactNotFound => {
                return Err(ServiceError::not_found(
                    "artifact_not_found",
                    format!("no artifact {}", artifact.id),
                ))
            }
        }
        self.log(&record.id, by, "created", detail).await?;
        Ok(record.id)
    }

    async fn log(&self, id: &str, by: &str, kind: &str, detail: String) -> ServiceResult<()> {
        log_event(&self.core.store, id, self.core.now_ms(), by, kind, detail).await
    }

    async fn record(&self, access: &Access, id: &str) -> ServiceResult<RolloutRecord> {
        match self.core.store.get_rollout(id).await? {
            Some(r) if visible(access, &r) => Ok(r),
            _ => Err(not_found(id)),
        }
    }

    /// A rollout the caller sees, with its waves' progress.
    pub async fn get(&self, access: &Access, id: &str) -> ServiceResult<Rollout> {
        let r = self.record(access, id).await?;
        self.view_of(r).await
    }

    async fn view(&self, id: &str) -> ServiceResult<Rollout> {
        let r = self
            .core
            .store
            .get_rollout(id)
            .await?
            .ok_or_else(|| not_found(id))?;
        self.view_of(r).await
    }

    /// A stored rollout as the API shows it, with its waves' progress.
    async fn view_of(&self, r: RolloutRecord) -> ServiceResult<Rollout> {
        let progress = self.core.store.rollout_progress(&r.id).await?;
        let version = self
            .core
            .store
            .get_artifact(&r.artifact_id)
            .await?
            .map(|a| a.version)
            .unwrap_or_default();
        Ok(to_api(r, &progress, version))
    }

    /// The rollouts the caller sees, newest first, a page of at most `limit` (default and most
    /// [`LIST_LEN_MAX`]) after `cursor`; the next page's cursor, if there may be one.
    pub async fn list(
        &self,
        access: &Access,
        cursor: Option<&str>,
        limit: Option<usize>,
    ) -> ServiceResult<(Vec<Rollout>, Option<String>)> {
        let limit = limit.unwrap_or(LIST_LEN_MAX);
        if limit == 0 || limit > LIST_LEN_MAX {
            return Err(ServiceError::invalid(
                "invalid_limit",
                format!("limit must be between 1 and {LIST_LEN_MAX}"),
            ));
        }
        let bad = || ServiceError::invalid("invalid_cursor", "cursor is not valid");
        let mut before: Option<(u64, String)> = match cursor {
            None => None,
            Some(c) => {
                let (at, id) = c.split_once('.').ok_or_else(bad)?;
                Some((at.parse().map_err(|_| bad())?, id.to_owned()))
            }
        };
        let mut out = Vec::new();
        loop {
            let page = self
                .core
                .store
                .list_rollouts(
                    before.as_ref().map(|(at, id)| (*at, id.as_str())),
                    LIST_LEN_MAX,
                )
                .await?;
            let more = page.len() == LIST_LEN_MAX;
            for r in page {
                before = Some((r.created_at_ms, r.id.clone()));
                if !visible(access, &r) {
                    continue;
                }
                let next = format!("{}.{}", r.created_at_ms, r.id);
                out.push(self.view_of(r).await?);
                if out.len() == limit {
                    return Ok((out, Some(next)));
                }
            }
            if !more {
                return Ok((out, None));
            }
        }
    }

    /// A rollout's event log, oldest first, after `after_seq`, at most `limit` (default and
    /// most [`EVENT_PAGE_LEN_MAX`]).
    pub async fn events(
        &self,
        access: &Access,
        id: &str,
        after_seq: u64,
        limit: Option<usize>,
    ) -> ServiceResult<Vec<RolloutEvent>> {
        self.record(access, id).await?;
        let limit = limit.unwrap_or(EVENT_PAGE_LEN_MAX);
        if limit == 0 || limit > EVENT_PAGE_LEN_MAX {
            return Err(ServiceError::invalid(
                "invalid_limit",
                format!("limit must be between 1 and {EVENT_PAGE_LEN_MAX}"),
            ));
        }
        Ok(self
            .core
            .store
            .list_rollout_events(id, after_seq, limit)
            .await?
            .into_iter()
            .map(|e| RolloutEvent {
                seq: e.seq,
                at: e.at_ms,
                by: e.by,
                kind: e.kind,
                detail: e.detail,
            })
            .collect())
    }

    /// Changes a rollout by compare-and-set ([`change_stored`]).
    async fn change(
        &self,
        id: &str,
        change: impl FnMut(&mut RolloutRecord) -> ServiceResult<()>,
    ) -> ServiceResult<RolloutRecord> {
        change_stored(&self.core.store, self.core.now_ms(), id, change).await
    }

    /// Pauses a running rollout: no device starts until it is resumed (those updating finish).
    pub async fn pause(
        &self,
        access: &Access,
        by: &str,
        id: &str,
        note: Option<String>,
    ) -> ServiceResult<Rollout> {
        self.record(access, id).await?;
        let note = clip(note);
        self.change(id, |r| match r.state.as_str() {
            "running" => {
                r.state = "paused".to_owned();
                r.reason = Some(format!("paused by {by}{}", note_suffix(&note)));
                Ok(())
            }
            "paused" => Ok(()),
            other => Err(over(id, other)),
        })
        .await?;
        self.log(id, by, "paused", note.unwrap_or_default()).await?;
        self.view(id).await
    }

    /// Resumes a paused rollout. A rollout the gate paused goes on to the next wave (the
    /// operator judged the comparison); one paused by hand goes on where it stood.
    pub async fn resume(
        &self,
        access: &Access,
        by: &str,
        id: &str,
        note: Option<String>,
    ) -> ServiceResult<Rollout> {
        self.record(access, id).await?;
        let note = clip(note);
        let mut detail = note.clone().unwrap_or_default();
        self.change(id, |r| match r.state.as_str() {
            "paused" => {
                let gate_failed = r
                    .reason
                    .as_deref()
                    .is_some_and(|x| x.starts_with("gate failed"));
                if gate_failed {
                    r.wave += 1;
                    r.window_started_at_ms = None;
                    detail = format!(
                        "past the failed gate to wave {}{}",
                        r.wave + 1,
                        note_suffix(&note)
                    );
                }
                r.state = "running".to_owned();
                r.reason = None;
                Ok(())
            }
            "running" => {
                // A gate that waits (too few devices or too little exposure to tell) is passed
                // by hand: the operator judged it.
                let waiting = r
                    .gate
                    .as_deref()
                    .and_then(|g| serde_json::from_str::<Gate>(g).ok())
                    .is_some_and(|g| g.wave == r.wave && g.verdict == "wait");
                if waiting && r.window_started_at_ms.is_some() {
                    r.wave += 1;
                    r.window_started_at_ms = None;
                    detail = format!(
                        "past the waiting gate to wave {}{}",
                        r.wave + 1,
                        note_suffix(&note)
                    );
                }
                Ok(())
            }
            other => Err(over(id, other)),
        })
        .await?;
        self.log(id, by, "resumed", detail).await?;
        self.view(id).await
    }

    /// Aborts a rollout: no device starts again, its deployment is canceled (updates not yet
    /// picked up are withdrawn, devices that started are told to stop before they install), and
    /// with `rollback` the devices that committed get the version they ran before.
    pub async fn abort(
        &self,
        access: &Access,
        by: &str,
        id: &str,
        note: Option<String>,
        rollback: bool,
    ) -> ServiceResult<Rollout> {
        self.record(access, id).await?;
        let note = clip(note);
        let reason = format!("aborted by {by}{}", note_suffix(&note));
        self.abort_as(id, by, reason, rollback).await?;
        self.view(id).await
    }

    /// Aborts `id` as `by` (the controller too): the state, the deployment's cancel, the event
    /// and, with `rollback`, the rollback rollouts.
    async fn abort_as(
        &self,
        id: &str,
        by: &str,
        reason: String,
        rollback: bool,
    ) -> ServiceResult<()> {
        let r = self
            .core
            .store
            .get_rollout(id)
            .await?
            .ok_or_else(|| not_found(id))?;
        if r.state == "completed" {
            return Err(over(id, &r.state));
        }
        // The deployment is canceled first: a stop right after leaves a canceled deployment,
        // which the controller turns into this abort at its next tick.
        let d = self.core.store.get_deployment(&r.deployment_id).await?;
        if d.is_some_and(|d| d.canceled_at_ms.is_none()) {
            self.ota.cancel(&Access::all(), &r.deployment_id).await?;
        }
        let mut was_over = false;
        let r = self
            .change(id, |r| match r.state.as_str() {
                "running" | "paused" => {
                    r.state = "aborted".to_owned();
                    r.reason = Some(reason.clone());
                    Ok(())
                }
                "aborted" => {
                    was_over = true;
                    Ok(())
                }
                other => Err(over(id, other)),
            })
            .await?;
        if !was_over {
            self.log(id, by, "aborted", reason).await?;
        }
        // An abort asked again with a rollback (after the threshold aborted it, or after a
        // stop cut a rollback short) rolls back what was not yet.
        if rollback && !self.has_rollback(id).await? {
            self.roll_back(&r, by).await?;
        }
        Ok(())
    }

    /// Whether a rollout rolling `id` back exists.
    async fn has_rollback(&self, id: &str) -> ServiceResult<bool> {
        let mut before: Option<(u64, String)> = None;
        loop {
            let page = self
                .core
                .store
                .list_rollouts(
                    before.as_ref().map(|(at, id)| (*at, id.as_str())),
                    LIST_LEN_MAX,
                )
                .await?;
            if page.iter().any(|r| r.rollback_of.as_deref() == Some(id)) {
                return Ok(true);
            }
            match page.last() {
                Some(last) if page.len() == LIST_LEN_MAX => {
                    before = Some((last.created_at_ms, last.id.clone()));
                }
                _ => return Ok(false),
            }
        }
    }

    /// Creates one rollout per version the committed devices ran before (when an artifact of
    /// that version exists), marked as rolling `r` back: one wave, no control cohort, no gate,
    /// downgrade allowed.
    async fn roll_back(&self, r: &RolloutRecord, by: &str) -> ServiceResult<()> {
        let mut by_version: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut after: Option<String> = None;
        loop {
            let page = self
                .core
                .store
                .list_rollout_devices(&r.id, after.as_deref(), PAGE_LEN)
                .await?;
            let Some(last) = page.last() else { break };
            after = Some(last.0.device_id.clone());
            for (d, state) in page {
                if state == Some(UpdateState::Committed) {
                    if let Some(v) = d.from_version {
                        by_version.entry(v).or_default().push(d.device_id);
                    }
                }
            }
        }
        for (version, devices) in by_version {
            let Some(artifact) = self.artifact_of_version(&version).await? else {
                self.log(
                    &r.id,
                    by,
                    "rollback_skipped",
                    format!(
                        "{} device(s) ran {version}: no artifact of that version",
                        devices.len()
                    ),
                )
                .await?;
                continue;
            };
            let req = CreateRollout {
                artifact_id: artifact.id.clone(),
                selector: r.selector.clone(),
                waves: Some(vec![100.0]),
                control_pct: Some(0.0),
                health_window_ms: Some(0),
                gate: Some(Vec::new()),
                // A rollback goes on whatever fails: stopping it would leave devices on the
                // version being rolled back.
                abort_failure_rate_pct: Some(100.0),
                allow_downgrade: true,
                ..Default::default()
            };
            let spec = req.spec().map_err(ServiceError::internal)?;
            let n = devices.len();
            let id = self
                .store_new(
                    NewRollout {
                        req: &req,
                        spec: &spec,
                        seed: rand::random(),
                        selector: r.selector.clone(),
                        artifact: &artifact,
                        devices,
                        rollback_of: Some(r.id.clone()),
                    },
                    by,
                )
                .await?;
            self.log(
                &r.id,
                by,
                "rollback_created",
                format!("{id}: {n} device(s) back to {version}"),
            )
            .await?;
        }
        Ok(())
    }

    async fn artifact_of_version(&self, version: &str) -> ServiceResult<Option<ArtifactRecord>> {
        let mut after: Option<String> = None;
        loop {
            let page = self
                .core
                .store
                .list_artifacts(PAGE_LEN, after.as_deref())
                .await?;
            let Some(last) = page.last() else {
                return Ok(None);
            };
            after = Some(last.id.clone());
            if let Some(a) = page
                .into_iter()
                .find(|a| a.version == version && a.state == ArtifactState::Ready)
            {
                return Ok(Some(a));
            }
        }
    }

    /// Adds the devices `selector` matches now (narrowed by the caller's scope and by the
    /// rollout's target) to a rollout that is not over: each takes its place in the random
    /// order (its wave, or the control cohort) as if it had been there from the start.
    pub async fn add_devices(
        &self,
        access: &Access,
        by: &str,
        id: &str,
        selector: &str,
    ) -> ServiceResult<Rollout> {
        let r = self.record(access, id).await?;
        if !matches!(r.state.as_str(), "running" | "paused") {
            return Err(over(id, &r.state));
        }
        let (_, spec) = spec_of(&r)?;
        if r.rollback_of.is_some() {
            return Err(ServiceError::new(
                ErrorKind::Conflict,
                "rollout_is_rollback",
                format!("rollout {id} rolls devices back; it takes no more devices"),
            ));
        }
        // Within the rollout's target (so its visibility and its scope hold for what is added)
        // and the caller's scope: devices provisioned since, or deleted and added again.
        let mut given = crate::commands::parse_selector(selector)?;
        let target = Selector::parse(&r.selector).map_err(ServiceError::internal)?;
        given.terms.extend(target.terms);
        let sel = access.narrow(Some(given.clone())).unwrap_or(given);
        let devices = self.select(&sel).await?;
        // Where each would have gone: the plan over the old and new devices together keeps
        // everyone's order (ranks do not depend on the others), so the new devices' waves are
        // read from one plan of them all.
        let mut all = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = self
                .core
                .store
                .list_rollout_devices(id, after.as_deref(), PAGE_LEN)
                .await?;
            let Some(last) = page.last() else { break };
            after = Some(last.0.device_id.clone());
            all.extend(page.into_iter().map(|(d, _)| d.device_id));
        }
        let known: std::collections::HashSet<&str> = all.iter().map(String::as_str).collect();
        let devices: Vec<String> = devices
            .into_iter()
            .filter(|d| !known.contains(d.as_str()))
            .collect();
        drop(known);
        if all.len() + devices.len() > ROLLOUT_DEVICES_MAX {
            return Err(ServiceError::invalid(
                "too_many_devices",
                format!("a rollout has at most {ROLLOUT_DEVICES_MAX} devices"),
            ));
        }
        all.extend(devices.iter().cloned());
        let a = plan::assign(&all, r.seed, &spec);
        let control_wave = spec.waves.len() as u32;
        let mut wave_of: HashMap<&str, u32> = a
            .control
            .iter()
            .map(|d| (d.as_str(), control_wave))
            .collect();
        for (w, ds) in a.waves.iter().enumerate() {
            wave_of.extend(ds.iter().map(|d| (d.as_str(), w as u32)));
        }
        let rows = devices
            .iter()
            .map(|d| RolloutDeviceRecord {
                rollout_id: id.to_owned(),
                device_id: d.clone(),
                wave: wave_of.get(d.as_str()).copied().unwrap_or(control_wave),
                rank: plan::rank(r.seed, d),
                started_at_ms: None,
                from_version: None,
                deferred: None,
                baseline: None,
            })
            .collect();
        let added = self.core.store.add_rollout_devices(id, rows).await?;
        self.log(
            id,
            by,
            "devices_added",
            format!("{added} device(s) matching {sel}"),
        )
        .await?;
        self.view(id).await
    }

    /// One controller pass over every running rollout (errors are logged per rollout; the next
    /// pass tries again). The number of rollouts it looked at.
    pub async fn tick(&self) -> usize {
        let mut after: Option<String> = None;
        let mut seen = 0;
        let mut active = std::collections::HashSet::new();
        loop {
            let page = match self
                .core
                .store
                .active_rollouts(after.as_deref(), PAGE_LEN)
                .await
            {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(error = %e, "listing rollouts failed; will retry");
                    return seen;
                }
            };
            let Some(last) = page.last() else {
                // Scan cursors of rollouts no longer active (over, or moved on elsewhere) go.
                mooring_proto::sync::lock(&self.scan).retain(|id, _| active.contains(id));
                return seen;
            };
            after = Some(last.id.clone());
            for r in page {
                seen += 1;
                active.insert(r.id.clone());
                if let Err(e) = self.advance(r.clone()).await {
                    tracing::warn!(rollout = %r.id, error = %e.message, "rollout step failed; will retry");
                }
            }
        }
    }

    /// What aborts a rollout whatever its state (running or paused): its deployment deleted or
    /// canceled, or failures above the threshold. `Some(progress)` if none did.
    async fn guard(
        &self,
        r: &RolloutRecord,
        spec: &RolloutSpec,
    ) -> ServiceResult<Option<(DeploymentRecord, Sums)>> {
        let reason = match self.core.store.get_deployment(&r.deployment_id).await? {
            None => "its deployment was deleted".to_owned(),
            // An operator's abort cancels the deployment first and then aborts the rollout
            // with its own reason; the grace keeps this tick from taking that abort over (and
            // its reason and author with it). Nothing starts meanwhile: the store starts no
            // device of a canceled deployment.
            Some(d)
                if d.canceled_at_ms.is_some_and(|at| {
                    self.core.now_ms() < at.saturating_add(CANCELED_ABORT_GRACE_MS)
                }) =>
            {
                return Ok(None);
            }
            Some(d) if d.canceled_at_ms.is_some() => "its deployment was canceled".to_owned(),
            Some(dep) => {
                let all = Sums::of(&self.core.store.rollout_progress(&r.id).await?);
                let broken = all.failed + all.rolled_back;
                if !plan::abort_due(spec, all.tried(), broken) {
                    return Ok(Some((dep, all)));
                }
                let reason = format!(
                    "{broken} of {} device(s) that tried failed or rolled back, above {}%",
                    all.tried(),
                    f64::from(spec.abort_failure_rate) / 100.0
                );
                self.abort_as(&r.id, BY_SERVER, reason, spec.auto_abort)
                    .await?;
                return Ok(None);
            }
        };
        self.abort_as(&r.id, BY_SERVER, reason, false).await?;
        Ok(None)
    }

    /// Moves one running rollout on (see the module's docs); a paused one is only guarded.
    async fn advance(&self, mut r: RolloutRecord) -> ServiceResult<()> {
        let (_, spec) = spec_of(&r)?;
        let Some((dep, all)) = self.guard(&r, &spec).await? else {
            return Ok(());
        };
        if r.state != "running" {
            return Ok(());
        }
        let control_wave = spec.waves.len() as u32;
        let k = r.wave.min(control_wave);
        let Some(artifact) = self.core.store.get_artifact(&r.artifact_id).await? else {
            return self
                .abort_as(
                    &r.id,
                    BY_SERVER,
                    "its artifact was deleted".to_owned(),
                    false,
                )
                .await;
        };
        self.start_devices(&r, &spec, &dep, &artifact, k, all.in_flight)
            .await?;
        let progress = self.core.store.rollout_progress(&r.id).await?;
        let upto = Sums::of(progress.iter().filter(|w| w.wave <= k));
        let drained = upto.in_flight == 0 && upto.waiting == upto.deferred;
        let now = self.core.now_ms();
        if k == control_wave {
            let all = Sums::of(&progress);
            if all.waiting == 0 && all.in_flight == 0 {
                // Compare-and-set on what this tick read: an abort or pause made meanwhile wins.
                r.state = "completed".to_owned();
                r.updated_at_ms = now;
                if !self.core.store.update_rollout(&r).await? {
                    return Ok(());
                }
                self.log(
                    &r.id,
                    BY_SERVER,
                    "completed",
                    format!(
                        "{} committed, {} failed, {} rolled back",
                        all.committed, all.failed, all.rolled_back
                    ),
                )
                .await?;
            }
            return Ok(());
        }
        // The window opens once the wave's devices have all ended (deferred ones aside); once
        // open it stays open: a deferred device that starts later has no baseline, so it is
        // left out of this gate's comparison and cannot hold the gate back.
        let Some(window_start) = r.window_started_at_ms else {
            if !drained {
                return Ok(());
            }
            self.set_baselines(&r, k, control_wave).await?;
            r.window_started_at_ms = Some(now);
            r.updated_at_ms = now;
            if self.core.store.update_rollout(&r).await? {
                self.log(
                    &r.id,
                    BY_SERVER,
                    "window_started",
                    format!(
                        "wave {} ended ({} committed so far); health window of {} s",
                        k + 1,
                        upto.committed,
                        spec.health_window_ms / 1000
                    ),
                )
                .await?;
            }
            return Ok(());
        };
        if now < window_start.saturating_add(spec.health_window_ms) {
            return Ok(());
        }
        let last_wait = r
            .gate
            .as_deref()
            .and_then(|g| serde_json::from_str::<Gate>(g).ok())
            .filter(|g| g.wave == k && g.verdict == "wait")
            .map(|g| g.checked_at);
        let recheck_ms = GATE_WAIT_RECHECK_MS.min(spec.health_window_ms.max(1_000));
        if last_wait.is_some_and(|at| now.saturating_sub(at) < recheck_ms) {
            return Ok(());
        }
        let gate = self.gate(&r, &spec, k, now).await?;
        let verdict = gate.verdict.clone();
        let before = r
            .gate
            .as_deref()
            .and_then(|g| serde_json::from_str::<Gate>(g).ok())
            .map(|g| (g.wave, g.verdict));
        r.gate = Some(serde_json::to_string(&gate).map_err(ServiceError::internal)?);
        r.updated_at_ms = now;
        let summary = gate_summary(&gate);
        match verdict.as_str() {
            "pass" => {
                r.wave = k + 1;
                r.window_started_at_ms = None;
                if self.core.store.update_rollout(&r).await? {
                    self.log(&r.id, BY_SERVER, "gate_passed", summary).await?;
                    let next = if r.wave == control_wave {
                        "the control cohort".to_owned()
                    } else {
                        format!("wave {}", r.wave + 1)
                    };
                    self.log(&r.id, BY_SERVER, "wave_started", next).await?;
                }
            }
            "fail" if spec.auto_abort => {
                if self.core.store.update_rollout(&r).await? {
                    self.log(&r.id, BY_SERVER, "gate_failed", summary.clone())
                        .await?;
                    self.abort_as(&r.id, BY_SERVER, format!("gate failed: {summary}"), true)
                        .await?;
                }
            }
            "fail" => {
                r.state = "paused".to_owned();
                r.reason = Some(format!("gate failed: {summary}"));
                if self.core.store.update_rollout(&r).await? {
                    self.log(&r.id, BY_SERVER, "gate_failed", summary).await?;
                }
            }
            _ => {
                if self.core.store.update_rollout(&r).await?
                    && before != Some((k, "wait".to_owned()))
                {
                    self.log(&r.id, BY_SERVER, "gate_waiting", summary).await?;
                }
            }
        }
        Ok(())
    }

    /// Starts what the throttle allows of the waiting devices of waves `<= k`, by rank, from
    /// where the last pass stopped; those whose preconditions fail are deferred.
    async fn start_devices(
        &self,
        r: &RolloutRecord,
        spec: &RolloutSpec,
        dep: &DeploymentRecord,
        artifact: &ArtifactRecord,
        k: u32,
        in_flight: u64,
    ) -> ServiceResult<()> {
        let now = self.core.now_ms();
        let last_minute = self
            .core
            .store
            .count_rollout_started_since(&r.id, now.saturating_sub(60_000))
            .await?;
        let mut budget = plan::may_start(spec, u64::MAX, in_flight, last_minute);
        if budget == 0 {
            return Ok(());
        }
        let mut after = mooring_proto::sync::lock(&self.scan).get(&r.id).cloned();
        let mut looked = 0;
        let mut wrapped = after.is_none();
        while budget > 0 && looked < SCAN_MAX {
            let page = self
                .core
                .store
                .waiting_rollout_devices(
                    &r.id,
                    k,
                    after.as_ref().map(|(rank, d)| (*rank, d.as_str())),
                    PAGE_LEN,
                )
                .await?;
            let Some(last) = page.last() else {
                if wrapped {
                    after = None;
                    break;
                }
                wrapped = true;
                after = None;
                continue;
            };
            after = Some((last.rank, last.device_id.clone()));
            looked += page.len();
            let views = self.views(&page).await?;
            let mut starts = Vec::new();
            let mut deferred = Vec::new();
            for d in &page {
                if budget == 0 {
                    after = Some((d.rank, d.device_id.clone()));
                    break;
                }
                match self.check(spec, views.get(&d.device_id), now).await {
                    Ok(version) => {
                        starts.push((d.device_id.clone(), version));
                        budget -= 1;
                    }
                    Err(why) => {
                        if d.deferred.as_deref() != Some(why.as_str()) {
                            deferred.push((d.device_id.clone(), why));
                        }
                    }
                }
            }
            if !deferred.is_empty() {
                self.core
                    .store
                    .defer_rollout_devices(&r.id, deferred)
                    .await?;
            }
            if !starts.is_empty() {
                let template = DeviceUpdateRecord {
                    deployment_id: dep.id.clone(),
                    device_id: String::new(),
                    artifact_id: artifact.id.clone(),
                    version: artifact.version.clone(),
                    command_id: None,
                    state: UpdateState::Pending,
                    reason: None,
                    progress_pct: None,
                    running_version: None,
                    seq: None,
                    updated_at_ms: now,
                };
                let started = self
                    .core
                    .store
                    .start_rollout_devices(&r.id, starts, template, now)
                    .await?;
                if !started.is_empty() {
                    self.ota
                        .send_updates(PendingSends::new(dep.clone(), artifact.clone(), started))
                        .await;
                }
            }
        }
        let mut scan = mooring_proto::sync::lock(&self.scan);
        match after {
            Some(a) => scan.insert(r.id.clone(), a),
            None => scan.remove(&r.id),
        };
        Ok(())
    }

    /// The devices of a page as the registry sees them (online, version, tags), by id.
    async fn views(
        &self,
        page: &[RolloutDeviceRecord],
    ) -> ServiceResult<HashMap<String, DeviceView>> {
        let ids: Vec<DeviceId> = page
            .iter()
            .filter_map(|d| DeviceId::parse(&d.device_id).ok())
            .collect();
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        let sel = Selector {
            terms: vec![Term::Ids(ids)],
        };
        let (views, _) = self
            .registry
            .select_devices(&sel, None, page.len() + 1)
            .await?;
        Ok(views
            .into_iter()
            .map(|v| (v.record.id.to_string(), v))
            .collect())
    }

    /// A device's preconditions now: `Ok(the version it runs)` to start it, or why it waits.
    async fn check(
        &self,
        spec: &RolloutSpec,
        view: Option<&DeviceView>,
        now: u64,
    ) -> Result<Option<String>, String> {
        let Some(view) = view else {
            return Err("not_found: the device is gone".to_owned());
        };
        if !view.online {
            return Err("offline: not connected".to_owned());
        }
        if let Some(w) = &spec.window {
            let tz = view.record.tags.get("tz").map(String::as_str);
            let minute = local_minute(now, tz).map_err(|e| format!("bad_time_zone: {e}"))?;
            if !w.contains(minute) {
                return Err(format!(
                    "{}: {w} local, now {:02}:{:02}",
                    mooring_proto::ota::reason::OUTSIDE_WINDOW,
                    minute / 60,
                    minute % 60
                ));
            }
        }
        if !spec.require.is_empty() {
            let latest = self
                .core
                .store
                .latest(view.record.id.as_str())
                .await
                .map_err(|e| format!("store: {e}"))?;
            for req in &spec.require {
                let metric = if req.metric == "battery" {
                    self.core.config.health.battery_metric.as_str()
                } else {
                    req.metric.as_str()
                };
                let value = latest.get(metric).and_then(|(_, v)| match v {
                    mooring_store::MetricValue::Number(n) => Some(*n),
                    _ => None,
                });
                match value {
                    None => return Err(format!("precondition: no {metric} value yet ({req})")),
                    Some(v) if !req.cmp.holds(v, req.level) => {
                        return Err(format!("precondition: {metric} is {v}, needs {req}"))
                    }
                    Some(_) => {}
                }
            }
        }
        Ok(view.version.clone())
    }

    /// A device's mean of `metric` (`battery`: the fleet's battery metric) over
    /// `[from_ms, to_ms)`, of its first [`METRIC_GATE_POINTS_MAX`] numeric points, and how many
    /// points that was; `None` without any.
    async fn metric_mean(
        &self,
        device: &str,
        metric: &str,
        from_ms: u64,
        to_ms: u64,
    ) -> ServiceResult<Option<(f64, u64)>> {
        let Ok(device_id) = DeviceId::parse(device) else {
            return Ok(None);
        };
        let metric = if metric == "battery" {
            self.core.config.health.battery_metric.clone()
        } else {
            metric.to_owned()
        };
        let points = self
            .core
            .store
            .query(mooring_store::TelemetryQuery {
                device_id,
                metric: Some(metric),
                from_ms: Some(from_ms),
                to_ms: Some(to_ms),
                limit: METRIC_GATE_POINTS_MAX,
            })
            .await?;
        let (sum, n) = points
            .iter()
            .filter_map(|p| match p.value {
                mooring_store::MetricValue::Number(v) => Some(v),
                mooring_store::MetricValue::Bool(_) => None,
            })
            .fold((0.0, 0u64), |(s, n), v| (s + v, n + 1));
        // A device whose values overflow their sum says nothing usable: left out.
        Ok((n > 0 && sum.is_finite()).then(|| (sum / n as f64, n)))
    }

    /// The compared devices of a page of the rollout's devices (see [`compared`]) with their
    /// health now; `with_baseline`: only those that have a baseline.
    async fn sample_page(
        &self,
        page: &[(RolloutDeviceRecord, Option<UpdateState>)],
        k: u32,
        control_wave: u32,
        with_baseline: bool,
        now: u64,
    ) -> ServiceResult<Vec<(RolloutDeviceRecord, HealthSample)>> {
        let chosen: Vec<&RolloutDeviceRecord> = page
            .iter()
            .filter(|(d, state)| {
                compared(d, *state, k, control_wave) && (!with_baseline || d.baseline.is_some())
            })
            .map(|(d, _)| d)
            .collect();
        let ids: Vec<String> = chosen.iter().map(|d| d.device_id.clone()).collect();
        let health: HashMap<String, mooring_store::health::DeviceHealth> = self
            .core
            .store
            .get_device_health(&ids)
            .await?
            .into_iter()
            .collect();
        Ok(chosen
            .into_iter()
            .map(|d| {
                let sample = health
                    .get(&d.device_id)
                    .map(|h| HealthSample::of(h, now))
                    .unwrap_or_default();
                (d.clone(), sample)
            })
            .collect())
    }

    /// Records every compared device's health now as its baseline: the updated devices of
    /// waves `<= k` that committed, and the control cohort.
    async fn set_baselines(
        &self,
        r: &RolloutRecord,
        k: u32,
        control_wave: u32,
    ) -> ServiceResult<()> {
        if let Err(e) = self.health.tracker().flush().await {
            tracing::warn!(error = %e, "health flush before a rollout baseline failed");
        }
        let now = self.core.now_ms();
        let mut after: Option<String> = None;
        loop {
            let page = self
                .core
                .store
                .list_rollout_devices(&r.id, after.as_deref(), mooring_store::HEALTH_BATCH_LEN_MAX)
                .await?;
            let Some(last) = page.last() else { break };
            after = Some(last.0.device_id.clone());
            let baselines = self
                .sample_page(&page, k, control_wave, false, now)
                .await?
                .into_iter()
                .map(|(d, sample)| (d.device_id, serde_json::to_string(&sample).ok()))
                .collect();
            self.core
                .store
                .set_rollout_baselines(&r.id, baselines)
                .await?;
        }
        Ok(())
    }

    /// The gate after wave `k`: each gate signal's events since the baselines per hour online
    /// since then, updated devices against the control cohort, over the same window. A device
    /// not online at all in the window is not counted.
    async fn gate(
        &self,
        r: &RolloutRecord,
        spec: &RolloutSpec,
        k: u32,
        now: u64,
    ) -> ServiceResult<Gate> {
        if let Err(e) = self.health.tracker().flush().await {
            tracing::warn!(error = %e, "health flush before a rollout gate failed");
        }
        let control_wave = spec.waves.len() as u32;
        let zero = plan::Counts {
            devices: 0,
            events: 0,
            exposure: 0.0,
        };
        let mut updated = vec![zero; spec.gate.len()];
        let mut control = updated.clone();
        let mut metrics = vec![plan::MetricValues::default(); spec.gate_metrics.len()];
        // Telemetry reads per side (updated, control) and metric.
        let mut metric_reads = [
            vec![0usize; spec.gate_metrics.len()],
            vec![0usize; spec.gate_metrics.len()],
        ];
        let window_start = r
            .window_started_at_ms
            .unwrap_or_else(|| now.saturating_sub(spec.health_window_ms));
        let mut control_seen = 0u64;
        let mut after: Option<String> = None;
        loop {
            let page = self
                .core
                .store
                .list_rollout_devices(&r.id, after.as_deref(), mooring_store::HEALTH_BATCH_LEN_MAX)
                .await?;
            let Some(last) = page.last() else { break };
            after = Some(last.0.device_id.clone());
            for (d, current) in self.sample_page(&page, k, control_wave, true, now).await? {
                let base: HealthSample = d
                    .baseline
                    .as_deref()
                    .and_then(|b| serde_json::from_str(b).ok())
                    .unwrap_or_default();
                let hours = current.online_ms.saturating_sub(base.online_ms) as f64 / 3_600_000.0;
                if hours <= 0.0 {
                    continue;
                }
                let in_control = d.wave == control_wave;
                control_seen += u64::from(in_control);
                let side = if in_control {
                    &mut control
                } else {
                    &mut updated
                };
                for (i, signal) in spec.gate.iter().enumerate() {
                    let c = crate::health::count_of(&current.counts, signal).unwrap_or(0);
                    let b = crate::health::count_of(&base.counts, signal).unwrap_or(0);
                    side[i].devices += 1;
                    side[i].events += c.saturating_sub(b);
                    side[i].exposure += hours;
                }
                for (i, m) in spec.gate_metrics.iter().enumerate() {
                    let values = &mut metrics[i];
                    let (means, points) = if in_control {
                        (&mut values.control, &mut values.control_points)
                    } else {
                        (&mut values.updated, &mut values.updated_points)
                    };
                    // Bounded in reads too: a metric few devices send (or a typo) costs at
                    // most twice the sample's reads a side.
                    let asked = &mut metric_reads[usize::from(in_control)][i];
                    if means.len() >= METRIC_GATE_DEVICES_MAX
                        || *asked >= 2 * METRIC_GATE_DEVICES_MAX
                    {
                        continue;
                    }
                    *asked += 1;
                    if let Some((mean, n)) = self
                        .metric_mean(&d.device_id, &m.metric, window_start, now)
                        .await?
                    {
                        means.push(mean);
                        *points += n;
                    }
                }
            }
        }
        if control_seen == 0 && gates(spec) {
            let in_control = self
                .core
                .store
                .rollout_progress(&r.id)
                .await?
                .iter()
                .find(|w| w.wave == spec.waves.len() as u32)
                .map_or(0, |w| w.total);
            if in_control == 0 {
                // No control cohort at all (`control_pct` 0, or a target too small for it):
                // there is nothing to compare with, so the gate compares nothing; the abort
                // threshold still stops a version that fails on the devices.
                return Ok(Gate {
                    wave: k,
                    verdict: "pass".to_owned(),
                    checked_at: now,
                    margin: GATE_MARGIN,
                    alpha: GATE_ALPHA,
                    signals: Vec::new(),
                });
            }
        }
        let config = mooring_health::Config {
            fdr_q: GATE_ALPHA,
            devices_min: spec.min_devices.max(1),
            exposure_min: 0.0,
            rate_ratio_min: GATE_MARGIN,
        };
        let signals: Vec<(
            String,
            mooring_health::SignalKind,
            plan::Counts,
            plan::Counts,
        )> = spec
            .gate
            .iter()
            .enumerate()
            .map(|(i, s)| {
                (
                    (*s).to_owned(),
                    mooring_health::SignalKind::Rate,
                    updated[i],
                    control[i],
                )
            })
            .collect();
        let metrics: Vec<(String, mooring_api::Worse, plan::MetricValues)> = spec
            .gate_metrics
            .iter()
            .zip(metrics)
            .map(|(m, v)| (m.to_string(), m.worse, v))
            .collect();
        let (verdict, results) = plan::gate(&signals, &metrics, &config);
        let counts = |c: &plan::Counts, rate: Option<f64>, mean: Option<f64>| GateCounts {
            devices: c.devices,
            events: c.events,
            hours: c.exposure,
            rate,
            mean,
        };
        Ok(Gate {
            wave: k,
            verdict: match verdict {
                plan::GateVerdict::Pass => "pass",
                plan::GateVerdict::Fail => "fail",
                plan::GateVerdict::Wait => "wait",
            }
            .to_owned(),
            checked_at: now,
            margin: GATE_MARGIN,
            alpha: GATE_ALPHA,
            signals: results
                .into_iter()
                .map(|s| {
                    let (verdict, reason) = match s.verdict {
                        plan::SignalVerdict::Pass => ("pass", None),
                        plan::SignalVerdict::Fail => ("fail", None),
                        plan::SignalVerdict::Unclear(why) => ("unclear", Some(why)),
                    };
                    GateSignal {
                        kind: if s.metric { "metric" } else { "rate" }.to_owned(),
                        updated: counts(&s.updated, s.updated_rate, s.means.map(|m| m.0)),
                        control: counts(&s.control, s.control_rate, s.means.map(|m| m.1)),
                        signal: s.signal,
                        ratio: s.ratio,
                        p_value: s.p_value,
                        effect: s.effect,
                        verdict: verdict.to_owned(),
                        reason,
                    }
                })
                .collect(),
        })
    }
}

/// Whether a rollout's gate compares anything (a health signal or a metric).
fn gates(spec: &RolloutSpec) -> bool {
    !spec.gate.is_empty() || !spec.gate_metrics.is_empty()
}

/// Whether a device is compared at the gate after wave `k`: an updated device of waves `<= k`
/// that committed, or a device of the control cohort (wave `control_wave`, never started
/// before the end).
fn compared(
    d: &RolloutDeviceRecord,
    state: Option<UpdateState>,
    k: u32,
    control_wave: u32,
) -> bool {
    (d.wave <= k && state == Some(UpdateState::Committed))
        || (d.wave == control_wave && d.started_at_ms.is_none())
}

/// One line of a gate's comparison: `disconnects 2.1× control (p<0.001) fail; crashes ...`.
/// A metric gate's line: `battery.v:down mean 3.55 on 40 updated device(s) vs 3.70 on 40 in
/// control (r=-1.00, p<0.001): fail`; `None` for a rate signal.
fn metric_summary(s: &GateSignal, p: &str, why: &str) -> Option<String> {
    if s.kind != "metric" {
        return None;
    }
    let mean = |m: Option<f64>| m.map_or_else(|| "-".to_owned(), |m| format!("{m:.3}"));
    let shift = s
        .effect
        .map_or_else(|| "not compared".to_owned(), |e| format!("r={e:+.2}"));
    Some(format!(
        "{} mean {} on {} updated device(s) vs {} on {} in control ({shift}{p}): {}{why}",
        s.signal,
        mean(s.updated.mean),
        s.updated.devices,
        mean(s.control.mean),
        s.control.devices,
        s.verdict
    ))
}

fn gate_summary(g: &Gate) -> String {
    let lines: Vec<String> = g
        .signals
        .iter()
        .map(|s| {
            let ratio = match s.ratio {
                Some(r) => format!("{r:.2}×"),
                None if s.updated.events > 0 => "∞×".to_owned(),
                None => "1.00×".to_owned(),
            };
            let p = match s.p_value {
                Some(p) if p < 0.001 => ", p<0.001".to_owned(),
                Some(p) => format!(", p={p:.3}"),
                None => String::new(),
            };
            let why = s
                .reason
                .as_deref()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default();
            if let Some(line) = metric_summary(s, &p, &why) {
                return line;
            }
            format!(
                "{} {} on {} updated device(s) vs {} on {} in control ({ratio} the control's rate{p}): {}{why}",
                s.signal,
                s.updated.events,
                s.updated.devices,
                s.control.events,
                s.control.devices,
                s.verdict
            )
        })
        .collect();
    if lines.is_empty() {
        format!(
            "wave {}: nothing compared (no gate signals or no control cohort)",
            g.wave + 1
        )
    } else {
        format!("wave {}: {}", g.wave + 1, lines.join("; "))
    }
}

fn clip(note: Option<String>) -> Option<String> {
    note.map(|mut n| {
        n.truncate(n.floor_char_boundary(REASON_LEN_MAX));
        n
    })
    .filter(|n| !n.trim().is_empty())
}

fn note_suffix(note: &Option<String>) -> String {
    note.as_deref()
        .map(|n| format!(": {n}"))
        .unwrap_or_default()
}

fn over(id: &str, state: &str) -> ServiceError {
    ServiceError::new(
        ErrorKind::Conflict,
        "rollout_over",
        format!("rollout {id} is {state}"),
    )
}

/// The API's view of a rollout.
fn to_api(r: RolloutRecord, progress: &[WaveProgress], version: String) -> Rollout {
    let (req, spec) = spec_of(&r).unwrap_or_else(|_| {
        // Unreadable (never written so): shown with one wave and nothing else.
        let spec = RolloutSpec {
            waves: vec![BP_ALL],
            control: 0,
            max_per_minute: None,
            max_concurrent: None,
            abort_failure_rate: 0,
            min_devices: 0,
            health_window_ms: 0,
            gate: Vec::new(),
            gate_metrics: Vec::new(),
            require: Vec::new(),
            window: None,
            auto_abort: false,
        };
        (CreateRollout::default(), spec)
    });
    let control_wave = spec.waves.len() as u32;
    let mut waves: Vec<RolloutWave> = (0..=control_wave)
        .map(|w| RolloutWave {
            wave: w,
            pct: spec.waves.get(w as usize).map(|bp| f64::from(*bp) / 100.0),
            control: w == control_wave,
            ..Default::default()
        })
        .collect();
    for p in progress {
        if let Some(w) = waves.get_mut(p.wave as usize) {
            w.total = p.total;
            w.waiting = p.waiting;
            w.deferred = p.deferred;
            w.states = p.states.clone();
        }
    }
    let s = Sums::of(progress);
    let gate = r.gate.as_deref().and_then(|g| serde_json::from_str(g).ok());
    Rollout {
        window_ends_at: r
            .window_started_at_ms
            .map(|w| w.saturating_add(spec.health_window_ms)),
        window_started_at: r.window_started_at_ms,
        id: r.id,
        artifact_id: r.artifact_id,
        version,
        deployment_id: r.deployment_id,
        selector: r.selector,
        state: r.state,
        reason: r.reason,
        wave: r.wave,
        waves,
        total: s.total,
        committed: s.committed,
        failed: s.failed,
        rolled_back: s.rolled_back,
        in_flight: s.in_flight,
        waiting: s.waiting,
        deferred: s.deferred,
        gate,
        spec: req,
        seed: r.seed,
        rollback_of: r.rollback_of,
        created_by: r.created_by,
        created_at: r.created_at_ms,
        updated_at: r.updated_at_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::local_minute;

    #[test]
    fn local_minutes_follow_the_tz_tag() {
        // 2026-01-01T13:05:00Z
        let now = 1_767_272_700_000;
        assert_eq!(local_minute(now, None), Ok(13 * 60 + 5));
        assert_eq!(local_minute(now, Some("UTC")), Ok(13 * 60 + 5));
        assert_eq!(local_minute(now, Some("+02:00")), Ok(15 * 60 + 5));
        assert_eq!(local_minute(now, Some("-0530")), Ok(7 * 60 + 35));
        assert_eq!(local_minute(now, Some("+11:00")), Ok(5));
        assert_eq!(
            local_minute(now, Some("Europe/Berlin")),
            Ok(14 * 60 + 5),
            "CET in winter"
        );
        assert_eq!(local_minute(now, Some("America/New_York")), Ok(8 * 60 + 5));
        assert!(local_minute(now, Some("Mars/Olympus")).is_err());
        assert!(local_minute(now, Some("+25:00")).is_err());
        assert!(local_minute(now, Some("+2")).is_err());
    }
}
