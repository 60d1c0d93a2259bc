//! Broker-wide state: the session table, retained messages, routing, stats and lifecycle.

use crate::config::BrokerConfig;
use crate::hooks::{ConnInfo, Hooks, Message, PublishVerdict};
use crate::session::{Delivery, Session};
use mooring_proto::policy::Principal;
use mooring_proto::topic::filter_matches;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Why the broker asks a live connection to close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Control {
    /// Another connection took the client id (v5 DISCONNECT 0x8E).
    TakenOver,
    /// Administrative kick (v5 DISCONNECT with this reason code).
    Kick(u8),
    /// Broker shutdown (v5 DISCONNECT 0x8B).
    Shutdown,
}

/// Counters since start (monotonic) and gauges (current).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BrokerStats {
    /// Live network connections (gauge).
    pub connections: u64,
    /// Sessions, live or persisted (gauge).
    pub sessions: u64,
    pub retained: u64,
    pub messages_in: u64,
    pub messages_out: u64,
    /// PUBLISH / SUBSCRIBE / CONNECT refused by policy or authentication.
    pub denied: u64,
    /// Messages dropped: full session queue, expired, too large for the client, retained table full.
    pub dropped: u64,
    /// Connection tasks that panicked (contained).
    pub panics: u64,
}

/// See [`Broker::session_info`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionInfo {
    pub connected: bool,
    pub subscriptions: usize,
    pub queued: usize,
    pub inflight: usize,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) connections: AtomicU64,
    pub(crate) messages_in: AtomicU64,
    pub(crate) messages_out: AtomicU64,
    pub(crate) denied: AtomicU64,
    pub(crate) dropped: AtomicU64,
    pub(crate) panics: AtomicU64,
}

pub(crate) struct RetainedMsg {
    pub(crate) msg: Arc<Message>,
    pub(crate) expires_at: Option<Instant>,
}

#[derive(Default)]
pub(crate) struct State {
    pub(crate) sessions: HashMap<String, Arc<Mutex<Session>>>,
    pub(crate) retained: BTreeMap<String, RetainedMsg>,
}

pub(crate) struct Shared {
    pub(crate) config: BrokerConfig,
    pub(crate) hooks: Arc<dyn Hooks>,
    pub(crate) state: Mutex<State>,
    pub(crate) counters: Counters,
    pub(crate) conn_seq: AtomicU64,
    pub(crate) shutting_down: AtomicBool,
    /// Timers that outlive a connection: will delay, session expiry.
    pub(crate) timers: Mutex<JoinSet<()>>,
    pub(crate) conn_ended: Notify,
}

/// An MQTT 3.1.1/5.0 broker. Cheap to clone; all clones are the same broker.
#[derive(Clone)]
pub struct Broker {
    pub(crate) shared: Arc<Shared>,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a lock must not wedge the broker: the data is still consistent
    // enough (every critical section is short and updates whole entries).
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Broker {
    pub fn new(config: BrokerConfig, hooks: Arc<dyn Hooks>) -> Broker {
        Broker {
            shared: Arc::new(Shared {
                config,
                hooks,
                state: Mutex::new(State::default()),
                counters: Counters::default(),
                conn_seq: AtomicU64::new(1),
                shutting_down: AtomicBool::new(false),
                timers: Mutex::new(JoinSet::new()),
                conn_ended: Notify::new(),
            }),
        }
    }

    pub fn config(&self) -> &BrokerConfig {
        &self.shared.config
    }

    /// Serve one client connection until it closes. Runs the protocol in its own task so a panic
    /// in it is contained; cleanup (session detach, will, `on_disconnected`) always runs.
    pub async fn serve_connection<S>(&self, stream: S, info: ConnInfo)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        crate::connection::serve(self.shared.clone(), stream, info).await;
    }

    /// Disconnect every live connection whose principal is this device (v5: DISCONNECT 0x98).
    pub fn kick_device(&self, device_id: &str) {
        let state = lock(&self.shared.state);
        for session in state.sessions.values() {
            let s = lock(session);
            if let (Some(link), Principal::Device { id, .. }) = (&s.link, &s.principal) {
                if id == device_id {
                    let _ = link.control.try_send(Control::Kick(0x98));
                }
            }
        }
    }

    /// Publish a message originated by the server; routed (and retained) like any publish.
    pub fn publish(&self, msg: Message) {
        self.shared
            .counters
            .messages_in
            .fetch_add(1, Ordering::Relaxed);
        self.shared.route(Arc::new(msg), None);
    }

    /// Publish a server-originated message to one client only: enqueued if that client's session
    /// is connected and holds a subscription matching the topic (at the highest granted QoS).
    /// Returns whether it was enqueued. Not retained, not routed to anyone else.
    pub fn publish_to(&self, client_id: &str, msg: Message) -> bool {
        let Some(session) = lock(&self.shared.state).sessions.get(client_id).cloned() else {
            return false;
        };
        let mut s = lock(&session);
        if s.link.is_none() {
            return false;
        }
        let qos = s
            .subs
            .iter()
            .filter(|(filter, _)| filter_matches(filter, &msg.topic))
            .map(|(_, o)| o.qos)
            .max();
        let Some(qos) = qos else {
            return false;
        };
        let d = Delivery {
            qos: qos.min(msg.qos),
            msg: Arc::new(msg),
            retain: false,
            expires_at: None,
        };
        let enqueued = s.enqueue(d, self.shared.config.session_queue_len_max);
        if enqueued {
            self.shared
                .counters
                .messages_in
                .fetch_add(1, Ordering::Relaxed);
        } else {
            self.shared.counters.dropped.fetch_add(1, Ordering::Relaxed);
        }
        enqueued
    }

    /// Whether `client_id` is connected and subscribed to a filter matching `topic`.
    pub fn is_subscribed(&self, client_id: &str, topic: &str) -> bool {
        let Some(session) = lock(&self.shared.state).sessions.get(client_id).cloned() else {
            return false;
        };
        let s = lock(&session);
        s.link.is_some() && s.subs.keys().any(|f| filter_matches(f, topic))
    }

    /// A snapshot of one session, if it exists (for operators and tests waiting on a condition).
    pub fn session_info(&self, client_id: &str) -> Option<SessionInfo> {
        let session = lock(&self.shared.state).sessions.get(client_id).cloned()?;
        let s = lock(&session);
        Some(SessionInfo {
            connected: s.link.is_some(),
            subscriptions: s.subs.len(),
            queued: s.queue.len(),
            inflight: s.inflight.len(),
        })
    }

    pub fn stats(&self) -> BrokerStats {
        let (sessions, retained) = {
            let state = lock(&self.shared.state);
            (state.sessions.len() as u64, state.retained.len() as u64)
        };
        let c = &self.shared.counters;
        BrokerStats {
            connections: c.connections.load(Ordering::Relaxed),
            sessions,
            retained,
            messages_in: c.messages_in.load(Ordering::Relaxed),
            messages_out: c.messages_out.load(Ordering::Relaxed),
            denied: c.denied.load(Ordering::Relaxed),
            dropped: c.dropped.load(Ordering::Relaxed),
            panics: c.panics.load(Ordering::Relaxed),
        }
    }

    /// Ask every live connection to close (v5: DISCONNECT 0x8B), wait until they have ended
    /// (bounded by `connect_timeout_ms`), and stop broker timers. New connections are refused.
    pub async fn shutdown(&self) {
        self.shared.shutting_down.store(true, Ordering::SeqCst);
        let links: Vec<mpsc::Sender<Control>> = {
            let state = lock(&self.shared.state);
            state
                .sessions
                .values()
                .filter_map(|s| lock(s).link.as_ref().map(|l| l.control.clone()))
                .collect()
        };
        for l in links {
            let _ = l.try_send(Control::Shutdown);
        }
        let wait = async {
            loop {
                let ended = self.shared.conn_ended.notified();
                if self.shared.counters.connections.load(Ordering::SeqCst) == 0 {
                    break;
                }
                ended.await;
            }
        };
        let _ = tokio::time::timeout(
            std::time::Duration::from_millis(self.shared.config.connect_timeout_ms),
            wait,
        )
        .await;
        let mut timers = std::mem::take(&mut *lock(&self.shared.timers));
        timers.shutdown().await;
    }
}

impl Shared {
    /// Route one accepted message: update the retained table, then enqueue to every matching session.
    pub(crate) fn route(&self, msg: Arc<Message>, publisher: Option<&str>) {
        let expires_at = msg
            .props
            .message_expiry_secs
            .map(|s| Instant::now() + std::time::Duration::from_secs(u64::from(s)));
        let state = &mut *lock(&self.state);
        if msg.retain {
            if msg.payload.is_empty() {
                state.retained.remove(&msg.topic);
            } else if state.retained.len() < self.config.retained_messages_max
                || state.retained.contains_key(&msg.topic)
            {
                state.retained.insert(
                    msg.topic.clone(),
                    RetainedMsg {
                        msg: msg.clone(),
                        expires_at,
                    },
                );
            } else {
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        for session in state.sessions.values() {
            let mut s = lock(session);
            let mut best: Option<(u8, bool)> = None;
            for (filter, opts) in &s.subs {
                if !filter_matches(filter, &msg.topic) {
                    continue;
                }
                if opts.no_local && publisher == Some(s.client_id.as_str()) {
                    continue;
                }
                let (q, rap) = best.unwrap_or((0, false));
                best = Some((q.max(opts.qos), rap || opts.retain_as_published));
            }
            if let Some((qos, rap)) = best {
                let d = Delivery {
                    msg: msg.clone(),
                    qos: qos.min(msg.qos),
                    retain: msg.retain && rap,
                    expires_at,
                };
                if !s.enqueue(d, self.config.session_queue_len_max) {
                    self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Run a will (or any broker-side publish on behalf of a client) through `on_publish` and route it.
    pub(crate) async fn publish_as(&self, principal: &Principal, client_id: &str, msg: Message) {
        match self.hooks.on_publish(principal, client_id, &msg).await {
            PublishVerdict::Accept => {
                self.counters.messages_in.fetch_add(1, Ordering::Relaxed);
                self.route(Arc::new(msg), Some(client_id));
            }
            PublishVerdict::Reject(code) => {
                tracing::debug!(client_id, code, topic = %msg.topic, "will rejected by on_publish");
            }
            PublishVerdict::Disconnect => {
                tracing::warn!(client_id, topic = %msg.topic, "will dropped: on_publish failed");
            }
        }
    }

    pub(crate) fn spawn_timer<F>(&self, fut: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let mut timers = lock(&self.timers);
        // Reap finished timers so the set stays bounded by the live ones.
        while timers.try_join_next().is_some() {}
        timers.spawn(fut);
    }

    pub(crate) fn retained_matching(&self, filter: &str) -> Vec<(Arc<Message>, Option<Instant>)> {
        let state = lock(&self.state);
        state
            .retained
            .iter()
            .filter(|(topic, _)| filter_matches(filter, topic))
            .map(|(_, r)| (r.msg.clone(), r.expires_at))
            .collect()
    }
}
