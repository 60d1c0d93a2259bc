//! Broker-wide state: the session table, retained messages, routing, stats and lifecycle.

use crate::config::BrokerConfig;
use crate::hooks::{ConnInfo, Hooks, Message, PublishVerdict};
use crate::index::SubIndex;
use crate::session::{Delivery, Session, SubOptions};
use mooring_proto::policy::Principal;
use mooring_proto::topic::filter_matches;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Bound;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
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
    /// Subscriptions held by all sessions (gauge; the size of the subscription index).
    pub subscriptions: u64,
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

pub(crate) type SessionRef = Arc<Mutex<Session>>;

/// Session id: unique per session object for the broker's lifetime (a client id can name several
/// sessions over time: clean start replaces the session).
pub(crate) type SessionId = u64;

/// One subscription as the index holds it: whom to deliver to, and how.
pub(crate) struct Target {
    pub(crate) session: SessionRef,
    pub(crate) opts: SubOptions,
}

struct TableEntry {
    session: SessionRef,
    /// The device id of the session's principal, if it is a device (key of `by_device`).
    device: Option<String>,
}

/// The session table: sessions by client id, and client ids by device id, so every lookup on the
/// connect, publish_to and kick paths is a hash lookup.
#[derive(Default)]
pub(crate) struct SessionTable {
    by_client: HashMap<String, TableEntry>,
    by_device: HashMap<String, HashSet<String>>,
}

fn device_of(principal: &Principal) -> Option<&str> {
    match principal {
        Principal::Device { id, .. } => Some(id),
        _ => None,
    }
}

impl SessionTable {
    pub(crate) fn get(&self, client_id: &str) -> Option<&SessionRef> {
        self.by_client.get(client_id).map(|e| &e.session)
    }

    pub(crate) fn len(&self) -> usize {
        self.by_client.len()
    }

    /// Put `session` under `client_id`; returns the session it replaced.
    pub(crate) fn insert(
        &mut self,
        client_id: &str,
        session: SessionRef,
        principal: &Principal,
    ) -> Option<SessionRef> {
        let old = self.by_client.remove(client_id);
        if let Some(old) = &old {
            self.unlink_device(client_id, old.device.as_deref());
        }
        let device = device_of(principal).map(str::to_string);
        if let Some(d) = &device {
            self.by_device
                .entry(d.clone())
                .or_default()
                .insert(client_id.to_string());
        }
        self.by_client
            .insert(client_id.to_string(), TableEntry { session, device });
        old.map(|e| e.session)
    }

    /// Record the principal now attached to `client_id`'s session (a reconnect may change it).
    pub(crate) fn set_principal(&mut self, client_id: &str, principal: &Principal) {
        let device = device_of(principal);
        let Some(entry) = self.by_client.get_mut(client_id) else {
            return;
        };
        if entry.device.as_deref() == device {
            return;
        }
        let old = entry.device.take();
        entry.device = device.map(str::to_string);
        self.unlink_device(client_id, old.as_deref());
        if let Some(d) = device {
            self.by_device
                .entry(d.to_string())
                .or_default()
                .insert(client_id.to_string());
        }
    }

    /// Remove `client_id` if it still names `session`; true if it was removed.
    pub(crate) fn remove_if_same(&mut self, client_id: &str, session: &SessionRef) -> bool {
        if !self
            .by_client
            .get(client_id)
            .is_some_and(|e| Arc::ptr_eq(&e.session, session))
        {
            return false;
        }
        if let Some(e) = self.by_client.remove(client_id) {
            self.unlink_device(client_id, e.device.as_deref());
        }
        true
    }

    fn unlink_device(&mut self, client_id: &str, device: Option<&str>) {
        let Some(d) = device else { return };
        if let Some(ids) = self.by_device.get_mut(d) {
            ids.remove(client_id);
            if ids.is_empty() {
                self.by_device.remove(d);
            }
        }
    }

    /// Sessions whose principal is `device_id`.
    fn of_device<'a>(&'a self, device_id: &str) -> impl Iterator<Item = &'a SessionRef> + 'a {
        self.by_device
            .get(device_id)
            .into_iter()
            .flatten()
            .filter_map(|c| self.get(c))
    }

    fn sessions(&self) -> impl Iterator<Item = &SessionRef> {
        self.by_client.values().map(|e| &e.session)
    }
}

pub(crate) struct Shared {
    pub(crate) config: BrokerConfig,
    pub(crate) hooks: Arc<dyn Hooks>,
    /// Lock order (see lib.rs): `sessions` → a session → `subs`. `subs` and `retained` are leaf
    /// locks: nothing else is locked while one of them is held.
    pub(crate) sessions: Mutex<SessionTable>,
    /// Filter → (session, options), mirroring every live session's `subs`. Read-locked by every
    /// route, write-locked (briefly, under the session's lock) by SUBSCRIBE / UNSUBSCRIBE /
    /// session end. std's `RwLock` is futex-based and uncontended on a read-mostly path; we do
    /// not add `parking_lot` (no measured need: readers never block each other, and critical
    /// sections only walk the trie and clone `Arc`s).
    pub(crate) subs: RwLock<SubIndex<SessionId, Target>>,
    pub(crate) retained: Mutex<BTreeMap<String, RetainedMsg>>,
    pub(crate) counters: Counters,
    pub(crate) conn_seq: AtomicU64,
    pub(crate) session_seq: AtomicU64,
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

pub(crate) fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub(crate) fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Broker {
    pub fn new(config: BrokerConfig, hooks: Arc<dyn Hooks>) -> Broker {
        Broker {
            shared: Arc::new(Shared {
                config,
                hooks,
                sessions: Mutex::new(SessionTable::default()),
                subs: RwLock::new(SubIndex::default()),
                retained: Mutex::new(BTreeMap::new()),
                counters: Counters::default(),
                conn_seq: AtomicU64::new(1),
                session_seq: AtomicU64::new(1),
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
        let table = lock(&self.shared.sessions);
        for session in table.of_device(device_id) {
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
        let Some(session) = lock(&self.shared.sessions).get(client_id).cloned() else {
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
        let Some(session) = lock(&self.shared.sessions).get(client_id).cloned() else {
            return false;
        };
        let s = lock(&session);
        s.link.is_some() && s.subs.keys().any(|f| filter_matches(f, topic))
    }

    /// A snapshot of one session, if it exists (for operators and tests waiting on a condition).
    pub fn session_info(&self, client_id: &str) -> Option<SessionInfo> {
        let session = lock(&self.shared.sessions).get(client_id).cloned()?;
        let s = lock(&session);
        Some(SessionInfo {
            connected: s.link.is_some(),
            subscriptions: s.subs.len(),
            queued: s.queue.len(),
            inflight: s.inflight.len(),
        })
    }

    pub fn stats(&self) -> BrokerStats {
        let sessions = lock(&self.shared.sessions).len() as u64;
        let subscriptions = read(&self.shared.subs).len() as u64;
        let retained = lock(&self.shared.retained).len() as u64;
        let c = &self.shared.counters;
        BrokerStats {
            connections: c.connections.load(Ordering::Relaxed),
            sessions,
            subscriptions,
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
            let table = lock(&self.shared.sessions);
            table
                .sessions()
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
    /// Route one accepted message: update the retained table, then enqueue to every matching
    /// session, once per session at the highest QoS its matching filters grant.
    ///
    /// Two phases so no broker-wide lock is held while sessions are touched: (1) under the index
    /// read lock, collect the matching `(session, options)` entries and the index generation;
    /// (2) release it and, one session at a time under that session's lock, merge its entries and
    /// enqueue. A session whose subscriptions changed after phase 1 (`subs_generation` newer than
    /// what phase 1 saw: an UNSUBSCRIBE, a new SUBSCRIBE, or its end) is judged on its current
    /// filters instead, under its lock, so a message is never delivered on a subscription that
    /// was already removed (the same per-session atomicity the single table lock used to give).
    pub(crate) fn route(&self, msg: Arc<Message>, publisher: Option<&str>) {
        let expires_at = msg
            .props
            .message_expiry_secs
            .map(|s| Instant::now() + std::time::Duration::from_secs(u64::from(s)));
        if msg.retain {
            let mut retained = lock(&self.retained);
            if msg.payload.is_empty() {
                retained.remove(&msg.topic);
            } else if retained.len() < self.config.retained_messages_max
                || retained.contains_key(&msg.topic)
            {
                retained.insert(
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
        let mut targets: Vec<(SessionId, SubOptions, SessionRef)> = Vec::new();
        let seen = {
            let index = read(&self.subs);
            index.for_each_match(&msg.topic, |id, t| {
                targets.push((*id, t.opts, t.session.clone()));
            });
            index.generation()
        };
        if targets.is_empty() {
            return;
        }
        // Group a session's filters together (a session can match through several).
        targets.sort_unstable_by_key(|t| t.0);
        for group in targets.chunk_by(|a, b| a.0 == b.0) {
            let session = &group[0].2;
            let mut s = lock(session);
            let own = publisher == Some(s.client_id.as_str());
            let best = if s.retired {
                // Left the table after phase 1: routing no longer reaches it.
                None
            } else if s.subs_generation > seen {
                merge_grants(
                    s.subs
                        .iter()
                        .filter(|(filter, _)| filter_matches(filter, &msg.topic))
                        .map(|(_, o)| *o),
                    own,
                )
            } else {
                merge_grants(group.iter().map(|t| t.1), own)
            };
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

    /// Add or replace a subscription of `session` (whose lock the caller holds as `s`), in the
    /// session and in the index. A retired session (ended, or replaced by a clean start while
    /// its old connection is still closing) keeps it to itself: routing never sees it.
    pub(crate) fn add_subscription(
        &self,
        session: &SessionRef,
        s: &mut Session,
        filter: String,
        opts: SubOptions,
    ) {
        if !s.retired {
            let mut index = write(&self.subs);
            index.insert(
                &filter,
                s.id,
                Target {
                    session: session.clone(),
                    opts,
                },
            );
            s.subs_generation = index.generation();
        }
        s.subs.insert(filter, opts);
    }

    /// Remove a subscription of the session whose lock the caller holds; false if it had none.
    pub(crate) fn remove_subscription(&self, s: &mut Session, filter: &str) -> bool {
        if s.subs.remove(filter).is_none() {
            return false;
        }
        if !s.retired {
            let mut index = write(&self.subs);
            index.remove(filter, &s.id);
            s.subs_generation = index.generation();
        }
        true
    }

    /// The session has left the table (ended, expired, or replaced by a clean start): drop its
    /// subscriptions from the index and mark it so none is added again. Caller holds its lock.
    pub(crate) fn retire(&self, s: &mut Session) {
        if s.retired {
            return;
        }
        s.retired = true;
        if s.subs.is_empty() {
            return;
        }
        let mut index = write(&self.subs);
        for filter in s.subs.keys() {
            index.remove(filter, &s.id);
        }
        s.subs_generation = index.generation();
        drop(index);
        s.subs.clear();
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

    /// Retained messages whose topic matches `filter`. Only the topics sharing the filter's
    /// literal prefix (the text before its first wildcard) are examined, so a device subscribing
    /// to `devices/<id>/shadow/delta` costs O(log retained), not a scan of every retained topic.
    /// A filter starting with a wildcard (`#`, `+/...`) still scans them all.
    pub(crate) fn retained_matching(&self, filter: &str) -> Vec<(Arc<Message>, Option<Instant>)> {
        let retained = lock(&self.retained);
        let prefix = retained_prefix(filter);
        retained
            .range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(|(topic, _)| topic.starts_with(prefix))
            .filter(|(topic, _)| filter_matches(filter, topic))
            .map(|(_, r)| (r.msg.clone(), r.expires_at))
            .collect()
    }
}

/// Highest granted QoS and retain-as-published over a session's matching filters; a `no_local`
/// filter does not count for the session's own messages. `None`: nothing to deliver.
fn merge_grants(opts: impl Iterator<Item = SubOptions>, own: bool) -> Option<(u8, bool)> {
    opts.filter(|o| !(o.no_local && own)).fold(None, |best, o| {
        let (q, rap) = best.unwrap_or((0, false));
        Some((q.max(o.qos), rap || o.retain_as_published))
    })
}

/// Every topic `filter` matches starts with this: the text before the first wildcard, minus the
/// `/` that precedes it (`a/#` matches `a` itself).
fn retained_prefix(filter: &str) -> &str {
    let literal = filter.find(['+', '#']).map_or(filter, |i| &filter[..i]);
    literal.strip_suffix('/').unwrap_or(literal)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retained_prefix_is_a_prefix_of_every_matching_topic() {
        assert_eq!(
            retained_prefix("devices/d1/shadow/delta"),
            "devices/d1/shadow/delta"
        );
        assert_eq!(
            retained_prefix("devices/d1/commands/+"),
            "devices/d1/commands"
        );
        assert_eq!(retained_prefix("devices/d1/#"), "devices/d1");
        assert_eq!(retained_prefix("#"), "");
        assert_eq!(retained_prefix("+/x"), "");
        assert_eq!(retained_prefix("a//#"), "a/");
        for (filter, topic) in [
            ("devices/d1/#", "devices/d1"),
            ("a//#", "a/"),
            ("a/+", "a/"),
            ("a/#", "a"),
        ] {
            assert!(filter_matches(filter, topic));
            assert!(
                topic.starts_with(retained_prefix(filter)),
                "{filter} {topic}"
            );
        }
    }

    #[test]
    fn merged_grant_is_the_highest_qos_and_skips_no_local_for_own_messages() {
        let o = |qos, no_local, retain_as_published| SubOptions {
            qos,
            no_local,
            retain_as_published,
        };
        let opts = [o(0, false, false), o(2, true, false), o(1, false, true)];
        assert_eq!(merge_grants(opts.into_iter(), false), Some((2, true)));
        assert_eq!(merge_grants(opts.into_iter(), true), Some((1, true)));
        assert_eq!(merge_grants([o(2, true, true)].into_iter(), true), None);
        assert_eq!(merge_grants(std::iter::empty(), false), None);
    }
}
