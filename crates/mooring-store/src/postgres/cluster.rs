//! [`ClusterStore`] for PostgreSQL: heartbeats, leases, session holders and values created
//! once, each one statement (an upsert with a condition where two nodes may race), so
//! concurrent nodes need no explicit locks.

use std::collections::BTreeMap;

use super::{column, count_to_sql, pg_error, ts_to_sql, u64_column, PgStore};
use crate::error::Result;
use crate::model::SessionOp;
use crate::store::{ClusterStore, SESSION_LOOKUP_LEN_MAX};

/// A query bound: anything above the storable range means "no bound".
fn bound_to_sql(ts_ms: u64) -> i64 {
    i64::try_from(ts_ms.min(crate::TS_MS_MAX)).unwrap_or(i64::MAX)
}

#[async_trait::async_trait]
impl ClusterStore for PgStore {
    async fn heartbeat(&self, node_id: &str, now_ms: u64) -> Result<()> {
        let now = ts_to_sql("now_ms", now_ms)?;
        self.execute(
            "INSERT INTO cluster_nodes (node_id, heartbeat_ms) VALUES ($1, $2)
             ON CONFLICT (node_id) DO UPDATE
             SET heartbeat_ms = GREATEST(cluster_nodes.heartbeat_ms, excluded.heartbeat_ms)",
            &[&node_id, &now],
            || format!("node {node_id}"),
        )
        .await?;
        Ok(())
    }

    async fn live_nodes(&self, alive_since_ms: u64) -> Result<Vec<(String, u64)>> {
        let rows = self
            .query(
                "SELECT node_id, heartbeat_ms FROM cluster_nodes
                 WHERE heartbeat_ms >= $1 ORDER BY node_id",
                &[&bound_to_sql(alive_since_ms)],
            )
            .await?;
        rows.iter()
            .map(|r| Ok((column::<String>(r, 0)?, u64_column(r, 1)?)))
            .collect()
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
        let row = self
            .query_opt(
                "INSERT INTO cluster_leases (name, holder, expires_at_ms) VALUES ($1, $2, $3)
                 ON CONFLICT (name) DO UPDATE
                 SET holder = excluded.holder, expires_at_ms = excluded.expires_at_ms
                 WHERE cluster_leases.holder = excluded.holder
                    OR cluster_leases.expires_at_ms <= $4
                 RETURNING holder",
                &[&name, &holder, &until, &now],
            )
            .await?;
        Ok(row.is_some())
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<()> {
        self.execute(
            "DELETE FROM cluster_leases WHERE name = $1 AND holder = $2",
            &[&name, &holder],
            || format!("lease {name}"),
        )
        .await?;
        Ok(())
    }

    async fn apply_session_ops(&self, ops: Vec<SessionOp>) -> Result<()> {
        if ops.is_empty() {
            return Ok(());
        }
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        let open = tx
            .prepare_cached(
                "INSERT INTO device_sessions (device_id, node_id, since_ms)
                 SELECT id, $2, $3 FROM devices WHERE id = $1
                 ON CONFLICT (device_id) DO UPDATE
                 SET node_id = excluded.node_id, since_ms = excluded.since_ms
                 WHERE device_sessions.since_ms <= excluded.since_ms",
            )
            .await
            .map_err(pg_error)?;
        let close = tx
            .prepare_cached("DELETE FROM device_sessions WHERE device_id = $1 AND node_id = $2")
            .await
            .map_err(pg_error)?;
        for op in &ops {
            match op {
                SessionOp::Open {
                    device_id,
                    node_id,
                    since_ms,
                } => {
                    let since = ts_to_sql("since_ms", *since_ms)?;
                    tx.execute(&open, &[device_id, node_id, &since])
                        .await
                        .map_err(pg_error)?
                }
                SessionOp::Close { device_id, node_id } => tx
                    .execute(&close, &[device_id, node_id])
                    .await
                    .map_err(pg_error)?,
            };
        }
        tx.commit().await.map_err(pg_error)
    }

    async fn session_nodes(
        &self,
        device_ids: &[String],
        alive_since_ms: u64,
    ) -> Result<BTreeMap<String, String>> {
        crate::model::check_len("device ids", device_ids.len(), SESSION_LOOKUP_LEN_MAX)?;
        if device_ids.is_empty() {
            return Ok(BTreeMap::new());
        }
        let rows = self
            .query(
                "SELECT s.device_id, s.node_id FROM device_sessions s
                 JOIN cluster_nodes n ON n.node_id = s.node_id
                 WHERE s.device_id = ANY($1) AND n.heartbeat_ms >= $2",
                &[&device_ids, &bound_to_sql(alive_since_ms)],
            )
            .await?;
        rows.iter()
            .map(|r| Ok((column::<String>(r, 0)?, column::<String>(r, 1)?)))
            .collect()
    }

    async fn count_sessions(&self, alive_since_ms: u64) -> Result<u64> {
        let row = self
            .query_opt(
                "SELECT count(*) FROM device_sessions s
                 JOIN cluster_nodes n ON n.node_id = s.node_id
                 WHERE n.heartbeat_ms >= $1",
                &[&bound_to_sql(alive_since_ms)],
            )
            .await?;
        match row {
            Some(r) => u64_column(&r, 0),
            None => Ok(0),
        }
    }

    async fn clear_node_sessions(&self, node_id: &str) -> Result<u64> {
        self.execute(
            "DELETE FROM device_sessions WHERE node_id = $1",
            &[&node_id],
            || format!("node {node_id}"),
        )
        .await
    }

    async fn reap_dead_sessions(
        &self,
        alive_since_ms: u64,
        max_rows: usize,
    ) -> Result<Vec<String>> {
        let since = bound_to_sql(alive_since_ms);
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        let rows = tx
            .query(
                "DELETE FROM device_sessions WHERE device_id IN (
                     SELECT device_id FROM device_sessions
                     WHERE node_id NOT IN
                         (SELECT node_id FROM cluster_nodes WHERE heartbeat_ms >= $1)
                     LIMIT $2
                     FOR UPDATE SKIP LOCKED)
                 RETURNING device_id",
                &[&since, &count_to_sql(max_rows)],
            )
            .await
            .map_err(pg_error)?;
        tx.execute(
            "DELETE FROM cluster_nodes WHERE heartbeat_ms < $1
             AND NOT EXISTS (SELECT 1 FROM device_sessions s
                             WHERE s.node_id = cluster_nodes.node_id)",
            &[&since],
        )
        .await
        .map_err(pg_error)?;
        tx.commit().await.map_err(pg_error)?;
        rows.iter().map(|r| column::<String>(r, 0)).collect()
    }

    async fn put_value_once(&self, key: &str, value: Vec<u8>) -> Result<Vec<u8>> {
        self.execute(
            "INSERT INTO cluster_values (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
            &[&key, &value],
            || format!("value {key}"),
        )
        .await?;
        let row = self
            .query_opt("SELECT value FROM cluster_values WHERE key = $1", &[&key])
            .await?;
        match row {
            Some(r) => column(&r, 0),
            None => Err(crate::StoreError::Backend(format!(
                "value {key} vanished after it was stored"
            ))),
        }
    }

    async fn replace_value(&self, key: &str, expected: &[u8], value: Vec<u8>) -> Result<bool> {
        let n = self
            .execute(
                "UPDATE cluster_values SET value = $3 WHERE key = $1 AND value = $2",
                &[&key, &expected, &value],
                || format!("value {key}"),
            )
            .await?;
        Ok(n == 1)
    }

    async fn get_value(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let row = self
            .query_opt("SELECT value FROM cluster_values WHERE key = $1", &[&key])
            .await?;
        row.as_ref().map(|r| column(r, 0)).transpose()
    }
}
