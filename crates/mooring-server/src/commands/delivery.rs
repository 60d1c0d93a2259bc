//! Command delivery: the dispatcher task (one per server; devices side by side, one device's
//! commands in order and never concurrently) and the scheduler (expiry, give-up, retries).

use super::state::{self, Event, Step};
use super::{Commands, DELIVERIES_CONCURRENT_MAX, DELIVERY_BATCH_LEN_MAX, SCHEDULER_BATCH_LEN_MAX};
use crate::error::ServiceResult;
use crate::metrics::Counters;
use mooring_broker::Message;
use mooring_proto::command::CommandRequest;
use mooring_proto::{DeviceId, Topic};
use mooring_store::CommandState;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

impl Commands {
    /// Publishes what is pending for one device, in order, while its session takes it.
    async fn deliver_pending(
        &self,
        device_id: &DeviceId,
        all_delivered: bool,
    ) -> ServiceResult<()> {
        let Some(broker) = self.core.broker() else {
            return Ok(());
        };
        let Some(carrier) = self.carrier(device_id) else {
            return Ok(());
        };
        let pending = self
            .core
            .store
            .pending_commands(
                device_id,
                self.core.now_ms(),
                all_delivered,
                DELIVERY_BATCH_LEN_MAX,
            )
            .await?;
        let full_batch = pending.len() == DELIVERY_BATCH_LEN_MAX;
        for p in pending {
            let _guard = self.lock_command(&p.id).await;
            let Some(mut record) = self.core.store.get_command(&p.id).await? else {
                continue;
            };
            let from = record.state;
            if !matches!(
                from,
                CommandState::Queued | CommandState::Delivered | CommandState::Acknowledged
            ) {
                continue;
            }
            let now_ms = self.core.now_ms();
            // An acknowledged command has started on the device: it no longer expires; it is
            // redelivered after a reconnect so the device reports its result (or that it was
            // interrupted), never runs it twice.
            let event = if from != CommandState::Acknowledged && now_ms >= record.expires_at_ms {
                Event::Expire
            } else if from != CommandState::Queued && record.attempts >= record.max_attempts {
                Event::GiveUp
            } else {
                let req = CommandRequest {
                    id: record.id.clone(),
                    name: record.name.clone(),
                    params: record.params.clone(),
                    expires_at: record.expires_at_ms,
                };
                let msg = Message::new(
                    Topic::command(device_id, &record.id),
                    req.to_bytes(),
                    1,
                    false,
                );
                // Queued (even if older QoS 0 messages made room for it) means sent: record
                // the attempt. Refused: the session cannot take it now; try again later.
                if !broker.publish_to_device(&carrier, msg).is_enqueued() {
                    break;
                }
                record.attempts = record.attempts.saturating_add(1);
                // An acknowledged command's next_attempt_at_ms is its result deadline (set at
                // the ack): a redelivery after a reconnect does not move it.
                if from != CommandState::Acknowledged {
                    record.next_attempt_at_ms =
                        now_ms.saturating_add(self.retry_backoff_ms(record.attempts));
                }
                if from == CommandState::Queued {
                    Counters::inc(&self.core.counters.commands_delivered);
                } else {
                    Counters::inc(&self.core.counters.commands_retried);
                }
                Event::Delivered
            };
            let step = state::apply(&mut record, event, now_ms);
            if !self.core.store.update_command(record.clone(), from).await? {
                continue;
            }
            if let Step::To(to) = step {
                self.count_transition(to);
                self.announce(&record);
                self.notify(&record.id, to);
            }
        }
        if full_batch {
            self.kick_local(device_id, false);
        }
        Ok(())
    }

    /// One scheduler pass: expire, give up, or ask for redelivery of what is due. In a cluster
    /// only the holder of the scheduler lease runs it.
    pub async fn run_scheduler_pass(&self) -> ServiceResult<usize> {
        if let Some(cluster) = self.core.cluster() {
            if !cluster.holds(crate::cluster::LEASE_SCHEDULER).await {
                return Ok(0);
            }
        }
        let now_ms = self.core.now_ms();
        let due = self
            .core
            .store
            .due_commands(now_ms, SCHEDULER_BATCH_LEN_MAX)
            .await?;
        let n = due.len();
        // In a cluster, which of the devices with a redelivery due are online on other nodes.
        let elsewhere: std::collections::BTreeSet<String> = match self.core.cluster() {
            Some(cluster) => {
                let ids: Vec<String> = due
                    .iter()
                    .filter(|c| c.state == CommandState::Delivered)
                    .map(|c| c.device_id.to_string())
                    .collect::<std::collections::BTreeSet<_>>()
                    .into_iter()
                    .collect();
                self.registry
                    .presence()
                    .online(&ids, cluster.alive_since_ms())
                    .await?
            }
            None => Default::default(),
        };
        for c in due {
            if c.state == CommandState::Acknowledged {
                self.transition(None, &c.id, Event::ResultTimeout).await?;
            } else if now_ms >= c.expires_at_ms {
                self.transition(None, &c.id, Event::Expire).await?;
            } else if c.attempts >= c.max_attempts {
                self.transition(None, &c.id, Event::GiveUp).await?;
            } else {
                let subscribed = self.carrier(&c.device_id).is_some();
                if subscribed || elsewhere.contains(c.device_id.as_str()) {
                    self.kick(&c.device_id, false);
                } else {
                    // Offline: no attempt now; a reconnect redelivers it at once.
                    self.postpone(&c.id, now_ms).await?;
                }
            }
        }
        Ok(n)
    }

    async fn postpone(&self, id: &str, now_ms: u64) -> ServiceResult<()> {
        let _guard = self.lock_command(id).await;
        if let Some(mut r) = self.core.store.get_command(id).await? {
            if r.state == CommandState::Delivered {
                r.next_attempt_at_ms = now_ms
                    .saturating_add(self.core.config.commands.retry_backoff_max_ms)
                    .min(r.expires_at_ms);
                self.core
                    .store
                    .update_command(r, CommandState::Delivered)
                    .await?;
            }
        }
        Ok(())
    }
}

/// The delivery task: drains kicks until `stop` fires. Each set of kicked devices is delivered
/// to [`DELIVERIES_CONCURRENT_MAX`] devices at a time, and finished (deliveries are never cut
/// short, so a published command is always recorded) before the next set is taken.
pub async fn run_dispatcher(commands: Arc<Commands>, mut stop: watch::Receiver<bool>) {
    loop {
        let kicks = commands.take_kicks();
        if kicks.is_empty() {
            let notified = commands.kick_notify.notified();
            tokio::select! {
                _ = stop.changed() => return,
                _ = notified => continue,
            }
        }
        let mut deliveries = tokio::task::JoinSet::new();
        for (device, all) in kicks {
            if *stop.borrow() {
                break;
            }
            if deliveries.len() >= DELIVERIES_CONCURRENT_MAX {
                deliveries.join_next().await;
            }
            let commands = Arc::clone(&commands);
            deliveries.spawn(async move {
                if let Err(e) = commands.deliver_pending(&device, all).await {
                    tracing::warn!(device = %device, error = %e, "command delivery failed; will retry");
                }
            });
        }
        while deliveries.join_next().await.is_some() {}
        if *stop.borrow() {
            return;
        }
    }
}

/// The scheduler task: expiry, give-up and retries, every `commands.scheduler_tick_ms`.
pub async fn run_scheduler(commands: Arc<Commands>, stop: watch::Receiver<bool>) {
    let period = Duration::from_millis(commands.core.config.commands.scheduler_tick_ms.max(1));
    crate::serve::run_every(period, stop, || async {
        if let Err(e) = commands.run_scheduler_pass().await {
            tracing::warn!(error = %e, "command scheduler pass failed; will retry");
        }
    })
    .await;
}
