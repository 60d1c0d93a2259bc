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
//!   the QoS 1/2 acknowledgements. [`Broker::serve_connection`] runs the protocol loop in the
//!   caller's task with a panic caught (`catch_unwind`; one task per connection, not two) and,
//!   whatever happens to it (EOF, error, panic), runs cleanup: detach the session,
//!   fire or schedule the will, call `on_disconnected`.
//! * [`session`] — what survives a reconnect: subscriptions, the outbound queue, the outbound
//!   inflight window (QoS 1/2 sent but not acknowledged, resent with DUP on resume), and the
//!   inbound QoS 2 packet ids awaiting PUBREL. A session lives in the broker table until its
//!   expiry (v5 Session Expiry Interval; v3.1.1 `clean_session = 0` gets
//!   `session_expiry_secs_max`).
//! * [`broker`] — broker-wide state and operations (one concern per file: see `broker/mod.rs`):
//!   the session table (by namespace and client
//!   id, plus client ids by owner principal, [`PrincipalKey`]), the subscription index, retained
//!   messages with their owners, routing, stats, `kick`, `remove_principal`, `update_principal`,
//!   `reauthorize_all`, `shutdown`, and server-originated messages: `publish` (routed like any
//!   publish) and `publish_to` (that principal's connected session only, if it holds a
//!   matching subscription; reports whether the message was enqueued). The `*_device` methods
//!   (`kick_device`, `remove_device`, `publish_to_device`, `device_is_subscribed`) are these for
//!   [`PrincipalKey::device`]; the table itself has no notion of a device. A retained message is
//!   stored (within its owner's quota) before it is routed; `route` asks the index which sessions
//!   match (under its read lock only), releases it, and enqueues
//!   to each of them under that session's own lock, once per session at the highest granted QoS.
//! * `index` — the subscription index: a topic-level trie (exact children, a `+` child, a `#`
//!   set per node) from filter to (session id, session, options), kept in step with every
//!   session's `subs` on SUBSCRIBE, UNSUBSCRIBE and session end (clean disconnect, expiry,
//!   replacement by a clean start). Matching costs O(levels × matches), independent of the
//!   number of sessions; it agrees with `mooring_proto::topic::filter_matches` (property-tested).
//! * `shared_sub` — shared subscriptions (`$share/<group>/<filter>`): groups keyed by owner
//!   principal and subscription text (so different principals never share one), in their own
//!   index; `route` gives each matching group's message to one member (round robin, connected
//!   members first), and a member that leaves hands its unacknowledged shared messages to
//!   another member, once per message.
//! * Ownership — sessions are keyed by (namespace, client id), one namespace per kind of
//!   principal (device, service, dev listener), and belong to the principal that created them:
//!   another principal's CONNECT with that client id is refused (0x85 / rc 2). A resumed session's
//!   filters are authorized again; [`Broker::update_principal`] (e.g. a device's new tags) and
//!   [`Broker::reauthorize_all`] (a policy reload) remove filters no longer allowed;
//!   [`Broker::remove_principal`] ends a principal's sessions and retained messages. Every refusal is
//!   counted by [`Refusal`] reason.
//! * [`hooks`] — the contract with the embedder: [`Hooks::authenticate`] at CONNECT,
//!   [`Hooks::may_publish`] / [`Hooks::may_subscribe`] per packet, [`Hooks::on_publish`] before
//!   any authorized message (and every will) is routed — acknowledgements for QoS 1/2 wait for it,
//!   while the connection keeps reading (up to `inflight_max` pending, acks in arrival order) —
//!   presence callbacks, and [`Hooks::on_subscribed`] with the filters a SUBSCRIBE granted.
//! * [`config`] — [`BrokerConfig`]: every bound.
//!
//! ## Locks
//!
//! Order: session table → one session → subscription index. The index (`RwLock`), the shared
//! subscription groups (`RwLock`) and the retained table are leaf locks: nothing else is taken
//! while one is held. No broker-wide lock
//! is held while a session is locked on the publish path: `route` reads the index, releases it,
//! then locks matching sessions one at a time. Every change to a session's subscriptions is made
//! under its lock together with the index update and records the index generation, so a route
//! that collected a session before the change re-checks that session's current filters (see
//! `Shared::route`). Lookups by client id or principal are hash lookups; nothing on the connect,
//! publish, `publish_to`, `is_subscribed`, `kick` or stats paths visits every session
//! (only `shutdown` and `reauthorize_all`, a policy reload, do; `remove_principal` scans the retained table).
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
//! Packet size, inflight (both directions), per-session queue length and bytes (drop oldest QoS 0
//! first, counted in [`BrokerStats::dropped`]), the write buffer, how long a write may make no
//! progress, topic bytes and levels, subscriptions per session, non-device sessions, persistent
//! sessions per principal, retained messages (count and bytes, per principal and broker-wide;
//! the server's own are never refused), keepalive (0 is supervised too) and session expiry are
//! all capped by [`BrokerConfig`]. The subscription
//! index and the shared subscription groups hold one entry per subscription, so together they
//! are bounded by `sessions_max × subscriptions_per_session_max` (their size is
//! [`BrokerStats::subscriptions`]); a group goes with its last member.

pub mod broker;
pub mod config;
mod connect_fixup;
pub mod connection;
pub mod hooks;
mod index;
mod packet_ids;
pub mod persist;
pub mod session;
mod shared_sub;
#[cfg(feature = "test-support")]
pub mod test_support;

pub use broker::{
    Broker, BrokerStats, KickReason, PrincipalKey, Refusal, RestoreStats, SessionInfo,
};
pub use config::BrokerConfig;
pub use hooks::{
    Authenticated, ConnInfo, ConnectRefusal, ConnectRequest, Hooks, ListenerKind, Message,
    MessageProps, ProtocolVersion, PublishVerdict,
};
pub use mooring_proto::policy::Principal;
pub use persist::{Durable, Persistence, Restored, RestoredSession, StateOp};
pub use session::Enqueue;
