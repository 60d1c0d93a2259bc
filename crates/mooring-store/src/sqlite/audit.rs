//! [`AuditStore`] for SQLite: the append-only audit log.

use rusqlite::{params_from_iter, Row};

use super::{bound_to_sql, count_to_sql, ts_to_sql, u64_column, Db, SqliteStore};
use crate::error::Result;
use crate::model::{AuditQuery, AuditRecord};
use crate::store::AuditStore;

const AUDIT_COLUMNS: &str = "id, at_ms, actor, action, target, source, node, status, detail";

fn audit_from_row(row: &Row<'_>) -> rusqlite::Result<AuditRecord> {
    let status = u64_column(row, 7)?;
    Ok(AuditRecord {
        id: u64_column(row, 0)?,
        at_ms: u64_column(row, 1)?,
        actor: row.get(2)?,
        action: row.get(3)?,
        target: row.get(4)?,
        source: row.get(5)?,
        node: row.get(6)?,
        status: u16::try_from(status).unwrap_or(u16::MAX),
        detail: row.get(8)?,
    })
}

/// `column` starts with `p`, byte for byte (`LIKE` would ignore ASCII case and need escapes;
/// `length`/`substr` on text stop at U+0000): the column's first bytes, as a blob, equal `p`'s.
fn prefix(
    arg: &mut impl FnMut(&mut String, &str, rusqlite::types::Value),
    sql: &mut String,
    column: &str,
    p: String,
) {
    let p = p.into_bytes();
    let len = i64::try_from(p.len()).unwrap_or(i64::MAX);
    arg(
        sql,
        &format!(" AND substr(CAST({column} AS BLOB), 1, {len}) = ?"),
        rusqlite::types::Value::Blob(p),
    );
}

#[async_trait::async_trait]
impl AuditStore for SqliteStore {
    async fn append_audit(&self, entries: Vec<AuditRecord>) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let rows = entries
            .into_iter()
            .map(|e| Ok((ts_to_sql("at_ms", e.at_ms)?, e)))
            .collect::<Result<Vec<_>>>()?;
        self.write(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "INSERT INTO audit_log (at_ms, actor, action, target, source, node, status, detail)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                )
                .db()?;
            for (at, e) in rows {
                stmt.execute(rusqlite::params![
                    at,
                    e.actor,
                    e.action,
                    e.target,
                    e.source,
                    e.node,
                    i64::from(e.status),
                    e.detail
                ])
                .db()?;
            }
            Ok(())
        })
        .await
    }

    async fn list_audit(&self, q: AuditQuery) -> Result<Vec<AuditRecord>> {
        self.read(move |conn| {
            let mut sql = format!("SELECT {AUDIT_COLUMNS} FROM audit_log WHERE 1 = 1");
            let mut args: Vec<rusqlite::types::Value> = Vec::new();
            let mut arg = |sql: &mut String, clause: &str, v: rusqlite::types::Value| {
                args.push(v);
                sql.push_str(&clause.replace('?', &format!("?{}", args.len())));
            };
            if let Some(actor) = q.actor {
                arg(&mut sql, " AND actor = ?", actor.into());
            }
            match q.action {
                Some(a) if a.ends_with('.') => prefix(&mut arg, &mut sql, "action", a),
                Some(a) => arg(&mut sql, " AND action = ?", a.into()),
                None => {}
            }
            if let Some(t) = q.target_prefix {
                prefix(&mut arg, &mut sql, "target", t);
            }
            if let Some(s) = q.since_ms {
                arg(&mut sql, " AND at_ms >= ?", bound_to_sql(s).into());
            }
            if let Some(u) = q.until_ms {
                arg(&mut sql, " AND at_ms < ?", bound_to_sql(u).into());
            }
            if let Some(b) = q.before_id {
                arg(
                    &mut sql,
                    " AND id < ?",
                    i64::try_from(b).unwrap_or(i64::MAX).into(),
                );
            }
            arg(
                &mut sql,
                " ORDER BY id DESC LIMIT ?",
                count_to_sql(q.limit).into(),
            );
            let mut stmt = conn.prepare(&sql).db()?;
            let rows = stmt
                .query_map(params_from_iter(args), audit_from_row)
                .db()?;
            rows.collect::<rusqlite::Result<Vec<_>>>().db()
        })
        .await
    }

    async fn prune_audit(&self, before_ms: u64, max_rows: usize) -> Result<u64> {
        let before = bound_to_sql(before_ms);
        let max = count_to_sql(max_rows);
        self.write_background(move |conn| {
            let n = conn
                .execute(
                    "DELETE FROM audit_log WHERE id IN (
                         SELECT id FROM audit_log WHERE at_ms < ?1 ORDER BY id LIMIT ?2)",
                    rusqlite::params![before, max],
                )
                .db()?;
            Ok(n as u64)
        })
        .await
    }
}
