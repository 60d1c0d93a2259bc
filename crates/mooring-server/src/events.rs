//! Live events: what changed (presence, telemetry, commands, shadows), for `GET /api/v1/events`.
//!
//! Every node numbers the events it originates: an *origin* (a random id drawn at each start,
//! so a restarted node never reuses numbers) and a per-origin `seq` (1, 2, ...). Publishing is a
//! non-blocking push into this node's ring buffer (bounded by `[events] buffer_len`,
//! `buffer_bytes_max` and `window_ms`) and, in a cluster, into the bus outbox
//! (`cluster.events`); other nodes put what they receive into their rings the same way.
//!
//! A stream's position is a [`Cursor`]: per origin, the last seq it has passed (delivered or
//! filtered out), plus the time it was last written. Every SSE `id:` is the cursor encoded, so
//! `Last-Event-ID` resumes on any node: that node replays, from its ring, each origin's events
//! after the cursor's seq (and events of origins the cursor does not name newer than its time).
//! When it cannot (an event after the cursor left its ring, the cursor names an origin it
//! does not know, or a seq gap shows events from another node were lost on the bus), the stream
//! starts with `event: reset` instead: never a silent gap.
//!
//! Each stream is a task ([`Events::open`]) that copies events from the ring, filters them
//! ([`EventFilter`]: the request's selector and the caller's scope, evaluated by the registry
//! against cached current device facts) and pushes frames into a bounded queue the HTTP
//! response drains. A full queue means the client stopped reading: the stream's connection is
//! closed and counted (`mooring_events_streams_slow_total`); publishers never wait on a stream.

use crate::metrics::Counters;
use mooring_api::{Event, EventBody};
use mooring_proto::selector::Selector;
use mooring_proto::sync::lock;
use mooring_proto::{Clock, DeviceId};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Keep-alive period of every stream (a comment, and the cursor as an id-only message).
pub const KEEPALIVE_SECS: u64 = 15;
/// Most origins a cursor names (and a ring tracks): nodes, and their restarts within a window.
pub const CURSOR_ORIGINS_MAX: usize = 256;
/// Longest cursor text accepted from a client.
pub const CURSOR_LEN_MAX: usize = 8 * 1024;
/// Events a stream copies from the ring per lock.
const READ_BATCH_LEN: usize = 256;

/// `[events]`: bounds of the live event streams.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventsConfig {
    /// Events each node keeps for resuming (`Last-Event-ID`), local and received.
    pub buffer_len: usize,
    /// Bytes of event JSON each node keeps for resuming.
    pub buffer_bytes_max: usize,
    /// How long an event stays resumable.
    pub window_ms: u64,
    /// Concurrent streams per node; more are refused with 503 `too_many_streams`.
    pub streams_max: usize,
    /// Concurrent streams per user or token on one node (a dashboard opens one per tab); more
    /// are refused with 429 `too_many_streams`, so one principal cannot take every place.
    pub streams_per_caller_max: usize,
    /// Messages queued for one stream's client; a client that lets it fill is disconnected.
    pub stream_queue_len: usize,
}

impl Default for EventsConfig {
    fn default() -> Self {
        Self {
            buffer_len: 10_000,
            buffer_bytes_max: 64 * 1024 * 1024,
            window_ms: 300_000,
            streams_max: 1_000,
            streams_per_caller_max: 16,
            stream_queue_len: 256,
        }
    }
}

impl EventsConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.buffer_len == 0
            || self.buffer_bytes_max == 0
            || self.window_ms == 0
            || self.streams_max == 0
            || self.streams_per_caller_max == 0
            || self.stream_queue_len == 0
        {
            anyhow::bail!("events: buffer_len, buffer_bytes_max, window_ms, streams_max, streams_per_caller_max and stream_queue_len must be at least 1");
        }
        Ok(())
    }
}

/// One event in a ring: who originated it, its number there, and its JSON.
#[derive(Debug)]
pub(crate) struct Item {
    pub(crate) origin: u64,
    pub(crate) seq: u64,
    pub(crate) at_ms: u64,
    pub(crate) kind: String,
    pub(crate) device: Option<DeviceId>,
    /// The [`Event`] as JSON (the SSE `data:`), encoded once.
    pub(crate) data: String,
}

impl Item {
    fn bytes(&self) -> usize {
        self.data.len() + self.kind.len() + 64
    }
}

/// What a node knows of one origin's events.
#[derive(Debug, Clone, Copy)]
struct OriginState {
    /// Every event of this origin with a seq in `first_kept..=last` is in the ring.
    first_kept: u64,
    last: u64,
    /// Origin time of the newest event of this origin that left the ring (0: none).
    evicted_at_ms: u64,
    /// When this node last heard of this origin (its clock).
    heard_ms: u64,
}

#[derive(Default)]
struct Ring {
    items: VecDeque<Arc<Item>>,
    /// Position of `items[0]` (positions only grow).
    base: u64,
    bytes: usize,
    origins: HashMap<u64, OriginState>,
}

impl Ring {
    fn end(&self) -> u64 {
        self.base + self.items.len() as u64
    }

    fn evict_front(&mut self) {
        if let Some(old) = self.items.pop_front() {
            self.base += 1;
            self.bytes = self.bytes.saturating_sub(old.bytes());
            if let Some(o) = self.origins.get_mut(&old.origin) {
                if old.seq >= o.first_kept {
                    o.first_kept = old.seq + 1;
                }
                o.evicted_at_ms = o.evicted_at_ms.max(old.at_ms);
            }
        }
    }

    /// Drops what is past the bounds; forgets origins silent for a window with nothing kept.
    fn trim(&mut self, c: &EventsConfig, now_ms: u64) {
        let oldest = now_ms.saturating_sub(c.window_ms);
        while self.items.len() > c.buffer_len
            || self.bytes > c.buffer_bytes_max
            || self.items.front().is_some_and(|i| i.at_ms < oldest)
        {
            self.evict_front();
        }
        if self.origins.len() > CURSOR_ORIGINS_MAX / 2 {
            self.origins
                .retain(|_, o| o.heard_ms >= oldest || o.first_kept <= o.last);
        }
    }

    /// Appends one event unless it repeats one already here. A seq past the next expected one
    /// (events lost on the bus) starts the origin's kept range anew, so a cursor from before the
    /// gap resets instead of skipping it.
    fn push(&mut self, item: Item, c: &EventsConfig, now_ms: u64) -> bool {
        match self.origins.get_mut(&item.origin) {
            Some(o) if item.seq <= o.last => return false,
            Some(o) => {
                if item.seq != o.last + 1 {
                    o.first_kept = item.seq;
                }
                o.last = item.seq;
                o.heard_ms = now_ms;
            }
            None => {
                if self.origins.len() >= CURSOR_ORIGINS_MAX {
                    return false;
                }
                self.origins.insert(
                    item.origin,
                    OriginState {
                        first_kept: item.seq,
                        last: item.seq,
                        evicted_at_ms: 0,
                        heard_ms: now_ms,
                    },
                );
            }
        }
        self.bytes += item.bytes();
        self.items.push_back(Arc::new(item));
        self.trim(c, now_ms);
        true
    }
}

/// A stream's position: per origin the last seq passed, and the time it was written (events of
/// origins it does not name count from then).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Cursor {
    pub since_ms: u64,
    pub origins: BTreeMap<u64, u64>,
}

impl Cursor {
    /// `v1-<since_ms>[-<origin hex>.<seq>]...`.
    pub fn encode(&self) -> String {
        let mut s = format!("v1-{}", self.since_ms);
        for (o, seq) in &self.origins {
            s.push_str(&format!("-{o:x}.{seq}"));
        }
        s
    }

    pub fn decode(text: &str) -> Option<Cursor> {
        if text.len() > CURSOR_LEN_MAX {
            return None;
        }
        let mut parts = text.trim().split('-');
        if parts.next()? != "v1" {
            return None;
        }
        let since_ms = parts.next()?.parse().ok()?;
        let mut origins = BTreeMap::new();
        for p in parts {
            let (o, seq) = p.split_once('.')?;
            origins.insert(u64::from_str_radix(o, 16).ok()?, seq.parse().ok()?);
            if origins.len() > CURSOR_ORIGINS_MAX {
                return None;
            }
        }
        Some(Cursor { since_ms, origins })
    }

    /// Whether `item` comes after this cursor (and is not one it passed already).
    fn is_new(&self, item: &Item) -> bool {
        match self.origins.get(&item.origin) {
            Some(&seq) => item.seq > seq,
            None => item.at_ms >= self.since_ms,
        }
    }
}

/// Which events a stream shows: those about no device, and those about a device both the
/// request's selector and the caller's scope (when set) match, evaluated by the registry
/// against the device's current facts.
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    selector: Option<Selector>,
    scope: Option<Selector>,
}

impl EventFilter {
    /// `scope`: the caller's access scope (`None`: the caller sees the whole fleet).
    pub fn new(selector: Option<Selector>, scope: Option<Selector>) -> Self {
        Self { selector, scope }
    }

    async fn admits(&self, registry: &crate::registry::Registry, item: &Item) -> bool {
        let Some(device) = &item.device else {
            return true;
        };
        if self.selector.is_none() && self.scope.is_none() {
            return true;
        }
        if matches!(item.kind.as_str(), "presence" | "shadow") {
            // `online` and `version` may have just changed.
            registry.forget_facts(device);
        }
        for sel in [&self.selector, &self.scope].into_iter().flatten() {
            if !registry.matches_cached(sel, device).await {
                return false;
            }
        }
        true
    }
}

/// Counters of the event streams (`/metrics`, `mooring_events_*`).
#[derive(Debug, Default)]
pub struct EventCounters {
    pub published: AtomicU64,
    pub received: AtomicU64,
    pub streams_opened: AtomicU64,
    pub streams_refused: AtomicU64,
    /// Streams closed because their client stopped reading.
    pub streams_slow: AtomicU64,
    pub resets: AtomicU64,
}

/// Sees every event this node originates as it is published (fleet health's signals). Called
/// on the publisher's task: must not block or wait (a short lock at most).
pub trait Observer: Send + Sync {
    fn observe(&self, at_ms: u64, device: Option<&DeviceId>, body: &EventBody);
}

/// The events service: this node's origin and ring, its streams and what it sends other nodes.
pub struct Events {
    config: EventsConfig,
    clock: Arc<dyn Clock>,
    node: String,
    origin: u64,
    next_seq: Mutex<u64>,
    ring: Mutex<Ring>,
    /// The ring's end position, for streams waiting for more.
    head: watch::Sender<u64>,
    cluster: Option<Arc<crate::cluster::Cluster>>,
    observers: Vec<Arc<dyn Observer>>,
    streams: Arc<AtomicUsize>,
    /// Open streams per principal (user or token id); an entry leaves with its last stream.
    per_caller: Arc<Mutex<HashMap<String, usize>>>,
    tasks: TaskTracker,
    closing: CancellationToken,
    pub counters: EventCounters,
}

/// How a stream starts (from [`Events::open`]).
pub enum Opened {
    Stream(mpsc::Receiver<axum::response::sse::Event>),
    /// Over `streams_max`.
    Full,
    /// The caller holds `streams_per_caller_max` streams on this node already.
    CallerFull,
}

/// Holds one of the `streams_max` places; given back on drop.
struct StreamSlot(Arc<AtomicUsize>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Holds one of a caller's `streams_per_caller_max` places; given back on drop.
struct CallerSlot {
    map: Arc<Mutex<HashMap<String, usize>>>,
    key: String,
}

impl Drop for CallerSlot {
    fn drop(&mut self) {
        let mut map = mooring_proto::sync::lock(&self.map);
        if let Some(n) = map.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.key);
            }
        }
    }
}

impl Events {
    pub(crate) fn new(
        config: EventsConfig,
        clock: Arc<dyn Clock>,
        node: String,
        cluster: Option<Arc<crate::cluster::Cluster>>,
        observers: Vec<Arc<dyn Observer>>,
    ) -> Self {
        Self {
            config,
            clock,
            node,
            origin: rand::random::<u64>() >> 1,
            next_seq: Mutex::new(0),
            ring: Mutex::default(),
            head: watch::Sender::new(0),
            cluster,
            observers,
            streams: Arc::new(AtomicUsize::new(0)),
            per_caller: Arc::default(),
            tasks: TaskTracker::new(),
            closing: CancellationToken::new(),
            counters: EventCounters::default(),
        }
    }

    /// This node's name (presence events say which node holds a session).
    pub(crate) fn node(&self) -> &str {
        &self.node
    }

    /// Publishes an event that happened here: never waits (a lock held for a push).
    pub fn publish(&self, device: Option<&DeviceId>, body: EventBody) {
        let at_ms = self.clock.now_ms();
        for o in &self.observers {
            o.observe(at_ms, device, &body);
        }
        let kind = body.kind();
        let event = Event {
            at: at_ms,
            device_id: device.map(|d| d.to_string()),
            body,
        };
        let Ok(data) = serde_json::to_string(&event) else {
            return;
        };
        let c = &self.config;
        let (seq, end) = {
            // Numbered and pushed under one lock, so the ring holds this origin in seq order.
            let mut next = lock(&self.next_seq);
            *next += 1;
            let seq = *next;
            let item = Item {
                origin: self.origin,
                seq,
                at_ms,
                kind: kind.to_owned(),
                device: device.cloned(),
                data,
            };
            if let Some(cluster) = &self.cluster {
                cluster.event(self.origin, &item);
            }
            let mut ring = lock(&self.ring);
            ring.push(item, c, at_ms);
            (seq, ring.end())
        };
        debug_assert!(seq > 0);
        Counters::inc(&self.counters.published);
        self.head.send_replace(end);
    }

    /// Events another node originated (`cluster.events`).
    pub(crate) fn receive(&self, items: Vec<Item>) {
        let now = self.clock.now_ms();
        let end = {
            let mut ring = lock(&self.ring);
            for item in items {
                if item.origin != self.origin && ring.push(item, &self.config, now) {
                    Counters::inc(&self.counters.received);
                }
            }
            ring.end()
        };
        self.head.send_replace(end);
    }

    /// Streams open now.
    pub fn streams(&self) -> usize {
        self.streams.load(Ordering::Acquire)
    }

    /// Ends every stream (shutdown) and waits (bounded) for their tasks.
    pub async fn close(&self) {
        self.closing.cancel();
        self.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.tasks.wait()).await;
    }

    /// Where a new stream starts: after `last_event_id` if it is resumable here, else at the
    /// ring's end (with the reason to send as a reset, if one was asked for).
    fn start(&self, last_event_id: Option<&str>) -> (u64, Cursor, Option<&'static str>) {
        let now = self.clock.now_ms();
        let mut ring = lock(&self.ring);
        ring.trim(&self.config, now);
        let fresh = |ring: &Ring| Cursor {
            since_ms: now,
            origins: ring.origins.iter().map(|(o, s)| (*o, s.last)).collect(),
        };
        let Some(text) = last_event_id else {
            return (ring.end(), fresh(&ring), None);
        };
        let Some(cursor) = Cursor::decode(text) else {
            return (ring.end(), fresh(&ring), Some("invalid_cursor"));
        };
        let too_old = cursor.since_ms < now.saturating_sub(self.config.window_ms)
            || cursor
                .origins
                .iter()
                .any(|(o, seq)| match ring.origins.get(o) {
                    None => true,
                    Some(s) => s.first_kept > seq + 1 && s.last > *seq,
                })
            || ring.origins.iter().any(|(o, s)| {
                !cursor.origins.contains_key(o) && s.evicted_at_ms >= cursor.since_ms
            });
        if too_old {
            return (ring.end(), fresh(&ring), Some("cursor_too_old"));
        }
        (ring.base, cursor, None)
    }

    /// Opens a stream for `filter` from `last_event_id` for the principal `caller` (a user or
    /// token id): a task copies matching events into a queue of `stream_queue_len` frames,
    /// which the response drains. `closer` ends the HTTP connection (a client that stops
    /// reading is closed: it may resume).
    pub fn open(
        self: &Arc<Self>,
        registry: Arc<crate::registry::Registry>,
        caller: &str,
        filter: EventFilter,
        last_event_id: Option<&str>,
        closer: Option<CancellationToken>,
    ) -> Opened {
        let n = self.streams.fetch_add(1, Ordering::AcqRel);
        let slot = StreamSlot(self.streams.clone());
        if n >= self.config.streams_max || self.closing.is_cancelled() {
            Counters::inc(&self.counters.streams_refused);
            return Opened::Full;
        }
        let caller_slot = {
            let mut map = mooring_proto::sync::lock(&self.per_caller);
            let held = map.entry(caller.to_owned()).or_insert(0);
            if *held >= self.config.streams_per_caller_max {
                drop(map);
                Counters::inc(&self.counters.streams_refused);
                return Opened::CallerFull;
            }
            *held += 1;
            CallerSlot {
                map: self.per_caller.clone(),
                key: caller.to_owned(),
            }
        };
        Counters::inc(&self.counters.streams_opened);
        let (tx, rx) = mpsc::channel(self.config.stream_queue_len);
        let (pos, cursor, reset) = self.start(last_event_id);
        let me = self.clone();
        self.tasks.spawn(async move {
            let _slots = (slot, caller_slot);
            let slow = me
                .run_stream(&registry, &filter, &tx, pos, cursor, reset)
                .await;
            if slow {
                Counters::inc(&me.counters.streams_slow);
                tracing::debug!("event stream closed: its client stopped reading");
                if let Some(c) = closer {
                    c.cancel();
                }
            }
        });
        Opened::Stream(rx)
    }

    /// One stream until its client goes, the server stops, or (returns `true`) its queue fills.
    async fn run_stream(
        &self,
        registry: &crate::registry::Registry,
        filter: &EventFilter,
        tx: &mpsc::Sender<axum::response::sse::Event>,
        mut pos: u64,
        mut cursor: Cursor,
        reset: Option<&'static str>,
    ) -> bool {
        use axum::response::sse::Event as Sse;
        let send = |frame: Sse| -> Result<(), bool> {
            match tx.try_send(frame) {
                Ok(()) => Ok(()),
                Err(mpsc::error::TrySendError::Full(_)) => Err(true),
                Err(mpsc::error::TrySendError::Closed(_)) => Err(false),
            }
        };
        if let Some(reason) = reset {
            Counters::inc(&self.counters.resets);
            let data = serde_json::json!({ "reason": reason }).to_string();
            let frame = Sse::default()
                .event(mooring_api::RESET_EVENT)
                .id(cursor.encode())
                .data(data);
            if let Err(slow) = send(frame) {
                return slow;
            }
        }
        let mut head = self.head.subscribe();
        let period = Duration::from_secs(KEEPALIVE_SECS);
        let mut keepalive = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        loop {
            // Copy what is new, then filter and send it without the lock.
            let (batch, lost) = {
                let ring = lock(&self.ring);
                let lost = pos < ring.base;
                pos = pos.max(ring.base);
                let from = usize::try_from(pos - ring.base).unwrap_or(usize::MAX);
                let batch: Vec<Arc<Item>> = ring
                    .items
                    .iter()
                    .skip(from)
                    .take(READ_BATCH_LEN)
                    .cloned()
                    .collect();
                (batch, lost)
            };
            if lost {
                // This stream fell a whole ring behind: it cannot be complete any more.
                return true;
            }
            if !batch.is_empty() {
                pos += batch.len() as u64;
                for item in batch {
                    if !cursor.is_new(&item) {
                        continue;
                    }
                    let gap = cursor
                        .origins
                        .get(&item.origin)
                        .is_some_and(|&seq| item.seq != seq + 1);
                    if cursor.origins.len() < CURSOR_ORIGINS_MAX
                        || cursor.origins.contains_key(&item.origin)
                    {
                        cursor.origins.insert(item.origin, item.seq);
                    }
                    if gap {
                        // Events of another node were lost on the way here.
                        Counters::inc(&self.counters.resets);
                        let frame = Sse::default()
                            .event(mooring_api::RESET_EVENT)
                            .id(cursor.encode())
                            .data(serde_json::json!({ "reason": "events_lost" }).to_string());
                        if let Err(slow) = send(frame) {
                            return slow;
                        }
                    }
                    if !filter.admits(registry, &item).await {
                        continue;
                    }
                    let frame = Sse::default()
                        .event(&item.kind)
                        .id(cursor.encode())
                        .data(&item.data);
                    if let Err(slow) = send(frame) {
                        return slow;
                    }
                }
                continue;
            }
            // Caught up: every event this node had until now has been passed.
            let caught_up_ms = self.clock.now_ms();
            tokio::select! {
                _ = self.closing.cancelled() => return false,
                _ = tx.closed() => return false,
                r = head.changed() => if r.is_err() { return false },
                _ = keepalive.tick() => {
                    cursor.since_ms = caught_up_ms;
                    let frame = Sse::default().comment("keep-alive").id(cursor.encode());
                    if let Err(slow) = send(frame) {
                        return slow;
                    }
                }
            }
        }
    }
}

/// One event as it crosses the bus: `(origin, seq, at_ms, kind, device, data)`.
pub(crate) type WireItem = (u64, u64, u64, String, Option<String>, String);

impl Item {
    pub(crate) fn to_wire(&self, origin: u64) -> WireItem {
        (
            origin,
            self.seq,
            self.at_ms,
            self.kind.clone(),
            self.device.as_ref().map(|d| d.to_string()),
            self.data.clone(),
        )
    }

    pub(crate) fn from_wire(w: WireItem) -> Option<Item> {
        let (origin, seq, at_ms, kind, device, data) = w;
        // The kind becomes an SSE `event:` line: a name, nothing else.
        if kind.is_empty() || !kind.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
            return None;
        }
        let device = match device {
            Some(d) => Some(DeviceId::parse(&d).ok()?),
            None => None,
        };
        Some(Item {
            origin,
            seq,
            at_ms,
            kind,
            device,
            data,
        })
    }

    /// A byte estimate for the outbox bound.
    pub(crate) fn wire_bytes(&self) -> usize {
        self.bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(origin: u64, seq: u64, at_ms: u64) -> Item {
        Item {
            origin,
            seq,
            at_ms,
            kind: "telemetry".into(),
            device: None,
            data: "{}".into(),
        }
    }

    #[test]
    fn cursors_round_trip_and_refuse_garbage() {
        let c = Cursor {
            since_ms: 1_700_000_000_000,
            origins: [(0xabc, 5), (7, 1)].into_iter().collect(),
        };
        assert_eq!(Cursor::decode(&c.encode()), Some(c));
        for bad in ["", "v2-1", "v1", "v1-x", "v1-1-zz.1", "v1-1-a", "v1-1-a.b"] {
            assert_eq!(Cursor::decode(bad), None, "{bad}");
        }
        let many: String = (0..=CURSOR_ORIGINS_MAX)
            .map(|i| format!("-{i:x}.1"))
            .collect();
        assert_eq!(Cursor::decode(&format!("v1-1{many}")), None);
    }

    #[test]
    fn the_ring_keeps_its_bounds_and_knows_what_it_no_longer_has() {
        let config = EventsConfig {
            buffer_len: 3,
            window_ms: 1_000,
            ..EventsConfig::default()
        };
        let mut ring = Ring::default();
        for seq in 1..=5 {
            assert!(ring.push(item(1, seq, 100), &config, 100));
        }
        assert!(
            !ring.push(item(1, 4, 100), &config, 100),
            "a repeat is dropped"
        );
        assert_eq!(ring.items.len(), 3);
        assert_eq!(ring.origins[&1].first_kept, 3);
        // A gap (6 never came): what is kept starts again at 7.
        assert!(ring.push(item(1, 7, 100), &config, 100));
        assert_eq!(ring.origins[&1].first_kept, 7);
        // Older than the window: gone at the next trim.
        ring.trim(&config, 1_200);
        assert!(ring.items.is_empty());
        assert_eq!(ring.origins[&1].last, 7);
    }
}
