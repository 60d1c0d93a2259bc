//! One MQTT session: subscriptions, the outbound queue and inflight window, surviving reconnects.

use crate::broker::{Control, SessionId};
use crate::hooks::Message;
use mooring_proto::policy::Principal;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;

/// Subscription options (v3.1.1 uses only `qos`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct SubOptions {
    pub(crate) qos: u8,
    pub(crate) no_local: bool,
    pub(crate) retain_as_published: bool,
    /// v5 Subscription Identifier given with the SUBSCRIBE, sent back on every matching PUBLISH.
    pub(crate) sub_id: Option<u32>,
}

/// What queueing a message for a session did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueue {
    /// Queued; nothing else was dropped.
    Enqueued,
    /// Queued, after dropping older QoS 0 messages to make room.
    EnqueuedDroppedOldest,
    /// Not queued: the queue is full of QoS 1/2 messages (or the session is offline and the
    /// message is QoS 0).
    Refused,
}

impl Enqueue {
    /// Whether the message is in the queue now.
    pub fn is_enqueued(self) -> bool {
        self != Enqueue::Refused
    }
}

/// A message on its way to one session.
#[derive(Debug, Clone)]
pub(crate) struct Delivery {
    pub(crate) msg: Arc<Message>,
    /// Granted QoS: min(publish QoS, subscription QoS).
    pub(crate) qos: u8,
    /// RETAIN flag as sent to this subscriber.
    pub(crate) retain: bool,
    pub(crate) expires_at: Option<Instant>,
    /// Subscription Identifiers of every matching subscription (v5), ascending.
    pub(crate) sub_ids: Vec<u32>,
    /// Its key in the session's stored messages; 0: not stored (see `persist.rs`).
    pub(crate) seq: u64,
    /// The shared subscription group it came through (`None`: an ordinary subscription).
    pub(crate) shared: Option<crate::shared_sub::Via>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum InflightState {
    /// PUBLISH sent, waiting for PUBACK (QoS 1) or PUBREC (QoS 2).
    AwaitAck,
    /// PUBREL sent, waiting for PUBCOMP.
    AwaitComp,
}

#[derive(Debug, Clone)]
pub(crate) struct Inflight {
    pub(crate) packet_id: u16,
    pub(crate) delivery: Delivery,
    pub(crate) state: InflightState,
}

/// The live connection currently attached to a session.
pub(crate) struct Link {
    pub(crate) conn_id: u64,
    pub(crate) control: mpsc::Sender<Control>,
    /// Closed (sender dropped) when the connection has fully ended, cleanup included.
    pub(crate) done: watch::Receiver<()>,
}

/// How a persisted session is stored (present while the session is persisted).
#[derive(Debug, Clone)]
pub(crate) struct PersistInfo {
    /// `persist::session_key`.
    pub(crate) key: String,
    pub(crate) owner: crate::broker::Owner,
}

pub(crate) struct Session {
    /// Unique per session object: its key in the subscription index.
    pub(crate) id: SessionId,
    pub(crate) client_id: String,
    /// The principal as of now: replaced when the embedder reports new tags
    /// ([`crate::Broker::update_principal`]); connections read it for every authorization.
    pub(crate) principal: Arc<Principal>,
    /// Filter → options. Change only through `Shared::{add,remove}_subscription` / `retire`,
    /// which keep the subscription index in step.
    pub(crate) subs: HashMap<String, SubOptions>,
    /// Index generation of the last change to `subs` (see `Shared::route`).
    pub(crate) subs_generation: u64,
    /// Out of the session table: its subscriptions are no longer in the index.
    pub(crate) retired: bool,
    /// Its principal was removed ([`crate::Broker::remove_principal`]): no will fires for it.
    pub(crate) removed: bool,
    /// Change only through `enqueue` / `pop_front` / `push_front` / `drop_qos0` / `clear_queue`,
    /// which keep `queue_bytes` in step.
    pub(crate) queue: VecDeque<Delivery>,
    /// Topic + payload bytes of everything in `queue`.
    pub(crate) queue_bytes: usize,
    pub(crate) inflight: VecDeque<Inflight>,
    /// Inbound QoS 2 packet ids for which PUBREC was sent and PUBREL not yet received.
    pub(crate) qos2_in: HashSet<u16>,
    pub(crate) expiry_secs: u32,
    pub(crate) link: Option<Link>,
    /// Bumped on every attach; timers (will delay, expiry) compare it to see a reconnect.
    pub(crate) generation: u64,
    pub(crate) notify: Arc<Notify>,
    /// Set while the session is persisted (expiry > 0 and the broker has persistence).
    pub(crate) persist: Option<Box<PersistInfo>>,
    /// While offline and persisted: the unix ms its stored value says it ends at (0: online,
    /// or never), so a value written again while it is offline (a revocation, a restore)
    /// keeps the deadline instead of starting a new one.
    pub(crate) offline_until_ms: u64,
    /// A persisted session's will, stored with it (see `persist::StoredWill`).
    pub(crate) will: Option<Box<crate::persist::StoredWill>>,
}

impl Session {
    pub(crate) fn new(id: SessionId, client_id: String, principal: Arc<Principal>) -> Session {
        Session {
            id,
            client_id,
            principal,
            subs: HashMap::new(),
            subs_generation: 0,
            retired: false,
            removed: false,
            queue: VecDeque::new(),
            queue_bytes: 0,
            inflight: VecDeque::new(),
            qos2_in: HashSet::new(),
            expiry_secs: 0,
            link: None,
            generation: 0,
            notify: Arc::new(Notify::new()),
            persist: None,
            offline_until_ms: 0,
            will: None,
        }
    }

    /// Queue a delivery. Offline sessions do not queue QoS 0. The queue holds at most
    /// `len_max` messages and `bytes_max` bytes; when full, the oldest queued QoS 0 messages are
    /// dropped first to make room, and with none left to drop the new message is refused.
    pub(crate) fn enqueue(&mut self, d: Delivery, len_max: usize, bytes_max: usize) -> Enqueue {
        if self.link.is_none() && d.qos == 0 {
            return Enqueue::Refused;
        }
        let size = d.size();
        let mut outcome = Enqueue::Enqueued;
        while self.queue.len() >= len_max || self.queue_bytes + size > bytes_max {
            let Some(pos) = self.queue.iter().position(|q| q.qos == 0) else {
                return Enqueue::Refused;
            };
            if let Some(old) = self.queue.remove(pos) {
                self.queue_bytes -= old.size();
            }
            outcome = Enqueue::EnqueuedDroppedOldest;
        }
        self.queue_bytes += size;
        self.queue.push_back(d);
        self.notify.notify_one();
        outcome
    }

    pub(crate) fn pop_front(&mut self) -> Option<Delivery> {
        let d = self.queue.pop_front()?;
        self.queue_bytes -= d.size();
        Some(d)
    }

    /// Append a restored delivery (no bound is checked: it fit when it was queued).
    pub(crate) fn push_restored(&mut self, d: Delivery) {
        self.queue_bytes += d.size();
        self.queue.push_back(d);
    }

    /// Put back a delivery taken with `pop_front` (it fit before, so no bound is checked).
    pub(crate) fn push_front(&mut self, d: Delivery) {
        self.queue_bytes += d.size();
        self.queue.push_front(d);
    }

    /// Drop queued QoS 0 messages (the session went offline).
    pub(crate) fn drop_qos0(&mut self) {
        self.retain_queue(|d| d.qos > 0);
    }

    /// Keep only the queued deliveries `keep` accepts; returns the `seq` of every dropped one
    /// (0 for those not stored).
    pub(crate) fn retain_queue(&mut self, keep: impl Fn(&Delivery) -> bool) -> Vec<u64> {
        let mut dropped = Vec::new();
        self.queue.retain(|d| {
            let k = keep(d);
            if !k {
                dropped.push(d.seq);
            }
            k
        });
        self.queue_bytes = self.queue.iter().map(Delivery::size).sum();
        dropped
    }

    /// The store key of this session while it is persisted (and not retired).
    pub(crate) fn persist_key(&self) -> Option<&str> {
        self.persist
            .as_ref()
            .filter(|_| !self.retired)
            .map(|p| p.key.as_str())
    }

    pub(crate) fn clear_queue(&mut self) {
        self.queue.clear();
        self.queue_bytes = 0;
        self.inflight.clear();
    }
}

impl Delivery {
    /// What the delivery costs a queue: topic, payload and v5 property bytes.
    pub(crate) fn size(&self) -> usize {
        self.msg.size_bytes()
    }
}
