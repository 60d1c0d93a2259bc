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

pub(crate) struct Session {
    /// Unique per session object: its key in the subscription index.
    pub(crate) id: SessionId,
    pub(crate) client_id: String,
    pub(crate) principal: Principal,
    /// Filter → options. Change only through `Shared::{add,remove}_subscription` / `retire`,
    /// which keep the subscription index in step.
    pub(crate) subs: HashMap<String, SubOptions>,
    /// Index generation of the last change to `subs` (see `Shared::route`).
    pub(crate) subs_generation: u64,
    /// Out of the session table: its subscriptions are no longer in the index.
    pub(crate) retired: bool,
    pub(crate) queue: VecDeque<Delivery>,
    pub(crate) inflight: VecDeque<Inflight>,
    /// Inbound QoS 2 packet ids for which PUBREC was sent and PUBREL not yet received.
    pub(crate) qos2_in: HashSet<u16>,
    pub(crate) expiry_secs: u32,
    pub(crate) link: Option<Link>,
    /// Bumped on every attach; timers (will delay, expiry) compare it to see a reconnect.
    pub(crate) generation: u64,
    pub(crate) notify: Arc<Notify>,
}

impl Session {
    pub(crate) fn new(id: SessionId, client_id: String, principal: Principal) -> Session {
        Session {
            id,
            client_id,
            principal,
            subs: HashMap::new(),
            subs_generation: 0,
            retired: false,
            queue: VecDeque::new(),
            inflight: VecDeque::new(),
            qos2_in: HashSet::new(),
            expiry_secs: 0,
            link: None,
            generation: 0,
            notify: Arc::new(Notify::new()),
        }
    }

    /// Queue a delivery; false if it was dropped. Offline sessions do not queue QoS 0.
    /// A full queue drops its oldest QoS 0 message first; with none, the new message is dropped.
    pub(crate) fn enqueue(&mut self, d: Delivery, len_max: usize) -> bool {
        if self.link.is_none() && d.qos == 0 {
            return false;
        }
        let mut ok = true;
        if self.queue.len() >= len_max {
            if let Some(pos) = self.queue.iter().position(|q| q.qos == 0) {
                self.queue.remove(pos);
                ok = false;
            } else {
                return false;
            }
        }
        self.queue.push_back(d);
        self.notify.notify_one();
        ok
    }
}
