//! Durable broker state: the `StateOp`s that store sessions and messages, their submission to the embedder's `Persistence`, and [`Broker::restore`].

use super::{lock, Broker, Owner, SessionRef, Shared};
use crate::persist::{session_key, Durable, MessageValue, RetainedValue, SessionValue, StateOp};
use crate::session::{Delivery, InflightState, PersistInfo, Session};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use tokio::time::Instant;

/// What [`Broker::restore`] loaded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RestoreStats {
    pub retained: usize,
    pub sessions: usize,
    /// Queued and unacknowledged messages of the restored sessions.
    pub messages: usize,
    /// Sessions whose expiry passed while the server was down (deleted).
    pub sessions_expired: usize,
    /// Wills of restored sessions scheduled to fire (their clients' connections ended with the
    /// server, or their will delay was running).
    pub wills: usize,
}

impl Broker {
    /// Load what a previous run stored (see `persist.rs`), before any connection is served:
    /// retained messages, and persistent sessions (offline) with their subscriptions, queued and
    /// unacknowledged messages and inbound QoS 2 state. What expired while the server was down is
    /// dropped (and deleted from the store); a session that was online when the server stopped
    /// gets its full expiry from now. Values that cannot be decoded are skipped and logged.
    pub fn restore(&self, state: crate::persist::Restored) -> RestoreStats {
        let stats = self.restore_quietly(state);
        tracing::info!(
            retained = stats.retained,
            sessions = stats.sessions,
            messages = stats.messages,
            expired_sessions = stats.sessions_expired,
            wills = stats.wills,
            "broker state restored"
        );
        stats
    }

    /// Takes over one persistent session another broker of a cluster held (as it stored it):
    /// like [`Broker::restore`] for that session alone, unless this broker has a session under
    /// its key already (then nothing changes). Returns whether it was taken over. Call it before
    /// the session's client is served, so the client resumes it.
    pub fn adopt(&self, session: crate::persist::RestoredSession) -> bool {
        let Some(v) = SessionValue::decode(&session.value) else {
            return false;
        };
        let table_key = (v.owner.namespace(), v.client_id.clone());
        if lock(&self.shared.sessions).get(&table_key).is_some() {
            return false;
        }
        let stats = self.restore_quietly(crate::persist::Restored {
            retained: Vec::new(),
            sessions: vec![session],
        });
        stats.sessions == 1
    }

    fn restore_quietly(&self, state: crate::persist::Restored) -> RestoreStats {
        let shared = &self.shared;
        let mut stats = RestoreStats::default();
        let Some(persist) = shared.persist.clone() else {
            return stats;
        };
        let now_ms = persist.now_ms();
        let mut ops = Vec::new();
        {
            let mut retained = lock(&shared.retained);
            for (topic, value) in state.retained {
                let Some(r) = RetainedValue::decode(&value) else {
                    tracing::warn!(%topic, "stored retained message cannot be decoded; dropped");
                    ops.push(StateOp::DeleteRetained { topic });
                    continue;
                };
                if r.expires_at_ms != 0 && r.expires_at_ms <= now_ms {
                    ops.push(StateOp::DeleteRetained { topic });
                    continue;
                }
                let expires_at = shared.instant_of(r.expires_at_ms);
                retained.insert(Arc::new(r.msg), expires_at, r.owner);
                stats.retained += 1;
            }
        }
        let mut max_seq = 0u64;
        for crate::persist::RestoredSession {
            key,
            value,
            messages,
        } in state.sessions
        {
            let Some(v) = SessionValue::decode(&value) else {
                tracing::warn!(%key, "stored session cannot be decoded; dropped");
                ops.push(StateOp::DeleteSession { key });
                continue;
            };
            if v.expires_at_ms != 0 && v.expires_at_ms <= now_ms {
                ops.push(StateOp::DeleteSession { key });
                stats.sessions_expired += 1;
                continue;
            }
            let id = shared.session_seq.fetch_add(1, Ordering::Relaxed);
            let mut s = Session::new(id, v.client_id.clone(), Arc::new(v.principal.clone()));
            s.expiry_secs = v.expiry_secs;
            s.will = v.will.clone().map(Box::new);
            s.qos2_in = v.qos2_set();
            s.persist = Some(Box::new(PersistInfo {
                key: key.clone(),
                owner: v.owner.clone(),
            }));
            for (seq, mv) in messages {
                max_seq = max_seq.max(seq);
                let Some(m) = MessageValue::decode(&mv) else {
                    tracing::warn!(%key, seq, "stored message cannot be decoded; dropped");
                    ops.push(StateOp::DeleteMessage {
                        session: key.clone(),
                        seq,
                    });
                    continue;
                };
                let expires_at = shared.instant_of(m.expires_at_ms);
                let awaiting_comp = matches!(m.inflight, Some((InflightState::AwaitComp, _)));
                if m.expires_at_ms != 0 && m.expires_at_ms <= now_ms && !awaiting_comp {
                    ops.push(StateOp::DeleteMessage {
                        session: key.clone(),
                        seq,
                    });
                    continue;
                }
                let d = Delivery {
                    msg: Arc::new(m.msg),
                    qos: m.qos,
                    retain: m.retain,
                    expires_at,
                    sub_ids: m.sub_ids,
                    seq,
                    shared: m
                        .shared
                        .map(|(subscription, redelivered)| crate::shared_sub::Via {
                            subscription: Arc::from(subscription),
                            redelivered,
                        }),
                };
                match m.inflight {
                    Some((state, packet_id)) => s.inflight.push_back(crate::session::Inflight {
                        packet_id,
                        delivery: d,
                        state,
                    }),
                    None => s.push_restored(d),
                }
                stats.messages += 1;
            }
            let expiry = (v.expiry_secs != u32::MAX)
                .then(|| std::time::Duration::from_secs(u64::from(v.expiry_secs)));
            // Offline from now on: one that was online when the server stopped gets its full
            // expiry from now; one that was offline keeps its deadline (a restart must not
            // extend it, or a server restarted often enough would keep it for ever).
            let deadline_ms = match expiry {
                Some(_) if v.expires_at_ms != 0 => v.expires_at_ms,
                Some(after) => now_ms
                    .saturating_add(u64::try_from(after.as_millis()).unwrap_or(u64::MAX))
                    .max(1),
                None => 0,
            };
            let session: SessionRef = Arc::new(Mutex::new(s));
            {
                let mut table = lock(&shared.sessions);
                let table_key = (v.owner.namespace(), v.client_id.clone());
                if let Some(old) = table.insert(&table_key, session.clone(), v.owner.clone(), true)
                {
                    shared.retire(&mut lock(&old));
                }
                let mut s = lock(&session);
                for (filter, opts) in v.subs {
                    shared.add_subscription(&session, &mut s, filter, opts);
                }
                // Stored again with that deadline, and with its subscriptions (stored before
                // they were added, the next restart would bring it back with none).
                s.offline_until_ms = deadline_ms;
                // The policy may have changed while the server was down: what it no longer
                // allows must not collect messages until the client comes back.
                shared.revoke_disallowed(&mut s, true);
                ops.extend(shared.session_op_at(&s, deadline_ms));
                if let Some(after) = expiry {
                    let left = if v.expires_at_ms != 0 {
                        std::time::Duration::from_millis(v.expires_at_ms.saturating_sub(now_ms))
                    } else {
                        after
                    };
                    shared.expire_after(session.clone(), table_key, s.generation, left);
                }
                // The connection of a session that was online ended with the server: its will
                // runs now, after its delay; one whose delay was running keeps its deadline.
                if let Some(w) = &v.will {
                    let left_ms = if w.fire_at_ms != 0 {
                        w.fire_at_ms.saturating_sub(now_ms)
                    } else {
                        u64::from(w.delay_secs) * 1000
                    };
                    shared.will_after(
                        session.clone(),
                        s.generation,
                        v.client_id.clone(),
                        w.msg.clone(),
                        std::time::Duration::from_millis(left_ms),
                    );
                    stats.wills += 1;
                }
            }
            stats.sessions += 1;
        }
        shared.msg_seq.fetch_max(max_seq + 1, Ordering::Relaxed);
        shared.detach(ops);
        stats
    }
}

impl Shared {
    /// Submit ops nobody waits for (in order after everything submitted before).
    pub(crate) fn detach(&self, ops: Vec<StateOp>) {
        if let (Some(p), false) = (&self.persist, ops.is_empty()) {
            p.submit_detached(ops);
        }
    }

    /// What resolves once everything submitted so far is durable (`None`: no persistence).
    pub(crate) fn barrier(&self) -> Option<Durable> {
        self.persist.as_ref().map(|p| p.submit(Vec::new()))
    }

    /// Submit ops and get what resolves once they are durable; `None` if there is nothing to wait for.
    pub(crate) fn durable(&self, ops: Vec<StateOp>) -> Option<Durable> {
        match (&self.persist, ops.is_empty()) {
            (Some(p), false) => Some(p.submit(ops)),
            _ => None,
        }
    }

    /// Wall-clock unix ms on the embedder's clock (0 without persistence).
    pub(crate) fn now_ms(&self) -> u64 {
        self.persist.as_ref().map_or(0, |p| p.now_ms())
    }

    /// A tokio instant as unix ms on the embedder's clock (0 for `None`).
    pub(super) fn wall_ms(&self, at: Option<Instant>) -> u64 {
        let (Some(p), Some(at)) = (&self.persist, at) else {
            return 0;
        };
        let left = at.saturating_duration_since(Instant::now()).as_millis();
        p.now_ms()
            .saturating_add(u64::try_from(left).unwrap_or(u64::MAX))
            .max(1)
    }

    /// Unix ms (the embedder's clock) as a tokio instant (`None` for 0, and for a deadline too
    /// far away to represent: a stored value is not trusted to be sane, and `Instant + Duration`
    /// would panic, failing every start).
    pub(crate) fn instant_of(&self, wall_ms: u64) -> Option<Instant> {
        let p = self.persist.as_ref().filter(|_| wall_ms != 0)?;
        let left = wall_ms.saturating_sub(p.now_ms());
        Instant::now().checked_add(std::time::Duration::from_millis(left))
    }

    /// The op that stores `d` (its `seq` assigned) under the session `key`, queued (`inflight`
    /// `None`) or unacknowledged with its state and packet id.
    pub(crate) fn put_message(
        &self,
        key: &str,
        d: &Delivery,
        inflight: Option<(InflightState, u16)>,
    ) -> StateOp {
        let value = MessageValue {
            msg: (*d.msg).clone(),
            qos: d.qos,
            retain: d.retain,
            expires_at_ms: self.wall_ms(d.expires_at),
            sub_ids: d.sub_ids.clone(),
            inflight,
            shared: d
                .shared
                .as_ref()
                .map(|v| (v.subscription.to_string(), v.redelivered)),
        }
        .encode();
        StateOp::PutMessage {
            session: key.to_owned(),
            seq: d.seq,
            value,
        }
    }

    /// Unix ms at which `s`, going offline now, ends (0: never, or no persistence).
    pub(crate) fn deadline_from_now(&self, s: &Session) -> u64 {
        if s.expiry_secs == u32::MAX {
            return 0;
        }
        self.persist.as_ref().map_or(0, |p| {
            p.now_ms()
                .saturating_add(u64::from(s.expiry_secs) * 1000)
                .max(1)
        })
    }

    /// The op that stores a persisted session as it is now (`offline`: with its deadline; one
    /// that already has a deadline keeps it, otherwise its expiry counts from now).
    pub(crate) fn session_op(&self, s: &Session, offline: bool) -> Option<StateOp> {
        let expires_at_ms = match (offline, s.offline_until_ms) {
            (false, _) => 0,
            (true, 0) => self.deadline_from_now(s),
            (true, at) => at,
        };
        self.session_op_at(s, expires_at_ms)
    }

    /// The op that stores a persisted session as it is now, gone at `expires_at_ms` (unix ms;
    /// 0: online, or never).
    pub(crate) fn session_op_at(&self, s: &Session, expires_at_ms: u64) -> Option<StateOp> {
        let key = s.persist_key()?;
        let owner = &s.persist.as_ref()?.owner;
        Some(StateOp::PutSession {
            key: key.to_owned(),
            value: SessionValue::of(owner, s, expires_at_ms).encode(),
        })
    }

    /// Start or stop persisting a session (whose lock the caller holds) per its expiry now:
    /// returns the ops that store it with everything it holds, or delete it.
    pub(crate) fn persist_session(&self, s: &mut Session, owner: &Owner) -> Vec<StateOp> {
        let mut ops = Vec::new();
        if self.persist.is_none() || s.retired {
            return ops;
        }
        if s.expiry_secs == 0 {
            if let Some(p) = s.persist.take() {
                ops.push(StateOp::DeleteSession { key: p.key });
            }
            return ops;
        }
        let key = session_key(owner, &s.client_id);
        if s.persist.is_none() {
            // Became persisted: what it already holds is stored too.
            s.persist = Some(Box::new(PersistInfo {
                key: key.clone(),
                owner: owner.clone(),
            }));
            let mut queue = std::mem::take(&mut s.queue);
            for d in queue.iter_mut().filter(|d| d.qos > 0 && d.seq == 0) {
                d.seq = self.msg_seq.fetch_add(1, Ordering::Relaxed);
                ops.push(self.put_message(&key, d, None));
            }
            s.queue = queue;
        }
        ops.extend(self.session_op(s, false));
        ops
    }
}
