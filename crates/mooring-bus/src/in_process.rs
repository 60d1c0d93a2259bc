//! [`InProcessBus`]: the bus of a single node, on tokio channels and in-memory queues.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use mooring_proto::sync::lock;
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

use crate::bus::{offer, Acker, ConsumerInner};
use crate::names::{filter_matches, validate_filter, validate_queue, validate_subject};
use crate::{Bus, BusConfig, BusError, Consumer, Delivery, Message, Subscription};

/// The bus of one node. Broadcast goes to this process's subscriptions; a work queue is a
/// `VecDeque` in memory, so "durable" means for the life of the process: enough for one node,
/// where the store holds what must survive a restart (a command is stored before it is queued
/// and re-queued from the store at start). Dropping the bus ends every subscription (`None`)
/// and consumer (`Closed`).
pub struct InProcessBus {
    shared: Arc<Shared>,
}

struct Shared {
    config: BusConfig,
    closed: AtomicBool,
    subs: Mutex<Vec<Sub>>,
    queues: Mutex<HashMap<String, Arc<Queue>>>,
}

struct Sub {
    filter: String,
    tx: mpsc::Sender<Message>,
    dropped: Arc<AtomicU64>,
}

struct Queue {
    state: Mutex<QueueState>,
    /// Woken on enqueue and on close (`notify_waiters`, so every waiting consumer looks).
    notify: Notify,
    closed: AtomicBool,
    ack_wait: Duration,
    len_max: usize,
}

#[derive(Default)]
struct QueueState {
    next_id: u64,
    ready: VecDeque<Entry>,
    /// Delivered, not yet acknowledged; in deadline order (every deadline is delivery time +
    /// the same `ack_wait`, so appending keeps the order).
    in_flight: VecDeque<(Instant, Entry)>,
}

struct Entry {
    id: u64,
    payload: Bytes,
    delivered_count: u64,
}

impl InProcessBus {
    /// A bus with these bounds (`InvalidConfig` if one is 0).
    pub fn new(config: BusConfig) -> Result<Self, BusError> {
        config.validate()?;
        Ok(InProcessBus {
            shared: Arc::new(Shared {
                config,
                closed: AtomicBool::new(false),
                subs: Mutex::new(Vec::new()),
                queues: Mutex::new(HashMap::new()),
            }),
        })
    }

    fn check_open(&self) -> Result<(), BusError> {
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(BusError::Closed);
        }
        Ok(())
    }

    fn queue(&self, name: &str) -> Result<Arc<Queue>, BusError> {
        validate_queue(name)?;
        self.check_open()?;
        let mut queues = lock(&self.shared.queues);
        if let Some(q) = queues.get(name) {
            return Ok(q.clone());
        }
        if queues.len() >= self.shared.config.queues_max {
            return Err(BusError::Full {
                limit: "queues_max",
                max: self.shared.config.queues_max,
            });
        }
        let q = Arc::new(Queue {
            state: Mutex::new(QueueState::default()),
            notify: Notify::new(),
            closed: AtomicBool::new(false),
            ack_wait: Duration::from_millis(self.shared.config.ack_wait_ms),
            len_max: self.shared.config.queue_len_max,
        });
        queues.insert(name.to_owned(), q.clone());
        Ok(q)
    }
}

impl Drop for InProcessBus {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Release);
        // Dropping the senders ends every subscription once its buffer is read.
        lock(&self.shared.subs).clear();
        for q in lock(&self.shared.queues).values() {
            q.closed.store(true, Ordering::Release);
            q.notify.notify_waiters();
        }
    }
}

#[async_trait::async_trait]
impl Bus for InProcessBus {
    async fn publish(&self, subject: &str, payload: Bytes) -> Result<(), BusError> {
        validate_subject(subject)?;
        self.shared.config.check_payload(&payload)?;
        self.check_open()?;
        let mut subs = lock(&self.shared.subs);
        subs.retain(|s| {
            if !filter_matches(&s.filter, subject) {
                return !s.tx.is_closed();
            }
            let msg = Message {
                subject: subject.to_owned(),
                payload: payload.clone(),
            };
            offer(&s.tx, &s.dropped, msg)
        });
        Ok(())
    }

    async fn subscribe(&self, filter: &str) -> Result<Subscription, BusError> {
        validate_filter(filter)?;
        self.check_open()?;
        let (tx, rx) = mpsc::channel(self.shared.config.subscription_buffer_len);
        let dropped = Arc::new(AtomicU64::new(0));
        let mut subs = lock(&self.shared.subs);
        // Forget subscriptions dropped since the last publish, so subscribing in a loop
        // without publishing does not grow the list.
        subs.retain(|s| !s.tx.is_closed());
        subs.push(Sub {
            filter: filter.to_owned(),
            tx,
            dropped: dropped.clone(),
        });
        Ok(Subscription::new(rx, dropped, None))
    }

    async fn enqueue(&self, queue: &str, payload: Bytes) -> Result<(), BusError> {
        self.shared.config.check_payload(&payload)?;
        let q = self.queue(queue)?;
        {
            let mut st = lock(&q.state);
            if st.ready.len() + st.in_flight.len() >= q.len_max {
                return Err(BusError::Full {
                    limit: "queue_len_max",
                    max: q.len_max,
                });
            }
            let id = st.next_id;
            st.next_id += 1;
            st.ready.push_back(Entry {
                id,
                payload,
                delivered_count: 0,
            });
        }
        q.notify.notify_waiters();
        Ok(())
    }

    async fn consume(&self, queue: &str) -> Result<Consumer, BusError> {
        let queue = self.queue(queue)?;
        Ok(Consumer {
            inner: ConsumerInner::InProcess(QueueConsumer { queue }),
        })
    }
}

pub(crate) struct QueueConsumer {
    queue: Arc<Queue>,
}

impl QueueConsumer {
    pub(crate) async fn next(&mut self) -> Result<Delivery, BusError> {
        let q = &self.queue;
        loop {
            // Registered before looking, so an enqueue between the look and the wait wakes us.
            let notified = q.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if q.closed.load(Ordering::Acquire) {
                return Err(BusError::Closed);
            }
            let next_deadline = {
                let mut st = lock(&q.state);
                let now = Instant::now();
                // Overdue deliveries go back to the front: they are older than anything ready.
                while st.in_flight.front().is_some_and(|(d, _)| *d <= now) {
                    if let Some((_, e)) = st.in_flight.pop_front() {
                        st.ready.push_front(e);
                    }
                }
                if let Some(mut e) = st.ready.pop_front() {
                    e.delivered_count += 1;
                    let delivery = Delivery {
                        payload: e.payload.clone(),
                        delivered_count: e.delivered_count,
                        acker: Acker::InProcess(QueueAcker {
                            queue: q.clone(),
                            id: e.id,
                        }),
                    };
                    st.in_flight.push_back((now + q.ack_wait, e));
                    return Ok(delivery);
                }
                st.in_flight.front().map(|(d, _)| *d)
            };
            match next_deadline {
                Some(deadline) => {
                    tokio::select! {
                        _ = &mut notified => {}
                        _ = tokio::time::sleep_until(deadline) => {}
                    }
                }
                None => notified.await,
            }
        }
    }
}

pub(crate) struct QueueAcker {
    queue: Arc<Queue>,
    id: u64,
}

impl QueueAcker {
    pub(crate) fn ack(self) -> Result<(), BusError> {
        if self.queue.closed.load(Ordering::Acquire) {
            return Err(BusError::Closed);
        }
        let mut st = lock(&self.queue.state);
        // Usually in flight; back in `ready` if its ack wait passed before this ack; gone if
        // another delivery of it was acknowledged first.
        if let Some(i) = st.in_flight.iter().position(|(_, e)| e.id == self.id) {
            st.in_flight.remove(i);
        } else if let Some(i) = st.ready.iter().position(|e| e.id == self.id) {
            st.ready.remove(i);
        }
        Ok(())
    }
}
