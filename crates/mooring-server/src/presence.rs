//! Presence: which devices are online now, and `last_seen` without one write per message.
//!
//! The live view of this node's own sessions is in memory (updated on connect, disconnect and
//! every inbound message); `last_seen` reaches the store in batches, every
//! `presence_flush_interval_secs` and at shutdown, through one `record_last_seen` transaction.
//!
//! In a cluster (a shared store) a device is online if any live node holds its session: each
//! node records which devices it holds ([`mooring_store::ClusterStore::apply_session_ops`],
//! coalesced per device and flushed every `SESSION_FLUSH_INTERVAL_MS`), and asks the store
//! about devices it does not hold. A node that stops heartbeating takes its devices offline
//! `node_lease_ms` later (the store's answer counts only live nodes).

use mooring_store::{DeviceActivity, SessionOp, Store};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

/// How often a cluster node writes its session opens and closes to the store.
pub const SESSION_FLUSH_INTERVAL_MS: u64 = 100;

#[derive(Debug, Default, Clone, Copy)]
struct Entry {
    connections: u32,
    last_seen_ms: u64,
    /// When the newest of its connections here opened.
    since_ms: u64,
    /// Not yet flushed: the earliest connection opened and the newest telemetry stored.
    connected_ms: Option<u64>,
    telemetry_ms: Option<u64>,
    dirty: bool,
}

/// Cluster mode: this node's id, and its session changes waiting for the store (the newest per
/// device, so the map is bounded by the devices that changed since the last flush).
struct Shared {
    node: String,
    pending: BTreeMap<String, SessionOp>,
    /// Devices whose CONNECT announced a session here and has not attached yet: the time it
    /// announced, and whether a newer session elsewhere has superseded it meanwhile.
    connecting: HashMap<String, Connecting>,
}

#[derive(Debug, Clone, Copy)]
struct Connecting {
    since_ms: u64,
    superseded: bool,
}

/// Announced connects tracked at once; beyond this the oldest-announced are forgotten (a
/// connect that never attached, e.g. its client vanished mid-handshake).
const CONNECTING_MAX: usize = 65_536;

/// The presence service: owns the in-memory online/last-seen table and its flushes to the
/// registry's `last_seen` column (and, in a cluster, to the session table).
pub struct Presence {
    devices: Mutex<HashMap<String, Entry>>,
    shared: Option<Mutex<Shared>>,
    store: Arc<dyn Store>,
}

impl Presence {
    /// `node`: this node's id in a cluster (`None`: a single node; presence is all in memory).
    pub(crate) fn new(store: Arc<dyn Store>, node: Option<String>) -> Self {
        Self {
            devices: Mutex::default(),
            shared: node.map(|node| {
                Mutex::new(Shared {
                    node,
                    pending: BTreeMap::new(),
                    connecting: HashMap::new(),
                })
            }),
            store,
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut HashMap<String, Entry>) -> R) -> R {
        let mut guard = mooring_proto::sync::lock(&self.devices);
        f(&mut guard)
    }

    fn record(&self, id: &str, op: impl FnOnce(String) -> SessionOp) {
        if let Some(shared) = &self.shared {
            let mut s = mooring_proto::sync::lock(shared);
            let node = s.node.clone();
            let op = op(node);
            s.pending.insert(id.to_owned(), op);
        }
    }

    /// Cluster mode: a CONNECT of `id` announced its session at `since_ms` (before it attaches).
    pub fn connecting(&self, id: &str, since_ms: u64) {
        if let Some(shared) = &self.shared {
            let mut s = mooring_proto::sync::lock(shared);
            if s.connecting.len() >= CONNECTING_MAX {
                if let Some(oldest) = s
                    .connecting
                    .iter()
                    .min_by_key(|(_, c)| c.since_ms)
                    .map(|(k, _)| k.clone())
                {
                    s.connecting.remove(&oldest);
                }
            }
            s.connecting.insert(
                id.to_owned(),
                Connecting {
                    since_ms,
                    superseded: false,
                },
            );
        }
    }

    /// A session of `id` attached here. Its `since` is when its CONNECT announced it (cluster)
    /// or `now_ms`. Returns `false` if a newer session elsewhere superseded it while it was
    /// connecting: the caller closes it at once.
    pub fn connected(&self, id: &str, now_ms: u64) -> bool {
        let announced = self
            .shared
            .as_ref()
            .and_then(|shared| mooring_proto::sync::lock(shared).connecting.remove(id));
        let since_ms = announced.map_or(now_ms, |c| c.since_ms);
        self.with(|m| {
            let e = m.entry(id.to_owned()).or_default();
            e.connections += 1;
            e.last_seen_ms = e.last_seen_ms.max(now_ms);
            e.since_ms = since_ms;
            e.connected_ms = Some(e.connected_ms.map_or(since_ms, |c| c.min(since_ms)));
            e.dirty = true;
        });
        self.record(id, |node_id| SessionOp::Open {
            device_id: id.to_owned(),
            node_id,
            since_ms,
        });
        !announced.is_some_and(|c| c.superseded)
    }

    pub fn disconnected(&self, id: &str, now_ms: u64) {
        let gone = self.with(|m| {
            m.get_mut(id).is_some_and(|e| {
                e.connections = e.connections.saturating_sub(1);
                e.last_seen_ms = e.last_seen_ms.max(now_ms);
                e.dirty = true;
                e.connections == 0
            })
        });
        if gone {
            self.record(id, |node_id| SessionOp::Close {
                device_id: id.to_owned(),
                node_id,
            });
        }
    }

    pub fn seen(&self, id: &str, now_ms: u64) {
        self.with(|m| {
            if let Some(e) = m.get_mut(id) {
                if now_ms > e.last_seen_ms {
                    e.last_seen_ms = now_ms;
                    e.dirty = true;
                }
            }
        });
    }

    pub fn forget(&self, id: &str) {
        self.with(|m| m.remove(id));
        if let Some(shared) = &self.shared {
            mooring_proto::sync::lock(shared).pending.remove(id);
        }
    }

    /// Whether a connection of `id` here is newer than one that opened at `since_ms` on node
    /// `other` (ties: the node with the larger id wins, so exactly one of two simultaneous
    /// connections survives): then this node keeps its session and the other hands over.
    pub fn newer_here(&self, id: &str, since_ms: u64, other: &str, own: &str) -> bool {
        let newer = |here: u64| here > since_ms || (here == since_ms && own > other);
        // A connect still attaching here: newer wins; older is marked superseded (it closes
        // as soon as it attaches).
        if let Some(shared) = &self.shared {
            let mut s = mooring_proto::sync::lock(shared);
            if let Some(c) = s.connecting.get_mut(id) {
                if newer(c.since_ms) {
                    return true;
                }
                c.superseded = true;
            }
        }
        self.with(|m| {
            m.get(id)
                .is_some_and(|e| e.connections > 0 && newer(e.since_ms))
        })
    }

    /// Records again, for the store, every session this node holds (after this node was
    /// silent long enough for others to take it for dead and reap its rows). Returns how many.
    pub fn reassert(&self) -> usize {
        let held: Vec<(String, u64)> = self.with(|m| {
            m.iter()
                .filter(|(_, e)| e.connections > 0)
                .map(|(id, e)| (id.clone(), e.since_ms))
                .collect()
        });
        for (id, since_ms) in &held {
            self.record(id, |node_id| SessionOp::Open {
                device_id: id.clone(),
                node_id,
                since_ms: *since_ms,
            });
        }
        held.len()
    }

    /// Whether this node holds a session of `id` now.
    pub fn is_here(&self, id: &str) -> bool {
        self.with(|m| m.get(id).is_some_and(|e| e.connections > 0))
    }

    /// `(online on this node, last_seen_ms known in memory)`.
    pub fn get(&self, id: &str) -> (bool, Option<u64>) {
        self.with(|m| match m.get(id) {
            Some(e) => (e.connections > 0, Some(e.last_seen_ms)),
            None => (false, None),
        })
    }

    /// Which of `ids` are online anywhere: held here, or (in a cluster) by another live node
    /// (`alive_since_ms`: nodes heard from since then are alive). At most
    /// [`mooring_store::SESSION_LOOKUP_LEN_MAX`] ids.
    pub async fn online(
        &self,
        ids: &[String],
        alive_since_ms: u64,
    ) -> mooring_store::Result<BTreeSet<String>> {
        let mut online: BTreeSet<String> =
            ids.iter().filter(|id| self.is_here(id)).cloned().collect();
        let Some(shared) = &self.shared else {
            return Ok(online);
        };
        let node = mooring_proto::sync::lock(shared).node.clone();
        let elsewhere: Vec<String> = ids
            .iter()
            .filter(|id| !online.contains(*id))
            .cloned()
            .collect();
        if elsewhere.is_empty() {
            return Ok(online);
        }
        // A row naming this node for a device it does not hold is a close not flushed yet.
        for (device, holder) in self.store.session_nodes(&elsewhere, alive_since_ms).await? {
            if holder != node {
                online.insert(device);
            }
        }
        Ok(online)
    }

    /// Which devices count as online, for a selection the store evaluates
    /// ([`mooring_store::DeviceFilter`]): those held here and, in a cluster, those another node
    /// heard from since `alive_since_ms` holds (what [`Presence::online`] answers per device).
    pub fn online_filter(&self, alive_since_ms: u64) -> mooring_store::OnlineFilter {
        let here = self.with(|m| {
            m.iter()
                .filter(|(_, e)| e.connections > 0)
                .map(|(id, _)| id.clone())
                .collect()
        });
        let elsewhere = self.shared.as_ref().map(|shared| {
            (
                mooring_proto::sync::lock(shared).node.clone(),
                alive_since_ms,
            )
        });
        mooring_store::OnlineFilter { here, elsewhere }
    }

    /// Devices with a session on this node.
    pub fn online_count(&self) -> usize {
        self.with(|m| m.values().filter(|e| e.connections > 0).count())
    }

    /// Writes this node's session opens and closes to the store (cluster mode; else nothing).
    pub async fn flush_sessions(&self) -> mooring_store::Result<usize> {
        let Some(shared) = &self.shared else {
            return Ok(0);
        };
        let batch = std::mem::take(&mut mooring_proto::sync::lock(shared).pending);
        if batch.is_empty() {
            return Ok(0);
        }
        let n = batch.len();
        let ops: Vec<SessionOp> = batch.values().cloned().collect();
        if let Err(e) = self.store.apply_session_ops(ops).await {
            // Put them back, unless a newer change for the same device came meanwhile.
            let mut s = mooring_proto::sync::lock(shared);
            for (id, op) in batch {
                s.pending.entry(id).or_insert(op);
            }
            return Err(e);
        }
        Ok(n)
    }

    /// Telemetry of `id` was stored at `now_ms` (the pipeline's "first telemetry", and what an
    /// installation confirmation checks); it was seen then too, so this is [`Presence::seen`]
    /// as well.
    pub fn telemetry(&self, id: &str, now_ms: u64) {
        self.with(|m| {
            if let Some(e) = m.get_mut(id) {
                e.telemetry_ms = Some(e.telemetry_ms.map_or(now_ms, |t| t.max(now_ms)));
                e.last_seen_ms = e.last_seen_ms.max(now_ms);
                e.dirty = true;
            }
        });
    }

    /// The newest telemetry of `id` stored through this node and not yet flushed.
    pub fn unflushed_telemetry_ms(&self, id: &str) -> Option<u64> {
        self.with(|m| m.get(id).and_then(|e| e.telemetry_ms))
    }

    /// Writes every changed `last_seen` (and connect / telemetry times) to the store in one
    /// batch.
    pub async fn flush(&self) -> mooring_store::Result<usize> {
        let batch: Vec<DeviceActivity> = self.with(|m| {
            m.retain(|_, e| e.connections > 0 || e.dirty);
            m.iter_mut()
                .filter(|(_, e)| e.dirty)
                .map(|(id, e)| {
                    e.dirty = false;
                    DeviceActivity {
                        id: id.clone(),
                        last_seen_ms: e.last_seen_ms,
                        connected_at_ms: e.connected_ms.take(),
                        telemetry_at_ms: e.telemetry_ms.take(),
                    }
                })
                .collect()
        });
        if batch.is_empty() {
            return Ok(0);
        }
        let n = batch.len();
        if let Err(e) = self.store.record_activity(&batch).await {
            // Put them back so the next flush retries.
            self.with(|m| {
                for a in &batch {
                    if let Some(e) = m.get_mut(&a.id) {
                        e.dirty = true;
                        e.connected_ms = match (e.connected_ms, a.connected_at_ms) {
                            (Some(x), Some(y)) => Some(x.min(y)),
                            (x, y) => x.or(y),
                        };
                        e.telemetry_ms = e.telemetry_ms.max(a.telemetry_at_ms);
                    }
                }
            });
            return Err(e);
        }
        Ok(n)
    }
}
