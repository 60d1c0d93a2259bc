//! [`NatsBus`]: the cluster bus on NATS (core subjects for broadcast, JetStream for queues).

use std::collections::HashSet;
use std::fmt::Display;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, stream};
use bytes::Bytes;
use futures::StreamExt;
use mooring_proto::sync::lock;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use crate::bus::{offer, Acker, ConsumerInner};
use crate::names::{validate_filter, validate_prefix, validate_queue, validate_subject};
use crate::{Bus, BusConfig, BusError, Consumer, Delivery, Message, Subscription};

/// How long one pull request of a consumer waits on the server before it is renewed.
const PULL_EXPIRES_MS: u64 = 5_000;
/// The one durable consumer of every queue's stream; every [`Consumer`] of the queue, on any
/// node, pulls from it, which is what shares the messages.
const DURABLE_NAME: &str = "workers";

/// How to reach NATS and what to call things there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsConfig {
    /// E.g. `nats://127.0.0.1:4222`.
    pub url: String,
    /// Put in front of every subject (`<prefix>.b.<subject>`, `<prefix>.q.<queue>`) and stream
    /// (`<prefix>_q_<queue>`) this bus uses, so buses with different prefixes never see each
    /// other's traffic. `[A-Za-z0-9-]`, at most 32 bytes.
    pub prefix: String,
    pub bus: BusConfig,
    pub connect_timeout_ms: u64,
    /// Bound on every request to the server (JetStream API calls, publish acks) and on a publish
    /// waiting for room in the client's outgoing buffer.
    pub request_timeout_ms: u64,
}

impl NatsConfig {
    /// `url` and `prefix` with the default bounds.
    pub fn new(url: impl Into<String>, prefix: impl Into<String>) -> Self {
        NatsConfig {
            url: url.into(),
            prefix: prefix.into(),
            bus: BusConfig::default(),
            connect_timeout_ms: 5_000,
            request_timeout_ms: 5_000,
        }
    }
}

/// The bus of a cluster of nodes, over NATS. Broadcast is core NATS (at most once, nothing
/// stored). A work queue is a JetStream stream `<prefix>_q_<queue>` (file storage, work-queue
/// retention: a message is removed when acknowledged; at most `queue_len_max` messages, and
/// discard policy "new", so a full queue refuses the enqueue) with one durable pull consumer
/// (explicit ack, `ack_wait_ms`). Streams are created on first use with the bus's bounds; a
/// stream that already exists keeps the configuration it was created with.
/// Dropping the bus ends every subscription (`None`) and consumer (`Closed`).
pub struct NatsBus {
    client: async_nats::Client,
    js: jetstream::Context,
    prefix: String,
    config: BusConfig,
    request_timeout: Duration,
    /// Cancelled when the bus is dropped: ends subscription forwarders and consumers.
    stop: CancellationToken,
    /// Queues whose stream this bus has created or found (at most `queues_max`).
    queues: Mutex<HashSet<String>>,
}

impl NatsBus {
    /// Connects (one attempt, bounded by `connect_timeout_ms`; reconnects later on its own).
    /// `Unavailable` if the server cannot be reached, `InvalidConfig` if a bound is 0 or
    /// `payload_bytes_max` is over the server's `max_payload`.
    pub async fn connect(config: NatsConfig) -> Result<Self, BusError> {
        validate_prefix(&config.prefix)?;
        config.bus.validate()?;
        let request_timeout = Duration::from_millis(config.request_timeout_ms);
        let url = crate::names::redact_url(&config.url);
        let client = async_nats::ConnectOptions::new()
            .name(format!("mooring-bus {}", config.prefix))
            .connection_timeout(Duration::from_millis(config.connect_timeout_ms))
            .request_timeout(Some(request_timeout))
            .event_callback(move |event| {
                let url = url.clone();
                async move { tracing::info!(%url, %event, "nats connection event") }
            })
            .connect(config.url.as_str())
            .await
            .map_err(|e| {
                unavailable(
                    format!("connecting to {}", crate::names::redact_url(&config.url)),
                    e,
                )
            })?;
        let server_max = client.server_info().max_payload;
        if config.bus.payload_bytes_max > server_max {
            return Err(BusError::InvalidConfig(format!(
                "payload_bytes_max {} is over the NATS server's max_payload {server_max}",
                config.bus.payload_bytes_max
            )));
        }
        let js = jetstream::ContextBuilder::new()
            .timeout(request_timeout)
            .build(client.clone());
        Ok(NatsBus {
            client,
            js,
            prefix: config.prefix,
            config: config.bus,
            request_timeout,
            stop: CancellationToken::new(),
            queues: Mutex::new(HashSet::new()),
        })
    }

    fn check_open(&self) -> Result<(), BusError> {
        if self.stop.is_cancelled() {
            return Err(BusError::Closed);
        }
        Ok(())
    }

    fn stream_name(&self, queue: &str) -> String {
        format!("{}_q_{queue}", self.prefix)
    }

    fn queue_subject(&self, queue: &str) -> String {
        format!("{}.q.{queue}", self.prefix)
    }

    /// Makes sure the queue's stream exists (once per bus and queue).
    async fn ensure_queue(&self, queue: &str) -> Result<(), BusError> {
        validate_queue(queue)?;
        self.check_open()?;
        {
            let queues = lock(&self.queues);
            if queues.contains(queue) {
                return Ok(());
            }
            if queues.len() >= self.config.queues_max {
                return Err(BusError::Full {
                    limit: "queues_max",
                    max: self.config.queues_max,
                });
            }
        }
        let config = stream::Config {
            name: self.stream_name(queue),
            subjects: vec![self.queue_subject(queue)],
            retention: stream::RetentionPolicy::WorkQueue,
            discard: stream::DiscardPolicy::New,
            max_messages: i64::try_from(self.config.queue_len_max).unwrap_or(i64::MAX),
            max_message_size: i32::try_from(self.config.payload_bytes_max).unwrap_or(i32::MAX),
            storage: stream::StorageType::File,
            ..Default::default()
        };
        self.js
            .get_or_create_stream(config)
            .await
            .map_err(|e| unavailable(format!("creating the stream of queue {queue}"), e))?;
        lock(&self.queues).insert(queue.to_owned());
        Ok(())
    }

    /// A round trip to the server: everything sent before (a SUB) has been processed once it
    /// answers. A request to a fresh inbox nobody listens on is answered "no responders".
    async fn round_trip(&self) -> Result<(), BusError> {
        let inbox = self.client.new_inbox();
        match self.client.request(inbox, Bytes::new()).await {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => Ok(()),
            Err(e) => Err(unavailable("waiting for the server", e)),
        }
    }
}

impl Drop for NatsBus {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[async_trait::async_trait]
impl Bus for NatsBus {
    async fn publish(&self, subject: &str, payload: Bytes) -> Result<(), BusError> {
        validate_subject(subject)?;
        self.config.check_payload(&payload)?;
        self.check_open()?;
        let subject = format!("{}.b.{subject}", self.prefix);
        // The client buffers while disconnected; a full buffer must not hold a publisher.
        tokio::time::timeout(self.request_timeout, self.client.publish(subject, payload))
            .await
            .map_err(|_| BusError::Unavailable("publish timed out".to_owned()))?
            .map_err(|e| unavailable("publish", e))
    }

    async fn subscribe(&self, filter: &str) -> Result<Subscription, BusError> {
        validate_filter(filter)?;
        self.check_open()?;
        let subscriber = self
            .client
            .subscribe(format!("{}.b.{filter}", self.prefix))
            .await
            .map_err(|e| unavailable("subscribe", e))?;
        self.round_trip().await?;
        let (tx, rx) = mpsc::channel(self.config.subscription_buffer_len);
        let dropped = Arc::new(AtomicU64::new(0));
        let strip = self.prefix.len() + ".b.".len();
        let task = tokio::spawn(forward(
            subscriber,
            tx,
            dropped.clone(),
            strip,
            self.stop.clone(),
        ));
        Ok(Subscription::new(
            rx,
            dropped,
            Some(AbortOnDropHandle::new(task)),
        ))
    }

    async fn enqueue(&self, queue: &str, payload: Bytes) -> Result<(), BusError> {
        self.config.check_payload(&payload)?;
        self.ensure_queue(queue).await?;
        let result = async {
            self.js
                .publish(self.queue_subject(queue), payload)
                .await?
                .await
        }
        .await;
        match result {
            Ok(_) => Ok(()),
            Err(e) => {
                if e.kind() == jetstream::context::PublishErrorKind::StreamNotFound {
                    // Deleted behind our back: the next call creates it again.
                    lock(&self.queues).remove(queue);
                }
                Err(self.publish_error(e))
            }
        }
    }

    async fn consume(&self, queue: &str) -> Result<Consumer, BusError> {
        self.ensure_queue(queue).await?;
        let stream = self
            .js
            .get_stream_no_info(self.stream_name(queue))
            .await
            .map_err(|e| unavailable(format!("opening the stream of queue {queue}"), e))?;
        let config = pull::Config {
            durable_name: Some(DURABLE_NAME.to_owned()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_millis(self.config.ack_wait_ms),
            ..Default::default()
        };
        let consumer = stream
            .get_or_create_consumer(DURABLE_NAME, config)
            .await
            .map_err(|e| unavailable(format!("creating the consumer of queue {queue}"), e))?;
        Ok(Consumer {
            inner: ConsumerInner::Nats(Box::new(NatsConsumer {
                consumer,
                pending: None,
                stop: self.stop.clone(),
            })),
        })
    }
}

impl NatsBus {
    fn publish_error(&self, e: jetstream::context::PublishError) -> BusError {
        let code = std::error::Error::source(&e)
            .and_then(|s| s.downcast_ref::<jetstream::Error>())
            .map(|s| s.error_code());
        if code == Some(jetstream::ErrorCode::STREAM_STORE_FAILED)
            && e.to_string().contains("maximum messages")
        {
            return BusError::Full {
                limit: "queue_len_max",
                max: self.config.queue_len_max,
            };
        }
        if e.kind() == jetstream::context::PublishErrorKind::MaxPayloadExceeded {
            return BusError::InvalidConfig(format!("the server refused the payload size: {e}"));
        }
        unavailable("enqueue", e)
    }
}

/// Moves a NATS subscription's messages into the subscription's bounded buffer, dropping and
/// counting what does not fit. Ends when the subscription or the bus is dropped.
async fn forward(
    mut subscriber: async_nats::Subscriber,
    tx: mpsc::Sender<Message>,
    dropped: Arc<AtomicU64>,
    strip: usize,
    stop: CancellationToken,
) {
    loop {
        let msg = tokio::select! {
            _ = stop.cancelled() => break,
            _ = tx.closed() => break,
            msg = subscriber.next() => msg,
        };
        let Some(msg) = msg else { break };
        let subject = msg.subject.as_str().get(strip..).unwrap_or_default();
        let msg = Message {
            subject: subject.to_owned(),
            payload: msg.payload,
        };
        if !offer(&tx, &dropped, msg) {
            break;
        }
    }
}

pub(crate) struct NatsConsumer {
    consumer: jetstream::consumer::Consumer<pull::Config>,
    /// The outstanding pull request (for one message), kept across cancelled `next` calls so a
    /// message it brings is not lost.
    pending: Option<pull::Batch>,
    stop: CancellationToken,
}

impl NatsConsumer {
    pub(crate) async fn next(&mut self) -> Result<Delivery, BusError> {
        // One message per pull request: a consumer never holds (and lets the ack wait of) more
        // than the message it is handling, so an idle or slow consumer does not sit on work
        // another could do.
        loop {
            if self.stop.is_cancelled() {
                return Err(BusError::Closed);
            }
            let batch = match &mut self.pending {
                Some(batch) => batch,
                None => {
                    let request = self
                        .consumer
                        .batch()
                        .max_messages(1)
                        .expires(Duration::from_millis(PULL_EXPIRES_MS))
                        .messages();
                    let batch = tokio::select! {
                        _ = self.stop.cancelled() => return Err(BusError::Closed),
                        batch = request => batch.map_err(|e| unavailable("pull", e))?,
                    };
                    self.pending.insert(batch)
                }
            };
            let item = tokio::select! {
                _ = self.stop.cancelled() => return Err(BusError::Closed),
                item = batch.next() => item,
            };
            match item {
                // The pull request expired empty: ask again.
                None => self.pending = None,
                Some(Err(e)) => {
                    self.pending = None;
                    return Err(unavailable("pull", e));
                }
                Some(Ok(msg)) => {
                    self.pending = None;
                    let delivered_count = msg
                        .info()
                        .ok()
                        .and_then(|i| u64::try_from(i.delivered).ok())
                        .unwrap_or(1)
                        .max(1);
                    return Ok(Delivery {
                        payload: msg.payload.clone(),
                        delivered_count,
                        acker: Acker::Nats(Box::new(msg)),
                    });
                }
            }
        }
    }
}

/// Acknowledges and waits for the server to confirm it.
pub(crate) async fn ack(msg: &jetstream::Message) -> Result<(), BusError> {
    msg.double_ack().await.map_err(|e| unavailable("ack", e))
}

fn unavailable(what: impl Display, e: impl Display) -> BusError {
    BusError::Unavailable(format!("{what}: {e}"))
}
