//! [`SqliteStore`]: the production [`AgentStore`], one SQLite file in the state dir (WAL, `synchronous=FULL`).
//!
//! `outbox.sqlite3` holds the outbox (`seq`, `topic`, `payload`), the persisted next seq, the
//! executed-command records and small JSON documents. Every write is one transaction, so a
//! call that returned `Ok` survives a crash or power loss. The next seq is persisted in the
//! same transaction as the messages, so a seq is never reused even after the outbox drained.
//! Outboxes written by agent 0.1 (no `topic` column) are migrated in place: their rows are
//! telemetry.

use crate::store::{AgentStore, CommandRecord, Entry, Pushed, StoreError, EXECUTED_COMMANDS_MAX};
use rusqlite::{params, Connection, OptionalExtension};
use serde_json::Value;
use std::io::Write as _;
use std::path::{Path, PathBuf};

/// File name of the state database inside the state dir.
pub const OUTBOX_FILE_NAME: &str = "outbox.sqlite3";

/// The durable store. Not shared: one owner calls it (the agent wraps it in a mutex).
#[derive(Debug)]
pub struct SqliteStore {
    conn: Connection,
    /// Where named JSON documents live (`<name>.json`): the state dir.
    docs_dir: PathBuf,
    capacity: u64,
    len: u64,
    next_seq: u64,
    dropped_total: u64,
    dropped_precious_total: u64,
}

impl SqliteStore {
    /// Opens (or creates) the store in `state_dir`. `capacity` is the most messages kept.
    /// `first_seq` is the seq given to the first message of a brand-new outbox; an existing
    /// one continues from its persisted next seq.
    pub fn open(state_dir: &Path, capacity: u64, first_seq: u64) -> Result<Self, StoreError> {
        Self::open_file(&state_dir.join(OUTBOX_FILE_NAME), capacity, first_seq)
    }

    /// Like [`SqliteStore::open`] with an explicit database file path.
    pub fn open_file(path: &Path, capacity: u64, first_seq: u64) -> Result<Self, StoreError> {
        if capacity == 0 {
            return Err(StoreError::ZeroCapacity);
        }
        let conn = Connection::open(path)?;
        // WAL + FULL: a committed write is on disk before the call returns.
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
             );
             CREATE TABLE IF NOT EXISTS commands (
                 ord    INTEGER PRIMARY KEY AUTOINCREMENT,
                 id     TEXT NOT NULL UNIQUE,
                 result BLOB
             );
",
        )?;
        let has_topic: bool = conn
            .prepare("SELECT 1 FROM pragma_table_info('outbox') WHERE name = 'topic'")?
            .exists([])?;
        if !has_topic {
            conn.execute_batch("ALTER TABLE outbox ADD COLUMN topic TEXT")?;
        }
        let first_seq = first_seq.max(1);
        conn.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('next_seq', ?1)",
            params![to_sql_u64(first_seq)],
        )?;
        conn.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('dropped_total', 0)",
            [],
        )?;
        conn.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('dropped_precious_total', 0)",
            [],
        )?;
        let mut next_seq = read_meta(&conn, "next_seq")?;
        let dropped_total = read_meta(&conn, "dropped_total")?;
        let dropped_precious_total = read_meta(&conn, "dropped_precious_total")?;
        // Never hand out a seq at or below one still in the table.
        let max_seq: Option<i64> =
            conn.query_row("SELECT MAX(seq) FROM outbox", [], |r| r.get(0))?;
        if let Some(max_seq) = max_seq {
            next_seq = next_seq.max(from_sql_u64(max_seq) + 1);
        }
        let len: i64 = conn.query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get(0))?;
        Ok(Self {
            conn,
            docs_dir: path.parent().map(Path::to_path_buf).unwrap_or_default(),
            capacity,
            len: from_sql_u64(len),
            next_seq,
            dropped_total,
            dropped_precious_total,
        })
    }
}

/// What [`push_in`] did: the new next seq and length, the entries dropped, and of those the
/// ones that were not telemetry.
struct PushedIn {
    next_seq: u64,
    len: u64,
    dropped: u64,
    precious: u64,
}

/// Inserts `entries` and trims to `capacity` inside `tx`: the oldest telemetry first, then (only
/// if no telemetry is left) the oldest of anything.
fn push_in(
    tx: &rusqlite::Transaction<'_>,
    mut next_seq: u64,
    len: u64,
    capacity: u64,
    entries: Vec<Entry>,
) -> Result<PushedIn, StoreError> {
    let mut added = 0u64;
    {
        let mut insert =
            tx.prepare_cached("INSERT INTO outbox (seq, topic, payload) VALUES (?1, ?2, ?3)")?;
        for e in entries {
            assert_eq!(
                e.seq, next_seq,
                "outbox entries must be pushed in seq order"
            );
            insert.execute(params![to_sql_u64(e.seq), e.topic, e.payload])?;
            next_seq += 1;
            added += 1;
        }
    }
    let (mut dropped, mut precious) = (0, 0);
    let len = len + added;
    if len > capacity {
        dropped = tx.execute(
            "DELETE FROM outbox WHERE seq IN (SELECT seq FROM outbox \
             WHERE topic IS NULL OR topic LIKE '%/telemetry' ORDER BY seq LIMIT ?1)",
            params![to_sql_u64(len - capacity)],
        )? as u64;
        if len - dropped > capacity {
            precious = tx.execute(
                "DELETE FROM outbox WHERE seq IN (SELECT seq FROM outbox ORDER BY seq LIMIT ?1)",
                params![to_sql_u64(len - dropped - capacity)],
            )? as u64;
            dropped += precious;
            tx.execute(
                "UPDATE meta SET value = value + ?1 WHERE key = 'dropped_precious_total'",
                params![to_sql_u64(precious)],
            )?;
        }
        tx.execute(
            "UPDATE meta SET value = value + ?1 WHERE key = 'dropped_total'",
            params![to_sql_u64(dropped)],
        )?;
    }
    tx.execute(
        "UPDATE meta SET value = ?1 WHERE key = 'next_seq'",
        params![to_sql_u64(next_seq)],
    )?;
    Ok(PushedIn {
        next_seq,
        len: len - dropped,
        dropped,
        precious,
    })
}

impl SqliteStore {
    /// Takes what a committed [`push_in`] did.
    fn pushed(&mut self, p: PushedIn) -> Pushed {
        self.next_seq = p.next_seq;
        self.len = p.len;
        self.dropped_total += p.dropped;
        self.dropped_precious_total += p.precious;
        assert!(self.len <= self.capacity, "outbox over capacity");
        Pushed {
            seq: p.next_seq.saturating_sub(1),
            dropped: p.dropped,
        }
    }
}

impl AgentStore for SqliteStore {
    fn next_seq(&self) -> u64 {
        self.next_seq
    }

    fn push(&mut self, entries: Vec<Entry>) -> Result<Pushed, StoreError> {
        let tx = self.conn.transaction()?;
        let pushed = push_in(&tx, self.next_seq, self.len, self.capacity, entries)?;
        tx.commit()?;
        Ok(self.pushed(pushed))
    }

    fn peek_after(&self, after: u64, n: usize) -> Result<Vec<Entry>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT seq, topic, payload FROM outbox WHERE seq > ?1 ORDER BY seq LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![to_sql_u64(after), n as i64], |r| {
            Ok(Entry {
                seq: from_sql_u64(r.get(0)?),
                topic: r.get(1)?,
                payload: r.get(2)?,
            })
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    fn ack(&mut self, seqs: &[u64]) -> Result<u64, StoreError> {
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

    fn len(&self) -> u64 {
        self.len
    }

    fn capacity(&self) -> u64 {
        self.capacity
    }

    fn dropped_total(&self) -> u64 {
        self.dropped_total
    }

    fn dropped_precious_total(&self) -> u64 {
        self.dropped_precious_total
    }

    fn command(&self, id: &str) -> Result<Option<CommandRecord>, StoreError> {
        let row: Option<Option<Vec<u8>>> = self
            .conn
            .query_row(
                "SELECT result FROM commands WHERE id = ?1",
                params![id],
                |r| r.get(0),
            )
            .optional()?;
        Ok(row.map(|result| match result {
            Some(bytes) => CommandRecord::Done(bytes),
            None => CommandRecord::Started,
        }))
    }

    fn unfinished_commands(&self) -> Result<Vec<String>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT id FROM commands WHERE result IS NULL ORDER BY id")?;
        let ids = stmt
            .query_map([], |r| r.get(0))?
            .collect::<Result<Vec<String>, _>>()?;
        Ok(ids)
    }

    fn command_started(&mut self, id: &str) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        tx.execute(
            "INSERT OR IGNORE INTO commands (id, result) VALUES (?1, NULL)",
            params![id],
        )?;
        trim_commands(&tx)?;
        tx.commit()?;
        Ok(())
    }

    fn command_done(
        &mut self,
        id: &str,
        result: Vec<u8>,
        entry: Entry,
    ) -> Result<Pushed, StoreError> {
        let tx = self.conn.transaction()?;
        tx.execute(
            "INSERT INTO commands (id, result) VALUES (?1, ?2)
             ON CONFLICT(id) DO UPDATE SET result = excluded.result",
            params![id, result],
        )?;
        trim_commands(&tx)?;
        let pushed = push_in(&tx, self.next_seq, self.len, self.capacity, vec![entry])?;
        tx.commit()?;
        Ok(self.pushed(pushed))
    }

    fn doc(&self, name: &str) -> Result<Option<Value>, StoreError> {
        let path = self.doc_path(name)?;
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| StoreError::Corrupt(format!("{}: {e}", path.display())))
    }

    fn put_doc(&mut self, name: &str, value: &Value) -> Result<(), StoreError> {
        // Write a temp file, fsync it, rename over the old one, fsync the directory: a reader
        // (or a power loss) sees the old or the new document, never half of one.
        let path = self.doc_path(name)?;
        let tmp = path.with_extension("json.tmp");
        {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&serde_json::to_vec_pretty(value).unwrap_or_default())?;
            f.write_all(b"\n")?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &path)?;
        if let Ok(dir) = std::fs::File::open(&self.docs_dir) {
            dir.sync_all()?;
        }
        Ok(())
    }
}

impl SqliteStore {
    /// `<state dir>/<name>.json`; names are ours (`config`, `desired`), checked anyway.
    fn doc_path(&self, name: &str) -> Result<PathBuf, StoreError> {
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(StoreError::Corrupt(format!("bad document name {name:?}")));
        }
        Ok(self.docs_dir.join(format!("{name}.json")))
    }
}

/// Forgets the oldest command records beyond [`EXECUTED_COMMANDS_MAX`].
fn trim_commands(tx: &rusqlite::Transaction<'_>) -> Result<(), StoreError> {
    tx.execute(
        "DELETE FROM commands WHERE ord <= (SELECT MAX(ord) FROM commands) - ?1",
        params![EXECUTED_COMMANDS_MAX as i64],
    )?;
    Ok(())
}

fn read_meta(conn: &Connection, key: &str) -> Result<u64, StoreError> {
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

    fn entry(seq: u64, s: &str) -> Entry {
        Entry {
            seq,
            topic: None,
            payload: format!("{s}:{seq}").into_bytes(),
        }
    }

    fn seqs(entries: &[Entry]) -> Vec<u64> {
        entries.iter().map(|e| e.seq).collect()
    }

    #[test]
    fn sqlite_store_passes_conformance() -> Result<(), StoreError> {
        let dir = tempfile::tempdir().expect("tempdir");
        crate::store::conformance(
            || SqliteStore::open(dir.path(), 3, 1).expect("open"),
            || SqliteStore::open(dir.path(), 3, 1).expect("reopen"),
        )
    }

    #[test]
    fn reopen_keeps_unacked_entries_and_continues_seq() -> Result<(), StoreError> {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let mut ob = SqliteStore::open(dir.path(), 100, 1000)?;
            ob.push(vec![entry(1000, "a"), entry(1001, "b"), entry(1002, "c")])?;
            ob.ack(&[1000])?;
        }
        let mut ob = SqliteStore::open(dir.path(), 100, 1)?;
        assert_eq!(ob.len(), 2);
        assert_eq!(seqs(&ob.peek_after(0, 10)?), vec![1001, 1002]);
        assert_eq!(ob.push(vec![entry(1003, "d")])?.seq, 1003);
        Ok(())
    }

    #[test]
    fn seq_is_not_reused_after_draining_empty_and_reopening() -> Result<(), StoreError> {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let mut ob = SqliteStore::open(dir.path(), 100, 1)?;
            let s = ob.push(vec![entry(1, "a")])?.seq;
            ob.ack(&[s])?;
            assert!(ob.is_empty());
        }
        let ob = SqliteStore::open(dir.path(), 100, 1)?;
        assert_eq!(ob.next_seq(), 2);
        Ok(())
    }

    #[test]
    fn full_outbox_drops_oldest_and_a_smaller_capacity_trims_on_next_push() -> Result<(), StoreError>
    {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut ob = SqliteStore::open(dir.path(), 3, 1)?;
        ob.push(vec![entry(1, "a"), entry(2, "b"), entry(3, "c")])?;
        assert_eq!(ob.push(vec![entry(4, "d")])?, Pushed { seq: 4, dropped: 1 });
        assert_eq!(ob.dropped_total(), 1);
        drop(ob);
        let mut ob = SqliteStore::open(dir.path(), 2, 1)?;
        assert_eq!(ob.dropped_total(), 1);
        assert_eq!(ob.push(vec![entry(5, "e")])?, Pushed { seq: 5, dropped: 2 });
        assert_eq!(seqs(&ob.peek_after(0, 10)?), vec![4, 5]);
        Ok(())
    }

    #[test]
    fn an_outbox_from_agent_0_1_is_migrated_and_its_rows_are_telemetry() -> Result<(), StoreError> {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let conn = Connection::open(dir.path().join(OUTBOX_FILE_NAME))?;
            conn.execute_batch(
                "CREATE TABLE outbox (seq INTEGER PRIMARY KEY, payload BLOB NOT NULL);
                 CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
                 INSERT INTO meta VALUES ('next_seq', 8), ('dropped_total', 0);
                 INSERT INTO outbox VALUES (7, X'7B7D');",
            )?;
        }
        let ob = SqliteStore::open(dir.path(), 10, 1)?;
        assert_eq!(
            ob.peek_after(0, 10)?,
            vec![Entry {
                seq: 7,
                topic: None,
                payload: b"{}".to_vec()
            }]
        );
        assert_eq!(ob.next_seq(), 8);
        Ok(())
    }

    #[test]
    fn zero_capacity_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(matches!(
            SqliteStore::open(dir.path(), 0, 1),
            Err(StoreError::ZeroCapacity)
        ));
    }
}
