//! The [`Bus`] trait, its configuration and the handles it returns (subscriptions, consumers,
//! deliveries), shared by every implementation.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::task::AbortOnDropHandle;

use crate::BusError;

/// What crosses nodes. Object safe; the server will hold an `Arc<dyn Bus>`.
#[async_trait::async_trait]
pub trait Bus: Send + Sync + 'static {
    /// Broadcast, best effort: every subscription whose filter matches `subject` gets the
    /// message, unless its buffer is full (then it is dropped for that subscription only and
    /// counted in [`Subscription::dropped`]). Never waits for subscribers.
    async fn publish(&self, subject: &str, payload: Bytes) -> Result<(), BusError>;

    /// A subscription to every subject `filter` matches (`*` one token, `>` the rest). Ready
    /// when this returns: a message published after it is delivered to it.
    async fn subscribe(&self, filter: &str) -> Result<Subscription, BusError>;

    /// Appends to a durable work queue (created on first use); returns once the message is
    /// stored. `Full` when the queue holds `queue_len_max` messages (acknowledged ones are gone).
    async fn enqueue(&self, queue: &str, payload: Bytes) -> Result<(), BusError>;

    /// A consumer of a work queue (created on first use). Every consumer of a queue, on any node,
    /// shares its messages: each goes to one of them, and again (to any) if it is not
    /// acknowledged within `ack_wait_ms` of its delivery.
    async fn consume(&self, queue: &str) -> Result<Consumer, BusError>;
}

/// Bounds and timers every implementation takes. Units last in names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusConfig {
    /// Largest payload `publish` and `enqueue` accept.
    pub payload_bytes_max: usize,
    /// Messages one subscription buffers before newer ones are dropped for it.
    pub subscription_buffer_len: usize,
    /// Messages one work queue holds (queued plus delivered and not yet acknowledged).
    pub queue_len_max: usize,
    /// Distinct work queues one bus creates.
    pub queues_max: usize,
    /// How long a delivery may stay unacknowledged before it is delivered again.
    pub ack_wait_ms: u64,
}

impl Default for BusConfig {
    fn default() -> Self {
        BusConfig {
            payload_bytes_max: 1024 * 1024,
            subscription_buffer_len: 1024,
            queue_len_max: 100_000,
            queues_max: 1024,
            ack_wait_ms: 30_000,
        }
    }
}

impl BusConfig {
    pub(crate) fn validate(&self) -> Result<(), BusError> {
        let zero = [
            ("payload_bytes_max", self.payload_bytes_max as u64),
            (
                "subscription_buffer_len",
                self.subscription_buffer_len as u64,
            ),
            ("queue_len_max", self.queue_len_max as u64),
            ("queues_max", self.queues_max as u64),
            ("ack_wait_ms", self.ack_wait_ms),
        ]
        .into_iter()
        .find(|(_, v)| *v == 0);
        match zero {
            Some((name, _)) => Err(BusError::InvalidConfig(format!("{name} must be above 0"))),
            None => Ok(()),
        }
    }

    pub(crate) fn check_payload(&self, payload: &Bytes) -> Result<(), BusError> {
        if payload.len() > self.payload_bytes_max {
            return Err(BusError::TooLarge {
                bytes: payload.len(),
                max_bytes: self.payload_bytes_max,
            });
        }
        Ok(())
    }
}

/// A broadcast message as a subscriber sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The subject it was published on (without the bus's prefix).
    pub subject: String,
    pub payload: Bytes,
}

/// A live subscription: a bounded buffer of matching messages. Dropping it unsubscribes.
#[derive(Debug)]
pub struct Subscription {
    rx: mpsc::Receiver<Message>,
    dropped: Arc<AtomicU64>,
    /// The task moving messages from the transport into `rx` (NATS), ended with the subscription.
    _forwarder: Option<AbortOnDropHandle<()>>,
}

impl Subscription {
    pub(crate) fn new(
        rx: mpsc::Receiver<Message>,
        dropped: Arc<AtomicU64>,
        forwarder: Option<AbortOnDropHandle<()>>,
    ) -> Self {
        Subscription {
            rx,
            dropped,
            _forwarder: forwarder,
        }
    }

    /// The next message; `None` once the bus is closed and the buffer is empty. Cancel safe.
    pub async fn next(&mut self) -> Option<Message> {
        self.rx.recv().await
    }

    /// The next buffered message, without waiting.
    pub fn try_next(&mut self) -> Option<Message> {
        self.rx.try_recv().ok()
    }

    /// Messages dropped for this subscription because its buffer was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// Offers `msg` to a subscription's buffer; counts it as dropped if the buffer is full.
/// `false` when the subscription is gone.
pub(crate) fn offer(tx: &mpsc::Sender<Message>, dropped: &AtomicU64, msg: Message) -> bool {
    match tx.try_send(msg) {
        Ok(()) => true,
        Err(mpsc::error::TrySendError::Full(_)) => {
            dropped.fetch_add(1, Ordering::Relaxed);
            true
        }
        Err(mpsc::error::TrySendError::Closed(_)) => false,
    }
}

/// A consumer of one work queue. Dropping it stops taking messages; what it was delivered and
/// did not acknowledge goes to another consumer after `ack_wait_ms`.
pub struct Consumer {
    pub(crate) inner: ConsumerInner,
}

pub(crate) enum ConsumerInner {
    InProcess(crate::in_process::QueueConsumer),
    Nats(Box<crate::nats::NatsConsumer>),
}

impl Consumer {
    /// The next message of the queue, waiting until there is one. `Closed` once the bus is
    /// dropped. Cancel safe: a message fetched for a cancelled call is not lost, it is
    /// delivered again after `ack_wait_ms`.
    pub async fn next(&mut self) -> Result<Delivery, BusError> {
        match &mut self.inner {
            ConsumerInner::InProcess(c) => c.next().await,
            ConsumerInner::Nats(c) => c.next().await,
        }
    }
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer").finish_non_exhaustive()
    }
}

/// One delivery of a work-queue message. Acknowledge it once handled; an unacknowledged one
/// (dropped, or not acknowledged within `ack_wait_ms`) is delivered again.
pub struct Delivery {
    pub payload: Bytes,
    /// How many times this message has been delivered, this delivery included (1 = first).
    pub delivered_count: u64,
    pub(crate) acker: Acker,
}

pub(crate) enum Acker {
    InProcess(crate::in_process::QueueAcker),
    Nats(Box<async_nats::jetstream::Message>),
}

impl Delivery {
    /// Acknowledges the message: it is removed from the queue and not delivered again. Returns
    /// once the bus has recorded the acknowledgement. Acknowledging a delivery whose
    /// `ack_wait_ms` has passed still removes the message, but it may already have been
    /// delivered again (at-least-once).
    pub async fn ack(self) -> Result<(), BusError> {
        match self.acker {
            Acker::InProcess(a) => a.ack(),
            Acker::Nats(m) => crate::nats::ack(&m).await,
        }
    }
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("payload_bytes", &self.payload.len())
            .field("delivered_count", &self.delivered_count)
            .finish_non_exhaustive()
    }
}
