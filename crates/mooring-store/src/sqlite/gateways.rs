//! [`GatewayStore`] for SQLite: which gateway may act for which device (issue 20). Attaching
//! runs on the single writer, so its checks and bound hold against every other write; deleting
//! either device deletes the attachment (foreign keys, `ON DELETE CASCADE`).

use rusqlite::{params, Connection, OptionalExtension};

use super::{count_to_sql, ts_to_sql, u64_column, Db, SqliteStore};
use crate::error::{Result, StoreError};
use crate::model::check_text;
use crate::store::{AttachOutcome, GatewayStore, GATEWAY_PAGE_LEN_MAX};

fn device_exists(conn: &Connection, id: &str) -> Result<bool> {
    conn.prepare_cached("SELECT EXISTS (SELECT 1 FROM devices WHERE id = ?1)")
        .db()?
        .query_row(params![id], |r| r.get(0))
        .db()
}

/// The gateway `child` is attached to.
fn gateway_of_child(conn: &Connection, child: &str) -> Result<Option<String>> {
    conn.prepare_cached("SELECT gateway_id FROM device_gateways WHERE child_id = ?1")
        .db()?
        .query_row(params![child], |r| r.get(0))
        .optional()
        .db()
}

fn page_limit(limit: usize) -> i64 {
    count_to_sql(limit.min(GATEWAY_PAGE_LEN_MAX))
}

#[async_trait::async_trait]
impl GatewayStore for SqliteStore {
    async fn attach_child(
        &self,
        child: &str,
        gateway: &str,
        at_ms: u64,
        children_max: usize,
    ) -> Result<AttachOutcome> {
        check_text("child device id", child)?;
        check_text("gateway device id", gateway)?;
        let at = ts_to_sql("attached_at_ms", at_ms)?;
        let max = count_to_sql(children_max);
        let (child, gateway) = (child.to_owned(), gateway.to_owned());
        self.write(move |conn| {
            for id in [&child, &gateway] {
                if !device_exists(conn, id)? {
                    return Err(StoreError::NotFound(format!("device {id}")));
                }
            }
            if child == gateway {
                return Err(StoreError::InvalidInput(format!(
                    "device {child} cannot be its own gateway"
                )));
            }
            if let Some(parent) = gateway_of_child(conn, &gateway)? {
                return Err(StoreError::InvalidInput(format!(
                    "device {gateway} is a child of gateway {parent}: it cannot be a gateway"
                )));
            }
            let has_children: bool = conn
                .prepare_cached(
                    "SELECT EXISTS (SELECT 1 FROM device_gateways WHERE gateway_id = ?1)",
                )
                .db()?
                .query_row(params![child], |r| r.get(0))
                .db()?;
            if has_children {
                return Err(StoreError::InvalidInput(format!(
                    "device {child} is a gateway with children: it cannot be a child"
                )));
            }
            let previous = gateway_of_child(conn, &child)?;
            if previous.as_deref() == Some(gateway.as_str()) {
                return Ok(AttachOutcome::Attached(previous));
            }
            let children: i64 = conn
                .prepare_cached("SELECT count(*) FROM device_gateways WHERE gateway_id = ?1")
                .db()?
                .query_row(params![gateway], |r| r.get(0))
                .db()?;
            if children >= max {
                return Ok(AttachOutcome::GatewayFull);
            }
            conn.prepare_cached(
                "INSERT INTO device_gateways (child_id, gateway_id, attached_at_ms)
                 VALUES (?1, ?2, ?3)
                 ON CONFLICT (child_id) DO UPDATE
                 SET gateway_id = excluded.gateway_id, attached_at_ms = excluded.attached_at_ms",
            )
            .db()?
            .execute(params![child, gateway, at])
            .db()?;
            Ok(AttachOutcome::Attached(previous))
        })
        .await
    }

    async fn detach_child(&self, child: &str) -> Result<Option<String>> {
        let child = child.to_owned();
        self.write(move |conn| {
            conn.prepare_cached(
                "DELETE FROM device_gateways WHERE child_id = ?1 RETURNING gateway_id",
            )
            .db()?
            .query_row(params![child], |r| r.get(0))
            .optional()
            .db()
        })
        .await
    }

    async fn gateway_of(&self, child: &str) -> Result<Option<(String, u64)>> {
        let child = child.to_owned();
        self.read(move |conn| {
            conn.prepare_cached(
                "SELECT gateway_id, attached_at_ms FROM device_gateways WHERE child_id = ?1",
            )
            .db()?
            .query_row(params![child], |r| Ok((r.get(0)?, u64_column(r, 1)?)))
            .optional()
            .db()
        })
        .await
    }

    async fn children_of(
        &self,
        gateway: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, u64)>> {
        let (gateway, after) = (gateway.to_owned(), after.unwrap_or("").to_owned());
        let limit = page_limit(limit);
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT child_id, attached_at_ms FROM device_gateways
                     WHERE gateway_id = ?1 AND child_id > ?2 ORDER BY child_id LIMIT ?3",
                )
                .db()?;
            let rows = stmt
                .query_map(params![gateway, after, limit], |r| {
                    Ok((r.get(0)?, u64_column(r, 1)?))
                })
                .db()?;
            rows.collect::<rusqlite::Result<Vec<_>>>().db()
        })
        .await
    }

    async fn list_attachments(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, String)>> {
        let after = after.unwrap_or("").to_owned();
        let limit = page_limit(limit);
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT child_id, gateway_id FROM device_gateways
                     WHERE child_id > ?1 ORDER BY child_id LIMIT ?2",
                )
                .db()?;
            let rows = stmt
                .query_map(params![after, limit], |r| Ok((r.get(0)?, r.get(1)?)))
                .db()?;
            rows.collect::<rusqlite::Result<Vec<_>>>().db()
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::super::SqliteStore;

    #[test]
    fn gateway_queries_use_their_indexes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::open(dir.path()).expect("open");
        let conn = store.inner.reader().expect("reader");
        let plan = |sql: &str| super::super::tests::query_plan(&conn, sql);
        let children = plan(
            "SELECT child_id, attached_at_ms FROM device_gateways
             WHERE gateway_id = 'g' AND child_id > '' ORDER BY child_id LIMIT 10",
        );
        assert!(
            children.contains("device_gateways_by_gateway"),
            "{children}"
        );
        assert!(!children.contains("TEMP B-TREE"), "{children}");
        let count = plan("SELECT count(*) FROM device_gateways WHERE gateway_id = 'g'");
        assert!(count.contains("device_gateways_by_gateway"), "{count}");
    }
}
