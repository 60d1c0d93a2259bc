//! The driver: polling the socket, applying the library's events, the main loop, dispatching
//! received packets, and moving queued deliveries to the wire (`pump`).

use super::convert::{props_to_message_props, qos_u8};
use super::publish::{poll_front_ack, AckKind, PendingPublish};
use super::{BoxFut, Conn};
use crate::broker::{lock, Control, KickReason, Refusal};
use crate::hooks::{Message, MessageProps};
use crate::persist::packet_id_for;
use crate::session::{Inflight, InflightState, SubOptions};
use bytes::Bytes;
use futures::stream::{FuturesOrdered, StreamExt};
use mqtt_protocol_core::mqtt;
use mqtt_protocol_core::mqtt::common::Cursor;
use mqtt_protocol_core::mqtt::connection::{Event, TimerKind};
use mqtt_protocol_core::mqtt::packet::{v3_1_1, v5_0, GenericPacket, Property};
use mqtt_protocol_core::mqtt::prelude::*;
use mqtt_protocol_core::mqtt::result_code::{DisconnectReasonCode, MqttError, PubrecReasonCode};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use tokio::time::{Instant, Sleep};

/// Largest single read from the stream. The chunk is a stack array that exists only while a read
/// is being polled (see [`poll_read_chunk`]), so a connection waiting for input holds no read
/// buffer: idle connections are the common case for a device fleet.
pub(super) const READ_CHUNK_BYTES: usize = 8 * 1024;
/// Capacity the read and write buffers may keep once they are empty; a burst that grew one beyond
/// this gives the memory back instead of holding it while the connection idles.
pub(super) const IDLE_BUF_BYTES_MAX: usize = 1024;

/// One read from `stream`: up to [`READ_CHUNK_BYTES`] through a stack chunk, copied into `into`
/// (cleared first) only once bytes have arrived, so nothing is allocated while waiting.
pub(super) fn poll_read_chunk<S: AsyncRead + Unpin>(
    stream: &mut S,
    cx: &mut Context<'_>,
    into: &mut Vec<u8>,
) -> Poll<std::io::Result<usize>> {
    let mut chunk = [MaybeUninit::<u8>::uninit(); READ_CHUNK_BYTES];
    let mut rb = ReadBuf::uninit(&mut chunk);
    ready!(Pin::new(stream).poll_read(cx, &mut rb))?;
    let data = rb.filled();
    debug_assert!(data.len() <= READ_CHUNK_BYTES);
    into.clear();
    into.extend_from_slice(data);
    Poll::Ready(Ok(data.len()))
}

/// What one poll of the socket did.
pub(super) enum Io {
    Wrote(usize),
    Flushed,
    WriteFailed,
    Read(std::io::Result<usize>),
}

/// One poll of the stream in both directions: write `out` (or flush once it is written), and
/// read if `can_read`. Reading and writing are polled together so a peer that stops reading
/// never stops the connection from acting on its input, timers and control messages.
pub(super) fn poll_io<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    cx: &mut Context<'_>,
    out: &[u8],
    needs_flush: bool,
    can_read: bool,
    buf: &mut Vec<u8>,
) -> Poll<Io> {
    if !out.is_empty() {
        match Pin::new(&mut *stream).poll_write(cx, out) {
            Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(Io::WriteFailed),
            Poll::Ready(Ok(n)) => return Poll::Ready(Io::Wrote(n)),
            Poll::Pending => {}
        }
    } else if needs_flush {
        match Pin::new(&mut *stream).poll_flush(cx) {
            Poll::Ready(Ok(())) => return Poll::Ready(Io::Flushed),
            Poll::Ready(Err(_)) => return Poll::Ready(Io::WriteFailed),
            Poll::Pending => {}
        }
    }
    if can_read {
        if let Poll::Ready(r) = poll_read_chunk(stream, cx, buf) {
            return Poll::Ready(Io::Read(r));
        }
    }
    Poll::Pending
}

/// Empty `buf`, and give its allocation back if it grew past [`IDLE_BUF_BYTES_MAX`].
pub(super) fn clear_and_trim(buf: &mut Vec<u8>) {
    buf.clear();
    if buf.capacity() > IDLE_BUF_BYTES_MAX {
        *buf = Vec::new();
    }
}

impl<S> Conn<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    /// Apply the library's side-effect events; returns the received packets for dispatch.
    pub(super) fn apply(&mut self, events: Vec<Event>) -> Vec<GenericPacket<u16>> {
        let mut received = Vec::new();
        for ev in events {
            match ev {
                Event::RequestSendPacket { packet, .. } => {
                    self.out.extend_from_slice(&packet.to_continuous_buffer());
                }
                Event::RequestClose => self.close = true,
                Event::RequestTimerReset {
                    kind: TimerKind::PingreqRecv,
                    duration_ms,
                } => {
                    // Never longer than the server's own cap (a v3.1.1 client cannot be told).
                    let cap_ms = self.idle_cap_ms();
                    self.keepalive_ms = duration_ms.min(cap_ms);
                    self.keepalive = Some(Box::pin(tokio::time::sleep(Duration::from_millis(
                        self.keepalive_ms,
                    ))));
                }
                Event::RequestTimerReset { .. } => {}
                Event::RequestTimerCancel(TimerKind::PingreqRecv) => self.keepalive = None,
                Event::RequestTimerCancel(_) => {}
                Event::NotifyPacketIdReleased(pid) => {
                    if let Some(session) = &self.session {
                        let mut s = lock(session);
                        if let Some(pos) = s.inflight.iter().position(|i| i.packet_id == pid) {
                            if let Some(done) = s.inflight.remove(pos) {
                                self.forget(&s, done.delivery.seq);
                            }
                        }
                        s.notify.notify_one();
                    }
                }
                Event::NotifyError(e) => {
                    tracing::debug!(client_id = %self.client_id, error = ?e, "mqtt protocol error");
                    if e == MqttError::UnsupportedProtocolVersion {
                        // v3.1.1 §3.2.2.3: CONNACK 0x01 for an unsupported protocol level.
                        self.out.extend_from_slice(&[0x20, 0x02, 0x00, 0x01]);
                        self.close = true;
                    }
                }
                Event::NotifyPacketReceived(p) => received.push(p),
            }
        }
        received
    }

    /// Move queued deliveries to the wire while the inflight window has room (in order).
    pub(super) fn pump(&mut self) {
        let Some(session) = self.session.clone() else {
            return;
        };
        // Resends after a resume first (their packet ids are registered already).
        while self.out.len() < self.shared.config.write_buffer_bytes_max {
            let Some(i) = self.resend.pop_front() else {
                break;
            };
            let events = match i.state {
                InflightState::AwaitAck => {
                    match self.build_publish(&i.delivery, Some(i.packet_id), true) {
                        Some(p) => self.mqtt.send(p),
                        None => continue,
                    }
                }
                InflightState::AwaitComp => self.pubrel(i.packet_id),
            };
            self.apply(events);
        }
        if !self.resend.is_empty() {
            return;
        }
        loop {
            // The write buffer holds at most about `write_buffer_bytes_max`: the rest waits in
            // the bounded session queue (where QoS 0 is dropped first) until the socket drains.
            if self.out.len() >= self.shared.config.write_buffer_bytes_max {
                return;
            }
            let d = {
                let mut s = lock(&session);
                let Some(front) = s.queue.front() else { return };
                if front.expires_at.is_some_and(|at| at <= Instant::now()) {
                    if let Some(d) = s.pop_front() {
                        self.forget(&s, d.seq);
                    }
                    self.shared.counters.dropped.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                if front.qos > 0 && s.inflight.len() >= self.send_window {
                    return;
                }
                match s.pop_front() {
                    Some(d) => d,
                    None => return,
                }
            };
            // A stored message goes out under the packet id its `seq` gives (the same after a
            // restart, so a QoS 2 receiver recognises a message it already has); otherwise, or
            // if that id is in use, any free one (then stored with the message).
            let stable = d.seq != 0 && self.mqtt.register_packet_id(packet_id_for(d.seq)).is_ok();
            let pid = if stable {
                Some(packet_id_for(d.seq))
            } else if d.qos > 0 {
                match self.mqtt.acquire_packet_id() {
                    Ok(pid) => Some(pid),
                    Err(_) => {
                        lock(&session).push_front(d);
                        return;
                    }
                }
            } else {
                None
            };
            let Some(packet) = self.build_publish(&d, pid, false) else {
                if let Some(pid) = pid {
                    let _ = self.mqtt.release_packet_id(pid);
                }
                continue;
            };
            if packet.size() > self.client_packet_size_max as usize {
                // v5 §3.1.2.11.4: a message too large for the client is discarded.
                if let Some(pid) = pid {
                    let _ = self.mqtt.release_packet_id(pid);
                }
                self.forget(&lock(&session), d.seq);
                self.shared.counters.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if let Some(pid) = pid {
                let mut s = lock(&session);
                if d.seq != 0 && !stable {
                    if let Some(key) = s.persist_key() {
                        let op =
                            self.shared
                                .put_message(key, &d, Some((InflightState::AwaitAck, pid)));
                        self.shared.detach(vec![op]);
                    }
                }
                s.inflight.push_back(Inflight {
                    packet_id: pid,
                    delivery: d.clone(),
                    state: InflightState::AwaitAck,
                });
            }
            let events = self.mqtt.send(packet);
            self.shared
                .counters
                .messages_out
                .fetch_add(1, Ordering::Relaxed);
            self.apply(events);
        }
    }

    pub(super) async fn main_loop(&mut self, control_rx: &mut mpsc::Receiver<Control>) {
        let Some(session) = self.session.clone() else {
            return;
        };
        let notify = lock(&session).notify.clone();
        let mut pending: FuturesOrdered<BoxFut<PendingPublish>> = FuturesOrdered::new();
        let pending_max = usize::from(self.shared.config.inflight_max.max(1));
        let write_stall = Duration::from_millis(self.shared.config.write_stall_timeout_ms);
        // Reading stops while this much output waits (a peer that sends but does not read
        // cannot grow the write buffer with acks and ping responses).
        let read_pause_bytes = self.shared.config.write_buffer_bytes_max.saturating_mul(2);
        // Armed while output waits for the socket; re-armed on every byte it accepts.
        let mut stall: Option<Pin<Box<Sleep>>> = None;
        let mut stalled = false;
        // Filled by a completed read only; emptied (and trimmed) once processed.
        let mut buf: Vec<u8> = Vec::new();
        let leftover = std::mem::take(&mut self.leftover);
        if !leftover.is_empty() {
            self.process_input(&leftover, &mut pending);
        }
        drop(leftover);
        loop {
            if self.close {
                break;
            }
            let want_write = !self.out.is_empty() || self.needs_flush;
            if !want_write {
                stall = None;
            } else if stall.is_none() {
                stall = Some(Box::pin(tokio::time::sleep(write_stall)));
            }
            let can_read = pending.len() + self.acks.len() < pending_max
                && self.out.len() < read_pause_bytes
                && self.session_write.is_none();
            let keepalive = async {
                match self.keepalive.as_mut() {
                    Some(s) => s.await,
                    None => std::future::pending().await,
                }
            };
            let stall_timer = async {
                match stall.as_mut() {
                    Some(s) => s.await,
                    None => std::future::pending().await,
                }
            };
            enum Step {
                Control(Option<Control>),
                Keepalive,
                Stalled,
                Done(Option<PendingPublish>),
                Durable(bool),
                SessionStored,
                Notified,
                Io(Io),
            }
            let out = &self.out;
            let needs_flush = self.needs_flush;
            let stream = &mut self.stream;
            let acks = &mut self.acks;
            let acks_waiting = !acks.is_empty();
            let session_write = &mut self.session_write;
            let session_writing = session_write.is_some();
            let step = tokio::select! {
                biased;
                c = control_rx.recv() => Step::Control(c),
                () = keepalive => Step::Keepalive,
                () = stall_timer => Step::Stalled,
                done = pending.next(), if !pending.is_empty() => Step::Done(done),
                durable = std::future::poll_fn(|cx| poll_front_ack(acks, cx)), if acks_waiting => Step::Durable(durable),
                _ = std::future::poll_fn(|cx| match session_write.as_mut() {
                    Some(w) => w.as_mut().poll(cx),
                    None => Poll::Pending,
                }), if session_writing => Step::SessionStored,
                () = notify.notified() => Step::Notified,
                io = std::future::poll_fn(|cx| poll_io(stream, cx, out, needs_flush, can_read, &mut buf)),
                    if want_write || can_read => Step::Io(io),
            };
            match step {
                // Every sender is gone (the session has another link now): nobody can steer this
                // connection any more, and a closed channel would be ready on every turn.
                Step::Control(None) => self.close = true,
                Step::Control(Some(c)) => {
                    let code = match c {
                        Control::TakenOver | Control::Kick(KickReason::SessionTakenOver) => {
                            DisconnectReasonCode::SessionTakenOver
                        }
                        Control::Kick(KickReason::NotAuthorized) => {
                            DisconnectReasonCode::NotAuthorized
                        }
                        Control::Kick(KickReason::AdministrativeAction) => {
                            DisconnectReasonCode::AdministrativeAction
                        }
                        Control::Removed => {
                            // The principal is gone: its will must not fire.
                            lock(&self.record).will = None;
                            DisconnectReasonCode::AdministrativeAction
                        }
                        Control::Shutdown => DisconnectReasonCode::ServerShuttingDown,
                    };
                    self.disconnect_v5(code);
                    self.close = true;
                }
                Step::Keepalive => {
                    self.keepalive = None;
                    self.shared.counters.refuse(Refusal::KeepaliveTimeout);
                    tracing::debug!(client_id = %self.client_id, "keepalive expired");
                    let events = self.mqtt.notify_timer_fired(TimerKind::PingreqRecv);
                    self.apply(events);
                    self.close = true;
                }
                Step::Stalled => {
                    self.shared.counters.refuse(Refusal::WriteStalled);
                    tracing::info!(
                        client_id = %self.client_id,
                        waiting_bytes = self.out.len(),
                        "closing a connection that stopped reading"
                    );
                    stalled = true;
                    break;
                }
                Step::Done(None) => {}
                Step::Done(Some(p)) => self.finish_publish(p),
                Step::Durable(durable) => {
                    self.release_ack(durable);
                }
                // Stored or not (a failing store), reading goes on: the next write carries
                // the session as it is then.
                Step::SessionStored => self.session_write = None,
                Step::Notified => self.pump(),
                Step::Io(Io::WriteFailed) => break,
                Step::Io(Io::Wrote(n)) => {
                    if !can_read && self.keepalive.is_some() && self.keepalive_ms > 0 {
                        // Reading is paused while output waits, so PINGREQs cannot be seen: a
                        // peer that takes our bytes is alive (the write-stall timer supervises).
                        self.keepalive = Some(Box::pin(tokio::time::sleep(Duration::from_millis(
                            self.keepalive_ms,
                        ))));
                    }
                    self.out.drain(..n.min(self.out.len()));
                    self.needs_flush = true;
                    stall = None;
                    if self.out.is_empty() {
                        clear_and_trim(&mut self.out);
                    }
                    self.pump();
                }
                Step::Io(Io::Flushed) => {
                    self.needs_flush = false;
                    stall = None;
                }
                Step::Io(Io::Read(Err(_))) | Step::Io(Io::Read(Ok(0))) => break,
                Step::Io(Io::Read(Ok(n))) => {
                    let got_packet = self.process_input(&buf[..n], &mut pending);
                    clear_and_trim(&mut buf);
                    // Only a whole packet counts as a sign of life (a trickled partial packet
                    // must not keep a keep-alive 0 connection open).
                    if got_packet && self.self_supervised {
                        self.keepalive = Some(Box::pin(tokio::time::sleep(Duration::from_millis(
                            self.keepalive_ms,
                        ))));
                    }
                }
            }
        }
        // PUBLISHes fully received before the end (e.g. right before DISCONNECT) are still
        // authorized and routed; their acks are written if the stream still takes them, within
        // `close_flush_timeout_ms` (a takeover never waits on a peer that stopped reading).
        while let Some(p) = pending.next().await {
            self.finish_publish(p);
        }
        let limit = Duration::from_millis(self.shared.config.close_flush_timeout_ms);
        let acks = async {
            while !self.acks.is_empty() {
                let durable = std::future::poll_fn(|cx| poll_front_ack(&mut self.acks, cx)).await;
                if !self.release_ack(durable) {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(limit, acks).await;
        if !stalled {
            let limit = Duration::from_millis(self.shared.config.close_flush_timeout_ms);
            let _ = self.flush_within(limit).await;
        }
    }

    /// Feeds received bytes to the protocol state machine and dispatches every complete packet;
    /// returns whether there was one.
    pub(super) fn process_input(
        &mut self,
        data: &[u8],
        pending: &mut FuturesOrdered<BoxFut<PendingPublish>>,
    ) -> bool {
        if !self.packet_ids.feed(data) {
            self.shared.counters.refuse(Refusal::MalformedPacket);
            tracing::debug!(client_id = %self.client_id, "packet id 0 where one is required; closing");
            self.disconnect_v5(DisconnectReasonCode::MalformedPacket);
            self.close = true;
            return false;
        }
        let mut got_packet = false;
        let mut cur = Cursor::new(data);
        while (cur.position() as usize) < data.len() && !self.close {
            let events = self.mqtt.recv(&mut cur);
            for p in self.apply(events) {
                got_packet = true;
                self.dispatch(p, pending);
                if self.close {
                    break;
                }
            }
        }
        self.write_session();
        self.pump();
        got_packet
    }

    /// Write the session's value if SUBSCRIBE / UNSUBSCRIBE changed it. Each write is the whole
    /// value (up to `subscriptions_per_session_max` filters), so one per packet would let a
    /// client flooding SUBSCRIBEs (a few bytes each) queue copies for the store without bound:
    /// one per processed read, and no reading until it is durable, keeps a connection to one
    /// value in the queue at a time.
    pub(super) fn write_session(&mut self) {
        if !std::mem::take(&mut self.session_dirty) {
            return;
        }
        let Some(session) = &self.session else {
            return;
        };
        let op = self.shared.session_op(&lock(session), false);
        if let Some(w) = self.shared.durable(op.into_iter().collect()) {
            self.session_write = Some(w);
        }
    }

    pub(super) fn dispatch(
        &mut self,
        p: GenericPacket<u16>,
        pending: &mut FuturesOrdered<BoxFut<PendingPublish>>,
    ) {
        match p {
            GenericPacket::V3_1_1Publish(p) => {
                let msg = Message {
                    topic: p.topic_name().to_string(),
                    payload: Bytes::copy_from_slice(p.payload().as_slice()),
                    qos: qos_u8(p.qos()),
                    retain: p.retain(),
                    props: MessageProps::default(),
                };
                self.inbound_publish(msg, p.packet_id(), pending);
            }
            GenericPacket::V5_0Publish(p) => {
                let msg = Message {
                    topic: p.topic_name().to_string(),
                    payload: Bytes::copy_from_slice(p.payload().as_slice()),
                    qos: qos_u8(p.qos()),
                    retain: p.retain(),
                    props: props_to_message_props(p.props()),
                };
                self.inbound_publish(msg, p.packet_id(), pending);
            }
            GenericPacket::V3_1_1Pubrec(p) => self.outbound_pubrec(p.packet_id()),
            GenericPacket::V5_0Pubrec(p)
                if p.reason_code().is_none_or(|rc| {
                    rc == PubrecReasonCode::Success || rc == PubrecReasonCode::NoMatchingSubscribers
                }) =>
            {
                self.outbound_pubrec(p.packet_id());
            }
            GenericPacket::V3_1_1Pubrel(p) => {
                let wait = self.inbound_qos2_released(p.packet_id());
                self.queue_deferred(AckKind::Pubcomp, p.packet_id(), 2, 0, wait);
            }
            GenericPacket::V5_0Pubrel(p) => {
                let wait = self.inbound_qos2_released(p.packet_id());
                self.queue_deferred(AckKind::Pubcomp, p.packet_id(), 2, 0, wait);
            }
            GenericPacket::V3_1_1Subscribe(p) => {
                let entries: Vec<(String, SubOptions, u8)> = p
                    .entries()
                    .iter()
                    .map(|e| {
                        let qos = qos_u8(e.sub_opts().qos());
                        (
                            e.topic_filter().to_string(),
                            SubOptions {
                                qos,
                                ..Default::default()
                            },
                            0,
                        )
                    })
                    .collect();
                self.subscribe(p.packet_id(), entries);
            }
            GenericPacket::V5_0Subscribe(p) => {
                let sub_id = p.props().iter().find_map(|prop| match prop {
                    Property::SubscriptionIdentifier(v) => Some(v.val()),
                    _ => None,
                });
                let entries: Vec<(String, SubOptions, u8)> = p
                    .entries()
                    .iter()
                    .map(|e| {
                        let o = e.sub_opts();
                        let rh = match o.rh() {
                            mqtt::packet::RetainHandling::SendRetained => 0,
                            mqtt::packet::RetainHandling::SendRetainedIfNotExists => 1,
                            mqtt::packet::RetainHandling::DoNotSendRetained => 2,
                        };
                        let opts = SubOptions {
                            qos: qos_u8(o.qos()),
                            no_local: o.nl(),
                            retain_as_published: o.rap(),
                            sub_id,
                        };
                        (e.topic_filter().to_string(), opts, rh)
                    })
                    .collect();
                self.subscribe(p.packet_id(), entries);
            }
            GenericPacket::V3_1_1Unsubscribe(p) => {
                let filters: Vec<String> =
                    p.entries().iter().map(|e| e.as_str().to_string()).collect();
                self.unsubscribe(p.packet_id(), filters);
            }
            GenericPacket::V5_0Unsubscribe(p) => {
                let filters: Vec<String> =
                    p.entries().iter().map(|e| e.as_str().to_string()).collect();
                self.unsubscribe(p.packet_id(), filters);
            }
            GenericPacket::V3_1_1Pingreq(_) => {
                let events = self.mqtt.send(v3_1_1::Pingresp::new().into());
                self.apply(events);
            }
            GenericPacket::V5_0Pingreq(_) => {
                let events = self.mqtt.send(v5_0::Pingresp::new().into());
                self.apply(events);
            }
            GenericPacket::V3_1_1Disconnect(_) => {
                lock(&self.record).clean_disconnect = true;
                self.close = true;
            }
            GenericPacket::V5_0Disconnect(p) => {
                let rc = p.reason_code();
                let with_will = rc == Some(DisconnectReasonCode::DisconnectWithWillMessage);
                lock(&self.record).clean_disconnect = !with_will;
                // v5 §3.14.2.2.2: the client may change Session Expiry at DISCONNECT (not from 0).
                for prop in p.props().iter().flatten() {
                    if let Property::SessionExpiryInterval(v) = prop {
                        if let Some(session) = &self.session {
                            let mut s = lock(session);
                            if s.expiry_secs != 0 {
                                s.expiry_secs =
                                    v.val().min(self.shared.config.session_expiry_secs_max);
                            }
                        }
                    }
                }
                self.close = true;
            }
            // PUBACK / PUBCOMP are fully handled through NotifyPacketIdReleased.
            _ => {}
        }
    }
}
