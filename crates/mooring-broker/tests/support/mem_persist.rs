//! An in-memory [`Persistence`] that applies ops like the store does (in order, one batch at a
//! time), and can fail (ops dropped, tickets answered `false`), hold (ops wait, unanswered,
//! until released) and be read back as a [`Restored`] (the state a restart after kill -9 sees).
#![allow(dead_code)]

use mooring_broker::{Durable, Persistence, Restored, RestoredSession, StateOp};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::oneshot;

type Held = (Vec<StateOp>, Option<oneshot::Sender<bool>>);

#[derive(Default)]
struct Inner {
    retained: BTreeMap<String, Vec<u8>>,
    sessions: BTreeMap<String, Vec<u8>>,
    messages: BTreeMap<(String, u64), Vec<u8>>,
    now_ms: u64,
    fail: bool,
    hold: bool,
    held: Vec<Held>,
    /// Every message deleted, and the puts that came after the delete of the same message (a
    /// row that stays stored although its message is done with).
    deleted: std::collections::HashSet<(String, u64)>,
    late_puts: usize,
}

impl Inner {
    /// One batch: all applied, or (failing) none.
    fn run(&mut self, ops: Vec<StateOp>) -> bool {
        if self.fail {
            return false;
        }
        for op in ops {
            match op {
                StateOp::PutRetained { topic, value } => {
                    self.retained.insert(topic, value);
                }
                StateOp::DeleteRetained { topic } => {
                    self.retained.remove(&topic);
                }
                StateOp::PutSession { key, value } => {
                    self.sessions.insert(key, value);
                }
                StateOp::DeleteSession { key } => {
                    self.sessions.remove(&key);
                    self.messages.retain(|(s, _), _| *s != key);
                }
                StateOp::PutMessage {
                    session,
                    seq,
                    value,
                } => {
                    if self.deleted.contains(&(session.clone(), seq)) {
                        self.late_puts += 1;
                    }
                    self.messages.insert((session, seq), value);
                }
                StateOp::DeleteMessage { session, seq } => {
                    self.messages.remove(&(session.clone(), seq));
                    self.deleted.insert((session, seq));
                }
            }
        }
        true
    }

    fn take(&mut self, ops: Vec<StateOp>, reply: Option<oneshot::Sender<bool>>) {
        if self.hold {
            self.held.push((ops, reply));
            return;
        }
        let ok = self.run(ops);
        if let Some(r) = reply {
            let _ = r.send(ok);
        }
    }
}

#[derive(Clone, Default)]
pub struct MemPersist(Arc<Mutex<Inner>>);

impl MemPersist {
    pub fn new(now_ms: u64) -> MemPersist {
        let p = MemPersist::default();
        p.lock().now_ms = now_ms;
        p
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        mooring_proto::sync::lock(&self.0)
    }

    pub fn set_now(&self, now_ms: u64) {
        self.lock().now_ms = now_ms;
    }

    /// Failing: every batch from now on is dropped and answered `false`.
    pub fn set_fail(&self, fail: bool) {
        self.lock().fail = fail;
    }

    /// Holding: ops wait (unanswered); releasing applies them in order.
    pub fn set_hold(&self, hold: bool) {
        let mut i = self.lock();
        i.hold = hold;
        if !hold {
            for (ops, reply) in std::mem::take(&mut i.held) {
                let ok = i.run(ops);
                if let Some(r) = reply {
                    let _ = r.send(ok);
                }
            }
        }
    }

    /// Ops submitted and held (not applied).
    pub fn held_ops(&self) -> usize {
        self.lock().held.iter().map(|(ops, _)| ops.len()).sum()
    }

    /// Puts of a message applied after its delete.
    pub fn late_puts(&self) -> usize {
        self.lock().late_puts
    }

    /// Stored messages of all sessions.
    pub fn messages(&self) -> usize {
        self.lock().messages.len()
    }

    /// Stored messages of a session.
    pub fn messages_of(&self, key: &str) -> usize {
        self.lock()
            .messages
            .keys()
            .filter(|(s, _)| s == key)
            .count()
    }

    /// What a restart would load (messages of sessions that do not exist are not loaded).
    pub fn snapshot(&self) -> Restored {
        let i = self.lock();
        Restored {
            retained: i
                .retained
                .iter()
                .map(|(t, v)| (t.clone(), v.clone()))
                .collect(),
            sessions: i
                .sessions
                .iter()
                .map(|(key, value)| RestoredSession {
                    key: key.clone(),
                    value: value.clone(),
                    messages: i
                        .messages
                        .iter()
                        .filter(|((s, _), _)| s == key)
                        .map(|((_, seq), v)| (*seq, v.clone()))
                        .collect(),
                })
                .collect(),
        }
    }
}

impl Persistence for MemPersist {
    fn submit(&self, ops: Vec<StateOp>) -> Durable {
        let (tx, rx) = oneshot::channel();
        self.lock().take(ops, Some(tx));
        Box::pin(async move { rx.await.unwrap_or(false) })
    }

    fn submit_detached(&self, ops: Vec<StateOp>) {
        self.lock().take(ops, None);
    }

    fn now_ms(&self) -> u64 {
        self.lock().now_ms
    }
}
