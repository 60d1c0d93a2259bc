//! One client connection: the tokio driver around the sans-IO `mqtt-protocol-core` server state machine.

use crate::broker::{lock, Control, Namespace, Owner, Refusal, SessionKey, Shared};
use crate::hooks::{
    Authenticated, ConnInfo, ConnectRefusal, ConnectRequest, Message, MessageProps,
    ProtocolVersion, PublishVerdict,
};
use crate::persist::{packet_id_for, Durable, StateOp, StoredWill};
use crate::session::{Delivery, Inflight, InflightState, Link, Session, SubOptions};
use bytes::Bytes;
use futures::stream::{FuturesOrdered, StreamExt};
use mooring_proto::policy::Principal;
use mooring_proto::topic::{
    is_shared_filter, is_valid_filter, is_valid_topic_name, parse_shared_filter,
};
use mqtt_protocol_core::mqtt;
use mqtt_protocol_core::mqtt::common::Cursor;
use mqtt_protocol_core::mqtt::connection::{ConnectionOptions, Event, TimerKind};
use mqtt_protocol_core::mqtt::packet::{v3_1_1, v5_0, GenericPacket, Property, Qos};
use mqtt_protocol_core::mqtt::prelude::*;
use mqtt_protocol_core::mqtt::result_code::{
    ConnectReasonCode, ConnectReturnCode, DisconnectReasonCode, MqttError, PubackReasonCode,
    PubrecReasonCode, SubackReasonCode, SubackReturnCode, UnsubackReasonCode,
};
use std::future::Future;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, Sleep};

type Server = mqtt::Connection<mqtt::role::Server>;
type BoxFut<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Largest single read from the stream. The chunk is a stack array that exists only while a read
/// is being polled (see [`poll_read_chunk`]), so a connection waiting for input holds no read
/// buffer: idle connections are the common case for a device fleet.
const READ_CHUNK_BYTES: usize = 8 * 1024;
/// Capacity the read and write buffers may keep once they are empty; a burst that grew one beyond
/// this gives the memory back instead of holding it while the connection idles.
const IDLE_BUF_BYTES_MAX: usize = 1024;

/// One read from `stream`: up to [`READ_CHUNK_BYTES`] through a stack chunk, copied into `into`
/// (cleared first) only once bytes have arrived, so nothing is allocated while waiting.
fn poll_read_chunk<S: AsyncRead + Unpin>(
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
enum Io {
    Wrote(usize),
    Flushed,
    WriteFailed,
    Read(std::io::Result<usize>),
}

/// One poll of the stream in both directions: write `out` (or flush once it is written), and
/// read if `can_read`. Reading and writing are polled together so a peer that stops reading
/// never stops the connection from acting on its input, timers and control messages.
fn poll_io<S: AsyncRead + AsyncWrite + Unpin>(
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
fn clear_and_trim(buf: &mut Vec<u8>) {
    buf.clear();
    if buf.capacity() > IDLE_BUF_BYTES_MAX {
        *buf = Vec::new();
    }
}

/// A will as accepted at CONNECT.
#[derive(Clone)]
struct Will {
    msg: Message,
    delay_secs: u32,
}

/// What cleanup needs to know, written by the protocol task as it goes (so it survives a panic).
#[derive(Default)]
struct ConnRecord {
    /// The session's key in the table (namespace + client id).
    key: Option<SessionKey>,
    principal: Option<Principal>,
    session: Option<Arc<Mutex<Session>>>,
    will: Option<Will>,
    /// Normal DISCONNECT received (will suppressed), unless it was v5 0x04.
    clean_disconnect: bool,
    connected: bool,
    qos2_in: Option<std::collections::HashSet<u16>>,
}

/// Entry point from [`crate::Broker::serve_connection`].
pub(crate) async fn serve<S>(shared: Arc<Shared>, stream: S, info: ConnInfo)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    if shared.shutting_down.load(Ordering::SeqCst) {
        return;
    }
    shared.counters.connections.fetch_add(1, Ordering::SeqCst);
    let conn_id = shared.conn_seq.fetch_add(1, Ordering::Relaxed);
    let record = Arc::new(Mutex::new(ConnRecord::default()));
    let (done_tx, done_rx) = watch::channel(());
    let (control_tx, control_rx) = mpsc::channel(4);
    let task = tokio::spawn(run(
        shared.clone(),
        stream,
        info,
        conn_id,
        record.clone(),
        Link {
            conn_id,
            control: control_tx,
            done: done_rx,
        },
        control_rx,
    ));
    if let Err(e) = task.await {
        if e.is_panic() {
            shared.counters.panics.fetch_add(1, Ordering::Relaxed);
            tracing::error!(conn_id, "connection task panicked; connection closed");
        }
    }
    cleanup(&shared, conn_id, &record).await;
    drop(done_tx);
    shared.counters.connections.fetch_sub(1, Ordering::SeqCst);
    shared.conn_ended.notify_waiters();
}

async fn cleanup(shared: &Arc<Shared>, conn_id: u64, record: &Mutex<ConnRecord>) {
    let (session, will, clean, connected, key, principal, qos2_in) = {
        let mut r = lock(record);
        (
            r.session.take(),
            r.will.take(),
            r.clean_disconnect,
            r.connected,
            r.key.clone(),
            r.principal.clone(),
            r.qos2_in.take(),
        )
    };
    let (Some(key), Some(principal)) = (key, principal) else {
        return;
    };
    let client_id = key.1.clone();
    // Authorize what happens now (the will) against the principal as it is now.
    let (principal_now, removed) = session.as_ref().map_or_else(
        || (principal.clone(), false),
        |s| {
            let s = lock(s);
            ((*s.principal).clone(), s.removed)
        },
    );
    let mut session_expiry_secs = 0;
    if let Some(session) = &session {
        let mut s = lock(session);
        if s.link.as_ref().map(|l| l.conn_id) == Some(conn_id) {
            s.link = None;
            if let Some(q) = qos2_in {
                s.qos2_in = q;
            }
            // QoS 0 messages are not kept for an offline session.
            s.drop_qos0();
            session_expiry_secs = s.expiry_secs;
            // A will whose delay now runs is stored with its deadline (it fires after a restart
            // too); any other is forgotten (published below, or suppressed).
            s.will = will
                .as_ref()
                .filter(|_| !clean && !removed && s.persist.is_some())
                .map(|w| (w, w.delay_secs.min(session_expiry_secs)))
                .filter(|(_, delay)| *delay > 0)
                .map(|(w, delay)| {
                    Box::new(StoredWill {
                        msg: w.msg.clone(),
                        delay_secs: delay,
                        fire_at_ms: shared.now_ms().saturating_add(u64::from(delay) * 1000),
                    })
                });
            if session_expiry_secs != 0 {
                // Stored with its deadline, so its expiry keeps running while the server is down.
                s.offline_until_ms = shared.deadline_from_now(&s);
                if let Some(op) = shared.session_op(&s, true) {
                    shared.detach(vec![op]);
                }
            }
            let generation = s.generation;
            drop(s);
            if session_expiry_secs == 0 {
                let mut table = lock(&shared.sessions);
                if table.remove_if_same(&key, session) {
                    shared.retire(&mut lock(session));
                }
                drop(table);
                shared.redeliver_shared(session);
            } else if session_expiry_secs != u32::MAX {
                shared.expire_after(
                    session.clone(),
                    key.clone(),
                    generation,
                    Duration::from_secs(u64::from(session_expiry_secs)),
                );
            }
            if session_expiry_secs != 0 {
                // A persistent member's messages may move to an online member of its groups.
                shared.redeliver_shared(session);
            }
        }
    }
    // The will is checked against the principal as it is now (its tags may have changed since
    // CONNECT) when it fires.
    let will = will
        .filter(|_| !clean && !removed)
        .filter(|w| shared.hooks.may_publish(&principal_now, &w.msg.topic));
    if let Some(will) = will {
        let delay_secs = will.delay_secs.min(session_expiry_secs);
        match (delay_secs, &session) {
            (0, _) | (_, None) => {
                shared
                    .publish_as(&principal_now, &client_id, will.msg)
                    .await
            }
            (delay, Some(session)) => {
                let generation = lock(session).generation;
                shared.will_after(
                    session.clone(),
                    generation,
                    client_id.clone(),
                    will.msg,
                    Duration::from_secs(u64::from(delay)),
                );
            }
        }
    }
    if connected {
        shared.hooks.on_disconnected(&client_id, &principal);
    }
}

/// How the protocol loop ended.
enum End {
    Closed,
}

struct Conn<S> {
    shared: Arc<Shared>,
    stream: S,
    mqtt: Server,
    out: Vec<u8>,
    close: bool,
    keepalive: Option<Pin<Box<Sleep>>>,
    version: ProtocolVersion,
    record: Arc<Mutex<ConnRecord>>,
    // Set after CONNECT:
    client_id: String,
    /// The principal attached at CONNECT; once a session is attached, `Conn::principal` reads
    /// the session's (which the embedder may replace).
    principal: Arc<Principal>,
    /// Idle supervision the client did not ask for (keepalive 0): the server re-arms the
    /// keep-alive timer (`keepalive_ms`) itself on every whole packet received.
    self_supervised: bool,
    /// Bytes written to the stream since the last flush.
    needs_flush: bool,
    /// Unacknowledged messages of a resumed session still to be resent (see `pump`).
    resend: std::collections::VecDeque<Inflight>,
    /// The keep-alive timeout last armed, to re-arm it while reading is paused (see main loop).
    keepalive_ms: u64,
    /// Zero packet ids are refused before the protocol library sees them (see `packet_ids`).
    packet_ids: crate::packet_ids::PacketIdCheck,
    session: Option<Arc<Mutex<Session>>>,
    /// Client's Receive Maximum (v5) bounded by our inflight_max.
    send_window: usize,
    /// Client's Maximum Packet Size (v5).
    client_packet_size_max: u32,
    /// Bytes read together with CONNECT, not yet processed.
    leftover: Vec<u8>,
    /// Acks of accepted publishes, in order, each waiting (if it must) until what the publish
    /// queued for persisted sessions is durable; likewise PUBCOMP and PUBREL, which wait until
    /// the QoS 2 state they end is durable. Sent in order: one still waiting holds back the
    /// ones behind it.
    acks: std::collections::VecDeque<DeferredAck>,
    /// SUBSCRIBE / UNSUBSCRIBE changed a persisted session: its value is written once after
    /// the input at hand is processed (not once per packet; see `write_session`).
    session_dirty: bool,
    /// That write, until it is durable; reading waits for it.
    session_write: Option<Durable>,
}

/// What a [`DeferredAck`] sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AckKind {
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
struct DeferredAck {
    kind: AckKind,
    pid: u16,
    qos: u8,
    /// v5 reason code.
    code: u8,
    wait: Option<Durable>,
}

/// Ready when the first deferred ack may go out: `Some(durable)` for it.
fn poll_front_ack(
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

struct PendingPublish {
    packet_id: Option<u16>,
    msg: Message,
    verdict: PublishVerdict,
}

#[allow(clippy::too_many_arguments)]
async fn run<S>(
    shared: Arc<Shared>,
    stream: S,
    info: ConnInfo,
    conn_id: u64,
    record: Arc<Mutex<ConnRecord>>,
    link: Link,
    mut control_rx: mpsc::Receiver<Control>,
) -> End
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // No receive maximum here: the library would enforce it on v3.1.1 clients too, which have
    // no such limit (they are slowed down by not reading their socket while `inflight_max`
    // publishes are pending). v5 clients are told Receive Maximum in CONNACK, which is also what
    // makes the library hold them to it.
    let opts =
        ConnectionOptions::new().maximum_packet_size_recv(shared.config.packet_size_bytes_max);
    let mut mqtt = Server::with_options(mqtt::Version::Undetermined, opts);
    // v5 clients that advertise a Topic Alias Maximum get aliases for the topics we send them
    // (least recently used alias reused once all are taken).
    mqtt.set_auto_map_topic_alias_send(true);
    let mut c = Conn {
        shared: shared.clone(),
        stream,
        mqtt,
        out: Vec::new(),
        close: false,
        keepalive: None,
        version: ProtocolVersion::V311,
        record,
        client_id: String::new(),
        principal: Arc::new(Principal::Dev),
        self_supervised: false,
        needs_flush: false,
        resend: std::collections::VecDeque::new(),
        keepalive_ms: 0,
        packet_ids: Default::default(),
        session: None,
        send_window: 0,
        client_packet_size_max: u32::MAX,
        leftover: Vec::new(),
        acks: std::collections::VecDeque::new(),
        session_dirty: false,
        session_write: None,
    };
    // The CONNECT phase (its packet, the authentication call, `info`) lives in its own heap
    // future, freed once the session is attached, so an idle connection's task keeps none of it.
    let connect_timeout = Duration::from_millis(shared.config.connect_timeout_ms);
    let conn = &mut c;
    let attached = Box::pin(async move {
        let connect = match tokio::time::timeout(connect_timeout, conn.read_connect()).await {
            Ok(Some(p)) => p,
            _ => return false,
        };
        conn.handle_connect(connect, &info, conn_id, link).await
    })
    .await;
    let close_flush = Duration::from_millis(shared.config.close_flush_timeout_ms);
    if !attached {
        let _ = c.flush_within(close_flush).await;
        return End::Closed;
    }
    // The CONNACK and any resent messages go out from the main loop, which keeps acting on
    // control messages (takeover, kick, shutdown) while the socket is slow.
    c.main_loop(&mut control_rx).await;
    End::Closed
}

fn qos_u8(q: Qos) -> u8 {
    match q {
        Qos::AtMostOnce => 0,
        Qos::AtLeastOnce => 1,
        Qos::ExactlyOnce => 2,
    }
}

fn qos_of(q: u8) -> Qos {
    match q {
        0 => Qos::AtMostOnce,
        1 => Qos::AtLeastOnce,
        _ => Qos::ExactlyOnce,
    }
}

fn props_to_message_props(props: &[Property]) -> MessageProps {
    let mut m = MessageProps::default();
    for p in props {
        match p {
            Property::PayloadFormatIndicator(v) => m.payload_utf8 = v.val() == 1,
            Property::MessageExpiryInterval(v) => m.message_expiry_secs = Some(v.val()),
            Property::ContentType(v) => m.content_type = Some(v.val().to_string()),
            Property::ResponseTopic(v) => m.response_topic = Some(v.val().to_string()),
            Property::CorrelationData(v) => {
                m.correlation_data = Some(Bytes::copy_from_slice(v.val()))
            }
            Property::UserProperty(v) => m
                .user_properties
                .push((v.key().to_string(), v.val().to_string())),
            _ => {}
        }
    }
    m
}

fn message_props_to_props(m: &MessageProps, expiry_secs: Option<u32>) -> Vec<Property> {
    let mut v: Vec<Property> = Vec::new();
    if m.payload_utf8 {
        if let Ok(p) =
            mqtt::packet::PayloadFormatIndicator::new(mqtt::packet::PayloadFormat::String)
        {
            v.push(p.into());
        }
    }
    if let Some(e) = expiry_secs {
        if let Ok(p) = mqtt::packet::MessageExpiryInterval::new(e) {
            v.push(p.into());
        }
    }
    if let Some(ct) = &m.content_type {
        if let Ok(p) = mqtt::packet::ContentType::new(ct.as_str()) {
            v.push(p.into());
        }
    }
    if let Some(rt) = &m.response_topic {
        if let Ok(p) = mqtt::packet::ResponseTopic::new(rt.as_str()) {
            v.push(p.into());
        }
    }
    if let Some(cd) = &m.correlation_data {
        if let Ok(p) = mqtt::packet::CorrelationData::new(cd.to_vec()) {
            v.push(p.into());
        }
    }
    for (k, val) in &m.user_properties {
        if let Ok(p) = mqtt::packet::UserProperty::new(k.as_str(), val.as_str()) {
            v.push(p.into());
        }
    }
    v
}

enum ConnectPacket {
    V3(v3_1_1::Connect),
    V5(v5_0::Connect),
}

impl<S> Conn<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    /// Write and flush everything buffered, within `limit`; an error if the stream failed or
    /// did not take it in time (a peer that stopped reading).
    async fn flush_within(&mut self, limit: Duration) -> std::io::Result<()> {
        let write = async {
            if !self.out.is_empty() {
                self.stream.write_all(&self.out).await?;
                clear_and_trim(&mut self.out);
            }
            self.stream.flush().await
        };
        match tokio::time::timeout(limit, write).await {
            Ok(r) => r,
            Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
        }
    }

    /// The session's principal as it is now (the embedder may have replaced it since CONNECT,
    /// e.g. new tags): every authorization uses this.
    fn principal(&self) -> Arc<Principal> {
        self.session
            .as_ref()
            .map_or_else(|| self.principal.clone(), |s| lock(s).principal.clone())
    }

    /// Apply the library's side-effect events; returns the received packets for dispatch.
    fn apply(&mut self, events: Vec<Event>) -> Vec<GenericPacket<u16>> {
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

    /// The longest a connection may stay silent: 1.5 × `keepalive_secs_max`.
    fn idle_cap_ms(&self) -> u64 {
        u64::from(self.shared.config.keepalive_secs_max.max(1)) * 1500
    }

    async fn read_connect(&mut self) -> Option<ConnectPacket> {
        use crate::connect_fixup::{first_packet, without_zero_topic_alias_maximum, First};
        let mut buf = Vec::new();
        // The CONNECT is collected whole first (see `connect_fixup`); anything that is not a
        // CONNECT the broker accepts goes to the library as it arrives (`unchecked`).
        let mut pending = Vec::new();
        let mut unchecked = false;
        loop {
            let n = std::future::poll_fn(|cx| poll_read_chunk(&mut self.stream, cx, &mut buf))
                .await
                .ok()?;
            if n == 0 {
                return None;
            }
            if !unchecked {
                pending.extend_from_slice(&buf[..n]);
                match first_packet(&pending, self.shared.config.packet_size_bytes_max) {
                    First::Incomplete => continue,
                    First::Complete(len) => {
                        let rest = pending.split_off(len);
                        buf = without_zero_topic_alias_maximum(&pending).unwrap_or(pending);
                        buf.extend_from_slice(&rest);
                    }
                    First::Unchecked => buf = pending,
                }
                pending = Vec::new();
                unchecked = true;
            }
            let n = buf.len();
            let mut cur = Cursor::new(&buf[..n]);
            while (cur.position() as usize) < n {
                let events = self.mqtt.recv(&mut cur);
                let first = self.apply(events).into_iter().next();
                let connect = match first {
                    Some(GenericPacket::V3_1_1Connect(p)) => {
                        self.version = ProtocolVersion::V311;
                        ConnectPacket::V3(p)
                    }
                    Some(GenericPacket::V5_0Connect(p)) => {
                        self.version = ProtocolVersion::V5;
                        ConnectPacket::V5(p)
                    }
                    Some(_) => return None,
                    None if self.close => return None,
                    None => continue,
                };
                // Bytes pipelined after CONNECT are processed once the session is attached.
                let used = usize::try_from(cur.position()).unwrap_or(n).min(n);
                self.leftover = buf[used..n].to_vec();
                return Some(connect);
            }
        }
    }

    fn refuse(&mut self, v3: ConnectReturnCode, v5: ConnectReasonCode) {
        let events = match self.version {
            ProtocolVersion::V311 => match v3_1_1::Connack::builder()
                .session_present(false)
                .return_code(v3)
                .build()
            {
                Ok(p) => self.mqtt.send(p.into()),
                Err(_) => Vec::new(),
            },
            ProtocolVersion::V5 => match v5_0::Connack::builder()
                .session_present(false)
                .reason_code(v5)
                .build()
            {
                Ok(p) => self.mqtt.send(p.into()),
                Err(_) => Vec::new(),
            },
        };
        self.apply(events);
        self.close = true;
    }

    /// Ask the embedder who is connecting; on a refusal the CONNACK is queued (the connection
    /// closes) and `None` is returned.
    async fn authenticate(&mut self, req: ConnectRequest<'_>) -> Option<Authenticated> {
        let refusal = match self.shared.hooks.authenticate(req).await {
            Ok(a) => return Some(a),
            Err(refusal) => refusal,
        };
        self.shared.counters.deny(match refusal {
            ConnectRefusal::BadClientId => Refusal::ClientIdInvalid,
            _ => Refusal::Authentication,
        });
        let (v3c, v5c) = match refusal {
            ConnectRefusal::BadClientId => (
                ConnectReturnCode::IdentifierRejected,
                ConnectReasonCode::ClientIdentifierNotValid,
            ),
            ConnectRefusal::BadUsernameOrPassword => (
                ConnectReturnCode::BadUserNameOrPassword,
                ConnectReasonCode::BadUserNameOrPassword,
            ),
            ConnectRefusal::NotAuthorized => (
                ConnectReturnCode::NotAuthorized,
                ConnectReasonCode::NotAuthorized,
            ),
            ConnectRefusal::ServerUnavailable => (
                ConnectReturnCode::ServerUnavailable,
                ConnectReasonCode::ServerUnavailable,
            ),
        };
        self.refuse(v3c, v5c);
        None
    }

    /// Whether `principal` may leave a will on `topic`; if not, the refusal is counted and the
    /// CONNACK (not authorized) queued.
    fn will_allowed(&mut self, principal: &Principal, topic: &str) -> bool {
        let too_long = !self.shared.config.topic_within_limits(topic);
        if !too_long
            && is_valid_topic_name(topic)
            && self.shared.hooks.may_publish(principal, topic)
        {
            return true;
        }
        self.shared.counters.deny(if too_long {
            Refusal::TopicTooLong
        } else {
            Refusal::PublishDenied
        });
        self.refuse(
            ConnectReturnCode::NotAuthorized,
            ConnectReasonCode::NotAuthorized,
        );
        false
    }

    /// Authenticate, attach the session (taking over any live connection), send CONNACK.
    async fn handle_connect(
        &mut self,
        p: ConnectPacket,
        info: &ConnInfo,
        conn_id: u64,
        link: Link,
    ) -> bool {
        let cfg = self.shared.config.clone();
        let (sent_id, clean, keep_alive, username, password, will_raw, props) = match &p {
            ConnectPacket::V3(p) => (
                p.client_id().to_string(),
                p.clean_session(),
                p.keep_alive(),
                p.user_name().map(str::to_string),
                p.password().map(<[u8]>::to_vec),
                p.will_topic().map(|t| {
                    (
                        t.to_string(),
                        p.will_payload().unwrap_or_default().to_vec(),
                        qos_u8(p.will_qos()),
                        p.will_retain(),
                        Vec::new(),
                    )
                }),
                Vec::new(),
            ),
            ConnectPacket::V5(p) => (
                p.client_id().to_string(),
                p.clean_start(),
                p.keep_alive(),
                p.user_name().map(str::to_string),
                p.password().map(<[u8]>::to_vec),
                p.will_topic().map(|t| {
                    (
                        t.to_string(),
                        p.will_payload().unwrap_or_default().to_vec(),
                        qos_u8(p.will_qos()),
                        p.will_retain(),
                        p.will_props().clone(),
                    )
                }),
                p.props().clone(),
            ),
        };
        let v5 = self.version == ProtocolVersion::V5;
        if self.version == ProtocolVersion::V311 && sent_id.is_empty() && !clean {
            self.refuse(
                ConnectReturnCode::IdentifierRejected,
                ConnectReasonCode::ClientIdentifierNotValid,
            );
            return false;
        }
        let version = self.version;
        let request = || ConnectRequest {
            info,
            client_id: &sent_id,
            username: username.as_deref(),
            password: password.as_deref(),
            protocol_version: version,
        };
        // A device deleted or re-tagged while this CONNECT waits (authentication, takeover) must
        // not attach with the old view: the attach step compares this epoch and, if it moved,
        // asks the embedder again.
        let mut epoch = self.shared.principal_epoch.load(Ordering::SeqCst);
        let Some(auth) = self.authenticate(request()).await else {
            return false;
        };
        let mut client_id = auth.client_id;
        if client_id.is_empty() {
            client_id = if sent_id.is_empty() {
                format!("mooring-auto-{conn_id}")
            } else {
                sent_id.clone()
            };
        }
        let principal = auth.principal;

        // Will: authorized at CONNECT like Mosquitto does (refuse the connection if forbidden).
        let will = match will_raw {
            Some((topic, payload, qos, retain, wprops)) => {
                if !self.will_allowed(&principal, &topic) {
                    return false;
                }
                let delay_secs = wprops
                    .iter()
                    .find_map(|p| {
                        if let Property::WillDelayInterval(v) = p {
                            Some(v.val())
                        } else {
                            None
                        }
                    })
                    .unwrap_or(0);
                Some(Will {
                    msg: Message {
                        topic,
                        payload: payload.into(),
                        qos,
                        retain,
                        props: props_to_message_props(&wprops),
                    },
                    delay_secs,
                })
            }
            None => None,
        };

        let mut requested_expiry = 0u32;
        let mut client_recv_max = u16::MAX;
        for prop in &props {
            match prop {
                Property::SessionExpiryInterval(v) => requested_expiry = v.val(),
                Property::ReceiveMaximum(v) => client_recv_max = v.val(),
                Property::MaximumPacketSize(v) => self.client_packet_size_max = v.val(),
                _ => {}
            }
        }
        let expiry_secs = if v5 {
            requested_expiry.min(cfg.session_expiry_secs_max)
        } else if clean {
            0
        } else {
            cfg.session_expiry_secs_max
        };
        self.send_window = usize::from(client_recv_max.min(cfg.inflight_max.max(1)));

        // Attach the session, taking over any live connection with this client id. Sessions
        // live in one namespace per kind of principal (devices, services, the dev listener), and
        // within it a session belongs to the principal that created it: another principal using
        // the same client id is refused, never given the session, and never kicks its connection.
        let mut owner = Owner::of(&principal);
        let mut key: SessionKey = (owner.namespace(), client_id.clone());
        let persistent = expiry_secs > 0;
        let mut principal = Arc::new(principal);
        let mut waited = false;
        enum Attach {
            Wait(watch::Receiver<()>),
            Refuse(Refusal),
            Done(Arc<Mutex<Session>>, bool),
        }
        let (session, session_present) = loop {
            let step = {
                let mut table = lock(&self.shared.sessions);
                if self.shared.principal_epoch.load(Ordering::SeqCst) != epoch {
                    // Checked under the table lock, which `remove_device` and
                    // `update_principal` hold while they move the epoch.
                    drop(table);
                    epoch = self.shared.principal_epoch.load(Ordering::SeqCst);
                    match self.authenticate(request()).await {
                        Some(auth) if auth.client_id.is_empty() || auth.client_id == client_id => {
                            if let Some(w) = &will {
                                if !self.will_allowed(&auth.principal, &w.msg.topic) {
                                    return false;
                                }
                            }
                            owner = Owner::of(&auth.principal);
                            key = (owner.namespace(), client_id.clone());
                            principal = Arc::new(auth.principal);
                            continue;
                        }
                        Some(_) => {
                            self.refuse(
                                ConnectReturnCode::IdentifierRejected,
                                ConnectReasonCode::ClientIdentifierNotValid,
                            );
                            return false;
                        }
                        None => return false,
                    }
                }
                let existing = table.get(&key);
                let foreign = existing.is_some_and(|e| e.owner != owner);
                let was_persistent = existing.is_some_and(|e| e.persistent);
                let existing = existing.map(|e| e.session.clone());
                let resumes = existing.is_some() && !clean;
                let old_done = if foreign {
                    None
                } else {
                    existing.as_ref().and_then(|e| {
                        let s = lock(e);
                        s.link.as_ref().map(|old| {
                            let _ = old.control.try_send(Control::TakenOver);
                            old.done.clone()
                        })
                    })
                };
                let non_device = key.0 != Namespace::Device;
                match old_done {
                    _ if foreign => Attach::Refuse(Refusal::ClientIdInUse),
                    Some(done) if !waited => Attach::Wait(done),
                    _ if non_device && existing.is_none() && table.others() >= cfg.sessions_max => {
                        Attach::Refuse(Refusal::SessionsFull)
                    }
                    _ if non_device
                        && existing.is_none()
                        && table.sessions_of(&owner) >= cfg.sessions_per_principal_max =>
                    {
                        Attach::Refuse(Refusal::SessionQuota)
                    }
                    _ if non_device
                        && persistent
                        && !was_persistent
                        && table.persistent_of(&owner)
                            >= cfg.persistent_sessions_per_principal_max =>
                    {
                        Attach::Refuse(Refusal::SessionQuota)
                    }
                    _ => {
                        let (session, present) = match existing {
                            Some(s) if resumes => (s, true),
                            _ => {
                                let id = self.shared.session_seq.fetch_add(1, Ordering::Relaxed);
                                let s = Arc::new(Mutex::new(Session::new(
                                    id,
                                    client_id.clone(),
                                    principal.clone(),
                                )));
                                // Clean start: the old session (if any) ends here.
                                if let Some(old) =
                                    table.insert(&key, s.clone(), owner.clone(), persistent)
                                {
                                    self.shared.retire(&mut lock(&old));
                                    self.shared.redeliver_shared(&old);
                                }
                                (s, false)
                            }
                        };
                        table.set_persistent(&key, persistent);
                        {
                            let mut s = lock(&session);
                            s.principal = principal.clone();
                            s.expiry_secs = expiry_secs;
                            s.generation += 1;
                            s.offline_until_ms = 0;
                            s.link = Some(Link {
                                conn_id,
                                control: link.control.clone(),
                                done: link.done.clone(),
                            });
                            if present {
                                // What a resumed session holds is authorized again, against
                                // this principal and the current policy.
                                self.shared.revoke_disallowed(&mut s, true);
                            }
                            // Stored while connected, so a server that dies fires it after
                            // its restart (the connection was cut without DISCONNECT).
                            let persisted = expiry_secs > 0 && self.shared.persist.is_some();
                            s.will = will.as_ref().filter(|_| persisted).map(|w| {
                                Box::new(StoredWill {
                                    msg: w.msg.clone(),
                                    delay_secs: w.delay_secs.min(expiry_secs),
                                    fire_at_ms: 0,
                                })
                            });
                            let ops = self.shared.persist_session(&mut s, &owner);
                            self.shared.detach(ops);
                        }
                        Attach::Done(session, present)
                    }
                }
            };
            match step {
                Attach::Wait(mut done) => {
                    let wait = async move { while done.changed().await.is_ok() {} };
                    if tokio::time::timeout(Duration::from_millis(cfg.connect_timeout_ms), wait)
                        .await
                        .is_err()
                    {
                        tracing::warn!(
                            client_id,
                            "previous connection did not end in time; taking its session anyway"
                        );
                    }
                    waited = true;
                }
                Attach::Refuse(reason) => {
                    self.shared.counters.deny(reason);
                    tracing::info!(client_id, reason = reason.name(), "CONNECT refused");
                    let (v3, v5) = match reason {
                        Refusal::ClientIdInUse => (
                            ConnectReturnCode::IdentifierRejected,
                            ConnectReasonCode::ClientIdentifierNotValid,
                        ),
                        _ => (
                            ConnectReturnCode::ServerUnavailable,
                            ConnectReasonCode::QuotaExceeded,
                        ),
                    };
                    self.refuse(v3, v5);
                    return false;
                }
                Attach::Done(session, present) => break (session, present),
            }
        };
        self.client_id = client_id.clone();
        self.principal = principal.clone();
        self.session = Some(session.clone());
        {
            let mut r = lock(&self.record);
            r.key = Some(key);
            r.principal = Some((*principal).clone());
            r.session = Some(session.clone());
            r.will = will;
        }
        if session_present {
            let q = lock(&session).qos2_in.clone();
            self.mqtt
                .restore_qos2_publish_handled(q.into_iter().collect());
        }

        // CONNACK
        let events = if v5 {
            let mut cprops: Vec<Property> = Vec::new();
            let mut push = |r: Result<Property, MqttError>| {
                if let Ok(p) = r {
                    cprops.push(p);
                }
            };
            if sent_id.is_empty() || sent_id != client_id {
                push(
                    mqtt::packet::AssignedClientIdentifier::new(client_id.as_str()).map(Into::into),
                );
            }
            if requested_expiry != expiry_secs {
                push(mqtt::packet::SessionExpiryInterval::new(expiry_secs).map(Into::into));
            }
            if keep_alive > cfg.keepalive_secs_max
                || (keep_alive == 0 && cfg.keepalive_secs_max > 0)
            {
                push(mqtt::packet::ServerKeepAlive::new(cfg.keepalive_secs_max).map(Into::into));
            }
            if cfg.topic_alias_max > 0 {
                push(mqtt::packet::TopicAliasMaximum::new(cfg.topic_alias_max).map(Into::into));
            }
            push(mqtt::packet::ReceiveMaximum::new(cfg.inflight_max.max(1)).map(Into::into));
            push(mqtt::packet::SharedSubscriptionAvailable::new(1).map(Into::into));
            match v5_0::Connack::builder()
                .session_present(session_present)
                .reason_code(ConnectReasonCode::Success)
                .props(cprops)
                .build()
            {
                Ok(p) => self.mqtt.send(p.into()),
                Err(_) => return false,
            }
        } else {
            match v3_1_1::Connack::builder()
                .session_present(session_present)
                .return_code(ConnectReturnCode::Accepted)
                .build()
            {
                Ok(p) => self.mqtt.send(p.into()),
                Err(_) => return false,
            }
        };
        self.apply(events);
        if self.close {
            return false;
        }
        if self.keepalive.is_none() {
            // Keepalive 0: the client asked for no supervision; the server still closes a
            // connection that stays silent for 1.5 × keepalive_secs_max.
            let cap_ms = self.idle_cap_ms();
            self.self_supervised = true;
            self.keepalive_ms = cap_ms;
            self.keepalive = Some(Box::pin(tokio::time::sleep(Duration::from_millis(cap_ms))));
        }
        lock(&self.record).connected = true;
        self.shared.hooks.on_connected(&client_id, &principal);

        // Unacknowledged outbound messages are resent, in order, with DUP, by `pump` (within
        // the write buffer bound); their packet ids are taken now so new messages never reuse one.
        let inflight: Vec<Inflight> = lock(&session).inflight.iter().cloned().collect();
        for i in inflight {
            if self.mqtt.register_packet_id(i.packet_id).is_ok() {
                self.resend.push_back(i);
            }
        }
        self.pump();
        true
    }

    fn pubcomp(&mut self, pid: u16) -> Vec<Event> {
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

    fn pubrel(&mut self, pid: u16) -> Vec<Event> {
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

    fn build_publish(
        &self,
        d: &Delivery,
        pid: Option<u16>,
        dup: bool,
    ) -> Option<GenericPacket<u16>> {
        let qos = qos_of(d.qos);
        match self.version {
            ProtocolVersion::V311 => {
                let mut b = v3_1_1::Publish::builder()
                    .topic_name(d.msg.topic.as_str())
                    .ok()?
                    .qos(qos)
                    .retain(d.retain)
                    .dup(dup)
                    .payload(d.msg.payload.to_vec());
                if let Some(pid) = pid {
                    b = b.packet_id(pid);
                }
                b.build().ok().map(Into::into)
            }
            ProtocolVersion::V5 => {
                let expiry = d.expires_at.map(|at| {
                    let left = at.saturating_duration_since(Instant::now()).as_secs();
                    u32::try_from(left).unwrap_or(u32::MAX).max(1)
                });
                let mut props = message_props_to_props(&d.msg.props, expiry);
                for id in &d.sub_ids {
                    if let Ok(p) = mqtt::packet::SubscriptionIdentifier::new(*id) {
                        props.push(p.into());
                    }
                }
                let mut b = v5_0::Publish::builder()
                    .topic_name(d.msg.topic.as_str())
                    .ok()?
                    .qos(qos)
                    .retain(d.retain)
                    .dup(dup)
                    .payload(d.msg.payload.to_vec());
                if !props.is_empty() {
                    b = b.props(props);
                }
                if let Some(pid) = pid {
                    b = b.packet_id(pid);
                }
                b.build().ok().map(Into::into)
            }
        }
    }

    /// A stored message of this session (whose lock the caller holds) is done with: delete it.
    fn forget(&self, s: &Session, seq: u64) {
        if let (Some(key), true) = (s.persist_key(), seq != 0) {
            self.shared.detach(vec![StateOp::DeleteMessage {
                session: key.to_owned(),
                seq,
            }]);
        }
    }

    /// Move queued deliveries to the wire while the inflight window has room (in order).
    fn pump(&mut self) {
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
                        let value = self
                            .shared
                            .message_value(&d, Some((InflightState::AwaitAck, pid)));
                        self.shared.detach(vec![StateOp::PutMessage {
                            session: key.to_owned(),
                            seq: d.seq,
                            value,
                        }]);
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

    async fn main_loop(&mut self, control_rx: &mut mpsc::Receiver<Control>) {
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
                        Control::TakenOver => DisconnectReasonCode::SessionTakenOver,
                        Control::Kick(0x87) => DisconnectReasonCode::NotAuthorized,
                        Control::Kick(_) => DisconnectReasonCode::AdministrativeAction,
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
    fn process_input(
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
    fn write_session(&mut self) {
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

    fn disconnect_v5(&mut self, code: DisconnectReasonCode) {
        if self.version == ProtocolVersion::V5 {
            if let Ok(p) = v5_0::Disconnect::builder().reason_code(code).build() {
                let events = self.mqtt.send(p.into());
                self.apply(events);
            }
        }
    }

    fn dispatch(
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

    /// PUBREL of an inbound QoS 2 message: a persisted session stops remembering its id;
    /// what the PUBCOMP waits for.
    fn inbound_qos2_released(&self, pid: u16) -> Option<Durable> {
        let session = self.session.as_ref()?;
        let mut s = lock(session);
        if s.persist_key().is_some() && s.qos2_in.remove(&pid) {
            return self
                .shared
                .durable(self.shared.session_op(&s, false).into_iter().collect());
        }
        None
    }

    fn outbound_pubrec(&mut self, pid: u16) {
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
                let value = self
                    .shared
                    .message_value(&d, Some((InflightState::AwaitComp, pid)));
                wait = self.shared.durable(vec![StateOp::PutMessage {
                    session: key.to_owned(),
                    seq: d.seq,
                    value,
                }]);
            }
        }
        self.queue_deferred(AckKind::Pubrel, pid, 2, 0, wait);
    }

    fn inbound_publish(
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

    fn finish_publish(&mut self, p: PendingPublish) {
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
    fn queue_ack(&mut self, pid: u16, qos: u8, code: u8, wait: Option<Durable>) {
        self.queue_deferred(AckKind::Publish, pid, qos, code, wait);
    }

    /// Send `kind` for `pid` now, or queue it behind what still waits (see `acks`).
    fn queue_deferred(
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

    fn send_deferred(&mut self, a: &DeferredAck) {
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
    fn release_ack(&mut self, durable: bool) -> bool {
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
    fn qos2_not_received(&mut self, pid: u16) {
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
    fn ack(&mut self, pid: u16, qos: u8, code: u8) {
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

    fn subscribe(&mut self, pid: u16, entries: Vec<(String, SubOptions, u8)>) {
        let Some(session) = self.session.clone() else {
            return;
        };
        let v5 = self.version == ProtocolVersion::V5;
        let mut codes: Vec<u8> = Vec::with_capacity(entries.len());
        let mut retained_for: Vec<(String, u8, Option<u32>)> = Vec::new();
        let mut granted: Vec<String> = Vec::new();
        let principal = self.principal();
        if entries
            .iter()
            .any(|(f, o, _)| o.no_local && is_shared_filter(f))
        {
            // v5 §3.8.3.1: No Local on a shared subscription is a Protocol Error.
            self.disconnect_v5(DisconnectReasonCode::ProtocolError);
            self.close = true;
            return;
        }
        for (filter, opts, rh) in entries {
            let shared_sub = is_shared_filter(&filter);
            let valid = if shared_sub {
                parse_shared_filter(&filter).is_some()
            } else {
                is_valid_filter(&filter)
            };
            let code = if !self.shared.config.topic_within_limits(&filter) {
                self.shared.counters.refuse(Refusal::TopicTooLong);
                if v5 {
                    0x8F
                } else {
                    0x80
                }
            } else if !valid {
                if v5 {
                    0x8F
                } else {
                    0x80
                }
            } else if !self.shared.hooks.may_subscribe(&principal, &filter) {
                self.shared.counters.deny(Refusal::SubscribeDenied);
                if v5 {
                    0x87
                } else {
                    0x80
                }
            } else {
                let mut s = lock(&session);
                let existed = s.subs.contains_key(&filter);
                if !existed && s.subs.len() >= self.shared.config.subscriptions_per_session_max {
                    self.shared.counters.refuse(Refusal::SubscriptionQuota);
                    if v5 {
                        0x97
                    } else {
                        0x80
                    }
                } else {
                    let qos = opts.qos.min(2);
                    self.shared.add_subscription(
                        &session,
                        &mut s,
                        filter.clone(),
                        SubOptions { qos, ..opts },
                    );
                    granted.push(filter.clone());
                    // No retained messages for a shared subscription (v5 §4.8.2).
                    if !shared_sub && (rh == 0 || (rh == 1 && !existed)) {
                        retained_for.push((filter, qos, opts.sub_id));
                    }
                    qos
                }
            };
            codes.push(code);
        }
        let events = if v5 {
            let rcs = codes
                .iter()
                .map(|c| {
                    SubackReasonCode::try_from(*c).unwrap_or(SubackReasonCode::UnspecifiedError)
                })
                .collect();
            match v5_0::Suback::builder()
                .packet_id(pid)
                .reason_codes(rcs)
                .build()
            {
                Ok(p) => self.mqtt.send(p.into()),
                Err(_) => Vec::new(),
            }
        } else {
            let rcs = codes
                .iter()
                .map(|c| SubackReturnCode::try_from(*c).unwrap_or(SubackReturnCode::Failure))
                .collect();
            match v3_1_1::Suback::builder()
                .packet_id(pid)
                .return_codes(rcs)
                .build()
            {
                Ok(p) => self.mqtt.send(p.into()),
                Err(_) => Vec::new(),
            }
        };
        self.apply(events);
        if !granted.is_empty() {
            let client_id = lock(&session).client_id.clone();
            self.shared
                .hooks
                .on_subscribed(&client_id, &principal, &granted);
        }
        self.session_dirty = true;
        // Retained messages go after the SUBACK (same write buffer, so in order).
        for (filter, qos, sub_id) in retained_for {
            for (msg, expires_at) in self.shared.retained_matching(&filter) {
                if expires_at.is_some_and(|at| at <= Instant::now()) {
                    continue;
                }
                let d = Delivery {
                    qos: qos.min(msg.qos),
                    msg,
                    retain: true,
                    expires_at,
                    sub_ids: sub_id.into_iter().collect(),
                    seq: 0,
                    shared: None,
                };
                self.shared.enqueue(&mut lock(&session), d, &mut false);
            }
        }
    }

    fn unsubscribe(&mut self, pid: u16, filters: Vec<String>) {
        let Some(session) = self.session.clone() else {
            return;
        };
        let mut codes = Vec::with_capacity(filters.len());
        {
            let mut s = lock(&session);
            for f in &filters {
                codes.push(if self.shared.remove_subscription(&mut s, f) {
                    UnsubackReasonCode::Success
                } else {
                    UnsubackReasonCode::NoSubscriptionExisted
                });
            }
        }
        self.session_dirty = true;
        let events = match self.version {
            ProtocolVersion::V311 => match v3_1_1::Unsuback::builder().packet_id(pid).build() {
                Ok(p) => self.mqtt.send(p.into()),
                Err(_) => Vec::new(),
            },
            ProtocolVersion::V5 => match v5_0::Unsuback::builder()
                .packet_id(pid)
                .reason_codes(codes)
                .build()
            {
                Ok(p) => self.mqtt.send(p.into()),
                Err(_) => Vec::new(),
            },
        };
        self.apply(events);
    }
}

impl<S> Drop for Conn<S> {
    fn drop(&mut self) {
        // Persist inbound QoS 2 dedup state for the session (runs on panic too).
        if let Ok(mut r) = self.record.lock() {
            r.qos2_in = Some(self.mqtt.get_qos2_publish_handled().into_iter().collect());
        }
    }
}
