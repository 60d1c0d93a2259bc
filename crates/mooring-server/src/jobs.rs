//! Background jobs (issue 15) on a durable work queue (issue 18): one bulk action (tag, untag,
//! command, delete) on the devices a selector matches, a fleet certificate rotation, or a report
//! (`crate::reports`), run in turns by any worker with its progress stored as it goes.
//!
//! `POST /api/v1/jobs` validates the action and selector, narrows the selector by the creator's
//! scope, bounds the creator's unfinished jobs ([`JOBS_UNFINISHED_PER_CREATOR_MAX`]) and stores
//! the job `queued`. Workers ([`run_jobs`]: `[jobs] workers` tasks in every node, and the
//! `mooring worker` process) claim one turn of a job at a time from the store
//! (`JobStore::claim_job`: the job waiting longest, under a lease of `[jobs] lease_ms` that every
//! progress write renews), so jobs interleave turn by turn across jobs and workers. A turn counts
//! a job's matching devices (`total`), then handles one batch of `[jobs] batch_len`
//! (≤ [`BATCH_LEN_MAX`]) devices in id order, acting on each through the registry with the
//! creator's scope (so a scoped creator's job cannot tag a device out of its scope), and stores
//! `done`, `failed`, the first errors and the cursor (the last id handled) with compare-and-set
//! on the job's `rev`, then releases the job for its next turn (after `[jobs] batch_pause_ms`).
//!
//! Failures: a turn that fails (the store, a report's source) is retried after a backoff
//! (`[jobs] retry_backoff_ms`, doubling, at most [`RETRY_BACKOFF_MAX_MS`]); a worker that dies
//! mid-turn leaves its lease to expire, and the next claim takes the job over, counting an
//! attempt. After `[jobs] attempts_max` attempts without a successful turn the job is `dead`
//! (the dead letter list, `GET /api/v1/jobs?state=dead`) with `last_error`.
//!
//! Invariants: a job's stored progress only moves forward; one worker holds a job at a time (a
//! worker whose lease was taken over fails its next write and stops); after a crash the walk
//! continues after the stored cursor, so at most the one batch in flight is applied again, and
//! every per-device action is idempotent (tag and untag leave a device as they found it the
//! second time, delete skips what is gone; a report rewrites its result from the stored
//! offset). Action `command` creates one fleet command whose id the job stores *before*
//! creating it, so it is never created twice. A cancel is a compare-and-set to `canceled`: the
//! worker's next progress write fails and it stops.
//!
//! Action `rotate_certs` (a fleet certificate rotation, issue 16; created by
//! [`Jobs::create_rotation`]) has no device selector: it walks the ledger's certificates expiring
//! before a fixed time (cursor `<not_after>.<serial>`), sending each device the command
//! `mooring.cert.rotate` with the job id as idempotency key, spaced `60 s / max_per_minute`, its
//! progress stored after each device.
//!
//! Adding an action is one [`JobAction`] variant: its name, parameters, permission and what it
//! does to one device (or to the whole selection, as `command` does).

use crate::access::{access_of, role_allows, Access, Permission};
use crate::app::Core;
use crate::commands::{Commands, NewCommand};
use crate::error::{ErrorKind, ServiceError, ServiceResult};
use crate::registry::{validate_tags, Registry};
use mooring_proto::selector::Selector;
use mooring_proto::DeviceId;
use mooring_store::{JobError, JobRecord, JobState, Role};
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Mutex, Notify};

/// Most devices one batch handles (and the default `[jobs] batch_len`).
pub const BATCH_LEN_MAX: usize = 500;
/// Jobs one creator may have queued or running at once; more is `429 too_many_jobs`.
pub const JOBS_UNFINISHED_PER_CREATOR_MAX: u64 = 10;
/// Failures a job keeps the details of (the count goes on).
pub const JOB_ERRORS_MAX: usize = 20;
/// Finished jobs kept at most; older ones are pruned.
pub const JOBS_KEPT_MAX: usize = 1_000;
/// Jobs one creator keeps at most (its newest; unfinished ones are never pruned): older
/// finished ones go when it creates another.
pub const JOBS_KEPT_PER_CREATOR_MAX: usize = 100;
/// Finished jobs are pruned this long after they finished.
pub const JOBS_KEPT_MS: u64 = 30 * 86_400_000;
/// Page size of `GET /api/v1/jobs`.
pub const JOB_PAGE_LEN_DEFAULT: usize = 50;
pub const JOB_PAGE_LEN_MAX: usize = 200;
/// Keys one untag job removes at most; tags one tag job sets at most (as a device holds).
pub const UNTAG_KEYS_MAX: usize = 64;
/// The services a fleet report reads (`crate::reports`).
pub struct ReportSources {
    pub health: Arc<crate::health::Health>,
    pub fleet: Arc<crate::fleet::Fleet>,
}

/// `created_by` of a rule's webhook notifications: `rule:<rule id>`.
pub const RULE_CREATOR_PREFIX: &str = "rule:";
/// `created_by` of the notifications of alert changes: `alerts:webhook:<name>`,
/// `alerts:email:<name>` (one per channel, so one channel's backlog never crowds out another).
pub const ALERTS_CREATOR_PREFIX: &str = "alerts:";
/// Turns one worker pass runs at most, so pruning and the stop signal get their turn.
const TURNS_PER_PASS: usize = 1_000;
/// How often finished jobs are pruned.
const PRUNE_INTERVAL_MS: u64 = 60_000;
/// The longest wait before a failed turn is retried.
pub const RETRY_BACKOFF_MAX_MS: u64 = 300_000;

/// What a job does. The stored form is [`JobAction::name`] plus [`JobAction::params`].
#[derive(Debug, Clone, PartialEq)]
pub enum JobAction {
    /// Set these tags (others kept).
    Tag(BTreeMap<String, String>),
    /// Remove these tag keys.
    Untag(Vec<String>),
    /// One fleet command to the selection.
    Command(JobCommand),
    /// Delete the devices.
    Delete,
    /// Fleet certificate rotation (issue 16): tell every device with an active certificate
    /// expiring before a time to renew it, throttled; created by
    /// [`Jobs::create_rotation`], not through `POST /api/v1/jobs`.
    RotateCerts(RotateCerts),
    /// A playbook run (issue 18): queued when an alert it runs on is raised, or by a rule's
    /// `job:<playbook>` action ([`Jobs::run_playbooks_on`], [`Jobs::enqueue_playbook`]).
    Playbook(crate::playbooks::PlaybookRun),
    /// A report (issue 18): created by `POST /api/v1/reports`, its result kept with the job.
    Report(crate::reports::ReportSpec),
    /// A rule's webhook notification (issue 18): created by [`Jobs::enqueue_delivery`] when a
    /// rule fires, one POST, deleted once delivered.
    Webhook(crate::webhooks::Delivery),
    /// A rule's NATS notification (issue 18): one publish on the cluster's NATS, deleted once
    /// published.
    Publish(crate::webhooks::Publish),
    /// An alert email (issue 18): one message through an `[[email]]` channel, deleted once
    /// the SMTP server took it.
    Email(crate::emails::EmailNote),
}

/// The parameters of a fleet rotation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RotateCerts {
    /// Certificates with `not_after` before this (unix ms), fixed when the rotation is made.
    pub before_ms: u64,
    /// Renewal requests per minute at most (they are spaced evenly).
    pub max_per_minute: u32,
    /// A fleet CA rollover's rotation: instead of expiring ones, the fleet certificates not
    /// from the CA the ledger names so (the previous CA's, `registry/rollover.rs`).
    pub fleet_issuer: Option<String>,
}

impl RotateCerts {
    /// One page of the certificates this rotation moves (a rollover's: unexpired at `now_ms`),
    /// after `after`.
    async fn page(
        &self,
        store: &dyn mooring_store::Store,
        now_ms: u64,
        limit: usize,
        after: Option<(u64, &str)>,
    ) -> mooring_store::Result<Vec<mooring_store::CertRecord>> {
        match &self.fleet_issuer {
            Some(current) => store.old_fleet_certs(current, now_ms, limit, after).await,
            None => store.expiring_certs(self.before_ms, limit, after).await,
        }
    }

    /// How many certificates this rotation would still move.
    async fn count(
        &self,
        store: &dyn mooring_store::Store,
        now_ms: u64,
    ) -> mooring_store::Result<u64> {
        match &self.fleet_issuer {
            Some(current) => store.count_old_fleet_certs(current, now_ms).await,
            None => store.count_expiring_certs(self.before_ms).await,
        }
    }
}

/// Most renewal requests per minute a fleet rotation may ask for.
pub const ROTATIONS_PER_MINUTE_MAX: u32 = 60_000;
/// The job action name of a fleet rotation.
pub const ROTATE_CERTS_ACTION: &str = "rotate_certs";

/// The command of an action `command`.
#[derive(Debug, Clone, PartialEq)]
pub struct JobCommand {
    pub name: String,
    pub params: serde_json::Value,
    pub ttl_ms: Option<u64>,
}

impl JobAction {
    pub const NAMES: [&'static str; 4] = ["tag", "untag", "command", "delete"];

    pub fn name(&self) -> &'static str {
        match self {
            JobAction::Tag(_) => "tag",
            JobAction::Untag(_) => "untag",
            JobAction::Command(_) => "command",
            JobAction::Delete => "delete",
            JobAction::RotateCerts(_) => ROTATE_CERTS_ACTION,
            JobAction::Report(_) => crate::reports::REPORT_ACTION,
            JobAction::Webhook(_) => crate::webhooks::WEBHOOK_ACTION,
            JobAction::Publish(_) => crate::webhooks::NATS_ACTION,
            JobAction::Email(_) => crate::emails::EMAIL_ACTION,
            JobAction::Playbook(_) => crate::playbooks::PLAYBOOK_ACTION,
        }
    }

    /// The permission the creator needs beyond the route's `devices.write`.
    pub fn extra_permission(&self) -> Option<Permission> {
        match self {
            JobAction::Command(_) => Some(Permission::CommandsWrite),
            JobAction::Report(_) => Some(Permission::TelemetryRead),
            JobAction::Tag(_)
            | JobAction::Untag(_)
            | JobAction::Delete
            | JobAction::RotateCerts(_)
            | JobAction::Webhook(_)
            | JobAction::Publish(_)
            | JobAction::Email(_)
            | JobAction::Playbook(_) => None,
        }
    }

    /// What the creator needs besides the action's own permission: `devices.write`, or for
    /// a report (which changes nothing) `devices.read`.
    pub fn base_permission(&self) -> Permission {
        match self {
            JobAction::Report(_) => Permission::DevicesRead,
            _ => Permission::DevicesWrite,
        }
    }

    /// Whether `role` may run this action: its base and its own permission. Checked when the
    /// job is created and again before every batch.
    pub fn allowed_for(&self, role: Role) -> bool {
        role_allows(role, self.base_permission())
            && self.extra_permission().is_none_or(|p| role_allows(role, p))
    }

    /// The parameters as stored and shown (`{"tags": ..}`, `{"keys": ..}`, `{"command": ..}`).
    pub fn params(&self) -> serde_json::Value {
        match self {
            JobAction::Tag(tags) => json!({ "tags": tags }),
            JobAction::Untag(keys) => json!({ "keys": keys }),
            JobAction::Command(c) => {
                let mut cmd = json!({"name": c.name, "params": c.params});
                if let Some(t) = c.ttl_ms {
                    cmd["ttl_ms"] = json!(t);
                }
                json!({ "command": cmd })
            }
            JobAction::Delete => json!({}),
            JobAction::RotateCerts(r) => json!({
                "rotate": {"before_ms": r.before_ms, "max_per_minute": r.max_per_minute,
                    "fleet_issuer": r.fleet_issuer}
            }),
            JobAction::Report(r) => json!({ "report": r.to_json() }),
            JobAction::Webhook(d) => d.params(),
            JobAction::Publish(p) => p.params(),
            JobAction::Email(e) => e.params(),
            JobAction::Playbook(p) => p.params(),
        }
    }

    /// Builds and validates an action from a request: `action` names it, and exactly the
    /// parameter it takes is given.
    pub fn from_request(
        action: &str,
        tags: Option<BTreeMap<String, String>>,
        keys: Option<Vec<String>>,
        command: Option<JobCommand>,
    ) -> ServiceResult<JobAction> {
        let given: Vec<&str> = [
            tags.is_some().then_some("tags"),
            keys.is_some().then_some("keys"),
            command.is_some().then_some("command"),
        ]
        .into_iter()
        .flatten()
        .collect();
        let wants: Option<&str> = match action {
            "tag" => Some("tags"),
            "untag" => Some("keys"),
            "command" => Some("command"),
            "delete" => None,
            other => {
                return Err(ServiceError::invalid(
                    "invalid_action",
                    format!(
                        "action {other:?} is not one of {}",
                        JobAction::NAMES.join(", ")
                    ),
                ))
            }
        };
        if given.iter().any(|g| Some(*g) != wants) || (wants.is_some() && given.is_empty()) {
            return Err(ServiceError::invalid(
                "invalid_params",
                match wants {
                    Some(w) => format!("action {action} takes {w:?} (and nothing else)"),
                    None => format!("action {action} takes no tags, keys or command"),
                },
            ));
        }
        let a = match (action, tags, keys, command) {
            ("tag", Some(t), _, _) => JobAction::Tag(t),
            ("untag", _, Some(k), _) => JobAction::Untag(k),
            ("command", _, _, Some(c)) => JobAction::Command(c),
            _ => JobAction::Delete,
        };
        a.validate()?;
        Ok(a)
    }

    fn validate(&self) -> ServiceResult<()> {
        match self {
            JobAction::Tag(tags) => {
                if tags.is_empty() {
                    return Err(ServiceError::invalid("invalid_tags", "tags is empty"));
                }
                validate_tags(tags)
            }
            JobAction::Untag(keys) => {
                if keys.is_empty() || keys.len() > UNTAG_KEYS_MAX {
                    return Err(ServiceError::invalid(
                        "invalid_keys",
                        format!("keys must name 1 to {UNTAG_KEYS_MAX} tag keys"),
                    ));
                }
                let as_tags: BTreeMap<String, String> =
                    keys.iter().map(|k| (k.clone(), "x".to_owned())).collect();
                validate_tags(&as_tags)
                    .map_err(|e| ServiceError::invalid("invalid_keys", e.message))
            }
            JobAction::Command(c) => {
                if c.ttl_ms.is_some_and(|t| t == 0) {
                    return Err(ServiceError::invalid(
                        "invalid_ttl",
                        "command.ttl_ms must be at least 1",
                    ));
                }
                Ok(())
            }
            JobAction::Delete
            | JobAction::Webhook(_)
            | JobAction::Publish(_)
            | JobAction::Email(_)
            | JobAction::Playbook(_) => Ok(()),
            JobAction::Report(r) => r.validate(),
            JobAction::RotateCerts(r) => {
                if r.max_per_minute == 0 || r.max_per_minute > ROTATIONS_PER_MINUTE_MAX {
                    return Err(ServiceError::invalid(
                        "invalid_max_per_minute",
                        format!("max_per_minute must be between 1 and {ROTATIONS_PER_MINUTE_MAX}"),
                    ));
                }
                Ok(())
            }
        }
    }

    /// The action of a stored job.
    fn from_stored(name: &str, params: &serde_json::Value) -> Result<JobAction, String> {
        let a = match name {
            "tag" => JobAction::Tag(
                serde_json::from_value(params["tags"].clone()).map_err(|e| e.to_string())?,
            ),
            "untag" => JobAction::Untag(
                serde_json::from_value(params["keys"].clone()).map_err(|e| e.to_string())?,
            ),
            "command" => {
                let c = &params["command"];
                JobAction::Command(JobCommand {
                    name: c["name"].as_str().ok_or("no command name")?.to_owned(),
                    params: c["params"].clone(),
                    ttl_ms: c["ttl_ms"].as_u64(),
                })
            }
            "delete" => JobAction::Delete,
            ROTATE_CERTS_ACTION => {
                let r = &params["rotate"];
                JobAction::RotateCerts(RotateCerts {
                    before_ms: r["before_ms"].as_u64().ok_or("no before_ms")?,
                    max_per_minute: r["max_per_minute"]
                        .as_u64()
                        .and_then(|n| u32::try_from(n).ok())
                        .ok_or("no max_per_minute")?,
                    fleet_issuer: r["fleet_issuer"].as_str().map(str::to_owned),
                })
            }
            crate::reports::REPORT_ACTION => {
                JobAction::Report(crate::reports::ReportSpec::from_json(&params["report"])?)
            }
            crate::webhooks::WEBHOOK_ACTION => {
                JobAction::Webhook(crate::webhooks::Delivery::from_params(params)?)
            }
            crate::webhooks::NATS_ACTION => {
                JobAction::Publish(crate::webhooks::Publish::from_params(params)?)
            }
            crate::emails::EMAIL_ACTION => {
                JobAction::Email(crate::emails::EmailNote::from_params(params)?)
            }
            crate::playbooks::PLAYBOOK_ACTION => {
                JobAction::Playbook(crate::playbooks::PlaybookRun::from_params(params)?)
            }
            other => return Err(format!("unknown action {other:?}")),
        };
        Ok(a)
    }
}

impl JobCommand {
    fn new_command(&self) -> NewCommand {
        NewCommand {
            name: self.name.clone(),
            params: self.params.clone(),
            // Rounded up: a command never lives shorter than asked.
            ttl_secs: self.ttl_ms.map(|t| t.div_ceil(1000)),
            max_attempts: None,
            idempotency_key: None,
            result_timeout_secs: None,
        }
    }
}

/// Who creates a job: how jobs name it (`created_by`, the per-creator bound) and its role.
#[derive(Debug, Clone)]
pub struct Creator {
    pub name: String,
    pub role: Role,
}

/// How a turn of a job ended (errors aside: those are retried).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Turn {
    /// Progress stored; the job is this worker's until it releases it.
    Done,
    /// The job is final, or no longer this worker's (canceled, taken over): nothing to release.
    Lost,
    /// The worker is stopping mid-turn: release the job for another.
    Stopped,
}

/// The jobs service.
pub struct Jobs {
    core: Arc<Core>,
    registry: Arc<Registry>,
    commands: Arc<Commands>,
    webhooks: Arc<crate::webhooks::Webhooks>,
    emails: Arc<crate::emails::Emails>,
    playbooks: Arc<crate::playbooks::Playbooks>,
    sources: ReportSources,
    /// Wakes the runner when a job is created on this node.
    wake: Notify,
    /// Creations on this node one at a time, so the per-creator bound holds here exactly
    /// (across nodes it may be passed by the jobs created at the same moment elsewhere).
    creating: Mutex<()>,
}

impl Jobs {
    pub(crate) fn new(
        core: Arc<Core>,
        registry: Arc<Registry>,
        commands: Arc<Commands>,
        webhooks: Arc<crate::webhooks::Webhooks>,
        emails: Arc<crate::emails::Emails>,
        playbooks: Arc<crate::playbooks::Playbooks>,
        sources: ReportSources,
    ) -> Self {
        Self {
            core,
            registry,
            webhooks,
            emails,
            playbooks,
            sources,
            commands,
            wake: Notify::new(),
            creating: Mutex::new(()),
        }
    }

    pub(crate) fn core(&self) -> &Core {
        &self.core
    }

    pub(crate) fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Creates a job (queued) and wakes a worker.
    pub async fn create(
        &self,
        access: &Access,
        creator: &Creator,
        selector: &str,
        action: JobAction,
    ) -> ServiceResult<JobRecord> {
        if !action.allowed_for(creator.role) {
            let base = action.base_permission().as_str();
            let needs = action
                .extra_permission()
                .map_or(base.to_owned(), |p| format!("{base} and {}", p.as_str()));
            return Err(ServiceError::new(
                ErrorKind::Forbidden,
                "forbidden",
                format!("action {} needs the permissions {needs}", action.name()),
            ));
        }
        if let JobAction::Command(c) = &action {
            self.commands.check_command(&c.new_command())?;
        }
        action.validate()?;
        let sel = if let JobAction::RotateCerts(_) = &action {
            // Not a device selector: the ledger's expiring certificates, fleet-wide.
            if access.scope().is_some() {
                return Err(ServiceError::new(
                    ErrorKind::Forbidden,
                    "forbidden",
                    "a fleet-wide rotation needs an unscoped caller; rotate devices in your scope one by one (--device)",
                ));
            }
            selector.to_owned()
        } else if selector.trim().is_empty()
            && matches!(&action, JobAction::Report(r) if r.kind == crate::reports::ReportKind::Fleet)
        {
            // A fleet report of every device the creator may see.
            access.selection(None)?.to_string()
        } else {
            let sel = crate::commands::parse_selector(selector)?;
            let sel = access.narrow(Some(sel.clone())).unwrap_or(sel);
            // The job stores the narrowed selector as text and the runner (and `visible`)
            // parse it again: the scope's terms must not push it past the parser's bounds
            // (terms, ids, length), or the job would fail later and be hidden from its own
            // creator.
            if let Err(e) = Selector::parse(&sel.to_string()) {
                return Err(ServiceError::invalid(
                    "invalid_selector",
                    format!("the selector narrowed by your scope is too large: {e}"),
                ));
            }
            sel.to_string()
        };
        let _one_at_a_time = self.creating.lock().await;
        let unfinished = self.core.store.count_unfinished_jobs(&creator.name).await?;
        if unfinished >= JOBS_UNFINISHED_PER_CREATOR_MAX {
            return Err(ServiceError::new(
                ErrorKind::TooManyRequests,
                "too_many_jobs",
                format!(
                    "you have {unfinished} unfinished jobs; at most {JOBS_UNFINISHED_PER_CREATOR_MAX} may be queued or running at once"
                ),
            ));
        }
        let job = queued_job(
            self.core.now_ms(),
            &action,
            sel,
            access,
            creator.name.clone(),
        );
        self.core.store.create_job(job.clone()).await?;
        // The bound per creator on kept jobs: one creator's many (finished at once, say) never
        // push the others' out of the newest JOBS_KEPT_MAX.
        self.core
            .store
            .prune_jobs_of(&creator.name, JOBS_KEPT_PER_CREATOR_MAX)
            .await?;
        self.wake.notify_one();
        Ok(job)
    }

    /// What fleet reports read.
    pub(crate) fn sources(&self) -> &ReportSources {
        &self.sources
    }

    /// The email channels alerts go to.
    pub fn emails(&self) -> &crate::emails::Emails {
        &self.emails
    }

    /// The webhooks rules may notify.
    pub fn webhooks(&self) -> &crate::webhooks::Webhooks {
        &self.webhooks
    }

    /// Queues a webhook notification about `device` (none: about the fleet) by `creator`: a
    /// rule's (`rule:<rule id>`, under the rule's scope) or an alert channel's
    /// ([`ALERTS_CREATOR_PREFIX`]).
    /// `Ok(false)`: dropped, `creator` already has [`crate::webhooks::PENDING_PER_RULE_MAX`]
    /// unfinished (counted).
    pub async fn enqueue_delivery(
        &self,
        creator: &str,
        access: &Access,
        device: Option<&DeviceId>,
        action: JobAction,
    ) -> ServiceResult<bool> {
        let creator = creator.to_owned();
        let pending = self.core.store.count_unfinished_jobs(&creator).await?;
        if pending >= crate::webhooks::PENDING_PER_RULE_MAX {
            let dropped = match action {
                JobAction::Email(_) => &self.emails.counters.dropped,
                JobAction::Playbook(_) => &self.playbooks.counters.dropped,
                _ => &self.webhooks.counters.dropped,
            };
            dropped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Ok(false);
        }
        let sel = Selector {
            terms: device
                .map(|d| vec![mooring_proto::selector::Term::Ids(vec![d.clone()])])
                .unwrap_or_default(),
        };
        let sel = access.narrow(Some(sel.clone())).unwrap_or(sel);
        let mut job = queued_job(
            self.core.now_ms(),
            &action,
            sel.to_string(),
            access,
            creator.clone(),
        );
        job.total = Some(1);
        self.core.store.create_job(job).await?;
        // Its dead letters: the newest JOBS_KEPT_PER_CREATOR_MAX (delivered ones are deleted).
        self.core
            .store
            .prune_jobs_of(&creator, JOBS_KEPT_PER_CREATOR_MAX)
            .await?;
        self.wake.notify_one();
        Ok(true)
    }

    /// The playbooks.
    pub fn playbooks(&self) -> &crate::playbooks::Playbooks {
        &self.playbooks
    }

    /// Queues every playbook that runs on alert kind `kind` (`cohort:<signal>`,
    /// `rule:<name>`) for a new alert. A playbook with 1,000 unfinished runs queues none
    /// (counted).
    /// `by`: the rule that raised the alert (its creator id `rule:<id>` and access): the run
    /// acts as the rule; `None` (a cohort alert): as the server, creator `playbook:<name>`.
    pub async fn run_playbooks_on(
        &self,
        kind: &str,
        alert: &mooring_store::AlertRecord,
        target: crate::playbooks::Target,
        by: Option<(&str, &Access)>,
    ) {
        let names: Vec<String> = self.playbooks.on_kind(kind).map(str::to_owned).collect();
        for name in names {
            let title = match &target {
                crate::playbooks::Target::Cohort { .. } => alert.detail.clone(),
                crate::playbooks::Target::Device(d) => {
                    format!("{} on {d}: {}", alert.rule_name, alert.detail)
                }
            };
            let run = crate::playbooks::PlaybookRun {
                playbook: name.clone(),
                alert_id: Some(alert.id.clone()),
                title,
                target: target.clone(),
            };
            let all = Access::all();
            let (creator, access) = match by {
                Some((creator, access)) => (creator.to_owned(), access),
                None => (
                    format!("{}{name}", crate::playbooks::PLAYBOOK_CREATOR_PREFIX),
                    &all,
                ),
            };
            if let Err(e) = self.enqueue_playbook(&creator, access, run).await {
                tracing::warn!(playbook = %name, alert = %alert.id, error = %e, "queuing a playbook failed");
            }
        }
    }

    /// Queues one playbook run by `creator` under `access`.
    pub async fn enqueue_playbook(
        &self,
        creator: &str,
        access: &Access,
        run: crate::playbooks::PlaybookRun,
    ) -> ServiceResult<bool> {
        let device =
            match &run.target {
                crate::playbooks::Target::Device(d) => Some(DeviceId::parse(d).map_err(|e| {
                    ServiceError::invalid("invalid_device_id", format!("{d:?}: {e}"))
                })?),
                crate::playbooks::Target::Cohort { .. } => None,
            };
        self.enqueue_delivery(creator, access, device.as_ref(), JobAction::Playbook(run))
            .await
    }

    /// A playbook run, in one turn (each step is idempotent on a retry).
    async fn run_playbook(
        &self,
        job: &mut JobRecord,
        access: &Access,
        run: &crate::playbooks::PlaybookRun,
    ) -> ServiceResult<Turn> {
        use std::sync::atomic::Ordering;
        let ctx = crate::playbooks::RunContext {
            health: &self.sources.health,
            commands: &self.commands,
            access,
            job_id: &job.id,
            now_ms: self.core.now_ms(),
        };
        match self.playbooks.run(ctx, run).await {
            Ok(said) => {
                self.playbooks
                    .counters
                    .succeeded
                    .fetch_add(1, Ordering::Relaxed);
                job.done = 1;
                job.last_error = None;
                tracing::info!(job = %job.id, playbook = %run.playbook, outcome = %said, "playbook ran");
                self.finish_turn(job, JobState::Succeeded).await
            }
            Err(e) => {
                self.playbooks
                    .counters
                    .failed
                    .fetch_add(1, Ordering::Relaxed);
                if e.kind == ErrorKind::InvalidArgument {
                    // Removed from the config, or no longer valid: a retry cannot help.
                    job.errors.push(JobError {
                        device_id: String::new(),
                        message: e.message,
                    });
                    return self.finish_turn(job, JobState::Failed).await;
                }
                Err(e)
            }
        }
    }

    /// A rule's NATS notification, published once (every failure is retried by the queue).
    async fn publish(&self, p: &crate::webhooks::Publish) -> ServiceResult<()> {
        use std::sync::atomic::Ordering;
        let counters = &self.webhooks.counters;
        let Some(cluster) = self.core.cluster() else {
            return Err(ServiceError::new(
                ErrorKind::Unavailable,
                "no_nats",
                "nats notifications need the cluster's NATS ([bus] url)",
            ));
        };
        let body = serde_json::to_vec(&p.body)
            .map_err(|e| ServiceError::internal(format!("notification body: {e}")))?;
        match cluster.publish_for_rules(&p.subject, body.into()).await {
            Ok(()) => {
                counters.nats_published.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                counters.nats_failed.fetch_add(1, Ordering::Relaxed);
                Err(ServiceError::new(
                    ErrorKind::Unavailable,
                    "nats_failed",
                    format!("publishing on {}: {e}", p.subject),
                ))
            }
        }
    }

    /// A notification sent: its job is deleted (the dead letters are what stays).
    async fn delivered(&self, job: &mut JobRecord) -> ServiceResult<Turn> {
        if self.core.store.delete_job(&job.id, job.rev).await? {
            // Gone: nothing of it is left to release.
            return Ok(Turn::Lost);
        }
        job.done = 1;
        self.finish_turn(job, JobState::Succeeded).await
    }

    /// A job the caller sees (else `job_not_found`): a scoped caller sees the jobs whose
    /// selector carries every term of its scope (those created within it).
    pub async fn get(&self, access: &Access, id: &str) -> ServiceResult<JobRecord> {
        self.core
            .store
            .get_job(id)
            .await?
            .filter(|j| visible(access, j))
            .ok_or_else(|| job_not_found(id))
    }

    /// A succeeded job's result as it was stored: the job (its `result` says the length and
    /// media type). `409 no_result` while it runs, if it failed, or for an action that makes
    /// none.
    pub async fn result(&self, access: &Access, id: &str) -> ServiceResult<(JobRecord, u64)> {
        let job = self.get(access, id).await?;
        let bytes = job.result.as_ref().and_then(|r| r["bytes"].as_u64());
        match bytes {
            Some(bytes) if job.state == JobState::Succeeded => Ok((job, bytes)),
            _ => Err(ServiceError::new(
                ErrorKind::Conflict,
                "no_result",
                match (job.result.is_some(), job.state) {
                    (false, _) => format!("job {id} (action {}) makes no result", job.action),
                    (true, state) => format!(
                        "job {id} is {state}; its result can be downloaded once it has succeeded"
                    ),
                },
            )),
        }
    }

    /// `len` bytes at most of a job's stored result from `offset` (as [`Jobs::result`] found it).
    pub async fn read_result(&self, id: &str, offset: u64, len: usize) -> ServiceResult<Vec<u8>> {
        Ok(self.core.store.read_job_result(id, offset, len).await?)
    }

    /// Jobs the caller sees (in `state` only, if given), newest first; the cursor is the last
    /// id of the previous page.
    pub async fn list(
        &self,
        access: &Access,
        limit: Option<usize>,
        cursor: Option<&str>,
        state: Option<&str>,
    ) -> ServiceResult<(Vec<JobRecord>, Option<String>)> {
        let limit = limit.unwrap_or(JOB_PAGE_LEN_DEFAULT);
        if limit == 0 || limit > JOB_PAGE_LEN_MAX {
            return Err(ServiceError::invalid(
                "invalid_limit",
                format!("limit must be between 1 and {JOB_PAGE_LEN_MAX}"),
            ));
        }
        let state = match state {
            None => None,
            Some(s) => Some(s.parse::<JobState>().map_err(|_| {
                let all: Vec<&str> = JobState::ALL.iter().map(|s| s.as_str()).collect();
                ServiceError::invalid(
                    "invalid_state",
                    format!("state {s:?} is not one of {}", all.join(", ")),
                )
            })?),
        };
        let mut out = Vec::new();
        let mut before = cursor.map(str::to_owned);
        // A scoped caller's page may skip jobs it does not see: read on until it is full. The
        // table is bounded (finished jobs are pruned beyond JOBS_KEPT_MAX), so this ends.
        loop {
            let page = self.core.store.list_jobs(limit, before.as_deref()).await?;
            let full = page.len() == limit;
            before = page.last().map(|j| j.id.clone());
            for j in page {
                if visible(access, &j) && state.is_none_or(|s| s == j.state) {
                    out.push(j);
                    if out.len() == limit {
                        let next = out.last().map(|j| j.id.clone());
                        return Ok((out, next));
                    }
                }
            }
            if !full {
                return Ok((out, None));
            }
        }
    }

    /// Cancels a job that has not finished (the runner stops at its next batch); a finished
    /// job is returned as it is.
    pub async fn cancel(&self, access: &Access, id: &str) -> ServiceResult<JobRecord> {
        // The runner writes progress concurrently: retry on a lost compare-and-set.
        for _ in 0..100 {
            let mut job = self.get(access, id).await?;
            if job.state.is_final() {
                return Ok(job);
            }
            job.state = JobState::Canceled;
            job.finished_ms = Some(self.core.now_ms());
            // A worker in the middle of a turn finds out at its next write (the rev moved).
            job.worker = None;
            job.lease_until_ms = None;
            drop_partial_result(&mut job);
            if self.core.store.update_job(job.clone()).await? {
                job.rev += 1;
                self.clear_result_of(&job).await;
                tracing::info!(job = id, "job canceled");
                return Ok(job);
            }
        }
        Err(ServiceError::new(
            ErrorKind::Unavailable,
            "job_busy",
            "the job changed too often while canceling; retry",
        ))
    }

    /// One worker pass: claims and runs turns of jobs until none is due, `stop` is set, or
    /// it ran `turns_max`. Returns when the soonest job it released is due again (its next
    /// batch after `[jobs] batch_pause_ms`, or a retry), so the worker looks again then.
    pub async fn run_pass(
        &self,
        worker: &str,
        stop: &watch::Receiver<bool>,
        turns_max: usize,
    ) -> ServiceResult<Option<u64>> {
        let cfg = &self.core.config.jobs;
        let mut turns = 0;
        let mut next_due_ms: Option<u64> = None;
        let mut due = |job: &JobRecord| {
            next_due_ms = Some(next_due_ms.map_or(job.run_after_ms, |d| d.min(job.run_after_ms)));
        };
        while turns < turns_max && !*stop.borrow() {
            let now = self.core.now_ms();
            let Some(mut job) = self
                .core
                .store
                .claim_job(worker, now, cfg.lease_ms.max(1))
                .await?
            else {
                return Ok(next_due_ms);
            };
            turns += 1;
            if job.attempts >= cfg.attempts_max.max(1) {
                let why = job
                    .last_error
                    .clone()
                    .unwrap_or_else(|| "its worker stopped mid-turn".to_owned());
                tracing::warn!(job = %job.id, attempts = job.attempts, error = %why, "job is dead");
                job.last_error = Some(format!("{} attempts failed; the last: {why}", job.attempts));
                self.finish(&mut job, JobState::Dead).await?;
                continue;
            }
            let attempts = job.attempts;
            match self.run_job(&mut job, stop).await {
                Ok(Turn::Done) => {
                    // The next turn, for whoever claims it. `last_error` stays: the job's
                    // history shows what it recovered from.
                    job.attempts = 0;
                    if self.release(&mut job, cfg.batch_pause_ms).await? {
                        due(&job);
                    }
                }
                Ok(Turn::Lost) => {}
                Ok(Turn::Stopped) => {
                    // Shutting down: the job is free for another worker at once.
                    self.release(&mut job, 0).await?;
                }
                Err(e) => {
                    // The job as last stored, not as the failed turn left it in memory (a
                    // batch half counted, a cursor not moved): the retry redoes the turn from
                    // there, counting each device once. Not ours any more (its rev moved):
                    // nothing to release. If the store fails this too, the lease runs out and
                    // the job is taken over (counting the attempt then).
                    let stored = match self.core.store.get_job(&job.id).await {
                        Ok(Some(stored)) if stored.rev == job.rev => stored,
                        _ => continue,
                    };
                    job = stored;
                    job.attempts = attempts.saturating_add(1);
                    job.last_error = Some(e.message.clone());
                    let backoff = cfg
                        .retry_backoff_ms
                        .saturating_mul(1u64 << (job.attempts - 1).min(20))
                        .min(RETRY_BACKOFF_MAX_MS);
                    tracing::warn!(job = %job.id, attempts = job.attempts, backoff_ms = backoff, error = %e, "job turn failed; will retry");
                    if let Ok(true) = self.release(&mut job, backoff).await {
                        due(&job);
                    }
                }
            }
        }
        // Stopped, or more turns due than one pass runs: look again at once.
        Ok(Some(self.core.now_ms()))
    }

    /// Gives up this worker's lease on `job`: claimable again `after_ms` from now.
    async fn release(&self, job: &mut JobRecord, after_ms: u64) -> ServiceResult<bool> {
        job.worker = None;
        job.lease_until_ms = None;
        job.run_after_ms = self.core.now_ms().saturating_add(after_ms);
        self.save(job).await
    }

    async fn holds_lease(&self) -> bool {
        match self.core.cluster() {
            Some(cluster) => cluster.holds(crate::cluster::LEASE_JOBS).await,
            None => true,
        }
    }

    /// Stores `job` at its rev, renewing this worker's lease; `false` if it changed meanwhile
    /// (canceled, or taken over after the lease ran out): the caller stops.
    async fn save(&self, job: &mut JobRecord) -> ServiceResult<bool> {
        if job.worker.is_some() {
            job.lease_until_ms = Some(
                self.core
                    .now_ms()
                    .saturating_add(self.core.config.jobs.lease_ms.max(1)),
            );
        }
        if self.core.store.update_job(job.clone()).await? {
            job.rev += 1;
            Ok(true)
        } else {
            tracing::info!(job = %job.id, "job changed elsewhere (canceled or taken over); stopping");
            Ok(false)
        }
    }

    /// Stores `job` final (`state`), its lease released.
    async fn finish(&self, job: &mut JobRecord, state: JobState) -> ServiceResult<bool> {
        job.state = state;
        job.finished_ms = Some(self.core.now_ms());
        job.worker = None;
        job.lease_until_ms = None;
        if state != JobState::Succeeded {
            drop_partial_result(job);
        }
        let saved = self.save(job).await?;
        if saved {
            self.clear_result_of(job).await;
            let elapsed_ms = job
                .finished_ms
                .unwrap_or(0)
                .saturating_sub(job.started_ms.unwrap_or(0));
            tracing::info!(job = %job.id, action = %job.action, state = %job.state, done = job.done, failed = job.failed, elapsed_ms, "job finished");
        }
        Ok(saved)
    }

    /// A job that ended without succeeding keeps no partial result: its chunks go (bounded by
    /// `[jobs] report_bytes_max` while it ran, nothing after).
    async fn clear_result_of(&self, job: &JobRecord) {
        if job.state == JobState::Succeeded || job.result.is_none() {
            return;
        }
        if let Err(e) = self
            .core
            .store
            .write_job_result(&job.id, job.rev, 0, Vec::new())
            .await
        {
            tracing::warn!(job = %job.id, error = %e, "dropping a partial result failed");
        }
    }

    /// Stores progress mid-turn: [`Turn::Lost`] if the job is no longer this worker's.
    pub(crate) async fn save_progress(&self, job: &mut JobRecord) -> ServiceResult<Turn> {
        Ok(if self.save(job).await? {
            Turn::Done
        } else {
            Turn::Lost
        })
    }

    /// Stores `job` final; the turn is over either way.
    pub(crate) async fn finish_turn(
        &self,
        job: &mut JobRecord,
        state: JobState,
    ) -> ServiceResult<Turn> {
        self.finish(job, state).await?;
        Ok(Turn::Lost)
    }

    /// One turn of `job` (leased to this worker): started if queued, counted if not yet, then
    /// one batch (for action `command`, the fleet command; for a report, one page), its
    /// progress stored.
    async fn run_job(
        &self,
        job: &mut JobRecord,
        stop: &watch::Receiver<bool>,
    ) -> ServiceResult<Turn> {
        if job.state == JobState::Queued {
            job.state = JobState::Running;
            job.started_ms = Some(self.core.now_ms());
            if !self.save(job).await? {
                return Ok(Turn::Lost);
            }
        }
        let plan = JobAction::from_stored(&job.action, &job.params).and_then(|a| {
            if matches!(a, JobAction::RotateCerts(_)) {
                return Ok((a, None));
            }
            stored_selector(&job.selector)
                .map(|s| (a, Some(s)))
                .map_err(|e| format!("stored selector {:?}: {e}", job.selector))
        });
        let (action, sel) = match plan {
            Ok(p) => p,
            Err(message) => {
                job.errors.push(JobError {
                    device_id: String::new(),
                    message,
                });
                return self.finish_turn(job, JobState::Failed).await;
            }
        };
        // The creator is re-checked every turn (before every batch): a job stops (failed,
        // with the reason) once its creator is disabled, deleted, revoked, expired, or given
        // another role or scope.
        let refused = match job.created_by.strip_prefix(RULE_CREATOR_PREFIX) {
            Some(rule_id) => match self.core.store.get_rule(rule_id).await? {
                // A playbook a rule runs (its `job:` action, or an alert it raised) acts as the
                // rule's creator: it needs `commands.write` (the diagnostics step) and the
                // scope the rule was made in.
                Some(rule) if rule.enabled && matches!(action, JobAction::Playbook(_)) => {
                    match crate::access::principal_now(
                        self.core.store.as_ref(),
                        &rule.created_by,
                        self.core.now_ms(),
                    )
                    .await?
                    {
                        Err(why) => Some(why),
                        Ok((role, _)) if !role_allows(role, Permission::CommandsWrite) => {
                            Some(format!(
                                "{} (who made rule {}) may not send commands, which the playbook does",
                                rule.created_by, rule.name
                            ))
                        }
                        Ok((_, scope)) if scope != rule.scope => Some(format!(
                            "the scope of {} changed since rule {} was made",
                            rule.created_by, rule.name
                        )),
                        Ok(_) => None,
                    }
                }
                Some(rule) if rule.enabled => None,
                Some(rule) => Some(format!("rule {} was disabled", rule.name)),
                None => Some(format!("rule {rule_id} was deleted")),
            },
            // The server's own: notifications of alert changes ([rules] alert_webhooks).
            None if job.created_by.starts_with(ALERTS_CREATOR_PREFIX)
                && matches!(
                    action,
                    JobAction::Webhook(_) | JobAction::Publish(_) | JobAction::Email(_)
                ) =>
            {
                None
            }
            // The config's playbooks, run on an alert.
            None if job
                .created_by
                .starts_with(crate::playbooks::PLAYBOOK_CREATOR_PREFIX)
                && matches!(action, JobAction::Playbook(_)) =>
            {
                None
            }
            None => self.creator_refused(job, &action).await?,
        };
        if let Some(reason) = refused {
            job.errors.push(JobError {
                device_id: String::new(),
                message: reason,
            });
            return self.finish_turn(job, JobState::Failed).await;
        }
        let access = access_of(job.scope.as_deref());
        if let JobAction::Webhook(d) = &action {
            // Every failure is retried by the queue (backoff, then dead).
            self.webhooks.deliver(&job.id, d).await?;
            return self.delivered(job).await;
        }
        if let JobAction::Publish(p) = &action {
            self.publish(p).await?;
            return self.delivered(job).await;
        }
        if let JobAction::Playbook(p) = &action {
            return self.run_playbook(job, &access, p).await;
        }
        if let JobAction::Email(e) = &action {
            self.emails.send(&job.id, e).await?;
            return self.delivered(job).await;
        }
        if let JobAction::Command(c) = &action {
            return self.run_command(job, &access, c).await;
        }
        let Some(sel) = sel else {
            return match &action {
                JobAction::RotateCerts(r) => self.run_rotation(job, r, stop).await,
                _ => Ok(Turn::Done),
            };
        };
        if job.total.is_none() {
            job.total = Some(self.count(&sel).await?);
            if !self.save(job).await? {
                return Ok(Turn::Lost);
            }
        }
        if *stop.borrow() {
            // Resumed from the stored cursor by whoever claims it next.
            return Ok(Turn::Stopped);
        }
        if let JobAction::Report(spec) = &action {
            return crate::reports::run_turn(self, job, spec, &sel, stop).await;
        }
        let batch_len = self.core.config.jobs.batch_len.clamp(1, BATCH_LEN_MAX);
        let (page, next) = self
            .registry
            .select_devices(&sel, job.cursor.as_deref(), batch_len)
            .await?;
        let ids: Vec<DeviceId> = page.iter().map(|d| d.record.id.clone()).collect();
        let outcomes = self.apply_batch(&access, &action, &ids).await;
        for (id, outcome) in ids.iter().zip(outcomes) {
            let id = id.as_str();
            match outcome {
                Ok(()) => job.done += 1,
                Err(e) if e.kind == ErrorKind::Internal || e.kind == ErrorKind::Unavailable => {
                    // The store failed: nothing of this batch is recorded; retried later.
                    return Err(e);
                }
                Err(e) => {
                    job.failed += 1;
                    if job.errors.len() < JOB_ERRORS_MAX {
                        job.errors.push(JobError {
                            device_id: id.to_owned(),
                            message: e.message,
                        });
                    }
                }
            }
        }
        if let Some(last) = page.last() {
            job.cursor = Some(last.record.id.to_string());
        }
        if next.is_none() {
            return self.finish_turn(job, JobState::Succeeded).await;
        }
        self.save_progress(job).await
    }

    /// Why the job's creator may no longer do what the job does (`None`: it still may): a user
    /// (`created_by` is an email) must still exist, be enabled and keep the role's
    /// permissions and the scope the job was made under; a token (`created_by` is its id) must
    /// still exist (not revoked), not be expired, and keep its role and scope.
    async fn creator_refused(
        &self,
        job: &JobRecord,
        action: &JobAction,
    ) -> ServiceResult<Option<String>> {
        let (role, scope) = match crate::access::principal_now(
            self.core.store.as_ref(),
            &job.created_by,
            self.core.now_ms(),
        )
        .await?
        {
            Ok(held) => held,
            Err(why) => return Ok(Some(why)),
        };
        if !action.allowed_for(role) {
            return Ok(Some(format!(
                "{} no longer has the permissions this job needs (role {})",
                job.created_by,
                role.as_str()
            )));
        }
        if scope != job.scope {
            return Ok(Some(format!(
                "the scope of {} changed since the job was created",
                job.created_by
            )));
        }
        Ok(None)
    }

    /// The action on one batch of devices: one result per device, in order. Tag changes go
    /// to the store together (one group-committed transaction on SQLite).
    async fn apply_batch(
        &self,
        access: &Access,
        action: &JobAction,
        ids: &[DeviceId],
    ) -> Vec<ServiceResult<()>> {
        match action {
            JobAction::Tag(tags) => {
                let set = |t: &mut BTreeMap<String, String>| {
                    t.extend(tags.iter().map(|(k, v)| (k.clone(), v.clone())))
                };
                self.registry.update_tags_many(access, ids, &set).await
            }
            JobAction::Untag(keys) => {
                let remove = |t: &mut BTreeMap<String, String>| {
                    for k in keys {
                        t.remove(k);
                    }
                };
                self.registry.update_tags_many(access, ids, &remove).await
            }
            JobAction::Delete => {
                let mut out = Vec::with_capacity(ids.len());
                for id in ids {
                    let deleted = match self.registry.delete_device(access, id.as_str()).await {
                        // Gone already (a batch applied again after a restart, or deleted
                        // meanwhile) is done; still there (moved out of the scope) is not.
                        Err(e) if e.kind == ErrorKind::NotFound => {
                            match self.core.store.get_device(id.as_str()).await {
                                Ok(None) => Ok(()),
                                Ok(Some(_)) => Err(e),
                                Err(store) => Err(store.into()),
                            }
                        }
                        other => other,
                    };
                    out.push(deleted);
                }
                out
            }
            JobAction::Command(_)
            | JobAction::RotateCerts(_)
            | JobAction::Report(_)
            | JobAction::Webhook(_)
            | JobAction::Publish(_)
            | JobAction::Email(_)
            | JobAction::Playbook(_) => ids
                .iter()
                .map(|_| Err(ServiceError::internal("this job acts on the selection")))
                .collect(),
        }
    }

    /// Action `command`: one fleet command to the selection, under an id stored first.
    async fn run_command(
        &self,
        job: &mut JobRecord,
        access: &Access,
        c: &JobCommand,
    ) -> ServiceResult<Turn> {
        let parent_id = match &job.command_id {
            Some(id) => id.clone(),
            None => {
                job.command_id = Some(crate::commands::new_fleet_command_id());
                if !self.save(job).await? {
                    return Ok(Turn::Lost);
                }
                job.command_id.clone().unwrap_or_default()
            }
        };
        let view = match self
            .commands
            .fleet_command(&Access::all(), &parent_id)
            .await?
        {
            // Created before a restart: not again.
            Some(v) => Ok(v),
            None => {
                self.commands
                    .create_fleet_command_as(access, &job.selector, c.new_command(), parent_id)
                    .await
            }
        };
        match view {
            Ok(v) => {
                job.total = Some(v.parent.total);
                job.done = v.parent.total;
                self.finish_turn(job, JobState::Succeeded).await
            }
            Err(e) if e.kind == ErrorKind::Internal || e.kind == ErrorKind::Unavailable => Err(e),
            Err(e) => {
                job.errors.push(JobError {
                    device_id: String::new(),
                    message: e.message,
                });
                self.finish_turn(job, JobState::Failed).await
            }
        }
    }

    /// Creates a fleet rotation: every device whose active certificate expires within
    /// `within_ms` from now is told to renew it (the command `mooring.cert.rotate`), at most
    /// `max_per_minute` requests a minute, by the job runner (module doc: stored progress,
    /// resumed after a restart, once across a cluster).
    pub async fn create_rotation(
        &self,
        access: &Access,
        creator: &Creator,
        within_ms: u64,
        max_per_minute: u32,
    ) -> ServiceResult<JobRecord> {
        let before_ms = self.core.now_ms().saturating_add(within_ms);
        let action = JobAction::RotateCerts(RotateCerts {
            before_ms,
            max_per_minute,
            fleet_issuer: None,
        });
        let what = format!("certificates expiring before {before_ms} ms");
        self.create(access, creator, &what, action).await
    }

    /// A fleet CA rollover's rotation (`registry/rollover.rs`): every active fleet certificate
    /// not from the CA the ledger names `fleet_issuer` (the previous CA's), at `max_per_minute`.
    pub async fn create_rollover_rotation(
        &self,
        access: &Access,
        creator: &Creator,
        fleet_issuer: &str,
        max_per_minute: u32,
    ) -> ServiceResult<JobRecord> {
        let action = JobAction::RotateCerts(RotateCerts {
            before_ms: u64::MAX,
            max_per_minute,
            fleet_issuer: Some(fleet_issuer.to_owned()),
        });
        let what = format!("certificates of fleet CAs other than {fleet_issuer}");
        self.create(access, creator, &what, action).await
    }

    /// What a rotation has done: `(confirmed, still_expiring)`. Confirmed are the selected
    /// certificates no longer active and expiring (rotated: revoked at confirmation).
    pub async fn rotation_progress(&self, job: &JobRecord) -> ServiceResult<(u64, u64)> {
        let Ok(JobAction::RotateCerts(r)) = JobAction::from_stored(&job.action, &job.params) else {
            return Err(job_not_found(&job.id));
        };
        let still = r
            .count(self.core.store.as_ref(), self.core.now_ms())
            .await?;
        Ok((job.total.unwrap_or(0).saturating_sub(still), still))
    }

    /// One turn of a fleet rotation: up to a tenth of a minute's requests, spaced evenly, the
    /// cursor (`<not_after>.<serial>` of the last certificate handled) stored after each.
    /// Requests carry the job id as idempotency key: one handled again after a restart is not
    /// sent twice.
    async fn run_rotation(
        &self,
        job: &mut JobRecord,
        r: &RotateCerts,
        stop: &watch::Receiver<bool>,
    ) -> ServiceResult<Turn> {
        let store = &self.core.store;
        if job.total.is_none() {
            job.total = Some(r.count(store.as_ref(), self.core.now_ms()).await?);
            if !self.save(job).await? {
                return Ok(Turn::Lost);
            }
        }
        let per_turn = (r.max_per_minute as usize / 6).clamp(1, BATCH_LEN_MAX);
        let interval = Duration::from_millis(60_000 / u64::from(r.max_per_minute.max(1)));
        if *stop.borrow() {
            return Ok(Turn::Stopped);
        }
        let cursor = job.cursor.clone();
        let after = cursor.as_deref().and_then(|c| {
            let (ms, serial) = c.split_once('.')?;
            Some((ms.parse::<u64>().ok()?, serial))
        });
        let page = r
            .page(store.as_ref(), self.core.now_ms(), per_turn, after)
            .await?;
        let last_page = page.len() < per_turn;
        for cert in page {
            if *stop.borrow() {
                return Ok(Turn::Stopped);
            }
            let c = NewCommand {
                name: crate::http::ROTATE_COMMAND.to_owned(),
                params: json!({}),
                ttl_secs: None,
                max_attempts: None,
                idempotency_key: Some(job.id.clone()),
                result_timeout_secs: None,
            };
            match self
                .commands
                .create_command(&Access::all(), cert.device_id.as_str(), c, None)
                .await
            {
                // Not created: asked already by this rotation (handled again after a restart
                // between the request and its progress write: it was not counted then).
                Ok(_) => job.done += 1,
                Err(e) if e.kind == ErrorKind::Internal || e.kind == ErrorKind::Unavailable => {
                    return Err(e)
                }
                Err(e) => {
                    job.failed += 1;
                    if job.errors.len() < JOB_ERRORS_MAX {
                        job.errors.push(JobError {
                            device_id: cert.device_id.to_string(),
                            message: e.message,
                        });
                    }
                }
            }
            job.cursor = Some(format!("{}.{}", cert.not_after_ms, cert.serial));
            if !self.save(job).await? {
                return Ok(Turn::Lost);
            }
            let mut stop = stop.clone();
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = stop.changed() => return Ok(Turn::Stopped),
            }
        }
        if last_page {
            return self.finish_turn(job, JobState::Succeeded).await;
        }
        Ok(Turn::Done)
    }

    /// How many devices `sel` matches now (one store count, no scan).
    async fn count(&self, sel: &Selector) -> ServiceResult<u64> {
        Ok(self
            .core
            .store
            .count_device_versions(&self.registry.filter_of(sel), 0)
            .await?
            .total)
    }

    /// Deletes finished jobs older than [`JOBS_KEPT_MS`] or beyond the newest [`JOBS_KEPT_MAX`].
    pub async fn prune(&self) -> ServiceResult<u64> {
        let before = self.core.now_ms().saturating_sub(JOBS_KEPT_MS);
        Ok(self.core.store.prune_jobs(before, JOBS_KEPT_MAX).await?)
    }
}

/// Whether a scoped caller sees a job: its selector carries every term of the scope.
fn visible(access: &Access, job: &JobRecord) -> bool {
    match access.scope() {
        None => true,
        Some(scope) => stored_selector(&job.selector)
            .is_ok_and(|s| scope.terms.iter().all(|t| s.terms.contains(t))),
    }
}

/// A job's stored selector; empty (a fleet report of every device, made unscoped) selects all.
pub(crate) fn stored_selector(
    text: &str,
) -> Result<Selector, mooring_proto::selector::SelectorError> {
    if text.is_empty() {
        return Ok(Selector { terms: Vec::new() });
    }
    Selector::parse(text)
}

fn job_not_found(id: &str) -> ServiceError {
    ServiceError::not_found("job_not_found", format!("job {id} not found"))
}

/// A new job, queued: `action` on `selector` under `access`'s scope, by `created_by`.
fn queued_job(
    now_ms: u64,
    action: &JobAction,
    selector: String,
    access: &Access,
    created_by: String,
) -> JobRecord {
    JobRecord {
        id: new_job_id(now_ms),
        action: action.name().to_owned(),
        selector,
        params: action.params(),
        scope: access.scope().map(|s| s.to_string()),
        state: JobState::Queued,
        total: None,
        done: 0,
        failed: 0,
        errors: Vec::new(),
        cursor: None,
        command_id: None,
        created_by,
        created_ms: now_ms,
        started_ms: None,
        finished_ms: None,
        rev: 0,
        worker: None,
        lease_until_ms: None,
        attempts: 0,
        run_after_ms: 0,
        last_error: None,
        result: None,
    }
}

/// A job ending without success shows no result bytes (they are dropped once it is stored).
fn drop_partial_result(job: &mut JobRecord) {
    if let Some(r) = job.result.as_mut() {
        r["bytes"] = json!(0);
    }
}

/// `job_<creation ms, 12 hex digits><8 random hex digits>`: ids sort by creation time, which
/// is the order the store lists them in.
fn new_job_id(now_ms: u64) -> String {
    let r: u32 = rand::random();
    format!("job_{now_ms:012x}{r:08x}")
}

/// One worker (`[jobs] workers` of them in every node; `mooring worker`'s): a pass at once,
/// then whenever a job is created on this node or every `[jobs] poll_interval_ms`; with
/// `prune`, it also prunes finished jobs once a minute while this node holds the lease
/// `jobs.runner`. Stops with the server, releasing the job it was running for another worker.
pub async fn run_jobs(
    jobs: Arc<Jobs>,
    worker: String,
    prune: bool,
    mut stop: watch::Receiver<bool>,
) {
    let poll = Duration::from_millis(jobs.core.config.jobs.poll_interval_ms.max(1));
    let mut last_prune_ms = 0u64;
    loop {
        if *stop.borrow() {
            return;
        }
        let mut wait = poll;
        match jobs.run_pass(&worker, &stop, TURNS_PER_PASS).await {
            Ok(Some(due_ms)) => {
                let in_ms = due_ms.saturating_sub(jobs.core.now_ms());
                wait = wait.min(Duration::from_millis(in_ms));
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "job worker pass failed; will retry"),
        }
        let now = jobs.core.now_ms();
        if prune
            && now.saturating_sub(last_prune_ms) >= PRUNE_INTERVAL_MS
            && jobs.holds_lease().await
        {
            last_prune_ms = now;
            match jobs.prune().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(jobs = n, "finished jobs pruned"),
                Err(e) => tracing::warn!(error = %e, "pruning jobs failed"),
            }
        }
        tokio::select! {
            _ = stop.changed() => return,
            _ = jobs.wake.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_take_exactly_their_parameter_and_round_trip_through_storage() {
        let tags: BTreeMap<String, String> = [("fw".to_owned(), "2".to_owned())].into();
        let tag = JobAction::from_request("tag", Some(tags.clone()), None, None).expect("tag");
        assert_eq!(tag, JobAction::Tag(tags.clone()));
        assert_eq!(
            JobAction::from_stored("tag", &tag.params()).expect("stored"),
            tag
        );
        let cmd = JobCommand {
            name: "reboot".to_owned(),
            params: json!({"delay": 1}),
            ttl_ms: Some(1500),
        };
        let c = JobAction::from_request("command", None, None, Some(cmd.clone())).expect("cmd");
        assert_eq!(
            JobAction::from_stored("command", &c.params()).expect("stored"),
            c
        );
        assert_eq!(cmd.new_command().ttl_secs, Some(2));
        let untag =
            JobAction::from_request("untag", None, Some(vec!["fw".into()]), None).expect("untag");
        assert_eq!(
            JobAction::from_stored("untag", &untag.params()).expect("s"),
            untag
        );
        assert_eq!(
            JobAction::from_request("delete", None, None, None).expect("delete"),
            JobAction::Delete
        );
        for bad in [
            JobAction::from_request("tag", None, None, None),
            JobAction::from_request("tag", Some(tags.clone()), Some(vec![]), None),
            JobAction::from_request("delete", Some(tags.clone()), None, None),
            JobAction::from_request("untag", None, Some(vec![]), None),
            JobAction::from_request("reboot", None, None, None),
            JobAction::from_request("tag", Some(BTreeMap::new()), None, None),
            JobAction::from_request(
                "tag",
                Some([("bad key".to_owned(), "v".to_owned())].into()),
                None,
                None,
            ),
        ] {
            assert_eq!(bad.map_err(|e| e.kind), Err(ErrorKind::InvalidArgument));
        }
    }

    #[test]
    fn job_ids_sort_by_creation_time() {
        let a = new_job_id(1_764_540_000_000);
        let b = new_job_id(1_764_540_000_001);
        assert!(a < b, "{a} {b}");
        assert!(a.starts_with("job_"));
    }
}
