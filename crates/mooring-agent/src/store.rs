//! The agent's durable state behind one trait ([`AgentStore`]): outbox, seq, executed commands, small JSON docs; plus [`MemStore`] (in memory, fault injection) for the simulator.
//!
//! Production uses [`crate::sqlite_store::SqliteStore`] (`synchronous=FULL`: a call that
//! returned `Ok` is on disk). The simulator uses [`MemStore`], which can fail writes at a rate
//! drawn from a seeded RNG and can model a flash that acknowledges writes before they are
//! synced, so "power loss" rolls back the unsynced tail. Every implementation keeps the same
//! bounds: the outbox holds at most `capacity` entries and at most [`EXECUTED_COMMANDS_MAX`]
//! command records are kept (oldest dropped). When the outbox is full the oldest *telemetry*
//! goes first (the device's own and its children's): command results, update status reports,
//! shadow reports and presence are dropped only when nothing but them is left, and those drops
//! are counted apart ([`AgentStore::dropped_precious_total`], in `diagnostics`).

use rand::rngs::StdRng;
use rand::Rng as _;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

/// Most executed-command records kept; the oldest is forgotten first.
pub const EXECUTED_COMMANDS_MAX: usize = 1024;
/// Most operations a lying [`MemStore`] may hold unsynced (bounds its undo log).
pub const UNSYNCED_OPS_MAX: usize = 1024;

/// Why a store operation failed. Any of these means the disk or database is unusable (or a
/// fault was injected); the supervisor restarts the part that hit it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("agent state database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("agent state file: {0}")]
    Io(#[from] std::io::Error),
    #[error("agent state is corrupt: {0}")]
    Corrupt(String),
    #[error("outbox capacity must be at least 1")]
    ZeroCapacity,
    #[error("injected write failure")]
    Injected,
}

/// One queued message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub seq: u64,
    /// `None`: the device's telemetry topic (saves storing it per entry; also what outboxes
    /// written before topics were stored hold).
    pub topic: Option<String>,
    pub payload: Vec<u8>,
}

/// The topic suffix of telemetry (a gateway's children's too): what a full outbox drops first.
pub const TELEMETRY_SUFFIX: &str = "/telemetry";

impl Entry {
    /// Telemetry (the device's own or a child's), which a full outbox drops first.
    pub fn is_telemetry(&self) -> bool {
        self.topic
            .as_deref()
            .is_none_or(|t| t.ends_with(TELEMETRY_SUFFIX))
    }
}

/// What [`AgentStore::push`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pushed {
    /// The seq of the last message pushed.
    pub seq: u64,
    /// How many of the oldest entries were dropped to make room (0 unless full).
    pub dropped: u64,
}

/// What the agent remembers about a command id.
#[derive(Debug, Clone, PartialEq)]
pub enum CommandRecord {
    /// Acknowledged and started; no result recorded (yet). Seen again after a restart, this
    /// means the agent died while running it.
    Started,
    /// Finished; the result payload (`CommandResult` JSON) to replay on redelivery.
    Done(Vec<u8>),
}

/// Durable agent state. One owner at a time (the agent shares it behind a mutex); every
/// method is short and synchronous.
pub trait AgentStore: Send + 'static {
    /// The seq the next pushed message gets.
    fn next_seq(&self) -> u64;
    /// Appends `entries` in one durable step. Their seqs must be `next_seq()`, `next_seq()+1`, ...
    /// When full, the oldest telemetry is dropped first; other entries (results, status
    /// reports) only when nothing else is left, oldest first.
    fn push(&mut self, entries: Vec<Entry>) -> Result<Pushed, StoreError>;
    /// Up to `n` entries with a seq greater than `after`, in seq order.
    fn peek_after(&self, after: u64, n: usize) -> Result<Vec<Entry>, StoreError>;
    /// Removes the listed entries (their PUBACK arrived); returns how many were there.
    fn ack(&mut self, seqs: &[u64]) -> Result<u64, StoreError>;
    /// Queued messages.
    fn len(&self) -> u64;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Most messages kept.
    fn capacity(&self) -> u64;
    /// Messages ever dropped because the outbox was full.
    fn dropped_total(&self) -> u64;
    /// Of those, the ones that were not telemetry (results, status reports: dropped only when
    /// the outbox held nothing else).
    fn dropped_precious_total(&self) -> u64;

    /// What is known about command `id`.
    fn command(&self, id: &str) -> Result<Option<CommandRecord>, StoreError>;
    /// The ids recorded as started without a result (commands a restart interrupted).
    fn unfinished_commands(&self) -> Result<Vec<String>, StoreError>;
    /// Records that command `id` is about to run (bounded: the oldest record is forgotten).
    fn command_started(&mut self, id: &str) -> Result<(), StoreError>;
    /// Records the result of command `id` and queues `entry` (the result message) in the
    /// outbox, in one durable step: a result is never recorded without being queued.
    fn command_done(
        &mut self,
        id: &str,
        result: Vec<u8>,
        entry: Entry,
    ) -> Result<Pushed, StoreError>;

    /// A small named JSON document (`config`, `desired`), `None` if never written.
    fn doc(&self, name: &str) -> Result<Option<Value>, StoreError>;
    /// Replaces a named JSON document durably.
    fn put_doc(&mut self, name: &str, value: &Value) -> Result<(), StoreError>;
}

/// Fault injection for [`MemStore`].
#[derive(Debug, Clone)]
pub struct Faults {
    /// Probability (0..=1) that a write fails with [`StoreError::Injected`] (nothing changes).
    pub write_fail_rate: f64,
    /// Writes acknowledged but not yet synced, at most (0 = every write is synced before it
    /// returns, like `synchronous=FULL`). [`MemStore::power_loss`] undoes them.
    pub unsynced_ops: usize,
    pub seed: u64,
}

/// In-memory [`AgentStore`]. Cheap to clone; clones share the same "flash", so the simulator
/// keeps one across agent restarts.
#[derive(Debug, Clone)]
pub struct MemStore {
    inner: Arc<Mutex<MemInner>>,
}

#[derive(Debug)]
struct MemInner {
    capacity: u64,
    next_seq: u64,
    dropped_total: u64,
    dropped_precious_total: u64,
    outbox: VecDeque<Entry>,
    commands: HashMap<String, CommandRecord>,
    command_order: VecDeque<String>,
    docs: BTreeMap<String, Value>,
    faults: Option<(Faults, StdRng)>,
    /// Undo records of unsynced writes, newest last.
    undo: Vec<Undo>,
    writes_failed_total: u64,
}

#[derive(Debug)]
enum Undo {
    State {
        next_seq: u64,
        dropped_total: u64,
        dropped_precious_total: u64,
        outbox: VecDeque<Entry>,
    },
    Command {
        id: String,
        previous: Option<CommandRecord>,
        order: VecDeque<String>,
    },
    Doc {
        name: String,
        previous: Option<Value>,
    },
    /// One write that changed several things (undone in reverse order).
    Many(Vec<Undo>),
}

impl MemStore {
    /// An empty store holding at most `capacity` outbox entries; the first seq is `first_seq`.
    pub fn new(capacity: u64, first_seq: u64) -> Result<Self, StoreError> {
        if capacity == 0 {
            return Err(StoreError::ZeroCapacity);
        }
        Ok(Self {
            inner: Arc::new(Mutex::new(MemInner {
                capacity,
                next_seq: first_seq.max(1),
                dropped_total: 0,
                dropped_precious_total: 0,
                outbox: VecDeque::new(),
                commands: HashMap::new(),
                command_order: VecDeque::new(),
                docs: BTreeMap::new(),
                faults: None,
                undo: Vec::new(),
                writes_failed_total: 0,
            })),
        })
    }

    /// Turns on fault injection (same seed, same faults).
    pub fn with_faults(self, faults: Faults) -> Self {
        {
            let mut inner = self.lock();
            let rng = rand::SeedableRng::seed_from_u64(faults.seed);
            inner.faults = Some((faults, rng));
        }
        self
    }

    /// Power loss: every acknowledged-but-unsynced write is undone. With `unsynced_ops = 0`
    /// nothing acknowledged is lost. Returns how many writes were undone.
    pub fn power_loss(&self) -> usize {
        let mut inner = self.lock();
        let undone = inner.undo.len();
        while let Some(u) = inner.undo.pop() {
            inner.apply_undo(u);
        }
        // Forgotten command ids whose record was undone: keep the map and order consistent.
        let order: std::collections::HashSet<String> =
            inner.command_order.iter().cloned().collect();
        inner.commands.retain(|k, _| order.contains(k));
        undone
    }

    /// Writes failed by injection so far.
    pub fn writes_failed_total(&self) -> u64 {
        self.lock().writes_failed_total
    }

    fn lock(&self) -> MutexGuard<'_, MemInner> {
        mooring_proto::sync::lock(&self.inner)
    }
}

impl MemInner {
    fn apply_undo(&mut self, u: Undo) {
        match u {
            Undo::State {
                next_seq,
                dropped_total,
                dropped_precious_total,
                outbox,
            } => {
                self.next_seq = next_seq;
                self.dropped_total = dropped_total;
                self.dropped_precious_total = dropped_precious_total;
                self.outbox = outbox;
            }
            Undo::Command {
                id,
                previous,
                order,
            } => {
                match previous {
                    Some(p) => self.commands.insert(id, p),
                    None => self.commands.remove(&id),
                };
                self.command_order = order;
            }
            Undo::Doc { name, previous } => match previous {
                Some(p) => {
                    self.docs.insert(name, p);
                }
                None => {
                    self.docs.remove(&name);
                }
            },
            Undo::Many(list) => {
                for u in list.into_iter().rev() {
                    self.apply_undo(u);
                }
            }
        }
    }

    /// Draws the write-failure dice; `Err` means "this write fails, change nothing".
    fn begin_write(&mut self) -> Result<(), StoreError> {
        if let Some((f, rng)) = &mut self.faults {
            if f.write_fail_rate > 0.0 && rng.random_bool(f.write_fail_rate.clamp(0.0, 1.0)) {
                self.writes_failed_total += 1;
                return Err(StoreError::Injected);
            }
        }
        Ok(())
    }

    /// Keeps an undo record if writes may be unsynced; syncs (drops the log) when it is full.
    fn log(&mut self, make: impl FnOnce(&Self) -> Undo) {
        let unsynced = self.faults.as_ref().map_or(0, |(f, _)| f.unsynced_ops);
        let unsynced = unsynced.min(UNSYNCED_OPS_MAX);
        if unsynced == 0 {
            return;
        }
        if self.undo.len() >= unsynced {
            self.undo.clear(); // a sync point
        }
        let u = make(self);
        self.undo.push(u);
    }

    fn snapshot_state(&self) -> Undo {
        Undo::State {
            next_seq: self.next_seq,
            dropped_total: self.dropped_total,
            dropped_precious_total: self.dropped_precious_total,
            outbox: self.outbox.clone(),
        }
    }

    fn push(&mut self, entries: Vec<Entry>) -> Pushed {
        for e in entries {
            assert_eq!(
                e.seq, self.next_seq,
                "outbox entries must be pushed in seq order"
            );
            self.next_seq += 1;
            self.outbox.push_back(e);
        }
        let mut dropped = 0;
        while self.outbox.len() as u64 > self.capacity {
            // The oldest telemetry; the oldest of anything only when no telemetry is left.
            match self.outbox.iter().position(Entry::is_telemetry) {
                Some(i) => {
                    self.outbox.remove(i);
                }
                None => {
                    self.outbox.pop_front();
                    self.dropped_precious_total += 1;
                }
            }
            dropped += 1;
        }
        self.dropped_total += dropped;
        Pushed {
            seq: self.next_seq.saturating_sub(1),
            dropped,
        }
    }

    fn set_command(&mut self, id: &str, record: CommandRecord) {
        let previous = self.commands.insert(id.to_owned(), record);
        if previous.is_none() {
            self.command_order.push_back(id.to_owned());
            while self.command_order.len() > EXECUTED_COMMANDS_MAX {
                if let Some(old) = self.command_order.pop_front() {
                    self.commands.remove(&old);
                }
            }
        }
    }
}

impl AgentStore for MemStore {
    fn next_seq(&self) -> u64 {
        self.lock().next_seq
    }

    fn push(&mut self, entries: Vec<Entry>) -> Result<Pushed, StoreError> {
        let mut inner = self.lock();
        inner.begin_write()?;
        inner.log(MemInner::snapshot_state);
        Ok(inner.push(entries))
    }

    fn peek_after(&self, after: u64, n: usize) -> Result<Vec<Entry>, StoreError> {
        let inner = self.lock();
        let start = inner.outbox.partition_point(|e| e.seq <= after);
        Ok(inner.outbox.iter().skip(start).take(n).cloned().collect())
    }

    fn ack(&mut self, seqs: &[u64]) -> Result<u64, StoreError> {
        if seqs.is_empty() {
            return Ok(0);
        }
        let mut inner = self.lock();
        inner.begin_write()?;
        inner.log(MemInner::snapshot_state);
        let before = inner.outbox.len();
        inner.outbox.retain(|e| !seqs.contains(&e.seq));
        Ok((before - inner.outbox.len()) as u64)
    }

    fn len(&self) -> u64 {
        self.lock().outbox.len() as u64
    }

    fn capacity(&self) -> u64 {
        self.lock().capacity
    }

    fn dropped_total(&self) -> u64 {
        self.lock().dropped_total
    }

    fn dropped_precious_total(&self) -> u64 {
        self.lock().dropped_precious_total
    }

    fn command(&self, id: &str) -> Result<Option<CommandRecord>, StoreError> {
        Ok(self.lock().commands.get(id).cloned())
    }

    fn unfinished_commands(&self) -> Result<Vec<String>, StoreError> {
        let mut ids: Vec<String> = self
            .lock()
            .commands
            .iter()
            .filter(|(_, r)| **r == CommandRecord::Started)
            .map(|(id, _)| id.clone())
            .collect();
        ids.sort();
        Ok(ids)
    }

    fn command_started(&mut self, id: &str) -> Result<(), StoreError> {
        let mut inner = self.lock();
        inner.begin_write()?;
        inner.log(|s| Undo::Command {
            id: id.to_owned(),
            previous: s.commands.get(id).cloned(),
            order: s.command_order.clone(),
        });
        inner.set_command(id, CommandRecord::Started);
        Ok(())
    }

    fn command_done(
        &mut self,
        id: &str,
        result: Vec<u8>,
        entry: Entry,
    ) -> Result<Pushed, StoreError> {
        let mut inner = self.lock();
        inner.begin_write()?;
        inner.log(|s| {
            Undo::Many(vec![
                s.snapshot_state(),
                Undo::Command {
                    id: id.to_owned(),
                    previous: s.commands.get(id).cloned(),
                    order: s.command_order.clone(),
                },
            ])
        });
        inner.set_command(id, CommandRecord::Done(result));
        Ok(inner.push(vec![entry]))
    }

    fn doc(&self, name: &str) -> Result<Option<Value>, StoreError> {
        Ok(self.lock().docs.get(name).cloned())
    }

    fn put_doc(&mut self, name: &str, value: &Value) -> Result<(), StoreError> {
        let mut inner = self.lock();
        inner.begin_write()?;
        inner.log(|s| Undo::Doc {
            name: name.to_owned(),
            previous: s.docs.get(name).cloned(),
        });
        inner.docs.insert(name.to_owned(), value.clone());
        Ok(())
    }
}

/// A conformance suite every [`AgentStore`] implementation passes. `open` must return a
/// store with capacity 3 and first seq 1; `reopen` (if the backend persists) the same store
/// again, as after a restart.
#[doc(hidden)]
pub fn conformance<S: AgentStore>(
    open: impl Fn() -> S,
    reopen: impl Fn() -> S,
) -> Result<(), StoreError> {
    let e = |seq: u64, t: &str| Entry {
        seq,
        topic: (!t.is_empty()).then(|| t.to_owned()),
        payload: format!("p{seq}").into_bytes(),
    };
    let mut s = open();
    assert_eq!(s.next_seq(), 1);
    assert_eq!(
        s.push(vec![e(1, ""), e(2, "a/b")])?,
        Pushed { seq: 2, dropped: 0 }
    );
    assert_eq!(s.peek_after(0, 10)?, vec![e(1, ""), e(2, "a/b")]);
    assert_eq!(
        s.push(vec![e(3, ""), e(4, "")])?,
        Pushed { seq: 4, dropped: 1 }
    );
    assert_eq!(s.dropped_total(), 1);
    let seqs: Vec<u64> = s.peek_after(0, 10)?.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, vec![2, 3, 4]);
    assert_eq!(s.peek_after(2, 1)?, vec![e(3, "")]);
    assert_eq!(s.ack(&[3, 99])?, 1);
    assert_eq!(s.len(), 2);
    // Commands: started, then done (result + outbox entry together).
    assert_eq!(s.command("c1")?, None);
    s.command_started("c1")?;
    assert_eq!(s.command("c1")?, Some(CommandRecord::Started));
    assert_eq!(s.unfinished_commands()?, vec!["c1".to_owned()]);
    let pushed = s.command_done("c1", b"{\"status\":\"succeeded\"}".to_vec(), e(5, "r"))?;
    assert_eq!(pushed.seq, 5);
    assert_eq!(
        s.command("c1")?,
        Some(CommandRecord::Done(b"{\"status\":\"succeeded\"}".to_vec()))
    );
    assert!(s.unfinished_commands()?.is_empty());
    s.put_doc("config", &serde_json::json!({"a": 1}))?;
    drop(s);
    let mut s = reopen();
    assert_eq!(s.next_seq(), 6, "seq survives a restart");
    let seqs: Vec<u64> = s.peek_after(0, 10)?.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, vec![2, 4, 5]);
    assert_eq!(s.peek_after(4, 10)?[0].topic.as_deref(), Some("r"));
    assert!(matches!(s.command("c1")?, Some(CommandRecord::Done(_))));
    assert_eq!(s.doc("config")?, Some(serde_json::json!({"a": 1})));
    assert_eq!(s.doc("nope")?, None);
    // Executed ids are bounded: the oldest is forgotten.
    for i in 0..EXECUTED_COMMANDS_MAX + 5 {
        s.command_started(&format!("x{i}"))?;
    }
    assert_eq!(s.command("c1")?, None, "oldest record forgotten");
    assert_eq!(s.command("x4")?, None);
    assert_eq!(s.command("x5")?, Some(CommandRecord::Started));
    // Full: the oldest telemetry (the device's own or a child's) goes first; results and
    // status reports only when nothing else is left, counted apart (and kept across restarts).
    let present: Vec<u64> = s.peek_after(0, 10)?.iter().map(|e| e.seq).collect();
    s.ack(&present)?;
    let (d0, p0) = (s.dropped_total(), s.dropped_precious_total());
    let n = s.next_seq();
    s.push(vec![
        e(n, ""),
        e(n + 1, "devices/x/commands/c/result"),
        e(n + 2, "devices/kid/telemetry"),
    ])?;
    assert_eq!(s.push(vec![e(n + 3, "devices/x/ota/status")])?.dropped, 1);
    assert_eq!(
        s.push(vec![e(n + 4, "devices/x/commands/d/result")])?
            .dropped,
        1
    );
    let kept: Vec<u64> = s.peek_after(0, 10)?.iter().map(|e| e.seq).collect();
    assert_eq!(kept, vec![n + 1, n + 3, n + 4], "telemetry went first");
    assert_eq!(s.dropped_precious_total(), p0);
    assert_eq!(s.push(vec![e(n + 5, "r2")])?.dropped, 1);
    let kept: Vec<u64> = s.peek_after(0, 10)?.iter().map(|e| e.seq).collect();
    assert_eq!(
        kept,
        vec![n + 3, n + 4, n + 5],
        "then the oldest of anything"
    );
    assert_eq!(
        (s.dropped_total(), s.dropped_precious_total()),
        (d0 + 3, p0 + 1)
    );
    drop(s);
    let s = reopen();
    assert_eq!(
        (s.dropped_total(), s.dropped_precious_total()),
        (d0 + 3, p0 + 1)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_store_passes_conformance() -> Result<(), StoreError> {
        let store = MemStore::new(3, 1)?;
        conformance(|| store.clone(), || store.clone())
    }

    #[test]
    fn injected_write_failures_change_nothing_and_are_deterministic() -> Result<(), StoreError> {
        let run = |seed| -> Result<Vec<bool>, StoreError> {
            let mut s = MemStore::new(100, 1)?.with_faults(Faults {
                write_fail_rate: 0.5,
                unsynced_ops: 0,
                seed,
            });
            let mut outcomes = Vec::new();
            for _ in 0..40 {
                let seq = s.next_seq();
                let before = s.len();
                let ok = s
                    .push(vec![Entry {
                        seq,
                        topic: None,
                        payload: vec![],
                    }])
                    .is_ok();
                assert_eq!(s.len(), before + u64::from(ok));
                outcomes.push(ok);
            }
            Ok(outcomes)
        };
        let a = run(7)?;
        assert_eq!(a, run(7)?, "same seed, same faults");
        assert!(a.iter().any(|ok| *ok) && a.iter().any(|ok| !ok));
        Ok(())
    }

    #[test]
    fn power_loss_undoes_only_unsynced_writes() -> Result<(), StoreError> {
        let entry = |seq| Entry {
            seq,
            topic: None,
            payload: vec![],
        };
        // Honest flash: nothing acknowledged is lost.
        let mut s = MemStore::new(100, 1)?;
        s.push(vec![entry(1)])?;
        assert_eq!(s.power_loss(), 0);
        assert_eq!(s.len(), 1);
        // Lying flash: the last (up to) 2 writes vanish.
        let mut s = MemStore::new(100, 1)?.with_faults(Faults {
            write_fail_rate: 0.0,
            unsynced_ops: 2,
            seed: 1,
        });
        s.push(vec![entry(1)])?;
        s.push(vec![entry(2)])?;
        s.push(vec![entry(3)])?; // sync point before this one
        s.command_started("c1")?;
        assert_eq!(s.power_loss(), 2);
        assert_eq!(s.len(), 2);
        assert_eq!(s.next_seq(), 3);
        assert_eq!(s.command("c1")?, None);
        Ok(())
    }
}
