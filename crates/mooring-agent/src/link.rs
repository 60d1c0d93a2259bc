//! The MQTT 3.1.1 session over any [`Stream`]: connect, subscribe, publish, keep-alive and reconnect backoff, driven through the sans-IO `mqtt-protocol-core` client.
//!
//! [`drive`] owns the connection. Each attempt asks the [`Connector`] for a fresh stream and a
//! fresh `Connection<role::Client>`, so nothing from a previous connection (packet ids,
//! queued requests) leaks into the next one: the outbox is the only source of truth for what
//! still needs sending. Bytes read from the stream are fed to the state machine; the events it
//! returns are applied here: bytes to write, packets received, packet ids released (a PUBACK),
//! timers to arm or cancel. Timers are `tokio::time` sleeps (PINGREQ after `keepalive` of
//! silence, PINGRESP within `keepalive`), so a paused tokio clock drives them.
//!
//! What the rest of the agent sees: a [`watch`] of the current [`LinkHandle`] (`Some` while
//! connected; publish through it), PUBACK tokens on the `acks` channel (the outbox seq a
//! publish carried), and inbound PUBLISHes routed to the first [`Route`] whose filter matches.
//! Inbound QoS 1 messages are acknowledged by the session as soon as they are read;
//! application-level acks (command ack/result topics) are the agent's business.
//!
//! After a failed attempt or a lost connection it sleeps for [`Backoff::next_delay`]
//! (exponential, full jitter, seeded RNG).

use crate::diag::Diagnostics;
use crate::transport::{Connector, Stream};
use mooring_proto::telemetry::PAYLOAD_SIZE_BYTES_MAX;
use mooring_proto::topic::filter_matches;
use mooring_proto::DeviceId;
use mqtt_protocol_core::mqtt;
use mqtt_protocol_core::mqtt::common::Cursor;
use mqtt_protocol_core::mqtt::connection::{ConnectionOptions, Event, TimerKind};
use mqtt_protocol_core::mqtt::packet::{v3_1_1, GenericPacket, Qos, SubEntry, SubOpts};
use mqtt_protocol_core::mqtt::prelude::*;
use mqtt_protocol_core::mqtt::result_code::{ConnectReturnCode, SubackReturnCode};
use rand::rngs::StdRng;
use rand::Rng as _;
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, Sleep};

type Client = mqtt::Connection<mqtt::role::Client>;

/// First reconnect delay ceiling.
pub const BACKOFF_BASE_MS: u64 = 500;
/// Largest reconnect delay.
pub const BACKOFF_CAP_MS: u64 = 30_000;
/// Requests (publishes) buffered between the agent and the connection task.
pub const REQUEST_CHANNEL_CAP: usize = 64;
/// Largest MQTT packet accepted from the server.
pub const INCOMING_PACKET_BYTES_MAX: u32 = 128 * 1024;
/// Largest payload published: a full telemetry payload.
pub const OUTGOING_PAYLOAD_BYTES_MAX: usize = PAYLOAD_SIZE_BYTES_MAX;
/// Time for TCP + TLS + CONNECT/CONNACK.
pub const CONNECT_TIMEOUT_MS: u64 = 10_000;
/// Bytes read from the stream at once (one buffer per connection; kept small because the
/// simulator runs 100k agents; larger packets are reassembled by the protocol layer).
pub const READ_CHUNK_BYTES: usize = 2 * 1024;

/// Exponential backoff with full jitter: the n-th delay is uniform in
/// `[0, min(cap, base * 2^n)]`.
#[derive(Debug)]
pub struct Backoff {
    base_ms: u64,
    cap_ms: u64,
    attempt: u32,
    rng: StdRng,
}

impl Backoff {
    pub fn new(base_ms: u64, cap_ms: u64, rng: StdRng) -> Self {
        assert!(base_ms > 0 && base_ms <= cap_ms, "0 < base <= cap");
        Self {
            base_ms,
            cap_ms,
            attempt: 0,
            rng,
        }
    }

    /// The agent's default: base 500 ms, cap 30 s.
    pub fn standard(rng: StdRng) -> Self {
        Self::new(BACKOFF_BASE_MS, BACKOFF_CAP_MS, rng)
    }

    /// Upper bound of the next delay.
    pub fn ceiling_ms(&self) -> u64 {
        // 2^attempt overflows long after the cap is reached; saturate.
        let factor = 1u64.checked_shl(self.attempt).unwrap_or(u64::MAX);
        self.base_ms.saturating_mul(factor).min(self.cap_ms)
    }

    /// The delay before the next attempt; each call raises the ceiling until the cap.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling_ms = self.ceiling_ms();
        if ceiling_ms < self.cap_ms {
            self.attempt += 1;
        }
        Duration::from_millis(self.rng.random_range(0..=ceiling_ms))
    }

    /// Called after a successful connection.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// A request to the connection task.
#[derive(Debug)]
pub enum Request {
    Publish {
        topic: String,
        payload: Vec<u8>,
        qos: u8,
        /// Reported on the acks channel when the PUBACK arrives (QoS 1 only).
        token: Option<u64>,
    },
    /// Send DISCONNECT and stop (agent shutdown).
    Disconnect,
    /// Send DISCONNECT and connect again (a renewed certificate to use).
    Reconnect,
    /// SUBSCRIBE (QoS 1) to more filters on this connection (gateway children); what arrives
    /// on them goes to [`LinkSettings::dynamic`].
    Subscribe(Vec<String>),
    /// UNSUBSCRIBE from filters added with [`Request::Subscribe`].
    Unsubscribe(Vec<String>),
}

/// Publishes on the connection it was handed out for; useless (every send fails) once that
/// connection is gone.
#[derive(Debug, Clone)]
pub struct LinkHandle {
    /// Counts connections; tells a new connection from an old one.
    pub conn_no: u64,
    tx: mpsc::Sender<Request>,
}

impl LinkHandle {
    /// Queues a publish without waiting; `false` if the queue is full or the connection gone.
    pub fn try_publish(&self, topic: &str, payload: Vec<u8>, qos: u8, token: Option<u64>) -> bool {
        self.tx
            .try_send(Request::Publish {
                topic: topic.to_owned(),
                payload,
                qos,
                token,
            })
            .is_ok()
    }

    /// Queues a SUBSCRIBE (QoS 1) to `filters` on this connection; `false` if the queue is
    /// full or the connection gone. A new connection starts without them (clean session).
    pub fn try_subscribe(&self, filters: Vec<String>) -> bool {
        self.tx.try_send(Request::Subscribe(filters)).is_ok()
    }

    /// Queues an UNSUBSCRIBE from `filters`; `false` if the queue is full or the connection gone.
    pub fn try_unsubscribe(&self, filters: Vec<String>) -> bool {
        self.tx.try_send(Request::Unsubscribe(filters)).is_ok()
    }

    /// Asks for a clean DISCONNECT.
    pub fn disconnect(&self) -> bool {
        self.tx.try_send(Request::Disconnect).is_ok()
    }

    /// Asks for a clean DISCONNECT and a new connection.
    pub fn reconnect(&self) -> bool {
        self.tx.try_send(Request::Reconnect).is_ok()
    }
}

/// Inbound PUBLISHes matching `filter` go to `tx` (subscribed QoS 1). When `tx` is full the
/// message is dropped and logged (the connection never waits on the agent): commands are
/// redelivered by the server until acknowledged, and a shadow delta carries the whole delta.
#[derive(Debug, Clone)]
pub struct Route {
    pub filter: String,
    pub tx: mpsc::Sender<Inbound>,
}

/// One inbound application message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inbound {
    pub topic: String,
    pub payload: Vec<u8>,
}

/// Where and how to connect.
#[derive(Clone)]
pub struct LinkSettings {
    /// The MQTT client id (a device's id; an enrolling agent's client id has the same syntax).
    pub device_id: DeviceId,
    pub connector: Arc<dyn Connector>,
    pub keepalive: Duration,
    pub routes: Vec<Route>,
    /// Where inbound messages matching no route go (the filters [`LinkHandle::try_subscribe`]
    /// added: a gateway's children); `None`: they are ignored.
    pub dynamic: Option<mpsc::Sender<Inbound>>,
    /// CONNECT username and password; `None` for a device proving itself by its certificate.
    pub credentials: Option<Credentials>,
    /// When a refused CONNECT ends [`drive`] (with [`LinkEnd::Refused`]) instead of being
    /// retried: `None` retries every refusal (a running device waits for the operator).
    pub give_up_on: Option<fn(ConnectReturnCode) -> bool>,
}

/// CONNECT username and password (enrollment: [`mooring_proto::provision::CLAIM_USERNAME`] and
/// the claim token).
#[derive(Clone)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// Why [`drive`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkEnd {
    /// We sent DISCONNECT on request.
    Disconnected,
    /// Nobody listens any more.
    Unwanted,
    /// The server refused the CONNECT with a code [`LinkSettings::give_up_on`] says is final.
    Refused(ConnectReturnCode),
}

/// The channels the connection task reports on.
#[derive(Debug, Clone)]
pub struct LinkOutputs {
    pub state: watch::Sender<Option<LinkHandle>>,
    /// Tokens of acknowledged publishes.
    pub acks: mpsc::Sender<u64>,
    pub diag: Diagnostics,
}

/// Connects, reports, reconnects with backoff; returns after a requested DISCONNECT, when
/// nobody listens any more, or on a refusal [`LinkSettings::give_up_on`] calls final.
pub async fn drive(settings: LinkSettings, mut backoff: Backoff, out: LinkOutputs) -> LinkEnd {
    let server = settings.connector.describe();
    let mut conn_no = 0u64;
    loop {
        // A restarted link task starts from "not connected".
        out.state.send_replace(None);
        conn_no += 1;
        let (tx, rx) = mpsc::channel(REQUEST_CHANNEL_CAP);
        let handle = LinkHandle { conn_no, tx };
        let mut connected = false;
        let result = session(&settings, handle, rx, &out, &mut connected, &mut backoff).await;
        out.state.send_replace(None);
        out.diag.link.connected.store(false, Ordering::Relaxed);
        let why = match result {
            Ok(SessionEnd::Disconnected) => {
                tracing::info!(%server, "disconnected");
                return LinkEnd::Disconnected;
            }
            Ok(SessionEnd::Unwanted) => return LinkEnd::Unwanted,
            Err(SessionError::Refused(code)) if settings.give_up_on.is_some_and(|f| f(code)) => {
                tracing::warn!(%server, ?code, "connection refused; not retrying");
                return LinkEnd::Refused(code);
            }
            Err(SessionError::Refused(code)) => format!("connection refused: {code:?}"),
            Err(SessionError::Other(why)) => why,
        };
        out.diag
            .link
            .reconnects_total
            .fetch_add(1, Ordering::Relaxed);
        let delay = backoff.next_delay();
        let what = if connected { "lost" } else { "failed" };
        tracing::warn!(
            %server,
            error = %why,
            retry_in_ms = delay.as_millis() as u64,
            "connection {what}"
        );
        out.diag.error(format!("connection {what}: {why}"));
        tokio::time::sleep(delay).await;
    }
}

enum SessionEnd {
    /// We sent DISCONNECT on request.
    Disconnected,
    /// Nobody is interested in the link any more.
    Unwanted,
}

/// Why a connection ended against our wish.
enum SessionError {
    /// CONNACK with this refusal.
    Refused(ConnectReturnCode),
    /// Anything else (I/O, timeout, protocol).
    Other(String),
}

impl From<String> for SessionError {
    fn from(why: String) -> Self {
        Self::Other(why)
    }
}

/// One connection, from connect to close.
async fn session(
    settings: &LinkSettings,
    handle: LinkHandle,
    mut requests: mpsc::Receiver<Request>,
    out: &LinkOutputs,
    connected: &mut bool,
    backoff: &mut Backoff,
) -> Result<SessionEnd, SessionError> {
    let connect_timeout = Duration::from_millis(CONNECT_TIMEOUT_MS);
    let stream = tokio::time::timeout(connect_timeout, settings.connector.connect())
        .await
        .map_err(|_| "connect timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    let opts = ConnectionOptions::new().maximum_packet_size_recv(INCOMING_PACKET_BYTES_MAX);
    let mut s = Session {
        stream,
        mqtt: Client::with_options(mqtt::Version::V3_1_1, opts),
        out: Vec::new(),
        close: false,
        ping_send: None,
        pong_recv: None,
        ping_sent_at: None,
        tokens: HashMap::new(),
        subscribes: HashMap::new(),
        received: Vec::new(),
        released: Vec::new(),
    };
    s.mqtt.set_auto_pub_response(true);
    s.mqtt
        .set_pingresp_recv_timeout(settings.keepalive.as_millis() as u64);

    // CONNECT → CONNACK, bounded in time.
    let keepalive_secs = u16::try_from(settings.keepalive.as_secs()).unwrap_or(u16::MAX);
    let mut connect = v3_1_1::Connect::builder()
        .client_id(settings.device_id.as_str())
        .map_err(|e| format!("client id: {e:?}"))?
        .clean_session(true)
        .keep_alive(keepalive_secs);
    if let Some(c) = &settings.credentials {
        connect = connect
            .user_name(c.username.as_str())
            .and_then(|b| b.password(c.password.as_str()))
            .map_err(|e| format!("CONNECT credentials: {e:?}"))?;
    }
    let connect = connect.build().map_err(|e| format!("CONNECT: {e:?}"))?;
    s.send(connect.into());
    let connack = tokio::time::timeout(connect_timeout, s.read_until_connack())
        .await
        .map_err(|_| "no CONNACK in time".to_owned())??;
    if connack != ConnectReturnCode::Accepted {
        return Err(SessionError::Refused(connack));
    }
    *connected = true;
    backoff.reset();
    out.diag.link.connected.store(true, Ordering::Relaxed);
    out.diag.link.connects_total.fetch_add(1, Ordering::Relaxed);
    tracing::info!(server = %settings.connector.describe(), "connected");

    if !settings.routes.is_empty() {
        let pid = s.mqtt.acquire_packet_id().map_err(|e| format!("{e:?}"))?;
        let entries = settings
            .routes
            .iter()
            .map(|r| SubEntry::new(r.filter.as_str(), SubOpts::new().set_qos(Qos::AtLeastOnce)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("subscription filter: {e:?}"))?;
        let sub = v3_1_1::Subscribe::builder()
            .packet_id(pid)
            .entries(entries)
            .build()
            .map_err(|e| format!("SUBSCRIBE: {e:?}"))?;
        s.subscribes.insert(
            pid,
            settings.routes.iter().map(|r| r.filter.clone()).collect(),
        );
        s.send(sub.into());
    }
    s.flush().await?;
    out.state.send_replace(Some(handle));

    let mut buf = vec![0u8; READ_CHUNK_BYTES];
    loop {
        s.flush().await?;
        if s.close {
            return Err(
                "closed by the protocol layer (keep-alive or protocol error)"
                    .to_owned()
                    .into(),
            );
        }
        // Deliver what the last step produced.
        for pid in s.released.drain(..) {
            if let Some(token) = s.tokens.remove(&pid) {
                if out.acks.send(token).await.is_err() {
                    return Ok(SessionEnd::Unwanted);
                }
            }
        }
        for p in std::mem::take(&mut s.received) {
            handle_packet(p, settings, out, &mut s);
        }
        if !s.out.is_empty() {
            continue;
        }
        enum Step {
            Request(Option<Request>),
            Read(std::io::Result<usize>),
            PingSend,
            PongMissing,
        }
        let ping_send = sleep_or_never(&mut s.ping_send);
        let pong_recv = sleep_or_never(&mut s.pong_recv);
        let step = tokio::select! {
            r = requests.recv() => Step::Request(r),
            r = s.stream.read(&mut buf) => Step::Read(r),
            () = ping_send => Step::PingSend,
            () = pong_recv => Step::PongMissing,
        };
        match step {
            Step::Request(None) => return Ok(SessionEnd::Unwanted),
            Step::Request(Some(Request::Disconnect)) => {
                s.send(v3_1_1::Disconnect::new().into());
                s.flush().await?;
                let _ = s.stream.shutdown().await;
                return Ok(SessionEnd::Disconnected);
            }
            Step::Request(Some(Request::Reconnect)) => {
                s.send(v3_1_1::Disconnect::new().into());
                s.flush().await?;
                let _ = s.stream.shutdown().await;
                return Err("reconnecting (renewed certificate)".to_owned().into());
            }
            Step::Request(Some(Request::Publish {
                topic,
                payload,
                qos,
                token,
            })) => s.publish(&topic, payload, qos, token),
            Step::Request(Some(Request::Subscribe(filters))) => s.subscribe(filters),
            Step::Request(Some(Request::Unsubscribe(filters))) => s.unsubscribe(filters),
            Step::Read(Err(e)) => return Err(e.to_string().into()),
            Step::Read(Ok(0)) => return Err("connection closed by the server".to_owned().into()),
            Step::Read(Ok(n)) => s.recv(&buf[..n]),
            Step::PingSend => {
                s.ping_send = None;
                s.ping_sent_at = Some(Instant::now());
                let events = s.mqtt.notify_timer_fired(TimerKind::PingreqSend);
                s.apply(events);
            }
            Step::PongMissing => {
                s.pong_recv = None;
                let events = s.mqtt.notify_timer_fired(TimerKind::PingrespRecv);
                s.apply(events);
                return Err("no PINGRESP within the keep-alive".to_owned().into());
            }
        }
    }
}

fn handle_packet(
    p: GenericPacket<u16>,
    settings: &LinkSettings,
    out: &LinkOutputs,
    s: &mut Session,
) {
    match p {
        GenericPacket::V3_1_1Publish(p) => {
            let msg = Inbound {
                topic: p.topic_name().to_owned(),
                payload: p.payload().as_slice().to_vec(),
            };
            match settings
                .routes
                .iter()
                .find(|r| filter_matches(&r.filter, &msg.topic))
            {
                Some(route) => {
                    if route.tx.try_send(msg).is_err() {
                        tracing::warn!(topic = %p.topic_name(), "inbound queue full; message dropped");
                        out.diag
                            .error(format!("inbound message dropped: {}", p.topic_name()));
                    }
                }
                None => match &settings.dynamic {
                    Some(tx) => {
                        if tx.try_send(msg).is_err() {
                            tracing::warn!(topic = %p.topic_name(), "inbound queue full; message dropped");
                            out.diag
                                .error(format!("inbound message dropped: {}", p.topic_name()));
                        }
                    }
                    None => {
                        tracing::debug!(topic = %msg.topic, "message without a route; ignored");
                    }
                },
            }
        }
        GenericPacket::V3_1_1Pingresp(_) => {
            if let Some(at) = s.ping_sent_at.take() {
                let rtt_ms = at.elapsed().as_millis() as u64;
                out.diag.link.last_rtt_ms.store(rtt_ms, Ordering::Relaxed);
            }
        }
        GenericPacket::V3_1_1Suback(p) => {
            let filters = s.subscribes.remove(&p.packet_id()).unwrap_or_default();
            for (filter, rc) in filters.iter().zip(p.return_codes()) {
                if rc == SubackReturnCode::Failure {
                    tracing::warn!(%filter, "subscription refused by the server");
                    out.diag.error(format!("subscription refused: {filter}"));
                }
            }
        }
        _ => {}
    }
}

async fn sleep_or_never(timer: &mut Option<Pin<Box<Sleep>>>) {
    match timer.as_mut() {
        Some(t) => t.await,
        None => std::future::pending().await,
    }
}

/// The per-connection state: the stream, the protocol state machine and the timers it asked for.
struct Session {
    stream: Box<dyn Stream>,
    mqtt: Client,
    out: Vec<u8>,
    close: bool,
    ping_send: Option<Pin<Box<Sleep>>>,
    pong_recv: Option<Pin<Box<Sleep>>>,
    ping_sent_at: Option<Instant>,
    /// Packet id → token of an unacknowledged QoS 1 publish.
    tokens: HashMap<u16, u64>,
    /// Packet id → filters of an unacknowledged SUBSCRIBE (to name refused ones).
    subscribes: HashMap<u16, Vec<String>>,
    received: Vec<GenericPacket<u16>>,
    released: Vec<u16>,
}

impl Session {
    fn send(&mut self, p: GenericPacket<u16>) {
        let events = self.mqtt.send(p);
        self.apply(events);
    }

    fn recv(&mut self, data: &[u8]) {
        let mut cur = Cursor::new(data);
        while (cur.position() as usize) < data.len() && !self.close {
            let events = self.mqtt.recv(&mut cur);
            self.apply(events);
        }
    }

    fn apply(&mut self, events: Vec<Event>) {
        for ev in events {
            match ev {
                Event::RequestSendPacket { packet, .. } => {
                    self.out.extend_from_slice(&packet.to_continuous_buffer());
                }
                Event::NotifyPacketReceived(p) => self.received.push(p),
                Event::NotifyPacketIdReleased(pid) => self.released.push(pid),
                Event::RequestTimerReset { kind, duration_ms } => {
                    let slot = match kind {
                        TimerKind::PingreqSend => &mut self.ping_send,
                        TimerKind::PingrespRecv => &mut self.pong_recv,
                        TimerKind::PingreqRecv => continue,
                    };
                    // Re-arm in place: the PINGREQ timer is reset after every packet sent.
                    let deadline = Instant::now() + Duration::from_millis(duration_ms);
                    match slot {
                        Some(t) => t.as_mut().reset(deadline),
                        None => *slot = Some(Box::pin(tokio::time::sleep_until(deadline))),
                    }
                }
                Event::RequestTimerCancel(kind) => match kind {
                    TimerKind::PingreqSend => self.ping_send = None,
                    TimerKind::PingrespRecv => self.pong_recv = None,
                    TimerKind::PingreqRecv => {}
                },
                Event::NotifyError(e) => tracing::debug!(error = ?e, "mqtt protocol error"),
                Event::RequestClose => self.close = true,
            }
        }
    }

    async fn flush(&mut self) -> Result<(), String> {
        if !self.out.is_empty() {
            self.stream
                .write_all(&self.out)
                .await
                .map_err(|e| e.to_string())?;
            self.out.clear();
            self.stream.flush().await.map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    async fn read_until_connack(&mut self) -> Result<ConnectReturnCode, String> {
        self.flush().await?;
        let mut buf = vec![0u8; READ_CHUNK_BYTES];
        loop {
            if let Some(i) = self
                .received
                .iter()
                .position(|p| matches!(p, GenericPacket::V3_1_1Connack(_)))
            {
                if let GenericPacket::V3_1_1Connack(c) = self.received.remove(i) {
                    return Ok(c.return_code());
                }
            }
            if self.close {
                return Err("closed before CONNACK".into());
            }
            let n = self
                .stream
                .read(&mut buf)
                .await
                .map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("connection closed before CONNACK".into());
            }
            self.recv(&buf[..n]);
            self.flush().await?;
        }
    }

    fn subscribe(&mut self, filters: Vec<String>) {
        if filters.is_empty() {
            return;
        }
        let pid = match self.mqtt.acquire_packet_id() {
            Ok(pid) => pid,
            Err(e) => {
                tracing::warn!(error = ?e, "no packet id free; SUBSCRIBE not sent");
                return;
            }
        };
        let built = filters
            .iter()
            .map(|f| SubEntry::new(f.as_str(), SubOpts::new().set_qos(Qos::AtLeastOnce)))
            .collect::<Result<Vec<_>, _>>()
            .and_then(|entries| {
                v3_1_1::Subscribe::builder()
                    .packet_id(pid)
                    .entries(entries)
                    .build()
            });
        match built {
            Ok(sub) => {
                self.subscribes.insert(pid, filters);
                self.send(sub.into());
            }
            Err(e) => {
                tracing::warn!(error = ?e, ?filters, "cannot build SUBSCRIBE; not sent");
                let _ = self.mqtt.release_packet_id(pid);
            }
        }
    }

    fn unsubscribe(&mut self, filters: Vec<String>) {
        if filters.is_empty() {
            return;
        }
        let pid = match self.mqtt.acquire_packet_id() {
            Ok(pid) => pid,
            Err(e) => {
                tracing::warn!(error = ?e, "no packet id free; UNSUBSCRIBE not sent");
                return;
            }
        };
        let built = v3_1_1::Unsubscribe::builder()
            .packet_id(pid)
            .entries(filters.iter().map(String::as_str))
            .and_then(|b| b.build());
        match built {
            Ok(unsub) => self.send(unsub.into()),
            Err(e) => {
                tracing::warn!(error = ?e, ?filters, "cannot build UNSUBSCRIBE; not sent");
                let _ = self.mqtt.release_packet_id(pid);
            }
        }
    }

    fn publish(&mut self, topic: &str, payload: Vec<u8>, qos: u8, token: Option<u64>) {
        if payload.len() > OUTGOING_PAYLOAD_BYTES_MAX {
            tracing::warn!(topic, bytes = payload.len(), "payload too large; not sent");
            return;
        }
        let qos = if qos == 0 {
            Qos::AtMostOnce
        } else {
            Qos::AtLeastOnce
        };
        let pid = if qos == Qos::AtLeastOnce {
            match self.mqtt.acquire_packet_id() {
                Ok(pid) => Some(pid),
                Err(e) => {
                    tracing::warn!(error = ?e, topic, "no packet id free; not sent");
                    return;
                }
            }
        } else {
            None
        };
        let built = v3_1_1::Publish::builder()
            .topic_name(topic)
            .map(|b| b.qos(qos).payload(payload))
            .and_then(|b| match pid {
                Some(pid) => b.packet_id(pid).build(),
                None => b.build(),
            });
        match built {
            Ok(p) => {
                if let (Some(pid), Some(token)) = (pid, token) {
                    self.tokens.insert(pid, token);
                }
                self.send(p.into());
            }
            Err(e) => {
                tracing::warn!(error = ?e, topic, "cannot build PUBLISH; not sent");
                if let Some(pid) = pid {
                    let _ = self.mqtt.release_packet_id(pid);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng as _;

    #[test]
    fn backoff_grows_caps_and_jitters_within_bounds() {
        let mut b = Backoff::new(500, 30_000, StdRng::seed_from_u64(7));
        let expected_ceilings = [500, 1000, 2000, 4000, 8000, 16_000, 30_000, 30_000, 30_000];
        for ceiling in expected_ceilings {
            assert_eq!(b.ceiling_ms(), ceiling);
            let d = b.next_delay().as_millis() as u64;
            assert!(d <= ceiling, "{d} > {ceiling}");
        }
        // Stays capped for a long time without overflowing.
        for _ in 0..1000 {
            assert!(b.next_delay() <= Duration::from_millis(30_000));
        }
        assert_eq!(b.ceiling_ms(), 30_000);
        b.reset();
        assert_eq!(b.ceiling_ms(), 500);
    }

    #[test]
    fn backoff_is_jittered_and_deterministic_per_seed() {
        let delays = |seed| {
            let mut b = Backoff::new(500, 30_000, StdRng::seed_from_u64(seed));
            for _ in 0..10 {
                b.next_delay();
            }
            // At the cap: 200 draws from [0, 30 s].
            (0..200).map(|_| b.next_delay()).collect::<Vec<_>>()
        };
        let a = delays(1);
        assert_eq!(a, delays(1), "same seed, same delays");
        assert_ne!(a, delays(2));
        let distinct: std::collections::BTreeSet<_> = a.iter().collect();
        assert!(distinct.len() > 100, "full jitter spreads delays");
        assert!(a.iter().any(|d| *d < Duration::from_millis(10_000)));
        assert!(a.iter().any(|d| *d > Duration::from_millis(20_000)));
    }
}
