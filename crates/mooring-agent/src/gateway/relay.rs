//! The relay: children's messages to the server under their own identities, the server's
//! messages for children to their connections.
//!
//! * A child says hello → `devices/<child>/presence` `{"v":1,"online":true}` (QoS 1) and a
//!   SUBSCRIBE to `devices/<child>/commands/+` and `devices/<child>/shadow/delta`.
//! * A child leaves (or is dropped for not reading) → presence `{"v":1,"online":false}` and an
//!   UNSUBSCRIBE from those filters. Presence changes made while the uplink is down are
//!   published when it is back (the last state of each child only).
//! * The uplink (re)connects (a clean session: no subscriptions survive) → every connected
//!   child is subscribed again and announced online again.
//! * Telemetry, command results and reported updates of a child go through the agent's
//!   durable outbox ([`crate::store::AgentStore`]), like the agent's own: they survive uplink
//!   outages and restarts. A child's telemetry keeps the `seq` it sent; without one it gets
//!   the outbox seq of its entry, which is what the agent uses for its own telemetry: monotonic
//!   across restarts (persisted, and a fresh outbox starts at unix ms × 1000). A child should
//!   either always send `seq` or never (its own counter and the gateway's could meet).
//! * A command for a child is handed to it as received (`{"command": ...}`) and acknowledged
//!   on `.../ack` on its behalf (best effort, as the agent does for its own). The child's
//!   result is what finishes it. The gateway keeps no at-most-once record for children: a
//!   redelivered command reaches the child again.
//! * Messages for a child that is not connected (a late delivery after its UNSUBSCRIBE) are
//!   dropped.

use super::{ChildEvent, ChildMsg, ChildTransport, GatewayConfig, ToChild};
use crate::link::{Inbound, LinkHandle};
use crate::store::Entry;
use crate::Core;
use mooring_proto::command::CommandRequest;
use mooring_proto::gateway::{presence_topic, ChildPresence};
use mooring_proto::shadow::SHADOW_SIZE_BYTES_MAX;
use mooring_proto::telemetry::Telemetry;
use mooring_proto::{DeviceId, Topic};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

/// Children subscribed in one SUBSCRIBE after a reconnect (two filters each).
pub const SUBSCRIBE_CHILDREN_PER_PACKET: usize = 32;

/// The gateway's share of [`Core`]: channels whose receivers survive a restart of the relay.
pub(crate) struct GatewayParts {
    pub(crate) config: GatewayConfig,
    pub(crate) events_tx: mpsc::Sender<ChildEvent>,
    pub(crate) events_rx: tokio::sync::Mutex<mpsc::Receiver<ChildEvent>>,
    pub(crate) inbound_rx: tokio::sync::Mutex<mpsc::Receiver<Inbound>>,
    /// Taken by the `gateway-socket` part when it starts.
    pub(crate) transport: Mutex<Option<Box<dyn ChildTransport>>>,
}

/// The filters the gateway subscribes to for a child.
pub fn child_filters(child: &DeviceId) -> Vec<String> {
    vec![Topic::commands_filter(child), Topic::shadow_delta(child)]
}

/// What [`Children::connect`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// A child not connected before.
    New,
    /// The child was connected: the old connection is told and closed.
    Replaced,
    /// `children_max` children are connected: this one is told and closed.
    Full,
}

/// What [`Children::send`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    Delivered,
    /// No such child connected.
    Absent,
    /// The child's queue was full (or its connection gone): it is disconnected.
    Dropped,
}

/// The connected children: id → (connection number, sender). Dropping a sender closes its
/// connection.
#[derive(Debug)]
pub struct Children {
    max: usize,
    map: HashMap<DeviceId, (u64, mpsc::Sender<ToChild>)>,
}

impl Children {
    pub fn new(max: usize) -> Self {
        Self {
            max,
            map: HashMap::new(),
        }
    }

    pub fn connect(&mut self, child: DeviceId, conn: u64, tx: mpsc::Sender<ToChild>) -> Admit {
        if let Some(old) = self.map.get_mut(&child) {
            let _ = old
                .1
                .try_send(ToChild::Error("replaced by a new connection".into()));
            *old = (conn, tx);
            return Admit::Replaced;
        }
        if self.map.len() >= self.max {
            let _ = tx.try_send(ToChild::Error(format!(
                "too many children ({} connected)",
                self.max
            )));
            return Admit::Full;
        }
        self.map.insert(child, (conn, tx));
        Admit::New
    }

    /// Forgets `child` if `conn` is its current connection; `true` if it did.
    pub fn disconnect(&mut self, child: &DeviceId, conn: u64) -> bool {
        if self.is_current(child, conn) {
            self.map.remove(child);
            true
        } else {
            false
        }
    }

    pub fn is_current(&self, child: &DeviceId, conn: u64) -> bool {
        self.map.get(child).is_some_and(|(c, _)| *c == conn)
    }

    /// Queues `msg` for `child` without waiting.
    pub fn send(&mut self, child: &DeviceId, msg: ToChild) -> Delivery {
        let Some((_, tx)) = self.map.get(child) else {
            return Delivery::Absent;
        };
        match tx.try_send(msg) {
            Ok(()) => Delivery::Delivered,
            Err(_) => {
                self.map.remove(child);
                Delivery::Dropped
            }
        }
    }

    pub fn ids(&self) -> impl Iterator<Item = &DeviceId> {
        self.map.keys()
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// A child's message as an outbox entry's topic and payload. `seq` is the outbox seq of the
/// entry (the telemetry `seq` unless the child sent its own); `now_ms` the default `ts`.
/// `Err`: why the message is refused (told to the child).
pub fn child_message(
    child: &DeviceId,
    msg: ChildMsg,
    seq: u64,
    now_ms: u64,
) -> Result<(String, Vec<u8>), String> {
    match msg {
        ChildMsg::Telemetry(mut obj) => {
            obj.entry("seq").or_insert_with(|| Value::from(seq));
            obj.entry("ts").or_insert_with(|| Value::from(now_ms));
            let payload = Value::Object(obj).to_string().into_bytes();
            Telemetry::parse(&payload).map_err(|e| format!("not valid telemetry: {e}"))?;
            Ok((Topic::telemetry(child), payload))
        }
        ChildMsg::Result(r) => {
            let payload = r.result.to_bytes();
            if payload.len() > mooring_proto::command::COMMAND_BODY_SIZE_BYTES_MAX {
                return Err("command result too large".into());
            }
            Ok((Topic::command_result(child, &r.id), payload))
        }
        ChildMsg::Reported(patch) => {
            let payload = Value::Object(patch).to_string().into_bytes();
            if payload.len() > SHADOW_SIZE_BYTES_MAX {
                return Err("reported update too large".into());
            }
            Ok((Topic::shadow_reported(child), payload))
        }
    }
}

/// A message from the server on a child's topic, as the line for that child: `None` for a
/// topic that is not a child's command or delta, an invalid command, or a cleared delta.
pub fn server_message(topic: &str, payload: &[u8]) -> Option<(DeviceId, ToChild)> {
    match Topic::parse(topic)? {
        Topic::Command(child, cmd) => {
            match CommandRequest::parse(payload) {
                Ok(req) if req.id == cmd => {}
                Ok(_) => {
                    tracing::warn!(topic, "command id differs from its topic; ignored");
                    return None;
                }
                Err(e) => {
                    tracing::warn!(topic, error = %e, "invalid command for a child; ignored");
                    return None;
                }
            }
            // As received (fields this version does not know included).
            let value = serde_json::from_slice(payload).ok()?;
            Some((child, ToChild::Command(value)))
        }
        Topic::ShadowDelta(child) => {
            if payload.is_empty() {
                return None; // a cleared retained delta
            }
            match serde_json::from_slice::<Value>(payload) {
                Ok(v @ Value::Object(_)) => Some((child, ToChild::Delta(v))),
                _ => {
                    tracing::warn!(topic, "invalid shadow delta for a child; ignored");
                    None
                }
            }
        }
        _ => None,
    }
}

/// The presence and subscription a child still needs on the uplink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    /// Presence online and subscribed.
    Online,
    /// Presence offline and unsubscribed.
    Offline,
}

/// The relay part: runs until the agent stops (or at once without a gateway). Errors are
/// store failures.
pub(crate) async fn run(core: Arc<Core>) -> anyhow::Result<()> {
    let Some(gw) = &core.gateway else {
        return Ok(());
    };
    let mut events = gw.events_rx.lock().await;
    let mut inbound = gw.inbound_rx.lock().await;
    let mut children = Children::new(gw.config.children_max);
    let mut pending: BTreeMap<DeviceId, Change> = BTreeMap::new();
    let mut link_rx = core.link.subscribe();
    let mut link: Option<LinkHandle> = link_rx.borrow_and_update().clone();
    loop {
        let blocked = match &link {
            Some(h) => !flush(h, &mut pending),
            None => false,
        };
        tokio::select! {
            changed = link_rx.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                link = link_rx.borrow_and_update().clone();
                if link.is_some() {
                    // A new session has no subscriptions: every child again.
                    for child in children.ids() {
                        pending.insert(child.clone(), Change::Online);
                    }
                }
            }
            ev = events.recv() => {
                let Some(ev) = ev else { return Ok(()) };
                on_event(&core, &mut children, &mut pending, ev)?;
            }
            msg = inbound.recv() => {
                let Some(msg) = msg else { return Ok(()) };
                let Some((child, line)) = server_message(&msg.topic, &msg.payload) else {
                    continue;
                };
                let ack = match &line {
                    ToChild::Command(v) => v.get("id").and_then(Value::as_str).map(str::to_owned),
                    _ => None,
                };
                match children.send(&child, line) {
                    Delivery::Delivered => {
                        if let (Some(id), Some(h)) = (ack, &link) {
                            h.try_publish(
                                &Topic::command_ack(&child, &id),
                                mooring_proto::command::ack_payload(),
                                1,
                                None,
                            );
                        }
                    }
                    Delivery::Absent => {
                        tracing::debug!(%child, topic = %msg.topic, "message for an absent child; dropped");
                    }
                    Delivery::Dropped => {
                        tracing::warn!(%child, "child's queue is full; disconnecting it");
                        pending.insert(child, Change::Offline);
                    }
                }
            }
            () = tokio::time::sleep(Duration::from_millis(crate::FILL_RETRY_MS)), if blocked => {}
        }
    }
}

fn on_event(
    core: &Core,
    children: &mut Children,
    pending: &mut BTreeMap<DeviceId, Change>,
    ev: ChildEvent,
) -> anyhow::Result<()> {
    match ev {
        ChildEvent::Connected { child, conn, tx } => {
            match children.connect(child.clone(), conn, tx) {
                Admit::New => {
                    pending.insert(child, Change::Online);
                }
                Admit::Replaced => {
                    tracing::info!(%child, "child reconnected; the old connection is closed");
                }
                Admit::Full => {
                    tracing::warn!(%child, max = children.max, "too many children; refused");
                }
            }
        }
        ChildEvent::Disconnected { child, conn } => {
            if children.disconnect(&child, conn) {
                pending.insert(child, Change::Offline);
            }
        }
        ChildEvent::Message { child, conn, msg } => {
            if !children.is_current(&child, conn) {
                return Ok(()); // a replaced connection's last words
            }
            let now_ms = core.clock.now_ms();
            let mut store = core.store();
            let seq = store.next_seq();
            match child_message(&child, msg, seq, now_ms) {
                Ok((topic, payload)) => {
                    let pushed = store.push(vec![Entry {
                        seq,
                        topic: Some(topic),
                        payload,
                    }])?;
                    if pushed.dropped > 0 {
                        tracing::warn!(
                            dropped = pushed.dropped,
                            "outbox full; oldest messages dropped"
                        );
                    }
                    drop(store);
                    core.outbox_changed.notify_one();
                }
                Err(why) => {
                    drop(store);
                    tracing::warn!(%child, error = %why, "child message skipped");
                    if children.send(&child, ToChild::Error(why)) == Delivery::Dropped {
                        pending.insert(child, Change::Offline);
                    }
                }
            }
        }
    }
    Ok(())
}

/// Publishes what `pending` asks for on `h`, removing what was queued. `false`: the link's
/// queue was full; try again later.
fn flush(h: &LinkHandle, pending: &mut BTreeMap<DeviceId, Change>) -> bool {
    // Subscriptions first, grouped: a reconnect with many children is a few SUBSCRIBEs.
    let online: Vec<DeviceId> = pending
        .iter()
        .filter(|(_, c)| **c == Change::Online)
        .map(|(id, _)| id.clone())
        .collect();
    for group in online.chunks(SUBSCRIBE_CHILDREN_PER_PACKET) {
        let filters = group.iter().flat_map(child_filters).collect();
        if !h.try_subscribe(filters) {
            return false;
        }
        for child in group {
            pending.remove(child);
            if !h.try_publish(
                &presence_topic(child),
                ChildPresence::new(true).to_json().into_bytes(),
                1,
                None,
            ) {
                // Subscribed already; announcing again later is harmless.
                pending.insert(child.clone(), Change::Online);
                return false;
            }
        }
    }
    let offline: Vec<DeviceId> = pending.keys().cloned().collect();
    for child in offline {
        if !h.try_publish(
            &presence_topic(&child),
            ChildPresence::new(false).to_json().into_bytes(),
            1,
            None,
        ) {
            return false;
        }
        pending.remove(&child);
        // Best effort: a late message for an absent child is dropped anyway.
        h.try_unsubscribe(child_filters(&child));
    }
    true
}

/// Builds the gateway's parts for [`Core`] and the link's route for children's messages.
pub(crate) fn parts(
    config: GatewayConfig,
    transport: Box<dyn ChildTransport>,
) -> (GatewayParts, mpsc::Sender<Inbound>) {
    let (events_tx, events_rx) = mpsc::channel(super::EVENTS_QUEUE_MAX);
    let (inbound_tx, inbound_rx) = mpsc::channel(super::INBOUND_QUEUE_MAX);
    (
        GatewayParts {
            config,
            events_tx,
            events_rx: tokio::sync::Mutex::new(events_rx),
            inbound_rx: tokio::sync::Mutex::new(inbound_rx),
            transport: Mutex::new(Some(transport)),
        },
        inbound_tx,
    )
}

/// The `gateway-socket` part: serves the transport (once; a restart finds it taken).
pub(crate) async fn serve(core: Arc<Core>) -> anyhow::Result<()> {
    let Some(gw) = &core.gateway else {
        return Ok(());
    };
    let transport = mooring_proto::sync::lock(&gw.transport).take();
    if let Some(t) = transport {
        t.serve(gw.events_tx.clone()).await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::ChildResult;
    use mooring_proto::command::{CommandResult, ResultStatus};
    use serde_json::{json, Map};

    fn id(s: &str) -> DeviceId {
        DeviceId::parse(s).expect("id")
    }

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => panic!("object expected"),
        }
    }

    #[test]
    fn child_messages_map_to_the_childs_own_topics() {
        let c = id("lock-7");
        let (t, p) = child_message(&c, ChildMsg::Telemetry(obj(json!({"temp":1}))), 42, 1000)
            .expect("telemetry");
        assert_eq!(t, "devices/lock-7/telemetry");
        let v: Value = serde_json::from_slice(&p).expect("json");
        assert_eq!(v, json!({"temp":1,"seq":42,"ts":1000}));
        // The child's own seq and ts are kept.
        let (_, p) = child_message(
            &c,
            ChildMsg::Telemetry(obj(json!({"temp":1,"seq":7,"ts":5}))),
            42,
            1000,
        )
        .expect("telemetry");
        let v: Value = serde_json::from_slice(&p).expect("json");
        assert_eq!(v, json!({"temp":1,"seq":7,"ts":5}));
        assert!(child_message(&c, ChildMsg::Telemetry(obj(json!({"seq":"x"}))), 1, 1).is_err());

        let (t, p) = child_message(
            &c,
            ChildMsg::Result(ChildResult {
                id: "c9".into(),
                result: CommandResult {
                    status: ResultStatus::Succeeded,
                    output: json!({"echo":1}),
                    local: None,
                },
            }),
            1,
            1,
        )
        .expect("result");
        assert_eq!(t, "devices/lock-7/commands/c9/result");
        assert_eq!(
            CommandResult::parse(&p).expect("result").output,
            json!({"echo":1})
        );

        let (t, p) =
            child_message(&c, ChildMsg::Reported(obj(json!({"fw":"2"}))), 1, 1).expect("reported");
        assert_eq!(t, "devices/lock-7/shadow/reported");
        assert_eq!(p, br#"{"fw":"2"}"#.to_vec());
    }

    #[test]
    fn server_messages_map_to_lines_for_the_child() {
        let cmd = json!({"id":"c1","name":"open","params":{"s":1},"expires_at":99});
        let (c, line) = server_message("devices/lock-7/commands/c1", cmd.to_string().as_bytes())
            .expect("command");
        assert_eq!(c, id("lock-7"));
        assert_eq!(line, ToChild::Command(cmd.clone()));
        // Id mismatch, garbage, other topics: nothing.
        assert!(server_message("devices/lock-7/commands/c2", cmd.to_string().as_bytes()).is_none());
        assert!(server_message("devices/lock-7/commands/c1", b"nope").is_none());
        assert!(server_message("devices/lock-7/telemetry", b"{}").is_none());
        let delta = json!({"version":3,"delta":{"mode":"eco"}});
        assert_eq!(
            server_message("devices/lock-7/shadow/delta", delta.to_string().as_bytes()),
            Some((id("lock-7"), ToChild::Delta(delta)))
        );
        assert!(server_message("devices/lock-7/shadow/delta", b"").is_none());
        assert_eq!(
            child_filters(&id("lock-7")),
            vec!["devices/lock-7/commands/+", "devices/lock-7/shadow/delta"]
        );
    }

    #[test]
    fn children_are_bounded_replaced_and_dropped_when_slow() {
        let mut ch = Children::new(2);
        let (a1, mut a1_rx) = mpsc::channel(2);
        let (a2, mut a2_rx) = mpsc::channel(2);
        let (b, _b_rx) = mpsc::channel(2);
        let (c, mut c_rx) = mpsc::channel(2);
        assert_eq!(ch.connect(id("a"), 1, a1), Admit::New);
        assert_eq!(ch.connect(id("b"), 2, b), Admit::New);
        assert_eq!(ch.connect(id("c"), 3, c), Admit::Full);
        assert!(matches!(c_rx.try_recv(), Ok(ToChild::Error(_))));
        // The same id again replaces: the old connection is told, then its sender is gone.
        assert_eq!(ch.connect(id("a"), 4, a2), Admit::Replaced);
        assert!(matches!(a1_rx.try_recv(), Ok(ToChild::Error(_))));
        assert!(a1_rx.try_recv().is_err());
        assert!(
            !ch.disconnect(&id("a"), 1),
            "a replaced connection's end is ignored"
        );
        assert_eq!(ch.len(), 2);
        // A child that does not read is dropped when its queue is full.
        assert_eq!(
            ch.send(&id("a"), ToChild::Error("1".into())),
            Delivery::Delivered
        );
        assert_eq!(
            ch.send(&id("a"), ToChild::Error("2".into())),
            Delivery::Delivered
        );
        assert_eq!(
            ch.send(&id("a"), ToChild::Error("3".into())),
            Delivery::Dropped
        );
        assert_eq!(
            ch.send(&id("a"), ToChild::Error("4".into())),
            Delivery::Absent
        );
        assert_eq!(a2_rx.try_recv().ok(), Some(ToChild::Error("1".into())));
        assert!(ch.disconnect(&id("b"), 2));
        assert!(ch.is_empty());
    }
}
