//! Rules and alerts (issue 18; docs/health.md "Rules" and "Alerts").
//!
//! A rule is a condition on one device's stream (the `mooring-rules` language), a selector, and
//! actions. Rules are evaluated on the events this node originates, without a database read per
//! message: [`RuleFeed`] (an [`crate::events::Observer`]) copies the events a rule can read
//! into a bounded queue (full: dropped and counted in `mooring_rules_events_dropped_total`;
//! publishers never wait), and one evaluator task ([`run_rules`]) keeps a
//! [`mooring_rules::DeviceState`] per (rule, device) in memory (at most `[rules] states_max`),
//! matches devices against selectors with the registry's cached facts, ticks the conditions
//! that need the clock, and takes the actions when a condition starts to hold:
//!
//! * `alert:<severity>` raises an alert: one per rule and device while open, counted again if
//!   the rule fires again; resolved by itself (`resolved_by` `auto`) when the condition clears;
//!   acknowledged or resolved by people through the API. Open alerts are bounded
//!   (`[rules] alerts_open_max`); resolved ones are pruned after `alerts_keep_ms` or beyond
//!   `alerts_keep_max` (by the lease holder). A new alert is also the event `health_alert` for the device's other
//!   rules.
//! * `command:<name>` sends the device that command, `tag:<k>=<v>` sets the tag; both with the
//!   rule creator's scope.
//!
//! The rules are read from the store every `[rules] reload_interval_ms` (and at once on this
//! node when one changes), so every node of a cluster runs the same rules; each node evaluates
//! the devices connected to it, but for absences (`no telemetry for 30m`): the node holding the
//! lease `rules.sweeper` (a single node always does) watches every device an absence rule
//! selects, connected anywhere or not at all (it arms a state for each, again every minute for
//! new devices), and before an absence fires it reads when the device last sent from the store
//! (telemetry that went through another node). A rule acts only while its creator could still create it (a
//! user enabled and with the role, a token live, the same scope): otherwise it is `suspended`,
//! with the reason, until that changes back.

use crate::access::{access_of, role_allows, Access, Permission};
use crate::app::Core;
use crate::commands::{Commands, NewCommand};
use crate::error::{ErrorKind, ServiceError, ServiceResult};
use crate::metrics::Counters;
use crate::registry::Registry;
use mooring_api::EventBody;
use mooring_proto::selector::Selector;
use mooring_proto::sync::lock;
use mooring_proto::DeviceId;
use mooring_rules::{Action, Change, Condition, DeviceState, Event};
use mooring_store::{AlertFilter, AlertFire, AlertRecord, AlertState, RuleRecord};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::{mpsc, watch, Notify};

/// Longest rule name.
pub const RULE_NAME_LEN_MAX: usize = 64;
/// Alerts per page at most.
pub const ALERT_PAGE_LEN_MAX: usize = 500;
/// Alerts per page by default.
pub const ALERT_PAGE_LEN_DEFAULT: usize = 100;
/// Store pages one alert listing reads at most (a scoped caller's page skips alerts).
const ALERT_PAGES_READ_MAX: usize = 20;
/// Devices read per page when the leading node arms absence rules.
const ARM_PAGE_LEN: usize = 1000;

fn is_absence(c: &Condition) -> bool {
    matches!(c, Condition::Absent { .. })
}

/// `[rules]`.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RulesConfig {
    /// Rules the store holds at most (default 100).
    pub rules_max: usize,
    /// How often each node reads the rules again (default 5 s).
    pub reload_interval_ms: u64,
    /// How often conditions with a duration are checked (default 1 s).
    pub tick_interval_ms: u64,
    /// Events waiting for evaluation at most; beyond, dropped and counted (default 65,536).
    pub queue_len: usize,
    /// (rule, device) states kept at most on a node (default 1,000,000).
    pub states_max: usize,
    /// Open alerts at most (default 100,000); beyond, a firing rule raises none (counted).
    pub alerts_open_max: usize,
    /// Resolved alerts are kept this long (default 30 days)...
    pub alerts_keep_ms: u64,
    /// ...and at most this many alerts in all (default 100,000).
    pub alerts_keep_max: usize,
    /// A rule sends a device commands and sets its tags at most once per this long (default
    /// 1 min): `on command_failed` with `command:diagnostics`, or a flapping link with an
    /// `on disconnected` rule, cannot loop at the device's pace. Alerts still count each firing.
    pub action_cooldown_ms: u64,
    /// `[[webhook]]`s told of every rule alert's changes: raised (`alert.firing`),
    /// acknowledged, resolved (by hand, by its condition clearing).
    pub alert_webhooks: Vec<String>,
    /// `[[email]]` channels told of the same changes.
    pub alert_emails: Vec<String>,
}

impl Default for RulesConfig {
    fn default() -> Self {
        RulesConfig {
            rules_max: 100,
            reload_interval_ms: 5_000,
            tick_interval_ms: 1_000,
            queue_len: 65_536,
            states_max: 1_000_000,
            alerts_open_max: 100_000,
            alerts_keep_ms: 30 * 86_400_000,
            alerts_keep_max: 100_000,
            action_cooldown_ms: 60_000,
            alert_webhooks: Vec::new(),
            alert_emails: Vec::new(),
        }
    }
}

impl RulesConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        use anyhow::bail;
        if !(1..=10_000).contains(&self.rules_max) {
            bail!("rules.rules_max must be between 1 and 10000");
        }
        if !(100..=600_000).contains(&self.reload_interval_ms) {
            bail!("rules.reload_interval_ms must be between 100 and 600000");
        }
        if !(100..=60_000).contains(&self.tick_interval_ms) {
            bail!("rules.tick_interval_ms must be between 100 and 60000");
        }
        if !(1..=10_000_000).contains(&self.queue_len) {
            bail!("rules.queue_len must be between 1 and 10000000");
        }
        if !(1..=100_000_000).contains(&self.states_max) {
            bail!("rules.states_max must be between 1 and 100000000");
        }
        if !(1..=10_000_000).contains(&self.alerts_open_max) {
            bail!("rules.alerts_open_max must be between 1 and 10000000");
        }
        if !(60_000..=3_650 * 86_400_000).contains(&self.alerts_keep_ms) {
            bail!("rules.alerts_keep_ms must be between 60000 (1 min) and 10 years");
        }
        if !(1..=100_000_000).contains(&self.alerts_keep_max) {
            bail!("rules.alerts_keep_max must be between 1 and 100000000");
        }
        if self.action_cooldown_ms > 86_400_000 {
            bail!("rules.action_cooldown_ms must be at most 86400000 (1 day)");
        }
        Ok(())
    }
}

/// Counters (`/metrics`).
#[derive(Default)]
pub struct RuleCounters {
    pub events_dropped: AtomicU64,
    pub evaluated: AtomicU64,
    pub fired: AtomicU64,
    pub cleared: AtomicU64,
    pub states_dropped: AtomicU64,
    pub alerts_dropped: AtomicU64,
    pub actions_failed: AtomicU64,
    /// Command and tag actions not taken: the rule acted on the device within the cooldown.
    pub actions_suppressed: AtomicU64,
}

/// One event for the evaluator.
pub(crate) struct Fed {
    at_ms: u64,
    device: DeviceId,
    what: Fact,
}

pub(crate) enum Fact {
    Points(Vec<(String, f64)>),
    Event(Event),
}

/// Copies the events rules can read into the evaluator's queue; never waits.
pub struct RuleFeed {
    tx: mpsc::Sender<Fed>,
    /// Whether any rule is enabled (no copies otherwise).
    active: AtomicBool,
    /// The metrics live rules read (`None`: every message matters, as a marker: an absence of
    /// any telemetry); only those points are copied.
    metrics: RwLock<Arc<MetricsRead>>,
    dropped: Arc<RuleCounters>,
}

/// What of a telemetry message the live rules read.
#[derive(Default)]
struct MetricsRead {
    names: std::collections::BTreeSet<String>,
    /// A `no telemetry for` rule: any message, even one without a point named above.
    any: bool,
}

impl crate::events::Observer for RuleFeed {
    fn observe(&self, at_ms: u64, device: Option<&DeviceId>, body: &EventBody) {
        let Some(device) = device else { return };
        if !self.active.load(Ordering::Relaxed) {
            return;
        }
        let what = match body {
            EventBody::Telemetry { points, .. } => {
                let read = mooring_proto::sync::read(&self.metrics).clone();
                let copied: Vec<(String, f64)> = points
                    .iter()
                    .filter(|(k, _)| read.names.contains(k.as_str()))
                    .filter_map(|(k, v)| {
                        v.as_f64()
                            .or_else(|| v.as_bool().map(|b| f64::from(u8::from(b))))
                            .map(|x| (k.clone(), x))
                    })
                    .collect();
                if copied.is_empty() && !read.any {
                    return;
                }
                Fact::Points(copied)
            }
            EventBody::Presence { online: true, .. } => Fact::Event(Event::Connected),
            EventBody::Presence { online: false, .. } => Fact::Event(Event::Disconnected),
            EventBody::Command { state, .. } if state == "failed" => {
                Fact::Event(Event::CommandFailed)
            }
            EventBody::Update { state, .. } if state == "rolled_back" => {
                Fact::Event(Event::UpdateRolledBack)
            }
            _ => return,
        };
        let fed = Fed {
            at_ms,
            device: device.clone(),
            what,
        };
        if self.tx.try_send(fed).is_err() {
            Counters::inc(&self.dropped.events_dropped);
        }
    }
}

/// A rule ready to evaluate.
struct Compiled {
    rec: RuleRecord,
    cond: Condition,
    /// The rule's selector narrowed by its creator's scope (`None`: every device).
    sel: Option<Selector>,
    actions: Vec<Action>,
    access: Access,
    /// Why it does not act now (`None`: it does).
    suspended: Option<String>,
}

/// The rules service.
pub struct Rules {
    core: Arc<Core>,
    registry: Arc<Registry>,
    commands: Arc<Commands>,
    /// Webhook notifications go to the work queue.
    jobs: Arc<crate::jobs::Jobs>,
    feed: Arc<RuleFeed>,
    rx: Mutex<Option<mpsc::Receiver<Fed>>>,
    compiled: RwLock<Arc<Vec<Compiled>>>,
    states: Mutex<HashMap<(String, DeviceId), DeviceState>>,
    /// When each (rule, device) last sent a command or set a tag (the cooldown); entries older
    /// than the cooldown are dropped every minute.
    acted: Mutex<HashMap<(String, DeviceId), u64>>,
    /// Whether this node watches absences (`no telemetry for`): one node does, the holder of
    /// the lease `rules.sweeper` (always, on its own), for every device its rules select.
    leads: AtomicBool,
    changed: Notify,
    pub counters: Arc<RuleCounters>,
}

/// A new id that sorts by creation time.
pub(crate) fn new_id(prefix: &str, now_ms: u64) -> String {
    let r: u32 = rand::random();
    format!("{prefix}_{now_ms:012x}{r:08x}")
}

fn check_name(name: &str) -> ServiceResult<()> {
    let ok = !name.is_empty()
        && name.len() <= RULE_NAME_LEN_MAX
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(ServiceError::invalid(
            "invalid_name",
            format!("a rule name is 1 to {RULE_NAME_LEN_MAX} letters, digits, '.', '_' or '-'"),
        ))
    }
}

/// The actions this server takes (the rest of the language is refused until it does).
fn check_actions(
    text: &str,
    webhooks: &crate::webhooks::Webhooks,
    playbooks: &crate::playbooks::Playbooks,
    nats: bool,
) -> ServiceResult<Vec<Action>> {
    let actions = mooring_rules::parse_actions(text)
        .map_err(|e| ServiceError::invalid("invalid_rule", format!("then: {e}")))?;
    for a in &actions {
        if let Action::Job(name) = a {
            if !playbooks.has(name) {
                return Err(ServiceError::invalid(
                    "unknown_playbook",
                    format!("then: {a}: no [[playbook]] named {name:?} in the server's config (docs/health.md#playbooks)"),
                ));
            }
        }
        if let Action::Nats(subject) = a {
            if !nats {
                return Err(ServiceError::invalid(
                    "unsupported_action",
                    format!("then: {a}: nats notifications need a cluster on NATS ([bus] url = \"nats://...\")"),
                ));
            }
            let full = format!("{}{subject}", crate::cluster::RULES_SUBJECT_PREFIX);
            mooring_bus::names::validate_subject(&full)
                .map_err(|e| ServiceError::invalid("invalid_rule", format!("then: {a}: {e}")))?;
        }
        if let Action::Webhook(name) = a {
            if !webhooks.has(name) {
                return Err(ServiceError::invalid(
                    "unknown_webhook",
                    format!("then: {a}: no [[webhook]] named {name:?} in the server's config (docs/health.md#webhooks)"),
                ));
            }
        }
        if let Action::Tag { key, value } = a {
            let tags = [(key.clone(), value.clone())].into_iter().collect();
            crate::registry::validate_tags(&tags)?;
        }
        if let Action::Command(name) = a {
            if !mooring_proto::command::is_valid_command_name(name) {
                return Err(ServiceError::invalid(
                    "invalid_rule",
                    format!("then: command:{name}: not a command name"),
                ));
            }
        }
    }
    Ok(actions)
}

/// An alert change as an email: its subject and plain text.
fn alert_email(event: &str, a: &AlertRecord) -> (String, String) {
    let change = event.strip_prefix("alert.").unwrap_or(event);
    let device = if a.device_id.is_empty() {
        "the fleet"
    } else {
        a.device_id.as_str()
    };
    let subject = format!(
        "[Mooring] {} {change}: {} on {device}",
        a.severity, a.rule_name
    );
    let mut text = format!(
        "Alert {id} is {change}.\n\nRule:     {rule}\nDevice:   {device}\nSeverity: {sev}\nSeen:     {detail}\nFired:    {count} time(s)\n",
        id = a.id,
        rule = a.rule_name,
        sev = a.severity,
        detail = a.detail,
        count = a.count,
    );
    if let Some(by) = a
        .acknowledged_by
        .as_deref()
        .filter(|_| change == "acknowledged")
    {
        text.push_str(&format!("By:       {by}\n"));
    }
    if let Some(by) = a.resolved_by.as_deref().filter(|_| change == "resolved") {
        text.push_str(&format!("By:       {by}\n"));
    }
    text.push_str(&format!("\nmooring alert show {id}\n", id = a.id));
    (subject, text)
}

/// The body of a rule's notification (webhook or NATS) that it fired for a device.
fn fired_body(rule: &Compiled, device: &DeviceId, detail: &str, at_ms: u64) -> serde_json::Value {
    serde_json::json!({
        "event": "rule.fired",
        "rule": rule.rec.name,
        "rule_id": rule.rec.id,
        "device_id": device.as_str(),
        "detail": detail,
        "fired_ms": at_ms,
    })
}

/// What the creator of a rule needs: `devices.write`, and `commands.write` to send commands
/// (a playbook's `diagnostics` step sends them).
fn allowed_for(role: mooring_store::Role, actions: &[Action]) -> bool {
    role_allows(role, Permission::DevicesWrite)
        && (!actions
            .iter()
            .any(|a| matches!(a, Action::Command(_) | Action::Job(_)))
            || role_allows(role, Permission::CommandsWrite))
}

pub fn rule_view(c: &RuleRecord, suspended: Option<&str>) -> mooring_api::Rule {
    let (status, reason) = match (c.enabled, suspended) {
        (false, _) => ("disabled", None),
        (true, Some(r)) => ("suspended", Some(r.to_owned())),
        (true, None) => ("active", None),
    };
    mooring_api::Rule {
        id: c.id.clone(),
        name: c.name.clone(),
        when: c.when.clone(),
        selector: c.selector.clone(),
        scope: c.scope.clone(),
        then: c.then.clone(),
        enabled: c.enabled,
        status: status.to_owned(),
        status_reason: reason,
        created_by: c.created_by.clone(),
        created_at: c.created_at_ms,
        updated_at: c.updated_at_ms,
    }
}

pub fn alert_view(a: &AlertRecord) -> mooring_api::Alert {
    mooring_api::Alert {
        id: a.id.clone(),
        rule_id: a.rule_id.clone(),
        rule_name: a.rule_name.clone(),
        device_id: (!a.device_id.is_empty()).then(|| a.device_id.clone()),
        severity: a.severity.clone(),
        state: a.state.as_str().to_owned(),
        detail: a.detail.clone(),
        count: a.count,
        first_fired_at: a.first_fired_ms,
        last_fired_at: a.last_fired_ms,
        acknowledged_at: a.acknowledged_at_ms,
        acknowledged_by: a.acknowledged_by.clone(),
        resolved_at: a.resolved_at_ms,
        resolved_by: a.resolved_by.clone(),
    }
}

fn rule_not_found(id: &str) -> ServiceError {
    ServiceError::not_found("rule_not_found", format!("no rule {id}"))
}

fn alert_not_found(id: &str) -> ServiceError {
    ServiceError::not_found("alert_not_found", format!("no alert {id}"))
}

impl Rules {
    /// The service and the feed [`crate::events::Events`] observes (made first: events exist
    /// before the services).
    pub(crate) fn feed(config: &RulesConfig) -> (Arc<RuleFeed>, mpsc::Receiver<Fed>) {
        let (tx, rx) = mpsc::channel(config.queue_len.max(1));
        (
            Arc::new(RuleFeed {
                tx,
                active: AtomicBool::new(false),
                metrics: RwLock::new(Arc::default()),
                dropped: Arc::new(RuleCounters::default()),
            }),
            rx,
        )
    }

    pub(crate) fn new(
        core: Arc<Core>,
        registry: Arc<Registry>,
        commands: Arc<Commands>,
        jobs: Arc<crate::jobs::Jobs>,
        feed: Arc<RuleFeed>,
        rx: mpsc::Receiver<Fed>,
    ) -> Self {
        let counters = feed.dropped.clone();
        Rules {
            core,
            registry,
            commands,
            jobs,
            feed,
            rx: Mutex::new(Some(rx)),
            compiled: RwLock::new(Arc::new(Vec::new())),
            states: Mutex::default(),
            acted: Mutex::default(),
            leads: AtomicBool::new(false),
            changed: Notify::new(),
            counters,
        }
    }

    fn config(&self) -> &RulesConfig {
        &self.core.config.rules
    }

    /// This node stopped leading: the absences are watched elsewhere now.
    fn drop_absence_states(&self) {
        let rules = mooring_proto::sync::read(&self.compiled).clone();
        let absences: std::collections::HashSet<&str> = rules
            .iter()
            .filter(|c| is_absence(&c.cond))
            .map(|c| c.rec.id.as_str())
            .collect();
        lock(&self.states).retain(|(rule, _), _| !absences.contains(rule.as_str()));
    }

    /// The live absence rules' ids.
    fn absence_rule_ids(&self) -> std::collections::BTreeSet<String> {
        mooring_proto::sync::read(&self.compiled)
            .iter()
            .filter(|c| c.rec.enabled && c.suspended.is_none() && is_absence(&c.cond))
            .map(|c| c.rec.id.clone())
            .collect()
    }

    /// (rule, device) states held now.
    pub fn states_len(&self) -> usize {
        lock(&self.states).len()
    }

    /// Creates a rule: parsed, its actions allowed to the caller, bounded by `rules_max`.
    pub async fn create(
        &self,
        access: &Access,
        role: mooring_store::Role,
        created_by: &str,
        req: mooring_api::CreateRule,
    ) -> ServiceResult<mooring_api::Rule> {
        check_name(&req.name)?;
        let cond = Condition::parse(&req.when)
            .map_err(|e| ServiceError::invalid("invalid_rule", format!("when: {e}")))?;
        let nats = self.core.cluster().is_some()
            && self
                .core
                .config
                .bus
                .url
                .as_deref()
                .is_some_and(|u| u.starts_with("nats://"));
        let actions = check_actions(&req.then, self.jobs.webhooks(), self.jobs.playbooks(), nats)?;
        // NATS subjects are one space for the whole cluster: a scoped caller could speak on a
        // subject another tenant's programs read.
        if access.scope().is_some() && actions.iter().any(|a| matches!(a, Action::Nats(_))) {
            return Err(ServiceError::new(
                ErrorKind::Forbidden,
                "forbidden",
                "nats notifications need an unscoped caller (NATS subjects are shared by every scope)",
            ));
        }
        if !allowed_for(role, &actions) {
            return Err(ServiceError::new(
                ErrorKind::Forbidden,
                "forbidden",
                "a rule that sends commands needs the commands.write permission",
            ));
        }
        let selector = req
            .selector
            .as_deref()
            .map(crate::commands::parse_selector)
            .transpose()?
            .map(|s| s.to_string());
        let now = self.core.now_ms();
        let rec = RuleRecord {
            id: new_id("rule", now),
            name: req.name.clone(),
            when: cond.to_string(),
            selector,
            scope: access.scope().map(|s| s.to_string()),
            then: actions
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(","),
            enabled: req.enabled.unwrap_or(true),
            created_by: created_by.to_owned(),
            created_at_ms: now,
            updated_at_ms: now,
        };
        let created = self
            .core
            .store
            .create_rule(rec.clone(), self.config().rules_max)
            .await
            .map_err(|e| match e {
                mooring_store::StoreError::AlreadyExists(_) => ServiceError::new(
                    ErrorKind::Conflict,
                    "rule_exists",
                    format!("a rule named {} exists", req.name),
                ),
                e => e.into(),
            })?;
        if !created {
            return Err(ServiceError::new(
                ErrorKind::Conflict,
                "too_many_rules",
                format!(
                    "the server holds {} rules already ([rules] rules_max); delete one first",
                    self.config().rules_max
                ),
            ));
        }
        self.reload_here().await;
        Ok(rule_view(&rec, None))
    }

    /// A rule the caller sees: a scoped caller sees the rules made within its scope.
    async fn visible(&self, access: &Access, id: &str) -> ServiceResult<RuleRecord> {
        let rec = self
            .core
            .store
            .get_rule(id)
            .await?
            .ok_or_else(|| rule_not_found(id))?;
        if !sees_rule(access, &rec) {
            return Err(rule_not_found(id));
        }
        Ok(rec)
    }

    fn suspension_of(&self, id: &str) -> Option<String> {
        mooring_proto::sync::read(&self.compiled)
            .iter()
            .find(|c| c.rec.id == id)
            .and_then(|c| c.suspended.clone())
    }

    pub async fn get(&self, access: &Access, id: &str) -> ServiceResult<mooring_api::Rule> {
        let rec = self.visible(access, id).await?;
        Ok(rule_view(&rec, self.suspension_of(id).as_deref()))
    }

    pub async fn list(&self, access: &Access) -> ServiceResult<Vec<mooring_api::Rule>> {
        let rules = self.core.store.list_rules().await?;
        Ok(rules
            .iter()
            .filter(|r| sees_rule(access, r))
            .map(|r| rule_view(r, self.suspension_of(&r.id).as_deref()))
            .collect())
    }

    pub async fn set_enabled(
        &self,
        access: &Access,
        id: &str,
        enabled: bool,
    ) -> ServiceResult<mooring_api::Rule> {
        self.visible(access, id).await?;
        let rec = self
            .core
            .store
            .set_rule_enabled(id, enabled, self.core.now_ms())
            .await?
            .ok_or_else(|| rule_not_found(id))?;
        self.reload_here().await;
        Ok(rule_view(&rec, self.suspension_of(id).as_deref()))
    }

    /// Deletes a rule; its open alerts are resolved (`rule_deleted`).
    pub async fn delete(&self, access: &Access, id: &str) -> ServiceResult<()> {
        self.visible(access, id).await?;
        if !self.core.store.delete_rule(id, self.core.now_ms()).await? {
            return Err(rule_not_found(id));
        }
        self.reload_here().await;
        Ok(())
    }

    /// One page of alerts the caller sees, newest first.
    pub async fn list_alerts(
        &self,
        access: &Access,
        p: &mooring_api::AlertListParams,
    ) -> ServiceResult<(Vec<mooring_api::Alert>, Option<String>)> {
        let limit = p.limit.unwrap_or(ALERT_PAGE_LEN_DEFAULT);
        if limit == 0 || limit > ALERT_PAGE_LEN_MAX {
            return Err(ServiceError::invalid(
                "invalid_limit",
                format!("limit must be between 1 and {ALERT_PAGE_LEN_MAX}"),
            ));
        }
        let (state, open) = match p.state.as_deref() {
            None => (None, false),
            Some("open") => (None, true),
            Some(s) => (
                Some(s.parse::<AlertState>().map_err(|_| {
                    ServiceError::invalid(
                        "invalid_state",
                        "state is firing, acknowledged, resolved or open",
                    )
                })?),
                false,
            ),
        };
        let filter = AlertFilter {
            state,
            open,
            rule_id: p.rule_id.clone(),
            device_id: p.device_id.clone(),
        };
        let mut out = Vec::new();
        let mut cursor = p.cursor.clone();
        // A scoped caller's page may skip alerts: read on until it is full, at most
        // ALERT_PAGES_READ_MAX store pages per request (then the page is short, with a cursor).
        for _ in 0..ALERT_PAGES_READ_MAX {
            let page = self
                .core
                .store
                .list_alerts(&filter, limit, cursor.as_deref())
                .await?;
            let full = page.len() == limit;
            let last = page.last().map(|a| a.id.clone());
            for a in page {
                let id = a.id.clone();
                if !self.sees_alert(access, &a).await {
                    continue;
                }
                out.push(alert_view(&a));
                if out.len() == limit {
                    return Ok((out, Some(id)));
                }
            }
            if !full {
                return Ok((out, None));
            }
            cursor = last;
        }
        Ok((out, cursor))
    }

    async fn sees_alert(&self, access: &Access, a: &AlertRecord) -> bool {
        if access.scope().is_none() {
            return true;
        }
        match DeviceId::parse(&a.device_id) {
            Ok(id) => match self.registry.lookup(id.as_str()).await {
                Ok(Some(d)) => access.sees(&d),
                _ => false,
            },
            Err(_) => false,
        }
    }

    async fn visible_alert(&self, access: &Access, id: &str) -> ServiceResult<AlertRecord> {
        let a = self
            .core
            .store
            .get_alert(id)
            .await?
            .ok_or_else(|| alert_not_found(id))?;
        if !self.sees_alert(access, &a).await {
            return Err(alert_not_found(id));
        }
        Ok(a)
    }

    pub async fn get_alert(&self, access: &Access, id: &str) -> ServiceResult<mooring_api::Alert> {
        Ok(alert_view(&self.visible_alert(access, id).await?))
    }

    /// Firing -> acknowledged; `409 alert_resolved` if it is resolved (acknowledging an
    /// acknowledged alert changes nothing).
    pub async fn acknowledge(
        &self,
        access: &Access,
        id: &str,
        by: &str,
    ) -> ServiceResult<mooring_api::Alert> {
        let before = self.visible_alert(access, id).await?;
        let a = self
            .core
            .store
            .acknowledge_alert(id, by, self.core.now_ms())
            .await?
            .ok_or_else(|| alert_not_found(id))?;
        if before.state == AlertState::Firing && a.state == AlertState::Acknowledged {
            self.notify_alert("alert.acknowledged", &a).await;
        }
        if a.state == AlertState::Resolved {
            return Err(ServiceError::new(
                ErrorKind::Conflict,
                "alert_resolved",
                format!("alert {id} is resolved"),
            ));
        }
        Ok(alert_view(&a))
    }

    /// Resolves an alert by hand (a resolved one is returned as it is).
    pub async fn resolve(
        &self,
        access: &Access,
        id: &str,
        by: &str,
    ) -> ServiceResult<mooring_api::Alert> {
        let before = self.visible_alert(access, id).await?;
        let a = self
            .core
            .store
            .resolve_alert(id, by, self.core.now_ms())
            .await?
            .ok_or_else(|| alert_not_found(id))?;
        if before.state != AlertState::Resolved && a.state == AlertState::Resolved {
            self.notify_alert("alert.resolved", &a).await;
        }
        Ok(alert_view(&a))
    }

    /// A rule changed through this node: read them again now (so this node acts on the change
    /// before the answer leaves); the other nodes do within `reload_interval_ms`.
    async fn reload_here(&self) {
        if let Err(e) = self.reload().await {
            tracing::warn!(error = %e, "reading the rules failed; the evaluator retries");
            self.changed.notify_one();
        }
    }

    /// Reads the rules again: parsed, creators re-checked. States of rules gone, disabled,
    /// suspended or changed are dropped.
    async fn reload(&self) -> ServiceResult<()> {
        let now = self.core.now_ms();
        let mut compiled = Vec::new();
        for rec in self.core.store.list_rules().await? {
            let cond = match Condition::parse(&rec.when) {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(rule = %rec.name, error = %e, "a stored rule does not parse; skipped");
                    continue;
                }
            };
            let Ok(actions) = mooring_rules::parse_actions(&rec.then) else {
                continue;
            };
            let access = access_of(rec.scope.as_deref());
            let own = match rec.selector.as_deref().map(Selector::parse).transpose() {
                Ok(s) => s,
                Err(_) => continue,
            };
            let sel = access.narrow(own);
            let suspended =
                match crate::access::principal_now(self.core.store.as_ref(), &rec.created_by, now)
                    .await?
                {
                    Err(why) => Some(why),
                    Ok((role, _)) if !allowed_for(role, &actions) => Some(format!(
                        "{} no longer has the permissions this rule needs (role {})",
                        rec.created_by,
                        role.as_str()
                    )),
                    Ok((_, scope)) if scope != rec.scope => Some(format!(
                        "the scope of {} changed since the rule was created",
                        rec.created_by
                    )),
                    Ok(_) => actions.iter().find_map(|a| match a {
                        Action::Job(name) if !self.jobs.playbooks().has(name) => Some(format!(
                            "no [[playbook]] named {name:?} in the server's config"
                        )),
                        _ => None,
                    }),
                };
            compiled.push(Compiled {
                rec,
                cond,
                sel,
                actions,
                access,
                suspended,
            });
        }
        let live = |c: &Compiled| c.rec.enabled && c.suspended.is_none();
        self.feed
            .active
            .store(compiled.iter().any(live), Ordering::Relaxed);
        let mut read = MetricsRead::default();
        for c in compiled.iter().filter(|c| live(c)) {
            match &c.cond {
                Condition::Absent { metric: None, .. } => read.any = true,
                cond => read.names.extend(cond.metric().map(str::to_owned)),
            }
        }
        *mooring_proto::sync::write(&self.feed.metrics) = Arc::new(read);
        {
            let keep: HashMap<&str, &Compiled> = compiled
                .iter()
                .filter(|c| live(c))
                .map(|c| (c.rec.id.as_str(), c))
                .collect();
            let old = mooring_proto::sync::read(&self.compiled).clone();
            let same = |id: &str| {
                old.iter()
                    .find(|c| c.rec.id == id)
                    .zip(keep.get(id))
                    .is_some_and(|(a, b)| a.rec.when == b.rec.when && a.sel == b.sel)
            };
            lock(&self.states).retain(|(rule, _), _| same(rule));
        }
        *mooring_proto::sync::write(&self.compiled) = Arc::new(compiled);
        Ok(())
    }

    /// One fed event: every live rule whose selector matches the device.
    async fn evaluate(&self, fed: Fed) {
        let rules = mooring_proto::sync::read(&self.compiled).clone();
        // Absences are watched by the leading node only (it ticks them).
        let leads = self.leads.load(Ordering::Relaxed);
        for rule in rules
            .iter()
            .filter(|c| c.rec.enabled && c.suspended.is_none())
            .filter(|c| leads || !is_absence(&c.cond))
        {
            if !self.applies(rule, &fed.device).await {
                continue;
            }
            Counters::inc(&self.counters.evaluated);
            let changes = self.with_state(rule, &fed.device, fed.at_ms, |st| {
                let mut changes = Vec::new();
                match &fed.what {
                    Fact::Points(points) => {
                        if points.is_empty() {
                            // A message with no point a rule reads: still telemetry.
                            if let Condition::Absent { metric: None, .. } = &rule.cond {
                                changes.extend(rule.cond.on_point(st, "", 0.0, fed.at_ms));
                            }
                        }
                        for (metric, value) in points {
                            let reads = match &rule.cond {
                                Condition::Absent { metric: None, .. } => true,
                                c => c.metric() == Some(metric.as_str()),
                            };
                            if reads {
                                changes.extend(rule.cond.on_point(st, metric, *value, fed.at_ms));
                            }
                        }
                    }
                    Fact::Event(e) => changes.extend(rule.cond.on_event(st, *e, fed.at_ms)),
                }
                changes
            });
            for change in changes.into_iter().flatten() {
                self.take(rule, &fed.device, change, fed.at_ms).await;
            }
        }
    }

    /// `f` on the state of (rule, device), made if there is none; `None` (counted) when
    /// `states_max` states are held already.
    fn with_state<R>(
        &self,
        rule: &Compiled,
        device: &DeviceId,
        at_ms: u64,
        f: impl FnOnce(&mut DeviceState) -> R,
    ) -> Option<R> {
        let mut states = lock(&self.states);
        let key = (rule.rec.id.clone(), device.clone());
        if !states.contains_key(&key) && states.len() >= self.config().states_max {
            Counters::inc(&self.counters.states_dropped);
            return None;
        }
        Some(f(states
            .entry(key)
            .or_insert_with(|| DeviceState::new(at_ms))))
    }

    async fn applies(&self, rule: &Compiled, device: &DeviceId) -> bool {
        match &rule.sel {
            None => true,
            Some(sel) => self.registry.matches_cached(sel, device).await,
        }
    }

    /// The clock moved: conditions with a duration.
    async fn tick(&self) {
        let now = self.core.now_ms();
        let rules = mooring_proto::sync::read(&self.compiled).clone();
        let leads = self.leads.load(Ordering::Relaxed);
        let ticking: HashMap<&str, &Compiled> = rules
            .iter()
            .filter(|c| c.rec.enabled && c.suspended.is_none() && c.cond.needs_tick())
            .filter(|c| leads || !is_absence(&c.cond))
            .map(|c| (c.rec.id.as_str(), c))
            .collect();
        if ticking.is_empty() {
            return;
        }
        let changes: Vec<(&Compiled, DeviceId, Change)> = {
            let mut states = lock(&self.states);
            states
                .iter_mut()
                .filter_map(|((rule, device), st)| {
                    let c = ticking.get(rule.as_str())?;
                    c.cond.tick(st, now).map(|ch| (*c, device.clone(), ch))
                })
                .collect()
        };
        for (rule, device, change) in changes {
            // An absence seen here may be telemetry stored through another node (the device
            // is connected there): the store says when it last sent.
            if let (Change::Fire { .. }, Condition::Absent { metric, for_ms }) =
                (&change, &rule.cond)
            {
                let last = match self.last_sent_ms(&device, metric.as_deref()).await {
                    Ok(last) => last,
                    Err(e) => {
                        // Unknown is not silent: checked again at the next tick.
                        tracing::warn!(device = %device, error = %e, "reading a device's last telemetry failed");
                        if let Some(st) = lock(&self.states).get_mut(&(rule.rec.id.clone(), device))
                        {
                            *st = DeviceState::new(now.saturating_sub(*for_ms));
                        }
                        continue;
                    }
                };
                if last.is_some_and(|t| now.saturating_sub(t) < *for_ms) {
                    if let Some(st) = lock(&self.states).get_mut(&(rule.rec.id.clone(), device)) {
                        // Back to "not firing" at the stored time: the absence starts again.
                        let _ = rule.cond.on_point(
                            st,
                            metric.as_deref().unwrap_or(""),
                            0.0,
                            last.unwrap_or(now),
                        );
                    }
                    continue;
                }
            }
            self.take(rule, &device, change, now).await;
        }
    }

    /// When `device` last sent telemetry (`metric`: a point of it), as the store knows.
    async fn last_sent_ms(
        &self,
        device: &DeviceId,
        metric: Option<&str>,
    ) -> mooring_store::Result<Option<u64>> {
        Ok(match metric {
            None => self
                .registry
                .lookup(device.as_str())
                .await?
                .and_then(|d| d.last_telemetry_ms),
            Some(m) => self
                .core
                .store
                .latest(device.as_str())
                .await?
                .get(m)
                .map(|(ts, _)| *ts),
        })
    }

    /// Once a minute: states of devices a rule no longer applies to (deleted, re-tagged out of
    /// its selector) are dropped and their open alerts resolved; on the leading node, firing
    /// absences whose device sent through another node since are cleared; cooldowns that ran
    /// out are forgotten.
    async fn maintain(&self) {
        let now = self.core.now_ms();
        let rules = mooring_proto::sync::read(&self.compiled).clone();
        let by_id: HashMap<&str, &Compiled> =
            rules.iter().map(|c| (c.rec.id.as_str(), c)).collect();
        let keys: Vec<(String, DeviceId, bool)> = lock(&self.states)
            .iter()
            .map(|((r, d), st)| (r.clone(), d.clone(), st.firing()))
            .collect();
        let all = Selector { terms: Vec::new() };
        for (rule_id, device, firing) in keys {
            let Some(rule) = by_id.get(rule_id.as_str()) else {
                lock(&self.states).remove(&(rule_id, device));
                continue;
            };
            let sel = rule.sel.as_ref().unwrap_or(&all);
            if !self.registry.matches_cached(sel, &device).await {
                lock(&self.states).remove(&(rule_id.clone(), device.clone()));
                self.take(rule, &device, Change::Clear, now).await;
                continue;
            }
            if let (true, Condition::Absent { metric, for_ms }) = (firing, &rule.cond) {
                let Ok(Some(last)) = self.last_sent_ms(&device, metric.as_deref()).await else {
                    continue;
                };
                if now.saturating_sub(last) >= *for_ms {
                    continue;
                }
                let change = lock(&self.states)
                    .get_mut(&(rule_id.clone(), device.clone()))
                    .and_then(|st| {
                        rule.cond
                            .on_point(st, metric.as_deref().unwrap_or(""), 0.0, last)
                    });
                if let Some(change) = change {
                    self.take(rule, &device, change, now).await;
                }
            }
        }
        let cooldown = self.config().action_cooldown_ms;
        lock(&self.acted).retain(|_, at| now.saturating_sub(*at) < cooldown);
    }

    /// Whether (rule, device) may act now (the cooldown); records the action if so.
    fn may_act(&self, rule: &Compiled, device: &DeviceId, at_ms: u64) -> bool {
        let cooldown = self.config().action_cooldown_ms;
        let mut acted = lock(&self.acted);
        let key = (rule.rec.id.clone(), device.clone());
        if acted
            .get(&key)
            .is_some_and(|last| at_ms.saturating_sub(*last) < cooldown)
        {
            return false;
        }
        if acted.len() >= self.config().states_max && !acted.contains_key(&key) {
            return false;
        }
        acted.insert(key, at_ms);
        true
    }

    /// The leading node watches every device an absence rule selects, connected or not: a
    /// device that never sends again (even one silent since before the rule existed or the
    /// server started) is found. States are added for the devices that have none.
    async fn arm_absences(&self) {
        let now = self.core.now_ms();
        let rules = mooring_proto::sync::read(&self.compiled).clone();
        for rule in rules
            .iter()
            .filter(|c| c.rec.enabled && c.suspended.is_none() && is_absence(&c.cond))
        {
            let sel = rule.sel.clone().unwrap_or(Selector { terms: Vec::new() });
            let mut cursor: Option<String> = None;
            loop {
                let page = match self
                    .registry
                    .select_devices(&sel, cursor.as_deref(), ARM_PAGE_LEN)
                    .await
                {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::warn!(rule = %rule.rec.name, error = %e, "listing devices for an absence rule failed");
                        break;
                    }
                };
                {
                    let mut states = lock(&self.states);
                    for v in &page.0 {
                        let key = (rule.rec.id.clone(), v.record.id.clone());
                        if states.contains_key(&key) {
                            continue;
                        }
                        if states.len() >= self.config().states_max {
                            Counters::inc(&self.counters.states_dropped);
                            break;
                        }
                        states.insert(key, DeviceState::new(now));
                    }
                }
                match page.1 {
                    Some(next) => cursor = Some(next),
                    None => break,
                }
            }
        }
    }

    /// A change of one rule for one device: its actions, or its alert resolved.
    async fn take(&self, rule: &Compiled, device: &DeviceId, change: Change, at_ms: u64) {
        match change {
            Change::Clear => {
                Counters::inc(&self.counters.cleared);
                match self
                    .core
                    .store
                    .resolve_open_alert(&rule.rec.id, device.as_str(), "auto", at_ms)
                    .await
                {
                    Ok(Some(a)) => self.notify_alert("alert.resolved", &a).await,
                    Ok(None) => {}
                    Err(e) => {
                        Counters::inc(&self.counters.actions_failed);
                        tracing::warn!(rule = %rule.rec.name, device = %device, error = %e, "resolving an alert failed");
                    }
                }
            }
            Change::Fire { detail } => {
                if self.fire(rule, device, &detail, at_ms).await {
                    Box::pin(self.evaluate_health_alert(rule, device, at_ms)).await;
                }
            }
        }
    }

    /// A rule fired for a device: every action (commands and tags at most once per cooldown,
    /// for the whole firing). Returns whether it raised a new alert.
    async fn fire(&self, rule: &Compiled, device: &DeviceId, detail: &str, at_ms: u64) -> bool {
        Counters::inc(&self.counters.fired);
        let device_actions = self.may_act(rule, device, at_ms);
        let mut raised = false;
        for action in &rule.actions {
            match self
                .act(rule, device, action, detail, at_ms, device_actions)
                .await
            {
                Ok(new_alert) => raised |= new_alert,
                Err(e) => {
                    Counters::inc(&self.counters.actions_failed);
                    tracing::warn!(rule = %rule.rec.name, device = %device, action = %action, error = %e, "a rule action failed");
                }
            }
        }
        raised
    }

    /// A new alert is the event `health_alert` for the device's other rules (one level: an
    /// alert raised by such a rule is not fed again).
    async fn evaluate_health_alert(&self, from: &Compiled, device: &DeviceId, at_ms: u64) {
        let rules = mooring_proto::sync::read(&self.compiled).clone();
        for rule in rules.iter().filter(|c| {
            c.rec.id != from.rec.id
                && c.rec.enabled
                && c.suspended.is_none()
                && matches!(
                    c.cond,
                    Condition::On {
                        event: Event::HealthAlert
                    } | Condition::Count {
                        event: Event::HealthAlert,
                        ..
                    }
                )
        }) {
            if !self.applies(rule, device).await {
                continue;
            }
            let change = self.with_state(rule, device, at_ms, |st| {
                rule.cond.on_event(st, Event::HealthAlert, at_ms)
            });
            if let Some(Some(Change::Fire { detail })) = change {
                // Not fed again: one level.
                let _ = self.fire(rule, device, &detail, at_ms).await;
            }
        }
    }

    /// One action; `Ok(true)` if it raised a new alert.
    async fn act(
        &self,
        rule: &Compiled,
        device: &DeviceId,
        action: &Action,
        detail: &str,
        at_ms: u64,
        device_actions: bool,
    ) -> ServiceResult<bool> {
        match action {
            Action::Alert(severity) => {
                let fired = self
                    .core
                    .store
                    .fire_alert(
                        AlertFire {
                            id: new_id("alert", at_ms),
                            rule_id: rule.rec.id.clone(),
                            rule_name: rule.rec.name.clone(),
                            device_id: device.to_string(),
                            severity: severity.as_str().to_owned(),
                            detail: detail.to_owned(),
                            at_ms,
                            rule_must_exist: true,
                        },
                        self.config().alerts_open_max,
                    )
                    .await?;
                match fired {
                    Some((a, new)) => {
                        if new {
                            self.notify_alert("alert.firing", &a).await;
                            let kind = format!("rule:{}", rule.rec.name);
                            let target = crate::playbooks::Target::Device(device.to_string());
                            let creator =
                                format!("{}{}", crate::jobs::RULE_CREATOR_PREFIX, rule.rec.id);
                            self.jobs
                                .run_playbooks_on(&kind, &a, target, Some((&creator, &rule.access)))
                                .await;
                        }
                        Ok(new)
                    }
                    None => {
                        Counters::inc(&self.counters.alerts_dropped);
                        Ok(false)
                    }
                }
            }
            Action::Command(_)
            | Action::Tag { .. }
            | Action::Webhook(_)
            | Action::Nats(_)
            | Action::Job(_)
                if !device_actions =>
            {
                Counters::inc(&self.counters.actions_suppressed);
                Ok(false)
            }
            Action::Command(name) => {
                let c = NewCommand {
                    name: name.clone(),
                    params: serde_json::json!({"rule": rule.rec.name, "detail": detail}),
                    ttl_secs: None,
                    max_attempts: None,
                    idempotency_key: None,
                    result_timeout_secs: None,
                };
                self.commands
                    .create_command(&rule.access, device.as_str(), c, None)
                    .await?;
                Ok(false)
            }
            Action::Tag { key, value } => {
                let (k, v) = (key.clone(), value.clone());
                let results = self
                    .registry
                    .update_tags_many(&rule.access, std::slice::from_ref(device), &move |t| {
                        t.insert(k.clone(), v.clone());
                    })
                    .await;
                results.into_iter().next().unwrap_or(Ok(()))?;
                Ok(false)
            }
            Action::Webhook(name) => {
                let body = fired_body(rule, device, detail, at_ms);
                let delivery = crate::webhooks::Delivery {
                    webhook: name.clone(),
                    body,
                };
                self.notify_fired(rule, device, crate::jobs::JobAction::Webhook(delivery))
                    .await
            }
            Action::Nats(subject) => {
                let body = fired_body(rule, device, detail, at_ms);
                let publish = crate::webhooks::Publish {
                    subject: subject.clone(),
                    body,
                };
                self.notify_fired(rule, device, crate::jobs::JobAction::Publish(publish))
                    .await
            }
            Action::Job(playbook) => {
                let run = crate::playbooks::PlaybookRun {
                    playbook: playbook.clone(),
                    alert_id: None,
                    title: format!("{} on {device}: {detail}", rule.rec.name),
                    target: crate::playbooks::Target::Device(device.to_string()),
                };
                let creator = format!("{}{}", crate::jobs::RULE_CREATOR_PREFIX, rule.rec.id);
                self.jobs
                    .enqueue_playbook(&creator, &rule.access, run)
                    .await?;
                Ok(false)
            }
        }
    }

    /// Queues a rule's notification (webhook or NATS) about `device`, as the rule.
    async fn notify_fired(
        &self,
        rule: &Compiled,
        device: &DeviceId,
        action: crate::jobs::JobAction,
    ) -> ServiceResult<bool> {
        let creator = format!("{}{}", crate::jobs::RULE_CREATOR_PREFIX, rule.rec.id);
        self.jobs
            .enqueue_delivery(&creator, &rule.access, Some(device), action)
            .await?;
        Ok(false)
    }

    /// Queues a notification of an alert's change to every `[rules] alert_webhooks` (failures
    /// are counted and logged; the change stands).
    async fn notify_alert(&self, event: &str, a: &AlertRecord) {
        let c = self.config();
        // Cohort alerts (about the fleet, no device) are not notified.
        if (c.alert_webhooks.is_empty() && c.alert_emails.is_empty()) || a.device_id.is_empty() {
            return;
        }
        let device = DeviceId::parse(&a.device_id).ok();
        let view = alert_view(a);
        let body = serde_json::json!({"event": event, "alert": view});
        let (subject, text) = alert_email(event, a);
        let webhooks = c.alert_webhooks.iter().map(|name| {
            (
                format!("{}webhook:{name}", crate::jobs::ALERTS_CREATOR_PREFIX),
                crate::jobs::JobAction::Webhook(crate::webhooks::Delivery {
                    webhook: name.clone(),
                    body: body.clone(),
                }),
            )
        });
        let emails = c.alert_emails.iter().map(|name| {
            (
                format!("{}email:{name}", crate::jobs::ALERTS_CREATOR_PREFIX),
                crate::jobs::JobAction::Email(crate::emails::EmailNote {
                    email: name.clone(),
                    subject: subject.clone(),
                    text: text.clone(),
                }),
            )
        });
        for (name, delivery) in webhooks.chain(emails) {
            if let Err(e) = self
                .jobs
                .enqueue_delivery(&name, &Access::all(), device.as_ref(), delivery)
                .await
            {
                Counters::inc(&self.counters.actions_failed);
                tracing::warn!(alert = %a.id, channel = %name, error = %e, "queueing an alert notification failed");
            }
        }
    }

    /// Prunes resolved alerts past `alerts_keep_ms` / `alerts_keep_max`.
    async fn prune(&self) {
        let c = self.config();
        let before = self.core.now_ms().saturating_sub(c.alerts_keep_ms);
        if let Err(e) = self
            .core
            .store
            .prune_alerts(before, c.alerts_keep_max)
            .await
        {
            tracing::warn!(error = %e, "pruning alerts failed");
        }
    }
}

/// A scoped caller sees the rules made within its scope (the rule's scope carries every term
/// of the caller's).
fn sees_rule(access: &Access, rec: &RuleRecord) -> bool {
    let Some(scope) = access.scope() else {
        return true;
    };
    let Some(own) = rec.scope.as_deref().and_then(|s| Selector::parse(s).ok()) else {
        return false;
    };
    scope.terms.iter().all(|t| own.terms.contains(t))
}

/// The evaluator: fed events, ticks, reloads (at start, on a change here, every
/// `reload_interval_ms`), and alert pruning once a minute (under the lease `rules.prune` in a
/// cluster: by one node). Stops with the server.
pub async fn run_rules(rules: Arc<Rules>, mut stop: watch::Receiver<bool>) {
    let Some(mut rx) = lock(&rules.rx).take() else {
        return;
    };
    let c = rules.config().clone();
    let mut reload = tokio::time::interval(Duration::from_millis(c.reload_interval_ms.max(1)));
    let mut tick = tokio::time::interval(Duration::from_millis(c.tick_interval_ms.max(1)));
    let mut prune = tokio::time::interval(Duration::from_secs(60));
    for t in [&mut reload, &mut tick, &mut prune] {
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    }
    // The absence rules armed (their devices given states) since this node leads; a new one
    // is armed at the next reload rather than waiting for the minute.
    let mut armed_rules: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = reload.tick() => {
                if let Err(e) = rules.reload().await {
                    tracing::warn!(error = %e, "reading the rules failed; will retry");
                }
                if rules.leads.load(Ordering::Relaxed) && rules.absence_rule_ids() != armed_rules {
                    rules.arm_absences().await;
                    armed_rules = rules.absence_rule_ids();
                }
            }
            () = rules.changed.notified() => {
                if let Err(e) = rules.reload().await {
                    tracing::warn!(error = %e, "reading the rules failed; will retry");
                }
            }
            _ = tick.tick() => rules.tick().await,
            _ = prune.tick() => {
                let leads = match rules.core.cluster() {
                    Some(cluster) => cluster.holds(crate::cluster::LEASE_RULES).await,
                    None => true,
                };
                let was = rules.leads.swap(leads, Ordering::Relaxed);
                if was && !leads {
                    rules.drop_absence_states();
                }
                rules.maintain().await;
                if leads {
                    if !was {
                        // Just took over: the previous holder's states are not here.
                        armed_rules.clear();
                    }
                    rules.prune().await;
                    rules.arm_absences().await;
                    armed_rules = rules.absence_rule_ids();
                }
            }
            fed = rx.recv() => match fed {
                Some(fed) => rules.evaluate(fed).await,
                None => return,
            },
        }
    }
}
