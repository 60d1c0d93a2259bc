//! The publish path: inbound PUBLISH (checked, handed to the embedder, routed), QoS 2 flows,
//! and acks held back until what they confirm is durable.

use super::{BoxFut, Conn};
use crate::broker::{lock, Owner, Refusal};
use crate::hooks::{Message, ProtocolVersion, PublishVerdict};
use crate::persist::{Durable, StateOp};
use crate::session::{InflightState, Session};
use futures::stream::FuturesOrdered;
use mooring_proto::topic::is_valid_topic_name;
use mqtt_protocol_core::mqtt::connection::Event;
use mqtt_protocol_core::mqtt::packet::{v3_1_1, v5_0};
use mqtt_protocol_core::mqtt::result_code::{
    DisconnectReasonCode, PubackReasonCode, PubrecReasonCode,
};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite};

/// What a [`DeferredAck`] sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum AckKind {
    /// PUBACK (QoS 1) or PUBREC (QoS 2) of a received PUBLISH.
    Publish,
    /// PUBCOMP: a received QoS 2 message is released. Sent before the session's stored value
    /// forgets its id, a restart would bring the id back while the client, told it is free,
    /// uses it for a new message, which would then be dropped as a resend.
    Pubcomp,
    /// PUBREL: the client has our QoS 2 message. Sent before that is stored, a restart would
    /// send the message again, and the client would take it for a new one.
    Pubrel,
    /// Nothing to send: a QoS 0 publish that changed a retained message waits here only so it
    /// counts against reading like the others (a retained QoS 0 flood would otherwise queue
    /// payloads for the store as fast as the client sends them).
    Flow,
}

/// A PUBACK / PUBREC / PUBCOMP / PUBREL to send once `wait` (if any) resolves.
pub(super) struct DeferredAck {
    kind: AckKind,
    pid: u16,
    qos: u8,
    /// v5 reason code.
    code: u8,
    wait: Option<Durable>,
}

/// Ready when the first deferred ack may go out: `Some(durable)` for it.
pub(super) fn poll_front_ack(
    acks: &mut std::collections::VecDeque<DeferredAck>,
    cx: &mut Context<'_>,
) -> Poll<bool> {
    let Some(front) = acks.front_mut() else {
        return Poll::Pending;
    };
    match front.wait.as_mut() {
        None => Poll::Ready(true),
        Some(w) => w.as_mut().poll(cx),
    }
}

pub(super) struct PendingPublish {
    packet_id: Option<u16>,
    msg: Message,
    verdict: PublishVerdict,
}

impl<S> Conn<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    pub(super) fn pubcomp(&mut self, pid: u16) -> Vec<Event> {
        match self.version {
            ProtocolVersion::V311 => match v3_1_1::Pubcomp::builder().packet_id(pid).build() {
                Ok(p) => self.mqtt.send(p.into()),
                Err(_) => Vec::new(),
            },
            ProtocolVersion::V5 => match v5_0::Pubcomp::builder().packet_id(pid).build() {
                Ok(p) => self.mqtt.send(p.into()),
                Err(_) => Vec::new(),
            },
        }
    }

    pub(super) fn pubrel(&mut self, pid: u16) -> Vec<Event> {
        match self.version {
            ProtocolVersion::V311 => match v3_1_1::Pubrel::builder().packet_id(pid).build() {
                Ok(p) => self.mqtt.send(p.into()),
                Err(_) => Vec::new(),
            },
            ProtocolVersion::V5 => match v5_0::Pubrel::builder().packet_id(pid).build() {
                Ok(p) => self.mqtt.send(p.into()),
                Err(_) => Vec::new(),
            },
        }
    }

    /// A stored message of this session (whose lock the caller holds) is done with: delete it.
    pub(super) fn forget(&self, s: &Session, seq: u64) {
        if let (Some(key), true) = (s.persist_key(), seq != 0) {
            self.shared.detach(vec![StateOp::DeleteMessage {
                session: key.to_owned(),
                seq,
            }]);
        }
    }

    /// PUBREL of an inbound QoS 2 message: a persisted session stops remembering its id;
    /// what the PUBCOMP waits for.
    pub(super) fn inbound_qos2_released(&self, pid: u16) -> Option<Durable> {
        let session = self.session.as_ref()?;
        let mut s = lock(session);
        if s.persist_key().is_some() && s.qos2_in.remove(&pid) {
            return self
                .shared
                .durable(self.shared.session_op(&s, false).into_iter().collect());
        }
        None
    }

    pub(super) fn outbound_pubrec(&mut self, pid: u16) {
        let mut wait = None;
        if let Some(session) = &self.session {
            let mut s = lock(session);
            let mut stored = None;
            if let Some(i) = s.inflight.iter_mut().find(|i| i.packet_id == pid) {
                i.state = InflightState::AwaitComp;
                if i.delivery.seq != 0 {
                    stored = Some(i.delivery.clone());
                }
            }
            // Durable before the PUBREL goes out: after a restart the PUBREL is sent again,
            // not the message.
            if let (Some(d), Some(key)) = (stored, s.persist_key()) {
                let op = self
                    .shared
                    .put_message(key, &d, Some((InflightState::AwaitComp, pid)));
                wait = self.shared.durable(vec![op]);
            }
        }
        self.queue_deferred(AckKind::Pubrel, pid, 2, 0, wait);
    }

    pub(super) fn inbound_publish(
        &mut self,
        msg: Message,
        pid: Option<u16>,
        pending: &mut FuturesOrdered<BoxFut<PendingPublish>>,
    ) {
        let v5 = self.version == ProtocolVersion::V5;
        let mut msg = msg;
        if !self.shared.config.topic_within_limits(&msg.topic) {
            self.shared.counters.refuse(Refusal::TopicTooLong);
            tracing::debug!(client_id = %self.client_id, "publish topic over the length/level limits");
            match (v5, pid) {
                (true, Some(pid)) => self.ack(pid, msg.qos, 0x90),
                _ => {
                    self.disconnect_v5(DisconnectReasonCode::TopicNameInvalid);
                    self.close = true;
                }
            }
            return;
        }
        if !is_valid_topic_name(&msg.topic) {
            self.disconnect_v5(DisconnectReasonCode::TopicNameInvalid);
            self.close = true;
            return;
        }
        let principal = self.principal();
        if !self.shared.hooks.may_publish(&principal, &msg.topic) {
            self.shared.counters.deny(Refusal::PublishDenied);
            tracing::debug!(client_id = %self.client_id, topic = %msg.topic, "publish denied");
            match (v5, pid) {
                (true, Some(pid)) => self.ack(pid, msg.qos, 0x87),
                _ => {
                    self.disconnect_v5(DisconnectReasonCode::NotAuthorized);
                    self.close = true;
                }
            }
            return;
        }
        // Over a retained quota: v5 QoS 1/2 is answered 0x97 (Quota exceeded) and not
        // accepted; otherwise (v3.1.1, QoS 0) the message is delivered but not retained.
        if msg.retain && !self.shared.retained_fits(&msg, &Owner::of(&principal)) {
            self.shared.counters.refuse(Refusal::RetainedQuota);
            tracing::debug!(client_id = %self.client_id, topic = %msg.topic, "retained message over quota");
            if let (true, Some(pid)) = (v5, pid) {
                self.ack(pid, msg.qos, 0x97);
                return;
            }
            msg.retain = false;
        }
        let hooks = self.shared.hooks.clone();
        let client_id = self.client_id.clone();
        pending.push_back(Box::pin(async move {
            let verdict = hooks.on_publish(&principal, &client_id, &msg).await;
            PendingPublish {
                packet_id: pid,
                msg,
                verdict,
            }
        }));
    }

    pub(super) fn finish_publish(&mut self, p: PendingPublish) {
        match p.verdict {
            PublishVerdict::Accept => {
                self.shared
                    .counters
                    .messages_in
                    .fetch_add(1, Ordering::Relaxed);
                let qos = p.msg.qos;
                // A retained quota filled up since the check at receipt: delivered, not retained.
                let owner = || Owner::of(&self.principal());
                let stored = self
                    .shared
                    .retain_and_route(Arc::new(p.msg), owner, &self.client_id);
                let Some(pid) = p.packet_id else {
                    if stored {
                        let wait = self.shared.barrier();
                        self.queue_deferred(AckKind::Flow, 0, 0, 0, wait);
                    }
                    self.pump();
                    return;
                };
                let mut ops = Vec::new();
                if qos == 2 {
                    // A persisted session remembers the id until PUBREL, durably with the
                    // message, so a resend after a restart is not routed twice.
                    if let Some(session) = &self.session {
                        let mut s = lock(session);
                        if s.persist_key().is_some() {
                            s.qos2_in.insert(pid);
                            ops.extend(self.shared.session_op(&s, false));
                        }
                    }
                }
                // Acknowledged only once durable (ops go after what routing submitted, so
                // their ticket covers that too).
                let wait = if !ops.is_empty() {
                    self.shared.durable(ops)
                } else if stored {
                    self.shared.barrier()
                } else {
                    None
                };
                self.queue_ack(pid, qos, 0, wait);
            }
            PublishVerdict::Reject(code) => {
                if let (ProtocolVersion::V5, Some(pid)) = (self.version, p.packet_id) {
                    self.queue_ack(pid, p.msg.qos, code, None);
                } else if let Some(pid) = p.packet_id {
                    // v3.1.1 cannot carry a failure: acknowledge so the client does not resend.
                    self.queue_ack(pid, p.msg.qos, 0, None);
                }
            }
            PublishVerdict::Failed(code) if self.version == ProtocolVersion::V5 => {
                if let Some(pid) = p.packet_id {
                    self.queue_ack(pid, p.msg.qos, code, None);
                }
            }
            PublishVerdict::Failed(_) if p.packet_id.is_none() => {}
            PublishVerdict::Failed(_) | PublishVerdict::Disconnect => {
                // No ack: the client resends after reconnecting (and that must be routed).
                if let (Some(pid), 2) = (p.packet_id, p.msg.qos) {
                    self.qos2_not_received(pid);
                }
                self.disconnect_v5(DisconnectReasonCode::ImplementationSpecificError);
                self.close = true;
                return;
            }
        }
        self.pump();
    }

    /// Send an ack now, or (if it must wait for durability, or earlier acks still wait) queue it:
    /// acks go out in the order the publishes were received.
    pub(super) fn queue_ack(&mut self, pid: u16, qos: u8, code: u8, wait: Option<Durable>) {
        self.queue_deferred(AckKind::Publish, pid, qos, code, wait);
    }

    /// Send `kind` for `pid` now, or queue it behind what still waits (see `acks`).
    pub(super) fn queue_deferred(
        &mut self,
        kind: AckKind,
        pid: u16,
        qos: u8,
        code: u8,
        wait: Option<Durable>,
    ) {
        let a = DeferredAck {
            kind,
            pid,
            qos,
            code,
            wait,
        };
        if a.wait.is_none() && self.acks.is_empty() {
            self.send_deferred(&a);
        } else {
            self.acks.push_back(a);
        }
    }

    pub(super) fn send_deferred(&mut self, a: &DeferredAck) {
        match a.kind {
            AckKind::Publish => self.ack(a.pid, a.qos, a.code),
            AckKind::Pubcomp => {
                let events = self.pubcomp(a.pid);
                self.apply(events);
            }
            AckKind::Pubrel => {
                let events = self.pubrel(a.pid);
                self.apply(events);
            }
            AckKind::Flow => {}
        }
    }

    /// The first deferred ack may go out (`durable`: what it waited for is stored). Not durable:
    /// v5 gets the ack with 0x80 (the client sends it again); v3.1.1 cannot carry a failure, and
    /// acknowledging would claim it is stored, so the connection is closed without it.
    /// Returns false if no ack may follow (the connection closes).
    pub(super) fn release_ack(&mut self, durable: bool) -> bool {
        let Some(a) = self.acks.pop_front() else {
            return true;
        };
        // A PUBCOMP / PUBREL whose state could not be stored goes out anyway: memory is right,
        // and holding it back would not store it later (the peer's repeat changes nothing).
        // QoS 0 (`Flow`) promised nothing.
        if durable || a.code != 0 || a.kind != AckKind::Publish {
            self.send_deferred(&a);
            return true;
        }
        if a.qos == 2 {
            self.qos2_not_received(a.pid);
        }
        if self.version == ProtocolVersion::V5 {
            self.ack(a.pid, a.qos, 0x80);
            true
        } else {
            // Closed without acks: the QoS 2 publishes still waiting behind this one are
            // resent too (whether or not they became durable, routing a resend again is a
            // duplicate at worst; answering it as one already received could lose it).
            for rest in std::mem::take(&mut self.acks) {
                if rest.kind == AckKind::Publish && rest.qos == 2 && rest.code == 0 {
                    self.qos2_not_received(rest.pid);
                }
            }
            self.close = true;
            false
        }
    }

    /// A QoS 2 PUBLISH under `pid` is not acknowledged as received (no PUBREC, or one with a
    /// failure code): the library took note of its id when it arrived, and the session when it
    /// was routed, but the client will send it again (a resend after reconnecting, or a new
    /// message under the same id), and that must be routed, not answered as a duplicate (which
    /// would acknowledge a message that is not stored). Rare (a failing store or embedder), so
    /// rebuilding the library's set is fine.
    pub(super) fn qos2_not_received(&mut self, pid: u16) {
        let mut handled = self.mqtt.get_qos2_publish_handled();
        if handled.remove(&pid) {
            self.mqtt.restore_qos2_publish_handled(handled);
        }
        if let Some(session) = &self.session {
            let mut s = lock(session);
            if s.qos2_in.remove(&pid) {
                if let Some(op) = self.shared.session_op(&s, false) {
                    self.shared.detach(vec![op]);
                }
            }
        }
    }

    /// PUBACK (QoS 1) or PUBREC (QoS 2) with a v5 reason code (ignored on v3.1.1).
    pub(super) fn ack(&mut self, pid: u16, qos: u8, code: u8) {
        let events = match (self.version, qos) {
            (ProtocolVersion::V311, 1) => match v3_1_1::Puback::builder().packet_id(pid).build() {
                Ok(p) => self.mqtt.send(p.into()),
                Err(_) => Vec::new(),
            },
            (ProtocolVersion::V311, _) => match v3_1_1::Pubrec::builder().packet_id(pid).build() {
                Ok(p) => self.mqtt.send(p.into()),
                Err(_) => Vec::new(),
            },
            (ProtocolVersion::V5, 1) => {
                let mut b = v5_0::Puback::builder().packet_id(pid);
                if code != 0 {
                    b = b.reason_code(
                        PubackReasonCode::try_from(code)
                            .unwrap_or(PubackReasonCode::UnspecifiedError),
                    );
                }
                match b.build() {
                    Ok(p) => self.mqtt.send(p.into()),
                    Err(_) => Vec::new(),
                }
            }
            (ProtocolVersion::V5, _) => {
                let mut b = v5_0::Pubrec::builder().packet_id(pid);
                if code != 0 {
                    b = b.reason_code(
                        PubrecReasonCode::try_from(code)
                            .unwrap_or(PubrecReasonCode::UnspecifiedError),
                    );
                }
                match b.build() {
                    Ok(p) => self.mqtt.send(p.into()),
                    Err(_) => Vec::new(),
                }
            }
        };
        self.apply(events);
    }
}
