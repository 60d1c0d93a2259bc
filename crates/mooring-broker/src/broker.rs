//! Broker-wide state: the session table, retained messages, routing, stats and lifecycle.

use crate::config::BrokerConfig;
use crate::hooks::{ConnInfo, Hooks, Message, PublishVerdict};
use crate::index::SubIndex;
use crate::persist::{
    session_key, Durable, MessageValue, Persistence, RetainedValue, SessionValue, StateOp,
};
use crate::session::{Delivery, Enqueue, InflightState, PersistInfo, Session, SubOptions};
use crate::shared_sub::Groups;
use mooring_proto::policy::Principal;
use mooring_proto::topic::{filter_matches, is_shared_filter};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Bound;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Why the broker asks a live connection to close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Control {
    /// Another connection took the client id (v5 DISCONNECT 0x8E).
    TakenOver,
    /// Kicked by the embedder ([`Broker::kick`]).
    Kick(KickReason),
    /// The principal was removed ([`Broker::remove_principal`]): close with v5 DISCONNECT 0x98
    /// and do not publish the will.
    Removed,
    /// Broker shutdown (v5 DISCONNECT 0x8B).
    Shutdown,
}

/// Why the embedder closes a principal's connections ([`Broker::kick`]); a v5 client is told in
/// its DISCONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KickReason {
    /// v5 DISCONNECT 0x87 (Not authorized): e.g. its credentials were revoked.
    NotAuthorized,
    /// v5 DISCONNECT 0x98 (Administrative action).
    AdministrativeAction,
}

/// Why the broker refused or removed something; each reason has its own counter
/// ([`BrokerStats::refusals`]) so operators see which bound or check was hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// CONNECT refused by the embedder's authentication.
    Authentication,
    /// CONNECT refused by the embedder: a client id this principal may not use.
    ClientIdInvalid,
    /// CONNECT under a client id whose session belongs to another principal.
    ClientIdInUse,
    /// CONNECT refused: the principal holds `persistent_sessions_per_principal_max` persistent sessions.
    SessionQuota,
    /// CONNECT refused: `sessions_max` non-device sessions exist.
    SessionsFull,
    /// PUBLISH refused by the topic policy (or a will at CONNECT).
    PublishDenied,
    /// Subscription filter refused by the topic policy.
    SubscribeDenied,
    /// A held subscription removed because the policy no longer allows it (tags, policy reload,
    /// a session resumed by a principal that may not hold it).
    SubscriptionRevoked,
    /// Topic name or filter over `topic_bytes_max` / `topic_levels_max`.
    TopicTooLong,
    /// Retained message over a retained quota (per principal or broker-wide).
    RetainedQuota,
    /// Subscription over `subscriptions_per_session_max`.
    SubscriptionQuota,
    /// Message dropped: session queue full (count or bytes), QoS 0 first.
    QueueFull,
    /// Connection closed: its socket accepted no bytes for `write_stall_timeout_ms`.
    WriteStalled,
    /// Connection closed: nothing received within the keep-alive (or the server's idle cap).
    KeepaliveTimeout,
    /// Connection closed: a packet that must carry a packet id carried 0.
    MalformedPacket,
}

impl Refusal {
    pub const ALL: [Refusal; 15] = [
        Refusal::Authentication,
        Refusal::ClientIdInvalid,
        Refusal::ClientIdInUse,
        Refusal::SessionQuota,
        Refusal::SessionsFull,
        Refusal::PublishDenied,
        Refusal::SubscribeDenied,
        Refusal::SubscriptionRevoked,
        Refusal::TopicTooLong,
        Refusal::RetainedQuota,
        Refusal::SubscriptionQuota,
        Refusal::QueueFull,
        Refusal::WriteStalled,
        Refusal::KeepaliveTimeout,
        Refusal::MalformedPacket,
    ];

    /// The `reason` label in `/metrics`.
    pub fn name(self) -> &'static str {
        match self {
            Refusal::Authentication => "authentication",
            Refusal::ClientIdInvalid => "client_id_invalid",
            Refusal::ClientIdInUse => "client_id_in_use",
            Refusal::SessionQuota => "session_quota",
            Refusal::SessionsFull => "sessions_full",
            Refusal::PublishDenied => "publish_denied",
            Refusal::SubscribeDenied => "subscribe_denied",
            Refusal::SubscriptionRevoked => "subscription_revoked",
            Refusal::TopicTooLong => "topic_too_long",
            Refusal::RetainedQuota => "retained_quota",
            Refusal::SubscriptionQuota => "subscription_quota",
            Refusal::QueueFull => "queue_full",
            Refusal::WriteStalled => "write_stalled",
            Refusal::KeepaliveTimeout => "keepalive_timeout",
            Refusal::MalformedPacket => "malformed_packet",
        }
    }
}

/// Counters since start (monotonic) and gauges (current).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BrokerStats {
    /// Live network connections (gauge).
    pub connections: u64,
    /// Sessions, live or persisted (gauge).
    pub sessions: u64,
    /// Subscriptions held by all sessions, shared ones included (gauge).
    pub subscriptions: u64,
    /// Shared subscription groups (gauge).
    pub shared_groups: u64,
    /// Messages moved from a shared subscription member that left to another member.
    pub shared_redelivered: u64,
    pub retained: u64,
    /// Topic + payload bytes of the retained messages clients published (gauge).
    pub retained_bytes: u64,
    pub messages_in: u64,
    pub messages_out: u64,
    /// PUBLISH / SUBSCRIBE / CONNECT refused by policy or authentication.
    pub denied: u64,
    /// Messages dropped: full session queue, expired, too large for the client, retained table full.
    pub dropped: u64,
    /// Connection tasks that panicked (contained).
    pub panics: u64,
    /// Every refusal by reason, in [`Refusal::ALL`] order.
    pub refusals: Vec<(Refusal, u64)>,
}

impl BrokerStats {
    pub fn refused(&self, reason: Refusal) -> u64 {
        self.refusals
            .iter()
            .find(|(r, _)| *r == reason)
            .map_or(0, |(_, n)| *n)
    }
}

/// What [`Broker::restore`] loaded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RestoreStats {
    pub retained: usize,
    pub sessions: usize,
    /// Queued and unacknowledged messages of the restored sessions.
    pub messages: usize,
    /// Sessions whose expiry passed while the server was down (deleted).
    pub sessions_expired: usize,
    /// Wills of restored sessions scheduled to fire (their clients' connections ended with the
    /// server, or their will delay was running).
    pub wills: usize,
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
    pub(crate) shared_redelivered: AtomicU64,
    refusals: [AtomicU64; Refusal::ALL.len()],
}

impl Counters {
    pub(crate) fn refuse(&self, reason: Refusal) {
        // `Refusal::ALL` lists the variants in declaration order (unit-tested).
        self.refusals[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// A CONNECT, PUBLISH or SUBSCRIBE refused: counted in `denied` and under its reason.
    pub(crate) fn deny(&self, reason: Refusal) {
        self.denied.fetch_add(1, Ordering::Relaxed);
        self.refuse(reason);
    }
}

/// Whose a session or a retained message is. Sessions live in one namespace per kind of
/// principal, so a client id of one kind can never name, resume or take over a session of
/// another kind; within a namespace a session belongs to the principal that created it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Owner {
    Device(String),
    /// A service token, by its id (names are not unique).
    Service(String),
    /// Every anonymous client of the development listener.
    Dev,
}

/// The session namespaces (see [`Owner`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Namespace {
    Device,
    Service,
    Dev,
}

/// A principal as the broker indexes its sessions and retained messages: every session is found
/// by the key of the principal it belongs to, whatever kind that is. The embedder names whose
/// sessions to act on ([`Broker::kick`], [`Broker::publish_to`], ...) with one.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PrincipalKey(pub(crate) Owner);

impl PrincipalKey {
    /// The key of `principal` (its tags or permissions play no part).
    pub fn of(principal: &Principal) -> PrincipalKey {
        PrincipalKey(Owner::of(principal))
    }

    /// The key of the device `device_id` (what the `*_device` methods act on).
    pub fn device(device_id: &str) -> PrincipalKey {
        PrincipalKey(Owner::Device(device_id.to_owned()))
    }
}

impl Owner {
    /// The one place a principal becomes a key: its kind and id.
    pub(crate) fn of(principal: &Principal) -> Owner {
        match principal {
            Principal::Device { id, .. } => Owner::Device(id.clone()),
            Principal::Service { id, .. } => Owner::Service(id.clone()),
            Principal::Dev => Owner::Dev,
        }
    }

    pub(crate) fn namespace(&self) -> Namespace {
        match self {
            Owner::Device(_) => Namespace::Device,
            Owner::Service(_) => Namespace::Service,
            Owner::Dev => Namespace::Dev,
        }
    }

    /// Whether the broker's session quotas (`sessions_max`, the per-principal ones) bound this
    /// owner's sessions. A device's are bounded by the embedder instead: it gives each device
    /// one client id.
    pub(crate) fn quota_bound(&self) -> bool {
        !matches!(self, Owner::Device(_))
    }
}

pub(crate) struct RetainedMsg {
    pub(crate) msg: Arc<Message>,
    pub(crate) expires_at: Option<Instant>,
    /// `None`: published by the server itself (never counted, never refused).
    owner: Option<Owner>,
}

#[derive(Default, Clone, Copy)]
struct Totals {
    count: usize,
    bytes: usize,
}

/// What one owner holds in the retained table.
#[derive(Default)]
struct Usage {
    totals: Totals,
    topics: HashSet<String>,
}

/// Retained messages by topic, with what each principal owns, so quotas are checked in O(1) and
/// an owner's expired messages can be found without scanning the table.
#[derive(Default)]
pub(crate) struct RetainedTable {
    msgs: BTreeMap<String, RetainedMsg>,
    usage: HashMap<Owner, Usage>,
    /// Messages and bytes owned by clients (all owners together).
    clients: Totals,
    /// Last sweep of every expired message (rate-limited: see `make_room`).
    last_sweep: Option<Instant>,
}

/// Least time between two sweeps of the whole retained table for expired messages.
const RETAINED_SWEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

impl RetainedTable {
    fn account(&mut self, owner: &Option<Owner>, topic: &str, size: usize, add: bool) {
        let Some(owner) = owner else { return };
        let u = self.usage.entry(owner.clone()).or_default();
        if add {
            u.totals.count += 1;
            u.totals.bytes += size;
            u.topics.insert(topic.to_owned());
            self.clients.count += 1;
            self.clients.bytes += size;
        } else {
            u.totals.count = u.totals.count.saturating_sub(1);
            u.totals.bytes = u.totals.bytes.saturating_sub(size);
            u.topics.remove(topic);
            self.clients.count = self.clients.count.saturating_sub(1);
            self.clients.bytes = self.clients.bytes.saturating_sub(size);
            if u.totals.count == 0 {
                self.usage.remove(owner);
            }
        }
    }

    /// Whether `owner` may store `msg` (a non-empty retained message) under the limits.
    fn fits(&self, config: &BrokerConfig, owner: Option<&Owner>, msg: &Message) -> bool {
        let Some(owner) = owner else { return true };
        let size = msg.size_bytes();
        let old = self.msgs.get(&msg.topic);
        let mine = old.filter(|o| o.owner.as_ref() == Some(owner));
        let clients_old = old.filter(|o| o.owner.is_some());
        let u = self.usage.get(owner).map(|u| u.totals).unwrap_or_default();
        let count = u.count - usize::from(mine.is_some()) + 1;
        let bytes = u.bytes - mine.map_or(0, |o| o.msg.size_bytes()) + size;
        let all_count = self.clients.count - usize::from(clients_old.is_some()) + 1;
        let all_bytes = self.clients.bytes - clients_old.map_or(0, |o| o.msg.size_bytes()) + size;
        count <= config.retained_per_principal_max
            && bytes <= config.retained_bytes_per_principal_max
            && all_count <= config.retained_messages_max
            && all_bytes <= config.retained_bytes_max
    }

    /// Like `fits`, but first gives back what has expired: the owner's own expired messages,
    /// then (at most once per [`RETAINED_SWEEP_INTERVAL`]) every expired message. The topics
    /// removed are appended to `removed` (they are deleted from the store too).
    fn make_room(
        &mut self,
        config: &BrokerConfig,
        owner: Option<&Owner>,
        msg: &Message,
        removed: &mut Vec<String>,
    ) -> bool {
        if self.fits(config, owner, msg) {
            return true;
        }
        let Some(owner) = owner else { return true };
        let now = Instant::now();
        let expired = |m: &RetainedMsg| m.expires_at.is_some_and(|at| at <= now);
        let mine: Vec<String> = self.usage.get(owner).map_or_else(Vec::new, |u| {
            u.topics
                .iter()
                .filter(|t| self.msgs.get(*t).is_some_and(expired))
                .cloned()
                .collect()
        });
        for t in &mine {
            self.remove(t);
        }
        removed.extend(mine);
        if self.fits(config, Some(owner), msg) {
            return true;
        }
        if self
            .last_sweep
            .is_none_or(|at| now.duration_since(at) >= RETAINED_SWEEP_INTERVAL)
        {
            self.last_sweep = Some(now);
            let all: Vec<String> = self
                .msgs
                .iter()
                .filter(|(_, m)| expired(m))
                .map(|(t, _)| t.clone())
                .collect();
            for t in &all {
                self.remove(t);
            }
            removed.extend(all);
        }
        self.fits(config, Some(owner), msg)
    }

    fn remove(&mut self, topic: &str) {
        if let Some(old) = self.msgs.remove(topic) {
            self.account(&old.owner, topic, old.msg.size_bytes(), false);
        }
    }

    fn insert(&mut self, msg: Arc<Message>, expires_at: Option<Instant>, owner: Option<Owner>) {
        self.remove(&msg.topic);
        self.account(&owner, &msg.topic, msg.size_bytes(), true);
        self.msgs.insert(
            msg.topic.clone(),
            RetainedMsg {
                msg,
                expires_at,
                owner,
            },
        );
    }

    /// Remove what `owner` published and everything under `prefix` (if given); returns the
    /// topics removed.
    fn remove_where(&mut self, owner: &Owner, prefix: Option<&str>) -> Vec<String> {
        let mut doomed: Vec<String> = self
            .usage
            .get(owner)
            .map_or_else(Vec::new, |u| u.topics.iter().cloned().collect());
        if let Some(p) = prefix {
            doomed.extend(
                self.msgs
                    .range::<str, _>((Bound::Included(p), Bound::Unbounded))
                    .take_while(|(t, _)| t.starts_with(p))
                    .map(|(t, _)| t.clone()),
            );
        }
        doomed.sort_unstable();
        doomed.dedup();
        doomed.retain(|t| self.msgs.contains_key(t));
        for t in &doomed {
            self.remove(t);
        }
        doomed
    }

    pub(crate) fn len(&self) -> usize {
        self.msgs.len()
    }
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

/// A session's key in the table: its namespace and client id.
pub(crate) type SessionKey = (Namespace, String);

pub(crate) struct TableEntry {
    pub(crate) session: SessionRef,
    pub(crate) owner: Owner,
    /// Asked for a session expiry > 0 when it was attached (counts against the owner's quota).
    pub(crate) persistent: bool,
}

/// Sessions one quota-bound owner holds (the per-principal quotas).
#[derive(Default, Clone, Copy)]
struct OwnerSessions {
    /// Live or persisted.
    all: usize,
    persistent: usize,
}

/// The session table: sessions by (namespace, client id), and client ids by owner principal, so
/// every lookup on the connect, publish_to and kick paths is a hash lookup. Also counts
/// quota-bound sessions (for `sessions_max`) and, per quota-bound owner, its sessions and
/// persistent ones (see [`Owner::quota_bound`]).
#[derive(Default)]
pub(crate) struct SessionTable {
    by_key: HashMap<SessionKey, TableEntry>,
    /// Client ids (in the owner's namespace) of each owner's sessions.
    by_owner: HashMap<Owner, HashSet<String>>,
    owners: HashMap<Owner, OwnerSessions>,
    /// Quota-bound sessions.
    others: usize,
}

impl SessionTable {
    pub(crate) fn get(&self, key: &SessionKey) -> Option<&TableEntry> {
        self.by_key.get(key)
    }

    pub(crate) fn len(&self) -> usize {
        self.by_key.len()
    }

    /// Quota-bound sessions (what `sessions_max` bounds).
    pub(crate) fn others(&self) -> usize {
        self.others
    }

    /// Sessions (live or persisted) a quota-bound `owner` holds.
    pub(crate) fn sessions_of(&self, owner: &Owner) -> usize {
        self.owners.get(owner).map_or(0, |o| o.all)
    }

    /// Persistent sessions a quota-bound `owner` holds.
    pub(crate) fn persistent_of(&self, owner: &Owner) -> usize {
        self.owners.get(owner).map_or(0, |o| o.persistent)
    }

    /// Adjusts a quota-bound owner's counts.
    fn count(&mut self, owner: &Owner, all: isize, persistent: isize) {
        if !owner.quota_bound() {
            return;
        }
        let o = self.owners.entry(owner.clone()).or_default();
        o.all = o.all.saturating_add_signed(all);
        o.persistent = o.persistent.saturating_add_signed(persistent);
        if o.all == 0 {
            self.owners.remove(owner);
        }
    }

    /// Put `session` under `key`, owned by `owner`; returns the session it replaced.
    pub(crate) fn insert(
        &mut self,
        key: &SessionKey,
        session: SessionRef,
        owner: Owner,
        persistent: bool,
    ) -> Option<SessionRef> {
        debug_assert_eq!(key.0, owner.namespace());
        let old = self.remove_key(key);
        self.by_owner
            .entry(owner.clone())
            .or_default()
            .insert(key.1.clone());
        if owner.quota_bound() {
            self.others += 1;
        }
        self.count(&owner, 1, isize::from(persistent));
        self.by_key.insert(
            key.clone(),
            TableEntry {
                session,
                owner,
                persistent,
            },
        );
        old
    }

    /// Record whether the session under `key` is persistent now (a reconnect may change it).
    pub(crate) fn set_persistent(&mut self, key: &SessionKey, persistent: bool) {
        let Some(entry) = self.by_key.get_mut(key) else {
            return;
        };
        if entry.persistent == persistent {
            return;
        }
        entry.persistent = persistent;
        let owner = entry.owner.clone();
        self.count(&owner, 0, if persistent { 1 } else { -1 });
    }

    fn remove_key(&mut self, key: &SessionKey) -> Option<SessionRef> {
        let e = self.by_key.remove(key)?;
        self.count(&e.owner, -1, -isize::from(e.persistent));
        if let Some(ids) = self.by_owner.get_mut(&e.owner) {
            ids.remove(&key.1);
            if ids.is_empty() {
                self.by_owner.remove(&e.owner);
            }
        }
        if e.owner.quota_bound() {
            self.others -= 1;
        }
        Some(e.session)
    }

    /// Remove `key` if it still names `session`; true if it was removed.
    pub(crate) fn remove_if_same(&mut self, key: &SessionKey, session: &SessionRef) -> bool {
        if !self
            .by_key
            .get(key)
            .is_some_and(|e| Arc::ptr_eq(&e.session, session))
        {
            return false;
        }
        self.remove_key(key);
        true
    }

    /// Keys of the sessions `owner` holds.
    fn keys_of(&self, owner: &Owner) -> Vec<SessionKey> {
        self.by_owner
            .get(owner)
            .into_iter()
            .flatten()
            .map(|c| (owner.namespace(), c.clone()))
            .collect()
    }

    /// Sessions `owner` holds.
    fn of_owner<'a>(&'a self, owner: &'a Owner) -> impl Iterator<Item = &'a SessionRef> + 'a {
        self.by_owner
            .get(owner)
            .into_iter()
            .flatten()
            .filter_map(|c| self.by_key.get(&(owner.namespace(), c.clone())))
            .map(|e| &e.session)
    }

    fn sessions(&self) -> impl Iterator<Item = &SessionRef> {
        self.by_key.values().map(|e| &e.session)
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
    /// Shared subscription groups (`shared_sub.rs`); a leaf lock like `subs`.
    pub(crate) groups: RwLock<Groups>,
    pub(crate) retained: Mutex<RetainedTable>,
    pub(crate) counters: Counters,
    pub(crate) conn_seq: AtomicU64,
    /// Moved (under the session table lock) whenever a principal is removed or changes
    /// (`remove_principal`, `update_principal`): a CONNECT that authenticated before re-asks.
    pub(crate) principal_epoch: AtomicU64,
    pub(crate) session_seq: AtomicU64,
    pub(crate) shutting_down: AtomicBool,
    /// Timers that outlive a connection: will delay, session expiry.
    pub(crate) timers: Mutex<JoinSet<()>>,
    pub(crate) conn_ended: Notify,
    /// Where retained messages and persistent sessions are made durable (`None`: memory only).
    pub(crate) persist: Option<Arc<dyn Persistence>>,
    /// Next `seq` of a stored message (broker-wide, increasing; restored past the largest stored).
    pub(crate) msg_seq: AtomicU64,
}

/// An MQTT 3.1.1/5.0 broker. Cheap to clone; all clones are the same broker.
#[derive(Clone)]
pub struct Broker {
    pub(crate) shared: Arc<Shared>,
}

// A panic while holding a lock must not wedge the broker: the data is still consistent
// enough (every critical section is short and updates whole entries).
pub(crate) use mooring_proto::sync::{lock, read, write};

impl Broker {
    /// A broker that keeps its state in memory only.
    pub fn new(config: BrokerConfig, hooks: Arc<dyn Hooks>) -> Broker {
        Broker::build(config, hooks, None)
    }

    /// A broker that makes retained messages and persistent sessions durable through
    /// `persist` (see `persist.rs`). Call [`Broker::restore`] with what was stored before
    /// serving any connection.
    pub fn with_persistence(
        config: BrokerConfig,
        hooks: Arc<dyn Hooks>,
        persist: Arc<dyn Persistence>,
    ) -> Broker {
        Broker::build(config, hooks, Some(persist))
    }

    fn build(
        config: BrokerConfig,
        hooks: Arc<dyn Hooks>,
        persist: Option<Arc<dyn Persistence>>,
    ) -> Broker {
        Broker {
            shared: Arc::new(Shared {
                config,
                hooks,
                sessions: Mutex::new(SessionTable::default()),
                subs: RwLock::new(SubIndex::default()),
                groups: RwLock::new(Groups::default()),
                retained: Mutex::new(RetainedTable::default()),
                counters: Counters::default(),
                conn_seq: AtomicU64::new(1),
                principal_epoch: AtomicU64::new(0),
                session_seq: AtomicU64::new(1),
                shutting_down: AtomicBool::new(false),
                timers: Mutex::new(JoinSet::new()),
                conn_ended: Notify::new(),
                persist,
                msg_seq: AtomicU64::new(1),
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

    /// Disconnect every live connection of the principal `who` (a v5 client is told `reason`).
    pub fn kick(&self, who: &PrincipalKey, reason: KickReason) {
        let table = lock(&self.shared.sessions);
        for session in table.of_owner(&who.0) {
            if let Some(link) = &lock(session).link {
                let _ = link.control.try_send(Control::Kick(reason));
            }
        }
    }

    /// Disconnect every live connection whose principal is this device (v5: DISCONNECT 0x98).
    pub fn kick_device(&self, device_id: &str) {
        self.kick(
            &PrincipalKey::device(device_id),
            KickReason::AdministrativeAction,
        );
    }

    /// The principal `who` is gone: close its live connections (v5 DISCONNECT 0x98, no will),
    /// end its sessions, live or persisted (their queued messages go with them), and remove the
    /// retained messages it published plus every retained message under `topic_prefix` (the
    /// server passes `devices/<id>/` for a device, so its shadow delta goes too). A principal
    /// re-created under the same key starts with nothing. Returns the number of retained
    /// messages removed.
    pub fn remove_principal(&self, who: &PrincipalKey, topic_prefix: Option<&str>) -> usize {
        {
            let mut table = lock(&self.shared.sessions);
            self.shared.principal_epoch.fetch_add(1, Ordering::SeqCst);
            for key in table.keys_of(&who.0) {
                let Some(session) = table.remove_key(&key) else {
                    continue;
                };
                let mut s = lock(&session);
                if let Some(link) = &s.link {
                    let _ = link.control.try_send(Control::Removed);
                }
                self.shared.retire(&mut s);
                s.removed = true;
                s.clear_queue();
            }
        }
        // The deletes are submitted under the table's lock, like every retained op, so a
        // publish to one of these topics right after is stored after them.
        let mut retained = lock(&self.shared.retained);
        let topics = retained.remove_where(&who.0, topic_prefix);
        let removed = topics.len();
        self.shared.delete_retained(topics);
        removed
    }

    /// The device is gone: [`Broker::remove_principal`] for it.
    pub fn remove_device(&self, device_id: &str, topic_prefix: Option<&str>) -> usize {
        self.remove_principal(&PrincipalKey::device(device_id), topic_prefix)
    }

    /// The embedder's view of a principal changed (e.g. a device's tags): every session of that
    /// principal ([`PrincipalKey::of`]), live or persisted, uses it from now on (every later
    /// PUBLISH and SUBSCRIBE is checked against it), and subscriptions it no longer allows are
    /// removed at once. Returns the number of subscriptions removed.
    pub fn update_principal(&self, principal: Principal) -> usize {
        let owner = Owner::of(&principal);
        let sessions: Vec<SessionRef> = {
            let table = lock(&self.shared.sessions);
            self.shared.principal_epoch.fetch_add(1, Ordering::SeqCst);
            table.of_owner(&owner).cloned().collect()
        };
        let principal = Arc::new(principal);
        let mut removed = 0;
        for session in sessions {
            let mut s = lock(&session);
            s.principal = principal.clone();
            let offline = s.link.is_none();
            let revoked = self.shared.revoke_disallowed(&mut s, offline);
            if revoked == 0 {
                // Stored with the new principal (a revocation stores it already), which is what
                // a restored session is judged by until its client is back.
                if let Some(op) = self.shared.session_op(&s, offline) {
                    self.shared.detach(vec![op]);
                }
            }
            removed += revoked;
        }
        removed
    }

    /// The policy changed (e.g. reloaded): check every session's subscriptions again and remove
    /// what is no longer allowed. Returns the number removed.
    pub fn reauthorize_all(&self) -> usize {
        let sessions: Vec<SessionRef> = lock(&self.shared.sessions).sessions().cloned().collect();
        sessions
            .iter()
            .map(|session| {
                let mut s = lock(session);
                let offline = s.link.is_none();
                self.shared.revoke_disallowed(&mut s, offline)
            })
            .sum()
    }

    /// Publish a message originated by the server; routed (and retained) like any publish.
    /// Server-owned retained messages are never refused by the retained limits (they are
    /// bounded by what the server publishes, e.g. one shadow delta per device).
    pub fn publish(&self, msg: Message) {
        self.shared
            .counters
            .messages_in
            .fetch_add(1, Ordering::Relaxed);
        let msg = Arc::new(msg);
        if msg.retain {
            self.shared.store_retained(&msg, None, &mut false);
        }
        self.shared.route(msg, None);
    }

    /// Publish a server-originated message to one principal only: enqueued if a connected
    /// session of `who` holds a subscription matching the topic (at the highest granted QoS).
    /// Sessions are found by principal, never by client id, so no other client can receive it.
    /// Returns what happened (`Refused` also when no connected session of `who` holds a
    /// matching subscription). Not retained, not routed to anyone else.
    pub fn publish_to(&self, who: &PrincipalKey, msg: Message) -> Enqueue {
        let sessions: Vec<SessionRef> = lock(&self.shared.sessions)
            .of_owner(&who.0)
            .cloned()
            .collect();
        let msg = Arc::new(msg);
        for session in sessions {
            let mut s = lock(&session);
            if s.link.is_none() {
                continue;
            }
            let grant = merge_grants(
                s.subs
                    .iter()
                    .filter(|(filter, _)| filter_matches(filter, &msg.topic))
                    .map(|(_, o)| *o),
                false,
            );
            let Some(grant) = grant else {
                continue;
            };
            let d = Delivery {
                qos: grant.qos.min(msg.qos),
                msg: msg.clone(),
                retain: false,
                expires_at: None,
                sub_ids: grant.sub_ids,
                seq: 0,
                shared: None,
            };
            let outcome = self.shared.enqueue(&mut s, d, &mut false);
            drop(s);
            if outcome.is_enqueued() {
                self.shared
                    .counters
                    .messages_in
                    .fetch_add(1, Ordering::Relaxed);
            }
            return outcome;
        }
        Enqueue::Refused
    }

    /// [`Broker::publish_to`] the device `device_id`.
    pub fn publish_to_device(&self, device_id: &str, msg: Message) -> Enqueue {
        self.publish_to(&PrincipalKey::device(device_id), msg)
    }

    /// Whether a connected session of `who` is subscribed to a filter matching `topic`.
    pub fn is_subscribed(&self, who: &PrincipalKey, topic: &str) -> bool {
        let table = lock(&self.shared.sessions);
        let subscribed = table.of_owner(&who.0).any(|session| {
            let s = lock(session);
            s.link.is_some() && s.subs.keys().any(|f| filter_matches(f, topic))
        });
        subscribed
    }

    /// Whether a connected session of this device is subscribed to a filter matching `topic`.
    pub fn device_is_subscribed(&self, device_id: &str, topic: &str) -> bool {
        self.is_subscribed(&PrincipalKey::device(device_id), topic)
    }

    /// A snapshot of the session under `client_id` (device namespace first, then services, then
    /// the dev listener), for operators and tests waiting on a condition.
    pub fn session_info(&self, client_id: &str) -> Option<SessionInfo> {
        let session = {
            let table = lock(&self.shared.sessions);
            [Namespace::Device, Namespace::Service, Namespace::Dev]
                .into_iter()
                .find_map(|ns| table.get(&(ns, client_id.to_owned())))
                .map(|e| e.session.clone())?
        };
        let s = lock(&session);
        Some(SessionInfo {
            connected: s.link.is_some(),
            subscriptions: s.subs.len(),
            queued: s.queue.len(),
            inflight: s.inflight.len(),
        })
    }

    /// Load what a previous run stored (see `persist.rs`), before any connection is served:
    /// retained messages, and persistent sessions (offline) with their subscriptions, queued and
    /// unacknowledged messages and inbound QoS 2 state. What expired while the server was down is
    /// dropped (and deleted from the store); a session that was online when the server stopped
    /// gets its full expiry from now. Values that cannot be decoded are skipped and logged.
    pub fn restore(&self, state: crate::persist::Restored) -> RestoreStats {
        let shared = &self.shared;
        let mut stats = RestoreStats::default();
        let Some(persist) = shared.persist.clone() else {
            return stats;
        };
        let now_ms = persist.now_ms();
        let mut ops = Vec::new();
        {
            let mut retained = lock(&shared.retained);
            for (topic, value) in state.retained {
                let Some(r) = RetainedValue::decode(&value) else {
                    tracing::warn!(%topic, "stored retained message cannot be decoded; dropped");
                    ops.push(StateOp::DeleteRetained { topic });
                    continue;
                };
                if r.expires_at_ms != 0 && r.expires_at_ms <= now_ms {
                    ops.push(StateOp::DeleteRetained { topic });
                    continue;
                }
                let expires_at = shared.instant_of(r.expires_at_ms);
                retained.insert(Arc::new(r.msg), expires_at, r.owner);
                stats.retained += 1;
            }
        }
        let mut max_seq = 0u64;
        for crate::persist::RestoredSession {
            key,
            value,
            messages,
        } in state.sessions
        {
            let Some(v) = SessionValue::decode(&value) else {
                tracing::warn!(%key, "stored session cannot be decoded; dropped");
                ops.push(StateOp::DeleteSession { key });
                continue;
            };
            if v.expires_at_ms != 0 && v.expires_at_ms <= now_ms {
                ops.push(StateOp::DeleteSession { key });
                stats.sessions_expired += 1;
                continue;
            }
            let id = shared.session_seq.fetch_add(1, Ordering::Relaxed);
            let mut s = Session::new(id, v.client_id.clone(), Arc::new(v.principal.clone()));
            s.expiry_secs = v.expiry_secs;
            s.will = v.will.clone().map(Box::new);
            s.qos2_in = v.qos2_set();
            s.persist = Some(Box::new(PersistInfo {
                key: key.clone(),
                owner: v.owner.clone(),
            }));
            for (seq, mv) in messages {
                max_seq = max_seq.max(seq);
                let Some(m) = MessageValue::decode(&mv) else {
                    tracing::warn!(%key, seq, "stored message cannot be decoded; dropped");
                    ops.push(StateOp::DeleteMessage {
                        session: key.clone(),
                        seq,
                    });
                    continue;
                };
                let expires_at = shared.instant_of(m.expires_at_ms);
                let awaiting_comp = matches!(m.inflight, Some((InflightState::AwaitComp, _)));
                if m.expires_at_ms != 0 && m.expires_at_ms <= now_ms && !awaiting_comp {
                    ops.push(StateOp::DeleteMessage {
                        session: key.clone(),
                        seq,
                    });
                    continue;
                }
                let d = Delivery {
                    msg: Arc::new(m.msg),
                    qos: m.qos,
                    retain: m.retain,
                    expires_at,
                    sub_ids: m.sub_ids,
                    seq,
                    shared: m
                        .shared
                        .map(|(subscription, redelivered)| crate::shared_sub::Via {
                            subscription: Arc::from(subscription),
                            redelivered,
                        }),
                };
                match m.inflight {
                    Some((state, packet_id)) => s.inflight.push_back(crate::session::Inflight {
                        packet_id,
                        delivery: d,
                        state,
                    }),
                    None => s.push_restored(d),
                }
                stats.messages += 1;
            }
            let expiry = (v.expiry_secs != u32::MAX)
                .then(|| std::time::Duration::from_secs(u64::from(v.expiry_secs)));
            // Offline from now on: one that was online when the server stopped gets its full
            // expiry from now; one that was offline keeps its deadline (a restart must not
            // extend it, or a server restarted often enough would keep it for ever).
            let deadline_ms = match expiry {
                Some(_) if v.expires_at_ms != 0 => v.expires_at_ms,
                Some(after) => now_ms
                    .saturating_add(u64::try_from(after.as_millis()).unwrap_or(u64::MAX))
                    .max(1),
                None => 0,
            };
            let session: SessionRef = Arc::new(Mutex::new(s));
            {
                let mut table = lock(&shared.sessions);
                let table_key = (v.owner.namespace(), v.client_id.clone());
                if let Some(old) = table.insert(&table_key, session.clone(), v.owner.clone(), true)
                {
                    shared.retire(&mut lock(&old));
                }
                let mut s = lock(&session);
                for (filter, opts) in v.subs {
                    shared.add_subscription(&session, &mut s, filter, opts);
                }
                // Stored again with that deadline, and with its subscriptions (stored before
                // they were added, the next restart would bring it back with none).
                s.offline_until_ms = deadline_ms;
                // The policy may have changed while the server was down: what it no longer
                // allows must not collect messages until the client comes back.
                shared.revoke_disallowed(&mut s, true);
                ops.extend(shared.session_op_at(&s, deadline_ms));
                if let Some(after) = expiry {
                    let left = if v.expires_at_ms != 0 {
                        std::time::Duration::from_millis(v.expires_at_ms.saturating_sub(now_ms))
                    } else {
                        after
                    };
                    shared.expire_after(session.clone(), table_key, s.generation, left);
                }
                // The connection of a session that was online ended with the server: its will
                // runs now, after its delay; one whose delay was running keeps its deadline.
                if let Some(w) = &v.will {
                    let left_ms = if w.fire_at_ms != 0 {
                        w.fire_at_ms.saturating_sub(now_ms)
                    } else {
                        u64::from(w.delay_secs) * 1000
                    };
                    shared.will_after(
                        session.clone(),
                        s.generation,
                        v.client_id.clone(),
                        w.msg.clone(),
                        std::time::Duration::from_millis(left_ms),
                    );
                    stats.wills += 1;
                }
            }
            stats.sessions += 1;
        }
        shared.msg_seq.fetch_max(max_seq + 1, Ordering::Relaxed);
        shared.detach(ops);
        tracing::info!(
            retained = stats.retained,
            sessions = stats.sessions,
            messages = stats.messages,
            expired_sessions = stats.sessions_expired,
            wills = stats.wills,
            "broker state restored"
        );
        stats
    }

    pub fn stats(&self) -> BrokerStats {
        let sessions = lock(&self.shared.sessions).len() as u64;
        let subscriptions = read(&self.shared.subs).len() as u64;
        let (shared_groups, shared_members) = {
            let g = read(&self.shared.groups);
            (g.len() as u64, g.members() as u64)
        };
        let (retained, retained_bytes) = {
            let r = lock(&self.shared.retained);
            (r.len() as u64, r.clients.bytes as u64)
        };
        let c = &self.shared.counters;
        BrokerStats {
            connections: c.connections.load(Ordering::Relaxed),
            sessions,
            subscriptions: subscriptions + shared_members,
            shared_groups,
            shared_redelivered: c.shared_redelivered.load(Ordering::Relaxed),
            retained,
            retained_bytes,
            messages_in: c.messages_in.load(Ordering::Relaxed),
            messages_out: c.messages_out.load(Ordering::Relaxed),
            denied: c.denied.load(Ordering::Relaxed),
            dropped: c.dropped.load(Ordering::Relaxed),
            panics: c.panics.load(Ordering::Relaxed),
            refusals: Refusal::ALL
                .iter()
                .zip(&c.refusals)
                .map(|(r, n)| (*r, n.load(Ordering::Relaxed)))
                .collect(),
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
    /// Route one accepted message: enqueue it to every matching session, once per session at the
    /// highest QoS its matching filters grant. (The caller stores a retained message first,
    /// through [`Shared::store_retained`].)
    ///
    /// Two phases so no broker-wide lock is held while sessions are touched: (1) under the index
    /// read lock, collect the matching `(session, options)` entries and the index generation;
    /// (2) release it and, one session at a time under that session's lock, merge its entries and
    /// enqueue. A session whose subscriptions changed after phase 1 (`subs_generation` newer than
    /// what phase 1 saw: an UNSUBSCRIBE, a new SUBSCRIBE, or its end) is judged on its current
    /// filters instead, under its lock, so a message is never delivered on a subscription that
    /// was already removed (the same per-session atomicity the single table lock used to give).
    /// What it queued for persisted sessions is submitted to the store as it goes (see
    /// `enqueue`); returns whether there was any (the caller acknowledges the message only once
    /// that is durable: [`Shared::barrier`]).
    pub(crate) fn route(&self, msg: Arc<Message>, publisher: Option<&str>) -> bool {
        let mut stored = false;
        let expires_at = expiry_instant(&msg);
        // Shared subscriptions: one member of each matching group (shared_sub.rs).
        self.route_shared(&msg, expires_at, &mut stored);
        let mut targets: Vec<(SessionId, SubOptions, SessionRef)> = Vec::new();
        let seen = {
            let index = read(&self.subs);
            index.for_each_match(&msg.topic, |id, t| {
                targets.push((*id, t.opts, t.session.clone()));
            });
            index.generation()
        };
        if targets.is_empty() {
            return stored;
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
                        .filter(|(filter, _)| {
                            !is_shared_filter(filter) && filter_matches(filter, &msg.topic)
                        })
                        .map(|(_, o)| *o),
                    own,
                )
            } else {
                merge_grants(group.iter().map(|t| t.1), own)
            };
            if let Some(grant) = best {
                let d = Delivery {
                    msg: msg.clone(),
                    qos: grant.qos.min(msg.qos),
                    retain: msg.retain && grant.retain_as_published,
                    expires_at,
                    sub_ids: grant.sub_ids,
                    seq: 0,
                    shared: None,
                };
                self.enqueue(&mut s, d, &mut stored);
            }
        }
        stored
    }

    /// Queue a delivery on a session (whose lock the caller holds) within the session's bounds;
    /// a drop (of this message or of older QoS 0 ones) is counted. A QoS 1/2 delivery to a
    /// persisted session gets its `seq` and is submitted to the store (`stored` is set) before
    /// the session's lock is released: once it is released, the session's connection may send
    /// the message, get it acknowledged and submit its delete, which must come after the put
    /// (a put applied after its delete would stay stored for the session's life, and come back
    /// after a restart as a second delivery).
    pub(crate) fn enqueue(&self, s: &mut Session, mut d: Delivery, stored: &mut bool) -> Enqueue {
        let online = s.link.is_some();
        let qos = d.qos;
        let op = match s.persist_key() {
            Some(key) if qos > 0 && d.seq == 0 => {
                d.seq = self.msg_seq.fetch_add(1, Ordering::Relaxed);
                Some(self.put_message(key, &d, None))
            }
            _ => None,
        };
        let outcome = s.enqueue(
            d,
            self.config.session_queue_len_max,
            self.config.session_queue_bytes_max,
        );
        let dropped = match outcome {
            Enqueue::Enqueued => false,
            Enqueue::EnqueuedDroppedOldest => true,
            // An offline session not taking QoS 0 is no drop: it never asked for it.
            Enqueue::Refused => online || qos > 0,
        };
        if dropped {
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            self.counters.refuse(Refusal::QueueFull);
        }
        if let (true, Some(op)) = (outcome.is_enqueued(), op) {
            self.detach(vec![op]);
            *stored = true;
        }
        outcome
    }

    /// Submit ops nobody waits for (in order after everything submitted before).
    pub(crate) fn detach(&self, ops: Vec<StateOp>) {
        if let (Some(p), false) = (&self.persist, ops.is_empty()) {
            p.submit_detached(ops);
        }
    }

    /// What resolves once everything submitted so far is durable (`None`: no persistence).
    pub(crate) fn barrier(&self) -> Option<Durable> {
        self.persist.as_ref().map(|p| p.submit(Vec::new()))
    }

    /// Submit ops and get what resolves once they are durable; `None` if there is nothing to wait for.
    pub(crate) fn durable(&self, ops: Vec<StateOp>) -> Option<Durable> {
        match (&self.persist, ops.is_empty()) {
            (Some(p), false) => Some(p.submit(ops)),
            _ => None,
        }
    }

    /// A tokio instant as unix ms on the embedder's clock (0 for `None`).
    fn wall_ms(&self, at: Option<Instant>) -> u64 {
        let (Some(p), Some(at)) = (&self.persist, at) else {
            return 0;
        };
        let left = at.saturating_duration_since(Instant::now()).as_millis();
        p.now_ms()
            .saturating_add(u64::try_from(left).unwrap_or(u64::MAX))
            .max(1)
    }

    /// Unix ms (the embedder's clock) as a tokio instant (`None` for 0, and for a deadline too
    /// far away to represent: a stored value is not trusted to be sane, and `Instant + Duration`
    /// would panic, failing every start).
    pub(crate) fn instant_of(&self, wall_ms: u64) -> Option<Instant> {
        let p = self.persist.as_ref().filter(|_| wall_ms != 0)?;
        let left = wall_ms.saturating_sub(p.now_ms());
        Instant::now().checked_add(std::time::Duration::from_millis(left))
    }

    /// The op that stores `d` (its `seq` assigned) under the session `key`, queued (`inflight`
    /// `None`) or unacknowledged with its state and packet id.
    pub(crate) fn put_message(
        &self,
        key: &str,
        d: &Delivery,
        inflight: Option<(InflightState, u16)>,
    ) -> StateOp {
        let value = MessageValue {
            msg: (*d.msg).clone(),
            qos: d.qos,
            retain: d.retain,
            expires_at_ms: self.wall_ms(d.expires_at),
            sub_ids: d.sub_ids.clone(),
            inflight,
            shared: d
                .shared
                .as_ref()
                .map(|v| (v.subscription.to_string(), v.redelivered)),
        }
        .encode();
        StateOp::PutMessage {
            session: key.to_owned(),
            seq: d.seq,
            value,
        }
    }

    /// Unix ms at which `s`, going offline now, ends (0: never, or no persistence).
    pub(crate) fn deadline_from_now(&self, s: &Session) -> u64 {
        if s.expiry_secs == u32::MAX {
            return 0;
        }
        self.persist.as_ref().map_or(0, |p| {
            p.now_ms()
                .saturating_add(u64::from(s.expiry_secs) * 1000)
                .max(1)
        })
    }

    /// The op that stores a persisted session as it is now (`offline`: with its deadline; one
    /// that already has a deadline keeps it, otherwise its expiry counts from now).
    pub(crate) fn session_op(&self, s: &Session, offline: bool) -> Option<StateOp> {
        let expires_at_ms = match (offline, s.offline_until_ms) {
            (false, _) => 0,
            (true, 0) => self.deadline_from_now(s),
            (true, at) => at,
        };
        self.session_op_at(s, expires_at_ms)
    }

    /// The op that stores a persisted session as it is now, gone at `expires_at_ms` (unix ms;
    /// 0: online, or never).
    pub(crate) fn session_op_at(&self, s: &Session, expires_at_ms: u64) -> Option<StateOp> {
        let key = s.persist_key()?;
        let owner = &s.persist.as_ref()?.owner;
        Some(StateOp::PutSession {
            key: key.to_owned(),
            value: SessionValue::of(owner, s, expires_at_ms).encode(),
        })
    }

    /// Start or stop persisting a session (whose lock the caller holds) per its expiry now:
    /// returns the ops that store it with everything it holds, or delete it.
    pub(crate) fn persist_session(&self, s: &mut Session, owner: &Owner) -> Vec<StateOp> {
        let mut ops = Vec::new();
        if self.persist.is_none() || s.retired {
            return ops;
        }
        if s.expiry_secs == 0 {
            if let Some(p) = s.persist.take() {
                ops.push(StateOp::DeleteSession { key: p.key });
            }
            return ops;
        }
        let key = session_key(owner, &s.client_id);
        if s.persist.is_none() {
            // Became persisted: what it already holds is stored too.
            s.persist = Some(Box::new(PersistInfo {
                key: key.clone(),
                owner: owner.clone(),
            }));
            let mut queue = std::mem::take(&mut s.queue);
            for d in queue.iter_mut().filter(|d| d.qos > 0 && d.seq == 0) {
                d.seq = self.msg_seq.fetch_add(1, Ordering::Relaxed);
                ops.push(self.put_message(&key, d, None));
            }
            s.queue = queue;
        }
        ops.extend(self.session_op(s, false));
        ops
    }

    /// Store (or, with an empty payload, clear) a retained message on behalf of `owner` (`None`:
    /// the server). False if a client's message was refused by a retained limit (counted).
    /// The op that makes the change durable is submitted under the table's lock (`stored` is
    /// set), so two publishers of one topic reach the store in the order the table saw them.
    pub(crate) fn store_retained(
        &self,
        msg: &Arc<Message>,
        owner: Option<&Owner>,
        stored: &mut bool,
    ) -> bool {
        let mut retained = lock(&self.retained);
        if msg.payload.is_empty() {
            retained.remove(&msg.topic);
            if self.persist.is_some() {
                self.detach(vec![StateOp::DeleteRetained {
                    topic: msg.topic.clone(),
                }]);
                *stored = true;
            }
            return true;
        }
        let mut expired = Vec::new();
        let fits = retained.make_room(&self.config, owner, msg, &mut expired);
        self.delete_retained(expired);
        if !fits {
            drop(retained);
            self.counters.refuse(Refusal::RetainedQuota);
            return false;
        }
        let expires_at = expiry_instant(msg);
        retained.insert(msg.clone(), expires_at, owner.cloned());
        if self.persist.is_some() {
            self.detach(vec![StateOp::PutRetained {
                topic: msg.topic.clone(),
                value: RetainedValue {
                    owner: owner.cloned(),
                    msg: (**msg).clone(),
                    expires_at_ms: self.wall_ms(expires_at),
                }
                .encode(),
            }]);
            *stored = true;
        }
        true
    }

    /// A client's accepted message: a retained one is stored within its owner's quota first
    /// (over quota it is delivered without the retain flag), then it is routed. `owner` is only
    /// asked for a retained message. Returns whether anything was submitted to the store (see
    /// `route`).
    pub(crate) fn retain_and_route(
        &self,
        mut msg: Arc<Message>,
        owner: impl FnOnce() -> Owner,
        client_id: &str,
    ) -> bool {
        let mut stored = false;
        if msg.retain && !self.store_retained(&msg, Some(&owner()), &mut stored) {
            Arc::make_mut(&mut msg).retain = false;
        }
        self.route(msg, Some(client_id)) || stored
    }

    /// Whether `owner` could store this retained message now (a check before the message is
    /// accepted; [`Shared::store_retained`] decides).
    pub(crate) fn retained_fits(&self, msg: &Message, owner: &Owner) -> bool {
        if msg.payload.is_empty() {
            return true;
        }
        let mut retained = lock(&self.retained);
        let mut expired = Vec::new();
        let fits = retained.make_room(&self.config, Some(owner), msg, &mut expired);
        self.delete_retained(expired);
        fits
    }

    /// Retained messages the table removed (expired ones given back for room, a removed
    /// device's) leave the store too. Called under the table's lock, for order.
    fn delete_retained(&self, topics: Vec<String>) {
        if self.persist.is_some() && !topics.is_empty() {
            self.detach(
                topics
                    .into_iter()
                    .map(|topic| StateOp::DeleteRetained { topic })
                    .collect(),
            );
        }
    }

    /// Remove the subscriptions of a session (whose lock the caller holds) that its current
    /// principal may no longer hold; each is logged and counted. What they already queued goes
    /// too (a delivery stays only if a remaining filter matches it), and so do unacknowledged
    /// deliveries not yet resent when `purge_inflight` (the session is offline or being resumed:
    /// nothing of it is on the wire of a live connection). Returns how many filters were removed.
    pub(crate) fn revoke_disallowed(&self, s: &mut Session, purge_inflight: bool) -> usize {
        let principal = s.principal.clone();
        let revoked: Vec<String> = s
            .subs
            .keys()
            .filter(|f| !self.hooks.may_subscribe(&principal, f))
            .cloned()
            .collect();
        for filter in &revoked {
            self.remove_subscription(s, filter);
            self.counters.refuse(Refusal::SubscriptionRevoked);
            tracing::info!(client_id = %s.client_id, filter = %filter, "subscription no longer allowed by the policy; removed");
        }
        if !revoked.is_empty() {
            let subs: Vec<String> = s.subs.keys().cloned().collect();
            let allowed = |d: &Delivery| crate::shared_sub::still_subscribed(&subs, d);
            let mut dropped = s.retain_queue(allowed);
            let queued = dropped.len();
            if purge_inflight {
                s.inflight.retain(|i| {
                    let keep = allowed(&i.delivery);
                    if !keep {
                        dropped.push(i.delivery.seq);
                    }
                    keep
                });
            }
            if queued > 0 {
                tracing::info!(client_id = %s.client_id, dropped = queued, "queued messages of revoked subscriptions dropped");
            }
            let mut ops = Vec::new();
            if let Some(key) = s.persist_key() {
                for seq in dropped.into_iter().filter(|seq| *seq != 0) {
                    ops.push(StateOp::DeleteMessage {
                        session: key.to_owned(),
                        seq,
                    });
                }
            }
            ops.extend(self.session_op(s, s.link.is_none()));
            self.detach(ops);
        }
        revoked.len()
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
        if !s.retired && is_shared_filter(&filter) {
            self.join_group(session, s, &filter);
        } else if !s.retired {
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
        if !s.retired && is_shared_filter(filter) {
            self.leave_group(s, filter);
        } else if !s.retired {
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
        if let Some(p) = s.persist.take() {
            self.detach(vec![StateOp::DeleteSession { key: p.key }]);
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
        self.leave_all_groups(s);
        s.subs.clear();
    }

    /// Run a will (or any broker-side publish on behalf of a client) through `on_publish` and route it.
    pub(crate) async fn publish_as(&self, principal: &Principal, client_id: &str, msg: Message) {
        match self.hooks.on_publish(principal, client_id, &msg).await {
            PublishVerdict::Accept => {
                self.counters.messages_in.fetch_add(1, Ordering::Relaxed);
                self.retain_and_route(Arc::new(msg), || Owner::of(principal), client_id);
            }
            PublishVerdict::Reject(code) => {
                tracing::debug!(client_id, code, topic = %msg.topic, "will rejected by on_publish");
            }
            PublishVerdict::Failed(_) | PublishVerdict::Disconnect => {
                tracing::warn!(client_id, topic = %msg.topic, "will dropped: on_publish failed");
            }
        }
    }

    /// End the session under `key` after `after` unless it was attached again meanwhile
    /// (`generation` moved) or replaced.
    pub(crate) fn expire_after(
        self: &Arc<Self>,
        session: SessionRef,
        key: SessionKey,
        generation: u64,
        after: std::time::Duration,
    ) {
        let shared = self.clone();
        self.spawn_timer(async move {
            tokio::time::sleep(after).await;
            let mut table = lock(&shared.sessions);
            let mut s = lock(&session);
            if s.link.is_none()
                && s.generation == generation
                && table.remove_if_same(&key, &session)
            {
                shared.retire(&mut s);
            }
            drop(s);
            drop(table);
            // What it held through shared subscriptions goes to another member.
            shared.redeliver_shared(&session);
        });
    }

    /// Publish a session's will after `after` unless the session was attached again meanwhile
    /// (`generation` moved), its principal was removed, or the policy no longer allows it. A
    /// persisted session forgets its stored will once it fired.
    pub(crate) fn will_after(
        self: &Arc<Self>,
        session: SessionRef,
        generation: u64,
        client_id: String,
        msg: Message,
        after: std::time::Duration,
    ) {
        let shared = self.clone();
        self.spawn_timer(async move {
            tokio::time::sleep(after).await;
            let (current, principal_now) = {
                let mut s = lock(&session);
                let current = s.generation == generation && !s.removed;
                if current && s.will.take().is_some() {
                    if let Some(op) = shared.session_op(&s, s.link.is_none()) {
                        shared.detach(vec![op]);
                    }
                }
                (current, s.principal.clone())
            };
            if current && shared.hooks.may_publish(&principal_now, &msg.topic) {
                shared.publish_as(&principal_now, &client_id, msg).await;
            }
        });
    }

    /// Wall-clock unix ms on the embedder's clock (0 without persistence).
    pub(crate) fn now_ms(&self) -> u64 {
        self.persist.as_ref().map_or(0, |p| p.now_ms())
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
            .msgs
            .range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(|(topic, _)| topic.starts_with(prefix))
            .filter(|(topic, _)| filter_matches(filter, topic))
            .map(|(_, r)| (r.msg.clone(), r.expires_at))
            .collect()
    }
}

/// When a message's v5 Message Expiry Interval (if any) runs out, counted from now.
fn expiry_instant(msg: &Message) -> Option<Instant> {
    msg.props
        .message_expiry_secs
        .map(|s| Instant::now() + std::time::Duration::from_secs(u64::from(s)))
}

/// How one message goes to one session, merged over its matching subscriptions.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Grant {
    qos: u8,
    retain_as_published: bool,
    /// Every matching subscription's identifier, ascending, once each.
    sub_ids: Vec<u32>,
}

/// Highest granted QoS, retain-as-published and the subscription identifiers over a session's
/// matching filters; a `no_local` filter does not count for the session's own messages.
/// `None`: nothing to deliver.
fn merge_grants(opts: impl Iterator<Item = SubOptions>, own: bool) -> Option<Grant> {
    let mut grant =
        opts.filter(|o| !(o.no_local && own))
            .fold(None, |best: Option<Grant>, o| {
                let mut g = best.unwrap_or(Grant {
                    qos: 0,
                    retain_as_published: false,
                    sub_ids: Vec::new(),
                });
                g.qos = g.qos.max(o.qos);
                g.retain_as_published |= o.retain_as_published;
                g.sub_ids.extend(o.sub_id);
                Some(g)
            })?;
    grant.sub_ids.sort_unstable();
    grant.sub_ids.dedup();
    Some(grant)
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
    fn refusal_all_lists_the_variants_in_declaration_order() {
        for (i, r) in Refusal::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{r:?}");
        }
    }

    #[test]
    fn merged_grant_is_the_highest_qos_and_skips_no_local_for_own_messages() {
        let o = |qos, no_local, retain_as_published, sub_id| SubOptions {
            qos,
            no_local,
            retain_as_published,
            sub_id,
        };
        let g = |qos, retain_as_published, sub_ids: &[u32]| {
            Some(Grant {
                qos,
                retain_as_published,
                sub_ids: sub_ids.to_vec(),
            })
        };
        let opts = [
            o(0, false, false, Some(7)),
            o(2, true, false, Some(3)),
            o(1, false, true, None),
            o(1, false, false, Some(7)),
        ];
        assert_eq!(merge_grants(opts.into_iter(), false), g(2, true, &[3, 7]));
        assert_eq!(merge_grants(opts.into_iter(), true), g(1, true, &[7]));
        assert_eq!(
            merge_grants([o(2, true, true, None)].into_iter(), true),
            None
        );
        assert_eq!(merge_grants(std::iter::empty(), false), None);
    }
}
