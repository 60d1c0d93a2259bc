//! One client connection: the tokio driver around the sans-IO `mqtt-protocol-core` server state machine.
//!
//! This file: `serve` (the task and its cleanup: session detach, will, `on_disconnected`) and the
//! `Conn` state. The rest, one seam each: `connect` (CONNECT decoded once for both versions,
//! authentication, session attach and takeover, CONNACK), `driver` (socket polling, the main
//! loop, dispatch of received packets, `pump`), `publish` (inbound PUBLISH, QoS 2 flows, acks
//! held until durable), `subscribe` (SUBSCRIBE / UNSUBSCRIBE), `convert` (QoS, properties,
//! building PUBLISH).

mod connect;
mod convert;
mod driver;
mod publish;
mod subscribe;

use crate::broker::{lock, Control, SessionKey, Shared};
use crate::hooks::{ConnInfo, Message, ProtocolVersion};
use crate::persist::{Durable, StoredWill};
use crate::session::{Inflight, Link, Session};
use driver::clear_and_trim;
use futures::FutureExt;
use mooring_proto::policy::Principal;
use mqtt_protocol_core::mqtt;
use mqtt_protocol_core::mqtt::connection::ConnectionOptions;
use mqtt_protocol_core::mqtt::packet::v5_0;
use mqtt_protocol_core::mqtt::result_code::DisconnectReasonCode;
use publish::DeferredAck;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio::time::Sleep;

type Server = mqtt::Connection<mqtt::role::Server>;
type BoxFut<T> = Pin<Box<dyn Future<Output = T> + Send>>;

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
    // The protocol runs in this task (no second task per connection: an idle device then costs
    // one task, not two), with a panic caught here exactly as a task boundary would catch it;
    // what cleanup needs is in `record`, which the protocol keeps current as it goes.
    let protocol = run(
        shared.clone(),
        stream,
        info,
        record.clone(),
        Link {
            conn_id,
            control: control_tx,
            done: done_rx,
        },
        control_rx,
    );
    if std::panic::AssertUnwindSafe(protocol)
        .catch_unwind()
        .await
        .is_err()
    {
        shared.counters.panics.fetch_add(1, Ordering::Relaxed);
        tracing::error!(conn_id, "connection task panicked; connection closed");
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

async fn run<S>(
    shared: Arc<Shared>,
    stream: S,
    info: ConnInfo,
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
        conn.handle_connect(connect, &info, link).await
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

    /// The longest a connection may stay silent: 1.5 × `keepalive_secs_max`.
    fn idle_cap_ms(&self) -> u64 {
        u64::from(self.shared.config.keepalive_secs_max.max(1)) * 1500
    }

    fn disconnect_v5(&mut self, code: DisconnectReasonCode) {
        if self.version == ProtocolVersion::V5 {
            if let Ok(p) = v5_0::Disconnect::builder().reason_code(code).build() {
                let events = self.mqtt.send(p.into());
                self.apply(events);
            }
        }
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
