//! Playbooks and field-service tickets (issue 18, docs/health.md#playbooks).
//!
//! A `[[playbook]]` in the config names the alert kinds it runs on (`cohort:<signal>` for the
//! cohort sweeper's alerts, `rule:<rule name>` for a rule's) and its steps. When such an alert
//! is raised (new, not counted again), the playbook is queued on the work queue (action
//! `playbook`, creator `playbook:<name>`): durable, retried with backoff, `dead` after
//! `[jobs] attempts_max`. A rule's `job:<playbook>` action queues it for the device the rule
//! fired for. One run, in one turn:
//!
//! 1. the devices: a cohort alert's are the cohort's devices the signal shows on (a count in
//!    the last 24 hours above 0, a battery below `[health] battery_low_level`), worst first, at
//!    most `devices_max`; a rule's, its device;
//! 2. the steps in order: `diagnostics` sends the `diagnostics` command to the first `sample`
//!    of them (idempotency key: the job id, so a retried run sends nothing twice),
//!    `tag:KEY=VALUE` tags them;
//! 3. `ticket` (always last, so it records what the other steps did) opens a ticket listing
//!    the devices with their site (`site_tag`), tags, installation record and the parts the
//!    `[[part]]` table suggests from their latest telemetry and health signals. Its id comes
//!    from the job's, so a retried run opens one ticket.
//!
//! `pause_rollouts` pauses the running rollouts that hold any of the devices (rollbacks
//! aside; `crate::rollouts::pause_touching`), as `playbook:<name>`.

use crate::access::Access;
use crate::error::{ErrorKind, ServiceError, ServiceResult};
use crate::registry::Registry;
use mooring_proto::DeviceId;
use mooring_store::{Store, TicketCreate, TicketFilter, TicketRecord};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The job action of a playbook run.
pub const PLAYBOOK_ACTION: &str = "playbook";
/// `created_by` of a run an alert started: `playbook:<name>`.
pub const PLAYBOOK_CREATOR_PREFIX: &str = "playbook:";
/// `[[playbook]]` entries at most.
pub const PLAYBOOKS_MAX: usize = 32;
/// `[[part]]` entries at most.
pub const PARTS_MAX: usize = 64;
/// Steps of one playbook at most.
pub const STEPS_MAX: usize = 16;
/// A playbook's `sample` at most.
pub const SAMPLE_MAX: usize = 100;
/// A playbook's `devices_max` at most.
pub const DEVICES_MAX_LIMIT: usize = 2_000;
/// Open tickets per playbook at most; a run past it opens none (counted in
/// `mooring_tickets_total{outcome="refused"}` and logged), so a storm of one rule's alerts
/// cannot starve another playbook's tickets.
pub const TICKETS_OPEN_MAX: usize = 1_000;
/// Closed tickets kept at most, and for how long.
pub const TICKETS_KEPT_MAX: usize = 10_000;
pub const TICKETS_KEPT_MS: u64 = 90 * 86_400_000;
/// A page of `GET /api/v1/tickets`.
pub const TICKET_PAGE_LEN_DEFAULT: usize = 20;
pub const TICKET_PAGE_LEN_MAX: usize = 100;
/// Store pages one list request reads at most for a scoped caller.
const TICKET_PAGES_READ_MAX: usize = 10;
/// Devices tagged per registry call.
const TAG_BATCH_LEN: usize = 500;

/// `[[playbook]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlaybookConfig {
    /// Letters, digits, `.`, `_`, `-` (at most 64); rules run it with `job:<name>`.
    pub name: String,
    /// The alert kinds it runs on: `cohort:<signal>` (e.g. `cohort:disconnects`,
    /// `cohort:battery_low`), `rule:<rule name>`.
    #[serde(default)]
    pub on: Vec<String>,
    /// In order: `diagnostics`, `tag:KEY=VALUE`, `ticket`.
    pub steps: Vec<String>,
    /// Devices the `diagnostics` step asks (default 10, at most 100).
    #[serde(default = "default_sample")]
    pub sample: usize,
    /// Devices a run acts on and its ticket lists at most (default 200, at most 2000).
    #[serde(default = "default_devices_max")]
    pub devices_max: usize,
    /// The tag a ticket shows as each device's site (default `site`).
    #[serde(default = "default_site_tag")]
    pub site_tag: String,
}

fn default_sample() -> usize {
    10
}

fn default_devices_max() -> usize {
    200
}

fn default_site_tag() -> String {
    "site".to_owned()
}

/// `[[part]]`: a part a ticket suggests for a device whose `metric` (its latest telemetry
/// value) or health `signal` is `below` or `above` a level.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartConfig {
    /// E.g. `wireless repeater`.
    pub part: String,
    #[serde(default)]
    pub metric: Option<String>,
    /// `battery`, `reconnects_per_hour`, or a count (`disconnects`, `crashes`, ...; the last
    /// 24 hours).
    #[serde(default)]
    pub signal: Option<String>,
    #[serde(default)]
    pub below: Option<f64>,
    #[serde(default)]
    pub above: Option<f64>,
}

impl PartConfig {
    fn suggested_by(&self, v: f64) -> bool {
        self.below.is_some_and(|b| v < b) || self.above.is_some_and(|a| v > a)
    }
}

/// One step of a playbook.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    Diagnostics,
    Tag(String, String),
    PauseRollouts,
    Ticket,
}

fn parse_step(s: &str) -> Result<Step, String> {
    match s {
        "diagnostics" => Ok(Step::Diagnostics),
        "ticket" => Ok(Step::Ticket),
        "pause_rollouts" => Ok(Step::PauseRollouts),
        other => match other.strip_prefix("tag:").and_then(|kv| kv.split_once('=')) {
            Some((k, v)) => {
                let tags = [(k.to_owned(), v.to_owned())].into_iter().collect();
                crate::registry::validate_tags(&tags).map_err(|e| e.message)?;
                Ok(Step::Tag(k.to_owned(), v.to_owned()))
            }
            None => Err(format!(
                "unknown step {other:?} (expected diagnostics, tag:KEY=VALUE, pause_rollouts or ticket)"
            )),
        },
    }
}

/// Checks `[[playbook]]` and `[[part]]` entries.
pub fn validate(playbooks: &[PlaybookConfig], parts: &[PartConfig]) -> anyhow::Result<()> {
    anyhow::ensure!(
        playbooks.len() <= PLAYBOOKS_MAX,
        "at most {PLAYBOOKS_MAX} [[playbook]] entries"
    );
    anyhow::ensure!(
        parts.len() <= PARTS_MAX,
        "at most {PARTS_MAX} [[part]] entries"
    );
    let mut names = std::collections::BTreeSet::new();
    for p in playbooks {
        anyhow::ensure!(
            crate::webhooks::is_valid_name(&p.name),
            "[[playbook]] name {:?}: letters, digits, '.', '_', '-' (at most 64)",
            p.name
        );
        anyhow::ensure!(
            names.insert(p.name.as_str()),
            "[[playbook]] name {:?} is used twice",
            p.name
        );
        for on in &p.on {
            let ok = match on.split_once(':') {
                Some(("cohort", signal)) => {
                    mooring_api::HEALTH_TESTED_SIGNALS.contains(&signal)
                        || signal == mooring_api::HEALTH_BATTERY_SIGNAL
                }
                Some(("rule", name)) => crate::webhooks::is_valid_name(name),
                _ => false,
            };
            anyhow::ensure!(
                ok,
                "[[playbook]] {}: on {on:?}: expected cohort:<signal> (one of {}, {}) or rule:<rule name>",
                p.name,
                mooring_api::HEALTH_TESTED_SIGNALS.join(", "),
                mooring_api::HEALTH_BATTERY_SIGNAL
            );
        }
        anyhow::ensure!(
            !p.steps.is_empty() && p.steps.len() <= STEPS_MAX,
            "[[playbook]] {}: steps: 1 to {STEPS_MAX}",
            p.name
        );
        for s in &p.steps {
            parse_step(s).map_err(|e| anyhow::anyhow!("[[playbook]] {}: steps: {e}", p.name))?;
        }
        anyhow::ensure!(
            (1..=SAMPLE_MAX).contains(&p.sample),
            "[[playbook]] {}: sample must be between 1 and {SAMPLE_MAX}",
            p.name
        );
        anyhow::ensure!(
            (1..=DEVICES_MAX_LIMIT).contains(&p.devices_max),
            "[[playbook]] {}: devices_max must be between 1 and {DEVICES_MAX_LIMIT}",
            p.name
        );
        anyhow::ensure!(
            !p.site_tag.is_empty(),
            "[[playbook]] {}: site_tag is empty",
            p.name
        );
    }
    for part in parts {
        let what = format!("[[part]] {:?}", part.part);
        anyhow::ensure!(
            !part.part.trim().is_empty() && part.part.len() <= 128,
            "{what}: part must be 1 to 128 characters"
        );
        match (&part.metric, &part.signal) {
            (Some(m), None) => anyhow::ensure!(
                !m.is_empty() && m.len() <= mooring_proto::telemetry::METRIC_NAME_LEN_MAX,
                "{what}: metric {m:?} is not a metric name"
            ),
            (None, Some(s)) => anyhow::ensure!(
                crate::health::is_known_signal(s),
                "{what}: signal {s:?}: expected battery, reconnects_per_hour or a count (disconnects, telemetry_gaps, crashes, ...)"
            ),
            _ => anyhow::bail!("{what}: give exactly one of metric or signal"),
        }
        anyhow::ensure!(
            part.below.is_some() != part.above.is_some(),
            "{what}: give exactly one of below or above"
        );
        anyhow::ensure!(
            part.below.or(part.above).is_some_and(f64::is_finite),
            "{what}: the level must be a finite number"
        );
    }
    Ok(())
}

/// What a run acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A cohort alert's cohort: its grouping, label and signal.
    Cohort {
        group_by: String,
        cohort: String,
        signal: String,
    },
    /// One device (a rule's alert or `job:` action).
    Device(String),
}

/// One playbook run, as stored with its job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlaybookRun {
    pub playbook: String,
    /// The alert that started it (`None`: a rule's `job:` action).
    pub alert_id: Option<String>,
    pub title: String,
    pub target: Target,
}

impl PlaybookRun {
    pub fn params(&self) -> Value {
        let target = match &self.target {
            Target::Cohort {
                group_by,
                cohort,
                signal,
            } => json!({"group_by": group_by, "cohort": cohort, "signal": signal}),
            Target::Device(d) => json!({"device": d}),
        };
        json!({"playbook": self.playbook, "alert_id": self.alert_id, "title": self.title, "target": target})
    }

    pub fn from_params(v: &Value) -> Result<Self, String> {
        let s = |v: &Value, k: &str| {
            v[k].as_str()
                .map(str::to_owned)
                .ok_or_else(|| format!("no {k}"))
        };
        let t = &v["target"];
        let target = match t["device"].as_str() {
            Some(d) => Target::Device(d.to_owned()),
            None => Target::Cohort {
                group_by: s(t, "group_by")?,
                cohort: s(t, "cohort")?,
                signal: s(t, "signal")?,
            },
        };
        Ok(PlaybookRun {
            playbook: s(v, "playbook")?,
            alert_id: v["alert_id"].as_str().map(str::to_owned),
            title: s(v, "title")?,
            target,
        })
    }
}

/// Runs and tickets by outcome, for `/metrics`.
#[derive(Default)]
pub struct PlaybookCounters {
    pub succeeded: AtomicU64,
    pub failed: AtomicU64,
    /// Not queued: the creator had 1,000 unfinished.
    pub dropped: AtomicU64,
    pub tickets_opened: AtomicU64,
    /// Not opened: [`TICKETS_OPEN_MAX`] tickets were open.
    pub tickets_refused: AtomicU64,
}

/// The playbooks (their config) and the tickets they open.
pub struct Playbooks {
    store: Arc<dyn Store>,
    clock: Arc<dyn mooring_proto::Clock>,
    registry: Arc<Registry>,
    playbooks: Vec<PlaybookConfig>,
    parts: Vec<PartConfig>,
    pub counters: PlaybookCounters,
}

/// What a ticket stores beyond its columns (`mooring_api::Ticket`'s other fields).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
struct TicketBody {
    signal: Option<String>,
    cohort: Option<String>,
    devices_total: u64,
    devices_affected: u64,
    devices: Vec<mooring_api::TicketDevice>,
    parts: BTreeMap<String, u64>,
    steps: Vec<String>,
}

fn ticket_not_found(id: &str) -> ServiceError {
    ServiceError::new(
        ErrorKind::NotFound,
        "ticket_not_found",
        format!("no ticket {id}"),
    )
}

/// A ticket's JSON from its record.
fn ticket_view(t: &TicketRecord) -> mooring_api::Ticket {
    let body: TicketBody = serde_json::from_str(&t.body).unwrap_or_else(|e| {
        tracing::warn!(ticket = %t.id, error = %e, "a stored ticket body does not parse");
        TicketBody::default()
    });
    mooring_api::Ticket {
        id: t.id.clone(),
        playbook: t.playbook.clone(),
        alert_id: (!t.alert_id.is_empty()).then(|| t.alert_id.clone()),
        title: t.title.clone(),
        state: if t.open { "open" } else { "closed" }.to_owned(),
        created_at: t.created_at_ms,
        closed_at: t.closed_at_ms,
        closed_by: t.closed_by.clone(),
        signal: body.signal,
        cohort: body.cohort,
        devices_total: body.devices_total,
        devices_affected: body.devices_affected,
        devices: body.devices,
        parts: body.parts,
        steps: body.steps,
    }
}

/// What [`Playbooks::run`] needs from the services the jobs runner holds.
pub(crate) struct RunContext<'a> {
    pub health: &'a crate::health::Health,
    pub commands: &'a crate::commands::Commands,
    pub access: &'a Access,
    pub job_id: &'a str,
    pub now_ms: u64,
}

impl Playbooks {
    pub(crate) fn new(
        store: Arc<dyn Store>,
        clock: Arc<dyn mooring_proto::Clock>,
        registry: Arc<Registry>,
        playbooks: Vec<PlaybookConfig>,
        parts: Vec<PartConfig>,
    ) -> Self {
        Playbooks {
            store,
            clock,
            registry,
            playbooks,
            parts,
            counters: PlaybookCounters::default(),
        }
    }

    /// Whether a `[[playbook]]` is named `name` (a rule's `job:` action).
    pub fn has(&self, name: &str) -> bool {
        self.playbooks.iter().any(|p| p.name == name)
    }

    /// The playbooks that run on alert kind `kind` (`cohort:<signal>`, `rule:<name>`).
    pub fn on_kind<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.playbooks
            .iter()
            .filter(move |p| p.on.iter().any(|o| o == kind))
            .map(|p| p.name.as_str())
    }

    /// One run (see the module docs); returns what it did.
    pub(crate) async fn run(
        &self,
        ctx: RunContext<'_>,
        run: &PlaybookRun,
    ) -> ServiceResult<String> {
        let Some(pb) = self.playbooks.iter().find(|p| p.name == run.playbook) else {
            return Err(ServiceError::invalid(
                "unknown_playbook",
                format!(
                    "no [[playbook]] named {:?} in the config any more",
                    run.playbook
                ),
            ));
        };
        let steps: Vec<Step> = pb
            .steps
            .iter()
            .map(|s| parse_step(s).map_err(|e| ServiceError::invalid("invalid_playbook", e)))
            .collect::<ServiceResult<_>>()?;
        // The devices, worst first.
        let (total, affected, mut listed, signal, cohort) = match &run.target {
            Target::Cohort {
                group_by,
                cohort,
                signal,
            } => {
                let members = ctx.health.cohort_members(group_by, cohort, signal).await?;
                let total = members.len() as u64;
                let mut hit: Vec<_> = members.iter().filter(|m| m.affected).cloned().collect();
                let affected = hit.len() as u64;
                if hit.is_empty() {
                    hit = members;
                }
                // A battery is worse lower; a count, higher. Ties by id, so a retry picks the same.
                let low_is_worse = signal == mooring_api::HEALTH_BATTERY_SIGNAL;
                hit.sort_by(|a, b| {
                    // A device with no value is the least worse.
                    let none = if low_is_worse {
                        f64::INFINITY
                    } else {
                        f64::NEG_INFINITY
                    };
                    let (x, y) = (a.value.unwrap_or(none), b.value.unwrap_or(none));
                    let worse = if low_is_worse {
                        x.total_cmp(&y)
                    } else {
                        y.total_cmp(&x)
                    };
                    worse.then(a.id.cmp(&b.id))
                });
                (
                    total,
                    affected,
                    hit,
                    Some(signal.clone()),
                    Some(cohort.clone()),
                )
            }
            Target::Device(id) => (
                1,
                1,
                vec![crate::health::SignalOn {
                    id: id.clone(),
                    value: None,
                    affected: true,
                }],
                None,
                None,
            ),
        };
        listed.truncate(pb.devices_max);
        let ids: Vec<DeviceId> = listed
            .iter()
            .filter_map(|m| DeviceId::parse(&m.id).ok())
            .collect();
        let mut done = Vec::new();
        for step in &steps {
            match step {
                Step::Diagnostics => {
                    let asked = ids.iter().take(pb.sample);
                    let (mut sent, mut failed) = (0u64, 0u64);
                    for id in asked {
                        let c = crate::commands::NewCommand {
                            name: "diagnostics".to_owned(),
                            params: json!({"playbook": pb.name, "alert_id": run.alert_id}),
                            ttl_secs: None,
                            max_attempts: None,
                            idempotency_key: Some(ctx.job_id.to_owned()),
                            result_timeout_secs: None,
                        };
                        match ctx
                            .commands
                            .create_command(ctx.access, id.as_str(), c, None)
                            .await
                        {
                            Ok(_) => sent += 1,
                            Err(e) if is_retryable(&e) => return Err(e),
                            // One device's refusal (gone, out of scope, its queue full) does
                            // not stop the others' run.
                            Err(_) => failed += 1,
                        }
                    }
                    done.push(format!(
                        "diagnostics requested from {sent} device(s){}",
                        if failed > 0 {
                            format!(" ({failed} refused)")
                        } else {
                            String::new()
                        }
                    ));
                }
                Step::Tag(k, v) => {
                    let (mut tagged, mut refused) = (0u64, 0u64);
                    for batch in ids.chunks(TAG_BATCH_LEN) {
                        let (k, v) = (k.clone(), v.clone());
                        let results = self
                            .registry
                            .update_tags_many(ctx.access, batch, &move |t| {
                                t.insert(k.clone(), v.clone());
                            })
                            .await;
                        for r in results {
                            match r {
                                Ok(()) => tagged += 1,
                                Err(e) if is_retryable(&e) => return Err(e),
                                // Gone, or refused (its tags full): the others still are.
                                Err(_) => refused += 1,
                            }
                        }
                    }
                    done.push(format!(
                        "tagged {tagged} device(s) {k}={v}{}",
                        if refused > 0 {
                            format!(" ({refused} refused)")
                        } else {
                            String::new()
                        }
                    ));
                }
                Step::PauseRollouts => {
                    let paused = crate::rollouts::pause_touching(
                        &self.store,
                        ctx.now_ms,
                        ctx.access,
                        &ids,
                        &format!("playbook:{}", pb.name),
                        &run.title,
                    )
                    .await?;
                    done.push(if paused.is_empty() {
                        "no running rollout touches these devices".to_owned()
                    } else {
                        format!("paused rollout(s) {}", paused.join(", "))
                    });
                }
                Step::Ticket => {}
            }
        }
        if !steps.contains(&Step::Ticket) {
            return Ok(done.join("; "));
        }
        let devices = self.ticket_devices(&ctx, pb, &listed).await?;
        let mut parts = BTreeMap::new();
        for d in &devices {
            for p in &d.parts {
                *parts.entry(p.clone()).or_insert(0u64) += 1;
            }
        }
        let mut steps_said = done.clone();
        steps_said.push("ticket opened".to_owned());
        let body = TicketBody {
            signal,
            cohort,
            devices_total: total,
            devices_affected: affected,
            devices,
            parts,
            steps: steps_said,
        };
        let body = serde_json::to_string(&body)
            .map_err(|e| ServiceError::internal(format!("ticket body: {e}")))?;
        let id = ticket_id(ctx.job_id);
        let record = TicketRecord {
            id: id.clone(),
            playbook: pb.name.clone(),
            alert_id: run.alert_id.clone().unwrap_or_default(),
            title: run
                .title
                .chars()
                .filter(|c| !c.is_control())
                .take(300)
                .collect(),
            open: true,
            created_at_ms: ctx.now_ms,
            closed_at_ms: None,
            closed_by: None,
            body,
        };
        match self.store.create_ticket(record, TICKETS_OPEN_MAX).await? {
            TicketCreate::Created => {
                self.counters.tickets_opened.fetch_add(1, Ordering::Relaxed);
                done.push(format!("ticket {id} opened"));
            }
            TicketCreate::Exists => done.push(format!("ticket {id} opened")),
            TicketCreate::Full => {
                self.counters
                    .tickets_refused
                    .fetch_add(1, Ordering::Relaxed);
                done.push(format!(
                    "no ticket opened: {TICKETS_OPEN_MAX} tickets of this playbook are open (close some)"
                ));
            }
        }
        Ok(done.join("; "))
    }

    /// The listed devices with their site, tags, installation record and suggested parts.
    async fn ticket_devices(
        &self,
        ctx: &RunContext<'_>,
        pb: &PlaybookConfig,
        listed: &[crate::health::SignalOn],
    ) -> ServiceResult<Vec<mooring_api::TicketDevice>> {
        let mut records = Vec::with_capacity(listed.len());
        for m in listed {
            // Deleted meanwhile: not on the ticket.
            if let Some(rec) = self.store.get_device(&m.id).await? {
                records.push((m, rec));
            }
        }
        let devices: Vec<(String, u64)> = records
            .iter()
            .map(|(m, rec)| (m.id.clone(), rec.created_at_ms))
            .collect();
        // Each signal the part table names, read once for all the devices.
        let mut signals: HashMap<&str, HashMap<String, Option<f64>>> = HashMap::new();
        for part in &self.parts {
            if let Some(s) = part.signal.as_deref() {
                if !signals.contains_key(s) {
                    let on = ctx.health.signal_on_devices(&devices, s).await?;
                    signals.insert(s, on.into_iter().map(|o| (o.id, o.value)).collect());
                }
            }
        }
        let metrics = self.parts.iter().any(|p| p.metric.is_some());
        let mut out = Vec::with_capacity(records.len());
        for (m, rec) in records {
            let latest = if metrics {
                self.store.latest(&m.id).await?
            } else {
                BTreeMap::new()
            };
            let parts = self
                .parts
                .iter()
                .filter(|p| {
                    let v = match (&p.metric, &p.signal) {
                        (Some(metric), _) => latest.get(metric).and_then(|(_, v)| match v {
                            mooring_store::MetricValue::Number(n) => Some(*n),
                            _ => None,
                        }),
                        (None, Some(s)) => signals
                            .get(s.as_str())
                            .and_then(|on| on.get(&m.id).copied().flatten()),
                        (None, None) => None,
                    };
                    v.is_some_and(|v| p.suggested_by(v))
                })
                .map(|p| p.part.clone())
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            out.push(mooring_api::TicketDevice {
                device_id: m.id.clone(),
                site: rec.tags.get(&pb.site_tag).cloned(),
                installation: rec
                    .installation
                    .as_ref()
                    .map(|i| mooring_api::Installation {
                        at: i.at_ms,
                        by: i.by.clone(),
                        location: i.location.clone(),
                        notes: i.notes.clone(),
                    }),
                tags: rec.tags,
                value: m.value,
                parts,
            });
        }
        Ok(out)
    }

    /// Whether `access` sees the ticket: an unscoped caller sees every ticket; a scoped one
    /// those all of whose devices it sees.
    async fn sees(&self, access: &Access, t: &mooring_api::Ticket) -> ServiceResult<bool> {
        if access.scope().is_none() {
            return Ok(true);
        }
        if t.devices.is_empty() {
            return Ok(false);
        }
        for d in &t.devices {
            match self.registry.lookup(&d.device_id).await? {
                Some(rec) if access.sees(&rec) => {}
                _ => return Ok(false),
            }
        }
        Ok(true)
    }

    /// The ticket as the caller sees it (else `ticket_not_found`).
    pub async fn get(&self, access: &Access, id: &str) -> ServiceResult<mooring_api::Ticket> {
        let t = self
            .store
            .get_ticket(id)
            .await?
            .ok_or_else(|| ticket_not_found(id))?;
        let view = ticket_view(&t);
        if !self.sees(access, &view).await? {
            return Err(ticket_not_found(id));
        }
        Ok(view)
    }

    /// Open -> closed by `by` (closing a closed ticket changes nothing).
    pub async fn close(
        &self,
        access: &Access,
        id: &str,
        by: &str,
    ) -> ServiceResult<mooring_api::Ticket> {
        self.get(access, id).await?;
        let t = self
            .store
            .close_ticket(id, by, self.clock.now_ms())
            .await?
            .ok_or_else(|| ticket_not_found(id))?;
        Ok(ticket_view(&t))
    }

    /// One page of the tickets the caller sees, newest first.
    pub async fn list(
        &self,
        access: &Access,
        p: &mooring_api::TicketListParams,
    ) -> ServiceResult<(Vec<mooring_api::Ticket>, Option<String>)> {
        let limit = p.limit.unwrap_or(TICKET_PAGE_LEN_DEFAULT);
        if limit == 0 || limit > TICKET_PAGE_LEN_MAX {
            return Err(ServiceError::invalid(
                "invalid_limit",
                format!("limit must be between 1 and {TICKET_PAGE_LEN_MAX}"),
            ));
        }
        let open = match p.state.as_deref() {
            None => None,
            Some("open") => Some(true),
            Some("closed") => Some(false),
            Some(_) => {
                return Err(ServiceError::invalid(
                    "invalid_state",
                    "state is open or closed",
                ))
            }
        };
        let filter = TicketFilter {
            open,
            playbook: p.playbook.clone(),
            alert_id: p.alert_id.clone(),
        };
        let mut out = Vec::new();
        let mut cursor = p.cursor.clone();
        for _ in 0..TICKET_PAGES_READ_MAX {
            let page = self
                .store
                .list_tickets(&filter, limit, cursor.as_deref())
                .await?;
            let full = page.len() == limit;
            let last = page.last().map(|t| t.id.clone());
            for t in page {
                let view = ticket_view(&t);
                if !self.sees(access, &view).await? {
                    continue;
                }
                out.push(view);
                if out.len() == limit {
                    return Ok((out, Some(t.id)));
                }
            }
            if !full {
                return Ok((out, None));
            }
            cursor = last;
        }
        Ok((out, cursor))
    }

    /// Deletes closed tickets past [`TICKETS_KEPT_MS`] or beyond the newest [`TICKETS_KEPT_MAX`].
    pub async fn prune(&self) -> ServiceResult<u64> {
        let now_ms = self.clock.now_ms();
        Ok(self
            .store
            .prune_tickets(now_ms.saturating_sub(TICKETS_KEPT_MS), TICKETS_KEPT_MAX)
            .await?)
    }
}

/// Whether a step's error is the server's (the store unreachable: retry the run), not one
/// device's.
fn is_retryable(e: &ServiceError) -> bool {
    e.kind == ErrorKind::Internal || e.code == "storage_unavailable"
}

/// A run's ticket id: from its job's, so a retried run opens the same one.
fn ticket_id(job_id: &str) -> String {
    let suffix = job_id.split_once('_').map_or(job_id, |(_, s)| s);
    format!("ticket_{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn playbook(steps: &[&str]) -> PlaybookConfig {
        PlaybookConfig {
            name: "visit".to_owned(),
            on: vec![
                "cohort:disconnects".to_owned(),
                "rule:low-battery".to_owned(),
            ],
            steps: steps.iter().map(|s| (*s).to_owned()).collect(),
            sample: 10,
            devices_max: 200,
            site_tag: "site".to_owned(),
        }
    }

    fn part(metric: Option<&str>, signal: Option<&str>, below: Option<f64>) -> PartConfig {
        PartConfig {
            part: "wireless repeater".to_owned(),
            metric: metric.map(str::to_owned),
            signal: signal.map(str::to_owned),
            below,
            above: None,
        }
    }

    #[test]
    fn playbooks_and_parts_are_checked() {
        let ok = playbook(&["diagnostics", "tag:visit=due", "ticket"]);
        validate(
            std::slice::from_ref(&ok),
            &[part(Some("rssi"), None, Some(-85.0))],
        )
        .expect("valid");
        let err = |p: PlaybookConfig, parts: &[PartConfig]| {
            validate(&[p], parts).expect_err("refused").to_string()
        };
        assert!(err(playbook(&["reboot"]), &[]).contains("unknown step \"reboot\""));
        assert!(err(playbook(&["pause_rolouts"]), &[]).contains("pause_rollouts"));
        assert!(err(playbook(&[]), &[]).contains("steps: 1 to"));
        let mut on = ok.clone();
        on.on = vec!["cohort:nonsense".to_owned()];
        assert!(err(on, &[]).contains("on \"cohort:nonsense\""));
        let mut sample = ok.clone();
        sample.sample = 0;
        assert!(err(sample, &[]).contains("sample must be"));
        assert!(err(ok.clone(), &[part(None, None, Some(1.0))])
            .contains("exactly one of metric or signal"));
        assert!(err(ok.clone(), &[part(None, Some("mood"), Some(1.0))]).contains("signal \"mood\""));
        assert!(err(ok.clone(), &[part(Some("rssi"), None, None)])
            .contains("exactly one of below or above"));
        assert!(err(ok.clone(), &[part(Some("rssi"), None, Some(f64::NAN))]).contains("finite"));
        assert!(validate(&[ok.clone(), ok], &[])
            .expect_err("refused")
            .to_string()
            .contains("used twice"));
    }

    #[test]
    fn a_run_round_trips_through_its_params() {
        for target in [
            Target::Cohort {
                group_by: "tag:site".to_owned(),
                cohort: "site=c".to_owned(),
                signal: "disconnects".to_owned(),
            },
            Target::Device("lock-1".to_owned()),
        ] {
            let run = PlaybookRun {
                playbook: "visit".to_owned(),
                alert_id: Some("alert_1".to_owned()),
                title: "site=c: disconnects".to_owned(),
                target,
            };
            assert_eq!(PlaybookRun::from_params(&run.params()).expect("valid"), run);
        }
        assert_eq!(ticket_id("job_0000abc"), "ticket_0000abc");
    }
}
