//! The broker's public handle, [`Broker`], and the [`Shared`] state its connections and timers work on.
//!
//! The rest of the broker lives next to this file, one concern per module:
//! `table` (the session table and the principal keys that index it), `retained` (retained
//! messages, their owners and quotas), `routing` (fan-out of a publish to matching sessions and
//! server-originated messages), `principals` (kick, removal, principal updates and
//! reauthorization), `lifecycle` (subscriptions in the index, retirement, expiry and will
//! timers), `durability` (state ops submitted to the embedder's `Persistence`, and
//! [`Broker::restore`]) and `stats` (refusal reasons, counters and [`BrokerStats`]).

mod durability;
mod lifecycle;
mod principals;
mod retained;
mod routing;
mod stats;
mod table;

pub use durability::RestoreStats;
pub use principals::KickReason;
pub use stats::{BrokerStats, Refusal, SessionInfo};
pub use table::PrincipalKey;

pub(crate) use retained::RetainedTable;
pub(crate) use stats::Counters;
pub(crate) use table::{Namespace, Owner, SessionId, SessionKey, SessionRef, SessionTable, Target};

use crate::config::BrokerConfig;
use crate::hooks::{ConnInfo, Hooks};
use crate::index::SubIndex;
use crate::persist::Persistence;
use crate::shared_sub::Groups;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinSet;

/// Why the broker asks a live connection to close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Control {
    /// Another connection took the client id (v5 DISCONNECT 0x8E).
    TakenOver,
    /// Kicked by the embedder ([`Broker::kick`]).
    Kick(KickReason),
    /// The principal was removed ([`Broker::remove_principal`]): close with v5 DISCONNECT 0x98
    /// and do not publish the will.
    Removed,
    /// Broker shutdown (v5 DISCONNECT 0x8B).
    Shutdown,
}

/// Broker-wide state, shared by the [`Broker`] handle, every connection task and every timer.
pub(crate) struct Shared {
    pub(crate) config: BrokerConfig,
    pub(crate) hooks: Arc<dyn Hooks>,
    /// Lock order (see lib.rs): `sessions` → a session → `subs`. `subs` and `retained` are leaf
    /// locks: nothing else is locked while one of them is held.
    pub(crate) sessions: Mutex<SessionTable>,
    /// Filter → (session, options), mirroring every live session's `subs`. Read-locked by every
    /// route, write-locked (briefly, under the session's lock) by SUBSCRIBE / UNSUBSCRIBE /
    /// session end. std's `RwLock` is futex-based and uncontended on a read-mostly path; we do
    /// not add `parking_lot` (no measured need: readers never block each other, and critical
    /// sections only walk the trie and clone `Arc`s).
    pub(crate) subs: RwLock<SubIndex<SessionId, Target>>,
    /// Shared subscription groups (`shared_sub.rs`); a leaf lock like `subs`.
    pub(crate) groups: RwLock<Groups>,
    pub(crate) retained: Mutex<RetainedTable>,
    pub(crate) counters: Counters,
    pub(crate) conn_seq: AtomicU64,
    /// Moved (under the session table lock) whenever a principal is removed or changes
    /// (`remove_principal`, `update_principal`): a CONNECT that authenticated before re-asks.
    pub(crate) principal_epoch: AtomicU64,
    pub(crate) session_seq: AtomicU64,
    pub(crate) shutting_down: AtomicBool,
    /// Timers that outlive a connection: will delay, session expiry.
    pub(crate) timers: Mutex<JoinSet<()>>,
    pub(crate) conn_ended: Notify,
    /// Where retained messages and persistent sessions are made durable (`None`: memory only).
    pub(crate) persist: Option<Arc<dyn Persistence>>,
    /// Next `seq` of a stored message (broker-wide, increasing; restored past the largest stored).
    pub(crate) msg_seq: AtomicU64,
}

/// An MQTT 3.1.1/5.0 broker. Cheap to clone; all clones are the same broker.
#[derive(Clone)]
pub struct Broker {
    pub(crate) shared: Arc<Shared>,
}

// A panic while holding a lock must not wedge the broker: the data is still consistent
// enough (every critical section is short and updates whole entries).
pub(crate) use mooring_proto::sync::{lock, read, write};

impl Broker {
    /// A broker that keeps its state in memory only.
    pub fn new(config: BrokerConfig, hooks: Arc<dyn Hooks>) -> Broker {
        Broker::build(config, hooks, None)
    }

    /// A broker that makes retained messages and persistent sessions durable through
    /// `persist` (see `persist.rs`). Call [`Broker::restore`] with what was stored before
    /// serving any connection.
    pub fn with_persistence(
        config: BrokerConfig,
        hooks: Arc<dyn Hooks>,
        persist: Arc<dyn Persistence>,
    ) -> Broker {
        Broker::build(config, hooks, Some(persist))
    }

    fn build(
        config: BrokerConfig,
        hooks: Arc<dyn Hooks>,
        persist: Option<Arc<dyn Persistence>>,
    ) -> Broker {
        Broker {
            shared: Arc::new(Shared {
                config,
                hooks,
                sessions: Mutex::new(SessionTable::default()),
                subs: RwLock::new(SubIndex::default()),
                groups: RwLock::new(Groups::default()),
                retained: Mutex::new(RetainedTable::default()),
                counters: Counters::default(),
                conn_seq: AtomicU64::new(1),
                principal_epoch: AtomicU64::new(0),
                session_seq: AtomicU64::new(1),
                shutting_down: AtomicBool::new(false),
                timers: Mutex::new(JoinSet::new()),
                conn_ended: Notify::new(),
                persist,
                msg_seq: AtomicU64::new(1),
            }),
        }
    }

    pub fn config(&self) -> &BrokerConfig {
        &self.shared.config
    }

    /// Serve one client connection until it closes. A panic in the protocol is caught here (the
    /// caller's task is the connection's only task) and contained to this connection; cleanup
    /// (session detach, will, `on_disconnected`) always runs.
    pub async fn serve_connection<S>(&self, stream: S, info: ConnInfo)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        crate::connection::serve(self.shared.clone(), stream, info).await;
    }

    /// A snapshot of the session under `client_id` (device namespace first, then services, then
    /// the dev listener), for operators and tests waiting on a condition.
    pub fn session_info(&self, client_id: &str) -> Option<SessionInfo> {
        let session = {
            let table = lock(&self.shared.sessions);
            [
                Namespace::Device,
                Namespace::Service,
                Namespace::Dev,
                Namespace::Claim,
            ]
            .into_iter()
            .find_map(|ns| table.get(&(ns, client_id.to_owned())))
            .map(|e| e.session.clone())?
        };
        let s = lock(&session);
        Some(SessionInfo {
            connected: s.link.is_some(),
            subscriptions: s.subs.len(),
            queued: s.queue.len(),
            inflight: s.inflight.len(),
        })
    }

    /// Ask every live connection to close (v5: DISCONNECT 0x8B), wait until they have ended
    /// (bounded by `connect_timeout_ms`), and stop broker timers. New connections are refused.
    pub async fn shutdown(&self) {
        self.shared.shutting_down.store(true, Ordering::SeqCst);
        let links: Vec<mpsc::Sender<Control>> = {
            let table = lock(&self.shared.sessions);
            table
                .sessions()
                .filter_map(|s| lock(s).link.as_ref().map(|l| l.control.clone()))
                .collect()
        };
        for l in links {
            let _ = l.try_send(Control::Shutdown);
        }
        let wait = async {
            loop {
                let ended = self.shared.conn_ended.notified();
                if self.shared.counters.connections.load(Ordering::SeqCst) == 0 {
                    break;
                }
                ended.await;
            }
        };
        let _ = tokio::time::timeout(
            std::time::Duration::from_millis(self.shared.config.connect_timeout_ms),
            wait,
        )
        .await;
        let mut timers = std::mem::take(&mut *lock(&self.shared.timers));
        timers.shutdown().await;
    }
}
