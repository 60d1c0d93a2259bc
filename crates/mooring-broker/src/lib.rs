//! # mooring-broker: the MQTT 3.1.1 / 5.0 session layer
//!
//! Mooring owns its broker logic (sessions, subscriptions, retained messages, wills, routing)
//! and borrows only the codec and per-connection protocol state machine from the sans-IO crate
//! `mqtt-protocol-core` (see `NOTES.md` for why). Everything runs on tokio over *any*
//! `AsyncRead + AsyncWrite` stream — TCP, TLS, or an in-memory `tokio::io::duplex` — and every
//! timer is a `tokio::time` sleep, so a paused tokio clock drives keepalive, will delay and
//! session expiry in the simulator.
//!
//! ## Pieces
//!
//! * [`connection`] — one task per client. It feeds socket bytes into
//!   `Connection<role::Server>`, applies the events it returns (bytes to send, timers to arm,
//!   packet ids released, close), and dispatches received packets: CONNECT (authenticate,
//!   take over, attach session, CONNACK), PUBLISH, SUBSCRIBE, UNSUBSCRIBE, PING, DISCONNECT and
//!   the QoS 1/2 acknowledgements. [`Broker::serve_connection`] spawns the protocol loop in its
//!   own task and, whatever happens to it (EOF, error, panic), runs cleanup: detach the session,
//!   fire or schedule the will, call `on_disconnected`.
//! * [`session`] — what survives a reconnect: subscriptions, the outbound queue, the outbound
//!   inflight window (QoS 1/2 sent but not acknowledged, resent with DUP on resume), and the
//!   inbound QoS 2 packet ids awaiting PUBREL. A session lives in the broker table until its
//!   expiry (v5 Session Expiry Interval; v3.1.1 `clean_session = 0` gets
//!   `session_expiry_secs_max`).
//! * [`broker`] — the shared table of sessions and retained messages behind one mutex (each
//!   session behind its own; lock order is table, then session), routing (`route`: store/clear
//!   retained, then enqueue to every session with a matching filter, once per session at the
//!   highest granted QoS), stats, `kick_device`, `shutdown`, and server-originated messages:
//!   `publish` (routed like any publish) and `publish_to` (one connected client, only if it holds
//!   a matching subscription; reports whether the message was enqueued).
//! * [`hooks`] — the contract with the embedder: [`Hooks::authenticate`] at CONNECT,
//!   [`Hooks::may_publish`] / [`Hooks::may_subscribe`] per packet, [`Hooks::on_publish`] before
//!   any authorized message (and every will) is routed — acknowledgements for QoS 1/2 wait for it,
//!   while the connection keeps reading (up to `inflight_max` pending, acks in arrival order) —
//!   presence callbacks, and [`Hooks::on_subscribed`] with the filters a SUBSCRIBE granted.
//! * [`config`] — [`BrokerConfig`]: every bound.
//!
//! ## Delivery
//!
//! Routing pushes a `Delivery` (message, granted QoS, retain flag as seen by this subscriber,
//! expiry instant) onto the session queue and wakes the connection, which moves queued messages
//! to the wire in order while its inflight window (client Receive Maximum bounded by
//! `inflight_max`) has room. Offline sessions queue QoS 1/2 only.
//!
//! ## Bounds
//!
//! Packet size, inflight (both directions), per-session queue length (drop oldest QoS 0 first,
//! counted in [`BrokerStats::dropped`]), subscriptions per session, number of sessions, retained
//! messages, keepalive and session expiry are all capped by [`BrokerConfig`].

pub mod broker;
pub mod config;
pub mod connection;
pub mod hooks;
pub mod session;

pub use broker::{Broker, BrokerStats, SessionInfo};
pub use config::BrokerConfig;
pub use hooks::{
    Authenticated, ConnInfo, ConnectRefusal, ConnectRequest, Hooks, ListenerKind, Message,
    MessageProps, ProtocolVersion, PublishVerdict,
};
pub use mooring_proto::policy::Principal;
