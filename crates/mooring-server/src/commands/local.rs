//! Commands executed on a device's local API (issue 20, [`mooring_proto::local`]): the server
//! never sent them; their results arrive later through the device's durable outbox, with what ran
//! and when on the device's clock. Each is recorded once, finished, as `origin: local`.
//!
//! Owner and bounds: a record belongs to the device that published the result (or the child its
//! gateway relayed it for: the hooks allowed that already). Its id is derived from (device, local
//! id), so another device can neither collide with nor overwrite it, and a redelivery maps to
//! the same record (the store's idempotency key, the local id, answers `Existing`). Each device
//! may sync at most [`LOCAL_SYNCS_PER_MINUTE_MAX`] local results a minute: past that the result is
//! not acknowledged and stays in the device's outbox for later, so a long outage's backlog drains
//! at that pace and nothing is lost.

use super::Commands;
use crate::error::{ServiceError, ServiceResult};
use crate::metrics::Counters;
use mooring_proto::command::{is_valid_command_name, CommandResult, ResultStatus};
use mooring_store::{CommandOutcome, CommandRecord, CommandState, CreateOutcome, StoreError};
use sha2::Digest as _;

/// Local results one device may sync per minute.
pub const LOCAL_SYNCS_PER_MINUTE_MAX: u32 = 120;
/// Devices whose local syncs are counted at once (the rate table's bound).
pub const LOCAL_SYNCERS_MAX: usize = 200_000;
/// How far ahead of the server's clock a device's local times may be; later ones are taken as
/// the server's time (a device with a wrong clock cannot date a record into the future).
const LOCAL_CLOCK_AHEAD_MS_MAX: u64 = 24 * 3_600_000;

/// The stored id of the local command `local_id` of `device`: `l` + 31 hex digits of
/// SHA-256(device, local id), so ids of different devices never meet.
pub fn local_record_id(device: &str, local_id: &str) -> String {
    let mut h = sha2::Sha256::new();
    h.update(device.as_bytes());
    h.update([0u8]);
    h.update(local_id.as_bytes());
    let hex = hex::encode(h.finalize());
    format!("l{}", &hex[..31])
}

/// What became of a local result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalSync {
    /// Recorded now.
    Recorded,
    /// Recorded before (a redelivery): nothing changed.
    Duplicate,
    /// Not a valid local result (a bad name): dropped and counted, acknowledged so the device
    /// does not send it forever.
    Invalid,
}

impl Commands {
    /// Records the result of `device`'s local command `local_id` (a result with `local`).
    /// `Err(TooManyRequests)` past the per-device rate: the device keeps it and sends it again.
    pub(crate) async fn record_local(
        &self,
        device: &str,
        local_id: &str,
        result: CommandResult,
    ) -> ServiceResult<LocalSync> {
        let Some(local) = result.local else {
            return Ok(LocalSync::Invalid);
        };
        if !local_id.starts_with(mooring_proto::local::LOCAL_ID_PREFIX) {
            // Only `l-` ids are local: anything else could meet an operator's idempotency key.
            Counters::inc(&self.core.counters.command_replies_ignored);
            tracing::info!(
                device,
                local_id,
                "local command result without the l- prefix ignored"
            );
            return Ok(LocalSync::Invalid);
        }
        let now_ms = self.core.now_ms();
        if self
            .local_syncs
            .count(device, now_ms, LOCAL_SYNCS_PER_MINUTE_MAX)
            .is_err()
        {
            return Err(ServiceError::new(
                crate::error::ErrorKind::TooManyRequests,
                "rate_limited",
                format!("more than {LOCAL_SYNCS_PER_MINUTE_MAX} local command results a minute"),
            ));
        }
        let device_id = match crate::registry::Registry::parse_id(device) {
            Ok(d) => d,
            Err(_) => return Ok(LocalSync::Invalid),
        };
        if !is_valid_command_name(&local.name) {
            Counters::inc(&self.core.counters.command_replies_ignored);
            tracing::info!(
                device,
                local_id,
                "local command result with an invalid name ignored"
            );
            return Ok(LocalSync::Invalid);
        }
        let latest = now_ms.saturating_add(LOCAL_CLOCK_AHEAD_MS_MAX);
        let clamp = |at: u64| if at > latest { now_ms } else { at };
        let requested_at = clamp(local.requested_at);
        let finished_at = clamp(local.finished_at).max(requested_at);
        let succeeded = result.status == ResultStatus::Succeeded;
        let state = if succeeded {
            CommandState::Succeeded
        } else {
            CommandState::Failed
        };
        let record = CommandRecord {
            id: local_record_id(device, local_id),
            device_id,
            name: local.name,
            params: local.params,
            state,
            attempts: 0,
            max_attempts: 0,
            created_at_ms: requested_at,
            expires_at_ms: finished_at,
            next_attempt_at_ms: finished_at,
            parent_id: None,
            idempotency_key: Some(local_id.to_owned()),
            history: vec![(CommandState::Queued, requested_at), (state, finished_at)],
            result: Some(CommandOutcome {
                succeeded,
                output: result.output,
            }),
            result_timeout_ms: 0,
            synced_at_ms: Some(now_ms),
        };
        match self.core.store.create_commands(None, vec![record]).await {
            Ok(mut out) => match out.pop() {
                Some(CreateOutcome::Created(r)) => {
                    tracing::info!(device, local_id, id = %r.id, name = %r.name, "command executed locally synced");
                    Ok(LocalSync::Recorded)
                }
                _ => Ok(LocalSync::Duplicate),
            },
            // Stored meanwhile by another node (the same id).
            Err(StoreError::AlreadyExists(_)) => Ok(LocalSync::Duplicate),
            // The device is gone: nothing to record it for.
            Err(StoreError::NotFound(_)) => Ok(LocalSync::Invalid),
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_ids_are_per_device_and_command_id_shaped() {
        let a = local_record_id("lock-1", "l1");
        assert_eq!(a, local_record_id("lock-1", "l1"));
        assert_ne!(a, local_record_id("lock-2", "l1"));
        assert_ne!(a, local_record_id("lock-1", "l2"));
        assert_eq!(a.len(), 32);
        assert!(mooring_proto::command::is_valid_command_id(&a));
    }
}
