//! The cluster: what one node tells the others, and what it hears from them (issue 13).
//!
//! Nodes share one store (PostgreSQL) and one [`Bus`] (NATS). The store is the truth: commands,
//! shadows, telemetry, which node holds each device's session ([`mooring_store::ClusterStore`]),
//! leases. The bus only makes things prompt; every notice is best effort and something
//! recovers a lost one (a redelivery, a reconnect, a re-read of the store):
//!
//! | subject            | body                                  | a receiving node                                   |
//! |--------------------|---------------------------------------|----------------------------------------------------|
//! | `cluster.session`  | `[[session key, owner, since_ms, answer], ..]` | hands over the session it holds under that key (`d:<device>`, `s:<client>`, `x:<client>`) unless its own connection of that device is newer (closed with v5 0x8E, forgotten without touching its stored state); answers if asked |
//! | `cluster.kick`     | `[[device, all_delivered], ..]`       | delivers the device's pending commands if it holds its session |
//! | `cluster.final`    | `[[command id, state], ..]`           | wakes its `wait_ms` waiters on those commands       |
//! | `cluster.device`   | `[device, ..]`                        | re-reads each from the store: re-authorizes its sessions with the stored tags, or removes them if it is gone |
//! | `cluster.released` | `[session key, ..]`                   | counts the sender's answer for the connects waiting on those sessions |
//! | `cluster.mqtt`     | forwarded MQTT messages               | retains (memory) and routes them to its sessions    |
//! | `cluster.events`   | `[[origin, seq, at_ms, kind, device, data], ..]` | adds them to its live-event ring (`events.rs`), for its streams and resumes |
//!
//! A device connecting to node B: at CONNECT, B announces the session (`cluster.session`).
//! A node holding anything of the device (a connection, or an offline persistent session)
//! hands it over: closes the connection, forgets the session without touching its stored
//! state. If the client asked to resume its session (not clean start), every other live node
//! answers (`cluster.released`; the one that held it once everything it wrote for it is
//! durable), B waits for all answers (at most [`TAKEOVER_WAIT_MS`]: a dead node never
//! answers), then loads the stored session and resumes it for the client, subscriptions and
//! queued messages included. A clean start waits for nobody.
//!
//! Every payload is `[node id length][node id][sent at, unix ms, u64][HMAC-SHA256][body]`, the
//! HMAC (keyed from the cluster key file every node has) over the subject, node id, time and
//! body: a message that does not verify, or was sent more than `MESSAGE_AGE_MAX_MS` away from
//! this node's clock, is dropped and counted (anyone else on the NATS server can publish on our
//! subjects, but cannot make a node act on it). A node ignores its own. Bodies are JSON
//! except `cluster.mqtt`: `[u32 length][message]...`, each message in the broker's forwarding
//! encoding. Outgoing notices wait in one bounded outbox (`OUTBOX_ITEMS_MAX`, then dropped and
//! counted), coalesced and sent by one task in messages of at most `BATCH_BYTES_MAX`.
//!
//! Work that must run once (command scheduler, presence reaper, retention, compaction) runs
//! under a lease ([`Cluster::holds`]): taken by whichever node asks first, renewed by its
//! heartbeat, released at shutdown, and taken over by another node `node_lease_ms` after its
//! holder stops renewing it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{BufMut, Bytes};
use mooring_bus::Bus;
use mooring_proto::sync::lock;
use mooring_proto::Clock;
use mooring_store::Store;
use tokio::sync::{watch, Notify};

use crate::metrics::Counters;

pub(crate) const SUBJECT_ALL: &str = "cluster.>";
const SUBJECT_SESSION: &str = "cluster.session";
const SUBJECT_KICK: &str = "cluster.kick";
const SUBJECT_FINAL: &str = "cluster.final";
const SUBJECT_DEVICE: &str = "cluster.device";
const SUBJECT_TOKEN: &str = "cluster.token";
const SUBJECT_MQTT: &str = "cluster.mqtt";
const SUBJECT_RELEASED: &str = "cluster.released";
const SUBJECT_EVENTS: &str = "cluster.events";

/// A bus message sent longer ago (or later) than this, by the receiver's clock, is dropped.
pub const MESSAGE_AGE_MAX_MS: u64 = 60_000;

/// Bytes of the HMAC-SHA256 tag in every bus message.
const TAG_LEN: usize = 32;

/// Longest a connecting device waits for the node that held its session to hand it over.
pub const TAKEOVER_WAIT_MS: u64 = 1_000;

/// Most body bytes of one bus message (a batch of notices or forwarded messages).
pub const BATCH_BYTES_MAX: usize = 64 * 1024;
/// Notices and forwarded messages waiting to be sent; more are dropped and counted.
pub const OUTBOX_ITEMS_MAX: usize = 100_000;
/// Bytes of forwarded messages waiting to be sent; more are dropped and counted.
pub const OUTBOX_BYTES_MAX: usize = 64 * 1024 * 1024;

pub(crate) const LEASE_SCHEDULER: &str = "commands.scheduler";
pub(crate) const LEASE_RETENTION: &str = "telemetry.retention";
pub(crate) const LEASE_COMPACTION: &str = "telemetry.compaction";
pub(crate) const LEASE_REAPER: &str = "presence.reaper";
pub(crate) const LEASE_JOBS: &str = "jobs.runner";
pub(crate) const LEASE_OTA: &str = "ota.sweeper";
pub(crate) const LEASE_RULES: &str = "rules.sweeper";
pub(crate) const LEASE_HEALTH: &str = "health.sweeper";
pub(crate) const LEASE_ROLLOUTS: &str = "rollouts.controller";

/// Session rows of dead nodes removed per reaper pass.
const REAP_BATCH_LEN: usize = 10_000;

/// A connect waiting for the other live nodes to answer its session notice.
struct ReleaseWait {
    pending: std::collections::BTreeSet<String>,
    done: tokio::sync::oneshot::Sender<()>,
}

#[derive(Default)]
struct Outbox {
    /// `(session key, owner as PrincipalKey text, since_ms, answer wanted)`.
    sessions: Vec<(String, String, u64, bool)>,
    kicks: BTreeMap<String, bool>,
    finals: Vec<(String, String)>,
    devices: BTreeSet<String>,
    tokens: BTreeSet<String>,
    released: Vec<String>,
    mqtt: Vec<Vec<u8>>,
    /// Live events this node originated, in seq order.
    events: Vec<crate::events::WireItem>,
    items: usize,
    bytes: usize,
}

impl Outbox {
    fn is_empty(&self) -> bool {
        self.items == 0
    }
}

/// Where rules' `nats:SUBJECT` notifications go: `rules.<subject>` on the bus, the NATS
/// subject `<bus prefix>.b.rules.<subject>`.
pub const RULES_SUBJECT_PREFIX: &str = "rules.";

/// Cluster counters (`/metrics`, `mooring_cluster_*`).
#[derive(Debug, Default)]
pub struct ClusterCounters {
    /// Bus messages this node published.
    pub bus_sent: AtomicU64,
    /// Bus messages from other nodes this node handled.
    pub bus_received: AtomicU64,
    /// Notices and forwarded messages dropped because the outbox was full or the bus refused.
    pub outbox_dropped: AtomicU64,
    /// Bus messages this node's subscription dropped because it fell behind.
    pub bus_dropped: AtomicU64,
    /// Bus messages dropped because their signature did not verify, they were malformed, or
    /// too old.
    pub bus_rejected: AtomicU64,
    /// Sessions this node closed because the device connected to another node.
    pub takeovers: AtomicU64,
    /// Session rows of dead nodes the reaper removed.
    pub reaped_sessions: AtomicU64,
}

/// This node's part in a cluster: its id, the bus, the shared store, its outbox and leases.
pub struct Cluster {
    node: String,
    bus: Arc<dyn Bus>,
    /// Signs and verifies every bus message (derived from the cluster key).
    key: ring::hmac::Key,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    node_lease_ms: u64,
    heartbeat_interval_ms: u64,
    outbox: Mutex<Outbox>,
    wake: Notify,
    /// Leases this node holds, with when each runs out unless renewed (by the heartbeat).
    held: Mutex<BTreeMap<&'static str, u64>>,
    /// When this node's last heartbeat reached the store (0: never).
    last_heartbeat_ms: AtomicU64,
    /// Connects waiting for another node to release their device's session.
    releases: Mutex<BTreeMap<String, Vec<ReleaseWait>>>,
    pub counters: ClusterCounters,
}

impl Cluster {
    pub(crate) fn new(
        node: String,
        bus: Arc<dyn Bus>,
        key: ring::hmac::Key,
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        config: &crate::config::ClusterConfig,
    ) -> Cluster {
        Cluster {
            node,
            bus,
            key,
            store,
            clock,
            node_lease_ms: config.node_lease_ms,
            heartbeat_interval_ms: config.heartbeat_interval_ms,
            outbox: Mutex::default(),
            wake: Notify::new(),
            held: Mutex::default(),
            releases: Mutex::default(),
            last_heartbeat_ms: AtomicU64::new(0),
            counters: ClusterCounters::default(),
        }
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// A rule's `nats:SUBJECT` notification: `payload` as is (not signed; for other programs,
    /// not for the nodes) on the NATS subject `<bus prefix>.b.rules.<subject>`, apart from the
    /// subjects the nodes use. Core NATS: subscribers connected now get it; the client buffers
    /// it while NATS is unreachable.
    pub async fn publish_for_rules(
        &self,
        subject: &str,
        payload: Bytes,
    ) -> Result<(), mooring_bus::BusError> {
        self.bus
            .publish(&format!("{RULES_SUBJECT_PREFIX}{subject}"), payload)
            .await
    }

    /// Nodes heard from at or after this time are alive.
    pub(crate) fn alive_since_ms(&self) -> u64 {
        self.clock.now_ms().saturating_sub(self.node_lease_ms)
    }

    /// Queues one notice (of about `bytes`) unless the outbox is full.
    fn push(&self, bytes: usize, f: impl FnOnce(&mut Outbox)) {
        {
            let mut o = lock(&self.outbox);
            if o.items >= OUTBOX_ITEMS_MAX || o.bytes.saturating_add(bytes) > OUTBOX_BYTES_MAX {
                drop(o);
                Counters::inc(&self.counters.outbox_dropped);
                return;
            }
            o.items += 1;
            o.bytes += bytes;
            f(&mut o);
        }
        self.wake.notify_one();
    }

    /// Session `key` opens here at `since_ms`: other nodes hand theirs over (and, if `answer`,
    /// say when they are done).
    fn session_opened(&self, key: &str, owner: &str, since_ms: u64, answer: bool) {
        self.push(key.len() + owner.len() + 16, |o| {
            o.sessions
                .push((key.to_owned(), owner.to_owned(), since_ms, answer))
        });
    }

    /// This node handed session `key` over (or held none) and what it stored is durable.
    fn released(&self, key: &str) {
        self.push(key.len(), |o| o.released.push(key.to_owned()));
    }

    /// A device authenticated here (CONNECT): other nodes hand its session over. Unless the
    /// client starts clean, waits (at most [`TAKEOVER_WAIT_MS`]) until every other live node
    /// answered (one that held the session answers once what it stored for it is durable),
    /// then takes the stored session over into `broker`, so the client resumes it.
    pub(crate) async fn take_over(
        &self,
        broker: &mooring_broker::Broker,
        presence: &crate::presence::Presence,
        principal: &mooring_broker::Principal,
        client_id: &str,
        clean_start: bool,
    ) {
        let now = self.clock.now_ms();
        // Sessions are announced by their stored key (`d:<device>`, `s:<client>`, `x:<client>`),
        // so every kind of client moves, not only devices.
        let key = mooring_broker::persist::stored_session_key(principal, client_id);
        let who = mooring_broker::PrincipalKey::of(principal);
        let owner = who.as_text();
        if let mooring_broker::Principal::Device { id, .. } = principal {
            presence.connecting(id, now);
        }
        if clean_start {
            self.session_opened(&key, &owner, now, false);
            return;
        }
        let others: BTreeSet<String> = match self.store.live_nodes(self.alive_since_ms()).await {
            Ok(nodes) => nodes
                .into_iter()
                .map(|(n, _)| n)
                .filter(|n| *n != self.node)
                .collect(),
            Err(e) => {
                tracing::warn!(session = key, error = %e, "listing live nodes failed; not waiting for a hand-over");
                BTreeSet::new()
            }
        };
        let wait = (!others.is_empty()).then(|| {
            let (done, rx) = tokio::sync::oneshot::channel();
            let mut r = lock(&self.releases);
            // Bounded by the connects in progress; a cancelled one's entry goes at its timeout.
            r.entry(key.clone()).or_default().push(ReleaseWait {
                pending: others,
                done,
            });
            rx
        });
        self.session_opened(&key, &owner, now, true);
        if let Some(rx) = wait {
            if tokio::time::timeout(Duration::from_millis(TAKEOVER_WAIT_MS), rx)
                .await
                .is_err()
            {
                tracing::warn!(
                    session = key,
                    "not every node answered the hand-over in time; resuming what is stored"
                );
                let mut r = lock(&self.releases);
                if let Some(list) = r.get_mut(&key) {
                    list.retain(|w| !w.done.is_closed());
                    if list.is_empty() {
                        r.remove(&key);
                    }
                }
            }
        }
        if broker.holds_stored(&key, &who) {
            // Still (or already) here: resumed from memory.
            return;
        }
        match self.store.load_broker_session(&key).await {
            Ok(Some(s)) => {
                if broker.adopt(mooring_broker::RestoredSession {
                    key: s.key,
                    value: s.value,
                    messages: s.messages,
                }) {
                    tracing::debug!(session = key, "took over the stored session");
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(session = key, error = %e, "loading the stored session failed")
            }
        }
    }

    /// Node `from` answered the session notice for session `key`.
    fn on_released(&self, key: &str, from: &str) {
        let mut r = lock(&self.releases);
        let Some(list) = r.get_mut(key) else {
            return;
        };
        let mut i = 0;
        while i < list.len() {
            list[i].pending.remove(from);
            if list[i].pending.is_empty() {
                let w = list.swap_remove(i);
                let _ = w.done.send(());
            } else {
                i += 1;
            }
        }
        if list.is_empty() {
            r.remove(key);
        }
    }

    /// Asks whichever node holds the device's session to deliver its pending commands.
    pub(crate) fn kick(&self, device: &str, all_delivered: bool) {
        self.push(device.len() + 8, |o| {
            let flag = o.kicks.entry(device.to_owned()).or_default();
            *flag |= all_delivered;
        });
    }

    /// A command reached a final state: waiters on other nodes wake.
    pub(crate) fn command_final(&self, id: &str, state: &str) {
        self.push(id.len() + state.len(), |o| {
            o.finals.push((id.to_owned(), state.to_owned()))
        });
    }

    /// A device's tags changed or it was deleted: other nodes re-read it from the store.
    pub(crate) fn device_changed(&self, device: &str) {
        self.push(device.len(), |o| {
            o.devices.insert(device.to_owned());
        });
    }

    /// A token was revoked: other nodes close its MQTT sessions (once the store says it is gone).
    pub(crate) fn token_revoked(&self, token_id: &str) {
        self.push(token_id.len(), |o| {
            o.tokens.insert(token_id.to_owned());
        });
    }

    /// A live event this node originated, for the other nodes' rings. Dropped (and counted)
    /// when the outbox is full: receivers see the seq gap and reset their streams.
    pub(crate) fn event(&self, origin: u64, item: &crate::events::Item) {
        self.push(item.wire_bytes(), |o| o.events.push(item.to_wire(origin)));
    }

    /// A message the local broker accepted, for the other nodes' brokers.
    pub(crate) fn forward(&self, forwarded: Vec<u8>) {
        self.push(forwarded.len(), |o| o.mqtt.push(forwarded));
    }

    /// Whether this node holds (or now takes) the lease `name`. Held leases are renewed by the
    /// heartbeat; a store error answers `false` (the work waits for the next tick).
    pub(crate) async fn holds(&self, name: &'static str) -> bool {
        let now = self.clock.now_ms();
        // Held and renewed recently enough that it cannot have run out in the store.
        // A heartbeat's worth of margin: a node stops trusting its lease before the deadline
        // the store has, so a slow renewal never lets two nodes run the work at once.
        let margin = self.heartbeat_interval_ms;
        if lock(&self.held)
            .get(name)
            .is_some_and(|until| now.saturating_add(margin) < *until)
        {
            return true;
        }
        match self
            .store
            .acquire_lease(name, &self.node, now, self.node_lease_ms)
            .await
        {
            Ok(true) => {
                let until = now.saturating_add(self.node_lease_ms);
                if lock(&self.held).insert(name, until).is_none() {
                    tracing::info!(lease = name, node = %self.node, "took the lease");
                }
                true
            }
            Ok(false) => {
                lock(&self.held).remove(name);
                false
            }
            Err(e) => {
                tracing::warn!(lease = name, error = %e, "lease check failed");
                false
            }
        }
    }

    /// Leases this node holds now (renewed within the lease time).
    pub fn held_leases(&self) -> Vec<&'static str> {
        let now = self.clock.now_ms();
        lock(&self.held)
            .iter()
            .filter(|(_, until)| now.saturating_add(self.heartbeat_interval_ms) < **until)
            .map(|(name, _)| *name)
            .collect()
    }

    /// One heartbeat: records this node alive and renews its leases (a lease it lost, because
    /// it could not renew in time, is dropped from its set). Returns whether the previous one
    /// was longer ago than the node lease: the other nodes may have taken this node for dead
    /// and removed the sessions it holds from the store.
    pub(crate) async fn heartbeat(&self) -> mooring_store::Result<bool> {
        let now = self.clock.now_ms();
        self.store.heartbeat(&self.node, now).await?;
        let before = self
            .last_heartbeat_ms
            .swap(now, std::sync::atomic::Ordering::Relaxed);
        let lapsed = before != 0 && now.saturating_sub(before) > self.node_lease_ms;
        let held: Vec<&'static str> = lock(&self.held).keys().copied().collect();
        for name in held {
            let kept = self
                .store
                .acquire_lease(name, &self.node, now, self.node_lease_ms)
                .await?;
            let mut h = lock(&self.held);
            if kept {
                h.insert(name, now.saturating_add(self.node_lease_ms));
            } else {
                tracing::warn!(lease = name, node = %self.node, "lost the lease");
                h.remove(name);
            }
        }
        Ok(lapsed)
    }

    /// Gives up every lease (shutdown), so another node takes the work at once.
    pub(crate) async fn release_leases(&self) {
        let held = std::mem::take(&mut *lock(&self.held));
        for name in held.into_keys() {
            if let Err(e) = self.store.release_lease(name, &self.node).await {
                tracing::warn!(lease = name, error = %e, "releasing the lease failed");
            }
        }
    }

    /// Removes the sessions of dead nodes (under the reaper lease); returns how many.
    pub(crate) async fn reap(&self) -> mooring_store::Result<usize> {
        if !self.holds(LEASE_REAPER).await {
            return Ok(0);
        }
        let gone = self
            .store
            .reap_dead_sessions(self.alive_since_ms(), REAP_BATCH_LEN)
            .await?;
        Counters::add(&self.counters.reaped_sessions, gone.len() as u64);
        Ok(gone.len())
    }

    fn envelope(&self, subject: &str, body: &[u8]) -> Bytes {
        seal(&self.key, subject, &self.node, self.clock.now_ms(), body)
    }

    async fn send(&self, subject: &str, body: &[u8]) {
        match self
            .bus
            .publish(subject, self.envelope(subject, body))
            .await
        {
            Ok(()) => Counters::inc(&self.counters.bus_sent),
            Err(e) => {
                Counters::inc(&self.counters.outbox_dropped);
                tracing::warn!(subject, error = %e, "bus publish failed; notice dropped");
            }
        }
    }

    /// Sends JSON arrays of at most about [`BATCH_BYTES_MAX`] bytes each.
    async fn send_json<T: serde::Serialize>(&self, subject: &str, items: &[T]) {
        let mut start = 0;
        while start < items.len() {
            let mut end = start;
            let mut bytes = 2;
            while end < items.len() && (end == start || bytes < BATCH_BYTES_MAX) {
                bytes += serde_json::to_vec(&items[end]).map_or(0, |v| v.len() + 1);
                end += 1;
            }
            match serde_json::to_vec(&items[start..end]) {
                Ok(body) => self.send(subject, &body).await,
                Err(e) => tracing::warn!(subject, error = %e, "encoding a notice failed"),
            }
            start = end;
        }
    }

    /// Sends what waits in the outbox.
    async fn flush(&self) {
        let o = std::mem::take(&mut *lock(&self.outbox));
        if o.is_empty() {
            return;
        }
        if !o.sessions.is_empty() {
            self.send_json(SUBJECT_SESSION, &o.sessions).await;
        }
        if !o.kicks.is_empty() {
            let kicks: Vec<(String, bool)> = o.kicks.into_iter().collect();
            self.send_json(SUBJECT_KICK, &kicks).await;
        }
        if !o.finals.is_empty() {
            self.send_json(SUBJECT_FINAL, &o.finals).await;
        }
        if !o.devices.is_empty() {
            let devices: Vec<String> = o.devices.into_iter().collect();
            self.send_json(SUBJECT_DEVICE, &devices).await;
        }
        if !o.released.is_empty() {
            self.send_json(SUBJECT_RELEASED, &o.released).await;
        }
        if !o.tokens.is_empty() {
            let tokens: Vec<String> = o.tokens.into_iter().collect();
            self.send_json(SUBJECT_TOKEN, &tokens).await;
        }
        if !o.events.is_empty() {
            self.send_json(SUBJECT_EVENTS, &o.events).await;
        }
        let mut body: Vec<u8> = Vec::new();
        for m in o.mqtt {
            if !body.is_empty() && body.len() + m.len() + 4 > BATCH_BYTES_MAX {
                self.send(SUBJECT_MQTT, &body).await;
                body.clear();
            }
            body.put_u32(u32::try_from(m.len()).unwrap_or(u32::MAX));
            body.extend_from_slice(&m);
        }
        if !body.is_empty() {
            self.send(SUBJECT_MQTT, &body).await;
        }
    }
}

/// What the HMAC covers: the subject (so a message cannot be replayed on another subject),
/// the node id, the time and the body, each length-delimited.
fn signed_input(subject: &str, node: &[u8], sent_ms: u64, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(16 + subject.len() + node.len() + body.len());
    m.put_u32(u32::try_from(subject.len()).unwrap_or(u32::MAX));
    m.extend_from_slice(subject.as_bytes());
    m.put_u32(u32::try_from(node.len()).unwrap_or(u32::MAX));
    m.extend_from_slice(node);
    m.put_u64(sent_ms);
    m.extend_from_slice(body);
    m
}

/// A bus payload: `[node len][node][sent_ms][HMAC][body]`.
fn seal(key: &ring::hmac::Key, subject: &str, node: &str, sent_ms: u64, body: &[u8]) -> Bytes {
    let node = &node.as_bytes()[..node.len().min(255)];
    let tag = ring::hmac::sign(key, &signed_input(subject, node, sent_ms, body));
    let mut b = Vec::with_capacity(1 + node.len() + 8 + TAG_LEN + body.len());
    b.put_u8(u8::try_from(node.len()).unwrap_or(u8::MAX));
    b.extend_from_slice(node);
    b.put_u64(sent_ms);
    b.extend_from_slice(tag.as_ref());
    b.extend_from_slice(body);
    Bytes::from(b)
}

/// Checks a bus payload: (sender node, body) if it is well formed, its HMAC verifies for
/// `subject`, and it was sent within [`MESSAGE_AGE_MAX_MS`] of `now_ms`; else `None`.
fn open_envelope<'a>(
    key: &ring::hmac::Key,
    subject: &str,
    payload: &'a [u8],
    now_ms: u64,
) -> Option<(&'a str, &'a [u8])> {
    let (&len, rest) = payload.split_first()?;
    let len = usize::from(len);
    if rest.len() < len + 8 + TAG_LEN {
        return None;
    }
    let (node, rest) = rest.split_at(len);
    let (sent, rest) = rest.split_at(8);
    let (tag, body) = rest.split_at(TAG_LEN);
    let sent_ms = u64::from_be_bytes(sent.try_into().ok()?);
    ring::hmac::verify(key, &signed_input(subject, node, sent_ms, body), tag).ok()?;
    if now_ms.abs_diff(sent_ms) > MESSAGE_AGE_MAX_MS {
        return None;
    }
    Some((std::str::from_utf8(node).ok()?, body))
}

/// Splits a `cluster.mqtt` body into its forwarded messages; stops at the first malformed one.
fn mqtt_frames(mut body: &[u8]) -> impl Iterator<Item = &[u8]> {
    std::iter::from_fn(move || {
        if body.len() < 4 {
            return None;
        }
        let (len, rest) = body.split_at(4);
        let len = usize::try_from(u32::from_be_bytes([len[0], len[1], len[2], len[3]])).ok()?;
        if rest.len() < len {
            return None;
        }
        let (frame, rest) = rest.split_at(len);
        body = rest;
        Some(frame)
    })
}

/// Sends the outbox whenever something is put in it, until `stop`; then once more.
pub(crate) async fn run_outbox(cluster: Arc<Cluster>, mut stop: watch::Receiver<bool>) {
    loop {
        let woken = cluster.wake.notified();
        cluster.flush().await;
        tokio::select! {
            _ = stop.changed() => break,
            _ = woken => {}
        }
    }
    cluster.flush().await;
}

/// Heartbeat, lease renewal, session flushes and the reaper, until `stop`.
pub(crate) async fn run_heartbeat(app: Arc<crate::app::App>, stop: watch::Receiver<bool>) {
    let Some(cluster) = app.cluster() else {
        return;
    };
    let period = Duration::from_millis(cluster.heartbeat_interval_ms.max(1));
    crate::serve::run_every(period, stop, || async {
        match cluster.heartbeat().await {
            Ok(true) => {
                let n = app.presence.reassert();
                tracing::warn!(
                    sessions = n,
                    "this node was silent longer than its lease; its sessions are recorded again"
                );
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "cluster heartbeat failed; will retry"),
        }
        match cluster.reap().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(sessions = n, "removed the sessions of dead nodes"),
            Err(e) => tracing::warn!(error = %e, "reaping dead nodes' sessions failed"),
        }
    })
    .await;
}

/// Handles what other nodes send, until `stop` or the bus closes.
pub(crate) async fn run_inbox(
    app: Arc<crate::app::App>,
    mut sub: mooring_bus::Subscription,
    mut stop: watch::Receiver<bool>,
) {
    let Some(cluster) = app.cluster().cloned() else {
        return;
    };
    let mut dropped_seen = 0;
    loop {
        let msg = tokio::select! {
            _ = stop.changed() => return,
            m = sub.next() => match m {
                Some(m) => m,
                None => {
                    tracing::error!("the cluster bus subscription ended: this node no longer hears the others");
                    return;
                }
            },
        };
        let dropped = sub.dropped();
        if dropped > dropped_seen {
            Counters::add(&cluster.counters.bus_dropped, dropped - dropped_seen);
            dropped_seen = dropped;
        }
        let Some((from, body)) = open_envelope(
            &cluster.key,
            &msg.subject,
            &msg.payload,
            cluster.clock.now_ms(),
        ) else {
            Counters::inc(&cluster.counters.bus_rejected);
            tracing::debug!(subject = %msg.subject, "cluster message dropped: malformed, not signed with the cluster key, or too old");
            continue;
        };
        if from == cluster.node {
            continue;
        }
        Counters::inc(&cluster.counters.bus_received);
        let from = from.to_owned();
        handle(&app, &cluster, &from, &msg.subject, body);
    }
}

fn handle(
    app: &Arc<crate::app::App>,
    cluster: &Arc<Cluster>,
    from: &str,
    subject: &str,
    body: &[u8],
) {
    let bad = |e: serde_json::Error| {
        tracing::warn!(subject, from, error = %e, "malformed cluster notice ignored");
    };
    match subject {
        SUBJECT_MQTT => {
            if let Some(broker) = app.broker() {
                for frame in mqtt_frames(body) {
                    if !broker.route_forwarded(frame) {
                        tracing::warn!(from, "malformed forwarded message ignored");
                    }
                }
            }
        }
        SUBJECT_SESSION => match serde_json::from_slice::<Vec<(String, String, u64, bool)>>(body) {
            Ok(list) => {
                for (key, owner, since_ms, answer) in list {
                    hand_over(app, cluster, from, key, &owner, since_ms, answer);
                }
            }
            Err(e) => bad(e),
        },
        SUBJECT_KICK => match serde_json::from_slice::<Vec<(String, bool)>>(body) {
            Ok(list) => {
                for (device, all) in list {
                    app.commands.kick_here(&device, all);
                }
            }
            Err(e) => bad(e),
        },
        SUBJECT_FINAL => match serde_json::from_slice::<Vec<(String, String)>>(body) {
            Ok(list) => {
                for (id, state) in list {
                    if let Ok(state) = state.parse() {
                        app.commands.notify_here(&id, state);
                    }
                }
            }
            Err(e) => bad(e),
        },
        SUBJECT_RELEASED => match serde_json::from_slice::<Vec<String>>(body) {
            Ok(list) => {
                for key in list {
                    cluster.on_released(&key, from);
                }
            }
            Err(e) => bad(e),
        },
        SUBJECT_EVENTS => match serde_json::from_slice::<Vec<crate::events::WireItem>>(body) {
            Ok(list) => app.events.receive(
                list.into_iter()
                    .filter_map(crate::events::Item::from_wire)
                    .collect(),
            ),
            Err(e) => bad(e),
        },
        SUBJECT_DEVICE => match serde_json::from_slice::<Vec<String>>(body) {
            Ok(list) => {
                // Re-read from the store, the truth (never the notice's word), off this task.
                let app = app.clone();
                tokio::spawn(async move {
                    for device in list {
                        app.registry.refresh_device(&device).await;
                    }
                });
            }
            Err(e) => bad(e),
        },
        SUBJECT_TOKEN => match serde_json::from_slice::<Vec<String>>(body) {
            Ok(list) => {
                let app = app.clone();
                tokio::spawn(async move {
                    for token in list {
                        app.tokens.on_revoked_elsewhere(&token).await;
                    }
                });
            }
            Err(e) => bad(e),
        },
        other => tracing::debug!(subject = other, "unknown cluster subject ignored"),
    }
}

/// Node `from` opens session `key` (since `since_ms`): unless this node's own connection of
/// that device is newer, this node hands over what it holds under the key (closing a
/// connection, forgetting an offline persistent session). If `answer`, it says so once what it
/// stored for the session is durable.
#[allow(clippy::too_many_arguments)]
fn hand_over(
    app: &Arc<crate::app::App>,
    cluster: &Arc<Cluster>,
    from: &str,
    key: String,
    owner: &str,
    since_ms: u64,
    answer: bool,
) {
    let Some(broker) = app.broker() else {
        return;
    };
    // Only the same principal's session under that key is handed over: another service's
    // session that happens to use the same client id stays (its connect is refused there).
    let who = mooring_broker::PrincipalKey::parse(owner);
    let device = key.strip_prefix("d:");
    let keep = device.is_some_and(|d| app.presence.newer_here(d, since_ms, from, &cluster.node));
    let held = who.as_ref().is_some_and(|w| broker.holds_stored(&key, w));
    if keep || !held {
        if answer {
            cluster.released(&key);
        }
        return;
    }
    if let Some(w) = &who {
        broker.hand_over_stored(&key, w);
    }
    Counters::inc(&cluster.counters.takeovers);
    tracing::debug!(
        session = key,
        to = from,
        "session handed over to another node"
    );
    if answer {
        let barrier = app.broker_state_barrier();
        let cluster = cluster.clone();
        tokio::spawn(async move {
            let _ = barrier.await;
            cluster.released(&key);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_verify_only_with_the_key_subject_and_time_they_were_sealed_for() {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &[7; 32]);
        let other = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &[8; 32]);
        let now = 1_800_000_000_000;
        let b = seal(&key, "cluster.kick", "abc", now, b"body");
        assert_eq!(
            open_envelope(&key, "cluster.kick", &b, now + 1_000),
            Some(("abc", &b"body"[..]))
        );
        // Another key, another subject, a changed byte, too old or too far ahead: refused.
        assert_eq!(open_envelope(&other, "cluster.kick", &b, now), None);
        assert_eq!(open_envelope(&key, "cluster.mqtt", &b, now), None);
        let mut tampered = b.to_vec();
        if let Some(last) = tampered.last_mut() {
            *last ^= 1;
        }
        assert_eq!(open_envelope(&key, "cluster.kick", &tampered, now), None);
        assert_eq!(
            open_envelope(&key, "cluster.kick", &b, now + MESSAGE_AGE_MAX_MS + 1),
            None
        );
        assert_eq!(
            open_envelope(&key, "cluster.kick", &b, now - MESSAGE_AGE_MAX_MS - 1),
            None
        );
        // Truncated or empty: refused, never a panic.
        for cut in 0..b.len() {
            let _ = open_envelope(&key, "cluster.kick", &b[..cut], now);
        }
        assert_eq!(open_envelope(&key, "cluster.kick", &[5, b'a'], now), None);
        assert_eq!(open_envelope(&key, "cluster.kick", &[], now), None);

        let mut body = Vec::new();
        for m in [&b"one"[..], b"", b"three"] {
            body.put_u32(m.len() as u32);
            body.extend_from_slice(m);
        }
        let frames: Vec<&[u8]> = mqtt_frames(&body).collect();
        assert_eq!(frames, vec![&b"one"[..], b"", b"three"]);
        // A length past the end stops the iteration instead of reading beyond it.
        let mut bad = Vec::new();
        bad.put_u32(100);
        bad.extend_from_slice(b"short");
        assert_eq!(mqtt_frames(&bad).count(), 0);
    }
}
