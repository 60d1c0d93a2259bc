//! [`ClusterStore`] for SQLite: heartbeats, leases, session holders and values created once.
//! One SQLite node is a cluster of one; the semantics are those of the PostgreSQL backend.

use std::collections::BTreeMap;

use rusqlite::{params, OptionalExtension};

use super::{bound_to_sql, count_to_sql, ts_to_sql, Db, SqliteStore};
use crate::error::Result;
use crate::model::SessionOp;
use crate::store::{ClusterStore, SESSION_LOOKUP_LEN_MAX};

#[async_trait::async_trait]
impl ClusterStore for SqliteStore {
    async fn heartbeat(&self, node_id: &str, now_ms: u64) -> Result<()> {
        let now = ts_to_sql("now_ms", now_ms)?;
        let node_id = node_id.to_owned();
        self.write(move |conn| {
            conn.prepare_cached(
                "INSERT INTO cluster_nodes (node_id, heartbeat_ms) VALUES (?1, ?2)
                 ON CONFLICT (node_id) DO UPDATE
                 SET heartbeat_ms = max(heartbeat_ms, excluded.heartbeat_ms)",
            )
            .db()?
            .execute(params![node_id, now])
            .db()?;
            Ok(())
        })
        .await
    }

    async fn live_nodes(&self, alive_since_ms: u64) -> Result<Vec<(String, u64)>> {
        let since = bound_to_sql(alive_since_ms);
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT node_id, heartbeat_ms FROM cluster_nodes
                     WHERE heartbeat_ms >= ?1 ORDER BY node_id",
                )
                .db()?;
            let rows = stmt
                .query_map(params![since], |r| {
                    Ok((r.get::<_, String>(0)?, super::u64_column(r, 1)?))
                })
                .db()?;
            rows.collect::<rusqlite::Result<Vec<_>>>().db()
        })
        .await
    }

    async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        now_ms: u64,
        ttl_ms: u64,
    ) -> Result<bool> {
        let now = ts_to_sql("now_ms", now_ms)?;
        let until = bound_to_sql(now_ms.saturating_add(ttl_ms));
        let (name, holder) = (name.to_owned(), holder.to_owned());
        self.write(move |conn| {
            let got: Option<String> = conn
                .prepare_cached(
                    "INSERT INTO cluster_leases (name, holder, expires_at_ms) VALUES (?1, ?2, ?3)
                     ON CONFLICT (name) DO UPDATE
                     SET holder = excluded.holder, expires_at_ms = excluded.expires_at_ms
                     WHERE cluster_leases.holder = excluded.holder
                        OR cluster_leases.expires_at_ms <= ?4
                     RETURNING holder",
                )
                .db()?
                .query_row(params![name, holder, until, now], |r| r.get(0))
                .optional()
                .db()?;
            Ok(got.is_some())
        })
        .await
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<()> {
        let (name, holder) = (name.to_owned(), holder.to_owned());
        self.write(move |conn| {
            conn.prepare_cached("DELETE FROM cluster_leases WHERE name = ?1 AND holder = ?2")
                .db()?
                .execute(params![name, holder])
                .db()?;
            Ok(())
        })
        .await
    }

    async fn apply_session_ops(&self, ops: Vec<SessionOp>) -> Result<()> {
        if ops.is_empty() {
            return Ok(());
        }
        for op in &ops {
            if let SessionOp::Open { since_ms, .. } = op {
                ts_to_sql("since_ms", *since_ms)?;
            }
        }
        self.write(move |conn| {
            for op in &ops {
                match op {
                    SessionOp::Open {
                        device_id,
                        node_id,
                        since_ms,
                    } => conn
                        .prepare_cached(
                            "INSERT INTO device_sessions (device_id, node_id, since_ms)
                             SELECT id, ?2, ?3 FROM devices WHERE id = ?1
                             ON CONFLICT (device_id) DO UPDATE
                             SET node_id = excluded.node_id, since_ms = excluded.since_ms
                             WHERE device_sessions.since_ms <= excluded.since_ms",
                        )
                        .db()?
                        .execute(params![device_id, node_id, bound_to_sql(*since_ms)])
                        .db()?,
                    SessionOp::Close { device_id, node_id } => conn
                        .prepare_cached(
                            "DELETE FROM device_sessions WHERE device_id = ?1 AND node_id = ?2",
                        )
                        .db()?
                        .execute(params![device_id, node_id])
                        .db()?,
                };
            }
            Ok(())
        })
        .await
    }

    async fn session_nodes(
        &self,
        device_ids: &[String],
        alive_since_ms: u64,
    ) -> Result<BTreeMap<String, String>> {
        crate::model::check_len("device ids", device_ids.len(), SESSION_LOOKUP_LEN_MAX)?;
        let ids = device_ids.to_vec();
        let since = bound_to_sql(alive_since_ms);
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT s.node_id FROM device_sessions s
                     JOIN cluster_nodes n ON n.node_id = s.node_id
                     WHERE s.device_id = ?1 AND n.heartbeat_ms >= ?2",
                )
                .db()?;
            let mut out = BTreeMap::new();
            for id in ids {
                let node: Option<String> = stmt
                    .query_row(params![id, since], |r| r.get(0))
                    .optional()
                    .db()?;
                if let Some(node) = node {
                    out.insert(id, node);
                }
            }
            Ok(out)
        })
        .await
    }

    async fn count_sessions(&self, alive_since_ms: u64) -> Result<u64> {
        let since = bound_to_sql(alive_since_ms);
        self.read(move |conn| {
            conn.prepare_cached(
                "SELECT count(*) FROM device_sessions s
                 JOIN cluster_nodes n ON n.node_id = s.node_id
                 WHERE n.heartbeat_ms >= ?1",
            )
            .db()?
            .query_row(params![since], |r| super::u64_column(r, 0))
            .db()
        })
        .await
    }

    async fn clear_node_sessions(&self, node_id: &str) -> Result<u64> {
        let node_id = node_id.to_owned();
        self.write(move |conn| {
            let n = conn
                .prepare_cached("DELETE FROM device_sessions WHERE node_id = ?1")
                .db()?
                .execute(params![node_id])
                .db()?;
            Ok(u64::try_from(n).unwrap_or(u64::MAX))
        })
        .await
    }

    async fn reap_dead_sessions(
        &self,
        alive_since_ms: u64,
        max_rows: usize,
    ) -> Result<Vec<String>> {
        let since = bound_to_sql(alive_since_ms);
        let limit = count_to_sql(max_rows);
        self.write_background(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "DELETE FROM device_sessions WHERE device_id IN (
                         SELECT device_id FROM device_sessions
                         WHERE node_id NOT IN
                             (SELECT node_id FROM cluster_nodes WHERE heartbeat_ms >= ?1)
                         LIMIT ?2)
                     RETURNING device_id",
                )
                .db()?;
            let gone = stmt
                .query_map(params![since, limit], |r| r.get::<_, String>(0))
                .db()?
                .collect::<rusqlite::Result<Vec<_>>>()
                .db()?;
            conn.prepare_cached(
                "DELETE FROM cluster_nodes WHERE heartbeat_ms < ?1
                 AND NOT EXISTS (SELECT 1 FROM device_sessions s
                                 WHERE s.node_id = cluster_nodes.node_id)",
            )
            .db()?
            .execute(params![since])
            .db()?;
            Ok(gone)
        })
        .await
    }

    async fn put_value_once(&self, key: &str, value: Vec<u8>) -> Result<Vec<u8>> {
        let key = key.to_owned();
        self.write(move |conn| {
            conn.prepare_cached(
                "INSERT INTO cluster_values (key, value) VALUES (?1, ?2)
                 ON CONFLICT (key) DO NOTHING",
            )
            .db()?
            .execute(params![key, value])
            .db()?;
            conn.prepare_cached("SELECT value FROM cluster_values WHERE key = ?1")
                .db()?
                .query_row(params![key], |r| r.get(0))
                .db()
        })
        .await
    }

    async fn replace_value(&self, key: &str, expected: &[u8], value: Vec<u8>) -> Result<bool> {
        let (key, expected) = (key.to_owned(), expected.to_vec());
        self.write(move |conn| {
            let n = conn
                .prepare_cached(
                    "UPDATE cluster_values SET value = ?3 WHERE key = ?1 AND value = ?2",
                )
                .db()?
                .execute(params![key, expected, value])
                .db()?;
            Ok(n == 1)
        })
        .await
    }

    async fn get_value(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let key = key.to_owned();
        self.read(move |conn| {
            conn.prepare_cached("SELECT value FROM cluster_values WHERE key = ?1")
                .db()?
                .query_row(params![key], |r| r.get(0))
                .optional()
                .db()
        })
        .await
    }
}
