//! [`AuditStore`] for PostgreSQL: the append-only audit log. Its strings are BYTEA (their
//! UTF-8): whatever a request put in its path, U+0000 included, an entry is stored as SQLite
//! stores it and never fails the append it shares with others.

use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use super::{bound_to_sql, column, count_to_sql, pg_error, ts_to_sql, u64_column, PgStore};
use crate::error::{Result, StoreError};
use crate::model::{AuditQuery, AuditRecord};
use crate::store::AuditStore;

const AUDIT_COLUMNS: &str = "id, at_ms, actor, action, target, source, node, status, detail";

fn text_column(row: &Row, index: usize) -> Result<String> {
    let bytes: Vec<u8> = column(row, index)?;
    String::from_utf8(bytes)
        .map_err(|e| StoreError::Backend(format!("column {index}: not UTF-8: {e}")))
}

fn audit_from_row(row: &Row) -> Result<AuditRecord> {
    let status: i32 = column(row, 7)?;
    Ok(AuditRecord {
        id: u64_column(row, 0)?,
        at_ms: u64_column(row, 1)?,
        actor: text_column(row, 2)?,
        action: text_column(row, 3)?,
        target: text_column(row, 4)?,
        source: text_column(row, 5)?,
        node: text_column(row, 6)?,
        status: u16::try_from(status).unwrap_or(u16::MAX),
        detail: text_column(row, 8)?,
    })
}

/// The smallest byte string greater than every string starting with `prefix`, if any (none
/// when `prefix` is empty or all 0xFF): `column >= prefix AND column < bound` is a prefix
/// match an index can serve.
fn prefix_upper_bound(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut bound = prefix.to_vec();
    while let Some(last) = bound.pop() {
        if last < u8::MAX {
            bound.push(last + 1);
            return Some(bound);
        }
    }
    None
}

/// A `list_audit` statement being built: SQL with `$n` placeholders and their values.
struct Filter {
    sql: String,
    args: Vec<Box<dyn ToSql + Sync + Send>>,
}

impl Filter {
    /// Appends `clause`, its `?` naming the next parameter, `value`.
    fn push(&mut self, clause: &str, value: Box<dyn ToSql + Sync + Send>) {
        self.args.push(value);
        let n = self.args.len();
        self.sql.push_str(&clause.replace('?', &format!("${n}")));
    }

    /// `column` starts with `prefix` (bytes), as a range an index can serve.
    fn prefix(&mut self, column: &str, prefix: &[u8]) {
        self.push(&format!(" AND {column} >= ?"), Box::new(prefix.to_vec()));
        if let Some(bound) = prefix_upper_bound(prefix) {
            self.push(&format!(" AND {column} < ?"), Box::new(bound));
        }
    }
}

#[async_trait::async_trait]
impl AuditStore for PgStore {
    /// One statement over arrays (`unnest ... WITH ORDINALITY`, inserted in that order), so
    /// the ids follow the entries' order.
    async fn append_audit(&self, entries: Vec<AuditRecord>) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let n = entries.len();
        let mut at = Vec::with_capacity(n);
        let mut status = Vec::with_capacity(n);
        let mut texts: [Vec<&[u8]>; 6] = Default::default();
        for e in &entries {
            at.push(ts_to_sql("at_ms", e.at_ms)?);
            status.push(i32::from(e.status));
            for (column, v) in texts.iter_mut().zip([
                &e.actor, &e.action, &e.target, &e.source, &e.node, &e.detail,
            ]) {
                column.push(v.as_bytes());
            }
        }
        let [actor, action, target, source, node, detail] = &texts;
        self.execute(
            "INSERT INTO audit_log (at_ms, actor, action, target, source, node, status, detail)
             SELECT at_ms, actor, action, target, source, node, status, detail
             FROM unnest($1::BIGINT[], $2::BYTEA[], $3::BYTEA[], $4::BYTEA[], $5::BYTEA[],
                         $6::BYTEA[], $7::INTEGER[], $8::BYTEA[])
                  WITH ORDINALITY AS e (at_ms, actor, action, target, source, node, status,
                                        detail, n)
             ORDER BY n",
            &[&at, actor, action, target, source, node, &status, detail],
            || "audit entry".to_owned(),
        )
        .await?;
        Ok(())
    }

    async fn list_audit(&self, q: AuditQuery) -> Result<Vec<AuditRecord>> {
        if q.limit == 0 {
            return Ok(Vec::new());
        }
        let mut f = Filter {
            sql: format!("SELECT {AUDIT_COLUMNS} FROM audit_log WHERE TRUE"),
            args: Vec::new(),
        };
        if let Some(actor) = q.actor {
            f.push(" AND actor = ?", Box::new(actor.into_bytes()));
        }
        match q.action {
            Some(a) if a.ends_with('.') => f.prefix("action", a.as_bytes()),
            Some(a) => f.push(" AND action = ?", Box::new(a.into_bytes())),
            None => {}
        }
        if let Some(t) = q.target_prefix {
            f.prefix("target", t.as_bytes());
        }
        if let Some(s) = q.since_ms {
            f.push(" AND at_ms >= ?", Box::new(bound_to_sql(s)));
        }
        if let Some(u) = q.until_ms {
            f.push(" AND at_ms < ?", Box::new(bound_to_sql(u)));
        }
        if let Some(b) = q.before_id {
            f.push(
                " AND id < ?",
                Box::new(i64::try_from(b).unwrap_or(i64::MAX)),
            );
        }
        f.push(" ORDER BY id DESC LIMIT ?", Box::new(count_to_sql(q.limit)));
        let Filter { sql, args } = f;
        let params: Vec<&(dyn ToSql + Sync)> = args
            .iter()
            .map(|a| a.as_ref() as &(dyn ToSql + Sync))
            .collect();
        // The statement's shape depends on the filters: prepared once per shape and cached.
        let rows = self.query(&sql, &params).await?;
        rows.iter().map(audit_from_row).collect()
    }

    async fn prune_audit(&self, before_ms: u64, max_rows: usize) -> Result<u64> {
        if max_rows == 0 {
            return Ok(0);
        }
        let before = bound_to_sql(before_ms);
        let max = count_to_sql(max_rows);
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "DELETE FROM audit_log WHERE id IN (
                     SELECT id FROM audit_log WHERE at_ms < $1 ORDER BY id LIMIT $2
                     FOR UPDATE SKIP LOCKED)",
            )
            .await
            .map_err(pg_error)?;
        client
            .execute(&stmt, &[&before, &max])
            .await
            .map_err(pg_error)
    }
}
