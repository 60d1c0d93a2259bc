//! The durable, bounded outbox: every message is written here (fsynced) before any send.
//!
//! One SQLite file (`outbox.sqlite3` in the state dir), WAL journal, `synchronous=FULL`, so a
//! message returned from [`Outbox::push`] survives a crash or power loss. Each message gets the
//! next `seq`; the next seq is persisted in the same transaction as the message, so a seq is
//! never reused across restarts even when the outbox has been drained empty. Entries leave only
//! through [`Outbox::ack`] (after the server's PUBACK) or by being the oldest when the outbox is
//! full ([`Outbox::push`] then drops them, counts them and reports how many).

use rusqlite::{params, Connection, OptionalExtension};
use std::path::Path;

/// File name of the outbox database inside the state dir.
pub const OUTBOX_FILE_NAME: &str = "outbox.sqlite3";

/// Why an outbox operation failed. Every variant means the disk or the database is unusable.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("outbox database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("outbox capacity must be at least 1")]
    ZeroCapacity,
}

/// One queued message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub seq: u64,
    pub payload: Vec<u8>,
}

/// What [`Outbox::push`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pushed {
    /// The seq given to the new message.
    pub seq: u64,
    /// How many of the oldest entries were dropped to make room (0 unless full).
    pub dropped: u64,
}

/// The durable queue. Not shared: one owner (the agent's main loop) calls it.
#[derive(Debug)]
pub struct Outbox {
    conn: Connection,
    capacity: u64,
    len: u64,
    next_seq: u64,
    dropped_total: u64,
}

impl Outbox {
    /// Opens (or creates) the outbox in `state_dir`. `capacity` is the most messages kept.
    /// `first_seq` is the seq given to the first message of a brand-new outbox; an existing
    /// outbox continues from its persisted next seq and ignores it.
    pub fn open(state_dir: &Path, capacity: u64, first_seq: u64) -> Result<Self, OutboxError> {
        Self::open_file(&state_dir.join(OUTBOX_FILE_NAME), capacity, first_seq)
    }

    /// Like [`Outbox::open`] with an explicit database file path.
    pub fn open_file(path: &Path, capacity: u64, first_seq: u64) -> Result<Self, OutboxError> {
        if capacity == 0 {
            return Err(OutboxError::ZeroCapacity);
        }
        let conn = Connection::open(path)?;
        // WAL + FULL: a committed push is on disk before push() returns.
        let _mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
        conn.execute_batch(
            "PRAGMA synchronous=FULL;
             PRAGMA busy_timeout=5000;
             CREATE TABLE IF NOT EXISTS outbox (
                 seq     INTEGER PRIMARY KEY,
                 payload BLOB NOT NULL
             );
             CREATE TABLE IF NOT EXISTS meta (
                 key   TEXT PRIMARY KEY,
                 value INTEGER NOT NULL
             );",
        )?;
        let first_seq = first_seq.max(1);
        conn.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('next_seq', ?1)",
            params![to_sql_u64(first_seq)],
        )?;
        conn.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('dropped_total', 0)",
            [],
        )?;
        let mut next_seq = read_meta(&conn, "next_seq")?;
        let dropped_total = read_meta(&conn, "dropped_total")?;
        // Never hand out a seq at or below one still in the table (a hand-edited meta row,
        // or a database from before next_seq was persisted).
        let max_seq: Option<i64> =
            conn.query_row("SELECT MAX(seq) FROM outbox", [], |r| r.get(0))?;
        if let Some(max_seq) = max_seq {
            next_seq = next_seq.max(from_sql_u64(max_seq) + 1);
        }
        let len: i64 = conn.query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get(0))?;
        Ok(Self {
            conn,
            capacity,
            len: from_sql_u64(len),
            next_seq,
            dropped_total,
        })
    }

    /// Appends a message. `make_payload` receives the seq the message gets (so the payload
    /// can carry it). When the outbox is full the oldest entries are dropped first.
    pub fn push(
        &mut self,
        make_payload: impl FnOnce(u64) -> Vec<u8>,
    ) -> Result<Pushed, OutboxError> {
        self.push_batch([make_payload])
    }

    /// Appends several messages in one transaction (one fsync), with consecutive seqs in
    /// iteration order. Returns the seq of the last one (the next seq minus one if `makers`
    /// is empty) and how many old entries were dropped.
    pub fn push_batch<F: FnOnce(u64) -> Vec<u8>>(
        &mut self,
        makers: impl IntoIterator<Item = F>,
    ) -> Result<Pushed, OutboxError> {
        let mut seq = self.next_seq;
        let mut added = 0u64;
        let tx = self.conn.transaction()?;
        {
            let mut insert =
                tx.prepare_cached("INSERT INTO outbox (seq, payload) VALUES (?1, ?2)")?;
            for make_payload in makers {
                let payload = make_payload(seq);
                insert.execute(params![to_sql_u64(seq), payload])?;
                seq += 1;
                added += 1;
            }
        }
        let mut dropped = 0;
        let len = self.len + added;
        if len > self.capacity {
            dropped = tx.execute(
                "DELETE FROM outbox WHERE seq IN (SELECT seq FROM outbox ORDER BY seq LIMIT ?1)",
                params![to_sql_u64(len - self.capacity)],
            )? as u64;
            tx.execute(
                "UPDATE meta SET value = value + ?1 WHERE key = 'dropped_total'",
                params![to_sql_u64(dropped)],
            )?;
        }
        tx.execute(
            "UPDATE meta SET value = ?1 WHERE key = 'next_seq'",
            params![to_sql_u64(seq)],
        )?;
        tx.commit()?;
        self.next_seq = seq;
        self.len = len - dropped;
        self.dropped_total += dropped;
        assert!(self.len <= self.capacity, "outbox over capacity");
        Ok(Pushed {
            seq: seq.saturating_sub(1),
            dropped,
        })
    }

    /// The oldest `n` entries, in seq order.
    pub fn peek_batch(&self, n: usize) -> Result<Vec<Entry>, OutboxError> {
        self.peek_batch_after(0, n)
    }

    /// Up to `n` entries with a seq greater than `after`, in seq order.
    pub fn peek_batch_after(&self, after: u64, n: usize) -> Result<Vec<Entry>, OutboxError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT seq, payload FROM outbox WHERE seq > ?1 ORDER BY seq LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![to_sql_u64(after), n as i64], |r| {
            Ok(Entry {
                seq: from_sql_u64(r.get(0)?),
                payload: r.get(1)?,
            })
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// Removes the entry `seq` (its PUBACK arrived). Returns false if it was not there
    /// (already acked, or dropped because the outbox was full).
    pub fn ack(&mut self, seq: u64) -> Result<bool, OutboxError> {
        Ok(self.ack_many(&[seq])? == 1)
    }

    /// Removes every listed entry in one transaction; returns how many were there.
    pub fn ack_many(&mut self, seqs: &[u64]) -> Result<u64, OutboxError> {
        if seqs.is_empty() {
            return Ok(0);
        }
        let tx = self.conn.transaction()?;
        let mut removed = 0u64;
        {
            let mut delete = tx.prepare_cached("DELETE FROM outbox WHERE seq = ?1")?;
            for seq in seqs {
                removed += delete.execute(params![to_sql_u64(*seq)])? as u64;
            }
        }
        tx.commit()?;
        self.len -= removed;
        Ok(removed)
    }

    /// Number of queued messages.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The seq the next pushed message will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Messages ever dropped because the outbox was full (persisted).
    pub fn dropped_total(&self) -> u64 {
        self.dropped_total
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }
}

fn read_meta(conn: &Connection, key: &str) -> Result<u64, OutboxError> {
    let v: Option<i64> = conn
        .query_row("SELECT value FROM meta WHERE key = ?1", params![key], |r| {
            r.get(0)
        })
        .optional()?;
    Ok(v.map(from_sql_u64).unwrap_or(0))
}

// SQLite integers are i64; seqs stay far below i64::MAX (they start near unix-ms × 1000).
fn to_sql_u64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn from_sql_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(s: &str) -> impl FnOnce(u64) -> Vec<u8> + '_ {
        move |seq| format!("{s}:{seq}").into_bytes()
    }

    fn seqs(entries: &[Entry]) -> Vec<u64> {
        entries.iter().map(|e| e.seq).collect()
    }

    #[test]
    fn pushes_get_increasing_seqs_and_peek_in_order() -> Result<(), OutboxError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut ob = Outbox::open(dir.path(), 100, 1)?;
        let a = ob.push(payload("a"))?;
        let b = ob.push(payload("b"))?;
        let c = ob.push(payload("c"))?;
        assert_eq!((a.seq, b.seq, c.seq), (1, 2, 3));
        assert_eq!(ob.len(), 3);
        let batch = ob.peek_batch(10)?;
        assert_eq!(seqs(&batch), vec![1, 2, 3]);
        assert_eq!(batch[1].payload, b"b:2".to_vec());
        assert_eq!(seqs(&ob.peek_batch(2)?), vec![1, 2]);
        assert_eq!(seqs(&ob.peek_batch_after(1, 10)?), vec![2, 3]);
        assert!(ob.peek_batch_after(3, 10)?.is_empty());
        Ok(())
    }

    #[test]
    fn ack_removes_only_that_entry() -> Result<(), OutboxError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut ob = Outbox::open(dir.path(), 100, 1)?;
        for s in ["a", "b", "c"] {
            ob.push(payload(s))?;
        }
        assert!(ob.ack(2)?);
        assert!(!ob.ack(2)?, "second ack of the same seq is a no-op");
        assert!(!ob.ack(99)?);
        assert_eq!(ob.ack_many(&[])?, 0);
        assert_eq!(ob.len(), 2);
        assert_eq!(seqs(&ob.peek_batch(10)?), vec![1, 3]);
        ob.ack(1)?;
        ob.ack(3)?;
        assert!(ob.is_empty());
        Ok(())
    }

    #[test]
    fn reopen_keeps_unacked_entries_and_continues_seq() -> Result<(), OutboxError> {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let mut ob = Outbox::open(dir.path(), 100, 1000)?;
            for s in ["a", "b", "c"] {
                ob.push(payload(s))?;
            }
            ob.ack(1000)?;
        }
        let mut ob = Outbox::open(dir.path(), 100, 1)?;
        assert_eq!(ob.len(), 2);
        assert_eq!(seqs(&ob.peek_batch(10)?), vec![1001, 1002]);
        assert_eq!(ob.push(payload("d"))?.seq, 1003);
        Ok(())
    }

    #[test]
    fn seq_is_not_reused_after_draining_empty_and_reopening() -> Result<(), OutboxError> {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let mut ob = Outbox::open(dir.path(), 100, 1)?;
            let s = ob.push(payload("a"))?.seq;
            ob.ack(s)?;
            assert!(ob.is_empty());
        }
        let mut ob = Outbox::open(dir.path(), 100, 1)?;
        assert_eq!(ob.push(payload("b"))?.seq, 2);
        Ok(())
    }

    #[test]
    fn full_outbox_drops_oldest_and_counts() -> Result<(), OutboxError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut ob = Outbox::open(dir.path(), 3, 1)?;
        for s in ["a", "b", "c"] {
            assert_eq!(ob.push(payload(s))?.dropped, 0);
        }
        let d = ob.push(payload("d"))?;
        assert_eq!(d, Pushed { seq: 4, dropped: 1 });
        ob.push(payload("e"))?;
        assert_eq!(ob.len(), 3);
        assert_eq!(seqs(&ob.peek_batch(10)?), vec![3, 4, 5]);
        assert_eq!(ob.dropped_total(), 2);
        drop(ob);
        // A smaller capacity on reopen trims on the next push.
        let mut ob = Outbox::open(dir.path(), 2, 1)?;
        assert_eq!(ob.dropped_total(), 2);
        let f = ob.push(payload("f"))?;
        assert_eq!(f, Pushed { seq: 6, dropped: 2 });
        assert_eq!(seqs(&ob.peek_batch(10)?), vec![5, 6]);
        Ok(())
    }

    #[test]
    fn batch_push_and_ack_are_consecutive_and_bounded() -> Result<(), OutboxError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut ob = Outbox::open(dir.path(), 4, 10)?;
        let pushed = ob.push_batch(["a", "b", "c"].map(payload))?;
        assert_eq!(
            pushed,
            Pushed {
                seq: 12,
                dropped: 0
            }
        );
        let pushed = ob.push_batch(["d", "e", "f"].map(payload))?;
        assert_eq!(
            pushed,
            Pushed {
                seq: 15,
                dropped: 2
            }
        );
        assert_eq!(seqs(&ob.peek_batch(10)?), vec![12, 13, 14, 15]);
        assert_eq!(ob.peek_batch(1)?[0].payload, b"c:12".to_vec());
        assert_eq!(ob.ack_many(&[13, 15, 99])?, 2);
        assert_eq!(seqs(&ob.peek_batch(10)?), vec![12, 14]);
        assert_eq!(ob.len(), 2);
        Ok(())
    }

    #[test]
    fn zero_capacity_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(matches!(
            Outbox::open(dir.path(), 0, 1),
            Err(OutboxError::ZeroCapacity)
        ));
    }
}
