//! Device commands: create (idempotent), deliver over MQTT in order, retry with backoff, expire,
//! cancel, record acks and results, fan out fleet commands, and wake synchronous waiters.
//!
//! Every state change goes through [`state::apply`] under its command's mutation lock (one of
//! [`MUTATION_LOCKS`] striped by command id, so changes to different commands proceed side by
//! side and their store writes share group commits), is stored (compare-and-set on the previous
//! state) and only then announced: to API waiters through a `watch` per waited-on command id (no
//! database polling) and to the metrics.
//!
//! Delivery is owned by one dispatcher task ([`run_dispatcher`]) fed by "kicks" (device ids): on
//! create, when a device connects, when it subscribes to a filter covering its commands topic,
//! and when the scheduler ([`run_scheduler`]) finds a retry due. It takes the kicked devices as a
//! set and delivers to up to [`DELIVERIES_CONCURRENT_MAX`] of them at once, and takes the next
//! set only when that one is done, so one device's commands are published in order and never
//! twice concurrently. A command counts as an attempt only when the broker actually enqueued it
//! to the device's live, subscribed session.

mod delivery;
pub mod local;
pub mod state;

pub use delivery::{run_dispatcher, run_scheduler};

use crate::access::Access;
use crate::app::Core;
use crate::error::{ErrorKind, ServiceError, ServiceResult};
use crate::metrics::Counters;
use crate::registry::Registry;
use mooring_proto::command::{
    is_valid_command_name, CommandResult, ResultStatus, COMMAND_BODY_SIZE_BYTES_MAX,
};
use mooring_proto::selector::Selector;
use mooring_proto::sync::lock;
use mooring_proto::DeviceId;
use mooring_store::{
    CommandOutcome, CommandParentRecord, CommandRecord, CommandState, CreateOutcome,
};
use state::{Event, Step};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{watch, Notify};

/// Longest `ttl_secs` (30 days).
pub const TTL_SECS_MAX: u64 = 30 * 86_400;
/// Largest `max_attempts`.
pub const MAX_ATTEMPTS_MAX: u32 = 100;
/// Longest `result_timeout_secs` (a week).
pub const RESULT_TIMEOUT_SECS_MAX: u64 = 7 * 86_400;
/// Longest `wait_ms` on create / get.
pub const WAIT_MS_MAX: u64 = 30_000;
/// Command ids being waited on at once (each id may have many waiters).
pub const WAITED_COMMANDS_MAX: usize = 10_000;
/// Devices waiting for the dispatcher.
pub const KICKS_PENDING_MAX: usize = 100_000;
/// Commands the dispatcher publishes to one device per pass (it re-kicks itself for more).
pub const DELIVERY_BATCH_LEN_MAX: usize = 100;
/// Devices the dispatcher delivers to at once.
pub const DELIVERIES_CONCURRENT_MAX: usize = 64;
/// Mutation locks, striped by command id.
pub const MUTATION_LOCKS: usize = 256;
/// Commands the scheduler handles per tick.
pub const SCHEDULER_BATCH_LEN_MAX: usize = 1000;
/// Devices one fleet command may address.
pub const FLEET_DEVICES_MAX: usize = 1_000_000;

/// Longest idempotency key.
pub const IDEMPOTENCY_KEY_LEN_MAX: usize = 128;
/// Most commands one list call returns.
pub const COMMAND_PAGE_LEN_MAX: usize = 1000;
pub const COMMAND_PAGE_LEN_DEFAULT: usize = 100;

/// The command service: the command store, the mutation lock, the `wait_ms` waiters and the
/// dispatcher's kick set.
pub struct Commands {
    core: Arc<Core>,
    registry: Arc<Registry>,
    mutate: Vec<tokio::sync::Mutex<()>>,
    waiters: Mutex<HashMap<String, watch::Sender<CommandState>>>,
    kicks: Mutex<BTreeMap<DeviceId, bool>>,
    kick_notify: Notify,
    /// Local command results synced per device this minute ([`local`]).
    local_syncs: crate::ratelimit::PerMinute,
}

impl Commands {
    pub(crate) fn new(core: Arc<Core>, registry: Arc<Registry>) -> Self {
        Self {
            core,
            registry,
            mutate: (0..MUTATION_LOCKS)
                .map(|_| tokio::sync::Mutex::default())
                .collect(),
            waiters: Mutex::default(),
            kicks: Mutex::default(),
            kick_notify: Notify::new(),
            local_syncs: crate::ratelimit::PerMinute::new(local::LOCAL_SYNCERS_MAX),
        }
    }

    /// Asks the dispatcher to deliver what is pending for `device_id`; `all_delivered` also
    /// redelivers unacknowledged commands whose retry is not yet due (after a (re)connect).
    /// In a cluster, a device whose commands subscription is not on this node is asked of the
    /// other nodes (the one holding its session delivers).
    pub fn kick(&self, device_id: &DeviceId, all_delivered: bool) {
        if let Some(cluster) = self.core.cluster() {
            let here = self.carrier(device_id).is_some();
            if !here {
                cluster.kick(device_id, all_delivered);
                return;
            }
        }
        self.kick_local(device_id, all_delivered);
    }

    /// A kick from another node: delivered here only if this node holds the device's session.
    pub(crate) fn kick_here(&self, device_id: &str, all_delivered: bool) {
        let Ok(device_id) = DeviceId::parse(device_id) else {
            return;
        };
        if self.carrier(&device_id).is_some() {
            self.kick_local(&device_id, all_delivered);
        }
    }

    /// Whose connected session here takes `device_id`'s commands: its own, or, for a child, its
    /// gateway's (subscribed on the child's commands topic, docs/edge.md). `None`: neither.
    pub(crate) fn carrier(&self, device_id: &DeviceId) -> Option<String> {
        let broker = self.core.broker()?;
        let topic = mooring_proto::Topic::command(device_id, "c");
        if broker.device_is_subscribed(device_id, &topic) {
            return Some(device_id.to_string());
        }
        let gateway = self.registry.gateways().gateway_of(device_id.as_str())?;
        broker
            .device_is_subscribed(&gateway, &topic)
            .then_some(gateway)
    }

    /// [`Commands::kick`] on this node only (the device's session is here).
    pub(crate) fn kick_local(&self, device_id: &DeviceId, all_delivered: bool) {
        {
            let mut k = lock(&self.kicks);
            if let Some(flag) = k.get_mut(device_id) {
                *flag |= all_delivered;
            } else if k.len() < KICKS_PENDING_MAX {
                k.insert(device_id.clone(), all_delivered);
            } else {
                tracing::warn!(
                    device = %device_id,
                    "command dispatcher backlog full; delivery waits for the next retry or reconnect"
                );
                return;
            }
        }
        self.kick_notify.notify_one();
    }

    /// The mutation lock of command `id`: held across read, [`state::apply`] and store.
    async fn lock_command(&self, id: &str) -> tokio::sync::MutexGuard<'_, ()> {
        use std::hash::{BuildHasher, BuildHasherDefault};
        let hash =
            BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default().hash_one(id);
        let stripe = usize::try_from(hash % MUTATION_LOCKS as u64).unwrap_or(0);
        self.mutate[stripe].lock().await
    }

    fn take_kicks(&self) -> BTreeMap<DeviceId, bool> {
        std::mem::take(&mut *lock(&self.kicks))
    }

    fn notify(&self, id: &str, state: CommandState) {
        self.notify_here(id, state);
        if state.is_final() {
            if let Some(cluster) = self.core.cluster() {
                cluster.command_final(id, state.as_str());
            }
        }
    }

    /// A command was stored in a new state: its live event.
    fn announce(&self, r: &CommandRecord) {
        self.core.events.publish(
            Some(&r.device_id),
            mooring_api::EventBody::Command {
                command_id: r.id.clone(),
                name: r.name.clone(),
                state: r.state.as_str().to_owned(),
                parent_id: r.parent_id.clone(),
            },
        );
    }

    /// Wakes this node's `wait_ms` waiters on command `id` (also for another node's transition).
    pub(crate) fn notify_here(&self, id: &str, state: CommandState) {
        if let Some(tx) = lock(&self.waiters).get(id) {
            tx.send_replace(state);
        }
    }

    /// Command ids being waited on now (`/metrics`).
    pub fn waited_commands(&self) -> usize {
        lock(&self.waiters).len()
    }
}

/// One `wait_ms` waiter. However the wait ends, including the request being dropped because the
/// client went away, the command's entry leaves the waiter map once nobody waits on it, so
/// abandoned waits can never fill the map.
struct Waiter<'a> {
    waiters: &'a Mutex<HashMap<String, watch::Sender<CommandState>>>,
    id: String,
    rx: Option<watch::Receiver<CommandState>>,
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        drop(self.rx.take());
        let mut w = lock(self.waiters);
        if w.get(&self.id).is_some_and(|tx| tx.receiver_count() == 0) {
            w.remove(&self.id);
        }
    }
}

/// A new command as the API asks for it.
#[derive(Debug, Clone)]
pub struct NewCommand {
    pub name: String,
    pub params: serde_json::Value,
    pub ttl_secs: Option<u64>,
    pub max_attempts: Option<u32>,
    pub idempotency_key: Option<String>,
    /// How long it may stay acknowledged without a result before it fails with `timeout`
    /// (0: no limit); `None`: the server's `commands.default_result_timeout_secs`.
    pub result_timeout_secs: Option<u64>,
}

/// A fleet command with its children's aggregate state.
#[derive(Debug, Clone)]
pub struct FleetCommandView {
    pub parent: CommandParentRecord,
    pub counts: BTreeMap<CommandState, u64>,
    /// Every child is in a final state.
    pub done: bool,
}

/// Whether a command failed because its result did not come in time.
fn timed_out(r: &CommandRecord) -> bool {
    r.state == CommandState::Failed
        && r.result
            .as_ref()
            .is_some_and(|o| o.output.get("reason").and_then(|v| v.as_str()) == Some("timeout"))
}

/// A new fleet command (parent) id.
pub fn new_fleet_command_id() -> String {
    new_id('f')
}

fn new_id(prefix: char) -> String {
    let bytes: [u8; 16] = rand::random();
    format!("{prefix}{}", hex::encode(bytes))
}

fn command_not_found(id: &str) -> ServiceError {
    ServiceError::not_found("command_not_found", format!("command {id} not found"))
}

/// Validates `wait_ms` (0..=[`WAIT_MS_MAX`]).
pub fn check_wait_ms(wait_ms: Option<u64>) -> ServiceResult<u64> {
    let w = wait_ms.unwrap_or(0);
    if w > WAIT_MS_MAX {
        return Err(ServiceError::invalid(
            "invalid_wait_ms",
            format!("wait_ms must be between 0 and {WAIT_MS_MAX}"),
        ));
    }
    Ok(w)
}

impl Commands {
    fn retry_backoff_ms(&self, attempts: u32) -> u64 {
        let c = &self.core.config.commands;
        let shift = attempts.saturating_sub(1).min(32);
        c.retry_backoff_initial_ms
            .saturating_mul(1u64 << shift)
            .min(c.retry_backoff_max_ms)
    }

    fn build_command(
        &self,
        device_id: &DeviceId,
        c: &NewCommand,
        parent_id: Option<&str>,
        now_ms: u64,
    ) -> ServiceResult<CommandRecord> {
        if !is_valid_command_name(&c.name) {
            return Err(ServiceError::invalid(
                "invalid_command_name",
                "name must be 1-64 characters of letters, digits, '_', '.', '-', starting with a letter or digit",
            ));
        }
        let params_len = serde_json::to_vec(&c.params).map_or(usize::MAX, |v| v.len());
        if params_len > COMMAND_BODY_SIZE_BYTES_MAX {
            return Err(ServiceError::invalid(
                "params_too_large",
                format!("params must encode to at most {COMMAND_BODY_SIZE_BYTES_MAX} bytes"),
            ));
        }
        let ttl_secs = c
            .ttl_secs
            .unwrap_or(self.core.config.commands.default_ttl_secs);
        if ttl_secs == 0 || ttl_secs > TTL_SECS_MAX {
            return Err(ServiceError::invalid(
                "invalid_ttl",
                format!("ttl_secs must be between 1 and {TTL_SECS_MAX}"),
            ));
        }
        let max_attempts = c
            .max_attempts
            .unwrap_or(self.core.config.commands.default_max_attempts);
        if max_attempts == 0 || max_attempts > MAX_ATTEMPTS_MAX {
            return Err(ServiceError::invalid(
                "invalid_max_attempts",
                format!("max_attempts must be between 1 and {MAX_ATTEMPTS_MAX}"),
            ));
        }
        if let Some(k) = &c.idempotency_key {
            if k.is_empty()
                || k.len() > IDEMPOTENCY_KEY_LEN_MAX
                || k.chars().any(|ch| ch.is_control())
            {
                return Err(ServiceError::invalid(
                    "invalid_idempotency_key",
                    format!(
                        "idempotency_key must be 1-{IDEMPOTENCY_KEY_LEN_MAX} printable characters"
                    ),
                ));
            }
            if k.starts_with(mooring_proto::local::LOCAL_ID_PREFIX) {
                // The keys of commands run on devices' local APIs: a command from here must
                // never meet one (issue 20).
                return Err(ServiceError::invalid(
                    "invalid_idempotency_key",
                    format!(
                        "idempotency keys starting with {:?} are reserved for commands run on a device's local API",
                        mooring_proto::local::LOCAL_ID_PREFIX
                    ),
                ));
            }
        }
        let result_timeout_secs = c
            .result_timeout_secs
            .unwrap_or(self.core.config.commands.default_result_timeout_secs);
        if result_timeout_secs > RESULT_TIMEOUT_SECS_MAX {
            return Err(ServiceError::invalid(
                "invalid_result_timeout",
                format!("result_timeout_secs must be between 0 (no limit) and {RESULT_TIMEOUT_SECS_MAX}"),
            ));
        }
        Ok(CommandRecord {
            id: new_id('c'),
            device_id: device_id.clone(),
            name: c.name.clone(),
            params: c.params.clone(),
            state: CommandState::Queued,
            attempts: 0,
            max_attempts,
            created_at_ms: now_ms,
            expires_at_ms: now_ms.saturating_add(ttl_secs.saturating_mul(1000)),
            next_attempt_at_ms: now_ms,
            parent_id: parent_id.map(str::to_owned),
            idempotency_key: c.idempotency_key.clone(),
            history: vec![(CommandState::Queued, now_ms)],
            result: None,
            result_timeout_ms: result_timeout_secs.saturating_mul(1000),
            synced_at_ms: None,
        })
    }

    /// Checks a command as [`Commands::create_fleet_command`] would (name, params size, TTL,
    /// attempts), without creating anything: a bulk job checks its command when it is created.
    pub fn check_command(&self, c: &NewCommand) -> ServiceResult<()> {
        let probe_device = DeviceId::parse("probe").map_err(ServiceError::internal)?;
        self.build_command(&probe_device, c, None, self.core.now_ms())
            .map(|_| ())
    }

    /// Creates a command for one device (durably) and asks for its delivery. `true` if it was
    /// created, `false` if an earlier command with the same idempotency key is returned.
    pub async fn create_command(
        &self,
        access: &Access,
        device_id: &str,
        c: NewCommand,
        wait_ms: Option<u64>,
    ) -> ServiceResult<(bool, CommandRecord)> {
        let wait_ms = check_wait_ms(wait_ms)?;
        let device = self.registry.get_device(access, device_id).await?;
        let record = self.build_command(&device.record.id, &c, None, self.core.now_ms())?;
        let outcome = self
            .core
            .store
            .create_commands(None, vec![record])
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| ServiceError::internal("store returned no outcome"))?;
        let created = matches!(outcome, CreateOutcome::Created(_));
        let record = outcome.into_record();
        if created {
            Counters::inc(&self.core.counters.commands_created);
            self.announce(&record);
            self.kick(&record.device_id, false);
        }
        let record = self.wait_command(record, wait_ms).await?;
        Ok((created, record))
    }

    /// One command of one device, after waiting up to `wait_ms` for a final state.
    pub async fn get_command(
        &self,
        access: &Access,
        device_id: &str,
        id: &str,
        wait_ms: Option<u64>,
    ) -> ServiceResult<CommandRecord> {
        let wait_ms = check_wait_ms(wait_ms)?;
        let device = self.registry.get_device(access, device_id).await?.record.id;
        let record = self.command_of(device.as_str(), id).await?;
        self.wait_command(record, wait_ms).await
    }

    /// Any command by id (device command), for `GET /api/v1/commands/<id>`.
    pub async fn find_command(
        &self,
        access: &Access,
        id: &str,
    ) -> ServiceResult<Option<CommandRecord>> {
        let Some(record) = self.core.store.get_command(id).await? else {
            return Ok(None);
        };
        if access.scope().is_some() {
            match self
                .registry
                .get_device(access, record.device_id.as_str())
                .await
            {
                Ok(_) => {}
                Err(e) if e.kind == ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e),
            }
        }
        Ok(Some(record))
    }

    async fn command_of(&self, device_id: &str, id: &str) -> ServiceResult<CommandRecord> {
        match self.core.store.get_command(id).await? {
            Some(r) if r.device_id == device_id => Ok(r),
            _ => Err(command_not_found(id)),
        }
    }

    async fn wait_command(
        &self,
        record: CommandRecord,
        wait_ms: u64,
    ) -> ServiceResult<CommandRecord> {
        if wait_ms == 0 || record.state.is_final() {
            return Ok(record);
        }
        let id = record.id.clone();
        let rx = {
            let mut w = lock(&self.waiters);
            match w.get(&id) {
                Some(tx) => tx.subscribe(),
                None if w.len() < WAITED_COMMANDS_MAX => {
                    let (tx, rx) = watch::channel(record.state);
                    w.insert(id.clone(), tx);
                    rx
                }
                None => {
                    return Err(ServiceError::new(
                        ErrorKind::Unavailable,
                        "too_many_waiters",
                        format!("more than {WAITED_COMMANDS_MAX} commands are being waited on; retry without wait_ms"),
                    ))
                }
            }
        };
        let mut waiter = Waiter {
            waiters: &self.waiters,
            id: id.clone(),
            rx: Some(rx),
        };
        // Re-read after subscribing: a transition between the first read and the subscription
        // is then seen here rather than missed.
        let current = self.core.store.get_command(&id).await?;
        if let (false, Some(rx)) = (
            current.as_ref().is_some_and(|r| r.state.is_final()),
            waiter.rx.as_mut(),
        ) {
            let _ = tokio::time::timeout(Duration::from_millis(wait_ms), async {
                while rx.changed().await.is_ok() {
                    if rx.borrow().is_final() {
                        break;
                    }
                }
            })
            .await;
        }
        drop(waiter);
        self.core
            .store
            .get_command(&id)
            .await?
            .ok_or_else(|| command_not_found(&id))
    }

    /// A device's commands, newest first.
    pub async fn list_commands(
        &self,
        access: &Access,
        device_id: &str,
        state: Option<&str>,
        limit: Option<usize>,
        cursor: Option<&str>,
    ) -> ServiceResult<(Vec<CommandRecord>, Option<String>)> {
        let device = self.registry.get_device(access, device_id).await?;
        let state = state
            .map(|s| {
                s.parse::<CommandState>().map_err(|_| {
                    ServiceError::invalid(
                        "invalid_state",
                        format!("state {s:?} is not one of queued, delivered, acknowledged, succeeded, failed, expired, canceled"),
                    )
                })
            })
            .transpose()?;
        let limit = limit.unwrap_or(COMMAND_PAGE_LEN_DEFAULT);
        if limit == 0 || limit > COMMAND_PAGE_LEN_MAX {
            return Err(ServiceError::invalid(
                "invalid_limit",
                format!("limit must be between 1 and {COMMAND_PAGE_LEN_MAX}"),
            ));
        }
        let records = self
            .core
            .store
            .list_commands(&device.record.id, state, limit, cursor)
            .await
            .map_err(|e| match e {
                mooring_store::StoreError::InvalidInput(_) => {
                    ServiceError::invalid("invalid_cursor", "cursor is not valid")
                }
                other => other.into(),
            })?;
        let next = if records.len() == limit {
            records.last().map(|r| r.id.clone())
        } else {
            None
        };
        Ok((records, next))
    }

    /// Applies `event` to command `id` under its mutation lock, stores it, then announces it.
    /// `Ok(None)` if the command does not exist (or belongs to another device).
    async fn transition(
        &self,
        device_id: Option<&str>,
        id: &str,
        event: Event,
    ) -> ServiceResult<Option<(Step, CommandRecord)>> {
        let _guard = self.lock_command(id).await;
        let Some(mut record) = self.core.store.get_command(id).await? else {
            return Ok(None);
        };
        if device_id.is_some_and(|d| record.device_id != d) {
            return Ok(None);
        }
        let from = record.state;
        let step = state::apply(&mut record, event, self.core.now_ms());
        if let Step::To(to) = step {
            if !self.core.store.update_command(record.clone(), from).await? {
                return Err(ServiceError::internal(format!(
                    "command {id} changed state concurrently"
                )));
            }
            self.count_transition(to);
            self.announce(&record);
            self.notify(id, to);
            if to.is_final() && to != CommandState::Succeeded {
                if let Err(e) = crate::ota::update_command_ended(&self.core, &record).await {
                    tracing::warn!(command = id, error = %e.message, "the update of an ended update command was not marked failed");
                }
            }
        }
        Ok(Some((step, record)))
    }

    /// A result that came after the command failed with `timeout`: kept in its result as
    /// `late_result` (the state stays `failed`), once.
    async fn record_late_result(&self, id: &str, outcome: CommandOutcome) -> ServiceResult<()> {
        let _guard = self.lock_command(id).await;
        let Some(mut record) = self.core.store.get_command(id).await? else {
            return Ok(());
        };
        if !timed_out(&record) {
            return Ok(());
        }
        let Some(result) = record.result.as_mut() else {
            return Ok(());
        };
        if result.output.get("late_result").is_some() {
            return Ok(());
        }
        result.output["late_result"] = serde_json::json!({
            "succeeded": outcome.succeeded,
            "output": outcome.output,
        });
        self.core
            .store
            .update_command(record, CommandState::Failed)
            .await?;
        Counters::inc(&self.core.counters.commands_late_results);
        tracing::info!(
            command = id,
            "result arrived after the result timeout; recorded as late"
        );
        Ok(())
    }

    fn count_transition(&self, to: CommandState) {
        let c = &self.core.counters;
        match to {
            CommandState::Succeeded => Counters::inc(&c.commands_succeeded),
            CommandState::Failed => Counters::inc(&c.commands_failed),
            CommandState::Expired => Counters::inc(&c.commands_expired),
            CommandState::Canceled => Counters::inc(&c.commands_canceled),
            _ => {}
        }
    }

    /// Cancels a command that is not yet acknowledged; `409 command_not_cancelable` otherwise.
    pub async fn cancel_command(
        &self,
        access: &Access,
        device_id: &str,
        id: &str,
    ) -> ServiceResult<CommandRecord> {
        let device = self.registry.get_device(access, device_id).await?.record.id;
        match self
            .transition(Some(device.as_str()), id, Event::Cancel)
            .await?
        {
            None => Err(command_not_found(id)),
            Some((Step::Refused, r)) => Err(ServiceError::new(
                ErrorKind::Conflict,
                "command_not_cancelable",
                format!(
                    "command {id} is {}; only queued or delivered commands can be canceled",
                    r.state
                ),
            )),
            Some((_, r)) => Ok(r),
        }
    }

    /// A device acknowledged (`result: None`) or reported the result of one of its commands.
    /// `Err` only if the store failed (the device's publish is then not acknowledged).
    pub async fn on_reply(
        &self,
        device_id: &str,
        id: &str,
        result: Option<&[u8]>,
    ) -> ServiceResult<()> {
        let event = match result {
            None => Event::Acked,
            Some(payload) => match CommandResult::parse(payload) {
                Ok(r) if r.local.is_some() => {
                    // Executed on the device's local API: the server never sent it.
                    return self.record_local(device_id, id, r).await.map(|_| ());
                }
                Ok(r) => Event::Finished(CommandOutcome {
                    succeeded: r.status == ResultStatus::Succeeded,
                    output: r.output,
                }),
                Err(e) => {
                    Counters::inc(&self.core.counters.command_replies_ignored);
                    tracing::info!(device = device_id, command = id, error = %e, "invalid command result ignored");
                    return Ok(());
                }
            },
        };
        let late = match &event {
            Event::Finished(o) => Some(o.clone()),
            _ => None,
        };
        match self.transition(Some(device_id), id, event).await? {
            Some((Step::To(_) | Step::Stay, _)) => {}
            Some((Step::Refused, r)) if late.is_some() && timed_out(&r) => {
                if let Some(outcome) = late {
                    self.record_late_result(id, outcome).await?;
                }
            }
            Some((Step::Refused, r)) => {
                Counters::inc(&self.core.counters.command_replies_ignored);
                tracing::debug!(device = device_id, command = id, state = %r.state, "late command reply ignored");
            }
            None => {
                Counters::inc(&self.core.counters.command_replies_ignored);
                tracing::info!(
                    device = device_id,
                    command = id,
                    "reply for an unknown or foreign command ignored"
                );
            }
        }
        Ok(())
    }

    /// Creates one command per device matching `selector`, under one parent, in one transaction.
    pub async fn create_fleet_command(
        &self,
        access: &Access,
        selector: &str,
        c: NewCommand,
    ) -> ServiceResult<FleetCommandView> {
        self.create_fleet_command_as(access, selector, c, new_fleet_command_id())
            .await
    }

    /// [`Commands::create_fleet_command`] under a parent id chosen (and recorded) by the caller
    /// beforehand: a bulk job stores the id first, so after a restart it can tell whether the
    /// fleet command exists and never creates it twice.
    pub async fn create_fleet_command_as(
        &self,
        access: &Access,
        selector: &str,
        c: NewCommand,
        parent_id: String,
    ) -> ServiceResult<FleetCommandView> {
        if c.idempotency_key.is_some() {
            return Err(ServiceError::invalid(
                "invalid_body",
                "idempotency_key is per device; fleet commands do not take one",
            ));
        }
        let sel = parse_selector(selector)?;
        // A scoped caller's fleet command reaches only its devices; the parent records the
        // narrowed selector, which is what was applied.
        let sel = access.narrow(Some(sel.clone())).unwrap_or(sel);
        let now_ms = self.core.now_ms();
        // Validate once before touching the fleet.
        let probe_device = DeviceId::parse("probe").map_err(ServiceError::internal)?;
        let probe = self.build_command(&probe_device, &c, Some(&parent_id), now_ms)?;
        let page_len = self.core.config.commands.fleet_page_len.max(1);
        // The matching devices, in pages of the registry (ids only).
        let mut devices: Vec<DeviceId> = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let (page, next) = self
                .registry
                .select_devices(&sel, cursor.as_deref(), page_len)
                .await?;
            devices.extend(page.into_iter().map(|d| d.record.id));
            if devices.len() > FLEET_DEVICES_MAX {
                return Err(ServiceError::invalid(
                    "too_many_devices",
                    format!("the selector matches more than {FLEET_DEVICES_MAX} devices"),
                ));
            }
            match next {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
        let parent = CommandParentRecord {
            id: parent_id.clone(),
            selector: sel.to_string(),
            name: probe.name,
            params: probe.params,
            created_at_ms: now_ms,
            expires_at_ms: probe.expires_at_ms,
            total: devices.len() as u64,
        };
        // One parent, children in pages of `fleet_page_len` (one transaction each, so a large
        // fleet never holds the writer for long); each page's devices are kicked at once.
        // At least one page, so the parent is stored even when nothing matches.
        let pages: Vec<&[DeviceId]> = if devices.is_empty() {
            vec![&[]]
        } else {
            devices.chunks(page_len).collect()
        };
        let mut parent_once = Some(parent.clone());
        for page in pages {
            let first = parent_once.take();
            let build = |ids: &[DeviceId]| {
                ids.iter()
                    .map(|d| self.build_command(d, &c, Some(&parent_id), now_ms))
                    .collect::<ServiceResult<Vec<_>>>()
            };
            let outcomes = match self
                .core
                .store
                .create_commands(first.clone(), build(page)?)
                .await
            {
                Ok(o) => o,
                // A device deleted since it was selected: that page again without it.
                Err(mooring_store::StoreError::NotFound(_)) => {
                    let mut still = Vec::with_capacity(page.len());
                    for d in page {
                        if self.core.store.get_device(d).await?.is_some() {
                            still.push(d.clone());
                        }
                    }
                    self.core
                        .store
                        .create_commands(first, build(&still)?)
                        .await?
                }
                Err(e) => return Err(e.into()),
            };
            Counters::add(&self.core.counters.commands_created, outcomes.len() as u64);
            for o in &outcomes {
                if matches!(o, CreateOutcome::Created(_)) {
                    self.announce(o.record());
                }
            }
            // In a cluster, kick only devices online somewhere (one store lookup per page): an
            // offline device gets its commands when it connects, and the bus carries no kicks
            // for it.
            let online = match self.core.cluster() {
                Some(cluster) => {
                    let ids: Vec<String> = outcomes
                        .iter()
                        .map(|o| o.record().device_id.to_string())
                        .collect();
                    let mut online = std::collections::BTreeSet::new();
                    for chunk in ids.chunks(mooring_store::SESSION_LOOKUP_LEN_MAX) {
                        online.extend(
                            self.registry
                                .presence()
                                .online(chunk, cluster.alive_since_ms())
                                .await?,
                        );
                    }
                    Some(online)
                }
                None => None,
            };
            for o in &outcomes {
                let device = &o.record().device_id;
                if online
                    .as_ref()
                    .is_some_and(|on| !on.contains(device.as_str()))
                {
                    continue;
                }
                self.kick(device, false);
            }
        }
        self.fleet_command(&Access::all(), &parent.id)
            .await?
            .ok_or_else(|| ServiceError::internal(format!("fleet command {} vanished", parent.id)))
    }

    /// A fleet command with counts per state; `None` if there is no such parent.
    /// A scoped caller sees only fleet commands whose selector carries every term of its scope
    /// (those created within it).
    pub async fn fleet_command(
        &self,
        access: &Access,
        id: &str,
    ) -> ServiceResult<Option<FleetCommandView>> {
        let Some(parent) = self.core.store.get_command_parent(id).await? else {
            return Ok(None);
        };
        if let Some(scope) = access.scope() {
            let within = Selector::parse(&parent.selector)
                .is_ok_and(|s| scope.terms.iter().all(|t| s.terms.contains(t)));
            if !within {
                return Ok(None);
            }
        }
        let counts = self.core.store.count_children(id).await?;
        let finals: u64 = counts
            .iter()
            .filter(|(s, _)| s.is_final())
            .map(|(_, n)| n)
            .sum();
        let all: u64 = counts.values().sum();
        Ok(Some(FleetCommandView {
            done: finals == all,
            parent,
            counts,
        }))
    }
}

/// Parses a selector; errors are `400 invalid_selector` with the parser's reason.
pub fn parse_selector(text: &str) -> ServiceResult<Selector> {
    Selector::parse(text).map_err(|e| ServiceError::invalid("invalid_selector", e.to_string()))
}
