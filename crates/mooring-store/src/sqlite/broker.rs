//! [`BrokerStateStore`] for SQLite: three key → blob tables, one transaction per batch.

use rusqlite::{params, OptionalExtension};

use super::{Db, SqliteStore};
use crate::error::{Result, StoreError};
use crate::model::{BrokerOp, BrokerState, StoredSession};
use crate::store::BrokerStateStore;

fn seq_to_sql(seq: u64) -> Result<i64> {
    i64::try_from(seq).map_err(|_| StoreError::InvalidInput(format!("message seq {seq} too large")))
}

#[async_trait::async_trait]
impl BrokerStateStore for SqliteStore {
    async fn apply_broker_ops(&self, ops: Vec<BrokerOp>) -> Result<()> {
        if ops.is_empty() {
            return Ok(());
        }
        self.write(move |conn| {
            // The group commit runs this write in a savepoint of its own.
            let tx: &rusqlite::Connection = conn;
            for op in &ops {
                match op {
                    BrokerOp::PutRetained { topic, value } => tx
                        .prepare_cached(
                            "INSERT OR REPLACE INTO broker_retained (topic, value) VALUES (?1, ?2)",
                        )
                        .db()?
                        .execute(params![topic, value])
                        .db()?,
                    BrokerOp::DeleteRetained { topic } => tx
                        .prepare_cached("DELETE FROM broker_retained WHERE topic = ?1")
                        .db()?
                        .execute(params![topic])
                        .db()?,
                    BrokerOp::PutSession { key, value } => tx
                        .prepare_cached(
                            "INSERT OR REPLACE INTO broker_sessions (key, value) VALUES (?1, ?2)",
                        )
                        .db()?
                        .execute(params![key, value])
                        .db()?,
                    BrokerOp::DeleteSession { key } => {
                        tx.prepare_cached("DELETE FROM broker_messages WHERE session = ?1")
                            .db()?
                            .execute(params![key])
                            .db()?;
                        tx.prepare_cached("DELETE FROM broker_sessions WHERE key = ?1")
                            .db()?
                            .execute(params![key])
                            .db()?
                    }
                    BrokerOp::PutMessage {
                        session,
                        seq,
                        value,
                    } => tx
                        .prepare_cached(
                            "INSERT OR REPLACE INTO broker_messages (session, seq, value) \
                             VALUES (?1, ?2, ?3)",
                        )
                        .db()?
                        .execute(params![session, seq_to_sql(*seq)?, value])
                        .db()?,
                    BrokerOp::DeleteMessage { session, seq } => tx
                        .prepare_cached(
                            "DELETE FROM broker_messages WHERE session = ?1 AND seq = ?2",
                        )
                        .db()?
                        .execute(params![session, seq_to_sql(*seq)?])
                        .db()?,
                };
            }
            Ok(())
        })
        .await
    }

    async fn load_broker_state(&self) -> Result<BrokerState> {
        self.write(|conn| {
            conn.execute(
                "DELETE FROM broker_messages WHERE session NOT IN (SELECT key FROM broker_sessions)",
                [],
            )
            .db()?;
            let retained = conn
                .prepare("SELECT topic, value FROM broker_retained ORDER BY topic")
                .db()?
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .db()?
                .collect::<rusqlite::Result<Vec<(String, Vec<u8>)>>>()
                .db()?;
            let mut sessions: Vec<StoredSession> = conn
                .prepare("SELECT key, value FROM broker_sessions ORDER BY key")
                .db()?
                .query_map([], |r| {
                    Ok(StoredSession {
                        key: r.get(0)?,
                        value: r.get(1)?,
                        messages: Vec::new(),
                    })
                })
                .db()?
                .collect::<rusqlite::Result<Vec<_>>>()
                .db()?;
            let mut stmt = conn
                .prepare("SELECT session, seq, value FROM broker_messages ORDER BY session, seq")
                .db()?;
            let rows = stmt
                .query_map([], |r| {
                    let seq: i64 = r.get(1)?;
                    Ok((r.get::<_, String>(0)?, seq, r.get::<_, Vec<u8>>(2)?))
                })
                .db()?;
            let mut i = 0;
            for row in rows {
                let (session, seq, value) = row.db()?;
                while i < sessions.len() && sessions[i].key < session {
                    i += 1;
                }
                if let Some(s) = sessions.get_mut(i).filter(|s| s.key == session) {
                    s.messages.push((u64::try_from(seq).unwrap_or(0), value));
                }
            }
            Ok(BrokerState { retained, sessions })
        })
        .await
    }

    async fn load_broker_session(&self, key: &str) -> Result<Option<StoredSession>> {
        let key = key.to_owned();
        self.read(move |conn| {
            let value: Option<Vec<u8>> = conn
                .prepare_cached("SELECT value FROM broker_sessions WHERE key = ?1")
                .db()?
                .query_row(params![key], |r| r.get(0))
                .optional()
                .db()?;
            let Some(value) = value else {
                return Ok(None);
            };
            let mut stmt = conn
                .prepare_cached(
                    "SELECT seq, value FROM broker_messages WHERE session = ?1 ORDER BY seq",
                )
                .db()?;
            let messages = stmt
                .query_map(params![key], |r| {
                    let seq: i64 = r.get(0)?;
                    Ok((u64::try_from(seq).unwrap_or(0), r.get::<_, Vec<u8>>(1)?))
                })
                .db()?
                .collect::<rusqlite::Result<Vec<_>>>()
                .db()?;
            Ok(Some(StoredSession {
                key,
                value,
                messages,
            }))
        })
        .await
    }
}
