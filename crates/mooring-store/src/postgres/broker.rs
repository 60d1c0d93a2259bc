//! [`BrokerStateStore`] for PostgreSQL: three key → value tables (BYTEA both: a topic or key is
//! its UTF-8, so U+0000 is stored as SQLite stores it), one transaction per batch.
//!
//! A batch (up to [`crate::BROKER_BATCH_OPS_MAX`] ops) is applied as its net effect: the ops are
//! folded, in order, into the final state of every key they touch ([`NetEffect`]), which is
//! then written with a few bulk statements in one transaction. That is exactly what applying
//! them one by one would leave (the transaction makes intermediate states invisible), in a
//! handful of round trips instead of one per op: a cluster's database is across a network.

use std::collections::{BTreeMap, BTreeSet};

use tokio_postgres::Row;

use super::{column, pg_error, PgStore};
use crate::error::{Result, StoreError};
use crate::model::{BrokerOp, BrokerState, StoredSession};
use crate::store::BrokerStateStore;

fn seq_to_sql(seq: u64) -> Result<i64> {
    i64::try_from(seq).map_err(|_| StoreError::InvalidInput(format!("message seq {seq} too large")))
}

/// A topic or key column: its UTF-8 as BYTEA (PostgreSQL text cannot hold U+0000, which the MQTT
/// library lets through; one client's topic must not fail a batch shared with others).
fn name_column(row: &Row, index: usize) -> Result<String> {
    let bytes: Vec<u8> = column(row, index)?;
    String::from_utf8(bytes).map_err(|e| StoreError::Backend(format!("column {index}: {e}")))
}

fn seq_column(row: &Row, index: usize) -> Result<u64> {
    let v: i64 = column(row, index)?;
    u64::try_from(v)
        .map_err(|_| StoreError::Backend(format!("column {index}: negative message seq {v}")))
}

/// What a batch of ops leaves behind, key by key: `Some(value)` stored, `None` deleted.
#[derive(Default)]
struct NetEffect<'a> {
    retained: BTreeMap<&'a [u8], Option<&'a [u8]>>,
    sessions: BTreeMap<&'a [u8], Option<&'a [u8]>>,
    /// Sessions deleted by the batch: every message stored for them goes first. Messages put
    /// after the deletion are in `messages`.
    cleared: BTreeSet<&'a [u8]>,
    messages: BTreeMap<(&'a [u8], i64), Option<&'a [u8]>>,
}

impl<'a> NetEffect<'a> {
    fn fold(ops: &'a [BrokerOp]) -> Result<Self> {
        let mut net = NetEffect::default();
        for op in ops {
            match op {
                BrokerOp::PutRetained { topic, value } => {
                    net.retained.insert(topic.as_bytes(), Some(value));
                }
                BrokerOp::DeleteRetained { topic } => {
                    net.retained.insert(topic.as_bytes(), None);
                }
                BrokerOp::PutSession { key, value } => {
                    net.sessions.insert(key.as_bytes(), Some(value));
                }
                BrokerOp::DeleteSession { key } => {
                    let key = key.as_bytes();
                    net.sessions.insert(key, None);
                    net.cleared.insert(key);
                    // Its messages put earlier in the batch go too.
                    let earlier: Vec<(&[u8], i64)> = net
                        .messages
                        .range((key, i64::MIN)..)
                        .take_while(|((session, _), _)| *session == key)
                        .map(|(k, _)| *k)
                        .collect();
                    for k in earlier {
                        net.messages.remove(&k);
                    }
                }
                BrokerOp::PutMessage {
                    session,
                    seq,
                    value,
                } => {
                    net.messages
                        .insert((session.as_bytes(), seq_to_sql(*seq)?), Some(value));
                }
                BrokerOp::DeleteMessage { session, seq } => {
                    net.messages
                        .insert((session.as_bytes(), seq_to_sql(*seq)?), None);
                }
            }
        }
        Ok(net)
    }
}

/// Keys whose final state is "deleted", and the `(key, value)` columns of those stored.
fn split<'a, K: Copy>(map: &BTreeMap<K, Option<&'a [u8]>>) -> (Vec<K>, Vec<K>, Vec<&'a [u8]>) {
    let mut deleted = Vec::new();
    let (mut keys, mut values) = (Vec::new(), Vec::new());
    for (k, v) in map {
        match v {
            Some(v) => {
                keys.push(*k);
                values.push(*v);
            }
            None => deleted.push(*k),
        }
    }
    (deleted, keys, values)
}

#[async_trait::async_trait]
impl BrokerStateStore for PgStore {
    async fn apply_broker_ops(&self, ops: Vec<BrokerOp>) -> Result<()> {
        if ops.is_empty() {
            return Ok(());
        }
        let net = NetEffect::fold(&ops)?;
        let (retained_deleted, topics, retained_values) = split(&net.retained);
        let (sessions_deleted, keys, session_values) = split(&net.sessions);
        let (messages_deleted, message_keys, message_values) = split(&net.messages);
        let (deleted_sessions, deleted_seqs): (Vec<&[u8]>, Vec<i64>) =
            messages_deleted.into_iter().unzip();
        let (put_sessions, put_seqs): (Vec<&[u8]>, Vec<i64>) = message_keys.into_iter().unzip();
        let cleared: Vec<&[u8]> = net.cleared.into_iter().collect();

        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        // Cleared sessions' stored messages first: messages put after the deletion are in the
        // upsert below and must survive it.
        let steps: [(&str, &[&(dyn tokio_postgres::types::ToSql + Sync)], bool); 7] = [
            (
                "DELETE FROM broker_messages WHERE session = ANY($1::bytea[])",
                &[&cleared],
                cleared.is_empty(),
            ),
            (
                "DELETE FROM broker_messages WHERE (session, seq) IN
                   (SELECT * FROM unnest($1::bytea[], $2::bigint[]))",
                &[&deleted_sessions, &deleted_seqs],
                deleted_sessions.is_empty(),
            ),
            (
                "INSERT INTO broker_messages (session, seq, value)
                 SELECT * FROM unnest($1::bytea[], $2::bigint[], $3::bytea[])
                 ON CONFLICT (session, seq) DO UPDATE SET value = EXCLUDED.value",
                &[&put_sessions, &put_seqs, &message_values],
                put_sessions.is_empty(),
            ),
            (
                "DELETE FROM broker_sessions WHERE key = ANY($1::bytea[])",
                &[&sessions_deleted],
                sessions_deleted.is_empty(),
            ),
            (
                "INSERT INTO broker_sessions (key, value)
                 SELECT * FROM unnest($1::bytea[], $2::bytea[])
                 ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                &[&keys, &session_values],
                keys.is_empty(),
            ),
            (
                "DELETE FROM broker_retained WHERE topic = ANY($1::bytea[])",
                &[&retained_deleted],
                retained_deleted.is_empty(),
            ),
            (
                "INSERT INTO broker_retained (topic, value)
                 SELECT * FROM unnest($1::bytea[], $2::bytea[])
                 ON CONFLICT (topic) DO UPDATE SET value = EXCLUDED.value",
                &[&topics, &retained_values],
                topics.is_empty(),
            ),
        ];
        for (sql, params, skip) in steps {
            if skip {
                continue;
            }
            let stmt = tx.prepare_cached(sql).await.map_err(pg_error)?;
            tx.execute(&stmt, params).await.map_err(pg_error)?;
        }
        tx.commit().await.map_err(pg_error)
    }

    async fn load_broker_state(&self) -> Result<BrokerState> {
        let mut client = self.client().await?;
        // One snapshot for the three reads.
        let tx = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .start()
            .await
            .map_err(pg_error)?;
        tx.execute(
            "DELETE FROM broker_messages WHERE session NOT IN (SELECT key FROM broker_sessions)",
            &[],
        )
        .await
        .map_err(pg_error)?;
        let retained = tx
            .query(
                "SELECT topic, value FROM broker_retained ORDER BY topic",
                &[],
            )
            .await
            .map_err(pg_error)?
            .iter()
            .map(|r| Ok((name_column(r, 0)?, column(r, 1)?)))
            .collect::<Result<Vec<(String, Vec<u8>)>>>()?;
        let mut sessions = tx
            .query("SELECT key, value FROM broker_sessions ORDER BY key", &[])
            .await
            .map_err(pg_error)?
            .iter()
            .map(|r| {
                Ok(StoredSession {
                    key: name_column(r, 0)?,
                    value: column(r, 1)?,
                    messages: Vec::new(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let rows = tx
            .query(
                "SELECT session, seq, value FROM broker_messages ORDER BY session, seq",
                &[],
            )
            .await
            .map_err(pg_error)?;
        let mut i = 0;
        for row in &rows {
            let session: &[u8] = column(row, 0)?;
            while i < sessions.len() && sessions[i].key.as_bytes() < session {
                i += 1;
            }
            if let Some(s) = sessions.get_mut(i).filter(|s| s.key.as_bytes() == session) {
                s.messages.push((seq_column(row, 1)?, column(row, 2)?));
            }
        }
        tx.commit().await.map_err(pg_error)?;
        Ok(BrokerState { retained, sessions })
    }

    async fn load_broker_session(&self, key: &str) -> Result<Option<StoredSession>> {
        let mut client = self.client().await?;
        // One snapshot for both reads.
        let tx = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(pg_error)?;
        let row = tx
            .query_opt(
                "SELECT value FROM broker_sessions WHERE key = $1",
                &[&key.as_bytes()],
            )
            .await
            .map_err(pg_error)?;
        let Some(row) = row else {
            tx.commit().await.map_err(pg_error)?;
            return Ok(None);
        };
        let value: Vec<u8> = column(&row, 0)?;
        let messages = tx
            .query(
                "SELECT seq, value FROM broker_messages WHERE session = $1 ORDER BY seq",
                &[&key.as_bytes()],
            )
            .await
            .map_err(pg_error)?
            .iter()
            .map(|r| Ok((seq_column(r, 0)?, column(r, 1)?)))
            .collect::<Result<Vec<_>>>()?;
        tx.commit().await.map_err(pg_error)?;
        Ok(Some(StoredSession {
            key: key.to_owned(),
            value,
            messages,
        }))
    }
}
